"""Reader of the zerocopy domain (bpf/zerocopy.bpf.c): per-process syscall counters from a
per-CPU map, and the zc_events ring buffer feeding the mapping ledger (unaccounted rx
bytes) and the tx tracker (MSG_ZEROCOPY bytes in flight).

The ring buffer is drained by a thread this reader owns (started by start() or the first
read(), after the capability drop; stopped in close()); read() drains what is left under the
same lock, so a snapshot includes every event submitted before it started.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import select
import sys
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass

from netmemtrace.collect.ledger import MAX_RANGES, PAGE, Ledger
from netmemtrace.host import cgroups
from netmemtrace.host.procfs import smaps_socket_rss, start_boottime_ns
from netmemtrace.kernel import abi, libbpf, probes
from netmemtrace.snapshot import Unavailable, ZerocopyStats

_U32 = 1 << 32
COUNTER_FIELDS = (
    "rx_calls", "rx_errors", "rx_mapped_bytes", "rx_copied_bytes", "rx_skip_hint_bytes",
    "rx_sock_errors", "rx_read_faults", "tx_zc_calls", "tx_zc_bytes", "tx_zc_errors",
    "tx_zc_ignored_calls", "tx_notifications", "tx_completed_sends", "tx_copied_sends",
)


# Two families of hooks follow zerocopy in bpf/zerocopy.bpf.c; exactly one is loaded.
# Function probes where they attach: the kernel functions doing the work, paid only by that
# work. Syscall tracepoints otherwise, which put every thread of the host on the syscall
# tracing slow path (bench part 4: getppid +54 ns, +33 %). Among those, the per-syscall
# tracepoints cost an unwatched syscall 65 ns, against 118 ns for the raw sys_enter/sys_exit
# pair (a program on every syscall of the machine), which serves where the per-syscall events
# are missing (CONFIG_FTRACE_SYSCALLS off, no tracefs) or refuse to attach.
WATCHED_SYSCALLS = ("getsockopt", "sendmsg", "sendto", "sendmmsg", "recvmsg", "mmap", "munmap",
                    "madvise", "mremap")
PER_SYSCALL_HOOKS = tuple(f"sys_{d}_{n}" for n in WATCHED_SYSCALLS for d in ("enter", "exit"))
RAW_SYSCALL_HOOKS = ("sys_enter", "sys_exit")
SYSCALL_HOOKS = PER_SYSCALL_HOOKS + RAW_SYSCALL_HOOKS
RAW_OFF = {h: "off: the per-syscall tracepoints serve instead (raw_syscalls would run a "
              "program on every syscall of the machine)" for h in RAW_SYSCALL_HOOKS}
# The function-probe family. The per-vma page-table zap was renamed in 6.19: the kernel has
# one of ZAP_HOOKS. The *_ret hooks are kretprobes only: fexit reads the return itself.
ZAP_HOOKS = ("unmap_page_range", "__zap_vma_range")
KRETPROBE_HOOKS = ("tcp_zerocopy_receive_ret", "move_page_tables_ret")
FUNCTION_HOOKS = ("tcp_zerocopy_receive", "tcp_sendmsg_locked", "tcp_sendmsg_locked_ret",
                  "sock_dequeue_err_skb", "move_page_tables") + KRETPROBE_HOOKS + ZAP_HOOKS


def _needed(mechanism: str) -> tuple[str, ...]:
    """The function hooks that must attach with mechanism (besides one of ZAP_HOOKS)."""
    return tuple(h for h in FUNCTION_HOOKS if h not in ZAP_HOOKS
                 and (mechanism == "kprobe" or h not in KRETPROBE_HOOKS))


def _family_missing(status: list[probes.ProbeStatus] | dict[str, str | None],
                    mechanism: str) -> str | None:
    """Why the function family cannot serve with mechanism: the first needed hook that
    cannot (status: hook -> None when it can, else why), or None."""
    why = status if isinstance(status, dict) else {
        s.hook: None if s.attached and s.mechanism == mechanism else s.reason or "not attached"
        for s in status}
    for hook in _needed(mechanism):
        if why.get(hook, "not in the object") is not None:
            return f"{hook}: {why.get(hook, 'not in the object')}"
    if all(why.get(h, "not in the object") is not None for h in ZAP_HOOKS):
        return "; ".join(f"{h}: {why.get(h, 'not in the object')}" for h in ZAP_HOOKS)
    return None


FUNCTION_MECHANISMS = ("fentry", "kprobe")


def _narrowed(kernel: probes.Kernel, mechanism: str | None) -> probes.Kernel:
    """kernel with function probes of one kind only (None: none), sharing what it learnt."""
    k = probes.Kernel(kernel.btf_path, tuple(
        m for m in kernel.allowed if m not in FUNCTION_MECHANISMS or m == mechanism))
    k.refused = kernel.refused
    return k


def _static_plan(path: str, kernel: probes.Kernel) -> tuple[str | None, str]:
    """The function-probe mechanism every needed hook can use on this kernel, decided
    without loading (a load that is then redone costs start-up), or None and why not."""
    hooks = probes.read_catalogue(path, kernel.btf_path)
    reasons = []
    for mech in FUNCTION_MECHANISMS:
        why: dict[str, str | None] = {}
        for name, hook in hooks.items():
            cand = next((c for c in hook.candidates if c.mechanism == mech), None)
            if cand is not None:
                why[name] = kernel.static_check(cand)
        missing = _family_missing(why, mech)
        if missing is None:
            return mech, ""
        reasons.append(f"{mech}: {missing}")
    return None, "; ".join(reasons)


def load_object(kernel: probes.Kernel | None = None,
                max_entries: dict[str, int] | None = None) -> probes.LoadedObject:
    """The zerocopy object with the function-probe family (fentry, else kprobe) where every
    one of its hooks attaches, else the per-syscall tracepoints, else the raw syscall pair
    (a half-watched set would count some calls and not others)."""
    path = str(abi.object_path("zerocopy"))
    kernel = kernel or probes.Kernel()
    mech, why = _static_plan(path, kernel)
    tried = []
    for m in (mech, "kprobe") if mech == "fentry" else (mech,):
        if m is None or m not in kernel.allowed:
            continue
        replaced = {h: f"replaced: function probes ({m}) follow zerocopy where it happens; "
                       "syscall tracepoints would tax every syscall of the host"
                    for h in SYSCALL_HOOKS}
        if m == "fentry":
            replaced |= {h: "replaced: fexit on " + h.removesuffix("_ret") + " reads the "
                            "return" for h in KRETPROBE_HOOKS}
        lo = probes.load_object("zerocopy", path, kernel=_narrowed(kernel, m),
                                replaced=replaced, max_entries=max_entries)
        missing = _family_missing(lo.status(), m)
        if missing is None:
            return lo
        lo.close()
        tried.append(f"{m}: {missing}")
    why = "; ".join(tried) or why
    fn_off = {h: f"off: function probes cannot serve ({why}); the syscall tracepoints do"
              for h in FUNCTION_HOOKS}
    lo = probes.load_object("zerocopy", path, kernel=kernel, replaced=RAW_OFF | fn_off,
                            max_entries=max_entries)
    failed = [s for s in lo.status() if s.hook in PER_SYSCALL_HOOKS and not s.attached]
    if not failed:
        return lo
    lo.close()
    why = (f"off: {failed[0].hook} cannot attach ({failed[0].reason}); raw_syscalls serve "
           "instead")
    return probes.load_object("zerocopy", path, kernel=kernel, max_entries=max_entries,
                              replaced=fn_off | {h: why for h in PER_SYSCALL_HOOKS})


class TxTracker:
    """MSG_ZEROCOPY bytes per send-id block and socket, until their completion is read.

    Send ids are per socket u32 serial numbers (sk_zckey); one send call takes one id,
    a completion covers an inclusive id range.
    """

    def __init__(self, max_blocks: int = 65536) -> None:
        self.max_blocks = max_blocks
        self.overflow_sends = 0
        self._blocks: dict[int, list[tuple[int, int, int, int]]] = {}  # sk -> (lo, n, B, tgid)
        self._nblocks = 0

    def send(self, sk: int, tgid: int, first_id: int, end_id: int, nbytes: int) -> None:
        if self._nblocks >= self.max_blocks:
            self.overflow_sends += 1
            return
        self._blocks.setdefault(sk, []).append((first_id, (end_id - first_id) % _U32,
                                                nbytes, tgid))
        self._nblocks += 1

    def done(self, sk: int, lo: int, hi: int) -> None:
        span = (hi - lo) % _U32
        blocks = self._blocks.get(sk, [])
        keep = [b for b in blocks if not ((b[0] - lo) % _U32 + b[1] - 1 <= span)]
        self._nblocks -= len(blocks) - len(keep)
        if keep:
            self._blocks[sk] = keep
        else:
            self._blocks.pop(sk, None)

    def drop_process(self, tgid: int) -> None:
        """The sender is gone: its sockets are closed and their notifications with them."""
        for sk in list(self._blocks):
            keep = [b for b in self._blocks[sk] if b[3] != tgid]
            self._nblocks -= len(self._blocks[sk]) - len(keep)
            if keep:
                self._blocks[sk] = keep
            else:
                del self._blocks[sk]

    def inflight_bytes(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for blocks in self._blocks.values():
            for _lo, _n, nbytes, tgid in blocks:
                out[tgid] = out.get(tgid, 0) + nbytes
        return out


def mapped_socket_pages(pid: int) -> list[tuple[int, int]]:
    """[start, end) runs of pages mapped now in the socket mappings of pid (TCP zerocopy
    windows), from /proc/PID/maps and the present bit of /proc/PID/pagemap."""
    vmas = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if "socket:[" in line:
                lo, _, hi = line.split(maxsplit=1)[0].partition("-")
                vmas.append((int(lo, 16), int(hi, 16)))
    runs: list[tuple[int, int]] = []
    if not vmas:
        return runs
    with open(f"/proc/{pid}/pagemap", "rb") as pm:
        for lo, hi in vmas:
            pm.seek(lo // PAGE * 8)
            entries = pm.read((hi - lo) // PAGE * 8)
            for i in range(0, len(entries), 8):
                if entries[i + 7] & 0x80:  # bit 63: present
                    addr = lo + i // 8 * PAGE
                    if runs and runs[-1][1] == addr:
                        runs[-1] = (runs[-1][0], addr + PAGE)
                    else:
                        runs.append((addr, addr + PAGE))
    return runs


def memcg_id_of(pid: int) -> int | None:
    """The id BPF's task_memcg_id() gives pid's tasks: the inode of its memory cgroup, on
    v2 the nearest ancestor with the memory controller (the css a task is charged to)."""
    hierarchy = cgroups.memory_hierarchy()
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            hid, controllers, path = line.rstrip("\n").split(":", 2)
            if hierarchy == "v2" and hid == "0" and (root := cgroups.v2_root()):
                d = root / path.lstrip("/")
                while d != root and not (d / "memory.stat").exists():
                    d = d.parent
                return os.stat(d).st_ino
            if hierarchy == "v1" and "memory" in controllers.split(","):
                return os.stat(cgroups.V1_MEMORY / path.lstrip("/")).st_ino
    return None


# Why ledger figures are unknown once a ledger event was lost: a lost map undercounts, a
# lost unmap, exit or tx completion overcounts, for ever. Lost where the zc_events ring
# buffer was full, or where the kernel did not run a zerocopy program at all: it skips a
# program already running on that CPU, which preemptible hooks (fentry, and syscall
# tracepoints where they may fault) meet whenever a task is preempted inside one.
LEDGER_LOSS = Unavailable(
    "incomplete: ledger events that may concern it were lost (the zc_events ring buffer "
    "was full: zerocopy ringbuf_full, or the kernel skipped a zerocopy program already "
    "running on that CPU: zerocopy prog_recursion_lost); exact again only for processes "
    "started after the last loss")


@dataclass(frozen=True)
class ProcessFigures:
    """What the zerocopy reader knows about one (process, memcg) pair. The ledger's figures
    (unaccounted, oldest mapped, tx inflight) are LEDGER_LOSS where a lost event may
    concern the process."""

    pid: int
    memcg_id: int
    counters: dict[str, int]
    unaccounted_bytes: int | Unavailable
    unaccounted_hwm_bytes: int | Unavailable
    oldest_mapped_ns: int | None | Unavailable
    inflight_bytes: int | Unavailable
    exit_ns: int | None = None    # CLOCK_MONOTONIC of its exit; None while it runs
    comm: str | None = None       # exited: its name at exit (running: read from /proc)


@dataclass(frozen=True)
class ProcessRows:
    """Which per-process rows a command reports: exited processes for how long and how many
    (their counters stay in their memcg's totals after the row goes), rows per memcg."""

    exited_retention_s: float | None  # None: for the whole session (dump's window)
    max_exited: int                   # exited rows kept at most; beyond, the oldest go
    per_memcg: int | None             # rows per memcg, most unaccounted bytes first; None: all


# dump: every process seen in its window. top: exited rows for a minute. serve: for 5
# minutes, then their series go (Prometheus keeps history); the series stay bounded.
DUMP_ROWS = ProcessRows(exited_retention_s=None, max_exited=4096, per_memcg=None)
TOP_ROWS = ProcessRows(exited_retention_s=60.0, max_exited=1024, per_memcg=10)
SERVE_ROWS = ProcessRows(exited_retention_s=300.0, max_exited=1024, per_memcg=10)


def zerocopy_stats(counters: dict[str, int], inflight: int | Unavailable) -> ZerocopyStats:
    mapped, copied = counters["rx_mapped_bytes"], counters["rx_copied_bytes"]
    return ZerocopyStats(
        rx_mapped_pages=mapped // PAGE,
        rx_zerocopy_ratio=mapped / (mapped + copied) if mapped + copied else None,
        tx_inflight_bytes=inflight,
        **counters)


def add_counters(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in COUNTER_FIELDS}


# The draining thread reads the lost count at most this often during a burst of events.
COUNT_LOST_EVERY_NS = 50_000_000


class LedgerLoss:
    """Which ledger figures lost ledger events (LEDGER_LOSS) may have made wrong. The count
    is read once per snapshot; every loss so far happened before the read that last saw it
    grow, and none before the last read that saw it at 0."""

    def __init__(self) -> None:
        self.lost = 0
        self._clean_ns: int | None = None  # CLOCK_MONOTONIC of the last read seeing 0
        self._dirty_ns = (0, 0)  # (CLOCK_MONOTONIC, CLOCK_BOOTTIME) after the last growth

    def count(self, lost: int, before_ns: int, after_ns: int, after_boot_ns: int) -> None:
        """The lost count as read between before_ns and after_ns (CLOCK_MONOTONIC; after:
        CLOCK_BOOTTIME too)."""
        if not lost:
            self._clean_ns = before_ns
        elif lost != self.lost:
            self._dirty_ns = (after_ns, after_boot_ns)
        self.lost = lost

    def marked(self, p: ProcessFigures,
               start_ns: Callable[[int], int | None] = start_boottime_ns) -> ProcessFigures:
        """p with LEDGER_LOSS for the figures a drop may have made wrong. Exact are: every
        figure before the first drop; those of a process that exited before it; those of
        one that started after the last drop (start_ns: pid -> CLOCK_BOOTTIME start, None
        once gone), unless the ledger holds ranges of its pid from before (a dead process
        whose exit was dropped, its pid reused); an exited process's final figures (its
        mappings went with it), but not its high-water mark."""
        if not self.lost:
            return p
        if p.exit_ns is not None:
            if self._clean_ns is not None and p.exit_ns <= self._clean_ns:
                return p
            return dataclasses.replace(p, unaccounted_hwm_bytes=LEDGER_LOSS)
        dirty_ns, dirty_boot_ns = self._dirty_ns
        start = start_ns(p.pid)
        oldest = p.oldest_mapped_ns
        if start is not None and start > dirty_boot_ns and \
                (not isinstance(oldest, int) or oldest > dirty_ns):
            return p
        return dataclasses.replace(p, unaccounted_bytes=LEDGER_LOSS,
                                   unaccounted_hwm_bytes=LEDGER_LOSS,
                                   oldest_mapped_ns=LEDGER_LOSS, inflight_bytes=LEDGER_LOSS)


class ZerocopyReader:
    def __init__(self, obj: libbpf.Object, max_ranges: int = MAX_RANGES,
                 rows: ProcessRows = SERVE_ROWS) -> None:
        btf = abi.btf("zerocopy")
        self._key_t = btf.struct("zc_key")
        self._counters_t = btf.struct("zc_counters")
        self._event_t = btf.struct("zc_event")
        # enum zc_event_type, names without ZC_EV_: ev.RX_MAP is ZC_EV_RX_MAP
        self._ev = types.SimpleNamespace(**btf.enum("zc_event_type", "ZC_EV_"))
        self._obj = obj
        self._counters = obj.map("zc_counters")
        self._tasks = obj.map("zc_tasks")
        self._seen = obj.map(".data.seen")
        self._task_t = btf.struct("zc_task")
        self.seeded_pids: set[int] = set()
        self._seeded = threading.Event()  # the draining thread's seed() is done
        self.ledger = Ledger(max_ranges)
        self.tx = TxTracker()
        self.exited: dict[int, dict[str, int]] = {}  # memcg id -> counters of exited procs
        # Rows of exited processes, oldest exit first, for rows.exited_retention_s.
        self.rows = rows
        self.gone: dict[tuple[int, int], ProcessFigures] = {}
        self.gone_expired = 0
        self.gone_evicted = 0
        self.bad_events = 0
        self._lock = threading.Lock()
        self._rb = libbpf.RingBuffer(obj.map("zc_events"), self._on_event)
        self._stats = abi.Stats("zerocopy", obj.map("zc_stats"))
        self.loss = LedgerLoss()
        self._counted_ns = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the draining thread (idempotent; read() does it too). Not in __init__: a
        thread keeps the capabilities of the thread that created it, and the session is
        built before the capability drop (caps.py)."""
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="netmemtrace-zc",
                                                daemon=True)
                self._thread.start()

    def seed(self) -> None:
        """Mappings made before netmemtrace attached: the kernel saw no call to tell the
        ledger, so every process's socket mappings are read once from /proc (maps, and
        pagemap's present bit), entered in the ledger, and the process followed from now on
        as if it had mapped them while traced. Run by the draining thread, after the hooks
        attached (an unmap from then on reaches the ledger after this)."""
        with self._lock:
            self._rb.poll(0)
            now = time.monotonic_ns()
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit() or (pid := int(entry.name)) in self.ledger.pids():
                    continue
                try:
                    runs = mapped_socket_pages(pid)
                    memcg = memcg_id_of(pid) if runs else None
                except (OSError, ValueError):
                    continue  # gone, or not ours to read
                if memcg is None:
                    continue
                for lo, hi in runs:
                    self.ledger.rx_map(pid, memcg, lo, hi - lo, now)
                self._tasks.update(ctypes.c_uint32(pid),
                                   bytes(self._task_t(cgroup_id=memcg, rx_mapped=1)))
                self.seeded_pids.add(pid)
            if self.seeded_pids:
                self._seen.update(ctypes.c_uint32(0), (1).to_bytes(4, sys.byteorder))

    def _run(self) -> None:
        try:
            self.seed()
        finally:
            self._seeded.set()
        # Wait for samples outside the lock, consume under it: read() never waits on a
        # poll timeout (libbpf's ring_buffer is not safe to poll from two threads at once).
        # Losses are read during a burst at most every COUNT_LOST_EVERY_NS, and once more
        # when it goes quiet: a loss late in a burst is then dated by the burst's end, not
        # by the next burst (a process started in between would be marked for it).
        burst = False
        while not self._stop.is_set():
            ready, _, _ = select.select([self._rb], [], [], COUNT_LOST_EVERY_NS / 1e9)
            if not ready and not burst:
                continue
            with self._lock:
                if ready:
                    self._rb.poll(0)
                burst = bool(ready)
                if not ready or time.monotonic_ns() - self._counted_ns > COUNT_LOST_EVERY_NS:
                    self._count_lost()

    def _count_lost(self) -> None:
        """Ledger events lost (ringbuf_full, and the programs' recursion misses), read after
        the ring was drained: a loss counted may concern any figure of the ledger as it is
        now. Also read by the draining thread as it catches up, so that the last loss's time
        is known closely (a process started after it is exact) and not only at the next
        snapshot."""
        before = time.monotonic_ns()
        lost = self._stats.read()["ringbuf_full"] + self._obj.recursion_misses()
        self._counted_ns = time.monotonic_ns()
        self.loss.count(lost, before, self._counted_ns,
                        time.clock_gettime_ns(time.CLOCK_BOOTTIME))

    def _on_event(self, raw: bytes) -> None:
        if len(raw) < ctypes.sizeof(self._event_t):
            self.bad_events += 1
            return
        e = abi.decode(self._event_t, raw)
        led, ev = self.ledger, self._ev
        if e.type == ev.RX_MAP:
            led.rx_map(e.tgid, e.cgroup_id, e.addr, e.len, e.ts_ns, e.len2)
        elif e.type == ev.UNMAP:
            led.unmap(e.tgid, e.addr, e.len)
        elif e.type == ev.MAP_NEW:
            led.unmap(e.tgid, e.addr, e.len)  # a new mapping replaced whatever was there
        elif e.type == ev.MREMAP:
            led.remap(e.tgid, e.addr, e.len, e.addr2, e.len2)
        elif e.type == ev.FORK:
            led.fork(e.tgid, e.aux)
        elif e.type == ev.EXIT:
            hwm = led.proc_hwm.get(e.tgid, 0)
            led.exit(e.tgid)
            if not e.flags:  # exit, not exec: fold its counters into its memcg
                self._retire(e.tgid, e.ts_ns, e.comm.decode(errors="replace"), hwm)
        elif e.type == ev.TX_SEND:
            self.tx.send(e.sk, e.tgid, e.aux, e.aux2, e.len)
        elif e.type == ev.TX_DONE:
            self.tx.done(e.sk, e.aux, e.aux2)
        else:
            self.bad_events += 1

    def _read_counters(self) -> dict[tuple[int, int], dict[str, int]]:
        out = {}
        for key, per_cpu in self._counters.items():
            k = abi.decode(self._key_t, key)
            vals = [abi.decode(self._counters_t, v) for v in per_cpu]
            out[(k.tgid, k.cgroup_id)] = {f: sum(getattr(v, f) for v in vals)
                                           for f in COUNTER_FIELDS}
        return out

    def _retire(self, tgid: int, exit_ns: int, comm: str, hwm: int) -> None:
        """An exited process: its counters move to its memcg's exited total, its keys go,
        and its final figures stay a row of their own for the retention."""
        self.tx.drop_process(tgid)
        for (pid, memcg), counters in self._read_counters().items():
            if pid != tgid:
                continue
            self.exited[memcg] = add_counters(self.exited.get(memcg, {}), counters)
            key = self._key_t(tgid=pid, cgroup_id=memcg)
            self._counters.delete(key)
            self.gone.pop((pid, memcg), None)  # a recycled pid: the newer exit stays
            self.gone[(pid, memcg)] = ProcessFigures(
                pid=pid, memcg_id=memcg, counters=counters, unaccounted_bytes=0,
                unaccounted_hwm_bytes=hwm, oldest_mapped_ns=None, inflight_bytes=0,
                exit_ns=exit_ns, comm=comm)
            while len(self.gone) > self.rows.max_exited:
                del self.gone[next(iter(self.gone))]
                self.gone_evicted += 1

    def _expire(self, now_ns: int) -> None:
        if self.rows.exited_retention_s is None:
            return
        oldest_kept = now_ns - int(self.rows.exited_retention_s * 1e9)
        while self.gone:
            key, first = next(iter(self.gone.items()))
            if first.exit_ns is not None and first.exit_ns >= oldest_kept:
                break
            del self.gone[key]
            self.gone_expired += 1

    def read(self, now_ns: int | None = None
             ) -> tuple[list[ProcessFigures], dict[int, dict[str, int]], dict[int, int]]:
        """(per-process figures, exited processes' rows within their retention last;
        exited counters per memcg; ledger hwm per memcg). now_ns: CLOCK_MONOTONIC."""
        self.start()
        if self._thread is not None:
            self._seeded.wait()
        with self._lock:
            self._rb.poll(0)
            self._expire(time.monotonic_ns() if now_ns is None else now_ns)
            counters = self._read_counters()
            led = self.ledger
            inflight = self.tx.inflight_bytes()
            procs = []
            for (pid, memcg), c in counters.items():
                # Ledger figures belong to the memcg the process mapped them in.
                own = led.memcg_of(pid) in (None, memcg)
                procs.append(ProcessFigures(
                    pid=pid, memcg_id=memcg, counters=c,
                    unaccounted_bytes=led.held_bytes(pid) if own else 0,
                    unaccounted_hwm_bytes=led.proc_hwm.get(pid, 0) if own else 0,
                    oldest_mapped_ns=led.oldest_mapped_ns(pid) if own else None,
                    inflight_bytes=inflight.get(pid, 0)))
            # Seeded processes that made no call since: a row for the pages they hold.
            for pid in self.seeded_pids & set(led.pids()) - {p for p, _ in counters}:
                memcg = led.memcg_of(pid)
                procs.append(ProcessFigures(
                    pid=pid, memcg_id=memcg or 0, counters=dict.fromkeys(COUNTER_FIELDS, 0),
                    unaccounted_bytes=led.held_bytes(pid),
                    unaccounted_hwm_bytes=led.proc_hwm.get(pid, 0),
                    oldest_mapped_ns=led.oldest_mapped_ns(pid), inflight_bytes=0))
            procs += self.gone.values()
            self._count_lost()
            procs = [self.loss.marked(p) for p in procs]
            return procs, {k: dict(v) for k, v in self.exited.items()}, dict(led.memcg_hwm)

    def close(self) -> None:
        with self._lock:
            self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join()
        self._rb.close()


def cross_check(pid: int, ledger_bytes: int) -> tuple[int | Unavailable, int | Unavailable]:
    """(smaps socket: Rss, ledger - smaps) for a process seen receiving zerocopy."""
    try:
        rss = smaps_socket_rss(pid)
    except OSError as exc:
        reason = Unavailable(f"/proc/{pid}/smaps: {os.strerror(exc.errno or 0)}")
        return reason, reason
    return rss, ledger_bytes - rss

