"""`netmemtrace top` without a terminal or BPF: synthetic Snapshots through the pure view
functions and the batch loop, key handling, layout, and the no-terminal error."""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

from netmemtrace.commands import top as topcmd
from netmemtrace.kernel import probes
from netmemtrace.kernel.probes import ProbeStatus
from netmemtrace.snapshot import (
    CollectorError,
    DevmemSocket,
    Holder,
    MemcgSelfStats,
    MemcgSnapshot,
    PoolSnapshot,
    ProcessSnapshot,
    SelfStats,
    Snapshot,
    Unavailable,
    ZerocopyStats,
)
from netmemtrace.views import top


def top_command(*args: str) -> list[str]:
    """`netmemtrace top ARGS` through the real CLI (signals, global options, errors)."""
    return [sys.executable, "-m", "netmemtrace.cli", "top", *args]


SEC = 1_000_000_000
T0 = 1000 * SEC  # monotonic time of the first synthetic snapshot


# ---- batch text parsing (shared with test_top_live.py) -----------------------------------

@dataclasses.dataclass
class Frame:
    header: list[str]
    tables: dict[str, list[dict[str, str]]]  # "PAGE POOLS" -> rows as {column title: text}
    marked: dict[str, list[bool]]            # "PAGE POOLS" -> highlight marker per row
    notes: dict[str, str]
    details: list[str] = dataclasses.field(default_factory=list)  # lines under rows


def _cells(line: str) -> list[str]:
    # Columns are at least two spaces apart; no cell holds two spaces in a row.
    return re.split(r"\s{2,}", line[2:].strip())


TABLES = ("PAGE POOLS", "MEMORY CGROUPS", "ZEROCOPY PROCESSES", "DEVICES")


def parse_frames(text: str) -> list[Frame]:
    """Split `top --batch` output into frames and their tables."""
    frames: list[Frame] = []
    table: str | None = None
    titles: list[str] = []
    for line in text.splitlines():
        if line.startswith(top.FRAME_START):
            frames.append(Frame([line], {}, {}, {}))
            table = None
        elif not frames:
            continue
        elif not line:
            table = None
        elif line[2:].startswith(TABLES) and line[0] in " >":
            table = next(t for t in TABLES if line[2:].startswith(t))
            frames[-1].tables[table], frames[-1].marked[table], titles = [], [], []
        elif table is None:
            frames[-1].header.append(line)
        elif line.startswith("    holder "):
            frames[-1].details.append(line.strip())
        elif line.startswith("  (") and len(_cells(line)) == 1:
            frames[-1].notes[table] = line.strip()[1:-1]
        elif not titles:
            titles = [t.rstrip(top.SORT_MARK) for t in _cells(line)]
        else:
            cells = _cells(line)
            assert len(cells) == len(titles), (titles, line)
            frames[-1].tables[table].append(dict(zip(titles, cells, strict=True)))
            frames[-1].marked[table].append(line[0] == top.MARK)
    return frames


# ---- synthetic snapshots ------------------------------------------------------------------

def make_pool(**changes: object) -> PoolSnapshot:
    base = PoolSnapshot(
        pool_addr=0xFFFF888000001000, pool_id=7, ifindex=3, netdev="eth0", netns="host",
        napi_id=8193, provider="host", page_order=0, page_size_bytes=4096, numa_node=0,
        state="active", hold_pages_total=0, hold_net_iovs_total=0, release_pages_total=0,
        release_net_iovs_total=0, kernel_hold_cnt=None, kernel_release_cnt=None,
        inflight_pages=0, inflight_bytes=0, first_seen_age_ns=0, last_event_age_ns=None,
        destroy_age_ns=None, zombie_age_ns=None, release_calls=0,
        kernel_inflight_at_release=None, kernel_hold_at_release=None,
        kernel_release_at_release=None, kernel=Unavailable("synthetic"),
    )
    return dataclasses.replace(base, **changes)


def at(taken_ns: int, pool: PoolSnapshot, first_seen_ns: int) -> PoolSnapshot:
    """The pool as a snapshot taken at ``taken_ns`` reports it (ages are relative)."""
    return dataclasses.replace(pool, first_seen_age_ns=taken_ns - first_seen_ns)


PROBES = (
    ProbeStatus("pagepool", "page_pool_state_hold", "tp_btf", True, ""),
    ProbeStatus("pagepool", "page_pool_release", "tp_btf", True, ""),
    ProbeStatus("pagepool", "page_pool_destroy", None, False, "fentry: EPERM"),
)


MEMCG_STATS = MemcgSelfStats(**{f.name: 0 for f in dataclasses.fields(MemcgSelfStats)})


def make_snap(taken_ns: int, pools: tuple[PoolSnapshot, ...], **changes: object) -> Snapshot:
    base = Snapshot(
        taken_monotonic_ns=taken_ns, taken_unix_s=1.7e9 + taken_ns / SEC, host="testhost",
        kernel_release="6.18.0-test", probes=PROBES, pools=pools,
        self_stats=SelfStats(snapshot_build_ns=1_500_000),
        stats={"pagepool": {"pool_map_full": 2, "retired_map_full": 1}},
    )
    return dataclasses.replace(base, **changes)


def pool_rows(text: str) -> list[dict[str, str]]:
    (frame,) = parse_frames(text)
    return frame.tables["PAGE POOLS"]


# ---- rates --------------------------------------------------------------------------------

def test_rates_come_from_counter_deltas_over_snapshot_time() -> None:
    pool = make_pool(hold_pages_total=100, hold_net_iovs_total=10, release_pages_total=50)
    prev = make_snap(T0, (at(T0, pool, T0 - 5 * SEC),))
    later = dataclasses.replace(pool, hold_pages_total=500, hold_net_iovs_total=30,
                                release_pages_total=250, release_net_iovs_total=4)
    cur = make_snap(T0 + 2 * SEC, (at(T0 + 2 * SEC, later, T0 - 5 * SEC),))
    # (500 + 30 - 110) holds and (250 + 4 - 50) releases over 2 s.
    assert list(top.pool_rates(cur, prev).values()) == [(210.0, 102.0)]
    (row,) = pool_rows(top.batch_frame(cur, prev, top.ViewState()))
    assert (row["HOLD/s"], row["REL/s"]) == ("210", "102")
    frame = parse_frames(top.batch_frame(cur, prev, top.ViewState()))[0]
    assert "rates over 2.0s" in frame.header[0]


def test_first_frame_shows_no_rates() -> None:
    pool = make_pool(hold_pages_total=100, release_pages_total=50)
    (row,) = pool_rows(top.batch_frame(make_snap(T0, (pool,)), None, top.ViewState()))
    assert (row["HOLD/s"], row["REL/s"]) == (top.UNKNOWN, top.UNKNOWN)
    assert top.pool_rates(make_snap(T0, (pool,)), None) == {}


def test_reused_address_is_a_new_pool() -> None:
    # The old pool at this address was retired (its counters kept) and a new one was first
    # seen after the previous snapshot: each is compared with its own past.
    addr = 0xFFFF888000002000
    old = make_pool(pool_addr=addr, hold_pages_total=1000, release_pages_total=900)
    prev = make_snap(T0, (at(T0, old, T0 - 10 * SEC),))
    retired = dataclasses.replace(old, state="released", release_pages_total=1000)
    new = make_pool(pool_addr=addr, hold_pages_total=64, netdev="eth1")
    cur = make_snap(T0 + SEC, (at(T0 + SEC, retired, T0 - 10 * SEC),
                               at(T0 + SEC, new, T0 + SEC // 2)))
    rates = top.pool_rates(cur, prev)
    assert rates[(addr, T0 - 10 * SEC)] == (0.0, 100.0)
    assert rates[(addr, T0 + SEC // 2)] == (64.0, 0.0)


def test_no_rate_without_a_baseline() -> None:
    # Seen before the previous snapshot but missing from it (pool map full then): unknown.
    pool = make_pool(hold_pages_total=10)
    prev = make_snap(T0, ())
    cur = make_snap(T0 + SEC, (at(T0 + SEC, pool, T0 - SEC),))
    assert top.pool_rates(cur, prev) == {}
    # Counters that went backwards are not a rate either.
    prev = make_snap(T0, (at(T0, make_pool(hold_pages_total=50), T0 - SEC),))
    assert top.pool_rates(cur, prev) == {}
    # Nor is a zero or negative time difference.
    assert top.pool_rates(prev, prev) == {}


# ---- rows ---------------------------------------------------------------------------------

def test_pool_row_columns() -> None:
    pool = make_pool(inflight_pages=300, inflight_bytes=300 * 4096, napi_id=None,
                     hold_pages_total=5)
    (row,) = pool_rows(top.batch_frame(make_snap(T0, (pool,)), None, top.ViewState()))
    assert row == {
        "NETDEV": "eth0", "NETNS": "host", "POOL": "7", "NAPI": "-", "PROVIDER": "host",
        "MEM": "page", "INFLIGHT": "300", "BYTES": "1.2MiB", "HOLD/s": "-", "REL/s": "-",
        "RECYC/s": "n/a", "RECYC%": "n/a", "STATE": "active",
    }


def test_memory_kind_page_vs_net_iov() -> None:
    assert top.memory_kind(make_pool()) == "page"
    assert top.memory_kind(make_pool(provider="dmabuf")) == "net_iov"
    assert top.memory_kind(make_pool(hold_net_iovs_total=3)) == "net_iov"
    assert top.memory_kind(make_pool(hold_pages_total=1, release_net_iovs_total=1)) == \
        "page+net_iov"


def test_unavailable_inflight_is_not_zero() -> None:
    why = Unavailable("pool predates netmemtrace")
    pool = make_pool(inflight_pages=why, inflight_bytes=why)
    (row,) = pool_rows(top.batch_frame(make_snap(T0, (pool,)), None, top.ViewState()))
    assert (row["INFLIGHT"], row["BYTES"]) == ("n/a", "n/a")


def test_zombie_rows_are_marked_with_their_age() -> None:
    pools = (make_pool(netdev="eth0"),
             make_pool(pool_addr=2, netdev="veth1", state="zombie", zombie_age_ns=65 * SEC,
                       inflight_pages=12, inflight_bytes=12 * 4096),
             make_pool(pool_addr=3, netdev="veth2", state="released"))
    text = top.batch_frame(make_snap(T0, pools), None, top.ViewState())
    (frame,) = parse_frames(text)
    rows = frame.tables["PAGE POOLS"]
    marked = {r["NETDEV"]: m for r, m in zip(rows, frame.marked["PAGE POOLS"], strict=True)}
    assert marked == {"eth0": False, "veth1": True, "veth2": False}
    assert next(r for r in rows if r["NETDEV"] == "veth1")["STATE"] == "zombie 1m05s"
    assert [line for line in text.splitlines() if line.startswith(top.MARK)] == \
        [line for line in text.splitlines() if "veth1" in line]


def test_zombie_row_expands_to_its_holders() -> None:
    holders = (
        Holder(kind="socket", pages=10, self_healing=False, detail="unread receive queue",
               protocol="tcp", state="ESTABLISHED", netns="blue", local_addr="10.0.0.2:80",
               remote_addr="10.0.0.1:4242", pid=321, comm="server"),
        Holder(kind="cpu-deferred-free", pages=2, self_healing=True, detail="cpu 1 list",
               cpu=1),
    )
    pools = (make_pool(pool_addr=2, netdev="veth1", state="zombie", zombie_age_ns=SEC,
                       inflight_pages=12, inflight_bytes=12 * 4096, holders=holders),)
    text = top.batch_frame(make_snap(T0, pools), None, top.ViewState())
    lines = text.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith(top.MARK))
    assert lines[row + 1].strip() == ("holder socket: 10 pages  tcp ESTABLISHED "
                                      "10.0.0.2:80 <- 10.0.0.1:4242 pid 321 (server) netns blue")
    assert lines[row + 2].strip() == "holder cpu-deferred-free: 2 pages  cpu 1  self-healing"
    (frame,) = parse_frames(text)
    assert len(frame.tables["PAGE POOLS"]) == 1 and len(frame.details) == 2


def test_devmem_tokens_summed_per_memcg() -> None:
    sock = DevmemSocket(
        sock_addr=1, pid=5, comm="app", memcg_id=42, memcg_path="/a", state="open",
        recvmsg_calls=3, recvmsg_errors=0, tokens_received=9, dontneed_calls=1,
        dontneed_errors=0, tokens_returned=2, tokens_freed_on_destroy=0, tokens_outstanding=7,
        netmem_held=7, first_seen_age_ns=0, destroy_age_ns=None)
    socks = (sock, dataclasses.replace(sock, sock_addr=2, tokens_outstanding=4))
    snap = dataclasses.replace(make_snap(T0, ()), devmem_sockets=socks)
    assert top.devmem_tokens_by_memcg(snap) == {42: 11}
    gone = dataclasses.replace(sock, sock_addr=3, tokens_outstanding=Unavailable("x"))
    assert isinstance(top.devmem_tokens_by_memcg(
        dataclasses.replace(snap, devmem_sockets=(*socks, gone)))[42], Unavailable)


# ---- sorting and filtering ----------------------------------------------------------------

def _three_pools() -> Snapshot:
    return make_snap(T0, (
        make_pool(pool_addr=1, netdev="eth1", inflight_pages=10, inflight_bytes=40960),
        make_pool(pool_addr=2, netdev="eth0", inflight_pages=300, inflight_bytes=1228800),
        make_pool(pool_addr=3, netdev=None, inflight_pages=Unavailable("x"),
                  inflight_bytes=Unavailable("x")),
    ))


def _netdevs(snap: Snapshot, view: top.ViewState) -> list[str]:
    return [r["NETDEV"] for r in pool_rows(top.batch_frame(snap, None, view))]


def test_default_sort_is_inflight_largest_first_unknown_last() -> None:
    snap, view = _three_pools(), top.ViewState()
    assert _netdevs(snap, view) == ["eth0", "eth1", "-"]
    top.handle_key(view, "S")  # reverse: still unknown last
    assert _netdevs(snap, view) == ["eth1", "eth0", "-"]


def test_s_cycles_the_sort_column() -> None:
    snap, view = _three_pools(), top.ViewState()
    titles = [c.title for c in top.POOL_COLUMNS]
    seen = []
    for _ in titles:
        top.handle_key(view, "s")
        seen.append(top.sort_column(top.pool_table(snap, None), view.tables[0]))
    assert sorted(seen) == list(range(len(titles)))  # every column once, then around again
    while titles[top.sort_column(top.pool_table(snap, None), view.tables[0])] != "NETDEV":
        top.handle_key(view, "s")
    top.handle_key(view, "S")
    assert _netdevs(snap, view) == ["eth0", "eth1", "-"]
    top.handle_key(view, "S")
    assert _netdevs(snap, view) == ["eth1", "eth0", "-"]
    text = top.batch_frame(snap, None, view)
    assert "sort: NETDEV desc" in text and "NETDEV*" in text


def test_filter_typed_in_footer() -> None:
    snap, view = _three_pools(), top.ViewState()
    for key in "/eth1x":
        assert not top.handle_key(view, key)
    assert top.footer(view).startswith("filter: eth1x_")
    assert _netdevs(snap, view) == ["eth0", "eth1", "-"]  # not applied while typing
    top.handle_key(view, top.BACKSPACE_KEYS[0])
    top.handle_key(view, "\n")
    assert view.editing is None and top.footer(view).startswith("q quit")
    assert _netdevs(snap, view) == ["eth1"]
    assert "PAGE POOLS (1 of 3)  filter: eth1" in top.batch_frame(snap, None, view)
    top.handle_key(view, "/")
    assert view.editing == ""  # a new filter, not appended to the old one
    top.handle_key(view, "ETH0")  # case-insensitive
    top.handle_key(view, "\r")
    assert _netdevs(snap, view) == ["eth0"]
    top.handle_key(view, "/")
    top.handle_key(view, top.ESC)  # Esc while typing clears
    assert _netdevs(snap, view) == ["eth0", "eth1", "-"]
    top.handle_key(view, "/")
    top.handle_key(view, "nothing")
    top.handle_key(view, "\n")
    (frame,) = parse_frames(top.batch_frame(snap, None, view))
    assert frame.tables["PAGE POOLS"] == []
    assert frame.notes["PAGE POOLS"] == "no row matches the filter"
    top.handle_key(view, top.ESC)  # Esc outside typing clears too
    assert len(_netdevs(snap, view)) == 3


def test_tab_moves_focus_and_keys_act_on_the_focused_table() -> None:
    snap, view = _three_pools(), top.ViewState()
    assert top.batch_frame(snap, None, view).count("\n> PAGE POOLS") == 1
    top.handle_key(view, "\t")
    text = top.batch_frame(snap, None, view)
    assert "\n> MEMORY CGROUPS" in text and "\n  PAGE POOLS" in text
    top.handle_key(view, "/")
    top.handle_key(view, "eth1")
    top.handle_key(view, "\n")
    assert view.tables[1].filter == "eth1" and view.tables[0].filter == ""
    top.handle_key(view, "\t")
    assert view.focus == 2 and "\n> ZEROCOPY PROCESSES" in top.batch_frame(snap, None, view)
    top.handle_key(view, "\t")
    assert view.focus == 3 and "\n> DEVICES" in top.batch_frame(snap, None, view)
    top.handle_key(view, "\t")
    assert view.focus == 0


def test_pause_and_quit_keys() -> None:
    view = top.ViewState()
    assert not top.handle_key(view, "p") and view.paused
    assert "[paused]" in top.footer(view)
    assert "PAUSED" in top.header_lines(_three_pools(), None, view.paused)[0]
    assert not top.handle_key(view, "p") and not view.paused
    assert not top.handle_key(view, "x")
    assert top.handle_key(view, "q")
    view.editing = ""
    assert not top.handle_key(view, "q")  # typed into the filter, not a quit
    assert view.editing == "q"


# ---- header, memcg table, layout ----------------------------------------------------------

def test_header_names_missing_probes_errors_and_lost_events() -> None:
    snap = make_snap(T0, (), errors=(CollectorError("page_pool", "map read failed"),))
    (frame,) = parse_frames(top.batch_frame(snap, None, top.ViewState()))
    first, probes_line, lost, errors = frame.header
    assert "host testhost" in first and "kernel 6.18.0-test" in first
    assert probes_line == "probes 2/3 attached; failed: page_pool_destroy (why: netmemtrace probes)"
    assert lost.startswith(
        "lost events 3 (pagepool.pool_map_full 2, pagepool.retired_map_full 1)")
    assert errors == "errors: page_pool: map read failed"
    assert frame.notes["PAGE POOLS"] == "no page pool event seen since attach"


def test_memcg_table_when_the_collector_did_not_report() -> None:
    (frame,) = parse_frames(top.batch_frame(_three_pools(), None, top.ViewState()))
    assert frame.tables["MEMORY CGROUPS"] == []
    assert frame.notes["MEMORY CGROUPS"] == top.NO_MEMCG


def make_memcg(path: str | None, **changes: object) -> MemcgSnapshot:
    zc = ZerocopyStats(**{f.name: 0 for f in dataclasses.fields(ZerocopyStats)})
    base = MemcgSnapshot(
        cgroup_id=42, hierarchy="v1", path=path, runtime=None, container_id=None,
        pod_uid=None, qos_class=None, systemd_unit=None, sock_event_source="tracepoint",
        sock_charged_pages_total=0, sock_uncharged_pages_total=0,
        sock_net_charged_since_attach_bytes=0, sock_charged_now_bytes=0,
        sock_charged_now_source="memory.kmem.tcp.usage_in_bytes", zerocopy=zc,
        zerocopy_unaccounted_bytes=0, zerocopy_unaccounted_hwm_bytes=0,
        zerocopy_oldest_mapped_age_ns=None, would_be_charged_bytes=0, processes=(),
    )
    return dataclasses.replace(base, **changes)


def test_memcg_table() -> None:
    zc = dataclasses.replace(make_memcg("/").zerocopy, rx_mapped_bytes=3 << 20,
                             rx_copied_bytes=4096)
    memcgs = (
        make_memcg("/kubepods/burstable/podab/cd", pod_uid="0123456789abcdef",
                   container_id="fedcba9876543210ff", sock_charged_now_bytes=1 << 20,
                   sock_charged_pages_total=300, zerocopy=zc,
                   zerocopy_unaccounted_bytes=2 << 20, would_be_charged_bytes=3 << 20),
        make_memcg(None, cgroup_id=77, systemd_unit="demo.service",
                   sock_charged_now_bytes=Unavailable("memcg deleted"),
                   sock_charged_pages_total=Unavailable("v1: no tracepoint"),
                   would_be_charged_bytes=Unavailable("memcg deleted")),
        make_memcg("/system.slice/big.service", sock_charged_now_bytes=5 << 20,
                   would_be_charged_bytes=5 << 20),
    )
    snap = dataclasses.replace(_three_pools(), memcgs=memcgs, memcg_self_stats=MEMCG_STATS)
    (frame,) = parse_frames(top.batch_frame(snap, None, top.ViewState()))
    rows = frame.tables["MEMORY CGROUPS"]
    # Largest socket memory first; unavailable last, shown as n/a rather than 0.
    assert [r["MEMCG"] for r in rows] == ["/system.slice/big.service",
                                          "/kubepods/burstable/podab/cd", "(deleted) id 77"]
    assert rows[1] == {
        "MEMCG": "/kubepods/burstable/podab/cd", "CONTAINER": "0123456789ab/fedcba987654",
        "SOCK_NOW": "1.0MiB", "CHARGED_PG": "300", "ZC_MAPPED": "3.0MiB",
        "ZC_COPIED": "4.0KiB", "UNACCT_ZC": "2.0MiB", "WOULD_BE": "3.0MiB",
        "DEVMEM_TOK": "n/a",  # no netmem object in this snapshot: unknown, not 0
    }
    assert (rows[2]["CONTAINER"], rows[2]["SOCK_NOW"], rows[2]["CHARGED_PG"]) == \
        ("demo.service", "n/a", "n/a")
    assert rows[0]["CONTAINER"] == "-"
    empty = dataclasses.replace(snap, memcgs=())
    (frame,) = parse_frames(top.batch_frame(empty, None, top.ViewState()))
    assert frame.notes["MEMORY CGROUPS"] == \
        "no memory cgroup with socket memory or zerocopy seen yet"


def test_header_tells_failed_probes_from_off_by_choice_and_replaced() -> None:
    stack_off = "off by default (the per-packet probe, ~125 ns per skb), turn on with " \
                "--netmem-stack"
    raw_off = "off: the per-syscall tracepoints serve instead"
    status = (
        *PROBES,
        ProbeStatus("netmem", "page_pool_destroy", None, False, "fentry: EPERM"),
        ProbeStatus("netmem", "netif_receive_skb", None, False, stack_off, probes.OFF_CHOICE),
        ProbeStatus("zerocopy", "sys_enter", None, False, raw_off, probes.OFF_REPLACED),
        ProbeStatus("zerocopy", "sys_exit", None, False, raw_off, probes.OFF_REPLACED),
        ProbeStatus("zerocopy", "sys_enter_getsockopt", "tracepoint", True, ""),
    )
    line = top.header_lines(make_snap(T0, (), probes=status), None, False)[1]
    # Replaced hooks are not expected to attach: 3 of the 6 others do.
    assert line == ("probes 3/6 attached; failed: page_pool_destroy (why: netmemtrace probes)"
                    "; off by choice: netif_receive_skb (turn on with --netmem-stack)"
                    "; replaced by another family: sys_enter, sys_exit")
    quiet = status[:2] + status[5:]
    assert top.header_lines(make_snap(T0, (), probes=quiet), None, False)[1] == \
        "probes 3/3 attached; replaced by another family: sys_enter, sys_exit"


def test_exited_processes_stay_marked_in_the_process_table() -> None:
    zc = make_memcg("/").zerocopy
    running = ProcessSnapshot(
        pid=10, comm="reader", memcg_id=42, zerocopy=dataclasses.replace(
            zc, rx_mapped_bytes=8 << 20), zerocopy_unaccounted_bytes=1 << 20,
        zerocopy_unaccounted_hwm_bytes=1 << 20, zerocopy_oldest_mapped_age_ns=SEC,
        smaps_socket_rss_bytes=1 << 20, ledger_vs_smaps_bytes=0)
    gone = dataclasses.replace(
        running, pid=11, comm="sender", zerocopy=dataclasses.replace(zc, tx_zc_bytes=3 << 20),
        zerocopy_unaccounted_bytes=0, smaps_socket_rss_bytes=Unavailable("exited"),
        ledger_vs_smaps_bytes=Unavailable("exited"), exited=True, exit_age_ns=12 * SEC)
    snap = dataclasses.replace(
        make_snap(T0, ()), memcg_self_stats=MEMCG_STATS,
        memcgs=(make_memcg("/app", processes=(gone, running)),))
    (frame,) = parse_frames(top.batch_frame(snap, None, top.ViewState()))
    rows = frame.tables["ZEROCOPY PROCESSES"]
    assert rows == [
        {"PID": "10", "COMM": "reader", "MEMCG": "/app", "ZC_MAPPED": "8.0MiB",
         "ZC_COPIED": "0B", "UNACCT_ZC": "1.0MiB", "TX_ZC": "0B", "STATE": "running"},
        {"PID": "11", "COMM": "sender", "MEMCG": "/app", "ZC_MAPPED": "0B",
         "ZC_COPIED": "0B", "UNACCT_ZC": "0B", "TX_ZC": "3.0MiB", "STATE": "exited 12s"},
    ]
    empty = dataclasses.replace(snap, memcgs=())
    (frame,) = parse_frames(top.batch_frame(empty, None, top.ViewState()))
    assert frame.notes["ZEROCOPY PROCESSES"] == "no process made a zerocopy call yet"


def test_lost_events_are_every_loss_counter_of_every_object() -> None:
    # Every *_full / *_lost / *_truncated counter of any object, and no other counter: a
    # counter the BPF side adds shows with no change to top.
    stats = {"pagepool": {"pool_map_full": 2, "retired_map_full": 1},
             "zerocopy": {"ringbuf_full": 5, "pending_full": 0, "proc_map_full": 0,
                          "mmsg_truncated": 4, "malformed_events_lost": 1},
             "netmem": {"netmem_map_full": 1, "pool_map_full": 1, "socket_map_full": 1,
                        "call_map_full": 1, "recvmsg_calls": 99},
             "memcg": {"memcg_map_full": 0, "memcg_unresolved": 7},
             "holders": {"refs_lost": 3, "refs": 50}, "new": {"thing_full": 6}}
    snap = make_snap(T0, (), stats=stats)
    line = top.header_lines(snap, None, False)[2]
    assert line.startswith(
        "lost events 26 (pagepool.pool_map_full 2, pagepool.retired_map_full 1, "
        "zerocopy.ringbuf_full 5, zerocopy.mmsg_truncated 4, zerocopy.malformed_events_lost 1, "
        "netmem.netmem_map_full 1, netmem.pool_map_full 1, netmem.socket_map_full 1, "
        "netmem.call_map_full 1, holders.refs_lost 3, new.thing_full 6)  snapshot"), line
    quiet = make_snap(T0, (), stats={"pagepool": {"pool_map_full": 0}})
    assert top.header_lines(quiet, None, False)[2].startswith("lost events 0  snapshot")


def test_fit_rows_shares_the_screen() -> None:
    assert top.fit_rows([50, 3], 20) == [17, 3]
    assert top.fit_rows([50, 50], 20) == [10, 10]
    assert top.fit_rows([2, 3], 20) == [2, 3]
    assert top.fit_rows([5, 5], -4) == [0, 0]


@pytest.mark.parametrize("height", [1, 3, 12, 40])
def test_screen_lines_fit_the_terminal(height: int) -> None:
    pools = tuple(make_pool(pool_addr=i, netdev=f"eth{i}", inflight_pages=i, inflight_bytes=i)
                  for i in range(30))
    view = top.ViewState()
    lines = top.screen_lines(make_snap(T0, pools), None, view, height)
    assert len(lines) == height
    assert lines[-1] == (top.footer(view), top.HEADER)
    shown = [text for text, _ in lines if re.match(r"  eth\d+ ", text)]
    if height == 40:
        # 40 - 4 header - 1 footer - 4 x (blank, title, column titles) - 3 notes
        # (memcgs, processes, devices).
        assert len(shown) == 20
        assert any("(10 more below)" in text for text, _ in lines)
        assert shown[0].startswith("  eth29 ")  # largest inflight first


def test_number_formats() -> None:
    assert [top.human_count(x) for x in (0, 4.5, 12, 999, 1234, 2.5e6, 3e9)] == \
        ["0", "4.5", "12", "999", "1.2k", "2.5M", "3.0G"]
    assert [top.human_bytes(n) for n in (0, 1023, 4096, 3 << 20, 5 << 30)] == \
        ["0B", "1023B", "4.0KiB", "3.0MiB", "5.0GiB"]
    assert [top.human_duration(n) for n in (5_000_000, 3 * SEC, 65 * SEC, 7260 * SEC)] == \
        ["5ms", "3s", "1m05s", "2h01m"]


# ---- loops and command ------------------------------------------------------------------

def test_batch_prints_count_frames_with_rates_from_the_second() -> None:
    pools = [make_pool(hold_pages_total=n, release_pages_total=n) for n in (0, 50, 150)]
    snaps = iter(make_snap(T0 + i * SEC // 2, (at(T0 + i * SEC // 2, p, T0),))
                 for i, p in enumerate(pools))
    out = io.StringIO()
    top.run_batch(lambda: next(snaps), next(snaps), 0.01, 3, out)
    frames = parse_frames(out.getvalue())
    assert [f.tables["PAGE POOLS"][0]["HOLD/s"] for f in frames] == ["-", "100", "200"]
    assert next(snaps, None) is None  # exactly count - 1 reads after the first snapshot


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--btf-path")
    topcmd.add_arguments(parser)
    return parser.parse_args(argv)


def test_arguments() -> None:
    args = _args()
    assert (args.interval, args.batch, args.count) == (1.0, False, None)
    args = _args("--batch", "--count", "2", "--interval", "0.25")
    assert (args.interval, args.batch, args.count) == (0.25, True, 2)
    for bad in (["--interval", "0"], ["--count", "-1"], ["--count", "x"]):
        with pytest.raises(SystemExit):
            _args(*bad)


def test_no_terminal_is_a_setup_error_before_attaching(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    def no_session(_args: argparse.Namespace) -> None:
        raise AssertionError("attached although there is no terminal")

    monkeypatch.setattr(topcmd, "open_session", no_session)
    monkeypatch.setattr(sys, "stdin", io.StringIO())
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    with pytest.raises(probes.SetupError, match="needs a terminal.*--batch"):
        topcmd.run(_args())


def test_without_a_terminal_the_program_says_so_in_one_line() -> None:
    run = subprocess.run(top_command(), cwd=REPO, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=30)
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr == ("netmemtrace: top needs a terminal: run it in one, or use --batch "
                          "[--count N] for plain-text frames\n")


def test_batch_stops_quietly_when_the_reader_goes_away() -> None:
    # `top --batch | head -1`: the frame after the reader left ends the loop, no traceback.
    read_end, write_end = os.pipe()
    os.close(read_end)
    snap = make_snap(T0, ())
    reads = []
    with os.fdopen(write_end, "w") as out:
        top.run_batch(lambda: reads.append(1) or snap, snap, 0.01, 5, out)
        print("more", file=out, flush=True)  # now /dev/null: no error either
    assert reads == []


def test_probes_line_tells_hooks_the_kernel_lacks_from_failures() -> None:
    """A hook whose function or tracepoint this kernel does not have (charge_skmem on 7.x)
    is neither failed nor counted among those that should attach."""
    status = [
        ProbeStatus("memcg", "sk_charge", "fentry", True, ""),
        ProbeStatus("memcg", "charge_skmem", None, False,
                    "fentry: function charge_skmem not in this kernel (not in /proc/kallsyms); "
                    "kprobe: function charge_skmem not in this kernel (not in /proc/kallsyms)"),
        ProbeStatus("pagepool", "page_pool_destroy", None, False, "fentry: EPERM"),
    ]
    assert top.probes_line(status) == (
        "probes 1/2 attached; failed: page_pool_destroy (why: netmemtrace probes); "
        "not in this kernel: charge_skmem")
