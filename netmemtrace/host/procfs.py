"""What /proc says about a process, one small function per fact."""

from __future__ import annotations

import os


def comm_of(pid: int) -> str | None:
    """The process's name (/proc/PID/comm); None once it is gone."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def smaps_socket_rss(pid: int) -> int:
    """Rss, in bytes, of the mappings of pid backed by a socket (TCP zerocopy windows)."""
    total = 0
    in_socket = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(maxsplit=6)
            if len(first) >= 5 and "-" in first[0] and ":" in first[3]:
                in_socket = len(first) == 6 and first[5].startswith("socket:")
            elif in_socket and line.startswith("Rss:"):
                total += int(first[1]) * 1024
    return total


def start_boottime_ns(pid: int) -> int | None:
    """When the process started, CLOCK_BOOTTIME ns, rounded down to the clock tick
    (/proc/PID/stat starttime); None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # Field 22; the name (field 2) may hold spaces and parentheses: count after its end.
    ticks = int(stat[stat.rindex(")") + 2:].split()[19])
    return ticks * 10**9 // os.sysconf("SC_CLK_TCK")
