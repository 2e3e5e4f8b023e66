#!/usr/bin/env bash
# Compare fio results on a raw file, qemu-nbd and tandemd (see bench/README.md).
# Usage: bench/fio.sh [fio-compare ARGS], e.g. bench/fio.sh --size 256M --runtime 5
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cargo build --release -p tandem-daemon -p tandem-bench
target_dir="$(cargo metadata --format-version 1 --no-deps 2>/dev/null \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
exec "${target_dir:-$root/target}/release/fio-compare" "$@"
