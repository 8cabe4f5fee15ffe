"""Names for kernel identities, checked against `ip` (iproute2) in namespaces we create."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading

import pytest
from conftest import REPO

from netmemtrace.host import resolve
from netmemtrace.privilege import caps
from netmemtrace.workload import demo

# A daemon as `dump` opens it (attach, netns broker, capability drop), then link names of
# the netns in argv[1] once the test has renamed its link, with and without the broker.
AFTER_DROP = """
import json, sys
from netmemtrace import cli
from netmemtrace.privilege import caps
from netmemtrace.host import resolve
from netmemtrace.session import open_session

with open_session(cli._parser().parse_args(["dump"])) as session:
    print(json.dumps(sorted({t["CapEff"] for t in caps.task_caps().values()})), flush=True)
    sys.stdin.readline()
    print(json.dumps(resolve.link_names(sys.argv[1])), flush=True)
    session.broker.close()
    try:
        resolve.link_names(sys.argv[1])
    except OSError as exc:
        print(exc.errno, flush=True)
"""


@pytest.mark.live
def test_link_names_in_another_netns_without_leaving_ours() -> None:
    ours = os.readlink("/proc/self/ns/net")
    with demo.VethTopology() as topo:
        names = resolve.link_names(topo.rx_netns)
        assert names[topo.rx_ifindex()] == topo.rx_dev
        assert topo.rx_dev not in resolve.link_names(None).values()
        ino = os.stat(f"/run/netns/{topo.rx_netns}").st_ino
        assert resolve.netns_label(ino, resolve.netns_names(), resolve.own_netns_inode()) \
            == topo.rx_netns
    assert os.readlink("/proc/self/ns/net") == ours
    with pytest.raises(OSError):
        resolve.link_names(topo.rx_netns)  # gone with the topology


@pytest.mark.live
def test_link_names_in_another_netns_after_the_capability_drop() -> None:
    """A link renamed in another netns reads under its new name from a daemon that dropped
    CAP_SYS_ADMIN: the netns broker makes the netlink socket there. Without the broker the
    same call is refused (EPERM: no setns)."""
    with demo.VethTopology() as topo:
        ifindex, renamed = topo.rx_ifindex(), topo.rx_dev[:-1] + "n"
        proc = subprocess.Popen([sys.executable, "-c", AFTER_DROP, topo.rx_netns], cwd=REPO,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        watchdog = threading.Timer(60, proc.kill)
        watchdog.start()
        try:
            first = proc.stdout.readline()
            assert first, proc.stderr.read()
            assert json.loads(first) == [caps.mask_of(caps.KEEP)]  # every thread dropped
            for change in (["down"], ["name", renamed]):
                subprocess.run(["ip", "-n", topo.rx_netns, "link", "set", "dev", topo.rx_dev,
                                *change], check=True)
            proc.stdin.write("go\n")
            proc.stdin.flush()
            names = json.loads(proc.stdout.readline())
            assert names[str(ifindex)] == renamed and topo.rx_dev not in names.values()
            assert int(proc.stdout.readline()) == errno.EPERM
            assert proc.wait(30) == 0, proc.stderr.read()
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
            subprocess.run(["ip", "-n", topo.rx_netns, "link", "set", "dev", renamed, "name",
                            topo.rx_dev], capture_output=True)


def test_netns_labels() -> None:
    assert resolve.netns_label(0, {}, 5) is None
    assert resolve.netns_label(5, {}, 5) == "host"
    assert resolve.netns_label(7, {7: "blue"}, 5) == "blue"
    assert resolve.netns_label(9, {}, 5) == "net:[9]"


def test_provider_names() -> None:
    assert resolve.provider_name(0) == "host"
    assert resolve.provider_name(0x1234).startswith("unknown(mp_ops=0x1234")
