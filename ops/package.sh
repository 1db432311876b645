#!/usr/bin/env bash
# Builds the Debian package (SPEC §18) and prints its path:
#   <target>/debian/position-state-brain_<version>-1_<arch>.deb
# The man pages and completions come from the clap definition (p33-docs), the
# units are the shipped ones with the binary at /usr/bin. Installs cargo-deb
# when missing. Extra arguments go to cargo deb (e.g. --deb-revision 2).
set -euo pipefail
cd "$(dirname "$0")/.."
. ops/lib.sh
if ! cargo deb --version >/dev/null 2>&1; then
  echo "ops/package.sh: installing cargo-deb" >&2
  cargo install --locked cargo-deb >&2
fi
cargo build --release --bins >&2
bins=$(release_bins)
assets="$bins/deb-assets"
rm -rf "$assets"
mkdir -p "$assets/systemd"
"$bins/p33-docs" "$assets" >/dev/null
for u in deploy/systemd/*.service; do
  sed 's|/usr/local/bin/position-state-brain|/usr/bin/position-state-brain|' "$u" > "$assets/systemd/$(basename "$u")"
done
cargo deb --no-build "$@" 2>&1 | tail -n 1
