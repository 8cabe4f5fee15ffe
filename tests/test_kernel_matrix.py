"""The kernel-matrix harness's own logic (tests/kernels/): no QEMU here, the matrix itself
runs with `make test-kernels`."""

from __future__ import annotations

from pathlib import Path

from kernels import fetch, guest, matrix


def test_exact_dependencies_name_the_packages_to_fetch() -> None:
    assert fetch._exact("linux-image-6.1.0-50-amd64 (= 6.1.176-1)") == \
        ("linux-image-6.1.0-50-amd64", "6.1.176-1")
    assert fetch._exact("dracut | initramfs-tools (>= 0.120+deb8u2)") is None


def test_private_apt_reuses_the_machines_mirror_without_touching_etc_apt(
        tmp_path, monkeypatch) -> None:
    sources = tmp_path / "debian.sources"
    sources.write_text("Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm\n"
                       "Signed-By: /k.gpg\n\nTypes: deb\nURIs: http://mirror.invalid/sec\n"
                       "Suites: bookworm-security\nSigned-By: /k.gpg\n")
    monkeypatch.setattr(fetch, "HOST_SOURCES", sources)
    assert fetch._mirror() == ("http://mirror.invalid/debian", "/k.gpg")


def test_boot_modules_come_with_their_dependencies_first(tmp_path) -> None:
    moddir = tmp_path / "lib/modules/6.1.0-x"
    moddir.mkdir(parents=True)
    (moddir / "modules.dep").write_text(
        "kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz\n"
        "kernel/net/9p/9pnet.ko.xz:\nkernel/fs/netfs/netfs.ko.xz:\n"
        "kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz\n"
        "kernel/fs/overlayfs/overlay.ko.xz:\n")
    tree = fetch.KernelTree("6.1", "6.1.0-x", tmp_path, tmp_path / "vmlinuz", moddir)
    names = [p.name for p in guest._module_closure(tree, guest.BOOT_MODULES)]
    assert names.index("9pnet.ko.xz") < names.index("9pnet_virtio.ko.xz")
    assert names.index("netfs.ko.xz") < names.index("9p.ko.xz")
    assert len(names) == len(set(names)) == 5  # virtio_pci is built in here: skipped


def test_probe_rows_are_sorted_into_the_tables_columns() -> None:
    row = matrix.Row("7.3")
    matrix.classify(row, [
        {"object": "pagepool", "hook": "hold", "mechanism": "raw_tp", "attached": True,
         "reason": ""},
        {"object": "memcg", "hook": "charge_skmem", "mechanism": None, "attached": False,
         "reason": "fentry: function mem_cgroup_charge_skmem not in this kernel"},
        {"object": "netmem", "hook": "netif_receive_skb", "mechanism": None,
         "attached": False, "reason": "off by default (...), turn on with --netmem-stack",
         "off": "choice"},
        {"object": "zerocopy", "hook": "sys_enter_mmap", "mechanism": None,
         "attached": False, "reason": "replaced: function probes follow zerocopy",
         "off": "replaced"},
        {"object": "zerocopy", "hook": "x", "mechanism": None, "attached": False,
         "reason": "kprobe: attach failed: EINVAL"},
        {"object": "pagepool", "hook": "page_pool_destroy", "mechanism": None,
         "attached": False,
         "reason": "fentry: fentry denied: EPERM (kernel lockdown or LSM policy); kprobe: "
                   "kprobes not supported by this kernel (no kprobe PMU: CONFIG_KPROBES off)"},
        {"object": "memcg", "hook": "sk_charge", "mechanism": None, "attached": False,
         "reason": "fentry: fentry denied: EPERM (lockdown=integrity); kprobe: rejected by "
                   "the verifier: EINVAL"},
        {"object": "holders", "hook": "(object)", "mechanism": None, "attached": False,
         "reason": "object not loaded: cannot load holders"},
    ])
    assert row.by_mech == {"raw_tp": 1}
    assert row.absent == ["memcg/charge_skmem"]
    assert row.off == ["netmem/netif_receive_skb", "zerocopy/sys_enter_mmap"]
    # Refused for every program by the machine's configuration: not the tool's failure;
    # one mechanism refused and another failing is.
    assert row.refused == ["pagepool/page_pool_destroy"]
    assert [f.partition(":")[0] for f in row.failed] == ["zerocopy/x", "memcg/sk_charge"]
    assert row.objects["holders"].startswith("object not loaded")
    assert row.objects["memcg"] == "" and set(row.objects) == set(matrix.OBJECTS)
    row.booted, row.tests["passed"] = True, 3
    assert not row.ok and not row.loads  # a failed hook, an object not loaded
    assert "3 passed" in matrix.table([row]) and "not holders" in matrix.table([row])


def test_junit_counts(tmp_path: Path) -> None:
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase name="a"/><testcase name="b">'
                   '<failure message="x"/></testcase><testcase name="c"><skipped '
                   'type="pytest.xfail"/></testcase></testsuite></testsuites>')
    assert matrix.junit_counts(xml) == {"passed": 1, "failed": 1, "xfailed": 1}


def test_the_readme_table_is_every_kernels_last_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(matrix, "RESULTS", tmp_path)
    for name in ("7.3", "6.1"):
        row = matrix.Row(name, release=f"{name}.0", booted=True, commit="abc1234")
        row.tests["passed"] = 5
        (tmp_path / name).mkdir()
        (tmp_path / name / "row.json").write_text(row.to_json())
    rows = matrix.saved_rows()
    assert [r.kernel for r in rows] == ["6.1", "7.3"] and rows[0].tests == {"passed": 5}
    assert "| abc1234 |" in matrix.table(rows)


def test_a_guest_that_dies_is_retried_and_says_how_qemu_ended(tmp_path, monkeypatch) -> None:
    """A "QEMU" killed by a signal with nothing on the console: booted once more, and the
    console shown names the signal and QEMU's stderr; the first attempt's files are kept."""
    monkeypatch.setattr(guest, "initramfs", lambda tree: tmp_path / "initrd")
    monkeypatch.setattr(guest, "qemu_argv", lambda tree, initrd, share, accel: [
        "sh", "-c", f"echo started > {share}/output; echo 'qemu: boom' >&2; kill -9 $$"])
    tree = fetch.KernelTree("7.3", "7.3.0-x", tmp_path, tmp_path / "vmlinuz", tmp_path)
    share = tmp_path / "7.3"
    result = guest.run(tree, "true", tmp_path, 30, share, accel="tcg")
    assert not result.booted
    assert "qemu exited -9 after" in result.console and "qemu: boom" in result.console
    assert (share / "output").read_text() == "started\n"
    assert (tmp_path / "7.3.died" / "qemu.log").read_text().startswith("qemu exited -9")
