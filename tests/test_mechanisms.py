"""--mechanisms / NETMEMTRACE_MECHANISMS: which attach mechanisms hooks may use."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

from netmemtrace import probes


@pytest.mark.parametrize(("text", "allowed"), [
    (None, set(probes.MECHANISMS)),
    ("kprobe", {"tp_btf", "raw_tp", "tracepoint", "kprobe"}),
    ("fentry", {"tp_btf", "raw_tp", "tracepoint", "fentry"}),
    ("raw_tp", {"raw_tp", "fentry", "kprobe"}),
    (" tracepoint , kprobe ", {"tracepoint", "kprobe"}),
])
def test_each_class_is_narrowed_to_those_named(text, allowed) -> None:
    assert probes.allowed_mechanisms(text) == allowed


def test_unknown_mechanism_is_one_line_and_exit_2() -> None:
    r = subprocess.run([sys.executable, "-m", "netmemtrace.cli", "--mechanisms", "uprobe",
                        "probes"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "unknown mechanism 'uprobe'" in r.stderr


def test_malformed_environment_is_a_setup_error(monkeypatch) -> None:
    monkeypatch.setenv(probes.MECHANISMS_ENV, "kprobe,nope")
    with pytest.raises(probes.SetupError, match="NETMEMTRACE_MECHANISMS: unknown mechanism"):
        probes.env_mechanisms()


@pytest.mark.live
def test_probes_says_why_a_mechanism_was_not_tried() -> None:
    """`--mechanisms kprobe`: fentry is never tried for the zerocopy function hooks, and the
    table says so; kprobe serves where it attaches, else the syscall family says why."""
    r = subprocess.run([sys.executable, "-m", "netmemtrace.cli", "--mechanisms", "kprobe",
                        "probes"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (row,) = [line for line in r.stdout.splitlines()
              if line.split()[:2] == ["zerocopy", "tcp_zerocopy_receive"]]
    if " kprobe " in row:
        assert "fentry: not selected (NETMEMTRACE_MECHANISMS=kprobe)" in row
    else:
        assert "function probes cannot serve" in row
        assert "fentry: not selected (NETMEMTRACE_MECHANISMS=kprobe)" in row
