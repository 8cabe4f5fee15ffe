"""cgroup id -> path resolution, polled socket-memory files and container/pod identity, on
realistic path shapes and on a fake cgroup tree (ids are inode numbers, as on the kernel)."""

from __future__ import annotations

import os

import pytest

from netmemtrace.host import cgroups
from netmemtrace.host.cgroups import CgroupIdentity, identity

CID = "3f2a9c0d5e7b8a1c4d6e8f0a2b4c6d8e0f1a3b5c7d9e1f2a4b6c8d0e2f4a6b8c"
UID = "0d9e5f1a-7b2c-4c3d-9e8f-1a2b3c4d5e6f"

IDENTITY_TABLE = [
    # systemd cgroup driver (kubelet + containerd / cri-o / docker)
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}"
     f".slice/cri-containerd-{CID}.scope",
     CgroupIdentity("containerd", CID, UID, "burstable", None)),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID.replace('-', '_')}"
     f".slice/crio-{CID}.scope",
     CgroupIdentity("cri-o", CID, UID, "besteffort", None)),
    (f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/docker-{CID}.scope",
     CgroupIdentity("docker", CID, UID, "guaranteed", None)),
    # the pod's own slice, no container
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}"
     ".slice", CgroupIdentity(None, None, UID, "burstable", None)),
    # cgroupfs driver
    (f"/kubepods/besteffort/pod{UID}/{CID}", CgroupIdentity(None, CID, UID, "besteffort", None)),
    (f"/kubepods/pod{UID}/{CID}", CgroupIdentity(None, CID, UID, "guaranteed", None)),
    # plain docker, both drivers; podman
    (f"/system.slice/docker-{CID}.scope", CgroupIdentity("docker", CID, None, None, None)),
    (f"/docker/{CID}", CgroupIdentity("docker", CID, None, None, None)),
    (f"/machine.slice/libpod-{CID}.scope", CgroupIdentity("podman", CID, None, None, None)),
    # systemd services and sessions: no container
    ("/system.slice/nginx.service", CgroupIdentity(None, None, None, None, "nginx.service")),
    ("/user.slice/user-1000.slice/session-4.scope",
     CgroupIdentity(None, None, None, None, "session-4.scope")),
    ("/", CgroupIdentity(None, None, None, None, None)),
    # a directory that merely looks like hex is not a container outside docker/kubepods
    (f"/batch/{CID}", CgroupIdentity(None, None, None, None, None)),
]


@pytest.mark.parametrize(("path", "expected"), IDENTITY_TABLE)
def test_identity(path: str, expected: CgroupIdentity) -> None:
    assert identity(path) == expected


@pytest.mark.parametrize(("path", "prefix", "inside"), [
    ("/a/b", "/a", True), ("/a", "/a", True), ("/ab", "/a", False), ("/a/b", "/", True),
    ("/a/b", "a/b/", True), ("/x", "/a", False),
])
def test_is_under(path: str, prefix: str, inside: bool) -> None:
    assert cgroups.is_under(path, prefix) is inside


@pytest.fixture
def v1_tree(tmp_path):
    root = tmp_path / "cg"
    for d in ("memory/system.slice/app.service", "memory/kubepods/pod1", "unified"):
        (root / d).mkdir(parents=True)
    (root / "memory" / "memory.stat").write_text("cache 0\n")
    (root / "unified" / "cgroup.controllers").write_text("cpu io\n")
    return root


def test_hierarchy_detection(v1_tree, tmp_path) -> None:
    assert cgroups.memory_hierarchy(v1_tree) == "v1"
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert cgroups.memory_hierarchy(v2) == "v2"
    assert cgroups.CgroupResolver.for_memory(v2).mount == v2


def test_resolver_maps_inode_ids_and_notices_new_and_deleted(v1_tree) -> None:
    r = cgroups.CgroupResolver.for_memory(v1_tree)
    assert r.hierarchy == "v1"
    svc = v1_tree / "memory/system.slice/app.service"
    assert r.path(os.stat(svc).st_ino) == "/system.slice/app.service"
    assert r.path(os.stat(v1_tree / "memory").st_ino) == "/"
    assert r.cgroup_id("/kubepods/pod1") == os.stat(v1_tree / "memory/kubepods/pod1").st_ino
    new = v1_tree / "memory/kubepods/pod2"
    new.mkdir()
    r.refresh()
    assert r.path(os.stat(new).st_ino) == "/kubepods/pod2"
    gone = os.stat(svc).st_ino
    svc.rmdir()
    r.refresh()
    assert r.path(gone) is None


def test_polled_v1_inactive_is_not_zero(v1_tree) -> None:
    r = cgroups.CgroupResolver.for_memory(v1_tree)
    d = v1_tree / "memory/kubepods/pod1"
    (d / "memory.kmem.tcp.limit_in_bytes").write_text(f"{cgroups._PAGE_COUNTER_MAX_BYTES}\n")
    (d / "memory.kmem.tcp.usage_in_bytes").write_text("0\n")
    p = cgroups.polled_sock(r, "/kubepods/pod1")
    assert p.bytes is None and "inactive" in p.reason
    (d / "memory.kmem.tcp.limit_in_bytes").write_text("1073741824\n")
    (d / "memory.kmem.tcp.usage_in_bytes").write_text("90112\n")
    assert cgroups.polled_sock(r, "/kubepods/pod1").bytes == 90112


def test_polled_v2_reads_memory_stat_sock(tmp_path) -> None:
    (tmp_path / "cgroup.controllers").write_text("memory\n")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "memory.stat").write_text("anon 4096\nsock 12288\nshmem 0\n")
    r = cgroups.CgroupResolver.for_memory(tmp_path)
    p = cgroups.polled_sock(r, "/a")
    assert (p.bytes, p.source) == (12288, "memory.stat sock (polled)")
