"""The netdev page-pool-get parser, on replies built per Documentation/netlink/specs/
netdev.yaml, and the live dump (this kernel lists no pool for veth: an empty dict)."""

from __future__ import annotations

import os
import struct

import pytest
from conftest import kernel_version

from netmemtrace.host import netlink
from netmemtrace.snapshot import KernelPoolView, RecycleStats


def _nlas(attrs: list[tuple[int, bytes]]) -> bytes:
    body = b""
    for attr_type, payload in attrs:
        nla = struct.pack("<HH", 4 + len(payload), attr_type) + payload
        body += nla + b"\0" * (-len(nla) % 4)
    return body


def _reply(attrs: list[tuple[int, bytes]], cls: type = netlink.page_pool_msg,
           cmd: int = netlink.NETDEV_CMD_PAGE_POOL_GET):
    """A netdev family reply as the kernel sends it: genl header then raw NLAs."""
    body = _nlas(attrs)
    genl = struct.pack("<BBH", cmd, 1, 0)
    data = struct.pack("<IHHII", 16 + len(genl) + len(body), 0x20, 0, 1, 0) + genl + body
    msg = cls(data)
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
        dmabuf_id=4, ifindex=3, napi_id=8193))


def test_parse_minimal_reply_keeps_absent_as_none() -> None:
    msg = _reply([(1, u64(2**33))])
    pool_id, view = netlink.parse_page_pool(msg)
    assert pool_id == 2**33
    assert view == KernelPoolView(None, None, None, None)


def test_parse_stats_reply_with_nested_pool_info() -> None:
    # NETDEV_A_PAGE_POOL_STATS_INFO (1) nests the pool's ID (1) and IFINDEX (2); the
    # counters are attributes 8..18, uint (u32 or u64 by value).
    info = _nlas([(1, u32(4)), (2, u32(2))])
    counters = [(n, u64(1000 + n) if n % 2 else u32(n)) for n in range(8, 19)]
    msg = _reply([(1 | 0x8000, info), *counters], netlink.page_pool_stats_msg,
                 netlink.NETDEV_CMD_PAGE_POOL_STATS_GET)
    pool_id, stats = netlink.parse_page_pool_stats(msg)
    assert pool_id == 4
    assert stats == RecycleStats(
        alloc_fast=8, alloc_slow=1009, alloc_slow_high_order=10, alloc_empty=1011,
        alloc_refill=12, alloc_waive=1013, recycle_cached=14, recycle_cache_full=1015,
        recycle_ring=16, recycle_ring_full=1017, recycle_released_refcnt=18)


def test_parse_napi_reply() -> None:
    msg = _reply([(1, u32(5)), (2, u32(8200))], netlink.napi_msg, netlink.NETDEV_CMD_NAPI_GET)
    assert (msg.get_attr("NETDEV_A_NAPI_ID"), msg.get_attr("NETDEV_A_NAPI_IFINDEX")) == \
        (8200, 5)


def test_reparented_pool_has_no_ifindex() -> None:
    # A pool the kernel moved to loopback is sent without IFINDEX (page_pool_nl_fill).
    _, view = netlink.parse_page_pool(_reply([(1, u32(3)), (3, u32(8193)), (4, u32(192))]))
    assert (view.ifindex, view.napi_id, view.inflight_pages) == (None, 8193, 192)


def test_reply_without_id_is_rejected() -> None:
    with pytest.raises(ValueError):
        netlink.parse_page_pool(_reply([(4, u32(1))]))


@pytest.mark.xfail(kernel_version() < (6, 8), strict=True,
                   reason=f"kernel {os.uname().release}: page-pool-get of the netdev netlink "
                          "family is 6.8+; the reader must fail there")
@pytest.mark.live
def test_live_dump_is_a_dict() -> None:
    pools = netlink.dump_page_pools()
    assert isinstance(pools, dict)
    assert all(isinstance(v, KernelPoolView) for v in pools.values())
