"""Drop capabilities once every BPF program is attached (as ebpf_exporter users asked).

After attach, reading maps, ring buffers and iterators goes through file descriptors we
already hold and needs no capability. What the readers still need is kept:
CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH (/proc/PID/fd and smaps of other users' processes:
socket owners, zerocopy cross-check) and CAP_NET_ADMIN (netlink). CAP_SYS_ADMIN, CAP_BPF
and CAP_PERFMON go, so a compromised daemon can load no BPF. Without CAP_SYS_ADMIN a
renamed netdev in another netns keeps the name it had when its pool was created.
"""

from __future__ import annotations

import ctypes
import os

CAP_DAC_READ_SEARCH = 2
CAP_NET_ADMIN = 12
CAP_SYS_PTRACE = 19
KEEP = (CAP_DAC_READ_SEARCH, CAP_NET_ADMIN, CAP_SYS_PTRACE)
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def drop_after_attach(keep: tuple[int, ...] = KEEP) -> int:
    """Reduce this process to `keep` (effective, permitted, bounding set). Returns the mask."""
    libc = ctypes.CDLL(None, use_errno=True)
    mask = sum(1 << cap for cap in keep)
    for cap in range(_last_cap() + 1):
        if not mask >> cap & 1 and libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"dropping capability {cap} from the bounding set failed")
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    data = (_Data * 2)()
    for i in range(2):
        part = (mask >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = part
    if libc.capset(ctypes.byref(_Header(_LINUX_CAPABILITY_VERSION_3, 0)), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return mask
