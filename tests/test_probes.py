"""The probe catalogue, mechanism fallback, verifier checks of function probes that cannot
attach here, the `probes` table and the privilege error path."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SLOW, bpf_prog_ids, prog_ids_held_by

from netmemtrace.commands.probes import format_probes
from netmemtrace.kernel import abi, libbpf, probes
from netmemtrace.snapshot import SCHEMA_VERSION

OBJ = str(abi.object_path("pagepool"))


def test_catalogue_is_read_from_program_names() -> None:
    hooks = probes.read_catalogue(OBJ)
    assert [c.mechanism for c in hooks["page_pool_update_nid"].candidates] == [
        "tp_btf", "raw_tp", "tracepoint"]
    assert [c.mechanism for c in hooks["page_pool_state_hold"].candidates] == [
        "raw_tp", "tracepoint"]
    assert [c.mechanism for c in hooks["page_pool_destroy"].candidates] == ["fentry", "kprobe"]
    assert hooks["page_pool_release"].candidates[1].target == "page_pool/page_pool_release"


@pytest.mark.live
@pytest.mark.parametrize("mechanism", ["kprobe", "raw_tp", "tracepoint", "tp_btf"])
def test_every_variant_passes_the_verifier(mechanism: str) -> None:
    """kprobe programs cannot attach on this kernel (CONFIG_KPROBES off) but must load."""
    lo = probes.load_object("pagepool", OBJ, force=mechanism, attach=False)
    try:
        loaded = [h for h in lo.hooks.values() if h.chosen]
        assert loaded, f"no {mechanism} program in the object"
        for hook in loaded:
            assert lo.obj.programs[hook.chosen.program].fd >= 0
    finally:
        lo.close()


@pytest.mark.live
def test_function_probe_falls_back_and_says_why() -> None:
    lo = probes.load_object("pagepool", OBJ)
    try:
        rows = {r.hook: r for r in lo.status()}
    finally:
        lo.close()
    assert rows["page_pool_state_hold"].attached
    assert rows["page_pool_state_hold"].mechanism == "raw_tp"  # hashes the pool pointer
    assert rows["page_pool_update_nid"].mechanism == "tp_btf"
    destroy = rows["page_pool_destroy"]
    # Here fentry is refused (lockdown) and kprobes are compiled out; a user's kernel attaches.
    if not destroy.attached:
        assert "fentry" in destroy.reason and "kprobe" in destroy.reason
        assert "EPERM" in destroy.reason or "not in this kernel" in destroy.reason
        assert "CONFIG_KPROBES" in destroy.reason or "not in this kernel" in destroy.reason


def test_static_check_reasons(tmp_path, monkeypatch) -> None:
    cand = probes.Candidate("tracepoint", "x__tracepoint", "page_pool/no_such_event")
    monkeypatch.setattr(probes, "TRACEFS", tmp_path)
    kernel = probes.Kernel()
    assert "tracefs not mounted" in kernel.static_check(cand)
    (tmp_path / "events").mkdir()
    assert "not in this kernel" in kernel.static_check(cand)
    fn = probes.Candidate("kprobe", "x__kprobe", "no_such_function_in_kernel")
    monkeypatch.setattr(probes, "KPROBE_PMU", tmp_path)  # as if kprobes were there
    assert "not in this kernel" in kernel.static_check(fn)


@pytest.mark.live
def test_fentry_refusal_is_found_without_loading_an_object(monkeypatch) -> None:
    """The fentry check loads one empty program: on this kernel (EPERM) every fentry
    candidate is ruled out before any object load, so no object is loaded twice."""
    kernel = probes.Kernel()  # what was refused lives in the session's Kernel
    err = libbpf.fentry_load_errno("page_pool_destroy")
    assert libbpf.fentry_load_errno("no_such_function_in_kernel") == errno.ENOENT
    why = kernel.static_check(probes.Candidate("fentry", "x__fentry", "page_pool_destroy"))
    if err == errno.EPERM:
        assert why is not None and "fentry denied: EPERM" in why
        assert "fentry" in kernel.refused and "fentry" not in probes.Kernel().refused
        loads = []
        real = libbpf.Object.load
        monkeypatch.setattr(libbpf.Object, "load", lambda o: (loads.append(o.path), real(o)))
        lo = probes.load_object("pagepool", OBJ, kernel=kernel)
        lo.close()
        assert loads == [OBJ]
        assert "fentry denied: EPERM" in lo.hooks["page_pool_destroy"].reason
    else:
        assert err == 0 and why is None


@pytest.mark.live
def test_kernel_symbol_lookup_matches_proc_kallsyms() -> None:
    """Symbols come from the kernel's own lookup (a syscall program), not a scan of
    /proc/kallsyms: it must give the file's address for a name the file lists, None for
    one it does not."""
    listed = {}
    for line in Path("/proc/kallsyms").read_text().splitlines():
        addr, _, name = line.split()[:3]
        listed.setdefault(name, []).append(int(addr, 16))
    names = [n for n in ("tcp_zerocopy_receive", "page_pool_create", "tcp_sendmsg_locked",
                         "skb_copy_datagram_iter") if len(listed.get(n, ())) == 1]
    names.append("netmemtrace_no_such_symbol")
    assert len(names) > 1
    assert libbpf.kallsyms_lookup(names) == {n: listed[n][0] if n in listed else None
                                             for n in names}


def test_plan_takes_the_best_candidate_not_ruled_out() -> None:
    hook = probes.Hook("h", [probes.Candidate("tp_btf", "h__tp_btf", "x", "not here"),
                             probes.Candidate("raw_tp", "h__raw_tp", "x"),
                             probes.Candidate("kprobe", "h__kprobe", "f")])
    none = probes.Hook("n", [probes.Candidate("kprobe", "n__kprobe", "f", "refused")])
    assert probes.plan({"h": hook, "n": none}) == {"h": hook.candidates[1], "n": None}


@pytest.mark.live
def test_mechanisms_option_restricts_every_hook() -> None:
    """--mechanisms tracepoint: every hook that has a classic tracepoint uses it, the others
    stay detached saying the mechanism is not allowed."""
    kernel = probes.Kernel(mechanisms=probes.parse_mechanisms("tracepoint"))
    lo = probes.load_object("pagepool", OBJ, kernel=kernel, attach=False)
    try:
        for hook in lo.hooks.values():
            assert hook.chosen is None or hook.chosen.mechanism == "tracepoint"
            if hook.chosen is None:
                assert "not allowed (--mechanisms tracepoint)" in hook.reason
        assert any(h.chosen for h in lo.hooks.values())
    finally:
        lo.close()
    with pytest.raises(probes.SetupError, match="choose from"):
        probes.parse_mechanisms("kprobe,uprobe")


def test_probes_table_format() -> None:
    rows = [probes.ProbeStatus("pagepool", "page_pool_state_hold", "tp_btf", True, ""),
            probes.ProbeStatus("pagepool", "page_pool_destroy", None, False,
                               "kprobe: kprobes not supported")]
    lines = format_probes(rows).splitlines()
    assert lines[0].split() == ["OBJECT", "HOOK", "MECHANISM", "ATTACHED", "REASON"]
    assert lines[1].split()[:4] == ["pagepool", "page_pool_state_hold", "tp_btf", "yes"]
    assert lines[2].split()[:4] == ["pagepool", "page_pool_destroy", "-", "no"]
    assert lines[2].endswith("kprobe: kprobes not supported")


def _cli(*args: str, unprivileged: bool = False,
         timeout: float = 60 * SLOW) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "netmemtrace.cli", *args]
    if unprivileged:
        # Without any capability, but still as the clone's owner: another user (nobody)
        # cannot even import the package when the clone lives under a 0700 directory
        # (/root, mktemp -d). An empty bounding set keeps exec from granting root's caps.
        cmd = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all",
               *cmd]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.live
def test_cli_probes_table_lists_every_hook() -> None:
    out = _cli("probes")
    assert out.returncode == 0, out.stderr
    for hook in ("page_pool_state_hold", "page_pool_state_release", "page_pool_release",
                 "page_pool_update_nid", "page_pool_destroy"):
        assert hook in out.stdout


@pytest.mark.live
@pytest.mark.parametrize("command", ["dump", "probes"])
def test_unprivileged_gets_one_line_and_exit_2(command: str) -> None:
    out = _cli(command, unprivileged=True)
    assert out.returncode == 2, out
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "CAP_BPF" in out.stderr and "root" in out.stderr


def test_missing_btf_path_is_a_clear_error() -> None:
    out = _cli("--btf-path", "/nonexistent/vmlinux", "dump")
    assert out.returncode == 2
    assert out.stderr.strip() == "netmemtrace: --btf-path /nonexistent/vmlinux: no such file"


@pytest.mark.live
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_prints_snapshot_and_detaches_everything(sig: str) -> None:
    """Ctrl-C / SIGTERM during `dump`: the snapshot so far is printed, exit 0, and no program
    or link is left behind (bpftool before/after)."""
    import json
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "netmemtrace.cli", "dump", "--duration",
                             "30"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    banner = proc.stderr.readline()  # printed once every probe is attached
    assert "probes attached; tracing for 30 s" in banner, banner + proc.stderr.read()
    ours = prog_ids_held_by(proc.pid)
    assert len(ours) >= 4 and ours <= bpf_prog_ids()
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=5 * SLOW)
    assert proc.returncode == 0, err
    assert json.loads(out)["schema_version"] == SCHEMA_VERSION
    assert ours & bpf_prog_ids() == set()


@pytest.mark.live
def test_btf_path_is_used_for_core(tmp_path) -> None:
    import shutil

    good = tmp_path / "vmlinux"
    shutil.copy("/sys/kernel/btf/vmlinux", good)
    out = _cli("--btf-path", str(good), "probes")
    assert out.returncode == 0, out.stderr
    bad = tmp_path / "garbage"
    bad.write_bytes(b"not btf" * 100)
    out = _cli("--btf-path", str(bad), "probes")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "cannot load pagepool" in out.stderr and "BTF" in out.stderr


@pytest.mark.live
def test_capabilities_dropped_after_attach() -> None:
    import time

    from netmemtrace.privilege import caps

    proc = subprocess.Popen([sys.executable, "-m", "netmemtrace.cli", "dump", "--duration",
                             "3"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20 * SLOW
    want = sum(1 << c for c in caps.KEEP)
    eff = None
    while eff != want and time.monotonic() < deadline and proc.poll() is None:
        with open(f"/proc/{proc.pid}/status") as f:
            status = dict(line.split(":", 1) for line in f)
        eff = int(status["CapEff"], 16)
        time.sleep(0.05)
    assert eff == want
    assert int(status["CapBnd"], 16) == want
    out, err = proc.communicate(timeout=20 * SLOW)
    assert proc.returncode == 0, err
    assert b'"pools"' in out


@pytest.mark.live
def test_an_object_that_cannot_load_does_not_stop_the_rest(monkeypatch) -> None:
    from netmemtrace import session as session_mod

    monkeypatch.setattr(session_mod, "OBJECT_SPECS", (session_mod.ObjectSpec("pagepool"),
                                                      session_mod.ObjectSpec("no_such_object")))
    with session_mod.Session() as session:
        rows = {(r.object, r.hook): r for r in session.probe_status()}
        snap = session.read()
    broken = rows[("no_such_object", "(object)")]
    assert not broken.attached and "not built" in broken.reason
    assert rows[("pagepool", "page_pool_state_hold")].attached
    assert snap.memcgs == () and snap.errors == ()
    assert "not loaded" in snap.netmem.reason


@pytest.mark.live
def test_per_packet_probe_is_opt_in() -> None:
    from netmemtrace.session import Session

    def stack_hook(session: Session) -> probes.ProbeStatus:
        return next(r for r in session.probe_status()
                    if (r.object, r.hook) == ("netmem", "netif_receive_skb"))

    with Session() as session:
        off = stack_hook(session)
        unavailable = session.read().netmem.unavailable_states
    assert not off.attached and off.mechanism is None and "--netmem-stack" in off.reason
    assert "--netmem-stack" in unavailable["dmabuf"]["stack"]
    with Session(netmem_stack=True) as session:
        assert stack_hook(session).attached


@pytest.mark.live
def test_dump_filters_matching_nothing_say_why_and_exit_1() -> None:
    """An empty selection is not silent: the document (with no memcg row) still goes to
    stdout, one line on stderr says why, and the exit status is 1 (2 means an error)."""
    import json
    import uuid

    with open("/proc/sys/kernel/pid_max") as f:
        no_pid = int(f.read())  # pids are below pid_max: this one can never exist
    nope = f"/nmt-nope-{uuid.uuid4().hex[:8]}"
    cases = {
        ("--pid", str(no_pid)): f"--pid {no_pid}: no such process",
        ("--pid", str(os.getpid())): f"--pid {os.getpid()}: the process made no zerocopy call",
        ("--cgroup", nope): f"--cgroup {nope}: no such memory cgroup under /sys/fs/cgroup",
    }
    for args, why in cases.items():
        out = _cli("dump", "--duration", "0", *args)
        assert out.returncode == 1, out
        assert json.loads(out.stdout)["memcgs"] == []
        last = out.stderr.splitlines()[-1]
        assert last.startswith(f"netmemtrace: {why}"), out.stderr
        assert "Traceback" not in out.stderr
