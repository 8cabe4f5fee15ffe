"""Part 2: TCP goodput over veth + native XDP (iperf3 in the demo namespaces) with nothing
attached, with netmemtrace running as a user runs it (bench/common.Tool, 1 s refresh), and
with the bpftrace equivalent. Runs of the configurations alternate within each round (the
order rotates from round to round); ratios to the bare run of the same round, median over
rounds.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

from bpf_cost import BPFTRACE_SCRIPT
from common import BenchError, Bpftrace, Tool, iperf3, serve_available

from netmemtrace.workload.demo import VethTopology

SECONDS = 5.0
PARALLEL = 4
WINDOW = "4M"
_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (every state but idle, iowait and steal:
    steal is the hypervisor's, not ours), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle, iowait, steal = fields[3], fields[4], fields[7]
    # guest and guest_nice (fields 8, 9) are already inside user and nice.
    return (sum(fields[:8]) - idle - iowait - steal) * _TICK_S


def run(rounds: int = 5) -> dict[str, object]:
    notes: list[str] = []
    use_serve = serve_available()
    if not use_serve:
        notes.append("`netmemtrace serve` not in the CLI: the tool is bench/reader.py "
                     "(a Session read every 1 s)")
    tool_cpu: list[float] = []  # % of one core over each run with the tool
    tool_cpu_s: list[float] = []  # its CPU seconds over each run

    class _ToolRun:
        """The tool for one iperf3 run; its CPU time over the run is kept."""

        def __enter__(self) -> None:
            nonlocal use_serve
            try:
                self.tool = Tool(interval=1.0, use_serve=use_serve)
            except BenchError as exc:
                if not use_serve:
                    raise
                notes.append(f"serve failed, fell back to bench/reader.py: {exc}")
                use_serve = False
                self.tool = Tool(interval=1.0, use_serve=False)
            self.cpu0, self.t0 = self.tool.usage().cpu_s, time.monotonic()

        def __exit__(self, *exc: object) -> None:
            cpu = self.tool.usage().cpu_s - self.cpu0
            tool_cpu.append(cpu / (time.monotonic() - self.t0) * 100)
            tool_cpu_s.append(cpu)
            self.tool.close()

    class _BpftraceRun:
        def __enter__(self) -> None:
            self.bt = Bpftrace(BPFTRACE_SCRIPT)

        def __exit__(self, *exc: object) -> None:
            self.bt.close()

    # "without (A/A)" repeats the bare run: its ratio's spread is the noise of the method on
    # this machine, the resolution at which the other ratios mean something.
    configs: list[tuple[str, Callable[[], AbstractContextManager[None]]]] = [
        ("without", nullcontext), ("netmemtrace", _ToolRun), ("without (A/A)", nullcontext),
        ("bpftrace", _BpftraceRun)]
    try:
        Bpftrace(BPFTRACE_SCRIPT).close()
    except BenchError as exc:
        notes.append(f"no bpftrace runs: {exc}")
        configs = [c for c in configs if c[0] != "bpftrace"]
    bps: dict[str, list[float]] = {name: [] for name, _ in configs}
    gib: dict[str, list[float]] = {name: [] for name, _ in configs}
    bare_cpu_s_per_gib: list[float] = []  # the machine's, while nothing is attached
    with VethTopology() as topo:
        iperf3(topo, 1.0, PARALLEL, WINDOW)  # warm-up: first-connection costs, pool fill
        for r in range(rounds):
            for name, ctx in configs[r % len(configs):] + configs[:r % len(configs)]:
                with ctx():
                    busy0 = busy_cpu_s()
                    rate, nbytes = iperf3(topo, SECONDS, PARALLEL, WINDOW)
                    busy = busy_cpu_s() - busy0
                bps[name].append(rate)
                gib[name].append(nbytes / 2**30)
                if ctx is nullcontext:
                    bare_cpu_s_per_gib.append(busy / (nbytes / 2**30))
    base = bps["without"]
    result: dict[str, object] = {
        "rounds": rounds, "seconds_per_run": SECONDS, "parallel": PARALLEL, "window": WINDOW,
        "tool": "serve --interval 1" if use_serve else "bench/reader.py --interval 1",
        "gbps": {name: [v / 1e9 for v in vals] for name, vals in bps.items()},
        "median_gbps": {name: statistics.median(vals) / 1e9 for name, vals in bps.items()},
        "ratio": {name: statistics.median(v / b for v, b in zip(vals, base, strict=True))
                  for name, vals in bps.items() if name != "without"},
        "ratio_range": {name: (min(v / b for v, b in zip(vals, base, strict=True)),
                               max(v / b for v, b in zip(vals, base, strict=True)))
                        for name, vals in bps.items() if name != "without"},
        "tool_cpu_pct_during_traffic": statistics.median(tool_cpu) if tool_cpu else None,
        # What the traffic costs the machine, and what the tool's process adds per GiB: with
        # part 1's BPF time per GiB, the throughput cost a CPU-bound path pays for the tool,
        # without this method's run-to-run noise.
        "bare_cpu_s_per_gib": statistics.median(bare_cpu_s_per_gib),
        "tool_cpu_s_per_gib": statistics.median(
            c / g for c, g in zip(tool_cpu_s, gib.get("netmemtrace", []), strict=True))
        if tool_cpu_s else None,
        "notes": notes,
    }
    return result
