#!/usr/bin/env bash
# Regenerates the results table of BENCHMARKS.md: release build, then for each size the bare
# floor and Morrigan interleaved (connect+hold, send, churn), each Morrigan run on a fresh
# `morrigan serve` in a temporary data dir. Every load targets 127.0.0.x and stops by itself.
#
#   scripts/bench.sh                       # sizes 1000 5000, hold 35 s (one heartbeat period)
#   SIZES="1000 5000 19000" HOLD=300 scripts/bench.sh
#
# Raw JSON lines go to target/bench/results.jsonl; the table between the markers in
# BENCHMARKS.md is replaced.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZES=${SIZES:-"1000 5000"}
HOLD=${HOLD:-35}
CONC=${CONC:-100}
SEND_N=${SEND_N:-1000}
LOAD_CONC=${LOAD_CONC:-32}
DURATION=${DURATION:-10}
PORT=${PORT:-18080}
OUT=target/bench
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: > "$RESULTS"

cargo build --release -p morrigan -p morrigan-bench
BENCH=target/release/morrigan-bench
MORRIGAN=target/release/morrigan
export MORRIGAN_ADMIN_PASSWORD=bench-$RANDOM-$RANDOM
# Both the server and the generator may hold as many files as the hard limit allows.
ulimit -n "$(ulimit -Hn)"

SERVER_PID=
DATA=
start_server() {
  DATA=$(mktemp -d)
  "$MORRIGAN" serve --data-dir "$DATA" --listen 127.0.0.1:$PORT >"$OUT/serve.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$PORT/api/core/connection" && return 0
    sleep 0.1
  done
  echo "morrigan serve did not start" >&2; cat "$OUT/serve.log" >&2; exit 1
}
stop_server() {
  if [ -n "$SERVER_PID" ]; then
    kill -INT "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
  fi
  [ -n "$DATA" ] && rm -rf "$DATA"
  DATA=
}
trap stop_server EXIT

# run <label> <scenario> <args...>: the bare floor, then Morrigan on a fresh server.
run_pair() {
  local label=$1 scenario=$2; shift 2
  echo "== $label: bare" >&2
  "$BENCH" "$scenario" --bare --label "bare/$label" "$@" | tail -n1 >>"$RESULTS"
  start_server
  echo "== $label: morrigan (pid $SERVER_PID)" >&2
  "$BENCH" "$scenario" --url "http://127.0.0.1:$PORT" --server-pid "$SERVER_PID" \
    --label "morrigan/$label" "$@" | tail -n1 >>"$RESULTS"
  stop_server
}

# run_morrigan <label> <scenario> <args...>: Morrigan alone on a fresh server (tracked messaging
# has no bare floor: the floor server acknowledges nothing).
run_morrigan() {
  local label=$1 scenario=$2; shift 2
  start_server
  echo "== $label: morrigan (pid $SERVER_PID)" >&2
  "$BENCH" "$scenario" --url "http://127.0.0.1:$PORT" --server-pid "$SERVER_PID" \
    --label "morrigan/$label" "$@" | tail -n1 >>"$RESULTS"
  stop_server
}

for n in $SIZES; do
  run_pair "connect-$n" connect -n "$n" -c "$CONC" --hold "$HOLD"
done
run_pair "send-$SEND_N" send -n "$SEND_N" -c "$CONC" --load-concurrency "$LOAD_CONC" --duration "$DURATION"
run_pair "churn" churn --load-concurrency "$LOAD_CONC" --duration "$DURATION"
# Tracked messaging: the same sends waiting for the device's ack or reply (the held sockets
# answer), and 1000 offline devices with 10 queued messages each reconnecting at once.
for track in ack reply; do
  run_morrigan "tracked-$track-$SEND_N" send -n "$SEND_N" -c "$CONC" --load-concurrency "$LOAD_CONC" \
    --duration "$DURATION" --track "$track"
done
run_morrigan "outbox-${OUTBOX_N:-1000}" outbox -n "${OUTBOX_N:-1000}" -c "$CONC" --per-client 10 \
  --load-concurrency "$LOAD_CONC"

python3 scripts/bench_table.py "$RESULTS" BENCHMARKS.md "$SEND_N"
echo "table updated in BENCHMARKS.md (raw: $RESULTS)" >&2
