"""`netmemtrace dump`: one Snapshot as a versioned JSON document (schema in README.md)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..snapshot import SCHEMA_VERSION, Snapshot, Unavailable
from .utf8 import visible


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
