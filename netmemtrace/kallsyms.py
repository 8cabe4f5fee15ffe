"""Kernel symbol addresses from /proc/kallsyms, the one reader of that file.

Only the names asked for are kept: the whole table would cost ~12 MB of RSS. Each batch of
names not asked before costs one scan. An address of 0 means the symbol exists but
kptr_restrict hides its address (not root).
"""

from __future__ import annotations

from collections.abc import Iterable

_cache: dict[str, int | None] = {}


def lookup(names: Iterable[str]) -> dict[str, int]:
    """name -> address for those of `names` the kernel lists (absent names are left out)."""
    wanted = set(names)
    unknown = wanted - _cache.keys()
    if unknown:
        found: dict[str, int] = {}
        try:
            with open("/proc/kallsyms") as f:
                for line in f:
                    addr, _, name = line.split(maxsplit=3)[:3]
                    if name in unknown:
                        found[name] = int(addr, 16)
        except OSError:
            pass
        _cache.update((n, found.get(n)) for n in unknown)
    return {n: addr for n in wanted if (addr := _cache[n]) is not None}
