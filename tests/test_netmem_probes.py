"""The netmem object's hooks: catalogue, verifier checks of the function probes (which cannot
attach on this kernel), and per-state availability derived from what attached."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import bpf_prog_ids

from netmemtrace.collect.netmem import (
    APP_HOOKS,
    ARGS_HOOKS,
    CORE_HOOKS,
    POOL_OBJECT_HOOKS,
    STATES,
    TYPES,
    head_pages_resolvable,
    shared_maps,
    unavailable_states,
)
from netmemtrace.kernel import abi, probes

OBJ = str(abi.object_path("netmem"))
TRACEPOINT_HOOKS = {"netif_receive_skb", "tcp_destroy_sock"}
SYSCALL_HOOKS = {"recvmsg_enter", "recvmsg_exit", "setsockopt_enter", "setsockopt_exit"}
FUNCTION_HOOKS = {"page_pool_alloc_netmems", "page_pool_put_unrefed_netmem", "napi_pp_put_page",
                  "tcp_recvmsg_dmabuf", "sock_devmem_dontneed", "sock_devmem_dontneed_exit",
                  "io_zcrx_queue_cqe", "io_pp_zc_alloc_netmems"}


def test_catalogue() -> None:
    hooks = probes.read_catalogue(OBJ)
    mechs = {name: [c.mechanism for c in h.candidates] for name, h in hooks.items()}
    for name in TRACEPOINT_HOOKS:
        assert mechs[name] == ["tp_btf", "raw_tp", "tracepoint"], name
    for name in SYSCALL_HOOKS:
        assert mechs[name] == ["tracepoint"], name   # never raw_syscalls: every syscall
    for name in FUNCTION_HOOKS:
        assert mechs[name] == ["fentry", "kprobe"], name
    for name in ARGS_HOOKS.values():
        assert mechs[name] == ["kprobe"], name       # fexit has its arguments already
    assert set(mechs) == TRACEPOINT_HOOKS | SYSCALL_HOOKS | FUNCTION_HOOKS | set(
        ARGS_HOOKS.values())
    assert hooks["tcp_recvmsg_dmabuf"].candidates[1].target == "tcp_recvmsg_dmabuf"
    # Every hook that a state depends on is in the object, or (the page_pool tracepoints,
    # one program per event for both domains) in the pagepool object, which has no other
    # program on those tracepoints.
    needed = {h for hs in CORE_HOOKS.values() for h in hs} | {
        h for hs in APP_HOOKS.values() for h in hs}
    assert needed - set(mechs) <= set(POOL_OBJECT_HOOKS)
    assert set(POOL_OBJECT_HOOKS) <= set(probes.read_catalogue(str(abi.object_path(
        "pagepool"))))


@pytest.mark.live
def test_kprobe_variants_pass_the_verifier() -> None:
    """fentry is refused here (EPERM, lockdown) and kprobes are compiled out, so none of the
    function probes can attach on this kernel; their kprobe/kretprobe programs must still
    load, i.e. pass the verifier, for the kernels where they do attach."""
    before = bpf_prog_ids()
    lo = probes.load_object("netmem", OBJ, force="kprobe", attach=False)
    try:
        loaded = {h.name for h in lo.hooks.values() if h.chosen}
        assert loaded == FUNCTION_HOOKS | set(ARGS_HOOKS.values())
        fds = [lo.obj.programs[lo.hooks[name].chosen.program].fd for name in loaded]
        assert all(fd >= 0 for fd in fds)
        # bpftool, independently, lists every one of them as loaded in the kernel.
        new = bpf_prog_ids() - before
        out = subprocess.run(["bpftool", "-j", "prog", "show"], check=True,
                             capture_output=True, text=True).stdout
        names = {p["name"] for p in json.loads(out) if p["id"] in new}
        assert {lo.hooks[n].chosen.program for n in loaded} <= names
    finally:
        lo.close()


@pytest.mark.live
def test_function_probes_fall_back_and_states_say_why() -> None:
    pool_lo = probes.load_object("pagepool", str(abi.object_path("pagepool")))
    lo = probes.load_object("netmem", OBJ, reuse=shared_maps(pool_lo))
    try:
        status = {s.hook: s for s in pool_lo.status() if s.hook in POOL_OBJECT_HOOKS}
        status.update({s.hook: s for s in lo.status()})
    finally:
        lo.close()
        pool_lo.close()
    for name in TRACEPOINT_HOOKS | SYSCALL_HOOKS | set(POOL_OBJECT_HOOKS):
        assert status[name].attached, (name, status[name].reason)
    unattached = {n for n in FUNCTION_HOOKS if not status[n].attached}
    if not probes.KPROBE_PMU.exists():
        # This kernel: no function probe can attach, and each says why per mechanism.
        assert unattached == FUNCTION_HOOKS
        for name in unattached:
            assert "CONFIG_KPROBES" in status[name].reason
            assert "fentry" in status[name].reason
    # A function this kernel lacks (io_uring zcrx before 6.15, devmem before 6.12) means no
    # netmem can take that path: the states it would move are moot, not unavailable, and
    # the hook says "not in this kernel". Checked against /proc/kallsyms, not the tool.
    kallsyms = {line.split()[2] for line in Path("/proc/kallsyms").read_text().splitlines()}
    absent = {n for n in unattached
              if n.removesuffix("_exit").removesuffix("_args") not in kallsyms}
    for name in absent:
        assert "not in this kernel" in status[name].reason, (name, status[name].reason)
    unattached -= absent
    missing = unavailable_states(status, head_pages_resolvable())
    for typ in TYPES:
        for state in STATES:
            if typ == "page" and state == "application":
                assert state not in missing.get(typ, {})   # pages never get there
                continue
            needs = set(CORE_HOOKS[state])
            if typ != "page" and state in ("stack", "application"):
                needs |= set(APP_HOOKS[typ])
            if needs & unattached:
                reason = missing[typ][state]
                assert any(n in reason for n in needs & unattached), reason


def test_netmem_structs_reach_python_from_btf() -> None:
    """Every struct netmem.bpf.c shares is declared once in netmemtrace.h and reaches
    Python through the object's BTF with the header's members, in order."""
    from test_abi import header_structs

    structs = header_structs()
    btf = abi.btf("netmem")
    for name in ("netmem_config", "netmem_entry", "netmem_transitions", "netmem_pool_counters",
                 "devmem_socket", "netmem_stats"):
        fields = [f for f, _ in btf.struct(name)._fields_ if not f.startswith("_pad")]
        assert fields == structs[name], name
