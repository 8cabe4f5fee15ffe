"""The kernel-facing ABI, read from the BTF of the compiled BPF objects.

bpf/netmemtrace.h is the only place the shared structs are written. `make build` dumps each
object's BTF to JSON (bpftool btf dump -j); this module turns the named structs of that dump
into ctypes types, so Python decodes map keys and values without a second copy of the layout.
"""

from __future__ import annotations

import ctypes
import functools
import json
from pathlib import Path
from typing import Any

BPF_OBJ_DIR = Path(__file__).parent.parent / "bpfobj"

_INT_TYPES = {
    (1, False): ctypes.c_uint8, (1, True): ctypes.c_int8,
    (2, False): ctypes.c_uint16, (2, True): ctypes.c_int16,
    (4, False): ctypes.c_uint32, (4, True): ctypes.c_int32,
    (8, False): ctypes.c_uint64, (8, True): ctypes.c_int64,
}


class AbiError(RuntimeError):
    pass


def object_path(name: str) -> Path:
    """Path of a built BPF object, e.g. object_path("pagepool")."""
    path = BPF_OBJ_DIR / f"{name}.bpf.o"
    if not path.exists():
        raise AbiError(f"BPF object {path} is not built: run `make build`")
    return path


class Btf:
    """Named C types of one BPF object, as ctypes types."""

    def __init__(self, types: list[dict[str, Any]]) -> None:
        self._by_id = {t["id"]: t for t in types}
        self._by_name = {
            (t["kind"], t["name"]): t for t in types if t.get("name") not in (None, "(anon)")
        }
        self._cache: dict[int, Any] = {}

    def struct(self, name: str) -> type[ctypes.Structure]:
        t = self._by_name.get(("STRUCT", name))
        if t is None:
            raise AbiError(f"struct {name} not in the BPF object's BTF")
        return self._ctype(t["id"])

    def enum(self, name: str, prefix: str = "") -> dict[str, int]:
        """name -> value of an enum, names without prefix (with prefix "ZC_EV_",
        ZC_EV_RX_MAP is "RX_MAP")."""
        t = self._by_name.get(("ENUM", name))
        if t is None:
            raise AbiError(f"enum {name} not in the BPF object's BTF")
        return {v["name"].removeprefix(prefix): v["val"] for v in t["values"]}

    def names(self, kind: str) -> list[str]:
        """Every named type of a kind ("STRUCT", "ENUM")."""
        return [name for k, name in self._by_name if k == kind]

    def _ctype(self, type_id: int) -> Any:
        if type_id not in self._cache:
            self._cache[type_id] = self._build(self._by_id[type_id])
        return self._cache[type_id]

    def _build(self, t: dict[str, Any]) -> Any:
        kind = t["kind"]
        if kind in ("TYPEDEF", "CONST", "VOLATILE"):
            return self._ctype(t["type_id"])
        if kind == "INT":
            if t["encoding"] == "BOOL":
                return ctypes.c_bool
            if t["encoding"] == "CHAR" or (t["size"] == 1 and "char" in t["name"]):
                return ctypes.c_char
            return _INT_TYPES[(t["size"], t["encoding"] == "SIGNED")]
        if kind == "ENUM":
            return _INT_TYPES[(t["size"], False)]
        if kind == "PTR":
            return ctypes.c_uint64
        if kind == "ARRAY":
            return self._ctype(t["type_id"]) * t["nr_elems"]
        if kind == "STRUCT":
            return self._struct(t)
        raise AbiError(f"BTF kind {kind} ({t.get('name')}) is not used in shared structs")

    def _struct(self, t: dict[str, Any]) -> type[ctypes.Structure]:
        fields: list[tuple[str, Any]] = []
        offset = 0
        for m in t["members"]:
            if m.get("bitfield_size"):
                raise AbiError(f"bitfield {t['name']}.{m['name']}: keep shared structs plain")
            start = m["bits_offset"] // 8
            if start > offset:
                fields.append((f"_pad{offset}", ctypes.c_uint8 * (start - offset)))
            ctype = self._ctype(m["type_id"])
            fields.append((m["name"], ctype))
            offset = start + ctypes.sizeof(ctype)
        if t["size"] > offset:
            fields.append((f"_pad{offset}", ctypes.c_uint8 * (t["size"] - offset)))
        cls = type(t["name"], (ctypes.Structure,), {"_pack_": 1, "_fields_": fields})
        if ctypes.sizeof(cls) != t["size"]:
            raise AbiError(f"struct {t['name']}: built {ctypes.sizeof(cls)} bytes, BTF says "
                           f"{t['size']}")
        return cls


@functools.cache
def btf(object_name: str) -> Btf:
    path = BPF_OBJ_DIR / f"{object_name}.bpf.json"
    if not path.exists():
        raise AbiError(f"{path} is not built: run `make build`")
    return Btf(json.loads(path.read_text())["types"])


def decode(cls: type[ctypes.Structure], raw: bytes) -> ctypes.Structure:
    return cls.from_buffer_copy(raw[: ctypes.sizeof(cls)])


def fields(cls: type[ctypes.Structure]) -> list[str]:
    """A struct's member names, padding left out."""
    return [name for name, _ in cls._fields_ if not name.startswith("_pad")]


def counters(cls: type[ctypes.Structure], values: list[bytes]) -> dict[str, int]:
    """Every member of a struct of counters, summed over values (one per CPU)."""
    decoded = [decode(cls, v) for v in values]
    return {name: sum(getattr(d, name) for d in decoded) for name in fields(cls)}


class Stats:
    """The `*_stats` map of an object: one entry (key 0), a struct of __u64 counters of the
    map's own name, per CPU or shared. What the BPF side dropped or counted beside its maps;
    read generically, so a counter added to the struct needs no Python edit."""

    def __init__(self, object_name: str, bpf_map: Any) -> None:
        self._cls = btf(object_name).struct(bpf_map.name)
        self._map = bpf_map

    def read(self) -> dict[str, int]:
        values = self._map.lookup_per_cpu(ctypes.c_uint32(0))
        return counters(self._cls, values or [])


def to_dict(value: Any) -> Any:
    """A ctypes struct/array as plain Python data (char arrays become str)."""
    if isinstance(value, ctypes.Structure):
        return {
            name: to_dict(getattr(value, name))
            for name, _ in value._fields_
            if not name.startswith("_pad")
        }
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, ctypes.Array):
        return [to_dict(v) for v in value]
    return value
