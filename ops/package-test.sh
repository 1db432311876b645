#!/usr/bin/env bash
# The Debian package, proven on this machine (SPEC §18; as root): build it,
# dpkg -i, every file and mode, man -l renders each page, bash -n on the
# completion, systemd-analyze verify on the installed units; an edited env
# file survives an upgrade to a build with a higher version whose --version
# changed; dpkg -r then dpkg -P leave nothing behind. systemd need not be
# PID 1: starting, restarting and stopping the unit are left to the
# maintainer scripts' guards (they act only where systemd runs).
set -euo pipefail
cd "$(dirname "$0")/.."
. ops/lib.sh
[ "$(id -u)" -eq 0 ] || { echo "ops/package-test.sh: run as root (dpkg -i)" >&2; exit 1; }
need=()
command -v man >/dev/null 2>&1 || need+=(man-db)
command -v groff >/dev/null 2>&1 || need+=(groff-base)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v deb-systemd-helper >/dev/null 2>&1 || need+=(init-system-helpers)
install_missing ops/package-test.sh "${need[@]}"
fail() { echo "ops/package-test.sh: FAIL: $*" >&2; exit 1; }
PKG=position-state-brain
ENV=/etc/quantum/position-state-brain.env

# Nothing of ours may be installed already.
if dpkg -s "$PKG" >/dev/null 2>&1; then dpkg -P "$PKG" >/dev/null; fi

deb1=$(ops/package.sh)
[ -f "$deb1" ] || fail "no package built ($deb1)"
echo "== built $deb1"
dpkg-deb -c "$deb1" | awk '{print $1, $6}'
dpkg -i "$deb1"

echo "== files and modes"
check() { # path mode
  [ -e "$1" ] || fail "$1 missing"
  [ "$(stat -c %a "$1")" = "$2" ] || fail "$1 has mode $(stat -c %a "$1"), not $2"
  [ "$(stat -c %U:%G "$1")" = root:root ] || fail "$1 not root:root"
}
check /usr/bin/position-state-brain 755
check /lib/systemd/system/quantum-position-state-brain.service 644
check "/lib/systemd/system/quantum-position-state-brain@.service" 644
check "$ENV" 640
CTLENV=/etc/quantum/position-state-brain-ctl.env
[ "$(stat -c %a:%U:%G "$CTLENV")" = 640:root:p33-ops ] || fail "$CTLENV is $(stat -c %a:%U:%G "$CTLENV"), not 640:root:p33-ops"
getent group p33-ops >/dev/null || fail "no group p33-ops"
grep -q '^/etc/quantum/position-state-brain-ctl.env$' "/var/lib/dpkg/info/$PKG.conffiles" || fail "the ctl env file is no conffile"
check /usr/share/doc/position-state-brain/users.acl 644
check /usr/share/doc/position-state-brain/README.md 644
check /usr/share/bash-completion/completions/position-state-brain 644
check /usr/share/zsh/vendor-completions/_position-state-brain 644
check /usr/share/fish/vendor_completions.d/position-state-brain.fish 644
grep -q '^/etc/quantum/position-state-brain.env$' "/var/lib/dpkg/info/$PKG.conffiles" || fail "the env file is no conffile"
grep -q '^ExecStart=/usr/bin/position-state-brain$' /lib/systemd/system/quantum-position-state-brain.service \
  || fail "the unit does not run /usr/bin/position-state-brain"
[ -L /etc/systemd/system/multi-user.target.wants/quantum-position-state-brain.service ] \
  || fail "the unit is not enabled after the first install"

echo "== man pages"
pages=(/usr/share/man/man8/position-state-brain*.8*)
[ "${#pages[@]}" -ge 4 ] || fail "only ${#pages[@]} man pages"
for p in "${pages[@]}"; do
  check "$p" 644
  out=$(man -l "$p" 2>&1 >/dev/null) || fail "man -l $p failed: $out"
  [ -z "$out" ] || fail "man -l $p warns: $out"
  echo "  $p: $(man -l "$p" 2>/dev/null | sed -n 4p | sed 's/^ *//')"
done
man -l /usr/share/man/man8/position-state-brain.8* | grep -q 'REDIS_TLS_CA_FILE' || fail "the main page lists no environment"

echo "== completion, units, version"
bash -n /usr/share/bash-completion/completions/position-state-brain
bash -c '. /usr/share/bash-completion/completions/position-state-brain && complete -p position-state-brain' \
  || fail "the bash completion registers nothing"
systemd-analyze verify /lib/systemd/system/quantum-position-state-brain.service \
  "/lib/systemd/system/quantum-position-state-brain@.service" 2>&1 | grep -v 'redis-server.service' | grep . \
  && fail "systemd-analyze verify complains" || true
v1=$(dpkg-query -W -f='${Version}' "$PKG")
b1=$(/usr/bin/position-state-brain --version)
case "$v1" in "$(echo "$b1" | awk '{print $2}')"*) ;; *) fail "--version '$b1' is not the package's $v1";; esac
echo "  package $v1, binary: $b1"

echo "== an edited env file survives an upgrade"
sed -i 's/^P33_POLL_SEC=5$/P33_POLL_SEC=4/' "$ENV"
grep -q '^P33_POLL_SEC=4$' "$ENV" || fail "could not edit $ENV"
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents {} "$src"/
next="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)+pkgtest2"
sed -i "0,/^version = \".*\"/s//version = \"$next\"/" "$src/Cargo.toml"
deb2=$(CARGO_TARGET_DIR="$(dirname "$(release_bins)")" "$src/ops/package.sh")
[ -f "$deb2" ] && [ "$deb2" != "$deb1" ] || fail "no second package ($deb2)"
dpkg -i "$deb2"
grep -q '^P33_POLL_SEC=4$' "$ENV" || fail "the upgrade lost the edit of $ENV"
[ "$(stat -c %a "$ENV")" = 640 ] || fail "$ENV mode changed"
v2=$(dpkg-query -W -f='${Version}' "$PKG")
b2=$(/usr/bin/position-state-brain --version)
[ "$b2" != "$b1" ] || fail "--version did not change: $b2"
dpkg --compare-versions "$v2" gt "$v1" || fail "$v2 is not above $v1"
echo "  upgraded $v1 -> $v2; binary: $b2; $ENV kept P33_POLL_SEC=4"

echo "== remove, then purge"
files=$(dpkg -L "$PKG" | while read -r f; do [ -f "$f" ] && echo "$f"; done)
dpkg -r "$PKG"
[ ! -e /usr/bin/position-state-brain ] || fail "remove left the binary"
[ -e "$ENV" ] || fail "remove took the conffile (only purge may)"
dpkg -P "$PKG"
left=""
for f in $files; do [ -e "$f" ] && left="$left $f"; done
[ -z "$left" ] || fail "purge left:$left"
[ ! -e "$ENV" ] || fail "purge left $ENV"
[ ! -e /etc/systemd/system/multi-user.target.wants/quantum-position-state-brain.service ] \
  || fail "purge left the unit enabled"
dpkg -s "$PKG" >/dev/null 2>&1 && fail "dpkg still knows $PKG"
echo "== package proof passed: $deb1 -> $deb2"
