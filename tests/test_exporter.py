"""The Prometheus view (netmemtrace/views/prometheus/) on synthetic Snapshots.

Each expected figure is the synthetic Snapshot's own value, read back through an independent
parser of the exposition formats (prometheus_client's parsers, and promtool)."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text

from netmemtrace.collect import holders as holders_mod
from netmemtrace.kernel.probes import ProbeStatus
from netmemtrace.snapshot import (
    HOLDER_KINDS,
    CollectorError,
    CollectorRun,
    DevmemSocket,
    HoldBucket,
    Holder,
    HoldHistogram,
    KernelPoolView,
    MemcgSelfStats,
    MemcgSnapshot,
    NetmemStates,
    NetmemSummary,
    PoolSnapshot,
    ProcessSnapshot,
    SelfStats,
    Snapshot,
    Unavailable,
    ZerocopyStats,
)
from netmemtrace.views.prometheus.catalogue import MEMCG_LABELS, POOL_LABELS, probe_failures
from netmemtrace.views.prometheus.collector import SnapshotCollector
from netmemtrace.views.prometheus.encode import OPENMETRICS, TEXT, encode, render

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
        self_stats=SelfStats(snapshot_build_ns=2_500_000),
        stats={"pagepool": {"pool_map_full": 3, "retired_map_full": 0}},
    )
    return dataclasses.replace(base, **changes)


def registry(snap: Snapshot, max_cgroups: int = 100) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(SnapshotCollector(lambda: snap, max_cgroups))
    return reg


def samples(snap: Snapshot, openmetrics: bool = False,
            max_cgroups: int = 100) -> dict[str, list]:
    """Every sample of a scrape, by sample name, parsed back from the exposition text."""
    reg = registry(snap, max_cgroups)
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
    assert one(found, "netmemtrace_events_lost_total", object="pagepool",
               counter="pool_map_full") == 3
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
    stats = SelfStats(snapshot_build_ns=1,
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


def test_recursion_misses_without_bpf_stats() -> None:
    """The kernel counts a program's recursion misses whether or not bpf_stats_enabled."""
    stats = SelfStats(snapshot_build_ns=1, prog_recursion_misses={"rel__raw_tp": 7})
    found = samples(snapshot(self_stats=stats))
    assert one(found, "netmemtrace_bpf_prog_recursion_misses_total", program="rel__raw_tp") == 7


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
    found = samples(snapshot(errors=(CollectorError("page_pool", "map read failed: EINVAL"),)))
    assert one(found, "netmemtrace_collector_error_info", collector="page_pool",
               error="map read failed: EINVAL") == 1


def test_each_collector_reports_success_and_duration() -> None:
    runs = (CollectorRun("page_pool", True, 1_500_000), CollectorRun("memcg", False, 30_000))
    found = samples(snapshot(collectors=runs))
    assert one(found, "netmemtrace_scrape_collector_success", collector="page_pool") == 1
    assert one(found, "netmemtrace_scrape_collector_success", collector="memcg") == 0
    assert one(found, "netmemtrace_scrape_collector_duration_seconds",
               collector="page_pool") == 0.0015
    assert one(found, "netmemtrace_scrape_collector_duration_seconds",
               collector="memcg") == 0.00003


def test_every_family_follows_the_naming_conventions() -> None:
    families = list(registry(full_snapshot()).collect())
    assert len(families) >= 60
    for fam in families:
        assert fam.name.startswith("netmemtrace_"), fam.name
        assert len(fam.documentation) > 20, f"{fam.name}: HELP too short"
        if fam.type == "counter":
            assert all(s.name.endswith("_total") for s in fam.samples), fam.name
        for s in fam.samples:
            assert not {"pool_addr", "addr"} & set(s.labels), "kernel addresses leak"
        if fam.name.startswith("netmemtrace_page_pool_"):
            assert all(set(POOL_LABELS) <= set(s.labels) for s in fam.samples), fam.name
        if fam.name.startswith(("netmemtrace_memcg_", "netmemtrace_zerocopy_unaccounted",
                                "netmemtrace_process_")) and fam.samples and fam.samples[0].labels:
            assert all(set(MEMCG_LABELS) <= set(s.labels) for s in fam.samples), fam.name
            assert "--max-cgroups" in fam.documentation, fam.name


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
    full = full_snapshot()
    snap = dataclasses.replace(full, pools=(*full.pools, z), memcgs=(
        *full.memcgs, memcg(cgroup_id=2, path='/a"b\\c\nd/ü→名.scope')))
    text = generate_latest(registry(snap))
    assert b"netmemtrace_zerocopy_unaccounted_bytes{" in text
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          timeout=30)
    assert done.returncode == 0 and not done.stdout and not done.stderr, done


# ---- memory cgroups, zerocopy, netmem states, devmem, zombie holders ---------------------


def zc_stats(scale: int = 1) -> ZerocopyStats:
    return ZerocopyStats(
        rx_calls=10 * scale, rx_errors=1 * scale, rx_mapped_bytes=40960 * scale,
        rx_mapped_pages=10 * scale, rx_copied_bytes=100 * scale, rx_skip_hint_bytes=7 * scale,
        rx_sock_errors=2 * scale, rx_read_faults=3 * scale, rx_zerocopy_ratio=0.99,
        tx_zc_calls=4 * scale, tx_zc_bytes=8000 * scale, tx_zc_errors=5 * scale,
        tx_zc_ignored_calls=6 * scale, tx_notifications=8 * scale,
        tx_completed_sends=9 * scale, tx_copied_sends=11 * scale,
        tx_inflight_bytes=12 * scale)


def process(pid: int, unaccounted: int, memcg_id: int = 1) -> ProcessSnapshot:
    return ProcessSnapshot(
        pid=pid, comm=f"app{pid}", memcg_id=memcg_id, zerocopy=zc_stats(),
        zerocopy_unaccounted_bytes=unaccounted, zerocopy_unaccounted_hwm_bytes=unaccounted,
        zerocopy_oldest_mapped_age_ns=None,
        smaps_socket_rss_bytes=unaccounted, ledger_vs_smaps_bytes=0)


def memcg(**changes: object) -> MemcgSnapshot:
    base = MemcgSnapshot(
        cgroup_id=1, hierarchy="v2",
        path="/kubepods.slice/kubepods-pod1234.slice/cri-containerd-abcdef012345.scope",
        runtime="containerd", container_id="abcdef012345", pod_uid="1234", qos_class=None,
        systemd_unit=None, sock_event_source="tracepoint", sock_charged_pages_total=500,
        sock_uncharged_pages_total=400, sock_net_charged_since_attach_bytes=100 * 4096,
        sock_charged_now_bytes=200 * 4096, sock_charged_now_source="memory.stat sock (polled)",
        zerocopy=zc_stats(), zerocopy_unaccounted_bytes=32768,
        zerocopy_unaccounted_hwm_bytes=65536, zerocopy_oldest_mapped_age_ns=3 * 10**9,
        would_be_charged_bytes=200 * 4096 + 32768, processes=(process(77, 32768),))
    return dataclasses.replace(base, **changes)


def memcg_self(**changes: object) -> MemcgSelfStats:
    base = MemcgSelfStats(ledger_ranges=5, ledger_overflow_ranges=2,
                          ledger_overflow_bytes=8192, tx_tracker_overflow_sends=3,
                          smaps_mismatch_pids=1)
    return dataclasses.replace(base, **changes)


def states(**changes: object) -> NetmemStates:
    base = NetmemStates(
        sample_factor=16, tracked=9, pool=64, driver=Unavailable("napi_pp_put_page: no kprobes"),
        stack=32, application=16,
        by_type={"page": {"pool": 48, "driver": Unavailable("napi_pp_put_page: no kprobes"),
                          "stack": 32, "application": 0},
                 "dmabuf": {"pool": 16, "driver": 0, "stack": 0, "application": 16}},
        transitions_total={"pool->driver": 160, "stack->application": 32})
    return dataclasses.replace(base, **changes)


def hold_hist() -> HoldHistogram:
    # log2 buckets [2^i, 2^(i+1)) ns: 3 holds of ~1.5 us (i=10), 5 of ~3 ms (i=21), 2 of
    # ~20 min (i=40: above the highest exported le)
    return HoldHistogram(sample_factor=16, count=10, sum_ns=2_400 * 10**9, buckets=(
        HoldBucket(1 << 10, 1 << 11, 3), HoldBucket(1 << 21, 1 << 22, 5),
        HoldBucket(1 << 40, 1 << 41, 2)))


def netmem_summary(**changes: object) -> NetmemSummary:
    base = NetmemSummary(
        sample_factor=16, tracked_netmem=9, tracked_capacity=65536,
        unavailable_states={"page": {"driver": "napi_pp_put_page: no kprobes"}}, holders=(),
        recvmsg_devmem_calls=20, recvmsg_devmem_errors=2, tokens_received=300,
        recvmsg_cmsg_unread=1, dontneed_calls=5, dontneed_errors=1, tokens_returned=250,
        tokens_freed_on_destroy=10,
        zcrx_buffers_handed=Unavailable("io_zcrx_queue_cqe: no kprobes"),
        zcrx_refills=Unavailable("io_pp_zc_alloc_netmems: no kprobes"))
    return dataclasses.replace(base, **changes)


def devmem_socket(addr: int, memcg_id: int, outstanding: int | Unavailable,
                  state: str = "open", path: str | None = None) -> DevmemSocket:
    return DevmemSocket(
        sock_addr=addr, pid=5, comm="rx", memcg_id=memcg_id, memcg_path=path, state=state,
        recvmsg_calls=1, recvmsg_errors=0, tokens_received=100, dontneed_calls=1,
        dontneed_errors=0, tokens_returned=60, tokens_freed_on_destroy=0,
        tokens_outstanding=outstanding, netmem_held=Unavailable("x"), first_seen_age_ns=1,
        destroy_age_ns=None)


def holder(kind: str, pages: int) -> Holder:
    return Holder(kind=kind, pages=pages, self_healing=kind == "cpu-deferred-free", detail="d")


STATS = {"pagepool": {"pool_map_full": 0, "retired_map_full": 0},
         "netmem": {"netmem_map_full": 21, "pool_map_full": 22, "socket_map_full": 23,
                    "call_map_full": 24, "recvmsg_calls": 20},
         "zerocopy": {"ringbuf_full": 17, "pending_full": 4, "proc_map_full": 6,
                      "mmsg_truncated": 2, "malformed_events_lost": 1},
         "memcg": {"memcg_map_full": 7, "memcg_unresolved": 8},
         "holders": {"refs": 40, "refs_lost": 5}}


def full_snapshot() -> Snapshot:
    """Every family with series: memcgs, netmem, devmem, a zombie with holders."""
    zombie = pool(pool_id=9, state="zombie", zombie_age_ns=10**9,
                  holders=(holder("socket", 90), holder("cpu-deferred-free", 10),
                           holder("socket", 4)))
    active = pool(netmem_states=states(), netmem_hold_ns=hold_hist())
    return snapshot((active, zombie), errors=(CollectorError("c", "e"),),
                    self_stats=SelfStats(1, {"p": 1}, {"p": 1}), stats=STATS,
                    collectors=(CollectorRun("page_pool", True, 10**6),),
                    memcgs=(memcg(),), memcg_self_stats=memcg_self(),
                    devmem_sockets=(devmem_socket(1, 1, 40),), netmem=netmem_summary())


MEMCG_IDENT = {"cgroup": memcg().path, "hierarchy": "v2", "pod": "1234",
               "container": "containerd://abcdef012345"}


def test_memcg_figures_are_the_snapshot_values() -> None:
    m = memcg()
    found = samples(snapshot(memcgs=(m,)))
    ident = MEMCG_IDENT
    assert one(found, "netmemtrace_memcg_sock_charged_bytes", **ident) == 200 * 4096
    assert one(found, "netmemtrace_memcg_sock_charged_pages_total", **ident) == 500
    assert one(found, "netmemtrace_memcg_sock_uncharged_pages_total", **ident) == 400
    assert one(found, "netmemtrace_zerocopy_unaccounted_bytes", **ident) == 32768
    assert one(found, "netmemtrace_zerocopy_unaccounted_hwm_bytes", **ident) == 65536
    assert one(found, "netmemtrace_zerocopy_oldest_mapped_age_seconds", **ident) == 3.0
    assert one(found, "netmemtrace_memcg_would_be_charged_bytes", **ident) == 200 * 4096 + 32768
    for name, field in (("rx_calls", "rx_calls"), ("rx_errors", "rx_errors"),
                        ("rx_mapped_bytes", "rx_mapped_bytes"),
                        ("rx_copied_bytes", "rx_copied_bytes"),
                        ("rx_skip_hint_bytes", "rx_skip_hint_bytes"),
                        ("rx_sock_errors", "rx_sock_errors"),
                        ("rx_read_faults", "rx_read_faults"), ("tx_calls", "tx_zc_calls"),
                        ("tx_bytes", "tx_zc_bytes"), ("tx_errors", "tx_zc_errors"),
                        ("tx_ignored_calls", "tx_zc_ignored_calls"),
                        ("tx_notifications", "tx_notifications"),
                        ("tx_completed_sends", "tx_completed_sends"),
                        ("tx_copied_sends", "tx_copied_sends")):
        assert one(found, f"netmemtrace_memcg_zerocopy_{name}_total",
                   **ident) == getattr(m.zerocopy, field), name
    assert one(found, "netmemtrace_memcg_zerocopy_tx_inflight_bytes", **ident) == 12
    assert one(found, "netmemtrace_process_zerocopy_unaccounted_bytes", **ident, pid="77",
               comm="app77") == 32768
    assert one(found, "netmemtrace_memcg_other_cgroups") == 0


def test_exited_processes_have_a_series_while_kept_and_drops_are_counted() -> None:
    gone = [dataclasses.replace(process(pid, 0), exited=True, exit_age_ns=pid * 10**9)
            for pid in (3, 4, 5)]
    m = memcg(processes=(process(77, 32768), *gone))
    found = samples(snapshot(memcgs=(m,), memcg_self_stats=memcg_self(
        exited_process_rows=3, exited_rows_expired=8, exited_rows_evicted=2)), max_cgroups=2)
    # Capped like every per-process series: the most recent exits.
    assert {(s.labels["pid"], s.value) for s in found["netmemtrace_process_exited_seconds"]} \
        == {("3", 3.0), ("4", 4.0)}
    assert one(found, "netmemtrace_exited_process_rows") == 3
    assert one(found, "netmemtrace_exited_process_rows_expired_total") == 8
    assert one(found, "netmemtrace_exited_process_rows_evicted_total") == 2


def test_memcg_unavailable_figures_are_explained_never_zero() -> None:
    inactive = Unavailable("inactive: memory.kmem.tcp.limit_in_bytes never set")
    no_events = Unavailable("cgroup v1 socket memory has no tracepoint")
    m = memcg(hierarchy="v1", path="/user.slice/a", runtime=None, container_id=None,
              pod_uid=None, sock_charged_now_bytes=inactive, would_be_charged_bytes=inactive,
              sock_charged_pages_total=no_events, sock_uncharged_pages_total=no_events,
              zerocopy_oldest_mapped_age_ns=None)
    found = samples(snapshot(memcgs=(m,)))
    for name in ("netmemtrace_memcg_sock_charged_bytes",
                 "netmemtrace_memcg_would_be_charged_bytes",
                 "netmemtrace_memcg_sock_charged_pages_total",
                 "netmemtrace_memcg_sock_uncharged_pages_total",
                 "netmemtrace_zerocopy_oldest_mapped_age_seconds"):  # nothing mapped: absent
        assert name not in found, name
    why = {(s.labels["figure"], s.labels["reason"], s.labels["cgroup"], s.labels["pool_id"])
           for s in found["netmemtrace_figure_unavailable_info"]}
    assert ("netmemtrace_memcg_sock_charged_bytes", inactive.reason, "/user.slice/a", "") in why
    assert ("netmemtrace_memcg_would_be_charged_bytes", inactive.reason, "/user.slice/a",
            "") in why
    assert ("netmemtrace_memcg_sock_charged_pages_total", no_events.reason, "/user.slice/a",
            "") in why
    ident = {"cgroup": "/user.slice/a", "hierarchy": "v1", "pod": "", "container": ""}
    assert one(found, "netmemtrace_zerocopy_unaccounted_bytes", **ident) == 32768


def test_cgroup_cap_sums_the_rest_into_other() -> None:
    # 6 memcgs ranked by socket memory + unaccounted zerocopy; the cap keeps 2.
    ms = [memcg(cgroup_id=i, path=f"/c{i}", container_id=None, pod_uid=None,
                sock_charged_now_bytes=i * 4096, zerocopy_unaccounted_bytes=(7 - i) * 100,
                would_be_charged_bytes=i * 4096 + (7 - i) * 100,
                zerocopy_unaccounted_hwm_bytes=1000 * i, zerocopy=zc_stats(i),
                zerocopy_oldest_mapped_age_ns=i * 10**9,
                processes=(process(100 + i, (7 - i) * 100, i),))
          for i in range(1, 7)]
    # One of the rest does not know its socket memory: other sums the known ones.
    ms[0] = dataclasses.replace(ms[0], sock_charged_now_bytes=Unavailable("inactive"),
                                would_be_charged_bytes=Unavailable("inactive"))
    reg = CollectorRegistry()
    reg.register(SnapshotCollector(lambda: snapshot(memcgs=tuple(ms)), max_cgroups=2))
    found: dict[str, list] = {}
    for fam in parse_text(generate_latest(reg).decode()):
        for s in fam.samples:
            found.setdefault(s.name, []).append(s)
    cgroups = {s.labels["cgroup"] for s in found["netmemtrace_zerocopy_unaccounted_bytes"]}
    assert cgroups == {"/c6", "/c5", "other"}
    rest = ms[:4]
    other = {"cgroup": "other", "hierarchy": "", "pod": "", "container": ""}
    assert one(found, "netmemtrace_memcg_other_cgroups") == 4
    assert one(found, "netmemtrace_zerocopy_unaccounted_bytes", **other) == sum(
        m.zerocopy_unaccounted_bytes for m in rest)
    assert one(found, "netmemtrace_memcg_sock_charged_bytes", **other) == sum(
        m.sock_charged_now_bytes for m in rest[1:])
    assert one(found, "netmemtrace_memcg_zerocopy_rx_mapped_bytes_total", **other) == sum(
        m.zerocopy.rx_mapped_bytes for m in rest)
    assert one(found, "netmemtrace_zerocopy_oldest_mapped_age_seconds", **other) == 4.0
    assert one(found, "netmemtrace_memcg_sock_charged_bytes", cgroup="/c6") == 6 * 4096
    # Every series of every memcg family: the exported ones plus other add up to the whole.
    for name in ("netmemtrace_zerocopy_unaccounted_bytes",
                 "netmemtrace_memcg_zerocopy_tx_bytes_total"):
        assert sum(s.value for s in found[name]) == sum(
            m.zerocopy_unaccounted_bytes if "unaccounted" in name else m.zerocopy.tx_zc_bytes
            for m in ms)
    assert "other" in " ".join(f.documentation for f in reg.collect()
                               if f.name == "netmemtrace_zerocopy_unaccounted_bytes")
    # Processes: the top 2 by unaccounted bytes, labelled with their own cgroup.
    procs = {(s.labels["pid"], s.labels["cgroup"], s.value)
             for s in found["netmemtrace_process_zerocopy_unaccounted_bytes"]}
    assert procs == {("101", "/c1", 600), ("102", "/c2", 500)}


@pytest.mark.parametrize("openmetrics", [False, True], ids=["text", "openmetrics"])
def test_cgroup_paths_round_trip(openmetrics: bool) -> None:
    weird = '/a"b\\c\nd/ü→名.scope'
    found = samples(snapshot(memcgs=(memcg(path=weird),)), openmetrics)
    assert [s.labels["cgroup"] for s in found["netmemtrace_zerocopy_unaccounted_bytes"]] == [
        weird]


def test_deleted_memcg_is_labelled_deleted() -> None:
    found = samples(snapshot(memcgs=(memcg(path=None),)))
    assert one(found, "netmemtrace_zerocopy_unaccounted_bytes", cgroup="deleted") == 32768


def test_memcg_self_stats() -> None:
    found = samples(full_snapshot())
    assert one(found, "netmemtrace_zerocopy_ledger_ranges") == 5
    assert one(found, "netmemtrace_zerocopy_ledger_overflow_ranges_total") == 2
    assert one(found, "netmemtrace_zerocopy_ledger_overflow_bytes_total") == 8192
    assert one(found, "netmemtrace_zerocopy_tx_tracker_overflow_sends_total") == 3
    assert one(found, "netmemtrace_memcg_unresolved_events_total") == 8
    assert one(found, "netmemtrace_zerocopy_smaps_mismatch_processes") == 1
    # The memcg collector did not report: no series (its error is exported instead).
    assert "netmemtrace_zerocopy_ledger_ranges" not in samples(snapshot())


def test_every_loss_counter_of_every_object_is_exported() -> None:
    found = samples(full_snapshot())
    lost = {(s.labels["object"], s.labels["counter"]): s.value
            for s in found["netmemtrace_events_lost_total"]}
    assert lost == {("pagepool", "pool_map_full"): 0, ("pagepool", "retired_map_full"): 0,
                    ("netmem", "netmem_map_full"): 21, ("netmem", "pool_map_full"): 22,
                    ("netmem", "socket_map_full"): 23, ("netmem", "call_map_full"): 24,
                    ("zerocopy", "ringbuf_full"): 17, ("zerocopy", "pending_full"): 4,
                    ("zerocopy", "proc_map_full"): 6, ("zerocopy", "mmsg_truncated"): 2,
                    ("zerocopy", "malformed_events_lost"): 1, ("memcg", "memcg_map_full"): 7,
                    ("holders", "refs_lost"): 5}
    # A counter the BPF side adds is exported without a Python edit.
    more = dataclasses.replace(full_snapshot(), stats={**STATS, "new": {"thing_full": 9}})
    assert one(samples(more), "netmemtrace_events_lost_total", object="new",
               counter="thing_full") == 9


def test_netmem_states_per_pool_unavailable_state_is_not_zero() -> None:
    found = samples(full_snapshot())
    ident = {"pool_id": "7", "netdev": "eth0"}
    assert one(found, "netmemtrace_page_pool_netmem_pages", **ident, netmem="page",
               state="pool") == 48
    assert one(found, "netmemtrace_page_pool_netmem_pages", **ident, netmem="page",
               state="stack") == 32
    assert one(found, "netmemtrace_page_pool_netmem_pages", **ident, netmem="dmabuf",
               state="application") == 16
    drivers = [s for s in found["netmemtrace_page_pool_netmem_pages"]
               if s.labels["state"] == "driver"]
    assert [s.labels["netmem"] for s in drivers] == ["dmabuf"]  # page's is unavailable
    why = {(s.labels["figure"], s.labels["reason"], s.labels["pool_id"])
           for s in found["netmemtrace_figure_unavailable_info"]}
    assert ('netmemtrace_page_pool_netmem_pages{netmem="page",state="driver"}',
            "napi_pp_put_page: no kprobes", "7") in why
    assert one(found, "netmemtrace_page_pool_netmem_transitions_total", **ident,
               **{"from": "pool", "to": "driver"}) == 160
    assert one(found, "netmemtrace_netmem_sample_factor") == 16
    assert one(found, "netmemtrace_netmem_tracked") == 9
    assert one(found, "netmemtrace_netmem_tracked_capacity") == 65536


def test_netmem_not_loaded_is_said_once_not_per_pool() -> None:
    found = samples(snapshot((pool(), pool(pool_id=8))))  # netmem: Unavailable by default
    assert "netmemtrace_page_pool_netmem_pages" not in found
    rows = [s.labels for s in found["netmemtrace_figure_unavailable_info"]
            if s.labels["figure"] == "netmemtrace_page_pool_netmem_pages"]
    assert rows == [{**rows[0], "pool_id": "", "reason": "netmem object not loaded"}]
    assert "netmemtrace_netmem_sample_factor" not in found


def test_hold_histogram_in_seconds() -> None:
    found = samples(full_snapshot())
    buckets = {float(s.labels["le"]): s.value
               for s in found["netmemtrace_page_pool_netmem_hold_seconds_bucket"]
               if s.labels["pool_id"] == "7"}
    # le = (2^k - 1) ns: a hold in [2^10, 2^11) ns is <= 2^12 - 1 ns, not <= 2^10 - 1 ns.
    assert buckets[(2**10 - 1) / 1e9] == 0
    assert buckets[(2**12 - 1) / 1e9] == 3
    assert buckets[(2**20 - 1) / 1e9] == 3
    assert buckets[(2**22 - 1) / 1e9] == 8
    assert buckets[(2**40 - 1) / 1e9] == 8
    assert buckets[float("inf")] == 10
    assert len(buckets) == 17
    assert one(found, "netmemtrace_page_pool_netmem_hold_seconds_count", pool_id="7") == 10
    assert one(found, "netmemtrace_page_pool_netmem_hold_seconds_sum", pool_id="7") == 2400
    # A pool whose applications never gave netmem back has no histogram series.
    assert not [s for s in found["netmemtrace_page_pool_netmem_hold_seconds_count"]
                if s.labels["pool_id"] == "9"]


def test_zombie_holders_sum_per_kind() -> None:
    found = samples(full_snapshot())
    assert one(found, "netmemtrace_page_pool_zombie_inflight_pages", netdev="eth0",
               pool_id="9", holder_kind="socket") == 94
    assert one(found, "netmemtrace_page_pool_zombie_inflight_pages", netdev="eth0",
               pool_id="9", holder_kind="cpu-deferred-free") == 10
    assert {s.labels["pool_id"]
            for s in found["netmemtrace_page_pool_zombie_inflight_pages"]} == {"9"}


def test_devmem_tokens_outstanding_per_memcg_and_host_counters() -> None:
    socks = (devmem_socket(1, 1, 40), devmem_socket(2, 1, 2),
             devmem_socket(3, 1, 1000, state="destroyed"),
             devmem_socket(4, 50, 7, path="/other.slice/x"),
             devmem_socket(5, 51, Unavailable("returned tokens from before attach"),
                           path="/y"))
    found = samples(snapshot(memcgs=(memcg(),), devmem_sockets=socks,
                             netmem=netmem_summary()))
    assert one(found, "netmemtrace_memcg_devmem_tokens_outstanding", **MEMCG_IDENT) == 42
    assert one(found, "netmemtrace_memcg_devmem_tokens_outstanding",
               cgroup="/other.slice/x", hierarchy="v2") == 7
    assert not [s for s in found["netmemtrace_memcg_devmem_tokens_outstanding"]
                if s.labels["cgroup"] == "/y"]
    why = {(s.labels["figure"], s.labels["cgroup"])
           for s in found["netmemtrace_figure_unavailable_info"]}
    assert ("netmemtrace_memcg_devmem_tokens_outstanding", "/y") in why
    assert one(found, "netmemtrace_devmem_tokens_received_total") == 300
    assert one(found, "netmemtrace_devmem_tokens_returned_total") == 250
    assert one(found, "netmemtrace_devmem_tokens_freed_on_destroy_total") == 10
    assert one(found, "netmemtrace_devmem_recvmsg_calls_total") == 20
    assert one(found, "netmemtrace_devmem_dontneed_errors_total") == 1
    assert "netmemtrace_io_uring_zcrx_buffers_handed_total" not in found
    assert ("netmemtrace_io_uring_zcrx_buffers_handed_total", "") in why
    # Capped like every cgroup series: the rest in other.
    reg = CollectorRegistry()
    reg.register(SnapshotCollector(lambda: snapshot(devmem_sockets=socks[:4]), max_cgroups=1))
    capped = {s.labels["cgroup"]: s.value for fam in reg.collect() for s in fam.samples
              if s.name == "netmemtrace_memcg_devmem_tokens_outstanding"}
    assert capped == {"deleted": 42, "other": 7}  # memcg 1 unknown to the snapshot here


@pytest.mark.parametrize("fmt", [TEXT, OPENMETRICS])
def test_fast_encoder_writes_what_prometheus_client_writes(fmt: str) -> None:
    snap = dataclasses.replace(full_snapshot(), pools=(
        *full_snapshot().pools, pool(pool_id=3, netdev=WEIRD_NETDEV, netns='n"s\\')))
    reg = registry(snap)
    families = SnapshotCollector(lambda: snap).families()
    expected = generate_openmetrics(reg) if fmt == OPENMETRICS else generate_latest(reg)
    assert encode(families, fmt) == expected


def test_render_picks_the_encoder_prometheus_client_would() -> None:
    reg = registry(full_snapshot())
    families = SnapshotCollector(full_snapshot).families()
    for accept in ("", "application/openmetrics-text; version=1.0.0",
                   "application/openmetrics-text",
                   "text/plain; version=1.0.0; escaping=allow-utf-8",
                   "application/openmetrics-text; version=1.0.0; escaping=dots"):
        encoder, content_type = choose_encoder(accept)
        assert render(families, content_type, encoder) == encoder(reg), accept


# ---- the catalogue: one spec per family, a golden file of every name, type and HELP --------


GOLDEN = Path(__file__).parent / "golden" / "metrics.txt"


def test_every_family_is_in_the_golden_file_with_its_type_and_help() -> None:
    # What a scrape shows (prometheus_client's own view of the families), not the catalogue.
    shown = "".join(f"{m.name} {m.type} {m.documentation}\n"
                    for m in registry(full_snapshot()).collect())
    assert shown == GOLDEN.read_text(), (
        "metric families changed: regenerate tests/golden/metrics.txt with "
        "`python -m netmemtrace.views.prometheus.catalogue` and review the diff")


def test_no_series_is_written_twice() -> None:
    # Pools without netlink stats (every series of a family unavailable for one reason) and
    # a netmem state missing for one type: each figure is explained once per object.
    snap = dataclasses.replace(full_snapshot(), pools=(
        *full_snapshot().pools, pool(pool_id=11), pool(pool_id=12, kernel=Unavailable("x"))))
    for openmetrics in (False, True):
        reg = registry(snap)
        text = (generate_openmetrics(reg) if openmetrics else generate_latest(reg)).decode()
        seen = [(s.name, tuple(sorted(s.labels.items())))
                for fam in (parse_om(text) if openmetrics else parse_text(text))
                for s in fam.samples]
        assert len(seen) == len(set(seen)), [s for s in seen if seen.count(s) > 1][:3]


def test_holder_kinds_in_help_are_the_kinds_the_holders_collector_reports() -> None:
    source = (Path(holders_mod.__file__)).read_text()
    produced = set(re.findall(r'kind="([a-z_-]+)"', source)) | set(
        holders_mod.PROVIDER_KINDS.values())
    assert produced == set(HOLDER_KINDS)
    help_text = next(line for line in GOLDEN.read_text().splitlines()
                     if line.startswith("netmemtrace_page_pool_zombie_inflight_pages "))
    documented = set(re.findall(r"([a-z_-]+) = ", help_text))
    assert documented == produced
