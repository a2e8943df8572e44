# Sourced by bench/compare-*.sh: the publish scenarios against a peer.
#
#   peer_scenarios LABEL TICKS_FUNCTION ESCROW_BENCH_SUBCOMMAND [ARGS...]
#
# runs window 256 (200,000 messages) and window 1 (3,000) of 1 KiB through `$bin/escrow-bench`
# and prints each with the peer's CPU ticks, as bench/cluster-sequence.sh does for Escrow.
peer_scenarios() {
  local label=$1 ticks=$2 s t0 out args
  shift 2
  for s in p256 p1; do
    case $s in
      p256) args=(--count 200000 --window 256) ;;
      p1) args=(--count 3000 --window 1) ;;
    esac
    t0=$($ticks)
    out=$("$bin/escrow-bench" "$@" --size 1024 "${args[@]}" 2>&1)
    echo "$label $s: $(grep -E '^(throughput|latency)' <<<"$out" | tr '\n' ' ') cpu_ticks=$(($($ticks) - t0))"
  done
}
