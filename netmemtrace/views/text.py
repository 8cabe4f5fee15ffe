"""Plain-text tables for the one-shot views (`probes`, `dump --verify`)."""

from __future__ import annotations

from collections.abc import Sequence

from ..snapshot import Snapshot, Unavailable


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
                         str(p.zerocopy_unaccounted_bytes), _text(p.smaps_socket_rss_bytes),
                         _text(p.ledger_vs_smaps_bytes)))
    return align_columns(rows)


def _text(v: int | Unavailable) -> str:
    return f"unavailable ({v.reason})" if isinstance(v, Unavailable) else str(v)
