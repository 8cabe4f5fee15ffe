"""Drop capabilities once every BPF program is attached (as ebpf_exporter users asked).

After attach, reading maps, ring buffers and iterators goes through file descriptors we
already hold and needs no capability. What the readers still need is kept:
CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH (/proc/PID/fd and smaps of other users' processes:
socket owners, zerocopy cross-check; /proc/PID/ns/net) and CAP_NET_ADMIN (netlink).
CAP_SYS_ADMIN, CAP_BPF and CAP_PERFMON go, so a compromised daemon can load no BPF.
Entering other network namespaces (CAP_SYS_ADMIN) is left to a separate broker process
started before the drop (netns_broker.py).

Capabilities, the bounding set and no_new_privs belong to each thread, not to the process:
capset() and PR_CAPBSET_DROP change the calling thread only, and a thread inherits the sets
of the thread that created it. So the drop happens while the daemon has one thread, every
thread is started after it, and drop_after_attach checks every thread of the process
(/proc/self/task) and fails if any kept more.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time

CAP_DAC_READ_SEARCH = 2
CAP_NET_ADMIN = 12
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
KEEP = (CAP_DAC_READ_SEARCH, CAP_NET_ADMIN, CAP_SYS_PTRACE)
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_libc = ctypes.CDLL(None, use_errno=True)
_STATUS_FIELDS = ("CapPrm", "CapEff", "CapBnd", "NoNewPrivs")


class CapsError(RuntimeError):
    """A thread of the process kept more capabilities than the drop left."""


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def mask_of(keep: tuple[int, ...]) -> int:
    return sum(1 << cap for cap in keep)


def set_caps(keep: tuple[int, ...], top: int | None = None) -> int:
    """Reduce the calling thread to `keep` (effective and permitted; the bounding set;
    nothing inheritable, hence nothing ambient) and set no_new_privs. top: the highest
    capability number (cap_last_cap), read if not given. Opens nothing when given (the
    netns broker calls this). Returns the mask."""
    libc = _libc
    mask = mask_of(keep)
    for cap in range((last_cap() if top is None else top) + 1):
        if not mask >> cap & 1 and libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"dropping capability {cap} from the bounding set failed")
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"PR_SET_NO_NEW_PRIVS: {os.strerror(err)}")
    data = (_Data * 2)()
    for i in range(2):
        part = (mask >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = part
    if libc.capset(ctypes.byref(_Header(_LINUX_CAPABILITY_VERSION_3, 0)), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return mask


def _status(path: str) -> dict[str, int]:
    """CapPrm, CapEff, CapBnd (masks) and NoNewPrivs of a /proc status file. (Parsed by
    hand: the netns broker imports this module, and re and pathlib cost it ~1 MB.)"""
    out = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in _STATUS_FIELDS:
                out[key] = int(value, 16) if key.startswith("Cap") else int(value)
    return out


def task_caps(pid: int | str = "self") -> dict[int, dict[str, int]]:
    """tid -> CapPrm, CapEff, CapBnd and NoNewPrivs of every thread of a process."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = _status(f"/proc/{pid}/task/{tid}/status")
        except OSError:
            continue  # the thread exited meanwhile
    return out


def has_effective(cap: int) -> bool:
    """The calling thread has `cap` in its effective set."""
    return bool(_status("/proc/thread-self/status").get("CapEff", 0) >> cap & 1)


def check_all_threads(mask: int) -> None:
    """CapsError unless every thread of this process holds at most `mask` (effective,
    permitted, bounding set) with no_new_privs."""
    bad = [f"thread {tid}: " + ", ".join(f"{k} {v:#x}" for k, v in sets.items())
           for tid, sets in task_caps().items()
           if any(sets.get(k, 0) & ~mask for k in ("CapEff", "CapPrm", "CapBnd"))
           or sets.get("NoNewPrivs") != 1]
    if bad:
        raise CapsError(f"threads kept capabilities after the drop (started before it?): "
                        f"{'; '.join(bad)}")


def _await_joined_threads(timeout_s: float = 2.0) -> None:
    """Wait until the kernel has no more threads than Python has live ones. A thread that
    Python has joined (the object loader's pool, shut down) can still exist in the kernel
    for a moment after it released its lock; it would keep its capabilities through the
    drop, which changes the calling thread only."""
    deadline = time.monotonic() + timeout_s
    while (len(os.listdir("/proc/self/task")) > threading.active_count()
           and time.monotonic() < deadline):
        time.sleep(0.002)


def drop_after_attach(keep: tuple[int, ...] = KEEP) -> int:
    """Reduce this process to `keep` (effective, permitted, bounding set). Call while it has
    one thread; CapsError if any other thread kept more. Returns the mask."""
    _await_joined_threads()
    mask = set_caps(keep)
    check_all_threads(mask)
    return mask
