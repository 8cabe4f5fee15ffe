"""The netlink requests netmemtrace makes, with pyroute2's message classes:

- the kernel's own page pool list: the `netdev` generic netlink family (page-pool-get dump,
  Documentation/netlink/specs/netdev.yaml). Only pools whose netdev is registered appear
  (veth and other pools without slow.netdev do not); a missing family (kernel < 6.8) or a
  failed dump is reported, not hidden.
- the netdev names of the caller's network namespace (rtnetlink RTM_GETLINK dump).

pyroute2 encodes the requests and decodes the replies; they travel on a plain AF_NETLINK
socket, because every socket class of pyroute2 0.9 runs an asyncio loop (9 MB of RSS).
Only the pyroute2 submodules used are imported (collect/pyroute2_lean.py).
"""

from __future__ import annotations

import functools
import itertools
import socket

from ..snapshot import KernelPoolView
from .pyroute2_lean import import_submodule

nl = import_submodule("pyroute2.netlink")
try:
    Marshal = import_submodule("pyroute2.netlink.marshal").Marshal
except ImportError:  # pyroute2 0.7 kept it in nlsocket (threads then, no asyncio)
    Marshal = import_submodule("pyroute2.netlink.nlsocket").Marshal
nla = nl.nla

NETDEV_FAMILY = "netdev"
NETDEV_CMD_PAGE_POOL_GET = 5
RTM_NEWLINK, RTM_GETLINK = 16, 18
# A dump reply is at most 32 KiB per datagram (larger on 16K-page machines): one recv each.
_RECV_BYTES = 1 << 16
_seq = itertools.count(1)


def _uint(value: bytes | None) -> int | None:
    # Spec type "uint": 4 or 8 bytes depending on the value (NLA_UINT), host byte order.
    return int.from_bytes(value, "little") if value is not None else None


class page_pool_msg(nl.genlmsg):  # noqa: N801 (pyroute2 naming convention)
    prefix = "NETDEV_A_PAGE_POOL_"
    nla_map = (
        ("NETDEV_A_PAGE_POOL_UNSPEC", "none"),
        ("NETDEV_A_PAGE_POOL_ID", "cdata"),
        ("NETDEV_A_PAGE_POOL_IFINDEX", "uint32"),
        ("NETDEV_A_PAGE_POOL_NAPI_ID", "cdata"),
        ("NETDEV_A_PAGE_POOL_INFLIGHT", "cdata"),
        ("NETDEV_A_PAGE_POOL_INFLIGHT_MEM", "cdata"),
        ("NETDEV_A_PAGE_POOL_DETACH_TIME", "cdata"),
        ("NETDEV_A_PAGE_POOL_DMABUF", "uint32"),
        ("NETDEV_A_PAGE_POOL_IO_URING", "hex"),
    )


class link_msg(nl.nlmsg):  # noqa: N801
    """struct ifinfomsg with the one attribute read (pyroute2's ifinfmsg decodes every
    attribute of every link and imports its plugins: not needed for a name)."""

    prefix = "IFLA_"
    fields = (("family", "B"), ("__align", "x"), ("ifi_type", "H"), ("index", "i"),
              ("flags", "I"), ("change", "I"))
    nla_map = ((3, "IFLA_IFNAME", "asciiz"),)


def request(protocol: int, msg: nl.nlmsg, msg_type: int, flags: int,
            replies: dict[int, type], sock: socket.socket | None = None) -> list[nl.nlmsg]:
    """Send one request to the kernel and return its replies (a dump's messages, or the
    answer to a plain request), decoded with the classes in `replies` by message type.
    sock: a netlink socket of `protocol` to use (one made in another netns), else a new one
    in ours. A netlink error is raised (pyroute2's NetlinkError, with the errno)."""
    seq = next(_seq)
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = flags | nl.NLM_F_REQUEST | nl.NLM_F_ACK
    msg["header"]["sequence_number"] = seq
    msg.encode()
    marshal = Marshal()
    marshal.msg_map = dict(replies)
    out: list[nl.nlmsg] = []
    with sock or socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                               protocol) as s:
        s.bind((0, 0))
        s.sendto(msg.data, (0, 0))
        while True:
            for reply in marshal.parse(s.recv(_RECV_BYTES)):
                header = reply["header"]
                if header["sequence_number"] != seq:
                    continue
                if header.get("error") is not None:
                    raise header["error"]
                # The end: a dump's DONE, or the ACK (an error message with error 0).
                if header["type"] in (nl.NLMSG_DONE, nl.NLMSG_ERROR):
                    return out
                out.append(reply)


@functools.cache
def genl_family_id(name: str) -> int:
    """The id the kernel gave a generic netlink family (fixed while the kernel runs)."""
    msg = nl.ctrlmsg()
    msg["cmd"] = nl.CTRL_CMD_GETFAMILY
    msg["version"] = 1
    msg["attrs"].append(["CTRL_ATTR_FAMILY_NAME", name])
    (reply,) = request(nl.NETLINK_GENERIC, msg, nl.GENL_ID_CTRL, 0,
                       {nl.GENL_ID_CTRL: nl.ctrlmsg})
    return reply.get_attr("CTRL_ATTR_FAMILY_ID")


def parse_page_pool(msg: nla) -> tuple[int, KernelPoolView]:
    """(pool id, the kernel's figures) from one page-pool-get reply."""
    pool_id = _uint(msg.get_attr("NETDEV_A_PAGE_POOL_ID"))
    if pool_id is None:
        raise ValueError("page-pool-get reply without NETDEV_A_PAGE_POOL_ID")
    return pool_id, KernelPoolView(
        inflight_pages=_uint(msg.get_attr("NETDEV_A_PAGE_POOL_INFLIGHT")),
        inflight_bytes=_uint(msg.get_attr("NETDEV_A_PAGE_POOL_INFLIGHT_MEM")),
        detach_time_s=_uint(msg.get_attr("NETDEV_A_PAGE_POOL_DETACH_TIME")),
        dmabuf_id=msg.get_attr("NETDEV_A_PAGE_POOL_DMABUF"),
    )


def dump_page_pools() -> dict[int, KernelPoolView]:
    """Every pool the kernel lists in the caller's netns, by pool id."""
    family = genl_family_id(NETDEV_FAMILY)
    req = page_pool_msg()
    req["cmd"] = NETDEV_CMD_PAGE_POOL_GET
    req["version"] = 1
    replies = request(nl.NETLINK_GENERIC, req, family, nl.NLM_F_DUMP,
                      {family: page_pool_msg})
    return dict(parse_page_pool(m) for m in replies)


def link_names(sock: socket.socket | None = None) -> dict[int, str]:
    """ifindex -> netdev name of every link in the calling thread's netns, or in the netns
    of `sock` (an rtnetlink socket; closed after use)."""
    req = link_msg()
    req["family"] = socket.AF_UNSPEC
    replies = request(nl.NETLINK_ROUTE, req, RTM_GETLINK, nl.NLM_F_DUMP,
                      {RTM_NEWLINK: link_msg}, sock)
    return {m["index"]: m.get_attr("IFLA_IFNAME") for m in replies}
