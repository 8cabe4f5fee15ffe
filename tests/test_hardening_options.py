"""Issue 17.3: every numeric option is validated in one place (netmemtrace/commands/options.py): a
value the option cannot mean is one line on stderr and exit 2, never a traceback, a dead
thread or a silent no-op."""

from __future__ import annotations

import contextlib
import io
import math
import subprocess
import sys

import pytest
from conftest import REPO
from hypothesis import given, settings
from hypothesis import strategies as st

from netmemtrace import cli
from netmemtrace.commands import options

# (argv before the option, option, low, high, low allowed, integer)
OPTIONS = [
    ([], "--netmem-sample", 1, 1 << 32, True, True),
    (["dump"], "--duration", 0, options.WEEK_S, True, False),
    (["dump"], "--pid", 1, options.PID_MAX_LIMIT, True, True),
    (["demo"], "--duration", 0, options.WEEK_S, False, False),
    (["top"], "--interval", 0, options.HOUR_S, False, False),
    (["top"], "--count", 1, 1 << 31, True, True),
    (["explain-zombie"], "--wait", 0, options.HOUR_S, True, False),
    (["serve"], "--interval", 0, options.HOUR_S, False, False),
    (["serve"], "--max-cgroups", 1, 1_000_000, True, True),
]
COMMAND = {"": "probes"}  # the global option needs a command after it

texts = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(1 << 70), max_value=1 << 70).map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e300", "-0", "0x10", "1_000", " 5", "", "5s"]),
    st.text(max_size=12),
)


def parse(prefix: list[str], option: str, text: str) -> tuple[object, str]:
    """(the parsed value or SystemExit code, stderr)."""
    argv = [*prefix, f"{option}={text}"] if prefix else [f"{option}={text}", "probes"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = cli._parser(only=prefix[0] if prefix else None).parse_args(argv)
        except SystemExit as exc:
            return exc, err.getvalue()
    return getattr(args, option.lstrip("-").replace("-", "_")), err.getvalue()


@pytest.mark.parametrize(("prefix", "option", "low", "high", "low_ok", "whole"), OPTIONS)
@settings(max_examples=150, deadline=None)
@given(text=texts)
def test_value_is_in_range_or_refused_in_one_line(prefix, option, low, high, low_ok, whole,
                                                  text) -> None:
    value, err = parse(prefix, option, text)
    if isinstance(value, SystemExit):
        assert value.code == 2
        assert err.count("\n") == 1 and f"argument {option}: must be" in err, err
        return
    assert isinstance(value, int if whole else float)
    assert math.isfinite(value) and low <= value <= high, (text, value)
    assert low_ok or value != low


@pytest.mark.parametrize(("prefix", "option", "low", "high", "low_ok", "whole"), OPTIONS)
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_every_value_in_range_is_accepted(prefix, option, low, high, low_ok, whole,
                                          data) -> None:
    if whole:
        value = data.draw(st.integers(min_value=low, max_value=high))
    else:
        value = data.draw(st.floats(min_value=low, max_value=high,
                                    exclude_min=not low_ok))
    assert parse(prefix, option, repr(value))[0] == value


@pytest.mark.parametrize("argv", [
    ["dump", "--duration", "-1"], ["dump", "--duration", "nan"],
    ["dump", "--duration", "inf"], ["dump", "--duration", "1e300"],
    ["top", "--interval", "nan"], ["explain-zombie", "--wait", "nan"],
    ["explain-zombie", "--wait", "-1"], ["demo", "--duration", "-1"],
    ["demo", "--duration", "0"], ["demo", "--duration", "nan"],
    ["serve", "--interval", "inf"], ["serve", "--interval", "1e300"],
    ["--netmem-sample", str((1 << 32) + 1), "probes"],
    ["--netmem-sample", str(1 << 64), "probes"],
])
def test_the_reported_cases_exit_2_in_one_line(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "netmemtrace.cli", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done
    assert done.stderr.count("\n") == 1 and "must be" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not done.stdout
