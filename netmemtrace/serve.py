"""`netmemtrace serve`: the Prometheus exporter daemon.

Attaches once, keeps the BPF programs running and serves `/metrics` (Prometheus text or
OpenMetrics, chosen by the Accept header) and `/healthz`. Scrapes read one cached snapshot,
refreshed every --interval by a background thread, or by the scrape itself when the cached one
is older than that; one read of the BPF maps at a time, however many scrapes arrive together.
Each snapshot's body is rendered once per format (and gzip) and then sent as is, so a scrape
costs a copy of cached bytes; formats scraped before are rendered with the refresh itself.

TLS and basic auth come from a web config file in the Prometheus exporter-toolkit format, so
the same file works for node_exporter and netmemtrace. SIGTERM/SIGINT stop serving, detach
every BPF program and exit 0.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import functools
import gzip
import hashlib
import ipaddress
import os
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import PLATFORM_COLLECTOR, PROCESS_COLLECTOR
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .probes import SetupError
from .session import open_session
from .views.exporter import SnapshotCollector, render

# Loopback by default: the exporter serves unauthenticated HTTP unless a web config says
# otherwise, so exposing it to the network is an explicit choice (--listen :9435).
DEFAULT_LISTEN = "127.0.0.1:9435"
DEFAULT_INTERVAL_S = 5.0
DEFAULT_MAX_CGROUPS = 100
# An idle keep-alive connection or a client that stopped mid-request holds one thread; this
# bounds for how long. Prometheus reconnects transparently.
CONNECTION_TIMEOUT_S = 60.0
# serve_forever() checks for shutdown this often: bounds the SIGTERM-to-exit time.
_POLL_INTERVAL_S = 0.2
# /healthz fails once the cached snapshot is this many intervals old (the refresher is stuck).
_HEALTHY_INTERVALS = 3
OPENMETRICS_ACCEPT = "application/openmetrics-text; version=1.0.0"

_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3,
}
# exporter-toolkit client_auth_type values Python's ssl module can enforce.
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version",
             "max_version"}
# Valid in exporter-toolkit but not implemented here: refused rather than silently ignored,
# since each one weakens or changes what the operator asked for.
_TOOLKIT_ONLY_KEYS = {"cert", "key", "client_ca", "cipher_suites", "curve_preferences",
                      "prefer_server_cipher_suites", "client_allowed_sans", "rate_limit"}
_TOP_KEYS = {"tls_server_config", "http_server_config", "basic_auth_users"}
_HTTP_KEYS = {"headers", "http2"}
# bcrypt and yaml are imported only with --web-config-file (the common case has no
# config): no module code or shared library for them in the daemon's RSS otherwise, and no
# bcrypt hash computed at start. (ssl stays: http.server's http.client imports it anyway.)


@functools.cache
def _dummy_hash() -> bytes:
    """Unknown users are checked against this hash too, so a response's timing does not
    tell whether the user exists."""
    import bcrypt

    return bcrypt.hashpw(b"netmemtrace", bcrypt.gensalt(rounds=10))


def _log(message: str) -> None:
    print(f"netmemtrace serve: {message}", file=sys.stderr, flush=True)


# ---- web config (exporter-toolkit format) ------------------------------------------------


@dataclass(frozen=True)
class WebConfig:
    tls: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    headers: dict[str, str] = field(default_factory=dict)  # added to every response


def _mapping(value: Any, where: str, allowed: set[str] | None, path: str) -> dict[str, Any]:
    """value as a dict, checked to be a mapping with only `allowed` keys (None: any)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SetupError(f"--web-config-file {path}: {where} must be a mapping")
    for key in value if allowed is not None else ():
        if key in _TOOLKIT_ONLY_KEYS:
            raise SetupError(f"--web-config-file {path}: {where}.{key} is not supported by "
                             "netmemtrace (supported: " + ", ".join(sorted(allowed)) + ")")
        if key not in allowed:
            raise SetupError(f"--web-config-file {path}: unknown key {where}.{key}")
    return value


def _tls_context(cfg: dict[str, Any], path: str) -> ssl.SSLContext:
    def file_of(key: str) -> str:
        value = cfg.get(key)
        if not isinstance(value, str) or not value:
            raise SetupError(f"--web-config-file {path}: tls_server_config.{key} is required")
        # Relative paths are relative to the config file, as in exporter-toolkit.
        return os.path.join(os.path.dirname(os.path.abspath(path)), value)

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.minimum_version = _TLS_VERSIONS[cfg.get("min_version", "TLS12")]
        if "max_version" in cfg:
            ctx.maximum_version = _TLS_VERSIONS[cfg["max_version"]]
    except KeyError as exc:
        raise SetupError(f"--web-config-file {path}: TLS version {exc} is not one of "
                         + ", ".join(_TLS_VERSIONS)) from None
    cert, key = file_of("cert_file"), file_of("key_file")
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise SetupError(f"--web-config-file {path}: cannot load cert_file {cert} / "
                         f"key_file {key}: {exc}") from None
    auth = cfg.get("client_auth_type", "NoClientCert")
    if auth not in _CLIENT_AUTH:
        raise SetupError(f"--web-config-file {path}: client_auth_type {auth!r} is not "
                         "supported (use " + ", ".join(_CLIENT_AUTH) + ")")
    ctx.verify_mode = _CLIENT_AUTH[auth]
    if auth != "NoClientCert":
        ca = file_of("client_ca_file")
        try:
            ctx.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise SetupError(f"--web-config-file {path}: client_ca_file {ca}: {exc}") from None
    return ctx


def _users(cfg: dict[str, Any], path: str) -> dict[str, bytes]:
    import bcrypt

    users = {}
    for user, hashed in cfg.items():
        if not isinstance(user, str) or not isinstance(hashed, str):
            raise SetupError(f"--web-config-file {path}: basic_auth_users maps user names to "
                             "bcrypt hashes (strings)")
        try:
            bcrypt.checkpw(b"", hashed.encode())  # raises on anything that is not bcrypt
        except ValueError:
            raise SetupError(f"--web-config-file {path}: basic_auth_users.{user} is not a "
                             "bcrypt hash (make one with `htpasswd -nBC 10 USER`)") from None
        users[user] = hashed.encode()
    return users


def load_web_config(path: str) -> WebConfig:
    """Parse and check an exporter-toolkit web config; SetupError says what is wrong."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as exc:
        raise SetupError(f"--web-config-file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SetupError(f"--web-config-file {path}: not valid YAML: "
                         + " ".join(str(exc).split())) from None
    top = _mapping(doc, "top level", _TOP_KEYS, path)
    tls_cfg = _mapping(top.get("tls_server_config"), "tls_server_config", _TLS_KEYS, path)
    http_cfg = _mapping(top.get("http_server_config"), "http_server_config", _HTTP_KEYS, path)
    headers = _mapping(http_cfg.get("headers"), "http_server_config.headers", None, path)
    if not all(isinstance(v, str) for v in headers.values()):
        raise SetupError(f"--web-config-file {path}: http_server_config.headers values must "
                         "be strings")
    return WebConfig(
        tls=_tls_context(tls_cfg, path) if tls_cfg else None,
        users=_users(_mapping(top.get("basic_auth_users"), "basic_auth_users", None, path), path),
        headers=dict(headers),
    )


class BasicAuth:
    """Checks `Authorization: Basic` against bcrypt hashes.

    bcrypt costs tens of milliseconds by design; like exporter-toolkit, a credential once
    verified is remembered (as a SHA-256 of user and password), so a Prometheus scraping every
    few seconds pays it once.
    """

    def __init__(self, users: dict[str, bytes]) -> None:
        import bcrypt

        self._checkpw = bcrypt.checkpw
        self._users = users
        self._verified: set[bytes] = set()
        _dummy_hash()  # now, not in the first unknown user's request

    def check(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(token, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        if not sep:
            return False
        key = hashlib.sha256(f"{user}\0{password}".encode()).digest()
        if key in self._verified:
            return True
        ok = self._checkpw(password.encode(), self._users.get(user) or _dummy_hash())
        if ok and user in self._users:
            self._verified.add(key)
            return True
        return False


# ---- snapshot cache ------------------------------------------------------------------------

Encoder = Callable[[Collector], bytes]
Variant = tuple[str, bool]  # (content type, gzip)


class Exposition:
    """The /metrics bodies of one snapshot: its metric families, collected once, and each
    (content type, gzip) variant rendered once, on first request or ahead of it (prerender:
    what scrapers asked of the previous snapshot), then kept."""

    def __init__(self, collectors: list[Collector], prerender: dict[Variant, Encoder]
                 ) -> None:
        self.families: list[Metric] = [m for c in collectors for m in c.collect()]
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

    A caller wanting a snapshot no older than max_age_s gets the cached one, or takes the
    lock and reads; callers that queued behind that read get its result instead of reading
    again. After close() no read happens any more and the last snapshot is served.
    """

    def __init__(self, read: Callable[[], Any]) -> None:
        self._read = read
        self._lock = threading.Lock()
        self._latest: tuple[float, Any] | None = None  # (monotonic s, snapshot)
        self._closed = False

    def _fresh(self, max_age_s: float) -> Any:
        latest = self._latest
        if latest and (self._closed or time.monotonic() - latest[0] <= max_age_s):
            return latest[1]
        return None

    def get(self, max_age_s: float) -> Any:
        if (snap := self._fresh(max_age_s)) is not None:
            return snap
        with self._lock:
            if (snap := self._fresh(max_age_s)) is not None:
                return snap
            if self._closed:
                raise RuntimeError("the tracing session is closed")
            snap = self._read()
            self._latest = (time.monotonic(), snap)
            return snap

    def age_s(self) -> float:
        latest = self._latest
        return time.monotonic() - latest[0] if latest else float("inf")

    def close(self, release: Callable[[], None]) -> None:
        """Stop reading, then release the session (after any read in progress ends)."""
        with self._lock:
            self._closed = True
            release()


# ---- HTTP ---------------------------------------------------------------------------------


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


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


class ExporterServer(ThreadingHTTPServer):
    """Threaded HTTP(S) server: one thread per connection, none outliving the process."""

    daemon_threads = True
    # Prometheus HA pairs and federation scrape at the same instant; the default backlog of
    # 5 would drop SYNs of a burst and stall clients for a second per retransmit.
    request_queue_size = 128

    def __init__(self, host: str, port: int, web: WebConfig) -> None:
        self.dual_stack = host == "" and socket.has_dualstack_ipv6()
        if host == "":
            host = "::" if self.dual_stack else "0.0.0.0"
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                      flags=socket.AI_PASSIVE)[0]
        except socket.gaierror as exc:
            raise SetupError(f"--listen {host}: {exc.strerror}") from None
        self.address_family = info[0]
        try:
            super().__init__(info[4][:2], ExporterHandler)
        except OSError as exc:
            raise SetupError(f"--listen {host}:{port}: {exc.strerror}") from None
        self.web = web
        self.auth = BasicAuth(web.users) if web.users else None
        if web.tls:
            # The handshake runs in the connection's thread (ExporterHandler.setup), so a slow
            # or hostile client cannot stall accept() for everyone else.
            self.socket = web.tls.wrap_socket(self.socket, server_side=True,
                                              do_handshake_on_connect=False)
        self.exposition: Callable[[], Exposition] | None = None  # set once attached
        self.health: Callable[[], tuple[bool, str]] = lambda: (False, "starting")

    def server_bind(self) -> None:
        if self.dual_stack:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if self.dual_stack:
            host = "[::]"
        elif ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
        return f"{'https' if self.web.tls else 'http'}://{host}:{port}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up, time out or fail the TLS handshake are routine on a server
        # reachable from the network: one line, not a traceback.
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError | ssl.SSLError):
            return
        _log(f"request from {client_address[0]} failed: {exc!r}")


class ExporterHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: Prometheus reuses its scrape connection
    timeout = CONNECTION_TIMEOUT_S
    server: ExporterServer
    server_version = "netmemtrace"

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged: a scrape every few seconds would flood the journal."""

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)

    def _route(self, head: bool) -> None:
        path = self.path.partition("?")[0]
        if path == "/healthz":  # no auth: liveness probes carry no credentials
            ok, why = self.server.health()
            self._reply(200 if ok else 503, f"{why}\n".encode(), head=head)
        elif self.server.auth and not self.server.auth.check(self.headers["Authorization"]):
            self._reply(401, b"Unauthorized\n", head=head,
                        extra={"WWW-Authenticate": 'Basic realm="netmemtrace"'})
        elif path == "/metrics":
            self._metrics(head)
        elif path == "/":
            self._reply(200, b"netmemtrace exporter: /metrics, /healthz\n", head=head)
        else:
            self._reply(404, b"Not Found: try /metrics\n", head=head)

    def _metrics(self, head: bool) -> None:
        encoder, content_type = choose_encoder(self.headers["Accept"] or "")
        zipped = gzip_accepted(self.headers["Accept-Encoding"] or "")
        try:
            assert self.server.exposition, "no snapshot yet"
            body = self.server.exposition().body(content_type, encoder, zipped)
        except Exception as exc:  # a scrape failing must say why, not drop the connection
            # prometheus_client appends the whole metric family to the error: keep the cause.
            why = str(exc.args[0] if exc.args else exc)[:500]
            _log(f"scrape failed: {why}")
            self._reply(500, f"scrape failed: {why}\n".encode(), head=head)
            return
        extra = {"Content-Encoding": "gzip"} if zipped else {}
        self._reply(200, body, content_type, head, extra)

    def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
               head: bool = False, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for name, value in {**self.server.web.headers, **(extra or {}),
                            "Content-Type": content_type,
                            "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)


# ---- command -------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", type=parse_listen, default=parse_listen(DEFAULT_LISTEN),
                   metavar="ADDR:PORT",
                   help=f"address to serve on (default {DEFAULT_LISTEN}; ':9435' for every "
                        "address, '[::1]:9435' for IPv6)")
    p.add_argument("--interval", type=_positive, default=DEFAULT_INTERVAL_S, metavar="S",
                   help="seconds between snapshot refreshes; a scrape finding the cached "
                        "snapshot older than this reads a new one "
                        f"(default {DEFAULT_INTERVAL_S:g})")
    p.add_argument("--web-config-file", metavar="FILE",
                   help="TLS and basic auth, in the Prometheus exporter-toolkit web config "
                        "format (tls_server_config, basic_auth_users with bcrypt hashes, "
                        "http_server_config.headers); without it, plain HTTP")
    p.add_argument("--max-cgroups", type=_positive_int, default=DEFAULT_MAX_CGROUPS,
                   metavar="N",
                   help="export at most N memory cgroups (top N by memory; the rest are "
                        f"summed into cgroup=\"other\") (default {DEFAULT_MAX_CGROUPS})")


def _refresh_loop(cache: SnapshotCache, interval: float, stop: threading.Event) -> None:
    while not stop.wait(interval):
        try:
            # Half an interval: a scrape that just refreshed spares this round its read.
            cache.get(interval / 2)
        except Exception as exc:  # keep serving the last snapshot; /healthz turns 503
            _log(f"snapshot refresh failed: {exc!r}")


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; SetupError for anything wrong at start (exit 2)."""
    web = load_web_config(args.web_config_file) if args.web_config_file else WebConfig()
    stop = threading.Event()
    with contextlib.ExitStack() as stack:
        for sig in (signal.SIGTERM, signal.SIGINT):
            stack.callback(signal.signal, sig, signal.signal(sig, lambda *_: stop.set()))
        # Bind before attaching: a taken port is reported without loading any BPF.
        server = ExporterServer(*args.listen, web)
        stack.callback(server.server_close)
        # Attach, then drop the capabilities reading needs no more: the daemon that parses
        # network input cannot load BPF afterwards (unless --keep-caps).
        session = open_session(args)
        cache = SnapshotCache(Expositions([
            SnapshotCollector(session.read, max_cgroups=args.max_cgroups),
            PROCESS_COLLECTOR, PLATFORM_COLLECTOR]))
        stack.callback(cache.close, session.close)
        cache.get(0)  # the first scrape must not wait for BPF, and a failure shows at start

        interval = args.interval

        def health() -> tuple[bool, str]:
            if stop.is_set():
                return False, "stopping"
            age = cache.age_s()
            if age > _HEALTHY_INTERVALS * interval:
                return False, f"snapshot is {age:.0f} s old (refresh every {interval:g} s)"
            return True, "ok"

        server.health = health
        server.exposition = lambda: cache.get(interval)
        threading.Thread(target=server.serve_forever, args=(_POLL_INTERVAL_S,),
                         name="http", daemon=True).start()
        stack.callback(server.shutdown)
        threading.Thread(target=_refresh_loop, args=(cache, interval, stop), name="refresh",
                         daemon=True).start()
        _log(f"serving {server.url}/metrics (refresh every {interval:g} s)")
        # Signal handlers only set `stop`; a bounded wait keeps the main thread responsive
        # to them whatever the platform's lock semantics.
        while not stop.wait(_POLL_INTERVAL_S):
            pass
        _log("stopping: detaching BPF programs")
    return 0
