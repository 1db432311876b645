#!/usr/bin/env bash
# What the ACL costs on the plan path (SPEC §17): `p33-bench --plans N`
# without and with `--acl` (the daemon as ACL user p33), ABBA, --rounds
# times; with --compare DIR, another build's release directory (its
# p33-bench and position-state-brain) runs its own ABBA after ours in each
# round, so two builds' ACLs are compared in the same session. Prints every
# run, then each build's means, the ratio of the means and each round's.
#   ops/bench-acl.sh [--plans 200000] [--rounds 4] [--compare /path/to/target/release]
set -euo pipefail
cd "$(dirname "$0")/.."
. ops/lib.sh
plans=200000 rounds=4 compare=
while [ $# -gt 0 ]; do
  case "$1" in
    --plans) plans=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --compare) compare=$2; shift 2 ;;
    *) echo "usage: ops/bench-acl.sh [--plans N] [--rounds N] [--compare DIR]" >&2; exit 64 ;;
  esac
done
cargo build --release --bins >&2
builds=("this=$(release_bins)")
[ -n "$compare" ] && builds+=("compared=$compare")
for b in "${builds[@]}"; do
  [ -x "${b#*=}/p33-bench" ] || { echo "ops/bench-acl.sh: no p33-bench in ${b#*=}" >&2; exit 64; }
done
one() { # build-dir [--acl]
  "$1/p33-bench" --plans "$plans" "${@:2}" 2>/dev/null | grep -o '"throughput_per_s":[0-9.]*' | cut -d: -f2
}
results=$(mktemp)
trap 'rm -f "$results"' EXIT
for r in $(seq 1 "$rounds"); do
  for b in "${builds[@]}"; do
    name=${b%%=*} dir=${b#*=}
    for acl in "" --acl --acl ""; do
      v=$(one "$dir" $acl)
      [ -n "$v" ] || { echo "ops/bench-acl.sh: $name ${acl:-no acl} gave no figure" >&2; exit 1; }
      echo "round $r $name ${acl:---no-acl} $v" | tee -a "$results"
    done
  done
done
awk '{ k = $3 " " $4; sum[k] += $5; n[k]++; rs[$2 " " k] += $5 }
  END {
    for (k in sum) if (k ~ / --acl$/) {
      b = k; sub(/ --acl$/, "", b); off = b " --no-acl"
      per = ""
      for (r = 1; rs[r " " k] > 0; r++) per = per sprintf(" %.3f", rs[r " " k] / rs[r " " off])
      printf "%s: %.0f plans/s with the ACL, %.0f without: %.3f of the means; rounds:%s\n",
        b, sum[k] / n[k], sum[off] / n[off], (sum[k] / n[k]) / (sum[off] / n[off]), per
    }
  }' "$results"
