"""The container image (`make image`, deploy/image/) run the way the DaemonSet runs it.

The image is built by deploy/image/build.sh, or reused when the one in podman's store has the
same content hash. The DaemonSet's pod spec is turned into `podman run` flags field by field
(pod_spec_flags): `podman kube play` of podman 4.3 cannot run it (hostPID is not supported,
a containerPort with hostNetwork is refused, an httpGet probe becomes `curl` inside the
image), and a field the translation does not know fails the test rather than being dropped.
Podman needs three settings on this machine (../shared/CONTAINERS.md): `--runtime runc` and
a private containers.conf; they live here, never in what ships. Ground truths: the host's own
`netmemtrace probes`, bpftool, the host's view of every mounted path, a real Prometheus.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, bpf_prog_ids, prog_ids_held_by
from test_deploy import k8s_docs
from test_netns_broker import check_broker_process
from test_serve_live import Prometheus, http_get

from netmemtrace.privilege import caps, netns_broker
from netmemtrace.workload import demo

pytestmark = [pytest.mark.live, pytest.mark.image]

BUILD = REPO / "deploy" / "image" / "build.sh"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
SIZE_LIMIT_BYTES = 150_000_000
# Fields of the pod spec that only mean something to a cluster (scheduling, the API server,
# DNS) and have no podman counterpart.
CLUSTER_ONLY = {"serviceAccountName", "automountServiceAccountToken", "dnsPolicy",
                "tolerations"}
# Podman here: crun refuses the hybrid cgroup layout; no systemd; no CAP_SYS_RESOURCE.
CONTAINERS_CONF = '[containers]\ndefault_ulimits = []\n[engine]\ncgroup_manager = "cgroupfs"\n'


def pod_spec() -> dict:
    return k8s_docs()["DaemonSet"]["spec"]["template"]["spec"]


def quantity_bytes(text: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    return int(text[:-2]) * units[text[-2:]] if text[-2:] in units else int(text)


def pod_spec_flags(spec: dict,
                   without_mount: str | None = None) -> tuple[list[str], str, list[str]]:
    """(podman run flags, image, command line) for the pod's one container: every field of
    the pod spec has its podman counterpart or is listed in CLUSTER_ONLY."""
    spec = dict(spec)
    (ctr,) = spec.pop("containers")
    ctr = dict(ctr)
    flags = []
    if spec.pop("hostPID"):
        flags.append("--pid=host")
    if spec.pop("hostNetwork"):
        flags.append("--network=host")
    grace = spec.pop("terminationGracePeriodSeconds")
    flags.append(f"--stop-timeout={grace}")
    volumes = {v["name"]: v for v in spec.pop("volumes")}
    for key in CLUSTER_ONLY:
        spec.pop(key, None)
    assert not spec, f"pod spec fields this test does not reproduce: {sorted(spec)}"

    ctr.pop("name")
    image = ctr.pop("image")
    flags.append({"IfNotPresent": "--pull=missing", "Never": "--pull=never",
                  "Always": "--pull=always"}[ctr.pop("imagePullPolicy")])
    flags.append(f"--entrypoint={json.dumps(ctr.pop('command'))}")
    command = ctr.pop("args")
    # Ports of a hostNetwork pod are the node's own: nothing to map. The probes are played
    # by the test itself (the kubelet's part): it waits for /healthz.
    ctr.pop("ports")
    ctr.pop("livenessProbe")
    ctr.pop("readinessProbe")
    resources = ctr.pop("resources")
    flags.append(f"--memory={quantity_bytes(resources['limits']['memory'])}")
    cpu = resources["requests"]["cpu"]
    flags.append(f"--cpu-shares={max(2, int(cpu.removesuffix('m')) * 1024 // 1000)}")

    sec = dict(ctr.pop("securityContext"))
    if sec.pop("privileged"):
        flags.append("--privileged")
    flags.append(f"--user={sec.pop('runAsUser')}")
    sec.pop("runAsNonRoot")
    if not sec.pop("allowPrivilegeEscalation"):
        flags.append("--security-opt=no-new-privileges")
    if sec.pop("readOnlyRootFilesystem"):
        # Kubernetes adds no tmpfs to a read-only root: neither does the test.
        flags += ["--read-only", "--read-only-tmpfs=false"]
    caps = sec.pop("capabilities")
    flags += [f"--cap-drop={c}" for c in caps["drop"]]
    flags += [f"--cap-add={c}" for c in caps["add"]]
    assert sec.pop("seccompProfile") == {"type": "RuntimeDefault"}  # podman's default profile
    assert not sec, f"securityContext fields this test does not reproduce: {sorted(sec)}"

    for mount in ctr.pop("volumeMounts"):
        mount = dict(mount)
        host = volumes.pop(mount.pop("name"))["hostPath"]
        path = mount.pop("mountPath")
        if host["type"] == "DirectoryOrCreate":
            os.makedirs(host["path"], exist_ok=True)
        assert Path(host["path"]).is_dir(), f"hostPath {host['path']} missing on this host"
        options = ["ro" if mount.pop("readOnly") else "rw"]
        propagation = mount.pop("mountPropagation", "None")
        options.append({"None": "rprivate", "HostToContainer": "rslave"}[propagation])
        assert not mount, f"volumeMount fields this test does not reproduce: {sorted(mount)}"
        if path != without_mount:
            flags.append(f"--volume={host['path']}:{path}:{','.join(options)}")
    assert not volumes, f"volumes never mounted: {sorted(volumes)}"
    assert not ctr, f"container fields this test does not reproduce: {sorted(ctr)}"
    return flags, image, command


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory):
    """`podman ...` with this machine's test-only settings."""
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def run(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        done = subprocess.run(["podman", "--runtime", "runc", *args], capture_output=True,
                              text=True, env=env, timeout=timeout)
        assert not check or done.returncode == 0, f"podman {shlex.join(args)}: {done.stderr}"
        return done
    return run


@pytest.fixture(scope="module")
def image(podman) -> dict:
    """Build the image (or reuse it); its `podman image inspect` document."""
    name = pod_spec()["containers"][0]["image"]
    assert name == f"netmemtrace:{VERSION}", "the DaemonSet names another image than make builds"
    done = subprocess.run([str(BUILD), name], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    print(done.stdout.strip().splitlines()[-1])
    return json.loads(podman("image", "inspect", name).stdout)[0]


class Daemon:
    def __init__(self, podman, name: str) -> None:
        self.podman, self.name = podman, name
        self.url = "http://127.0.0.1:" + re.search(
            r":(\d+)$", pod_spec()["containers"][0]["args"][2])[1]

    def inspect(self) -> dict:
        return json.loads(self.podman("container", "inspect", self.name).stdout)[0]

    def pid(self) -> int:
        return self.inspect()["State"]["Pid"]


@pytest.fixture(scope="module")
def daemon(podman, image) -> Iterator[Daemon]:
    """The DaemonSet's container, ready once /healthz answers 200 (as its readiness probe)."""
    name = f"nmt-image-test-{os.getpid()}"
    flags, ref, command = pod_spec_flags(pod_spec())
    d = Daemon(podman, name)
    # The pod listens on the node's own port: anything already there would answer for it.
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", int(d.url.rpartition(":")[2]))) != 0, \
            f"{d.url} is taken on this host"
    # No systemd here to run podman's health-check timers: the test runs the check itself.
    try:
        podman("run", "--detach", f"--name={name}", "--health-interval=disable", *flags, ref,
               *command)
        deadline = time.monotonic() + 60
        while True:
            state = d.inspect()["State"]
            assert state["Running"], podman("logs", name).stderr
            try:
                if http_get(f"{d.url}/healthz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, podman("logs", name).stderr
            time.sleep(0.2)
        yield d
    finally:
        podman("rm", "--force", "--time=0", name, check=False)


def test_image_labels_contents_and_size(image, podman) -> None:
    labels = image["Labels"]
    assert labels["org.opencontainers.image.version"] == VERSION
    revision = labels["org.opencontainers.image.revision"].removesuffix("-dirty")
    # Reused images keep the commit they were built from: an ancestor with the same content.
    assert subprocess.run(["git", "merge-base", "--is-ancestor", revision, "HEAD"],
                          cwd=REPO).returncode == 0, revision
    assert re.match(r"(https?|git|ssh|file)://", labels["org.opencontainers.image.source"])
    assert image["Size"] <= SIZE_LIMIT_BYTES, f"{image['Size'] / 1e6:.0f} MB"
    assert image["Healthcheck"]["Test"][0] == "CMD"
    assert "/healthz" in " ".join(image["Healthcheck"]["Test"])
    # The CO-RE objects are the host's `make build` ones; no compiler, headers, pip, docs,
    # locales or apt lists inside.
    listing = podman("run", "--rm", "--network=none", "--entrypoint=/bin/sh",
                     f"netmemtrace:{VERSION}", "-c",
                     "cd /opt/netmemtrace/lib/python3*/site-packages/netmemtrace/bpfobj && "
                     "sha256sum *.bpf.o; find /usr/include /usr/src /usr/share/man "
                     "/usr/share/info /usr/share/locale /var/lib/apt/lists /var/cache/apt "
                     "-type f -size +0 -not -name locale.alias; "
                     "find /usr/share/doc -type f -not -name copyright -o -xtype l; "
                     "for t in cc gcc clang pip pip3 apt-get; do command -v $t; done; true"
                     ).stdout.splitlines()
    host = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in (REPO / "netmemtrace" / "bpfobj").glob("*.bpf.o")}
    inside = dict(reversed(line.split()) for line in listing if line.endswith(".bpf.o"))
    assert inside == host
    assert [line for line in listing if not line.endswith(".bpf.o")] == []


def test_probes_inside_equal_the_hosts(daemon) -> None:
    """With the manifest's mounts and capabilities the container picks the same mechanism,
    attaches the same hooks and gives the same reasons as the tool on the host."""
    inside = daemon.podman("exec", daemon.name, "netmemtrace", "probes").stdout
    host = subprocess.run([sys.executable, "-m", "netmemtrace.cli", "probes"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert inside == host
    assert " tracepoint " in host and " yes " in host


def path_view(root: str, path: str) -> set[str]:
    """Entries two levels under path as seen from root (a host or container /proc/PID/root);
    {"."} alone when it is an empty directory, empty when it does not exist."""
    base = Path(root + path)
    if not base.is_dir():
        return set()
    entries = {"."}
    for entry in base.iterdir():
        entries.add(entry.name)
        if entry.is_dir() and not entry.is_symlink():
            try:
                entries.update(f"{entry.name}/{sub.name}" for sub in entry.iterdir())
            except OSError:
                continue
    return entries


def test_every_mount_is_needed_and_shows_the_hosts_view(daemon, podman) -> None:
    """Each hostPath mount gives the container the host's view of its path, and without it
    the container sees something else (so none is there for nothing)."""
    mounts = [m["mountPath"] for m in pod_spec()["containers"][0]["volumeMounts"]]
    root = f"/proc/{daemon.pid()}/root"
    for path in mounts:
        before = path_view("", path)
        inside = path_view(root, path)
        stable = before & path_view("", path)  # cgroups and netns of other tests come and go
        assert stable <= inside, (path, sorted(stable - inside)[:10])
        flags, ref, _ = pod_spec_flags(pod_spec(), without_mount=path)
        name = f"nmt-image-nomount-{os.getpid()}"
        podman("run", "--detach", f"--name={name}", "--health-interval=disable", *flags,
               "--entrypoint=/bin/sleep", ref, "30")
        try:
            pid = json.loads(podman("container", "inspect", name).stdout)[0]["State"]["Pid"]
            without = path_view(f"/proc/{pid}/root", path)
        finally:
            podman("rm", "--force", "--time=0", name, check=False)
        assert stable - without, f"{path}: the same view without the mount"


def test_prometheus_scrapes_the_container(daemon, tmp_path: Path) -> None:
    """A real Prometheus scrapes the container: the hooks it reports attached are the host's
    `probes`, and a page pool in a named netns of the host is seen with its netns name."""
    host = subprocess.run([sys.executable, "-m", "netmemtrace.cli", "probes"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=True).stdout
    rows = [line.split() for line in host.splitlines()[1:] if line and line[0] != " "]
    attached = {(r[0], r[1]) for r in rows if len(r) > 3 and r[3] == "yes"}
    prom = Prometheus(tmp_path, {"static_configs": [
        {"targets": [daemon.url.removeprefix("http://")]}]})
    try:
        with demo.VethTopology() as topo:
            demo.tcp_stream(topo, 4 << 20)
            selector = (f'{{netdev="{topo.rx_dev}", netns="{topo.rx_netns}", '
                        f'netmem="page"}}')
            found = prom.wait_for(
                lambda: prom.query(f"netmemtrace_page_pool_hold_pages_total{selector} > 0"),
                "the demo pool scraped from the container")
            assert len(found) == 1
        series = prom.query("netmemtrace_probe_attached == 1")
        assert {(s["metric"]["object"], s["metric"]["hook"]) for s in series} == attached
        assert prom.query('up{job="netmemtrace"}')[0]["value"][1] == "1"
        (info,) = prom.query("netmemtrace_build_info")
        assert info["metric"]["version"] == VERSION
    finally:
        prom.close()


def test_healthcheck_is_the_healthz_endpoint(daemon, image, podman) -> None:
    assert podman("healthcheck", "run", daemon.name, check=False).returncode == 0
    # The same check where nothing listens: unhealthy.
    cmd = image["Healthcheck"]["Test"][1:]
    done = podman("run", "--rm", "--network=none", f"--entrypoint={cmd[0]}",
                  f"netmemtrace:{VERSION}", *cmd[1:], check=False)
    assert done.returncode != 0 and "Connection refused" in done.stderr, done.stderr


def test_read_only_root_and_dropped_capabilities(daemon) -> None:
    pid = daemon.pid()
    mountinfo = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    (root,) = [line.split() for line in mountinfo if line.split()[4] == "/"]
    assert "ro" in root[5].split(","), root
    status = Path(f"/proc/{pid}/status").read_text()
    assert int(re.search(r"CapEff:\s+(\w+)", status)[1], 16) == sum(1 << c for c in caps.KEEP)
    (broker,) = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    assert Path(f"/proc/{broker}/comm").read_text().strip() == netns_broker.BROKER_COMM.decode()
    check_broker_process(broker)


def test_sigterm_detaches_every_bpf_program(daemon) -> None:
    """Last: `podman stop` sends SIGTERM; the daemon exits 0 within the grace period and no
    program it held is left in the kernel (ids it held, not a global count: other tests load
    BPF on this machine too)."""
    pid = daemon.pid()
    held = prog_ids_held_by(pid)
    assert held and held <= bpf_prog_ids()
    grace = pod_spec()["terminationGracePeriodSeconds"]
    start = time.monotonic()
    daemon.podman("stop", f"--time={grace}", daemon.name, timeout=grace + 30)
    took = time.monotonic() - start
    state = daemon.inspect()["State"]
    assert state["ExitCode"] == 0, daemon.podman("logs", daemon.name).stderr
    assert took < grace, f"stopped after {took:.1f} s: killed, not terminated"
    assert not held & bpf_prog_ids(), "BPF programs left loaded"
