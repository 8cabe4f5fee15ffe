"""`make test-kernels`: the live suite on every kernel users run, booted under QEMU.

    python -m tests.kernels.matrix [--kernels "6.1 6.12 7.2 7.3 host"] [-- PYTEST ARGS]

For each kernel: fetch Debian's packages (once), boot it with this checkout visible
(tests/kernels/guest.py), record which objects loaded and which hooks attached by which
mechanism (`netmemtrace dump`'s probes), run the live tests inside, and print one table.
`host` runs the same on this machine's kernel without QEMU. Exit status 1 if any kernel
failed to boot, left an object unloaded, failed a hook it has, or failed a test.
Under TCG (no usable KVM) guests run 6-16x slower than the host: correctness only, no
timings (the suite's timing-sensitive checks read NETMEMTRACE_GUEST).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from netmemtrace.kernel import probes

from . import fetch, guest

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "build" / "kernels"
README = REPO / "README.md"
BEGIN, END = "<!-- kernel-matrix:begin -->", "<!-- kernel-matrix:end -->"
OBJECTS = ("pagepool", "memcg", "zerocopy", "netmem", "holders")

# What runs in each kernel. $NMT_OUT is the directory handed back to the host.
COMMAND = """\
cd {repo}
.venv/bin/netmemtrace dump --duration 0.5 > "$NMT_OUT/dump.json" 2> "$NMT_OUT/dump.err"
echo "dump exit $?"
.venv/bin/python -m pytest -p no:cacheprovider -q -rfE -m "{marker}" \\
    --junitxml="$NMT_OUT/junit.xml" {pytest_args}
"""


@dataclass
class Row:
    kernel: str
    release: str = "?"
    accel: str = "host"
    booted: bool = False
    objects: dict[str, str] = field(default_factory=dict)  # name -> "" or why not loaded
    by_mech: Counter = field(default_factory=Counter)
    absent: list[str] = field(default_factory=list)
    off: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    tests: Counter = field(default_factory=Counter)
    minutes: float = 0.0
    note: str = ""
    commit: str = ""

    def to_json(self) -> str:
        # Not dataclasses.asdict: it rebuilds a Counter from (key, value) pairs, counting them.
        return json.dumps({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @property
    def loads(self) -> bool:
        """Every object loaded and every hook this kernel has attached (or is off)."""
        return (self.booted and len(self.objects) == len(OBJECTS)
                and all(not why for why in self.objects.values()) and not self.failed)

    @property
    def ok(self) -> bool:
        return (self.loads and self.tests["passed"] > 0 and not self.tests["failed"]
                and not self.tests["error"])


def classify(row: Row, probes: list[dict]) -> None:
    """Sort `probes` rows: attached (by mechanism), not in this kernel, off by choice,
    failed. An object that did not load is one row with hook "(object)"; every other
    object loaded (the holders object has iterators only, so no hook rows)."""
    row.objects = dict.fromkeys(OBJECTS, "")
    for p in probes:
        if p["hook"] == "(object)":
            row.objects[p["object"]] = p["reason"]
            continue
        name = f"{p['object']}/{p['hook']}"
        if p["attached"]:
            row.by_mech[p["mechanism"]] += 1
        elif p.get("off"):  # off by choice, or replaced by another family of hooks
            row.off.append(name)
        elif (status := probe_status(p)).absent:
            row.absent.append(name)
        elif status.refused:  # e.g. fentry under lockdown: the machine's choice, not a fault
            row.refused.append(name)
        else:
            row.failed.append(f"{name}: {p['reason']}")


def probe_status(p: dict) -> probes.ProbeStatus:
    """A `probes` row of dump's JSON as the tool's own ProbeStatus, to classify it alike."""
    return probes.ProbeStatus(**{f.name: p.get(f.name) for f in
                                 dataclasses.fields(probes.ProbeStatus)})


def junit_counts(path: Path) -> Counter:
    counts: Counter = Counter()
    if not path.exists():
        return counts
    for case in ET.parse(path).getroot().iter("testcase"):
        tags = {child.tag for child in case}
        if "failure" in tags:
            counts["failed"] += 1
        elif "error" in tags:
            counts["error"] += 1
        elif "skipped" in tags:
            skipped = case.find("skipped")
            kind = "xfailed" if skipped is not None and \
                skipped.get("type") == "pytest.xfail" else "skipped"
            counts[kind] += 1
        else:
            counts["passed"] += 1
    return counts


def run_one(name: str, marker: str, pytest_args: str, timeout_s: float) -> Row:
    row = Row(name)
    out = RESULTS / name
    command = COMMAND.format(repo=REPO, marker=marker, pytest_args=pytest_args)
    start = time.monotonic()
    if name == "host":
        out.mkdir(parents=True, exist_ok=True)
        for stale in ("dump.json", "junit.xml"):
            (out / stale).unlink(missing_ok=True)
        with open(out / "output", "w") as log:
            proc = subprocess.run(["sh", "-c", command], stdout=log, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, NMT_OUT=str(out)), timeout=timeout_s)
        row.booted, row.release = True, os.uname().release
        rc = proc.returncode
    else:
        tree = fetch.fetch(name, log=lambda msg: print(msg, file=sys.stderr))
        row.release = tree.release
        result = guest.run(tree, command, REPO, timeout_s, out)
        row.booted, row.accel, rc = result.booted, result.accel, result.rc
        if not result.booted:
            row.note = f"no exit code after {timeout_s:.0f} s (booted twice)"
            print(f"--- {name}: console (last 60 lines) ---", file=sys.stderr)
            print("\n".join(result.console.splitlines()[-60:]), file=sys.stderr)
    row.minutes = (time.monotonic() - start) / 60
    return finish_row(row, out, rc)


def _release(kernel: str) -> str:
    return os.uname().release if kernel == "host" else fetch.fetch(kernel).release


def _accel(kernel: str) -> str:
    return "host" if kernel == "host" else "kvm" if guest.kvm_usable() is None else "tcg"


def _saved_commit(out: Path) -> str | None:
    try:
        return json.loads((out / "row.json").read_text()).get("commit") or None
    except (OSError, ValueError):
        return None


def finish_row(row: Row, out: Path, rc: int | None, commit: str | None = None) -> Row:
    """The row's figures from what the run left in `out`, saved beside them; `commit`: the
    checkout the run used (default: this one, for a run that just ended)."""
    try:
        classify(row, json.loads((out / "dump.json").read_text())["probes"])
    except (OSError, ValueError, KeyError) as exc:
        err = (out / "dump.err").read_text().strip() if (out / "dump.err").exists() else ""
        row.note = row.note or f"no probes: {err or exc}"
    row.tests = junit_counts(out / "junit.xml")
    if row.booted and rc and not row.tests["failed"] and not row.tests["error"]:
        row.note = row.note or f"pytest exit {rc}"
        row.tests["error"] += 1
    row.commit = commit or subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True, text=True).stdout.strip()
    (out / "row.json").write_text(row.to_json())
    return row


def saved_rows() -> list[Row]:
    """Every kernel's last row (build/kernels/*/row.json), in matrix order."""
    order = [*fetch.SUITES, "host"]
    rows = []
    for path in RESULTS.glob("*/row.json"):
        d = json.loads(path.read_text())
        d.update(by_mech=Counter(d["by_mech"]), tests=Counter(d["tests"]))
        rows.append(Row(**d))
    return sorted(rows, key=lambda r: order.index(r.kernel) if r.kernel in order else 99)


def table(rows: list[Row]) -> str:
    lines = [
        "| kernel | release | objects loaded | hooks attached, by mechanism | not in this kernel"
        " | off by choice | refused by its configuration | failed hooks | live tests | commit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        loaded = [o for o in OBJECTS if o in r.objects and not r.objects[o]]
        missing = [f"{o} ({r.objects.get(o) or 'absent'})" for o in OBJECTS
                   if o not in loaded]
        objects = f"{len(loaded)}/{len(OBJECTS)}" + (f": not {', '.join(missing)}"
                                                    if missing else "")
        mechs = ", ".join(f"{m} {n}" for m, n in sorted(r.by_mech.items())) or "-"
        tests = ", ".join(f"{n} {k}" for k, n in sorted(r.tests.items())) or "none"
        kernel = r.kernel + ("" if r.kernel == "host" else f" ({r.accel})")
        lines.append(
            f"| {kernel} | {r.release} | {objects} | {mechs} | {len(r.absent)} | "
            f"{len(r.off)} | {len(r.refused) or '-'} | {len(r.failed) or '-'} | {tests}"
            f"{'; ' + r.note if r.note else ''} | {r.commit} |")
    return "\n".join(lines)


def update_readme(text: str) -> None:
    readme = README.read_text()
    if BEGIN not in readme:
        raise SystemExit(f"README.md has no {BEGIN} … {END} section")
    head, rest = readme.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    README.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make test-kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default=os.environ.get("KERNELS") or
                   " ".join((*fetch.DEFAULT_KERNELS, "host")),
                   help="space-separated: %(default)s (env KERNELS); kernels: "
                   + " ".join(fetch.SUITES) + " host")
    # The image tests need the machine's Debian mirror and podman, and `userspace` tests
    # check what is the same on every kernel: `make test` runs them on the host.
    p.add_argument("--marker", default="live and not image and not userspace",
                   help="pytest -m expression (%(default)s)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="kernels booted at once (default 1). Live tests spend much of their "
                        "time waiting, so two guests on two cores take less than twice one")
    p.add_argument("--timeout", type=float, default=2400, metavar="S",
                   help="per kernel, boot to exit (%(default)s)")
    p.add_argument("--update-readme", action="store_true",
                   help="write into README.md's kernel-matrix section the table of every "
                        "kernel's last run (build/kernels/*/row.json), this run's included")
    p.add_argument("--require", choices=("tests", "objects"), default="tests",
                   help="what must hold for exit 0: every object loaded, every hook the "
                        "kernel has attached, and every test passed (tests, the default), or "
                        "the first two only, the tests run and reported (objects)")
    p.add_argument("--collect", action="store_true",
                   help="boot nothing: rebuild the rows of --kernels from the results their "
                        "last run left in build/kernels/")
    p.add_argument("pytest_args", nargs="*", help="after --: passed to pytest")
    args = p.parse_args(argv)
    kernels = re.split(r"[\s,]+", args.kernels.strip())
    for k in kernels:
        if k != "host" and k not in fetch.SUITES:
            p.error(f"unknown kernel {k!r}: choose from {' '.join(fetch.SUITES)} host")
    if args.collect:
        # Rebuilt rows keep the commit their run used, not this checkout's.
        rows = [finish_row(Row(k, release=_release(k), accel=_accel(k),
                               booted=(RESULTS / k / "junit.xml").exists()), RESULTS / k, None,
                           _saved_commit(RESULTS / k))
                for k in kernels]
        print(table(rows))
        if args.update_readme:
            update_readme(table(saved_rows()))
        return _status(rows, args.require)
    for k in kernels:  # fetched one at a time (one private apt), before any boots
        if k != "host":
            fetch.fetch(k, log=lambda msg: print(msg, file=sys.stderr))

    def one(k: str) -> Row:
        print(f"== {k}", file=sys.stderr, flush=True)
        r = run_one(k, args.marker, " ".join(args.pytest_args), args.timeout)
        print(f"   {k}: {'ok' if r.ok else 'loads, tests failed' if r.loads else 'FAILED'} "
              f"in {r.minutes:.1f} min; "
              f"results in {RESULTS / k}", file=sys.stderr, flush=True)
        for f in r.failed:
            print(f"   {k}: failed hook {f}", file=sys.stderr)
        return r

    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        rows = list(pool.map(one, kernels))
    text = table(rows)
    (RESULTS / "matrix.md").write_text(text + "\n")
    print(text)
    if args.update_readme:
        update_readme(table(saved_rows()))
    return _status(rows, args.require)


def _status(rows: list[Row], require: str) -> int:
    return 0 if all(r.ok if require == "tests" else r.loads for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
