"""The frozen result of one read of every collector.

Views (dump, top, Prometheus) receive a Snapshot and nothing else; they never touch BPF.
Units are in the field names. A figure the kernel cannot give here is an Unavailable carrying
the reason, never a zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from netmemtrace.kernel.probes import ProbeStatus

SCHEMA_VERSION = 2


@dataclass(frozen=True)
class Unavailable:
    reason: str


@dataclass(frozen=True)
class RecycleStats:
    """A pool's page-pool-stats-get counters (CONFIG_PAGE_POOL_STATS), since its creation.
    alloc_*: how the driver's page requests were served (fast: from the pool's cache; slow /
    slow_high_order: from the page allocator, one count per call (a bulk call brings more
    pages into the cache, served later as fast); refill: cache refilled from the ring, one
    count per refill; empty: the ring was empty too; waive: a ring page of the wrong NUMA
    node, freed). recycle_*: where a page the pool got back went (cached: straight into
    the cache; ring: into the ring; ring_full: ring full, freed; released_refcnt: still
    referenced elsewhere, freed; cache_full: the cache was full, so it went on to the ring)."""

    alloc_fast: int
    alloc_slow: int
    alloc_slow_high_order: int
    alloc_empty: int
    alloc_refill: int
    alloc_waive: int
    recycle_cached: int
    recycle_cache_full: int
    recycle_ring: int
    recycle_ring_full: int
    recycle_released_refcnt: int


@dataclass(frozen=True)
class KernelPoolView:
    """What the kernel itself reports for a pool over the netdev netlink family."""

    inflight_pages: int | None
    inflight_bytes: int | None
    detach_time_s: int | None     # CLOCK_BOOTTIME seconds of page_pool_destroy(), if any
    dmabuf_id: int | None
    ifindex: int | None = None    # None: listed on the loopback of `netns` (see netdev_source)
    napi_id: int | None = None
    io_uring: bool = False
    netns: str | None = None      # the netns whose dump lists the pool
    stats: RecycleStats | Unavailable = Unavailable("page-pool-stats-get not asked")


@dataclass(frozen=True)
class Recycling:
    """A pool's recycling, from the kernel's page-pool-stats-get counters.

    recycled_ratio = (recycle_cached + recycle_ring) / (recycle_cached + recycle_ring +
    recycle_ring_full + recycle_released_refcnt): the share of the pages given back to the
    pool that it kept for reuse. Every page given back is counted once in exactly one of
    those four, and a page still out (in flight) is in none, so nothing is under-counted.
    ynltool_ratio = (recycle_ring + recycle_cached) / (alloc_fast + alloc_refill +
    alloc_slow), ynltool's own figure (it under-counts: its denominator includes pages
    still in flight and pages not yet given back)."""

    counters: RecycleStats
    per_s: dict[str, float] | None      # each counter's rate since the previous read
    recycled_ratio: float | None        # since the pool was created; None before a return
    recycled_ratio_interval: float | None  # over the last read interval
    ynltool_ratio: float | None


@dataclass(frozen=True)
class PoolSnapshot:
    pool_addr: int | None          # None: listed by netlink only, no event seen since attach
    pool_id: int | None            # kernel pool id (netlink), None before 6.8
    ifindex: int                   # netdev / netns: the pool's real NIC, see netdev_source
    netdev: str | None
    netns: str | None             # "host", an `ip netns` name, or "net:[inode]"
    napi_id: int | None
    provider: str                 # host / dmabuf / io_uring / unknown(...)
    page_order: int | None         # None: not known (a netlink-only pool with nothing inflight)
    page_size_bytes: int | None
    numa_node: int | None
    state: str                    # active / zombie / released
    # page_pool_state_hold events seen since attach, pages; Unavailable for a pool netlink
    # lists but netmemtrace does not track once the pools map was full (its events may
    # have been dropped)
    hold_pages_total: int | Unavailable
    hold_net_iovs_total: int | Unavailable  # ... of net_iov (devmem / io_uring) netmem
    release_pages_total: int | Unavailable
    release_net_iovs_total: int | Unavailable
    kernel_hold_cnt: int | None   # the pool's own pages_state_hold_cnt, last seen
    kernel_release_cnt: int | None
    inflight_pages: int | Unavailable
    inflight_bytes: int | Unavailable
    first_seen_age_ns: int
    last_event_age_ns: int | None
    destroy_age_ns: int | None    # since page_pool_destroy() (function probe), if attached
    zombie_age_ns: int | None     # since the first page_pool_release, while inflight > 0
    release_calls: int            # page_pool_release tracepoint hits (destroy + retries)
    kernel_inflight_at_release: int | None
    kernel_hold_at_release: int | None
    kernel_release_at_release: int | None
    kernel: KernelPoolView | Unavailable
    # netmem ownership (collect/netmem.py): by state, and the application hold times
    netmem_states: NetmemStates | Unavailable = Unavailable("netmem object not loaded")
    netmem_hold_ns: HoldHistogram | Unavailable = Unavailable("netmem object not loaded")
    # zombie pools only (collect/holders.py): who holds the inflight pages; pages add up to
    # inflight_pages
    holders: tuple[Holder, ...] = ()
    # where inflight_pages comes from: "netmemtrace" (the pool's own hold/release counters
    # from the page_pool tracepoints) or "kernel" (netlink page-pool-get, used where
    # netmemtrace's count cannot be known, e.g. an idle pool older than netmemtrace)
    inflight_source: str = "netmemtrace"
    # how netdev / ifindex / netns were found, and what the kernel lists the pool on when
    # that differs (a pool re-parented to loopback after its NIC moved netns or went away)
    netdev_source: str = "the pool's netdev"
    listed_on: str | None = None
    zombie_age_source: str | None = None  # "kernel detach-time" or "first page_pool_release"
    recycling: Recycling | Unavailable = Unavailable("page-pool-stats-get not asked")

    @property
    def holds(self) -> int | Unavailable:
        """Hold events of both netmem kinds, or why they are unknown."""
        return _event_sum(self.hold_pages_total, self.hold_net_iovs_total)

    @property
    def releases(self) -> int | Unavailable:
        return _event_sum(self.release_pages_total, self.release_net_iovs_total)


def _event_sum(pages: int | Unavailable, net_iovs: int | Unavailable) -> int | Unavailable:
    if isinstance(pages, Unavailable):
        return pages
    return net_iovs if isinstance(net_iovs, Unavailable) else pages + net_iovs


@dataclass(frozen=True)
class SelfStats:
    snapshot_build_ns: int
    prog_run_time_ns: dict[str, int] | Unavailable = field(
        default_factory=lambda: Unavailable("kernel.bpf_stats_enabled is 0"))
    prog_run_cnt: dict[str, int] | Unavailable = field(
        default_factory=lambda: Unavailable("kernel.bpf_stats_enabled is 0"))
    # Events each program missed: the kernel skips a program already running on that CPU.
    prog_recursion_misses: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class CollectorRun:
    """How one collector did in this read (node_exporter's scrape_collector_success and
    scrape_collector_duration_seconds)."""

    collector: str
    success: bool
    duration_ns: int


@dataclass(frozen=True)
class CollectorError:
    collector: str
    message: str


# A counter of Snapshot.stats whose name ends so counts something dropped (a map or ring
# buffer full, an event cut short or unreadable): the figures it feeds undercount.
LOSS_SUFFIXES = ("_full", "_lost", "_truncated")


def lost_events(stats: dict[str, dict[str, int]]) -> list[tuple[str, str, int]]:
    """(object, counter, count) of every loss counter of Snapshot.stats."""
    return [(obj, name, n) for obj, counters in stats.items()
            for name, n in counters.items() if name.endswith(LOSS_SUFFIXES)]


# ---- memcg socket memory and zerocopy (collect/memcg.py, collect/zerocopy.py) ----


@dataclass(frozen=True)
class ZerocopyStats:
    """Zerocopy syscall counters of one process, or summed over a memcg (exited included)."""

    rx_calls: int                 # getsockopt(TCP_ZEROCOPY_RECEIVE) calls
    rx_errors: int                # ... that returned an error (bad fd/pointer, EIO, ...)
    rx_mapped_bytes: int          # bytes mapped into the process (zc.length), cumulative
    rx_mapped_pages: int
    rx_copied_bytes: int          # received by copy on zerocopy sockets: copybuf + recv/read
    rx_skip_hint_bytes: int       # zc.recv_skip_hint summed: bytes left for a normal read
    rx_sock_errors: int           # calls that reported a socket error in zc.err
    rx_read_faults: int           # results netmemtrace could not read back from user memory
    rx_zerocopy_ratio: float | None  # mapped / (mapped + copied); None before any byte
    tx_zc_calls: int              # send*(MSG_ZEROCOPY) on SO_ZEROCOPY sockets that sent
    tx_zc_bytes: int
    tx_zc_errors: int
    tx_zc_ignored_calls: int      # MSG_ZEROCOPY without SO_ZEROCOPY: the kernel copied
    tx_notifications: int         # SO_EE_ORIGIN_ZEROCOPY messages read from the error queue
    tx_completed_sends: int       # send ids those messages completed
    tx_copied_sends: int          # ... flagged SO_EE_CODE_ZEROCOPY_COPIED (kernel copied)
    tx_inflight_bytes: int | Unavailable  # sent zerocopy, completion not yet read (ledger)


@dataclass(frozen=True)
class ProcessSnapshot:
    pid: int                                  # tgid
    comm: str | None                          # None once the process is gone
    memcg_id: int
    zerocopy: ZerocopyStats
    # The ledger's figures (and zerocopy.tx_inflight_bytes): Unavailable once a ledger event
    # that may concern this process was lost (LEDGER_LOSS)
    zerocopy_unaccounted_bytes: int | Unavailable  # TCP-rx-zerocopy bytes mapped now
    zerocopy_unaccounted_hwm_bytes: int | Unavailable  # highest since netmemtrace started
    zerocopy_oldest_mapped_age_ns: int | None | Unavailable  # the oldest page still mapped
    smaps_socket_rss_bytes: int | Unavailable  # cross-check: Rss of socket: mappings
    ledger_vs_smaps_bytes: int | Unavailable  # zerocopy_unaccounted - smaps (0 = agree)
    exited: bool = False                      # gone; its figures are final
    exit_age_ns: int | None = None            # since it exited (None while it runs)


@dataclass(frozen=True)
class MemcgSnapshot:
    cgroup_id: int                 # kernfs id of the memcg's directory on its hierarchy
    hierarchy: str                 # v1 / v2
    path: str | None               # relative to the hierarchy root; None if deleted
    runtime: str | None            # container identity derived from the path
    container_id: str | None
    pod_uid: str | None
    qos_class: str | None
    systemd_unit: str | None
    sock_event_source: str | None  # tracepoint / function probes feeding the two below
    sock_charged_pages_total: int | Unavailable    # socket pages charged since attach
    sock_uncharged_pages_total: int | Unavailable
    sock_net_charged_since_attach_bytes: int | Unavailable
    sock_charged_now_bytes: int | Unavailable      # socket memory charged now (polled)
    sock_charged_now_source: str
    zerocopy: ZerocopyStats
    # Unavailable as soon as one of its processes' is (hwm: once any ledger event was lost)
    zerocopy_unaccounted_bytes: int | Unavailable  # sum over its processes
    zerocopy_unaccounted_hwm_bytes: int | Unavailable
    zerocopy_oldest_mapped_age_ns: int | None | Unavailable
    would_be_charged_bytes: int | Unavailable      # sock_charged_now + zerocopy_unaccounted
    processes: tuple[ProcessSnapshot, ...]         # top processes by unaccounted bytes
    # What accept() will charge here: connections queued on listeners this memcg owns,
    # charged to no memcg until then (UnacceptedSocket.charge_on_accept_bytes summed).
    sock_awaiting_accept_bytes: int | Unavailable = 0


@dataclass(frozen=True)
class UnacceptedSocket:
    """A TCP connection the kernel established that no process has accept()ed yet. It was
    created in softirq, outside any task, so its socket memory is charged to no memcg:
    what it receives counts in the host's TCP memory but in no cgroup's memory.stat `sock`
    (Kubernetes #134194). accept() then charges sk_mem_pages(forward_alloc + rmem) to the
    accepting process's memcg, normally the listener's."""

    netns: str | None
    local_addr: str                # "ip:port" ("[ip6]:port")
    remote_addr: str
    state: str                     # ESTABLISHED, CLOSE_WAIT (the peer already closed), ...
    queued_bytes: int              # payload received and not read (ss Recv-Q)
    rmem_bytes: int                # truesize of its receive queue (ss -m skmem r)
    forward_alloc_bytes: int       # reserved, not yet used (ss -m skmem f)
    charge_on_accept_bytes: int    # whole pages of forward_alloc + rmem: what accept() charges
    memcg_id: int                  # 0: charged to no memcg (any other value: already charged)
    memcg: str | None              # its memcg's path, None while charged to none
    listener_inode: int
    listener_pids: tuple[int, ...]  # processes with the listener open (ss -p)
    listener_comm: str | None
    listener_memcg_id: int         # the listener's sk_memcg: where accept() will most likely
    listener_memcg: str | None     # charge it (the accepting process's memcg, in fact)


@dataclass(frozen=True)
class MemcgSelfStats:
    """The zerocopy reader's own figures (its BPF counters are in Snapshot.stats)."""

    ledger_ranges: int
    ledger_overflow_ranges: int     # ranges not recorded (ledger full): figures undercount
    ledger_overflow_bytes: int
    tx_tracker_overflow_sends: int
    smaps_mismatch_pids: int        # processes whose ledger disagreed with smaps
    exited_process_rows: int = 0    # rows of exited processes kept now
    exited_rows_expired: int = 0    # rows dropped after their retention, since start
    exited_rows_evicted: int = 0    # rows dropped early, the row cap being reached


# ---- netmem ownership states and devmem tokens (collect/netmem.py) ----
# Per-netmem figures come from tracking 1 in sample_factor netmem: every count below that
# says "estimated" is tracked netmem x sample_factor. Token counts per socket are exact.


@dataclass(frozen=True)
class NetmemStates:
    """One pool's netmem by who holds them now (estimated)."""

    sample_factor: int
    tracked: int                  # netmem of this pool tracked now (not scaled)
    pool: int | Unavailable       # cached in the pool, waiting for the driver
    driver: int | Unavailable     # allocated by the driver, not in an skb yet
    stack: int | Unavailable      # in an skb
    application: int | Unavailable  # devmem token / io_uring zcrx buffer outstanding
    by_type: dict[str, dict[str, int | Unavailable]]  # page/dmabuf/io_uring/net_iov -> state
    transitions_total: dict[str, int]  # "pool->driver": estimated transitions since attach


@dataclass(frozen=True)
class HoldBucket:
    lo_ns: int                    # hold times in [lo_ns, hi_ns)
    hi_ns: int
    count: int                    # estimated


@dataclass(frozen=True)
class HoldHistogram:
    """How long applications held this pool's netmem before giving it back (log2 buckets)."""

    sample_factor: int
    count: int                    # estimated holds ended since attach
    sum_ns: int                   # estimated
    buckets: tuple[HoldBucket, ...]  # non-empty buckets, ascending


@dataclass(frozen=True)
class DevmemSocket:
    sock_addr: int
    pid: int                      # tgid that first used devmem on it
    comm: str
    memcg_id: int
    memcg_path: str | None
    state: str                    # open / destroyed
    recvmsg_calls: int            # recvmsg(MSG_SOCK_DEVMEM)
    recvmsg_errors: int
    tokens_received: int          # SCM_DEVMEM_DMABUF cmsgs returned to the application
    dontneed_calls: int           # setsockopt(SO_DEVMEM_DONTNEED)
    dontneed_errors: int
    tokens_returned: int          # tokens those calls freed
    tokens_freed_on_destroy: int  # still outstanding when the socket was destroyed
    tokens_outstanding: int | Unavailable
    netmem_held: int | Unavailable  # estimated netmem the socket's tokens pin now
    first_seen_age_ns: int
    destroy_age_ns: int | None


@dataclass(frozen=True)
class NetmemHolder:
    """Netmem one process (in one memcg) holds as devmem tokens / zcrx buffers (estimated)."""

    pid: int
    comm: str | None              # None once the process is gone
    memcg_id: int
    memcg_path: str | None
    netmem_held: int
    by_type: dict[str, int]
    oldest_hold_age_ns: int


@dataclass(frozen=True)
class NetmemSummary:
    sample_factor: int            # 1 in sample_factor netmem tracked; counts are scaled by it
    tracked_netmem: int           # entries in the tracking map now (not scaled)
    tracked_capacity: int         # its size; stats["netmem"]["netmem_map_full"]: the misses
    unavailable_states: dict[str, dict[str, str]]  # netmem type -> state -> why unobservable
    holders: tuple[NetmemHolder, ...] | Unavailable
    recvmsg_devmem_calls: int     # exact, every socket
    recvmsg_devmem_errors: int
    tokens_received: int
    recvmsg_cmsg_unread: int      # control buffers not fully walked: tokens undercounted
    dontneed_calls: int
    dontneed_errors: int
    tokens_returned: int
    tokens_freed_on_destroy: int
    zcrx_buffers_handed: int | Unavailable
    zcrx_refills: int | Unavailable


@dataclass(frozen=True)
class DeviceSummary:
    """Per NIC, what the kernel's `ynltool page-pool stats` shows (from the kernel's netlink
    figures of the pools it lists), then what it cannot show. pools / inflight cover every
    listed pool, zombies included (ynltool's "page pools" and "refs")."""

    netdev: str | None
    ifindex: int
    netns: str | None
    listed_as: tuple[str, ...]    # how netlink lists the pools: "ifindex 2", "lo of host"
    pools: int
    zombies: int
    inflight_pages: int
    inflight_bytes: int
    zombie_inflight_pages: int
    zombie_inflight_bytes: int
    alloc_slow: int | Unavailable  # ynltool's alloc slow: alloc_slow
    alloc_fast: int | Unavailable  # ynltool's alloc fast: alloc_fast + alloc_refill
    recycle_ring: int | Unavailable
    recycle_cached: int | Unavailable
    ynltool_recycling_pct: float | None | Unavailable
    recycled_ratio: float | None | Unavailable  # Recycling.recycled_ratio, summed counters
    # beyond ynltool
    recycled_per_s: float | None | Unavailable  # cached + ring, since the previous read
    returned_per_s: float | None | Unavailable  # cached + ring + ring_full + released_refcnt
    unlisted_pools: int            # pools netlink does not list (veth, unlisted drivers)
    unlisted_inflight_pages: int | Unavailable
    zombie_holders_pages: dict[str, int]  # zombie pages by holder kind


@dataclass(frozen=True)
class Snapshot:
    taken_monotonic_ns: int
    taken_unix_s: float
    host: str
    kernel_release: str
    probes: tuple[ProbeStatus, ...]
    pools: tuple[PoolSnapshot, ...]
    self_stats: SelfStats
    errors: tuple[CollectorError, ...] = ()  # what failed this round, with the reason
    memcgs: tuple[MemcgSnapshot, ...] = ()  # per memory cgroup: socket memory, zerocopy
    memcg_self_stats: MemcgSelfStats | None = None
    devmem_sockets: tuple[DevmemSocket, ...] = ()  # sockets that used devmem TCP tokens
    netmem: NetmemSummary | Unavailable = Unavailable("netmem object not loaded")
    devices: tuple[DeviceSummary, ...] = ()  # per NIC: ynltool page-pool stats and beyond
    # connections no process accepted yet: socket memory charged to no memcg
    unaccepted_sockets: tuple[UnacceptedSocket, ...] | Unavailable = Unavailable(
        "memcg object not loaded")
    collectors: tuple[CollectorRun, ...] = ()  # each collector of this read: ok? how long?
    # {object: {counter: n}} since attach: every BPF `*_stats` struct (summed over CPUs) and
    # the readers' own drop counters; names ending in LOSS_SUFFIXES count losses.
    stats: dict[str, dict[str, int]] = field(default_factory=dict)


# ---- holders of zombie pools' pages (collect/holders.py) ----


# Holder.kind: every kind collect/holders.py reports, and what it means.
HOLDER_KINDS = {
    "socket": "a socket's queues",
    "cpu-deferred-free": "a CPU's deferred-free list, freed on that CPU's next RX "
                         "(self-healing)",
    "pool-ring": "the pool's own ring, freed by the pool itself (self-healing)",
    "devmem-tokens": "devmem TCP tokens the application has not returned",
    "io_uring-zcrx": "io_uring zcrx buffers the application has not refilled",
    "unattributed": "the rest",
}


@dataclass(frozen=True)
class Holder:
    """Who keeps pages of a zombie pool inflight (kind: one of HOLDER_KINDS). Fields not of
    its kind are None."""

    kind: str
    pages: int                    # distinct netmems of the pool it holds
    self_healing: bool            # frees them without anyone acting
    detail: str                   # one line: what holds them, and what releases them
    # socket
    protocol: str | None = None   # tcp / udp
    state: str | None = None      # ESTABLISHED, CLOSE_WAIT, ... (udp: UNCONNECTED, CONNECTED)
    netns: str | None = None
    local_addr: str | None = None  # "ip:port" ("[ip6]:port")
    remote_addr: str | None = None
    socket_inode: int | None = None
    uid: int | None = None
    pid: int | None = None        # lowest pid with the socket open (like ss -p)
    pids: tuple[int, ...] = ()
    comm: str | None = None
    memcg: str | Unavailable | None = None  # memory cgroup path
    memcg_source: str | None = None  # sk_memcg / process
    queue_pages: dict[str, int] | None = None  # receive / out_of_order / error / reader
    skbs: int | None = None       # skbs walked (socket, CPU list)
    partial_scan: bool = False    # a queue was longer than the walk bound: may hold more
    # cpu-deferred-free
    cpu: int | None = None
    # packets received on that CPU since netmemtrace first saw the zombie: 0, no RX came
    # to flush the list
    rx_packets_since_zombie: int | None = None
    # unattributed / devmem-tokens / io_uring-zcrx
    held_for_at_least_ns: int | None = None  # pages of a destroyed pool predate its destroy

