"""Names for kernel identities, checked against `ip` (iproute2) in namespaces we create."""

from __future__ import annotations

import os

import pytest

from netmemtrace import demo
from netmemtrace.collect import resolve


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


def test_netns_labels() -> None:
    assert resolve.netns_label(0, {}, 5) is None
    assert resolve.netns_label(5, {}, 5) == "host"
    assert resolve.netns_label(7, {7: "blue"}, 5) == "blue"
    assert resolve.netns_label(9, {}, 5) == "net:[9]"


def test_provider_names() -> None:
    assert resolve.provider_name(0) == "host"
    assert resolve.provider_name(0x1234).startswith("unknown(mp_ops=0x1234")
