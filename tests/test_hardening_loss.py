"""Issue 17.6: loss can be forced. NETMEMTRACE_MAP_SIZES shrinks a BPF map or ring buffer;
per domain a live test overflows one and sees the loss counted in `dump` and in /metrics
(never silent)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from conftest import REPO, SLOW, AttachedDump
from memcg_helpers import child_memcg
from test_serve_live import Served, http_get, values
from test_zerocopy_live import Workload, netns, workload  # noqa: F401 (fixtures)

from netmemtrace.commands import options
from netmemtrace.workload import demo

DUMP = [sys.executable, "-m", "netmemtrace.cli", "dump"]


def test_map_sizes_knob_is_validated() -> None:
    assert options.map_sizes("netmem.netmems=2, zerocopy.zc_events=4096") == {
        "netmem": {"netmems": 2}, "zerocopy": {"zc_events": 4096}}
    assert options.map_sizes(None) == {}
    for bad in ("netmems=2", "netmem.netmems", "netmem.netmems=0", "netmem.netmems=x",
                ".x=1"):
        with pytest.raises(ValueError, match="OBJECT.MAP=N"):
            options.map_sizes(bad)
    env = {**os.environ, options.MAP_SIZES_ENV: "netmem.netmems=two"}
    done = subprocess.run([*DUMP, "--duration", "0"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60 * SLOW)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr


@contextmanager
def shrunk(monkeypatch, sizes: str, *serve_args: str) -> Iterator[Served]:
    monkeypatch.setenv(options.MAP_SIZES_ENV, sizes)
    served = Served("--interval", "1", *serve_args)
    try:
        yield served
    finally:
        served.close()


def dump_during(work: Callable[[], None], *args: str) -> dict:
    """dump attached (with this process's environment) while work() runs."""
    dump = AttachedDump(*args)
    try:
        work()
        return json.loads(dump.stop())
    finally:
        dump.close()


def metric(served: Served, name: str, **labels: str) -> float:
    body = http_get(f"{served.url}/metrics")[2]
    got = [v for lab, v in values(body, name) if all(lab.get(k) == x for k, x in labels.items())]
    assert len(got) == 1, (name, labels, got)
    return got[0]


def demo_traffic() -> None:
    with demo.VethTopology() as topo, demo.hold_unread(topo, 4 << 20) as held:
        assert held.held_bytes > 0


@pytest.mark.veth_page_pool
@pytest.mark.live
def test_netmem_table_overflow(monkeypatch) -> None:
    with shrunk(monkeypatch, "netmem.netmems=2") as served:
        doc = dump_during(demo_traffic)
        assert doc["netmem"]["tracked_capacity"] == 2
        assert doc["stats"]["netmem"]["netmem_map_full"] > 0, doc["stats"]
        assert metric(served, "netmemtrace_netmem_tracked_capacity") == 2
        assert metric(served, "netmemtrace_events_lost_total", object="netmem",
                      counter="netmem_map_full") > 0


@pytest.mark.live
def test_zerocopy_process_map_overflow(monkeypatch, workload, netns) -> None:  # noqa: F811
    """Room for one process in the zerocopy counters: a second zerocopy process is lost,
    counted as zerocopy_procs (cgroup v1 emits no MEMCG_SOCK events to fill memcg_sock)."""
    def two_readers() -> None:
        with child_memcg("loss") as (d, _):
            first = Workload(workload, netns, d, str(1_000_000), "hold")
            try:  # both alive at once: the second has no room
                Workload(workload, netns, d, str(1_000_000), "hold").stop()
            finally:
                first.stop()

    with shrunk(monkeypatch, "zerocopy.zc_tasks=1") as served:
        doc = dump_during(two_readers)
        assert doc["stats"]["zerocopy"]["proc_map_full"] > 0, doc["stats"]
        two_readers()
        assert metric(served, "netmemtrace_events_lost_total", object="zerocopy",
                      counter="proc_map_full") > 0


@pytest.mark.veth_page_pool
@pytest.mark.live
def test_holders_ring_overflow_reaches_metrics(monkeypatch) -> None:
    """A zombie pool whose pages sit in a socket: with a one-page holders ring, references
    are lost; the count reaches dump and /metrics, and the pages are unattributed."""
    with shrunk(monkeypatch, "holders.holder_pages=4096") as served, \
            demo.VethTopology() as topo, demo.hold_unread(topo, 4 << 20) as held:
        assert held.held_bytes > 1 << 20
        topo.delete_link()
        deadline = time.monotonic() + 20 * SLOW
        while metric(served, "netmemtrace_events_lost_total", object="holders",
                     counter="refs_lost") == 0:
            assert time.monotonic() < deadline, "no holders reference lost"
            time.sleep(0.5)
        doc = dump_during(lambda: time.sleep(3.0))
        assert doc["stats"]["holders"]["refs_lost"] > 0
        assert any("lost (ring buffer full)" in h["detail"] for p in doc["pools"]
                   if p["state"] == "zombie" for h in p["holders"]
                   if h["kind"] == "unattributed"), [p["holders"] for p in doc["pools"]]
