"""Names for kernel identities: netns inode -> netns name (/run/netns, as `ip netns`),
ifindex -> netdev name (rtnetlink, host/netlink.py), memory provider ops address ->
provider kind (kallsyms)."""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path

from netmemtrace.host import netlink
from netmemtrace.kernel import kallsyms
from netmemtrace.privilege import netns_broker

# Where `ip netns add` (iproute2, pyroute2) bind-mounts named network namespaces.
NETNS_RUN_DIR = "/var/run/netns"

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


def network_namespaces() -> dict[int, str]:
    """inode -> a path that opens it, for every named netns and every process's netns."""
    found: dict[int, str] = {}
    run_dir = Path(NETNS_RUN_DIR)
    named = sorted(str(p) for p in run_dir.glob("*")) if run_dir.is_dir() else []
    procs = (f"/proc/{p}/ns/net" for p in os.listdir("/proc") if p.isdigit())
    for path in (*named, *procs):
        try:
            found.setdefault(os.stat(path).st_ino, path)
        except OSError:
            continue  # process gone, or a dangling name
    return found


def kernel_view() -> netlink.KernelView:
    """The netdev family's page pools, recycling counters and NAPI ids, and the link names,
    in every network namespace (netlink dumps answer for the socket's netns only).

    The sockets are made per call and closed: a socket pins its netns, and a netns kept
    alive by netmemtrace would keep its pools (and zombies) alive too. A netns that cannot
    be entered is named in `failed`. Raises when our own netns cannot be dumped (kernel
    without the netdev family: < 6.8)."""
    own = own_netns_inode()
    names = netns_names()
    views = [netlink.netns_view("host", None, None)]
    failed = []
    for ino, path in sorted(network_namespaces().items()):
        if ino == own:
            continue
        label = netns_label(ino, names, own) or path
        try:
            genl = socket.socket(fileno=netns_broker.fd_in_netns(
                path, netns_broker.NETLINK, netns_broker.NETLINK_GENERIC))
            with genl, socket.socket(fileno=netns_broker.fd_in_netns(
                    path, netns_broker.NETLINK, netns_broker.NETLINK_ROUTE)) as route:
                views.append(netlink.netns_view(label, genl, route))
        except Exception as exc:  # gone meanwhile, not enterable: the rest still count
            failed.append(f"{label}: {exc}")
    return netlink.KernelView(tuple(views), tuple(failed))


def link_names(ns_name: str | None) -> dict[int, str]:
    """ifindex -> current netdev name inside a named netns (None: ours).

    A netlink socket belongs to the netns it was created in and dumps links without any
    capability: the socket is made in that netns (netns_broker.fd_in_netns: by the broker
    once capabilities are dropped, else by setns in this thread) and the dump runs here.
    (pyroute2's IPRoute(netns=...) would fork a helper process per call instead.)
    """
    if ns_name is None:
        return netlink.link_names()
    fd = netns_broker.fd_in_netns(os.path.join(NETNS_RUN_DIR, ns_name), netns_broker.NETLINK,
                                  netns_broker.NETLINK_ROUTE)
    with socket.socket(fileno=fd) as sock:
        return netlink.link_names(sock)


@functools.cache
def provider_addresses() -> dict[int, str]:
    """Address of each memory provider ops symbol this kernel has (needs root: kptr_restrict)."""
    return {addr: PROVIDER_SYMBOLS[name]
            for name, addr in kallsyms.lookup(PROVIDER_SYMBOLS).items() if addr}


def provider_name(mp_ops: int) -> str:
    if mp_ops == 0:
        return "host"
    return provider_addresses().get(mp_ops, f"unknown(mp_ops={mp_ops:#x})")
