"""Part 1: per-event run time of every attached netmemtrace program, measured by the kernel
(kernel.bpf_stats_enabled: run_time_ns / run_cnt), beside an empty program on the same
tracepoint (the floor, bench/floor.bpf.c, once per attach mechanism) and the bpftrace
equivalent of the page_pool aggregation (bench/pagepool.bt).

Everything is attached at once, so every program sees the very same events; the attach order
(which is the order the kernel runs them in) rotates from round to round, and each figure is
the median over rounds.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import BENCH, BenchError, Bpftrace, bpf_stats, compile_floor, iperf3, prog_stats

from netmemtrace.collect.netmem import DEFAULT_SAMPLE_N, NetmemReader, shared_maps
from netmemtrace.kernel import abi, probes
from netmemtrace.session import STACK_OFF, Session
from netmemtrace.workload.demo import VethTopology, tcp_stream

FLOOR_MECHANISMS = ("raw_tp", "tp_btf", "tracepoint")
BPFTRACE_SCRIPT = BENCH / "pagepool.bt"
STREAM_BYTES = 512 << 20
IPERF_SECONDS = 3.0
# Tracepoints the veth + XDP traffic itself drives, once per page or per skb.
PACKET_PATH = {"page_pool_state_hold", "page_pool_state_release", "page_pool_release",
               "netif_receive_skb"}

# netmem tracking at twice the default sampling (--netmem-sample 16), side by side: what
# following twice as many netmem costs per page_pool event.
DENSER_SAMPLE_N = DEFAULT_SAMPLE_N // 2
DENSER = f"pagepool+netmem --netmem-sample {DENSER_SAMPLE_N}"

# (contestant, program or tracepoint) -> (run_time_ns, run_cnt), cumulative since load.
Stats = dict[tuple[str, str], tuple[int, int]]


@dataclass(frozen=True)
class Program:
    contestant: str   # "netmemtrace", "floor/raw_tp", ..., "bpftrace"
    name: str
    tracepoint: str   # without category: page_pool_state_hold
    mechanism: str


class Contestant:
    """Something attached for one round: its programs and how to read their counters."""

    def __init__(self, programs: list[Program], read: Callable[[], Stats],
                 close: Callable[[], None]) -> None:
        self.programs = programs
        self.read = read
        self.close = close


def _hook_programs(label: str, loaded: list[probes.LoadedObject]) -> Contestant:
    progs, handles = [], {}
    for lo in loaded:
        for hook in lo.hooks.values():
            if hook.attached and hook.chosen:
                c = hook.chosen
                # Objects may name their programs alike (one hook each on one tracepoint).
                name = f"{lo.name}:{c.program}"
                progs.append(Program(label, name, c.target.rpartition("/")[2],
                                     c.mechanism))
                handles[name] = lo.obj.programs[c.program]

    def read() -> Stats:
        stats = {name: p.stats() for name, p in handles.items()}
        return {(label, name): (s.run_time_ns, s.run_cnt) for name, s in stats.items()}

    def close() -> None:
        for lo in loaded:
            lo.close()

    return Contestant(progs, read, close)


def _netmemtrace() -> Contestant:
    session = Session()
    contestant = _hook_programs("netmemtrace", session.loaded)
    contestant.close = session.close
    return contestant


def _netmem_denser() -> Contestant:
    """A second pagepool object (whose page_pool programs do the netmem domain's work too)
    with its own netmem table at the denser sampling; the netmem object only lends the
    reader, its own hooks stay detached."""
    pool_lo = probes.load_object("pagepool", str(abi.object_path("pagepool")))
    los = [pool_lo]
    try:
        los.append(probes.load_object("netmem", str(abi.object_path("netmem")), attach=False,
                                      disabled=STACK_OFF, reuse=shared_maps(pool_lo)))
        NetmemReader(los[1], DENSER_SAMPLE_N, pool_lo)  # writes the sampling into the config
    except BaseException:
        for lo in los:
            lo.close()
        raise
    return _hook_programs(DENSER, los)


def _floor(mech: str, path: Path) -> Callable[[], Contestant]:
    def attach() -> Contestant:
        lo = probes.load_object("floor", str(path), force=mech)
        return _hook_programs(f"floor/{mech}", [lo])
    return attach


def _bpftrace() -> Contestant:
    bt = Bpftrace(BPFTRACE_SCRIPT)
    progs = [Program("bpftrace", f"bpftrace:{tp}", tp, "tracepoint") for tp in bt.progs]

    def read() -> Stats:
        stats = prog_stats(set(bt.progs.values()))
        return {("bpftrace", f"bpftrace:{tp}"): stats.get(pid, (0, 0))
                for tp, pid in bt.progs.items()}

    return Contestant(progs, read, bt.close)


def _workload() -> int:
    """Bytes received. Two short-lived topologies: pool creation and page_pool_release fire
    in every round, and the steady state fills most of it."""
    with VethTopology() as topo:
        received = tcp_stream(topo, STREAM_BYTES)
    with VethTopology() as topo:
        received += iperf3(topo, IPERF_SECONDS, parallel=4, window="4M")[1]
    return received


def _round(openers: list[Callable[[], Contestant]]) -> tuple[list[Program], Stats, int]:
    attached: list[Contestant] = []
    try:
        for opener in openers:
            attached.append(opener())
        before = {k: v for c in attached for k, v in c.read().items()}
        received = _workload()
        after = {k: v for c in attached for k, v in c.read().items()}
    finally:
        for c in reversed(attached):
            c.close()
    delta = {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in after}
    return [p for c in attached for p in c.programs], delta, received


def _per_event(d: tuple[int, int] | None) -> float | None:
    return d[0] / d[1] if d and d[1] else None


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def run(rounds: int = 3) -> dict[str, object]:
    floor_obj = compile_floor()
    openers: list[tuple[str, Callable[[], Contestant]]] = [
        ("netmemtrace", _netmemtrace),
        (DENSER, _netmem_denser),
        *((f"floor/{m}", _floor(m, floor_obj)) for m in FLOOR_MECHANISMS),
    ]
    notes: list[str] = []
    try:
        Bpftrace(BPFTRACE_SCRIPT).close()
        openers.append(("bpftrace", _bpftrace))
    except BenchError as exc:
        notes.append(f"no bpftrace column: {exc}")
    per_round: list[Stats] = []
    received: list[int] = []
    programs: dict[tuple[str, str], Program] = {}
    with bpf_stats():
        for r in range(rounds):
            order = openers[r % len(openers):] + openers[:r % len(openers)]
            progs, delta, nbytes = _round([o for _, o in order])
            programs.update({(p.contestant, p.name): p for p in progs})
            per_round.append(delta)
            received.append(nbytes)

    def cost(key: tuple[str, str]) -> list[float | None]:
        return [_per_event(d.get(key)) for d in per_round]

    def events(key: tuple[str, str]) -> int:
        return sum(d.get(key, (0, 0))[1] for d in per_round)

    by_tp = {(p.contestant, p.tracepoint): key for key, p in programs.items()
             if p.contestant not in ("netmemtrace", DENSER)}

    def reference(contestant: str, tp: str) -> list[float | None]:
        key = by_tp.get((contestant, tp))
        return cost(key) if key else [None] * rounds

    def row(tp: str, program: str, mech: str, n: int, mine: list[float | None],
            programs_run: int = 1) -> dict[str, object]:
        """programs_run: how many programs `mine` sums, each paying a program's invocation;
        its floor is as many empty programs."""
        floor = [f * programs_run if f is not None else None
                 for f in reference("floor/raw_tp", tp)]
        bt = reference("bpftrace", tp)
        return {
            "tracepoint": tp, "program": program, "mechanism": mech, "events": n,
            "ns_per_event": _median(mine),
            "floor_ns": {m: _median(reference(f"floor/{m}", tp)) for m in FLOOR_MECHANISMS},
            "bpftrace_ns": _median(bt),
            "x_floor": _median([_ratio(a, b) for a, b in zip(mine, floor, strict=True)]),
            "x_bpftrace": _median([_ratio(a, b) for a, b in zip(mine, bt, strict=True)]),
            "per_round_ns": mine,
        }

    ours = sorted((k for k, p in programs.items() if p.contestant == "netmemtrace"),
                  key=lambda k: (programs[k].tracepoint, k[1]))
    rows = []
    for tp in dict.fromkeys(programs[k].tracepoint for k in ours):
        keys = [k for k in ours if programs[k].tracepoint == tp]
        rows += [row(tp, k[1], programs[k].mechanism, events(k), cost(k)) for k in keys]
        if len(keys) > 1:
            # Several programs on one tracepoint: each event pays for all of them.
            totals = [None if None in per_prog else sum(per_prog)
                      for per_prog in zip(*(cost(k) for k in keys), strict=True)]
            rows.append(row(tp, f"= all {len(keys)} netmemtrace programs (floor: {len(keys)} "
                            "empty ones)", "", max(map(events, keys)), totals, len(keys)))
    denser = sorted((k for k, p in programs.items()
                     if p.contestant == DENSER and p.tracepoint.startswith("page_pool_state")),
                    key=lambda k: programs[k].tracepoint)
    rows += [row(programs[k].tracepoint, f"{k[1]} (--netmem-sample {DENSER_SAMPLE_N})",
                 programs[k].mechanism, events(k), cost(k)) for k in denser]
    # The traffic's whole bill on the packet path: run time per GiB received, per contestant.
    # Other tracepoints (syscalls, memcg, sched) also count unrelated processes' events.
    groups: dict[str, list[tuple[str, str]]] = {}
    for key, p in programs.items():
        if p.tracepoint in PACKET_PATH and p.contestant != DENSER:
            groups.setdefault(p.contestant, []).append(key)
            if p.contestant == "netmemtrace":  # and per object: "netmemtrace pagepool"
                groups.setdefault(f"netmemtrace {p.name.partition(':')[0]}", []).append(key)
    # Every netmemtrace program, packet path or not (syscalls, memcg: the workload's own and
    # the rest of the machine's), per GiB received: an upper bound on what the traffic pays.
    everything = [k for k, p in programs.items() if p.contestant == "netmemtrace"]
    per_gib = {
        name: _median([sum(d.get(k, (0, 0))[0] for k in keys) / n * 2**30 / 1e6
                       for d, n in zip(per_round, received, strict=True)])
        for name, keys in sorted(groups.items())}
    all_ms_per_gib = _median([sum(d.get(k, (0, 0))[0] for k in everything) / n * 2**30 / 1e6
                              for d, n in zip(per_round, received, strict=True)])
    return {"rounds": rounds, "rows": rows, "notes": notes,
            "all_programs_ms_per_gib": all_ms_per_gib,
            "contestants": [name for name, _ in openers],
            "received_bytes_per_round": received,
            "packet_path_tracepoints": sorted(PACKET_PATH),
            "packet_path_ms_per_gib": per_gib}
