"""Live: the real `netmemtrace top` against real veth + XDP page pools, in batch mode and
driven through a tmux pseudo-terminal. Ground truth: the topology's own names, the kernel's
page_pool_release tracepoint (tracefs), the process's BPF fds and `bpftool prog show`."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO, SLOW, bpf_prog_ids, prog_ids_held_by
from test_demo import _pool_releases
from test_top import Frame, parse_frames, top_command

from netmemtrace.views import top
from netmemtrace.workload import demo

pytestmark = pytest.mark.live

MIB = 1 << 20


def wait_for(what: str, check: Callable[[], object], timeout: float = 20.0 * SLOW,
             show: Callable[[], object] = lambda: "") -> object:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{show()}"
        time.sleep(0.1)
    return result


class Traffic:
    """TCP through each topology in turn, in a thread, until stopped."""

    def __init__(self, *topos: demo.VethTopology) -> None:
        self._stop = threading.Event()
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(topos,))
        self._thread.start()

    def _run(self, topos: tuple[demo.VethTopology, ...]) -> None:
        try:
            while not self._stop.is_set():
                for topo in topos:
                    demo.tcp_stream(topo, 4 * MIB)
        except BaseException as exc:  # reported by stop(), in the test's thread
            self.errors.append(exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60 * SLOW)
        assert not self._thread.is_alive() and not self.errors, self.errors


def rows_of(frame: Frame, netdev: str) -> list[tuple[dict[str, str], bool]]:
    """(row, highlighted) of the pool rows of ``netdev`` in a frame."""
    return [(row, marked) for row, marked in zip(frame.tables["PAGE POOLS"],
                                                 frame.marked["PAGE POOLS"], strict=True)
            if row["NETDEV"] == netdev]


class BatchTop:
    """`top --batch ARGS` writing to files, so the first frame can be timed and the
    process bounded without pipes filling or buffered output getting lost."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.out, self.err = tmp / "top.out", tmp / "top.err"
        self.started = time.monotonic()
        with open(self.out, "w") as out, open(self.err, "w") as err:
            # Its own process group, so close() ends any child it forked along with it.
            self.proc = subprocess.Popen(top_command("--batch", *args), cwd=REPO,
                                         stdout=out, stderr=err, start_new_session=True)

    def first_frame_s(self) -> float:
        """Seconds from start until the first frame's first line was written."""
        wait_for("the first frame", lambda: "\n" in self.out.read_text()
                 or self.proc.poll() is not None, show=self.err.read_text)
        took = time.monotonic() - self.started
        assert self.out.read_text().startswith(top.FRAME_START), self.err.read_text()
        return took

    def finish(self) -> list[Frame]:
        self.proc.wait(timeout=30 * SLOW)
        assert self.proc.returncode == 0, self.err.read_text()
        return parse_frames(self.out.read_text())

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.mark.veth_page_pool
def test_batch_frames_show_the_veth_pool(tmp_path: Path) -> None:
    run = BatchTop(tmp_path, "--count", "2", "--interval", f"{SLOW:g}")
    try:
        # A frame right after attach; its time is measured by bench/, not asserted here.
        run.first_frame_s()
        # The pool is born under top: it is seen from its first page, so its inflight
        # is exact, and its first pages are taken from the allocator (holds) meanwhile.
        with demo.VethTopology() as topo:
            traffic = Traffic(topo)
            try:
                frames = run.finish()
            finally:
                traffic.stop()
    finally:
        run.close()
    assert len(frames) == 2
    # This kernel: the per-syscall zerocopy hooks serve, the per-packet probe is opt-in;
    # neither is a failure.
    probes_line = frames[0].header[1]
    failed = probes_line.partition("; failed: ")[2].partition(" (why")[0].split(", ")
    assert "off by choice: netif_receive_skb (turn on with --netmem-stack)" in probes_line
    assert "replaced by another family: sys_enter, sys_exit" in probes_line
    assert not {"netif_receive_skb", "sys_enter", "sys_exit"} & set(failed)
    assert all(r["HOLD/s"] == r["REL/s"] == top.UNKNOWN
               for r in frames[0].tables["PAGE POOLS"])
    ((row, marked),) = rows_of(frames[1], topo.rx_dev)
    assert not marked
    assert (row["NETNS"], row["PROVIDER"], row["MEM"], row["STATE"]) == \
        (topo.rx_netns, "host", "page", "active")
    assert float(row["HOLD/s"].rstrip("kM")) > 0
    assert int(row["INFLIGHT"]) > 0


@pytest.mark.veth_page_pool
def test_zombie_pool_is_highlighted(tmp_path: Path, trace_instance) -> None:
    trace = trace_instance("page_pool/page_pool_release")
    # 16 frames span the topology, the held queue and the deletion (stretched under TCG).
    run = BatchTop(tmp_path, "--count", "16", "--interval", f"{0.5 * SLOW:g}")
    try:
        run.first_frame_s()  # attached: the pool is born under our eyes
        with demo.VethTopology() as topo, demo.hold_unread(topo, MIB) as held:
            assert held.held_bytes > 0
            seen = len(_pool_releases(trace))
            topo.delete_link()
            # `ip link del` made the first release attempt, with pages still in flight.
            (pool,) = {p for p, inflight, cnt in _pool_releases(trace)[seen:]
                       if cnt == 1 and inflight > 0}
            frames = run.finish()
            kernel_inflight = {n for p, n, _ in _pool_releases(trace) if p == pool}
    finally:
        run.close()
    # A pool of an earlier test's topology (same names, this process) may linger as a
    # zombie: it is in the first frame, taken before this topology existed.
    earlier = {row["POOL"] for row, _ in rows_of(frames[0], topo.rx_dev)}
    rows = [(row, marked) for frame in frames for row, marked in rows_of(frame, topo.rx_dev)
            if row["POOL"] not in earlier]
    zombies = [row for row, _ in rows if row["STATE"].startswith("zombie ")]
    assert zombies, run.out.read_text()
    assert all(marked == row["STATE"].startswith("zombie ") for row, marked in rows)
    assert {row["NETNS"] for row in zombies} == {topo.rx_netns}
    # The pages we count in flight are the ones the kernel's release attempts report.
    assert {int(row["INFLIGHT"]) for row in zombies} <= kernel_inflight, (
        [(r["POOL"], r["STATE"], r["INFLIGHT"]) for r, _ in rows], _pool_releases(trace))


class Tmux:
    """A private tmux server (its own socket, in ``tmp``) running one command in a
    fixed-size pane."""

    def __init__(self, tmp: Path, command: list[str], width: int, height: int) -> None:
        self.socket = str(tmp / "tmux.sock")
        self.status_file = tmp / "exit-status"
        conf = tmp / "tmux.conf"
        conf.write_text("set -g remain-on-exit on\n")  # keep the pane readable after exit
        # The shell records the exit status itself: tmux's pane_dead_status is racy.
        self._tmux("-f", str(conf), "new-session", "-d", "-s", "top", "-x", str(width),
                   "-y", str(height), "-c", str(REPO),
                   f"{shlex.join(command)}; echo $? > {shlex.quote(str(self.status_file))}")

    def _tmux(self, *args: str) -> str:
        # The server passes its environment to the pane: a LINES or COLUMNS inherited from
        # the test runner would override the pane's size in curses.
        env = {k: v for k, v in os.environ.items() if k not in ("LINES", "COLUMNS")}
        return subprocess.run(["tmux", "-S", self.socket, *args], check=True, env=env,
                              capture_output=True, text=True, timeout=10 * SLOW).stdout

    def screen(self) -> list[str]:
        return self._tmux("capture-pane", "-p", "-t", "top").splitlines()

    def wait(self, what: str, check: Callable[[list[str]], object]) -> None:
        """Until ``check(screen)`` holds; the last screen is in the failure message."""
        last: list[str] = []

        def probe() -> object:
            last[:] = self.screen()
            return last and check(last)

        wait_for(what, probe, show=lambda: "\n".join(last))

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "top", *keys)

    def literal(self, text: str) -> None:
        self._tmux("send-keys", "-t", "top", "-l", text)

    def program_pid(self) -> int:
        """The command's pid: the only child of the pane's shell."""
        shell = int(self.pane("#{pane_pid}"))
        (child,) = Path(f"/proc/{shell}/task/{shell}/children").read_text().split()
        return int(child)

    def pane(self, fmt: str) -> str:
        return self._tmux("display-message", "-p", "-t", "top", fmt).strip()

    def resize(self, width: int, height: int) -> None:
        self._tmux("resize-window", "-t", "top", "-x", str(width), "-y", str(height))

    def kill(self) -> None:
        # The pane's process leads its own process group: killing the group also ends any
        # child it forked.
        with contextlib.suppress(subprocess.CalledProcessError, ProcessLookupError):
            os.killpg(int(self.pane("#{pane_pid}")), signal.SIGKILL)
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True,
                       timeout=10 * SLOW)


@pytest.fixture
def tmux_top(tmp_path: Path) -> Iterator[Tmux]:
    term = Tmux(tmp_path, top_command("--interval", "0.5"), 200, 60)
    yield term
    term.kill()


def _pool_rows(screen: list[str]) -> list[str]:
    """The page pool table's lines (the DEVICES table further down names the same
    netdevs)."""
    start = next(i for i, line in enumerate(screen) if "PAGE POOLS (" in line)
    end = next((i for i in range(start, len(screen)) if not screen[i].strip()), len(screen))
    return screen[start:end]


def _order(screen: list[str], names: list[str]) -> list[str]:
    """The names whose page pool rows are on screen, in the order they appear."""
    return [name for line in _pool_rows(screen) for name in names if f"  {name}  " in line]


def _sort_title(screen: list[str]) -> str:
    """'COLUMN desc' from the page pool table's title line."""
    title = next(line for line in screen if "PAGE POOLS (" in line)
    return title.partition("sort: ")[2]


def _visible(screen: list[str], name: str) -> bool:
    return any(f"  {name}  " in line for line in _pool_rows(screen))


@pytest.mark.userspace
def test_interactive_in_a_terminal(tmux_top: Tmux) -> None:
    term = tmux_top
    term.wait("the first frame", lambda screen: screen[0].startswith(top.FRAME_START))
    pid = term.program_pid()
    ours = prog_ids_held_by(pid)
    assert ours and ours <= bpf_prog_ids()
    with demo.VethTopology() as a, demo.VethTopology() as b:
        traffic = Traffic(a, b)
        try:
            names = [a.rx_dev, b.rx_dev]
            term.wait("both veth pool rows", lambda s: all(_visible(s, n) for n in names))
            assert any(a.rx_netns in line for line in term.screen() if a.rx_dev in line)

            # Sort by NETDEV: `s` moves the sort column, `S` flips the direction.
            for _ in top.POOL_COLUMNS:
                sort = _sort_title(term.screen())
                if sort.startswith("NETDEV"):
                    break
                term.keys("s")  # one column on, seen on screen before the next press
                term.wait("the next sort column", lambda s, was=sort: _sort_title(s) != was)
            term.wait("rows by NETDEV, descending",
                      lambda s: "sort: NETDEV desc" in "\n".join(s)
                      and _order(s, names) == sorted(names, reverse=True))
            term.keys("S")
            term.wait("rows by NETDEV, ascending",
                      lambda s: "sort: NETDEV asc" in "\n".join(s)
                      and _order(s, names) == sorted(names))

            # Filter, typed in the footer: only a's row stays.
            term.keys("/")
            term.wait("the filter prompt", lambda s: s[-1].startswith("filter: "))
            term.literal(a.rx_dev)
            term.keys("Enter")
            term.wait("b's row filtered out", lambda s: _visible(s, a.rx_dev)
                      and not _visible(s, b.rx_dev) and f"filter: {a.rx_dev}" in "\n".join(s))
            term.keys("Escape")
            term.wait("the filter cleared", lambda s: _visible(s, b.rx_dev))

            # A smaller terminal: the frame is redrawn to fit, footer on the last line.
            term.resize(100, 20)
            term.wait("the redraw at 100x20", lambda s: len(s) == 20
                      and s[-1].startswith("q quit") and s[0].startswith(top.FRAME_START)
                      and max(map(len, s)) <= 100)
        finally:
            traffic.stop()
    term.keys("q")
    wait_for("top to exit", lambda: term.status_file.exists()
             and term.status_file.read_text().endswith("\n"), timeout=10 * SLOW)
    assert term.status_file.read_text() == "0\n"
    # Every program it loaded is gone with it (the kernel frees them shortly after the
    # last fd closes, hence the wait).
    wait_for("its BPF programs to be freed", lambda: not ours & bpf_prog_ids(), timeout=10 * SLOW,
             show=lambda: ours & bpf_prog_ids())


def test_without_privileges_the_same_error_as_other_commands() -> None:
    # root without capabilities: the effective, permitted and bounding sets all emptied.
    drop = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]
    top_run = subprocess.run([*drop, *top_command("--batch", "--count", "1")], cwd=REPO,
                             capture_output=True, text=True, timeout=30 * SLOW)
    probes_run = subprocess.run([*drop, sys.executable, "-m", "netmemtrace.cli", "probes"],
                                cwd=REPO, capture_output=True, text=True, timeout=30 * SLOW)
    assert top_run.returncode == probes_run.returncode == 2
    assert top_run.stdout == ""
    assert top_run.stderr == probes_run.stderr
    assert top_run.stderr.startswith("netmemtrace: missing CAP_BPF")
    assert top_run.stderr.count("\n") == 1
