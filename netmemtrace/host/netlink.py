"""The netlink requests netmemtrace makes, with pyroute2's message classes:

- the kernel's own page pool view: the `netdev` generic netlink family
  (Documentation/netlink/specs/netdev.yaml): page-pool-get (inflight, ifindex, NAPI id,
  detach time), page-pool-stats-get (the recycling counters, CONFIG_PAGE_POOL_STATS) and
  napi-get (NAPI id -> ifindex, 6.9+). Each dump answers for one network namespace only: the
  one the socket was made in. Only pools whose netdev is registered appear (veth and other
  pools without slow.netdev do not); a pool whose netdev unregistered (also: moved to
  another netns) is listed on the loopback of the netns it was in, without an ifindex. A
  missing family (kernel < 6.8), command or config is reported, not hidden.
- the netdev names of a network namespace (rtnetlink RTM_GETLINK dump).

pyroute2 encodes the requests and decodes the replies; they travel on a plain AF_NETLINK
socket, because every socket class of pyroute2 0.9 runs an asyncio loop (9 MB of RSS).
Only the pyroute2 submodules used are imported (host/pyroute2_lean.py).
"""

from __future__ import annotations

import errno
import functools
import itertools
import socket
from dataclasses import dataclass, replace

from netmemtrace.host.pyroute2_lean import import_submodule
from netmemtrace.snapshot import KernelPoolView, RecycleStats, Unavailable

nl = import_submodule("pyroute2.netlink")
try:
    Marshal = import_submodule("pyroute2.netlink.marshal").Marshal
except ImportError:  # pyroute2 0.7 kept it in nlsocket (threads then, no asyncio)
    Marshal = import_submodule("pyroute2.netlink.nlsocket").Marshal
nla = nl.nla

NETDEV_FAMILY = "netdev"
NETDEV_CMD_PAGE_POOL_GET = 5
NETDEV_CMD_PAGE_POOL_STATS_GET = 9
NETDEV_CMD_NAPI_GET = 11
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


# page-pool-stats-get reply attributes 8.. (netdev.yaml page-pool-stats), in RecycleStats
# field order; the reply's attribute 1 nests the pool's id and ifindex.
STATS_ATTRS = (
    (8, "alloc_fast"), (9, "alloc_slow"), (10, "alloc_slow_high_order"), (11, "alloc_empty"),
    (12, "alloc_refill"), (13, "alloc_waive"), (14, "recycle_cached"),
    (15, "recycle_cache_full"), (16, "recycle_ring"), (17, "recycle_ring_full"),
    (18, "recycle_released_refcnt"),
)


class page_pool_stats_msg(nl.genlmsg):  # noqa: N801
    prefix = "NETDEV_A_PAGE_POOL_STATS_"
    nla_map = ((1, "NETDEV_A_PAGE_POOL_STATS_INFO", "info"),
               *((n, f"NETDEV_A_PAGE_POOL_STATS_{name.upper()}", "cdata")
                 for n, name in STATS_ATTRS))

    class info(nla):  # noqa: N801
        nla_map = (
            (1, "NETDEV_A_PAGE_POOL_ID", "cdata"),
            (2, "NETDEV_A_PAGE_POOL_IFINDEX", "uint32"),
        )


class napi_msg(nl.genlmsg):  # noqa: N801
    prefix = "NETDEV_A_NAPI_"
    nla_map = (
        (1, "NETDEV_A_NAPI_IFINDEX", "uint32"),
        (2, "NETDEV_A_NAPI_ID", "uint32"),
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
    sock: a netlink socket of `protocol` to use (one made in another netns; the caller
    keeps and closes it), else a new one in ours. A netlink error is raised (pyroute2's
    NetlinkError, with the errno)."""
    if sock is None:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                           protocol) as own:
            return request(protocol, msg, msg_type, flags, replies, own)
    seq = next(_seq)
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = flags | nl.NLM_F_REQUEST | nl.NLM_F_ACK
    msg["header"]["sequence_number"] = seq
    msg.encode()
    marshal = Marshal()
    marshal.msg_map = dict(replies)
    out: list[nl.nlmsg] = []
    # Unbound: the first send binds it (netlink autobind), so a kept socket is reused as is.
    sock.sendto(msg.data, (0, 0))
    while True:
        for reply in marshal.parse(sock.recv(_RECV_BYTES)):
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
    """The id the kernel gave a generic netlink family (fixed while the kernel runs, the
    same in every netns)."""
    msg = nl.ctrlmsg()
    msg["cmd"] = nl.CTRL_CMD_GETFAMILY
    msg["version"] = 1
    msg["attrs"].append(["CTRL_ATTR_FAMILY_NAME", name])
    (reply,) = request(nl.NETLINK_GENERIC, msg, nl.GENL_ID_CTRL, 0,
                       {nl.GENL_ID_CTRL: nl.ctrlmsg})
    return reply.get_attr("CTRL_ATTR_FAMILY_ID")


def parse_page_pool(msg: nla) -> tuple[int, KernelPoolView]:
    """(pool id, the kernel's figures) from one page-pool-get reply. No IFINDEX: the pool is
    listed on the netns' loopback (its netdev unregistered or left the netns)."""
    pool_id = _uint(msg.get_attr("NETDEV_A_PAGE_POOL_ID"))
    if pool_id is None:
        raise ValueError("page-pool-get reply without NETDEV_A_PAGE_POOL_ID")
    return pool_id, KernelPoolView(
        inflight_pages=_uint(msg.get_attr("NETDEV_A_PAGE_POOL_INFLIGHT")),
        inflight_bytes=_uint(msg.get_attr("NETDEV_A_PAGE_POOL_INFLIGHT_MEM")),
        detach_time_s=_uint(msg.get_attr("NETDEV_A_PAGE_POOL_DETACH_TIME")),
        dmabuf_id=msg.get_attr("NETDEV_A_PAGE_POOL_DMABUF"),
        ifindex=msg.get_attr("NETDEV_A_PAGE_POOL_IFINDEX"),
        napi_id=_uint(msg.get_attr("NETDEV_A_PAGE_POOL_NAPI_ID")),
        io_uring=msg.get_attr("NETDEV_A_PAGE_POOL_IO_URING") is not None,
    )


def parse_page_pool_stats(msg: nla) -> tuple[int, RecycleStats]:
    """(pool id, its recycling counters) from one page-pool-stats-get reply."""
    info = msg.get_attr("NETDEV_A_PAGE_POOL_STATS_INFO")
    pool_id = _uint(info.get_attr("NETDEV_A_PAGE_POOL_ID")) if info is not None else None
    if pool_id is None:
        raise ValueError("page-pool-stats-get reply without the pool's id")
    return pool_id, RecycleStats(**{
        name: _uint(msg.get_attr(f"NETDEV_A_PAGE_POOL_STATS_{name.upper()}")) or 0
        for _, name in STATS_ATTRS})


def _dump(cmd: int, reply: type, sock: socket.socket | None) -> list[nl.nlmsg]:
    family = genl_family_id(NETDEV_FAMILY)
    req = reply()
    req["cmd"] = cmd
    req["version"] = 1
    return request(nl.NETLINK_GENERIC, req, family, nl.NLM_F_DUMP, {family: reply}, sock)


def dump_page_pools(sock: socket.socket | None = None) -> dict[int, KernelPoolView]:
    """Every pool the kernel lists in the netns of sock (a NETLINK_GENERIC socket; None:
    ours), by pool id."""
    return dict(parse_page_pool(m) for m in _dump(NETDEV_CMD_PAGE_POOL_GET, page_pool_msg,
                                                  sock))


def dump_page_pool_stats(sock: socket.socket | None = None
                         ) -> dict[int, RecycleStats] | Unavailable:
    """The recycling counters of every pool listed in the netns of sock, by pool id;
    Unavailable when the kernel was built without CONFIG_PAGE_POOL_STATS."""
    try:
        replies = _dump(NETDEV_CMD_PAGE_POOL_STATS_GET, page_pool_stats_msg, sock)
    except nl.NetlinkError as exc:
        if exc.code == errno.EOPNOTSUPP:
            return Unavailable("kernel built without CONFIG_PAGE_POOL_STATS "
                               "(page-pool-stats-get: EOPNOTSUPP)")
        raise
    return dict(parse_page_pool_stats(m) for m in replies)


def dump_napis(sock: socket.socket | None = None) -> dict[int, int]:
    """NAPI id -> ifindex of every NAPI instance in the netns of sock (napi-get, 6.9+)."""
    out = {}
    for m in _dump(NETDEV_CMD_NAPI_GET, napi_msg, sock):
        napi_id, ifindex = m.get_attr("NETDEV_A_NAPI_ID"), m.get_attr("NETDEV_A_NAPI_IFINDEX")
        if napi_id and ifindex:
            out[napi_id] = ifindex
    return out


def link_names(sock: socket.socket | None = None) -> dict[int, str]:
    """ifindex -> netdev name of every link in the calling thread's netns, or in the netns
    of `sock` (an rtnetlink socket)."""
    req = link_msg()
    req["family"] = socket.AF_UNSPEC
    replies = request(nl.NETLINK_ROUTE, req, RTM_GETLINK, nl.NLM_F_DUMP,
                      {RTM_NEWLINK: link_msg}, sock)
    return {m["index"]: m.get_attr("IFLA_IFNAME") for m in replies}


# ---- the kernel's view in every network namespace ----

@dataclass(frozen=True)
class NetnsView:
    """What the netdev family and rtnetlink say inside one network namespace."""

    label: str                                  # "host", an `ip netns` name, "net:[ino]"
    pools: dict[int, KernelPoolView]            # pool id -> figures (stats included)
    napis: dict[int, int] | Unavailable         # NAPI id -> ifindex
    links: dict[int, str]                       # ifindex -> name


@dataclass(frozen=True)
class KernelView:
    """The kernel's own page pool view over every network namespace entered."""

    netns: tuple[NetnsView, ...]
    failed: tuple[str, ...] = ()                # "netns: reason" not entered or not dumped

    @property
    def pools(self) -> dict[int, KernelPoolView]:
        """Every listed pool by id (ids are global: a pool is listed in one netns only)."""
        return {pid: view for ns in self.netns for pid, view in ns.pools.items()}

    def napi_device(self, napi_id: int) -> tuple[str, int, str | None] | None:
        """(netns label, ifindex, name) of the netdev that owns a NAPI id, if one does."""
        for ns in self.netns:
            if not isinstance(ns.napis, Unavailable) and napi_id in ns.napis:
                ifindex = ns.napis[napi_id]
                return ns.label, ifindex, ns.links.get(ifindex)
        return None


def netns_view(label: str, genl: socket.socket | None, route: socket.socket | None
               ) -> NetnsView:
    """One netns' pools (with their recycling counters), NAPI ids and link names, over
    sockets made in it (None: ours)."""
    pools = dump_page_pools(genl)
    stats: dict[int, RecycleStats] | Unavailable = {}
    if pools:
        stats = dump_page_pool_stats(genl)
    for pool_id, view in pools.items():
        pools[pool_id] = replace(view, netns=label, stats=stats if isinstance(
            stats, Unavailable) else stats.get(pool_id, Unavailable(
                "page-pool-stats-get did not list the pool")))
    napis: dict[int, int] | Unavailable
    try:
        napis = dump_napis(genl)
    except nl.NetlinkError as exc:  # napi-get is 6.9+
        napis = Unavailable(f"netlink napi-get failed: {exc}")
    return NetnsView(label, pools, napis, link_names(route))
