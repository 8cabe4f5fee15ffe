"""Issue 17.2 and 17.5: the HTTP server bounds what hostile clients can cost (connections,
header deadlines, bcrypt), and /healthz fails when reading stopped (17.3)."""

from __future__ import annotations

import base64
import contextlib
import os
import resource
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
from conftest import SLOW, TIMINGS
from test_serve_live import Served, basic, http_get

from netmemtrace.commands.serve import Health, SnapshotCache
from netmemtrace.http import server as http_server
from netmemtrace.http.server import ExporterServer, Response
from netmemtrace.http.webconfig import WebConfig


@contextlib.contextmanager
def serving(max_connections: int = http_server.MAX_CONNECTIONS) -> Iterator[ExporterServer]:
    srv = ExporterServer("127.0.0.1", 0, WebConfig(), max_connections=max_connections)

    async def hello(_request, _blocking) -> Response:
        return Response(200, b"hello\n")

    srv.route("/metrics", hello)
    srv.start()
    try:
        yield srv
    finally:
        srv.shutdown()


def connect(srv: ExporterServer) -> socket.socket:
    return socket.create_connection(srv.server_address[:2], timeout=5 * SLOW)


def get(srv: ExporterServer, path: str = "/metrics") -> tuple[int, bytes]:
    return http_get(f"{srv.url}{path}", timeout=2 * SLOW)[::2]


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        while data := sock.recv(4096):
            if data.startswith(b"HTTP/1.1 ") and b"Connection: close" in data:
                continue
        return True
    except (TimeoutError, ConnectionResetError):
        return False


def test_a_client_dripping_header_lines_is_cut_at_the_deadline(monkeypatch) -> None:
    monkeypatch.setattr(http_server, "HEADER_TIMEOUT_S", 1.0)
    with serving() as srv, connect(srv) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\n")
        start = time.monotonic()
        with contextlib.suppress(OSError):
            for i in range(30):  # a header line every 0.2 s, never the blank line
                s.sendall(f"X-Drip-{i}: 1\r\n".encode())
                time.sleep(0.2)
        assert closed_by_server(s, 3)
        assert not TIMINGS or time.monotonic() - start < 3
        assert get(srv)[0] == 200


def test_oversized_headers_bad_requests_and_methods() -> None:
    with serving() as srv:
        with connect(srv) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 431")
        with connect(srv) as s:
            s.sendall(b"garbage\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 400")
        with connect(srv) as s:
            s.sendall(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 405")
        with connect(srv) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
            assert s.recv(100).startswith(b"HTTP/1.1 413")
        assert get(srv, "/nope")[0] == 404
        # keep-alive: two requests on one connection
        with connect(srv) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
            time.sleep(0.3)
            assert s.recv(65536).count(b"HTTP/1.1 200 OK") == 2


def test_the_connection_cap_evicts_the_longest_idle() -> None:
    with serving(max_connections=20) as srv:
        idle = [connect(srv) for _ in range(60)]
        try:
            time.sleep(0.3)
            assert srv.connections() <= 20 and srv.evicted >= 40
            start = time.monotonic()
            assert get(srv) == (200, b"hello\n")
            assert not TIMINGS or time.monotonic() - start < 1
            # the oldest were the ones cut
            assert closed_by_server(idle[0], 1)
        finally:
            for s in idle:
                s.close()


class _FailingRead:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> object:
        self.calls += 1
        if self.calls > 1:
            raise OSError("map read failed")
        return object()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_healthz_fails_when_reads_fail_or_the_refresh_thread_dies() -> None:
    stop = threading.Event()
    cache = SnapshotCache(_FailingRead())
    cache.get(0)
    health = Health(cache, 0.1, stop)
    health.start()
    assert health() == (True, "ok")
    time.sleep(0.5)  # every background read fails from now on
    ok, why = health()
    assert not ok and "last read failed: OSError('map read failed')" in why
    stop.set()
    health.refresher.join(2)

    # a refresh thread that dies (a bug, or an interval the wait cannot take)
    cache2 = SnapshotCache(object)
    cache2.get(0)
    dying = Health(cache2, 1e300, threading.Event())
    dying.start()
    dying.refresher.join(2)
    ok, why = dying()
    assert not ok and why.startswith("the refresh thread died: OverflowError"), why


# ---- live: the daemon itself ----------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Threads", "VmRSS"):
            fields[key] = int(value.split()[0])
    return fields


def cpu_seconds(pid: int) -> float:
    parts = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def many_files() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(8192, hard), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.userspace
@pytest.mark.live
def test_2000_idle_connections_cost_no_threads(many_files) -> None:
    served = Served("--interval", "1")
    try:
        pid = served.proc.pid
        http_get(f"{served.url}/metrics")
        before = proc_status(pid)
        port = served.port
        idle = []
        try:
            for _ in range(2000):
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=5 * SLOW))
            time.sleep(1)
            during = proc_status(pid)
            start = time.monotonic()
            status, _, body = http_get(f"{served.url}/metrics", timeout=5 * SLOW)
            took = time.monotonic() - start
        finally:
            for s in idle:
                s.close()
        assert status == 200 and b"netmemtrace_page_pool" in body
        assert not TIMINGS or took < 1.0, took
        assert during["Threads"] <= before["Threads"] + 2, (before, during)
        assert during["VmRSS"] - before["VmRSS"] < 10_000, (before, during)  # kB
    finally:
        served.close()


@pytest.mark.userspace
@pytest.mark.live
def test_a_wrong_password_flood_stays_under_one_core(tmp_path: Path) -> None:
    hashed = bcrypt.hashpw(b"right", bcrypt.gensalt(rounds=10)).decode()
    (tmp_path / "web.yml").write_text(f"basic_auth_users:\n  prom: {hashed}\n")
    served = Served("--interval", "1", "--web-config-file", str(tmp_path / "web.yml"))
    stop = threading.Event()
    refused = [0]

    def flood(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            token = base64.b64encode(f"prom:wrong-{n}-{i}".encode()).decode()
            req = urllib.request.Request(f"{served.url}/metrics",
                                         headers={"Authorization": f"Basic {token}"})
            try:
                urllib.request.urlopen(req, timeout=10 * SLOW)
            except urllib.error.HTTPError as err:
                refused[0] += err.code == 401
            except OSError:
                pass

    try:
        assert http_get(f"{served.url}/metrics", basic("prom", "right"))[0] == 200
        threads = [threading.Thread(target=flood, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        time.sleep(1)
        cpu0, wall0 = cpu_seconds(served.proc.pid), time.monotonic()
        slowest = 0.0
        while time.monotonic() - wall0 < 6:
            start = time.monotonic()
            status, _, body = http_get(f"{served.url}/metrics", basic("prom", "right"))
            slowest = max(slowest, time.monotonic() - start)
            assert status == 200 and b"netmemtrace_page_pool" in body
            time.sleep(0.2)
        cores = (cpu_seconds(served.proc.pid) - cpu0) / (time.monotonic() - wall0)
        stop.set()
        for t in threads:
            t.join(15)
        assert refused[0] > 10
        assert not TIMINGS or cores < 1.0, cores
        assert slowest < 1.0, slowest
    finally:
        stop.set()
        served.close()
