# Shared by the ops scripts (sourced): install missing Debian packages, and
# find a free loopback port. Needs nothing but bash.

# install_missing WHO PACKAGE...: apt-get installs the packages (none: nothing).
install_missing() {
  local who=$1; shift
  [ $# -gt 0 ] || return 0
  echo "$who: installing $*"
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  # The system's own PATH for apt: its maintainer scripts are not ours.
  local sys_path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  $sudo env PATH="$sys_path" apt-get update -qq
  $sudo env PATH="$sys_path" DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# need_redis_and_curl WHO: redis-server, redis-cli and curl, installed when missing.
need_redis_and_curl() {
  local need=()
  { command -v redis-server && command -v redis-cli; } >/dev/null 2>&1 || need+=(redis-server)
  command -v curl >/dev/null 2>&1 || need+=(curl)
  install_missing "$1" "${need[@]}"
}

# free_port: a loopback port nothing listens on (bash's /dev/tcp, no python),
# below the kernel's ephemeral range so no outgoing connection holds it.
free_port() {
  local p
  for _ in $(seq 1 100); do
    p=$((20000 + RANDOM % 12000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return 0; fi
  done
  echo "no free port found" >&2; exit 1
}

# release_bins: the directory cargo builds release binaries into, as cargo
# itself reports it (CARGO_TARGET_DIR and .cargo/config included).
release_bins() {
  local dir
  dir=$(cargo metadata --format-version 1 --no-deps 2>/dev/null \
    | grep -o '"target_directory":"[^"]*"' | head -n 1 | cut -d'"' -f4)
  [ -n "$dir" ] || { echo "cargo metadata named no target directory" >&2; exit 1; }
  echo "$dir/release"
}
