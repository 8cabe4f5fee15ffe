"""`netmemtrace dump`: one Snapshot as a versioned JSON document (schema in README.md)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from netmemtrace.host import cgroups
from netmemtrace.snapshot import SCHEMA_VERSION, Snapshot, Unavailable
from netmemtrace.views.utf8 import visible


def _plain(value: Any) -> Any:
    if isinstance(value, Unavailable):
        return {"unavailable": value.reason}
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, str):
        return visible(value)
    return value


def to_document(snap: Snapshot) -> dict[str, Any]:
    doc = {"schema_version": SCHEMA_VERSION, **_plain(snap)}
    for pool in doc["pools"]:
        if pool["pool_addr"] is not None:  # None: a pool only netlink lists
            pool["pool_addr"] = f"{pool['pool_addr']:#x}"  # kernel addresses read best in hex
    return doc


def render(snap: Snapshot) -> str:
    return json.dumps(to_document(snap), indent=2, sort_keys=False)


# ---- `dump --cgroup PATH --pid PID` (and `--verify`): a view of part of a Snapshot ----


def filter_snapshot(snap: Snapshot, cgroup: str | None = None, pid: int | None = None
                    ) -> Snapshot:
    """Only memcgs at or under cgroup; with pid, only the memcgs and process row of pid."""
    memcgs = []
    for m in snap.memcgs:
        if cgroup is not None and (m.path is None or not cgroups.is_under(m.path, cgroup)):
            continue
        if pid is not None:
            procs = tuple(p for p in m.processes if p.pid == pid)
            if not procs:
                continue
            m = dataclasses.replace(m, processes=procs)
        memcgs.append(m)
    return dataclasses.replace(snap, memcgs=tuple(memcgs))



def no_match_reason(snap: Snapshot, cgroup: str | None, pid: int | None,
                    mount: Path | None) -> str:
    """Why `dump --cgroup/--pid` selected no memory cgroup row: one line for stderr.

    mount is the memory hierarchy (CgroupResolver.mount), None when there is none."""
    if snap.memcg_self_stats is None:
        return "memory cgroup figures are unavailable in this snapshot (see its errors)"
    if pid is not None and not any(p.pid == pid for m in snap.memcgs for p in m.processes):
        if not os.path.exists(f"/proc/{pid}"):
            return (f"--pid {pid}: no such process, and none with that pid made a zerocopy "
                    "call before exiting while traced")
        return (f"--pid {pid}: the process made no zerocopy call while traced (only "
                "processes that did have a row)")
    if cgroup is not None and (mount is None or not (mount / cgroup.lstrip("/")).is_dir()):
        where = f"under {mount}" if mount else "(no memory cgroup hierarchy is mounted)"
        return f"--cgroup {cgroup}: no such memory cgroup {where}"
    if cgroup is not None and pid is not None:
        return f"--pid {pid} has no row at or under --cgroup {cgroup}"
    return (f"--cgroup {cgroup}: no socket memory or zerocopy event at or under it while "
            "traced")
