"""`netmemtrace serve`: the daemon as a process, scraped by real clients and a real Prometheus.

Tests marked live attach BPF and build veth+XDP topologies (netmemtrace.workload.demo); the others
check what fails before any BPF is loaded (web config, listen address) and the pieces of the
daemon (snapshot cache, basic auth) in-process.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bcrypt
import pytest
from conftest import REPO, SLOW, TIMINGS, bpf_prog_ids
from memcg_helpers import HIERARCHY, child_memcg
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text
from test_netns_broker import check_broker_process
from test_zerocopy_live import Workload, netns, workload  # noqa: F401 (fixtures)

from netmemtrace.collect.zerocopy import smaps_socket_rss
from netmemtrace.commands.serve import SnapshotCache, parse_listen
from netmemtrace.http.webconfig import BasicAuth, load_web_config
from netmemtrace.kernel.probes import SetupError
from netmemtrace.privilege import caps
from netmemtrace.workload import demo

SERVE = [sys.executable, "-m", "netmemtrace.cli", "serve"]
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
STARTUP_TIMEOUT_S = 30.0 * SLOW


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, headers: dict[str, str] | None = None,
             context: ssl.SSLContext | None = None, method: str = "GET",
             timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def values(body: bytes, name: str, openmetrics: bool = False) -> list[tuple[dict, float]]:
    parse = parse_om if openmetrics else parse_text
    return [(s.labels, s.value) for fam in parse(body.decode()) for s in fam.samples
            if s.name == name]


class Served:
    """`netmemtrace serve` as a child process, ready once /healthz answers."""

    def __init__(self, *args: str, scheme: str = "http",
                 context: ssl.SSLContext | None = None, wrapper: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [*wrapper, *SERVE, "--listen", f"127.0.0.1:{self.port}", *args], cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}: "
                                     f"{self.proc.stderr.read()}")
            try:
                if http_get(f"{self.url}/healthz", context=context, timeout=2 * SLOW)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise AssertionError("serve did not become healthy in time")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> tuple[int, float]:
        """Send sig, return (exit code, seconds until the process was gone)."""
        start = time.monotonic()
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        return rc, time.monotonic() - start

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe:
                pipe.close()


class Prometheus:
    """A real Prometheus server (Debian package) on loopback with its own data dir."""

    def __init__(self, workdir: Path, scrape: dict) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus missing: `make deps` installs the Debian package"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                  "scrape_configs": [{"job_name": "netmemtrace", **scrape}]}
        (workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.wait_for(lambda: http_get(f"{self.url}/-/ready", timeout=2 * SLOW)[0] == 200, "ready")

    def wait_for(self, check, what: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.proc.stderr.read()}")
            try:
                if result := check():
                    return result
            except OSError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"prometheus: {what} not reached in {timeout:.0f} s")

    def query(self, expr: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, _, body = http_get(url)
        doc = json.loads(body)
        assert status == 200 and doc["status"] == "success", doc
        return doc["data"]["result"]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


def bpf_ids(pid: int) -> tuple[set[int], set[int]]:
    """(program ids, link ids) a process holds, from /proc/PID/fdinfo."""
    progs, links = set(), set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
            info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in info.splitlines() if ":\t" in line)
        if target == "anon_inode:bpf-prog":
            progs.add(int(fields["prog_id"]))
        elif target == "anon_inode:bpf_link":
            links.add(int(fields["link_id"]))
    return progs, links


def bpf_link_ids() -> set[int]:
    """Ids of every BPF link in the kernel, per bpftool."""
    out = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True,
                         check=True, timeout=30 * SLOW).stdout
    return {entry["id"] for entry in json.loads(out or "[]")}


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ---- in-process pieces (no BPF) ----------------------------------------------------------


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9435") == ("127.0.0.1", 9435)
    assert parse_listen(":9435") == ("", 9435)
    assert parse_listen("[::1]:9") == ("::1", 9)
    for bad in ("9435", "::1:9435", "host:port", "1.2.3.4:70000"):
        with pytest.raises(Exception, match="ADDR:PORT|IPv6"):
            parse_listen(bad)


def test_snapshot_cache_reads_once_for_concurrent_callers() -> None:
    reads = []

    def slow_read():
        reads.append(threading.get_ident())
        time.sleep(0.2)
        return object()

    cache = SnapshotCache(slow_read)  # type: ignore[arg-type]
    with ThreadPoolExecutor(50) as pool:
        got = list(pool.map(lambda _: cache.get(10.0), range(50)))
    assert len(reads) == 1 and len({id(g) for g in got}) == 1
    assert cache.get(10.0) is got[0]  # still fresh: no read
    assert cache.get(0.0) is not got[0] and len(reads) == 2  # stale: read again
    released = []
    cache.close(lambda: released.append(True))
    assert released == [True]
    assert cache.get(0.0) is not None and len(reads) == 2  # closed: never reads again


def test_basic_auth() -> None:
    auth = BasicAuth({"prom": bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4))})
    assert auth.check(basic("prom", "s3cret")["Authorization"])
    assert auth.check(basic("prom", "s3cret")["Authorization"])  # cached path
    assert not auth.check(basic("prom", "wrong")["Authorization"])
    assert not auth.check(basic("nobody", "s3cret")["Authorization"])
    no_colon = "Basic " + base64.b64encode(b"nocolon").decode()
    for bad in (None, "", "Bearer x", "Basic !!!", no_colon):
        assert not auth.check(bad)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(("content", "message"), [
    ("tls_server_config: [unclosed", "not valid YAML"),
    ("basic_auth_users:\n  prom: notahash\n", "not a bcrypt hash"),
    ("tls_server_config:\n  cert_file: c.pem\n", "tls_server_config.key_file is required"),
    ("tls_server_config:\n  cert_file: missing.pem\n  key_file: missing.key\n",
     "cannot load cert_file"),
    ("tls_server_config:\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
     "cipher_suites is not supported"),
    ("basic_auth_user:\n  prom: x\n", "unknown key top level.basic_auth_user"),
    ("- a list\n", "top level must be a mapping"),
    ("tls_server_config:\n  cert_file: c\n  key_file: k\n  min_version: TLS99\n",
     "TLS version 'TLS99'"),
])
def test_malformed_web_config_is_a_setup_error(tmp_path: Path, content: str,
                                               message: str) -> None:
    with pytest.raises(SetupError, match=message):
        load_web_config(write(tmp_path / "web.yml", content))


def test_missing_web_config_file(tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="No such file"):
        load_web_config(str(tmp_path / "absent.yml"))


def test_malformed_web_config_exits_2_with_one_line(tmp_path: Path) -> None:
    config = write(tmp_path / "web.yml", "basic_auth_users:\n  prom: plaintext\n")
    start = time.monotonic()
    done = subprocess.run([*SERVE, "--listen", f"127.0.0.1:{free_port()}",
                           "--web-config-file", config], cwd=REPO, capture_output=True,
                          text=True, timeout=30 * SLOW)
    assert done.returncode == 2, done
    assert done.stderr.strip().count("\n") == 0, done.stderr  # one line, no traceback
    assert "basic_auth_users.prom is not a bcrypt hash" in done.stderr
    assert not TIMINGS or time.monotonic() - start < 10  # refused before loading any BPF


def test_taken_port_exits_2(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([*SERVE, "--listen", f"127.0.0.1:{port}"], cwd=REPO,
                              capture_output=True, text=True, timeout=30 * SLOW)
    assert done.returncode == 2, done
    assert f"--listen 127.0.0.1:{port}: Address already in use" in done.stderr


# ---- live: the daemon with real traffic ---------------------------------------------------


@pytest.fixture(scope="module")
def traced() -> Iterator[tuple[Served, demo.VethTopology, demo.HeldConnection]]:
    """serve attached first, then a veth pool born under it holding pages in a queue."""
    served = Served("--interval", "1")
    try:
        with demo.VethTopology() as topo, demo.hold_unread(topo, 4 << 20) as held:
            assert held.held_bytes > 0
            # The cached snapshot may predate the pool: wait for a refresh that shows it.
            deadline = time.monotonic() + 10 * SLOW
            while not pool_series(body := http_get(f"{served.url}/metrics")[2], topo,
                                  "netmemtrace_page_pool_inflight_pages"):
                # What serve says of that device instead (an unavailable reason, or nothing).
                about = [line for line in body.decode().splitlines()
                         if f'"{topo.rx_dev}"' in line or "recursion_misses" in line]
                assert time.monotonic() < deadline, f"pool never appeared in /metrics: {about}"
                time.sleep(0.2)
            yield served, topo, held
    finally:
        rc, _ = served.stop()
        served.close()
        assert rc == 0


def pool_series(body: bytes, topo: demo.VethTopology, name: str,
                openmetrics: bool = False, **labels: str) -> list[float]:
    return [v for lab, v in values(body, name, openmetrics)
            if lab.get("netdev") == topo.rx_dev and lab.get("netns") == topo.rx_netns
            and all(lab.get(k) == x for k, x in labels.items())]


@pytest.mark.veth_page_pool  # `traced`: a veth pool holding pages
@pytest.mark.live
def test_pool_series_labels_and_counters(traced) -> None:
    served, topo, _held = traced
    status, headers, body = http_get(f"{served.url}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    # Identity labels against `ip` (independent of BPF): device, namespace, ifindex.
    states = [lab for lab, v in values(body, "netmemtrace_page_pool_state")
              if lab["netdev"] == topo.rx_dev and v == 1]
    assert len(states) == 1, states
    assert states[0]["netns"] == topo.rx_netns
    assert states[0]["ifindex"] == str(topo.rx_ifindex())
    assert states[0]["state"] == "active" and states[0]["provider"] == "host"
    # The pool was born after attach: every hold and release was counted, so the counters'
    # difference is exactly the in-flight figure computed from the kernel's own counters.
    inflight = pool_series(body, topo, "netmemtrace_page_pool_inflight_pages")
    holds = pool_series(body, topo, "netmemtrace_page_pool_hold_pages_total", netmem="page")
    releases = pool_series(body, topo, "netmemtrace_page_pool_release_pages_total",
                           netmem="page")
    assert len(inflight) == len(holds) == len(releases) == 1
    assert inflight[0] > 0 and holds[0] > 0
    assert holds[0] - releases[0] == inflight[0]
    assert pool_series(body, topo, "netmemtrace_page_pool_inflight_bytes") == [inflight[0] * 4096]


@pytest.mark.veth_page_pool  # `traced`: a veth pool holding pages
@pytest.mark.live
def test_real_scrape_passes_promtool_check_metrics(traced) -> None:
    served, _topo, _held = traced
    body = http_get(f"{served.url}/metrics")[2]
    done = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True,
                          timeout=30 * SLOW)
    assert done.returncode == 0 and not done.stdout and not done.stderr, done


@pytest.mark.veth_page_pool  # `traced`: a veth pool holding pages
@pytest.mark.live
def test_http_surface(traced) -> None:
    served, topo, _held = traced
    status, headers, body = http_get(f"{served.url}/metrics", {"Accept": OPENMETRICS})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    assert pool_series(body, topo, "netmemtrace_page_pool_inflight_pages", openmetrics=True)
    status, headers, zipped = http_get(f"{served.url}/metrics", {"Accept-Encoding": "gzip"})
    assert headers.get("Content-Encoding") == "gzip"
    assert b"# TYPE netmemtrace_page_pool_state gauge" in gzip.decompress(zipped)
    status, _, body = http_get(f"{served.url}/healthz")
    assert (status, body) == (200, b"ok\n")
    assert http_get(f"{served.url}/nope")[0] == 404
    status, headers, body = http_get(f"{served.url}/metrics", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 1000


@pytest.mark.veth_page_pool  # `traced`: a veth pool holding pages
@pytest.mark.live
def test_each_scrape_reads_and_concurrent_scrapes_share_a_read(traced) -> None:
    """Issue 16.3: a scrape shows the kernel at scrape time (each one reads), and scrapes
    arriving together share reads instead of each paying one."""
    served, _topo, _held = traced

    def taken() -> float:
        body = http_get(f"{served.url}/metrics")[2]
        return values(body, "netmemtrace_snapshot_timestamp_seconds")[0][1]

    one_by_one = []
    for _ in range(5):
        asked = time.time()
        one_by_one.append(taken())
        assert one_by_one[-1] >= asked - 0.05  # read after the scrape began
    assert len(set(one_by_one)) == 5
    with ThreadPoolExecutor(40) as pool:
        together = list(pool.map(lambda _: taken(), range(40)))
    assert len(set(together)) < 20  # 40 scrapes, far fewer reads


@pytest.mark.veth_page_pool  # `traced`: a veth pool holding pages
@pytest.mark.live
def test_prometheus_scrapes_the_pool_series(traced, tmp_path: Path) -> None:
    served, topo, _held = traced
    prom = Prometheus(tmp_path, {"static_configs": [
        {"targets": [served.url.removeprefix("http://")]}]})
    try:
        selector = f'{{netdev="{topo.rx_dev}", netns="{topo.rx_netns}"}}'
        result = prom.wait_for(
            lambda: prom.query(f"netmemtrace_page_pool_inflight_pages{selector}"),
            "pool series scraped")
        assert len(result) == 1
        labels = result[0]["metric"]
        assert labels["job"] == "netmemtrace" and labels["ifindex"] == str(topo.rx_ifindex())
        # What the exporter served, per snapshot, against what Prometheus stored.
        served_by_snapshot: dict[float, list[float]] = {}
        for _ in range(15):
            body = http_get(f"{served.url}/metrics")[2]
            taken = values(body, "netmemtrace_snapshot_timestamp_seconds")[0][1]
            served_by_snapshot[taken] = [
                *pool_series(body, topo, "netmemtrace_page_pool_inflight_pages"),
                *pool_series(body, topo, "netmemtrace_page_pool_hold_pages_total",
                             netmem="page")]
            time.sleep(0.2)
        stored = prom.query(
            f"netmemtrace_page_pool_inflight_pages{selector} "
            f"or netmemtrace_page_pool_hold_pages_total{{netmem=\"page\", "
            f"netdev=\"{topo.rx_dev}\"}} or netmemtrace_snapshot_timestamp_seconds")
        by_name = {r["metric"]["__name__"]: float(r["value"][1]) for r in stored}
        # Every scrape reads the kernel, so Prometheus' own scrapes are snapshots of their
        # own: taken within the window of ours, with the figures ours showed (the held
        # queue keeps them steady).
        taken = by_name["netmemtrace_snapshot_timestamp_seconds"]
        assert min(served_by_snapshot) - 2 < taken < max(served_by_snapshot) + 2
        assert [by_name["netmemtrace_page_pool_inflight_pages"],
                by_name["netmemtrace_page_pool_hold_pages_total"]] in served_by_snapshot.values()
        assert by_name["netmemtrace_page_pool_inflight_pages"] > 0
        assert prom.query('up{job="netmemtrace"}')[0]["value"][1] == "1"
        # HELP and TYPE reached Prometheus (its scrape negotiates OpenMetrics).
        status, _, body = http_get(f"{prom.url}/api/v1/metadata?metric="
                                   "netmemtrace_page_pool_hold_pages")
        meta = json.loads(body)["data"]
        status2, _, body2 = http_get(f"{prom.url}/api/v1/metadata?metric="
                                     "netmemtrace_page_pool_inflight_pages")
        meta2 = json.loads(body2)["data"]["netmemtrace_page_pool_inflight_pages"][0]
        assert status == status2 == 200
        assert meta["netmemtrace_page_pool_hold_pages"][0]["type"] == "counter"
        assert meta2["type"] == "gauge" and "not yet returned" in meta2["help"]
    finally:
        prom.close()


@pytest.mark.userspace
@pytest.mark.veth_page_pool  # `traced`: a veth pool holding pages
@pytest.mark.live
def test_200_concurrent_scrapes_while_tracing(traced) -> None:
    served, _topo, _held = traced
    pid = served.proc.pid
    stop = threading.Event()
    traffic = threading.Thread(target=demo.run_demo, args=(15.0, stop), daemon=True)
    traffic.start()
    try:
        time.sleep(1.0)
        fds_before = open_fds(pid)
        barrier = threading.Barrier(200)

        def scrape(i: int) -> tuple[int, bool]:
            openmetrics = i % 2 == 0
            headers = {"Accept": OPENMETRICS} if openmetrics else {}
            barrier.wait(timeout=10 * SLOW)
            status, resp_headers, body = http_get(f"{served.url}/metrics", headers,
                                                  timeout=10 * SLOW)
            complete = (len(body) == int(resp_headers["Content-Length"])
                        and (body.endswith(b"# EOF\n") if openmetrics
                             else b"netmemtrace_figure_unavailable_info" in body)
                        and bool(values(body, "netmemtrace_page_pool_state", openmetrics)))
            return status, complete

        # Each request is bounded by its own timeout; how long all 200 take together is a
        # timing on a shared machine, which is not a test's to judge.
        with ThreadPoolExecutor(200) as pool:
            results = list(pool.map(scrape, range(200)))
    finally:
        stop.set()
        traffic.join(30)
    assert [s for s, _ in results] == [200] * 200
    assert all(ok for _, ok in results)
    # Every connection was closed: the fd count returns to where it was.
    deadline = time.monotonic() + 5 * SLOW
    while open_fds(pid) > fds_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_fds(pid) <= fds_before


@pytest.mark.live
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_detaches_everything_and_exits_0(sig: int) -> None:
    served = Served("--interval", "1")
    try:
        assert http_get(f"{served.url}/metrics")[0] == 200
        progs, links = bpf_ids(served.proc.pid)
        assert progs and links, "serve holds no BPF programs or links"
        assert progs <= bpf_prog_ids() and links <= bpf_link_ids()
        rc, seconds = served.stop(sig)
        err = served.proc.stderr.read()
    finally:
        served.close()
    assert rc == 0, err
    assert not TIMINGS or seconds < 2.0, f"exit took {seconds:.2f} s"
    assert not progs & bpf_prog_ids(), "BPF programs left loaded"
    assert not links & bpf_link_ids(), "BPF links left attached"
    assert "Traceback" not in err


@pytest.mark.live
def test_no_thread_keeps_capabilities_after_the_drop() -> None:
    """Capabilities belong to threads: every thread of the daemon (main, HTTP, refresh, the
    zerocopy ring buffer's, a connection's) holds exactly what caps.KEEP leaves; the netns
    broker holds CAP_SYS_ADMIN alone and is reaped by the daemon on exit."""
    served = Served("--interval", "0.5")
    try:
        assert http_get(f"{served.url}/metrics")[0] == 200
        pid = served.proc.pid
        tasks = caps.task_caps(pid)
        assert len(tasks) >= 4, tasks  # main, http, refresh, netmemtrace-zc
        keep = caps.mask_of(caps.KEEP)
        for tid, sets in tasks.items():
            assert sets == {"CapPrm": keep, "CapEff": keep, "CapBnd": keep,
                            "NoNewPrivs": 1}, (tid, sets)
        children = [int(child) for tid in tasks
                    for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        assert len(children) == 1, children
        check_broker_process(children[0])
        rc, _ = served.stop(signal.SIGTERM)
        err = served.proc.stderr.read()
    finally:
        served.close()
    assert rc == 0 and "Traceback" not in err, err
    assert not Path(f"/proc/{children[0]}").exists(), "broker not reaped by the daemon"


@pytest.fixture
def tls_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d)
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(path / "key.pem"),
             "-out", str(path / "cert.pem"), "-days", "1", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
            check=True, capture_output=True, timeout=30 * SLOW)
        hashed = bcrypt.hashpw(b"s3cret pass", bcrypt.gensalt(rounds=10)).decode()
        # Relative paths: resolved against the config file's directory (exporter-toolkit).
        write(path / "web.yml",
              "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n"
              f"basic_auth_users:\n  prom: '{hashed}'\n"
              "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n")
        yield path


@pytest.mark.userspace
@pytest.mark.live
def test_tls_and_basic_auth(tls_dir: Path, tmp_path: Path) -> None:
    ctx = ssl.create_default_context(cafile=str(tls_dir / "cert.pem"))
    served = Served("--web-config-file", str(tls_dir / "web.yml"), scheme="https",
                    context=ctx)
    try:
        url = f"{served.url}/metrics"
        status, headers, body = http_get(url, basic("prom", "s3cret pass"), ctx)
        assert status == 200 and b"netmemtrace_build_info" in body
        assert headers["X-Content-Type-Options"] == "nosniff"
        status, headers, _ = http_get(url, basic("prom", "wrong"), ctx)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
        assert http_get(url, basic("other", "s3cret pass"), ctx)[0] == 401
        assert http_get(url, {}, ctx)[0] == 401
        assert http_get(f"{served.url}/healthz", {}, ctx)[0] == 200  # probes carry no creds
        # Plain HTTP to the TLS port gets no metrics.
        with pytest.raises((OSError, urllib.error.URLError)):
            http_get(f"http://127.0.0.1:{served.port}/metrics", basic("prom", "s3cret pass"))
        # A real Prometheus scrapes it with the same credentials and CA.
        prom = Prometheus(tmp_path, {
            "scheme": "https",
            "tls_config": {"ca_file": str(tls_dir / "cert.pem")},
            "basic_auth": {"username": "prom", "password": "s3cret pass"},
            "static_configs": [{"targets": [f"127.0.0.1:{served.port}"]}]})
        try:
            up = prom.wait_for(lambda: prom.query('up{job="netmemtrace"} == 1'), "TLS scrape")
            assert up[0]["metric"]["instance"] == f"127.0.0.1:{served.port}"
            assert prom.query('netmemtrace_build_info{job="netmemtrace"}')
        finally:
            prom.close()
        assert served.stop()[0] == 0
    finally:
        served.close()


@pytest.mark.live
def test_zerocopy_reader_in_a_child_memcg_is_exported(workload, netns) -> None:  # noqa: F811
    """A TCP_ZEROCOPY_RECEIVE reader (tests/test_zerocopy_live.py's workload) holding its
    mapped pages in a memcg the test creates: its cgroup's and its own series equal the
    workload's count and the socket: Rss in its smaps; the scrape passes promtool. (Its own
    serve, no veth pool: this runs on every kernel.)"""
    served = Served("--interval", "1")
    try:
        check_zerocopy_reader_exported(served, workload_path=workload, netns_name=netns)
    finally:
        served.close()


def check_zerocopy_reader_exported(served: Served, workload_path: str, netns_name: str) -> None:
    with child_memcg("serve") as (d, rel):
        w = Workload(workload_path, netns_name, d, str(4_000_000), "hold")
        try:
            held = w.totals["held_bytes"]
            assert held > 0 and held == smaps_socket_rss(w.pid)

            def series(body: bytes, name: str, **labels: str) -> list[float]:
                return [v for lab, v in values(body, name)
                        if all(lab.get(k) == x for k, x in labels.items())]

            deadline = time.monotonic() + 10 * SLOW
            while True:
                body = http_get(f"{served.url}/metrics")[2]
                mine = series(body, "netmemtrace_zerocopy_unaccounted_bytes", cgroup=rel)
                if mine == [held]:
                    break
                assert time.monotonic() < deadline, f"{rel}: {mine}, want [{held}]"
                time.sleep(0.2)
            assert series(body, "netmemtrace_process_zerocopy_unaccounted_bytes",
                          pid=str(w.pid), cgroup=rel) == [held]
            assert series(body, "netmemtrace_memcg_zerocopy_rx_mapped_bytes_total",
                          cgroup=rel) == [w.totals["rx_mapped_bytes"]]
            unavailable = {lab["figure"] for lab, _ in
                           values(body, "netmemtrace_figure_unavailable_info")
                           if lab["cgroup"] == rel}
            if HIERARCHY == "v1":
                # v1 without a TCP limit accounts no socket memory: explained, not 0.
                assert "netmemtrace_memcg_would_be_charged_bytes" in unavailable
            else:  # v2 always charges sockets: a figure
                assert series(body, "netmemtrace_memcg_would_be_charged_bytes", cgroup=rel)
            done = subprocess.run(["promtool", "check", "metrics"], input=body,
                                  capture_output=True, timeout=30 * SLOW)
            assert done.returncode == 0 and not done.stdout and not done.stderr, done
        finally:
            w.stop()
