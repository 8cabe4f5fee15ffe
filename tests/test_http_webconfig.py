"""Issue 17.4: the web config refuses what it cannot honour exactly (exit 2 at start)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import bcrypt
import pytest
from conftest import REPO

from netmemtrace.http.webconfig import load_web_config
from netmemtrace.kernel.probes import SetupError

HASH = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()


def tls_files(tmp_path: Path) -> str:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", str(tmp_path / "k.pem"),
                    "-out", str(tmp_path / "c.pem")], check=True, capture_output=True,
                   timeout=60)
    return "tls_server_config:\n  cert_file: c.pem\n  key_file: k.pem\n"


@pytest.mark.parametrize(("content", "message"), [
    ('http_server_config:\n  headers:\n    X-A: "ok\\r\\nSet-Cookie: evil=1"\n',
     "contains a control character"),
    ('http_server_config:\n  headers:\n    X-A: "ok\\nX-B: 1"\n', "contains a control character"),
    ('http_server_config:\n  headers:\n    "X-A\\nX-B": "1"\n', "is not a valid header name"),
    ('http_server_config:\n  headers:\n    "X A": "1"\n', "is not a valid header name"),
    ('http_server_config:\n  headers:\n    Content-Length: "0"\n', "set by the server"),
    ("", "empty: it configures nothing"),
    ("# only a comment\n", "empty: it configures nothing"),
    ("{}\n", "empty: it configures nothing"),
    (f"basic_auth_users:\n  'a:b': {HASH}\n", "contains ':'"),
])
def test_refused(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "web.yml").write_text(content)
    with pytest.raises(SetupError, match=message):
        load_web_config(str(tmp_path / "web.yml"))


def test_min_version_above_max_version_is_refused(tmp_path: Path) -> None:
    tls = tls_files(tmp_path)
    (tmp_path / "web.yml").write_text(tls + "  min_version: TLS13\n  max_version: TLS12\n")
    with pytest.raises(SetupError, match="min_version TLS13 is above max_version TLS12"):
        load_web_config(str(tmp_path / "web.yml"))
    (tmp_path / "web.yml").write_text(tls + "  min_version: TLS12\n  max_version: TLS13\n")
    assert load_web_config(str(tmp_path / "web.yml")).tls is not None


def test_valid_headers_are_kept(tmp_path: Path) -> None:
    (tmp_path / "web.yml").write_text(
        "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n"
        "    Strict-Transport-Security: max-age=31536000; includeSubDomains\n")
    assert load_web_config(str(tmp_path / "web.yml")).headers == {
        "X-Content-Type-Options": "nosniff",
        "Strict-Transport-Security": "max-age=31536000; includeSubDomains"}


def test_binary_file_exits_2_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "web.bin").write_bytes(bytes(range(256)) * 4)
    done = subprocess.run([sys.executable, "-m", "netmemtrace.cli", "serve", "--listen",
                           "127.0.0.1:0", "--web-config-file", str(tmp_path / "web.bin")],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done
    assert done.stderr.count("\n") == 1 and "not UTF-8 text" in done.stderr, done.stderr
