"""Live: who holds a zombie page pool's pages, against the kernel's own inflight count (the
page_pool_release tracepoint, read from a private tracefs instance).

The pool's lines in the trace are told apart from other pools' (other tests may run at the
same time) by its hold count, which is frozen once the pool is destroyed."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import REPO, SLOW, flush_deferred_skbs
from test_pagepool_live import RELEASE_RE, our_pool

from netmemtrace import cli
from netmemtrace.collect.holders import HoldersCollector, entered_netns
from netmemtrace.commands import explain_zombie as explaincmd
from netmemtrace.kernel import abi, probes
from netmemtrace.session import Session
from netmemtrace.snapshot import PoolSnapshot
from netmemtrace.workload import demo

pytestmark = pytest.mark.live

HOLD_BYTES = 8 << 20
SELF_HEALING_KINDS = {"cpu-deferred-free", "pool-ring", "unattributed"}


def kernel_inflight(trace, hold: int) -> list[int]:
    """The kernel's inflight at each page_pool_release of the pool with this hold count."""
    hits = (RELEASE_RE.search(line) for line in trace.lines())
    return [int(m.group(1)) for m in hits if m and int(m.group(2)) == hold]


def settled(session: Session, topo: demo.VethTopology, trace, after: int = 0,
            timeout: float = 15.0 * SLOW) -> tuple[PoolSnapshot, list[int]]:
    """Our pool once the kernel has retried its release more than `after` times and its
    latest inflight equals ours (pages in flight while the device goes away settle first)."""
    deadline = time.monotonic() + timeout
    while True:
        pool = our_pool(session.read(), topo.rx_dev)
        kernel = kernel_inflight(trace, pool.kernel_hold_cnt) if pool.kernel_hold_cnt else []
        if len(kernel) > after and pool.inflight_pages == kernel[-1]:
            return pool, kernel
        assert time.monotonic() < deadline, f"never agreed: ours {pool.inflight_pages}, " \
                                            f"kernel {kernel}"
        time.sleep(0.2)


def drained(session: Session, topo: demo.VethTopology, trace, hold: int) -> PoolSnapshot:
    """Run traffic on every CPU until the kernel frees the pool (bounded)."""
    deadline = time.monotonic() + 30 * SLOW
    while True:
        flush_deferred_skbs()
        time.sleep(1.2)  # the kernel retries once a second
        pool = our_pool(session.read(), topo.rx_dev)
        if (kernel_inflight(trace, hold) or [1])[-1] == 0 and pool.state == "released":
            return pool
        assert time.monotonic() < deadline, "the pool was never released"


def check_sum(pool: PoolSnapshot) -> None:
    assert sum(h.pages for h in pool.holders) == pool.inflight_pages, pool.holders


@pytest.mark.veth_page_pool
def test_dangling_socket_holds_the_zombie(trace_instance) -> None:
    with Session() as session:
        trace = trace_instance("page_pool/page_pool_release")
        with demo.VethTopology() as topo:
            held = demo.hold_unread(topo, HOLD_BYTES)
            try:
                assert held.held_bytes > 1 << 20
                topo.delete_link()
                zombie, kernel = settled(session, topo, trace)
                with open(f"/proc/{held.receiver_pid}/comm") as f:
                    comm = f.read().strip()
            finally:
                held.close()
            assert zombie.state == "zombie"
            assert zombie.inflight_pages == kernel[-1] > 0
            check_sum(zombie)
            sockets = [h for h in zombie.holders if h.kind == "socket"]
            mine = [h for h in sockets if h.pid == held.receiver_pid]
            assert len(mine) == 1, zombie.holders
            sock = mine[0]
            assert sock.pages >= 0.9 * zombie.inflight_pages
            assert (sock.netns, sock.comm, sock.protocol, sock.state) == \
                (topo.rx_netns, comm, "tcp", "ESTABLISHED")
            assert sock.local_addr.startswith(f"{topo.rx_addr}:")
            assert sock.remote_addr.startswith(f"{topo.tx_addr}:")
            assert sock.queue_pages and sock.queue_pages.get("receive", 0) > 0
            assert not sock.partial_scan and not sock.self_healing

            # The receiver is gone: its socket no longer holds anything, and our inflight
            # follows the kernel's to its next retry.
            after, kernel_after = settled(session, topo, trace, after=len(kernel))
            assert after.inflight_pages == kernel_after[-1] < zombie.inflight_pages
            assert not any(h.kind == "socket" and h.pid == held.receiver_pid
                           for h in after.holders)
            if after.state == "zombie":
                check_sum(after)
                assert {h.kind for h in after.holders} <= SELF_HEALING_KINDS, after.holders
            else:
                assert after.state == "released" and after.holders == ()
            done = drained(session, topo, trace, zombie.kernel_hold_cnt)
    assert done.inflight_pages == 0 and done.holders == ()


def pinned_stream(topo: demo.VethTopology, nbytes: int, tx_cpu: int, rx_cpu: int) -> int:
    """TCP tx -> rx with the sender on tx_cpu and the reader on rx_cpu: the veth receives
    (and allocates the skbs) on the sender's CPU, the reader frees them on its own, so the
    kernel parks them on tx_cpu's deferred-free list."""
    with entered_netns(f"/run/netns/{topo.rx_netns}"):
        server = socket.create_server((topo.rx_addr, 0))
    received = 0

    def read() -> None:
        nonlocal received
        os.sched_setaffinity(0, {rx_cpu})  # this thread only
        conn, _ = server.accept()
        with conn:
            while n := len(conn.recv(1 << 16)):
                received += n

    reader = threading.Thread(target=read)
    reader.start()
    os.sched_setaffinity(0, {tx_cpu})
    try:
        with entered_netns(f"/run/netns/{topo.tx_netns}"):
            client = socket.create_connection(server.getsockname(), timeout=30 * SLOW)
        with client:
            client.sendall(bytes(nbytes))
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        reader.join(30)
        server.close()
    return received


@pytest.mark.veth_page_pool
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs")
def test_deferred_free_lists_hold_the_rest(trace_instance) -> None:
    """Pages of skbs a reader freed on another CPU wait on the allocating CPU's deferred-free
    list: attributed to that CPU, self-healing, and gone once that CPU receives traffic.
    Other traffic on the machine may flush the list first: a few attempts, bounded, on
    either CPU."""
    seen = []
    with Session() as session:
        trace = trace_instance("page_pool/page_pool_release")
        for attempt in range(10):
            tx_cpu, rx_cpu = attempt % 2, 1 - attempt % 2
            with demo.VethTopology() as topo:
                assert pinned_stream(topo, 16 << 20, tx_cpu, rx_cpu) == 16 << 20
                topo.delete_link()
                pool = our_pool(session.read(), topo.rx_dev)
                deferred = [h for h in pool.holders if h.kind == "cpu-deferred-free"]
                seen.append((pool.state, pool.inflight_pages, [(h.kind, h.pages, h.cpu)
                                                               for h in pool.holders]))
                if pool.state != "zombie" or not deferred:
                    continue
                check_sum(pool)
                assert {h.kind for h in pool.holders} <= SELF_HEALING_KINDS - {"unattributed"}
                assert [h.cpu for h in deferred] == [tx_cpu]
                assert deferred[0].skbs and deferred[0].rx_packets_since_zombie == 0
                assert all(h.self_healing for h in pool.holders)
                kernel = kernel_inflight(trace, pool.kernel_hold_cnt)
                # The kernel saw them inflight at the destroy, before anything could run
                assert kernel and kernel[0] >= pool.inflight_pages
                done = drained(session, topo, trace, pool.kernel_hold_cnt)
                assert done.inflight_pages == 0
                return
    pytest.fail(f"no attempt caught skbs on a deferred-free list: {seen}")


@pytest.mark.veth_page_pool
def test_walk_bound_reports_partial_scan(trace_instance) -> None:
    """A socket with more skbs than the bound is reported as partially scanned: the pages of
    the skbs walked, flagged, the rest left unattributed, never guessed."""
    lo = probes.load_object("holders", str(abi.object_path("holders")))
    bounded = HoldersCollector(lo.obj, max_skbs=8)
    try:
        with Session() as session:
            trace = trace_instance("page_pool/page_pool_release")
            with demo.VethTopology() as topo, demo.hold_unread(topo, HOLD_BYTES) as held:
                topo.delete_link()
                full, _ = settled(session, topo, trace)
                (cut,) = bounded.annotate([full])
        whole = next(h for h in full.holders if h.pid == held.receiver_pid)
        part = next(h for h in cut.holders if h.pid == held.receiver_pid)
        assert whole.skbs > 8 and not whole.partial_scan
        assert part.partial_scan and part.skbs == 8
        assert 0 < part.pages < whole.pages
        check_sum(cut)
        assert cut.holders[-1].kind == "unattributed"
        assert "partially scanned" in cut.holders[-1].detail
        assert bounded.last_scan is not None and bounded.last_scan.partial_sockets >= 1
    finally:
        bounded.close()
        lo.close()


@pytest.mark.veth_page_pool
def test_udp_socket_holder(trace_instance) -> None:
    with Session() as session:
        trace = trace_instance("page_pool/page_pool_release")
        with demo.VethTopology() as topo:
            with entered_netns(f"/run/netns/{topo.rx_netns}"):
                rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with entered_netns(f"/run/netns/{topo.tx_netns}"):
                tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with rx, tx:
                rx.bind((topo.rx_addr, 0))
                for _ in range(200):  # more than the receive buffer takes
                    tx.sendto(bytes(8000), rx.getsockname())
                time.sleep(0.2)
                topo.delete_link()
                zombie, kernel = settled(session, topo, trace)
                port = rx.getsockname()[1]
            check_sum(zombie)
            # Inflight did not move: the next read reuses these holders, no new scan. (A
            # zombie left by an earlier test that moves or goes meanwhile rescans rightly.)
            scanned = session.holders_scan
            again = next(p for p in session.read().pools if p.pool_addr == zombie.pool_addr)
            if again.inflight_pages == zombie.inflight_pages and scanned.zombie_pools == 1:
                assert session.holders_scan is scanned and again.holders == zombie.holders
            udp = [h for h in zombie.holders if h.protocol == "udp"]
            assert len(udp) == 1
            assert (udp[0].pid, udp[0].netns, udp[0].local_addr, udp[0].state) == \
                (os.getpid(), topo.rx_netns, f"{topo.rx_addr}:{port}", "UNCONNECTED")
            assert udp[0].pages >= 0.9 * zombie.inflight_pages == 0.9 * kernel[-1]
            drained(session, topo, trace, zombie.kernel_hold_cnt)


def test_no_iterator_runs_without_a_zombie() -> None:
    """The holders scan is skipped, and the zombie set cleared, when no pool is a zombie."""
    lo = probes.load_object("holders", str(abi.object_path("holders")))
    collector = HoldersCollector(lo.obj)
    try:
        with Session() as session:
            pools = [p for p in session.read().pools if p.state != "zombie"]
        assert collector.annotate(pools) == pools
        assert collector.last_scan is None
        assert lo.obj.map("zombie_pools").items() == []
    finally:
        collector.close()
        lo.close()


@pytest.mark.veth_page_pool
def test_explain_zombie_report(capsys) -> None:
    """Run after the fact, as on-call would: the pool was destroyed before netmemtrace
    started. The report names the never-reading socket with its pid, says the zombie will
    not heal by itself and lists what was checked; no match exits 1."""
    def args(*pool: str) -> argparse.Namespace:
        # In-process (so capsys sees the text), with the real CLI's parsed options.
        return cli._parser().parse_args(["--keep-caps", "explain-zombie", *pool])

    with demo.VethTopology() as topo, demo.hold_unread(topo, HOLD_BYTES) as held:
        topo.delete_link()
        assert explaincmd.run(args()) == 0
        text = capsys.readouterr().out
        assert explaincmd.run(args("0x1")) == 1
        assert "no zombie page pool matches '0x1'" in capsys.readouterr().err
    ours = next(block for block in text.split("\n\n") if f"pid {held.receiver_pid} (" in block)
    assert f"netns {topo.rx_netns}" in ours and "ESTABLISHED" in ours
    assert "100.0%  socket" in ours or re.search(r"\s9\d\.\d%  socket", ours), ours
    assert "verdict: NOT SELF-HEALING" in ours
    assert "what was checked:" in text and "per-CPU deferred-free lists: read on" in text


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "netmemtrace.cli", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=60 * SLOW)


@pytest.mark.veth_page_pool
def test_default_mode_attributes_sockets_of_other_netns(trace_instance) -> None:
    """Without --keep-caps (the default: capabilities dropped after attach, so no setns), a
    socket of the demo's own netns still holds the zombie's pages in `dump` and
    `explain-zombie`: the netns broker creates the socket iterators there."""
    trace = trace_instance("page_pool/page_pool_release")
    with demo.VethTopology() as topo, demo.hold_unread(topo, HOLD_BYTES) as held:
        topo.delete_link()
        flush_deferred_skbs()
        time.sleep(2.2)  # two release retries: the pool ring's pages are freed by then
        done = run_cli("dump", "--duration", "1.5")
        assert done.returncode == 0, done.stderr
        mine = [p for p in json.loads(done.stdout)["pools"]
                if any(h.get("pid") == held.receiver_pid for h in p["holders"])]
        assert len(mine) == 1, done.stdout
        pool = mine[0]
        # Destroyed before netmemtrace started: known from the release retries only.
        kernel = kernel_inflight(trace, pool["kernel_hold_at_release"])
        assert pool["state"] == "zombie" and pool["inflight_pages"] == kernel[-1] > 0
        assert sum(h["pages"] for h in pool["holders"]) == pool["inflight_pages"]
        sock = next(h for h in pool["holders"] if h.get("pid") == held.receiver_pid)
        assert (sock["kind"], sock["netns"], sock["protocol"], sock["state"]) == \
            ("socket", topo.rx_netns, "tcp", "ESTABLISHED")
        assert sock["pages"] >= 0.9 * pool["inflight_pages"]
        assert not any("netns not entered" in h["detail"] for h in pool["holders"])

        report = run_cli("explain-zombie", "--wait", "1.5")
        assert report.returncode == 0, report.stderr
        assert "could not enter" not in report.stdout, report.stdout
    ours = next(block for block in report.stdout.split("\n\n")
                if f"pid {held.receiver_pid} (" in block)
    assert f"netns {topo.rx_netns}" in ours and "verdict: NOT SELF-HEALING" in ours


@pytest.mark.veth_page_pool
def test_ring_buffer_holds_one_socket_at_a_time(trace_instance) -> None:
    """The page references' ring buffer is drained after every socket that holds zombie
    pages: sockets of one netns holding more references together than the ring has room
    for lose none. One socket holding more than that loses the excess, counted and
    reported as unattributed with the reason, never hidden."""
    ring = 64 << 10
    room = ring // 40  # struct holder_page, 32 bytes, and the ring's 8-byte header
    lo = probes.load_object("holders", str(abi.object_path("holders")),
                            max_entries={"holder_pages": ring})
    small = HoldersCollector(lo.obj)
    try:
        with Session() as session:
            trace = trace_instance("page_pool/page_pool_release")
            with demo.VethTopology() as topo, contextlib.ExitStack() as held:
                helds = [held.enter_context(demo.hold_unread(topo, 1 << 20)) for _ in range(4)]
                topo.delete_link()
                full, _ = settled(session, topo, trace)
                (many,) = small.annotate([full])
            scan = small.last_scan
            assert scan is not None and scan.zombie_refs > room, scan
            assert scan.zombie_refs_lost == 0
            check_sum(many)
            mine = {h.pid: h.pages for h in many.holders if h.kind == "socket"}
            assert set(mine) >= {h.receiver_pid for h in helds}
            assert all(0 < mine[h.receiver_pid] < room for h in helds)

            with demo.VethTopology() as topo, demo.hold_unread(topo, 8 << 20) as one:
                topo.delete_link()
                full, _ = settled(session, topo, trace)
                (big,) = small.annotate([full])
            scan = small.last_scan
            sock = next(h for h in big.holders if h.pid == one.receiver_pid)
            assert scan.zombie_refs_lost > 0 and sock.pages <= room
            check_sum(big)
            assert big.holders[-1].kind == "unattributed"
            assert f"{scan.zombie_refs_lost} page reference(s) lost (ring buffer full)" in \
                big.holders[-1].detail
    finally:
        small.close()
        lo.close()
