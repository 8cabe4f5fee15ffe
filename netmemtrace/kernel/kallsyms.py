"""Kernel symbol addresses: asked of the kernel name by name where it can answer
(libbpf.kallsyms_lookup), else from /proc/kallsyms, the one reader of that file.

Only the names asked for are kept: the whole table would cost ~12 MB of RSS. Each batch of
names not asked before costs one lookup or scan. An address of 0 means the symbol exists but
kptr_restrict hides its address (not root).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable

from netmemtrace.kernel import libbpf

_cache: dict[str, int | None] = {}
_lock = threading.Lock()  # a lookup made while another thread scans waits for its scan


def lookup(names: Iterable[str]) -> dict[str, int]:
    """name -> address for those of `names` the kernel lists (absent names are left out)."""
    wanted = set(names)
    with _lock:
        _scan(wanted - _cache.keys())
    return {n: addr for n in wanted if (addr := _cache[n]) is not None}


def _scan(unknown: set[str]) -> None:
    """The kernel's own lookup, 1 ms where the file costs 70 ms of CPU (bench/README.md);
    else one pass over the file, the names matched by one regex (half the time of splitting
    its ~120k lines in Python; a module symbol's line goes on with its [module])."""
    if not unknown:
        return
    if (asked := libbpf.kallsyms_lookup(unknown)) is not None:
        _cache.update(asked)
        return
    found: dict[str, int] = {}
    names = b"|".join(re.escape(n.encode()) for n in sorted(unknown))
    try:
        with open("/proc/kallsyms", "rb") as f:
            data = f.read()
    except OSError:
        data = b""
    for m in re.finditer(rb"^([0-9a-f]+) \S (" + names + rb")(?=[\t\n])", data, re.M):
        found.setdefault(m.group(2).decode(), int(m.group(1), 16))
    _cache.update((n, found.get(n)) for n in unknown)
