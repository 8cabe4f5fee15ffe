"""The memcg socket-memory programs on synthetic args: the cgroup v2 MEMCG_SOCK path with
BPF_PROG_TEST_RUN (this machine is cgroup v1, so the tracepoint never fires for sockets
here), and the function-probe variants through the verifier (they cannot attach here).

The memcg pointers are real: a test-only BPF task iterator reports the struct mem_cgroup of
processes the test put in child memory cgroups, so the CO-RE id reads run for real and the
ids are compared with the cgroup directories' inode numbers (independent of netmemtrace)."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import time

import pytest
from conftest import REPO, SLOW
from memcg_helpers import child_memcg

from netmemtrace.collect.memcg import FUNCTION_SOURCE, TRACEPOINT_SOURCE, MemcgReader
from netmemtrace.kernel import abi, libbpf, probes

pytestmark = pytest.mark.live


def memcg_sock_enum() -> int:
    """MEMCG_SOCK as the kernel's own BTF says (bpftool's C dump of vmlinux)."""
    text = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux",
                           "format", "c"], check=True, capture_output=True, text=True).stdout
    return int(re.search(r"\bMEMCG_SOCK = (\d+),", text).group(1))


@pytest.fixture(scope="module")
def task_memcgs(tmp_path_factory):
    """tgid -> (memcg address, cgroup id), from a BPF task iterator."""
    out = tmp_path_factory.mktemp("bpf") / "task_memcg.bpf.o"
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", "-D__TARGET_ARCH_x86",
                    f"-I{REPO / 'build'}", "-c", str(REPO / "tests/workloads/task_memcg.bpf.c"),
                    "-o", str(out)], check=True)

    def read() -> dict[int, tuple[int, int]]:
        with libbpf.Object(str(out)) as obj:
            obj.load()
            text = obj.attach("task_memcg").read_iter().decode()
        return {int(t): (int(m), int(c)) for t, m, c in (ln.split() for ln in text.splitlines())}
    return read


def run(lo, memcg: int, item: int, val: int) -> None:
    ctx = struct.pack("<Qqq", memcg, item, val)
    assert lo.obj.programs["mod_memcg_state__raw_tp"].test_run(ctx) == 0


def test_memcg_sock_charges_and_uncharges_per_memcg(task_memcgs) -> None:
    sock = memcg_sock_enum()
    with child_memcg("tr-a") as (dir_a, _), child_memcg("tr-b") as (dir_b, _):
        procs = [subprocess.Popen(["sh", "-c", f"echo $$ > {d}/cgroup.procs; exec sleep 30"])
                 for d in (dir_a, dir_b)]
        try:
            deadline = time.monotonic() + 5 * SLOW
            while True:
                seen = task_memcgs()
                ids = [seen.get(p.pid, (0, 0))[1] for p in procs]
                if ids == [os.stat(dir_a).st_ino, os.stat(dir_b).st_ino]:
                    break
                assert time.monotonic() < deadline, "processes never joined their memcgs"
                time.sleep(0.05)
            (mem_a, id_a), (mem_b, id_b) = (seen[p.pid] for p in procs)
            lo = probes.load_object("memcg", str(abi.object_path("memcg")), force="raw_tp",
                                    attach=False)
            try:
                for val in (5, 3, -2, -1, 7):
                    run(lo, mem_a, sock, val)
                run(lo, mem_a, sock + 1, 100)      # another statistic: ignored
                run(lo, mem_b, sock, 4)
                run(lo, 0, sock, 9)                # no memcg: counted as unresolved
                reader = MemcgReader(lo.obj)
                got = reader.read(TRACEPOINT_SOURCE)
                assert {k: (v.charged_pages, v.uncharged_pages) for k, v in got.items()} == {
                    id_a: (15, 3), id_b: (4, 0)}
                assert got[id_a].charged_pages - got[id_a].uncharged_pages == 12
                # The function-probe columns are separate: nothing was counted there.
                assert {(v.charged_pages, v.uncharged_pages)
                        for v in reader.read(FUNCTION_SOURCE).values()} == {(0, 0)}
                assert abi.Stats("memcg", lo.obj.map("memcg_stats")).read() == {
                    "memcg_map_full": 0, "memcg_unresolved": 1}
            finally:
                lo.close()
        finally:
            for p in procs:
                p.kill()
                p.wait()


def test_function_probe_variants_pass_the_verifier() -> None:
    lo = probes.load_object("memcg", str(abi.object_path("memcg")), force="kprobe",
                            attach=False)
    try:
        rows = {s.hook: s for s in lo.status()}
        for hook in ("sk_charge", "sk_charge_ret", "sk_uncharge", "charge_skmem",
                     "charge_skmem_ret", "uncharge_skmem"):
            assert rows[hook].mechanism == "kprobe"
            assert lo.obj.programs[f"{hook}__kprobe"].fd >= 0  # loaded: verifier accepted it
    finally:
        lo.close()


def test_probes_table_explains_why_socket_functions_are_off() -> None:
    """Each socket-charge hook the kernel has either attaches or says, per mechanism, why
    not (here fentry is refused and kprobes are compiled out; the guests attach them)."""
    lo = probes.load_object("memcg", str(abi.object_path("memcg")))
    try:
        rows = {s.hook: s for s in lo.status()}
        assert rows["mod_memcg_state"].attached or "not in this kernel" in \
            rows["mod_memcg_state"].reason
        for hook in ("sk_charge", "sk_uncharge", "charge_skmem", "uncharge_skmem"):
            if not rows[hook].attached:
                assert "fentry" in rows[hook].reason and "kprobe" in rows[hook].reason
        kernel = probes.Kernel()
        fentry = kernel.static_check(probes.Candidate("fentry", "x", "page_pool_destroy"))
        kprobe = kernel.static_check(probes.Candidate("kprobe", "x", "page_pool_destroy"))
        if fentry and kprobe:  # neither mechanism can run: nothing may claim to be attached
            assert not any(rows[h].attached for h in ("sk_charge", "sk_uncharge"))
    finally:
        lo.close()
