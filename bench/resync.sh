#!/usr/bin/env bash
# Resync measurements for the fault-survival targets (docs/replication.md):
#
#   1. resync throughput under a `tc tbf` rate limit (default 200 Mbit/s) on
#      the replication link, as a fraction of that rate;
#   2. a link outage (default 20 s) under 4 KiB random writes: bytes the
#      resync moved, as a multiple of the dirty set the Primary recorded.
#
# The Primary (alpha) and the Secondary (beta) run in two network namespaces
# joined by a veth pair; fio writes through alpha's NBD export (unix socket).
# Needs root, iproute2 (ip, tc), fio, python3. Prints a summary and writes
# JSON to $OUT (default bench-resync.json).
#
#   bench/resync.sh                      # 2 GiB volume, 1 GiB dirty, 200mbit, 20 s outage
#   RATE=1gbit SIZE=4G DIRTY=2G OUTAGE=20 bench/resync.sh
set -euo pipefail
RATE=${RATE:-200mbit}
SIZE=${SIZE:-2G}
DIRTY=${DIRTY:-1G}
OUTAGE=${OUTAGE:-20}
OUT=${OUT:-bench-resync.json}
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
for t in ip tc fio python3; do
  command -v "$t" >/dev/null || { echo "resync.sh: $t is needed" >&2; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { echo "resync.sh: needs root (network namespaces, tc)" >&2; exit 1; }
cargo build --release -p tandem-daemon >&2
bin="$root/target/release"
work="$(mktemp -d /var/tmp/tandem-resync.XXXXXX)"
NA=tdmrsA$$; NB=tdmrsB$$
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  ip netns del "$NA" 2>/dev/null || true
  ip netns del "$NB" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

ip netns add "$NA"; ip netns add "$NB"
ip link add vrsA type veth peer name vrsB
ip link set vrsA netns "$NA"; ip link set vrsB netns "$NB"
ip -n "$NA" addr add 10.78.0.1/24 dev vrsA; ip -n "$NB" addr add 10.78.0.2/24 dev vrsB
for ns in "$NA" "$NB"; do ip -n "$ns" link set lo up; done
ip -n "$NA" link set vrsA up; ip -n "$NB" link set vrsB up
# The limit applies to both directions (data one way, acks the other).
ip netns exec "$NA" tc qdisc add dev vrsA root tbf rate "$RATE" burst 256kb latency 50ms
ip netns exec "$NB" tc qdisc add dev vrsB root tbf rate "$RATE" burst 256kb latency 50ms

"$bin/tandemctl" ca create --dir "$work/ca" >/dev/null
for n in alpha beta; do
  "$bin/tandemctl" cert issue --ca-dir "$work/ca" --node "$n" --out-dir "$work" >/dev/null
done
uuid=5e1f0000-0000-4000-8000-00000000beef
for n in alpha beta; do
  "$bin/tandemctl" create "$work/$n.img" --size "$SIZE" --name vol --uuid "$uuid" >/dev/null
done
conf() { # me role my_ip peer peer_ip
  cat >"$work/$1.toml" <<EOF
[nbd]
unix = "$work/$1.sock"
[admin]
socket = "$work/$1-admin.sock"
[[export]]
name = "vol"
backing = "$work/$1.img"
[export.replication]
node = "$1"
listen = "$3:7788"
cert = "$work/$1.crt"
key = "$work/$1.key"
ca = "$work/ca/ca.crt"
role = "$2"
peers = [{ name = "$4", address = "$5:7788" }]
EOF
}
conf alpha primary 10.78.0.1 beta 10.78.0.2
conf beta secondary 10.78.0.2 alpha 10.78.0.1
start() { # name ns
  ip netns exec "$2" "$bin/tandemd" run --config "$work/$1.toml" >>"$work/$1.log" 2>&1 &
  pids+=($!)
  eval "pid_$1=$!"
}
status() { # name -> json
  "$bin/tandemctl" status vol --json --admin-socket "$work/$1-admin.sock" 2>/dev/null || echo '{}'
}
peer_field() { # name field
  status "$1" | python3 -c '
import json,sys
try:
    p=json.load(sys.stdin)["exports"][0]["replication"]["peers"][0]
    print(p.get(sys.argv[1],""))
except Exception:
    print("")' "$2"
}
wait_established() {
  for _ in $(seq 1 1200); do
    [ "$(peer_field alpha replication)" = Established ] && [ "$(peer_field alpha out_of_sync_bytes)" = 0 ] && return 0
    sleep 0.1
  done
  echo "resync.sh: alpha and beta did not reach Established" >&2; tail -20 "$work/alpha.log" >&2; exit 1
}
resynced() { # bytes alpha sent as sync source so far
  python3 - "$work/alpha.log" <<'EOF'
import re,sys
print(sum(int(m) for l in open(sys.argv[1], errors="replace") if "SyncFinished" in l and "role: Source" in l for m in re.findall(r"bytes: (\d+)", l)))
EOF
}
uri="nbd+unix:///vol?socket=$work/alpha.sock"
start alpha "$NA"; start beta "$NB"
wait_established
echo "== alpha (netns $NA) and beta (netns $NB) replicating over veth with tbf $RATE each way" >&2

# 1. Resync throughput: beta down, DIRTY bytes written, beta back.
kill -TERM "$pid_beta"; wait "$pid_beta" 2>/dev/null || true
fio --name=dirty --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=8 \
    --size="$DIRTY" --output=/dev/null >&2
dirty1=$(peer_field alpha out_of_sync_bytes)
before=$(resynced)
start beta "$NB"
t0=$(date +%s.%N)
wait_established
t1=$(date +%s.%N)
moved1=$(( $(resynced) - before ))
read -r secs1 mbps1 frac1 <<<"$(python3 -c "
import sys
rate='$RATE'.lower()
mult={'kbit':1e3,'mbit':1e6,'gbit':1e9}
link=next(float(rate[:-len(k)])*v for k,v in mult.items() if rate.endswith(k))
secs=$t1-$t0
bits=$moved1*8/secs
print(f'{secs:.2f} {bits/1e6:.1f} {bits/link:.3f}')")"
echo "== resync: $moved1 bytes (dirty set $dirty1) in ${secs1} s (from beta's start, handshake included): ${mbps1} Mbit/s = ${frac1} of $RATE" >&2

# 2. Outage under 4 KiB random writes: link down for OUTAGE s while fio writes.
fio --name=outage --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=16 \
    --size="$SIZE" --time_based --runtime=$((OUTAGE + 3)) --output=/dev/null >&2 &
fio_pid=$!
sleep 2
ip -n "$NA" link set vrsA down
sleep "$OUTAGE"
wait "$fio_pid"
dirty2=$(peer_field alpha out_of_sync_bytes)
before=$(resynced)
ip -n "$NA" link set vrsA up
wait_established
moved2=$(( $(resynced) - before ))
ratio2=$(python3 -c "print(f'{$moved2/max($dirty2,1):.3f}')")
echo "== ${OUTAGE} s outage under 4k random writes: dirty set $dirty2 bytes, resync moved $moved2 bytes = ${ratio2}x the dirty set" >&2

cat >"$OUT" <<EOF
{"rate":"$RATE","size":"$SIZE",
 "resync":{"dirty_bytes":$dirty1,"moved_bytes":$moved1,"seconds":$secs1,"mbit_per_s":$mbps1,"fraction_of_link":$frac1},
 "outage":{"seconds":$OUTAGE,"dirty_bytes":$dirty2,"moved_bytes":$moved2,"moved_over_dirty":$ratio2}}
EOF
cat "$OUT"
