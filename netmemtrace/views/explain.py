"""`netmemtrace explain-zombie`: a one-shot plain-text report on zombie page pools, meant to be
pasted into a bug report: the pool, who holds its pages, whether it heals by itself, and
what netmemtrace looked at to say so. Pure: a Snapshot (and the scan report) in, text out."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from netmemtrace.snapshot import Holder, PoolSnapshot, Snapshot, Unavailable
from netmemtrace.views.top import human_bytes, human_duration

if TYPE_CHECKING:  # views take data, never collectors: the scan report is passed in
    from netmemtrace.collect.holders import ScanReport

# The kernel's page_pool_release_retry() warns this long after the destroy, then as often.
STALL_WARN_INTERVAL_S = 60


def select_pools(snap: Snapshot, which: str | None) -> list[PoolSnapshot]:
    """Zombie pools matching `which`: a pool id, a pool address (0x...), a netdev name, or
    None for every zombie."""
    zombies = [p for p in snap.pools if p.state == "zombie"]
    if which is None:
        return zombies
    if which.isdigit():
        return [p for p in zombies if p.pool_id == int(which)]
    if which.lower().startswith("0x"):
        try:
            addr = int(which, 16)
        except ValueError:
            return []
        return [p for p in zombies if p.pool_addr == addr]
    return [p for p in zombies if p.netdev == which]


def _who(h: Holder) -> str:
    if h.kind == "socket":
        owner = f"pid {h.pid} ({h.comm})" if h.pid else "no process has it open"
        if len(h.pids) > 1:
            owner += f" and {len(h.pids) - 1} other process(es)"
        memcg = h.memcg.reason if isinstance(h.memcg, Unavailable) else h.memcg
        queues = ", ".join(f"{q} {n}" for q, n in (h.queue_pages or {}).items())
        text = (f"{h.protocol} {h.local_addr} -> {h.remote_addr} {h.state}, netns {h.netns}, "
                f"{owner}, uid {h.uid}, memcg {memcg} ({h.memcg_source or 'none'}); "
                f"pages by queue: {queues}; {h.skbs} skbs")
        return text + (" (PARTIAL: a queue exceeded the walk bound)" if h.partial_scan else "")
    if h.kind == "cpu-deferred-free":
        rx = "unknown" if h.rx_packets_since_zombie is None else h.rx_packets_since_zombie
        return (f"CPU {h.cpu}: {h.skbs} skbs waiting; RX packets on CPU {h.cpu} since the "
                f"zombie was first seen: {rx}")
    if h.held_for_at_least_ns is not None:
        return f"held for at least {human_duration(h.held_for_at_least_ns)}: {h.detail}"
    return h.detail


def _holders_table(pool: PoolSnapshot) -> list[str]:
    total = pool.inflight_pages if isinstance(pool.inflight_pages, int) else \
        sum(h.pages for h in pool.holders)
    lines = ["  PAGES   SHARE  KIND               HEALS  WHO"]
    for h in pool.holders:
        share = f"{100 * h.pages / total:5.1f}%" if total else "    -"
        lines.append(f"  {h.pages:5d}  {share}  {h.kind:<17}  "
                     f"{'yes' if h.self_healing else 'no':<5}  {_who(h)}")
    lines.append(f"  {sum(h.pages for h in pool.holders):5d}  total (inflight: "
                 f"{_inflight(pool)})")
    return lines


def _inflight(pool: PoolSnapshot) -> str:
    if isinstance(pool.inflight_pages, Unavailable):
        return f"unavailable: {pool.inflight_pages.reason}"
    size = "" if isinstance(pool.inflight_bytes, Unavailable) else \
        f" ({human_bytes(pool.inflight_bytes)})"
    return f"{pool.inflight_pages} pages{size}"


def verdict(pool: PoolSnapshot) -> str:
    """Whether the zombie goes away by itself, and if not what releases it."""
    stuck = [h for h in pool.holders if not h.self_healing]
    if not pool.holders:
        return "UNKNOWN: no holder information (the holders scan did not run: see errors)"
    if not stuck:
        cpus = sorted({h.cpu for h in pool.holders if h.cpu is not None})
        on = f" on CPU {', '.join(map(str, cpus))}" if cpus else ""
        return ("SELF-HEALING: every held page is already freed and waits for the next "
                f"network receive{on} or the pool's next release retry; nothing to do (any "
                "network traffic on those CPUs releases them at once)")
    pages = sum(h.pages for h in stuck)
    socks = [h for h in stuck if h.kind == "socket"]
    parts = []
    if socks:
        pids = sorted({h.pid for h in socks if h.pid})
        parts.append(f"{len(socks)} socket(s) with unread data"
                     + (f" (pid {', '.join(map(str, pids))})" if pids else "")
                     + ": read or close them (or end the process)")
    for h in stuck:
        if h.kind in ("devmem-tokens", "io_uring-zcrx"):
            parts.append(f"{h.kind}: the application must return its buffers")
        elif h.kind == "unattributed":
            parts.append(f"{h.pages} page(s) not found in any place scanned (see what was "
                         "checked)")
    return f"NOT SELF-HEALING: {pages} page(s) are held by " + "; ".join(parts)


def _unknown(value: int | None) -> str:
    return "?" if value is None else str(value)


def _pool_section(pool: PoolSnapshot, scan: ScanReport | None) -> list[str]:
    addr = f"pool {pool.pool_addr:#x}" if pool.pool_addr is not None else "pool"
    ident = addr + (f" (id {pool.pool_id})" if pool.pool_id else "")
    lines = [f"{ident} on {pool.netdev or '?'} (ifindex {pool.ifindex}, netns "
             f"{pool.netns or '?'}), provider {pool.provider}, "
             f"{_unknown(pool.page_size_bytes)}-byte pages, NUMA node "
             f"{_unknown(pool.numa_node)}",
             f"NIC found through: {pool.netdev_source}"]
    state = scan.pools.get(pool.pool_addr) if scan and pool.pool_addr is not None else None
    if pool.zombie_age_source == "kernel detach-time" and pool.zombie_age_ns is not None:
        lines.append(f"zombie for {human_duration(pool.zombie_age_ns)} (since the kernel's "
                     "detach-time, netlink page-pool-get)")
    if state is not None and state.destroyed_age_ns:
        age = state.destroyed_age_ns
        warned = age // 1_000_000_000 // STALL_WARN_INTERVAL_S
        lines.append(
            f"zombie for {human_duration(age)} (since page_pool_destroy, the pool's own clock); "
            f"the kernel tried to release it {state.release_attempts} time(s), once a second; "
            + (f"it has logged 'stalled pool shutdown' {warned} time(s)" if warned else
               f"its 'stalled pool shutdown' warning comes at {STALL_WARN_INTERVAL_S} s")
            + " (only for pools no netlink user can see)")
    elif pool.zombie_age_ns is not None and pool.zombie_age_source != "kernel detach-time":
        lines.append(f"zombie for at least {human_duration(pool.zombie_age_ns)} (since "
                     f"netmemtrace saw its first release retry); {pool.release_calls} "
                     "release call(s) seen")
    kernel = pool.kernel_inflight_at_release
    source = "netlink page-pool-get" if pool.inflight_source == "kernel" else \
        "netmemtrace's page_pool tracepoints"
    lines.append(f"inflight: {_inflight(pool)} (from {source}); the kernel's own count at its "
                 f"last release retry: {kernel if kernel is not None else 'not seen yet'}")
    lines.append("holders (their pages add up to inflight):")
    lines.extend(_holders_table(pool))
    lines.append(f"verdict: {verdict(pool)}")
    return lines


def _checked(scan: ScanReport | None) -> list[str]:
    if scan is None:
        return ["what was checked: nothing (no holders scan ran)"]
    lines = [
        "what was checked:",
        f"  {scan.netns_visited} network namespace(s) (every named one and every process's)"
        + (f"; could not enter: {', '.join(scan.netns_failed)}" if scan.netns_failed else ""),
        f"  {scan.sockets} TCP/UDP socket(s): receive, out-of-order, error and UDP reader "
        f"queues, {scan.skbs} skb(s) (at most {scan.max_skbs} per queue; "
        f"{scan.partial_sockets} socket(s) cut there), frags and frag_lists "
        f"({scan.frag_lists_cut} frag_list(s) cut)",
        f"  {scan.netmem_refs} page reference(s) looked at, {scan.zombie_refs} in zombie pools"
        + (f", {scan.zombie_refs_lost} LOST (ring buffer full)" if scan.zombie_refs_lost
           else ""),
        f"  skb heads: {scan.skb_heads}"
        + (f" ({scan.heads_unresolved} unresolved)" if scan.heads_unresolved else ""),
        f"  per-CPU deferred-free lists: {scan.defer_lists} of {scan.cpus}",
        "  the destroyed pools' rings",
        "  not checked: sockets of network namespaces that no process or name keeps, skbs "
        "in qdiscs, backlogs and drivers",
        f"  scan took {human_duration(scan.duration_ns)}",
    ]
    return lines


def render(snap: Snapshot, pools: list[PoolSnapshot], scan: ScanReport | None) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(snap.taken_unix_s))
    lines = [f"netmemtrace explain-zombie: {snap.host}, kernel {snap.kernel_release}, {when}"]
    for pool in pools:
        lines.append("")
        lines.extend(_pool_section(pool, scan))
    lines.append("")
    lines.extend(_checked(scan))
    if snap.errors:
        lines.append("collector errors: " + "; ".join(f"{e.collector}: {e.message}"
                                                      for e in snap.errors))
    return "\n".join(lines)
