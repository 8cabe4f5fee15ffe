"""Child memory cgroups for tests: created under the test process's own memory cgroup
(never touching others) and removed afterwards. Either hierarchy: v1 on the CI host, v2 in
the kernel matrix's guests."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from netmemtrace.host import cgroups

HIERARCHY = cgroups.memory_hierarchy()


def mount() -> Path:
    """Where the memory hierarchy is mounted."""
    if HIERARCHY == "v2":
        root = cgroups.v2_root()
        assert root is not None
        return root
    return cgroups.V1_MEMORY


def own_memcg() -> str:
    with open("/proc/self/cgroup") as f:
        for line in f:
            hid, controllers, path = line.rstrip("\n").split(":", 2)
            if (HIERARCHY == "v2" and hid == "0") or "memory" in controllers.split(","):
                return path
    raise RuntimeError("no memory controller in /proc/self/cgroup")


def sock_bytes(d: Path) -> int:
    """Socket memory charged to the memcg at d now, from its own file: v1's tcp usage
    (accounted once a tcp limit is set), v2's memory.stat sock (always accounted)."""
    if HIERARCHY == "v2":
        stat = dict(line.split() for line in (d / "memory.stat").read_text().splitlines())
        return int(stat["sock"])
    return int((d / "memory.kmem.tcp.usage_in_bytes").read_text())


@contextlib.contextmanager
def child_memcg(name: str, tcp_limit: int | None = None) -> Iterator[tuple[Path, str]]:
    """(directory, path relative to the memory hierarchy) of a new child memcg. tcp_limit:
    v1's memory.kmem.tcp.limit_in_bytes, which turns its socket accounting on (v2 has no
    such switch: sockets are always charged)."""
    rel = f"{own_memcg().rstrip('/')}/nmt-{os.getpid()}-{name}"
    d = mount() / rel.lstrip("/")
    d.mkdir()
    try:
        if tcp_limit is not None and HIERARCHY == "v1":
            (d / "memory.kmem.tcp.limit_in_bytes").write_text(str(tcp_limit))
        yield d, rel
    finally:
        remove_cgroup(d)


def remove_cgroup(d: Path, within_s: float = 30) -> None:
    """rmdir, retried: exiting members leave the cgroup a moment after they are reaped."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            d.rmdir()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def child_cgroup_v2(name: str) -> Iterator[tuple[Path, str]]:
    """child_memcg on cgroup v2, whose memory controller the parent must already hand down
    (the guests' init does for /)."""
    assert HIERARCHY == "v2", "the memory controller is not on cgroup v2 here"
    with child_memcg(name) as (d, rel):
        assert (d / "memory.stat").exists(), \
            f"{d.parent}/cgroup.subtree_control does not enable the memory controller"
        yield d, rel


def memory_stat(d: Path, key: str) -> int:
    for line in (d / "memory.stat").read_text().splitlines():
        k, _, v = line.partition(" ")
        if k == key:
            return int(v)
    raise KeyError(f"{key} not in {d}/memory.stat")
