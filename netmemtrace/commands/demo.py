"""`netmemtrace demo`: the built-in veth + XDP + TCP workload (netmemtrace/workload/)."""

from __future__ import annotations

import argparse

from netmemtrace.commands import options
from netmemtrace.workload import demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=options.DEMO_DURATION, default=30.0, metavar="S",
                        help="seconds of traffic (default 30)")


def run(args: argparse.Namespace) -> int:
    demo.run_demo(args.duration)
    return 0
