#!/usr/bin/env bash
# End-to-end demo on a fresh Debian/Ubuntu machine: installs redis-server and
# curl when missing, builds in release mode (about 1.5 minutes the first time
# on 2 cores; cargo shows its progress), starts a private Redis and the fake
# exchange on loopback, starts the daemon, and walks the operators'
# scenarios live: universe -> permits, a fill reaching the snapshot through
# the user data stream, the kill switch (ctl halt / resume),
# universe stale -> last_ok, explain and replay at the end,
# last_ok too old -> env, env empty -> FAIL-CLOSED. Everything it started is
# stopped on exit, Ctrl-C included. Needs nothing but what it installs:
# bash, redis-cli, curl and the binaries it builds (no python).
set -euo pipefail
cd "$(dirname "$0")/.."
. ops/lib.sh

need_redis_and_curl demo
echo "demo: building (release; the first build takes about 1.5 minutes on 2 cores)"
cargo build --release --bins
BIN=$(release_bins)

work=$(mktemp -d /tmp/p33-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_for() { # file pattern [after-line]
  local from=${3:-0}
  for _ in $(seq 1 150); do
    if tail -n +"$((from + 1))" "$1" | grep -q -- "$2"; then
      tail -n +"$((from + 1))" "$1" | grep -- "$2" | tail -n1
      return 0
    fi
    sleep 0.1
  done
  echo "demo: timed out waiting for '$2' in $1" >&2
  exit 1
}
lines() { wc -l < "$1"; }

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" >/dev/null &
pids+=($!)
R() { redis-cli -p "$REDIS_PORT" "$@"; }
for _ in $(seq 1 50); do R PING >/dev/null 2>&1 && break; sleep 0.1; done

"$BIN/fake-exchange" --port 0 --api-key demo-key --api-secret demo-secret > "$work/fake.log" 2>&1 &
pids+=($!)
FX=$(wait_for "$work/fake.log" "listening on" | sed 's/.*http:\/\///')
fx() { curl -fsS --max-time 5 -X POST --data-binary "$2" "http://$FX$1" >/dev/null; }
fx /control/positions '[{"symbol":"BTCUSDT","positionAmt":"0.038","entryPrice":"60000","markPrice":"60500","unRealizedProfit":"19","leverage":"5"},{"symbol":"SOLUSDT","positionAmt":"-12","entryPrice":"150","markPrice":"149","unRealizedProfit":"12","leverage":"3"}]'
fx /control/steps '{"BTCUSDT":"0.001","ETHUSDT":"0.001","SOLUSDT":"1"}'

now=$(date +%s)
universe() { # key symbols-json asof
  R SET "$1" "{\"symbols\":$2,\"asof_epoch\":$3,\"source\":\"demo\",\"mode\":\"top\",\"filters\":{}}" >/dev/null
}
universe quantum:cfg:universe:active '["BTCUSDT","ETHUSDT","SOLUSDT"]' "$now"
universe quantum:cfg:universe:last_ok '["BTCUSDT","ETHUSDT"]' "$((now - 30))"
R HSET quantum:cfg:universe:meta stale 0 count 3 asof_epoch "$now" last_ok_epoch "$now" error "" >/dev/null
# The executor's ledger for SOLUSDT: 11.95 short against the exchange's 12,
# within the 1 % tolerance (the replay at the end tightens it).
R HSET quantum:position:ledger:SOLUSDT last_known_amt -11.95 >/dev/null

METRICS_PORT=$(free_port)
LOG="$work/daemon.log"
start_daemon() { # P33_ALLOWLIST value
  env -i PATH="$PATH" \
    REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0" \
    BINANCE_TESTNET_API_KEY=demo-key BINANCE_TESTNET_API_SECRET=demo-secret \
    P33_EXCHANGE_BASE_URL="http://$FX" P33_POLL_SEC=5 \
    P33_ALLOWLIST="$1" P33_ALLOWLIST_REFRESH_S=1 P33_UNIVERSE_MAX_AGE_S=120 P33_TRADE_CLOSED_EVENTS=true \
    P33_METRICS_ADDR=127.0.0.1 P33_METRICS_PORT="$METRICS_PORT" P33_CONSUMER_NAME=p33-demo \
    "$BIN/position-state-brain" >> "$LOG" 2>&1 &
  DAEMON=$!
  pids+=($DAEMON)
}
gauge() {
  curl -fsS --max-time 5 "http://127.0.0.1:$METRICS_PORT/metrics" \
    | grep -E '^p33_allowlist_(source\{.*\} 1|symbols )' | sed 's/^/    /'
}
show() { echo "  log:   ${1#*INFO *: }"; echo "  gauge:"; gauge; }
plan() { R XADD quantum:stream:apply.plan '*' plan_id "$1" symbol "$2" decision "$3" action "$4" reduceOnly "$5" >/dev/null; }
permit() {
  for _ in $(seq 1 50); do
    v=$(R GET "quantum:permit:p33:$1"); [ -n "$v" ] && { echo "    $1: $v"; return; }; sleep 0.1
  done
  echo "    $1: (no permit)"
}

touch "$LOG"
echo "== 1. fresh universe: source=universe, plans get permits"
start_daemon "BNBUSDT"
show "$(wait_for "$LOG" 'P3.3 allowlist source=universe')"
wait_for "$LOG" 'ready: reading plans' >/dev/null
for _ in $(seq 1 50); do [ -n "$(R HGET quantum:position:snapshot:BTCUSDT ts_epoch)" ] && break; sleep 0.1; done
plan demo-partial-btc BTCUSDT EXECUTE PARTIAL_75 false
plan demo-open-eth ETHUSDT EXECUTE OPEN_LONG false
plan demo-close-eth ETHUSDT EXECUTE FULL_CLOSE_PROPOSED true
plan demo-close-sol SOLUSDT EXECUTE PARTIAL_50 true
plan demo-doge DOGEUSDT EXECUTE FULL_CLOSE_PROPOSED true
echo "  permits:"
for p in demo-partial-btc demo-open-eth demo-close-eth demo-close-sol; do permit "$p"; done
sleep 0.3
echo "    demo-doge: $(R EXISTS quantum:permit:p33:demo-doge | sed 's/0/(no permit: DOGEUSDT is not allowlisted)/')"

echo "== 2. a fill reaches the snapshot at once: the user data stream (polling every 5 s reconciles)"
echo "  log:   $(wait_for "$LOG" 'position stream: live' | sed 's/.*position stream/position stream/')"
before=$(R HGET quantum:position:snapshot:BTCUSDT position_amt)
t0=$(date +%s%N)
fx /control/positions '[{"symbol":"BTCUSDT","positionAmt":"0.05","entryPrice":"60100","markPrice":"60500","unRealizedProfit":"20","leverage":"5"},{"symbol":"SOLUSDT","positionAmt":"-12","entryPrice":"150","markPrice":"149","unRealizedProfit":"12","leverage":"3"}]'
for _ in $(seq 1 400); do [ "$(R HGET quantum:position:snapshot:BTCUSDT position_amt)" = "0.05" ] && break; sleep 0.005; done
t1=$(date +%s%N)
echo "  the exchange fills BTCUSDT $before -> 0.05; the snapshot shows it $(( (t1 - t0) / 1000000 )) ms later (curl and redis-cli included):"
set -- $(R HMGET quantum:position:snapshot:BTCUSDT position_amt side feed)
echo "    quantum:position:snapshot:BTCUSDT position_amt=$1 side=$2 feed=$3"
echo "  a stop-loss order fills 0.02 of it: what the pipeline reads on quantum:stream:p33.positions"
fx /control/stream '{"order":{"symbol":"BTCUSDT","side":"SELL","qty":"0.02","price":"59800","amount_after":"0.03","cause":"stop","realized":"-6"}}'
for _ in $(seq 1 400); do [ "$(R XLEN quantum:stream:p33.positions)" -ge 3 ] && break; sleep 0.005; done
entries() { # stream key: one line per entry, field=value ...
  R XRANGE "$1" - + | awk '
    /^[0-9]+-[0-9]+$/ { if (line != "") print "    " line; line = ""; k = ""; next }
    { if (k == "") { k = $0 } else { line = line (line == "" ? "" : " ") k "=" $0; k = "" } }
    END { if (line != "") print "    " line }'
}
entries quantum:stream:p33.positions
echo "  a take-profit order closes the SOLUSDT short: the pipeline's quantum:stream:trade.closed gets it"
echo "  in its own contract (P33_TRADE_CLOSED_EVENTS=true; the executor writes its own closes itself)"
fx /control/stream '{"order":{"symbol":"SOLUSDT","side":"BUY","qty":"12","price":"141.5","amount_after":"0","cause":"take_profit","realized":"102"}}'
for _ in $(seq 1 400); do [ "$(R XLEN quantum:stream:trade.closed)" -ge 1 ] && break; sleep 0.005; done
entries quantum:stream:trade.closed

echo "== 3. the kill switch: ctl halt, a plan is denied, ctl resume, it is allowed"
CTL() {
  env -i PATH="$PATH" USER=demo REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0" P33_SNAPSHOT_SOURCE=external \
    "$BIN/position-state-brain" ctl "$@"
}
mark=$(lines "$LOG")
echo "  \$ position-state-brain ctl halt --reason 'demo: runaway strategy'"
CTL halt --reason "demo: runaway strategy" | sed 's/^/    /'
plan demo-halted BTCUSDT EXECUTE FULL_CLOSE_PROPOSED true
permit demo-halted
echo "  log:   $(wait_for "$LOG" 'P3.3 trading state global' "$mark" | sed 's/.*P3.3 trading/P3.3 trading/')"
echo "  \$ position-state-brain ctl resume --reason 'demo: all clear'"
CTL resume --reason "demo: all clear" | sed 's/^/    /'
plan demo-resumed BTCUSDT EXECUTE PARTIAL_50 true
permit demo-resumed
echo "  \$ position-state-brain ctl status"
CTL status | sed 's/^/    /'

echo "== 4. universe marked stale: source=last_ok"
mark=$(lines "$LOG")
R HSET quantum:cfg:universe:meta stale 1 >/dev/null
show "$(wait_for "$LOG" 'P3.3 allowlist source=last_ok' "$mark")"

echo "== 5. last_ok older than P33_UNIVERSE_MAX_AGE_S: source=env"
mark=$(lines "$LOG")
universe quantum:cfg:universe:last_ok '["BTCUSDT","ETHUSDT"]' "$((now - 400))"
show "$(wait_for "$LOG" 'P3.3 allowlist source=env' "$mark")"
echo "  why:   $(wait_for "$LOG" 'allowlist source changed' "$mark" | sed 's/.*source changed: //')"

echo "== 6. P33_ALLOWLIST empty too: FAIL-CLOSED (restart with the new env)"
kill -TERM "$DAEMON"; wait "$DAEMON" 2>/dev/null || true
mark=$(lines "$LOG")
start_daemon ""
echo "  error: $(wait_for "$LOG" 'FAIL-CLOSED' "$mark" | sed 's/.*ERROR [^ ]* //')"
show "$(wait_for "$LOG" 'P3.3 allowlist source=none' "$mark")"
plan demo-closed BTCUSDT EXECUTE FULL_CLOSE_PROPOSED true
sleep 0.5
echo "    demo-closed: $(R EXISTS quantum:permit:p33:demo-closed | sed 's/0/(no permit: fail-closed)/')"
echo "== 7. why was demo-close-eth denied? what would a 0.1 % tolerance have done?"
echo "  \$ position-state-brain explain demo-close-eth"
CTLX() {
  env -i PATH="$PATH" REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0" P33_SNAPSHOT_SOURCE=external \
    "$BIN/position-state-brain" "$@"
}
CTLX explain demo-close-eth | sed 's/^/    /'
echo "  \$ position-state-brain replay --set P33_QTY_TOLERANCE_PCT=0.1"
CTLX replay --set P33_QTY_TOLERANCE_PCT=0.1 | sed 's/^/    /'
echo "== demo done; stopping Redis, the fake exchange and the daemon"
