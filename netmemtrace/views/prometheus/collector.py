"""A Snapshot to metric families: one loop over the catalogue.

Every scrape turns one Snapshot into families; no figure is kept between scrapes and no gauge
is mutated per event, so a scrape always shows one consistent moment. A figure the kernel cannot
give (Unavailable in the Snapshot) is never exported as 0: the loop leaves its series out and
netmemtrace_figure_unavailable_info says which figure is missing for which pool or memory
cgroup, and why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from netmemtrace.snapshot import Snapshot, Unavailable
from netmemtrace.views.prometheus.catalogue import CATALOGUE, MEMCG_LABELS, POOL_LABELS, Spec, View
from netmemtrace.views.prometheus.encode import Family, from_metric, to_metric

NO_POOL = ("",) * len(POOL_LABELS)
NO_MEMCG = ("",) * len(MEMCG_LABELS)


def _selector(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(names, values, strict=True)) + "}"


def _object(spec: Spec, obj: tuple[str, ...] | None) -> tuple[str, ...]:
    """The pool and memcg labels of netmemtrace_figure_unavailable_info for an object."""
    if obj is None or spec.object == "host":
        return (*NO_POOL, *NO_MEMCG)
    if spec.object == "memcg":
        return (*NO_POOL, *obj)
    return (*obj, *("",) * (len(POOL_LABELS) - len(obj)), *NO_MEMCG)  # pool, device


def families(snap: Snapshot, max_cgroups: int = 100) -> list[Family]:
    """Every family of the catalogue for snap, in catalogue order."""
    view = View.of(snap, max_cgroups)
    out = []
    for spec in CATALOGUE:
        rows = []
        extra, sample = spec.extra, spec.sample
        for obj, more, value in spec.rows(view):
            if value is None:
                continue
            if isinstance(value, Unavailable):
                figure = sample + (_selector(extra, more) if more else "")
                view.unavailable.append(((), (figure, value.reason, *_object(spec, obj)), 1))
            else:
                rows.append(((*obj, *more) if more else obj, value))  # type: ignore[misc]
        out.append(Family(spec.name, spec.type, spec.help, spec.labels, rows))
    return out


class SnapshotCollector(Collector):
    """Every netmemtrace family from the Snapshot `source` returns; a prometheus_client
    Collector too (collect()), for registries.

    source is called once per families() or collect(); whatever it returns is the whole
    truth of that scrape. max_cgroups bounds the per-cgroup (and per-process) series: the
    top N by memory, the rest summed into one cgroup="other" series.
    """

    def __init__(self, source: Callable[[], Snapshot], max_cgroups: int = 100) -> None:
        self._source = source
        self.max_cgroups = max_cgroups

    def families(self) -> list[Family]:
        return families(self._source(), self.max_cgroups)

    def collect(self) -> Iterator[Metric]:
        return map(to_metric, self.families())


def families_of(collector: Collector) -> list[Family]:
    """A collector's families: netmemtrace's own straight from the catalogue, another's
    (prometheus_client's process and platform collectors) as it made them."""
    if isinstance(collector, SnapshotCollector):
        return collector.families()
    return [from_metric(m) for m in collector.collect()]
