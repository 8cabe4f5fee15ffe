"""The ABI lives once, in bpf/netmemtrace.h: every struct declared there reaches Python through
the object's BTF with the same members in the same order and the same size."""

from __future__ import annotations

import ctypes
import re

import pytest
from conftest import REPO

from netmemtrace.kernel import abi
from netmemtrace.session import OBJECT_SPECS

HEADER = (REPO / "bpf" / "netmemtrace.h").read_text()


def header_structs() -> dict[str, list[str]]:
    """struct name -> member names, parsed from the header text."""
    out = {}
    for name, body in re.findall(r"^struct (\w+) \{\n(.*?)^\}[^;\n]*;", HEADER, re.S | re.M):
        body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
        out[name] = [re.findall(r"(\w+)(?:\[\w+\])?;", decl)[0]
                     for decl in body.split(";") if decl.strip() for decl in [decl + ";"]]
    return out


def header_enums() -> dict[str, dict[str, int]]:
    """enum name -> {constant: value}, parsed from the header text (explicit values)."""
    out = {}
    for name, body in re.findall(r"^enum (\w+) \{\n(.*?)^\};", HEADER, re.S | re.M):
        body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
        out[name] = {k: int(v) for k, v in re.findall(r"(\w+)\s*=\s*(\d+)", body)}
    return out


# Every object the session loads (session.OBJECT_SPECS), each built with its own BTF.
OBJECTS = [spec.name for spec in OBJECT_SPECS]


@pytest.mark.parametrize("obj", OBJECTS)
def test_header_structs_match_every_objects_btf(obj: str) -> None:
    btf = abi.btf(obj)
    used = [name for name in header_structs() if name in btf.names("STRUCT")]
    assert used, f"{obj} uses no struct of netmemtrace.h"
    for name in used:
        assert abi.fields(btf.struct(name)) == header_structs()[name], (obj, name)


@pytest.mark.parametrize("obj", OBJECTS)
def test_header_enums_match_every_objects_btf(obj: str) -> None:
    btf = abi.btf(obj)
    for name, values in header_enums().items():
        if name in btf.names("ENUM"):
            assert btf.enum(name) == values, (obj, name)


def test_every_header_struct_and_enum_reaches_python_through_some_object() -> None:
    # A struct or enum no object carries in its BTF could only be read by a hand copy.
    carried = {kind: set().union(*(abi.btf(o).names(kind) for o in OBJECTS))
               for kind in ("STRUCT", "ENUM")}
    assert set(header_structs()) - carried["STRUCT"] == set()
    # netmem_kind only sizes the hold/release arrays of pool_counters: no member has its
    # type, so no BTF carries it (the reader indexes those arrays as page, net_iov).
    assert set(header_enums()) - carried["ENUM"] == {"netmem_kind"}


@pytest.mark.parametrize("spec", [s for s in OBJECT_SPECS if s.stats], ids=lambda s: s.name)
def test_every_stats_struct_is_plain_counters(spec) -> None:
    # abi.Stats reads it generically: every member a __u64 counter, named by the header.
    cls = abi.btf(spec.name).struct(spec.stats)
    assert cls._fields_ and all(t is ctypes.c_uint64 for _, t in cls._fields_), spec.stats
    assert abi.fields(cls) == header_structs()[spec.stats]


def test_layout_sizes_are_what_c_says() -> None:
    btf = abi.btf("pagepool")
    assert ctypes.sizeof(btf.struct("pool_counters")) == 8 + 2 * 16 + 8
    info = btf.struct("pool_info")
    # seven __u64, ten 32-bit fields, then char[16]: 8-byte aligned, no padding
    assert info.ifname.offset == 7 * 8 + 10 * 4
    assert ctypes.sizeof(info) == 112


def test_decode_round_trip() -> None:
    cls = abi.btf("pagepool").struct("pool_info")
    value = cls(pool=0xFFFF888000001000, ifindex=-1, ifname=b"eth0")
    back = abi.to_dict(abi.decode(cls, bytes(value)))
    assert back["pool"] == 0xFFFF888000001000
    assert back["ifindex"] == -1
    assert back["ifname"] == "eth0"
