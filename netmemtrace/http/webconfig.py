"""TLS, basic auth and extra headers from a web config file in the Prometheus
exporter-toolkit format, so the same file works for node_exporter and netmemtrace.

Everything the file says is checked when it is loaded (SetupError, exit 2): what cannot be
honoured exactly is refused rather than silently weakened, e.g. a header that would inject
another header or break the response framing, TLS bounds the wrong way round, or an empty
file (which would otherwise serve plain HTTP while the operator asked for a config).

bcrypt and yaml are imported only here, i.e. only with --web-config-file: no module code or
shared library for them in the daemon otherwise, and no bcrypt hash computed at start.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
import re
import ssl
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from netmemtrace.kernel.probes import SetupError

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
# RFC 9110 field names are tokens; values are visible characters, spaces and tabs (no CR or
# LF, which would end the header and start another: response header injection).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
# Headers the server writes itself: one from the config would contradict or duplicate them.
_SERVER_HEADERS = {"content-type", "content-length", "content-encoding", "transfer-encoding",
                   "connection", "www-authenticate", "date", "server", "keep-alive"}
# Credentials remembered (verified or refused) at once; beyond that the oldest is forgotten.
AUTH_CACHE_ENTRIES = 1024


@functools.cache
def _dummy_hash() -> bytes:
    """Unknown users are checked against this hash too, so a response's timing does not
    tell whether the user exists."""
    import bcrypt

    return bcrypt.hashpw(b"netmemtrace", bcrypt.gensalt(rounds=10))


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


def _tls_version(cfg: dict[str, Any], key: str, default: str | None, path: str
                 ) -> ssl.TLSVersion | None:
    name = cfg.get(key, default)
    if name is None:
        return None
    if name not in _TLS_VERSIONS:
        raise SetupError(f"--web-config-file {path}: TLS version {name!r} is not one of "
                         + ", ".join(_TLS_VERSIONS))
    return _TLS_VERSIONS[name]


def _tls_context(cfg: dict[str, Any], path: str) -> ssl.SSLContext:
    def file_of(key: str) -> str:
        value = cfg.get(key)
        if not isinstance(value, str) or not value:
            raise SetupError(f"--web-config-file {path}: tls_server_config.{key} is required")
        # Relative paths are relative to the config file, as in exporter-toolkit.
        return os.path.join(os.path.dirname(os.path.abspath(path)), value)

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    low = _tls_version(cfg, "min_version", "TLS12", path)
    high = _tls_version(cfg, "max_version", None, path)
    if high is not None and low is not None and low > high:
        raise SetupError(f"--web-config-file {path}: tls_server_config.min_version "
                         f"{cfg.get('min_version', 'TLS12')} is above max_version "
                         f"{cfg['max_version']}: no TLS version would be accepted")
    assert low is not None
    ctx.minimum_version = low
    if high is not None:
        ctx.maximum_version = high
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
        if ":" in user or not user:
            # Basic auth sends "user:password": a user name with ':' could never log in.
            raise SetupError(f"--web-config-file {path}: basic_auth_users: user name "
                             f"{user!r} is empty or contains ':'")
        try:
            bcrypt.checkpw(b"", hashed.encode())  # raises on anything that is not bcrypt
        except ValueError:
            raise SetupError(f"--web-config-file {path}: basic_auth_users.{user} is not a "
                             "bcrypt hash (make one with `htpasswd -nBC 10 USER`)") from None
        users[user] = hashed.encode()
    return users


def _headers(cfg: dict[str, Any], path: str) -> dict[str, str]:
    where = f"--web-config-file {path}: http_server_config.headers"
    for name, value in cfg.items():
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise SetupError(f"{where}: {name!r} is not a valid header name")
        if name.lower() in _SERVER_HEADERS:
            raise SetupError(f"{where}: {name} is set by the server itself")
        if not isinstance(value, str):
            raise SetupError(f"{where}: the value of {name} must be a string")
        if not _FIELD_VALUE.fullmatch(value):
            raise SetupError(f"{where}: the value of {name} contains a control character "
                             "(CR and LF would inject headers)")
    return dict(cfg)


def load_web_config(path: str) -> WebConfig:
    """Parse and check an exporter-toolkit web config; SetupError says what is wrong."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as exc:
        raise SetupError(f"--web-config-file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SetupError(f"--web-config-file {path}: not UTF-8 text (a YAML file is "
                         "expected)") from None
    except yaml.YAMLError as exc:
        raise SetupError(f"--web-config-file {path}: not valid YAML: "
                         + " ".join(str(exc).split())) from None
    if not doc:
        raise SetupError(f"--web-config-file {path}: empty: it configures nothing (drop "
                         "--web-config-file to serve plain HTTP without auth)")
    top = _mapping(doc, "top level", _TOP_KEYS, path)
    tls_cfg = _mapping(top.get("tls_server_config"), "tls_server_config", _TLS_KEYS, path)
    http_cfg = _mapping(top.get("http_server_config"), "http_server_config", _HTTP_KEYS, path)
    headers = _mapping(http_cfg.get("headers"), "http_server_config.headers", None, path)
    return WebConfig(
        tls=_tls_context(tls_cfg, path) if tls_cfg else None,
        users=_users(_mapping(top.get("basic_auth_users"), "basic_auth_users", None, path), path),
        headers=_headers(headers, path),
    )


class BasicAuth:
    """Checks `Authorization: Basic` against bcrypt hashes.

    bcrypt costs tens of milliseconds of CPU by design, which a client sending wrong
    passwords could make the exporter pay without end. So, as in exporter-toolkit:
    - every outcome is remembered (keyed by a SHA-256 of user, password and hash; the last
      AUTH_CACHE_ENTRIES): a Prometheus scraping every few seconds pays bcrypt once, and a
      client repeating a wrong password pays nothing;
    - one bcrypt runs at a time (the server also queues callers before they take a thread);
    and a refused check holds that one slot for as long again as its bcrypt took, so a flood
    of new wrong passwords costs at most half a core.
    """

    def __init__(self, users: dict[str, bytes]) -> None:
        import bcrypt

        self._checkpw = bcrypt.checkpw
        self._users = users
        self._outcomes: OrderedDict[bytes, bool] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._bcrypt_lock = threading.Lock()
        _dummy_hash()  # now, not in the first unknown user's request

    def _key(self, header: str | None) -> tuple[bytes, str, str] | None:
        """(cache key, user, password) of a well-formed header, else None."""
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, sep, password = base64.b64decode(token, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        if not sep:
            return None
        hashed = self._users.get(user) or b""
        digest = hashlib.sha256(f"{user}\0{password}\0".encode() + hashed).digest()
        return digest, user, password

    def cached(self, header: str | None) -> bool | None:
        """The remembered outcome (False for a malformed header), or None: check() it."""
        parsed = self._key(header)
        if parsed is None:
            return False
        with self._cache_lock:
            return self._outcomes.get(parsed[0])

    def check(self, header: str | None) -> bool:
        """The outcome, running bcrypt (one at a time) when it is not remembered."""
        parsed = self._key(header)
        if parsed is None:
            return False
        key, user, password = parsed
        with self._bcrypt_lock:
            with self._cache_lock:
                known = self._outcomes.get(key)
            if known is not None:  # checked while this caller waited for the slot
                return known
            start = time.monotonic()
            ok = self._checkpw(password.encode(), self._users.get(user) or _dummy_hash())
            ok = ok and user in self._users
            with self._cache_lock:
                self._outcomes[key] = ok
                if len(self._outcomes) > AUTH_CACHE_ENTRIES:
                    self._outcomes.popitem(last=False)
            if not ok:
                time.sleep(time.monotonic() - start)
            return ok
