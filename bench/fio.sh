#!/usr/bin/env bash
# Compare fio results on a raw file, qemu-nbd, tandemd and a replicated tandemd
# pair (see bench/README.md). The replicated pair runs in two network namespaces
# joined by a veth pair when run as root; otherwise (or with --repl-loopback)
# it replicates over loopback.
# Usage: bench/fio.sh [fio-compare ARGS], e.g. bench/fio.sh --size 256M --runtime 5
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cargo build --release -p tandem-daemon -p tandem-bench
target_dir="$(cargo metadata --format-version 1 --no-deps 2>/dev/null \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
exec "${target_dir:-$root/target}/release/fio-compare" "$@"
