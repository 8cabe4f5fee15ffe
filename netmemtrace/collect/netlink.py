"""The kernel's own page pool list: the `netdev` generic netlink family (page-pool-get dump,
Documentation/netlink/specs/netdev.yaml), read with pyroute2.

Only pools whose netdev is registered appear (veth and other pools without slow.netdev do
not); a missing family (kernel < 6.8) or a failed dump is reported, not hidden.
"""

from __future__ import annotations

from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST, genlmsg, nla
from pyroute2.netlink.generic import GenericNetlinkSocket

from ..snapshot import KernelPoolView

NETDEV_FAMILY = "netdev"
NETDEV_CMD_PAGE_POOL_GET = 5


def _uint(value: bytes | None) -> int | None:
    # Spec type "uint": 4 or 8 bytes depending on the value (NLA_UINT), host byte order.
    return int.from_bytes(value, "little") if value is not None else None


class page_pool_msg(genlmsg):  # noqa: N801 (pyroute2 naming convention)
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
    with GenericNetlinkSocket() as sock:
        sock.bind(NETDEV_FAMILY, page_pool_msg)
        req = page_pool_msg()
        req["cmd"] = NETDEV_CMD_PAGE_POOL_GET
        req["version"] = 1
        replies = sock.nlm_request(req, msg_type=sock.prid,
                                   msg_flags=NLM_F_REQUEST | NLM_F_DUMP)
        return dict(parse_page_pool(m) for m in replies)
