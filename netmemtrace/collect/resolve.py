"""Names for kernel identities: netns inode -> netns name (/run/netns, as `ip netns`),
ifindex -> netdev name (rtnetlink, collect/netlink.py), memory provider ops address ->
provider kind (kallsyms)."""

from __future__ import annotations

import functools
import os
import socket

from .. import kallsyms, netns_broker
from . import netlink

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


def link_names(ns_name: str | None) -> dict[int, str]:
    """ifindex -> current netdev name inside a named netns (None: ours).

    A netlink socket belongs to the netns it was created in and dumps links without any
    capability: the socket is made in that netns (netns_broker.fd_in_netns: by the broker
    once capabilities are dropped, else by setns in this thread) and the dump runs here.
    (pyroute2's IPRoute(netns=...) would fork a helper process per call instead.)
    """
    if ns_name is None:
        return _links_here()
    fd = netns_broker.fd_in_netns(os.path.join(NETNS_RUN_DIR, ns_name), netns_broker.NETLINK,
                                  netns_broker.NETLINK_ROUTE)
    with socket.socket(fileno=fd) as sock:
        return _links_on(sock)


def _links_here() -> dict[int, str]:
    return netlink.link_names_here()


def _links_on(sock: socket.socket) -> dict[int, str]:
    """netlink.link_names_here() over a given rtnetlink socket (of another netns)."""
    nl = netlink.nl
    seq = 1  # the socket is ours alone
    req = netlink.link_msg()
    req["family"] = socket.AF_UNSPEC
    req["header"]["type"] = netlink.RTM_GETLINK
    req["header"]["flags"] = nl.NLM_F_REQUEST | nl.NLM_F_ACK | nl.NLM_F_DUMP
    req["header"]["sequence_number"] = seq
    req.encode()
    marshal = netlink.Marshal()
    marshal.msg_map = {netlink.RTM_NEWLINK: netlink.link_msg}
    sock.bind((0, 0))
    sock.sendto(req.data, (0, 0))
    names: dict[int, str] = {}
    while True:
        for reply in marshal.parse(sock.recv(1 << 16)):
            header = reply["header"]
            if header["sequence_number"] != seq:
                continue
            if header.get("error") is not None:
                raise header["error"]
            if header["type"] in (nl.NLMSG_DONE, nl.NLMSG_ERROR):
                return names
            names[reply["index"]] = reply.get_attr("IFLA_IFNAME")


@functools.cache
def provider_addresses() -> dict[int, str]:
    """Address of each memory provider ops symbol this kernel has (needs root: kptr_restrict)."""
    return {addr: PROVIDER_SYMBOLS[name]
            for name, addr in kallsyms.lookup(PROVIDER_SYMBOLS).items() if addr}


def provider_name(mp_ops: int) -> str:
    if mp_ops == 0:
        return "host"
    return provider_addresses().get(mp_ops, f"unknown(mp_ops={mp_ops:#x})")
