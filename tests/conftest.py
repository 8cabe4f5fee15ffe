"""Shared fixtures. Live tests (marker `live`) need root, BPF and network namespaces: they
run here and in CI and fail loudly, never skip, when those are missing."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from netmemtrace.kernel import abi, probes

REPO = Path(__file__).resolve().parent.parent
# Inside the kernel matrix's guests (tests/kernels/, QEMU TCG) code runs 6-16x slower than
# here: every wait is stretched by SLOW, and checks of how long something took (TIMINGS)
# are not made at all, as timings under emulation mean nothing.
GUEST = os.environ.get("NETMEMTRACE_GUEST") == "1"
SLOW = 12.0 if GUEST else 1.0
TIMINGS = not GUEST

# Tests end dump windows and demos with SIGINT, as a user's Ctrl-C would. A shell starting a
# run in the background (`nohup ... &`, a CI runner) leaves SIGINT ignored, and an ignored
# signal stays ignored across exec: every tool process would then outlive its window. A
# handled signal is reset to the default on exec, so handling it here gives each child the
# disposition of a foreground run.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def raw_tp_pagepool() -> Iterator[probes.LoadedObject]:
    """pagepool.bpf.o with only its raw_tp programs loaded, unattached, for BPF_PROG_TEST_RUN."""
    lo = probes.load_object("pagepool", str(abi.object_path("pagepool")), force="raw_tp",
                            attach=False)
    yield lo
    lo.close()


def bpf_prog_ids() -> set[int]:
    """Ids of every BPF program loaded in the kernel, per bpftool (independent of us)."""
    import json

    out = subprocess.run(["bpftool", "-j", "prog", "show"], check=True, capture_output=True,
                         text=True).stdout
    return {p["id"] for p in json.loads(out)}


def prog_ids_held_by(pid: int) -> set[int]:
    """Ids of the BPF programs a process holds open (prog_id in /proc/PID/fdinfo): what it
    loaded, told apart from programs of anything else running on the machine."""
    ids = set()
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = info.read_text()
        except OSError:
            continue  # closed meanwhile
        ids.update(int(line.split()[1]) for line in text.splitlines()
                   if line.startswith("prog_id:"))
    return ids


def kernel_version() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int(re.match(r"\d+", minor).group())  # type: ignore[union-attr]


# veth got its page_pool in 6.6 ("veth: use page_pool for XDP/skb"): before, the demo's
# topology makes no page pool at all, and no virtual NIC a guest has does either.
VETH_PAGE_POOL = (6, 6)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if os.geteuid() != 0 and item.get_closest_marker("live"):
            item.add_marker(pytest.mark.xfail(reason="live test needs root", run=True,
                                              strict=True))
        if item.get_closest_marker("veth_page_pool") and kernel_version() < VETH_PAGE_POOL:
            item.add_marker(pytest.mark.xfail(
                reason=f"kernel {os.uname().release}: veth uses page_pool only since 6.6, "
                       "so this kernel gives the test no page pool to measure", run=False))


class TraceInstance:
    """A private tracefs instance: the kernel's own record of tracepoint hits, independent of
    netmemtrace's BPF programs (the ground truth for live tests)."""

    ROOT = Path("/sys/kernel/tracing")

    def __init__(self, *events: str) -> None:
        if not (self.ROOT / "instances").is_dir():
            subprocess.run(["mount", "-t", "tracefs", "nodev", str(self.ROOT)], check=True)
        self.path = self.ROOT / "instances" / f"nmt-test-{os.getpid()}"
        self.path.mkdir()
        (self.path / "buffer_size_kb").write_text("8192")
        for event in events:
            (self.path / "events" / event / "enable").write_text("1")

    def lines(self) -> list[str]:
        return (self.path / "trace").read_text().splitlines()

    def close(self) -> None:
        (self.path / "tracing_on").write_text("0")
        for enable in self.path.glob("events/*/*/enable"):
            if enable.read_text().strip() == "1":
                enable.write_text("0")
        self.path.rmdir()


@pytest.fixture
def trace_instance() -> Iterator[type[TraceInstance]]:
    made: list[TraceInstance] = []

    def make(*events: str) -> TraceInstance:
        made.append(TraceInstance(*events))
        return made[-1]

    yield make  # type: ignore[misc]
    for inst in made:
        inst.close()


def flush_deferred_skbs() -> None:
    """Run a little loopback TCP on every CPU: freed skbs wait in per-CPU deferred-free lists
    that only that CPU's RX softirq drains, and their page_pool pages with them."""
    import socket

    saved = os.sched_getaffinity(0)
    try:
        for cpu in sorted(saved):
            os.sched_setaffinity(0, {cpu})
            with socket.create_server(("127.0.0.1", 0)) as srv:
                cli = socket.create_connection(srv.getsockname())
                conn, _ = srv.accept()
                cli.sendall(b"x" * 65536)
                got = 0
                while got < 65536:
                    got += len(conn.recv(65536))
                conn.close()
                cli.close()
    finally:
        os.sched_setaffinity(0, saved)


class AttachedDump:
    """`netmemtrace dump` run around some work: started before it and waited on until its
    probes are attached (its "probes attached" line), stopped with SIGINT once the work is
    done, which takes the snapshot at once. The window therefore holds the work whatever the
    start-up costs (seconds under TCG), with no guessed sleep."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        import signal
        import sys

        self._sigint = signal.SIGINT
        # --duration is only the upper bound: stop() ends the window.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "netmemtrace.cli", "dump", "--duration", "3600", *args],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = self.proc.stderr.readline().decode(errors="replace")  # type: ignore[union-attr]
        if "probes attached" not in first:
            self.proc.kill()
            rest = self.proc.communicate()[1].decode(errors="replace")
            raise AssertionError(f"dump did not attach: {first}{rest}")

    def stop(self, settle_s: float = 0.5) -> bytes:
        """End the window after settle_s (events in flight land); the JSON document, raw."""
        import time

        time.sleep(settle_s * SLOW)
        self.proc.send_signal(self._sigint)
        out, err = self.proc.communicate(timeout=120 * SLOW)
        assert self.proc.returncode in (0, 1), err.decode(errors="replace")
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
