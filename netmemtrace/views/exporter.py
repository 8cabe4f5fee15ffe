"""Prometheus view of a Snapshot: a custom prometheus_client Collector.

Every scrape turns one Snapshot into metric families; nothing is kept between scrapes and no
gauge is mutated per event, so a scrape always shows one consistent moment. Naming follows
the Prometheus conventions: `netmemtrace_` prefix, base units in the name, `_total` on
counters, HELP on every family. Label values are escaped by prometheus_client.

A figure the kernel cannot give here (Unavailable in the Snapshot) is never exported as 0:
its series is left out and `netmemtrace_figure_unavailable_info{figure, reason, ...}` says
which metric is missing for which pool or memory cgroup and why.

Per-cgroup series are capped (max_cgroups): the top cgroups by memory each have their own
series, the rest are summed into one series labelled cgroup="other".
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client.exposition import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CONTENT_TYPE_PLAIN_1_0_0,
)
from prometheus_client.exposition import generate_latest as _text_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as CONTENT_TYPE_OM_1
from prometheus_client.openmetrics.exposition import generate_latest as _om_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .. import __version__
from ..probes import MECHANISMS, ProbeStatus
from ..snapshot import (
    DeviceSummary,
    DevmemSocket,
    HoldHistogram,
    MemcgSelfStats,
    MemcgSnapshot,
    NetmemStates,
    NetmemSummary,
    PoolSnapshot,
    Recycling,
    Snapshot,
    Unavailable,
)
from .utf8 import visible

# Identity of a pool. `state` is deliberately not among them: a pool going active -> zombie
# -> released must stay one series, or rate() over its counters would break at each step.
POOL_LABELS = ("netdev", "ifindex", "netns", "pool_id", "napi_id", "provider")
POOL_STATES = ("active", "zombie", "released")
# Identity of a memory cgroup: its path on its hierarchy (v1/v2), and the Kubernetes pod UID
# and container ("runtime://id", as kube-state-metrics writes container_id) it belongs to.
MEMCG_LABELS = ("cgroup", "hierarchy", "pod", "container")
OTHER = "other"           # cgroup label of the sum of cgroups beyond max_cgroups
DELETED = "deleted"       # cgroup label of memcgs deleted since (real paths start with "/")
NETMEM_STATES = ("pool", "driver", "stack", "application")
# Hold-time histogram bounds: every other log2 bucket edge from 2^10 ns (1 us) to 2^40 ns
# (18 min). The BPF buckets are [2^i, 2^(i+1)) ns, so "<= 2^k - 1 ns" is exactly the sum of
# the buckets below 2^k: le is (2^k - 1) ns, in seconds.
HOLD_LE_LOG2 = tuple(range(10, 41, 2))
NS_PER_S = 1e9
NO_POOL = ("",) * len(POOL_LABELS)
NO_MEMCG = ("",) * len(MEMCG_LABELS)

_UNIT = ("page_pool's unit, as the kernel's pages_state_hold_cnt counts it: one allocation "
         "of 2^page_order pages, or one net_iov")
_CAPPED = ("Only the top N cgroups by memory (socket memory + unaccounted zerocopy, "
           "--max-cgroups) have their own series; the others are summed into cgroup=\"other\" "
           "(sum of the figures known for them), whose counters drop when a cgroup moves "
           "into the top N.")
_ESTIMATED = ("Estimated: 1 in netmemtrace_netmem_sample_factor netmem is tracked and "
              "counts are scaled by that factor.")
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


@dataclass(frozen=True)
class MemcgMetric:
    """One per-memcg family; merge combines cgroups summed into one series, then the
    value is divided by scale (ns -> s)."""

    name: str
    kind: str
    help: str
    field: str                 # attribute of MemcgSnapshot (dotted)
    merge: Callable[[Iterable[float]], float] = sum
    scale: float = 1

    @property
    def get(self) -> Callable[[MemcgSnapshot], Figure]:
        return operator.attrgetter(self.field)


def _kernel(field: str) -> Callable[[PoolSnapshot], Figure]:
    def get(p: PoolSnapshot) -> Figure:
        return p.kernel if isinstance(p.kernel, Unavailable) else getattr(p.kernel, field)
    return get


def _ns_to_s(ns: int | None) -> float | None:
    return None if ns is None else ns / NS_PER_S


def _recycling(get: Callable[[Recycling], Figure]) -> Callable[[PoolSnapshot], Figure]:
    def value(p: PoolSnapshot) -> Figure:
        return p.recycling if isinstance(p.recycling, Unavailable) else get(p.recycling)
    return value


def _counter(name: str) -> Callable[[PoolSnapshot], Figure]:
    return _recycling(lambda r: getattr(r.counters, name))


def _per_s(*names: str) -> Callable[[PoolSnapshot], Figure]:
    return _recycling(lambda r: None if r.per_s is None else sum(r.per_s[n] for n in names))


RECYCLED_PER_S = ("recycle_cached", "recycle_ring")
RETURNED_PER_S = (*RECYCLED_PER_S, "recycle_ring_full", "recycle_released_refcnt")
_RATIO = ("recycled / given back = (recycle_cached + recycle_ring) / (recycle_cached + "
          "recycle_ring + recycle_ring_full + recycle_released_refcnt)")


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
    PoolMetric(
        "netmemtrace_page_pool_kernel_alloc", "counter",
        "The pool's allocation counters from netlink page-pool-stats-get, since the pool's "
        "creation (path: fast = page from the pool's cache; slow / slow_high_order = calls "
        "to the page allocator; refill = cache refills from the ring; empty = ring empty "
        "too; waive = ring page of the wrong NUMA node, freed). Absent without "
        "CONFIG_PAGE_POOL_STATS or for pools netlink does not list.",
        tuple(((path,), _counter(f"alloc_{path}")) for path in
              ("fast", "slow", "slow_high_order", "empty", "refill", "waive")),
        extra_labels=("path",)),
    PoolMetric(
        "netmemtrace_page_pool_kernel_recycle_pages", "counter",
        "Pages given back to the pool, by where they went, from netlink "
        "page-pool-stats-get since the pool's creation (path: cached = the pool's cache; "
        "ring = its ring; ring_full = ring full, freed; released_refcnt = still referenced, "
        "freed; cache_full = cache full, went on to the ring: not a page of its own).",
        tuple(((path,), _counter(f"recycle_{path}")) for path in
              ("cached", "cache_full", "ring", "ring_full", "released_refcnt")),
        extra_labels=("path",)),
    PoolMetric(
        "netmemtrace_page_pool_recycled_pages_per_second", "gauge",
        "Pages the pool recycled per second (recycle_cached + recycle_ring) over the "
        "exporter's last refresh interval; absent before the second refresh.",
        (((), _per_s(*RECYCLED_PER_S)),)),
    PoolMetric(
        "netmemtrace_page_pool_returned_pages_per_second", "gauge",
        "Pages given back to the pool per second (recycled or freed: cached + ring + "
        "ring_full + released_refcnt) over the last refresh interval.",
        (((), _per_s(*RETURNED_PER_S)),)),
    PoolMetric(
        "netmemtrace_page_pool_recycled_ratio", "gauge",
        f"Share of the pages given back that the pool kept for reuse, since its creation: "
        f"{_RATIO}. Every page given back is in exactly one of those four counters and a "
        "page in flight in none, so it does not under-count like ynltool's (ring + cached) "
        "/ (fast + refill + slow). Absent before any page came back.",
        (((), _recycling(lambda r: r.recycled_ratio)),)),
)


def _memcg_counter(name: str, field: str, what: str) -> MemcgMetric:
    return MemcgMetric(f"netmemtrace_memcg_zerocopy_{name}", "counter",
                       f"{what}, by the cgroup's processes (exited ones included) since "
                       f"netmemtrace attached. {_CAPPED}", f"zerocopy.{field}")


MEMCG_METRICS = (
    MemcgMetric(
        "netmemtrace_memcg_sock_charged_bytes", "gauge",
        "Socket memory charged to the memory cgroup now, bytes (memory.stat sock on v2, "
        "memory.kmem.tcp.usage_in_bytes on v1). Absent where the cgroup accounts no socket "
        f"memory (v1 without a tcp limit), see netmemtrace_figure_unavailable_info. {_CAPPED}",
        "sock_charged_now_bytes"),
    MemcgMetric(
        "netmemtrace_memcg_sock_charged_pages", "counter",
        "Socket memory pages charged to the cgroup since netmemtrace attached (charge "
        f"events). {_CAPPED}", "sock_charged_pages_total"),
    MemcgMetric(
        "netmemtrace_memcg_sock_uncharged_pages", "counter",
        "Socket memory pages uncharged from the cgroup since netmemtrace attached. "
        f"{_CAPPED}", "sock_uncharged_pages_total"),
    MemcgMetric(
        "netmemtrace_zerocopy_unaccounted_bytes", "gauge",
        "TCP receive zerocopy memory the cgroup's processes keep mapped now, bytes: "
        "uncharged from socket memory when mapped and charged to no memory cgroup, so no "
        f"memory limit bounds it. {_CAPPED}", "zerocopy_unaccounted_bytes"),
    MemcgMetric(
        "netmemtrace_zerocopy_unaccounted_hwm_bytes", "gauge",
        "Highest netmemtrace_zerocopy_unaccounted_bytes of the cgroup since netmemtrace "
        f"started, bytes (for cgroup=\"other\": the sum of their highs). {_CAPPED}",
        "zerocopy_unaccounted_hwm_bytes"),
    MemcgMetric(
        "netmemtrace_zerocopy_oldest_mapped_age_seconds", "gauge",
        "Age of the oldest TCP receive zerocopy page the cgroup's processes still map; "
        f"absent when none is mapped (cgroup=\"other\": the oldest of them). {_CAPPED}",
        "zerocopy_oldest_mapped_age_ns", merge=max, scale=NS_PER_S),
    MemcgMetric(
        "netmemtrace_memcg_would_be_charged_bytes", "gauge",
        "Socket memory charged now + unaccounted zerocopy memory mapped now, bytes: what "
        "the cgroup would be charged if network pages stayed accounted while user space "
        f"maps them. Absent when socket memory is unknown. {_CAPPED}",
        "would_be_charged_bytes"),
    _memcg_counter("rx_calls", "rx_calls", "getsockopt(TCP_ZEROCOPY_RECEIVE) calls"),
    _memcg_counter("rx_errors", "rx_errors", "TCP_ZEROCOPY_RECEIVE calls that failed"),
    _memcg_counter("rx_mapped_bytes", "rx_mapped_bytes",
                   "Bytes TCP_ZEROCOPY_RECEIVE mapped into the processes"),
    _memcg_counter("rx_copied_bytes", "rx_copied_bytes",
                   "Bytes TCP_ZEROCOPY_RECEIVE copied through the copybuf"),
    _memcg_counter("rx_skip_hint_bytes", "rx_skip_hint_bytes",
                   "Bytes TCP_ZEROCOPY_RECEIVE left for a normal read (recv_skip_hint)"),
    _memcg_counter("rx_sock_errors", "rx_sock_errors",
                   "TCP_ZEROCOPY_RECEIVE calls reporting a socket error"),
    _memcg_counter("rx_read_faults", "rx_read_faults",
                   "TCP_ZEROCOPY_RECEIVE results netmemtrace could not read back"),
    _memcg_counter("tx_calls", "tx_zc_calls",
                   "send*(MSG_ZEROCOPY) calls on SO_ZEROCOPY sockets that sent"),
    _memcg_counter("tx_bytes", "tx_zc_bytes", "Bytes sent with MSG_ZEROCOPY"),
    _memcg_counter("tx_errors", "tx_zc_errors", "MSG_ZEROCOPY sends that failed"),
    _memcg_counter("tx_ignored_calls", "tx_zc_ignored_calls",
                   "MSG_ZEROCOPY sends without SO_ZEROCOPY (the kernel copied)"),
    _memcg_counter("tx_notifications", "tx_notifications",
                   "Zerocopy completion messages read from the error queue"),
    _memcg_counter("tx_completed_sends", "tx_completed_sends",
                   "MSG_ZEROCOPY sends those completions covered"),
    _memcg_counter("tx_copied_sends", "tx_copied_sends",
                   "Completed MSG_ZEROCOPY sends the kernel copied anyway"),
    MemcgMetric(
        "netmemtrace_memcg_zerocopy_tx_inflight_bytes", "gauge",
        "Bytes sent with MSG_ZEROCOPY whose completion was not read yet (pinned user "
        f"memory). {_CAPPED}", "zerocopy.tx_inflight_bytes"),
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


def memcg_labels(m: MemcgSnapshot) -> tuple[str, ...]:
    """Label values in MEMCG_LABELS order."""
    container = f"{m.runtime or 'unknown'}://{m.container_id}" if m.container_id else ""
    return (m.path if m.path is not None else DELETED, m.hierarchy, m.pod_uid or "", container)


def memory_rank(m: MemcgSnapshot) -> int:
    """What the cgroup cap ranks by: socket memory charged now (where known) + unaccounted
    zerocopy, i.e. would_be_charged_bytes where that is available."""
    sock = m.sock_charged_now_bytes
    return m.zerocopy_unaccounted_bytes + (sock if isinstance(sock, int) else 0)


def capped(items: Sequence, key: Callable[[object], object], limit: int
           ) -> tuple[list, list]:
    """(the top `limit` items by key, descending; the rest)."""
    ranked = sorted(items, key=key, reverse=True)
    return ranked[:limit], ranked[limit:]


def _family(name: str, kind: str, help_text: str, labels: tuple[str, ...]) -> Metric:
    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    return cls(name, help_text, labels=labels)


def _sample_name(name: str, kind: str) -> str:
    return name + ("_total" if kind == "counter" else "")


def _combine(values: Iterable[Figure], merge: Callable[[Iterable[float]], float],
             partial: bool) -> Figure:
    """One series' value from several objects' figures: Unavailable if one is (or, with
    partial, only if none is known), None if none is known, else merge of the known."""
    values = list(values)
    if len(values) == 1:  # the usual pool or cgroup: its own figure
        return values[0]
    try:  # the usual case, all known, in C: "other" combines thousands of cgroups
        return merge(values) if values else None
    except TypeError:  # an Unavailable or a None among them
        pass
    missing = next((v for v in values if isinstance(v, Unavailable)), None)
    known = [v for v in values if v is not None and not isinstance(v, Unavailable)]
    if missing is not None and not (partial and known):
        return missing
    return merge(known) if known else None


class Unavailables:
    """netmemtrace_figure_unavailable_info: one series per figure left out, and why."""

    def __init__(self) -> None:
        self.family = InfoMetricFamily(
            "netmemtrace_figure_unavailable",
            "A figure the kernel cannot give on this host: the series named by `figure` is "
            "left out (never exported as 0); `reason` says why. `figure` is the sample name, "
            "followed by the labels that pick the series within the object in selector form "
            "(e.g. {state=\"driver\"}) when only some are missing. Pool and cgroup labels "
            "name the object; they are empty for host-wide figures.",
            labels=("figure", "reason", *POOL_LABELS, *MEMCG_LABELS))

    def add(self, figure: str, reason: str, pool: tuple[str, ...] = NO_POOL,
            memcg: tuple[str, ...] = NO_MEMCG) -> None:
        self.family.add_metric((figure, reason, *pool, *memcg), {})


class SnapshotCollector(Collector):
    """Yields every netmemtrace metric family from the Snapshot `source` returns.

    source is called once per collect(); whatever it returns is the whole truth of that
    scrape. max_cgroups bounds the per-cgroup (and per-process) series: the top N by memory,
    the rest summed into one cgroup="other" series.
    """

    def __init__(self, source: Callable[[], Snapshot], max_cgroups: int = 100) -> None:
        self._source = source
        self.max_cgroups = max_cgroups

    def collect(self) -> Iterator[Metric]:
        snap = self._source()
        unavailable = Unavailables()
        yield from self._build(snap)
        yield from self._probes(snap.probes)
        yield from self._pools(snap.pools, unavailable,
                               snap.netmem if isinstance(snap.netmem, Unavailable) else None)
        yield from self._devices(snap.devices, unavailable)
        yield from self._memcgs(snap.memcgs, unavailable)
        yield from self._devmem(snap, unavailable)
        yield from self._self_stats(snap, unavailable)
        yield unavailable.family

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

    # ---- page pools ----------------------------------------------------------------------

    def _pools(self, pools: tuple[PoolSnapshot, ...], unavailable: Unavailables,
               netmem_off: Unavailable | None) -> Iterator[Metric]:
        """netmem_off: why no pool has netmem figures (the netmem object is not loaded),
        said once host-wide instead of once per pool."""
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
                    value = _combine((get(p) for p in group), spec.merge, partial=False)
                    if isinstance(value, Unavailable):
                        unavailable.add(_sample_name(spec.name, spec.kind), value.reason,
                                        labels)
                    elif value is not None:
                        fam.add_metric((*labels, *extra), value)
            yield fam
        netmem_groups = groups
        if netmem_off is not None:
            netmem_groups = {}
            for figure in ("netmemtrace_page_pool_netmem_pages",
                           "netmemtrace_page_pool_netmem_transitions_total",
                           "netmemtrace_page_pool_netmem_hold_seconds_count"):
                unavailable.add(figure, netmem_off.reason)
        yield from self._netmem_states(netmem_groups, unavailable)
        yield from self._hold_histogram(netmem_groups, unavailable)
        yield self._zombie_holders(groups)

    @staticmethod
    def _netmem_states(groups: dict[tuple[str, ...], list[PoolSnapshot]],
                       unavailable: Unavailables) -> Iterator[Metric]:
        name = "netmemtrace_page_pool_netmem_pages"
        pages = GaugeMetricFamily(
            name, "A pool's netmem by who holds them now (state: pool = cached in the pool, "
            "driver = allocated by the driver, stack = in an skb, application = devmem token "
            "/ io_uring zcrx buffer handed to user space), by netmem type (page, dmabuf, "
            f"io_uring, net_iov). {_ESTIMATED} A state netmemtrace cannot observe on this "
            "kernel is absent, see netmemtrace_figure_unavailable_info.",
            labels=(*POOL_LABELS, "netmem", "state"))
        moves = CounterMetricFamily(
            "netmemtrace_page_pool_netmem_transitions",
            f"Netmem ownership transitions of a pool since netmemtrace attached. {_ESTIMATED}",
            labels=(*POOL_LABELS, "from", "to"))
        for labels, group in groups.items():
            states: list[NetmemStates] = []
            for p in group:
                if isinstance(p.states, Unavailable):
                    unavailable.add(name, p.states.reason, labels)
                    unavailable.add(moves.name + "_total", p.states.reason, labels)
                    break
                states.append(p.states)
            else:
                by_key: dict[tuple[str, str], list[Figure]] = {}
                transitions: dict[str, int] = {}
                for st in states:
                    for typ, counts in st.by_type.items():
                        for s in NETMEM_STATES:
                            by_key.setdefault((typ, s), []).append(counts.get(s))
                    for move, n in st.transitions_total.items():
                        transitions[move] = transitions.get(move, 0) + n
                for (typ, s), values in by_key.items():
                    value = _combine(values, sum, partial=False)
                    if isinstance(value, Unavailable):
                        unavailable.add(f'{name}{{netmem="{typ}",state="{s}"}}', value.reason,
                                        labels)
                    elif value is not None:
                        pages.add_metric((*labels, typ, s), value)
                for move, n in sorted(transitions.items()):
                    src, _, dst = move.partition("->")
                    moves.add_metric((*labels, src, dst), n)
        yield pages
        yield moves

    @staticmethod
    def _hold_histogram(groups: dict[tuple[str, ...], list[PoolSnapshot]],
                        unavailable: Unavailables) -> Iterator[Metric]:
        name = "netmemtrace_page_pool_netmem_hold_seconds"
        hist = HistogramMetricFamily(
            name, "How long applications held a pool's netmem (devmem tokens, io_uring zcrx "
            "buffers) before giving it back, from log2 nanosecond buckets: le is 2^k - 1 ns "
            f"(exact). Only pools whose applications gave netmem back have a series. "
            f"{_ESTIMATED}", labels=POOL_LABELS)
        for labels, group in groups.items():
            hists: list[HoldHistogram] = []
            for p in group:
                if isinstance(p.netmem_hold_ns, Unavailable):
                    unavailable.add(name + "_count", p.netmem_hold_ns.reason, labels)
                    break
                hists.append(p.netmem_hold_ns)
            else:
                buckets = [b for h in hists for b in h.buckets]
                total = sum(b.count for b in buckets)
                if not total:
                    continue
                cumulative = [(floatToGoString(((1 << k) - 1) / NS_PER_S),
                               sum(b.count for b in buckets if b.hi_ns <= 1 << k))
                              for k in HOLD_LE_LOG2]
                hist.add_metric(labels, [*cumulative, ("+Inf", total)],
                                sum(h.sum_ns for h in hists) / NS_PER_S)
        yield hist

    @staticmethod
    def _zombie_holders(groups: dict[tuple[str, ...], list[PoolSnapshot]]) -> Metric:
        fam = GaugeMetricFamily(
            "netmemtrace_page_pool_zombie_inflight_pages",
            "In-flight pages of a zombie pool by who holds them (holder_kind: socket = a "
            "socket's queues, process-mapping = TCP zerocopy mappings, cpu-deferred-free and "
            "pool-ring = freed on the next RX of a CPU / by the pool itself (self-healing), "
            "devmem-tokens, io_uring-zcrx, unattributed = the rest). Sums to the pool's "
            "in-flight pages; zombie pools only.",
            labels=(*POOL_LABELS, "holder_kind"))
        for labels, group in groups.items():
            kinds: dict[str, int] = {}
            for p in group:
                for h in p.holders:
                    kinds[h.kind] = kinds.get(h.kind, 0) + h.pages
            for kind, n in sorted(kinds.items()):
                fam.add_metric((*labels, kind), n)
        return fam

    # ---- devices: `ynltool page-pool stats` parity ------------------------------------------

    @staticmethod
    def _devices(devices: tuple[DeviceSummary, ...], unavailable: Unavailables
                 ) -> Iterator[Metric]:
        labels = ("netdev", "ifindex", "netns")
        specs: tuple[tuple[str, str, Callable[[DeviceSummary], Figure]], ...] = (
            ("netmemtrace_device_page_pools",
             "Page pools of the NIC netlink lists, zombies included (ynltool's \"page "
             "pools\"); pools the kernel re-parented to loopback count under their real NIC.",
             lambda d: d.pools),
            ("netmemtrace_device_page_pool_zombies",
             "Listed pools of the NIC with a detach time: destroyed, pages still in flight.",
             lambda d: d.zombies),
            ("netmemtrace_device_page_pool_inflight_pages",
             "In-flight pages of every listed pool of the NIC, per netlink (ynltool's refs).",
             lambda d: d.inflight_pages),
            ("netmemtrace_device_page_pool_inflight_bytes",
             "In-flight memory of every listed pool of the NIC, per netlink, bytes.",
             lambda d: d.inflight_bytes),
            ("netmemtrace_device_page_pool_zombie_inflight_pages",
             "In-flight pages of the NIC's zombie pools, per netlink.",
             lambda d: d.zombie_inflight_pages),
            ("netmemtrace_device_page_pool_zombie_inflight_bytes",
             "In-flight memory of the NIC's zombie pools, per netlink, bytes.",
             lambda d: d.zombie_inflight_bytes),
            ("netmemtrace_device_page_pool_recycled_ratio",
             f"The NIC's pools' counters summed, {_RATIO}.", lambda d: d.recycled_ratio),
            ("netmemtrace_device_page_pool_ynltool_recycling_ratio",
             "ynltool's recycling figure / 100: (recycle_ring + recycle_cached) / "
             "(alloc_fast + alloc_refill + alloc_slow); under-counts (pages in flight).",
             lambda d: d.ynltool_recycling_pct if not isinstance(
                 d.ynltool_recycling_pct, float) else d.ynltool_recycling_pct / 100),
            ("netmemtrace_device_page_pool_recycled_pages_per_second",
             "Pages the NIC's listed pools recycled per second over the last refresh "
             "interval (ynltool shows no rate).", lambda d: d.recycled_per_s),
            ("netmemtrace_device_page_pools_unlisted",
             "Pools netmemtrace sees on the NIC that netlink does not list (veth, drivers "
             "without a registered netdev, pools of a deleted netns): ynltool cannot show "
             "them.", lambda d: d.unlisted_pools),
        )
        for name, help_text, get in specs:
            fam = GaugeMetricFamily(name, help_text, labels=labels)
            for d in devices:
                key = (d.netdev or "", str(d.ifindex), d.netns or "")
                value = get(d)
                if isinstance(value, Unavailable):
                    unavailable.add(name, value.reason, (key[0], key[1], key[2], "", "", ""))
                elif value is not None:
                    fam.add_metric(key, value)
            yield fam

    # ---- memory cgroups --------------------------------------------------------------------

    def _memcgs(self, memcgs: tuple[MemcgSnapshot, ...], unavailable: Unavailables
                ) -> Iterator[Metric]:
        top, rest = capped(memcgs, lambda m: (memory_rank(m), m.path or ""), self.max_cgroups)
        groups: dict[tuple[str, ...], list[MemcgSnapshot]] = {}
        for m in top:
            groups.setdefault(memcg_labels(m), []).append(m)
        other = (OTHER, "", "", "")
        yield GaugeMetricFamily(
            "netmemtrace_memcg_other_cgroups",
            "Memory cgroups beyond --max-cgroups, summed into the cgroup=\"other\" series "
            "of the netmemtrace_memcg_* and netmemtrace_zerocopy_* families.",
            value=len(rest))
        for spec in MEMCG_METRICS:
            fam = _family(spec.name, spec.kind, spec.help, MEMCG_LABELS)
            sample = _sample_name(spec.name, spec.kind)
            parts = [(labels, group, False) for labels, group in groups.items()]
            if rest:
                parts.append((other, rest, True))
            get = spec.get
            for labels, group, partial in parts:
                value = _combine(map(get, group), spec.merge, partial)
                if isinstance(value, Unavailable):
                    unavailable.add(sample, value.reason, memcg=labels)
                elif value is not None:
                    fam.add_metric(labels, value / spec.scale if spec.scale != 1 else value)
            yield fam

        procs = GaugeMetricFamily(
            "netmemtrace_process_zerocopy_unaccounted_bytes",
            "TCP receive zerocopy memory a process keeps mapped now, charged to no memory "
            "cgroup, bytes. Only the top --max-cgroups processes with any (at most 10 per "
            "cgroup) have a series; netmemtrace_zerocopy_unaccounted_bytes has the totals.",
            labels=(*MEMCG_LABELS, "pid", "comm"))
        holders = [(m, p) for m in memcgs for p in m.processes if p.zerocopy_unaccounted_bytes]
        shown, _ = capped(holders, lambda mp: (mp[1].zerocopy_unaccounted_bytes, -mp[1].pid),
                          self.max_cgroups)
        for m, p in shown:
            procs.add_metric((*memcg_labels(m), str(p.pid), p.comm or ""),
                             p.zerocopy_unaccounted_bytes)
        yield procs

        exited = GaugeMetricFamily(
            "netmemtrace_process_exited_seconds",
            "Seconds since a process that made zerocopy calls exited. Its series lasts as "
            "long as serve keeps exited rows (300 s, netmemtrace_exited_process_rows), the "
            "most recent --max-cgroups only; its counts stay in the cgroup's totals.",
            labels=(*MEMCG_LABELS, "pid", "comm"))
        gone = [(m, p) for m in memcgs for p in m.processes if p.exited]
        shown, _ = capped(gone, lambda mp: (-(mp[1].exit_age_ns or 0), -mp[1].pid),
                          self.max_cgroups)
        for m, p in shown:
            exited.add_metric((*memcg_labels(m), str(p.pid), p.comm or ""),
                              (p.exit_age_ns or 0) / 1e9)
        yield exited

    def _devmem(self, snap: Snapshot, unavailable: Unavailables) -> Iterator[Metric]:
        name = "netmemtrace_memcg_devmem_tokens_outstanding"
        outstanding = GaugeMetricFamily(
            name, "Devmem TCP tokens handed to the cgroup's open sockets and not given back "
            f"yet (SO_DEVMEM_DONTNEED). {_CAPPED}", labels=MEMCG_LABELS)
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

        top, rest = capped(list(by_memcg.items()), held, self.max_cgroups)
        parts = [(labels, socks, False) for labels, socks in top]
        if rest:
            parts.append(((OTHER, "", "", ""), [s for _, ss in rest for s in ss], True))
        for labels, socks, partial in parts:
            value = _combine((s.tokens_outstanding for s in socks), sum, partial)
            if isinstance(value, Unavailable):
                unavailable.add(name, value.reason, memcg=labels)
            elif value is not None:
                outstanding.add_metric(labels, value)
        yield outstanding
        yield from self._netmem_summary(snap.netmem, unavailable)

    @staticmethod
    def _netmem_summary(summary: NetmemSummary | Unavailable, unavailable: Unavailables
                        ) -> Iterator[Metric]:
        specs: tuple[tuple[str, str, str, Callable[[NetmemSummary], Figure]], ...] = (
            ("netmemtrace_netmem_sample_factor", "gauge",
             "Netmem ownership tracking follows 1 in this many netmem; the estimated "
             "netmem figures are scaled by it.", lambda s: s.sample_factor),
            ("netmemtrace_netmem_tracked", "gauge",
             "Netmem tracked now (entries of the tracking map, not scaled).",
             lambda s: s.tracked_netmem),
            ("netmemtrace_netmem_tracked_capacity", "gauge",
             "Size of the netmem tracking map; misses count in "
             "netmemtrace_map_full_drops_total{map=\"netmem\"}.", lambda s: s.tracked_capacity),
            ("netmemtrace_devmem_recvmsg_calls", "counter",
             "recvmsg(MSG_SOCK_DEVMEM) calls, every socket.", lambda s: s.recvmsg_devmem_calls),
            ("netmemtrace_devmem_recvmsg_errors", "counter",
             "recvmsg(MSG_SOCK_DEVMEM) calls that failed.", lambda s: s.recvmsg_devmem_errors),
            ("netmemtrace_devmem_tokens_received", "counter",
             "Devmem tokens (SCM_DEVMEM_DMABUF cmsgs) handed to applications.",
             lambda s: s.tokens_received),
            ("netmemtrace_devmem_recvmsg_cmsg_unread", "counter",
             "recvmsg(MSG_SOCK_DEVMEM) control buffers not fully walked: tokens undercount.",
             lambda s: s.recvmsg_cmsg_unread),
            ("netmemtrace_devmem_dontneed_calls", "counter",
             "setsockopt(SO_DEVMEM_DONTNEED) calls.", lambda s: s.dontneed_calls),
            ("netmemtrace_devmem_dontneed_errors", "counter",
             "setsockopt(SO_DEVMEM_DONTNEED) calls that failed.", lambda s: s.dontneed_errors),
            ("netmemtrace_devmem_tokens_returned", "counter",
             "Devmem tokens applications gave back (SO_DEVMEM_DONTNEED).",
             lambda s: s.tokens_returned),
            ("netmemtrace_devmem_tokens_freed_on_destroy", "counter",
             "Devmem tokens still outstanding when their socket was destroyed (freed by the "
             "kernel on the application's behalf).", lambda s: s.tokens_freed_on_destroy),
            ("netmemtrace_io_uring_zcrx_buffers_handed", "counter",
             "io_uring zcrx buffers handed to applications.", lambda s: s.zcrx_buffers_handed),
            ("netmemtrace_io_uring_zcrx_refills", "counter",
             "io_uring zcrx buffers applications refilled.", lambda s: s.zcrx_refills),
        )
        for name, kind, help_text, get in specs:
            fam = _family(name, kind, help_text, ())
            value = summary if isinstance(summary, Unavailable) else get(summary)
            if isinstance(value, Unavailable):
                unavailable.add(_sample_name(name, kind), value.reason)
            else:
                fam.add_metric((), value)
            yield fam

    # ---- self ------------------------------------------------------------------------------

    @staticmethod
    def _self_stats(snap: Snapshot, unavailable: Unavailables) -> Iterator[Metric]:
        st, ms, nm = snap.self_stats, snap.memcg_self_stats, snap.netmem
        yield GaugeMetricFamily(
            "netmemtrace_snapshot_build_seconds",
            "Time the exported snapshot took to read every BPF map and resolve names.",
            value=st.snapshot_build_ns / NS_PER_S)
        full = CounterMetricFamily(
            "netmemtrace_map_full_drops",
            "Objects not tracked because a BPF map was full (pools: new page_pools; "
            "retired_pools: destroyed pools whose final figures were lost; netmem, "
            "netmem_pools, devmem_sockets, netmem_calls: netmem ownership tracking; "
            "zerocopy_procs, zerocopy_pending, memcg: memcg / zerocopy accounting).",
            labels=("map",))
        drops = [("pools", st.pool_map_full_total), ("retired_pools", st.retired_map_full_total)]
        if not isinstance(nm, Unavailable):
            drops += [("netmem", nm.tracked_map_full_total),
                      ("netmem_pools", nm.pool_map_full_total),
                      ("devmem_sockets", nm.socket_map_full_total),
                      ("netmem_calls", nm.call_map_full_total)]
        if ms is not None:
            drops += [("zerocopy_procs", ms.proc_map_full),
                      ("zerocopy_pending", ms.pending_full), ("memcg", ms.memcg_map_full)]
        for map_name, n in drops:
            full.add_metric((map_name,), n)
        yield full
        yield from SnapshotCollector._memcg_self(ms, st.holders_refs_lost_total)
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
                unavailable.add(f"{name}_total", values.reason)
            else:
                for prog, v in sorted(values.items()):
                    fam.add_metric((prog,), v / scale)
            yield fam

    @staticmethod
    def _memcg_self(ms: MemcgSelfStats | None, holders_lost: int | None) -> Iterator[Metric]:
        """The memcg / zerocopy collector's own health; no series when it did not report
        (its error is in netmemtrace_collector_error_info)."""
        lost = CounterMetricFamily(
            "netmemtrace_events_lost",
            "Events a BPF ring buffer had no room for (object=zerocopy: mapping ledger "
            "events, the unaccounted zerocopy figures undercount; object=holders: zombie "
            "page references, their pages are reported unattributed).", labels=("object",))
        specs: tuple[tuple[str, str, str, Callable[[MemcgSelfStats], int]], ...] = (
            ("netmemtrace_zerocopy_ledger_ranges", "gauge",
             "Mapped page ranges in the zerocopy ledger now.", lambda s: s.ledger_ranges),
            ("netmemtrace_zerocopy_ledger_overflow_ranges", "counter",
             "Mapped ranges not recorded because the ledger was full (unaccounted zerocopy "
             "undercounts).", lambda s: s.ledger_overflow_ranges),
            ("netmemtrace_zerocopy_ledger_overflow_bytes", "counter",
             "Bytes of the ranges not recorded because the ledger was full.",
             lambda s: s.ledger_overflow_bytes),
            ("netmemtrace_zerocopy_tx_tracker_overflow_sends", "counter",
             "MSG_ZEROCOPY sends the completion tracker had no room for.",
             lambda s: s.tx_tracker_overflow_sends),
            ("netmemtrace_memcg_unresolved_events", "counter",
             "Socket memory events without a readable memory cgroup id.",
             lambda s: s.memcg_unresolved),
            ("netmemtrace_zerocopy_smaps_mismatch_processes", "gauge",
             "Processes whose ledger figure disagrees with the Rss of their socket: "
             "mappings in /proc/PID/smaps (cross-check; 0 when they agree).",
             lambda s: s.smaps_mismatch_pids),
            ("netmemtrace_exited_process_rows", "gauge",
             "Exited zerocopy processes whose rows are kept now (for 300 s, at most 1024).",
             lambda s: s.exited_process_rows),
            ("netmemtrace_exited_process_rows_expired", "counter",
             "Exited processes' rows dropped at the end of their retention.",
             lambda s: s.exited_rows_expired),
            ("netmemtrace_exited_process_rows_evicted", "counter",
             "Exited processes' rows dropped before their retention ended, the row cap "
             "being reached (their counts stay in the cgroup totals).",
             lambda s: s.exited_rows_evicted),
        )
        if ms is not None:
            lost.add_metric(("zerocopy",), ms.ringbuf_lost_events)
        if holders_lost is not None:
            lost.add_metric(("holders",), holders_lost)
        yield lost
        for name, kind, help_text, get in specs:
            fam = _family(name, kind, help_text, ())
            if ms is not None:
                fam.add_metric((), get(ms))
            yield fam


# ---- exposition ----------------------------------------------------------------------------
# prometheus_client's encoders validate and escape every label name and value of every
# sample; for a large host that is most of a render. This writes the same bytes for the
# families used here (checked against prometheus_client in the tests) with label names taken
# as valid (Metric already validated them) and each distinct label value escaped once.

TEXT = "text"
OPENMETRICS = "openmetrics"
# Anything prometheus_client can express that this encoder does not write: rendered by
# prometheus_client instead.
_OM_ONLY_SUFFIXES = ("_created", "_gsum", "_gcount")


def _plain(metrics: list[Metric]) -> bool:
    return all(not m.unit and all(
        s.exemplar is None and s.timestamp is None and s.native_histogram is None
        and not s.name.endswith(_OM_ONLY_SUFFIXES) for s in m.samples) for m in metrics)


def _label_escape(v: str) -> str:
    # visible() first: an undecodable byte of a cgroup name becomes a literal \xNN, whose
    # backslash is then escaped like any other.
    return visible(v).replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def encode(metrics: Iterable[Metric], fmt: str) -> bytes:
    """Prometheus text format 0.0.4 (fmt TEXT) or OpenMetrics 1.0 of the metric families,
    byte for byte as prometheus_client's generate_latest writes them."""
    metrics = list(metrics)
    if not _plain(metrics):
        registry = _Families(metrics)
        return (_om_latest(registry) if fmt == OPENMETRICS else _text_latest(registry))
    escaped: dict[str, str] = {}
    out: list[str] = []
    for m in metrics:
        name, kind = m.name, m.type
        if fmt == OPENMETRICS:
            doc = _label_escape(m.documentation)
        else:
            doc = m.documentation.replace("\\", r"\\").replace("\n", r"\n")
            name += {"counter": "_total", "info": "_info"}.get(kind, "")
            kind = {"info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram",
                    "unknown": "untyped"}.get(kind, kind)
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
        for s in m.samples:
            if s.labels:
                parts = []
                for k, v in sorted(s.labels.items()):
                    e = escaped.get(v)
                    if e is None:
                        e = escaped[v] = _label_escape(v)
                    parts.append(f'{k}="{e}"')
                labels = "{" + ",".join(parts) + "}"
            else:
                labels = ""
            out.append(f"{s.name}{labels} {floatToGoString(s.value)}\n")
    if fmt == OPENMETRICS:
        out.append("# EOF\n")
    return "".join(out).encode()


class _Families(Collector):
    """Already collected families, for prometheus_client's encoders."""

    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics)


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


def render(metrics: list[Metric], content_type: str,
           encoder: Callable[[Collector], bytes]) -> bytes:
    """The body for content_type, as prometheus_client's `encoder` chosen with it (by
    choose_encoder) would write it; through encode() where that is the same."""
    fmt = _FAST_FORMATS.get(content_type)
    return encode(metrics, fmt) if fmt else encoder(_Families(metrics))
