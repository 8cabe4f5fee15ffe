"""The ABI lives once, in bpf/netmemtrace.h: every struct declared there reaches Python through
the object's BTF with the same members in the same order and the same size."""

from __future__ import annotations

import ctypes
import re

from conftest import REPO

from netmemtrace import abi

HEADER = (REPO / "bpf" / "netmemtrace.h").read_text()


def header_structs() -> dict[str, list[str]]:
    """struct name -> member names, parsed from the header text."""
    out = {}
    for name, body in re.findall(r"^struct (\w+) \{\n(.*?)^\}[^;\n]*;", HEADER, re.S | re.M):
        body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
        out[name] = [re.findall(r"(\w+)(?:\[\w+\])?;", decl)[0]
                     for decl in body.split(";") if decl.strip() for decl in [decl + ";"]]
    return out


def test_header_structs_match_btf() -> None:
    structs = header_structs()
    assert {"pool_counters", "pool_info", "retired_pool", "pagepool_stats"} <= set(structs)
    btf = abi.btf("pagepool")
    for name, members in structs.items():
        try:
            cls = btf.struct(name)
        except abi.AbiError:
            continue  # declared for another object
        fields = [f for f, _ in cls._fields_ if not f.startswith("_pad")]
        assert fields == members, name


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
