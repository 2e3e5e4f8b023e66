#!/usr/bin/env bash
# Installs the test prerequisites (Debian packages) and runs the whole test
# suite: unit, property and conformance tests of every crate, and the
# end-to-end tests with real tandemd processes, fio, qemu-io, nbdinfo,
# nbdcopy and nbdfuse + loop + ext4.
#
#   tests/run.sh            # from the repository root, as root (or with sudo)
#
# A test that needs a kernel feature this machine lacks prints
# "skipping: <reason>". With TANDEM_REQUIRE_ALL=1 (CI sets it) a missing
# *tool* fails the run instead, so CI cannot pass by skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

# command -> Debian package that provides it
needs=(
  "fio fio" "qemu-nbd qemu-utils" "qemu-io qemu-utils" "nbdinfo libnbd-bin"
  "nbdcopy libnbd-bin" "nbdkit nbdkit" "fusermount3 fuse3" "mkfs.ext4 e2fsprogs"
  "e2fsck e2fsprogs" "mkfs.xfs xfsprogs" "ip iproute2" "nft nftables" "losetup mount" "modprobe kmod"
)
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
apt_install() {
  echo "== installing test prerequisites: $*"
  export DEBIAN_FRONTEND=noninteractive
  if [ -z "${apt_updated:-}" ]; then $SUDO apt-get update -qq; apt_updated=1; fi
  $SUDO apt-get install -y -qq --no-install-recommends "$@"
}
missing=()
for pair in "${needs[@]}"; do
  set -- $pair
  command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ] || missing+=("$2")
done
if ((${#missing[@]})); then
  apt_install $(printf '%s\n' "${missing[@]}" | sort -u)
fi
# nbdfuse ships in libnbd-bin on Debian 12 and in its own package on newer releases.
if ! command -v nbdfuse >/dev/null 2>&1; then
  apt_install nbdfuse
fi
# Loop devices and FUSE are kernel features; load them if possible (no-op if built in).
modprobe loop 2>/dev/null || true
modprobe fuse 2>/dev/null || true

# As root, the storage conformance suite also runs on loop devices (block-device paths).
if [ "$(id -u)" -eq 0 ] && command -v losetup >/dev/null; then
  export TANDEM_TEST_LOOPDEV="${TANDEM_TEST_LOOPDEV:-1}"
fi

echo "== building (release)"
cargo build --release --workspace --all-targets
echo "== running tests"
cargo test --release --workspace -- --test-threads=1
