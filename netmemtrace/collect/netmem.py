"""Reader of the netmem domain (bpf/netmem.bpf.c): who holds each tracked netmem (pool,
driver, stack, application), how long applications held them, and devmem TCP tokens per
socket; plus the pure aggregation that turns tracked entries into estimated counts.

Tracking is sampled: the BPF side keeps state for 1 in N netmem, picked by a hash of the
netmem address (is_sampled() is the same predicate), so every per-netmem count is the
tracked count times N and every figure carries that factor. Token counts per socket come
from syscall return values and are exact.

A state is only reported where every hook that moves netmem into or out of it attached;
otherwise it is Unavailable with the hooks that did not, per netmem type.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import platform
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from netmemtrace.host.cgroups import CgroupResolver
from netmemtrace.host.procfs import comm_of
from netmemtrace.kernel import abi, kallsyms, libbpf, probes
from netmemtrace.snapshot import (
    DevmemSocket,
    HoldBucket,
    HoldHistogram,
    NetmemHolder,
    NetmemStates,
    NetmemSummary,
    PoolSnapshot,
    Unavailable,
)

OBJECT = "netmem"
# The maps of bpf/netmem_table.bpf.h: the pagepool object's page_pool tracepoint programs
# fill them, the netmem object's function probes move the same entries; the netmem object
# reuses the pagepool object's (shared_maps()).
CONFIG_MAP = ".data.netmem_config"
SHARED_MAPS = ("netmems", "netmem_pools", "devmem_sockets", "netmem_stats", CONFIG_MAP)
# Hooks run by the pagepool object's programs on the netmem domain's behalf.
POOL_OBJECT_HOOKS = ("page_pool_state_hold", "page_pool_state_release", "page_pool_release")
_PAGE = mmap.PAGESIZE
_ZERO_PAGE = bytes(_PAGE)
HASH_MUL = 0x9E3779B97F4A7C15      # netmem.bpf.c sampled(): Fibonacci hashing
_U64 = (1 << 64) - 1
# An untracked page_pool_state_hold/release event costs what an empty program does; a tracked
# one a cache and TLB miss on its table slot, inherent to following a page. 1 in 32 keeps the
# event inside the 1.5x budget and still tracks ~32 netmem of a 1024-netmem pool (the
# figures, 1 in 16 beside 1 in 32: bench/README.md, netmem hold/release).
DEFAULT_SAMPLE_N = 32
STATES = ("pool", "driver", "stack", "application")
TYPES = ("page", "dmabuf", "io_uring", "net_iov")
# Destroyed sockets stay in the map for this long so several snapshots report them.
DESTROYED_SOCKET_RETAIN_NS = 300 * 10**9

# Hooks that move netmem into or out of each state; without one of them a tracked netmem
# can sit in a state it already left.
CORE_HOOKS = {
    "pool": ("page_pool_state_hold", "page_pool_alloc_netmems", "page_pool_put_unrefed_netmem"),
    "driver": ("page_pool_alloc_netmems", "netif_receive_skb", "page_pool_put_unrefed_netmem"),
    "stack": ("netif_receive_skb", "page_pool_put_unrefed_netmem"),
    "application": ("page_pool_put_unrefed_netmem", "tcp_destroy_sock"),
}
_DEVMEM_HOOKS = ("tcp_recvmsg_dmabuf", "sock_devmem_dontneed", "sock_devmem_dontneed_exit",
                 "napi_pp_put_page")
_ZCRX_HOOKS = ("io_zcrx_queue_cqe", "io_pp_zc_alloc_netmems")
# Hooks through which a net_iov of each type reaches and leaves the application.
APP_HOOKS = {"dmabuf": _DEVMEM_HOOKS, "io_uring": _ZCRX_HOOKS,
             "net_iov": _DEVMEM_HOOKS + _ZCRX_HOOKS}
# A kretprobe sees no arguments: it needs the kprobe that kept them at entry.
ARGS_HOOKS = {"tcp_recvmsg_dmabuf": "tcp_recvmsg_dmabuf_args",
              "io_zcrx_queue_cqe": "io_zcrx_queue_cqe_args"}
# The netmem type a pool's memory provider (PoolSnapshot.provider) hands out.
PROVIDER_TYPES = {"host": "page", "dmabuf": "dmabuf", "io_uring": "io_uring"}
HEAD_PAGES_REASON = ("skb head pages cannot be mapped to their struct page here "
                     "(page_offset_base/vmemmap_base not in /proc/kallsyms: x86-64 with "
                     "CONFIG_KALLSYMS_ALL only), so pages in the stack look driver-held")
HEAD_PAGE_SYMBOLS = ("page_offset_base", "vmemmap_base")


def sample_threshold(n: int) -> int:
    """The netmem_config.sample_threshold that tracks 1 in n netmem."""
    if n < 1:
        raise ValueError(f"netmem sampling factor must be >= 1, not {n}")
    return (1 << 32) // n


def slot_mask(table_entries: int) -> int:
    """netmem_config.slot_mask: the netmems table is indexed by slot pairs."""
    if table_entries < 2 or table_entries & (table_entries - 1):
        raise ValueError(f"the netmems table needs a power-of-two size, not {table_entries}")
    return table_entries - 2


def is_sampled(netmem: int, n: int) -> bool:
    """Whether netmem.bpf.c tracks this netmem_ref at 1-in-n sampling."""
    h = (((netmem & ~1) >> 6) * HASH_MUL) & _U64
    return netmem != 0 and (h >> 32) < sample_threshold(n)


@dataclass(frozen=True)
class Tracked:
    """One tracked netmem as the map holds it."""

    netmem: int
    pool: int
    state: str
    type: str
    app_since_ns: int
    owner: int
    tgid: int
    memcg_id: int
    user_refs: int


@dataclass(frozen=True)
class PoolTotals:
    """One pool's counters summed over CPUs (tracked netmem, not scaled)."""

    transitions: dict[tuple[str, str], int]
    hold_buckets: tuple[int, ...]
    hold_count: int
    hold_sum_ns: int


def _unattached(name: str, status: Mapping[str, probes.ProbeStatus]) -> tuple[str, str] | None:
    """(hook, why) if a hook a state depends on is off; None if it works or is moot."""
    s = status.get(name)
    if s is None:
        return name, ("the pagepool object is not loaded" if name in POOL_OBJECT_HOOKS
                      else "not in the netmem object")
    if s.attached:
        args = ARGS_HOOKS.get(name)
        if s.mechanism == "kprobe" and args and not status[args].attached:
            return args, status[args].reason
        return None
    # A mechanism found the kernel lacks the function or tracepoint: that feature (say
    # io_uring zcrx) does not exist here, so no netmem can take that path.
    if s.absent:
        return None
    return name, s.reason


def missing_hooks(hooks: Iterable[str], status: Mapping[str, probes.ProbeStatus]) -> str | None:
    """One sentence naming the hooks that did not attach and, once each, why; or None."""
    off = [p for h in hooks if (p := _unattached(h, status))]
    if not off:
        return None
    whys = list(dict.fromkeys(why for _, why in off))
    return f"{', '.join(h for h, _ in off)} not attached ({'; '.join(whys)})"


def unavailable_states(status: Mapping[str, probes.ProbeStatus], head_pages: bool
                       ) -> dict[str, dict[str, str]]:
    """netmem type -> state -> why that state cannot be observed with these hooks."""
    out: dict[str, dict[str, str]] = {}
    for typ in TYPES:
        for state in STATES:
            if typ == "page" and state == "application":
                continue  # page_pool releases pages a user maps: they never come back
            hooks = CORE_HOOKS[state]
            if typ != "page" and state in ("stack", "application"):
                hooks += APP_HOOKS[typ]
            problems = [p] if (p := missing_hooks(hooks, status)) else []
            if typ == "page" and state in ("driver", "stack") and not head_pages:
                problems.append(HEAD_PAGES_REASON)
            if problems:
                out.setdefault(typ, {})[state] = "; ".join(problems)
    return out


def pool_states(tracked: Iterable[Tracked], totals: PoolTotals | None, factor: int,
                pool_types: Iterable[str], unavailable: Mapping[str, Mapping[str, str]]
                ) -> NetmemStates:
    """Estimated netmem per state of one pool from its tracked entries.

    pool_types: the types the pool serves even if none is tracked now (its provider). A
    state is Unavailable for the pool if it is for any of the pool's types.
    """
    entries = list(tracked)
    counts = Counter((t.type, t.state) for t in entries)
    types = set(pool_types) | {t.type for t in entries}
    by_type: dict[str, dict[str, int | Unavailable]] = {}
    for typ in sorted(types, key=TYPES.index):
        missing = unavailable.get(typ, {})
        by_type[typ] = {s: Unavailable(missing[s]) if s in missing else counts[typ, s] * factor
                        for s in STATES}
    top: dict[str, int | Unavailable] = {}
    for state in STATES:
        values = [by_type[t][state] for t in by_type]
        gone = next((v for v in values if isinstance(v, Unavailable)), None)
        top[state] = gone or sum(v for v in values if isinstance(v, int))
    transitions = {f"{a}->{b}": n * factor for (a, b), n in (totals.transitions.items()
                                                             if totals else ()) if n}
    return NetmemStates(sample_factor=factor, tracked=len(entries), by_type=by_type,
                        transitions_total=transitions, **top)


def hold_histogram(totals: PoolTotals | None, factor: int) -> HoldHistogram:
    """The application hold times of one pool, scaled; bucket i holds [2^i, 2^(i+1)) ns
    and bucket 0 also holds 0."""
    if totals is None:
        return HoldHistogram(factor, 0, 0, ())
    buckets = tuple(HoldBucket(lo_ns=1 << i if i else 0, hi_ns=1 << (i + 1), count=n * factor)
                    for i, n in enumerate(totals.hold_buckets) if n)
    return HoldHistogram(factor, totals.hold_count * factor, totals.hold_sum_ns * factor,
                         buckets)


def holders(tracked: Iterable[Tracked], factor: int, now_ns: int,
            comm: Mapping[int, str | None], memcg_path: Mapping[int, str | None]
            ) -> tuple[NetmemHolder, ...]:
    """Netmem held by each (process, memcg) in the application state, largest first."""
    groups: dict[tuple[int, int], list[Tracked]] = {}
    for t in tracked:
        if t.state == "application":
            groups.setdefault((t.tgid, t.memcg_id), []).append(t)
    out = [NetmemHolder(pid=pid, comm=comm.get(pid), memcg_id=memcg,
                        memcg_path=memcg_path.get(memcg), netmem_held=len(ts) * factor,
                        by_type={k: n * factor for k, n in Counter(t.type for t in ts).items()},
                        oldest_hold_age_ns=now_ns - min(t.app_since_ns for t in ts))
           for (pid, memcg), ts in groups.items()]
    return tuple(sorted(out, key=lambda h: (-h.netmem_held, h.pid)))


def devmem_socket(rec: ctypes.Structure, now_ns: int, factor: int,
                  held_unavailable: str | None, memcg_path: str | None) -> DevmemSocket:
    """One devmem_socket record as the snapshot reports it."""
    outstanding: int | Unavailable = (rec.tokens_received - rec.tokens_returned
                                      - rec.tokens_freed_on_destroy)
    if outstanding < 0:
        outstanding = Unavailable("the socket returned tokens it received before "
                                  "netmemtrace attached")
    return DevmemSocket(
        sock_addr=rec.sk, pid=rec.tgid, comm=rec.comm.decode(errors="replace"),
        memcg_id=rec.memcg_id, memcg_path=memcg_path,
        state="destroyed" if rec.destroy_ns else "open",
        recvmsg_calls=rec.recvmsg_calls, recvmsg_errors=rec.recvmsg_errors,
        tokens_received=rec.tokens_received, dontneed_calls=rec.dontneed_calls,
        dontneed_errors=rec.dontneed_errors, tokens_returned=rec.tokens_returned,
        tokens_freed_on_destroy=rec.tokens_freed_on_destroy, tokens_outstanding=outstanding,
        netmem_held=Unavailable(held_unavailable) if held_unavailable
        else rec.tracked_app * factor,
        first_seen_age_ns=now_ns - rec.first_seen_ns,
        destroy_age_ns=now_ns - rec.destroy_ns if rec.destroy_ns else None,
    )


@functools.cache
def head_page_symbols() -> tuple[int, int]:
    """Addresses of page_offset_base and vmemmap_base, the variables virt_to_page() reads
    on x86-64; (0, 0) elsewhere or where /proc/kallsyms lists no data symbols (it does with
    CONFIG_KALLSYMS_ALL, to root)."""
    if platform.machine() != "x86_64":
        return 0, 0
    found = kallsyms.lookup(HEAD_PAGE_SYMBOLS)
    return found.get("page_offset_base", 0), found.get("vmemmap_base", 0)


def head_pages_resolvable() -> bool:
    """Whether netmem.bpf.c can turn skb->head into its page."""
    return all(head_page_symbols())


def shared_maps(pool_lo: probes.LoadedObject) -> dict[str, libbpf.Map]:
    """load_object(reuse=...) for the netmem object: the pagepool object's netmem maps."""
    return {name: pool_lo.obj.map(name) for name in SHARED_MAPS}


class NetmemReader:
    """Configures a loaded netmem object's sampling and reads its maps into snapshots.

    pool_lo: the pagepool object whose maps the netmem object shares (its page_pool hooks
    move netmem in and out of pools); None if it did not load."""

    def __init__(self, lo: probes.LoadedObject, sample_n: int,
                 pool_lo: probes.LoadedObject | None = None) -> None:
        btf = abi.btf(OBJECT)
        self._lo = lo
        self._pool_lo = pool_lo
        self._entry_t = btf.struct("netmem_entry")
        self._counters_t = btf.struct("netmem_pool_counters")
        self._socket_t = btf.struct("devmem_socket")
        self._config_t = btf.struct("netmem_config")
        self._netmems = lo.obj.map("netmems")
        self._pools = lo.obj.map("netmem_pools")
        self._sockets = lo.obj.map("devmem_sockets")
        self._stats = abi.Stats(OBJECT, lo.obj.map("netmem_stats"))
        self._config = lo.obj.map(CONFIG_MAP)
        self._states = {v: k.lower() for k, v in btf.enum("netmem_state", "NETMEM_ST_").items()}
        self._types = {v: k.lower() for k, v in btf.enum("netmem_type", "NETMEM_TYPE_").items()}
        self._cgroups = CgroupResolver.for_memory()
        self.configure(sample_n)

    def configure(self, sample_n: int) -> None:
        """Track 1 in sample_n netmem from now on (the object tracks nothing until then)."""
        pob, vmb = head_page_symbols()
        cfg = self._config_t(sample_threshold=sample_threshold(sample_n), sample_n=sample_n,
                             page_offset_base_addr=pob, vmemmap_base_addr=vmb,
                             slot_mask=slot_mask(self._netmems.max_entries))
        if self._config.value_size != ctypes.sizeof(cfg):
            raise abi.AbiError(f"netmem {CONFIG_MAP} is {self._config.value_size} bytes, "
                               f"struct netmem_config {ctypes.sizeof(cfg)}: it must hold only "
                               "that")
        self._config.update(ctypes.c_uint32(0), bytes(cfg))

    @property
    def sample_factor(self) -> int:
        """The factor the kernel side uses now, read back from its config map."""
        raw = self._config.lookup(ctypes.c_uint32(0))
        assert raw is not None  # an array map always has key 0
        return abi.decode(self._config_t, raw).sample_n

    def tracked(self) -> list[Tracked]:
        size = self._netmems.value_size
        out = []
        with self._netmems.mapped() as table:
            # Freed slots are zeroed: skip empty pages of slots with one compare each, and
            # find used slots by their first field (the netmem) without decoding the rest.
            for page in range(0, len(table), _PAGE):
                if table[page:page + _PAGE] == _ZERO_PAGE:
                    continue
                chunk = table[page:page + _PAGE]
                for i, netmem in enumerate(memoryview(chunk).cast("Q")[::size // 8]):
                    if netmem:
                        out.append(self._tracked(abi.decode(self._entry_t,
                                                            chunk[i * size:(i + 1) * size])))
        return out

    def _tracked(self, e: ctypes.Structure) -> Tracked:
        return Tracked(
            netmem=e.netmem, pool=e.pool, state=self._states.get(e.state, f"state{e.state}"),
            type=self._types.get(e.type, f"type{e.type}"),
            app_since_ns=e.app_since_ns, owner=e.owner, tgid=e.tgid,
            memcg_id=e.memcg_id, user_refs=e.user_refs)

    def pool_totals(self) -> dict[int, PoolTotals]:
        out = {}
        for key, per_cpu in self._pools.items():
            cs = [abi.decode(self._counters_t, v) for v in per_cpu]
            n = len(cs[0].transitions)  # [from].to[to], indexed by enum netmem_state
            out[int.from_bytes(key, "little")] = PoolTotals(
                transitions={(self._states[i], self._states[j]):
                             sum(c.transitions[i].to[j] for c in cs)
                             for i in range(n) for j in range(n)},
                hold_buckets=tuple(sum(c.hold_log2_ns[i] for c in cs)
                                   for i in range(len(cs[0].hold_log2_ns))),
                hold_count=sum(c.hold_count for c in cs),
                hold_sum_ns=sum(c.hold_sum_ns for c in cs))
        return out

    def read(self, now_ns: int, pools: list[PoolSnapshot]
             ) -> tuple[list[PoolSnapshot], tuple[DevmemSocket, ...], NetmemSummary]:
        """Pools with their states and hold histograms, devmem sockets, and the summary."""
        factor = self.sample_factor
        pool_status = self._pool_lo.status() if self._pool_lo else []
        status = {s.hook: s for s in pool_status if s.hook in POOL_OBJECT_HOOKS}
        status.update({s.hook: s for s in self._lo.status()})
        missing = unavailable_states(status, head_pages_resolvable())
        tracked = self.tracked()
        if self._cgroups:
            self._cgroups.refresh()
        out_pools = self._pools_with_states(pools, tracked, factor, missing)
        sockets = self._devmem_sockets(now_ns, factor,
                                       missing.get("dmabuf", {}).get("application"))
        app_missing = next((m["application"] for m in missing.values()
                            if "application" in m), None)
        apps = [t for t in tracked if t.state == "application"]
        holding: tuple[NetmemHolder, ...] | Unavailable = (
            Unavailable(app_missing) if app_missing else
            holders(apps, factor, now_ns, {t.tgid: comm_of(t.tgid) for t in apps},
                    {t.memcg_id: self._memcg_path(t.memcg_id) for t in apps}))
        st = self._stats.read()
        handed_missing = missing_hooks(["io_zcrx_queue_cqe"], status)
        refill_missing = missing_hooks(["io_pp_zc_alloc_netmems"], status)
        summary = NetmemSummary(
            sample_factor=factor, tracked_netmem=len(tracked),
            tracked_capacity=self._netmems.max_entries, unavailable_states=missing,
            holders=holding,
            recvmsg_devmem_calls=st["recvmsg_calls"], recvmsg_devmem_errors=st["recvmsg_errors"],
            tokens_received=st["recvmsg_tokens"], recvmsg_cmsg_unread=st["recvmsg_cmsg_unread"],
            dontneed_calls=st["dontneed_calls"], dontneed_errors=st["dontneed_errors"],
            tokens_returned=st["dontneed_tokens"], tokens_freed_on_destroy=st["destroy_tokens"],
            zcrx_buffers_handed=Unavailable(handed_missing) if handed_missing
            else st["zcrx_buffers"],
            zcrx_refills=Unavailable(refill_missing) if refill_missing else st["zcrx_refills"],
        )
        return out_pools, sockets, summary

    def _pools_with_states(self, pools: list[PoolSnapshot], tracked: list[Tracked],
                           factor: int, missing: Mapping[str, Mapping[str, str]]
                           ) -> list[PoolSnapshot]:
        totals = self.pool_totals()
        by_pool: dict[int, list[Tracked]] = {}
        for t in tracked:
            by_pool.setdefault(t.pool, []).append(t)
        out = []
        for p in pools:
            if p.state == "released":
                gone = Unavailable("pool freed: its netmem counters were dropped with it")
                out.append(replace(p, netmem_states=gone, netmem_hold_ns=gone))
                continue
            states = pool_states(by_pool.get(p.pool_addr, ()), totals.get(p.pool_addr), factor,
                                 [PROVIDER_TYPES.get(p.provider, "net_iov")], missing)
            hist: HoldHistogram | Unavailable = hold_histogram(totals.get(p.pool_addr), factor)
            if isinstance(states.application, Unavailable):
                hist = states.application
            out.append(replace(p, netmem_states=states, netmem_hold_ns=hist))
        return out

    def _devmem_sockets(self, now_ns: int, factor: int, held_missing: str | None
                        ) -> tuple[DevmemSocket, ...]:
        """Socket records, open ones first; records destroyed long ago are dropped after
        this report so the map keeps room."""
        sockets = []
        for key, vals in self._sockets.items():
            rec = abi.decode(self._socket_t, vals[0])
            sockets.append(devmem_socket(rec, now_ns, factor, held_missing,
                                         self._memcg_path(rec.memcg_id)))
            if rec.destroy_ns and now_ns - rec.destroy_ns > DESTROYED_SOCKET_RETAIN_NS:
                self._sockets.delete(ctypes.c_uint64(int.from_bytes(key, "little")))
        sockets.sort(key=lambda s: (s.state != "open", -s.tokens_received, s.sock_addr))
        return tuple(sockets)

    def _memcg_path(self, memcg_id: int) -> str | None:
        return self._cgroups.path(memcg_id) if self._cgroups and memcg_id else None
