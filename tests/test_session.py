"""Session.read()'s loop over its collectors (session.run), without BPF."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from netmemtrace.kernel import abi
from netmemtrace.session import OBJECT_SPECS, Collector, Draft, Session, run
from netmemtrace.snapshot import CollectorError, Unavailable


def test_a_failing_collector_is_recorded_and_the_others_still_run() -> None:
    d = Draft(0, netmem=Unavailable("not loaded"))
    seen = []

    def pools(d: Draft) -> None:
        time.sleep(0.02)
        seen.append("page_pool")

    def broken(_d: Draft) -> None:
        raise OSError("map read failed: EINVAL")

    def devices(d: Draft) -> None:
        seen.append("devices")
        d.devices = ()

    runs = run((Collector("page_pool", pools), Collector("memcg", broken),
                Collector("devices", devices)), d)
    assert seen == ["page_pool", "devices"]
    assert [(r.collector, r.success) for r in runs] == [
        ("page_pool", True), ("memcg", False), ("devices", True)]
    # Each its own time: page_pool's sleep is in its run only.
    assert runs[0].duration_ns >= 20_000_000 > runs[2].duration_ns
    assert d.errors == [CollectorError("memcg", "map read failed: EINVAL")]


def bpftool_counters(bpf_map) -> dict[str, int]:
    """An array map's entry 0 as bpftool formats it from BTF, summed over CPUs."""
    info = Path(f"/proc/self/fdinfo/{bpf_map.fd}").read_text()
    map_id = next(line.split()[1] for line in info.splitlines() if line.startswith("map_id"))
    (entry,) = json.loads(subprocess.run(
        ["bpftool", "-j", "map", "dump", "id", map_id], check=True, capture_output=True,
        text=True, timeout=30).stdout)
    per_cpu = [v["value"] for v in entry["formatted"]["values"]]
    return {k: sum(v[k] for v in per_cpu) for k in per_cpu[0]}


@pytest.mark.live
def test_a_real_read_times_every_collector_and_reads_every_stats_struct() -> None:
    with Session() as session:
        loaded = {lo.name: lo for lo in session.loaded}
        maps = {s.name: loaded[s.name].obj.map(s.stats) for s in OBJECT_SPECS
                if s.stats and s.name in loaded}
        before = {name: bpftool_counters(m) for name, m in maps.items()}
        snap = session.read()
        after = {name: bpftool_counters(m) for name, m in maps.items()}
        # Every BPF *_stats struct of a loaded object, as bpftool reads the same map (the
        # names from BTF: a counter added to the struct appears with no Python edit); the
        # counters only grow, so ours lie between the two dumps.
        for name, kernel in before.items():
            assert set(kernel) <= set(snap.stats[name]), name
            for counter, n in kernel.items():
                assert n <= snap.stats[name][counter] <= after[name][counter], counter
        assert set(snap.stats) == {s.name for s in OBJECT_SPECS if s.stats} | {"holders"}
        assert list(snap.stats["holders"]) == abi.fields(
            abi.btf("holders").struct("holders_scan_stats")) + ["prog_recursion_lost"]
        # Each object's events the kernel ran none of its programs for: its programs' misses.
        for name, lo in loaded.items():
            progs = [lk.program.name for lk in lo.obj.links]
            assert snap.stats[name]["prog_recursion_lost"] == sum(
                snap.self_stats.prog_recursion_misses[p] for p in progs), name
        assert "malformed_events_lost" in snap.stats["zerocopy"]
        collectors = [c.name for c in session.collectors]
    assert [(r.collector, r.success) for r in snap.collectors] == \
        [(name, True) for name in collectors], snap.errors
    assert all(r.duration_ns > 0 for r in snap.collectors)
    assert sum(r.duration_ns for r in snap.collectors) <= snap.self_stats.snapshot_build_ns
