#!/usr/bin/env bash
# Runs benchmark scenarios against a fresh cluster (`escrow dev`, or three `escrow serve`
# processes), the way the figures in docs/performance.md were taken: one warm-up, then
# each scenario in turn, printing throughput, latency, the broker's CPU ticks
# (user+system, and system alone), its minor page faults and the megabytes written to the
# data directory's disk.
#
#   cargo build --release
#   bench/cluster-sequence.sh 3 p256 txn p1 p256      # three nodes in one process
#   bench/cluster-sequence.sh 1 p256 p1               # one node
#   bench/cluster-sequence.sh 3p p256 txn p1          # three `escrow serve` processes
#
# Scenarios: p256, p1024, p1 (publish at windows 256, 1024, 1), txn, txn1 (half + commit),
# d1, d4 (a new consumer group drains 100,000 messages with 1 or 4 consumers; put a
# publish scenario first).
set -euo pipefail
cd "$(dirname "$0")/.."
nodes=${1:-3}
shift || true
scenarios=${*:-p256 p1}
bin=${ESCROW_BIN:-target/release} # ESCROW_BIN=dir compares another build
# One fixed directory, emptied first: on the development VM a never-used directory path
# measured ~20 % slower at window 256 (guest kernel time +60 %), see docs/performance.md.
data=${ESCROW_BENCH_DIR:-/tmp/escrow-bench}
rm -rf "$data" "$data.log"
# The machine's floor first: figures from different days compare only with these beside them.
echo "disk (4 KiB write + fdatasync, no broker): $("$bin/escrow-bench" disk --dir "$(dirname "$data")" --count 500 2>&1 | grep -E '^(latency|redb)|steal' | tr -s ' ' | tr '\n' ' ')"
pids=()
if [ "$nodes" = 3p ]; then
  # Three processes, each with its own config, certificate and runtime, as in production.
  "$bin/escrow" cert ca --dir "$data/ca" >/dev/null
  for i in 1 2 3; do
    "$bin/escrow" cert node --ca-dir "$data/ca" --out "$data/n$i/tls" >/dev/null
    cat >"$data/n$i.toml" <<EOF
node_id = $i
listen = "127.0.0.1:$((27439 + i))"
raft_listen = "127.0.0.1:$((27449 + i))"
data_dir = "$data/n$i/data"
bootstrap = $([ $i = 1 ] && echo true || echo false)

[tls]
cert = "$data/n$i/tls/node.pem"
key = "$data/n$i/tls/node.key"
ca = "$data/ca/ca.pem"
EOF
    "$bin/escrow" serve --config "$data/n$i.toml" >>"$data.log" 2>&1 &
    pids+=($!)
  done
  export ESCROW_SERVER=127.0.0.1:27440,127.0.0.1:27441,127.0.0.1:27442 ESCROW_CA=$data/ca/ca.pem
elif [ "$nodes" = 3 ]; then
  "$bin/escrow" dev --nodes 3 --data-dir "$data" --listen 127.0.0.1:27440 >"$data.log" 2>&1 &
  pids+=($!)
  export ESCROW_SERVER=127.0.0.1:27440,127.0.0.1:27441,127.0.0.1:27442 ESCROW_CA=$data/tls/ca.pem
else
  "$bin/escrow" dev --data-dir "$data" --listen 127.0.0.1:27440 >"$data.log" 2>&1 &
  pids+=($!)
  export ESCROW_SERVER=127.0.0.1:27440 ESCROW_CA=$data/tls/ca.pem
fi
trap 'kill "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null; rm -rf "$data" "$data.log"' EXIT
if [ "$nodes" = 3p ]; then
  first=(--server 127.0.0.1:27440)
  for _ in $(seq 100); do
    "$bin/escrow" "${first[@]}" cluster status 2>/dev/null | grep -q leader && break
    sleep 0.2
  done
  for i in 2 3; do
    "$bin/escrow" "${first[@]}" cluster add-learner --id $i --raft-addr 127.0.0.1:$((27449 + i)) \
      --client-addr 127.0.0.1:$((27439 + i)) >/dev/null
    "$bin/escrow" "${first[@]}" cluster promote --id $i >/dev/null
  done
fi
for _ in $(seq 100); do
  [ -f "$ESCROW_CA" ] && "$bin/escrow" cluster status >/dev/null 2>&1 && break
  sleep 0.2
done
sleep 1 # let `escrow dev --nodes 3` finish adding its voters
# CPU ticks (user+system, system) and minor page faults of every broker process together.
ticks() { for p in "${pids[@]}"; do cat "/proc/$p/stat"; done | awk '{t += $14 + $15; s += $15; f += $10} END {print t, s, f}'; }
steal() { awk '/^cpu /{t = 0; for (i = 2; i <= NF; i++) t += $i; print $9, t}' /proc/stat; }
# Bytes written to the data directory's block device (all writers on it, in MB).
disk=$(basename "$(df --output=source "$(dirname "$data")" | tail -1)")
disk_mb() { awk -v d="$disk" '$3 == d {print int($10 * 512 / 1000000)}' /proc/diskstats; }
"$bin/escrow-bench" publish --size 1024 --count 50000 --window 256 --topic warm >/dev/null
for s in $scenarios; do
  case $s in
    p256) args=(publish --count 200000 --window 256 --size 1024) ;;
    p1024) args=(publish --count 200000 --window 1024 --size 1024) ;;
    p1) args=(publish --count 3000 --window 1 --size 1024) ;;
    txn) args=(txn --count 50000 --window 256 --size 1024) ;;
    txn1) args=(txn --count 2000 --window 1 --size 1024) ;;
    # A new group reads what the publish scenarios before it stored, from the start.
    d1 | d4) args=(drain --count 100000 --consumers "${s#d}" --group "drain-$s-$RANDOM") ;;
    *) echo "unknown scenario $s" >&2; exit 2 ;;
  esac
  read -r t0 s0 f0 < <(ticks)
  read -r st0 all0 < <(steal)
  mb0=$(disk_mb)
  out=$("$bin/escrow-bench" "${args[@]}" 2>&1)
  read -r t1 s1 f1 < <(ticks)
  read -r st1 all1 < <(steal)
  mb1=$(disk_mb)
  echo "$s: $(grep -E '^(throughput|latency)' <<<"$out" | tr '\n' ' ') cpu_ticks=$((t1 - t0)) sys=$((s1 - s0)) faults=$((f1 - f0)) steal=$((100 * (st1 - st0) / (all1 - all0)))% disk_written=$((${mb1:-0} - ${mb0:-0}))MB"
done
