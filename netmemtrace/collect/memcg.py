"""Reader of the memcg domain (bpf/memcg.bpf.c) and the per-memcg join of everything:
socket memory (events and polled files), zerocopy counters and the ledger's unaccounted
bytes, plus the pure filters behind `dump --cgroup/--pid/--verify`.

Headline per memcg: would_be_charged_bytes = socket memory charged now + TCP-rx-zerocopy
bytes mapped now. The second term is charged to nobody today; the sum is what the memcg
would be charged if network pages stayed accounted while user space maps them.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from netmemtrace.collect import zerocopy
from netmemtrace.collect.holders import TCP_STATES, format_addr, socket_owners
from netmemtrace.collect.ledger import MAX_RANGES, PAGE
from netmemtrace.collect.zerocopy import (
    COUNTER_FIELDS,
    SERVE_ROWS,
    ProcessFigures,
    ProcessRows,
    add_counters,
    zerocopy_stats,
)
from netmemtrace.host import cgroups, resolve
from netmemtrace.host.procfs import comm_of
from netmemtrace.kernel import abi, libbpf, probes
from netmemtrace.privilege import netns_broker
from netmemtrace.snapshot import (
    MemcgSelfStats,
    MemcgSnapshot,
    ProcessSnapshot,
    UnacceptedSocket,
    Unavailable,
)

TRACEPOINT_SOURCE = "tracepoint memcg:mod_memcg_state (MEMCG_SOCK)"
FUNCTION_SOURCE = "function probes (socket charge/uncharge)"
# Either pair of functions covers every socket charge of a kernel: new names, then old.
FUNCTION_HOOK_PAIRS = (("sk_charge", "sk_uncharge"), ("charge_skmem", "uncharge_skmem"))


@dataclass(frozen=True)
class SockEvents:
    charged_pages: int
    uncharged_pages: int


def event_source(hierarchy: str | None, status: Iterable[probes.ProbeStatus]
                 ) -> tuple[str | None, str]:
    """The event source of socket-memory figures on this kernel, or None and why not."""
    attached = {s.hook for s in status if s.attached}
    if hierarchy == "v2" and "mod_memcg_state" in attached:
        return TRACEPOINT_SOURCE, ""
    for charge, uncharge in FUNCTION_HOOK_PAIRS:
        if charge in attached and uncharge in attached:
            return FUNCTION_SOURCE, ""
    if hierarchy == "v1":
        return None, ("cgroup v1 socket memory has no tracepoint and no charge/uncharge "
                      "function probe attached (see `netmemtrace probes`); polled only")
    return None, "memcg:mod_memcg_state not attached (see `netmemtrace probes`); polled only"


class MemcgReader:
    def __init__(self, obj: libbpf.Object) -> None:
        btf = abi.btf("memcg")
        self._sock_t = btf.struct("memcg_sock")
        self._sock = obj.map("memcg_sock")
        self._stats = abi.Stats("memcg", obj.map("memcg_stats"))
        self._unaccepted_t = btf.struct("memcg_unaccepted")
        self._obj = obj
        self._unaccepted: libbpf.Link | None = None  # attached on first use

    def read(self, source: str | None) -> dict[int, SockEvents]:
        prefix = "tp" if source == TRACEPOINT_SOURCE else "fn"
        out = {}
        for key, per_cpu in self._sock.items():
            vals = [abi.decode(self._sock_t, v) for v in per_cpu]
            out[int.from_bytes(key, "little")] = SockEvents(
                sum(getattr(v, f"{prefix}_charged_pages") for v in vals),
                sum(getattr(v, f"{prefix}_uncharged_pages") for v in vals))
        return out

    def untracked(self) -> str | None:
        """Why a memcg without a record may still have had socket events (memcg_sock was
        full once), or None: then no record means none since attach."""
        lost = self._stats.read()["memcg_map_full"]
        return (f"unknown: the memcg_sock map was full ({lost} socket events of untracked "
                "memcgs lost, memcg_map_full)") if lost else None

    def unaccepted(self, resolver: cgroups.CgroupResolver | None
                   ) -> tuple[UnacceptedSocket, ...]:
        """Every connection queued on a listener and not accept()ed yet, in every netns
        (an iterator answers for the netns it is created in: made there by netns_broker)."""
        if self._unaccepted is None:
            self._unaccepted = self._obj.attach("memcg_unaccepted")
        size = ctypes.sizeof(self._unaccepted_t)
        raw = []
        for path in resolve.network_namespaces().values():
            try:
                fd = netns_broker.fd_in_netns(path, netns_broker.BPF_ITER,
                                              self._unaccepted.fd)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ESRCH):
                    continue  # gone meanwhile
                raise
            with os.fdopen(fd, "rb") as f:
                data = f.read()
            raw += [abi.decode(self._unaccepted_t, data[i:i + size])
                    for i in range(0, len(data) - size + 1, size)]
        if not raw:
            return ()
        owners = socket_owners({r.listener_ino for r in raw if r.listener_ino})
        names, own = resolve.netns_names(), resolve.own_netns_inode()
        if resolver:
            resolver.refresh()

        def path(memcg_id: int) -> str | None:
            return resolver.path(memcg_id) if resolver and memcg_id else None

        out = []
        for r in {r.sk: r for r in raw}.values():
            pids = tuple(owners.get(r.listener_ino, ()))
            out.append(UnacceptedSocket(
                netns=resolve.netns_label(r.netns_ino, names, own),
                local_addr=format_addr(r.family, r.saddr, r.sport),
                remote_addr=format_addr(r.family, r.daddr, r.dport),
                state=TCP_STATES[r.state] if r.state < len(TCP_STATES) else str(r.state),
                queued_bytes=r.queued_bytes, rmem_bytes=r.rmem_alloc,
                forward_alloc_bytes=r.forward_alloc,
                # sk_mem_pages(): whole pages, rounded up, as inet_csk_accept charges them.
                charge_on_accept_bytes=-(-(r.forward_alloc + r.rmem_alloc) // PAGE) * PAGE,
                memcg_id=r.memcg_id, memcg=path(r.memcg_id),
                listener_inode=r.listener_ino, listener_pids=pids,
                listener_comm=comm_of(pids[0]) if pids else None,
                listener_memcg_id=r.listener_memcg_id,
                listener_memcg=path(r.listener_memcg_id)))
        return tuple(sorted(out, key=lambda u: -u.charge_on_accept_bytes))


CrossCheck = Callable[[int, int], tuple[int | Unavailable, int | Unavailable]]


def build_memcgs(procs: list[ProcessFigures], exited: dict[int, dict[str, int]],
                 ledger_hwm: dict[int, int], sock: dict[int, SockEvents],
                 source: str | None, source_reason: str,
                 resolver: cgroups.CgroupResolver | None, now_ns: int,
                 cross_check: CrossCheck, per_memcg: int | None = SERVE_ROWS.per_memcg,
                 awaiting: dict[int, int] | Unavailable | None = None,
                 untracked: str | None = None, ledger_lost: bool = False
                 ) -> tuple[MemcgSnapshot, ...]:
    """procs: running processes and rows of exited ones (exit_ns set), whose counters
    `exited` already holds per memcg. per_memcg: process rows per memcg (None: all).
    awaiting: listener memcg id -> bytes accept() will charge there (awaiting_accept()).
    untracked: why a memcg missing from sock has unknown socket events (MemcgReader's
    untracked()); None: missing means none. ledger_lost: the zc_events ring buffer
    dropped events: a memcg's high-water mark is unknown if a row's is, or if it has
    exited processes (their rows may be gone)."""
    by_memcg: dict[int, list[ProcessFigures]] = {}
    for p in procs:
        by_memcg.setdefault(p.memcg_id, []).append(p)
    awaiting = {} if awaiting is None else awaiting
    ids = set(by_memcg) | set(exited) | set(sock) | \
        (set(awaiting) - {0} if isinstance(awaiting, dict) else set())
    if resolver:
        resolver.refresh()
    out = []
    for memcg_id in sorted(ids):
        rows = by_memcg.get(memcg_id, [])
        members = [p for p in rows if p.exit_ns is None]
        path = resolver.path(memcg_id) if resolver else None
        ident = cgroups.identity(path) if path else cgroups.CgroupIdentity(None, None, None,
                                                                          None, None)
        counters = exited.get(memcg_id, dict.fromkeys(COUNTER_FIELDS, 0))
        for p in members:
            counters = add_counters(counters, p.counters)
        unaccounted = _ledger_sum(p.unaccounted_bytes for p in members)
        oldest = _oldest([p.oldest_mapped_ns for p in members])
        # Running before exited, then by unaccounted bytes (unknown last); exited, most
        # recent first.
        processes = tuple(sorted(
            (_process(p, now_ns, cross_check) for p in rows),
            key=lambda p: (p.exited, isinstance(p.zerocopy_unaccounted_bytes, Unavailable),
                           -_known(p.zerocopy_unaccounted_bytes), p.exit_age_ns or 0,
                           p.pid)))[:per_memcg]
        # The high-water mark is as exact as every process that ever counted in it: known
        # for the rows here, not for exited processes whose rows went.
        hwm_unknown = ledger_lost and (memcg_id in exited or any(
            isinstance(p.unaccounted_hwm_bytes, Unavailable) for p in rows))

        charged: int | Unavailable
        uncharged: int | Unavailable
        net: int | Unavailable
        ev = sock.get(memcg_id)
        if source is None:
            charged = uncharged = net = Unavailable(source_reason)
        elif ev is None and untracked:
            charged = uncharged = net = Unavailable(untracked)
        else:
            ev = ev or SockEvents(0, 0)
            charged, uncharged = ev.charged_pages, ev.uncharged_pages
            net = (charged - uncharged) * PAGE
        now_bytes, now_source = _polled(resolver, path)
        out.append(MemcgSnapshot(
            cgroup_id=memcg_id, hierarchy=resolver.hierarchy if resolver else "none",
            path=path, runtime=ident.runtime, container_id=ident.container_id,
            pod_uid=ident.pod_uid, qos_class=ident.qos_class, systemd_unit=ident.systemd_unit,
            sock_event_source=source, sock_charged_pages_total=charged,
            sock_uncharged_pages_total=uncharged, sock_net_charged_since_attach_bytes=net,
            sock_charged_now_bytes=now_bytes, sock_charged_now_source=now_source,
            zerocopy=zerocopy_stats(counters, _ledger_sum(p.inflight_bytes for p in members)),
            zerocopy_unaccounted_bytes=unaccounted,
            zerocopy_unaccounted_hwm_bytes=zerocopy.LEDGER_LOSS if hwm_unknown
            else ledger_hwm.get(memcg_id, 0),
            zerocopy_oldest_mapped_age_ns=now_ns - oldest if isinstance(oldest, int)
            else oldest,
            would_be_charged_bytes=now_bytes if isinstance(now_bytes, Unavailable)
            else unaccounted if isinstance(unaccounted, Unavailable)
            else now_bytes + unaccounted,
            processes=processes,
            sock_awaiting_accept_bytes=awaiting.get(memcg_id, 0)
            if isinstance(awaiting, dict) else awaiting,
        ))
    return tuple(out)


def _ledger_sum(values: Iterable[int | Unavailable]) -> int | Unavailable:
    """A ledger figure summed over processes; unknown if one process's is."""
    total = 0
    for v in values:
        if isinstance(v, Unavailable):
            return v
        total += v
    return total


def _oldest(values: list[int | None | Unavailable]) -> int | None | Unavailable:
    """The earliest map time of processes (None: none maps anything); unknown if one
    process's is."""
    missing = next((v for v in values if isinstance(v, Unavailable)), None)
    if missing is not None:
        return missing
    known = [v for v in values if isinstance(v, int)]
    return min(known) if known else None


def _known(v: int | Unavailable) -> int:
    """A figure for ranking only: 0 where unknown."""
    return 0 if isinstance(v, Unavailable) else v


def awaiting_accept(unaccepted: tuple[UnacceptedSocket, ...]) -> dict[int, int]:
    """Listener memcg id -> bytes accept() will charge there, from connections charged to
    no memcg yet (a socket with a memcg is counted in that memcg's `sock` already)."""
    out: dict[int, int] = {}
    for u in unaccepted:
        if not u.memcg_id:
            out[u.listener_memcg_id] = out.get(u.listener_memcg_id, 0) + \
                u.charge_on_accept_bytes
    return out


def _polled(resolver: cgroups.CgroupResolver | None, path: str | None
            ) -> tuple[int | Unavailable, str]:
    if resolver is None:
        return Unavailable("no memory cgroup hierarchy mounted"), "none"
    if path is None:
        return Unavailable("memory cgroup deleted (or not found on its hierarchy)"), "none"
    try:
        polled = cgroups.polled_sock(resolver, path)
    except (OSError, ValueError) as exc:
        return Unavailable(f"cannot read the memcg's files: {exc}"), "none"
    return (polled.bytes if polled.bytes is not None else Unavailable(polled.reason),
            polled.source)


def _process(p: ProcessFigures, now_ns: int, cross_check: CrossCheck) -> ProcessSnapshot:
    smaps: int | Unavailable
    diff: int | Unavailable
    if p.exit_ns is not None:
        smaps = diff = Unavailable("process exited: its mappings went with it")
    elif p.counters["rx_calls"] or p.unaccounted_hwm_bytes:  # hwm: found mapped at start
        smaps, diff = cross_check(p.pid, _known(p.unaccounted_bytes))
        if isinstance(p.unaccounted_bytes, Unavailable) and not isinstance(smaps, Unavailable):
            diff = p.unaccounted_bytes  # smaps stands; the ledger side is unknown
    else:  # smaps is read only for TCP_ZEROCOPY_RECEIVE callers, never for every process
        smaps = diff = Unavailable("process never called TCP_ZEROCOPY_RECEIVE")
    return ProcessSnapshot(
        pid=p.pid, comm=comm_of(p.pid) if p.exit_ns is None else p.comm, memcg_id=p.memcg_id,
        zerocopy=zerocopy_stats(p.counters, p.inflight_bytes),
        zerocopy_unaccounted_bytes=p.unaccounted_bytes,
        zerocopy_unaccounted_hwm_bytes=p.unaccounted_hwm_bytes,
        zerocopy_oldest_mapped_age_ns=now_ns - p.oldest_mapped_ns
        if isinstance(p.oldest_mapped_ns, int) else p.oldest_mapped_ns,
        smaps_socket_rss_bytes=smaps, ledger_vs_smaps_bytes=diff,
        exited=p.exit_ns is not None,
        exit_age_ns=now_ns - p.exit_ns if p.exit_ns is not None else None)



class MemcgCollector:
    """Both domains joined per memcg; what Session calls once per snapshot."""

    def __init__(self, memcg_obj: probes.LoadedObject, zerocopy_obj: probes.LoadedObject,
                 max_ranges: int = MAX_RANGES, rows: ProcessRows = SERVE_ROWS) -> None:
        self._memcg_obj = memcg_obj
        self._rows = rows
        self.memcg = MemcgReader(memcg_obj.obj)
        self.zerocopy = zerocopy.ZerocopyReader(zerocopy_obj.obj, max_ranges, rows)
        self.resolver = cgroups.CgroupResolver.for_memory()

    def read(self, now_ns: int) -> tuple[tuple[MemcgSnapshot, ...], MemcgSelfStats,
                                         tuple[UnacceptedSocket, ...] | Unavailable]:
        source, reason = event_source(self.resolver.hierarchy if self.resolver else None,
                                      self._memcg_obj.status())
        procs, exited, hwm = self.zerocopy.read(now_ns)
        unaccepted: tuple[UnacceptedSocket, ...] | Unavailable
        try:
            unaccepted = self.memcg.unaccepted(self.resolver)
            awaiting: dict[int, int] | Unavailable = awaiting_accept(unaccepted)
        except (OSError, libbpf.LibbpfError) as exc:
            unaccepted = awaiting = Unavailable(f"the accept-queue iterator failed: {exc}")
        memcgs = build_memcgs(procs, exited, hwm, self.memcg.read(source), source, reason,
                              self.resolver, now_ns, zerocopy.cross_check,
                              self._rows.per_memcg, awaiting, self.memcg.untracked(),
                              ledger_lost=self.zerocopy.loss.lost > 0)
        led = self.zerocopy.ledger
        mismatched = sum(1 for m in memcgs for p in m.processes
                         if isinstance(p.ledger_vs_smaps_bytes, int) and p.ledger_vs_smaps_bytes)
        return memcgs, MemcgSelfStats(
            ledger_ranges=led.nranges,
            ledger_overflow_ranges=led.overflow_ranges, ledger_overflow_bytes=led.overflow_bytes,
            tx_tracker_overflow_sends=self.zerocopy.tx.overflow_sends,
            smaps_mismatch_pids=mismatched,
            exited_process_rows=sum(p.exit_ns is not None for p in procs),
            exited_rows_expired=self.zerocopy.gone_expired,
            exited_rows_evicted=self.zerocopy.gone_evicted), unaccepted

    def close(self) -> None:
        self.zerocopy.close()
