"""Session.read()'s loop over its collectors (session.run), without BPF."""

from __future__ import annotations

import time

from netmemtrace.session import Collector, Draft, run
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
