"""Soak: `netmemtrace serve` for a long while under demo traffic, memory cgroup churn and
steady scrapes; RSS, threads and open files of serve sampled throughout (issue 17.7).

Not part of `make test` (it runs for --minutes). Prints a table of samples and the first,
last and peak figures side by side, plus the scrape count, failures and slowest scrape; the
figures of a 10-minute run are in bench/README.md. Run as root:

    .venv/bin/python bench/soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, Tool, http_get  # noqa: E402

V1_MEMCG = Path("/sys/fs/cgroup/memory")
SCRAPES_PER_S = 5
CHURN_PER_S = 4
SAMPLE_EVERY_S = 30


def own_memcg() -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return V1_MEMCG / path.lstrip("/")
    raise SystemExit("soak: no memory controller in /proc/self/cgroup")


def churn_one(parent: Path, serial: int) -> None:
    """A child memcg (under this process's own: nobody else's is touched) with a short
    process that charges socket memory over loopback, then removed."""
    d = parent / f"nmt-soak-{os.getpid()}-{serial}"
    d.mkdir()
    try:
        (d / "memory.kmem.tcp.limit_in_bytes").write_text(str(1 << 30))
        code = ("import socket; s = socket.create_server(('127.0.0.1', 0)); "
                "c = socket.create_connection(s.getsockname()); p, _ = s.accept(); "
                "c.sendall(b'x' * 200000); p.recv(65536)")
        subprocess.run([sys.executable, "-c", code], timeout=30, check=False,
                       preexec_fn=lambda: (d / "cgroup.procs").write_text(str(os.getpid())))
    finally:
        deadline = time.monotonic() + 10
        while True:
            try:
                d.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def status(pid: int) -> tuple[int, int, int]:
    """(RSS kB, threads, open files) of pid."""
    fields = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return (int(fields["VmRSS"].split()[0]), int(fields["Threads"]),
            len(os.listdir(f"/proc/{pid}/fd")))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    args = p.parse_args()
    seconds = args.minutes * 60
    tool = Tool(interval=1.0)
    stop = threading.Event()
    scrapes, failures, slowest = [0], [0], [0.0]
    churned = [0]

    def scraper() -> None:
        while not stop.wait(1 / SCRAPES_PER_S):
            start = time.monotonic()
            try:
                http_get(tool.url + "/metrics", timeout=10)
                scrapes[0] += 1
            except OSError:
                failures[0] += 1
            slowest[0] = max(slowest[0], time.monotonic() - start)

    def churner() -> None:
        parent = own_memcg()
        while not stop.wait(1 / CHURN_PER_S):
            churn_one(parent, churned[0])
            churned[0] += 1

    demo = subprocess.Popen([sys.executable, "-m", "netmemtrace.cli", "demo", "--duration",
                             f"{seconds:g}"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    workers = [threading.Thread(target=f, daemon=True) for f in (scraper, churner)]
    for w in workers:
        w.start()
    samples = []
    start = time.monotonic()
    try:
        while (elapsed := time.monotonic() - start) < seconds:
            samples.append((elapsed, *status(tool.proc.pid)))
            print(f"{elapsed:7.0f} s  rss {samples[-1][1]:7d} kB  threads {samples[-1][2]:3d}"
                  f"  fds {samples[-1][3]:4d}  scrapes {scrapes[0]}  churned {churned[0]}",
                  flush=True)
            time.sleep(min(SAMPLE_EVERY_S, max(0.0, seconds - elapsed)))
        samples.append((time.monotonic() - start, *status(tool.proc.pid)))
    finally:
        stop.set()
        for w in workers:
            w.join(30)
        demo.terminate()
        demo.wait(60)
        tool.close()
    first, last = samples[1] if len(samples) > 2 else samples[0], samples[-1]
    peak = max(s[1] for s in samples)
    print(f"\nsoak {args.minutes:g} min: {scrapes[0]} scrapes ({failures[0]} failed, slowest "
          f"{slowest[0] * 1000:.0f} ms), {churned[0]} memcgs created and removed")
    print("             after warm-up    end     peak")
    print(f"RSS kB       {first[1]:>13d} {last[1]:>6d} {peak:>8d}")
    print(f"threads      {first[2]:>13d} {last[2]:>6d} {max(s[2] for s in samples):>8d}")
    print(f"open files   {first[3]:>13d} {last[3]:>6d} {max(s[3] for s in samples):>8d}")
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    sys.exit(main())
