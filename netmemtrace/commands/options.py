"""Every numeric command-line option is parsed here, by one of two argparse types.

A value outside what the option can mean (negative, NaN, infinite, or past what the code
using it can represent, e.g. a sleep of 1e300 s or a sampling factor above 2^32 that would
track nothing) is refused by argparse as the user typed it: `error: argument --X: ...` and
exit 2, before anything is attached. The bounds are the table below, so `--help`, the
tests and the code agree.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

WEEK_S = 7 * 24 * 3600.0
HOUR_S = 3600.0
PID_MAX_LIMIT = 1 << 22  # the kernel's PID_MAX_LIMIT on 64-bit: no pid is larger


def _number(text: str, kind: type) -> float | int | None:
    try:
        return kind(text)
    except (ValueError, OverflowError):
        return None


def seconds(low: float, high: float, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds in [low, high] ((low, high] with
    low_open)."""
    what = (f"more than {low:g} and at most {high:g}" if low_open
            else f"from {low:g} to {high:g}")

    def parse(text: str) -> float:
        value = _number(text, float)
        if value is None or not math.isfinite(value) or value > high or value < low or (
                low_open and value == low):
            raise argparse.ArgumentTypeError(f"must be a number of seconds {what}, not "
                                             f"{text!r}")
        return value

    parse.__name__ = "seconds"
    return parse


def integer(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number in [low, high]."""

    def parse(text: str) -> int:
        value = _number(text, int)
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high}, "
                                             f"not {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


# The options, by the flag that takes them. Durations of a one-shot command up to a week;
# refresh intervals and waits up to an hour (longer is a misconfiguration: /healthz counts in
# intervals, and a serve that reads hourly has nothing to scrape).
DUMP_DURATION = seconds(0.0, WEEK_S)
DEMO_DURATION = seconds(0.0, WEEK_S, low_open=True)
EXPLAIN_WAIT = seconds(0.0, HOUR_S)
TOP_INTERVAL = seconds(0.0, HOUR_S, low_open=True)
SERVE_INTERVAL = seconds(0.0, HOUR_S, low_open=True)
TOP_COUNT = integer(1, 1 << 31)
PID = integer(1, PID_MAX_LIMIT)
# The BPF side keeps a netmem when its 32-bit hash is below 2^32 / N: above 2^32 the
# threshold would be 0 and nothing tracked.
NETMEM_SAMPLE = integer(1, 1 << 32)
MAX_CGROUPS = integer(1, 1_000_000)


# A test knob, not a user option: map and ring buffer sizes of the BPF objects, so a test
# can fill one and see the loss reported (every drop is counted and shown, never silent).
# One name is no BPF map: zerocopy.ledger bounds the mapping ledger's ranges (user space).
MAP_SIZES_ENV = "NETMEMTRACE_MAP_SIZES"
LEDGER_SIZE = ("zerocopy", "ledger")
_MAX_MAP_ENTRIES = 1 << 30


def map_sizes(text: str | None) -> dict[str, dict[str, int]]:
    """'OBJECT.MAP=N,...' (e.g. 'netmem.netmems=2,zerocopy.zc_events=4096') -> {object:
    {map: N}}; ValueError says what is wrong. Ring buffers take a power-of-two multiple of
    the page size, which libbpf checks at load."""
    sizes: dict[str, dict[str, int]] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        where, sep, n = item.partition("=")
        obj, dot, name = where.partition(".")
        value = _number(n, int) if sep else None
        if not (dot and obj and name) or value is None or not 1 <= value <= _MAX_MAP_ENTRIES:
            raise ValueError(f"{MAP_SIZES_ENV}: {item!r} is not OBJECT.MAP=N with N from 1 to "
                             f"{_MAX_MAP_ENTRIES}")
        sizes.setdefault(obj, {})[name] = value
    return sizes
