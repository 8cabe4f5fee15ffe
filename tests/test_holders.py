"""Holders attribution, calibration and the explain-zombie report, on synthetic inputs (no
root needed), plus the per-CPU offset parser checked against bpftool's reading of the
kernel's BTF."""

from __future__ import annotations

import dataclasses
import re
import socket
import struct
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from netmemtrace.collect import holders
from netmemtrace.collect.holders import (
    PoolRetryState,
    ScanReport,
    SocketOwner,
    attribute,
    format_addr,
    holder_where,
    percpu_offsets,
    slab_page_base,
)
from netmemtrace.kernel import abi
from netmemtrace.snapshot import Holder, PoolSnapshot, Snapshot, Unavailable
from netmemtrace.views import explain

POOL = 0xFFFF888100000000
# Where a reference was found (enum holder_where, from the holders object's BTF).
WHERE = holder_where()
RECEIVE, OOO, ERROR = WHERE["RECEIVE_QUEUE"], WHERE["OOO_QUEUE"], WHERE["ERROR_QUEUE"]
DEFER, RING = WHERE["DEFER_LIST"], WHERE["POOL_RING"]
OTHER_POOL = 0xFFFF888200000000
SK = 0xFFFF888300000000


def pool(**changes: object) -> PoolSnapshot:
    base = PoolSnapshot(
        pool_addr=POOL, pool_id=7, ifindex=3, netdev="veth1", netns="ns1", napi_id=None,
        provider="host", page_order=0, page_size_bytes=4096, numa_node=0, state="zombie",
        hold_pages_total=100, hold_net_iovs_total=0, release_pages_total=90,
        release_net_iovs_total=0, kernel_hold_cnt=100, kernel_release_cnt=90,
        inflight_pages=10, inflight_bytes=40960, first_seen_age_ns=10**10,
        last_event_age_ns=10**9, destroy_age_ns=None, zombie_age_ns=5 * 10**9,
        release_calls=5, kernel_inflight_at_release=10, kernel_hold_at_release=100,
        kernel_release_at_release=90, kernel=Unavailable("test"))
    return dataclasses.replace(base, **changes)


def report(**changes: object) -> ScanReport:
    base = ScanReport(
        zombie_pools=1, netns_visited=3, netns_failed=(), sockets=5, skbs=20, netmem_refs=80,
        zombie_refs=12, zombie_refs_lost=0, partial_sockets=0, cpus_readable=2, cpus=2,
        defer_lists="read on 2 CPU(s)", skb_heads="calibrated", heads_unresolved=0,
        frag_lists_cut=0, max_skbs=4096, duration_ns=10**6,
        pools={POOL: PoolRetryState(6, 7 * 10**9, 53 * 10**9, 0)})
    return dataclasses.replace(base, **changes)


def sock_rec(partial: int = 0) -> SimpleNamespace:
    addr = struct.unpack("<I", socket.inet_aton("10.0.0.2"))[0]
    peer = struct.unpack("<I", socket.inet_aton("10.0.0.1"))[0]
    return SimpleNamespace(sk=SK, protocol=socket.IPPROTO_TCP, family=socket.AF_INET,
                           state=1, saddr=(addr, 0, 0, 0), daddr=(peer, 0, 0, 0), sport=5001,
                           dport=40000, ino=4242, uid=0, skbs=3, partial=partial)


OWNER = SocketOwner("ns1", (321, 654), "receiver", "/app", "process")


def cpu_rec(cpu: int, rx: int) -> SimpleNamespace:
    return SimpleNamespace(cpu=cpu, rx_processed=rx, skbs=2, partial=0, readable=1)


def test_shared_page_counted_once_for_the_socket_and_pages_add_up() -> None:
    refs = [
        (SK, POOL, 0x1000, RECEIVE), (SK, POOL, 0x1000, RECEIVE),  # two frags, one page
        (SK, POOL, 0x2000, OOO), (SK, POOL, 0x3000, ERROR),
        (1, POOL, 0x2000, DEFER),            # shared with the socket: the socket's
        (1, POOL, 0x4000, DEFER), (1, POOL, 0x5000, DEFER),
        (POOL, POOL, 0x6000, RING),
        (SK, OTHER_POOL, 0x7000, RECEIVE),   # another zombie's page
    ]
    got = attribute(pool(), refs, {SK: sock_rec()}, {1: cpu_rec(1, 110)}, {SK: OWNER},
                    report(), {1: 100})
    kinds = {h.kind: h for h in got}
    assert kinds["socket"].pages == 3
    assert kinds["socket"].queue_pages == {"receive": 1, "out_of_order": 1, "error": 1}
    assert kinds["socket"].pid == 321 and kinds["socket"].pids == (321, 654)
    assert kinds["socket"].local_addr == "10.0.0.2:5001"
    assert kinds["socket"].remote_addr == "10.0.0.1:40000"
    assert kinds["socket"].state == "ESTABLISHED" and not kinds["socket"].self_healing
    assert kinds["cpu-deferred-free"].pages == 2 and kinds["cpu-deferred-free"].cpu == 1
    assert kinds["cpu-deferred-free"].rx_packets_since_zombie == 10
    assert kinds["cpu-deferred-free"].self_healing
    assert kinds["pool-ring"].pages == 1 and kinds["pool-ring"].self_healing
    assert kinds["unattributed"].pages == 10 - 6
    assert kinds["unattributed"].held_for_at_least_ns == 7 * 10**9  # the kernel's own age
    assert sum(h.pages for h in got) == 10
    assert got[-1].kind == "unattributed"


def test_remainder_of_net_iov_pools_is_the_application_and_unknown_inflight_has_none() -> None:
    refs = [(SK, POOL, 0x1001, RECEIVE)]
    for provider, kind in (("dmabuf", "devmem-tokens"), ("io_uring", "io_uring-zcrx")):
        got = attribute(pool(provider=provider), refs, {SK: sock_rec()}, {}, {SK: OWNER},
                        report(), {})
        assert [h.kind for h in got] == ["socket", kind]
        assert got[1].pages == 9
    got = attribute(pool(inflight_pages=Unavailable("x")), refs, {SK: sock_rec()}, {},
                    {SK: OWNER}, report(), {})
    assert [h.kind for h in got] == ["socket"]


def test_unattributed_names_what_could_not_be_checked() -> None:
    got = attribute(pool(), [(SK, POOL, 0x1000, RECEIVE)], {SK: sock_rec(partial=1)}, {},
                    {SK: OWNER}, report(partial_sockets=1, zombie_refs_lost=2), {})
    assert got[0].partial_scan and "walk bound" in got[0].detail
    assert "1 socket(s) only partially scanned" in got[-1].detail
    assert "2 page reference(s) lost" in got[-1].detail


def test_slab_calibration_needs_agreement() -> None:
    base = 0xFFFFE9F000000000
    assert slab_page_base([base] * 20) == base
    assert slab_page_base([base] * 20 + [0x1234000]) == base   # a slab reused meanwhile
    assert slab_page_base([base] * 3) is None                  # too few to trust
    assert slab_page_base([base] * 10 + [base + 64] * 10) is None
    assert slab_page_base([]) is None


def test_format_addr() -> None:
    v6 = struct.unpack("<4I", socket.inet_pton(socket.AF_INET6, "fd00::1"))
    assert format_addr(socket.AF_INET6, v6, 80) == "[fd00::1]:80"
    v4 = struct.unpack("<I", socket.inet_aton("192.0.2.7"))[0]
    assert format_addr(socket.AF_INET, (v4, 0, 0, 0), 53) == "192.0.2.7:53"


def _btf_blob(vars_: dict[str, int], section: str) -> bytes:
    """A minimal BTF: an int, one VAR per name, a DATASEC holding them at the offsets."""
    strings = b"\0int\0" + b"".join(n.encode() + b"\0" for n in vars_) + section.encode() + b"\0"
    types = struct.pack("<III", 1, 1 << 24, 4) + struct.pack("<I", 32)  # [1] INT int
    name_off = 5
    for name in vars_:
        types += struct.pack("<III", name_off, 14 << 24, 1) + struct.pack("<I", 1)
        name_off += len(name) + 1
    types += struct.pack("<III", name_off, (15 << 24) | len(vars_), 0)
    for i, off in enumerate(vars_.values()):
        types += struct.pack("<III", 2 + i, off, 4)
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + strings


def test_percpu_offsets_synthetic(tmp_path: Path) -> None:
    path = tmp_path / "btf"
    path.write_bytes(_btf_blob({"runqueues": 0x100, "softnet_data": 0x2c0}, ".data..percpu"))
    assert percpu_offsets(path) == {"runqueues": 0x100, "softnet_data": 0x2c0}
    path.write_bytes(_btf_blob({"runqueues": 0x100}, ".data"))
    assert percpu_offsets(path) == {}
    path.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError):
        percpu_offsets(path)


def test_percpu_offsets_match_bpftool() -> None:
    """The kernel's own BTF, read by bpftool: every per-CPU variable at the same offset."""
    text = subprocess.run(["bpftool", "btf", "dump", "file", str(holders.VMLINUX_BTF)],
                          check=True, capture_output=True, text=True).stdout
    section = text[text.index("DATASEC '.data..percpu'"):]
    expected = {m.group(2): int(m.group(1)) for m in re.finditer(
        r"^\ttype_id=\d+ offset=(\d+) size=\d+ \(VAR '([^']+)'\)", section, re.M)}
    assert "softnet_data" in expected and "runqueues" in expected
    assert percpu_offsets() == expected


# ---- explain-zombie ----

def snap(*pools: PoolSnapshot) -> Snapshot:
    return Snapshot(taken_monotonic_ns=0, taken_unix_s=0.0, host="h", kernel_release="6.18",
                    probes=(), pools=pools, self_stats=None)  # type: ignore[arg-type]


SOCKET = Holder(kind="socket", pages=8, self_healing=False, detail="d", protocol="tcp",
                state="ESTABLISHED", netns="ns1", local_addr="10.0.0.2:5001",
                remote_addr="10.0.0.1:40000", pid=321, pids=(321,), comm="receiver",
                memcg="/app", memcg_source="process", queue_pages={"receive": 8}, skbs=3)
DEFERRED = Holder(kind="cpu-deferred-free", pages=2, self_healing=True, detail="d", cpu=1,
                  skbs=1, rx_packets_since_zombie=0)


def test_select_pools() -> None:
    zombie = pool(holders=(SOCKET, DEFERRED))
    other = pool(pool_addr=OTHER_POOL, pool_id=8, netdev="veth2", state="released")
    s = snap(zombie, other)
    assert explain.select_pools(s, None) == [zombie]
    assert explain.select_pools(s, "7") == [zombie]
    assert explain.select_pools(s, hex(POOL)) == [zombie]
    assert explain.select_pools(s, "veth1") == [zombie]
    assert explain.select_pools(s, "8") == []          # released, not a zombie
    assert explain.select_pools(s, "0xzz") == []


def test_verdicts() -> None:
    stuck = pool(holders=(SOCKET, DEFERRED))
    assert explain.verdict(stuck).startswith("NOT SELF-HEALING: 8 page(s)")
    assert "pid 321" in explain.verdict(stuck)
    healing = pool(inflight_pages=2, holders=(DEFERRED,))
    assert explain.verdict(healing).startswith("SELF-HEALING") and "CPU 1" in \
        explain.verdict(healing)
    assert explain.verdict(pool()).startswith("UNKNOWN")


def test_render_has_pool_holders_and_what_was_checked() -> None:
    zombie = pool(holders=(SOCKET, DEFERRED))
    text = explain.render(snap(zombie), [zombie], report())
    assert f"pool {POOL:#x} (id 7) on veth1" in text
    assert "zombie for 7s" in text and "release it 6 time(s)" in text
    assert "inflight: 10 pages (40.0KiB)" in text
    assert re.search(r"^ +8 +80\.0% +socket +no +tcp 10\.0\.0\.2:5001", text, re.M)
    assert re.search(r"^ +2 +20\.0% +cpu-deferred-free +yes +CPU 1", text, re.M)
    assert re.search(r"^ +10 +total", text, re.M)
    assert "3 network namespace(s)" in text and "per-CPU deferred-free lists" in text
    assert explain.render(snap(zombie), [zombie], None).endswith(
        "what was checked: nothing (no holders scan ran)")


def test_holders_structs_match_the_header() -> None:
    from test_abi import header_structs

    structs = header_structs()
    btf = abi.btf("holders")
    for name in ("holder_page", "holder_sock", "holder_cpu", "holder_pool", "holder_slab",
                 "holder_sysctl", "holders_config", "holders_scan_stats"):
        fields = [f for f, _ in btf.struct(name)._fields_ if not f.startswith("_pad")]
        assert fields == structs[name], name
