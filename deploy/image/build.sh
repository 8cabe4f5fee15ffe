#!/bin/bash
# Build the netmemtrace container image with no container registry: `make image` runs this
# after `make build` (the venv and the CO-RE objects).
#
#   deploy/image/build.sh [IMAGE]      IMAGE defaults to netmemtrace:VERSION (pyproject.toml)
#
# 1. mmdebstrap makes a Debian root filesystem from the packages of this machine's own apt
#    sources (/etc/apt/sources.list.d/debian.sources, read now, never written into the repo),
#    of this machine's release, so the image's python3 is the one the wheels were made for.
# 2. The netmemtrace wheel (with bpfobj/, compiled once on this host: CO-RE relocates them
#    on every kernel) and its dependencies, at the versions of the tested venv, are installed
#    into it by the venv's pip run with the image's python3; pip and the wheels leave again.
# 3. Docs, locales, apt lists and caches are left out; no compiler, no kernel headers.
# 4. `podman build` of deploy/image/Containerfile (FROM scratch, one layer) adds the OCI
#    labels. Docker format: the OCI image config has no HEALTHCHECK field.
#
# The image carries a hash of everything it is made from (the package's files and objects,
# pyproject.toml, this directory, the dependency versions, the apt sources): when the image
# already there has the same hash, nothing is rebuilt. FORCE=1 rebuilds anyway (newer Debian
# packages from the mirror). Environment: IMAGE_SOURCE (org.opencontainers.image.source;
# default: the git remote `origin`, else this checkout as a file:// URL).
set -euo pipefail

die() { echo "build.sh: $*" >&2; exit 2; }

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
venv=${VENV:-$repo/.venv}
sources=/etc/apt/sources.list.d/debian.sources
out=$repo/build/image

[ -x "$venv/bin/python" ] || die "$venv/bin/python missing: run \`make build\` first"
ls "$repo"/netmemtrace/bpfobj/*.bpf.o >/dev/null 2>&1 \
    || die "no BPF objects in netmemtrace/bpfobj: run \`make build\` first"
[ -r "$sources" ] || die "$sources missing: the image is built from this machine's Debian apt sources"
for tool in mmdebstrap podman; do
    command -v "$tool" >/dev/null || die "$tool missing: \`make image\` installs it"
done

. /etc/os-release
suite=${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}
version=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("netmemtrace"))')
image=${1:-netmemtrace:$version}
mkdir -p "$out"

# Runtime dependencies pinned to the venv's versions (what the tests ran against).
"$venv/bin/python" -m pip freeze --exclude-editable > "$out/constraints.txt"

cd "$repo"
inputs=$( { find netmemtrace -type f \( -name '*.py' -o -name '*.bpf.o' -o -name '*.bpf.json' \) \
              -not -path '*/__pycache__/*'; echo pyproject.toml; ls deploy/image/*; } | LC_ALL=C sort)
source_url=${IMAGE_SOURCE:-$(git remote get-url origin 2>/dev/null || echo "$repo")}
# A clone of a local checkout has a path for a remote: a label wants a URL.
case "$source_url" in
	*://*) ;;
	/*) source_url="file://$source_url" ;;
	*) source_url="file://$repo" ;;
esac
# shellcheck disable=SC2086 # one path per word, none with spaces
hash=$( { sha256sum $inputs; cat "$out/constraints.txt" "$sources"; echo "$suite";
          echo "$source_url"; } | sha256sum | cut -c1-16)
have=$(podman image inspect --format '{{index .Labels "io.netmemtrace.content-hash"}}' \
       "$image" 2>/dev/null || true)
if [ "$have" = "$hash" ] && [ -z "${FORCE:-}" ]; then
    echo "$image is up to date (content hash $hash)"
    exit 0
fi

revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
# shellcheck disable=SC2086
[ -z "$(git status --porcelain -- $inputs 2>/dev/null)" ] || revision="$revision-dirty"

work=$(mktemp -d "$out/work.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir "$work/wheels"
# pip's own chatter (setuptools deprecation notes) goes to a log, shown when a step fails.
"$venv/bin/python" -m pip wheel -q --no-deps -w "$work/wheels" "$repo" >"$work/pip.log" 2>&1 \
    && "$venv/bin/python" -m pip download -q --only-binary=:all: -c "$out/constraints.txt" \
        -d "$work/wheels" "$work"/wheels/netmemtrace-*.whl >>"$work/pip.log" 2>&1 \
    || { cat "$work/pip.log" >&2; die "the netmemtrace wheel or its dependencies failed"; }
export NMT_WHEELS=$work/wheels
NMT_PIP=$("$venv/bin/python" -c 'import os, pip; print(os.path.dirname(pip.__file__))')
export NMT_PIP

# Essential:yes packages of the release plus python3 and libbpf1; then customize.sh.
start=$(date +%s)
mmdebstrap --quiet --mode=root --variant=essential --include=python3,libbpf1,usr-is-merged \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/lintian/*' \
    --customize-hook="$here/customize.sh" \
    "$suite" "$work/rootfs.tar" "$sources"
echo "root filesystem: $(( $(stat -c %s "$work/rootfs.tar") >> 20 )) MiB in $(( $(date +%s) - start )) s"

cp "$here/Containerfile" "$work/"
podman build -q --format docker --file "$work/Containerfile" \
    --label org.opencontainers.image.title=netmemtrace \
    --label "org.opencontainers.image.description=eBPF observability for Linux network memory" \
    --label org.opencontainers.image.version="$version" \
    --label org.opencontainers.image.revision="$revision" \
    --label org.opencontainers.image.source="$source_url" \
    --label org.opencontainers.image.licenses=GPL-2.0-only \
    --label org.opencontainers.image.created="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --label io.netmemtrace.content-hash="$hash" \
    --tag "$image" "$work" >/dev/null
# The image this one replaced is left untagged: remove it, not any other.
podman image prune -f --filter label=io.netmemtrace.content-hash >/dev/null
echo "$image: $(podman image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f", $1 / 1e6}') MB, content hash $hash"
