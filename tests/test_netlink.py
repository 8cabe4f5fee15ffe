"""The netdev page-pool-get parser, on replies built per Documentation/netlink/specs/
netdev.yaml, and the live dump (this kernel lists no pool for veth: an empty dict)."""

from __future__ import annotations

import struct

import pytest

from netmemtrace.collect import netlink
from netmemtrace.snapshot import KernelPoolView


def _reply(attrs: list[tuple[int, bytes]]) -> netlink.page_pool_msg:
    """A page-pool-get reply as the kernel sends it: genl header then raw NLAs."""
    body = b""
    for attr_type, payload in attrs:
        nla = struct.pack("<HH", 4 + len(payload), attr_type) + payload
        body += nla + b"\0" * (-len(nla) % 4)
    genl = struct.pack("<BBH", netlink.NETDEV_CMD_PAGE_POOL_GET, 1, 0)
    data = struct.pack("<IHHII", 16 + len(genl) + len(body), 0x20, 0, 1, 0) + genl + body
    msg = netlink.page_pool_msg(data)
    msg.decode()
    return msg


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def test_parse_full_reply() -> None:
    # ID, IFINDEX, NAPI_ID, INFLIGHT (uint as u32), INFLIGHT_MEM (uint as u64), DETACH_TIME
    msg = _reply([(1, u32(7)), (2, u32(3)), (3, u32(8193)), (4, u32(512)),
                  (5, u64(2 * 1024 * 1024)), (6, u64(1700000000)), (7, u32(4))])
    assert netlink.parse_page_pool(msg) == (7, KernelPoolView(
        inflight_pages=512, inflight_bytes=2 * 1024 * 1024, detach_time_s=1700000000,
        dmabuf_id=4))


def test_parse_minimal_reply_keeps_absent_as_none() -> None:
    msg = _reply([(1, u64(2**33))])
    pool_id, view = netlink.parse_page_pool(msg)
    assert pool_id == 2**33
    assert view == KernelPoolView(None, None, None, None)


def test_reply_without_id_is_rejected() -> None:
    with pytest.raises(ValueError):
        netlink.parse_page_pool(_reply([(4, u32(1))]))


@pytest.mark.live
def test_live_dump_is_a_dict() -> None:
    pools = netlink.dump_page_pools()
    assert isinstance(pools, dict)
    assert all(isinstance(v, KernelPoolView) for v in pools.values())
