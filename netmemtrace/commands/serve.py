"""`netmemtrace serve`: the Prometheus exporter daemon.

Attaches once, keeps the BPF programs running and serves `/metrics` (Prometheus text or
OpenMetrics, chosen by the Accept header) and `/healthz`. Each scrape shows the kernel at
scrape time: it reads the BPF maps itself, and scrapes arriving while a read is in progress
share that read (one read at a time, however many scrapes arrive together). Each snapshot's
body is rendered once per format (and gzip); formats scraped before are rendered with the
read itself. Between scrapes a background thread reads every --interval, so /healthz tells
whether reading works even when nobody scrapes.

HTTP (bounded connections, header deadlines) is netmemtrace/http/server.py; TLS and basic
auth come from an exporter-toolkit web config (netmemtrace/http/webconfig.py). SIGTERM/SIGINT
stop serving, detach every BPF program and exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import PLATFORM_COLLECTOR, PROCESS_COLLECTOR
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector

from netmemtrace.commands import options
from netmemtrace.http.server import ExporterServer, Request, Response
from netmemtrace.session import open_session
from netmemtrace.views.prometheus.collector import SnapshotCollector, families_of
from netmemtrace.views.prometheus.encode import Family, render

# Loopback by default: the exporter serves unauthenticated HTTP unless a web config says
# otherwise, so exposing it to the network is an explicit choice (--listen :9435).
DEFAULT_LISTEN = "127.0.0.1:9435"
DEFAULT_INTERVAL_S = 5.0
DEFAULT_MAX_CGROUPS = 100
# The main thread checks for a stop signal this often: bounds the SIGTERM-to-exit time.
_POLL_INTERVAL_S = 0.2
# /healthz fails once the last successful read is this many intervals old.
_HEALTHY_INTERVALS = 3
OPENMETRICS_ACCEPT = "application/openmetrics-text; version=1.0.0"


def _log(message: str) -> None:
    print(f"netmemtrace serve: {message}", file=sys.stderr, flush=True)


# ---- snapshot cache ------------------------------------------------------------------------

Encoder = Callable[[Collector], bytes]
Variant = tuple[str, bool]  # (content type, gzip)


class Exposition:
    """The /metrics bodies of one snapshot: its metric families, collected once, and each
    (content type, gzip) variant rendered once, on first request or ahead of it (prerender:
    what scrapers asked of the previous snapshot), then kept."""

    def __init__(self, collectors: list[Collector], prerender: dict[Variant, Encoder]
                 ) -> None:
        self.families: list[Family] = [f for c in collectors for f in families_of(c)]
        self.served: dict[Variant, Encoder] = {}  # variants scrapes asked for
        self._bodies: dict[Variant, bytes] = {}
        self._lock = threading.Lock()
        for (content_type, zipped), encoder in prerender.items():
            self._render(content_type, encoder, zipped)

    def body(self, content_type: str, encoder: Encoder, zipped: bool) -> bytes:
        self.served[(content_type, zipped)] = encoder
        return self._render(content_type, encoder, zipped)

    def _render(self, content_type: str, encoder: Encoder, zipped: bool) -> bytes:
        key = (content_type, zipped)
        if (cached := self._bodies.get(key)) is not None:
            return cached
        with self._lock:  # concurrent scrapes of a new variant: one renders, all reuse it
            if (cached := self._bodies.get(key)) is None:
                cached = render(self.families, content_type, encoder)
                if zipped:
                    cached = gzip.compress(cached, compresslevel=6)
                self._bodies[key] = cached
            return cached


class Expositions:
    """Reads a new snapshot into an Exposition, rendering ahead what was scraped from the
    previous one (before any scrape: OpenMetrics, what Prometheus negotiates)."""

    def __init__(self, collectors: list[Collector]) -> None:
        self._collectors = collectors
        encoder, content_type = choose_encoder(OPENMETRICS_ACCEPT)
        self._wanted: dict[Variant, Encoder] = {(content_type, False): encoder}
        self._last: Exposition | None = None

    def __call__(self) -> Exposition:
        if self._last is not None and self._last.served:
            self._wanted = dict(self._last.served)
        self._last = Exposition(self._collectors, self._wanted)
        return self._last


class SnapshotCache:
    """The latest snapshot (whatever `read` returns: an Exposition in the daemon); read()
    runs in one thread at a time.

    get(max_age_s) returns the cached snapshot if it is young enough, else reads; fresh()
    returns one read after the call began, i.e. the read in progress when it was called
    (shared by every caller queued behind it) or a new one. After close() no read happens
    any more and the last snapshot is served.
    """

    def __init__(self, read: Callable[[], Any]) -> None:
        self._read = read
        self._lock = threading.Lock()
        self._latest: tuple[float, Any] | None = None  # (monotonic s read ended, snapshot)
        self._closed = False
        self.last_error: str | None = None  # of the last read, None when it succeeded

    def _since(self, not_before: float) -> Any:
        latest = self._latest
        if latest and (self._closed or latest[0] >= not_before):
            return latest[1]
        return None

    def _get(self, not_before: float) -> Any:
        if (snap := self._since(not_before)) is not None:
            return snap
        with self._lock:
            if (snap := self._since(not_before)) is not None:
                return snap
            if self._closed:
                raise RuntimeError("the tracing session is closed")
            try:
                snap = self._read()
            except Exception as exc:
                self.last_error = repr(exc)
                raise
            self.last_error = None
            self._latest = (time.monotonic(), snap)
            return snap

    def get(self, max_age_s: float) -> Any:
        return self._get(time.monotonic() - max_age_s)

    def fresh(self) -> Any:
        return self._get(time.monotonic())

    def age_s(self) -> float:
        latest = self._latest
        return time.monotonic() - latest[0] if latest else float("inf")

    def close(self, release: Callable[[], None]) -> None:
        """Stop reading, then release the session (after any read in progress ends)."""
        with self._lock:
            self._closed = True
            release()


class Health:
    """/healthz: fails when reading stopped working, whatever the reason: the refresh
    thread died, or no read succeeded for _HEALTHY_INTERVALS intervals (every read fails,
    or one hangs)."""

    def __init__(self, cache: SnapshotCache, interval_s: float, stop: threading.Event
                 ) -> None:
        self.cache, self.interval_s, self.stop = cache, interval_s, stop
        self.refresher: threading.Thread | None = None
        self.died: str | None = None  # why the refresh thread ended

    def __call__(self) -> tuple[bool, str]:
        if self.stop.is_set():
            return False, "stopping"
        if self.refresher is not None and not self.refresher.is_alive():
            return False, f"the refresh thread died: {self.died or 'unknown'}"
        age = self.cache.age_s()
        if age > _HEALTHY_INTERVALS * self.interval_s:
            why = f"; last read failed: {self.cache.last_error}" if self.cache.last_error \
                else ""
            return False, (f"last successful read {age:.0f} s ago (every {self.interval_s:g} "
                           f"s){why}")
        return True, "ok"

    def refresh_loop(self) -> None:
        """Read every interval unless a scrape just did; ends only with stop (or a bug,
        which /healthz then reports)."""
        try:
            while not self.stop.wait(self.interval_s):
                try:
                    # Half an interval: a scrape that just read spares this round its read.
                    self.cache.get(self.interval_s / 2)
                except Exception as exc:  # keep serving; /healthz turns 503 if it lasts
                    _log(f"snapshot refresh failed: {exc!r}")
        except BaseException as exc:
            self.died = repr(exc)
            raise

    def start(self) -> None:
        self.refresher = threading.Thread(target=self.refresh_loop, name="refresh",
                                          daemon=True)
        self.refresher.start()


def _routes(server: ExporterServer, cache: SnapshotCache, health: Health) -> None:
    Blocking = Callable[..., Awaitable[Any]]

    async def metrics(request: Request, blocking: Blocking) -> Response:
        encoder, content_type = choose_encoder(request.header("accept") or "")
        zipped = gzip_accepted(request.header("accept-encoding") or "")
        exposition = await blocking(cache.fresh)
        body = await blocking(exposition.body, content_type, encoder, zipped)
        return Response(200, body, content_type,
                        {"Content-Encoding": "gzip"} if zipped else {})

    async def healthz(_request: Request, _blocking: Blocking) -> Response:
        ok, why = health()
        return Response(200 if ok else 503, f"{why}\n".encode())

    async def index(_request: Request, _blocking: Blocking) -> Response:
        return Response(200, b"netmemtrace exporter: /metrics, /healthz\n")

    server.route("/metrics", metrics)
    server.route("/healthz", healthz, auth=False)  # liveness probes carry no credentials
    server.route("/", index)


# ---- command ----------------------------------------------------------------------------


def parse_listen(text: str) -> tuple[str, int]:
    """ADDR:PORT, [IPV6]:PORT or :PORT (every address) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not ADDR:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise argparse.ArgumentTypeError(f"{text!r}: write IPv6 addresses as [ADDR]:PORT")
    return host, int(port)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", type=parse_listen, default=parse_listen(DEFAULT_LISTEN),
                   metavar="ADDR:PORT",
                   help=f"address to serve on (default {DEFAULT_LISTEN}; ':9435' for every "
                        "address, '[::1]:9435' for IPv6)")
    p.add_argument("--interval", type=options.SERVE_INTERVAL, default=DEFAULT_INTERVAL_S,
                   metavar="S",
                   help="seconds between background reads of the BPF maps when no scrape "
                        "read them (scrapes always read); /healthz fails after "
                        f"{_HEALTHY_INTERVALS} intervals without a successful read "
                        f"(default {DEFAULT_INTERVAL_S:g}, at most 3600)")
    p.add_argument("--web-config-file", metavar="FILE",
                   help="TLS and basic auth, in the Prometheus exporter-toolkit web config "
                        "format (tls_server_config, basic_auth_users with bcrypt hashes, "
                        "http_server_config.headers); without it, plain HTTP")
    p.add_argument("--max-cgroups", type=options.MAX_CGROUPS, default=DEFAULT_MAX_CGROUPS,
                   metavar="N",
                   help="export at most N memory cgroups (top N by memory; the rest are "
                        f"summed into cgroup=\"other\") (default {DEFAULT_MAX_CGROUPS})")


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; SetupError for anything wrong at start (exit 2)."""
    if args.web_config_file:
        from netmemtrace.http.webconfig import load_web_config

        web = load_web_config(args.web_config_file)
    else:
        from netmemtrace.http.webconfig import WebConfig

        web = WebConfig()
    stop = threading.Event()
    with contextlib.ExitStack() as stack:
        for sig in (signal.SIGTERM, signal.SIGINT):
            stack.callback(signal.signal, sig, signal.signal(sig, lambda *_: stop.set()))
        # Bind before attaching: a taken port is reported without loading any BPF.
        server = ExporterServer(*args.listen, web)
        stack.callback(server.shutdown)
        # Attach, then drop the capabilities reading needs no more: the daemon that parses
        # network input cannot load BPF afterwards (unless --keep-caps).
        session = open_session(args)
        cache = SnapshotCache(Expositions([
            SnapshotCollector(session.read, max_cgroups=args.max_cgroups),
            PROCESS_COLLECTOR, PLATFORM_COLLECTOR]))
        stack.callback(cache.close, session.close)
        cache.get(0)  # a failure shows at start, and the first scrape has variants to reuse
        health = Health(cache, args.interval, stop)
        _routes(server, cache, health)
        server.start()
        health.start()
        _log(f"serving {server.url}/metrics (scrapes read the kernel; background read every "
             f"{args.interval:g} s)")
        # Signal handlers only set `stop`; a bounded wait keeps the main thread responsive
        # to them whatever the platform's lock semantics.
        while not stop.wait(_POLL_INTERVAL_S):
            pass
        _log("stopping: detaching BPF programs")
    return 0
