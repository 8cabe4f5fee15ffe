"""Plain-text tables for the one-shot views (`probes`, `dump --verify`, `dump --output`)."""

from __future__ import annotations

from collections.abc import Sequence

from netmemtrace.snapshot import Snapshot, Unavailable


def align_columns(rows: Sequence[Sequence[str]]) -> str:
    """Rows as columns two spaces apart, left-aligned; the last column is not padded, so a
    long free-text column (a reason) never widens the table."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)] + [r[-1]])
        for r in rows)


def verify_table(snap: Snapshot) -> str:
    """Ledger vs /proc/PID/smaps socket: Rss, one row per process, side by side."""
    rows = [("PID", "MEMCG", "LEDGER_BYTES", "SMAPS_SOCKET_RSS_BYTES", "DIFF")]
    for m in snap.memcgs:
        for p in m.processes:
            rows.append((str(p.pid), m.path or f"id {m.cgroup_id}",
                         _text(p.zerocopy_unaccounted_bytes), _text(p.smaps_socket_rss_bytes),
                         _text(p.ledger_vs_smaps_bytes)))
    return align_columns(rows)


def _text(v: int | Unavailable) -> str:
    return f"unavailable ({v.reason})" if isinstance(v, Unavailable) else str(v)


RECYCLING_UNAVAILABLE = "unavailable"  # no recycling figure in the snapshot for this pool


def _per_s(events: int | Unavailable, age_s: float) -> str:
    """A pool's average event rate since it was first seen; "unavailable" (the reason is in
    the JSON) when its events are unknown."""
    if isinstance(events, Unavailable):
        return "unavailable"
    return f"{events / age_s:.0f}" if age_s > 0 else "-"


def pool_summary(snap: Snapshot) -> str:
    """One line per page pool: what a person wants first, beside `dump --output`'s JSON.
    Rates are averages since the pool was first seen (one snapshot has no interval)."""
    rows = [("POOL", "NETDEV", "NETNS", "INFLIGHT", "HOLD/s", "RELEASE/s", "RECYCLING",
             "STATE")]
    for p in snap.pools:
        age_s = p.first_seen_age_ns / 1e9
        rows.append((
            str(p.pool_id) if p.pool_id is not None else f"{p.pool_addr:#x}",
            p.netdev or "-", p.netns or "-", _text(p.inflight_pages),
            _per_s(p.holds, age_s), _per_s(p.releases, age_s),
            RECYCLING_UNAVAILABLE,
            p.state))
    if len(rows) == 1:
        return "no page pool event seen while tracing"
    return align_columns(rows)
