"""A tracing session: checks preconditions, loads and attaches every BPF object, and turns
the maps into one immutable Snapshot per read(). The only place views' data comes from."""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import functools
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from netmemtrace.collect import zerocopy
from netmemtrace.collect.holders import HoldersCollector, ScanReport
from netmemtrace.collect.ledger import MAX_RANGES
from netmemtrace.collect.memcg import MemcgCollector
from netmemtrace.collect.netmem import (
    DEFAULT_SAMPLE_N,
    HEAD_PAGE_SYMBOLS,
    SHARED_MAPS,
    NetmemReader,
    sample_threshold,
)
from netmemtrace.collect.pagepool import PagePoolReader, device_summaries
from netmemtrace.commands import options
from netmemtrace.host import netlink, resolve
from netmemtrace.kernel import abi, kallsyms, libbpf, probes
from netmemtrace.privilege import caps, netns_broker
from netmemtrace.snapshot import (
    CollectorError,
    CollectorRun,
    DeviceSummary,
    DevmemSocket,
    MemcgSelfStats,
    MemcgSnapshot,
    NetmemSummary,
    PoolSnapshot,
    SelfStats,
    Snapshot,
    UnacceptedSocket,
    Unavailable,
)

_libc = ctypes.CDLL(None)
# The only per-packet probe, on every received skb: it cost more throughput than every other
# probe together (bench/README.md, netif_receive_skb). Opt-in.
STACK_OFF = {"netif_receive_skb": "off by default (the per-packet probe, ~125 ns per skb), "
             "turn on with --netmem-stack"}


@dataclass(frozen=True)
class LoadOptions:
    kernel: probes.Kernel
    netmem_stack: bool
    sizes: dict[str, dict[str, int]]  # object -> map -> max_entries (NETMEMTRACE_MAP_SIZES)


def _map_sizes(spec: ObjectSpec, opts: LoadOptions) -> dict[str, int]:
    """NETMEMTRACE_MAP_SIZES for the maps this object creates: its own, and those objects
    loaded after it share (a map is sized where it is created)."""
    sizes = dict(opts.sizes.get(spec.name, {}))
    for child in (c for c in OBJECT_SPECS if c.after == spec.name):
        sizes.update((m, n) for m, n in opts.sizes.get(child.name, {}).items()
                     if m in child.shared)
    return sizes


def _load_generic(spec: ObjectSpec, opts: LoadOptions,
                  parent: probes.LoadedObject | None) -> probes.LoadedObject:
    return probes.load_object(
        spec.name, str(abi.object_path(spec.name)), kernel=opts.kernel,
        max_entries=_map_sizes(spec, opts),
        reuse={m: parent.obj.map(m) for m in spec.shared} if parent else None,
        disabled=None if opts.netmem_stack else spec.off_unless_stack)


def _load_zerocopy(spec: ObjectSpec, opts: LoadOptions,
                   parent: probes.LoadedObject | None) -> probes.LoadedObject:
    return zerocopy.load_object(opts.kernel, opts.sizes.get(spec.name))


@dataclass(frozen=True)
class ObjectSpec:
    """How one BPF object loads. after: the object it loads after, in the same thread;
    shared: that object's maps this one uses instead of its own; off_unless_stack: hooks
    left off without --netmem-stack; stats: its map of counters (abi.Stats), read into
    Snapshot.stats[name]."""

    name: str
    load: Callable[[ObjectSpec, LoadOptions, probes.LoadedObject | None],
                   probes.LoadedObject] = _load_generic
    after: str | None = None
    shared: tuple[str, ...] = ()
    off_unless_stack: dict[str, str] | None = None
    stats: str | None = None


# In the order `probes` lists them; they start loading in reverse (holders' iterators take
# longest to verify).
OBJECT_SPECS = (
    ObjectSpec("pagepool", stats="pagepool_stats"),
    ObjectSpec("memcg", stats="memcg_stats"),
    ObjectSpec("zerocopy", load=_load_zerocopy, stats="zc_stats"),
    # One netmem table, filled by the pagepool object's programs on page_pool events.
    ObjectSpec("netmem", after="pagepool", shared=SHARED_MAPS, off_unless_stack=STACK_OFF,
               stats="netmem_stats"),
    # Its counters are per scan: the collector sums them (HoldersCollector.totals).
    ObjectSpec("holders"),
)


@dataclass
class Draft:
    """The snapshot a read is building. Each collector fills in its part, in order (later
    ones build on earlier ones' pools); what a failing collector leaves is what the snapshot
    says for it."""

    now_ns: int
    netmem: NetmemSummary | Unavailable
    kernel_pools: netlink.KernelView | Unavailable = Unavailable("netlink not read")
    pools: list[PoolSnapshot] = field(default_factory=list)
    devmem_sockets: tuple[DevmemSocket, ...] = ()
    memcgs: tuple[MemcgSnapshot, ...] = ()
    memcg_self: MemcgSelfStats | None = None
    unaccepted_sockets: tuple[UnacceptedSocket, ...] | Unavailable = Unavailable(
        "the memcg collector failed: see errors")
    devices: tuple[DeviceSummary, ...] = ()
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    prog_run_time_ns: dict[str, int] | Unavailable = Unavailable("kernel.bpf_stats_enabled is 0")
    prog_run_cnt: dict[str, int] | Unavailable = Unavailable("kernel.bpf_stats_enabled is 0")
    prog_recursion_misses: dict[str, int] = field(default_factory=dict)
    errors: list[CollectorError] = field(default_factory=list)


@dataclass(frozen=True)
class Collector:
    """One part of a read: its name (the `collector` of errors and of
    netmemtrace_scrape_collector_*) and what it fills in."""

    name: str
    collect: Callable[[Draft], None]


def run(collectors: tuple[Collector, ...], d: Draft) -> tuple[CollectorRun, ...]:
    """Every collector in turn, each timed. One that fails is named in d.errors and the
    others still run: a failing collector never fails the snapshot."""
    runs = []
    for c in collectors:
        began = time.monotonic_ns()
        try:
            c.collect(d)
        except Exception as exc:  # noqa: PERF203 (the next collector runs all the same)
            d.errors.append(CollectorError(c.name, str(exc)))
            ok = False
        else:
            ok = True
        runs.append(CollectorRun(c.name, ok, time.monotonic_ns() - began))
    return tuple(runs)


def _kernel_view(d: Draft) -> None:
    try:
        d.kernel_pools = resolve.kernel_view()
    except Exception as exc:  # kernel < 6.8 has no netdev family: unavailable, not empty
        d.kernel_pools = Unavailable(f"netdev netlink page-pool-get failed: {exc}")
        return
    d.errors.extend(CollectorError("netlink", f"netns {f}") for f in d.kernel_pools.failed)


def _devices(d: Draft) -> None:
    d.devices = device_summaries(d.pools)




def _load_one(spec: ObjectSpec, opts: LoadOptions, parent: probes.LoadedObject | None
              ) -> probes.LoadedObject | probes.ProbeStatus:
    """The loaded object, or its one probes row saying why it did not load."""
    try:
        return spec.load(spec, opts, parent)
    except (probes.SetupError, libbpf.LibbpfError, abi.AbiError) as exc:
        return probes.ProbeStatus(spec.name, "(object)", None, False,
                                  f"object not loaded: {exc}")


def _bpf_stats_enabled() -> bool:
    try:
        with open("/proc/sys/kernel/bpf_stats_enabled") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


class Session:
    def __init__(self, btf_path: str | None = None,
                 netmem_sample: int = DEFAULT_SAMPLE_N, netmem_stack: bool = False,
                 start_threads: bool = True, rows: zerocopy.ProcessRows = zerocopy.SERVE_ROWS,
                 mechanisms: str | None = None) -> None:
        """netmem_sample: track the ownership state of 1 in this many netmem.
        netmem_stack: attach the per-packet netif_receive_skb probe (the stack state).
        start_threads: start the collectors' threads now; False leaves it to
        start_threads() or the first read() (open_session: after the capability drop, as
        threads keep the capabilities of the thread that created them).
        rows: which per-process rows snapshots carry (exited ones for how long).
        mechanisms: "kprobe,tracepoint": attach only with these (default: every one)."""
        try:
            sample_threshold(netmem_sample)
            sizes = options.map_sizes(os.environ.get(options.MAP_SIZES_ENV))
            obj, name = options.LEDGER_SIZE
            ledger_ranges = sizes.get(obj, {}).pop(name, MAX_RANGES)
        except ValueError as exc:
            raise probes.SetupError(str(exc)) from None
        probes.check_privileges(btf_path)
        self.kernel = probes.Kernel(
            btf_path, probes.parse_mechanisms(mechanisms) if mechanisms else None)
        self.loaded: list[probes.LoadedObject] = []
        # Objects that could not load at all (e.g. iter/kmem_cache before 6.13): reported
        # as a probes row each; the rest of the tool keeps running.
        self.failed: list[probes.ProbeStatus] = []
        self._memcg: MemcgCollector | None = None
        self._holders: HoldersCollector | None = None
        # The netns broker open_session started (netns_broker.py); stopped in close().
        self.broker: netns_broker.Broker | None = None
        try:
            self._load_objects(netmem_stack, sizes)
            if not any(s.attached for s in self.probe_status()):
                raise probes.SetupError("no probe could attach: see `netmemtrace probes`"
                                        + "".join(f"; {f.reason}" for f in self.failed))
            lo = {o.name: o for o in self.loaded}
            self._pagepool = PagePoolReader(lo["pagepool"].obj) if "pagepool" in lo else None
            self._netmem = NetmemReader(lo["netmem"], netmem_sample, lo.get("pagepool")) \
                if "netmem" in lo else None
            if "memcg" in lo and "zerocopy" in lo:
                # Owns a ring-buffer thread (the zerocopy ledger), started by
                # start_threads() or the first read(); stopped in close().
                self._memcg = MemcgCollector(lo["memcg"], lo["zerocopy"], ledger_ranges,
                                              rows=rows)
            if "holders" in lo:
                # Iterators run only from read(), and only while a zombie pool exists.
                self._holders = HoldersCollector(lo["holders"].obj)
            self._stats = {spec.name: abi.Stats(spec.name, lo[spec.name].obj.map(spec.stats))
                           for spec in OBJECT_SPECS if spec.stats and spec.name in lo}
            self.collectors = self._collectors()
            # The readers hold their ctypes layouts now: drop the parsed BTF dumps and hand
            # libbpf's freed load-time heap back (RSS: bench/README.md).
            abi.btf.cache_clear()
            _libc.malloc_trim(0)
            if start_threads:
                self.start_threads()
        except BaseException:
            self.close()
            raise

    def _load_objects(self, netmem_stack: bool, sizes: dict[str, dict[str, int]]) -> None:
        """Load every object of OBJECT_SPECS, two at a time: the verifier runs in the
        loading thread, so loads overlap on two cores (start-up, bench part 3). An object
        with `after` loads once that one has, in the same thread; /proc/kallsyms is scanned
        beside them."""
        opts = LoadOptions(self.kernel, netmem_stack, sizes)

        def chain(spec: ObjectSpec) -> list[probes.LoadedObject | probes.ProbeStatus]:
            results = [_load_one(spec, opts, None)]
            for child in (c for c in OBJECT_SPECS if c.after == spec.name):
                parent = results[0] if isinstance(results[0], probes.LoadedObject) else None
                results.append(_load_one(child, opts, parent))
            return results

        def symbols() -> list[probes.LoadedObject | probes.ProbeStatus]:
            # Every kernel symbol any object or reader asks about, in one scan.
            kallsyms.lookup(set().union(
                *(probes.function_targets(probes.read_catalogue(str(path), self.kernel.btf_path))
                  for spec in OBJECT_SPECS
                  if (path := abi.BPF_OBJ_DIR / f"{spec.name}.bpf.o").exists()),
                resolve.PROVIDER_SYMBOLS, HEAD_PAGE_SYMBOLS))
            return []

        tasks = [symbols] + [functools.partial(chain, spec) for spec in reversed(OBJECT_SPECS)
                             if spec.after is None]
        # The pool's threads are gone once it is shut down, before the capability drop
        # (which requires every thread of the process to drop).
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(task) for task in tasks]
        done: dict[str, probes.LoadedObject | probes.ProbeStatus] = {}
        errors = []
        for f in futures:
            try:
                done.update((r.name if isinstance(r, probes.LoadedObject) else r.object, r)
                            for r in f.result())
            except BaseException as exc:  # noqa: PERF203 (every loaded object is kept to close)
                errors.append(exc)
        for spec in OBJECT_SPECS:
            if isinstance(r := done.get(spec.name), probes.LoadedObject):
                self.loaded.append(r)
            elif r is not None:
                self.failed.append(r)
        if errors:
            raise errors[0]

    def start_threads(self) -> None:
        """Start the collectors' background threads (idempotent)."""
        if self._memcg:
            self._memcg.zerocopy.start()

    def probe_status(self) -> list[probes.ProbeStatus]:
        return [s for lo in self.loaded for s in lo.status()] + self.failed

    def _collectors(self) -> tuple[Collector, ...]:
        """What read() runs, in order, for the objects that loaded."""
        pagepool, netmem, holders, memcg = self._pagepool, self._netmem, self._holders, \
            self._memcg
        steps = [Collector("netlink", _kernel_view)]
        if pagepool:
            def pools(d: Draft) -> None:
                d.pools = pagepool.read(d.now_ns, d.kernel_pools)
            steps.append(Collector("page_pool", pools))
        if netmem:
            def states(d: Draft) -> None:
                d.pools, d.devmem_sockets, d.netmem = netmem.read(d.now_ns, d.pools)
            steps.append(Collector("netmem", states))
        if holders:
            def held(d: Draft) -> None:
                d.pools = holders.annotate(d.pools)
                d.stats["holders"] = dict(holders.totals)
            steps.append(Collector("holders", held))
        if memcg:
            def memcgs(d: Draft) -> None:
                d.memcgs, d.memcg_self, d.unaccepted_sockets = memcg.read(d.now_ns)
            steps.append(Collector("memcg", memcgs))
        steps += [Collector("devices", _devices), Collector("stats", self._read_stats),
                  Collector("programs", self._read_programs)]
        return tuple(steps)

    def _read_stats(self, d: Draft) -> None:
        d.stats.update((name, stats.read()) for name, stats in self._stats.items())
        if self._memcg:  # events the zerocopy reader could not decode
            d.stats.setdefault("zerocopy", {})["malformed_events_lost"] = \
                self._memcg.zerocopy.bad_events

    def _read_programs(self, d: Draft) -> None:
        """Each attached program's kernel statistics, read once: recursion misses always
        (each object's sum is also a loss counter of its stats), run time and count only
        with kernel.bpf_stats_enabled."""
        progs = []
        for lo in self.loaded:
            own = [lk.program.stats() for lk in lo.obj.links]
            # Events of this object the kernel did not run its program for: lost like any.
            d.stats.setdefault(lo.name, {})["prog_recursion_lost"] = \
                sum(p.recursion_misses for p in own)
            progs += own
        d.prog_recursion_misses = {p.name: p.recursion_misses for p in progs}
        if _bpf_stats_enabled():
            d.prog_run_time_ns = {p.name: p.run_time_ns for p in progs}
            d.prog_run_cnt = {p.name: p.run_cnt for p in progs}

    def read(self) -> Snapshot:
        """One snapshot from every collector (run()); one that fails is named in errors,
        the others still report."""
        start = time.monotonic_ns()
        d = Draft(start, netmem=Unavailable(
            "the netmem collector failed: see errors" if self._netmem
            else "the netmem object is not loaded: see `netmemtrace probes`"))
        if not self._memcg:
            d.unaccepted_sockets = Unavailable(
                "the memcg object is not loaded: see `netmemtrace probes`")
        runs = run(self.collectors, d)
        return Snapshot(
            taken_monotonic_ns=start,
            taken_unix_s=time.time(),
            host=socket.gethostname(),
            kernel_release=os.uname().release,
            probes=tuple(self.probe_status()),
            pools=tuple(sorted(d.pools, key=lambda p: (p.state != "zombie", p.pool_addr or 0,
                                                       p.pool_id or 0))),
            self_stats=SelfStats(snapshot_build_ns=time.monotonic_ns() - start,
                                 prog_run_time_ns=d.prog_run_time_ns,
                                 prog_run_cnt=d.prog_run_cnt,
                                 prog_recursion_misses=d.prog_recursion_misses),
            errors=tuple(d.errors),
            memcgs=d.memcgs,
            memcg_self_stats=d.memcg_self,
            devmem_sockets=d.devmem_sockets,
            netmem=d.netmem,
            devices=d.devices,
            unaccepted_sockets=d.unaccepted_sockets,
            collectors=runs,
            stats=d.stats,
        )

    @property
    def holders_scan(self) -> ScanReport | None:
        """What the last holders scan looked at (None before the first zombie)."""
        return self._holders.last_scan if self._holders else None

    def close(self) -> None:
        """Detach every link and free every program and map (idempotent)."""
        if self._holders:
            self._holders.close()
            self._holders = None
        if self._memcg:
            self._memcg.close()
            self._memcg = None
        for lo in self.loaded:
            lo.close()
        self.loaded = []
        if self.broker:
            self.broker.close()
            self.broker = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_session(args: argparse.Namespace,
                 rows: zerocopy.ProcessRows = zerocopy.SERVE_ROWS) -> Session:
    """Attach everything per the common CLI options, then drop the capabilities reading no
    longer needs (unless --keep-caps).

    Order matters: the netns broker (netns_broker.py, a process that keeps CAP_SYS_ADMIN
    only, to create iterators and netlink sockets in other network namespaces) is started
    while there is CAP_SYS_ADMIN to give it; then everything is attached and the
    capabilities dropped; only then are the collectors' threads started, as capabilities
    belong to threads and a thread inherits those of the thread that creates it."""
    drop = not args.keep_caps
    broker = None
    if drop and caps.has_effective(caps.CAP_SYS_ADMIN):
        try:
            broker = netns_broker.start()
        except OSError as exc:  # e.g. an exec that does not keep root's capabilities
            print(f"netmemtrace: netns broker not started ({exc}): sockets in other network "
                  "namespaces will not be attributed (--keep-caps keeps CAP_SYS_ADMIN)",
                  file=sys.stderr)
    try:
        session = Session(btf_path=args.btf_path, netmem_sample=args.netmem_sample,
                          netmem_stack=args.netmem_stack, start_threads=not drop, rows=rows,
                          mechanisms=args.mechanisms)
    except BaseException:
        if broker:
            broker.close()
        raise
    session.broker = broker
    if drop:
        resolve.provider_addresses()  # /proc/kallsyms addresses need CAP_SYSLOG: read now
        try:
            caps.drop_after_attach()
        except (OSError, caps.CapsError) as exc:
            session.close()
            raise probes.SetupError(f"cannot drop capabilities after attach: {exc} "
                                    "(use --keep-caps)") from exc
        session.start_threads()
    return session
