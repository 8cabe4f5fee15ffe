"""A minimal generic netlink client for tests, independent of netmemtrace's reader (no
pyroute2, no netmemtrace import): the ground truth the live tests compare the tool with.
Run as a script inside a netns (nsenter --net=PATH python3 genl_client.py) it prints that
netns' page-pool-get, page-pool-stats-get and napi-get dumps as JSON.

Attribute numbers: include/uapi/linux/netdev.h (Documentation/netlink/specs/netdev.yaml)."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import subprocess
import sys

NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY, CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 3, 1, 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
CMD_PAGE_POOL_GET, CMD_PAGE_POOL_STATS_GET, CMD_NAPI_GET = 5, 9, 11
POOL_ATTRS = {1: "id", 2: "ifindex", 3: "napi_id", 4: "inflight", 5: "inflight_mem",
              6: "detach_time", 7: "dmabuf"}
STATS_ATTRS = {8: "alloc_fast", 9: "alloc_slow", 10: "alloc_slow_high_order",
               11: "alloc_empty", 12: "alloc_refill", 13: "alloc_waive", 14: "recycle_cached",
               15: "recycle_cache_full", 16: "recycle_ring", 17: "recycle_ring_full",
               18: "recycle_released_refcnt"}
NAPI_ATTRS = {1: "ifindex", 2: "id"}


def attrs(data: bytes) -> dict[int, bytes]:
    out, off = {}, 0
    while off + 4 <= len(data):
        length, kind = struct.unpack_from("<HH", data, off)
        out[kind & 0x3FFF] = data[off + 4:off + length]
        off += (length + 3) & ~3
    return out


def number(raw: bytes) -> int:
    return int.from_bytes(raw, "little")


def transact(sock: socket.socket, msg_type: int, flags: int, cmd: int, payload: bytes
             ) -> list[bytes]:
    """One request; the genl payloads (after the 4-byte genl header) of every reply."""
    body = struct.pack("<BBH", cmd, 1, 0) + payload
    sock.send(struct.pack("<IHHII", 16 + len(body), msg_type, flags | NLM_F_REQUEST, 1, 0)
              + body)
    out = []
    while True:
        data = sock.recv(1 << 16)
        off = 0
        while off < len(data):
            length, kind = struct.unpack_from("<IH", data, off)
            if kind == NLMSG_DONE:
                return out
            if kind == NLMSG_ERROR:
                (err,) = struct.unpack_from("<i", data, off + 16)
                if err:
                    raise OSError(-err, os.strerror(-err))
                return out
            out.append(data[off + 20:off + length])
            off += (length + 3) & ~3
        if not flags & NLM_F_DUMP:
            return out


def family_id(sock: socket.socket, name: str) -> int:
    nm = name.encode() + b"\0"
    attr = struct.pack("<HH", 4 + len(nm), CTRL_ATTR_FAMILY_NAME) + nm
    attr += b"\0" * (-len(attr) % 4)
    (reply,) = transact(sock, GENL_ID_CTRL, 0, CTRL_CMD_GETFAMILY, attr)
    return number(attrs(reply)[CTRL_ATTR_FAMILY_ID])


def dump_netns() -> dict:
    """This netns: {"pools": {id: {...}}, "stats": {id: {...}} or an error, "napis":
    {napi id: ifindex}, "links": {ifindex: name}}."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC) as sock:
        fam = family_id(sock, "netdev")
        pools = {}
        for reply in transact(sock, fam, NLM_F_DUMP, CMD_PAGE_POOL_GET, b""):
            a = attrs(reply)
            pools[number(a[1])] = {name: number(a[k]) for k, name in POOL_ATTRS.items()
                                   if k in a}
        stats: dict | str = {}
        try:
            for reply in transact(sock, fam, NLM_F_DUMP, CMD_PAGE_POOL_STATS_GET, b""):
                a = attrs(reply)
                info = attrs(a[1])
                stats[number(info[1])] = {name: number(a[k]) if k in a else 0
                                          for k, name in STATS_ATTRS.items()}
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise
            stats = "EOPNOTSUPP"
        napis = {}
        for reply in transact(sock, fam, NLM_F_DUMP, CMD_NAPI_GET, b""):
            a = attrs(reply)
            if 1 in a and 2 in a:
                napis[number(a[2])] = number(a[1])
    # iproute2 asks this netns (/sys/class/net would show the netns that mounted /sys).
    links = {link["ifindex"]: link["ifname"] for link in json.loads(subprocess.run(
        ["ip", "-j", "link", "show"], check=True, capture_output=True, text=True).stdout)}
    return {"pools": pools, "stats": stats, "napis": napis, "links": links}


if __name__ == "__main__":
    json.dump(dump_netns(), sys.stdout)
