"""Who holds the pages of zombie page pools (bpf/holders.bpf.c).

A pool the driver destroyed stays allocated while any of its pages is out (inflight); the
kernel only says "stalled pool shutdown: N inflight". This collector names the holders, at
each read() while a zombie exists and never otherwise (the iterators are not on any hot path):

- socket: TCP and UDP sockets whose receive / out-of-order / error / reader queues hold skbs
  with the pool's pages, with netns, addresses, state, owning process (socket inode ->
  /proc/PID/fd, like ss -p) and memory cgroup. The socket iterators only see the netns they
  are opened in, so they are opened once in every network namespace (netns_broker.py: by
  the broker once capabilities are dropped, else by setns in this thread).
- cpu-deferred-free: freed skbs parked on a CPU's deferred-free list until that CPU's next
  RX softirq; self-healing.
- pool-ring: pages already returned to the destroyed pool, freed at its next release retry
  (every second); self-healing.
- devmem-tokens / io_uring-zcrx: for net_iov pools, what no queue or list holds is with the
  application (tokens not returned, zcrx buffers not refilled): inferred, not seen.
- unattributed: the rest, never dropped, so the pages always add up to inflight_pages.

Pages are deduplicated on the netmem: page_pool hands out page fragments, so several skbs
(of one socket, or of a socket and a CPU list) can share one page; a shared page is counted
once, for the socket (its reference outlives the self-healing ones).

Pages mapped into a process by TCP receive zerocopy (collect/ledger.py) never keep a pool a
zombie: when the skb lets go of a page that is still mapped, its refcount is above one, so
page_pool returns it to the page allocator (a release) instead of recycling it. No
process-mapping holder is therefore derived from the ledger for page pools.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import errno
import functools
import mmap
import os
import socket
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from netmemtrace.collect.netmem import head_page_symbols
from netmemtrace.host import cgroups, resolve
from netmemtrace.host.procfs import comm_of
from netmemtrace.kernel import abi, libbpf
from netmemtrace.privilege import netns_broker
from netmemtrace.privilege.netns_broker import entered_netns  # noqa: F401 (tests enter the demo's netns)
from netmemtrace.snapshot import Holder, PoolSnapshot, Unavailable

# Holders of zombies whose inflight did not move are reused for at most this long.
RESCAN_UNCHANGED_S = 10.0

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
PAGE_SHIFT = os.sysconf("SC_PAGE_SIZE").bit_length() - 1
DEFAULT_MAX_SKBS = 4096        # per queue or list before a walk is reported partial
MIN_SLAB_AGREEMENT = 8         # calibration pairs that must agree on virt_to_page's offset
ITERATORS = ("holders_tcp", "holders_udp", "holders_deferred", "holders_rings", "holders_cpus",
             "holders_slab", "holders_sysctl")

# Socket queues by their holder_where name, as Holder.queue_pages names them.
QUEUE_NAMES = {"RECEIVE_QUEUE": "receive", "OOO_QUEUE": "out_of_order",
               "ERROR_QUEUE": "error", "READER_QUEUE": "reader"}
TCP_STATES = ("", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2",
              "TIME_WAIT", "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING",
              "NEW_SYN_RECV", "BOUND_INACTIVE")
PROVIDER_KINDS = {"dmabuf": "devmem-tokens", "io_uring": "io_uring-zcrx"}


# ---- kernel addresses BTF does not give directly ----

_BTF_KIND_EXTRA = {1: 4, 3: 12, 14: 4, 17: 4}            # INT, ARRAY, VAR, DECL_TAG
_BTF_KIND_PER_VLEN = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}
_BTF_VAR, _BTF_DATASEC = 14, 15


def _read_unmappable(path: Path) -> mmap.mmap:
    """A file's bytes in an anonymous mapping of their own, returned to the system as soon
    as it is closed. (The 5 MB bytes object of the kernel BTF stayed with the allocator
    once freed: +5 MB of the daemon's RSS from the first zombie scan on.)"""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size <= 0:
            raise ValueError(f"{path}: empty")
        buf = mmap.mmap(-1, size)
        try:
            with memoryview(buf) as view:
                done = 0
                while done < size and (n := f.readinto(view[done:])):
                    done += n
        except BaseException:
            buf.close()
            raise
    return buf


def percpu_offsets(path: Path = VMLINUX_BTF) -> dict[str, int]:
    """Offset of every per-CPU variable in .data..percpu, from the kernel BTF's DATASEC.

    Parsed directly (header, then each type's fixed part and kind-specific tail): only the
    VAR names and that one DATASEC are needed, not a type graph.
    """
    with _read_unmappable(path) as data:
        return _percpu_offsets(data, path)


def _percpu_offsets(data: mmap.mmap, path: Path) -> dict[str, int]:
    magic, _ver, _flags, hdr_len, type_off, type_len, str_off, _str_len = struct.unpack_from(
        "<HBBIIIII", data)
    if magic != 0xEB9F:
        raise ValueError(f"{path}: not BTF (magic {magic:#x})")
    strings = hdr_len + str_off

    def name(off: int) -> str:
        end = data.find(b"\0", strings + off)
        if end < 0:
            raise ValueError(f"{path}: a BTF name runs past the end")
        return data[strings + off:end].decode()

    pos, end = hdr_len + type_off, hdr_len + type_off + type_len
    type_id, var_names, section = 1, {}, b""
    while pos < end:
        name_off, info, _size = struct.unpack_from("<III", data, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        body, pos = pos + 12, pos + 12 + _BTF_KIND_EXTRA.get(kind, 0) + \
            _BTF_KIND_PER_VLEN.get(kind, 0) * vlen
        if kind == _BTF_VAR:
            var_names[type_id] = name_off
        elif kind == _BTF_DATASEC and name(name_off) == ".data..percpu":
            section = data[body:pos]
        type_id += 1
    return {name(var_names[t]): off for t, off, _size in struct.iter_unpack("<III", section)
            if t in var_names}


def possible_nodes() -> int:
    """nr_node_ids: one more than the highest possible NUMA node."""
    try:
        text = Path("/sys/devices/system/node/possible").read_text().strip()
    except OSError:
        return 1
    return max(int(part.split("-")[-1]) for part in text.split(",")) + 1


def slab_page_base(candidates: Iterable[int]) -> int | None:
    """virt_to_page()'s constant (struct page of address 0), from the values order-0 slabs
    give (holders_slab): the one most agree on, if enough do. A slab freed or reused while
    it was read gives a stray value, never the majority."""
    votes = collections.Counter(candidates)
    if not votes:
        return None
    base, count = votes.most_common(1)[0]
    return base if count >= MIN_SLAB_AGREEMENT and count * 10 >= sum(votes.values()) * 9 \
        else None


@dataclass
class Calibration:
    """Done once per collector, on the first zombie; each part is None with a reason if not."""

    page_base: int | None = None
    net_hotdata: int | None = None
    cpus_located: int = 0
    notes: dict[str, str] = field(default_factory=dict)  # part -> why it is missing


# ---- network namespaces ----

# ---- socket owners ----

def socket_owners(inodes: set[int]) -> dict[int, list[int]]:
    """socket inode -> pids holding it open, from /proc/PID/fd links (what ss -p does)."""
    wanted = {f"socket:[{ino}]": ino for ino in inodes}
    owners: dict[int, list[int]] = {}
    if not wanted:
        return owners
    for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                ino = wanted.get(os.readlink(f"{fd_dir}/{fd}"))
            except OSError:
                continue
            if ino is not None and pid not in owners.setdefault(ino, []):
                owners[ino].append(pid)
    return owners


def process_memcg(pid: int, hierarchy: str | None) -> str | None:
    """The memory cgroup path of a process on the hierarchy that carries memory."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if (hierarchy == "v2" and hier == "0") or \
                (hierarchy == "v1" and "memory" in controllers.split(",")):
            return path
    return None


def format_addr(family: int, words: Iterable[int], port: int) -> str:
    raw = b"".join(w.to_bytes(4, "little") for w in words)
    if family == socket.AF_INET6:
        return f"[{socket.inet_ntop(socket.AF_INET6, raw)}]:{port}"
    return f"{socket.inet_ntop(socket.AF_INET, raw[:4])}:{port}"


# ---- one scan ----

@dataclass(frozen=True)
class PoolRetryState:
    """A destroyed pool's own shutdown state, read from its struct page_pool."""

    release_attempts: int          # page_pool_release calls: the destroy and every retry
    destroyed_age_ns: int          # since page_pool_destroy (defer_start): true even for
                                   # pools destroyed before netmemtrace started
    next_stall_warning_in_ns: int  # until the kernel's next "stalled pool shutdown" line
    ring_pages: int


@dataclass(frozen=True)
class ScanReport:
    """What one scan looked at: the "what was checked" of explain-zombie."""

    zombie_pools: int
    netns_visited: int
    netns_failed: tuple[str, ...]      # "path: reason"
    sockets: int                       # full TCP and UDP sockets visited
    skbs: int
    netmem_refs: int                   # frags and heads looked at
    zombie_refs: int
    zombie_refs_lost: int              # the ring buffer had no room: pages left unattributed
    partial_sockets: int
    cpus_readable: int
    cpus: int
    defer_lists: str                   # how the per-CPU deferred-free lists were read, or why not
    skb_heads: str                     # how skb head pages were resolved, or why not
    heads_unresolved: int
    frag_lists_cut: int
    max_skbs: int
    duration_ns: int
    pools: dict[int, PoolRetryState]   # by pool address


@dataclass(frozen=True)
class SocketOwner:
    """Who a socket belongs to, from /proc and the cgroup hierarchy."""

    netns: str | None
    pids: tuple[int, ...]
    comm: str | None
    memcg: str | Unavailable | None
    memcg_source: str | None


@dataclass
class _Scan:
    refs: list[tuple[int, int, int, int]]           # (owner, pool, netmem, where)
    socks: dict[int, ctypes.Structure]              # by sk
    cpus: dict[int, ctypes.Structure]               # by CPU
    report: ScanReport


class HoldersCollector:
    """Runs the holder iterators of a loaded holders.bpf.o and attributes zombie pages."""

    def __init__(self, obj: libbpf.Object, max_skbs: int = DEFAULT_MAX_SKBS) -> None:
        btf = abi.btf("holders")
        self.max_skbs = max_skbs
        self._t = {name: btf.struct(name) for name in (
            "holder_page", "holder_sock", "holder_cpu", "holder_pool", "holder_slab",
            "holder_sysctl", "holders_config", "holders_scan_stats")}
        # enum holder_rec_type: HOLDER_REC_SOCK is a struct holder_sock, and so on.
        rec = btf.enum("holder_rec_type", "HOLDER_REC_")
        self._rec_types = {n: self._t[f"holder_{name.lower()}"] for name, n in rec.items()}
        self._rec_cpu = rec["CPU"]
        holder_where()  # read while the BTF is parsed (Session drops it after loading)
        self._zombies = obj.map("zombie_pools")
        self._in_map: set[int] = set()  # what zombie_pools holds now
        self._config = obj.map("holders_config")
        self._stats = obj.map("holders_stats")
        self._bases = obj.map("cpu_percpu_base")
        # An iterator the kernel lacks was not loaded (probes.missing_iterator): its
        # figures are reported unavailable, the rest still scan.
        self._links = {name: obj.attach(name) for name in ITERATORS
                       if obj.programs[name].fd >= 0}
        self._refs: list[tuple[int, int, int, int]] = []
        # The page references' ring buffer, mapped on the first scan: most hosts never see
        # a zombie pool, and a mapped ring is twice its size in RSS (bpf/holders.bpf.c).
        self._pages_map = obj.map("holder_pages")
        self._rb: libbpf.RingBuffer | None = None
        self._ncpus = libbpf.num_possible_cpus()
        self._percpu: dict[str, int] = {}  # parsed by calibrate(): 0.1 s, only for zombies
        self._calibration: Calibration | None = None
        # (pool, cpu) -> softnet processed when the pool was first seen a zombie
        self._rx_at_zombie: dict[tuple[int, int], int] = {}
        # (zombies' (pool, inflight), monotonic s, holders per pool) of the last scan
        self._last: tuple[tuple[tuple[int, int], ...], float,
                          dict[int, tuple[Holder, ...]]] | None = None
        self._memcgs = cgroups.CgroupResolver.for_memory()
        self.last_scan: ScanReport | None = None
        # Every counter of holders_scan_stats summed over the scans since attach.
        self.totals = collections.Counter(
            dict.fromkeys(abi.fields(self._t["holders_scan_stats"]), 0))

    def _drain(self) -> None:
        """Take every page reference the iterators sent so far off the ring buffer."""
        if self._rb is None:
            self._rb = libbpf.RingBuffer(self._pages_map, self._on_ref)
        self._rb.consume()

    def _socket_records(self, name: str, netns: str) -> bytes:
        """Run a socket iterator over the netns at path `netns`, draining the ring buffer
        after every socket that holds zombie pages: a read of one record's size returns as
        soon as a socket printed its record, which comes after its page references. The
        ring then only ever holds one socket's references (bpf/holders.bpf.c sizes it so)."""
        # libbpf.Link has no fd accessor; its iter_chunks creates the iterator in this
        # thread's netns, hence the fd made by netns_broker here.
        link_fd = self._links[name].fd
        size = ctypes.sizeof(self._t["holder_sock"])
        chunks = []
        with os.fdopen(netns_broker.fd_in_netns(netns, netns_broker.BPF_ITER, link_fd),
                       "rb", buffering=0) as f:
            while chunk := f.read(size):
                chunks.append(chunk)
                self._drain()
        return b"".join(chunks)

    def _on_ref(self, raw: bytes) -> None:
        r = abi.decode(self._t["holder_page"], raw)
        self._refs.append((r.owner, r.pool, r.netmem, r.where))

    def _records(self, raw: bytes) -> Iterator[ctypes.Structure]:
        pos = 0
        while pos + 4 <= len(raw):
            rtype = int.from_bytes(raw[pos:pos + 4], "little")
            cls = self._rec_types.get(rtype)
            if cls is None:
                raise ValueError(f"holders iterator printed an unknown record type {rtype}")
            yield abi.decode(cls, raw[pos:pos + ctypes.sizeof(cls)])
            pos += ctypes.sizeof(cls)

    def _write_config(self, cal: Calibration, sysctl_fd: int = 0) -> None:
        cfg = self._t["holders_config"]()
        cfg.page_base = cal.page_base or 0
        cfg.net_hotdata = cal.net_hotdata or 0
        cfg.runqueues_off = self._percpu.get("runqueues", 0)
        cfg.softnet_data_off = self._percpu.get("softnet_data", 0)
        cfg.this_cpu_off_off = self._percpu.get("this_cpu_off", 0)
        cfg.page_shift = PAGE_SHIFT
        cfg.max_skbs = self.max_skbs
        cfg.nr_cpus = self._ncpus
        cfg.nr_nodes = possible_nodes()
        cfg.self_tgid = os.getpid()
        cfg.sysctl_fd = sysctl_fd
        cfg.page_offset_base_addr, cfg.vmemmap_base_addr = head_page_symbols()
        self._config.update(ctypes.c_uint32(0), bytes(cfg))

    def calibrate(self) -> Calibration:
        """Locate what the iterators need and BTF does not give; once per collector."""
        if self._calibration is not None:
            return self._calibration
        cal = Calibration()
        try:
            self._percpu = percpu_offsets()
        except (OSError, ValueError) as exc:
            cal.notes["cpus"] = f"kernel BTF unreadable: {exc}"
        self._write_config(cal)
        if "runqueues" in self._percpu and "softnet_data" in self._percpu:
            self._links["holders_cpus"].read_iter()
            cal.cpus_located = sum(
                1 for cpu in range(self._ncpus)
                if int.from_bytes(self._bases.lookup(ctypes.c_uint32(cpu)) or b"", "little"))
        else:
            cal.notes.setdefault("cpus", "runqueues/softnet_data not in the kernel BTF's "
                                         "per-CPU section")
        if "holders_slab" in self._links:
            bases = [r.page_base
                     for r in self._records(self._links["holders_slab"].read_iter())]
            cal.page_base = slab_page_base(bases)
            if cal.page_base is None:
                cal.notes["heads"] = (f"virt_to_page not calibrated: {len(bases)} slab "
                                      "samples did not agree")
        elif not all(head_page_symbols()):
            cal.notes["heads"] = ("virt_to_page not calibrated: the kmem_cache iterator is "
                                  "not in this kernel (6.13+) and /proc/kallsyms has no "
                                  "page_offset_base/vmemmap_base (CONFIG_KALLSYMS_ALL off)")
        cal.net_hotdata, why = self._locate_net_hotdata(cal)
        if why:
            cal.notes["hotdata"] = why
        self._write_config(cal)
        self._calibration = cal
        return cal

    def _locate_net_hotdata(self, cal: Calibration) -> tuple[int | None, str]:
        # The sysctl's ctl_table points into net_hotdata; holders_sysctl finds that table
        # from our own open file. Only init_net has net.core.skb_defer_max.
        try:
            fd = os.open("/proc/sys/net/core/skb_defer_max", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            return None, f"/proc/sys/net/core/skb_defer_max: {exc.strerror}"
        try:
            self._write_config(cal, sysctl_fd=fd)
            recs = list(self._records(self._links["holders_sysctl"].read_iter()))
        finally:
            os.close(fd)
        if not recs or recs[0].procname != b"skb_defer_max" or not recs[0].net_hotdata:
            return None, "the skb_defer_max sysctl table did not lead to net_hotdata"
        return recs[0].net_hotdata, ""

    def _set_zombies(self, addrs: set[int]) -> None:
        for addr in self._in_map - addrs:
            self._zombies.delete(ctypes.c_uint64(addr))
        for addr in addrs - self._in_map:
            self._zombies.update(ctypes.c_uint64(addr), bytes(4))
        self._in_map = set(addrs)

    def scan(self, zombie_addrs: set[int]) -> _Scan:
        """Run every iterator once over the given zombie pools."""
        start = time.monotonic_ns()
        cal = self.calibrate()
        self._set_zombies(zombie_addrs)
        self._stats.update(ctypes.c_uint32(0), bytes(ctypes.sizeof(self._t["holders_scan_stats"])))
        self._drain()
        self._refs = []
        socks: dict[int, ctypes.Structure] = {}
        failed: list[str] = []
        visited = 0
        for path in resolve.network_namespaces().values():
            try:
                raw = self._socket_records("holders_tcp", path) + \
                    self._socket_records("holders_udp", path)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ESRCH):  # not just gone meanwhile
                    failed.append(f"{path}: {exc.strerror or exc}")
                continue
            visited += 1
            socks.update((r.sk, r) for r in self._records(raw))
        cpus: dict[int, ctypes.Structure] = {}
        pools: dict[int, ctypes.Structure] = {}
        for name in ("holders_deferred", "holders_rings"):  # the ring drained after each
            for r in self._records(self._links[name].read_iter()):
                if r.type == self._rec_cpu:
                    cpus[r.cpu] = r
                else:
                    pools[r.pool] = r
            self._drain()
        raw = self._stats.lookup(ctypes.c_uint32(0))
        stats = abi.decode(self._t["holders_scan_stats"], raw)
        self.totals.update(abi.counters(self._t["holders_scan_stats"], [raw]))
        readable = sum(1 for c in cpus.values() if c.readable)
        report = ScanReport(
            zombie_pools=len(zombie_addrs), netns_visited=visited,
            netns_failed=tuple(failed), sockets=stats.sockets, skbs=stats.skbs,
            netmem_refs=stats.frags, zombie_refs=stats.refs, zombie_refs_lost=stats.refs_lost,
            partial_sockets=sum(1 for s in socks.values() if s.partial),
            cpus_readable=readable, cpus=len(cpus),
            defer_lists=self._defer_lists_text(cal, readable),
            skb_heads=cal.notes.get("heads") or
            "virt_to_page calibrated from slab pages (heads of page_pool skbs counted)",
            heads_unresolved=stats.heads_unresolved, frag_lists_cut=stats.frag_lists_cut,
            max_skbs=self.max_skbs, duration_ns=time.monotonic_ns() - start,
            pools={addr: PoolRetryState(r.destroy_cnt, r.defer_start_age_ms * 1_000_000,
                                        r.defer_warn_in_ms * 1_000_000, r.ring_refs)
                   for addr, r in pools.items()})
        self.last_scan = report
        return _Scan(self._refs, socks, cpus, report)

    def _defer_lists_text(self, cal: Calibration, readable: int) -> str:
        if readable:
            return f"read on {readable} CPU(s)"
        reasons = [cal.notes[k] for k in ("cpus", "hotdata") if k in cal.notes]
        return "unreadable: " + ("; ".join(reasons) or "per-CPU areas not located")

    def annotate(self, pools: list[PoolSnapshot]) -> list[PoolSnapshot]:
        """The pools with holders filled in for each zombie; a no-op (no iterator run) when
        there is no zombie."""
        zombies = {p.pool_addr: p for p in pools if is_zombie(p)}
        for key in [k for k in self._rx_at_zombie if k[0] not in zombies]:
            del self._rx_at_zombie[key]
        if not zombies:
            self._set_zombies(set())
            self._last = None
            return pools
        # A scan walks every socket of every netns (its CPU: bench/README.md, Daemon CPU):
        # while no zombie's inflight moved, the holders found last time still stand, a while.
        state = tuple(sorted((a, p.inflight_pages) for a, p in zombies.items()
                             if isinstance(p.inflight_pages, int)))
        now = time.monotonic()
        if self._last is not None and self._last[0] == state and \
                now - self._last[1] < RESCAN_UNCHANGED_S:
            return [dataclasses.replace(p, holders=self._last[2][p.pool_addr])
                    if p.pool_addr in zombies else p for p in pools]
        scan = self.scan(set(zombies))
        for addr in zombies:
            for cpu, rec in scan.cpus.items():
                if rec.readable:
                    self._rx_at_zombie.setdefault((addr, cpu), rec.rx_processed)
        identities = self._identities(scan.socks.values())
        found = {addr: attribute(
            p, scan.refs, scan.socks, scan.cpus, identities, scan.report,
            {cpu: rx for (a, cpu), rx in self._rx_at_zombie.items() if a == addr})
            for addr, p in zombies.items()}
        self._last = (state, now, found)
        return [dataclasses.replace(p, holders=found[p.pool_addr])
                if p.pool_addr in zombies else p for p in pools]

    def _identities(self, socks: Iterable[ctypes.Structure]) -> dict[int, SocketOwner]:
        socks = list(socks)
        owners = socket_owners({s.ino for s in socks if s.ino})
        names = resolve.netns_names()
        own_ino = resolve.own_netns_inode()
        if self._memcgs:
            self._memcgs.refresh()
        hierarchy = self._memcgs.hierarchy if self._memcgs else None
        out: dict[int, SocketOwner] = {}
        for s in socks:
            pids = tuple(owners.get(s.ino, ()))
            memcg: str | Unavailable | None
            source: str | None
            if s.memcg_id and self._memcgs:
                memcg, source = self._memcgs.path(s.memcg_id), "sk_memcg"
            elif pids:
                memcg, source = process_memcg(pids[0], hierarchy), "process"
            else:
                memcg, source = Unavailable(
                    "socket not charged to a memcg (sk_memcg unset: cgroup v1 without a tcp "
                    "limit) and no process has it open"), None
            out[s.sk] = SocketOwner(resolve.netns_label(s.netns_ino, names, own_ino), pids,
                                    comm_of(pids[0]) if pids else None, memcg, source)
        return out

    def close(self) -> None:
        if self._rb is not None:
            self._rb.close()
            self._rb = None


@functools.cache
def holder_where() -> dict[str, int]:
    """enum holder_where (bpf/netmemtrace.h) from the object's BTF, names without HOLDER_:
    where a reference was found; lower values win when skbs share a page."""
    return abi.btf("holders").enum("holder_where", "HOLDER_")


def is_zombie(pool: PoolSnapshot) -> bool:
    """Destroyed with pages still out (an unknown inflight counts: it may hold pages)."""
    return pool.state == "zombie" and (isinstance(pool.inflight_pages, Unavailable) or
                                       pool.inflight_pages > 0)


def _socket_holder(rec: ctypes.Structure, pages: int, by_queue: dict[int, int],
                   owner: SocketOwner) -> Holder:
    proto = "tcp" if rec.protocol == socket.IPPROTO_TCP else "udp"
    if proto == "tcp":
        state = TCP_STATES[rec.state] if rec.state < len(TCP_STATES) else str(rec.state)
    else:
        state = "CONNECTED" if rec.state == 1 else "UNCONNECTED"
    local = format_addr(rec.family, rec.saddr, rec.sport)
    remote = format_addr(rec.family, rec.daddr, rec.dport) if rec.dport else "*:*"
    pid = owner.pids[0] if owner.pids else None
    who = f"pid {pid} ({owner.comm})" if pid else "no process"
    detail = (f"{proto} {local} -> {remote} {state} in netns {owner.netns}, open in {who}: "
              "received data nobody read; reading or closing the socket releases the pages")
    if rec.partial:
        detail += " (a queue was longer than the walk bound: it may hold more)"
    return Holder(
        kind="socket", pages=pages, self_healing=False, detail=detail, protocol=proto,
        state=state, netns=owner.netns, local_addr=local, remote_addr=remote,
        socket_inode=rec.ino or None, uid=rec.uid, pid=pid, pids=owner.pids,
        comm=owner.comm, memcg=owner.memcg, memcg_source=owner.memcg_source,
        queue_pages={QUEUE_NAMES[name]: by_queue[n] for name, n in holder_where().items()
                     if name in QUEUE_NAMES and n in by_queue},
        skbs=rec.skbs, partial_scan=bool(rec.partial))


def attribute(pool: PoolSnapshot, refs: Iterable[tuple[int, int, int, int]],
              socks: dict[int, ctypes.Structure], cpus: dict[int, ctypes.Structure],
              identities: dict[int, SocketOwner], report: ScanReport,
              rx_at_zombie: dict[int, int]) -> tuple[Holder, ...]:
    """The holders of one zombie pool: distinct pages per owner, then the rest.

    refs are (owner, pool, netmem, where) from every queue and list scanned; a page seen in
    several places is credited once, to the place with the lowest `where` (sockets first).
    """
    best: dict[int, tuple[int, int]] = {}  # netmem -> (where, owner)
    for owner, ref_pool, netmem, where in refs:
        if ref_pool == pool.pool_addr and (netmem not in best or where < best[netmem][0]):
            best[netmem] = (where, owner)
    per_owner: dict[tuple[str, int], collections.Counter[int]] = {}
    defer = holder_where()["DEFER_LIST"]
    for found, owner in best.values():
        key = ("socket" if found < defer else "cpu" if found == defer else "ring", owner)
        per_owner.setdefault(key, collections.Counter())[found] += 1
    holders: list[Holder] = []
    for (kind, owner), by_where in per_owner.items():
        pages = sum(by_where.values())
        if kind == "socket":
            holders.append(_socket_holder(socks[owner], pages, by_where, identities[owner]))
        elif kind == "cpu":
            rec = cpus.get(owner)
            since = rec.rx_processed - rx_at_zombie[owner] \
                if rec is not None and owner in rx_at_zombie else None
            holders.append(Holder(
                kind="cpu-deferred-free", pages=pages, self_healing=True, cpu=owner,
                skbs=rec.skbs if rec is not None else None, rx_packets_since_zombie=since,
                partial_scan=bool(rec.partial) if rec is not None else False,
                detail=f"freed skbs parked on CPU {owner}'s deferred-free list: released by "
                       f"that CPU's next network receive (any RX traffic on CPU {owner})"))
        else:
            holders.append(Holder(
                kind="pool-ring", pages=pages, self_healing=True,
                detail="already returned to the destroyed pool's ring: the kernel frees them "
                       "at its next release retry (every second)"))
    holders.sort(key=lambda h: (-h.pages, h.kind, h.cpu or 0))
    if isinstance(pool.inflight_pages, Unavailable):
        return tuple(holders)
    rest = pool.inflight_pages - sum(h.pages for h in holders)
    if rest > 0:
        holders.append(_remainder(pool, rest, report))
    return tuple(holders)


def _remainder(pool: PoolSnapshot, pages: int, report: ScanReport) -> Holder:
    # Every page of a destroyed pool was taken before the destroy: its age bounds them all.
    state = report.pools.get(pool.pool_addr)
    age = state.destroyed_age_ns if state and state.destroyed_age_ns else pool.zombie_age_ns
    kind = PROVIDER_KINDS.get(pool.provider)
    if kind is not None:
        return Holder(
            kind=kind, pages=pages, self_healing=False, held_for_at_least_ns=age,
            detail=f"net_iovs of a {pool.provider} pool in no socket queue or CPU list: "
                   "held by the application (devmem tokens not returned with "
                   "SO_DEVMEM_DONTNEED, io_uring zcrx buffers not refilled); inferred from "
                   "the provider")
    gaps = []
    if report.partial_sockets:
        gaps.append(f"{report.partial_sockets} socket(s) only partially scanned")
    if report.cpus_readable < report.cpus or not report.cpus:
        gaps.append(f"per-CPU deferred-free lists {report.defer_lists}")
    if report.heads_unresolved:
        gaps.append(f"{report.heads_unresolved} skb head(s) not resolved ({report.skb_heads})")
    if report.zombie_refs_lost:
        gaps.append(f"{report.zombie_refs_lost} page reference(s) lost (ring buffer full)")
    if report.netns_failed:
        gaps.append(f"{len(report.netns_failed)} netns not entered")
    where = "; ".join(gaps) or ("not in any TCP/UDP socket queue of the "
                                f"{report.netns_visited} netns visited, any CPU's "
                                "deferred-free list or the pool's ring")
    return Holder(kind="unattributed", pages=pages, self_healing=False,
                  held_for_at_least_ns=age,
                  detail=f"held elsewhere (skbs in flight in other queues, drivers, "
                         f"sockets of netns no process or name keeps): {where}")
