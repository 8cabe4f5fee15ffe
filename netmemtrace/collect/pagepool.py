"""Reader of the page_pool domain (bpf/pagepool.bpf.c): per-pool counters, metadata and
destruction state, joined with the kernel's own netlink view."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable
from dataclasses import dataclass

from .. import abi, libbpf
from ..snapshot import KernelPoolView, PoolSnapshot, Unavailable
from . import resolve

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


class PagePoolReader:
    def __init__(self, obj: libbpf.Object) -> None:
        btf = abi.btf("pagepool")
        self._counters_t = btf.struct("pool_counters")
        self._info_t = btf.struct("pool_info")
        self._retired_t = btf.struct("retired_pool")
        self._stats_t = btf.struct("pagepool_stats")
        self._counters = obj.map("pool_counters")
        self._info = obj.map("pools")
        self._retired = obj.map("retired_pools")
        self._stats = obj.map("pagepool_stats")
        # (pool, first_seen_ns) -> (hold+release events, monotonic ns they last changed)
        self._activity: dict[tuple[int, int], tuple[int, int | None]] = {}

    def stats(self) -> dict[str, int]:
        per_cpu = self._stats.items()[0][1]
        decoded = [abi.decode(self._stats_t, v) for v in per_cpu]
        return {name: sum(getattr(d, name) for d in decoded)
                for name, _ in self._stats_t._fields_ if not name.startswith("_")}

    def read(self, now_ns: int, kernel_pools: dict[int, KernelPoolView] | Unavailable
             ) -> list[PoolSnapshot]:
        names = resolve.netns_names()
        own_ino = resolve.own_netns_inode()
        links: dict[int, dict[int, str]] = {}
        infos = {int.from_bytes(k, "little"): abi.decode(self._info_t, v[0])
                 for k, v in self._info.items()}
        pools = []
        for info in infos.values():
            counters = self._slot_counters(info)
            if counters is None:
                continue  # created between the two reads; next snapshot has it
            pools.append(self._pool(info, counters, now_ns, names, own_ino, links,
                                    kernel_pools, retired=False))
        for key, vals in self._retired.items():
            r = abi.decode(self._retired_t, vals[0])
            if now_ns - r.info.release_last_ns > RETAIN_RELEASED_NS:
                # Bounded memory: a freed pool is reported for a while, then forgotten.
                self._retired.delete(ctypes.create_string_buffer(key, len(key)))
                continue
            counters = PoolCounters(tuple(r.holds), tuple(r.releases), r.info.release_hold,
                                    r.info.release_release)
            pools.append(self._pool(r.info, counters, now_ns, names, own_ino, links,
                                    kernel_pools, retired=True))
        live = {(info.pool, info.first_seen_ns) for info in infos.values()}
        self._activity = {k: v for k, v in self._activity.items() if k in live}
        return pools

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
              kernel_pools: dict[int, KernelPoolView] | Unavailable,
              retired: bool) -> PoolSnapshot:
        inflight = 0 if retired else inflight_pages(c, info)
        page_bytes = PAGE_SIZE << info.order
        netns = resolve.netns_label(info.netns_ino, names, own_ino)
        netdev = info.ifname.decode(errors="replace") or None
        if not retired and info.ifindex:
            netdev = self._current_name(info, netns, links) or netdev
        if retired:
            state = "released"
        elif info.release_calls:
            state = "zombie"
        else:
            state = "active"
        if isinstance(kernel_pools, Unavailable):
            kernel: KernelPoolView | Unavailable = kernel_pools
        elif not info.pool_id:
            kernel = Unavailable("pool has no id (kernel < 6.8)")
        else:
            kernel = kernel_pools.get(info.pool_id) or Unavailable(
                "not listed by netdev netlink (pool without a registered netdev, e.g. veth, "
                "or in another netns)")
        return PoolSnapshot(
            pool_addr=info.pool, pool_id=info.pool_id or None, ifindex=info.ifindex,
            netdev=netdev, netns=netns, napi_id=info.napi_id or None,
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
            zombie_age_ns=now_ns - info.release_first_ns if state == "zombie" else None,
            release_calls=info.release_calls,
            kernel_inflight_at_release=info.release_inflight if info.release_calls else None,
            kernel_hold_at_release=info.release_hold if info.release_calls else None,
            kernel_release_at_release=info.release_release if info.release_calls else None,
            kernel=kernel,
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
                      links: dict[int, dict[int, str]]) -> str | None:
        # The name captured at pool creation survives deletion; a live link may have been
        # renamed since, so ask the netns (once per snapshot) for the current one.
        if info.netns_ino not in links:
            ns = None if netns == "host" else netns
            try:
                links[info.netns_ino] = {} if not netns or netns.startswith("net:[") \
                    else resolve.link_names(ns)
            except OSError:
                links[info.netns_ino] = {}
        return links[info.netns_ino].get(info.ifindex)
