"""Memory cgroups: which hierarchy carries the memory controller, cgroup id -> path on
either hierarchy, the polled socket-memory files, and container / pod identity from the
path shapes of systemd, docker, containerd, cri-o, podman and the kubelet.

A cgroup id is the kernfs node id of the cgroup's directory; on 64-bit kernels that is
also the directory's inode number, so a walk with stat() maps ids to paths. Each hierarchy
has its own id space: an id is only meaningful together with the hierarchy.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_MEMORY = CGROUP_ROOT / "memory"
# The largest page_counter limit: what memory.kmem.tcp.limit_in_bytes reads until set.
_PAGE_COUNTER_MAX_BYTES = (2**63 - 1) // os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PAGE_SIZE")
MAX_WALK = 20000  # directories per id-resolution walk; hierarchies larger are cut off


def v2_root(root: Path = CGROUP_ROOT) -> Path | None:
    """The cgroup2 mount: the root itself (unified) or root/unified (hybrid)."""
    for cand in (root, root / "unified"):
        if (cand / "cgroup.controllers").exists():
            return cand
    return None


def memory_hierarchy(root: Path = CGROUP_ROOT) -> str | None:
    """"v2" if the memory controller is on cgroup2, "v1" if on its own hierarchy, else None."""
    v2 = v2_root(root)
    if v2 is not None and "memory" in (v2 / "cgroup.controllers").read_text().split():
        return "v2"
    if (root / "memory" / "memory.stat").exists():
        return "v1"
    return None


class CgroupResolver:
    """cgroup id -> path relative to the hierarchy root ("/" for the root), cached; a miss
    rewalks the hierarchy at most once per refresh() so deleted ids cost one walk."""

    def __init__(self, hierarchy: str, mount: Path) -> None:
        self.hierarchy = hierarchy
        self.mount = mount
        self._paths: dict[int, str] = {}
        self._walked = False
        self._checked: set[int] = set()

    @classmethod
    def for_memory(cls, root: Path = CGROUP_ROOT) -> CgroupResolver | None:
        hierarchy = memory_hierarchy(root)
        if hierarchy == "v2":
            mount = v2_root(root)
            assert mount is not None
            return cls("v2", mount)
        if hierarchy == "v1":
            return cls("v1", root / "memory")
        return None

    def refresh(self) -> None:
        """Allow the next miss to rewalk and recheck cached paths (once per snapshot)."""
        self._walked = False
        self._checked: set[int] = set()

    def _walk(self) -> None:
        self._walked = True
        paths: dict[int, str] = {}
        stack = [self.mount]
        while stack and len(paths) < MAX_WALK:
            d = stack.pop()
            try:
                paths[os.stat(d).st_ino] = "/" + str(d.relative_to(self.mount)).strip(".")
                stack.extend(e for e in d.iterdir() if e.is_dir() and not e.is_symlink())
            except OSError:
                continue  # removed while walking
        self._paths = paths

    def path(self, cgroup_id: int) -> str | None:
        """The cgroup's path now, or None once it is deleted (kernfs never reuses ids)."""
        cached = self._paths.get(cgroup_id)
        if cached is not None and cgroup_id not in self._checked:
            self._checked.add(cgroup_id)
            try:
                if os.stat(self.fs_path(cached)).st_ino != cgroup_id:
                    cached = None
            except OSError:
                cached = None
            if cached is None:
                del self._paths[cgroup_id]
        if cached is None and not self._walked:
            self._walk()
            cached = self._paths.get(cgroup_id)
        return cached

    def cgroup_id(self, path: str) -> int:
        return os.stat(self.fs_path(path)).st_ino

    def fs_path(self, path: str) -> Path:
        return self.mount / path.lstrip("/")


def is_under(path: str, prefix: str) -> bool:
    """Whether cgroup path is prefix or inside its subtree."""
    prefix = "/" + prefix.strip("/")
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


@dataclass(frozen=True)
class PolledSock:
    """Socket memory charged now, from the cgroup's own files (not an event count)."""

    bytes: int | None       # None: not accounted (see reason)
    source: str
    reason: str = ""


def polled_sock(resolver: CgroupResolver, path: str) -> PolledSock:
    d = resolver.fs_path(path)
    if resolver.hierarchy == "v2":
        for line in (d / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "sock":
                return PolledSock(int(value), "memory.stat sock (polled)")
        return PolledSock(None, "memory.stat sock (polled)", "no sock line in memory.stat")
    source = "memory.kmem.tcp.usage_in_bytes (polled)"
    limit = int((d / "memory.kmem.tcp.limit_in_bytes").read_text())
    usage = int((d / "memory.kmem.tcp.usage_in_bytes").read_text())
    if limit >= _PAGE_COUNTER_MAX_BYTES and usage == 0:
        # cgroup v1 only accounts TCP memory once a tcp limit has been set on the cgroup:
        # its sockets are charged to nobody, which is not the same as 0.
        return PolledSock(None, source, "inactive: memory.kmem.tcp.limit_in_bytes never set")
    return PolledSock(usage, source)


@dataclass(frozen=True)
class CgroupIdentity:
    runtime: str | None        # docker / containerd / cri-o / podman / None
    container_id: str | None
    pod_uid: str | None        # Kubernetes pod UID
    qos_class: str | None      # guaranteed / burstable / besteffort (kubepods)
    systemd_unit: str | None   # innermost .service / .scope that is not a container


_RUNTIMES = {"docker": "docker", "cri-containerd": "containerd", "crio": "cri-o",
             "libpod": "podman", "containerd": "containerd"}
_SCOPE_RE = re.compile(r"^(docker|cri-containerd|crio|libpod|containerd)-([0-9a-f]{12,64})\.scope$")
_POD_SLICE_RE = re.compile(r"^kubepods(?:-(burstable|besteffort))?-pod([0-9a-f_-]+)\.slice$")
_POD_DIR_RE = re.compile(r"^pod([0-9a-f-]{8,})$")
_HEX_ID_RE = re.compile(r"^[0-9a-f]{64}$")


def identity(path: str) -> CgroupIdentity:
    """Container and pod identity from a cgroup path, for the shapes in common use:

    systemd driver  /kubepods.slice/kubepods-burstable.slice/
                    kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope
    cgroupfs driver /kubepods/besteffort/pod<uid>/<id>
    docker          /system.slice/docker-<id>.scope, /docker/<id>
    podman          /machine.slice/libpod-<id>.scope
    """
    runtime = container = pod = qos = unit = None
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        if m := _SCOPE_RE.match(part):
            runtime, container = _RUNTIMES[m.group(1)], m.group(2)
        elif m := _POD_SLICE_RE.match(part):
            qos = m.group(1) or "guaranteed"
            pod = m.group(2).replace("_", "-")
        elif part in ("burstable", "besteffort") and i > 0 and parts[i - 1] == "kubepods":
            qos = part
        elif (m := _POD_DIR_RE.match(part)) and "kubepods" in parts[:i]:
            pod = m.group(1)
            qos = qos or "guaranteed"
        elif _HEX_ID_RE.match(part) and i > 0 and (pod or parts[i - 1] == "docker"):
            container = part
            runtime = "docker" if parts[i - 1] == "docker" else runtime
        elif part.endswith((".service", ".scope")) and container is None:
            unit = part
    return CgroupIdentity(runtime, container, pod, qos, unit)
