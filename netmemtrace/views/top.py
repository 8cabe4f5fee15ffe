"""`netmemtrace top`: the live terminal view of page pools and memory cgroups.

Everything up to the text lines of a frame is pure (Snapshots and view state in, rows and
lines out), so it is tested without a terminal; the curses loop and the batch loop only
schedule snapshots, draw lines and read keys. Snapshots come from a callable: views never
touch BPF.

curses from the standard library rather than rich or textual: nothing to install on the host
an on-call engineer logs into, and no import cost in the budget of one second from start to
first frame, of which attaching the probes already takes half. The tables are plain columns,
which curses draws as well as anything.
"""

from __future__ import annotations

import contextlib
import curses
import locale
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import IO

from netmemtrace.kernel.probes import OFF_CHOICE, OFF_REPLACED, ProbeStatus
from netmemtrace.snapshot import (
    DeviceSummary,
    Holder,
    MemcgSnapshot,
    PoolSnapshot,
    ProcessSnapshot,
    Recycling,
    Snapshot,
    Unavailable,
    lost_events,
)

UNKNOWN = "-"          # a rate before the second snapshot, or a figure the pool does not have
SORT_MARK = "*"        # after the title of the column the table is sorted by
MARK = "!"             # first column of a highlighted (zombie) row, in batch text as on screen
FRAME_START = "netmemtrace top - "
ESC = "\x1b"
NO_MEMCG = "memcg tracking not available: see errors and `netmemtrace probes`"
FOOTER_KEYS = "q quit  s/S sort column/reverse  / filter  tab switch table  p pause"

SortKey = float | str
Read = Callable[[], Snapshot]


@dataclass(frozen=True)
class Cell:
    text: str
    key: SortKey | None = None  # None: unknown, sorts last in either direction


@dataclass(frozen=True)
class Row:
    cells: tuple[Cell, ...]
    highlight: bool = False
    details: tuple[str, ...] = ()  # lines shown under the row (a zombie's holders)


@dataclass(frozen=True)
class Column:
    title: str
    right: bool = False  # numbers are right-aligned


@dataclass(frozen=True)
class Table:
    title: str
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    note: str | None = None  # shown when there are no rows, saying why


@dataclass
class TableState:
    sort_col: int  # taken modulo the column count: `s` only ever increments it
    reverse: bool
    filter: str = ""


@dataclass
class ViewState:
    # Largest first: page pools by inflight pages, memory cgroups by socket memory now.
    tables: list[TableState] = field(
        default_factory=lambda: [TableState(POOL_COLUMNS.index(INFLIGHT), True),
                                 TableState(MEMCG_COLUMNS.index(SOCK_NOW), True),
                                 TableState(PROCESS_COLUMNS.index(PROC_UNACCT), True),
                                 TableState(DEVICE_COLUMNS.index(DEV_INFLIGHT), True)])
    focus: int = 0
    paused: bool = False
    editing: str | None = None  # filter text being typed in the footer, None when not typing


# ---- formatting -------------------------------------------------------------------------

def human_count(x: float) -> str:
    """12, 1.5, 12.3k, 4.0M: compact enough for a rate column."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.1f}" if x and abs(x) < 10 and x != int(x) else f"{x:.0f}"


def human_bytes(n: float) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if abs(n) >= 1 << shift:
            return f"{n / (1 << shift):.1f}{unit}"
    return f"{n:.0f}B"


def human_duration(ns: int) -> str:
    s = ns / 1e9
    if s < 1:
        return f"{ns // 1_000_000}ms"
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{s // 60:.0f}m{s % 60:02.0f}s"
    return f"{s // 3600:.0f}h{s % 3600 // 60:02.0f}m"


def _number(value: int | float | None | Unavailable,
            fmt: Callable[[float], str] = str) -> Cell:
    if value is None or isinstance(value, Unavailable):
        return Cell("n/a" if isinstance(value, Unavailable) else UNKNOWN)
    return Cell(fmt(value), float(value))


# ---- page pools -------------------------------------------------------------------------

PoolId = tuple[int, int]
INFLIGHT = Column("INFLIGHT", True)
POOL_COLUMNS = (
    Column("NETDEV"), Column("NETNS"), Column("POOL", True), Column("NAPI", True),
    Column("PROVIDER"), Column("MEM"), INFLIGHT, Column("BYTES", True),
    Column("HOLD/s", True), Column("REL/s", True), Column("RECYC/s", True),
    Column("RECYC%", True), Column("STATE"),
)


def pool_identity(pool: PoolSnapshot, snap: Snapshot) -> PoolId:
    """Address and first-seen time: a freed pool's address is reused, and a retired pool and
    its successor at the same address can both be in one snapshot."""
    # A pool only netlink lists has no address yet: its (negated) id stands in.
    addr = pool.pool_addr if pool.pool_addr is not None else -(pool.pool_id or 0)
    return addr, snap.taken_monotonic_ns - pool.first_seen_age_ns


def pool_rates(cur: Snapshot, prev: Snapshot | None) -> dict[PoolId, tuple[float, float]]:
    """(holds/s, releases/s) per pool over the time between two snapshots' reads.

    A pool first seen after the previous snapshot was taken counted every event within the
    interval; one that is older but absent from it (map full then) has no known rate.
    """
    if prev is None or cur.taken_monotonic_ns <= prev.taken_monotonic_ns:
        return {}
    dt_s = (cur.taken_monotonic_ns - prev.taken_monotonic_ns) / 1e9
    before = {pool_identity(p, prev): p for p in prev.pools}
    rates = {}
    for p in cur.pools:
        ident = pool_identity(p, cur)
        old = before.get(ident)
        if old is None and ident[1] < prev.taken_monotonic_ns:
            continue
        holds0, releases0 = (old.holds, old.releases) if old else (0, 0)
        holds, releases = p.holds, p.releases
        if not (isinstance(holds, int) and isinstance(releases, int)
                and isinstance(holds0, int) and isinstance(releases0, int)):
            continue  # events not tracked (the pools map was full): no rate
        if holds >= holds0 and releases >= releases0:
            rates[ident] = ((holds - holds0) / dt_s, (releases - releases0) / dt_s)
    return rates


def memory_kind(p: PoolSnapshot) -> str:
    """page or net_iov: what the pool's events carried, else what its provider hands out
    (memory providers, dmabuf and io_uring, give net_iovs only)."""
    seen = [k for k, counts in (("page", (p.hold_pages_total, p.release_pages_total)),
                                ("net_iov", (p.hold_net_iovs_total, p.release_net_iovs_total)))
            if any(isinstance(n, int) and n for n in counts)]
    if seen:
        return "+".join(seen)
    return "page" if p.provider == "host" else "net_iov"


def _state(p: PoolSnapshot) -> Cell:
    if p.state == "zombie" and p.zombie_age_ns is not None:
        return Cell(f"zombie {human_duration(p.zombie_age_ns)}", p.state)
    return Cell(p.state, p.state)


def percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def recycle_cells(r: Recycling | Unavailable) -> tuple[Cell, Cell]:
    """Pages recycled per second (recycle_cached + recycle_ring) and the recycled share of
    the pages given back (Recycling.recycled_ratio): over the last interval once there is
    one, else since the pool's creation."""
    if isinstance(r, Unavailable):
        return Cell("n/a"), Cell("n/a")
    per_s = None if r.per_s is None else r.per_s["recycle_cached"] + r.per_s["recycle_ring"]
    share = r.recycled_ratio_interval if r.recycled_ratio_interval is not None \
        else r.recycled_ratio
    return _number(per_s, human_count), _number(share, percent)


def pool_row(p: PoolSnapshot, rates: tuple[float, float] | None) -> Row:
    hold_rate: float | None | Unavailable
    release_rate: float | None | Unavailable
    hold_rate, release_rate = rates if rates else (None, None)
    if isinstance(p.holds, Unavailable):  # n/a, not "-": known to be unknown
        hold_rate, release_rate = p.holds, p.releases
    return Row((
        Cell(p.netdev or UNKNOWN, p.netdev or None),
        Cell(p.netns or UNKNOWN, p.netns or None),
        _number(p.pool_id),
        _number(p.napi_id),
        Cell(p.provider, p.provider),
        Cell(memory_kind(p), memory_kind(p)),
        _number(p.inflight_pages),
        _number(p.inflight_bytes, human_bytes),
        _number(hold_rate, human_count),
        _number(release_rate, human_count),
        *recycle_cells(p.recycling),
        _state(p),
    ), highlight=p.state == "zombie", details=tuple(holder_line(h) for h in p.holders))


def holder_line(h: Holder) -> str:
    """One holder of a zombie pool's pages, as the line under its pool row."""
    who = " ".join(x for x in (
        h.protocol, h.state, h.local_addr and f"{h.local_addr} <- {h.remote_addr or '*'}",
        h.pid is not None and f"pid {h.pid} ({h.comm or '?'})", h.netns and f"netns {h.netns}",
        h.cpu is not None and f"cpu {h.cpu}") if x)
    heal = "  self-healing" if h.self_healing else ""
    partial = "  partial scan" if h.partial_scan else ""
    return f"    holder {h.kind}: {h.pages} pages  {who or h.detail}{heal}{partial}"


def pool_table(cur: Snapshot, prev: Snapshot | None) -> Table:
    rates = pool_rates(cur, prev)
    rows = tuple(pool_row(p, rates.get(pool_identity(p, cur))) for p in cur.pools)
    return Table("PAGE POOLS", POOL_COLUMNS, rows,
                 note=None if rows else "no page pool event seen since attach")


# ---- devices: `ynltool page-pool stats` and beyond ---------------------------------------

DEV_INFLIGHT = Column("INFLIGHT", True)
DEVICE_COLUMNS = (
    Column("NETDEV"), Column("NETNS"), Column("LISTED AS"), Column("POOLS", True),
    Column("ZOMBIES", True), DEV_INFLIGHT, Column("BYTES", True), Column("Z_INFLIGHT", True),
    Column("Z_BYTES", True), Column("RECYC%", True), Column("YNL%", True),
    Column("RECYC/s", True), Column("UNLISTED", True),
)


def device_row(d: DeviceSummary) -> Row:
    ynl = d.ynltool_recycling_pct
    return Row((
        Cell(d.netdev or UNKNOWN, d.netdev or None),
        Cell(d.netns or UNKNOWN, d.netns or None),
        Cell(",".join(d.listed_as) or "not listed", ",".join(d.listed_as)),
        _number(d.pools), _number(d.zombies),
        _number(d.inflight_pages), _number(d.inflight_bytes, human_bytes),
        _number(d.zombie_inflight_pages), _number(d.zombie_inflight_bytes, human_bytes),
        _number(d.recycled_ratio, percent),
        _number(None if ynl is None or isinstance(ynl, Unavailable) else ynl / 100, percent)
        if not isinstance(ynl, Unavailable) else Cell("n/a"),
        _number(d.recycled_per_s, human_count),
        _number(d.unlisted_pools),
    ), highlight=d.zombies > 0)


def device_table(snap: Snapshot) -> Table:
    return Table("DEVICES (ynltool page-pool stats; RECYC% = recycled / given back)",
                 DEVICE_COLUMNS, tuple(device_row(d) for d in snap.devices),
                 note=None if snap.devices else "no page pool on any device")


# ---- memory cgroups ---------------------------------------------------------------------

SOCK_NOW = Column("SOCK_NOW", True)
MEMCG_COLUMNS = (
    Column("MEMCG"), Column("CONTAINER"), SOCK_NOW,
    Column("CHARGED_PG", True), Column("ZC_MAPPED", True), Column("ZC_COPIED", True),
    Column("UNACCT_ZC", True), Column("WOULD_BE", True), Column("DEVMEM_TOK", True),
)


def _who(m: MemcgSnapshot) -> str:
    """The workload behind the memcg: pod and container, else the systemd unit."""
    if m.pod_uid or m.container_id:
        return "/".join(x[:12] for x in (m.pod_uid, m.container_id) if x)
    return m.systemd_unit or UNKNOWN


def devmem_tokens_by_memcg(snap: Snapshot) -> dict[int, int | Unavailable]:
    """Devmem tokens outstanding per memcg id, summed over its sockets."""
    out: dict[int, int | Unavailable] = {}
    for sock in snap.devmem_sockets:
        have, add = out.get(sock.memcg_id, 0), sock.tokens_outstanding
        out[sock.memcg_id] = add if isinstance(add, Unavailable) else \
            have if isinstance(have, Unavailable) else have + add
    return out


def memcg_row(m: MemcgSnapshot, devmem_tokens: int | Unavailable) -> Row:
    path = m.path if m.path is not None else f"(deleted) id {m.cgroup_id}"
    return Row((
        Cell(path, path),
        Cell(_who(m), _who(m)),
        _number(m.sock_charged_now_bytes, human_bytes),
        _number(m.sock_charged_pages_total),
        _number(m.zerocopy.rx_mapped_bytes, human_bytes),
        _number(m.zerocopy.rx_copied_bytes, human_bytes),
        _number(m.zerocopy_unaccounted_bytes, human_bytes),
        _number(m.would_be_charged_bytes, human_bytes),
        _number(devmem_tokens),
    ))


def memcg_table(snap: Snapshot) -> Table:
    if snap.memcg_self_stats is None:  # the memcg collector did not report this round
        note = NO_MEMCG
    else:
        note = "no memory cgroup with socket memory or zerocopy seen yet"
    # No netmem object: token counts are unknown, not zero.
    tokens = devmem_tokens_by_memcg(snap)
    none: int | Unavailable = snap.netmem if isinstance(snap.netmem, Unavailable) else 0
    rows = tuple(memcg_row(m, tokens.get(m.cgroup_id, none)) for m in snap.memcgs)
    return Table("MEMORY CGROUPS", MEMCG_COLUMNS, rows,
                 note=None if snap.memcgs else note)


# ---- zerocopy processes ------------------------------------------------------------------

PROC_UNACCT = Column("UNACCT_ZC", True)
PROCESS_COLUMNS = (
    Column("PID", True), Column("COMM"), Column("MEMCG"), Column("ZC_MAPPED", True),
    Column("ZC_COPIED", True), PROC_UNACCT, Column("TX_ZC", True), Column("STATE"),
)


def process_row(m: MemcgSnapshot, p: ProcessSnapshot) -> Row:
    """A process that made zerocopy calls; an exited one stays, its STATE saying since when
    (for the retention of `top`'s rows, zerocopy.TOP_ROWS)."""
    path = m.path if m.path is not None else f"(deleted) id {m.cgroup_id}"
    state = (Cell(f"exited {human_duration(p.exit_age_ns or 0)}", "exited") if p.exited
             else Cell("running", "running"))
    return Row((
        _number(p.pid),
        Cell(p.comm or UNKNOWN, p.comm or None),
        Cell(path, path),
        _number(p.zerocopy.rx_mapped_bytes, human_bytes),
        _number(p.zerocopy.rx_copied_bytes, human_bytes),
        _number(p.zerocopy_unaccounted_bytes, human_bytes),
        _number(p.zerocopy.tx_zc_bytes, human_bytes),
        state,
    ))


def process_table(snap: Snapshot) -> Table:
    rows = tuple(process_row(m, p) for m in snap.memcgs for p in m.processes)
    note = NO_MEMCG if snap.memcg_self_stats is None else "no process made a zerocopy call yet"
    return Table("ZEROCOPY PROCESSES", PROCESS_COLUMNS, rows, note=None if rows else note)


# ---- sorting, filtering, layout -----------------------------------------------------------

def sort_column(table: Table, state: TableState) -> int:
    return state.sort_col % len(table.columns)


def visible_rows(table: Table, state: TableState) -> list[Row]:
    """Rows matching the filter (case-insensitive, anywhere in the row), sorted."""
    needle = state.filter.casefold()
    rows = [r for r in table.rows
            if needle in "  ".join(c.text for c in r.cells).casefold()]
    col = sort_column(table, state)
    known = [r for r in rows if r.cells[col].key is not None]
    unknown = [r for r in rows if r.cells[col].key is None]

    def key(r: Row) -> tuple[int, SortKey]:
        k = r.cells[col].key
        # Numbers before text should a column ever mix them, so the comparison never fails.
        return (0, k) if isinstance(k, float) else (1, str(k))

    return sorted(known, key=key, reverse=state.reverse) + unknown


@dataclass(frozen=True)
class Section:
    title: str
    header: str
    rows: list[tuple[str, bool]]  # (text, highlighted)
    note: str | None


def _join(cells: Sequence[str], columns: Sequence[Column], widths: Sequence[int],
          marker: str) -> str:
    parts = [c.rjust(w) if col.right else c.ljust(w)
             for c, col, w in zip(cells, columns, widths, strict=True)]
    return f"{marker} " + "  ".join(parts).rstrip()


def section(table: Table, state: TableState, focused: bool) -> Section:
    rows = visible_rows(table, state)
    col = sort_column(table, state)
    titles = [c.title + SORT_MARK * (i == col) for i, c in enumerate(table.columns)]
    widths = [max([len(t)] + [len(r.cells[i].text) for r in rows]) for i, t in enumerate(titles)]
    shown = f"{len(rows)} of {len(table.rows)}" if state.filter else f"{len(table.rows)}"
    title = f"{'>' if focused else ' '} {table.title} ({shown})"
    if state.filter:
        title += f"  filter: {state.filter}"
    title += f"  sort: {table.columns[col].title} {'desc' if state.reverse else 'asc'}"
    note = table.note if not table.rows else None if rows else "no row matches the filter"
    return Section(
        title=title,
        header=_join(titles, table.columns, widths, " "),
        rows=[line for r in rows for line in (
            (_join([c.text for c in r.cells], table.columns, widths,
                   MARK if r.highlight else " "), r.highlight),
            *((d, False) for d in r.details))],
        note=note,
    )


TURN_ON = "turn on with "  # how the reason of a hook off by choice says to switch it on


def probes_line(status: Sequence[ProbeStatus]) -> str:
    """Hooks that should run and how many do; those that failed apart from those the kernel
    does not have, those off by choice (with how to turn them on) and those another hook
    family replaces."""
    def names(rows: Iterable[ProbeStatus]) -> str:
        return ", ".join(dict.fromkeys(r.hook for r in rows))  # a hook may be in 2 objects

    off = [p for p in status if not p.attached and p.off]
    absent = [p for p in status if p.absent]
    failed = [p for p in status if not p.attached and not p.off and not p.absent]
    replaced = [p for p in off if p.off == OFF_REPLACED]
    line = (f"probes {sum(p.attached for p in status)}/"
            f"{len(status) - len(replaced) - len(absent)} attached")
    if failed:
        line += f"; failed: {names(failed)} (why: netmemtrace probes)"
    if absent:
        line += f"; not in this kernel: {names(absent)}"
    how: dict[str, list[ProbeStatus]] = {}
    for p in off:
        if p.off == OFF_CHOICE:
            how.setdefault(p.reason[p.reason.find(TURN_ON):] if TURN_ON in p.reason
                           else p.reason, []).append(p)
    for turn_on, rows in how.items():
        line += f"; off by choice: {names(rows)} ({turn_on})"
    if replaced:
        line += f"; replaced by another family: {names(replaced)}"
    return line


def header_lines(cur: Snapshot, prev: Snapshot | None, paused: bool) -> list[str]:
    clock = time.strftime("%H:%M:%S", time.localtime(cur.taken_unix_s))
    span = (f"rates over {(cur.taken_monotonic_ns - prev.taken_monotonic_ns) / 1e9:.1f}s"
            if prev else "rates from the next refresh")
    first = f"{FRAME_START}{clock}  host {cur.host}  kernel {cur.kernel_release}  {span}"
    # Events netmemtrace had to drop since attach ("object.counter"): figures undercount.
    lost = {f"{obj}.{counter}": n for obj, counter, n in lost_events(cur.stats) if n}
    detail = f" ({', '.join(f'{k} {v}' for k, v in lost.items())})" if lost else ""
    return [
        first + ("  PAUSED" if paused else ""),
        probes_line(cur.probes),
        f"lost events {sum(lost.values())}{detail}  snapshot built in "
        f"{cur.self_stats.snapshot_build_ns / 1e6:.1f} ms",
        "errors: " + ("; ".join(f"{e.collector}: {e.message}" for e in cur.errors)
                      if cur.errors else "none"),
    ]


def sections(cur: Snapshot, prev: Snapshot | None, view: ViewState) -> list[Section]:
    tables = (pool_table(cur, prev), memcg_table(cur), process_table(cur), device_table(cur))
    return [section(t, s, i == view.focus)
            for i, (t, s) in enumerate(zip(tables, view.tables, strict=True))]


def footer(view: ViewState) -> str:
    if view.editing is not None:
        return f"filter: {view.editing}_   Enter apply  Esc clear"
    return FOOTER_KEYS + ("   [paused]" if view.paused else "")


def batch_frame(cur: Snapshot, prev: Snapshot | None, view: ViewState) -> str:
    lines = header_lines(cur, prev, view.paused)
    for sec in sections(cur, prev, view):
        lines += ["", sec.title, sec.header] + [text for text, _ in sec.rows]
        if sec.note:
            lines.append(f"  ({sec.note})")
    return "\n".join(lines)


# ---- keys -------------------------------------------------------------------------------

ENTER_KEYS = ("\n", "\r", curses.KEY_ENTER)
BACKSPACE_KEYS = ("\x7f", "\b", curses.KEY_BACKSPACE)


def handle_key(view: ViewState, key: str | int) -> bool:
    """Apply one key press to the view state; True means quit."""
    table = view.tables[view.focus]
    if view.editing is not None:
        if key in ENTER_KEYS:
            table.filter, view.editing = view.editing, None
        elif key == ESC:
            table.filter, view.editing = "", None
        elif key in BACKSPACE_KEYS:
            view.editing = view.editing[:-1]
        elif isinstance(key, str) and key.isprintable():
            view.editing += key
        return False
    if key == "q":
        return True
    if key == "s":
        table.sort_col += 1
    elif key == "S":
        table.reverse = not table.reverse
    elif key == "/":
        view.editing = ""
    elif key == ESC:
        table.filter = ""
    elif key == "\t":
        view.focus = (view.focus + 1) % len(view.tables)
    elif key == "p":
        view.paused = not view.paused
    return False


# ---- screen layout ----------------------------------------------------------------------

NORMAL, TITLE, DIM, HEADER, HIGHLIGHT = range(5)


def fit_rows(counts: Sequence[int], room: int) -> list[int]:
    """Rows each table may show in ``room`` lines: the smaller tables first get all they
    need, the rest is shared evenly, so one long table cannot hide the other."""
    give = [0] * len(counts)
    left = max(room, 0)
    order = sorted(range(len(counts)), key=lambda i: counts[i])
    for n, i in enumerate(order):
        give[i] = min(counts[i], left // (len(order) - n))
        left -= give[i]
    return give


def screen_lines(cur: Snapshot, prev: Snapshot | None, view: ViewState,
                 height: int) -> list[tuple[str, int]]:
    """The frame as (text, style) lines fitting ``height``, footer on the last line."""
    lines = [(text, NORMAL) for text in header_lines(cur, prev, view.paused)]
    secs = sections(cur, prev, view)
    fixed = len(lines) + 1 + sum(3 + bool(s.note) for s in secs)
    room = fit_rows([len(s.rows) for s in secs], height - fixed)
    for i, (sec, n) in enumerate(zip(secs, room, strict=True)):
        hidden = len(sec.rows) - n
        lines += [("", NORMAL), (sec.title + (f"  ({hidden} more below)" if hidden else ""),
                                 TITLE if i == view.focus else DIM),
                  (sec.header, HEADER)]
        lines += [(text, HIGHLIGHT if hl else NORMAL) for text, hl in sec.rows[:n]]
        if sec.note:
            lines.append((f"  ({sec.note})", DIM))
    lines = lines[:max(height - 1, 0)]
    return lines + [("", NORMAL)] * (height - 1 - len(lines)) + [(footer(view), HEADER)]


# ---- loops ------------------------------------------------------------------------------

def run_batch(read: Read, first: Snapshot, interval_s: float, count: int | None,
              out: IO[str] = sys.stdout) -> None:
    """Print ``count`` frames (forever if None), ``interval_s`` apart, like `top -b`."""
    view = ViewState()
    prev, cur = None, first
    frames = 1
    next_at = time.monotonic() + interval_s
    while True:
        try:
            print(batch_frame(cur, prev, view) + "\n", file=out, flush=True)
        except BrokenPipeError:
            # The reader is gone (`top --batch | head`): stop quietly, like `top -b`. stdout
            # now points at /dev/null, or the flush at exit would report the pipe again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
            return
        if count is not None and frames >= count:
            return
        time.sleep(max(next_at - time.monotonic(), 0))
        next_at = max(next_at + interval_s, time.monotonic())
        prev, cur = cur, read()
        frames += 1


def _draw(scr: curses.window, lines: Iterable[tuple[str, int]]) -> None:
    attrs = {NORMAL: curses.A_NORMAL, TITLE: curses.A_BOLD, DIM: curses.A_DIM,
             HEADER: curses.A_REVERSE, HIGHLIGHT: curses.A_REVERSE | curses.A_BOLD}
    _, width = scr.getmaxyx()
    scr.erase()
    for y, (text, style) in enumerate(lines):
        # One column short of the edge: curses raises when writing the bottom-right cell.
        scr.addnstr(y, 0, text, max(width - 1, 0), attrs[style])
    scr.refresh()


def _interactive(scr: curses.window, read: Read, first: Snapshot, interval_s: float,
                 count: int | None) -> None:
    with contextlib.suppress(curses.error):  # terminals without cursor visibility control
        curses.curs_set(0)
    curses.set_escdelay(25)  # Esc clears the filter at once, not after curses' default 1 s
    view = ViewState()
    prev, cur = None, first
    frames = 1
    next_at = time.monotonic() + interval_s
    while True:
        _draw(scr, screen_lines(cur, prev, view, scr.getmaxyx()[0]))
        if view.paused:
            scr.timeout(-1)
        else:
            scr.timeout(max(int((next_at - time.monotonic()) * 1000), 0))
        try:
            key: str | int | None = scr.get_wch()
        except curses.error:
            key = None  # timeout: time for the next snapshot
        if key == curses.KEY_RESIZE:
            curses.update_lines_cols()
        elif key is not None:
            was_paused = view.paused
            if handle_key(view, key):
                return
            if was_paused and not view.paused:
                next_at = time.monotonic()  # resume with a fresh snapshot right away
        if not view.paused and time.monotonic() >= next_at:
            if count is not None and frames >= count:
                return
            prev, cur = cur, read()
            frames += 1
            next_at = max(next_at + interval_s, time.monotonic())


def run_interactive(read: Read, first: Snapshot, interval_s: float,
                    count: int | None) -> None:
    """Full-screen view until `q` (or after ``count`` snapshots); the terminal is restored
    however it ends."""
    locale.setlocale(locale.LC_ALL, "")  # so curses writes non-ASCII netdev names correctly
    curses.wrapper(_interactive, read, first, interval_s, count)
