"""Issue 17.1: a memory cgroup whose directory name is not valid UTF-8 must not break
/metrics, /healthz or dump's JSON; its undecodable bytes are shown as \\xNN."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from conftest import AttachedDump
from memcg_helpers import child_memcg
from prometheus_client.exposition import choose_encoder
from test_exporter import full_snapshot, memcg
from test_serve_live import Served, http_get, values
from test_zerocopy_live import Workload, netns, workload  # noqa: F401 (fixtures)

from netmemtrace.views import dump
from netmemtrace.views.prometheus.collector import SnapshotCollector
from netmemtrace.views.prometheus.encode import OPENMETRICS, TEXT, encode, render
from netmemtrace.views.utf8 import visible

# What os.fsdecode makes of the bytes b"/bad-\xff\xfe-name": lone surrogates.
RAW = os.fsdecode(b"/bad-\xff\xfe-name")
SHOWN = "/bad-\\xff\\xfe-name"


def test_visible_escapes_only_undecodable_bytes() -> None:
    assert visible(RAW) == SHOWN
    assert visible("/ü→名.scope") == "/ü→名.scope"  # valid UTF-8 untouched
    assert visible("a\ud800b") == "a\\ud800b"  # a surrogate of another origin
    with pytest.raises(UnicodeEncodeError):
        RAW.encode()  # what failed every scrape before


def snap_with_bad_cgroup():
    full = full_snapshot()
    return dataclasses.replace(full, memcgs=(*full.memcgs, memcg(cgroup_id=2, path=RAW)))


@pytest.mark.parametrize("fmt", [TEXT, OPENMETRICS])
def test_exposition_is_utf8_with_the_bytes_visible(fmt: str) -> None:
    snap = snap_with_bad_cgroup()
    families = SnapshotCollector(lambda: snap).families()
    body = encode(families, fmt).decode("utf-8")  # strict: raises on any surrogate
    # Label escaping doubles the backslash of each \xNN.
    assert 'cgroup="/bad-\\\\xff\\\\xfe-name"' in body
    accept = "application/openmetrics-text; version=1.0.0" if fmt == OPENMETRICS else ""
    encoder, content_type = choose_encoder(accept)
    assert render(families, content_type, encoder).decode("utf-8") == body


def test_dump_json_is_utf8_with_the_bytes_visible() -> None:
    text = dump.render(snap_with_bad_cgroup())
    text.encode("utf-8")  # strict
    assert "\\ud" not in text  # no JSON-escaped surrogate either
    paths = [m["path"] for m in json.loads(text)["memcgs"]]
    assert SHOWN in paths


@pytest.mark.live
def test_serve_and_dump_with_a_non_utf8_memcg(workload, netns) -> None:  # noqa: F811
    """A real zerocopy reader in a memcg named with bytes 0xff 0xfe: /metrics answers 200
    with the name escaped, /healthz stays 200, dump prints strict UTF-8 JSON naming it."""
    served = Served("--interval", "1")
    try:
        with child_memcg(os.fsdecode(b"\xff\xfe")) as (d, rel):
            # dump attaches first and sees the workload's mappings in its window.
            dumping = AttachedDump()
            w = Workload(workload, netns, d, str(1_000_000), "hold")
            try:
                held = w.totals["held_bytes"]
                assert held > 0
                doc = json.loads(dumping.stop().decode("utf-8"))  # strict
                assert visible(rel) in [m["path"] for m in doc["memcgs"]]
                status, _, body = http_get(f"{served.url}/metrics")
                assert status == 200, body[:300]
                got = [v for lab, v in values(body, "netmemtrace_zerocopy_unaccounted_bytes")
                       if lab["cgroup"] == visible(rel)]
                assert got == [held]
                assert http_get(f"{served.url}/healthz")[0] == 200
            finally:
                w.stop()
                dumping.close()
    finally:
        served.close()
