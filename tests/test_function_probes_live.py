"""Function probes for real: with fentry, then with kprobes forced (--mechanisms), every
function hook whose function the kernel has attaches with that mechanism, and the hooks a
veth TCP stream, socket traffic in a memory cgroup and the pool's teardown must run do run
(bpf_stats run counts, the kernel's own). On this CI host fentry is refused (lockdown) and
kprobes are compiled out: there each case is an expected failure saying so; the kernel
matrix (`make test-kernels`) runs it where they work."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SLOW, VETH_PAGE_POOL, kernel_version
from memcg_helpers import HIERARCHY, child_cgroup_v2

from netmemtrace.kernel import probes
from netmemtrace.session import Session
from netmemtrace.workload import demo

pytestmark = pytest.mark.live

STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
# What the workload below must make the kernel run, per object: hook names (any of them).
MUST_RUN = {
    "pagepool": {"page_pool_destroy"},
    "netmem": {"page_pool_alloc_netmems"},
    # mem_cgroup_charge_skmem until 7.x, mem_cgroup_sk_charge after ("memcg: ...").
    "memcg": {"charge_skmem", "sk_charge", "uncharge_skmem", "sk_uncharge"},
}
VETH_POOLS = kernel_version() >= VETH_PAGE_POOL
LOOPBACK_IN_CGROUP = """
import os, socket, sys
open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
srv = socket.create_server(("127.0.0.1", 0))
cli = socket.create_connection(srv.getsockname())
conn, _ = srv.accept()
cli.sendall(b"x" * (1 << 20)); got = 0
while got < 1 << 20:
    got += len(conn.recv(1 << 16))
print(got)
"""


def refusal(mechanism: str) -> str | None:
    """Why this kernel cannot run the mechanism at all, found the way the tool finds it."""
    kernel = probes.Kernel()
    cand = probes.Candidate(mechanism, f"x__{mechanism}", "page_pool_destroy")
    why = kernel.static_check(cand)
    return why if why and "not in this kernel" not in why else None


@contextlib.contextmanager
def bpf_stats() -> Iterator[None]:
    before = STATS.read_text().strip()
    STATS.write_text("1")
    try:
        yield
    finally:
        STATS.write_text(before)


@contextlib.contextmanager
def own_memcg() -> Iterator[Path | None]:
    """A memory cgroup of our own where that is cgroup v2; None on v1 (its hierarchies here
    are the supervisor's)."""
    if HIERARCHY != "v2":
        yield None
        return
    with child_cgroup_v2("fprobe") as (path, _rel):
        yield path


@pytest.mark.parametrize("mechanism", ["fentry", "kprobe"])
def test_function_probes_attach_and_run(mechanism: str) -> None:
    if why := refusal(mechanism):
        pytest.xfail(f"{mechanism} cannot run on this kernel: {why}")
    allowed = f"tp_btf,raw_tp,tracepoint,{mechanism}"
    with bpf_stats(), Session(mechanisms=allowed) as session:
        function_hooks = {}
        for lo in session.loaded:
            for hook in lo.hooks.values():
                mechs = {c.mechanism for c in hook.candidates}
                if mechanism not in mechs or hook.off or mechs & {"tp_btf", "raw_tp",
                                                                   "tracepoint"}:
                    continue  # not a function hook, or off by choice
                if hook.attached:
                    assert hook.chosen and hook.chosen.mechanism == mechanism, hook
                    function_hooks[(lo.name, hook.name)] = hook.chosen.program
                else:
                    assert "not in this kernel" in hook.reason, (lo.name, hook.name, hook.reason)
        assert function_hooks, "no function hook attached"
        with own_memcg() as memcg:
            if memcg is not None:
                out = subprocess.run([sys.executable, "-c", LOOPBACK_IN_CGROUP, str(memcg)],
                                     capture_output=True, text=True, timeout=120 * SLOW, check=True)
                assert int(out.stdout) == 1 << 20
            if VETH_POOLS:
                with demo.VethTopology() as topo:
                    assert demo.tcp_stream(topo, 4 << 20) == 4 << 20
        runs = session.read().self_stats.prog_run_cnt
    assert isinstance(runs, dict)
    ran = {key for key, prog in function_hooks.items() if runs.get(prog, 0) > 0}
    for obj, hooks in MUST_RUN.items():
        if obj == "memcg" and memcg is None:
            continue
        if obj != "memcg" and not VETH_POOLS:
            continue
        present = {h for (o, h) in function_hooks if o == obj} & hooks
        assert present, f"{obj}: none of {sorted(hooks)} attached"
        assert {(obj, h) for h in present} & ran, f"{obj}: {sorted(present)} never ran"
