"""TCP endpoints for the demo workload, run inside a network namespace.

``netmemtrace.workload.demo`` starts this file as a script through
``ip netns exec NS python -I FILE ...``
so that each endpoint lives in its own namespace. It therefore only uses the standard library
and never imports ``netmemtrace`` (the package need not be installed for the demo to work).

Protocol with the parent: every endpoint reports on stdout, one line per fact (the listening
port, "accepted", a byte count), flushed at once because the parent waits on these lines.
"""

from __future__ import annotations

import fcntl
import signal
import socket
import struct
import sys
import termios
import time

_CHUNK = 1 << 20
# Bounds how long an endpoint waits for its peer, so a receiver whose parent died does not
# linger forever and keep its network namespace alive.
_PEER_TIMEOUT = 60.0
# How long a filling sender waits for the receive window to open before it concludes that the
# receiver's queue is full.
_FILL_STALL = 0.5
# <asm-generic/socket.h>; the socket module does not export it.
_SO_RCVBUFFORCE = 33


def _report(value: object) -> None:
    print(value, flush=True)


def _accept(addr: str, port: int, rcvbuf: int = 0) -> socket.socket:
    listener = socket.create_server((addr, port))
    if rcvbuf:
        # Set on the listener before any SYN arrives, so the accepted socket inherits it and
        # the window scale negotiated in the handshake can advertise all of it. SO_RCVBUF is
        # capped at net.core.rmem_max, 208 KiB before 6.17 raised its default to 4 MiB: with
        # CAP_NET_ADMIN (the demo runs as root) SO_RCVBUFFORCE is not, so a held queue is the
        # same size on every kernel.
        try:
            listener.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    listener.settimeout(_PEER_TIMEOUT)
    _report(listener.getsockname()[1])
    conn, _ = listener.accept()
    listener.close()
    conn.settimeout(_PEER_TIMEOUT)
    return conn


def receive(addr: str, port: int) -> None:
    """Accept one connection, read it to EOF and report the number of bytes read."""
    total = 0
    buf = bytearray(_CHUNK)
    with _accept(addr, port) as conn:
        while n := conn.recv_into(buf):
            total += n
    _report(total)


def hold(addr: str, port: int) -> None:
    """Accept one connection and never read from it, until killed."""
    # Every ~1.5 KB segment occupies a whole page_pool page, so the default receive buffer
    # fills after some 70 KB; ask for 32 MiB, which the kernel doubles for overhead.
    with _accept(addr, port, rcvbuf=32 << 20):
        _report("accepted")
        signal.pause()


def send(addr: str, port: int, nbytes: int) -> None:
    """Send exactly ``nbytes`` bytes, then close the connection."""
    data = memoryview(bytes(_CHUNK))
    with socket.create_connection((addr, port), timeout=_PEER_TIMEOUT) as conn:
        while nbytes > 0:
            n = min(nbytes, _CHUNK)
            conn.sendall(data[:n])
            nbytes -= n


def _unacked(conn: socket.socket) -> int:
    """Bytes still in our send queue, i.e. not yet acknowledged by the peer (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(conn, termios.TIOCOUTQ, bytes(4)))[0]


def fill(addr: str, port: int, nbytes: int) -> None:
    """Send up to ``nbytes`` bytes without blocking for long, stay connected until killed.

    Reports how many bytes the peer acknowledged: with a peer that never reads, exactly those
    sit in its receive queue, for as long as the connection stays open.
    """
    data = memoryview(bytes(min(nbytes, _CHUNK)))
    sent = 0
    with socket.create_connection((addr, port), timeout=_FILL_STALL) as conn:
        while sent < nbytes:
            try:
                sent += conn.send(data[: min(nbytes - sent, len(data))])
            except TimeoutError:
                break  # the peer's receive window is closed: its queue is full
        # Data still in flight would reach the peer later; wait for it so the report is final.
        deadline = time.monotonic() + _FILL_STALL
        while _unacked(conn) and time.monotonic() < deadline:
            time.sleep(0.01)
        _report(sent - _unacked(conn))
        signal.pause()


_ROLES = {"receive": receive, "hold": hold, "send": send, "fill": fill}


def main(argv: list[str]) -> None:
    """``ROLE ADDR PORT [NBYTES]``; NBYTES only for the sending roles."""
    role, addr, port, *nbytes = argv
    _ROLES[role](addr, int(port), *map(int, nbytes))


if __name__ == "__main__":
    main(sys.argv[1:])
