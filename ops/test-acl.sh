#!/usr/bin/env bash
# The integration tests of the plan, control, record, ledger, limits, hostile,
# exchange, stream, allowlist and HA areas once more, with every Redis server
# loaded with deploy/redis/users.acl and the daemon logged in as the ACL user
# p33 (P33_IT_ACL=1, SPEC §17): least privilege, proven by the same tests.
set -euo pipefail
cd "$(dirname "$0")/.."
. ops/lib.sh
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
install_missing ops/test-acl.sh "${need[@]}"
export P33_IT_ACL=1
areas=(plans control record limits verdict hostile exchange stream allowlist ha security survive)
if cargo nextest --version >/dev/null 2>&1; then
  filter=$(printf 'test(/^%s::/) | ' "${areas[@]}")
  cargo nextest run --test it --no-fail-fast -E "${filter% | }" "$@"
else
  cargo test --test it --no-fail-fast "$@" -- "${areas[@]/%/::}"
fi
