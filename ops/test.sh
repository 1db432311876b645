#!/usr/bin/env bash
# Runs the whole test suite. Installs what the tests need when it is missing:
# redis-server (the integration tests start private instances on loopback
# ports) and promtool (checks the /metrics exposition and the alert rules).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
if [ ${#need[@]} -gt 0 ]; then
  echo "ops/test.sh: installing ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  # The system's own PATH for apt: its maintainer scripts are not ours.
  sys_path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  $SUDO env PATH="$sys_path" apt-get update -qq
  $SUDO env PATH="$sys_path" DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Property tests (tests/props.rs): a few thousand arbitrary inputs per parser.
export PROPTEST_CASES="${PROPTEST_CASES:-3000}"

if cargo nextest --version >/dev/null 2>&1; then
  # (The crate has no doctests, which nextest would not run.)
  cargo nextest run --workspace --all-targets --no-fail-fast "$@"
else
  cargo test --workspace --all-targets --no-fail-fast "$@"
fi
