"""Built-in demo workload that makes the kernel's page_pool do real work.

A veth device only receives through NAPI, and therefore through a page_pool, once a native XDP
program is attached to it. The demo builds two network namespaces joined by a veth pair,
attaches an XDP_PASS program to the receiving end and pushes TCP through it: received frames
then land in page_pool pages, which the pool takes from the page allocator in bulks of 64 and
mostly recycles afterwards (page_pool:page_pool_state_hold/release), and deleting the veth
destroys the pool (page_pool:page_pool_release).

Everything is created inside namespaces made here, so the host's own interfaces, addresses and
routes are never touched, and deleting the namespaces removes every trace of the demo.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Self

XDP_OBJECT = pathlib.Path(__file__).parent.parent / "bpfobj" / "xdp_pass.bpf.o"
_PEER_SCRIPT = pathlib.Path(__file__).with_name("_demo_peer.py")
# Upper bound for one transfer or hold setup; a healthy veth moves gigabytes in that time.
_TRANSFER_TIMEOUT = 60.0
_IP_TIMEOUT = 10.0
# Size of one demo transfer: large enough that process start-up is a small share of the time,
# small enough (about half a second here) that a stop request is honoured promptly.
_DEMO_CHUNK = 256 << 20
_topology_ids = itertools.count()


class DemoError(Exception):
    """The demo topology or workload could not be set up or did not complete."""


def _ip(*args: str) -> str:
    cmd = ["ip", *args]
    try:
        done = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=_IP_TIMEOUT)
    except FileNotFoundError:
        raise DemoError("`ip` (iproute2) is not installed") from None
    except subprocess.CalledProcessError as exc:
        raise DemoError(f"`{' '.join(cmd)}` failed: {exc.stderr.strip()}") from None
    except subprocess.TimeoutExpired:
        raise DemoError(f"`{' '.join(cmd)}` timed out after {_IP_TIMEOUT:.0f} s") from None
    return done.stdout


class _ClosedOnExit:
    """`with` support for the demo's resources: leaving the block calls close()."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


class VethTopology(_ClosedOnExit):
    """Two fresh network namespaces joined by a veth pair, native XDP on the receiving end.

    Traffic from ``tx_addr`` (in ``tx_netns`` on ``tx_dev``) to ``rx_addr`` (in ``rx_netns`` on
    ``rx_dev``) is received through the rx veth's page_pool.
    """

    def __init__(self) -> None:
        if not XDP_OBJECT.is_file():
            raise DemoError(f"XDP object not built ({XDP_OBJECT} missing): run `make build`")
        n = next(_topology_ids)
        pid = os.getpid()
        self.tx_netns = f"nmt-tx-{pid}-{n}"
        self.rx_netns = f"nmt-rx-{pid}-{n}"
        # Interface names are limited to 15 characters: hex pid (at most 6 digits) plus a
        # 4-digit hex counter keeps them at 14 and still recognisable in traces.
        self.tx_dev = f"nmt{pid:x}t{n % 0x10000:x}"
        self.rx_dev = f"nmt{pid:x}r{n % 0x10000:x}"
        self.tx_addr = f"10.199.{n % 256}.1"
        self.rx_addr = f"10.199.{n % 256}.2"
        self._netns: list[str] = []  # namespaces created so far, for close()
        self._has_link = False
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def _create(self) -> None:
        for netns in (self.tx_netns, self.rx_netns):
            _ip("netns", "add", netns)
            self._netns.append(netns)
        # Both ends are created directly inside their namespaces: the host namespace never
        # sees them, so they cannot clash with, or be left behind among, host interfaces.
        _ip(
            "link", "add", self.tx_dev, "netns", self.tx_netns, "type", "veth",
            "peer", "name", self.rx_dev, "netns", self.rx_netns,
        )  # fmt: skip
        self._has_link = True
        for netns, dev, addr in (
            (self.tx_netns, self.tx_dev, self.tx_addr),
            (self.rx_netns, self.rx_dev, self.rx_addr),
        ):
            _ip("-n", netns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", netns, "link", "set", "dev", dev, "up")
        # "xdpdrv" rather than "xdp": fail instead of silently falling back to generic XDP,
        # which runs on the skb and never touches the veth page_pool.
        _ip(
            "-n", self.rx_netns, "link", "set", "dev", self.rx_dev,
            "xdpdrv", "obj", str(XDP_OBJECT), "sec", "xdp",
        )  # fmt: skip

    def rx_ifindex(self) -> int:
        """ifindex of ``rx_dev`` inside ``rx_netns`` (the page_pool's device)."""
        links = json.loads(_ip("-n", self.rx_netns, "-j", "link", "show", "dev", self.rx_dev))
        return int(links[0]["ifindex"])

    def delete_link(self) -> None:
        """Delete the veth pair, which destroys the rx page_pool; the namespaces stay."""
        if self._has_link:
            _ip("-n", self.rx_netns, "link", "del", "dev", self.rx_dev)
            self._has_link = False

    def close(self) -> None:
        """Remove everything created so far; idempotent."""
        try:
            # Deleting the namespaces would destroy the veth too, but asynchronously in a
            # kernel workqueue; deleting it first means the pool is gone once close() returns.
            self.delete_link()
        finally:
            while self._netns:
                _ip("netns", "del", self._netns.pop())


def _spawn_peer(netns: str, *args: object) -> subprocess.Popen[bytes]:
    # -I (isolated mode) keeps the environment and the script's own directory, which holds
    # netmemtrace's modules, out of the peer's import path. `ip netns exec` execs the command,
    # so the Popen pid is the peer's pid. Unbuffered pipes make select() on stdout reliable.
    cmd = ["ip", "netns", "exec", netns, sys.executable, "-I", str(_PEER_SCRIPT)]
    return subprocess.Popen(
        [*cmd, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
    )


def _peer_failure(proc: subprocess.Popen[bytes], what: str) -> DemoError:
    command = " ".join(map(str, proc.args))
    if proc.poll() is None or proc.stderr is None:
        return DemoError(f"demo peer `{command}` {what}")
    stderr = proc.stderr.read().decode(errors="replace").strip()
    return DemoError(f"demo peer `{command}` exited with {proc.returncode}: {stderr}")


def _read_line(proc: subprocess.Popen[bytes], deadline: float) -> str:
    """Read one line the peer reports on stdout, waiting until ``deadline`` at most."""
    assert proc.stdout is not None
    # Byte by byte, so nothing the peer reports later is consumed together with this line.
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([proc.stdout], [], [], remaining)[0]:
            raise _peer_failure(proc, f"timed out after {_TRANSFER_TIMEOUT:.0f} s")
        byte = proc.stdout.read(1)
        if not byte:
            proc.wait()
            raise _peer_failure(proc, "closed stdout")
        line += byte
    return line.decode().strip()


def _wait_ok(proc: subprocess.Popen[bytes], deadline: float) -> None:
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise _peer_failure(proc, f"timed out after {_TRANSFER_TIMEOUT:.0f} s") from None
    if proc.returncode != 0:
        raise _peer_failure(proc, "failed")


def _reap(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def tcp_stream(topo: VethTopology, nbytes: int, port: int = 0) -> int:
    """Send exactly ``nbytes`` over TCP from tx to rx; return the bytes the receiver read.

    ``port`` 0 lets the kernel pick the listening port. Raises DemoError if the transfer fails
    or does not finish within 60 s.
    """
    deadline = time.monotonic() + _TRANSFER_TIMEOUT
    procs = [_spawn_peer(topo.rx_netns, "receive", topo.rx_addr, port)]
    try:
        port = int(_read_line(procs[0], deadline))
        procs.append(_spawn_peer(topo.tx_netns, "send", topo.rx_addr, port, nbytes))
        _wait_ok(procs[1], deadline)
        return int(_read_line(procs[0], deadline))
    finally:
        _reap(procs)


class HeldConnection(_ClosedOnExit):
    """A TCP connection whose receiver never reads, so its receive queue keeps holding the
    page_pool pages the data arrived in, until close() kills both endpoints."""

    def __init__(
        self, receiver: subprocess.Popen[bytes], sender: subprocess.Popen[bytes], held: int
    ) -> None:
        self._procs = [receiver, sender]
        self.receiver_pid = receiver.pid
        self.sender_pid = sender.pid
        self.held_bytes = held  # acknowledged by the receiver, hence sitting in its queue

    def close(self) -> None:
        _reap(self._procs)


def hold_unread(topo: VethTopology, nbytes: int, port: int = 0) -> HeldConnection:
    """Open a connection tx -> rx, queue up to ``nbytes`` at a receiver that never reads.

    The sender writes what fits without blocking for long and waits until the receiver has
    acknowledged it; ``held_bytes`` of the result says how much the receiver queue holds.
    """
    deadline = time.monotonic() + _TRANSFER_TIMEOUT
    procs = [_spawn_peer(topo.rx_netns, "hold", topo.rx_addr, port)]
    try:
        port = int(_read_line(procs[0], deadline))
        procs.append(_spawn_peer(topo.tx_netns, "fill", topo.rx_addr, port, nbytes))
        _read_line(procs[0], deadline)  # "accepted": the socket now belongs to the receiver
        held = int(_read_line(procs[1], deadline))
    except BaseException:
        _reap(procs)
        raise
    return HeldConnection(procs[0], procs[1], held)


def run_demo(duration: float, stop: threading.Event | None = None) -> None:
    """Push TCP through a fresh veth/XDP topology for ``duration`` seconds or until ``stop``.

    Everything is removed on return, including on Ctrl-C and SIGTERM.
    """
    stop = stop or threading.Event()
    # SIGTERM only sets ``stop`` instead of raising: an exception raised from the handler could
    # interrupt close() halfway and leave namespaces behind, while a demo chunk takes about
    # half a second, so stopping stays prompt. Handlers can only be set in the main thread.
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        previous = signal.signal(signal.SIGTERM, lambda _sig, _frame: stop.set())
    received = 0
    try:
        with VethTopology() as topo:
            print(
                f"netmemtrace demo: TCP {topo.tx_addr} ({topo.tx_netns}/{topo.tx_dev}) -> "
                f"{topo.rx_addr} ({topo.rx_netns}/{topo.rx_dev}, native XDP_PASS attached, "
                f"page_pool active) for {duration:g} s; Ctrl-C stops",
                file=sys.stderr,
            )
            end = time.monotonic() + duration
            while not stop.is_set() and time.monotonic() < end:
                received += tcp_stream(topo, _DEMO_CHUNK)
    finally:
        if in_main_thread:
            # None means a handler installed outside Python; the default is the best stand-in.
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    print(
        f"netmemtrace demo: received {received / 2**20:.0f} MiB, topology removed",
        file=sys.stderr,
    )
