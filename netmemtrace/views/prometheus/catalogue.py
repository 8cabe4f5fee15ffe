"""Every netmemtrace metric family, as data: one Spec each (name, type, HELP, the object it
describes, its other labels, and its rows from a Snapshot). Adding a metric is adding a Spec;
tests/golden/metrics.txt lists every name, type and HELP and a test keeps it in step.

Naming follows the Prometheus conventions: `netmemtrace_` prefix, base units in the name,
`_total` on counters (the encoder adds it), HELP on every family. A row's value may be
Unavailable (the collector leaves the series out and says why in
netmemtrace_figure_unavailable_info, never 0) or None (no series: nothing to say).

Per-cgroup series are capped (max_cgroups): the top cgroups by memory each have their own
series, the rest are summed into one series labelled cgroup="other".
"""

from __future__ import annotations

import heapq
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client.utils import floatToGoString

from netmemtrace import __version__
from netmemtrace.kernel.probes import MECHANISMS, ProbeStatus
from netmemtrace.snapshot import (
    HOLDER_KINDS,
    CollectorRun,
    DeviceSummary,
    DevmemSocket,
    MemcgSelfStats,
    MemcgSnapshot,
    NetmemSummary,
    PoolSnapshot,
    Recycling,
    Snapshot,
    Unavailable,
    lost_events,
)
from netmemtrace.views.prometheus.encode import Histogram

# Identity of a pool. `state` is deliberately not among them: a pool going active -> zombie
# -> released must stay one series, or rate() over its counters would break at each step.
POOL_LABELS = ("netdev", "ifindex", "netns", "pool_id", "napi_id", "provider")
POOL_STATES = ("active", "zombie", "released")
# Identity of a memory cgroup: its path on its hierarchy (v1/v2), and the Kubernetes pod UID
# and container ("runtime://id", as kube-state-metrics writes container_id) it belongs to.
MEMCG_LABELS = ("cgroup", "hierarchy", "pod", "container")
DEVICE_LABELS = ("netdev", "ifindex", "netns")
# The labels naming the object a family describes, by kind of object.
OBJECT_LABELS = {"host": (), "pool": POOL_LABELS, "memcg": MEMCG_LABELS,
                 "device": DEVICE_LABELS}
OTHER = "other"           # cgroup label of the sum of cgroups beyond max_cgroups
DELETED = "deleted"       # cgroup label of memcgs deleted since (real paths start with "/")
NETMEM_STATES = ("pool", "driver", "stack", "application")
# Hold-time histogram bounds: every other log2 bucket edge from 2^10 ns (1 us) to 2^40 ns
# (18 min). The BPF buckets are [2^i, 2^(i+1)) ns, so "<= 2^k - 1 ns" is exactly the sum of
# the buckets below 2^k: le is (2^k - 1) ns, in seconds.
HOLD_LE_LOG2 = tuple(range(10, 41, 2))
NS_PER_S = 1e9

Figure = int | float | None | Unavailable | Histogram
# One row: (labels of the object, None for a host-wide Unavailable; the family's other
# labels, () for an Unavailable covering all the object's series; the value).
Row = tuple[tuple[str, ...] | None, tuple[str, ...], Figure]


@dataclass(frozen=True)
class Spec:
    name: str                  # without _total / _info, which the encoder adds
    type: str                  # counter, gauge, info, histogram
    help: str
    object: str                # host / pool / memcg / device: OBJECT_LABELS
    extra: tuple[str, ...]     # the labels after the object's
    rows: Callable[[View], Iterable[Row]]

    @property
    def labels(self) -> tuple[str, ...]:
        return (*OBJECT_LABELS[self.object], *self.extra)

    @property
    def sample(self) -> str:
        """The name a figure of this family goes by (netmemtrace_figure_unavailable_info)."""
        return self.name + {"counter": "_total", "info": "_info",
                            "histogram": "_count"}.get(self.type, "")


# ---- the object labels and the cgroup cap --------------------------------------------------

def pool_labels(p: PoolSnapshot) -> tuple[str, ...]:
    """Label values in POOL_LABELS order; an unknown identity part is the empty label."""
    return tuple("" if v is None else str(v)
                 for v in (p.netdev, p.ifindex, p.netns, p.pool_id, p.napi_id, p.provider))


def memcg_labels(m: MemcgSnapshot) -> tuple[str, ...]:
    """Label values in MEMCG_LABELS order."""
    container = f"{m.runtime or 'unknown'}://{m.container_id}" if m.container_id else ""
    return (m.path if m.path is not None else DELETED, m.hierarchy, m.pod_uid or "", container)


def memory_rank(m: MemcgSnapshot) -> int:
    """What the cgroup cap ranks by: socket memory charged now (where known) + unaccounted
    zerocopy, i.e. would_be_charged_bytes where that is available (an unknown part: 0)."""
    return sum(v for v in (m.sock_charged_now_bytes, m.zerocopy_unaccounted_bytes)
               if isinstance(v, int))


def capped(items: Sequence, key: Callable[[object], object], limit: int
           ) -> tuple[list, list]:
    """(the top `limit` items by key, descending; the rest, in their order)."""
    top = heapq.nlargest(limit, items, key=key)  # not a sort: thousands of cgroups, top 100
    shown = {id(item) for item in top}
    return top, [item for item in items if id(item) not in shown]


def combine(values: Iterable[Figure], merge: Callable[[Iterable[float]], float],
            partial: bool) -> Figure:
    """One series' value from several objects' figures: Unavailable if one is (or, with
    partial, only if none is known), None if none is known, else merge of the known."""
    values = list(values)
    if len(values) == 1:  # the usual pool or cgroup: its own figure
        return values[0]
    try:  # the usual case, all known, in C: "other" combines thousands of cgroups
        return merge(values) if values else None  # type: ignore[arg-type]
    except TypeError:  # an Unavailable or a None among them
        pass
    missing = next((v for v in values if isinstance(v, Unavailable)), None)
    known = [v for v in values if v is not None and not isinstance(v, Unavailable)]
    if missing is not None and not (partial and known):
        return missing
    return merge(known) if known else None  # type: ignore[arg-type]


@dataclass
class View:
    """A Snapshot grouped the way the families need it, once per scrape; `unavailable` is
    filled by the collector's loop for the last family."""

    snap: Snapshot
    max_cgroups: int
    # Pools that share an identity (pool_id unknown before 6.8, e.g. a driver's old zombie
    # pool and its replacement on the same queue) are one series: sums, or the max age.
    pools: dict[tuple[str, ...], list[PoolSnapshot]] = field(default_factory=dict)
    # The top cgroups, then the rest as one "other" group (partial: figures known for some).
    memcgs: list[tuple[tuple[str, ...], list[MemcgSnapshot], bool]] = field(
        default_factory=list)
    other_cgroups: int = 0
    unavailable: list[Row] = field(default_factory=list)

    @classmethod
    def of(cls, snap: Snapshot, max_cgroups: int) -> View:
        v = cls(snap, max_cgroups)
        for p in snap.pools:
            v.pools.setdefault(pool_labels(p), []).append(p)
        top, rest = capped(snap.memcgs, lambda m: (memory_rank(m), m.path or ""), max_cgroups)
        groups: dict[tuple[str, ...], list[MemcgSnapshot]] = {}
        for m in top:
            groups.setdefault(memcg_labels(m), []).append(m)
        v.memcgs = [(labels, group, False) for labels, group in groups.items()]
        if rest:
            v.memcgs.append(((OTHER, "", "", ""), rest, True))
        v.other_cgroups = len(rest)
        return v

    @property
    def netmem_off(self) -> Unavailable | None:
        """Why no pool has netmem figures (the netmem object is not loaded), said once
        host-wide instead of once per pool."""
        return self.snap.netmem if isinstance(self.snap.netmem, Unavailable) else None


# ---- ways of declaring a family: the row makers ----------------------------------------------

def host(get: Callable[[Snapshot], Figure]) -> Callable[[View], Iterable[Row]]:
    """One series for the host."""
    return lambda v: [((), (), get(v.snap))]


def pool_series(*series: tuple[tuple[str, ...], Callable[[PoolSnapshot], Figure]],
                merge: Callable[[Iterable[float]], float] = sum
                ) -> Callable[[View], Iterable[Row]]:
    """Per pool identity, one series per (extra label values, getter)."""
    def rows(v: View) -> Iterator[Row]:
        for labels, group in v.pools.items():
            if len(group) == 1:  # the usual pool: its own figures
                p = group[0]
                for extra, get in series:
                    yield labels, extra, get(p)
                continue
            for extra, get in series:
                yield labels, extra, combine([get(p) for p in group], merge, partial=False)
    return rows


def pool_figure(get: Callable[[PoolSnapshot], Figure],
                merge: Callable[[Iterable[float]], float] = sum
                ) -> Callable[[View], Iterable[Row]]:
    return pool_series(((), get), merge=merge)


def recycling_series(*series: tuple[tuple[str, ...], Callable[[Recycling], Figure]]
                     ) -> Callable[[View], Iterable[Row]]:
    """Per pool, from its netlink page-pool-stats-get counters; one Unavailable per pool
    (not per series) where the pool has none."""
    def rows(v: View) -> Iterator[Row]:
        for labels, group in v.pools.items():
            missing = next((p.recycling for p in group
                            if isinstance(p.recycling, Unavailable)), None)
            if missing is not None:
                yield labels, (), missing
                continue
            for extra, get in series:
                yield labels, extra, combine([get(p.recycling) for p in group],  # type: ignore[arg-type]
                                             sum, partial=False)
    return rows


def memcg_figure(field_name: str, merge: Callable[[Iterable[float]], float] = sum,
                 scale: float = 1) -> Callable[[View], Iterable[Row]]:
    """Per capped cgroup, an attribute of MemcgSnapshot (dotted); merge combines cgroups
    summed into one series, then the value is divided by scale (ns -> s)."""
    get = operator.attrgetter(field_name)

    def rows(v: View) -> Iterator[Row]:
        for labels, group, partial in v.memcgs:
            value = combine(map(get, group), merge, partial)
            if scale != 1 and isinstance(value, int | float):
                value /= scale
            yield labels, (), value
    return rows


def device_figure(get: Callable[[DeviceSummary], Figure]) -> Callable[[View], Iterable[Row]]:
    return lambda v: [((d.netdev or "", str(d.ifindex), d.netns or ""), (), get(d))
                      for d in v.snap.devices]


def netmem_figure(get: Callable[[NetmemSummary], Figure]) -> Callable[[View], Iterable[Row]]:
    return host(lambda s: s.netmem if isinstance(s.netmem, Unavailable) else get(s.netmem))


def memcg_self(get: Callable[[MemcgSelfStats], Figure]) -> Callable[[View], Iterable[Row]]:
    """The memcg / zerocopy collector's own health; no series when it did not report (its
    error is in netmemtrace_collector_error_info)."""
    return host(lambda s: None if s.memcg_self_stats is None else get(s.memcg_self_stats))


def _kernel(name: str) -> Callable[[PoolSnapshot], Figure]:
    def get(p: PoolSnapshot) -> Figure:
        return p.kernel if isinstance(p.kernel, Unavailable) else getattr(p.kernel, name)
    return get


def _ns_to_s(ns: int | None) -> float | None:
    return None if ns is None else ns / NS_PER_S


def _per_s(*names: str) -> Callable[[Recycling], Figure]:
    return lambda r: None if r.per_s is None else sum(r.per_s[n] for n in names)


# ---- rows that need more than a getter -------------------------------------------------------

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


def _collector_errors(v: View) -> Iterator[Row]:
    for err in v.snap.errors:
        yield (), (err.collector, err.message), 1


def _probe_attached(v: View) -> Iterator[Row]:
    for r in v.snap.probes:
        yield (), (r.object, r.hook, r.mechanism or ""), 1 if r.attached else 0


def _probe_failures(v: View) -> Iterator[Row]:
    for r in v.snap.probes:
        for mech, why in probe_failures(r):
            yield (), (r.object, r.hook, mech, why), 1


def _pool_states(v: View) -> Iterator[Row]:
    for labels, group in v.pools.items():
        for s in POOL_STATES:
            yield labels, (s,), sum(p.state == s for p in group)


def _netmem_pages(v: View) -> Iterator[Row]:
    if (off := v.netmem_off) is not None:
        yield None, (), off
        return
    for labels, group in v.pools.items():
        missing = next((p.netmem_states for p in group
                        if isinstance(p.netmem_states, Unavailable)), None)
        if missing is not None:
            yield labels, (), missing
            continue
        by_key: dict[tuple[str, str], list[Figure]] = {}
        for p in group:
            for typ, counts in p.netmem_states.by_type.items():  # type: ignore[union-attr]
                for s in NETMEM_STATES:
                    by_key.setdefault((typ, s), []).append(counts.get(s))
        for key, values in by_key.items():
            yield labels, key, combine(values, sum, partial=False)


def _netmem_transitions(v: View) -> Iterator[Row]:
    if (off := v.netmem_off) is not None:
        yield None, (), off
        return
    for labels, group in v.pools.items():
        missing = next((p.netmem_states for p in group
                        if isinstance(p.netmem_states, Unavailable)), None)
        if missing is not None:
            yield labels, (), missing
            continue
        transitions: dict[str, int] = {}
        for p in group:
            for move, n in p.netmem_states.transitions_total.items():  # type: ignore[union-attr]
                transitions[move] = transitions.get(move, 0) + n
        for move, n in sorted(transitions.items()):
            src, _, dst = move.partition("->")
            yield labels, (src, dst), n


def _hold_histogram(v: View) -> Iterator[Row]:
    if (off := v.netmem_off) is not None:
        yield None, (), off
        return
    for labels, group in v.pools.items():
        missing = next((p.netmem_hold_ns for p in group
                        if isinstance(p.netmem_hold_ns, Unavailable)), None)
        if missing is not None:
            yield labels, (), missing
            continue
        hists = [p.netmem_hold_ns for p in group]
        buckets = [b for h in hists for b in h.buckets]  # type: ignore[union-attr]
        total = sum(b.count for b in buckets)
        if not total:
            continue
        cumulative = tuple((floatToGoString(((1 << k) - 1) / NS_PER_S),
                            sum(b.count for b in buckets if b.hi_ns <= 1 << k))
                           for k in HOLD_LE_LOG2)
        yield labels, (), Histogram((*cumulative, ("+Inf", total)),
                                    sum(h.sum_ns for h in hists) / NS_PER_S)  # type: ignore[union-attr]


def _zombie_holders(v: View) -> Iterator[Row]:
    for labels, group in v.pools.items():
        kinds: dict[str, int] = {}
        for p in group:
            for h in p.holders:
                kinds[h.kind] = kinds.get(h.kind, 0) + h.pages
        for kind, n in sorted(kinds.items()):
            yield labels, (kind,), n


def _process_unaccounted(v: View) -> Iterator[Row]:
    # The top N of every process (tens of thousands on a large host): a heap, not a sort;
    # the row index breaks ties so that snapshots are never compared. A process whose
    # figure is unknown (ledger events lost) ranks last, its series unavailable.
    shown = heapq.nlargest(v.max_cgroups, (
        (p.zerocopy_unaccounted_bytes if isinstance(p.zerocopy_unaccounted_bytes, int)
         else -1, -p.pid, -i, m, p)
        for i, (m, p) in enumerate((m, p) for m in v.snap.memcgs for p in m.processes)
        if p.zerocopy_unaccounted_bytes))
    for *_, m, p in shown:
        yield memcg_labels(m), (str(p.pid), p.comm or ""), p.zerocopy_unaccounted_bytes


def _process_exited(v: View) -> Iterator[Row]:
    shown = heapq.nlargest(v.max_cgroups, (
        (-(p.exit_age_ns or 0), -p.pid, -i, m, p)
        for i, (m, p) in enumerate((m, p) for m in v.snap.memcgs for p in m.processes)
        if p.exited))
    for *_, m, p in shown:
        yield memcg_labels(m), (str(p.pid), p.comm or ""), (p.exit_age_ns or 0) / NS_PER_S


def _devmem_outstanding(v: View) -> Iterator[Row]:
    snap = v.snap
    if not snap.devmem_sockets:
        return
    hierarchy = snap.memcgs[0].hierarchy if snap.memcgs else ""
    known = {m.cgroup_id: memcg_labels(m) for m in snap.memcgs}
    by_memcg: dict[tuple[str, ...], list[DevmemSocket]] = {}
    for s in snap.devmem_sockets:
        if s.state != "open":
            continue
        labels = known.get(s.memcg_id) or (
            s.memcg_path if s.memcg_path is not None else DELETED, hierarchy, "", "")
        by_memcg.setdefault(labels, []).append(s)

    def held(item: tuple[tuple[str, ...], list[DevmemSocket]]) -> tuple[int, str]:
        return (sum(s.tokens_outstanding for s in item[1]
                    if isinstance(s.tokens_outstanding, int)), item[0][0])

    top, rest = capped(list(by_memcg.items()), held, v.max_cgroups)
    parts = [(labels, socks, False) for labels, socks in top]
    if rest:
        parts.append(((OTHER, "", "", ""), [s for _, ss in rest for s in ss], True))
    for labels, socks, partial in parts:
        yield labels, (), combine((s.tokens_outstanding for s in socks), sum, partial)


def _events_lost(v: View) -> Iterator[Row]:
    for obj, counter, n in lost_events(v.snap.stats):
        yield (), (obj, counter), n


def _stat(obj: str, counter: str) -> Callable[[Snapshot], Figure]:
    """One counter of Snapshot.stats; no series when its object did not report."""
    return lambda s: s.stats.get(obj, {}).get(counter)


def _collectors(get: Callable[[CollectorRun], Figure]) -> Callable[[View], Iterable[Row]]:
    return lambda v: [((), (c.collector,), get(c)) for c in v.snap.collectors]


def _prog_stats(values: Callable[[Snapshot], dict[str, int] | Unavailable], scale: float
                ) -> Callable[[View], Iterable[Row]]:
    def rows(v: View) -> Iterator[Row]:
        by_prog = values(v.snap)
        if isinstance(by_prog, Unavailable):
            yield (), (), by_prog
            return
        for prog, n in sorted(by_prog.items()):
            yield (), (prog,), n / scale
    return rows


# ---- the catalogue ---------------------------------------------------------------------------

_UNIT = ("page_pool's unit, as the kernel's pages_state_hold_cnt counts it: one allocation "
         "of 2^page_order pages, or one net_iov")
_CAPPED = ("Only the top N cgroups by memory (socket memory + unaccounted zerocopy, "
           "--max-cgroups) have their own series; the others are summed into cgroup=\"other\" "
           "(sum of the figures known for them), whose counters drop when a cgroup moves "
           "into the top N.")
_LEDGER = ("Absent once a ledger event that may concern a process of the cgroup was lost "
           "(ringbuf_full, prog_recursion_lost), see netmemtrace_figure_unavailable_info.")
_ESTIMATED = ("Estimated: 1 in netmemtrace_netmem_sample_factor netmem is tracked and "
              "counts are scaled by that factor.")
RECYCLED_PER_S = ("recycle_cached", "recycle_ring")
RETURNED_PER_S = (*RECYCLED_PER_S, "recycle_ring_full", "recycle_released_refcnt")
_RATIO = ("recycled / given back = (recycle_cached + recycle_ring) / (recycle_cached + "
          "recycle_ring + recycle_ring_full + recycle_released_refcnt)")
ALLOC_PATHS = ("fast", "slow", "slow_high_order", "empty", "refill", "waive")
RECYCLE_PATHS = ("cached", "cache_full", "ring", "ring_full", "released_refcnt")


def _memcg_zerocopy(name: str, field_name: str, what: str) -> Spec:
    return Spec(f"netmemtrace_memcg_zerocopy_{name}", "counter",
                f"{what}, by the cgroup's processes (exited ones included) since netmemtrace "
                f"attached. {_CAPPED}", "memcg", (), memcg_figure(f"zerocopy.{field_name}"))


def _netmem_count(name: str, kind: str, help_text: str,
                  get: Callable[[NetmemSummary], Figure]) -> Spec:
    return Spec(name, kind, help_text, "host", (), netmem_figure(get))


def _memcg_self(name: str, kind: str, help_text: str,
                get: Callable[[MemcgSelfStats], Figure]) -> Spec:
    return Spec(name, kind, help_text, "host", (), memcg_self(get))


def _device(name: str, help_text: str, get: Callable[[DeviceSummary], Figure]) -> Spec:
    return Spec(name, "gauge", help_text, "device", (), device_figure(get))


UNAVAILABLE = Spec(
    "netmemtrace_figure_unavailable", "info",
    "A figure the kernel cannot give on this host: the series named by `figure` is left out "
    "(never exported as 0); `reason` says why. `figure` is the sample name, followed by the "
    "labels that pick the series within the object in selector form (e.g. "
    "{state=\"driver\"}) when only some are missing. Pool and cgroup labels name the "
    "object; they are empty for host-wide figures.",
    "host", ("figure", "reason", *POOL_LABELS, *MEMCG_LABELS), lambda v: v.unavailable)

CATALOGUE: tuple[Spec, ...] = (
    # ---- this build, this host, this snapshot
    Spec("netmemtrace_build", "info", "netmemtrace version running.", "host", ("version",),
         lambda v: [((), (__version__,), 1)]),
    Spec("netmemtrace_kernel", "info", "Kernel release of the traced host.", "host",
         ("release",), lambda v: [((), (v.snap.kernel_release,), 1)]),
    Spec("netmemtrace_snapshot_timestamp_seconds", "gauge",
         "Unix time the exported snapshot was taken; scrapes between refreshes see the same "
         "snapshot.", "host", (), host(lambda s: s.taken_unix_s)),
    Spec("netmemtrace_collector_error", "info",
         "A collector that failed in the exported snapshot, with its error; its figures are "
         "missing from this scrape.", "host", ("collector", "error"), _collector_errors),
    Spec("netmemtrace_scrape_collector_success", "gauge",
         "1 if the collector read its part of the exported snapshot, 0 if it failed (see "
         "netmemtrace_collector_error_info), as node_exporter's node_scrape_collector_success.",
         "host", ("collector",), _collectors(lambda c: int(c.success))),
    Spec("netmemtrace_scrape_collector_duration_seconds", "gauge",
         "Time the collector took to read its part of the exported snapshot.", "host",
         ("collector",), _collectors(lambda c: c.duration_ns / NS_PER_S)),
    Spec("netmemtrace_probe_attached", "gauge",
         "1 if the hook is attached with the given mechanism, 0 if no mechanism could attach "
         "(see netmemtrace_probe_failure_info).", "host", ("object", "hook", "mechanism"),
         _probe_attached),
    Spec("netmemtrace_probe_failure", "info",
         "An attach mechanism passed over for a hook, and why (one series per mechanism that "
         "failed or was ruled out, also for hooks that attached with another one).", "host",
         ("object", "hook", "mechanism", "reason"), _probe_failures),
    # ---- page pools
    Spec("netmemtrace_page_pool_state", "gauge",
         "Pools of this identity in each state (normally 1 for the current state, 0 for the "
         "others): active = in use, zombie = destroyed with pages still in flight, released = "
         "destroyed and every page returned.", "pool", ("state",), _pool_states),
    Spec("netmemtrace_page_pool_inflight_pages", "gauge",
         f"Pages handed out by the page_pool and not yet returned ({_UNIT}), from the "
         "kernel's own hold/release counters. Absent when unknown, see "
         "netmemtrace_figure_unavailable_info.", "pool", (),
         pool_figure(lambda p: p.inflight_pages)),
    Spec("netmemtrace_page_pool_inflight_bytes", "gauge",
         "Memory held by the page_pool's in-flight pages, bytes. Absent when unknown.",
         "pool", (), pool_figure(lambda p: p.inflight_bytes)),
    Spec("netmemtrace_page_pool_hold_pages", "counter",
         f"Pages the page_pool handed out since netmemtrace attached ({_UNIT}); netmem=page "
         "for host pages, net_iov for devmem / io_uring zcrx memory. Absent for a pool "
         "netlink lists that netmemtrace could not track (the pools map was full), see "
         "netmemtrace_figure_unavailable_info.", "pool", ("netmem",),
         pool_series((("page",), lambda p: p.hold_pages_total),
                     (("net_iov",), lambda p: p.hold_net_iovs_total))),
    Spec("netmemtrace_page_pool_release_pages", "counter",
         f"Pages returned to the page_pool's allocator since netmemtrace attached ({_UNIT}). "
         "Absent where the pool's holds are.", "pool", ("netmem",),
         pool_series((("page",), lambda p: p.release_pages_total),
                     (("net_iov",), lambda p: p.release_net_iovs_total))),
    Spec("netmemtrace_page_pool_release_calls", "counter",
         "page_pool_release tracepoint hits: one at destruction, then one per retry while "
         "pages are still in flight (a zombie pool).", "pool", (),
         pool_figure(lambda p: p.release_calls)),
    Spec("netmemtrace_page_pool_zombie_age_seconds", "gauge",
         "Seconds since a destroyed page_pool first tried to release with pages still in "
         "flight. Only zombie pools have this series.", "pool", (),
         pool_figure(lambda p: _ns_to_s(p.zombie_age_ns), merge=max)),
    Spec("netmemtrace_page_pool_kernel_inflight_pages", "gauge",
         "In-flight pages as the kernel reports them over netdev netlink (page-pool-get), "
         "beside netmemtrace's own figure. Absent when the kernel does not list the pool.",
         "pool", (), pool_figure(_kernel("inflight_pages"))),
    Spec("netmemtrace_page_pool_kernel_inflight_bytes", "gauge",
         "In-flight memory as the kernel reports it over netdev netlink, bytes.", "pool", (),
         pool_figure(_kernel("inflight_bytes"))),
    Spec("netmemtrace_page_pool_kernel_alloc", "counter",
         "The pool's allocation counters from netlink page-pool-stats-get, since the pool's "
         "creation (path: fast = page from the pool's cache; slow / slow_high_order = calls "
         "to the page allocator; refill = cache refills from the ring; empty = ring empty "
         "too; waive = ring page of the wrong NUMA node, freed). Absent without "
         "CONFIG_PAGE_POOL_STATS or for pools netlink does not list.", "pool", ("path",),
         recycling_series(*(((path,), operator.attrgetter(f"counters.alloc_{path}"))
                            for path in ALLOC_PATHS))),
    Spec("netmemtrace_page_pool_kernel_recycle_pages", "counter",
         "Pages given back to the pool, by where they went, from netlink page-pool-stats-get "
         "since the pool's creation (path: cached = the pool's cache; ring = its ring; "
         "ring_full = ring full, freed; released_refcnt = still referenced, freed; "
         "cache_full = cache full, went on to the ring: not a page of its own).", "pool",
         ("path",),
         recycling_series(*(((path,), operator.attrgetter(f"counters.recycle_{path}"))
                            for path in RECYCLE_PATHS))),
    Spec("netmemtrace_page_pool_recycled_pages_per_second", "gauge",
         "Pages the pool recycled per second (recycle_cached + recycle_ring) over the "
         "exporter's last refresh interval; absent before the second refresh.", "pool", (),
         recycling_series(((), _per_s(*RECYCLED_PER_S)))),
    Spec("netmemtrace_page_pool_returned_pages_per_second", "gauge",
         "Pages given back to the pool per second (recycled or freed: cached + ring + "
         "ring_full + released_refcnt) over the last refresh interval.", "pool", (),
         recycling_series(((), _per_s(*RETURNED_PER_S)))),
    Spec("netmemtrace_page_pool_recycled_ratio", "gauge",
         f"Share of the pages given back that the pool kept for reuse, since its creation: "
         f"{_RATIO}. Every page given back is in exactly one of those four counters and a "
         "page in flight in none, so it does not under-count like ynltool's (ring + cached) "
         "/ (fast + refill + slow). Absent before any page came back.", "pool", (),
         recycling_series(((), operator.attrgetter("recycled_ratio")))),
    Spec("netmemtrace_page_pool_netmem_pages", "gauge",
         "A pool's netmem by who holds them now (state: pool = cached in the pool, driver = "
         "allocated by the driver, stack = in an skb, application = devmem token / io_uring "
         "zcrx buffer handed to user space), by netmem type (page, dmabuf, io_uring, "
         f"net_iov). {_ESTIMATED} A state netmemtrace cannot observe on this kernel is "
         "absent, see netmemtrace_figure_unavailable_info.", "pool", ("netmem", "state"),
         _netmem_pages),
    Spec("netmemtrace_page_pool_netmem_transitions", "counter",
         f"Netmem ownership transitions of a pool since netmemtrace attached. {_ESTIMATED}",
         "pool", ("from", "to"), _netmem_transitions),
    Spec("netmemtrace_page_pool_netmem_hold_seconds", "histogram",
         "How long applications held a pool's netmem (devmem tokens, io_uring zcrx buffers) "
         "before giving it back, from log2 nanosecond buckets: le is 2^k - 1 ns (exact). Only "
         f"pools whose applications gave netmem back have a series. {_ESTIMATED}", "pool",
         (), _hold_histogram),
    Spec("netmemtrace_page_pool_zombie_inflight_pages", "gauge",
         "In-flight pages of a zombie pool by who holds them (holder_kind: "
         + "; ".join(f"{kind} = {what}" for kind, what in HOLDER_KINDS.items())
         + "). Sums to the pool's in-flight pages; zombie pools only.", "pool",
         ("holder_kind",), _zombie_holders),
    # ---- devices: `ynltool page-pool stats` parity
    _device("netmemtrace_device_page_pools",
            "Page pools of the NIC netlink lists, zombies included (ynltool's \"page pools\"); "
            "pools the kernel re-parented to loopback count under their real NIC.",
            lambda d: d.pools),
    _device("netmemtrace_device_page_pool_zombies",
            "Listed pools of the NIC with a detach time: destroyed, pages still in flight.",
            lambda d: d.zombies),
    _device("netmemtrace_device_page_pool_inflight_pages",
            "In-flight pages of every listed pool of the NIC, per netlink (ynltool's refs).",
            lambda d: d.inflight_pages),
    _device("netmemtrace_device_page_pool_inflight_bytes",
            "In-flight memory of every listed pool of the NIC, per netlink, bytes.",
            lambda d: d.inflight_bytes),
    _device("netmemtrace_device_page_pool_zombie_inflight_pages",
            "In-flight pages of the NIC's zombie pools, per netlink.",
            lambda d: d.zombie_inflight_pages),
    _device("netmemtrace_device_page_pool_zombie_inflight_bytes",
            "In-flight memory of the NIC's zombie pools, per netlink, bytes.",
            lambda d: d.zombie_inflight_bytes),
    _device("netmemtrace_device_page_pool_recycled_ratio",
            f"The NIC's pools' counters summed, {_RATIO}.", lambda d: d.recycled_ratio),
    _device("netmemtrace_device_page_pool_ynltool_recycling_ratio",
            "ynltool's recycling figure / 100: (recycle_ring + recycle_cached) / (alloc_fast + "
            "alloc_refill + alloc_slow); under-counts (pages in flight).",
            lambda d: d.ynltool_recycling_pct / 100
            if isinstance(d.ynltool_recycling_pct, float) else d.ynltool_recycling_pct),
    _device("netmemtrace_device_page_pool_recycled_pages_per_second",
            "Pages the NIC's listed pools recycled per second over the last refresh interval "
            "(ynltool shows no rate).", lambda d: d.recycled_per_s),
    _device("netmemtrace_device_page_pools_unlisted",
            "Pools netmemtrace sees on the NIC that netlink does not list (veth, drivers "
            "without a registered netdev, pools of a deleted netns): ynltool cannot show them.",
            lambda d: d.unlisted_pools),
    # ---- memory cgroups
    Spec("netmemtrace_memcg_other_cgroups", "gauge",
         "Memory cgroups beyond --max-cgroups, summed into the cgroup=\"other\" series of the "
         "netmemtrace_memcg_* and netmemtrace_zerocopy_* families.", "host", (),
         lambda v: [((), (), v.other_cgroups)]),
    Spec("netmemtrace_memcg_sock_charged_bytes", "gauge",
         "Socket memory charged to the memory cgroup now, bytes (memory.stat sock on v2, "
         "memory.kmem.tcp.usage_in_bytes on v1). Absent where the cgroup accounts no socket "
         "memory (v1 without a tcp limit), see netmemtrace_figure_unavailable_info. "
         f"{_CAPPED}", "memcg", (), memcg_figure("sock_charged_now_bytes")),
    Spec("netmemtrace_memcg_sock_charged_pages", "counter",
         "Socket memory pages charged to the cgroup since netmemtrace attached (charge "
         f"events). {_CAPPED}", "memcg", (), memcg_figure("sock_charged_pages_total")),
    Spec("netmemtrace_memcg_sock_uncharged_pages", "counter",
         f"Socket memory pages uncharged from the cgroup since netmemtrace attached. {_CAPPED}",
         "memcg", (), memcg_figure("sock_uncharged_pages_total")),
    Spec("netmemtrace_zerocopy_unaccounted_bytes", "gauge",
         "TCP receive zerocopy memory the cgroup's processes keep mapped now, bytes: "
         "uncharged from socket memory when mapped and charged to no memory cgroup, so no "
         f"memory limit bounds it. {_LEDGER} {_CAPPED}", "memcg", (),
         memcg_figure("zerocopy_unaccounted_bytes")),
    Spec("netmemtrace_zerocopy_unaccounted_hwm_bytes", "gauge",
         "Highest netmemtrace_zerocopy_unaccounted_bytes of the cgroup since netmemtrace "
         "started, bytes (for cgroup=\"other\": the sum of their highs). Absent once the "
         "zc_events ring buffer dropped a ledger event, unless every process of the cgroup "
         "is known to be unaffected (started after the last drop, none exited), see "
         f"netmemtrace_figure_unavailable_info. {_CAPPED}", "memcg",
         (), memcg_figure("zerocopy_unaccounted_hwm_bytes")),
    Spec("netmemtrace_zerocopy_oldest_mapped_age_seconds", "gauge",
         "Age of the oldest TCP receive zerocopy page the cgroup's processes still map; "
         f"absent when none is mapped (cgroup=\"other\": the oldest of them). {_LEDGER} "
         f"{_CAPPED}",
         "memcg", (), memcg_figure("zerocopy_oldest_mapped_age_ns", merge=max, scale=NS_PER_S)),
    Spec("netmemtrace_memcg_would_be_charged_bytes", "gauge",
         "Socket memory charged now + unaccounted zerocopy memory mapped now, bytes: what the "
         "cgroup would be charged if network pages stayed accounted while user space maps "
         f"them. Absent when either part is unknown. {_CAPPED}", "memcg", (),
         memcg_figure("would_be_charged_bytes")),
    _memcg_zerocopy("rx_calls", "rx_calls", "getsockopt(TCP_ZEROCOPY_RECEIVE) calls"),
    _memcg_zerocopy("rx_errors", "rx_errors", "TCP_ZEROCOPY_RECEIVE calls that failed"),
    _memcg_zerocopy("rx_mapped_bytes", "rx_mapped_bytes",
                    "Bytes TCP_ZEROCOPY_RECEIVE mapped into the processes"),
    _memcg_zerocopy("rx_copied_bytes", "rx_copied_bytes",
                    "Bytes TCP_ZEROCOPY_RECEIVE copied through the copybuf"),
    _memcg_zerocopy("rx_skip_hint_bytes", "rx_skip_hint_bytes",
                    "Bytes TCP_ZEROCOPY_RECEIVE left for a normal read (recv_skip_hint)"),
    _memcg_zerocopy("rx_sock_errors", "rx_sock_errors",
                    "TCP_ZEROCOPY_RECEIVE calls reporting a socket error"),
    _memcg_zerocopy("rx_read_faults", "rx_read_faults",
                    "TCP_ZEROCOPY_RECEIVE results netmemtrace could not read back"),
    _memcg_zerocopy("tx_calls", "tx_zc_calls",
                    "send*(MSG_ZEROCOPY) calls on SO_ZEROCOPY sockets that sent"),
    _memcg_zerocopy("tx_bytes", "tx_zc_bytes", "Bytes sent with MSG_ZEROCOPY"),
    _memcg_zerocopy("tx_errors", "tx_zc_errors", "MSG_ZEROCOPY sends that failed"),
    _memcg_zerocopy("tx_ignored_calls", "tx_zc_ignored_calls",
                    "MSG_ZEROCOPY sends without SO_ZEROCOPY (the kernel copied)"),
    _memcg_zerocopy("tx_notifications", "tx_notifications",
                    "Zerocopy completion messages read from the error queue"),
    _memcg_zerocopy("tx_completed_sends", "tx_completed_sends",
                    "MSG_ZEROCOPY sends those completions covered"),
    _memcg_zerocopy("tx_copied_sends", "tx_copied_sends",
                    "Completed MSG_ZEROCOPY sends the kernel copied anyway"),
    Spec("netmemtrace_memcg_zerocopy_tx_inflight_bytes", "gauge",
         "Bytes sent with MSG_ZEROCOPY whose completion was not read yet (pinned user "
         f"memory). {_LEDGER} {_CAPPED}", "memcg", (),
         memcg_figure("zerocopy.tx_inflight_bytes")),
    Spec("netmemtrace_process_zerocopy_unaccounted_bytes", "gauge",
         "TCP receive zerocopy memory a process keeps mapped now, charged to no memory "
         "cgroup, bytes. Only the top --max-cgroups processes with any (at most 10 per "
         "cgroup) have a series; netmemtrace_zerocopy_unaccounted_bytes has the totals. "
         "Absent once the zc_events ring buffer dropped a ledger event that may concern the "
         "process (the process ranks last), see netmemtrace_figure_unavailable_info.",
         "memcg", ("pid", "comm"), _process_unaccounted),
    Spec("netmemtrace_process_exited_seconds", "gauge",
         "Seconds since a process that made zerocopy calls exited. Its series lasts as long "
         "as serve keeps exited rows (300 s, netmemtrace_exited_process_rows), the most "
         "recent --max-cgroups only; its counts stay in the cgroup's totals.", "memcg",
         ("pid", "comm"), _process_exited),
    # ---- devmem TCP and io_uring zcrx
    Spec("netmemtrace_memcg_devmem_tokens_outstanding", "gauge",
         "Devmem TCP tokens handed to the cgroup's open sockets and not given back yet "
         f"(SO_DEVMEM_DONTNEED). {_CAPPED}", "memcg", (), _devmem_outstanding),
    _netmem_count("netmemtrace_netmem_sample_factor", "gauge",
                  "Netmem ownership tracking follows 1 in this many netmem; the estimated "
                  "netmem figures are scaled by it.", lambda s: s.sample_factor),
    _netmem_count("netmemtrace_netmem_tracked", "gauge",
                  "Netmem tracked now (entries of the tracking map, not scaled).",
                  lambda s: s.tracked_netmem),
    _netmem_count("netmemtrace_netmem_tracked_capacity", "gauge",
                  "Size of the netmem tracking map; misses count in netmemtrace_events_lost_total"
                  "{object=\"netmem\",counter=\"netmem_map_full\"}.",
                  lambda s: s.tracked_capacity),
    _netmem_count("netmemtrace_devmem_recvmsg_calls", "counter",
                  "recvmsg(MSG_SOCK_DEVMEM) calls, every socket.",
                  lambda s: s.recvmsg_devmem_calls),
    _netmem_count("netmemtrace_devmem_recvmsg_errors", "counter",
                  "recvmsg(MSG_SOCK_DEVMEM) calls that failed.",
                  lambda s: s.recvmsg_devmem_errors),
    _netmem_count("netmemtrace_devmem_tokens_received", "counter",
                  "Devmem tokens (SCM_DEVMEM_DMABUF cmsgs) handed to applications.",
                  lambda s: s.tokens_received),
    _netmem_count("netmemtrace_devmem_recvmsg_cmsg_unread", "counter",
                  "recvmsg(MSG_SOCK_DEVMEM) control buffers not fully walked: tokens "
                  "undercount.", lambda s: s.recvmsg_cmsg_unread),
    _netmem_count("netmemtrace_devmem_dontneed_calls", "counter",
                  "setsockopt(SO_DEVMEM_DONTNEED) calls.", lambda s: s.dontneed_calls),
    _netmem_count("netmemtrace_devmem_dontneed_errors", "counter",
                  "setsockopt(SO_DEVMEM_DONTNEED) calls that failed.",
                  lambda s: s.dontneed_errors),
    _netmem_count("netmemtrace_devmem_tokens_returned", "counter",
                  "Devmem tokens applications gave back (SO_DEVMEM_DONTNEED).",
                  lambda s: s.tokens_returned),
    _netmem_count("netmemtrace_devmem_tokens_freed_on_destroy", "counter",
                  "Devmem tokens still outstanding when their socket was destroyed (freed by "
                  "the kernel on the application's behalf).",
                  lambda s: s.tokens_freed_on_destroy),
    _netmem_count("netmemtrace_io_uring_zcrx_buffers_handed", "counter",
                  "io_uring zcrx buffers handed to applications.",
                  lambda s: s.zcrx_buffers_handed),
    _netmem_count("netmemtrace_io_uring_zcrx_refills", "counter",
                  "io_uring zcrx buffers applications refilled.", lambda s: s.zcrx_refills),
    # ---- netmemtrace itself
    Spec("netmemtrace_snapshot_build_seconds", "gauge",
         "Time the exported snapshot took to read every BPF map and resolve names.", "host",
         (), host(lambda s: s.self_stats.snapshot_build_ns / NS_PER_S)),
    Spec("netmemtrace_events_lost", "counter",
         "Events netmemtrace dropped since attach, by BPF object and counter (a *_map_full "
         "counter: a BPF map was full, the object was not tracked; ringbuf_full / refs_lost: "
         "a ring buffer had no room; *_truncated: an event cut short; malformed_events_lost: "
         "events the reader could not decode; prog_recursion_lost: events the kernel ran no "
         "program for, one being already running on that CPU). The figures they feed "
         "undercount; every counter of an object's *_stats struct ending in _full, _lost or "
         "_truncated has a series.", "host", ("object", "counter"), _events_lost),
    _memcg_self("netmemtrace_zerocopy_ledger_ranges", "gauge",
                "Mapped page ranges in the zerocopy ledger now.", lambda s: s.ledger_ranges),
    _memcg_self("netmemtrace_zerocopy_ledger_overflow_ranges", "counter",
                "Mapped ranges not recorded because the ledger was full (unaccounted zerocopy "
                "undercounts).", lambda s: s.ledger_overflow_ranges),
    _memcg_self("netmemtrace_zerocopy_ledger_overflow_bytes", "counter",
                "Bytes of the ranges not recorded because the ledger was full.",
                lambda s: s.ledger_overflow_bytes),
    _memcg_self("netmemtrace_zerocopy_tx_tracker_overflow_sends", "counter",
                "MSG_ZEROCOPY sends the completion tracker had no room for.",
                lambda s: s.tx_tracker_overflow_sends),
    Spec("netmemtrace_memcg_unresolved_events", "counter",
         "Socket memory events without a readable memory cgroup id.", "host", (),
         host(_stat("memcg", "memcg_unresolved"))),
    _memcg_self("netmemtrace_zerocopy_smaps_mismatch_processes", "gauge",
                "Processes whose ledger figure disagrees with the Rss of their socket: "
                "mappings in /proc/PID/smaps (cross-check; 0 when they agree).",
                lambda s: s.smaps_mismatch_pids),
    _memcg_self("netmemtrace_exited_process_rows", "gauge",
                "Exited zerocopy processes whose rows are kept now (for 300 s, at most 1024).",
                lambda s: s.exited_process_rows),
    _memcg_self("netmemtrace_exited_process_rows_expired", "counter",
                "Exited processes' rows dropped at the end of their retention.",
                lambda s: s.exited_rows_expired),
    _memcg_self("netmemtrace_exited_process_rows_evicted", "counter",
                "Exited processes' rows dropped before their retention ended, the row cap "
                "being reached (their counts stay in the cgroup totals).",
                lambda s: s.exited_rows_evicted),
    Spec("netmemtrace_bpf_prog_run_seconds", "counter",
         "CPU time spent in each attached BPF program (kernel.bpf_stats_enabled=1).", "host",
         ("program",), _prog_stats(lambda s: s.self_stats.prog_run_time_ns, NS_PER_S)),
    Spec("netmemtrace_bpf_prog_runs", "counter",
         "Runs of each attached BPF program (kernel.bpf_stats_enabled=1).", "host",
         ("program",), _prog_stats(lambda s: s.self_stats.prog_run_cnt, 1)),
    Spec("netmemtrace_bpf_prog_recursion_misses", "counter",
         "Events the kernel did not run a BPF program for, as it was already running on that "
         "CPU (an interrupt's event inside it): lost before any map, in no figure.", "host",
         ("program",), _prog_stats(lambda s: s.self_stats.prog_recursion_misses, 1)),
    # Last: its rows are the figures the families above left out.
    UNAVAILABLE,
)


def golden() -> str:
    """Every family's sample name, type and HELP, one per line: tests/golden/metrics.txt
    (regenerate with `python -m netmemtrace.views.prometheus.catalogue`)."""
    return "".join(f"{s.name} {s.type} {s.help}\n" for s in CATALOGUE)


if __name__ == "__main__":
    print(golden(), end="")
