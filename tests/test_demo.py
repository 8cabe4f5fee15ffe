"""Live tests of the demo workload: real namespaces, veth, native XDP and page_pool tracepoints
(read from tracefs, independently of netmemtrace's BPF programs).

They need root and a built XDP object (`make build`).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest
from conftest import REPO, SLOW, TIMINGS, TraceInstance

from netmemtrace.snapshot import SCHEMA_VERSION
from netmemtrace.workload import demo

XDP_ATTACHED_DRV = 1  # "mode" in `ip -j link` for native (driver) XDP
MIB = 1 << 20
_POOL_RELEASE = re.compile(r"page_pool_release: page_pool=(\S+) inflight=(-?\d+) .* cnt=(\d+)")


def _ip_json(*args: str) -> list[dict]:
    out = subprocess.run(["ip", "-j", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout or "[]")


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _leftovers(pid: int) -> list[str]:
    """Namespaces and host interfaces the demo of process ``pid`` would have created."""
    netns = [n for n in _netns_names() if n.startswith((f"nmt-tx-{pid}-", f"nmt-rx-{pid}-"))]
    links = [ln["ifname"] for ln in _ip_json("link") if ln["ifname"].startswith(f"nmt{pid:x}")]
    return netns + links


def _pool_releases(trace: TraceInstance) -> list[tuple[str, int, int]]:
    """(pool, inflight, attempt) of every page_pool_release event so far."""
    hits = [_POOL_RELEASE.search(line) for line in trace.lines()]
    return [(m[1], int(m[2]), int(m[3])) for m in hits if m]


def test_missing_xdp_object_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "XDP_OBJECT", pathlib.Path("/nonexistent/xdp_pass.bpf.o"))
    with pytest.raises(demo.DemoError, match="make build"):
        demo.VethTopology()


@pytest.mark.live
def test_failed_creation_cleans_up(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    # A file that exists but is no BPF object makes the very last step (XDP attach) fail.
    bogus = tmp_path / "bogus.bpf.o"
    bogus.write_bytes(b"not an ELF file")
    monkeypatch.setattr(demo, "XDP_OBJECT", bogus)
    with pytest.raises(demo.DemoError, match="xdpdrv"):
        demo.VethTopology()
    assert _leftovers(os.getpid()) == []


@pytest.mark.live
def test_topology_has_native_xdp_on_receiver() -> None:
    with demo.VethTopology() as topo:
        assert {topo.tx_netns, topo.rx_netns} <= _netns_names()
        (tx,) = _ip_json("-n", topo.tx_netns, "-d", "link", "show", "dev", topo.tx_dev)
        (rx,) = _ip_json("-n", topo.rx_netns, "-d", "link", "show", "dev", topo.rx_dev)
        assert tx["linkinfo"]["info_kind"] == rx["linkinfo"]["info_kind"] == "veth"
        assert "xdp" not in tx
        assert rx["xdp"]["mode"] == XDP_ATTACHED_DRV
        assert rx["xdp"]["prog"]["name"] == "xdp_pass"
        assert rx["ifindex"] == topo.rx_ifindex()
        (rx_addr,) = _ip_json("-n", topo.rx_netns, "addr", "show", "dev", topo.rx_dev)
        assert {a["local"] for a in rx_addr["addr_info"]} >= {topo.rx_addr}
        assert topo.tx_addr != topo.rx_addr
        # A second topology in the same process gets its own names and subnet.
        with demo.VethTopology() as other:
            assert other.rx_netns != topo.rx_netns and other.rx_dev != topo.rx_dev
            assert other.rx_addr != topo.rx_addr
    assert not {topo.tx_netns, topo.rx_netns, other.tx_netns, other.rx_netns} & _netns_names()
    topo.close()  # idempotent


@pytest.mark.veth_page_pool
@pytest.mark.live
def test_tcp_stream_goes_through_page_pool(trace_instance: Callable[..., TraceInstance]) -> None:
    # Tracing starts before the topology exists: the pool fills its cache with one bulk of
    # pages on its first packet and recycles them afterwards, so a stream that starts after
    # that first packet (IPv6 neighbour discovery, say) may well cause no hold event at all.
    trace = trace_instance("page_pool/page_pool_state_hold", "page_pool/page_pool_release")
    with demo.VethTopology() as topo:
        assert demo.tcp_stream(topo, 8 * MIB) == 8 * MIB
        holds = sum("page_pool_state_hold:" in line for line in trace.lines())
        assert holds > 0
        releases_before = len(_pool_releases(trace))
        topo.delete_link()
        assert topo.rx_netns in _netns_names()
        assert _ip_json("-n", topo.rx_netns, "link", "show", "type", "veth") == []
        # Destroying the veth destroyed its pool, synchronously in `ip link del`.
        assert any(cnt == 1 for _, _, cnt in _pool_releases(trace)[releases_before:])
    assert not {topo.tx_netns, topo.rx_netns} & _netns_names()


def _wait_for_release(trace: TraceInstance, pool: str, done: Callable[[int, int], bool]) -> int:
    """Wait (5 s at most) for a release attempt of ``pool`` with ``done(inflight, attempt)``."""
    deadline = time.monotonic() + 5 * SLOW
    while True:
        for p, inflight, cnt in _pool_releases(trace):
            if p == pool and done(inflight, cnt):
                return inflight
        assert time.monotonic() < deadline, _pool_releases(trace)
        time.sleep(0.1)


def _loopback_datagrams(netns: str) -> None:
    """Loop one UDP datagram back inside ``netns`` on every CPU: each runs a NET_RX softirq
    there, which drains the deferred skb free lists. Like conftest.flush_deferred_skbs, but
    without touching the host namespace."""
    subprocess.run(["ip", "-n", netns, "link", "set", "dev", "lo", "up"], check=True)
    code = (
        "import os, socket\n"
        "for cpu in sorted(os.sched_getaffinity(0)):\n"
        "    os.sched_setaffinity(0, {cpu})\n"
        "    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:\n"
        "        s.bind(('127.0.0.1', 0)); s.sendto(b'x', s.getsockname()); s.recv(1)\n"
    )
    subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", code], check=True, timeout=10 * SLOW
    )


@pytest.mark.veth_page_pool
@pytest.mark.live
def test_unread_socket_keeps_deleted_pool_alive(
    trace_instance: Callable[..., TraceInstance],
) -> None:
    trace = trace_instance("page_pool/page_pool_release")
    with demo.VethTopology() as topo:
        held = demo.hold_unread(topo, MIB)
        try:
            assert held.held_bytes == MIB
            assert pathlib.Path(f"/proc/{held.receiver_pid}").exists()
            topo.delete_link()
            # The first release attempt, made by `ip link del`, finds pages still in flight: the
            # unread receive queue holds them, at least one page per page size of payload. So
            # does the retry a second later.
            min_pages = MIB // os.sysconf("SC_PAGE_SIZE")
            zombies = [
                p
                for p, inflight, cnt in _pool_releases(trace)
                if cnt == 1 and inflight >= min_pages
            ]
            assert zombies, _pool_releases(trace)
            assert _wait_for_release(trace, zombies[-1], lambda _, cnt: cnt == 2) > 0
        finally:
            held.close()
        assert not pathlib.Path(f"/proc/{held.receiver_pid}").exists()
        # Closing the socket frees its skbs through the kernel's deferred skb free list, which
        # is drained by the next NET_RX softirq only: on an otherwise idle machine the pool can
        # stay a zombie for minutes.
        _loopback_datagrams(topo.tx_netns)
        _wait_for_release(trace, zombies[-1], lambda inflight, _: inflight == 0)


@pytest.mark.veth_page_pool
@pytest.mark.live
def test_run_demo_leaves_nothing_behind() -> None:
    started = time.monotonic()
    demo.run_demo(duration=2)
    took = time.monotonic() - started
    assert took >= 2 and (not TIMINGS or took < 10)
    assert _leftovers(os.getpid()) == []


@pytest.mark.live
def test_run_demo_honours_stop_event() -> None:
    stop = threading.Event()
    worker = threading.Thread(target=demo.run_demo, args=(60, stop))
    worker.start()
    time.sleep(1)
    stop.set()
    worker.join(timeout=10 * SLOW)
    assert not worker.is_alive()
    assert _leftovers(os.getpid()) == []


@pytest.mark.live
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_run_demo_cleans_up_on_signal(signum: signal.Signals) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "from netmemtrace.workload.demo import run_demo; run_demo(60)"],
        cwd=pathlib.Path(__file__).parent.parent,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The banner line on stderr means the topology is up and traffic is starting.
        assert child.stderr is not None
        assert "native XDP_PASS attached" in child.stderr.readline()
        time.sleep(0.5)
        child.send_signal(signum)
        _, stderr = child.communicate(timeout=10 * SLOW)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert _leftovers(child.pid) == [], stderr


@pytest.mark.userspace
@pytest.mark.veth_page_pool
@pytest.mark.live
def test_make_run_shows_a_short_pool_table_then_where_the_json_went(
        tmp_path: pathlib.Path) -> None:
    """`make run`, as a newcomer runs it: a few lines, not the whole JSON. The demo's own
    receive device has its row; the JSON it points to is complete; a next command is named."""
    out_json = tmp_path / "run.json"
    run = subprocess.run(["make", "--no-print-directory", "-s", "run", f"RUN_JSON={out_json}"],
                         cwd=REPO, capture_output=True, text=True, timeout=120 * SLOW)
    assert run.returncode == 0, run.stderr
    rx_dev = re.search(r"-> \S+ \(nmt-rx-[^/]+/(\S+),", run.stderr).group(1)
    lines = run.stdout.splitlines()
    assert len(lines) < 20, run.stdout
    assert lines[0].split() == ["POOL", "NETDEV", "NETNS", "INFLIGHT", "HOLD/s", "RELEASE/s",
                                "RECYCLING", "STATE"]
    (row,) = [line.split() for line in lines[1:] if f"  {rx_dev}  " in line]
    # The demo deleted its veth before the snapshot: released, or a zombie while its last
    # pages wait in deferred-free lists; active if the snapshot beat the deletion.
    assert row[6] == "unavailable" and row[7] in ("active", "released", "zombie")
    assert float(row[4]) > 0 and float(row[5]) > 0  # the demo's pool really worked
    assert f"full JSON (every field: README.md): {out_json}" in lines
    assert any(line.startswith("next: sudo netmemtrace top") for line in lines)
    doc = json.loads(out_json.read_text())
    assert rx_dev in [p["netdev"] for p in doc["pools"]] and doc["schema_version"] == SCHEMA_VERSION
