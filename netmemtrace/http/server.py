"""A bounded HTTP/1.1 server for /metrics and /healthz, on asyncio (stdlib).

http.server spends one thread per connection, with no cap: 2,000 idle sockets cost 2,000
threads and 46 MB, and a client dripping header lines held its thread forever. Here one
event-loop thread owns every connection and a small pool of threads does the blocking work
(reading the BPF maps, rendering, bcrypt), so:
- connections are capped (max_connections, below the process's file limit): one more evicts
  the connection idle the longest, so a scraper always gets in;
- a request's headers must arrive within HEADER_TIMEOUT_S of its first byte (exporter-
  toolkit's ReadHeaderTimeout), an idle keep-alive connection is closed after IDLE_TIMEOUT_S,
  a response must be taken within WRITE_TIMEOUT_S, headers are at most MAX_HEADER_BYTES;
- only GET and HEAD, without a body; every connection costs a few kB, not a thread.
"""

from __future__ import annotations

import asyncio
import ipaddress
import resource
import socket
import ssl
import sys
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

from netmemtrace.http.webconfig import BasicAuth, WebConfig
from netmemtrace.kernel.probes import SetupError

HEADER_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 60.0  # Prometheus reconnects transparently
WRITE_TIMEOUT_S = 30.0
MAX_HEADER_BYTES = 16384
MAX_CONNECTIONS = 512
WORKER_THREADS = 4
# Prometheus HA pairs and federation scrape at the same instant; a backlog of 5 would drop
# SYNs of a burst and stall clients for a second per retransmit.
BACKLOG = 128
# Files kept free for what is not a connection (BPF maps and links, /proc reads).
FD_RESERVE = 128


def _log(message: str) -> None:
    print(f"netmemtrace serve: {message}", file=sys.stderr, flush=True)


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


# A route handler: runs on the event loop; blocking work goes through `blocking`.
Handler = Callable[[Request, Callable[..., Awaitable[Any]]], Awaitable[Response]]


class _BadRequest(Exception):
    def __init__(self, status: HTTPStatus, why: str) -> None:
        super().__init__(why)
        self.status = status


def _parse(head: bytes) -> Request:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(HTTPStatus.BAD_REQUEST, "malformed request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or line[0] in " \t":
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "malformed header line")
        headers[name.lower()] = value.strip()
    if parts[2] == "HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive":
        headers["connection"] = "close"
    if headers.get("transfer-encoding") or headers.get("content-length", "0") != "0":
        raise _BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request bodies are not accepted")
    return Request(parts[0], parts[1], headers)


class _Conn:
    def __init__(self, writer: asyncio.StreamWriter, task: asyncio.Task, serial: int) -> None:
        self.writer, self.task, self.serial = writer, task, serial
        self.busy = False  # between a complete request and the end of its response


class ExporterServer:
    """Binds at construction (a taken port is a SetupError before anything is attached);
    start() serves in its own thread until shutdown()."""

    def __init__(self, host: str, port: int, web: WebConfig,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.dual_stack = host == "" and socket.has_dualstack_ipv6()
        if host == "":
            host = "::" if self.dual_stack else "0.0.0.0"
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                      flags=socket.AI_PASSIVE)[0]
        except socket.gaierror as exc:
            raise SetupError(f"--listen {host}: {exc.strerror}") from None
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.dual_stack:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(info[4][:2])
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            raise SetupError(f"--listen {host}:{port}: {exc.strerror}") from None
        self.socket = sock
        self.server_address = sock.getsockname()
        self.web = web
        self.auth = BasicAuth(web.users) if web.users else None
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY:
            max_connections = min(max_connections, max(16, soft - FD_RESERVE))
        self.max_connections = max_connections
        self.routes: dict[str, tuple[Handler, bool]] = {}  # path -> (handler, needs auth)
        self.evicted = 0
        self._conns: dict[int, _Conn] = {}
        self._serial = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._pool = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="http-work")
        self._auth_queue: asyncio.Lock | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if self.dual_stack:
            host = "[::]"
        elif ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
        return f"{'https' if self.web.tls else 'http'}://{host}:{port}"

    def route(self, path: str, handler: Handler, auth: bool = True) -> None:
        self.routes[path] = (handler, auth)

    # ---- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="http",
                                        daemon=True)
        self._thread.start()
        ready.wait()

    def _run(self, ready: threading.Event) -> None:
        loop = self._loop = asyncio.new_event_loop()
        loop.set_exception_handler(self._loop_error)
        self._auth_queue = asyncio.Lock()
        server = loop.run_until_complete(asyncio.start_server(
            self._connection, sock=self.socket, ssl=self.web.tls, limit=MAX_HEADER_BYTES,
            ssl_handshake_timeout=HEADER_TIMEOUT_S if self.web.tls else None,
            backlog=BACKLOG))
        ready.set()
        try:
            loop.run_until_complete(self._until_stopped())
        finally:
            server.close()
            for conn in list(self._conns.values()):
                conn.writer.transport.abort()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    async def _until_stopped(self) -> None:
        while not self._stopped.is_set():
            await asyncio.sleep(0.1)

    def shutdown(self) -> None:
        self._stopped.set()
        if self._thread:
            self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.socket.close()

    @staticmethod
    def _loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # Clients that hang up, time out or fail the TLS handshake are routine on a server
        # reachable from the network: nothing to log.
        exc = context.get("exception")
        if isinstance(exc, ConnectionError | TimeoutError | ssl.SSLError | OSError):
            return
        _log(f"HTTP: {context.get('message')}: {exc!r}")

    def connections(self) -> int:
        return len(self._conns)

    # ---- connections --------------------------------------------------------------------

    def _admit(self, conn: _Conn) -> bool:
        if len(self._conns) >= self.max_connections:
            idle = [c for c in self._conns.values() if not c.busy]
            if not idle:
                return False
            oldest = min(idle, key=lambda c: c.serial)
            oldest.writer.transport.abort()
            oldest.task.cancel()
            del self._conns[oldest.serial]
            self.evicted += 1
        self._conns[conn.serial] = conn
        return True

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._serial += 1
        conn = _Conn(writer, task, self._serial)
        if not self._admit(conn):
            writer.transport.abort()
            return
        try:
            await self._serve(conn, reader, writer)
        except (asyncio.CancelledError, ConnectionError, TimeoutError, ssl.SSLError,
                asyncio.IncompleteReadError):
            pass
        finally:
            self._conns.pop(conn.serial, None)
            writer.close()

    async def _serve(self, conn: _Conn, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        while True:
            async with asyncio.timeout(IDLE_TIMEOUT_S):
                first = await reader.read(1)
            if not first:
                return
            # The request has started: its headers must arrive in time (each request of a
            # keep-alive connection has its own deadline).
            try:
                async with asyncio.timeout(HEADER_TIMEOUT_S):
                    head = first + await reader.readuntil(b"\r\n\r\n")
                request = _parse(head)
            except asyncio.LimitOverrunError:
                await self._send(writer, Response(
                    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, b"headers too large\n"),
                    False, False)
                return
            except _BadRequest as bad:
                await self._send(writer, Response(bad.status, f"{bad}\n".encode()), False,
                                 False)
                return
            conn.busy = True
            response = await self._respond(request)
            keep = request.header("connection") != "close"
            await self._send(writer, response, request.method == "HEAD", keep)
            conn.busy = False
            # Fresh in the eviction order: evict the one idle the longest.
            del self._conns[conn.serial]
            self._serial += 1
            conn.serial = self._serial
            self._conns[conn.serial] = conn
            if not keep:
                return

    async def _blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._loop is not None
        return await self._loop.run_in_executor(self._pool, fn, *args)

    async def _respond(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return Response(HTTPStatus.METHOD_NOT_ALLOWED, b"only GET and HEAD\n",
                            headers={"Allow": "GET, HEAD"})
        path = request.path.partition("?")[0]
        handler, needs_auth = self.routes.get(path, (None, True))
        if needs_auth and self.auth and not await self._authorized(request):
            return Response(HTTPStatus.UNAUTHORIZED, b"Unauthorized\n",
                            headers={"WWW-Authenticate": 'Basic realm="netmemtrace"'})
        if handler is None:
            return Response(HTTPStatus.NOT_FOUND, b"Not Found: try /metrics\n")
        try:
            return await handler(request, self._blocking)
        except Exception as exc:  # a request failing must say why, not drop the connection
            why = str(exc.args[0] if exc.args else exc)[:500]
            _log(f"{path} failed: {why}")
            return Response(HTTPStatus.INTERNAL_SERVER_ERROR, f"failed: {why}\n".encode())

    async def _authorized(self, request: Request) -> bool:
        assert self.auth is not None and self._auth_queue is not None
        header = request.header("authorization")
        known = self.auth.cached(header)
        if known is not None:
            return known
        # Callers needing bcrypt queue here, on the loop, not in a worker thread: a flood of
        # wrong passwords never takes the threads valid scrapes need.
        async with self._auth_queue:
            return await self._blocking(self.auth.check, header)

    async def _send(self, writer: asyncio.StreamWriter, response: Response, head: bool,
                    keep: bool) -> None:
        status = HTTPStatus(response.status)
        fields = {**self.web.headers, **response.headers,
                  "Content-Type": response.content_type,
                  "Content-Length": str(len(response.body)),
                  "Date": formatdate(usegmt=True), "Server": "netmemtrace"}
        if not keep:
            fields["Connection"] = "close"
        lines = [f"HTTP/1.1 {status.value} {status.phrase}"]
        lines += [f"{k}: {v}" for k, v in fields.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if not head:
            writer.write(response.body)
        async with asyncio.timeout(WRITE_TIMEOUT_S):
            await writer.drain()
