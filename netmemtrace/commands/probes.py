"""`netmemtrace probes`: one row per hook, the mechanism chosen, attached, why not."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from netmemtrace.kernel import probes
from netmemtrace.session import open_session
from netmemtrace.views.text import align_columns


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options of its own: the global ones (--mechanisms, --btf-path) shape the table."""


def format_probes(rows: Sequence[probes.ProbeStatus]) -> str:
    header = ("OBJECT", "HOOK", "MECHANISM", "ATTACHED", "REASON")
    return align_columns([header] + [
        (r.object, r.hook, r.mechanism or "-", "yes" if r.attached else "no", r.reason or "-")
        for r in rows
    ])


def run(args: argparse.Namespace) -> int:
    with open_session(args) as session:
        print(format_probes(session.probe_status()))
    return 0
