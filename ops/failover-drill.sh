#!/usr/bin/env bash
# Failover drill for operators (SPEC §15): starts a Redis master, one replica
# and three sentinels on loopback (down-after-milliseconds 1000, quorum 2),
# the daemon finding the master through the sentinels, and a producer that
# XADDs plans to whichever node the sentinels name. Then, under that load:
#   1. SIGKILL the master (a crash): the replica is promoted;
#   2. the old master comes back and the sentinels make it a replica;
#   3. SENTINEL FAILOVER (a planned switch) back to it.
# For each switch it prints what an operator watches: /readyz, the time from
# the sentinels' +switch-master to the first permit written on the new
# master, permits before and after, nothing pending, and
# p33_redis_failovers_total. Everything it started is stopped on exit.
# With --tls (SPEC §17) every node and sentinel listens on TLS only (a test
# CA made with openssl), the nodes load the gate's ACL users (the lines of
# `position-state-brain acl`), the daemon logs in as p33, and after each
# switch `ctl` as p33-ops reduces and resumes through the sentinels (the
# function library came with the data) and `ctl status` runs as p33-read.
# Needs bash, redis-server/redis-cli and curl (installed when missing), and
# openssl for --tls.
set -euo pipefail
# From a source checkout it builds and runs cargo's release binaries; as
# installed by the package (/usr/share/position-state-brain/) it runs
# /usr/bin's.
here=$(cd "$(dirname "$0")" && pwd)
if [ -f "$here/../Cargo.toml" ]; then
  cd "$here/.."
  . ops/lib.sh
  FROM_SOURCE=1
else
  . "$here/lib.sh"
  FROM_SOURCE=
fi

TLS=
case "${1:-}" in
  --tls) TLS=1 ;;
  "") ;;
  *) echo "usage: ops/failover-drill.sh [--tls]" >&2; exit 64 ;;
esac
need_redis_and_curl drill
if [ -n "$TLS" ] && ! command -v openssl >/dev/null 2>&1; then
  install_missing ops/failover-drill.sh openssl
fi
echo "drill: building (release)"
if [ -n "$FROM_SOURCE" ]; then
  cargo build --release --bins --quiet
  BIN=$(release_bins)
else
  BIN=$(dirname "$(command -v position-state-brain)")
fi

work=$(mktemp -d /tmp/p33-drill.XXXXXX)
pids=()
cleanup() {
  local rc=$?
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -n "${NODE_A_PID:-}" ] && kill "$NODE_A_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  # A failed drill shows what each sentinel saw and did (+sdown, +odown,
  # +switch-master, …): a failover it did not ask for is told apart.
  if [ "$rc" -ne 0 ]; then
    for f in "$work"/s*.log; do
      [ -f "$f" ] && { echo "--- ${f##*/}" >&2; grep -E ' [#*] [-+]' "$f" >&2 || true; }
    done
  fi
  if [ -n "${DRILL_KEEP:-}" ]; then echo "drill: kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

until_true() { # seconds what command...
  local n=$(($1 * 20)) what=$2; shift 2
  for _ in $(seq 1 "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "drill: timed out waiting for $what" >&2; exit 1
}
now_ms() { date +%s%3N; }

while :; do # five distinct ports (free_port draws at random)
  A=$(free_port); B=$(free_port)
  S=("$(free_port)" "$(free_port)" "$(free_port)")
  [ "$(printf '%s\n' "$A" "$B" "${S[@]}" | sort -u | wc -l)" -eq 5 ] && break
done
# rc PORT ARGS…: redis-cli as the admin (the default user), over TLS with --tls.
CLI_TLS=() NODE_TLS=() SENTINEL_TLS=""
if [ -n "$TLS" ]; then
  (
    cd "$work"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=p33-drill-ca
    openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1
    printf 'subjectAltName=IP:127.0.0.1\n' > san.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 2 -extfile san.ext
  ) > "$work/openssl.log" 2>&1
  for u in p33 p33-ops p33-read; do printf 'drill-%s\n' "$u" > "$work/$u.password"; done
  "$BIN/position-state-brain" acl --password-file "p33=$work/p33.password" \
    --password-file "p33-ops=$work/p33-ops.password" --password-file "p33-read=$work/p33-read.password" \
    > "$work/users.acl"
  CLI_TLS=(--tls --cacert "$work/ca.crt")
  NODE_TLS=(--port 0 --tls-cert-file "$work/server.crt" --tls-key-file "$work/server.key"
    --tls-ca-cert-file "$work/ca.crt" --tls-auth-clients no --tls-replication yes --aclfile "$work/users.acl")
  SENTINEL_TLS=$(printf 'port 0\ntls-cert-file %s\ntls-key-file %s\ntls-ca-cert-file %s\ntls-auth-clients no\ntls-replication yes\n' \
    "$work/server.crt" "$work/server.key" "$work/ca.crt")
fi
rc() { local port=$1; shift; redis-cli "${CLI_TLS[@]}" -p "$port" "$@"; }
node() { # port [more redis-server arguments]
  local port=$1; shift
  mkdir -p "$work/n$port"
  if [ -n "$TLS" ]; then
    redis-server --tls-port "$port" "${NODE_TLS[@]}" --bind 127.0.0.1 --save "" --appendonly yes \
      --dir "$work/n$port" --repl-diskless-sync-delay 0 "$@" > "$work/n$port.log" 2>&1 &
  else
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly yes --dir "$work/n$port" \
      --repl-diskless-sync-delay 0 "$@" \
      > "$work/n$port.log" 2>&1 &
  fi
}
node "$A"; NODE_A_PID=$!
node "$B" --replicaof 127.0.0.1 "$A"; pids+=($!)
until_true 10 "the master" rc "$A" PING
synced() { rc "$1" INFO replication | grep -q master_link_status:up; }
until_true 30 "the replica to sync" synced "$B"
for s in "${S[@]}"; do
  mkdir -p "$work/s$s"
  if [ -n "$TLS" ]; then
    printf '%s\ntls-port %s\n' "$SENTINEL_TLS" "$s" > "$work/s$s/sentinel.conf"
  else
    printf 'port %s\n' "$s" > "$work/s$s/sentinel.conf"
  fi
  printf 'bind 127.0.0.1\ndir %s\nsentinel monitor p33m 127.0.0.1 %s 2\nsentinel down-after-milliseconds p33m 1000\nsentinel failover-timeout p33m 10000\n' \
    "$work/s$s" "$A" >> "$work/s$s/sentinel.conf"
  redis-server "$work/s$s/sentinel.conf" --sentinel > "$work/s$s.log" 2>&1 &
  pids+=($!)
done
known() { # every sentinel knows the replica and the two others
  for s in "${S[@]}"; do
    [ "$(rc "$s" SENTINEL REPLICAS p33m | grep -c '^name$')" -ge 1 ] || return 1
    [ "$(rc "$s" SENTINEL SENTINELS p33m | grep -c '^name$')" -eq 2 ] || return 1
  done
}
until_true 30 "the sentinels to know each other and the replica" known
master_port() { rc "${S[0]}" SENTINEL GET-MASTER-ADDR-BY-NAME p33m 2>/dev/null | sed -n 2p; }
M() { rc "$(master_port)" "$@"; }

# Every sentinel's announcements, stamped with the time they arrived.
for s in "${S[@]}"; do
  rc "$s" PSUBSCRIBE '+switch-master' 2>/dev/null | while IFS= read -r line; do
    case "$line" in *p33m*) echo "$(now_ms) $line" >> "$work/events";; esac
  done &
  pids+=($!)
done

M HSET quantum:position:snapshot:BTCUSDT position_amt 1 side LONG ts_epoch "$(date +%s)" >/dev/null
M WAIT 1 2000 >/dev/null
METRICS_PORT=$(free_port)
LOG="$work/daemon.log"
SENTINELS="127.0.0.1:${S[0]},127.0.0.1:${S[1]},127.0.0.1:${S[2]}"
# The daemon's and ctl's Redis settings: over TLS as the ACL users with --tls.
redis_env() { # user
  echo "REDIS_SENTINELS=$SENTINELS" REDIS_SENTINEL_MASTER=p33m
  if [ -n "$TLS" ]; then
    echo REDIS_TLS=true "REDIS_TLS_CA_FILE=$work/ca.crt" "REDIS_USERNAME=$1" "REDIS_PASSWORD=drill-$1"
  fi
}
# shellcheck disable=SC2046 # one word per variable, none with a blank
env -i PATH="$PATH" $(redis_env p33) \
  P33_SNAPSHOT_SOURCE=external P33_ALLOWLIST_SOURCE=env P33_ALLOWLIST=BTCUSDT \
  P33_STALE_THRESHOLD_SEC=3600 P33_METRICS_ADDR=127.0.0.1 P33_METRICS_PORT="$METRICS_PORT" \
  P33_EXCHANGE_BASE_URL="http://127.0.0.1:$(free_port)" P33_CONSUMER_NAME=p33-drill P33_LOG_LEVEL="${P33_LOG_LEVEL:-INFO}" \
  "$BIN/position-state-brain" >> "$LOG" 2>&1 &
pids+=($!)
metric() { curl -fsS --max-time 2 "http://127.0.0.1:$METRICS_PORT/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }
readyz() { curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$METRICS_PORT/readyz" || true; }
is_ready() { [ "$(readyz)" = 200 ]; }
until_true 30 "the daemon to be ready" is_ready
echo "drill: master 127.0.0.1:$A, replica 127.0.0.1:$B, sentinels ${S[*]}, daemon /metrics on :$METRICS_PORT"

# The producer: a plan every 20 ms to the node the sentinels name.
(
  i=0
  while :; do
    p=$(master_port) || true
    if [ -n "$p" ] && rc "$p" XADD quantum:stream:apply.plan '*' plan_id "drill-$i" \
      symbol BTCUSDT decision EXECUTE action FULL_CLOSE_PROPOSED reduceOnly true 2>/dev/null | grep -q -- -; then
      echo "$i $p" >> "$work/produced"
    fi
    i=$((i + 1))
    sleep 0.02
  done
) &
pids+=($!)
sleep 2

permits_on() { rc "$1" --scan --pattern 'quantum:permit:p33:drill-*' | wc -l; }
pending_on() { rc "$1" XPENDING quantum:stream:apply.plan p33 | head -1; }
produced_on() { awk -v p="$1" '$2 == p' "$work/produced" | wc -l; }
# The first decision record the new master holds after `since` (ms): the
# record is written in the same script call as its permit.
first_record_after() { # port since-ms
  rc "$1" XRANGE quantum:stream:p33.decisions "$2" + COUNT 1 | head -1 | cut -d- -f1
}
switch_at() { # new-port after-ms: the first +switch-master naming it
  awk -v p="$1" -v t="$2" '$1 >= t && $0 ~ (" " p "$") { print $1; exit }' "$work/events" 2>/dev/null
}

drill() { # title new-master-port action...
  local title=$1 new=$2; shift 2
  local old; old=$(master_port)
  echo
  echo "== $title: 127.0.0.1:$old -> 127.0.0.1:$new"
  echo "  before: permits on the master $(permits_on "$old"), p33_redis_failovers_total $(metric p33_redis_failovers_total), /readyz $(readyz)"
  local t0 saw503=no
  t0=$(now_ms)
  "$@"
  # Watch /readyz until the sentinels announce the new master.
  for _ in $(seq 1 600); do
    [ "$(readyz)" = 503 ] && saw503=yes
    [ -n "$(switch_at "$new" "$t0")" ] && break
    sleep 0.05
  done
  local sw; sw=$(switch_at "$new" "$t0")
  [ -n "$sw" ] || { echo "drill: no +switch-master to $new" >&2; exit 1; }
  # A probe plan straight to the new master as soon as the sentinels name
  # it (the producer's own sentinel may hear later); when is it permitted?
  local probe="drill-probe-$sw"
  rc "$new" XADD quantum:stream:apply.plan '*' plan_id "$probe" symbol BTCUSDT \
    decision EXECUTE action FULL_CLOSE_PROPOSED reduceOnly true >/dev/null
  local permitted=""
  for _ in $(seq 1 3000); do
    [ "$(rc "$new" EXISTS "quantum:permit:p33:$probe")" = 1 ] && { permitted=$(now_ms); break; }
    sleep 0.01
  done
  [ -n "$permitted" ] || { echo "drill: no permit for $probe on the new master" >&2; exit 1; }
  has_record() { [ -n "$(first_record_after "$new" "$sw")" ]; }
  until_true 30 "a permit on the new master" has_record
  local first; first=$(first_record_after "$new" "$sw")
  local moved; moved=$(grep "master switched from 127.0.0.1:$old to 127.0.0.1:$new" "$LOG" | tail -1 | cut -d' ' -f1)
  moved=$(date -d "$moved" +%s%3N)
  # The promotion itself: the new master's own log line.
  local promoted; promoted=$(grep "MASTER MODE enabled" "$work/n$new.log" | tail -1 | cut -d' ' -f2-5)
  promoted=$(date -d "$promoted" +%s%3N)
  sleep 3
  drained() { [ "$(pending_on "$new")" = 0 ]; }
  until_true 30 "nothing pending on the new master" drained
  echo "  promoted $((promoted - t0)) ms after the fault, +switch-master $((sw - promoted)) ms later; /readyz 503 meanwhile: $saw503"
  echo "  recovery: first permit on the new master $((first - promoted)) ms after the promotion ($((first - sw)) ms after +switch-master; the daemon moved at $((moved - sw)) ms); a plan XADDed there at +switch-master was permitted $((permitted - sw)) ms after it"
  echo "  after:  permits on the new master $(permits_on "$new") (plans it took: $(produced_on "$new")), pending $(pending_on "$new"), p33_redis_failovers_total $(metric p33_redis_failovers_total), /readyz $(readyz)"
  echo "  log:    $(grep 'master switched' "$LOG" | tail -1 | sed 's/.*redis: //')"
  [ -n "$TLS" ] && ctl_checks "$new"
  return 0
}

# ctl over TLS as the ACL users, through the sentinels, on the new master:
# p33-ops reduces and resumes (FCALL of the library the data carried over),
# p33-read reads the state back.
ctl_checks() { # new-master-port
  local out
  # shellcheck disable=SC2046
  for verb in reduce resume; do
    out=$(env -i PATH="$PATH" USER=drill $(redis_env p33-ops) "$BIN/position-state-brain" ctl "$verb" \
      --reason "drill: $verb after the switch" 2>&1) || { echo "drill: ctl $verb as p33-ops failed: $out" >&2; exit 1; }
    case "$out" in *"plain commands"*) echo "drill: the new master had no function library: $out" >&2; exit 1;; esac
  done
  # shellcheck disable=SC2046
  out=$(env -i PATH="$PATH" $(redis_env p33-read) "$BIN/position-state-brain" ctl status 2>&1) ||
    { echo "drill: ctl status as p33-read failed: $out" >&2; exit 1; }
  echo "  ctl over TLS: p33-ops reduced and resumed on 127.0.0.1:$1; p33-read: $(echo "$out" | grep -m1 '^redis ' | tr -s ' '), $(echo "$out" | grep -m1 '^trading state ' | tr -s ' ')"
}

kill_a() { kill -KILL "$NODE_A_PID"; wait "$NODE_A_PID" 2>/dev/null || true; NODE_A_PID=; }
drill "1. SIGKILL the master" "$B" kill_a

echo
echo "== 2. the old master comes back (its own data, no replicaof): the sentinels make it a replica"
# With replica priority 0 until step 3 asks for it: on a loaded machine two
# sentinels can miss a master's PONGs for down-after-milliseconds (1 s) and
# fail over on their own, and this replica would win that failover.
node "$A" --replica-priority 0; NODE_A_PID=$!
is_replica() { rc "$1" ROLE | head -1 | grep -q slave; }
until_true 60 "127.0.0.1:$A to become a replica" is_replica "$A"
until_true 30 "the replica to sync" synced "$A"
# Every sentinel must have seen it report the replica role itself (they
# refresh a replica's INFO every 10 s); until then one of them may still
# "correct" it while another fails over to it.
settled() {
  for s in "${S[@]}"; do
    rc "$s" SENTINEL REPLICAS p33m | tr '\n' ' ' | grep -q "name 127.0.0.1:$A .*flags slave .*role-reported slave" || return 1
  done
}
until_true 60 "every sentinel to see it as a healthy replica" settled
echo "  127.0.0.1:$A is a replica of 127.0.0.1:$B; the daemon stays: p33_redis_failovers_total $(metric p33_redis_failovers_total)"

# The failover back is the drill's own: A may be promoted now, and B, once
# demoted, may not be promoted again by a failover nobody asked for.
rc "$A" CONFIG SET replica-priority 100 >/dev/null
rc "$B" CONFIG SET replica-priority 0 >/dev/null
# Refused (NOGOODSLAVE) until the sentinel has heard from the replica itself
# (its priority too: the sentinels read a replica's INFO every 10 s).
accepted() { [ "$(rc "${S[2]}" SENTINEL FAILOVER p33m)" = OK ]; }
graceful() { until_true 60 "SENTINEL FAILOVER to be accepted" accepted; }
drill "3. SENTINEL FAILOVER (planned)" "$A" graceful

echo
echo "drill done: stopping the daemon, the producer, the sentinels and both nodes"
