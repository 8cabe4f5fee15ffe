"""`make bench`: netmemtrace's overhead, measured side by side in one run.

1. per-event BPF run time of every netmemtrace program beside the empty-program floor and
   bpftrace (bpf_cost.py); 2. TCP goodput over veth + XDP without the tool, with it and with
   bpftrace (throughput.py); 3. the daemon's start-up, CPU, memory and /metrics render time
   (daemon.py); 4. one syscall's wall time with bpf_stats off, without and with the tool
   (syscall_cost.py: what tracing syscalls costs every process, which bpf_stats cannot see).
   Prints one table and writes everything to bench/results/ as JSON.

Needs root, like the tool. Takes about five minutes on 2 cores. Reports figures and how
they compare with the targets in bench/README.md; it never fails on a missed target.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

import bpf_cost
import daemon
import syscall_cost
import throughput
from common import RESULTS, BenchError

from netmemtrace.kernel.probes import SetupError
from netmemtrace.workload.demo import DemoError

Row = tuple[str, ...]

# Target name -> (limit, True if the measured value must be at most the limit).
TARGETS = {
    "per-event cost vs floor": (1.5, True),
    "per-event cost vs bpftrace": (0.5, True),
    "page_pool event, every program, vs one empty program": (1.3, True),
    "exec to ready vs bpftrace's": (1.0, True),
    "exec to ready (s)": (0.34, True),
    "throughput with tool vs without": (0.99, False),
    "throughput with tool vs without, from CPU cost": (0.99, False),
    "first snapshot (s)": (1.0, True),
    "CPU at 1 s refresh (% of one core)": (2.0, True),
    "scrape latency, fresh collection (ms)": (50.0, True),
    "RSS (MB)": (60.0, True),
}


# Per-event targets are budgets for the hot path: tracepoints that fire per page, per skb or
# per syscall. Rarer ones (pool destruction, process exit) are reported but not budgeted.
HOT_EVENTS_PER_ROUND = 1000


def _fmt(v: object, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def table(header: Row, rows: list[Row]) -> str:
    cells = [header, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


def _tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        return "not installed"
    return (out.stdout or out.stderr).splitlines()[0].strip() if out.stdout or out.stderr \
        else "?"


def bpf_section(res: dict) -> str:
    rows = [(r["tracepoint"], r["program"], r["mechanism"], str(r["events"]),
             _fmt(r["ns_per_event"]), _fmt(r["floor_ns"]["raw_tp"]),
             _fmt(r["floor_ns"]["tp_btf"]), _fmt(r["floor_ns"]["tracepoint"]),
             _fmt(r["bpftrace_ns"]), _fmt(r["x_floor"], 2), _fmt(r["x_bpftrace"], 2))
            for r in res["rows"]]
    head = ("TRACEPOINT", "PROGRAM", "MECH", "EVENTS", "NS/EV", "FLOOR raw_tp", "tp_btf",
            "tracepoint", "BPFTRACE", "x FLOOR", "x BPFTRACE")
    gib = ", ".join(f"{name} {v:.0f}" for name, v in res["packet_path_ms_per_gib"].items()
                    if v is not None)
    notes = "".join(f"\nnote: {n}" for n in res["notes"])
    return (f"1. Per-event BPF run time (ns, kernel bpf_stats; median of {res['rounds']} "
            "rounds, attach order rotated; x = ratio to the raw_tp floor / bpftrace)\n"
            + table(head, rows)
            + f"\nBPF run time on the packet path ({', '.join(res['packet_path_tracepoints'])})"
            f" per GiB received, ms: {gib}; every netmemtrace program on every tracepoint: "
            f"{_fmt(res.get('all_programs_ms_per_gib'))}{notes}")


def throughput_section(res: dict) -> str:
    rows = [(name, _fmt(res["median_gbps"][name], 2),
             _fmt(res["ratio"].get(name, 1.0), 3),
             "-" if name not in res["ratio_range"] else
             f"{res['ratio_range'][name][0]:.3f}..{res['ratio_range'][name][1]:.3f}",
             " ".join(f"{v:.2f}" for v in res["gbps"][name]))
            for name in res["gbps"]]
    return (f"2. TCP goodput, veth + native XDP, iperf3 -P {res['parallel']} -w "
            f"{res['window']}, {res['seconds_per_run']:g} s runs, {res['rounds']} rounds "
            f"interleaved; tool = {res['tool']} "
            f"(its CPU during traffic: {_fmt(res['tool_cpu_pct_during_traffic'])}% of a core)\n"
            + table(("CONFIG", "MEDIAN Gb/s", "RATIO", "RANGE", "PER ROUND Gb/s"), rows)
            + f"\nCPU per GiB received: the machine, bare {_fmt(res.get('bare_cpu_s_per_gib'), 2)}"
            f" s; the tool's process {_fmt(res.get('tool_cpu_s_per_gib'), 3)} s"
            + "".join(f"\nnote: {n}" for n in res["notes"]))


def syscall_section(res: dict) -> str:
    calls = list(next(iter(res["median_ns"].values())))
    rows = [(cfg, *(f"{res['median_ns'][cfg][c]:.1f}" for c in calls),
             *("-" if cfg == "without" else f"{res['added_ns'][cfg][c]:+.1f}" for c in calls))
            for cfg in res["median_ns"]]
    return (f"4. One syscall's wall time, bpf_stats off (bench/sysloop.c, best of 5 loops of "
            f"{res['calls_per_loop']} calls; median of {res['rounds']} interleaved rounds). "
            "getppid: watched by nothing; sendto: watched, no MSG_ZEROCOPY; getsockopt: "
            "TCP_ZEROCOPY_RECEIVE, followed to its exit\n"
            + table(("CONFIG", *(f"{c} NS" for c in calls), *(f"{c} ADDED" for c in calls)),
                    rows))


def daemon_section(res: dict) -> str:
    out = ["3. Daemon"]
    fs = res.get("first_snapshot", {})
    if "error" in fs:
        out.append(f"first snapshot: {fs['error']}")
    else:
        m = fs["median"]
        out.append(f"first snapshot (median of {len(fs['runs'])} fresh processes): "
                   f"Session()+read() {m['session_plus_read_s']:.2f} s "
                   f"(Session() {m['session_s']:.2f} s, first read() {m['first_read_s']:.3f}"
                   f" s); exec to ready {m['exec_to_ready_s']:.2f} s incl. imports "
                   f"{m['import_s']:.2f} s, CPU to ready {m['cpu_to_ready_s']:.2f} s; "
                   f"ready to exit (detaching) "
                   f"{m['ready_to_exit_s']:.2f} s; `top --batch` first frame "
                   f"{m['top_first_frame_s']:.2f} s (target < 1 s)")
        if m.get("x_bpftrace") is not None:
            out.append(f"exec to ready, side by side (interleaved): netmemtrace "
                       f"{m['exec_to_ready_s']:.2f} s, bpftrace (bench/pagepool.bt, exec to "
                       f"its BEGIN probe) {m['bpftrace_exec_to_ready_s']:.2f} s: "
                       f"{m['x_bpftrace']:.2f}x")
    for name, st in res.items():
        if not name.startswith("steady"):
            continue
        if "error" in st:
            out.append(f"{name}: {st['error']}")
            continue
        live = (f"; live /metrics {st['live_scrape_ms']:.1f} ms for "
                f"{st['live_scrape_series']} series" if "live_scrape_ms" in st else "")
        out.append(f"{st['tool']}: exec to ready {st['exec_to_ready_s']:.2f} s; CPU "
                   f"{st['cpu_pct_of_one_core']:.2f}% of one core "
                   f"({st['cpu_s_per_minute']:.2f} CPU-s/min); RSS {st['rss_mb']:.1f} MB "
                   f"(peak {st['peak_rss_mb']:.1f} MB){live}")
    sc = res.get("scrape", {})
    if "error" in sc or "skipped" in sc:
        out.append(f"/metrics render: {sc.get('error') or sc.get('skipped')}")
    else:
        rows = [(k, _fmt(v["collect_ms"]), _fmt(v["render_ms"]),
                 _fmt(v["prometheus_client_render_ms"]), _fmt(v["fresh_scrape_ms"]),
                 str(v["series"]), str(v["bytes"]))
                for k, v in sc.items() if isinstance(v, dict)]
        out.append(f"/metrics, synthetic {sc['pools']} pools + {sc['memcgs']} memcgs: per "
                   "refresh, COLLECT (families, once) + RENDER (per format scraped; "
                   "prometheus_client's encoder for comparison); FRESH SCRAPE: a whole scrape "
                   "over loopback HTTP, collecting and rendering afresh as serve does. Medians.")
        out.append(table(("EXPORT", "COLLECT MS", "RENDER MS", "PROM_CLIENT MS",
                          "FRESH SCRAPE MS", "SERIES", "BYTES"), rows))
    return "\n".join(out)


def implied_throughput(results: dict) -> float | None:
    """Goodput ratio a CPU-bound path would see: the machine's busy CPU per GiB received
    without the tool, against that plus every netmemtrace BPF program's run time per GiB
    (part 1; counting bpf_stats' own clock reads, so an upper bound on the cost) and the
    tool process's CPU per GiB (part 2). Unlike part 2's ratio, this is not drowned by the
    run-to-run noise of iperf3 on a shared VM."""
    bpf_ms = results.get("bpf_cost", {}).get("all_programs_ms_per_gib")
    tp = results.get("throughput", {})
    bare, tool = tp.get("bare_cpu_s_per_gib"), tp.get("tool_cpu_s_per_gib")
    if bpf_ms is None or not bare or tool is None:
        return None
    return bare / (bare + bpf_ms / 1000 + tool)


def targets(results: dict) -> list[tuple[str, str, float | None]]:
    """(target, what was measured, value) for every target the run could measure."""
    out: list[tuple[str, str, float | None]] = []
    bpf = results.get("bpf_cost", {})
    for r in bpf.get("rows", []):
        if r["events"] < HOT_EVENTS_PER_ROUND * bpf["rounds"]:
            continue  # once per pool, socket or process: listed in part 1, not budgeted
        if r["x_floor"] is not None:
            out.append(("per-event cost vs floor", f"{r['tracepoint']} {r['program']}",
                        r["x_floor"]))
        if r["x_bpftrace"] is not None:
            out.append(("per-event cost vs bpftrace", f"{r['tracepoint']} {r['program']}",
                        r["x_bpftrace"]))
    # What one page_pool event costs with every netmemtrace program on it, against one empty
    # program: the merged pagepool+netmem program is meant to be the only one.
    for tp_name in ("page_pool_state_hold", "page_pool_state_release"):
        mine = [r for r in bpf.get("rows", []) if r["tracepoint"] == tp_name
                and "--netmem-sample" not in r["program"]]
        total = next((r for r in mine if r["program"].startswith("= all")),
                     mine[0] if len(mine) == 1 else None)
        if total and total["ns_per_event"] and total["floor_ns"]["raw_tp"]:
            out.append(("page_pool event, every program, vs one empty program",
                        f"{tp_name}: {total['program']}",
                        total["ns_per_event"] / total["floor_ns"]["raw_tp"]))
    tp = results.get("throughput", {})
    if "netmemtrace" in tp.get("ratio", {}):
        # The bare run repeated: a ratio inside its spread is not resolved by this run.
        lo, hi = tp["ratio_range"]["without (A/A)"]
        out.append(("throughput with tool vs without",
                    f"{tp['tool']}; A/A noise {lo:.3f}..{hi:.3f}", tp["ratio"]["netmemtrace"]))
    implied = implied_throughput(results)
    if implied is not None:
        out.append(("throughput with tool vs without, from CPU cost",
                    "part 1's BPF time + the tool's CPU, per GiB, against the bare run's",
                    implied))
    dm = results.get("daemon", {})
    if "median" in dm.get("first_snapshot", {}):
        m = dm["first_snapshot"]["median"]
        out.append(("first snapshot (s)", "Session() + read()", m["session_plus_read_s"]))
        out.append(("exec to ready (s)", "bench/reader.py --once", m["exec_to_ready_s"]))
        if m.get("x_bpftrace") is not None:
            out.append(("exec to ready vs bpftrace's", "bpftrace: bench/pagepool.bt to BEGIN",
                        m["x_bpftrace"]))
    for name, st in dm.items():
        if name.startswith("steady") and "error" not in st:
            out.append(("CPU at 1 s refresh (% of one core)", st["tool"],
                        st["cpu_pct_of_one_core"]))
            out.append(("RSS (MB)", st["tool"], st["rss_mb"]))
    for k, v in dm.get("scrape", {}).items():
        # The target is for serve's default cap (about 10k series); the uncapped rows are
        # in part 3.
        if isinstance(v, dict) and "fresh_scrape_ms" in v and "max_cgroups=100 " in k:
            out.append(("scrape latency, fresh collection (ms)",
                        f"{k} ({v['series']} series)", v["fresh_scrape_ms"]))
    return out


def targets_section(results: dict) -> str:
    rows = []
    for name, what, value in targets(results):
        limit, at_most = TARGETS[name]
        met = value is not None and (value <= limit if at_most else value >= limit)
        rows.append((name, f"{'<=' if at_most else '>='} {limit:g}", what, _fmt(value, 2),
                     "met" if met else "MISSED"))
    return (f"Targets (per-event: tracepoints with >= {HOT_EVENTS_PER_ROUND} events per "
            "round)\n") + table(("TARGET", "LIMIT", "MEASURED ON", "VALUE", ""), rows)


PARTS: dict[str, tuple[Callable[[argparse.Namespace], dict], Callable[[dict], str]]] = {
    "bpf_cost": (lambda a: bpf_cost.run(a.bpf_rounds), bpf_section),
    "throughput": (lambda a: throughput.run(a.throughput_rounds), throughput_section),
    "daemon": (lambda a: daemon.run(), daemon_section),
    "syscalls": (lambda a: syscall_cost.run(a.syscall_rounds), syscall_section),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    p.add_argument("--bpf-rounds", type=int, default=3)
    p.add_argument("--throughput-rounds", type=int, default=5)
    p.add_argument("--syscall-rounds", type=int, default=3)
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (BPF, network namespaces)", file=sys.stderr)
        return 2
    results: dict = {
        "started_unix_s": time.time(), "host": platform.node(), "kernel": platform.release(),
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "bpftrace": _tool_version(["bpftrace", "--version"]),
        "iperf3": _tool_version(["iperf3", "--version"]),
        # Other load on the machine shifts every figure; the load average says how much.
        "loadavg_start": os.getloadavg(),
    }
    sections = []
    for name in args.parts:
        measure, render = PARTS[name]
        started = time.monotonic()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        try:
            results[name] = measure(args)
            sections.append(render(results[name]))
        except (BenchError, DemoError, SetupError, OSError) as exc:
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            sections.append(f"{name}: could not run: {exc}")
            traceback.print_exc()
        results[name]["elapsed_s"] = time.monotonic() - started
    results["loadavg_end"] = os.getloadavg()
    sections.append(targets_section(results))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(results["started_unix_s"]))
    path = RESULTS / f"bench-{stamp}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    (RESULTS / "latest.json").write_text(path.read_text())
    print(f"{results['host']}  kernel {results['kernel']}  {results['cpus']} CPUs  "
          f"load average {results['loadavg_start'][0]:.2f} -> {results['loadavg_end'][0]:.2f}"
          f"  ({results['bpftrace']}, {results['iperf3']})\n")
    print("\n\n".join(sections))
    print(f"\nresults: {path.relative_to(RESULTS.parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
