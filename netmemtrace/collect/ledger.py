"""The mapping ledger: which address ranges of which process map TCP-rx-zerocopy pages now.

Those pages were uncharged from socket memory when the skb was consumed and are charged to
no memory cgroup while mapped. The kernel has no event for them, so the ledger replays the
syscalls that change them (bpf/zerocopy.bpf.c, through a ring buffer): a successful
TCP_ZEROCOPY_RECEIVE maps [address, address+length) (the kernel zaps that range first),
munmap / madvise(DONTNEED...) / mmap over it / mremap end or move it, exec and exit drop
the whole process, fork copies it.

Bounded: at most max_ranges ranges in all; a range that does not fit is counted in
overflow_ranges and its bytes in overflow_bytes, so an undercount is never silent.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

PAGE = 4096
MAX_RANGES = 65536  # the default bound; NETMEMTRACE_MAP_SIZES zerocopy.ledger sets it


def _page_end(addr: int, length: int) -> int:
    return (addr + length + PAGE - 1) // PAGE * PAGE


@dataclass
class _Ranges:
    """Disjoint [start, end) ranges of one process, sorted, each with its map time."""

    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    mapped_ns: list[int] = field(default_factory=list)
    bytes: int = 0

    def cut(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """Remove [start, end); returns the removed pieces (start, end, mapped_ns)."""
        i = bisect.bisect_right(self.starts, start) - 1
        if i < 0 or self.ends[i] <= start:
            i += 1
        removed = []
        while i < len(self.starts) and self.starts[i] < end:
            s, e, t = self.starts[i], self.ends[i], self.mapped_ns[i]
            del self.starts[i], self.ends[i], self.mapped_ns[i]
            lo, hi = max(s, start), min(e, end)
            removed.append((lo, hi, t))
            self.bytes -= e - s
            # Keep the parts outside the cut, in order.
            for ps, pe in ((s, lo), (hi, e)):
                if pe > ps:
                    self.starts.insert(i, ps)
                    self.ends.insert(i, pe)
                    self.mapped_ns.insert(i, t)
                    self.bytes += pe - ps
                    i += 1
        return removed

    def add(self, start: int, end: int, mapped_ns: int) -> None:
        i = bisect.bisect_left(self.starts, start)
        self.starts.insert(i, start)
        self.ends.insert(i, end)
        self.mapped_ns.insert(i, mapped_ns)
        self.bytes += end - start


class Ledger:
    def __init__(self, max_ranges: int = MAX_RANGES) -> None:
        self.max_ranges = max_ranges
        self.overflow_ranges = 0
        self.overflow_bytes = 0
        self._procs: dict[int, _Ranges] = {}
        self._memcg_of: dict[int, int] = {}
        self._nranges = 0
        self.proc_hwm: dict[int, int] = {}
        self.memcg_bytes: dict[int, int] = {}
        self.memcg_hwm: dict[int, int] = {}

    # ---- queries ----
    def pids(self) -> list[int]:
        return list(self._procs)

    def held_bytes(self, tgid: int) -> int:
        r = self._procs.get(tgid)
        return r.bytes if r else 0

    def oldest_mapped_ns(self, tgid: int) -> int | None:
        r = self._procs.get(tgid)
        return min(r.mapped_ns) if r and r.mapped_ns else None

    def memcg_of(self, tgid: int) -> int | None:
        return self._memcg_of.get(tgid)

    def ranges(self, tgid: int) -> list[tuple[int, int]]:
        r = self._procs.get(tgid)
        return list(zip(r.starts, r.ends, strict=True)) if r else []

    @property
    def nranges(self) -> int:
        return self._nranges

    # ---- events ----
    def _account(self, tgid: int, delta: int) -> None:
        memcg = self._memcg_of.get(tgid)
        if memcg is not None:
            now = self.memcg_bytes.get(memcg, 0) + delta
            self.memcg_bytes[memcg] = now
            self.memcg_hwm[memcg] = max(self.memcg_hwm.get(memcg, 0), now)
        held = self.held_bytes(tgid)
        self.proc_hwm[tgid] = max(self.proc_hwm.get(tgid, 0), held)

    def _set_memcg(self, tgid: int, memcg: int) -> None:
        old = self._memcg_of.get(tgid)
        if old == memcg:
            return
        held = self.held_bytes(tgid)
        if old is not None:
            self.memcg_bytes[old] -= held
        self._memcg_of[tgid] = memcg
        self.memcg_bytes[memcg] = self.memcg_bytes.get(memcg, 0) + held
        self.memcg_hwm[memcg] = max(self.memcg_hwm.get(memcg, 0), self.memcg_bytes[memcg])

    def _remove(self, tgid: int, start: int, end: int) -> list[tuple[int, int, int]]:
        r = self._procs.get(tgid)
        if r is None or end <= start:
            return []
        before_n, before_b = len(r.starts), r.bytes
        removed = r.cut(start, end)
        self._nranges += len(r.starts) - before_n
        self._account(tgid, r.bytes - before_b)
        return removed

    def _insert(self, tgid: int, start: int, end: int, mapped_ns: int) -> None:
        if self._nranges >= self.max_ranges:
            self.overflow_ranges += 1
            self.overflow_bytes += end - start
            return
        r = self._procs.setdefault(tgid, _Ranges())
        r.add(start, end, mapped_ns)
        self._nranges += 1
        self._account(tgid, end - start)

    def rx_map(self, tgid: int, memcg: int, addr: int, length: int, ts_ns: int,
               zapped: int = 0) -> None:
        """The kernel zapped [addr, addr+max(zapped, length)), then mapped length bytes."""
        self._set_memcg(tgid, memcg)
        end = _page_end(addr, length)
        self._remove(tgid, addr, max(end, _page_end(addr, zapped)))
        self._insert(tgid, addr, end, ts_ns)

    def unmap(self, tgid: int, addr: int, length: int) -> None:
        self._remove(tgid, addr, _page_end(addr, length))

    def remap(self, tgid: int, old: int, old_len: int, new: int, new_len: int) -> None:
        """mremap succeeded: the first min(old_len, new_len) bytes moved to new."""
        moved = self._remove(tgid, old, _page_end(old, old_len))
        self._remove(tgid, new, _page_end(new, new_len))
        limit = old + min(old_len, new_len)
        for s, e, t in moved:
            if s < limit:
                self._insert(tgid, new + s - old, new + min(e, limit) - old, t)

    def fork(self, parent: int, child: int) -> None:
        r = self._procs.get(parent)
        memcg = self._memcg_of.get(parent)
        if r is None or memcg is None:
            return
        self._set_memcg(child, memcg)
        for s, e, t in zip(r.starts, r.ends, r.mapped_ns, strict=True):
            self._insert(child, s, e, t)

    def exit(self, tgid: int) -> None:
        """The address space is gone (exit or exec): every range of tgid with it."""
        r = self._procs.pop(tgid, None)
        memcg = self._memcg_of.pop(tgid, None)
        self.proc_hwm.pop(tgid, None)
        if r is None:
            return
        self._nranges -= len(r.starts)
        if memcg is not None:
            self.memcg_bytes[memcg] -= r.bytes
