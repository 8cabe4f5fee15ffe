"""The Prometheus text (0.0.4) and OpenMetrics (1.0) formats, written straight from rows.

A Family is a metric family as rows of label values: nothing per sample is built but the
text itself, each distinct label set is escaped and joined once per scrape (a pool's labels
serve every pool family), and the sample lines, the same in both formats, are written once
and shared by them. The bytes are prometheus_client's (the tests compare them); a content
type this encoder does not write goes to prometheus_client's encoder through to_metric().
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, CONTENT_TYPE_PLAIN_1_0_0
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as CONTENT_TYPE_OM_1
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from netmemtrace.views.utf8 import visible

TEXT = "text"
OPENMETRICS = "openmetrics"


@dataclass(frozen=True)
class Histogram:
    """One histogram series: cumulative (le, count) buckets ending with +Inf, and the sum."""

    buckets: tuple[tuple[str, float], ...]
    sum: float


Value = float | Histogram


@dataclass
class Family:
    """A metric family: name (no _total / _info), type (counter, gauge, info, histogram),
    HELP, label names, and one row (label values, value) per series; an info row's value
    is ignored. metric: the prometheus_client family it came from (from_metric), whose
    samples are written instead of rows."""

    name: str
    type: str
    help: str
    labels: tuple[str, ...]
    rows: list[tuple[tuple[str, ...], Value]]
    metric: Metric | None = None
    _lines: str | None = field(default=None, repr=False)


# ---- sample lines (the same in both formats) ---------------------------------------------

def _label_escape(v: str) -> str:
    # visible() first: an undecodable byte of a cgroup name becomes a literal \xNN, whose
    # backslash is then escaped like any other.
    return visible(v).replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def _number(v: float) -> str:
    # floatToGoString's own result for the usual value, without its Python-level work: an
    # integer or a finite float below 1e6 (where Go and Python agree on the form) is repr's.
    if type(v) is int and -1_000_000 < v < 1_000_000:
        return f"{v}.0"
    if type(v) is float and -1e6 < v < 1e6:
        return repr(v)
    return floatToGoString(v)


class _Escaped(dict):
    """Label value -> its escaped form, each computed once."""

    def __missing__(self, v: str) -> str:
        e = self[v] = _label_escape(v)
        return e


Texts = dict[tuple[str, ...], str]  # label values -> their text


class _Labels:
    """Label sets as exposition text ('{a="x",b="y"}', names sorted as prometheus_client
    sorts them), each distinct one escaped and joined once: one format string per tuple of
    names puts the values in sorted-name order.

    Kept from one render to the next: a host's pools and cgroups change little between
    scrapes, so a label set is made once for many scrapes. Each render that writes lines
    starts a generation (rotate()) and takes what it finds in the previous one; only the
    label sets the last two renders used are kept, so gone pools and cgroups are forgotten.
    A text depends on nothing but its names and values, so renders in two threads at once
    are still right (at worst one misses the other's work); the lock only keeps rotate()
    from walking the generation while another render adds a tuple of names to it."""

    def __init__(self) -> None:
        self._escaped = _Escaped()
        self._by_names: dict[tuple[str, ...], tuple[str, Texts, Texts]] = {}
        self._lock = threading.Lock()

    def rotate(self) -> None:
        with self._lock:
            self._escaped = _Escaped()
            self._by_names = {names: (fmt, {}, now)
                              for names, (fmt, now, _old) in self._by_names.items()}

    def of(self, names: tuple[str, ...]) -> tuple[str, Texts, Texts]:
        """(format string, texts of this generation, of the previous one) of label names."""
        entry = self._by_names.get(names)
        if entry is None:
            order = sorted(range(len(names)), key=names.__getitem__)
            fmt = "{{" + ",".join(f'{names[i]}="{{{i}}}"' for i in order) + "}}" \
                if names else ""
            with self._lock:
                entry = self._by_names.setdefault(names, (fmt, {}, {}))
        return entry

    def text(self, names: tuple[str, ...], values: tuple[str, ...]) -> str:
        fmt, done, old = self.of(names)
        t = done.get(values)
        if t is None:
            t = old.get(values)
            if t is None:
                t = fmt.format(*map(self._escaped.__getitem__, values))
            done[values] = t
        return t

    def pairs(self, items: Iterable[tuple[str, str]]) -> str:
        items = sorted(items)
        return "{" + ",".join(f'{k}="{self._escaped[v]}"' for k, v in items) + "}" \
            if items else ""


def _lines(f: Family, labels: _Labels) -> str:
    if f.metric is not None:
        return "".join(f"{s.name}{labels.pairs(s.labels.items())} {floatToGoString(s.value)}\n"
                       for s in f.metric.samples)
    names, text = f.labels, labels.text
    if f.type == "histogram":
        out = []
        with_le = (*names, "le")
        for values, h in f.rows:
            assert isinstance(h, Histogram)
            out += [f"{f.name}_bucket{text(with_le, (*values, le))} {_number(n)}\n"
                    for le, n in h.buckets]
            own = text(names, values)
            out.append(f"{f.name}_count{own} {_number(h.buckets[-1][1])}\n")
            out.append(f"{f.name}_sum{own} {floatToGoString(h.sum)}\n")
        return "".join(out)
    sample = f.name + {"counter": "_total", "info": "_info"}.get(f.type, "")
    info = f.type == "info"
    # The loop of every large family: labels.text() inlined.
    fmt, done, old = labels.of(names)
    escaped = labels._escaped.__getitem__
    lines = []
    for values, v in f.rows:
        t = done.get(values)
        if t is None:
            t = old.get(values)
            if t is None:
                t = fmt.format(*map(escaped, values))
            done[values] = t
        lines.append(f"{sample}{t} 1.0\n" if info else
                     f"{sample}{t} {v}.0\n" if type(v) is int and -1_000_000 < v < 1_000_000
                     else f"{sample}{t} {_number(v)}\n")  # type: ignore[arg-type]
    return "".join(lines)


_LABELS = _Labels()  # the label texts every render shares (see _Labels)


# ---- the two formats ---------------------------------------------------------------------

_TEXT_TYPES = {"info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram",
               "unknown": "untyped"}
# What prometheus_client can express that this encoder does not write: such a family sends
# the whole body to prometheus_client's encoder.
_OM_ONLY_SUFFIXES = ("_created", "_gsum", "_gcount")


def _plain(f: Family) -> bool:
    m = f.metric
    return m is None or not m.unit and all(
        s.exemplar is None and s.timestamp is None and s.native_histogram is None
        and not s.name.endswith(_OM_ONLY_SUFFIXES) for s in m.samples)


def encode(families: Sequence[Family], fmt: str) -> bytes:
    """Prometheus text format 0.0.4 (fmt TEXT) or OpenMetrics 1.0 of the families, byte for
    byte as prometheus_client's generate_latest writes them."""
    if not all(map(_plain, families)):
        from prometheus_client.exposition import generate_latest as text_latest
        from prometheus_client.openmetrics.exposition import generate_latest as om_latest

        registry = _Metrics(families)
        return om_latest(registry) if fmt == OPENMETRICS else text_latest(registry)
    fresh = [f for f in families if f._lines is None]
    if fresh:  # a new snapshot (a second format of one reuses its lines)
        _LABELS.rotate()
        for f in fresh:
            f._lines = _lines(f, _LABELS)
    out: list[str] = []
    for f in families:
        name, kind = f.name, f.type
        if fmt == OPENMETRICS:
            doc = _label_escape(f.help)
        else:
            doc = f.help.replace("\\", r"\\").replace("\n", r"\n")
            name += {"counter": "_total", "info": "_info"}.get(kind, "")
            kind = _TEXT_TYPES.get(kind, kind)
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
        out.append(f._lines)
    if fmt == OPENMETRICS:
        out.append("# EOF\n")
    return "".join(out).encode()


# ---- prometheus_client's own families, both ways -------------------------------------------

def from_metric(m: Metric) -> Family:
    """A family another prometheus_client collector made (process, platform)."""
    return Family(m.name, m.type, m.documentation, (), [], metric=m)


def to_metric(f: Family) -> Metric:
    """The prometheus_client family of the same samples."""
    if f.metric is not None:
        return f.metric
    if f.type == "histogram":
        hist = HistogramMetricFamily(f.name, f.help, labels=f.labels)
        for values, h in f.rows:
            assert isinstance(h, Histogram)
            hist.add_metric(values, list(h.buckets), h.sum)
        return hist
    if f.type == "info":
        info = InfoMetricFamily(f.name, f.help, labels=f.labels)
        for values, _ in f.rows:
            info.add_metric(values, {})
        return info
    cls = CounterMetricFamily if f.type == "counter" else GaugeMetricFamily
    fam = cls(f.name, f.help, labels=f.labels)
    for values, v in f.rows:
        fam.add_metric(values, v)
    return fam


class _Metrics(Collector):
    """Families as a prometheus_client collector, for its encoders."""

    def __init__(self, families: Iterable[Family]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return map(to_metric, self._families)


# Content types (as prometheus_client's choose_encoder names them) whose body is one of the
# two formats above: every netmemtrace name is a legacy one, so the underscores and
# allow-utf-8 escapings leave it unchanged.
_FAST_FORMATS = {
    CONTENT_TYPE_PLAIN_0_0_4: TEXT,
    CONTENT_TYPE_PLAIN_1_0_0 + "; escaping=underscores": TEXT,
    CONTENT_TYPE_PLAIN_1_0_0 + "; escaping=allow-utf-8": TEXT,
    CONTENT_TYPE_OM_1: OPENMETRICS,
    CONTENT_TYPE_OM_1 + "; escaping=underscores": OPENMETRICS,
    CONTENT_TYPE_OM_1 + "; escaping=allow-utf-8": OPENMETRICS,
}


def render(families: Sequence[Family], content_type: str,
           encoder: Callable[[Collector], bytes]) -> bytes:
    """The body for content_type, as prometheus_client's `encoder` chosen with it (by
    choose_encoder) would write it; through encode() where that is the same."""
    fmt = _FAST_FORMATS.get(content_type)
    return encode(families, fmt) if fmt else encoder(_Metrics(families))
