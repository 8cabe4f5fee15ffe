"""Boot one kernel under QEMU with this machine's root visible and run one command in it.

The guest sees the host's root filesystem read-only over virtio-9p, under an overlay whose
upper layer is guest tmpfs: the checkout, its .venv, python3, clang, bpftool and ip are the
host's own, and nothing the guest writes reaches the host. The guest kernel's modules are
bind-mounted at /lib/modules/RELEASE. The command's output and exit code come back through
a second, writable 9p share. Two virtio-net NICs on one QEMU hub with no host backend give
the guest a real NIC driver whose traffic never leaves it.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .fetch import KernelTree, cache_root

# Enough to reach the shared root: the PCI transport, 9p over virtio, overlayfs.
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
BUSYBOX = Path("/bin/busybox")
MEMORY = "2G"
CPUS = 2

# Runs in the initramfs (busybox): reach the host's root, then chroot into the overlay.
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /mods/$m || echo "nmt-init: insmod $m failed"; done
mkdir -p /host /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 hostroot /host || exec sh
mount -t tmpfs -o size=1500m tmpfs /rw && mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /newroot \
	|| exec sh
mkdir -p /newroot/mnt/nmt-out
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out /newroot/mnt/nmt-out
. /newroot/mnt/nmt-out/boot.env
mkdir -p /newroot/lib/modules/$NMT_RELEASE
mount --bind /host$NMT_MODULES /newroot/lib/modules/$NMT_RELEASE
chroot /newroot /bin/sh /mnt/nmt-out/guest.sh
echo o > /proc/sysrq-trigger
sleep 10
"""

# Runs in the chroot (the host's /bin/sh): the mounts a tool like ours expects, then the
# command, its output on the console and in the share, its exit code in the share.
GUEST_SH = r"""set -u
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp; mount -t tmpfs tmpfs /run; mkdir -p /run/netns
mount -t debugfs debugfs /sys/kernel/debug; mount -t tracefs tracefs /sys/kernel/tracing
mount -t securityfs securityfs /sys/kernel/security
mount -t bpf bpf /sys/fs/bpf; mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo "+memory +cpu +pids" > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null
hostname nmt-guest; ip link set lo up
# No udev and no module autoload for `ip link add type veth`: load what the tests create.
modprobe -a veth
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
export NETMEMTRACE_GUEST=1 NMT_OUT=/mnt/nmt-out LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1
cd "$NMT_CWD"
sh /mnt/nmt-out/cmd.sh > /mnt/nmt-out/output 2>&1
echo $? > /mnt/nmt-out/rc
sync
"""


@dataclass
class Result:
    rc: int | None         # None: the guest died before the command finished
    output: str
    console: str
    accel: str

    @property
    def booted(self) -> bool:
        return self.rc is not None


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".zst":
        return subprocess.run(["zstd", "-dc", str(path)], check=True,
                              capture_output=True).stdout
    if path.suffix == ".gz":
        return gzip.decompress(data)
    return data


def _module_closure(tree: KernelTree, wanted: tuple[str, ...]) -> list[Path]:
    """The .ko files for `wanted` and what they depend on, dependencies first; modules
    built into this kernel are skipped."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (tree.modules / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        name = re.sub(r"\.ko(\.\w+)?$", "", Path(mod).name).replace("-", "_")
        by_name[name] = mod
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        for dep in reversed(deps.get(mod, [])):
            visit(dep)
        order.append(mod)

    for name in wanted:
        if name in by_name:
            visit(by_name[name])
    return [tree.modules / m for m in order]


def initramfs(tree: KernelTree) -> Path:
    """busybox + the boot modules (decompressed) + INIT, built once per kernel."""
    out = cache_root() / "initramfs" / f"{tree.release}.cpio.gz"
    if out.exists() and out.stat().st_mtime > Path(__file__).stat().st_mtime:
        return out
    if not BUSYBOX.exists():
        raise RuntimeError("no /bin/busybox: install busybox-static (make test-kernels does)")
    out.parent.mkdir(parents=True, exist_ok=True)
    mods = _module_closure(tree, BOOT_MODULES)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in ("bin", "proc", "sys", "dev", "mods"):
            (root / d).mkdir()
        shutil.copy(BUSYBOX, root / "bin" / "busybox")
        (root / "init").write_text(INIT)
        (root / "init").chmod(0o755)
        names = []
        for mod in mods:
            name = re.sub(r"\.ko(\.\w+)?$", ".ko", mod.name)
            (root / "mods" / name).write_bytes(_read_module(mod))
            names.append(name)
        (root / "modules.order").write_text("\n".join(names) + "\n")
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, text=True,
                               check=True).stdout
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root,
                              input=files.encode(), capture_output=True, check=True)
        out.write_bytes(gzip.compress(cpio.stdout, compresslevel=1))
    return out


def kvm_usable() -> str | None:
    """None if KVM can run a stock kernel here, else why not. A /dev/kvm whose CPU shows
    no vmx/svm (e.g. a paravirtual nested hypervisor) fails stock kernels at start."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no usable /dev/kvm"
    flags = Path("/proc/cpuinfo").read_text()
    if not re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.M):
        return "/dev/kvm present but the CPU has no vmx/svm (paravirtual KVM)"
    return None


def qemu_argv(tree: KernelTree, initrd: Path, share: Path, accel: str) -> list[str]:
    cpu = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else \
        ["-accel", "tcg,thread=multi", "-cpu", "max"]
    nics = [a for i in (0, 1) for a in (
        "-netdev", f"hubport,id=n{i},hubid=0",
        "-device", f"virtio-net-pci,netdev=n{i},mac=52:54:00:12:34:{0x56 + i:02x}")]
    return [
        "qemu-system-x86_64", *cpu, "-m", MEMORY, "-smp", str(CPUS), "-nodefaults",
        "-display", "none", "-no-reboot", "-serial", f"file:{share / 'console'}",
        "-kernel", str(tree.vmlinuz), "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 quiet loglevel=4 rdinit=/init",
        "-fsdev", "local,id=root,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=root,mount_tag=hostroot",
        "-fsdev", f"local,id=out,path={share},security_model=none",
        "-device", "virtio-9p-pci,fsdev=out,mount_tag=out",
        *nics,
    ]


def run(tree: KernelTree, command: str, cwd: Path, timeout_s: float, share: Path,
        accel: str | None = None) -> Result:
    """Boot `tree` and run `command` (sh) in `cwd`; `share` (emptied first) is the guest's
    /mnt/nmt-out, where the command may leave files. A guest that died before the command
    finished (no exit code) is booted once more; what the dead one left is kept in
    `share`.died."""
    accel = accel or ("kvm" if kvm_usable() is None else "tcg")
    initrd = initramfs(tree)
    result = None
    for attempt in range(2):
        # The attempt that died is kept beside the retry (its pytest output says how far
        # it got): <share>.died
        died = share.with_name(share.name + ".died")
        shutil.rmtree(died, ignore_errors=True)
        if attempt:
            share.rename(died)
        else:
            shutil.rmtree(share, ignore_errors=True)
        share.mkdir(parents=True)
        (share / "boot.env").write_text(
            f"NMT_RELEASE={shlex.quote(tree.release)}\n"
            f"NMT_MODULES={shlex.quote(str(tree.modules))}\n"
            f"NMT_CWD={shlex.quote(str(cwd))}\nexport NMT_CWD\n")
        (share / "guest.sh").write_text(GUEST_SH)
        (share / "cmd.sh").write_text(command + "\n")
        start = time.monotonic()
        try:
            qemu = subprocess.run(qemu_argv(tree, initrd, share, accel), timeout=timeout_s,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  errors="replace")
            # A guest that dies with an empty console was QEMU's end, not the kernel's:
            # its exit status (negative: the signal that killed it) and stderr say why.
            ended = f"qemu exited {qemu.returncode} after {time.monotonic() - start:.0f} s"
            (share / "qemu.log").write_text(f"{ended}\n{qemu.stderr}")
        except subprocess.TimeoutExpired:
            (share / "qemu.log").write_text(f"qemu killed at the {timeout_s:.0f} s timeout\n")
        rc_text = (share / "rc").read_text().strip() if (share / "rc").exists() else ""
        result = Result(int(rc_text) if rc_text else None, _text(share / "output"),
                        _text(share / "console") + _text(share / "qemu.log"), accel)
        if result.booted or time.monotonic() - start >= timeout_s:
            return result  # finished, or out of time (a retry would be too)
    assert result is not None
    return result


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
