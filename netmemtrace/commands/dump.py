"""`netmemtrace dump`: trace for a while, print one JSON document (or, with --output, a
short pool table)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

from netmemtrace.collect import zerocopy
from netmemtrace.commands import Terminate, options
from netmemtrace.host import cgroups
from netmemtrace.kernel import probes
from netmemtrace.session import open_session
from netmemtrace.views.text import pool_summary, verify_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=options.DUMP_DURATION, default=1.0, metavar="S",
                        help="seconds to trace before the snapshot (default 1)")
    parser.add_argument("--cgroup", metavar="PATH",
                        help="only memory cgroups at or under PATH (as in /proc/PID/cgroup); "
                             "matching none: the (empty) document, why on stderr, exit 1")
    parser.add_argument("--pid", type=options.PID, metavar="PID",
                        help="only the memory cgroup and process row of PID (exited ones "
                             "included); matching none: as for --cgroup")
    parser.add_argument("--output", metavar="FILE",
                        help="write the JSON document to FILE and print a short table of the page "
                             "pools instead (hold/release per second averaged since first seen)")
    parser.add_argument("--verify", action="store_true",
                        help="also print, on stderr, the zerocopy ledger beside each process's "
                             "/proc/PID/smaps socket: Rss")


def run(args: argparse.Namespace) -> int:
    from netmemtrace.views import dump

    output = None
    if args.output:  # checked before attaching, not after the whole trace
        try:
            output = open(args.output, "w")  # noqa: SIM115 - closed once written below
        except OSError as exc:
            raise probes.SetupError(f"--output {args.output}: {exc.strerror}") from None
    with open_session(args, rows=zerocopy.DUMP_ROWS) as session:
        status = session.probe_status()
        print(f"netmemtrace: {sum(s.attached for s in status)}/{len(status)} probes attached; "
              f"tracing for {args.duration:g} s (Ctrl-C: snapshot now)", file=sys.stderr)
        # Like bcc tools: an early stop still prints what was traced.
        with contextlib.suppress(KeyboardInterrupt, Terminate):
            time.sleep(args.duration)
        whole = session.read()
    snap = dump.filter_snapshot(whole, cgroup=args.cgroup, pid=args.pid)
    if output:
        with output:
            output.write(dump.render(snap) + "\n")
        print(pool_summary(snap))
        print(f"\nfull JSON (every field: README.md): {args.output}\n"
              "next: sudo netmemtrace top    a live view (from a checkout: "
              "sudo .venv/bin/netmemtrace top; all commands: netmemtrace --help)")
    else:
        print(dump.render(snap))
    if args.verify:
        print(verify_table(snap), file=sys.stderr)
    if (args.cgroup is not None or args.pid is not None) and not snap.memcgs:
        # Like grep: the document is still printed, the exit status says nothing matched
        # (2 stays for errors: nothing was wrong with the trace itself).
        resolver = cgroups.CgroupResolver.for_memory()
        print("netmemtrace: " + dump.no_match_reason(
            whole, args.cgroup, args.pid, resolver.mount if resolver else None),
            file=sys.stderr)
        return 1
    return 0
