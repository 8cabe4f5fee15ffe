"""The mapping ledger on synthetic syscall sequences, against hand-computed outcomes."""

from __future__ import annotations

from netmemtrace.collect.ledger import PAGE, Ledger
from netmemtrace.collect.zerocopy import TxTracker

BASE = 0x7F00_0000_0000
MEMCG_A, MEMCG_B = 101, 202


def test_hold_dontneed_half_munmap() -> None:
    led = Ledger()
    for i in range(8):  # eight calls mapping 4 pages each, back to back
        led.rx_map(1, MEMCG_A, BASE + i * 4 * PAGE, 4 * PAGE, ts_ns=100 + i)
    assert led.held_bytes(1) == 32 * PAGE
    assert led.oldest_mapped_ns(1) == 100
    led.unmap(1, BASE + 2 * PAGE, 16 * PAGE)  # madvise across range boundaries
    assert led.held_bytes(1) == 16 * PAGE
    assert led.memcg_bytes[MEMCG_A] == 16 * PAGE
    assert led.ranges(1)[0] == (BASE, BASE + 2 * PAGE)
    led.unmap(1, BASE, 64 * PAGE)
    assert led.held_bytes(1) == 0
    assert led.memcg_bytes[MEMCG_A] == 0
    assert led.memcg_hwm[MEMCG_A] == led.proc_hwm[1] == 32 * PAGE
    assert led.nranges == 0


def test_remap_at_same_address_replaces_not_adds() -> None:
    led = Ledger()
    for ts in range(10):  # the kernel zaps the target range before mapping
        led.rx_map(1, MEMCG_A, BASE, 16 * PAGE, ts)
    assert led.held_bytes(1) == 16 * PAGE
    assert led.oldest_mapped_ns(1) == 9
    led.rx_map(1, MEMCG_A, BASE + 8 * PAGE, 4 * PAGE, 10)
    assert led.held_bytes(1) == 16 * PAGE
    assert led.nranges == 3


def test_map_then_discard_stays_near_zero() -> None:
    led = Ledger()
    mapped = 0
    for ts in range(1000):
        led.rx_map(1, MEMCG_A, BASE, 8 * PAGE, ts)
        mapped += 8 * PAGE
        led.unmap(1, BASE, 8 * PAGE)
    assert led.held_bytes(1) == 0 and mapped == 8000 * PAGE
    assert led.memcg_hwm[MEMCG_A] == 8 * PAGE


def test_unaligned_lengths_round_to_pages() -> None:
    led = Ledger()
    led.rx_map(1, MEMCG_A, BASE, 3 * PAGE, 0)
    led.unmap(1, BASE + PAGE, 1)  # madvise/munmap round the length up to a page
    assert led.held_bytes(1) == 2 * PAGE


def test_mremap_moves_and_shrinks() -> None:
    led = Ledger()
    led.rx_map(1, MEMCG_A, BASE, 8 * PAGE, 5)
    new = BASE + 0x1000_0000
    led.remap(1, BASE, 8 * PAGE, new, 6 * PAGE)
    assert led.ranges(1) == [(new, new + 6 * PAGE)]
    assert led.oldest_mapped_ns(1) == 5
    assert led.memcg_bytes[MEMCG_A] == 6 * PAGE


def test_mmap_over_a_range_drops_it() -> None:
    led = Ledger()
    led.rx_map(1, MEMCG_A, BASE, 8 * PAGE, 0)
    led.unmap(1, BASE + 4 * PAGE, 8 * PAGE)  # what a MAP_FIXED mmap event does
    assert led.held_bytes(1) == 4 * PAGE


def test_exit_fork_and_memcgs() -> None:
    led = Ledger()
    led.rx_map(1, MEMCG_A, BASE, 4 * PAGE, 0)
    led.rx_map(2, MEMCG_B, BASE, 2 * PAGE, 0)
    led.fork(1, 3)  # the child shares the mapping
    assert led.held_bytes(3) == 4 * PAGE
    assert led.memcg_bytes == {MEMCG_A: 8 * PAGE, MEMCG_B: 2 * PAGE}
    led.exit(1)
    led.exit(3)
    assert led.pids() == [2]
    assert led.memcg_bytes[MEMCG_A] == 0
    assert led.memcg_hwm[MEMCG_A] == 8 * PAGE
    led.exit(99)  # unknown process: nothing happens


def test_process_moving_memcg_carries_its_bytes() -> None:
    led = Ledger()
    led.rx_map(1, MEMCG_A, BASE, 4 * PAGE, 0)
    led.rx_map(1, MEMCG_B, BASE + 4 * PAGE, 4 * PAGE, 1)
    assert led.memcg_bytes == {MEMCG_A: 0, MEMCG_B: 8 * PAGE}


def test_overflow_is_counted_never_negative() -> None:
    led = Ledger(max_ranges=4)
    for i in range(10):
        led.rx_map(1, MEMCG_A, BASE + i * 2 * PAGE, PAGE, i)
    assert led.nranges == 4
    assert (led.overflow_ranges, led.overflow_bytes) == (6, 6 * PAGE)
    led.unmap(1, BASE, 100 * PAGE)
    assert led.held_bytes(1) == 0 and led.memcg_bytes[MEMCG_A] == 0


def test_tx_tracker_inflight_and_wrap() -> None:
    tx = TxTracker()
    sk = 0xFFFF_8880_0000_1000
    for i in range(5):
        tx.send(sk, 7, (2**32 - 2 + i) % 2**32, (2**32 - 1 + i) % 2**32, 1000)
    assert tx.inflight_bytes() == {7: 5000}
    tx.done(sk, 2**32 - 2, 0)  # ids 4294967294, 4294967295, 0 across the wrap
    assert tx.inflight_bytes() == {7: 2000}
    tx.drop_process(7)
    assert tx.inflight_bytes() == {}
