"""The page_pool programs run on synthetic tracepoint args with BPF_PROG_TEST_RUN: the way to
exercise net_iov and destruction paths this machine cannot produce on demand."""

from __future__ import annotations

import ctypes
import os
import struct

import pytest

from netmemtrace.collect.pagepool import PagePoolReader
from netmemtrace.host.netlink import KernelView
from netmemtrace.kernel import abi
from netmemtrace.snapshot import Unavailable

pytestmark = pytest.mark.live

# Fake kernel addresses: CO-RE reads of the pool fail harmlessly (probe_read faults to 0).
POOL_A = 0xFFFF_8880_DEAD_0000
POOL_B = 0xFFFF_8880_BEEF_0000
PAGE = 0xFFFF_EA00_0000_1000          # struct page *: lowest bit clear
NET_IOV = 0xFFFF_8881_0000_2001       # net_iov netmem_ref: lowest bit set


def args(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}Q", *(v & (2**64 - 1) for v in values))


def run(lo, hook: str, *values: int, cpu: int | None = None) -> None:
    assert lo.obj.programs[f"{hook}__raw_tp"].test_run(args(*values), cpu=cpu) == 0


def home_slot(pool: int) -> int:
    """pagepool.bpf.c's pool_slot_hash, computed independently."""
    return ((pool * 0x9E3779B97F4A7C15) % 2**64) >> (64 - 12)


def slot_copies(lo, slot: int) -> list:
    raw = lo.obj.map("pool_counters").lookup_per_cpu(ctypes.c_uint32(slot))
    return [abi.decode(abi.btf("pagepool").struct("pool_counters"), v) for v in raw]


def owned_slots(lo) -> dict[int, int]:
    return {int.from_bytes(k, "little"): int.from_bytes(v[0], "little")
            for k, v in lo.obj.map("pool_slots").items()}


def pools_by_addr(lo) -> dict:
    return {p.pool_addr: p for p in PagePoolReader(lo.obj).read(0, KernelView(()))}


def test_page_and_net_iov_land_in_their_counters(raw_tp_pagepool) -> None:
    lo = raw_tp_pagepool
    for hold in range(1, 4):
        run(lo, "page_pool_state_hold", POOL_A, PAGE, hold)
    for hold in range(4, 6):
        run(lo, "page_pool_state_hold", POOL_A, NET_IOV, hold)
    run(lo, "page_pool_state_release", POOL_A, PAGE, 1)
    run(lo, "page_pool_state_release", POOL_A, NET_IOV, 2)
    pool = pools_by_addr(lo)[POOL_A]
    assert (pool.hold_pages_total, pool.hold_net_iovs_total) == (3, 2)
    assert (pool.release_pages_total, pool.release_net_iovs_total) == (1, 1)
    assert (pool.kernel_hold_cnt, pool.kernel_release_cnt) == (5, 2)
    assert pool.inflight_pages == 3
    assert pool.state == "active"


def test_unknown_pool_is_created_once(raw_tp_pagepool) -> None:
    lo = raw_tp_pagepool
    for hold in range(1, 101):
        run(lo, "page_pool_state_hold", POOL_B, PAGE, hold)
    assert len(lo.obj.map("pools").items()) == 1
    assert owned_slots(lo) == {home_slot(POOL_B): POOL_B}
    pool = pools_by_addr(lo)[POOL_B]
    assert pool.hold_pages_total == 100
    # Seen from its first hold and no release yet: every page is out.
    assert pool.inflight_pages == 100


def test_pool_predating_attach_reports_inflight_unavailable(raw_tp_pagepool) -> None:
    lo = raw_tp_pagepool
    run(lo, "page_pool_state_hold", POOL_A, PAGE, 5000)  # kernel had 4999 holds before us
    pool = pools_by_addr(lo)[POOL_A]
    assert isinstance(pool.inflight_pages, Unavailable)
    assert "predates" in pool.inflight_pages.reason
    run(lo, "page_pool_state_release", POOL_A, PAGE, 4990)
    assert pools_by_addr(lo)[POOL_A].inflight_pages == 10


def test_zombie_then_released_pool_is_retired(raw_tp_pagepool) -> None:
    lo = raw_tp_pagepool
    for hold in range(1, 11):
        run(lo, "page_pool_state_hold", POOL_A, PAGE, hold)
    for rel in range(1, 8):
        run(lo, "page_pool_state_release", POOL_A, PAGE, rel)
    run(lo, "page_pool_release", POOL_A, 3, 10, 7)          # destroyed, 3 inflight
    zombie = pools_by_addr(lo)[POOL_A]
    assert zombie.state == "zombie"
    assert zombie.inflight_pages == 3
    assert zombie.zombie_age_ns is not None
    assert (zombie.kernel_inflight_at_release, zombie.release_calls) == (3, 1)
    for rel in range(8, 11):
        run(lo, "page_pool_state_release", POOL_A, PAGE, rel)
    assert pools_by_addr(lo)[POOL_A].inflight_pages == 0
    run(lo, "page_pool_release", POOL_A, 0, 10, 10)         # retry finds 0: kernel frees it
    assert owned_slots(lo) == {}
    assert all(c.pool == 0 and sum(c.holds) == 0 for c in slot_copies(lo, home_slot(POOL_A)))
    released = pools_by_addr(lo)[POOL_A]
    assert released.state == "released"
    assert (released.hold_pages_total, released.release_pages_total) == (10, 10)
    assert (released.kernel_hold_at_release, released.kernel_release_at_release) == (10, 10)
    assert released.inflight_pages == 0
    assert released.release_calls == 2
    # The address is reused by a new pool: it starts from zero, not from the old counters.
    run(lo, "page_pool_state_hold", POOL_A, PAGE, 1)
    live = [p for p in PagePoolReader(lo.obj).read(0, KernelView(())) if p.state == "active"]
    assert [(p.pool_addr, p.hold_pages_total) for p in live] == [(POOL_A, 1)]


def test_update_nid_changes_the_pool_node(raw_tp_pagepool) -> None:
    lo = raw_tp_pagepool
    run(lo, "page_pool_state_hold", POOL_A, PAGE, 1)
    run(lo, "page_pool_update_nid", POOL_A, 1)  # TP_PROTO(pool, new_nid)
    assert pools_by_addr(lo)[POOL_A].numa_node == 1


def test_released_pool_is_forgotten_after_retention(raw_tp_pagepool) -> None:
    import time

    from netmemtrace.collect.pagepool import RETAIN_RELEASED_NS

    lo = raw_tp_pagepool
    run(lo, "page_pool_state_hold", POOL_B, PAGE, 1)
    run(lo, "page_pool_state_release", POOL_B, PAGE, 1)
    run(lo, "page_pool_release", POOL_B, 0, 1, 1)
    reader = PagePoolReader(lo.obj)
    now = time.monotonic_ns()
    assert [p.state for p in reader.read(now, KernelView(()))] == ["released"]
    assert reader.read(now + RETAIN_RELEASED_NS + 10**9, KernelView(())) == []
    assert lo.obj.map("retired_pools").items() == []


def test_last_activity_is_dated_by_counter_changes(raw_tp_pagepool) -> None:
    lo = raw_tp_pagepool
    run(lo, "page_pool_state_hold", POOL_A, PAGE, 1)
    reader = PagePoolReader(lo.obj)

    def age(now: int) -> int | None:
        return next(p.last_event_age_ns for p in reader.read(now, KernelView(()))
                    if p.pool_addr == POOL_A)

    assert age(1_000) is None          # first sight: when it last moved is unknown
    assert age(2_000) is None          # still unknown: nothing moved since
    run(lo, "page_pool_state_release", POOL_A, PAGE, 1)
    assert age(3_000) == 0             # moved between the reads at 2000 and 3000
    assert age(7_000) == 4_000


def colliding_pool(pool: int) -> int:
    """Another kmalloc-aligned address whose home slot is the same as pool's."""
    other = pool + 0x800
    while home_slot(other) != home_slot(pool):
        other += 0x800
    return other


@pytest.mark.skipif(os.cpu_count() < 2, reason="needs two CPUs to split a pool's counters")
def test_counters_of_every_cpu_are_summed_and_cleared_at_retire(raw_tp_pagepool) -> None:
    lo = raw_tp_pagepool
    run(lo, "page_pool_state_hold", POOL_A, PAGE, 1, cpu=0)
    run(lo, "page_pool_state_hold", POOL_A, PAGE, 2, cpu=1)
    run(lo, "page_pool_state_hold", POOL_A, PAGE, 3, cpu=1)
    run(lo, "page_pool_state_release", POOL_A, PAGE, 1, cpu=0)
    copies = slot_copies(lo, home_slot(POOL_A))
    assert [c.holds[0] for c in copies[:2]] == [1, 2]
    pool = pools_by_addr(lo)[POOL_A]
    assert (pool.hold_pages_total, pool.release_pages_total, pool.inflight_pages) == (3, 1, 2)
    run(lo, "page_pool_state_release", POOL_A, PAGE, 2, cpu=1)
    run(lo, "page_pool_state_release", POOL_A, PAGE, 3, cpu=0)
    run(lo, "page_pool_release", POOL_A, 0, 3, 3, cpu=1)
    assert all(c.pool == 0 and sum(c.releases) == 0 for c in slot_copies(lo, home_slot(POOL_A)))
    released = pools_by_addr(lo)[POOL_A]
    assert (released.hold_pages_total, released.release_pages_total) == (3, 3)


def test_pools_sharing_a_home_slot_count_apart(raw_tp_pagepool) -> None:
    lo = raw_tp_pagepool
    other = colliding_pool(POOL_A)
    run(lo, "page_pool_state_hold", POOL_A, PAGE, 1)
    for hold in range(1, 6):
        run(lo, "page_pool_state_hold", other, PAGE, hold)
    home = home_slot(POOL_A)
    assert owned_slots(lo) == {home: POOL_A, (home + 1) % 4096: other}
    pools = pools_by_addr(lo)
    assert (pools[POOL_A].hold_pages_total, pools[other].hold_pages_total) == (1, 5)
    # The home owner goes away; the displaced pool keeps its slot and its counts.
    run(lo, "page_pool_state_release", POOL_A, PAGE, 1)
    run(lo, "page_pool_release", POOL_A, 0, 1, 1)
    run(lo, "page_pool_state_release", other, PAGE, 1)
    assert owned_slots(lo) == {(home + 1) % 4096: other}
    pool = pools_by_addr(lo)[other]
    assert (pool.hold_pages_total, pool.release_pages_total, pool.inflight_pages) == (5, 1, 4)
