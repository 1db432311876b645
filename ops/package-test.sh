#!/usr/bin/env bash
# The Debian package, proven on this machine (SPEC §18; as root): build it,
# lintian on both packages (no error or warning but the overridden ones), a
# stripped binary and its -dbgsym package, md5sums dpkg --verify checks;
# installed over a foreign env file (the Python daemon's) without a prompt,
# moving it aside; every file and mode, man -l
# renders each gzipped page, the completions complete at every level (bash
# through compgen, zsh and fish), the shipped proof script, drill, scrape
# config and rules (promtool) work from their installed paths, the installed
# README names installed paths, --check-config is quiet on the shipped env
# file and finds /etc/credstore; the migration leaves no secret in the
# daemon's environment; an edited env file survives an upgrade to a build
# with a higher version whose --version changed; the rollback after
# dpkg -r (the unit masked) installs the old unit for real; dpkg -P leaves
# nothing behind. systemd need not be PID 1: the upgrade's restart is run
# against a systemctl that answers as systemd would, with a restart that
# never ends (dpkg must return after the bounded wait) and with policy-rc.d
# saying 101 (no restart at all).
set -euo pipefail
cd "$(dirname "$0")/.."
. ops/lib.sh
[ "$(id -u)" -eq 0 ] || { echo "ops/package-test.sh: run as root (dpkg -i)" >&2; exit 1; }
need=()
command -v man >/dev/null 2>&1 || need+=(man-db)
command -v groff >/dev/null 2>&1 || need+=(groff-base)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v deb-systemd-helper >/dev/null 2>&1 || need+=(init-system-helpers)
command -v lintian >/dev/null 2>&1 || need+=(lintian)
command -v zsh >/dev/null 2>&1 || need+=(zsh)
command -v fish >/dev/null 2>&1 || need+=(fish)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
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

echo "== lintian"
# Every finding but the overridden ones (deploy/deb/lintian-overrides, each
# with its reason) fails; the info-level ones are printed.
ddeb="${deb1%/*}/$PKG-dbgsym_${deb1##*/${PKG}_}"
ddeb="${ddeb%.deb}.ddeb"
[ -f "$ddeb" ] || fail "no -dbgsym package ($ddeb)"
lint=$(lintian --info "$deb1" "$ddeb" 2>&1 | grep -v 'running with root privileges' || true)
echo "${lint:-  (nothing)}"
echo "$lint" | grep -E '^[EW]: ' && fail "lintian reports the findings above"
dpkg-deb -f "$ddeb" Depends | grep -qx "$PKG (= $(dpkg-deb -f "$deb1" Version))" || fail "$ddeb does not depend on its package's version"
dpkg-deb -I "$deb1" md5sums >/dev/null 2>&1 || fail "$deb1 has no md5sums"
dpkg-deb -c "$ddeb" | grep '/usr/lib/debug/.build-id/.*\.debug$' >/dev/null || fail "$ddeb holds no .debug file"
echo "  $(du -h "$deb1" | cut -f1) package, symbols in $(basename "$ddeb") ($(du -h "$ddeb" | cut -f1))"

echo "== a first install over a foreign env file (the Python daemon's)"
mkdir -p /etc/quantum
printf 'P33_PYTHON_SETTING=kept\nREDIS_HOST=python-host\n' > "$ENV"
# No prompt: stdin is closed, so a conffile question would fail the install.
DEBIAN_FRONTEND=noninteractive dpkg -i "$deb1" </dev/null
aside=$(ls "$ENV".pre-package.* 2>/dev/null | head -n 1)
[ -n "$aside" ] || fail "the foreign $ENV was not moved aside"
grep -q '^P33_PYTHON_SETTING=kept$' "$aside" || fail "$aside lost the foreign content"
grep -q '^P33_METRICS_ADDR=127.0.0.1$' "$ENV" || fail "$ENV is not the package's"
[ "$(dpkg-query -W -f='${Status}' "$PKG")" = "install ok installed" ] || fail "not configured"
echo "  moved aside to $aside; $ENV is the package's"

echo "== dpkg --verify checks what is installed"
out=$(dpkg --verify "$PKG" 2>&1) || true
[ -z "$out" ] || fail "dpkg --verify on a fresh install: $out"
readme=/usr/share/doc/position-state-brain/README.md
cp -p "$readme" /tmp/p33-readme.$$
echo tampered >> "$readme"
dpkg --verify "$PKG" | grep "^??5?????? *$readme$" >/dev/null || fail "dpkg --verify did not see a changed $readme"
cp -p /tmp/p33-readme.$$ "$readme"; rm -f /tmp/p33-readme.$$
echo "  clean after the install; a changed file is reported"
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
check /usr/share/doc/position-state-brain/changelog.Debian.gz 644
check /usr/share/doc/position-state-brain/changelog.gz 644
check /usr/share/position-state-brain/proof_p33_universe.sh 755
check /usr/share/position-state-brain/failover-drill.sh 755
check /usr/share/position-state-brain/lib.sh 644
check /usr/share/position-state-brain/prometheus/position-state-brain-rules.yml 644
check /usr/share/position-state-brain/prometheus/position-state-brain-rules.test.yml 644
check /usr/share/position-state-brain/prometheus/scrape.yml 644
check /usr/share/position-state-brain/grafana/position-state-brain.json 644
readelf -S --wide /usr/bin/position-state-brain | grep -q ' \.debug_info ' && fail "the binary is not stripped"
check /usr/share/bash-completion/completions/position-state-brain 644
check /usr/share/zsh/vendor-completions/_position-state-brain 644
check /usr/share/fish/vendor_completions.d/position-state-brain.fish 644
grep -q '^/etc/quantum/position-state-brain.env$' "/var/lib/dpkg/info/$PKG.conffiles" || fail "the env file is no conffile"
grep -q '^ExecStart=/usr/bin/position-state-brain$' /lib/systemd/system/quantum-position-state-brain.service \
  || fail "the unit does not run /usr/bin/position-state-brain"
[ -L /etc/systemd/system/multi-user.target.wants/quantum-position-state-brain.service ] \
  || fail "the unit is not enabled after the first install"

# The maintainer scripts act through deb-systemd-invoke (policy-rc.d), and
# the upgrade's restart waits a bounded time (lintian above: no bare
# systemctl but daemon-reload).
grep -q 'timeout "$RESTART_WAIT" deb-systemd-invoke restart' "/var/lib/dpkg/info/$PKG.postinst" \
  || fail "postinst does not restart through deb-systemd-invoke with a bounded wait"
grep -q 'deb-systemd-invoke stop' "/var/lib/dpkg/info/$PKG.prerm" || fail "prerm does not stop through deb-systemd-invoke"

echo "== man pages"
pages=(/usr/share/man/man8/position-state-brain*.8.gz)
[ "${#pages[@]}" -ge 5 ] || fail "only ${#pages[@]} gzipped man pages"
ls /usr/share/man/man8/position-state-brain*.8 2>/dev/null && fail "a man page is not gzipped"
for p in "${pages[@]}"; do
  check "$p" 644
  out=$(man -l "$p" 2>&1 >/dev/null) || fail "man -l $p failed: $out"
  [ -z "$out" ] || fail "man -l $p warns: $out"
  echo "  $p: $(man -l "$p" 2>/dev/null | sed -n 4p | sed 's/^ *//')"
done
man -l /usr/share/man/man8/position-state-brain.8* | grep 'REDIS_TLS_CA_FILE' >/dev/null || fail "the main page lists no environment"

echo "== completion, units, version"
bash -n /usr/share/bash-completion/completions/position-state-brain
bash -c '. /usr/share/bash-completion/completions/position-state-brain && complete -p position-state-brain' \
  || fail "the bash completion registers nothing"
# compgen at every level, through the function it registers.
complete_bash() { # words... (the last one is being completed)
  bash -c '. /usr/share/bash-completion/completions/position-state-brain
    f=$(complete -p position-state-brain | sed -n "s/.*-F \([^ ]*\).*/\1/p")
    COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
    "$f" position-state-brain "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
    printf "%s\n" "${COMPREPLY[@]}"' bash "$@"
}
expect_words() { # what got want...
  local what=$1 got=$2; shift 2
  for w in "$@"; do printf '%s\n' "$got" | grep -qx -- "$w" || fail "$what: no $w in: $(echo $got)"; done
}
expect_words "bash: position-state-brain <TAB>" "$(complete_bash position-state-brain '')" ctl explain replay acl
expect_words "bash: ctl <TAB>" "$(complete_bash position-state-brain ctl '')" status halt reduce resume
expect_words "bash: ctl halt --<TAB>" "$(complete_bash position-state-brain ctl halt --)" --symbol --reason
expect_words "bash: replay --<TAB>" "$(complete_bash position-state-brain replay --)" --last --set
expect_words "bash: acl --<TAB>" "$(complete_bash position-state-brain acl --)" --pipeline --password-file
# fish asks its own completion machinery; zsh loads and registers the function.
expect_words "fish: ctl <TAB>" "$(fish -c 'complete -C "position-state-brain ctl "' | cut -f1)" status halt reduce resume
expect_words "fish: ctl halt --<TAB>" "$(fish -c 'complete -C "position-state-brain ctl halt --"' | cut -f1)" --symbol --reason
zsh -n /usr/share/zsh/vendor-completions/_position-state-brain || fail "zsh cannot parse the completion"
zsh -c 'autoload -Uz compinit && compinit -u -d /tmp/p33-zcompdump.$$ && (( $+_comps[position-state-brain] ))' \
  || fail "zsh registers no completion for position-state-brain"
grep -q "'halt:" /usr/share/zsh/vendor-completions/_position-state-brain || fail "zsh: no ctl halt"
echo "  bash (compgen at 5 levels), fish (complete -C) and zsh (compinit) complete it"
systemd-analyze verify /lib/systemd/system/quantum-position-state-brain.service \
  "/lib/systemd/system/quantum-position-state-brain@.service" 2>&1 | grep -v 'redis-server.service' | grep . \
  && fail "systemd-analyze verify complains" || true
v1=$(dpkg-query -W -f='${Version}' "$PKG")
b1=$(/usr/bin/position-state-brain --version)
case "$v1" in "$(echo "$b1" | awk '{print $2}')"*) ;; *) fail "--version '$b1' is not the package's $v1";; esac
echo "  package $v1, binary: $b1"

echo "== what the README points at, installed"
readme=/usr/share/doc/position-state-brain/README.md
grep -n -E 'ops/(proof_p33_universe|failover-drill)\.sh|deploy/|[^/]docs/[a-z]+\.md' "$readme" | grep -v '^[0-9]*:`install -' \
  && fail "the installed README names source paths (above)"
grep -q '/usr/share/position-state-brain/proof_p33_universe.sh' "$readme" || fail "the README does not name the installed proof script"
if command -v promtool >/dev/null 2>&1; then
  (cd /usr/share/position-state-brain/prometheus && promtool test rules position-state-brain-rules.test.yml >/dev/null) \
    || fail "promtool test rules failed on the installed rules"
  promtool check config /usr/share/position-state-brain/prometheus/scrape.yml >/dev/null \
    || fail "promtool check config failed on the installed scrape config"
  echo "  promtool: the installed rules' tests pass, the scrape config checks"
fi
bash /usr/share/position-state-brain/failover-drill.sh --bogus >/dev/null 2>&1 && fail "the drill took --bogus"
[ "$(bash /usr/share/position-state-brain/failover-drill.sh --bogus >/dev/null 2>&1; echo $?)" = 64 ] \
  || fail "the installed drill cannot find its lib.sh"
/usr/share/position-state-brain/failover-drill.sh > /tmp/p33-pkg-drill.log 2>&1 || { tail -20 /tmp/p33-pkg-drill.log; fail "the installed drill failed"; }
grep -q 'drill done' /tmp/p33-pkg-drill.log || fail "the installed drill did not finish"
echo "  the installed failover drill ran against /usr/bin/position-state-brain"
out=$(set -a; . "$ENV"; set +a; P33_SNAPSHOT_SOURCE=external /usr/bin/position-state-brain --check-config 2>&1) \
  || fail "--check-config on the shipped env file: $out"
echo "$out" | grep -q '^WARN' && fail "--check-config warns on the shipped env file: $(echo "$out" | grep '^WARN')"
mkdir -p /etc/credstore
made_credstore=
[ -e /etc/credstore/position-state-brain.redis_password ] || made_credstore=1
[ -n "$made_credstore" ] && printf 'pkgtest-pw\n' > /etc/credstore/position-state-brain.redis_password
out=$(env -i PATH="$PATH" P33_SNAPSHOT_SOURCE=external /usr/bin/position-state-brain --check-config 2>&1) || fail "$out"
[ -n "$made_credstore" ] && rm -f /etc/credstore/position-state-brain.redis_password
echo "$out" | grep -q 'REDIS_PASSWORD=\[redacted\] (from /etc/credstore/position-state-brain.redis_password, as the unit loads it)' \
  || fail "--check-config did not find /etc/credstore: $out"
echo "$out" | grep -q pkgtest-pw && fail "--check-config printed the password"
echo "  --check-config: no warning on the shipped env file; it reads /etc/credstore from a root shell"

echo "== the migration leaves no secret in the daemon's environment"
# The Python host: the apply layer's env file holds the Binance key and
# secret. The migration (docs/migration.md, "Secrets") puts them in
# /etc/credstore and the unit loads only its own env file; the daemon is
# started the way the unit starts it (its EnvironmentFile= lines, its
# credentials in a directory of their own), and /proc/<pid>/environ is read.
printf 'BINANCE_TESTNET_API_KEY=pkgtest-key-1234\nBINANCE_TESTNET_API_SECRET=pkgtest-secret-5678\n' > /etc/quantum/apply-layer.env
creds=$(mktemp -d)
for n in binance_api_key binance_api_secret; do
  v=$(sed -n "s/^BINANCE_TESTNET_API_${n#binance_api_}=//Ip" /etc/quantum/apply-layer.env | head -n 1)
  printf '%s\n' "$v" > "$creds/$n"
done
chmod 0600 "$creds"/*
rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save "" --daemonize yes --pidfile "$creds/redis.pid" >/dev/null
envfiles=$(sed -n 's/^EnvironmentFile=-\{0,1\}//p' /lib/systemd/system/quantum-position-state-brain.service)
[ "$envfiles" = "$ENV" ] || fail "the unit loads more than its own env file: $envfiles"
unit_env=$(set -a; . "$ENV"; set +a; env | grep -E '^(P33_|REDIS_|BINANCE_|RUST_)' || true)
# shellcheck disable=SC2086 # one word per variable (the shipped file has no blanks in values)
env -i PATH="$PATH" $unit_env REDIS_PORT="$rport" P33_METRICS_PORT="$(free_port)" P33_SNAPSHOT_SOURCE=binance \
  P33_EXCHANGE_BASE_URL="http://127.0.0.1:$(free_port)" CREDENTIALS_DIRECTORY="$creds" \
  /usr/bin/position-state-brain > "$creds/daemon.log" 2>&1 &
dpid=$!
for _ in $(seq 1 50); do grep -q 'metrics listening' "$creds/daemon.log" 2>/dev/null && break; sleep 0.1; done
kill -0 "$dpid" 2>/dev/null || { cat "$creds/daemon.log"; fail "the daemon did not start"; }
tr '\0' '\n' < "/proc/$dpid/environ" | grep -E 'pkgtest-(key|secret)' && fail "a secret in /proc/$dpid/environ"
grep -q 'BINANCE' "/proc/$dpid/environ" && fail "a BINANCE_ variable in the daemon's environment"
kill "$dpid"; wait "$dpid" 2>/dev/null || true
redis-cli -p "$rport" shutdown nosave >/dev/null 2>&1 || true
rm -rf "$creds" /etc/quantum/apply-layer.env
echo "  /proc/<pid>/environ holds neither the key nor the secret; the daemon read them as credentials"

echo "== an edited env file survives an upgrade"
sed -i 's/^P33_POLL_SEC=5$/P33_POLL_SEC=4/' "$ENV"
grep -q '^P33_POLL_SEC=4$' "$ENV" || fail "could not edit $ENV"
src=$(mktemp -d)
# systemd is not PID 1 here, so the maintainer scripts' systemd branches
# are run against a systemctl that answers as systemd would for one running
# gate whose restart never ends (a Type=notify start waiting for Redis), with
# /run/systemd/system present and policy-rc.d set per case; all three are
# put back on exit.
fake=$(mktemp -d)
made_run=
policy=/usr/sbin/policy-rc.d
[ -e "$policy" ] && cp -p "$policy" "$fake/policy-rc.d.orig"
restore_host() { # policy-rc.d and /run/systemd/system as they were
  if [ -e "$fake/policy-rc.d.orig" ]; then cp -p "$fake/policy-rc.d.orig" "$policy"; else rm -f "$policy"; fi
  if [ -n "$made_run" ]; then rmdir /run/systemd/system 2>/dev/null || true; made_run=; fi
}
cleanup() { restore_host; rm -rf "$src" "$fake"; }
trap cleanup EXIT
trap 'exit 1' INT TERM
cat > "$fake/systemctl" <<EOF
#!/bin/sh
echo "\$*" >> "$fake/calls"
case " \$* " in
  *" list-units "*) echo "quantum-position-state-brain.service loaded active running P3.3 Position State Brain" ;;
  *" is-enabled "*) echo enabled ;;
  *" restart "*) exec sleep 317 ;;
esac
exit 0
EOF
chmod 755 "$fake/systemctl"
policy_rc() { printf '#!/bin/sh\nexit %s\n' "$1" > "$policy"; chmod 755 "$policy"; }
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents {} "$src"/
next="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)+pkgtest2"
sed -i "0,/^version = \".*\"/s//version = \"$next\"/" "$src/Cargo.toml"
deb2=$(CARGO_TARGET_DIR="$(dirname "$(release_bins)")" "$src/ops/package.sh")
[ -f "$deb2" ] && [ "$deb2" != "$deb1" ] || fail "no second package ($deb2)"
echo "== the upgrade restarts a running gate through deb-systemd-invoke, and never waits longer than 20 s"
[ -d /run/systemd/system ] || { mkdir -p /run/systemd/system; made_run=1; }
policy_rc 0
t0=$(date +%s)
out=$(PATH="$fake:$PATH" DEBIAN_FRONTEND=noninteractive dpkg -i "$deb2" </dev/null 2>&1) || fail "the upgrade failed: $out"
took=$(( $(date +%s) - t0 ))
echo "$out" | grep -q 'quantum-position-state-brain.service is still starting after 20 s' \
  || fail "the upgrade did not say the restart goes on in the background: $out"
grep -qx -- '--quiet --system restart quantum-position-state-brain.service' "$fake/calls" \
  || fail "postinst did not restart the running gate through deb-systemd-invoke: $(cat "$fake/calls")"
[ "$took" -ge 20 ] && [ "$took" -lt 60 ] || fail "the upgrade took $took s with a restart that never ends (want 20-60 s)"
sleep 0.5
pgrep -fx 'sleep 317' >/dev/null && fail "the hanging restart's systemctl outlived the bounded wait"
echo "  dpkg -i returned after $took s; the restart was left to systemd"
echo "== policy-rc.d 101 (an image build, a chroot) suppresses the upgrade's restart"
: > "$fake/calls"
policy_rc 101
t0=$(date +%s)
out=$(PATH="$fake:$PATH" DEBIAN_FRONTEND=noninteractive dpkg -i "$deb2" </dev/null 2>&1) || fail "the reinstall failed: $out"
took=$(( $(date +%s) - t0 ))
grep -q ' restart ' "$fake/calls" && fail "a restart ran although policy-rc.d said 101: $(cat "$fake/calls")"
grep -q 'daemon-reload' "$fake/calls" || fail "the reinstall did not run postinst's systemd branch: $(cat "$fake/calls")"
[ "$took" -lt 20 ] || fail "the reinstall took $took s with no restart to wait for"
echo "  no restart; dpkg -i returned after $took s"
restore_host
grep -q '^P33_POLL_SEC=4$' "$ENV" || fail "the upgrade lost the edit of $ENV"
[ "$(stat -c %a "$ENV")" = 640 ] || fail "$ENV mode changed"
v2=$(dpkg-query -W -f='${Version}' "$PKG")
b2=$(/usr/bin/position-state-brain --version)
[ "$b2" != "$b1" ] || fail "--version did not change: $b2"
dpkg --compare-versions "$v2" gt "$v1" || fail "$v2 is not above $v1"
echo "  upgraded $v1 -> $v2; binary: $b2; $ENV kept P33_POLL_SEC=4"

echo "== remove, roll back to the Python unit, then purge"
files=$(dpkg -L "$PKG" | while read -r f; do [ -f "$f" ] && echo "$f"; done)
dpkg -r "$PKG"
[ ! -e /usr/bin/position-state-brain ] || fail "remove left the binary"
[ -e "$ENV" ] || fail "remove took the conffile (only purge may)"
UNIT_PATH=/etc/systemd/system/quantum-position-state-brain.service
# dpkg -r masks the unit: the rollback of docs/migration.md unmasks first,
# or the cp below would write the old unit into /dev/null and succeed.
[ "$(readlink "$UNIT_PATH" 2>/dev/null)" = /dev/null ] || fail "remove did not mask the unit"
systemctl unmask quantum-position-state-brain.service >/dev/null
printf '[Service]\nExecStart=/usr/bin/python3 main.py\n' > /tmp/p33-python.service
cp /tmp/p33-python.service "$UNIT_PATH"
[ -f "$UNIT_PATH" ] && [ ! -L "$UNIT_PATH" ] && grep -q python3 "$UNIT_PATH" \
  || fail "the rollback's unit did not land in $UNIT_PATH"
rm -f "$UNIT_PATH" /tmp/p33-python.service
echo "  the masked unit was unmasked and the old unit installed"
dpkg -P "$PKG"
left=""
for f in $files; do [ -e "$f" ] && left="$left $f"; done
[ -z "$left" ] || fail "purge left:$left"
[ ! -e "$ENV" ] || fail "purge left $ENV"
[ ! -e /etc/systemd/system/multi-user.target.wants/quantum-position-state-brain.service ] \
  || fail "purge left the unit enabled"
dpkg -s "$PKG" >/dev/null 2>&1 && fail "dpkg still knows $PKG"
[ -e "$aside" ] || fail "purge deleted the foreign env file moved aside ($aside)"
rm -f "$aside"
echo "== package proof passed: $deb1 -> $deb2"
