"""Reader of the zerocopy domain (bpf/zerocopy.bpf.c): per-process syscall counters from a
per-CPU map, and the zc_events ring buffer feeding the mapping ledger (unaccounted rx
bytes) and the tx tracker (MSG_ZEROCOPY bytes in flight).

The ring buffer is drained by a thread this reader owns (started by start() or the first
read(), after the capability drop; stopped in close()); read() drains what is left under the
same lock, so a snapshot includes every event submitted before it started.
"""

from __future__ import annotations

import ctypes
import os
import select
import threading
import time
import types
from dataclasses import dataclass

from .. import abi, libbpf, probes
from ..snapshot import Unavailable, ZerocopyStats
from .ledger import PAGE, Ledger

_U32 = 1 << 32
COUNTER_FIELDS = (
    "rx_calls", "rx_errors", "rx_mapped_bytes", "rx_copied_bytes", "rx_skip_hint_bytes",
    "rx_sock_errors", "rx_read_faults", "tx_zc_calls", "tx_zc_bytes", "tx_zc_errors",
    "tx_zc_ignored_calls", "tx_notifications", "tx_completed_sends", "tx_copied_sends",
)


# Syscall hooks come in two families in bpf/zerocopy.bpf.c; exactly one is loaded. The
# per-syscall tracepoints cost an unwatched syscall 65 ns, against 118 ns for the raw
# sys_enter/sys_exit pair, which runs a program on every syscall of the machine (bench part
# 4: a getppid() loop with bpf_stats off). The raw pair serves where the per-syscall events
# are missing (CONFIG_FTRACE_SYSCALLS off, no tracefs) or refuse to attach.
WATCHED_SYSCALLS = ("getsockopt", "sendmsg", "sendto", "sendmmsg", "recvmsg", "mmap", "munmap",
                    "madvise", "mremap")
PER_SYSCALL_HOOKS = tuple(f"sys_{d}_{n}" for n in WATCHED_SYSCALLS for d in ("enter", "exit"))
RAW_SYSCALL_HOOKS = ("sys_enter", "sys_exit")
RAW_OFF = {h: "off: the per-syscall tracepoints serve instead (raw_syscalls would run a "
              "program on every syscall of the machine)" for h in RAW_SYSCALL_HOOKS}


def load_object(kernel: probes.Kernel | None = None,
                max_entries: dict[str, int] | None = None) -> probes.LoadedObject:
    """The zerocopy object with the per-syscall hooks, or with the raw pair where any of
    them cannot attach (a half-watched syscall set would count some calls and not others)."""
    path = str(abi.object_path("zerocopy"))
    kernel = kernel or probes.Kernel()
    lo = probes.load_object("zerocopy", path, kernel=kernel, replaced=RAW_OFF,
                            max_entries=max_entries)
    failed = [s for s in lo.status() if s.hook in PER_SYSCALL_HOOKS and not s.attached]
    if not failed:
        return lo
    lo.close()
    why = (f"off: {failed[0].hook} cannot attach ({failed[0].reason}); raw_syscalls serve "
           "instead")
    return probes.load_object("zerocopy", path, kernel=kernel, max_entries=max_entries,
                              replaced={h: why for h in PER_SYSCALL_HOOKS})


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


def smaps_socket_rss(pid: int) -> int:
    """Rss, in bytes, of the mappings of pid backed by a socket (TCP zerocopy windows)."""
    total = 0
    in_socket = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(maxsplit=6)
            if len(first) >= 5 and "-" in first[0] and ":" in first[3]:
                in_socket = len(first) == 6 and first[5].startswith("socket:")
            elif in_socket and line.startswith("Rss:"):
                total += int(first[1]) * 1024
    return total


def comm_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


@dataclass(frozen=True)
class ProcessFigures:
    """What the zerocopy reader knows about one (process, memcg) pair."""

    pid: int
    memcg_id: int
    counters: dict[str, int]
    unaccounted_bytes: int
    unaccounted_hwm_bytes: int
    oldest_mapped_ns: int | None
    inflight_bytes: int
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


def zerocopy_stats(counters: dict[str, int], inflight: int) -> ZerocopyStats:
    mapped, copied = counters["rx_mapped_bytes"], counters["rx_copied_bytes"]
    return ZerocopyStats(
        rx_mapped_pages=mapped // PAGE,
        rx_zerocopy_ratio=mapped / (mapped + copied) if mapped + copied else None,
        tx_inflight_bytes=inflight,
        **counters)


def add_counters(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in COUNTER_FIELDS}


class ZerocopyReader:
    def __init__(self, obj: libbpf.Object, max_ranges: int = 65536,
                 rows: ProcessRows = SERVE_ROWS) -> None:
        btf = abi.btf("zerocopy")
        self._key_t = btf.struct("zc_key")
        self._counters_t = btf.struct("zc_counters")
        self._event_t = btf.struct("zc_event")
        # enum zc_event_type, names without ZC_EV_: ev.RX_MAP is ZC_EV_RX_MAP
        self._ev = types.SimpleNamespace(**btf.enum("zc_event_type", "ZC_EV_"))
        self._counters = obj.map("zc_counters")
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

    def _run(self) -> None:
        # Wait for samples outside the lock, consume under it: read() never waits on a
        # poll timeout (libbpf's ring_buffer is not safe to poll from two threads at once).
        while not self._stop.is_set():
            ready, _, _ = select.select([self._rb], [], [], 0.05)
            if ready:
                with self._lock:
                    self._rb.poll(0)

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
            procs += self.gone.values()
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

