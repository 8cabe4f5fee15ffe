"""Prometheus view of a Snapshot: a custom prometheus_client Collector.

Every scrape turns one Snapshot into metric families; nothing is kept between scrapes and no
gauge is mutated per event, so a scrape always shows one consistent moment. Naming follows
the Prometheus conventions: `netmemtrace_` prefix, base units in the name, `_total` on
counters, HELP on every family. Label values are escaped by prometheus_client.

A figure the kernel cannot give here (Unavailable in the Snapshot) is never exported as 0:
its series is left out and `netmemtrace_figure_unavailable_info{figure, reason, ...}` says
which metric is missing for which pool and why.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .. import __version__
from ..probes import MECHANISMS, ProbeStatus
from ..snapshot import PoolSnapshot, Snapshot, Unavailable

# Identity of a pool. `state` is deliberately not among them: a pool going active -> zombie
# -> released must stay one series, or rate() over its counters would break at each step.
POOL_LABELS = ("netdev", "ifindex", "netns", "pool_id", "napi_id", "provider")
POOL_STATES = ("active", "zombie", "released")
NS_PER_S = 1e9

_UNIT = ("page_pool's unit, as the kernel's pages_state_hold_cnt counts it: one allocation "
         "of 2^page_order pages, or one net_iov")
Figure = int | float | None | Unavailable


@dataclass(frozen=True)
class PoolMetric:
    """One per-pool family: name, type, HELP, and its series as (extra labels, getter)."""

    name: str
    kind: str                  # "gauge" or "counter"
    help: str
    series: tuple[tuple[tuple[str, ...], Callable[[PoolSnapshot], Figure]], ...]
    extra_labels: tuple[str, ...] = ()
    merge: Callable[[Iterable[float]], float] = sum


def _kernel(field: str) -> Callable[[PoolSnapshot], Figure]:
    def get(p: PoolSnapshot) -> Figure:
        return p.kernel if isinstance(p.kernel, Unavailable) else getattr(p.kernel, field)
    return get


def _ns_to_s(ns: int | None) -> float | None:
    return None if ns is None else ns / NS_PER_S


POOL_METRICS = (
    PoolMetric(
        "netmemtrace_page_pool_inflight_pages", "gauge",
        f"Pages handed out by the page_pool and not yet returned ({_UNIT}), from the "
        "kernel's own hold/release counters. Absent when unknown, see "
        "netmemtrace_figure_unavailable_info.",
        (((), lambda p: p.inflight_pages),)),
    PoolMetric(
        "netmemtrace_page_pool_inflight_bytes", "gauge",
        "Memory held by the page_pool's in-flight pages, bytes. Absent when unknown.",
        (((), lambda p: p.inflight_bytes),)),
    PoolMetric(
        "netmemtrace_page_pool_hold_pages", "counter",
        f"Pages the page_pool handed out since netmemtrace attached ({_UNIT}); "
        "netmem=page for host pages, net_iov for devmem / io_uring zcrx memory.",
        ((("page",), lambda p: p.hold_pages_total),
         (("net_iov",), lambda p: p.hold_net_iovs_total)),
        extra_labels=("netmem",)),
    PoolMetric(
        "netmemtrace_page_pool_release_pages", "counter",
        f"Pages returned to the page_pool's allocator since netmemtrace attached ({_UNIT}).",
        ((("page",), lambda p: p.release_pages_total),
         (("net_iov",), lambda p: p.release_net_iovs_total)),
        extra_labels=("netmem",)),
    PoolMetric(
        "netmemtrace_page_pool_release_calls", "counter",
        "page_pool_release tracepoint hits: one at destruction, then one per retry while "
        "pages are still in flight (a zombie pool).",
        (((), lambda p: p.release_calls),)),
    PoolMetric(
        "netmemtrace_page_pool_zombie_age_seconds", "gauge",
        "Seconds since a destroyed page_pool first tried to release with pages still in "
        "flight. Only zombie pools have this series.",
        (((), lambda p: _ns_to_s(p.zombie_age_ns)),), merge=max),
    PoolMetric(
        "netmemtrace_page_pool_kernel_inflight_pages", "gauge",
        "In-flight pages as the kernel reports them over netdev netlink (page-pool-get), "
        "beside netmemtrace's own figure. Absent when the kernel does not list the pool.",
        (((), _kernel("inflight_pages")),)),
    PoolMetric(
        "netmemtrace_page_pool_kernel_inflight_bytes", "gauge",
        "In-flight memory as the kernel reports it over netdev netlink, bytes.",
        (((), _kernel("inflight_bytes")),)),
)

# A hook's reason is "MECH: failure; MECH: failure" (probes.Hook.reason); split it only where
# a known mechanism name starts the next part, so a "; " inside a failure text stays intact.
_REASON_SPLIT = re.compile("; (?=(?:" + "|".join(MECHANISMS) + "): )")


def probe_failures(status: ProbeStatus) -> list[tuple[str, str]]:
    """(mechanism, failure) for every candidate of a hook that was passed over."""
    failures = []
    for part in _REASON_SPLIT.split(status.reason) if status.reason else []:
        mech, sep, why = part.partition(": ")
        failures.append((mech, why) if sep else ("", part))
    return failures


def pool_labels(p: PoolSnapshot) -> tuple[str, ...]:
    """Label values in POOL_LABELS order; an unknown identity part is the empty label."""
    return tuple("" if v is None else str(v)
                 for v in (p.netdev, p.ifindex, p.netns, p.pool_id, p.napi_id, p.provider))


def _family(name: str, kind: str, help_text: str, labels: tuple[str, ...]) -> Metric:
    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    return cls(name, help_text, labels=labels)


class SnapshotCollector(Collector):
    """Yields every netmemtrace metric family from the Snapshot `source` returns.

    source is called once per scrape; whatever it returns is the whole truth of that scrape.
    max_cgroups bounds the per-cgroup series (top N by memory, the rest summed into one
    cgroup="other" series) once cgroup figures are in the Snapshot.
    """

    def __init__(self, source: Callable[[], Snapshot], max_cgroups: int = 100) -> None:
        self._source = source
        self.max_cgroups = max_cgroups

    def collect(self) -> Iterator[Metric]:
        snap = self._source()
        unavailable = InfoMetricFamily(
            "netmemtrace_figure_unavailable",
            "A figure the kernel cannot give on this host: the series named by `figure` is "
            "left out (never exported as 0); `reason` says why. Pool labels are empty for "
            "host-wide figures.",
            labels=("figure", "reason", *POOL_LABELS))
        yield from self._build(snap)
        yield from self._probes(snap.probes)
        yield from self._pools(snap.pools, unavailable)
        yield from self._self_stats(snap, unavailable)
        yield unavailable

    @staticmethod
    def _build(snap: Snapshot) -> Iterator[Metric]:
        yield InfoMetricFamily("netmemtrace_build", "netmemtrace version running.",
                               value={"version": __version__})
        yield InfoMetricFamily("netmemtrace_kernel", "Kernel release of the traced host.",
                               value={"release": snap.kernel_release})
        yield GaugeMetricFamily(
            "netmemtrace_snapshot_timestamp_seconds",
            "Unix time the exported snapshot was taken; scrapes between refreshes see the "
            "same snapshot.", value=snap.taken_unix_s)
        errors = InfoMetricFamily(
            "netmemtrace_collector_error",
            "A collector that failed in the exported snapshot, with its error; its figures "
            "are missing from this scrape.", labels=("collector", "error"))
        for err in snap.errors:
            collector, _, text = err.partition(": ")
            errors.add_metric((collector, text), {})
        yield errors

    @staticmethod
    def _probes(rows: tuple[ProbeStatus, ...]) -> Iterator[Metric]:
        attached = GaugeMetricFamily(
            "netmemtrace_probe_attached",
            "1 if the hook is attached with the given mechanism, 0 if no mechanism could "
            "attach (see netmemtrace_probe_failure_info).",
            labels=("object", "hook", "mechanism"))
        failed = InfoMetricFamily(
            "netmemtrace_probe_failure",
            "An attach mechanism passed over for a hook, and why (one series per mechanism "
            "that failed or was ruled out, also for hooks that attached with another one).",
            labels=("object", "hook", "mechanism", "reason"))
        for r in rows:
            attached.add_metric((r.object, r.hook, r.mechanism or ""), 1 if r.attached else 0)
            for mech, why in probe_failures(r):
                failed.add_metric((r.object, r.hook, mech, why), {})
        yield attached
        yield failed

    @staticmethod
    def _pools(pools: tuple[PoolSnapshot, ...], unavailable: InfoMetricFamily
               ) -> Iterator[Metric]:
        # Pools that share an identity (pool_id unknown before 6.8, e.g. a driver's old zombie
        # pool and its replacement on the same queue) are one series: sums, or the max age.
        groups: dict[tuple[str, ...], list[PoolSnapshot]] = {}
        for p in pools:
            groups.setdefault(pool_labels(p), []).append(p)

        state = GaugeMetricFamily(
            "netmemtrace_page_pool_state",
            "Pools of this identity in each state (normally 1 for the current state, 0 for "
            "the others): active = in use, zombie = destroyed with pages still in flight, "
            "released = destroyed and every page returned.",
            labels=(*POOL_LABELS, "state"))
        for labels, group in groups.items():
            for s in POOL_STATES:
                state.add_metric((*labels, s), sum(p.state == s for p in group))
        yield state

        for spec in POOL_METRICS:
            fam = _family(spec.name, spec.kind, spec.help, (*POOL_LABELS, *spec.extra_labels))
            for labels, group in groups.items():
                for extra, get in spec.series:
                    values = [get(p) for p in group]
                    missing = next((v for v in values if isinstance(v, Unavailable)), None)
                    if missing is not None:
                        unavailable.add_metric(
                            (fam.name + ("_total" if spec.kind == "counter" else ""),
                             missing.reason, *labels), {})
                        continue
                    present = [v for v in values if v is not None]
                    if present:
                        fam.add_metric((*labels, *extra), spec.merge(present))
            yield fam

    @staticmethod
    def _self_stats(snap: Snapshot, unavailable: InfoMetricFamily) -> Iterator[Metric]:
        st = snap.self_stats
        yield GaugeMetricFamily(
            "netmemtrace_snapshot_build_seconds",
            "Time the exported snapshot took to read every BPF map and resolve names.",
            value=st.snapshot_build_ns / NS_PER_S)
        full = CounterMetricFamily(
            "netmemtrace_map_full_drops",
            "Objects not tracked because a BPF map was full (map=pools: new page_pools; "
            "map=retired_pools: destroyed pools whose final figures were lost).",
            labels=("map",))
        full.add_metric(("pools",), st.pool_map_full_total)
        full.add_metric(("retired_pools",), st.retired_map_full_total)
        yield full
        for name, help_text, values, scale in (
            ("netmemtrace_bpf_prog_run_seconds",
             "CPU time spent in each attached BPF program (kernel.bpf_stats_enabled=1).",
             st.prog_run_time_ns, NS_PER_S),
            ("netmemtrace_bpf_prog_runs",
             "Runs of each attached BPF program (kernel.bpf_stats_enabled=1).",
             st.prog_run_cnt, 1),
        ):
            fam = CounterMetricFamily(name, help_text, labels=("program",))
            if isinstance(values, Unavailable):
                no_pool = [""] * len(POOL_LABELS)
                unavailable.add_metric((f"{name}_total", values.reason, *no_pool), {})
            else:
                for prog, v in sorted(values.items()):
                    fam.add_metric((prog,), v / scale)
            yield fam
