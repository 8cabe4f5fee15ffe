#!/bin/sh
# mmdebstrap customize hook of build.sh: $1 is the new root filesystem; NMT_WHEELS holds the
# netmemtrace wheel and its dependencies, NMT_PIP the venv's pip package.
set -eu
root=$1

# The essential init-system-helpers pulled usrmerge (and perl, 50 MB, with it) to merge a /usr
# that mmdebstrap had merged already (usr-is-merged, included, says so). apt only plans what
# the image needs no more; the chroot's dpkg removes it (the outside dpkg misnames
# Architecture: all packages here).
export APT_CONFIG="$MMDEBSTRAP_APT_CONFIG"
apt-mark -qq auto $(chroot "$root" dpkg-query -W -f '${Package} ') >/dev/null
apt-mark -qq manual $(echo "$MMDEBSTRAP_INCLUDE" | tr , " ") >/dev/null
chroot "$root" dpkg --purge usrmerge >/dev/null
while gone=$(apt-get -s -o APT::AutoRemove::SuggestsImportant=false \
                 -o APT::AutoRemove::RecommendsImportant=false autoremove |
             awk '/^Remv/ {print $2}') && [ -n "$gone" ]; do
    chroot "$root" dpkg --purge $gone >/dev/null
done

# A venv of its own (PEP 668: Debian's python3 is not pip's to change), filled by the venv's
# pip run with the image's python3 (pip is pure Python), which leaves with the wheels. pip
# compiles every .pyc now, for the read-only root filesystem.
mkdir "$root/tmp/build"
cp -a "$NMT_PIP" "$NMT_WHEELS" "$root/tmp/build/"
chroot "$root" python3 -m venv --without-pip /opt/netmemtrace
chroot "$root" env PYTHONPATH=/tmp/build /opt/netmemtrace/bin/python -m pip install -q \
    --isolated --no-index --no-cache-dir --disable-pip-version-check \
    --find-links /tmp/build/wheels \
    netmemtrace
ln -s /opt/netmemtrace/bin/netmemtrace "$root/usr/local/bin/netmemtrace"
rm -rf "$root/tmp/build"
chroot "$root" netmemtrace --help >/dev/null

# dpkg's path-exclude keeps the symlinks of the docs it left out, dangling.
find "$root/usr/share/doc" -xtype l -delete
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/log/* \
    "$root"/var/cache/debconf/*-old "$root/usr/share/info/dir"
