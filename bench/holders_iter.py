"""Cost of naming the holders of zombie page pools (bpf/holders.bpf.c).

The holder iterators run only from Session.read() and only while a zombie pool exists. This
times HoldersCollector.annotate() (the holders step of read()), side by side:
  - with no zombie: a check of the pools, no iterator runs;
  - with a zombie held by a never-reading TCP socket (the dangling-socket scenario): the
    whole scan (every netns, every TCP/UDP socket, every CPU's deferred-free list), then the
    socket owners (/proc) and the attribution; with --bpf-stats also the kernel's run time
    of each iterator program;
  - the same with --sockets N idle loopback connections added, since every socket is visited.

Usage (root): .venv/bin/python bench/holders_iter.py [--reads 20] [--sockets 1000] [--bpf-stats]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import dataclasses
import json
import os
import socket
import statistics
import time
from collections.abc import Iterator

from netmemtrace.collect.holders import ITERATORS, HoldersCollector, is_zombie
from netmemtrace.kernel import abi, probes
from netmemtrace.session import Session
from netmemtrace.snapshot import PoolSnapshot
from netmemtrace.workload import demo

BPF_STATS_RUN_TIME = 0


@contextlib.contextmanager
def bpf_stats(enable: bool) -> Iterator[None]:
    """Programs' run time on for the run, through BPF_ENABLE_STATS: reference-counted by the
    kernel and dropped with the fd, so it never clobbers kernel.bpf_stats_enabled as set by
    anyone else."""
    fd = -1
    if enable:
        lib = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)
        fd = lib.bpf_enable_stats(BPF_STATS_RUN_TIME)
        if fd < 0:
            raise OSError(-fd, f"bpf_enable_stats: {os.strerror(-fd)}")
    try:
        yield
    finally:
        if fd >= 0:
            os.close(fd)


@contextlib.contextmanager
def idle_connections(n: int) -> Iterator[None]:
    """n established loopback TCP connections (2n sockets) that carry nothing."""
    socks: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0), backlog=max(n, 1)) as server:
        try:
            for _ in range(n):
                socks.append(socket.create_connection(server.getsockname()))
                socks.append(server.accept()[0])
            yield
        finally:
            for s in socks:
                s.close()


def iterator_stats(lo: probes.LoadedObject) -> dict[str, tuple[int, int]]:
    """Program name -> (run_time_ns, run_cnt), cumulative, for the holders iterators."""
    return {link.program.name: (st.run_time_ns, st.run_cnt)
            for link in lo.obj.links if link.program.name in ITERATORS
            for st in (link.program.stats(),)}


def measure(lo: probes.LoadedObject, collector: HoldersCollector, pools: list[PoolSnapshot],
            runs: int) -> dict[str, object]:
    """annotate() (what Session.read() adds for holders) timed `runs` times on these pools."""
    before = iterator_stats(lo)
    total, scan = [], []
    for _ in range(runs):
        last = collector.last_scan
        start = time.perf_counter()
        collector.annotate(pools)
        total.append((time.perf_counter() - start) * 1e3)
        ran = collector.last_scan is not None and collector.last_scan is not last
        scan.append(collector.last_scan.duration_ns / 1e6 if ran else 0.0)  # type: ignore[union-attr]
    # An iterator program runs once per object (socket) and once at the end of each pass.
    scans = sum(1 for t in scan if t)
    per_prog = {}
    for name, (t1, c1) in iterator_stats(lo).items():
        t0, c0 = before.get(name, (0, 0))
        if c1 > c0 and scans:
            per_prog[name] = {"us_per_scan": round((t1 - t0) / scans / 1e3, 1),
                              "ns_per_call": (t1 - t0) // (c1 - c0)}
    return {"annotate": summary(total), "scan": summary(scan),
            "iterators": per_prog, "last_scan": collector.last_scan}


def summary(values: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(values), 3), "max_ms": round(max(values), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reads", type=int, default=20)
    ap.add_argument("--sockets", type=int, default=1000,
                    help="idle loopback connections for the scaling row (0: skip)")
    ap.add_argument("--bpf-stats", action="store_true",
                    help="collect programs' run time during the run (BPF_ENABLE_STATS)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results: dict[str, dict[str, object]] = {}
    lo = probes.load_object("holders", str(abi.object_path("holders")))
    collector = HoldersCollector(lo.obj)
    try:
        with bpf_stats(args.bpf_stats), Session() as session:
            # Other zombies on the machine are left out: the baseline has none by definition.
            calm = [p for p in session.read().pools if not is_zombie(p)]
            results["no zombie"] = measure(lo, collector, calm, args.reads)
            with demo.VethTopology() as topo, demo.hold_unread(topo, 8 << 20):
                topo.delete_link()
                time.sleep(1.5)  # the kernel's first retry: the pool's pages have settled
                ours = [p for p in session.read().pools if p.netdev == topo.rx_dev]
                collector.annotate(ours)  # calibration, once per collector: not timed
                results["zombie, dangling socket"] = measure(lo, collector, ours, args.reads)
                if args.sockets:
                    with idle_connections(args.sockets):
                        results[f"zombie + {2 * args.sockets} idle sockets"] = measure(
                            lo, collector, ours, args.reads)
    finally:
        collector.close()
        lo.close()
    if args.json:
        print(json.dumps(results, indent=2, default=lambda o: dataclasses.asdict(o)))
        return
    print(f"{'case':<30} {'annotate() ms':>20} {'scan ms':>20}  kernel us per scan (iterators)")
    for case, r in results.items():
        an, sc, its = r["annotate"], r["scan"], r["iterators"]
        its_text = ", ".join(f"{k.removeprefix('holders_')} {v['us_per_scan']}"
                             for k, v in its.items()) or \
            ("none ran" if not sc["max_ms"] else "run with --bpf-stats")  # type: ignore[index]
        print(f"{case:<30} {an['median_ms']:>9} (max {an['max_ms']:>7}) "  # type: ignore[index]
              f"{sc['median_ms']:>9} (max {sc['max_ms']:>7})  {its_text}")  # type: ignore[index]
        scan = r["last_scan"]
        if sc["max_ms"] and scan is not None:  # type: ignore[index]
            print(f"{'':<30} {scan.netns_visited} netns, {scan.sockets} sockets, "
                  f"{scan.skbs} skbs, {scan.zombie_refs} zombie page refs, "
                  f"{scan.cpus_readable}/{scan.cpus} CPU lists")


if __name__ == "__main__":
    main()
