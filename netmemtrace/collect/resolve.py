"""Names for kernel identities: netns inode -> netns name, ifindex -> netdev name (pyroute2),
memory provider ops address -> provider kind (kallsyms)."""

from __future__ import annotations

import functools
import os

from pyroute2 import IPRoute, netns

# Memory provider ops symbols (net/core/devmem.c, io_uring/zcrx.c) and what they mean.
PROVIDER_SYMBOLS = {"dmabuf_devmem_ops": "dmabuf", "io_uring_pp_zc_ops": "io_uring"}


def init_netns_inode() -> int:
    return os.stat("/proc/1/ns/net").st_ino


def netns_names() -> dict[int, str]:
    """inode -> name of every netns named under /run/netns (ip netns add)."""
    by_dev = netns._get_ns_by_inode()  # pyroute2 keys by (dev, inode); inode is unique here
    return {ino: name for names in by_dev.values() for ino, name in names.items()}


def netns_label(ino: int, names: dict[int, str], init_ino: int) -> str:
    if ino == init_ino:
        return "init"
    return names.get(ino, f"net:[{ino}]")


def link_names(ns_name: str | None) -> dict[int, str]:
    """ifindex -> current netdev name inside a netns (None: ours)."""
    with IPRoute(netns=ns_name) if ns_name else IPRoute() as ipr:
        return {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


@functools.cache
def provider_addresses() -> dict[int, str]:
    """Address of each memory provider ops symbol this kernel has (needs root: kptr_restrict)."""
    found: dict[int, str] = {}
    try:
        with open("/proc/kallsyms") as f:
            for line in f:
                addr, _, name = line.split()[:3]
                if name in PROVIDER_SYMBOLS and int(addr, 16):
                    found[int(addr, 16)] = PROVIDER_SYMBOLS[name]
    except OSError:
        pass
    return found


def provider_name(mp_ops: int) -> str:
    if mp_ops == 0:
        return "host"
    return provider_addresses().get(mp_ops, f"unknown(mp_ops={mp_ops:#x})")
