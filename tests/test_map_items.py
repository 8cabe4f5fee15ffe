"""libbpf.Map.items() reads a map in batches of bounded size (a buffer per read sized to
max_entries cost the daemon MBs of RSS), on a real per-CPU hash: every entry comes back once,
whatever the batch size, including hash buckets holding more entries than one batch."""

from __future__ import annotations

import ctypes

import pytest

from netmemtrace.kernel import abi, libbpf, probes

pytestmark = pytest.mark.live


@pytest.fixture
def memcg_sock():
    lo = probes.load_object("memcg", str(abi.object_path("memcg")), force="raw_tp",
                            attach=False)
    yield lo.obj.map("memcg_sock")  # PERCPU_HASH, u64 key, 16384 entries
    lo.close()


@pytest.mark.parametrize("batch", [1, 7, libbpf.BATCH_ENTRIES])
def test_every_entry_once(memcg_sock, monkeypatch, batch: int) -> None:
    monkeypatch.setattr(libbpf, "BATCH_ENTRIES", batch)
    m = memcg_sock
    stride = (m.value_size + 7) & ~7
    want = {}
    # 1,000 keys in 16,384 buckets: some buckets hold two or more (batch 1 must grow).
    for key in range(1, 1001):
        per_cpu = [bytes([key % 251, cpu + 1]) * (m.value_size // 2) for cpu in range(m.ncpus)]
        m.update(ctypes.c_uint64(key * 7919), b"".join(v.ljust(stride, b"\0")
                                                      for v in per_cpu))
        want[key * 7919] = per_cpu
    got = {int.from_bytes(k, "little"): v for k, v in m.items()}
    assert m._batch_ok
    assert len(m.items()) == len(got) == 1000
    assert got == want


def test_empty_map(memcg_sock) -> None:
    assert memcg_sock.items() == []
    assert memcg_sock._batch_ok
