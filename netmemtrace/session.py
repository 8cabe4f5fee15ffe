"""A tracing session: checks preconditions, loads and attaches every BPF object, and turns
the maps into one immutable Snapshot per read(). The only place views' data comes from."""

from __future__ import annotations

import argparse
import os
import socket
import time
from collections.abc import Callable
from typing import TypeVar

from . import abi, caps, libbpf, probes
from .collect import netlink
from .collect.pagepool import PagePoolReader
from .snapshot import KernelPoolView, SelfStats, Snapshot, Unavailable

T = TypeVar("T")
OBJECTS = ("pagepool",)


def _bpf_stats_enabled() -> bool:
    try:
        with open("/proc/sys/kernel/bpf_stats_enabled") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


class Session:
    def __init__(self, btf_path: str | None = None) -> None:
        probes.check_privileges(btf_path)
        self.loaded: list[probes.LoadedObject] = []
        try:
            for name in OBJECTS:
                self.loaded.append(probes.load_object(
                    name, str(abi.object_path(name)), btf_path=btf_path))
        except (libbpf.LibbpfError, abi.AbiError) as exc:
            self.close()
            raise probes.SetupError(str(exc)) from exc
        except BaseException:
            self.close()
            raise
        self._by_name = {lo.name: lo for lo in self.loaded}
        if not any(s.attached for s in self.probe_status()):
            self.close()
            raise probes.SetupError("no probe could attach: see `netmemtrace probes`")
        self._pagepool = PagePoolReader(self._by_name["pagepool"].obj)

    def probe_status(self) -> list[probes.ProbeStatus]:
        return [s for lo in self.loaded for s in lo.status()]

    def read(self) -> Snapshot:
        """One snapshot. A collector that fails is named in errors; the others still report."""
        start = time.monotonic_ns()
        errors: list[str] = []

        def guarded(what: str, fn: Callable[[], T], fallback: T) -> T:
            try:
                return fn()
            except Exception as exc:  # one failing collector never fails the snapshot
                errors.append(f"{what}: {exc}")
                return fallback

        kernel_pools: dict[int, KernelPoolView] | Unavailable
        try:
            kernel_pools = netlink.dump_page_pools()
        except Exception as exc:  # kernel < 6.8 has no netdev family: unavailable, not empty
            kernel_pools = Unavailable(f"netdev netlink page-pool-get failed: {exc}")
        pools = guarded("page_pool", lambda: self._pagepool.read(start, kernel_pools), [])
        stats = guarded("page_pool stats", self._pagepool.stats, {})
        run_time: dict[str, int] | Unavailable = Unavailable("kernel.bpf_stats_enabled is 0")
        run_cnt: dict[str, int] | Unavailable = run_time
        if _bpf_stats_enabled():
            progs = [lk.program.stats() for lo in self.loaded for lk in lo.obj.links]
            run_time = {p.name: p.run_time_ns for p in progs}
            run_cnt = {p.name: p.run_cnt for p in progs}
        return Snapshot(
            taken_monotonic_ns=start,
            taken_unix_s=time.time(),
            host=socket.gethostname(),
            kernel_release=os.uname().release,
            probes=tuple(self.probe_status()),
            pools=tuple(sorted(pools, key=lambda p: (p.state != "zombie", p.pool_addr))),
            self_stats=SelfStats(
                snapshot_build_ns=time.monotonic_ns() - start,
                pool_map_full_total=stats.get("pool_map_full", 0),
                retired_map_full_total=stats.get("retired_map_full", 0),
                prog_run_time_ns=run_time,
                prog_run_cnt=run_cnt,
            ),
            errors=tuple(errors),
        )

    def close(self) -> None:
        """Detach every link and free every program and map (idempotent)."""
        for lo in self.loaded:
            lo.close()
        self.loaded = []

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_session(args: argparse.Namespace) -> Session:
    """Attach everything per the common CLI options, then drop the capabilities reading no
    longer needs (unless --keep-caps)."""
    session = Session(btf_path=args.btf_path)
    if not args.keep_caps:
        try:
            caps.drop_after_attach()
        except OSError as exc:
            session.close()
            raise probes.SetupError(f"cannot drop capabilities after attach: {exc} "
                                    "(use --keep-caps)") from exc
    return session
