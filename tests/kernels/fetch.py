"""Debian kernels for the matrix: resolved at run time, downloaded once, unpacked once.

Package names are resolved from each suite's `linux-image-amd64` metapackage (the mirror
drops old ABIs, so nothing is pinned). APT runs with a private configuration that reuses
the machine's configured Debian mirror and keyring (read from its own sources file, never
written into the repo) and its own lists and cache, so /etc/apt is never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Adding a kernel is one entry: its name on the command line -> the Debian suite whose
# current linux-image-amd64 it is.
SUITES = {
    "6.1": "bookworm",
    "6.12": "trixie",
    "7.2": "sid",
    "7.3": "trixie-backports",
}
DEFAULT_KERNELS = ("6.1", "6.12", "7.2", "7.3")
HOST_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
HOST_LIST = Path("/etc/apt/sources.list")


def cache_root() -> Path:
    """Downloads and unpacked trees live outside git: $NETMEMTRACE_KERNEL_CACHE, else the
    user's cache directory (kept between runs, so a second run downloads nothing)."""
    env = os.environ.get("NETMEMTRACE_KERNEL_CACHE")
    base = Path(env) if env else Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "netmemtrace-kernels"
    base.mkdir(parents=True, exist_ok=True)
    return base


@dataclass(frozen=True)
class KernelTree:
    name: str          # the matrix's name for it ("6.12")
    release: str       # uname -r inside the guest
    root: Path         # the unpacked packages
    vmlinuz: Path
    modules: Path      # <root>/.../lib/modules/<release>, depmod'ed


def _mirror() -> tuple[str, str]:
    """(URI, keyring) of the machine's Debian archive (not the security archive)."""
    if HOST_SOURCES.exists():
        for stanza in HOST_SOURCES.read_text().split("\n\n"):
            fields = dict(re.findall(r"^([\w-]+):\s*(.+)$", stanza, re.M))
            uris = fields.get("URIs", "").split()
            if uris and "security" not in uris[0]:
                return uris[0], fields.get("Signed-By",
                                           "/usr/share/keyrings/debian-archive-keyring.gpg")
    if HOST_LIST.exists():
        for line in HOST_LIST.read_text().splitlines():
            parts = line.split()
            if parts[:1] == ["deb"] and "security" not in line:
                uri = next(p for p in parts[1:] if "://" in p)
                return uri, "/usr/share/keyrings/debian-archive-keyring.gpg"
    raise RuntimeError(f"no Debian mirror configured in {HOST_SOURCES} or {HOST_LIST}")


class PrivateApt:
    """apt-get/apt-cache with their own sources, lists and cache under the kernel cache."""

    def __init__(self, suites: list[str]) -> None:
        self.dir = cache_root() / "apt"
        for sub in ("sources.list.d", "preferences.d", "lists/partial",
                    "cache/archives/partial"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        uri, keyring = _mirror()
        sources = (f"Types: deb\nURIs: {uri}\nSuites: {' '.join(sorted(set(suites)))}\n"
                   f"Components: main\nSigned-By: {keyring}\n")
        src = self.dir / "sources.list.d" / "kernels.sources"
        changed = not src.exists() or src.read_text() != sources
        src.write_text(sources)
        self.conf = self.dir / "apt.conf"
        self.conf.write_text("".join(f'{k} "{v}";\n' for k, v in {
            "Dir::Etc::SourceList": "/dev/null",
            "Dir::Etc::SourceParts": self.dir / "sources.list.d",
            "Dir::Etc::Preferences": "/dev/null",
            "Dir::Etc::PreferencesParts": self.dir / "preferences.d",
            "Dir::State::Lists": self.dir / "lists",
            "Dir::Cache": self.dir / "cache",
        }.items()))
        stamp = self.dir / "lists" / ".updated"
        # Lists a day old are refreshed: the mirror drops the ABIs they name.
        import time
        if changed or not stamp.exists() or time.time() - stamp.stat().st_mtime > 86400:
            self.run("apt-get", "update", "-qq")
            stamp.touch()

    def run(self, *argv: str, cwd: Path | None = None) -> str:
        env = dict(os.environ, APT_CONFIG=str(self.conf), DEBIAN_FRONTEND="noninteractive")
        proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout}")
        return proc.stdout

    def depends(self, package: str) -> list[str]:
        text = self.run("apt-cache", "show", "--no-all-versions", package)
        deps = re.search(r"^Depends: (.+)$", text, re.M)
        return [d.strip() for d in deps.group(1).split(",")] if deps else []

    def suite_version(self, package: str, suite: str) -> str:
        for line in self.run("apt-cache", "madison", package).splitlines():
            cols = [c.strip() for c in line.split("|")]
            if len(cols) >= 3 and re.search(rf"\s{re.escape(suite)}/main\b", cols[2]):
                return cols[1]
        raise RuntimeError(f"{package} has no version in suite {suite}")


def _exact(dep: str) -> tuple[str, str] | None:
    m = re.fullmatch(r"([\w.+-]+) \(= ([^)]+)\)", dep)
    return (m.group(1), m.group(2)) if m else None


def resolve(apt: PrivateApt, suite: str) -> list[str]:
    """The `name=version` packages holding one suite's current kernel image and modules:
    linux-image-<abi> itself (6.x) or the linux-binary/modules/base packages it depends on
    (7.x splits the image)."""
    meta = apt.suite_version("linux-image-amd64", suite)
    image = next(d for d in map(_exact, apt.depends(f"linux-image-amd64={meta}"))
                 if d and d[0].startswith("linux-image-"))
    parts = [d for d in map(_exact, apt.depends(f"{image[0]}={image[1]}")) if d and
             d[0].startswith(("linux-binary-", "linux-modules-", "linux-base-"))]
    return [f"{n}={v}" for n, v in (parts or [image])]


def fetch(name: str, log=print) -> KernelTree:
    """Download (once) and unpack (once) the kernel the matrix calls `name`."""
    if name not in SUITES:
        raise SystemExit(f"unknown kernel {name!r}: choose from {' '.join(SUITES)} "
                         "(add one in tests/kernels/fetch.py SUITES)")
    apt = PrivateApt(list(SUITES.values()))
    pkgs = resolve(apt, SUITES[name])
    tag = re.sub(r"[^\w.+-]", "_", "_".join(pkgs))
    tree = cache_root() / "trees" / tag
    debs = cache_root() / "debs"
    debs.mkdir(exist_ok=True)
    if not (tree / ".unpacked").exists():
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir(parents=True)
        for pkg in pkgs:
            pname, version = pkg.split("=")
            have = list(debs.glob(f"{pname}_{version.replace(':', '%3a')}_*.deb"))
            if not have:
                log(f"  downloading {pkg}")
                apt.run("apt-get", "download", "-qq", pkg, cwd=debs)
                have = list(debs.glob(f"{pname}_*.deb"))
                have = [d for d in have if version.replace(":", "%3a") in d.name]
            subprocess.run(["dpkg-deb", "-x", str(have[0]), str(tree)], check=True)
        (tree / ".unpacked").touch()
    moddirs = [p for base in ("lib/modules", "usr/lib/modules")
               if (tree / base).is_dir() for p in (tree / base).iterdir() if p.is_dir()]
    if not moddirs:
        raise RuntimeError(f"{tree}: no lib/modules directory in {pkgs}")
    moddir = moddirs[0]
    release = moddir.name
    vmlinuz = next((p for p in (tree / "boot" / f"vmlinuz-{release}", moddir / "vmlinuz")
                    if p.exists()), None)
    if vmlinuz is None:
        raise RuntimeError(f"{tree}: no vmlinuz for {release}")
    if not (moddir / "modules.dep").exists():
        # The packages ship no modules.dep; depmod -b BASE reads BASE/lib/modules (and 6.12
        # and 7.x install under usr/lib/modules).
        subprocess.run(["depmod", "-b", str(moddir.parent.parent.parent), release], check=True)
    return KernelTree(name, release, tree, vmlinuz, moddir)
