#!/usr/bin/env bash
# Five local nodes holding 95,000 connections together (issue 5): a fresh PostgreSQL database,
# five `morrigan serve` processes on the NATS bus (ports 18101-18105), and one
# `morrigan-bench connect` per node (19,000 each, two worker processes apiece), all at once.
# Each bench prints its JSON line to target/bench/cluster_hold.jsonl; the summary goes to stderr.
#
#   MORRIGAN_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/postgres \
#   MORRIGAN_TEST_NATS_URL=nats://127.0.0.1:4222 scripts/cluster_hold.sh
#   NODES=5 PER_NODE=19000 HOLD=60 scripts/cluster_hold.sh      # the defaults
set -euo pipefail
cd "$(dirname "$0")/.."

NODES=${NODES:-5}
PER_NODE=${PER_NODE:-19000}
HOLD=${HOLD:-60}
PG=${MORRIGAN_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}
NATS=${MORRIGAN_TEST_NATS_URL:-nats://127.0.0.1:4222}
OUT=target/bench
mkdir -p "$OUT"
RESULTS=$OUT/cluster_hold.jsonl
: > "$RESULTS"

cargo build --release -p morrigan -p morrigan-bench
BENCH=target/release/morrigan-bench
MORRIGAN=target/release/morrigan
export MORRIGAN_ADMIN_PASSWORD=bench-$RANDOM-$RANDOM
ulimit -n "$(ulimit -Hn)"

DB=morrigan_hold_$RANDOM$RANDOM
psql "$PG" -qc "CREATE DATABASE $DB"
DB_URL="${PG%/*}/$DB"
PIDS=()
DIRS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  done
  for d in "${DIRS[@]}"; do rm -rf "$d"; done
  psql "$PG" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" || true
}
trap cleanup EXIT

for i in $(seq "$NODES"); do
  d=$(mktemp -d); DIRS+=("$d")
  port=$((18100 + i))
  "$MORRIGAN" serve --data-dir "$d" --listen 127.0.0.1:$port --database-url "$DB_URL" \
    --nats-url "$NATS" >"$OUT/cluster_hold_node$i.log" 2>&1 &
  PIDS+=($!)
  # One at a time: the first start runs the migrations.
  for _ in $(seq 150); do
    curl -s -o /dev/null "http://127.0.0.1:$port/healthz" && break
    sleep 0.1
  done
done

BENCHES=()
for i in $(seq "$NODES"); do
  port=$((18100 + i))
  # Eight source addresses: each node's sockets and its token exchanges get their own ports.
  "$BENCH" connect --url "http://127.0.0.1:$port" --server-pid "${PIDS[$((i - 1))]}" \
    -n "$PER_NODE" -c 100 --hold "$HOLD" --sources 8 --label "cluster-hold/node$i" \
    2>"$OUT/cluster_hold_bench$i.log" | tail -n1 >>"$RESULTS" &
  BENCHES+=($!)
done
for b in "${BENCHES[@]}"; do wait "$b"; done

python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
held = drops = fails = 0
for r in rows:
    ph = {p["phase"]: p for p in r["phases"]}
    c, h = ph.get("connect", {}), ph.get("hold", {})
    held += h.get("held", 0); drops += h.get("drops", 0)
    fails += sum(c.get("failures", {}).values())
    print(f'{r["label"]}: connected {c.get("ok")} at {c.get("rate_per_s", 0):.0f}/s, '
          f'held {h.get("held")} for {h.get("wall_s", 0):.0f} s, drops {h.get("drops")}, '
          f'{c.get("server_cpu_us_per_op")} us/connect, '
          f'RSS {h.get("server_rss_kib_per_conn")} KiB/conn, '
          f'idle {h.get("server_pct_core_per_10k")} %/10k', file=sys.stderr)
print(f"total: {held} held across {len(rows)} nodes, {drops} drops, {fails} failed connects",
      file=sys.stderr)
PY
