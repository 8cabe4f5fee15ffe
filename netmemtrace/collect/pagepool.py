"""Reader of the page_pool domain (bpf/pagepool.bpf.c): per-pool counters, metadata and
destruction state, joined with the kernel's own netlink view (host/netlink.py): every
pool netlink lists is reported, seen by the tracepoints or not; the kernel's figures fill
in what netmemtrace cannot know; the real NIC of a pool the kernel re-parented to loopback
is found through its NAPI id; and recycling comes from page-pool-stats-get."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

from netmemtrace.host import resolve
from netmemtrace.host.netlink import KernelView
from netmemtrace.kernel import abi, libbpf
from netmemtrace.snapshot import (
    DeviceSummary,
    KernelPoolView,
    PoolSnapshot,
    RecycleStats,
    Recycling,
    Unavailable,
)

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_U32 = 1 << 32
RETAIN_RELEASED_NS = 600 * 10**9


def serial_max(values: Iterable[int]) -> int | None:
    """Latest of u32 counters that may wrap (RFC 1982 serial-number order)."""
    latest = None
    for v in values:
        if latest is None or (v - latest) % _U32 < _U32 // 2:
            latest = v
    return latest


@dataclass(frozen=True)
class PoolCounters:
    """One pool's per-CPU counters summed; kernel counters as the latest any CPU saw."""

    holds: tuple[int, int]           # (page, net_iov)
    releases: tuple[int, int]
    kernel_hold_cnt: int | None      # None: no hold event seen since attach
    kernel_release_cnt: int | None


def sum_counters(per_cpu: list[ctypes.Structure]) -> PoolCounters:
    holding = [c for c in per_cpu if c.holds[0] or c.holds[1]]
    releasing = [c for c in per_cpu if c.releases[0] or c.releases[1]]
    return PoolCounters(
        holds=(sum(c.holds[0] for c in per_cpu), sum(c.holds[1] for c in per_cpu)),
        releases=(sum(c.releases[0] for c in per_cpu), sum(c.releases[1] for c in per_cpu)),
        kernel_hold_cnt=serial_max(c.kernel_hold_cnt for c in holding),
        kernel_release_cnt=serial_max(c.kernel_release_cnt for c in releasing),
    )


def inflight_pages(c: PoolCounters, info: ctypes.Structure) -> int | Unavailable:
    """The pool's pages out of the pool right now, from the kernel's own counters.

    hold/release counters come from the tracepoint args (and page_pool_release, which
    carries both). A pool we saw from birth has release_cnt == releases seen.
    """
    released = info.release_calls > 0
    hold = serial_max(v for v in (c.kernel_hold_cnt, info.release_hold if released else None)
                      if v is not None)
    rel = serial_max(v for v in (c.kernel_release_cnt,
                                 info.release_release if released else None) if v is not None)
    if hold is None:
        return Unavailable("no page_pool_state_hold or page_pool_release seen since attach")
    if rel is None:
        if hold != sum(c.holds):
            return Unavailable("no page release seen since attach and the pool predates "
                               "netmemtrace, so its release count is unknown")
        rel = sum(c.releases)
    return (hold - rel) % _U32


RETURNED = ("recycle_cached", "recycle_ring", "recycle_ring_full", "recycle_released_refcnt")
RECYCLED = ("recycle_cached", "recycle_ring")
YNLTOOL_ALLOCS = ("alloc_fast", "alloc_refill", "alloc_slow")


def ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def recycling(stats: RecycleStats, prev: tuple[int, RecycleStats] | None, now_ns: int
              ) -> Recycling:
    """The recycling figures of one pool from its counters now and at the previous read
    (monotonic ns, counters); the formulas are Recycling's."""
    cur = dataclasses.asdict(stats)
    per_s = None
    if prev is not None and now_ns > prev[0]:
        old = dataclasses.asdict(prev[1])
        if all(cur[k] >= old[k] for k in cur):  # a reset (new pool, same id?) has no rate
            dt_s = (now_ns - prev[0]) / 1e9
            per_s = {k: (cur[k] - old[k]) / dt_s for k in cur}
    return Recycling(
        counters=stats, per_s=per_s,
        recycled_ratio=ratio(sum(cur[k] for k in RECYCLED), sum(cur[k] for k in RETURNED)),
        recycled_ratio_interval=None if per_s is None else ratio(
            sum(per_s[k] for k in RECYCLED), sum(per_s[k] for k in RETURNED)),
        ynltool_ratio=ratio(sum(cur[k] for k in RECYCLED),
                            sum(cur[k] for k in YNLTOOL_ALLOCS)),
    )


@dataclass(frozen=True)
class Location:
    netdev: str | None
    ifindex: int
    netns: str | None
    source: str
    listed_on: str | None = None


class PagePoolReader:
    def __init__(self, obj: libbpf.Object) -> None:
        btf = abi.btf("pagepool")
        self._counters_t = btf.struct("pool_counters")
        self._info_t = btf.struct("pool_info")
        self._retired_t = btf.struct("retired_pool")
        self._counters = obj.map("pool_counters")
        self._info = obj.map("pools")
        self._retired = obj.map("retired_pools")
        self._stats = abi.Stats("pagepool", obj.map("pagepool_stats"))
        # (pool, first_seen_ns) -> (hold+release events, monotonic ns they last changed)
        self._activity: dict[tuple[int, int], tuple[int, int | None]] = {}
        # pool id -> monotonic ns netlink first listed it (pools with no event since attach)
        self._listed_since: dict[int, int] = {}
        # pool id -> (monotonic ns, counters) of the previous read: the recycling rates
        self._stats_prev: dict[int, tuple[int, RecycleStats]] = {}
        # pool id (or address, first seen) -> its NIC as last found while it existed: the
        # name and netns of a zombie whose NIC is gone
        self._nics: dict[object, Location] = {}

    def read(self, now_ns: int, kernel: KernelView | Unavailable) -> list[PoolSnapshot]:
        """Every pool: those the tracepoints saw, then those only netlink lists (idle since
        attach). kernel: the netdev family's view of every netns, or why there is none."""
        names = resolve.netns_names()
        own_ino = resolve.own_netns_inode()
        links: dict[int, dict[int, str]] = {}
        listed = {} if isinstance(kernel, Unavailable) else kernel.pools
        boot_s = time.clock_gettime(time.CLOCK_BOOTTIME)
        infos = {int.from_bytes(k, "little"): abi.decode(self._info_t, v[0])
                 for k, v in self._info.items()}
        untracked = self.untracked()  # after the map: a pool dropped since is counted
        pools = []
        for info in infos.values():
            counters = self._slot_counters(info)
            if counters is None:
                continue  # created between the two reads; next snapshot has it
            pools.append(self._pool(info, counters, now_ns, names, own_ino, links,
                                    kernel, boot_s, retired=False))
        for key, vals in self._retired.items():
            r = abi.decode(self._retired_t, vals[0])
            if now_ns - r.info.release_last_ns > RETAIN_RELEASED_NS:
                # Bounded memory: a freed pool is reported for a while, then forgotten.
                self._retired.delete(ctypes.create_string_buffer(key, len(key)))
                continue
            counters = PoolCounters(tuple(r.holds), tuple(r.releases), r.info.release_hold,
                                    r.info.release_release)
            pools.append(self._pool(r.info, counters, now_ns, names, own_ino, links,
                                    kernel, boot_s, retired=True))
        seen_ids = {p.pool_id for p in pools if p.pool_id}
        for pool_id, view in sorted(listed.items()):
            if pool_id not in seen_ids and isinstance(kernel, KernelView):
                pools.append(self._listed_only(pool_id, view, now_ns, kernel, boot_s,
                                               untracked))
        live = {(info.pool, info.first_seen_ns) for info in infos.values()}
        keys = {*live, *(p.pool_id for p in pools if p.pool_id)}
        self._nics = {k: v for k, v in self._nics.items() if k in keys}
        self._activity = {k: v for k, v in self._activity.items() if k in live}
        self._listed_since = {k: v for k, v in self._listed_since.items() if k in listed}
        self._stats_prev = {k: v for k, v in self._stats_prev.items() if k in listed}
        for pool_id, view in listed.items():
            if isinstance(view.stats, RecycleStats):
                self._stats_prev[pool_id] = (now_ns, view.stats)
        return pools

    def untracked(self) -> Unavailable | None:
        """Why the event totals of a pool the pools map has no record of are unknown (the
        map was full once: that pool's events may be the ones dropped), or None: then no
        record means no page_pool event since attach, and its totals are 0."""
        if self._stats.read()["pool_map_full"]:
            return Unavailable("not tracked: the pools map was full (pool_map_full), so "
                               "this pool's page_pool events may have been dropped")
        return None

    # ---- the kernel's figures ----

    def _recycling(self, pool_id: int, view: KernelPoolView | Unavailable, now_ns: int
                   ) -> Recycling | Unavailable:
        if isinstance(view, Unavailable):
            return view
        if isinstance(view.stats, Unavailable):
            return view.stats
        return recycling(view.stats, self._stats_prev.get(pool_id), now_ns)

    @staticmethod
    def _zombie_age(view: KernelPoolView | Unavailable, boot_s: float, release_first_ns: int,
                    now_ns: int) -> tuple[int | None, str | None]:
        """Age of a zombie by the kernel's own clock (netlink detach-time, boottime
        seconds) where it is listed, else since the first page_pool_release seen."""
        if not isinstance(view, Unavailable) and view.detach_time_s:
            return max(0, int((boot_s - view.detach_time_s) * 1e9)), "kernel detach-time"
        if release_first_ns:
            return now_ns - release_first_ns, "first page_pool_release seen"
        return None, None

    def _locate(self, key: object, napi_id: int | None, seen: Location | None,
                view: KernelPoolView | Unavailable, kernel: KernelView | Unavailable
                ) -> Location:
        """The pool's real NIC. The kernel lists a pool whose netdev unregistered (or moved
        to another netns, which unregisters it there) on the loopback of the netns it was
        in, and tracepoints first seeing such a pool read `lo` too: the NAPI id (netlink
        napi-get in every netns) still leads to the NIC; failing that, what this process
        saw earlier, or the name read when the pool was first seen."""
        listed_on = None
        if not isinstance(view, Unavailable) and view.ifindex is None:
            listed_on = f"lo of {view.netns}"
        elif seen is not None and seen.netdev == "lo":
            listed_on = f"lo of {seen.netns}"
        moved = (f"; the kernel lists the pool on {listed_on} (re-parented when the NIC "
                 "unregistered or left that netns)") if listed_on else ""
        if napi_id and isinstance(kernel, KernelView):
            found = kernel.napi_device(napi_id)
            if found is not None:
                netns, ifindex, name = found
                loc = Location(name, ifindex, netns,
                               f"NAPI id {napi_id} (netlink napi-get in netns {netns})"
                               + moved, listed_on)
                self._nics[key] = loc
                return loc
        if listed_on is None:
            if not isinstance(view, Unavailable) and isinstance(kernel, KernelView):
                ns = next(n for n in kernel.netns if n.label == view.netns)
                loc = Location(ns.links.get(view.ifindex), view.ifindex or 0, view.netns,
                               "netlink page-pool-get ifindex")
                self._nics[key] = loc
                return loc
            if seen is not None and seen.ifindex and seen.source == "present":
                loc = dataclasses.replace(seen, source="the pool's netdev")
                self._nics[key] = loc
                return loc
        remembered = self._nics.get(key)
        if remembered is not None:
            return dataclasses.replace(
                remembered, listed_on=listed_on,
                source=f"remembered: {remembered.netdev} (ifindex {remembered.ifindex}) in "
                f"netns {remembered.netns}, as netmemtrace last saw it ({remembered.source}); "
                "that NIC is gone" + moved)
        if seen is not None and seen.ifindex and seen.netdev != "lo":
            return dataclasses.replace(
                seen, listed_on=listed_on,
                source="the pool's netdev when netmemtrace first saw the pool; that NIC is "
                "gone" + moved)
        if listed_on:
            netns = listed_on.removeprefix("lo of ")
            return Location("lo", 1, netns, "the kernel re-parented the pool to lo of "
                            f"{netns}; its real NIC is unknown (no NAPI id leads to one and "
                            "netmemtrace did not see it before)", listed_on)
        return Location(None, 0, None, "the pool has no netdev (none registered, none "
                        "reachable through its NAPI or DMA device)")

    # ---- pools ----

    def _listed_only(self, pool_id: int, view: KernelPoolView, now_ns: int,
                     kernel: KernelView, boot_s: float, untracked: Unavailable | None
                     ) -> PoolSnapshot:
        """A pool netlink lists and the pools map has no record of: no page_pool event
        since attach (idle, or older than netmemtrace and not yet refilled), or, once the
        map was full (untracked), events netmemtrace may have dropped. Every figure is the
        kernel's; the event totals are 0, or untracked."""
        first = self._listed_since.setdefault(pool_id, now_ns)
        loc = self._locate(pool_id, view.napi_id, None, view, kernel)
        order = None
        if view.inflight_pages and view.inflight_bytes:
            order = (view.inflight_bytes // view.inflight_pages // PAGE_SIZE).bit_length() - 1
        age, age_source = self._zombie_age(view, boot_s, 0, now_ns)
        provider = "dmabuf" if view.dmabuf_id else "io_uring" if view.io_uring else "host"
        events: int | Unavailable = 0 if untracked is None else untracked
        return PoolSnapshot(
            pool_addr=None, pool_id=pool_id, ifindex=loc.ifindex, netdev=loc.netdev,
            netns=loc.netns, napi_id=view.napi_id, provider=provider, page_order=order,
            page_size_bytes=None if order is None else PAGE_SIZE << order, numa_node=None,
            state="zombie" if view.detach_time_s else "active",
            hold_pages_total=events, hold_net_iovs_total=events, release_pages_total=events,
            release_net_iovs_total=events, kernel_hold_cnt=None, kernel_release_cnt=None,
            inflight_pages=_known(view.inflight_pages),
            inflight_bytes=_known(view.inflight_bytes),
            first_seen_age_ns=now_ns - first, last_event_age_ns=None, destroy_age_ns=None,
            zombie_age_ns=age, release_calls=0, kernel_inflight_at_release=None,
            kernel_hold_at_release=None, kernel_release_at_release=None, kernel=view,
            inflight_source="kernel", netdev_source=loc.source, listed_on=loc.listed_on,
            zombie_age_source=age_source, recycling=self._recycling(pool_id, view, now_ns))

    def _slot_counters(self, info: ctypes.Structure) -> PoolCounters | None:
        """The pool's counters: the CPU copies of its slot that count for it. A CPU that
        has not seen the pool since it claimed the slot holds 0 there."""
        per_cpu = self._counters.lookup_per_cpu(ctypes.c_uint32(info.slot))
        if per_cpu is None:
            return None
        copies = [abi.decode(self._counters_t, v) for v in per_cpu]
        return sum_counters([c for c in copies if c.pool == info.pool])

    def _pool(self, info: ctypes.Structure, c: PoolCounters, now_ns: int,
              names: dict[int, str], own_ino: int, links: dict[int, dict[int, str]],
              kernel: KernelView | Unavailable, boot_s: float, retired: bool
              ) -> PoolSnapshot:
        inflight: int | Unavailable = 0 if retired else inflight_pages(c, info)
        page_bytes = PAGE_SIZE << info.order
        netns = resolve.netns_label(info.netns_ino, names, own_ino)
        netdev = info.ifname.decode(errors="replace") or None
        view: KernelPoolView | Unavailable
        if isinstance(kernel, Unavailable):
            view = kernel
        elif not info.pool_id:
            view = Unavailable("pool has no id (kernel < 6.8)")
        else:
            view = kernel.pools.get(info.pool_id) or Unavailable(
                "not listed by netdev netlink (a pool without a registered netdev, e.g. "
                "veth, or one whose netns is gone)")
        seen = None
        if info.ifindex:
            # The name read at first sight survives the NIC; a live link may have been
            # renamed since, so its netns is asked (once per snapshot) for the current one.
            current = None if retired else self._current_name(info, netns, links, kernel)
            seen = Location(current or netdev, info.ifindex, netns,
                            "present" if current else "gone")
        key = info.pool_id or (info.pool, info.first_seen_ns)
        loc = self._locate(key, info.napi_id or (view.napi_id if not isinstance(
            view, Unavailable) else None), seen, view, kernel)
        source = "netmemtrace"
        if isinstance(inflight, Unavailable) and not isinstance(view, Unavailable) \
                and view.inflight_pages is not None:
            inflight, source = view.inflight_pages, "kernel"
        if retired:
            state = "released"
        elif info.release_calls or (not isinstance(view, Unavailable) and view.detach_time_s):
            state = "zombie"
        else:
            state = "active"
        age, age_source = self._zombie_age(view, boot_s, info.release_first_ns, now_ns) \
            if state == "zombie" else (None, None)
        return PoolSnapshot(
            pool_addr=info.pool, pool_id=info.pool_id or None, ifindex=loc.ifindex,
            netdev=loc.netdev, netns=loc.netns, napi_id=info.napi_id or None,
            provider=resolve.provider_name(info.mp_ops), page_order=info.order,
            page_size_bytes=page_bytes, numa_node=info.nid, state=state,
            hold_pages_total=c.holds[0], hold_net_iovs_total=c.holds[1],
            release_pages_total=c.releases[0], release_net_iovs_total=c.releases[1],
            kernel_hold_cnt=c.kernel_hold_cnt, kernel_release_cnt=c.kernel_release_cnt,
            inflight_pages=inflight,
            inflight_bytes=inflight if isinstance(inflight, Unavailable)
            else inflight * page_bytes,
            first_seen_age_ns=now_ns - info.first_seen_ns,
            last_event_age_ns=self._last_activity_age(info, c, now_ns, retired),
            destroy_age_ns=now_ns - info.destroy_ns if info.destroy_ns else None,
            zombie_age_ns=age,
            release_calls=info.release_calls,
            kernel_inflight_at_release=info.release_inflight if info.release_calls else None,
            kernel_hold_at_release=info.release_hold if info.release_calls else None,
            kernel_release_at_release=info.release_release if info.release_calls else None,
            kernel=view, inflight_source=source, netdev_source=loc.source,
            listed_on=loc.listed_on, zombie_age_source=age_source,
            recycling=Unavailable("the pool is freed") if retired
            else self._recycling(info.pool_id, view, now_ns),
        )

    def _last_activity_age(self, info: ctypes.Structure, c: PoolCounters, now_ns: int,
                           retired: bool) -> int | None:
        """Age of the last hold/release, at snapshot resolution: the first read that saw the
        counters move. None until a second read has seen them (or not) move."""
        if retired:
            return now_ns - info.release_last_ns
        key = (info.pool, info.first_seen_ns)  # the address alone is reused by new pools
        events = sum(c.holds) + sum(c.releases)
        seen = self._activity.get(key)
        if seen is None or seen[0] != events:
            self._activity[key] = (events, now_ns if seen else None)
        changed_ns = self._activity[key][1]
        return None if changed_ns is None else now_ns - changed_ns

    @staticmethod
    def _current_name(info: ctypes.Structure, netns: str | None,
                      links: dict[int, dict[int, str]], kernel: KernelView | Unavailable
                      ) -> str | None:
        """The current name of the pool's netdev by its ifindex in its netns, None if no
        such link is there now."""
        if info.netns_ino not in links:
            listed = None if isinstance(kernel, Unavailable) else next(
                (ns.links for ns in kernel.netns if ns.label == netns), None)
            if listed is not None:
                links[info.netns_ino] = listed
            else:
                ns = None if netns == "host" else netns
                try:
                    links[info.netns_ino] = {} if not netns or netns.startswith("net:[") \
                        else resolve.link_names(ns)
                except OSError:
                    links[info.netns_ino] = {}
        return links[info.netns_ino].get(info.ifindex)


def _known(value: int | None) -> int | Unavailable:
    return Unavailable("not in the kernel's page-pool-get reply") if value is None else value


def _counter_sum(recyc: list[Recycling | Unavailable], fields: Iterable[str]
                 ) -> int | Unavailable:
    """A sum of counters over pools; Unavailable when one pool's counters are (or no pool
    is listed)."""
    if not recyc:
        return Unavailable("netlink lists no pool of this NIC")
    total = 0
    for r in recyc:
        if isinstance(r, Unavailable):
            return r
        total += sum(getattr(r.counters, f) for f in fields)
    return total


def _rate_sum(recyc: list[Recycling | Unavailable], fields: Iterable[str]
              ) -> float | None | Unavailable:
    """Counters' per-second rates summed over pools; None before every pool's second read."""
    missing = _counter_sum(recyc, ())
    if isinstance(missing, Unavailable):
        return missing
    rates = [r.per_s for r in recyc if isinstance(r, Recycling)]
    if any(r is None for r in rates):
        return None
    return sum(r[f] for r in rates if r for f in fields)


def device_summaries(pools: Iterable[PoolSnapshot]) -> tuple[DeviceSummary, ...]:
    """Per NIC (the pools' resolved netdev and netns), `ynltool page-pool stats`' figures
    from the kernel's view of the pools netlink lists, then what ynltool cannot show: the
    pools it does not list, rates and zombie holders. Freed pools are left out (netlink
    does not list them either)."""
    groups: dict[tuple[str, str, int], list[PoolSnapshot]] = {}
    for p in pools:
        if p.state != "released":
            groups.setdefault((p.netns or "", p.netdev or "", p.ifindex), []).append(p)
    out = []
    for (netns, netdev, ifindex), group in sorted(groups.items()):
        listed = [(p, p.kernel) for p in group if isinstance(p.kernel, KernelPoolView)]
        unlisted = [p for p in group if not isinstance(p.kernel, KernelPoolView)]
        zombies = [k for _, k in listed if k.detach_time_s]
        recyc = [p.recycling for p, _ in listed]
        recycled, returned, allocs = (_counter_sum(recyc, f)
                                      for f in (RECYCLED, RETURNED, YNLTOOL_ALLOCS))
        holders: dict[str, int] = {}
        for p in group:
            for h in p.holders:
                holders[h.kind] = holders.get(h.kind, 0) + h.pages
        unlisted_inflight: int | Unavailable = 0
        for p in unlisted:
            if isinstance(p.inflight_pages, Unavailable):
                unlisted_inflight = p.inflight_pages
                break
            unlisted_inflight += p.inflight_pages
        out.append(DeviceSummary(
            netdev=netdev or None, ifindex=ifindex, netns=netns or None,
            listed_as=tuple(sorted({f"ifindex {k.ifindex}" if k.ifindex else
                                    f"lo of {k.netns}" for _, k in listed})),
            pools=len(listed), zombies=len(zombies),
            inflight_pages=sum(k.inflight_pages or 0 for _, k in listed),
            inflight_bytes=sum(k.inflight_bytes or 0 for _, k in listed),
            zombie_inflight_pages=sum(k.inflight_pages or 0 for k in zombies),
            zombie_inflight_bytes=sum(k.inflight_bytes or 0 for k in zombies),
            alloc_slow=_counter_sum(recyc, ("alloc_slow",)),
            alloc_fast=_counter_sum(recyc, ("alloc_fast", "alloc_refill")),
            recycle_ring=_counter_sum(recyc, ("recycle_ring",)),
            recycle_cached=_counter_sum(recyc, ("recycle_cached",)),
            ynltool_recycling_pct=recycled if isinstance(recycled, Unavailable) else
            None if not allocs else 100 * recycled / allocs,  # type: ignore[operator]
            recycled_ratio=recycled if isinstance(recycled, Unavailable) else
            ratio(recycled, returned),  # type: ignore[arg-type]
            recycled_per_s=_rate_sum(recyc, RECYCLED),
            returned_per_s=_rate_sum(recyc, RETURNED),
            unlisted_pools=len(unlisted), unlisted_inflight_pages=unlisted_inflight,
            zombie_holders_pages=holders,
        ))
    return tuple(out)
