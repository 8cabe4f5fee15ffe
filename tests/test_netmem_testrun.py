"""netmem.bpf.c on synthetic arguments with BPF_PROG_TEST_RUN.

Tracepoint transitions run their own raw_tp programs; transitions made by function probes
(fentry/kprobe, which BPF_PROG_TEST_RUN cannot run and which cannot attach here) and by the
syscall tracepoints run through netmem_replay, which calls the very cores those programs
call. The fake netmem addresses are non-canonical, so CO-RE reads through them fail: a fake
net_iov is of type "net_iov" (its provider unreadable) and a fake page is a "page".
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from test_netmem_aggregate import model_of, recorded_sequence
from workloads.devmem_calls import MSG_SOCK_DEVMEM, SCM_DEVMEM_DMABUF, SO_DEVMEM_DONTNEED

from netmemtrace.collect.netmem import (
    HASH_MUL,
    POOL_OBJECT_HOOKS,
    SHARED_MAPS,
    NetmemReader,
    Tracked,
    is_sampled,
    pool_states,
    shared_maps,
    slot_mask,
)
from netmemtrace.kernel import abi, probes
from netmemtrace.snapshot import DevmemSocket

pytestmark = pytest.mark.live

POOL = 0xFFFF_8880_DEAD_0000
PAGE = 0xDEAD_EA00_0004_0000
NET_IOV = 0xDEAD_8881_0000_2001       # net_iov netmem_ref: lowest bit set
IFQ = 0xFFFF_8882_0000_0000
FAKE_SK = 0xFFFF_8883_0000_0000
OPS = {k.lower(): v for k, v in abi.btf("netmem").enum("netmem_replay_op",
                                                          "NETMEM_REPLAY_").items()}
SO_DEVMEM_LINEAR = 78


def map_id(fd: int) -> int:
    """The kernel's id of the map behind an fd (from /proc/self/fdinfo)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("map_id:"))


class Harness:
    """The netmem object sharing its maps with a pagepool object, as a Session loads them:
    page_pool tracepoint hooks run the pagepool object's programs (which do both domains'
    work), the rest the netmem object's."""

    def __init__(self, pool_lo: probes.LoadedObject, lo: probes.LoadedObject,
                 sample_n: int) -> None:
        self.pool_lo = pool_lo
        self.lo = lo
        self.reader = NetmemReader(lo, sample_n, pool_lo)
        self._stats = abi.Stats("netmem", lo.obj.map("netmem_stats"))

    def stats(self) -> dict[str, int]:
        return self._stats.read()

    def run(self, hook: str, *values: int) -> None:
        ctx = struct.pack(f"<{len(values)}Q", *(v & (2**64 - 1) for v in values))
        owner = self.pool_lo if hook in POOL_OBJECT_HOOKS else self.lo
        assert owner.obj.programs[f"{hook}__raw_tp"].test_run(ctx) == 0

    def replay(self, op: str, a: int = 0, b: int = 0, c: int = 0) -> None:
        ctx = struct.pack("<4Q", *(v & (2**64 - 1) for v in (OPS[op.lower()], a, b, c)))
        assert self.lo.obj.programs["netmem_replay"].test_run(ctx) == 0

    def tracked(self) -> dict[int, Tracked]:
        return {t.netmem: t for t in self.reader.tracked()}

    def state(self, netmem: int) -> str | None:
        t = self.tracked().get(netmem)
        return t.state if t else None

    def transitions(self, pool: int = POOL) -> dict[tuple[str, str], int]:
        totals = self.reader.pool_totals().get(pool)
        return {k: n for k, n in totals.transitions.items() if n} if totals else {}

    def sockets(self) -> dict[int, DevmemSocket]:
        _pools, socks, _summary = self.reader.read(time.monotonic_ns(), [])
        return {s.sock_addr: s for s in socks}

    def tracked_app(self, sk: int) -> int:
        """The socket record's count of tracked netmem in the application state."""
        raw = self.lo.obj.map("devmem_sockets").lookup(ctypes.c_uint64(sk))
        assert raw is not None
        return abi.decode(abi.btf("netmem").struct("devmem_socket"), raw).tracked_app


def _load_pair(max_entries: dict[str, int] | None = None
               ) -> tuple[probes.LoadedObject, probes.LoadedObject]:
    pool_lo = probes.load_object("pagepool", str(abi.object_path("pagepool")), force="raw_tp",
                                 attach=False, max_entries=max_entries)
    try:
        return pool_lo, probes.load_object("netmem", str(abi.object_path("netmem")),
                                           force="raw_tp", attach=False,
                                           reuse=shared_maps(pool_lo))
    except BaseException:
        pool_lo.close()
        raise


def _harness(sample_n: int, max_entries: dict[str, int] | None = None) -> Iterator[Harness]:
    pool_lo, lo = _load_pair(max_entries)
    try:
        yield Harness(pool_lo, lo, sample_n)
    finally:
        lo.close()
        pool_lo.close()


@pytest.fixture
def h() -> Iterator[Harness]:
    yield from _harness(1)


def test_net_iov_walks_pool_driver_stack_application_and_back(h: Harness) -> None:
    h.run("page_pool_state_hold", POOL, NET_IOV, 1)
    assert h.state(NET_IOV) == "pool"
    entry = h.tracked()[NET_IOV]
    assert (entry.pool, entry.type) == (POOL, "net_iov")
    h.replay("driver_alloc", POOL, NET_IOV)
    assert h.state(NET_IOV) == "driver"
    h.replay("stack", NET_IOV)
    assert h.state(NET_IOV) == "stack"
    before = time.monotonic_ns()
    h.replay("dmabuf_token", FAKE_SK, NET_IOV)
    handed = time.monotonic_ns()
    app = h.tracked()[NET_IOV]
    assert (app.state, app.owner, app.user_refs) == ("application", FAKE_SK, 1)
    assert app.tgid == os.getpid()
    assert before <= app.app_since_ns <= handed
    assert h.tracked_app(FAKE_SK) == 1
    time.sleep(0.02)
    # SO_DEVMEM_DONTNEED: napi_pp_put_page inside sock_devmem_dontneed drops the token ...
    h.replay("dontneed_enter", FAKE_SK)
    returning = time.monotonic_ns()
    h.replay("napi_put", NET_IOV)
    returned = time.monotonic_ns()
    h.replay("dontneed_exit")
    assert h.state(NET_IOV) == "stack"
    # ... and the last reference going brings it back to the pool.
    h.replay("put_unrefed", POOL, NET_IOV)
    assert h.state(NET_IOV) == "pool"
    h.run("page_pool_state_release", POOL, NET_IOV, 1)
    assert NET_IOV not in h.tracked()
    assert h.transitions() == {
        ("none", "pool"): 1, ("pool", "driver"): 1, ("driver", "stack"): 1,
        ("stack", "application"): 1, ("application", "stack"): 1, ("stack", "pool"): 1,
        ("pool", "none"): 1}
    totals = h.reader.pool_totals()[POOL]
    assert totals.hold_count == 1
    assert returning - handed <= totals.hold_sum_ns <= returned - before
    bucket = totals.hold_sum_ns.bit_length() - 1
    assert [i for i, n in enumerate(totals.hold_buckets) if n] == [bucket]
    assert h.tracked_app(FAKE_SK) == 0


def test_napi_put_outside_dontneed_or_for_another_socket_keeps_the_token(h: Harness) -> None:
    h.run("page_pool_state_hold", POOL, NET_IOV, 1)
    h.replay("dmabuf_token", FAKE_SK, NET_IOV)
    h.replay("dmabuf_token", FAKE_SK, NET_IOV)      # a second token on the same net_iov
    assert h.tracked()[NET_IOV].user_refs == 2
    h.replay("napi_put", NET_IOV)                   # the skb's reference, not the user's
    h.replay("dontneed_enter", FAKE_SK + 0x1000)
    h.replay("napi_put", NET_IOV)                   # another socket's dontneed
    h.replay("dontneed_exit")
    assert h.tracked()[NET_IOV].user_refs == 2
    h.replay("dontneed_enter", FAKE_SK)
    h.replay("napi_put", NET_IOV)
    assert (h.state(NET_IOV), h.tracked()[NET_IOV].user_refs) == ("application", 1)
    h.replay("napi_put", NET_IOV)
    h.replay("dontneed_exit")
    assert h.state(NET_IOV) == "stack"
    assert h.reader.pool_totals()[POOL].hold_count == 1


class _MsgHdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_int),
                ("msg_iov", ctypes.c_void_p), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_uint)]


def _control(*cmsgs: tuple[int, int]) -> bytes:
    """Control data as the kernel writes it: cmsghdr + struct dmabuf_cmsg (24 bytes) each."""
    return b"".join(struct.pack("<QiiQIIII", 16 + 24, level, kind, 0, 0, 0, 0, 0)
                    for level, kind in cmsgs)


def test_socket_destroyed_while_holding_tokens(h: Harness) -> None:
    """recvmsg hands 3 tokens, setsockopt returns 1, the socket dies holding 2 of them and
    the net_iov it held leaves the application."""
    ctl = _control((socket.SOL_SOCKET, SO_DEVMEM_LINEAR), (socket.SOL_SOCKET, SCM_DEVMEM_DMABUF),
                   (socket.SOL_SOCKET, SCM_DEVMEM_DMABUF), (socket.IPPROTO_IP, SCM_DEVMEM_DMABUF),
                   (socket.SOL_SOCKET, SCM_DEVMEM_DMABUF))
    ctl_buf = ctypes.create_string_buffer(ctl, len(ctl))
    msg = _MsgHdr(msg_control=ctypes.addressof(ctl_buf), msg_controllen=len(ctl))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        # The cores run in this process, so the fd resolves to this socket's struct sock.
        h.replay("recvmsg_enter", tcp.fileno(), ctypes.addressof(msg), MSG_SOCK_DEVMEM)
        h.replay("recvmsg_exit", 4096)
        [sock] = h.sockets().values()
        sk = sock.sock_addr
        assert (sock.recvmsg_calls, sock.recvmsg_errors, sock.tokens_received) == (1, 0, 3)
        h.run("page_pool_state_hold", POOL, NET_IOV, 1)
        h.replay("stack", NET_IOV)
        h.replay("dmabuf_token", sk, NET_IOV)
        h.replay("setsockopt_enter", tcp.fileno(), socket.SOL_SOCKET, SO_DEVMEM_DONTNEED)
        h.replay("setsockopt_exit", 1)
    h.run("tcp_destroy_sock", sk)
    sock = h.sockets()[sk]
    assert sock.state == "destroyed"
    assert (sock.dontneed_calls, sock.dontneed_errors, sock.tokens_returned) == (1, 0, 1)
    assert (sock.tokens_freed_on_destroy, sock.tokens_outstanding) == (2, 0)
    assert sock.pid == os.getpid()
    assert h.state(NET_IOV) == "stack"
    assert h.transitions()[("application", "stack")] == 1
    stats = h.stats()
    assert (stats["recvmsg_tokens"], stats["dontneed_tokens"], stats["destroy_tokens"]) == (3, 1, 2)
    assert h.tracked_app(sk) == 0
    # The record stays destroyed: a second destroy event frees nothing twice.
    h.run("tcp_destroy_sock", sk)
    assert h.stats()["destroy_tokens"] == 2


def test_recvmsg_without_devmem_flag_and_errors(h: Harness) -> None:
    ctl_buf = ctypes.create_string_buffer(_control((socket.SOL_SOCKET, SCM_DEVMEM_DMABUF)), 40)
    msg = _MsgHdr(msg_control=ctypes.addressof(ctl_buf), msg_controllen=40)
    with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        h.replay("recvmsg_enter", tcp.fileno(), ctypes.addressof(msg), 0)   # no MSG_SOCK_DEVMEM
        h.replay("recvmsg_exit", 40)
        h.replay("recvmsg_enter", tcp.fileno(), ctypes.addressof(msg), MSG_SOCK_DEVMEM)
        h.replay("recvmsg_exit", -11)                                       # EAGAIN
        h.replay("setsockopt_enter", udp.fileno(), socket.SOL_SOCKET, SO_DEVMEM_DONTNEED)
        h.replay("setsockopt_exit", -9)                                     # EBADF
        h.replay("setsockopt_enter", tcp.fileno(), socket.SOL_SOCKET, SO_DEVMEM_DONTNEED - 1)
        h.replay("setsockopt_exit", 0)                                      # another option
    stats = h.stats()
    assert (stats["recvmsg_calls"], stats["recvmsg_errors"], stats["recvmsg_tokens"]) == (1, 1, 0)
    assert (stats["dontneed_calls"], stats["dontneed_errors"]) == (1, 1)
    # Only TCP sockets get a record: the UDP call is in the totals alone.
    [sock] = h.sockets().values()
    assert (sock.recvmsg_calls, sock.recvmsg_errors, sock.dontneed_calls) == (1, 1, 0)


def test_cmsg_walk_that_faults_is_counted(h: Harness) -> None:
    msg = _MsgHdr(msg_control=16, msg_controllen=40)   # unmapped control pointer
    with socket.socket() as tcp:
        h.replay("recvmsg_enter", tcp.fileno(), ctypes.addressof(msg), MSG_SOCK_DEVMEM)
        h.replay("recvmsg_exit", 10)
    stats = h.stats()
    assert (stats["recvmsg_tokens"], stats["recvmsg_cmsg_unread"]) == (0, 1)


def test_zcrx_buffer_handed_and_refilled(h: Harness) -> None:
    niov = NET_IOV & ~1
    h.run("page_pool_state_hold", POOL, NET_IOV, 1)
    h.replay("zcrx_cqe", niov, IFQ, 0)          # CQ full: not handed
    assert h.state(NET_IOV) == "pool"
    h.replay("stack", NET_IOV)
    h.replay("zcrx_cqe", niov, IFQ, 1)
    entry = h.tracked()[NET_IOV]
    assert (entry.state, entry.owner) == ("application", IFQ)
    h.replay("zcrx_refill", 0, NET_IOV)          # the refill returned it from the ring
    assert h.state(NET_IOV) == "pool"
    assert h.transitions()[("application", "pool")] == 1
    stats = h.stats()
    assert (stats["zcrx_buffers"], stats["zcrx_refills"]) == (1, 1)


def test_page_in_skb_and_late_first_sight(h: Harness) -> None:
    """A netmem first seen by a function probe is tracked from there without a transition;
    the stack never starts tracking (skb frags need not be page_pool memory)."""
    h.replay("stack", PAGE)
    assert PAGE not in h.tracked()
    h.replay("driver_alloc", POOL, PAGE)
    assert (h.state(PAGE), h.tracked()[PAGE].type) == ("driver", "page")
    assert h.transitions() == {}
    h.replay("stack", PAGE)
    h.replay("put_unrefed", POOL, PAGE)
    assert h.transitions() == {("driver", "stack"): 1, ("stack", "pool"): 1}


def test_freed_pool_drops_its_counters(h: Harness) -> None:
    h.run("page_pool_state_hold", POOL, PAGE, 1)
    h.run("page_pool_release", POOL, 1, 1, 0)     # destroyed, one page still out
    assert POOL in h.reader.pool_totals()
    h.run("page_pool_state_release", POOL, PAGE, 1)
    h.run("page_pool_release", POOL, 0, 1, 1)     # the retry finds none: the kernel frees it
    assert POOL not in h.reader.pool_totals()
    assert h.tracked() == {}


def test_sampling_tracks_exactly_the_hashed_netmem() -> None:
    n = 8
    pages = [PAGE + i * 64 for i in range(2000)]
    for harness in _harness(n):
        for hold, page in enumerate(pages, 1):
            harness.run("page_pool_state_hold", POOL, page, hold)
        expected = {p for p in pages if is_sampled(p, n)}
        assert set(harness.tracked()) == expected
        assert 2000 / n * 0.7 < len(expected) < 2000 / n * 1.3
        assert harness.reader.sample_factor == n
        assert harness.transitions() == {("none", "pool"): len(expected)}


def table_model(netmems: list[int], entries: int) -> tuple[set[int], int]:
    """netmem.bpf.c's 2-way table, modelled: what stays tracked and how many evictions."""
    slots: list[int] = [0] * entries
    evicted = 0
    for x in netmems:
        first = ((((x & ~1) >> 6) * HASH_MUL) % 2**64 >> 16) & slot_mask(entries)
        if slots[first] != x and (slots[first] or slots[first + 1] == x):
            evicted += slots[first + 1] not in (0, x)
            first += 1
        slots[first] = x
    return {x for x in slots if x}, evicted


def test_slot_pair_overflow_evicts_and_is_counted() -> None:
    pages = [PAGE + i * 64 for i in range(10)]
    expected, evicted = table_model(pages, 4)
    assert len(expected) == 4 and evicted > 0
    for harness in _harness(1, max_entries={"netmems": 4}):
        for hold, page in enumerate(pages, 1):
            harness.run("page_pool_state_hold", POOL, page, hold)
        assert set(harness.tracked()) == expected
        assert harness.stats()["netmem_map_full"] == evicted
        # An evicted netmem's release finds another in its slot and changes nothing.
        gone = next(p for p in pages if p not in expected)
        harness.run("page_pool_state_release", POOL, gone, 1)
        assert set(harness.tracked()) == expected


def test_nothing_is_tracked_before_userspace_configures_sampling() -> None:
    pool_lo, lo = _load_pair()
    try:
        ctx = struct.pack("<3Q", POOL, PAGE, 1)
        assert pool_lo.obj.programs["page_pool_state_hold__raw_tp"].test_run(ctx) == 0
        with lo.obj.map("netmems").mapped() as table:
            assert table[:] == bytes(len(table))
        # The pagepool domain's part of the same program ran: the pool is counted.
        assert len(pool_lo.obj.map("pools").items()) == 1
    finally:
        lo.close()
        pool_lo.close()


def test_objects_share_one_table_and_config() -> None:
    """Each object's copy of the shared maps is the same kernel map: an entry the pagepool
    object's program writes is read through the netmem object, and the config the reader
    writes through the netmem object is what the pagepool object's program samples with."""
    for harness in _harness(1):
        harness.run("page_pool_state_hold", POOL, PAGE, 1)
        for name in SHARED_MAPS:
            a, b = harness.pool_lo.obj.map(name), harness.lo.obj.map(name)
            assert map_id(a.fd) == map_id(b.fd), name
        assert harness.state(PAGE) == "pool"


def test_recorded_sequence_matches_the_userspace_model() -> None:
    """The same recorded event sequence, played through the BPF cores at 1-in-4 sampling and
    through the tests' model of the transition table, leaves the same tracked states and
    transition counts; the aggregation then estimates from those."""
    n = 4
    events = recorded_sequence(seed=7, n=150)
    for harness in _harness(n):
        for i, (_t, event, netmem, _typ) in enumerate(events, 1):
            if event == "hold":
                harness.run("page_pool_state_hold", POOL, netmem, i)
            elif event == "release":
                harness.run("page_pool_state_release", POOL, netmem, i)
            elif event == "alloc":
                harness.replay("driver_alloc", POOL, netmem)
            elif event == "stack":
                harness.replay("stack", netmem)
            elif event == "token":
                harness.replay("dmabuf_token", FAKE_SK, netmem)
            elif event == "return":
                harness.replay("dontneed_enter", FAKE_SK)
                harness.replay("napi_put", netmem)
                harness.replay("dontneed_exit")
            else:
                harness.replay("put_unrefed", POOL, netmem)
        model = model_of(events, n)
        got = harness.tracked()
        assert {k: (t.state, t.type) for k, t in got.items()} == {
            k: (t.state, t.type) for k, t in model.entries.items()}
        totals = harness.reader.pool_totals()[POOL]
        assert {k: v for k, v in totals.transitions.items() if v} == dict(model.transitions)
        assert totals.hold_count == len(model.holds_ns) > 0
        states = pool_states(got.values(), totals, n, [], {})
        assert states.application == n * sum(
            t.state == "application" for t in model.entries.values())
