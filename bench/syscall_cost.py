"""Part 4: what one syscall costs the machine while netmemtrace runs, with bpf_stats off.

bpf_stats times only the inside of a BPF program. Tracing syscalls also switches every thread
of the machine to the kernel's syscall tracing slow path, and a per-syscall tracepoint builds
its record before the program runs; neither shows in part 1. bench/sysloop.c times loops of
getppid() (nothing watches it), sendto() without MSG_ZEROCOPY (watched, let go at once) and
getsockopt(TCP_ZEROCOPY_RECEIVE) (followed to its exit), without the tool and with
`netmemtrace serve`, interleaved; the bare loop run twice (A/A) gives the noise. Nothing else
may trace syscalls meanwhile.
"""

from __future__ import annotations

import statistics

import common
from common import BENCH, BUILD, Tool, serve_available

SYSCALLS = ("getppid", "sendto", "getsockopt")
CALLS = 1_000_000


def compile_sysloop() -> str:
    out = BUILD / "sysloop"
    out.parent.mkdir(parents=True, exist_ok=True)
    common.run(["clang", "-O2", "-Wall", "-Werror", str(BENCH / "sysloop.c"), "-o", str(out)])
    return str(out)


def _loop(binary: str) -> dict[str, float]:
    return {name: float(common.run([binary, name, str(CALLS)])) for name in SYSCALLS}


def run(rounds: int = 3) -> dict[str, object]:
    binary = compile_sysloop()
    ns: dict[str, dict[str, list[float]]] = {
        cfg: {s: [] for s in SYSCALLS} for cfg in ("without", "netmemtrace", "without (A/A)")}
    for r in range(rounds):
        order = ["without", "netmemtrace", "without (A/A)"]
        for cfg in order[r % 3:] + order[:r % 3]:
            if cfg == "netmemtrace":
                tool = Tool(interval=1.0, use_serve=serve_available())
                try:
                    got = _loop(binary)
                finally:
                    tool.close()
            else:
                got = _loop(binary)
            for s in SYSCALLS:
                ns[cfg][s].append(got[s])
    median = {cfg: {s: statistics.median(v) for s, v in per.items()} for cfg, per in ns.items()}
    return {
        "rounds": rounds, "calls_per_loop": CALLS, "ns_per_call": ns, "median_ns": median,
        "added_ns": {cfg: {s: median[cfg][s] - median["without"][s] for s in SYSCALLS}
                     for cfg in median if cfg != "without"},
    }
