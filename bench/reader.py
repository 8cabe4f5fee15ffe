"""netmemtrace as a long-running reader: one Session, one complete snapshot per interval.

The benchmark's stand-in for `netmemtrace serve` when the CLI does not have it yet, and the
probe for start-up time: it reports `ready IMPORT_S SESSION_S READ_S CPU_S` on stdout once
the first snapshot is complete (CPU_S: the process's user + system time so far, every
thread). --once stops there.
"""

from __future__ import annotations

import time

_T0 = time.monotonic()

import argparse  # noqa: E402  (imports are part of the start-up being timed)
import os  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402

from netmemtrace.session import Session  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--once", action="store_true")
    args = p.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    imported = time.monotonic()
    with Session() as session:
        attached = time.monotonic()
        session.read()
        done = time.monotonic()
        cpu = os.times()
        print(f"ready {imported - _T0:.4f} {attached - imported:.4f} {done - attached:.4f} "
              f"{cpu.user + cpu.system:.4f}", flush=True)
        next_read = done + args.interval
        while not args.once and not stop.wait(max(0.0, next_read - time.monotonic())):
            session.read()
            next_read += args.interval


if __name__ == "__main__":
    main()
