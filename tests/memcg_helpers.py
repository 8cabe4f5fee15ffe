"""Child memory cgroups for tests: created under the test process's own memory cgroup
(never touching others) and removed afterwards."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

V1 = Path("/sys/fs/cgroup/memory")


def own_memcg() -> str:
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                return path
    raise RuntimeError("no memory controller in /proc/self/cgroup")


@contextlib.contextmanager
def child_memcg(name: str, tcp_limit: int | None = None) -> Iterator[tuple[Path, str]]:
    """(directory, path relative to the memory hierarchy) of a new child memcg."""
    rel = f"{own_memcg().rstrip('/')}/nmt-{os.getpid()}-{name}"
    d = V1 / rel.lstrip("/")
    d.mkdir()
    try:
        if tcp_limit is not None:
            (d / "memory.kmem.tcp.limit_in_bytes").write_text(str(tcp_limit))
        yield d, rel
    finally:
        deadline = time.monotonic() + 10
        while True:
            try:
                d.rmdir()
                break
            except OSError:
                # Exiting members leave the cgroup a moment after they are reaped.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
