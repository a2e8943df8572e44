#!/usr/bin/env bash
# Escrow and RabbitMQ side by side on this machine, in one run: one node each, every
# acknowledgement after an fsync (a RabbitMQ quorum queue confirms a persistent message once
# its Raft log, fsynced, holds it), 1 KiB bodies, alternating. RabbitMQ is the machine's own
# server (127.0.0.1:5672, guest/guest): one node, so its quorum queue has one replica, and
# it compares with Escrow's single node.
#
#   cargo build --release && cargo build --release -p escrow-bench --features rabbitmq
#   bench/compare-rabbitmq.sh [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/peer-scenarios.sh
rounds=${1:-2}
bin=${ESCROW_BIN:-target/release}
url=${RABBITMQ_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
"$bin/escrow-bench" rabbitmq-publish --help >/dev/null 2>&1 ||
  { echo "escrow-bench lacks rabbitmq-publish: cargo build --release -p escrow-bench --features rabbitmq" >&2; exit 2; }
version=$(rabbitmqctl version 2>/dev/null || echo unknown)
# The Erlang VM serving that port, for its CPU ticks.
beam=$(pgrep -f 'beam.*rabbit' | head -1 || true)
ticks() { [ -n "$beam" ] && awk '{print $14 + $15}' "/proc/$beam/stat" || echo 0; }

rabbit_round() {
  "$bin/escrow-bench" rabbitmq-publish --url "$url" --count 50000 --window 256 >/dev/null
  peer_scenarios rabbitmq ticks rabbitmq-publish --url "$url"
}

for r in $(seq "$rounds"); do
  echo "== round $r: escrow, one node"
  bench/cluster-sequence.sh 1 p256 p1
  echo "== round $r: RabbitMQ $version, one node, quorum queue, publisher confirms"
  rabbit_round
done
