"""The Prometheus view (netmemtrace/views/exporter.py) on synthetic Snapshots.

Each expected figure is the synthetic Snapshot's own value, read back through an independent
parser of the exposition formats (prometheus_client's parsers, and promtool)."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text

from netmemtrace.probes import ProbeStatus
from netmemtrace.snapshot import KernelPoolView, PoolSnapshot, SelfStats, Snapshot, Unavailable
from netmemtrace.views.exporter import POOL_LABELS, SnapshotCollector, probe_failures

WEIRD_NETDEV = 'e"th\\0\nü→名'  # quote, backslash, newline, UTF-8: all must round-trip


def pool(**changes: object) -> PoolSnapshot:
    base = PoolSnapshot(
        pool_addr=0xFFFF888001000000, pool_id=7, ifindex=3, netdev="eth0", netns="init",
        napi_id=8193, provider="host", page_order=0, page_size_bytes=4096, numa_node=0,
        state="active", hold_pages_total=1000, hold_net_iovs_total=24,
        release_pages_total=900, release_net_iovs_total=20, kernel_hold_cnt=1024,
        kernel_release_cnt=920, inflight_pages=104, inflight_bytes=104 * 4096,
        first_seen_age_ns=10**9, last_event_age_ns=10**6, destroy_age_ns=None,
        zombie_age_ns=None, release_calls=0, kernel_inflight_at_release=None,
        kernel_hold_at_release=None, kernel_release_at_release=None,
        kernel=KernelPoolView(inflight_pages=104, inflight_bytes=104 * 4096,
                              detach_time_s=None, dmabuf_id=None),
    )
    return dataclasses.replace(base, **changes)


def snapshot(pools: tuple[PoolSnapshot, ...] = (), **changes: object) -> Snapshot:
    base = Snapshot(
        taken_monotonic_ns=5 * 10**9, taken_unix_s=1_700_000_000.5, host="h1",
        kernel_release="6.18.0-test",
        probes=(
            ProbeStatus("pagepool", "page_pool_state_hold", "tp_btf", True, ""),
            ProbeStatus("pagepool", "page_pool_destroy", None, False,
                        "fentry: fentry denied: EPERM (lockdown=integrity); kprobe: kprobes "
                        "not supported by this kernel (no kprobe PMU: CONFIG_KPROBES off)"),
        ),
        pools=pools,
        self_stats=SelfStats(snapshot_build_ns=2_500_000, pool_map_full_total=3,
                             retired_map_full_total=0),
    )
    return dataclasses.replace(base, **changes)


def registry(snap: Snapshot) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(SnapshotCollector(lambda: snap))
    return reg


def samples(snap: Snapshot, openmetrics: bool = False) -> dict[str, list]:
    """Every sample of a scrape, by sample name, parsed back from the exposition text."""
    reg = registry(snap)
    if openmetrics:
        families = parse_om(generate_openmetrics(reg).decode())
    else:
        families = parse_text(generate_latest(reg).decode())
    out: dict[str, list] = {}
    for fam in families:
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def one(found: dict[str, list], name: str, **labels: str) -> float:
    matches = [s.value for s in found.get(name, [])
               if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, f"{name}{labels}: {len(matches)} series"
    return matches[0]


def test_pool_figures_are_the_snapshot_values() -> None:
    p = pool()
    found = samples(snapshot((p,)))
    ident = {"netdev": "eth0", "ifindex": "3", "netns": "init", "pool_id": "7",
             "napi_id": "8193", "provider": "host"}
    assert one(found, "netmemtrace_page_pool_inflight_pages", **ident) == 104
    assert one(found, "netmemtrace_page_pool_inflight_bytes", **ident) == 104 * 4096
    assert one(found, "netmemtrace_page_pool_hold_pages_total", **ident, netmem="page") == 1000
    assert one(found, "netmemtrace_page_pool_hold_pages_total", **ident, netmem="net_iov") == 24
    assert one(found, "netmemtrace_page_pool_release_pages_total", **ident,
               netmem="page") == 900
    assert one(found, "netmemtrace_page_pool_release_pages_total", **ident,
               netmem="net_iov") == 20
    assert one(found, "netmemtrace_page_pool_kernel_inflight_pages", **ident) == 104
    assert one(found, "netmemtrace_page_pool_state", **ident, state="active") == 1
    assert one(found, "netmemtrace_page_pool_state", **ident, state="zombie") == 0
    assert one(found, "netmemtrace_page_pool_state", **ident, state="released") == 0
    # An active pool has no zombie age: absent, not 0.
    assert "netmemtrace_page_pool_zombie_age_seconds" not in found
    assert one(found, "netmemtrace_snapshot_timestamp_seconds") == 1_700_000_000.5
    assert one(found, "netmemtrace_snapshot_build_seconds") == pytest.approx(0.0025)
    assert one(found, "netmemtrace_map_full_drops_total", map="pools") == 3
    assert one(found, "netmemtrace_kernel_info", release="6.18.0-test") == 1


def test_zombie_pool_exports_its_age_in_seconds() -> None:
    z = pool(state="zombie", zombie_age_ns=754 * 10**9, release_calls=12)
    found = samples(snapshot((z,)))
    assert one(found, "netmemtrace_page_pool_zombie_age_seconds", pool_id="7") == 754
    assert one(found, "netmemtrace_page_pool_state", pool_id="7", state="zombie") == 1
    assert one(found, "netmemtrace_page_pool_release_calls_total", pool_id="7") == 12


def test_unavailable_figure_is_omitted_and_explained_never_zero() -> None:
    p = pool(inflight_pages=Unavailable("pool predates netmemtrace"),
             inflight_bytes=Unavailable("pool predates netmemtrace"),
             kernel=Unavailable("not listed by netdev netlink"))
    found = samples(snapshot((p,)))
    for name in ("netmemtrace_page_pool_inflight_pages", "netmemtrace_page_pool_inflight_bytes",
                 "netmemtrace_page_pool_kernel_inflight_pages",
                 "netmemtrace_page_pool_kernel_inflight_bytes"):
        assert name not in found, f"{name} exported although unavailable"
    why = {(s.labels["figure"], s.labels["reason"], s.labels["pool_id"])
           for s in found["netmemtrace_figure_unavailable_info"]}
    assert ("netmemtrace_page_pool_inflight_pages", "pool predates netmemtrace", "7") in why
    assert ("netmemtrace_page_pool_kernel_inflight_bytes", "not listed by netdev netlink",
            "7") in why
    # bpf_stats off (the SelfStats default): run time counters absent, with the reason.
    assert "netmemtrace_bpf_prog_run_seconds_total" not in found
    assert ("netmemtrace_bpf_prog_run_seconds_total", "kernel.bpf_stats_enabled is 0", "") in why
    # The counters that are known are still exported.
    assert one(found, "netmemtrace_page_pool_hold_pages_total", netmem="page") == 1000


def test_bpf_run_time_in_seconds_when_stats_enabled() -> None:
    stats = SelfStats(snapshot_build_ns=1, pool_map_full_total=0, retired_map_full_total=0,
                      prog_run_time_ns={"hold__tp_btf": 3_000_000_000, "rel__tp_btf": 5},
                      prog_run_cnt={"hold__tp_btf": 40, "rel__tp_btf": 1})
    found = samples(snapshot(self_stats=stats))
    assert one(found, "netmemtrace_bpf_prog_run_seconds_total", program="hold__tp_btf") == 3.0
    assert one(found, "netmemtrace_bpf_prog_runs_total", program="hold__tp_btf") == 40
    assert one(found, "netmemtrace_bpf_prog_runs_total", program="rel__tp_btf") == 1
    figures = {s.labels["figure"] for s in found.get("netmemtrace_figure_unavailable_info", [])}
    assert not figures & {"netmemtrace_bpf_prog_run_seconds_total",
                          "netmemtrace_bpf_prog_runs_total"}


@pytest.mark.parametrize("openmetrics", [False, True], ids=["text", "openmetrics"])
def test_label_values_round_trip(openmetrics: bool) -> None:
    p = pool(netdev=WEIRD_NETDEV, netns='ns "a"\\b\n', provider="unknown(mp_ops=0x1)")
    found = samples(snapshot((p,)), openmetrics)
    series = found["netmemtrace_page_pool_inflight_pages"]
    assert [s.labels["netdev"] for s in series] == [WEIRD_NETDEV]
    assert series[0].labels["netns"] == 'ns "a"\\b\n'
    assert series[0].value == 104


def test_pools_sharing_an_identity_are_one_series() -> None:
    # Before Linux 6.8 pools have no id: a driver's zombie pool and its replacement on the
    # same queue have the same labels. Duplicate series would make the scrape invalid.
    old = pool(pool_id=None, state="zombie", zombie_age_ns=30 * 10**9, inflight_pages=5,
               inflight_bytes=5 * 4096, hold_pages_total=50, release_pages_total=45)
    new = pool(pool_id=None, pool_addr=2, inflight_pages=100, inflight_bytes=100 * 4096)
    found = samples(snapshot((old, new)))
    assert one(found, "netmemtrace_page_pool_inflight_pages", pool_id="") == 105
    assert one(found, "netmemtrace_page_pool_hold_pages_total", pool_id="",
               netmem="page") == 1050
    assert one(found, "netmemtrace_page_pool_zombie_age_seconds", pool_id="") == 30
    assert one(found, "netmemtrace_page_pool_state", pool_id="", state="active") == 1
    assert one(found, "netmemtrace_page_pool_state", pool_id="", state="zombie") == 1


def test_merged_pools_with_one_unavailable_figure_are_unavailable() -> None:
    known = pool(pool_id=None)
    unknown = pool(pool_id=None, pool_addr=2, inflight_pages=Unavailable("no event yet"),
                   inflight_bytes=Unavailable("no event yet"))
    found = samples(snapshot((known, unknown)))
    assert "netmemtrace_page_pool_inflight_pages" not in found  # a partial sum would lie
    reasons = {s.labels["reason"] for s in found["netmemtrace_figure_unavailable_info"]
               if s.labels["figure"] == "netmemtrace_page_pool_inflight_pages"}
    assert reasons == {"no event yet"}


def test_probe_rows_and_failures() -> None:
    found = samples(snapshot())
    assert one(found, "netmemtrace_probe_attached", hook="page_pool_state_hold",
               mechanism="tp_btf") == 1
    assert one(found, "netmemtrace_probe_attached", hook="page_pool_destroy", mechanism="") == 0
    failures = {(s.labels["mechanism"], s.labels["reason"])
                for s in found["netmemtrace_probe_failure_info"]}
    assert failures == {
        ("fentry", "fentry denied: EPERM (lockdown=integrity)"),
        ("kprobe", "kprobes not supported by this kernel (no kprobe PMU: CONFIG_KPROBES off)"),
    }


def test_probe_failure_split_keeps_semicolons_inside_a_reason() -> None:
    row = ProbeStatus("o", "h", None, False, "tp_btf: a; b; raw_tp: c")
    assert probe_failures(row) == [("tp_btf", "a; b"), ("raw_tp", "c")]
    assert probe_failures(ProbeStatus("o", "h", "tp_btf", True, "")) == []


def test_collector_errors_are_exported() -> None:
    found = samples(snapshot(errors=("page_pool: map read failed: EINVAL",)))
    assert one(found, "netmemtrace_collector_error_info", collector="page_pool",
               error="map read failed: EINVAL") == 1


def test_every_family_follows_the_naming_conventions() -> None:
    z = pool(state="zombie", zombie_age_ns=1, pool_id=8)
    reg = registry(snapshot((pool(), z), errors=("x: y",)))
    families = list(reg.collect())
    assert len(families) >= 20
    for fam in families:
        assert fam.name.startswith("netmemtrace_"), fam.name
        assert len(fam.documentation) > 20, f"{fam.name}: HELP too short"
        if fam.type == "counter":
            assert all(s.name.endswith("_total") for s in fam.samples), fam.name
        for s in fam.samples:
            assert not {"pool_addr", "addr"} & set(s.labels), "kernel addresses leak"
    pool_families = [f for f in families if f.name.startswith("netmemtrace_page_pool_")]
    for fam in pool_families:
        for s in fam.samples:
            assert set(POOL_LABELS) <= set(s.labels), (fam.name, s.labels)


def test_source_is_called_once_per_scrape() -> None:
    calls = []

    def source() -> Snapshot:
        calls.append(1)
        return snapshot((pool(),))

    reg = CollectorRegistry()
    reg.register(SnapshotCollector(source))
    assert calls == []  # registering does not read
    generate_latest(reg)
    assert len(calls) == 1


def test_promtool_accepts_the_exposition(tmp_path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: `make deps` installs the prometheus package"
    z = pool(state="zombie", zombie_age_ns=10**9, pool_id=9, netdev=WEIRD_NETDEV)
    text = generate_latest(registry(snapshot((pool(), z), errors=("a: b",))))
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          timeout=30)
    assert done.returncode == 0 and not done.stdout and not done.stderr, done
