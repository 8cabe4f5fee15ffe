"""Names for kernel identities: netns inode -> netns name (/run/netns, as `ip netns`),
ifindex -> netdev name (rtnetlink, collect/netlink.py), memory provider ops address ->
provider kind (kallsyms)."""

from __future__ import annotations

import ctypes
import functools
import os
import threading

from .. import kallsyms
from . import netlink

_CLONE_NEWNET = 0x40000000
# Where `ip netns add` (iproute2, pyroute2) bind-mounts named network namespaces.
NETNS_RUN_DIR = "/var/run/netns"
_libc = ctypes.CDLL(None, use_errno=True)

# Memory provider ops symbols (net/core/devmem.c, io_uring/zcrx.c) and what they mean.
PROVIDER_SYMBOLS = {"dmabuf_devmem_ops": "dmabuf", "io_uring_pp_zc_ops": "io_uring"}


def own_netns_inode() -> int:
    """The netns netmemtrace runs in (the host's, for a daemon; /proc/1 may be unreadable
    in containers and sandboxes, so it is not asked)."""
    return os.stat("/proc/self/ns/net").st_ino


def netns_names(run_dir: str = NETNS_RUN_DIR) -> dict[int, str]:
    """inode -> name of every netns named under /run/netns (ip netns add)."""
    names: dict[int, str] = {}
    try:
        entries = sorted(os.listdir(run_dir))
    except OSError:
        return names  # no named netns yet
    for name in entries:
        try:
            names.setdefault(os.stat(os.path.join(run_dir, name)).st_ino, name)
        except OSError:
            continue  # deleted meanwhile, or a name whose mount is gone
    return names


def netns_label(ino: int, names: dict[int, str], own_ino: int) -> str | None:
    if ino == 0:
        return None  # the pool has no netdev to take a netns from
    if ino == own_ino:
        return "host"
    return names.get(ino, f"net:[{ino}]")


def link_names(ns_name: str | None) -> dict[int, str]:
    """ifindex -> current netdev name inside a netns (None: ours).

    pyroute2's IPRoute(netns=...) forks a helper process, which inherits our signal
    handlers, locks and BPF fds; a fork per refresh is also slow. Instead a short-lived
    thread joins the netns (setns changes only the calling thread) and opens its netlink
    socket there (a socket belongs to the netns it was created in).
    """
    if ns_name is None:
        return _links_here()
    result: list[dict[int, str] | BaseException] = []

    def in_netns() -> None:
        try:
            fd = os.open(os.path.join(NETNS_RUN_DIR, ns_name), os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns_name}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(_links_here())
        except BaseException as exc:  # handed to the caller's thread
            result.append(exc)

    thread = threading.Thread(target=in_netns, name=f"netns-{ns_name}")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _links_here() -> dict[int, str]:
    return netlink.link_names_here()


@functools.cache
def provider_addresses() -> dict[int, str]:
    """Address of each memory provider ops symbol this kernel has (needs root: kptr_restrict)."""
    return {addr: PROVIDER_SYMBOLS[name]
            for name, addr in kallsyms.lookup(PROVIDER_SYMBOLS).items() if addr}


def provider_name(mp_ops: int) -> str:
    if mp_ops == 0:
        return "host"
    return provider_addresses().get(mp_ops, f"unknown(mp_ops={mp_ops:#x})")
