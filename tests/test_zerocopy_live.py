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
from conftest import REPO, SLOW, AttachedDump
from memcg_helpers import HIERARCHY, child_memcg, sock_bytes

from netmemtrace.collect import zerocopy
from netmemtrace.collect.memcg import MemcgCollector
from netmemtrace.collect.zerocopy import ZerocopyReader
from netmemtrace.host.procfs import smaps_socket_rss
from netmemtrace.kernel import abi, probes
from netmemtrace.session import Session
from netmemtrace.snapshot import Unavailable
from netmemtrace.views.dump import filter_snapshot
from netmemtrace.views.text import verify_table

pytestmark = pytest.mark.live
STREAM = 8_000_000
COUNTERS = ("rx_calls", "rx_errors", "rx_mapped_bytes", "rx_skip_hint_bytes", "tx_zc_calls",
            "tx_zc_bytes", "tx_notifications",
            "tx_completed_sends", "tx_copied_sends")

# The kernel-matrix guests (6.1 ... 7.3) all attach fentry and kprobes: there the function
# family must serve, and the syscall tracepoints stay off.
GUEST = os.environ.get("NETMEMTRACE_GUEST") == "1"
TRACEPOINTS = ("tp_btf", "raw_tp", "tracepoint")
# The matrix runs this file twice in each guest: as is (fentry), and with
# NETMEMTRACE_MECHANISMS=tp_btf,raw_tp,tracepoint,kprobe (function probes by kprobe).
ENV_MECHANISMS = os.environ.get("NETMEMTRACE_MECHANISMS")


def kernel() -> probes.Kernel:
    """What the CLI would make of NETMEMTRACE_MECHANISMS (every mechanism without it)."""
    return probes.Kernel(mechanisms=probes.parse_mechanisms(ENV_MECHANISMS)
                         if ENV_MECHANISMS else None)


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
    with Session(mechanisms=ENV_MECHANISMS) as s:
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
            tcp_usage = sock_bytes(d)
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
            assert (m.cgroup_id, m.hierarchy) == (os.stat(d).st_ino, HIERARCHY)
            assert p.memcg_id == m.cgroup_id and p.comm == "zc_workload"
            # reuse mode: the kernel zaps what it is about to map (sometimes more than it
            # then maps), so the page tables (smaps) are the ground truth here
            held = smaps_socket_rss(w.pid)
            assert 0 < p.zerocopy_unaccounted_bytes == held == p.smaps_socket_rss_bytes
            assert p.ledger_vs_smaps_bytes == 0
            # polled socket memory, against the kernel's own file
            assert m.sock_charged_now_source == (
                "memory.kmem.tcp.usage_in_bytes (polled)" if HIERARCHY == "v1"
                else "memory.stat sock (polled)")
            assert m.sock_charged_now_bytes == tcp_usage
            # v1 has no charge event to count; v2's mod_memcg_state tracepoint is one
            assert isinstance(m.sock_charged_pages_total, Unavailable) == (HIERARCHY == "v1")
            assert m.would_be_charged_bytes == tcp_usage + held
            assert str(w.pid) in verify_table(filter_snapshot(snap, cgroup=rel))
            assert filter_snapshot(snap, cgroup=rel + "-other").memcgs == ()
            assert session.read().stats["zerocopy"]["ringbuf_full"] == 0
        finally:
            w.stop()


def test_without_tcp_limit_v1_is_inactive_not_zero_v2_charges(session, workload,
                                                             netns) -> None:
    """v1 charges sockets only once memory.kmem.tcp.limit_in_bytes is set: unavailable,
    not 0; v2 always charges them (memory.stat sock)."""
    with child_memcg("inactive") as (d, rel):
        w = Workload(workload, netns, d, "1000000", "reuse")
        try:
            m = memcg_row(session.read(), rel)
            if HIERARCHY == "v1":
                assert isinstance(m.sock_charged_now_bytes, Unavailable)
                assert "inactive" in m.sock_charged_now_bytes.reason
                assert isinstance(m.would_be_charged_bytes, Unavailable)
            else:
                assert m.sock_charged_now_bytes == sock_bytes(d)
                assert m.would_be_charged_bytes == m.sock_charged_now_bytes + \
                    m.zerocopy_unaccounted_bytes
            assert m.zerocopy_unaccounted_bytes == smaps_socket_rss(w.pid)
        finally:
            w.stop()


def test_ledger_hold_mremap_dontneed_half_munmap(session, workload, netns) -> None:
    with child_memcg("hold") as (d, rel):
        w = Workload(workload, netns, d, str(STREAM), "hold")
        try:
            held = w.totals["held_bytes"]
            assert held == w.totals["rx_mapped_bytes"] > STREAM // 2
            for step in (None, "mremap", "dontneed_half", "munmap"):
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


def test_ratio_is_the_workloads_own_mmaped_percentage(session, workload, netns) -> None:
    """Read as the kernel's tcp_mmap selftest reads (issue 16.2): map, then read() the
    recv_skip_hint remainder. Those read() bytes and the copybuf are rx_copied_bytes, and
    mapped / (mapped + copied), printed as tcp_mmap prints it (%g), is the workload's own
    "% mmap'ed"."""
    with child_memcg("tcpmmap") as (d, _):
        w = Workload(workload, netns, d, str(STREAM), "tcpmmap")
        try:
            z = process_row(session.read(), w.pid).zerocopy
            t = w.totals
            assert t["rx_recv_bytes"] > 0 and t["rx_mapped_bytes"] > 0
            assert z.rx_mapped_bytes == t["rx_mapped_bytes"]
            assert z.rx_copied_bytes == t["rx_copied_bytes"] + t["rx_recv_bytes"]
            assert z.rx_mapped_bytes + z.rx_copied_bytes == STREAM
            assert 0 < z.rx_zerocopy_ratio < 1
            assert f"{z.rx_zerocopy_ratio * 100:g}" == t["mmap_pct"]
        finally:
            w.stop()


def test_mapped_before_attach_has_a_row_and_is_followed(workload, netns) -> None:
    """A process already holding zerocopy pages when netmemtrace attaches made no call it
    could see: its mappings are found at start (/proc maps + pagemap), it has a row with the
    pages it holds (to the byte of smaps), and its later unmaps reach the ledger."""
    with child_memcg("before") as (d, rel):
        w = Workload(workload, netns, d, str(STREAM), "hold")
        lo = zerocopy.load_object(kernel())
        memcg_lo = probes.load_object("memcg", str(abi.object_path("memcg")))
        collector = MemcgCollector(memcg_lo, lo, rows=zerocopy.DUMP_ROWS)
        try:
            held = w.totals["held_bytes"]
            for step in (None, "dontneed_half", "munmap"):
                if step:
                    held = w.command(step)["held_bytes"]
                memcgs, _, _ = collector.read(time.monotonic_ns())
                (m,) = [m for m in memcgs if m.path == rel]
                (p,) = m.processes
                assert (p.pid, p.zerocopy.rx_calls) == (w.pid, 0)
                assert p.zerocopy_unaccounted_bytes == held == smaps_socket_rss(w.pid), step
                assert p.smaps_socket_rss_bytes == held and p.ledger_vs_smaps_bytes == 0
                assert m.zerocopy_unaccounted_bytes == held
            assert held == 0 and p.zerocopy_unaccounted_hwm_bytes == w.totals["held_bytes"]
        finally:
            w.stop()
            collector.close()
            memcg_lo.close()
            lo.close()


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
        dump = AttachedDump("--cgroup", rel)
        try:
            start = time.monotonic_ns()
            totals = exited_workload(workload, netns, d)
            out = dump.stop()
        finally:
            dump.close()
        done = time.monotonic_ns()
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
    lo = zerocopy.load_object(kernel())
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
    lo = zerocopy.load_object(kernel())
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


def global_u64(obj, section: str) -> int:
    """A __u64 global of the BPF side that lives in a section of its own."""
    raw = obj.map(section).lookup(ctypes.c_uint32(0))
    return int.from_bytes(raw[:8], sys.byteorder)


def pending_threads(obj) -> int:
    """The BPF side's count of threads with a syscall entry waiting for its exit."""
    return global_u64(obj, ".data.pending")


def rx_socks_live(obj) -> int:
    """The BPF side's count of sockets TCP_ZEROCOPY_RECEIVE mapped pages on."""
    return global_u64(obj, ".data.rxsocks")


def load_family(family: str) -> tuple[probes.LoadedObject, tuple[str, ...], str]:
    """The object as the family under test loads it: (object, hooks that must be attached,
    their mechanism). fentry/kprobe: the default load with function probes narrowed to that
    one (as --mechanisms tp_btf,raw_tp,tracepoint,kprobe does); where it cannot attach (this CI
    host: fentry EPERM, no kprobes) the syscall tracepoints must serve and say why."""
    if family in ("fentry", "kprobe"):
        lo = zerocopy.load_object(probes.Kernel(mechanisms=TRACEPOINTS + (family,)))
        rows = {r.hook: r for r in lo.status()}
        if rows["tcp_zerocopy_receive"].attached:
            need = tuple(h for h in zerocopy.FUNCTION_HOOKS if h not in zerocopy.ZAP_HOOKS
                         and (family == "kprobe" or h not in zerocopy.KRETPROBE_HOOKS))
            # No syscall tracepoint at all: they would tax every syscall of the host.
            for h in zerocopy.SYSCALL_HOOKS:
                assert not rows[h].attached and rows[h].off == probes.OFF_REPLACED, rows[h]
                assert f"function probes ({family})" in rows[h].reason
            zap = [rows[h] for h in zerocopy.ZAP_HOOKS if rows[h].attached]
            assert [r.mechanism for r in zap] == [family], zap
            if family == "fentry":
                for h in zerocopy.KRETPROBE_HOOKS:
                    assert rows[h].off == probes.OFF_REPLACED and "fexit" in rows[h].reason
            return lo, need, family
        assert not GUEST, f"{family} must serve here: {rows['tcp_zerocopy_receive']}"
        for h in zerocopy.FUNCTION_HOOKS:
            assert rows[h].off == probes.OFF_REPLACED and not rows[h].attached
            assert "function probes cannot serve" in rows[h].reason, rows[h]
        return lo, zerocopy.PER_SYSCALL_HOOKS, "tracepoint"
    # The syscall families, with function probes ruled out as on a kernel without them.
    if family == "syscalls":
        return (zerocopy.load_object(probes.Kernel(mechanisms=TRACEPOINTS)),
                zerocopy.PER_SYSCALL_HOOKS, "tracepoint")
    lo = probes.load_object("zerocopy", str(abi.object_path("zerocopy")), force=family,
                            disabled={h: "test" for h in zerocopy.PER_SYSCALL_HOOKS})
    return lo, zerocopy.RAW_SYSCALL_HOOKS, family


@pytest.mark.parametrize("family", ["fentry", "kprobe", "syscalls", "tp_btf", "raw_tp",
                                    "tracepoint"])
def test_every_hook_family_matches_the_workload(workload, netns, family) -> None:
    """Function probes (fentry, or kprobe forced), the per-syscall tracepoints ("syscalls",
    their fallback) and each variant of the raw sys_enter/sys_exit pair (tp_btf: loads
    through the typed pt_regs; raw_tp: probe reads; tracepoint: the record) each see the
    calls their own way, and each must count, map, move and unmap alike, to the byte of
    smaps. Afterwards no thread may be left counted as in a call, a killed one included,
    and no socket as a zerocopy one: those counts let every other exit, and every other
    receive of the host, skip a lookup."""
    lo, hooks, mech = load_family(family)
    reader = ZerocopyReader(lo.obj)
    try:
        rows = {r.hook: r for r in lo.status()}
        for hook in hooks:
            assert rows[hook].attached and rows[hook].mechanism == mech, rows[hook]
        # One family only, or every call would count twice.
        if hooks == zerocopy.RAW_SYSCALL_HOOKS:
            others = zerocopy.PER_SYSCALL_HOOKS + zerocopy.FUNCTION_HOOKS
        elif hooks == zerocopy.PER_SYSCALL_HOOKS:
            others = zerocopy.RAW_SYSCALL_HOOKS + zerocopy.FUNCTION_HOOKS
        else:
            others = zerocopy.SYSCALL_HOOKS
        assert not any(rows[h].attached for h in others)
        with child_memcg(f"fam-{family}") as (d, _):
            w = Workload(workload, netns, d, str(STREAM), "hold", "errors")
            try:
                held = w.totals["held_bytes"]
                for step in (None, "mremap", "dontneed_half", "munmap"):
                    if step:
                        held = w.command(step)["held_bytes"]
                    procs, _, _ = reader.read()
                    mine = [p for p in procs if p.pid == w.pid]
                    assert len(mine) == 1, step
                    assert held == smaps_socket_rss(w.pid), step
                    assert mine[0].unaccounted_bytes in ledger_truth(lo.obj, held), step
                    assert rx_socks_live(lo.obj) >= 1  # its copies are counted: open
                assert held == 0
                for name in COUNTERS:
                    assert lo.obj.recursion_misses() or \
                        mine[0].counters[name] == w.totals[name], name
            finally:
                w.stop()
            missed = lo.obj.recursion_misses()
            r = Workload(workload, netns, d, str(STREAM), "reuse")
            try:  # the kernel zaps before it maps: smaps is the truth
                procs, _, _ = reader.read()
                (mine,) = [p for p in procs if p.pid == r.pid]
                truth = smaps_socket_rss(r.pid)
                assert truth > 0
                assert mine.unaccounted_bytes in ledger_truth(lo.obj, truth, missed)
            finally:
                r.stop()
            spin = Workload(workload, netns, d, "0", "spin")
            time.sleep(0.2)
            spin.stop()  # SIGKILL, most likely inside a getsockopt
        deadline = time.monotonic() + 5 * SLOW
        while pending_threads(lo.obj) and time.monotonic() < deadline:
            time.sleep(0.05)
        # A skipped program can leave a thread or socket counted: only then (and counted).
        assert pending_threads(lo.obj) == 0 or lo.obj.recursion_misses()
        while rx_socks_live(lo.obj) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rx_socks_live(lo.obj) == 0 or lo.obj.recursion_misses()
        assert abi.Stats("zerocopy", lo.obj.map("zc_stats")).read()["pending_full"] == 0
    finally:
        reader.close()
        lo.close()


def ledger_truth(obj, truth: int, missed_at_start: int = 0) -> list:
    """What a ledger figure may be: the truth; or, once the kernel skipped one of the
    object's programs since the process started (a recursion miss: a preemptible hook's
    program already running on that CPU, as the raw syscall hooks of 7.x under TCG do),
    LEDGER_LOSS, which says so. Never another number."""
    if obj.recursion_misses() == missed_at_start:
        return [truth]
    return [truth, zerocopy.LEDGER_LOSS]


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
    lo = zerocopy.load_object(probes.Kernel(mechanisms=TRACEPOINTS))  # as without fentry
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
