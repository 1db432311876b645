#!/usr/bin/env bash
# Runs the whole test suite. Installs what the tests need when it is missing:
# redis-server (the integration tests start private instances on loopback
# ports), promtool (checks the /metrics exposition and the alert rules) and
# openssl (makes the TLS tests' certificates).
set -euo pipefail
cd "$(dirname "$0")/.."
. ops/lib.sh

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
install_missing ops/test.sh "${need[@]}"

# Property tests (tests/props.rs): a few thousand arbitrary inputs per parser.
export PROPTEST_CASES="${PROPTEST_CASES:-3000}"

if cargo nextest --version >/dev/null 2>&1; then
  # (The crate has no doctests, which nextest would not run.)
  cargo nextest run --workspace --all-targets --no-fail-fast "$@"
else
  cargo test --workspace --all-targets --no-fail-fast "$@"
fi
