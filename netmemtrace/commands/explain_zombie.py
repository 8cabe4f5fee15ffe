"""`netmemtrace explain-zombie [POOL]`: arguments and the attach/wait/read sequence around
views.explain."""

from __future__ import annotations

import argparse
import sys
import time

from netmemtrace.commands import options
from netmemtrace.session import open_session
from netmemtrace.views import explain

# The kernel retries a zombie's release once a second; a pool destroyed before netmemtrace
# started is only known from its next retry, so the first read waits for one.
DEFAULT_WAIT_S = 1.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pool", nargs="?", metavar="POOL",
                        help="a pool id, pool address (0x...) or netdev name (default: every "
                             "zombie pool)")
    parser.add_argument("--wait", type=options.EXPLAIN_WAIT, default=DEFAULT_WAIT_S, metavar="S",
                        help="seconds to trace before reading, so zombies destroyed before "
                             f"start are seen at their next retry (default {DEFAULT_WAIT_S})")


def run(args: argparse.Namespace) -> int:
    """Print the report; 1 if no zombie pool matches (the message says which exist)."""
    with open_session(args) as session:
        time.sleep(args.wait)
        snap = session.read()
        scan = session.holders_scan
    pools = explain.select_pools(snap, args.pool)
    if not pools:
        zombies = explain.select_pools(snap, None)
        known = ", ".join(f"{p.pool_id or hex(p.pool_addr or 0)} ({p.netdev})" for p in zombies)
        print(f"netmemtrace: no zombie page pool matches {args.pool!r}"
              if args.pool else "netmemtrace: no zombie page pool (every destroyed pool has "
              "released its pages)", file=sys.stderr)
        if known:
            print(f"zombie pools: {known}", file=sys.stderr)
        return 1
    print(explain.render(snap, pools, scan))
    return 0
