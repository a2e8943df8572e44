#!/usr/bin/env bash
# Runs benchmark scenarios against a fresh `escrow dev` cluster, the way the figures in
# docs/performance.md were taken: one warm-up, then each scenario in turn, printing
# throughput, latency and the broker's CPU ticks (user+system, and system alone).
#
#   cargo build --release
#   bench/cluster-sequence.sh 3 p256 txn p1 p256      # three nodes in one process
#   bench/cluster-sequence.sh 1 p256 p1               # one node
#
# Scenarios: p256, p1024, p1 (publish at windows 256, 1024, 1), txn, txn1 (half + commit).
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
if [ "$nodes" = 3 ]; then
  "$bin/escrow" dev --nodes 3 --data-dir "$data" --listen 127.0.0.1:27440 >"$data.log" 2>&1 &
  export ESCROW_SERVER=127.0.0.1:27440,127.0.0.1:27441,127.0.0.1:27442
else
  "$bin/escrow" dev --data-dir "$data" --listen 127.0.0.1:27440 >"$data.log" 2>&1 &
  export ESCROW_SERVER=127.0.0.1:27440
fi
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$data" "$data.log"' EXIT
export ESCROW_CA=$data/tls/ca.pem
for _ in $(seq 100); do
  [ -f "$ESCROW_CA" ] && "$bin/escrow" cluster status >/dev/null 2>&1 && break
  sleep 0.2
done
sleep 1 # let `escrow dev --nodes 3` finish adding its voters
ticks() { awk '{print $14 + $15, $15}' "/proc/$pid/stat"; }
steal() { awk '/^cpu /{t = 0; for (i = 2; i <= NF; i++) t += $i; print $9, t}' /proc/stat; }
"$bin/escrow-bench" publish --size 1024 --count 50000 --window 256 --topic warm >/dev/null
for s in $scenarios; do
  case $s in
    p256) args=(publish --count 200000 --window 256) ;;
    p1024) args=(publish --count 200000 --window 1024) ;;
    p1) args=(publish --count 3000 --window 1) ;;
    txn) args=(txn --count 50000 --window 256) ;;
    txn1) args=(txn --count 2000 --window 1) ;;
    *) echo "unknown scenario $s" >&2; exit 2 ;;
  esac
  read -r t0 s0 < <(ticks)
  read -r st0 all0 < <(steal)
  out=$("$bin/escrow-bench" "${args[@]}" --size 1024 2>&1)
  read -r t1 s1 < <(ticks)
  read -r st1 all1 < <(steal)
  echo "$s: $(grep -E '^(throughput|latency)' <<<"$out" | tr '\n' ' ') cpu_ticks=$((t1 - t0)) sys=$((s1 - s0)) steal=$((100 * (st1 - st0) / (all1 - all0)))%"
done
