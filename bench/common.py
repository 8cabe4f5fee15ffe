"""Helpers shared by the benchmark parts: kernel stats switch, floor object, bpftrace, iperf3,
and the tool under test as a separate process.

Benchmarks report ratios of figures measured side by side in one run; nothing here decides
pass or fail.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from netmemtrace.workload.demo import VethTopology

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
BUILD = REPO / "build" / "bench"
STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
CLK_TCK = os.sysconf("SC_CLK_TCK")
_START_TIMEOUT_S = 60.0


class BenchError(RuntimeError):
    """A benchmark step could not run; the message says which and why."""


def run(cmd: list[str], timeout: float = 60.0) -> str:
    try:
        done = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise BenchError(f"{cmd[0]} is not installed (make deps)") from None
    except subprocess.CalledProcessError as exc:
        raise BenchError(f"`{' '.join(cmd)}` failed: {exc.stderr.strip()[-300:]}") from None
    return done.stdout


@contextmanager
def bpf_stats() -> Iterator[None]:
    """kernel.bpf_stats_enabled=1 for the block, then back to what it was."""
    previous = STATS_SYSCTL.read_text().strip()
    STATS_SYSCTL.write_text("1")
    try:
        yield
    finally:
        STATS_SYSCTL.write_text(previous)


def compile_floor() -> Path:
    """bench/floor.bpf.c with the Makefile's clang flags, into build/bench/."""
    arch = {"x86_64": "x86", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    out = BUILD / "floor.bpf.o"
    out.parent.mkdir(parents=True, exist_ok=True)
    run(["clang", "-O2", "-g", "-Wall", "-Werror", "-target", "bpf", f"-D__TARGET_ARCH_{arch}",
         f"-I{REPO / 'build'}", f"-I{REPO / 'bpf'}", "-c", str(BENCH / "floor.bpf.c"),
         "-o", str(out)])
    return out


def prog_stats(ids: set[int]) -> dict[int, tuple[int, int]]:
    """(run_time_ns, run_cnt) of programs by id, as `bpftool prog show` reports them."""
    progs = json.loads(run(["bpftool", "-j", "prog", "show"]))
    return {p["id"]: (p.get("run_time_ns", 0), p.get("run_cnt", 0))
            for p in progs if p["id"] in ids}


class Bpftrace:
    """bpftrace running a script until close(); its programs' ids by tracepoint."""

    def __init__(self, script: Path) -> None:
        self._log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in close())
        # Its map dump at exit goes nowhere: only the programs' run time matters here.
        try:
            self.proc = subprocess.Popen(["bpftrace", str(script)], stdout=subprocess.DEVNULL,
                                         stderr=self._log, text=True)
        except FileNotFoundError:
            raise BenchError("bpftrace is not installed (make deps)") from None
        self.progs: dict[str, int] = {}  # tracepoint -> program id
        expected = sum(ln.startswith("tracepoint:") for ln in script.read_text().splitlines())
        deadline = time.monotonic() + _START_TIMEOUT_S
        while len(self.progs) < expected:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise BenchError(f"bpftrace did not attach: {self.stderr()}")
            time.sleep(0.2)
            self.progs = {e["tracepoint"]: e["prog_id"]
                          for e in json.loads(run(["bpftool", "-j", "perf", "show"]))
                          if e.get("pid") == self.proc.pid and "tracepoint" in e}

    def stderr(self) -> str:
        self._log.seek(0)
        lines = [ln for ln in self._log.read().splitlines() if ln.strip()]
        return " / ".join(lines[-3:]) or f"exit status {self.proc.returncode}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def iperf3(topo: VethTopology, seconds: float, parallel: int, window: str | None = None
           ) -> tuple[float, int]:
    """TCP goodput tx -> rx in bits/s and bytes received, as the iperf3 receiver measured."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", topo.rx_netns, "iperf3", "--server", "--one-off",
         "--forceflush", "--bind", topo.rx_addr],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert server.stdout is not None
        # The first line is printed once the server listens; connecting earlier is refused.
        if not select.select([server.stdout], [], [], _START_TIMEOUT_S)[0]:
            raise BenchError("iperf3 server did not start")
        server.stdout.readline()
        client = ["ip", "netns", "exec", topo.tx_netns, "iperf3", "--client", topo.rx_addr,
                  "--time", f"{seconds:g}", "--parallel", str(parallel), "--json"]
        out = json.loads(run(client + (["--window", window] if window else []),
                             timeout=seconds + _START_TIMEOUT_S))
        if "error" in out:
            raise BenchError(f"iperf3: {out['error']}")
        received = out["end"]["sum_received"]
        return float(received["bits_per_second"]), int(received["bytes"])
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
        if server.stdout:
            server.stdout.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_available() -> bool:
    return subprocess.run([sys.executable, "-m", "netmemtrace.cli", "serve", "--help"],
                          capture_output=True).returncode == 0


def http_get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


@dataclass
class ProcUsage:
    cpu_s: float      # user + system, all threads
    rss_bytes: int
    hwm_bytes: int    # peak RSS


def proc_usage(pid: int) -> ProcUsage:
    # Fields after the parenthesised comm: utime and stime are the 12th and 13th.
    stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    status = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)

    def kib(key: str) -> int:
        return int(status[key].split()[0]) * 1024

    return ProcUsage((int(stat[11]) + int(stat[12])) / CLK_TCK, kib("VmRSS"), kib("VmHWM"))


class Tool:
    """netmemtrace running as a user runs it, in its own process, refreshing every interval:
    `netmemtrace serve` when the CLI has it, else bench/reader.py (a Session read every
    interval). ready_s is the wall time from exec to the first complete snapshot."""

    def __init__(self, interval: float = 1.0, use_serve: bool = True) -> None:
        self._log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in close())
        self.kind = "serve" if use_serve else "reader"
        start = time.monotonic()
        if use_serve:
            self.url = f"http://127.0.0.1:{free_port()}"
            cmd = [sys.executable, "-m", "netmemtrace.cli", "serve", "--listen",
                   self.url.removeprefix("http://"), "--interval", f"{interval:g}"]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._log)
            self._wait(self._healthy)
        else:
            cmd = [sys.executable, str(BENCH / "reader.py"), "--interval", f"{interval:g}"]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log,
                                         text=True)
            self._wait(self._reported_ready)
        self.ready_s = time.monotonic() - start

    def _wait(self, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._log.seek(0)
                err = self._log.read().strip().splitlines()
                self.close()
                raise BenchError(f"{self.kind} did not start: {err[-1] if err else '?'}")

    def _healthy(self) -> bool:
        try:
            http_get(self.url + "/healthz", timeout=1.0)
            return True
        except OSError:
            time.sleep(0.02)
            return False

    def _reported_ready(self) -> bool:
        assert self.proc.stdout is not None
        if select.select([self.proc.stdout], [], [], 0.1)[0]:
            return self.proc.stdout.readline().startswith("ready")
        return False

    def usage(self) -> ProcUsage:
        return proc_usage(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()

    def __enter__(self) -> Tool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
