"""Devmem TCP syscalls on ordinary sockets, for netmemtrace's live tests.

No NIC here can bind a dmabuf, so these are the calls an application makes against sockets
without devmem memory: recvmsg(MSG_SOCK_DEVMEM) gets plain data (or EAGAIN) and no
SCM_DEVMEM_DMABUF cmsg, setsockopt(SO_DEVMEM_DONTNEED) frees no token and fails on bad
input. The workload records what the kernel answered to every call and prints it as one
JSON line: the ground truth the tool's counts are checked against.

    python devmem_calls.py            # run the calls, print {"pid": ..., "tcp": ..., ...}
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import struct
import sys

# include/uapi/asm-generic/socket.h and linux/socket.h (x86, arm64, and most others)
SCM_DEVMEM_DMABUF = 79
SO_DEVMEM_DONTNEED = 80
MSG_SOCK_DEVMEM = 0x2000000
DMABUF_TOKEN = struct.Struct("II")    # struct dmabuf_token { token_start, token_count }

_libc = ctypes.CDLL(None, use_errno=True)


def dontneed(sock: socket.socket, optval: bytes) -> dict[str, int]:
    """setsockopt(SO_DEVMEM_DONTNEED) through libc: Python's wrapper drops the return
    value, which is the number of tokens freed."""
    buf = ctypes.create_string_buffer(optval, len(optval))
    ret = _libc.setsockopt(sock.fileno(), socket.SOL_SOCKET, SO_DEVMEM_DONTNEED, buf,
                           len(optval))
    return {"ret": ret, "errno": ctypes.get_errno() if ret < 0 else 0}


def recvmsg_devmem(sock: socket.socket) -> dict[str, int]:
    try:
        data, anc, _flags, _addr = sock.recvmsg(65536, 4096, MSG_SOCK_DEVMEM)
    except OSError as exc:
        return {"ret": -1, "errno": exc.errno or 0, "tokens": 0}
    tokens = sum(1 for level, kind, _ in anc
                 if level == socket.SOL_SOCKET and kind == SCM_DEVMEM_DMABUF)
    return {"ret": len(data), "errno": 0, "tokens": tokens}


def main() -> int:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        client = socket.create_connection(srv.getsockname())
        server, _ = srv.accept()
    client.sendall(b"x" * 1000)
    got = b""
    while len(got) < 1000:  # a plain read first, so the devmem reads below find no data
        got += server.recv(1000 - len(got))
    client.sendall(b"y" * 500)
    recv = [recvmsg_devmem(server)]           # data, no dmabuf token: plain pages
    server.setblocking(False)
    recv.append(recvmsg_devmem(server))       # nothing queued: EAGAIN
    tcp = [
        dontneed(server, DMABUF_TOKEN.pack(0, 1)),   # a token never handed out: 0 freed
        dontneed(server, DMABUF_TOKEN.pack(5, 3)),
        dontneed(server, b"\0" * 7),                 # not a whole dmabuf_token: EINVAL
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp_calls = [dontneed(udp, DMABUF_TOKEN.pack(0, 1))]  # not TCP: EBADF
    server.close()
    client.close()
    assert recv[1]["errno"] == errno.EAGAIN, recv
    print(json.dumps({"pid": os.getpid(), "recvmsg": recv, "dontneed": tcp,
                      "udp_dontneed": udp_calls}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
