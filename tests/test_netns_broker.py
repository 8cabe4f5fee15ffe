"""The netns broker (netmemtrace/privilege/netns_broker.py) and the per-thread capability
drop (netmemtrace/privilege/caps.py): what the broker holds and accepts, that it never
outlives the daemon, and that a thread started before the drop fails it.

The broker is started in-process here (pytest runs as root with every capability); anything
that drops capabilities runs in a child process, since the drop is for good."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO, SLOW

from netmemtrace.host import resolve
from netmemtrace.privilege import caps, netns_broker
from netmemtrace.workload import demo

pytestmark = pytest.mark.live


def process_gone(pid: int, timeout: float = 5.0 * SLOW) -> bool:
    """pid exited within timeout (a zombie waiting for a reaper counts as exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def check_broker_process(pid: int) -> None:
    """CAP_SYS_ADMIN only (effective, permitted, bounding set), no_new_privs, one thread,
    and no descriptor but the standard ones, its socket and its own netns."""
    (sets,) = caps.task_caps(pid).values()
    assert sets == {"CapPrm": 1 << caps.CAP_SYS_ADMIN, "CapEff": 1 << caps.CAP_SYS_ADMIN,
                    "CapBnd": 1 << caps.CAP_SYS_ADMIN, "NoNewPrivs": 1}, sets
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f)
    assert int(status["CapInh"], 16) == int(status["CapAmb"], 16) == 0
    with open(f"/proc/{pid}/comm") as f:
        assert f.read().strip() == netns_broker.BROKER_COMM.decode()
    fds = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert len(fds) == 5, fds
    assert fds[0] == fds[1] == os.devnull, fds
    kinds = sorted(target.split(":")[0] for fd, target in fds.items() if fd > 2)
    assert kinds == ["net", "socket"], fds


@pytest.fixture
def broker():
    b = netns_broker.start()
    try:
        yield b
    finally:
        b.close()


def test_broker_holds_only_cap_sys_admin_and_serves_netlink_and_iterators(broker) -> None:
    assert netns_broker.active() is broker
    check_broker_process(broker.pid)
    with demo.VethTopology() as topo:
        path = f"/run/netns/{topo.rx_netns}"
        # A netlink socket of the demo's netns, through the broker.
        names = resolve.link_names(topo.rx_netns)
        assert names[topo.rx_ifindex()] == topo.rx_dev
        # Our own netns is served here, without the broker.
        with socket.socket(fileno=netns_broker.fd_in_netns(
                "/proc/self/ns/net", netns_broker.NETLINK, netns_broker.NETLINK_GENERIC)) as s:
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) == 16
        # Requests outside the whitelist are refused with an errno, and the broker serves on.
        ns = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            refused = {
                "netlink protocol": (ns, netns_broker.NETLINK, 4),  # NETLINK_SOCK_DIAG
                "unknown kind": (ns, 7, 0),
                "not a netns": (null, netns_broker.NETLINK, netns_broker.NETLINK_ROUTE),
                "not a BPF link": (ns, netns_broker.BPF_ITER, null),
            }
            for what, request in refused.items():
                with pytest.raises(OSError) as exc:
                    broker.request(*request)
                assert exc.value.errno in (errno.EINVAL, errno.EBADF), what
            # Another kind of namespace file is not a netns either.
            with open(f"/proc/{os.getpid()}/ns/uts", "rb") as uts, pytest.raises(OSError):
                broker.request(uts.fileno(), netns_broker.NETLINK, netns_broker.NETLINK_ROUTE)
        finally:
            os.close(null)
            os.close(ns)
        assert resolve.link_names(topo.rx_netns)[topo.rx_ifindex()] == topo.rx_dev
    with pytest.raises(OSError) as gone:
        resolve.link_names(topo.rx_netns)
    assert gone.value.errno == errno.ENOENT
    check_broker_process(broker.pid)  # still only its socket and netns: nothing leaked


def test_broker_is_reaped_on_close_and_the_direct_path_returns() -> None:
    b = netns_broker.start()
    pid = b.pid
    b.close()
    assert netns_broker.active() is None and b.proc.returncode == 0
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped already
    with pytest.raises(OSError) as exc:
        b.request(0, netns_broker.NETLINK, netns_broker.NETLINK_ROUTE)
    assert exc.value.errno == errno.EPIPE
    with demo.VethTopology() as topo:  # setns in this thread, which is root here
        assert resolve.link_names(topo.rx_netns)[topo.rx_ifindex()] == topo.rx_dev


@pytest.mark.parametrize("how", ["SIGKILL", "exit"])
def test_broker_never_outlives_its_daemon(how: str) -> None:
    """Killed (PR_SET_PDEATHSIG) or at EOF when the daemon exits without closing it."""
    code = ("import os, sys, time; from netmemtrace.privilege import netns_broker; "
            "b = netns_broker.start(); print(b.pid, flush=True); "
            + ("time.sleep(60)" if how == "SIGKILL" else "os._exit(0)"))
    daemon = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        pid = int(daemon.stdout.readline())
        if how == "SIGKILL":
            daemon.send_signal(signal.SIGKILL)
        daemon.wait(10 * SLOW)
        assert process_gone(pid), f"broker {pid} outlived its daemon"
    finally:
        if daemon.poll() is None:
            daemon.kill()
        daemon.wait()
        daemon.stdout.close()


def test_drop_fails_if_a_thread_kept_capabilities() -> None:
    """capset() and the bounding set are per thread: a thread started before the drop keeps
    everything, and the drop says so instead of leaving it."""
    code = ("import threading, time; from netmemtrace.privilege import caps; "
            "threading.Thread(target=time.sleep, args=(5,), daemon=True).start(); "
            "caps.drop_after_attach()")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=30 * SLOW)
    assert done.returncode == 1 and "CapsError: threads kept capabilities" in done.stderr, \
        done.stderr
    code = ("import threading; from netmemtrace.privilege import caps; caps.drop_after_attach(); "
            "t = threading.Thread(target=lambda: None); t.start(); t.join(); "
            "print(sorted({s['CapEff'] for s in caps.task_caps().values()}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=30 * SLOW)
    assert done.stdout.strip() == str([caps.mask_of(caps.KEEP)]), done.stderr
