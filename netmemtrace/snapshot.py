"""The frozen result of one read of every collector.

Views (dump, top, Prometheus) receive a Snapshot and nothing else; they never touch BPF.
Units are in the field names. A figure the kernel cannot give here is an Unavailable carrying
the reason, never a zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .probes import ProbeStatus

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Unavailable:
    reason: str


@dataclass(frozen=True)
class KernelPoolView:
    """What the kernel itself reports for a pool over the netdev netlink family."""

    inflight_pages: int | None
    inflight_bytes: int | None
    detach_time_s: int | None
    dmabuf_id: int | None


@dataclass(frozen=True)
class PoolSnapshot:
    pool_addr: int
    pool_id: int | None            # kernel pool id (netlink), None before 6.8
    ifindex: int
    netdev: str | None
    netns: str | None             # "host", an `ip netns` name, or "net:[inode]"
    napi_id: int | None
    provider: str                 # host / dmabuf / io_uring / unknown(...)
    page_order: int
    page_size_bytes: int
    numa_node: int
    state: str                    # active / zombie / released
    hold_pages_total: int         # page_pool_state_hold events seen since attach, pages
    hold_net_iovs_total: int      # ... of net_iov (devmem / io_uring) netmem
    release_pages_total: int
    release_net_iovs_total: int
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


@dataclass(frozen=True)
class SelfStats:
    snapshot_build_ns: int
    pool_map_full_total: int
    retired_map_full_total: int
    prog_run_time_ns: dict[str, int] | Unavailable = field(
        default_factory=lambda: Unavailable("kernel.bpf_stats_enabled is 0"))
    prog_run_cnt: dict[str, int] | Unavailable = field(
        default_factory=lambda: Unavailable("kernel.bpf_stats_enabled is 0"))


@dataclass(frozen=True)
class Snapshot:
    taken_monotonic_ns: int
    taken_unix_s: float
    host: str
    kernel_release: str
    probes: tuple[ProbeStatus, ...]
    pools: tuple[PoolSnapshot, ...]
    self_stats: SelfStats
    errors: tuple[str, ...] = ()  # collectors that failed this round, with the reason
