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

packages=(fio qemu-utils libnbd-bin nbdkit nbdfuse fuse3 e2fsprogs iproute2 nftables util-linux kmod)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "== installing test prerequisites: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
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
