"""Part 3: the daemon's own cost. Start-up to the first complete snapshot, CPU time and
memory at a 1 s refresh, and for a large synthetic host (1k page pools, 10k memory cgroups)
fed to the exporter's Collector: the work per snapshot refresh (collect, render per format)
and the latency of a scrape (the cached body over loopback HTTP), as serve pays them.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from common import BENCH, BenchError, Tool, http_get, serve_available

from netmemtrace.kernel.probes import ProbeStatus
from netmemtrace.snapshot import (
    KernelPoolView,
    MemcgSnapshot,
    PoolSnapshot,
    ProcessSnapshot,
    SelfStats,
    Snapshot,
    Unavailable,
    ZerocopyStats,
)

STARTS = 3
STEADY_S = 30.0
WARMUP_S = 3.0
SCRAPES = 5
SYNTHETIC_POOLS = 1000
SYNTHETIC_MEMCGS = 10_000


def bpftrace_start() -> float | None:
    """Exec of bpftrace with the page_pool script (bench/pagepool.bt) to its BEGIN probe,
    which bpftrace runs once every probe is attached; None without bpftrace."""
    with tempfile.NamedTemporaryFile("w", suffix=".bt") as script:
        script.write('BEGIN { printf("ready\\n"); }\n' + (BENCH / "pagepool.bt").read_text())
        script.flush()
        start = time.monotonic()
        try:
            proc = subprocess.Popen(["bpftrace", script.name], stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True)
        except FileNotFoundError:
            return None
        assert proc.stdout is not None
        while (line := proc.stdout.readline()) and not line.startswith("ready"):
            pass
        took = time.monotonic() - start
        proc.stdout.close()  # its map dump at exit goes nowhere
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if not line:
        raise BenchError("bpftrace exited before its BEGIN probe ran")
    return took


def first_snapshot() -> dict[str, object]:
    """Fresh processes: exec -> imports -> Session() -> first read() complete; bpftrace's
    exec -> attached in the same rounds, interleaved."""
    runs = []
    for _ in range(STARTS):
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, str(BENCH / "reader.py"), "--once"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        ready = time.monotonic() - start
        _, err = proc.communicate(timeout=120)
        exited = time.monotonic() - start
        if not line.startswith("ready"):
            raise BenchError(f"reader.py --once failed: {err.strip()[-300:]}")
        imp, sess, read, cpu = map(float, line.split()[1:])
        runs.append({"import_s": imp, "session_s": sess, "first_read_s": read,
                     "session_plus_read_s": sess + read, "exec_to_ready_s": ready,
                     "cpu_to_ready_s": cpu,
                     "ready_to_exit_s": exited - ready, "top_first_frame_s": top_first_frame(),
                     "bpftrace_exec_to_ready_s": bpftrace_start()})
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]
              if all(r[k] is not None for r in runs)}
    median["x_bpftrace"] = statistics.median(
        r["exec_to_ready_s"] / r["bpftrace_exec_to_ready_s"] for r in runs
    ) if "bpftrace_exec_to_ready_s" in median else None
    return {"runs": runs, "median": median}


def _reader_once(checkout: Path) -> dict[str, float]:
    """One `bench/reader.py --once` of a checkout (its own package first on the path):
    exec to its ready line, and the CPU (user + system, every thread) of the whole process,
    exec to exit, from wait4."""
    env = dict(os.environ, PYTHONPATH=str(checkout))
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(checkout / "bench/reader.py"), "--once"],
                            cwd=checkout, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    ready = time.monotonic() - start
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if not line.startswith("ready"):
        raise BenchError(f"{checkout}: reader.py --once failed (exit {proc.returncode})")
    fields = [float(f) for f in line.split()[1:]]
    return {"exec_to_ready_s": ready, "session_s": fields[1],
            "cpu_exec_to_exit_s": usage.ru_utime + usage.ru_stime}


def start_ab(baseline: Path, rounds: int) -> dict[str, object]:
    """Start-up of this checkout against another (e.g. main before a change), fresh
    processes interleaved, the order alternating per round: medians and every run."""
    here = BENCH.parent
    runs: dict[str, list[dict[str, float]]] = {"baseline": [], "this": []}
    for i in range(rounds):
        order = [("baseline", baseline), ("this", here)]
        for name, checkout in order if i % 2 == 0 else reversed(order):
            runs[name].append(_reader_once(checkout))
    median = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
              for name, rs in runs.items()}
    return {"baseline": str(baseline), "runs": runs, "median": median}


def top_first_frame() -> float:
    """Exec of `netmemtrace top --batch` to its first line on stdout (issue 6: < 1 s)."""
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "netmemtrace.cli", "top", "--batch",
                             "--count", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stdout.readline() if proc.stdout else b""
    took = time.monotonic() - start
    proc.wait(timeout=30)
    if not line:
        raise BenchError(f"top --batch printed nothing: {proc.stderr.read().decode()[-300:]}")
    return took


def steady_state(use_serve: bool) -> dict[str, object]:
    """CPU and memory of the tool refreshing every 1 s, over STEADY_S after a warm-up."""
    with Tool(interval=1.0, use_serve=use_serve) as tool:
        time.sleep(WARMUP_S)
        u0, t0 = tool.usage(), time.monotonic()
        time.sleep(STEADY_S)
        u1, t1 = tool.usage(), time.monotonic()
        result: dict[str, object] = {
            "tool": "serve --interval 1" if use_serve else "bench/reader.py --interval 1",
            "exec_to_ready_s": tool.ready_s,
            "cpu_pct_of_one_core": (u1.cpu_s - u0.cpu_s) / (t1 - t0) * 100,
            "cpu_s_per_minute": (u1.cpu_s - u0.cpu_s) / (t1 - t0) * 60,
            "rss_mb": u1.rss_bytes / 2**20,
            "peak_rss_mb": u1.hwm_bytes / 2**20,
        }
        if use_serve:
            lat = []
            for _ in range(SCRAPES):
                s = time.monotonic()
                body = http_get(tool.url + "/metrics")
                lat.append(time.monotonic() - s)
            result["live_scrape_ms"] = statistics.median(lat) * 1000
            result["live_scrape_series"] = _series(body.decode())
    return result


def _series(text: str) -> int:
    return sum(1 for ln in text.splitlines() if ln and not ln.startswith("#"))


def synthetic_snapshot(n_pools: int = SYNTHETIC_POOLS,
                       n_memcgs: int = SYNTHETIC_MEMCGS) -> Snapshot:
    """A large host: n_pools page pools on 16 NICs, n_memcgs Kubernetes container memcgs."""
    pools = []
    for i in range(n_pools):
        zombie = i % 50 == 49
        inflight = 700 + i % 300
        pools.append(PoolSnapshot(
            pool_addr=0xFFFF888100000000 + i * 0x800, pool_id=i + 1, ifindex=2 + i // 64,
            netdev=f"eth{i // 64}", netns="host", napi_id=8192 + i, provider="host",
            page_order=0, page_size_bytes=4096, numa_node=i // 500,
            state="zombie" if zombie else "active",
            hold_pages_total=10_000_000 + i, hold_net_iovs_total=0,
            release_pages_total=10_000_000 + i - inflight, release_net_iovs_total=0,
            kernel_hold_cnt=(10_000_000 + i) % 2**32,
            kernel_release_cnt=(10_000_000 + i - inflight) % 2**32,
            inflight_pages=inflight, inflight_bytes=inflight * 4096,
            first_seen_age_ns=3600 * 10**9, last_event_age_ns=10**6,
            destroy_age_ns=None, zombie_age_ns=600 * 10**9 if zombie else None,
            release_calls=12 if zombie else 0,
            kernel_inflight_at_release=inflight if zombie else None,
            kernel_hold_at_release=None, kernel_release_at_release=None,
            kernel=KernelPoolView(inflight, inflight * 4096,
                                  1_700_000_000 if zombie else None, None)))
    zc = ZerocopyStats(
        rx_calls=1000, rx_errors=0, rx_mapped_bytes=1 << 30, rx_mapped_pages=1 << 18,
        rx_copied_bytes=1 << 20, rx_skip_hint_bytes=0, rx_sock_errors=0, rx_read_faults=0,
        rx_zerocopy_ratio=0.999, tx_zc_calls=0, tx_zc_bytes=0, tx_zc_errors=0,
        tx_zc_ignored_calls=0, tx_notifications=0, tx_completed_sends=0, tx_copied_sends=0,
        tx_inflight_bytes=0)
    memcgs = []
    for i in range(n_memcgs):
        pod, ctr = f"{i:08x}-0000-4000-8000-{i:012x}", f"{i:064x}"
        memcgs.append(MemcgSnapshot(
            cgroup_id=10_000 + i, hierarchy="v2",
            path=f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
                 f"{pod.replace('-', '_')}.slice/cri-containerd-{ctr}.scope",
            runtime="containerd", container_id=ctr, pod_uid=pod, qos_class="burstable",
            systemd_unit=None, sock_event_source="tracepoint",
            sock_charged_pages_total=5000 + i, sock_uncharged_pages_total=4000 + i,
            sock_net_charged_since_attach_bytes=1000 * 4096,
            sock_charged_now_bytes=(i % 997) * 4096, sock_charged_now_source="memory.stat",
            zerocopy=zc, zerocopy_unaccounted_bytes=(i % 13) * 4096,
            zerocopy_unaccounted_hwm_bytes=(i % 13) * 8192,
            zerocopy_oldest_mapped_age_ns=None, would_be_charged_bytes=(i % 997 + 13) * 4096,
            processes=(ProcessSnapshot(
                pid=100_000 + i, comm="app", memcg_id=10_000 + i, zerocopy=zc,
                zerocopy_unaccounted_bytes=(i % 13) * 4096,
                zerocopy_unaccounted_hwm_bytes=(i % 13) * 8192,
                zerocopy_oldest_mapped_age_ns=None,
                smaps_socket_rss_bytes=Unavailable("not receiving zerocopy"),
                ledger_vs_smaps_bytes=Unavailable("not receiving zerocopy")),)))
    probes = tuple(ProbeStatus("pagepool", f"hook{i}", "tp_btf", True, "") for i in range(20))
    progs = {f"prog{i}__tp_btf": 10**9 + i for i in range(20)}
    return Snapshot(
        taken_monotonic_ns=time.monotonic_ns(), taken_unix_s=time.time(), host="synthetic",
        kernel_release="6.18.0", probes=probes, pools=tuple(pools),
        self_stats=SelfStats(snapshot_build_ns=50_000_000, prog_run_time_ns=progs,
                             prog_run_cnt=progs),
        memcgs=tuple(memcgs))


def _median_ms(work: Callable[[], object], runs: int = SCRAPES) -> float:
    times = []
    for _ in range(runs):
        s = time.perf_counter()
        work()
        times.append(time.perf_counter() - s)
    return statistics.median(times) * 1000


def _variant(url: str, collectors: list, accept: str) -> dict[str, object]:
    """Costs of one format for the collectors, and a scrape of it from url, which collects
    and renders afresh as serve does (SnapshotCache.fresh over an Expositions)."""
    from prometheus_client.exposition import choose_encoder

    from netmemtrace.commands.serve import Exposition

    encoder, content_type = choose_encoder(accept)
    collect_ms = _median_ms(lambda: Exposition(collectors, {}))
    exposition = Exposition(collectors, {(content_type, False): encoder})
    request = urllib.request.Request(url, headers={"Accept": accept})

    def scrape() -> None:
        with urllib.request.urlopen(request, timeout=30) as resp:
            resp.read()

    body = exposition.body(content_type, encoder, False)
    scrape()  # the first scrape of a format renders it; later reads render it ahead
    return {
        "collect_ms": collect_ms,
        "render_ms": _median_ms(lambda: Exposition(
            collectors, {(content_type, False): encoder})) - collect_ms,
        "prometheus_client_render_ms": _median_ms(lambda: encoder(collectors[0])) - collect_ms,
        "fresh_scrape_ms": _median_ms(scrape, SCRAPES),
        "series": _series(body.decode()), "bytes": len(body)}


def scrape_render() -> dict[str, object]:
    """What a scrape of `serve` costs for the synthetic snapshot: collecting the families,
    rendering the format (netmemtrace's encoder; prometheus_client's own for comparison),
    and the whole scrape over loopback HTTP with that fresh collection (FRESH)."""
    try:
        from netmemtrace.commands.serve import (
            OPENMETRICS_ACCEPT,
            Expositions,
            Health,
            SnapshotCache,
        )
        from netmemtrace.commands.serve import _routes as routes
        from netmemtrace.http.server import ExporterServer
        from netmemtrace.http.webconfig import WebConfig
        from netmemtrace.views.prometheus.collector import SnapshotCollector
    except ImportError as exc:
        return {"skipped": f"netmemtrace.commands.serve not importable: {exc}"}

    snap = synthetic_snapshot()
    result: dict[str, object] = {"pools": SYNTHETIC_POOLS, "memcgs": SYNTHETIC_MEMCGS}
    # The default cgroup cap of serve, and no cap (every cgroup exported).
    for label, max_cgroups in (("max_cgroups=100", 100), ("max_cgroups=10000", 10_000)):
        collectors = [SnapshotCollector(lambda: snap, max_cgroups=max_cgroups)]
        cache = SnapshotCache(Expositions(collectors))
        server = ExporterServer("127.0.0.1", 0, WebConfig())
        routes(server, cache, Health(cache, 5.0, threading.Event()))
        server.start()
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        try:
            for fmt, accept in (("text", ""), ("openmetrics", OPENMETRICS_ACCEPT)):
                result[f"{label} {fmt}"] = _variant(url, collectors, accept)
        finally:
            server.shutdown()
    return result


def run() -> dict[str, object]:
    """Each measurement on its own: one that cannot run is reported, the others still are."""
    tools = [True, False] if serve_available() else [False]
    steps = {"first_snapshot": first_snapshot, "scrape": scrape_render,
             **{f"steady {'serve' if t else 'reader'}": (lambda t=t: steady_state(t))
                for t in tools}}
    result: dict[str, object] = {}
    for name, step in steps.items():
        try:
            result[name] = step()
        except (BenchError, OSError, TypeError) as exc:
            # TypeError: the snapshot dataclasses changed under the synthetic builder.
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Start-up A/B: `bench/reader.py --once` of this "
                                "checkout and of BASELINE (a checkout with its BPF objects "
                                "built), interleaved.")
    p.add_argument("baseline", type=Path)
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    ab = start_ab(args.baseline.resolve(), args.rounds)
    print("CHECKOUT  EXEC->READY S  SESSION() S  CPU EXEC->EXIT S  PER ROUND: READY / CPU")
    for name, m in ab["median"].items():
        per = " ".join(f"{r['exec_to_ready_s']:.2f}/{r['cpu_exec_to_exit_s']:.2f}"
                       for r in ab["runs"][name])
        print(f"{name:9} {m['exec_to_ready_s']:13.3f} {m['session_s']:12.3f} "
              f"{m['cpu_exec_to_exit_s']:16.3f}  {per}")
