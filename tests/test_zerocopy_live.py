"""Live: a C workload (MSG_ZEROCOPY sender + TCP_ZEROCOPY_RECEIVE reader over loopback in a
netns the test creates) runs in child memory cgroups the test creates; the tool's figures
for its process and memcg must equal the totals the workload printed, the mapping ledger
must equal the socket: Rss in /proc/PID/smaps, and the polled v1 socket memory must equal
memory.kmem.tcp.usage_in_bytes."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, SLOW
from memcg_helpers import child_memcg

from netmemtrace import abi, probes
from netmemtrace.collect import cgroups, zerocopy
from netmemtrace.collect.memcg import MemcgCollector
from netmemtrace.collect.zerocopy import ZerocopyReader, smaps_socket_rss
from netmemtrace.session import Session
from netmemtrace.snapshot import Unavailable
from netmemtrace.views.dump import filter_snapshot
from netmemtrace.views.text import verify_table

pytestmark = pytest.mark.live
STREAM = 8_000_000
COUNTERS = ("rx_calls", "rx_errors", "rx_mapped_bytes", "rx_skip_hint_bytes", "tx_zc_calls",
            "tx_zc_bytes", "tx_notifications",
            "tx_completed_sends", "tx_copied_sends")


@pytest.fixture(scope="module")
def workload(tmp_path_factory) -> str:
    exe = tmp_path_factory.mktemp("zc") / "zc_workload"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-pthread", "-o", str(exe),
                    str(REPO / "tests/workloads/zc_workload.c")], check=True)
    return str(exe)


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    name = f"nmt-zc-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


@pytest.fixture(scope="module")
def session() -> Iterator[Session]:
    with Session() as s:
        yield s


class Workload:
    """The workload in a memcg (joined first: `ip netns exec` remounts /sys) and a netns."""

    def __init__(self, exe: str, netns: str, memcg_dir: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            ["sh", "-c", f'echo $$ > {memcg_dir}/cgroup.procs && exec "$@"', "sh",
             "ip", "netns", "exec", netns, exe, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.totals = self.line()
        self.pid = self.totals["pid"]

    def line(self) -> dict:
        text = self.proc.stdout.readline()
        assert text, f"workload died: rc={self.proc.wait()}"
        return json.loads(text)

    def command(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.line()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def memcg_row(snap, path: str):
    rows = [m for m in snap.memcgs if m.path == path]
    assert len(rows) == 1, f"{path} not in {[m.path for m in snap.memcgs]}"
    return rows[0]


def process_row(snap, pid: int):
    rows = [p for m in filter_snapshot(snap, pid=pid).memcgs for p in m.processes]
    assert len(rows) == 1
    return rows[0]


def test_totals_and_attribution_match_the_workload(session, workload, netns) -> None:
    with child_memcg("run", tcp_limit=1 << 30) as (d, rel):
        w = Workload(workload, netns, d, str(STREAM), "reuse", "errors")
        try:
            snap = session.read()
            tcp_usage = int((d / "memory.kmem.tcp.usage_in_bytes").read_text())
            m = memcg_row(snap, rel)
            p = process_row(snap, w.pid)
            t = w.totals
            for name in COUNTERS:
                assert getattr(p.zerocopy, name) == t[name], name
                assert getattr(m.zerocopy, name) == t[name], name
            # Copied: through the copybuf, and by recv() on the socket after its first
            # TCP_ZEROCOPY_RECEIVE; the ratio is then the workload's own mapped share.
            copied = t["rx_copied_bytes"] + t["rx_recv_bytes"]
            assert p.zerocopy.rx_copied_bytes == m.zerocopy.rx_copied_bytes == copied
            assert p.zerocopy.rx_zerocopy_ratio == pytest.approx(
                t["rx_mapped_bytes"] / (t["rx_mapped_bytes"] + copied), abs=5e-7)
            assert t["rx_errors"] == 2 and t["tx_zc_bytes"] == STREAM
            assert t["rx_mapped_bytes"] > 0 and t["tx_copied_sends"] == t["tx_zc_calls"]
            assert p.zerocopy.tx_inflight_bytes == 0  # every completion was read
            assert p.zerocopy.rx_mapped_pages * 4096 == t["rx_mapped_bytes"]
            assert (m.cgroup_id, m.hierarchy) == (os.stat(d).st_ino, "v1")
            assert p.memcg_id == m.cgroup_id and p.comm == "zc_workload"
            # reuse mode: the kernel zaps what it is about to map (sometimes more than it
            # then maps), so the page tables (smaps) are the ground truth here
            held = smaps_socket_rss(w.pid)
            assert 0 < p.zerocopy_unaccounted_bytes == held == p.smaps_socket_rss_bytes
            assert p.ledger_vs_smaps_bytes == 0
            # v1 polled socket memory, against the kernel's own file
            assert m.sock_charged_now_source == "memory.kmem.tcp.usage_in_bytes (polled)"
            assert m.sock_charged_now_bytes == tcp_usage
            assert isinstance(m.sock_charged_pages_total, Unavailable)
            assert m.would_be_charged_bytes == tcp_usage + held
            assert str(w.pid) in verify_table(filter_snapshot(snap, cgroup=rel))
            assert filter_snapshot(snap, cgroup=rel + "-other").memcgs == ()
            assert session.read().stats["zerocopy"]["ringbuf_full"] == 0
        finally:
            w.stop()


def test_v1_without_tcp_limit_is_inactive_not_zero(session, workload, netns) -> None:
    if cgroups.memory_hierarchy() != "v1":
        pytest.xfail("cgroup v1 only: v2 always charges socket memory, there is no "
                     "memory.kmem.tcp.limit_in_bytes to leave unset")
    with child_memcg("inactive") as (d, rel):
        w = Workload(workload, netns, d, "1000000", "reuse")
        try:
            m = memcg_row(session.read(), rel)
            assert isinstance(m.sock_charged_now_bytes, Unavailable)
            assert "inactive" in m.sock_charged_now_bytes.reason
            assert isinstance(m.would_be_charged_bytes, Unavailable)
            assert m.zerocopy_unaccounted_bytes == smaps_socket_rss(w.pid)
        finally:
            w.stop()


def test_ledger_hold_dontneed_half_munmap(session, workload, netns) -> None:
    with child_memcg("hold") as (d, rel):
        w = Workload(workload, netns, d, str(STREAM), "hold")
        try:
            held = w.totals["held_bytes"]
            assert held == w.totals["rx_mapped_bytes"] > STREAM // 2
            for step in (None, "dontneed_half", "munmap"):
                if step:
                    held = w.command(step)["held_bytes"]
                snap = session.read()
                p = process_row(snap, w.pid)
                assert p.zerocopy_unaccounted_bytes == held == smaps_socket_rss(w.pid), step
                assert memcg_row(snap, rel).zerocopy_unaccounted_bytes == held
            assert held == 0
            m = memcg_row(snap, rel)
            assert m.zerocopy_unaccounted_hwm_bytes == w.totals["rx_mapped_bytes"]
        finally:
            w.stop()


def test_sigkill_while_holding_leaves_nothing(session, workload, netns) -> None:
    with child_memcg("kill") as (d, rel):
        w = Workload(workload, netns, d, str(STREAM), "hold")
        assert process_row(session.read(), w.pid).zerocopy_unaccounted_bytes > 0
        w.proc.send_signal(signal.SIGKILL)
        w.proc.wait()
        snap = session.read()
        m = memcg_row(snap, rel)
        assert m.zerocopy_unaccounted_bytes == 0
        ((p,),) = [m.processes]  # its row stays, exited, holding nothing
        assert (p.pid, p.exited, p.zerocopy_unaccounted_bytes) == (w.pid, True, 0)
        assert w.pid not in session._memcg.zerocopy.ledger.pids()
        # Its counters survive in the memcg's totals.
        assert m.zerocopy.rx_mapped_bytes == w.totals["rx_mapped_bytes"]


def test_map_then_discard(session, workload, netns) -> None:
    with child_memcg("discard") as (d, rel):
        w = Workload(workload, netns, d, str(STREAM), "discard")
        try:
            p = process_row(session.read(), w.pid)
            assert w.totals["held_bytes"] == 0 == p.zerocopy_unaccounted_bytes
            assert p.zerocopy.rx_mapped_bytes == w.totals["rx_mapped_bytes"] > STREAM // 2
            assert 0 < p.zerocopy_unaccounted_hwm_bytes <= 16 * 4096
        finally:
            w.stop()


def test_two_readers_in_two_memcgs(session, workload, netns) -> None:
    with child_memcg("r1") as (d1, rel1), child_memcg("r2") as (d2, rel2):
        w1 = Workload(workload, netns, d1, str(STREAM), "hold")
        w2 = Workload(workload, netns, d2, str(STREAM // 2), "hold")
        try:
            snap = session.read()
            for w, rel in ((w1, rel1), (w2, rel2)):
                m = memcg_row(snap, rel)
                assert [p.pid for p in m.processes] == [w.pid]
                assert m.zerocopy_unaccounted_bytes == w.totals["held_bytes"]
                assert m.zerocopy.rx_mapped_bytes == w.totals["rx_mapped_bytes"]
        finally:
            w1.stop()
            w2.stop()


def test_spinning_reader_killed_mid_call(session, workload, netns) -> None:
    with child_memcg("spin") as (d, rel):
        w = Workload(workload, netns, d, "0", "spin", "errors")
        time.sleep(0.3)
        w.stop()  # SIGKILL, most likely inside a getsockopt
        snap = session.read()
        m = memcg_row(snap, rel)
        assert m.zerocopy.rx_calls > 2 and m.zerocopy.rx_errors == 2
        assert m.zerocopy.rx_mapped_bytes == 0 and m.zerocopy_unaccounted_bytes == 0
        assert snap.errors == ()


def exited_workload(workload: str, netns: str, memcg_dir: Path) -> dict:
    """A workload that runs to the end and exits; its own totals."""
    w = Workload(workload, netns, memcg_dir, str(STREAM), "reuse", "errors")
    w.command("munmap")
    w.proc.stdin.write("exit\n")
    w.proc.stdin.flush()
    assert w.proc.wait(timeout=10 * SLOW) == 0
    return w.totals


def test_dump_reports_a_process_that_exited_in_its_window(workload, netns) -> None:
    """`dump --duration N`: a process that did its zerocopy and exited before the snapshot
    still has its row, marked exited with its exit age, its counts the workload's own."""
    with child_memcg("dump-exited") as (d, rel):
        dump = subprocess.Popen([sys.executable, "-m", "netmemtrace.cli", "dump",
                                 "--duration", "4", "--cgroup", rel], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert "probes attached" in dump.stderr.readline()
            start = time.monotonic_ns()
            totals = exited_workload(workload, netns, d)
            out, err = dump.communicate(timeout=30 * SLOW)
        finally:
            if dump.poll() is None:
                dump.kill()
        done = time.monotonic_ns()
    assert dump.returncode == 0, err
    (m,) = json.loads(out)["memcgs"]
    (p,) = m["processes"]
    assert (p["pid"], p["comm"], p["exited"]) == (totals["pid"], "zc_workload", True)
    # It exited after the dump attached and before it was reaped; the snapshot was taken
    # after that, before the dump exited.
    assert 0 < p["exit_age_ns"] <= done - start
    for name in COUNTERS:
        assert p["zerocopy"][name] == totals[name] == m["zerocopy"][name], name
    assert p["zerocopy_unaccounted_bytes"] == 0 and "unavailable" in p["smaps_socket_rss_bytes"]


def test_exited_rows_are_kept_for_the_retention_then_dropped_and_counted(workload,
                                                                          netns) -> None:
    """serve/top keep exited rows for a bounded time and number: the oldest beyond the cap
    goes at once (evicted), the rest when the retention is over (expired); the memcg's
    totals keep their counts either way."""
    lo = zerocopy.load_object()
    memcg_lo = probes.load_object("memcg", str(abi.object_path("memcg")))
    rows = zerocopy.ProcessRows(exited_retention_s=2.0, max_exited=1, per_memcg=None)
    collector = MemcgCollector(memcg_lo, lo, rows=rows)
    try:
        with child_memcg("retention") as (d, rel):
            first = exited_workload(workload, netns, d)
            second = exited_workload(workload, netns, d)
            memcgs, stats, _unaccepted = collector.read(time.monotonic_ns())
            (m,) = [m for m in memcgs if m.path == rel]
            assert [(p.pid, p.exited) for p in m.processes] == [(second["pid"], True)]
            assert (stats.exited_process_rows, stats.exited_rows_evicted,
                    stats.exited_rows_expired) == (1, 1, 0)
            assert m.zerocopy.tx_zc_bytes == first["tx_zc_bytes"] + second["tx_zc_bytes"]
            memcgs, stats, _unaccepted = collector.read(time.monotonic_ns() + int(2.5e9))
            (m,) = [m for m in memcgs if m.path == rel]
            assert m.processes == ()
            assert (stats.exited_process_rows, stats.exited_rows_evicted,
                    stats.exited_rows_expired) == (0, 1, 1)
            assert m.zerocopy.rx_calls == first["rx_calls"] + second["rx_calls"]
    finally:
        collector.close()
        memcg_lo.close()
        lo.close()


def test_ledger_overflow_is_counted(workload, netns) -> None:
    lo = zerocopy.load_object()
    reader = ZerocopyReader(lo.obj, max_ranges=4)
    try:
        with child_memcg("overflow") as (d, _):
            w = Workload(workload, netns, d, str(STREAM), "hold")
            try:
                procs, _, _ = reader.read()
                mine = [p for p in procs if p.pid == w.pid]
                assert len(mine) == 1
                led = reader.ledger
                assert led.nranges == 4 and led.overflow_ranges > 0
                assert 0 < mine[0].unaccounted_bytes < w.totals["held_bytes"]
                assert mine[0].unaccounted_bytes + led.overflow_bytes >= w.totals["held_bytes"]
                w.command("munmap")
                procs, _, _ = reader.read()
                assert [p.unaccounted_bytes for p in procs if p.pid == w.pid] == [0]
            finally:
                w.stop()
    finally:
        reader.close()
        lo.close()


def pending_threads(obj) -> int:
    """The BPF side's count of threads with a syscall entry waiting for its exit."""
    raw = obj.map(".data.pending").lookup(ctypes.c_uint32(0))
    return int.from_bytes(raw[:8], sys.byteorder)


@pytest.mark.parametrize("mechanism", ["syscalls", "tp_btf", "raw_tp", "tracepoint"])
def test_every_syscall_mechanism_matches_the_workload(workload, netns, mechanism) -> None:
    """The per-syscall tracepoints (the default: "syscalls") and each variant of the raw
    sys_enter/sys_exit fallback get the syscall number and arguments their own way (tp_btf:
    loads through the typed pt_regs; raw_tp: probe reads; tracepoint: the record), and each
    must count, map and unmap alike. Afterwards no thread may be left counted as in a call,
    a killed one included: that count lets every other exit skip the lookup."""
    if mechanism == "syscalls":
        lo = zerocopy.load_object()
        hooks, mech = zerocopy.PER_SYSCALL_HOOKS, "tracepoint"
    else:
        lo = probes.load_object("zerocopy", str(abi.object_path("zerocopy")), force=mechanism,
                                disabled={h: "test" for h in zerocopy.PER_SYSCALL_HOOKS})
        hooks, mech = zerocopy.RAW_SYSCALL_HOOKS, mechanism
    reader = ZerocopyReader(lo.obj)
    try:
        rows = {r.hook: r for r in lo.status()}
        for hook in hooks:
            assert rows[hook].attached and rows[hook].mechanism == mech, rows[hook]
        # One family only, or every call would count twice.
        other = zerocopy.RAW_SYSCALL_HOOKS if mechanism == "syscalls" \
            else zerocopy.PER_SYSCALL_HOOKS
        assert not any(rows[h].attached for h in other)
        with child_memcg(f"mech-{mechanism}") as (d, _):
            w = Workload(workload, netns, d, str(STREAM), "hold", "errors")
            try:
                held = w.totals["held_bytes"]
                for step in (None, "dontneed_half", "munmap"):
                    if step:
                        held = w.command(step)["held_bytes"]
                    procs, _, _ = reader.read()
                    mine = [p for p in procs if p.pid == w.pid]
                    assert len(mine) == 1, step
                    assert mine[0].unaccounted_bytes == held == smaps_socket_rss(w.pid), step
                assert held == 0
                for name in COUNTERS:
                    assert mine[0].counters[name] == w.totals[name], name
            finally:
                w.stop()
            spin = Workload(workload, netns, d, "0", "spin")
            time.sleep(0.2)
            spin.stop()  # SIGKILL, most likely inside a getsockopt
        deadline = time.monotonic() + 5 * SLOW
        while pending_threads(lo.obj) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pending_threads(lo.obj) == 0
        assert abi.Stats("zerocopy", lo.obj.map("zc_stats")).read()["pending_full"] == 0
    finally:
        reader.close()
        lo.close()


def test_raw_syscalls_serve_where_a_per_syscall_event_cannot_attach(monkeypatch) -> None:
    """A kernel without one of the syscalls:* events (CONFIG_FTRACE_SYSCALLS off, or the event
    refused): the object falls back to the raw sys_enter/sys_exit pair as a whole, and the
    probes table says why; never half of each family."""
    real = probes.Kernel.static_check

    def no_mmap_events(kernel, cand):
        if cand.target.endswith("_mmap"):
            return f"tracepoint {cand.target} not in this kernel"
        return real(kernel, cand)

    monkeypatch.setattr(probes.Kernel, "static_check", no_mmap_events)
    lo = zerocopy.load_object()
    try:
        rows = {r.hook: r for r in lo.status()}
        assert all(rows[h].attached for h in zerocopy.RAW_SYSCALL_HOOKS)
        for h in zerocopy.PER_SYSCALL_HOOKS:
            assert not rows[h].attached
            assert "sys_enter_mmap cannot attach" in rows[h].reason
            assert "raw_syscalls serve instead" in rows[h].reason
    finally:
        lo.close()


def test_top_keeps_an_exited_process_marked(workload, netns) -> None:
    """`top --batch`: the process that exited between two frames is still a row of the
    second, STATE "exited <age>", with the bytes it sent."""
    from test_top import parse_frames

    with child_memcg("top-exited") as (d, _):
        top_run = subprocess.Popen(
            [sys.executable, "-m", "netmemtrace.cli", "top", "--batch", "--count", "2",
             "--interval", "3"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        try:
            while not top_run.stdout.readline().startswith("netmemtrace top - "):
                pass  # the first frame: attached
            totals = exited_workload(workload, netns, d)
            out, err = top_run.communicate(timeout=30 * SLOW)
        finally:
            if top_run.poll() is None:
                top_run.kill()
    assert top_run.returncode == 0, err
    (frame,) = parse_frames("netmemtrace top - \n" + out.partition("netmemtrace top - ")[2])
    (row,) = [r for r in frame.tables["ZEROCOPY PROCESSES"] if r["PID"] == str(totals["pid"])]
    assert row["COMM"] == "zc_workload" and row["STATE"].startswith("exited ")
    assert row["TX_ZC"] == f"{totals['tx_zc_bytes'] / (1 << 20):.1f}MiB"
