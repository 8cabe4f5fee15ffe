"""The kernel's own page pool view joined into the snapshot (collect/pagepool.py): pools only
netlink lists, the real NIC of a pool re-parented to loopback, a zombie's remembered NIC,
zombie age from detach-time, recycling figures and the per-device ynltool parity. The
BPF maps are real (and empty: no event is run), the netlink view is synthetic, built as
host/netlink.py builds it from the kernel's replies."""

from __future__ import annotations

import dataclasses
import time

import pytest

from netmemtrace.collect import pagepool
from netmemtrace.collect.pagepool import PagePoolReader, device_summaries, recycling
from netmemtrace.host.netlink import KernelView, NetnsView
from netmemtrace.snapshot import KernelPoolView, RecycleStats, Recycling, Unavailable

pytestmark = pytest.mark.live  # loads pagepool.bpf.o (empty maps)

SEC = 10**9
ZERO = RecycleStats(**{f.name: 0 for f in dataclasses.fields(RecycleStats)})


def stats(**changes: int) -> RecycleStats:
    return dataclasses.replace(ZERO, **changes)


def pool_view(**changes: object) -> KernelPoolView:
    base = KernelPoolView(inflight_pages=128, inflight_bytes=128 * 4096, detach_time_s=None,
                          dmabuf_id=None, ifindex=2, napi_id=8193, netns="host",
                          stats=stats())
    return dataclasses.replace(base, **changes)


def view(*netns: NetnsView) -> KernelView:
    return KernelView(netns)


def test_ratio_formulas_and_rates() -> None:
    before = stats(alloc_fast=900, alloc_refill=10, alloc_slow=90, recycle_cached=600,
                   recycle_ring=200, recycle_ring_full=150, recycle_released_refcnt=50)
    r = recycling(before, None, 5 * SEC)
    # recycled / given back: (600 + 200) / (600 + 200 + 150 + 50)
    assert r.recycled_ratio == 0.8 and r.per_s is None and r.recycled_ratio_interval is None
    # ynltool: (ring + cached) / (fast + refill + slow) = 800 / 1000
    assert r.ynltool_ratio == 0.8
    after = dataclasses.replace(before, recycle_cached=700, recycle_ring_full=250)
    r2 = recycling(after, (5 * SEC, before), 7 * SEC)
    assert r2.per_s is not None and r2.per_s["recycle_cached"] == 50.0
    assert r2.per_s["recycle_ring_full"] == 50.0
    assert r2.recycled_ratio_interval == 0.5  # 100 recycled of 200 given back in 2 s
    # A counter going backwards (another pool under a reused id) has no rate.
    assert recycling(before, (5 * SEC, after), 7 * SEC).per_s is None


def test_idle_listed_pool_appears_with_the_kernels_figures(raw_tp_pagepool) -> None:
    reader = PagePoolReader(raw_tp_pagepool.obj)
    kv = view(NetnsView("host", {4: pool_view(stats=stats(recycle_cached=3))},
                        {8193: 2}, {1: "lo", 2: "eth0"}))
    (pool,) = reader.read(10 * SEC, kv)
    assert (pool.pool_id, pool.pool_addr, pool.state) == (4, None, "active")
    assert (pool.inflight_pages, pool.inflight_bytes, pool.inflight_source) == \
        (128, 128 * 4096, "kernel")
    assert (pool.netdev, pool.ifindex, pool.netns, pool.listed_on) == \
        ("eth0", 2, "host", None)
    assert pool.page_order == 0 and pool.numa_node is None
    assert isinstance(pool.recycling, Recycling) and pool.recycling.per_s is None
    kv2 = view(NetnsView("host", {4: pool_view(stats=stats(recycle_cached=13))},
                         {8193: 2}, {1: "lo", 2: "eth0"}))
    (again,) = reader.read(12 * SEC, kv2)
    assert again.first_seen_age_ns == 2 * SEC
    assert isinstance(again.recycling, Recycling)
    assert again.recycling.per_s["recycle_cached"] == 5.0


def test_pool_reparented_to_lo_is_shown_on_its_nic_through_the_napi_id(raw_tp_pagepool
                                                                       ) -> None:
    # The NIC moved from the host to netns nmt-b: the kernel lists its pool on the host's
    # lo (no ifindex); napi-get in nmt-b knows the NAPI id.
    reader = PagePoolReader(raw_tp_pagepool.obj)
    kv = view(NetnsView("host", {3: pool_view(ifindex=None, napi_id=8200)}, {}, {1: "lo"}),
              NetnsView("nmt-b", {}, {8200: 5}, {1: "lo", 5: "eth1"}))
    (pool,) = reader.read(SEC, kv)
    assert (pool.netdev, pool.ifindex, pool.netns) == ("eth1", 5, "nmt-b")
    assert pool.listed_on == "lo of host"
    assert "NAPI id 8200" in pool.netdev_source and "re-parented" in pool.netdev_source
    # The NIC is unbound: its NAPI is gone, the pool is a zombie on lo. This process saw
    # the NIC: it still names it, and says so.
    boot = time.clock_gettime(time.CLOCK_BOOTTIME)
    gone = view(NetnsView("host", {3: pool_view(ifindex=None, napi_id=8200,
                                                detach_time_s=int(boot) - 30)}, {},
                          {1: "lo"}),
                NetnsView("nmt-b", {}, {}, {1: "lo"}))
    (zombie,) = reader.read(2 * SEC, gone)
    after = time.clock_gettime(time.CLOCK_BOOTTIME)
    assert (zombie.netdev, zombie.netns, zombie.state) == ("eth1", "nmt-b", "zombie")
    assert zombie.netdev_source.startswith("remembered: eth1") and "gone" in \
        zombie.netdev_source
    assert zombie.zombie_age_source == "kernel detach-time"
    # The kernel's detach-time is in whole seconds; the read's clock is after `boot`.
    assert (boot - int(boot) + 30) * SEC - 1e7 <= zombie.zombie_age_ns <= \
        (after - int(boot) + 30) * SEC + 1e7


def test_unknown_nic_of_a_reparented_pool_says_so(raw_tp_pagepool) -> None:
    reader = PagePoolReader(raw_tp_pagepool.obj)
    kv = view(NetnsView("host", {9: pool_view(ifindex=None, napi_id=None)}, {}, {1: "lo"}))
    (pool,) = reader.read(SEC, kv)
    assert (pool.netdev, pool.netns, pool.listed_on) == ("lo", "host", "lo of host")
    assert "real NIC is unknown" in pool.netdev_source


def test_device_summary_matches_ynltool_and_adds_what_it_cannot_show(raw_tp_pagepool
                                                                     ) -> None:
    reader = PagePoolReader(raw_tp_pagepool.obj)
    live = pool_view(inflight_pages=100, inflight_bytes=100 * 4096, napi_id=1,
                     stats=stats(alloc_fast=80, alloc_refill=10, alloc_slow=10,
                                 recycle_cached=60, recycle_ring=30, recycle_ring_full=10))
    zombie = pool_view(inflight_pages=7, inflight_bytes=7 * 4096, napi_id=2,
                       detach_time_s=1, stats=stats())
    kv = view(NetnsView("host", {1: live, 2: zombie}, {1: 2, 2: 2}, {2: "eth0"}))
    pools = reader.read(SEC, kv)
    (dev,) = device_summaries(pools)
    assert (dev.netdev, dev.netns, dev.listed_as) == ("eth0", "host", ("ifindex 2",))
    assert (dev.pools, dev.zombies) == (2, 1)
    assert (dev.inflight_pages, dev.zombie_inflight_pages) == (107, 7)
    assert (dev.inflight_bytes, dev.zombie_inflight_bytes) == (107 * 4096, 7 * 4096)
    assert (dev.alloc_slow, dev.alloc_fast, dev.recycle_ring, dev.recycle_cached) == \
        (10, 90, 30, 60)
    assert dev.ynltool_recycling_pct == 90.0  # (30 + 60) / (90 + 10)
    assert dev.recycled_ratio == 0.9          # 90 / (90 + 10)
    assert dev.recycled_per_s is None and dev.unlisted_pools == 0


def test_without_page_pool_stats_recycling_is_unavailable(raw_tp_pagepool) -> None:
    reader = PagePoolReader(raw_tp_pagepool.obj)
    off = Unavailable("kernel built without CONFIG_PAGE_POOL_STATS")
    kv = view(NetnsView("host", {1: pool_view(stats=off)}, {8193: 2}, {2: "eth0"}))
    (pool,) = reader.read(SEC, kv)
    assert pool.recycling == off
    (dev,) = device_summaries([pool])
    assert dev.recycled_ratio == off and dev.alloc_fast == off and dev.pools == 1


def test_no_netdev_family_keeps_the_tracepoint_view(raw_tp_pagepool) -> None:
    reader = PagePoolReader(raw_tp_pagepool.obj)
    assert reader.read(SEC, Unavailable("kernel < 6.8")) == []
    assert pagepool.ratio(1, 0) is None
