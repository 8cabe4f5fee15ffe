"""`netmemtrace top`: arguments and the attach/refresh/detach sequence around views.top."""

from __future__ import annotations

import argparse
import sys

from netmemtrace.collect import zerocopy
from netmemtrace.commands import options
from netmemtrace.kernel import probes
from netmemtrace.session import open_session
from netmemtrace.views import top


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interval", type=options.TOP_INTERVAL, default=1.0, metavar="S",
                        help="seconds between refreshes (default 1)")
    parser.add_argument("--batch", action="store_true",
                        help="print plain-text frames to stdout instead of the full-screen "
                             "view, like `top -b` (logs, scripts, no terminal needed)")
    parser.add_argument("--count", type=options.TOP_COUNT, metavar="N",
                        help="stop after N frames (default: until q or Ctrl-C)")


def run(args: argparse.Namespace) -> int:
    # Checked before attaching: without a terminal there is nothing to draw on, and the
    # error should not wait for (or depend on) the probes.
    if not args.batch and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise probes.SetupError("top needs a terminal: run it in one, or use --batch "
                                "[--count N] for plain-text frames")
    with open_session(args, rows=zerocopy.TOP_ROWS) as session:
        first = session.read()  # the first frame right after attach; rates from the second
        if args.batch:
            top.run_batch(session.read, first, args.interval, args.count)
        else:
            top.run_interactive(session.read, first, args.interval, args.count)
    return 0
