"""The userspace side of netmem tracking, without BPF: sampling math, per-pool state counts
and hold-time histograms from recorded event sequences, per-state availability."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from netmemtrace.collect.netmem import (
    APP_HOOKS,
    CORE_HOOKS,
    HEAD_PAGES_REASON,
    STATES,
    PoolTotals,
    Tracked,
    devmem_socket,
    hold_histogram,
    holders,
    is_sampled,
    pool_states,
    sample_threshold,
    unavailable_states,
)
from netmemtrace.kernel import abi
from netmemtrace.kernel.probes import ProbeStatus
from netmemtrace.snapshot import HoldBucket, Unavailable

POOL = 0xFFFF_8880_DEAD_0000
# A recorded sequence's events and the state each one moves a netmem to.
EVENT_STATE = {"hold": "pool", "alloc": "driver", "stack": "stack", "token": "application",
               "return": "stack", "put": "pool", "release": "none"}


@dataclass
class Model:
    """What the tracking map and pool counters hold after a sequence of events, per the
    transition table in bpf/netmem.bpf.c (an independent statement of it, for the tests)."""

    entries: dict[int, Tracked] = field(default_factory=dict)
    transitions: Counter = field(default_factory=Counter)
    holds_ns: list[int] = field(default_factory=list)

    def apply(self, t_ns: int, event: str, netmem: int, typ: str, *, owner: int = 0,
              tgid: int = 0) -> None:
        to = EVENT_STATE[event]
        old = self.entries.get(netmem) or Tracked(netmem, POOL, "none", typ, 0, 0, 0, 0, 0)
        if old.state != to:
            self.transitions[old.state, to] += 1
        if old.state == "application" and to != "application":
            self.holds_ns.append(t_ns - old.app_since_ns)
        if to == "none":
            del self.entries[netmem]
            return
        app = to == "application"
        self.entries[netmem] = Tracked(
            netmem, POOL, to, typ, old.app_since_ns if old.state == to else
            (t_ns if app else 0), owner if app else 0, tgid if app else 0, 0, int(app))

    def totals(self) -> PoolTotals:
        buckets = [0] * 64
        for held in self.holds_ns:
            buckets[max(held, 1).bit_length() - 1] += 1
        return PoolTotals(dict(self.transitions), tuple(buckets), len(self.holds_ns),
                          sum(self.holds_ns))


def recorded_sequence(seed: int, n: int) -> list[tuple[int, str, int, str]]:
    """(time ns, event, netmem, type): n net_iovs and n pages through random prefixes of
    their life cycle, interleaved as a pool serving both would see them. The addresses are
    non-canonical so BPF reads through them fail: a net_iov's type is then "net_iov"."""
    rng = random.Random(seed)
    life = ["hold", "alloc", "stack", "token", "return", "put", "release"]
    per = []
    for i in range(n):
        niov = 0xDEAD_8881_0000_0001 + i * 64
        page = 0xDEAD_EA00_0000_0000 + i * 64
        per.append([(e, niov, "net_iov") for e in life[:rng.randint(1, len(life))]])
        per.append([(e, page, "page") for e in ["hold", "alloc", "stack", "put", "release"]
                    [:rng.randint(1, 5)]])
    out, t = [], 1000
    while per:
        i = rng.randrange(len(per))
        t += rng.randint(1, 10**6)
        out.append((t, *per[i].pop(0)))
        if not per[i]:
            per[i] = per[-1]
            per.pop()
    return out


def model_of(events, sample_n: int = 1) -> Model:
    m = Model()
    for t, event, netmem, typ in events:
        if is_sampled(netmem, sample_n):
            m.apply(t, event, netmem, typ, owner=0xABC, tgid=7)
    return m


def test_sampling_threshold_and_predicate() -> None:
    assert sample_threshold(1) == 1 << 32 and sample_threshold(16) == 1 << 28
    with pytest.raises(ValueError):
        sample_threshold(0)
    netmems = [0xFFFF_EA00_0000_0000 + i * 64 for i in range(200_000)]
    assert all(is_sampled(x, 1) for x in netmems)
    assert not is_sampled(0, 1)
    previous = set(netmems)
    for n in (2, 16, 64, 256):
        chosen = {x for x in netmems if is_sampled(x, n)}
        assert abs(len(chosen) / len(netmems) - 1 / n) < 0.15 / n, n
        assert chosen <= previous   # 1-in-64 tracking tracks a subset of 1-in-16's
        previous = chosen
    # The net_iov bit does not change the choice: a niov is tracked through all its states.
    assert all(is_sampled(x | 1, 16) == is_sampled(x, 16) for x in netmems[:5000])


def test_states_from_a_recorded_sequence_at_full_tracking() -> None:
    events = recorded_sequence(seed=1, n=300)
    m = model_of(events)
    states = pool_states(m.entries.values(), m.totals(), 1, ["net_iov"], {})
    truth = Counter((t.type, t.state) for t in m.entries.values())
    assert states.tracked == len(m.entries)
    for typ in ("page", "net_iov"):
        for state in STATES:
            assert states.by_type[typ][state] == truth[typ, state]
    assert states.application == truth["net_iov", "application"] > 0
    assert states.pool == truth["page", "pool"] + truth["net_iov", "pool"]
    assert states.transitions_total == {f"{a}->{b}": n for (a, b), n in m.transitions.items()}


def test_sampling_scales_counts_and_estimates_the_truth() -> None:
    events = recorded_sequence(seed=2, n=20_000)
    truth = model_of(events)
    n = 16
    sampled = model_of(events, n)
    states = pool_states(sampled.entries.values(), sampled.totals(), n, [], {})
    assert states.sample_factor == n
    assert states.tracked == len(sampled.entries)
    for state in STATES:
        exact = sum(1 for t in truth.entries.values() if t.state == state)
        estimate = states.__getattribute__(state)
        assert estimate % n == 0
        assert abs(estimate - exact) < 0.15 * exact + 4 * n, state
    hist = hold_histogram(sampled.totals(), n)
    assert hist.count == len(sampled.holds_ns) * n
    assert abs(hist.count - len(truth.holds_ns)) < 0.15 * len(truth.holds_ns)
    assert sum(b.count for b in hist.buckets) == hist.count


def test_hold_histogram_buckets() -> None:
    m = Model()
    for i, held in enumerate((0, 1, 2, 3, 1000, 1023, 1024, 5 * 10**9)):
        m.apply(10, "token", 100 + i * 64, "dmabuf")
        m.apply(10 + held, "return", 100 + i * 64, "dmabuf")
    hist = hold_histogram(m.totals(), 4)
    assert hist.buckets == (HoldBucket(0, 2, 8), HoldBucket(2, 4, 8), HoldBucket(512, 1024, 8),
                            HoldBucket(1024, 2048, 4), HoldBucket(2**32, 2**33, 4))
    assert (hist.count, hist.sum_ns) == (32, 4 * (0 + 1 + 2 + 3 + 1000 + 1023 + 1024 + 5 * 10**9))
    assert hold_histogram(None, 4).buckets == ()


def test_unavailable_state_spoils_the_pool_total_but_not_other_types() -> None:
    m = model_of(recorded_sequence(seed=3, n=50))
    why = "tcp_recvmsg_dmabuf not attached (why)"
    states = pool_states(m.entries.values(), m.totals(), 1, [], {"net_iov": {"application": why}})
    assert states.by_type["net_iov"]["application"] == Unavailable(why)
    assert states.application == Unavailable(why)
    assert isinstance(states.by_type["page"]["application"], int)
    # A host pool with nothing tracked still answers for its type only.
    empty = pool_states([], None, 8, ["page"], {"net_iov": {"application": why}})
    assert empty.by_type == {"page": {s: 0 for s in STATES}}
    assert (empty.application, empty.transitions_total) == (0, {})


def test_holders_group_by_process_and_memcg() -> None:
    entries = [Tracked(i, POOL, "application", "dmabuf", 100 + i, 0, pid, cg, 1)
               for i, (pid, cg) in enumerate([(10, 1), (10, 1), (10, 2), (20, 1)])]
    entries.append(Tracked(99, POOL, "stack", "dmabuf", 0, 0, 0, 0, 0))
    out = holders(entries, 4, 1000, {10: "app", 20: None}, {1: "/a", 2: "/b"})
    assert [(h.pid, h.memcg_id, h.netmem_held, h.oldest_hold_age_ns) for h in out] == [
        (10, 1, 8, 900), (10, 2, 4, 898), (20, 1, 4, 897)]
    assert (out[0].comm, out[0].memcg_path, out[0].by_type) == ("app", "/a", {"dmabuf": 8})


def _status(attached: set[str], reasons: dict[str, str] | None = None,
            mechanism: str = "fentry") -> dict[str, ProbeStatus]:
    names = {h for hs in CORE_HOOKS.values() for h in hs} | {
        h for hs in APP_HOOKS.values() for h in hs} | {
        "tcp_recvmsg_dmabuf_args", "io_zcrx_queue_cqe_args"}
    reasons = reasons or {}
    return {n: ProbeStatus("netmem", n, mechanism if n in attached else None, n in attached,
                           reasons.get(n, "fentry: fentry denied: EPERM")) for n in names}


def test_availability_from_hooks() -> None:
    every = set(_status(set()))
    assert unavailable_states(_status(every), head_pages=True) == {}
    heads = unavailable_states(_status(every), head_pages=False)
    assert heads == {"page": {"driver": HEAD_PAGES_REASON, "stack": HEAD_PAGES_REASON}}
    # A kernel without io_uring zcrx: nothing can take that path, so nothing is missing.
    # (The reason as Kernel.static_check words it.)
    absent = "fentry: function io_zcrx_queue_cqe not in this kernel (not in /proc/kallsyms); " \
             "kprobe: function io_zcrx_queue_cqe not in this kernel (not in /proc/kallsyms)"
    no_zcrx = _status(every - {"io_zcrx_queue_cqe", "io_pp_zc_alloc_netmems"},
                      {"io_zcrx_queue_cqe": absent, "io_pp_zc_alloc_netmems": absent})
    assert unavailable_states(no_zcrx, head_pages=True) == {}
    # Without the put hook nothing is known to come back to the pool: every state but the
    # pages' application one (page_pool never lends a page to an application) is unknown.
    no_put = unavailable_states(_status(every - {"page_pool_put_unrefed_netmem"}), True)
    assert {t: set(s) for t, s in no_put.items()} == {
        "page": set(STATES) - {"application"}, "dmabuf": set(STATES),
        "io_uring": set(STATES), "net_iov": set(STATES)}
    assert "page_pool_put_unrefed_netmem not attached (fentry: fentry denied: EPERM)" in \
        no_put["dmabuf"]["pool"]
    # A kretprobe without the kprobe that keeps its arguments sees nothing.
    kret = _status(every - {"tcp_recvmsg_dmabuf_args"}, mechanism="kprobe")
    assert set(unavailable_states(kret, True)["dmabuf"]) == {"stack", "application"}


def test_devmem_socket_outstanding_tokens() -> None:
    rec_t = abi.btf("netmem").struct("devmem_socket")
    rec = rec_t(sk=0x1234, first_seen_ns=100, tokens_received=10, tokens_returned=4,
                tracked_app=2, tgid=42, comm=b"ncdevmem")
    sock = devmem_socket(rec, 1100, 16, None, "/pod")
    assert (sock.state, sock.tokens_outstanding, sock.netmem_held) == ("open", 6, 32)
    assert (sock.comm, sock.first_seen_age_ns, sock.destroy_age_ns) == ("ncdevmem", 1000, None)
    rec.destroy_ns, rec.tokens_freed_on_destroy = 600, 6
    gone = devmem_socket(rec, 1100, 16, "tcp_recvmsg_dmabuf not attached", None)
    assert (gone.state, gone.tokens_outstanding, gone.destroy_age_ns) == ("destroyed", 0, 500)
    assert gone.netmem_held == Unavailable("tcp_recvmsg_dmabuf not attached")
    rec.tokens_returned = 20   # tokens received before attach came back
    assert isinstance(devmem_socket(rec, 1100, 1, None, None).tokens_outstanding, Unavailable)
