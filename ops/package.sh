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
# Man pages gzipped (Debian policy 12.1).
gzip -9n "$assets"/man/*.8
# changelog.Debian.gz: one entry for the version being built.
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
{
  echo "position-state-brain ($version-1) unstable; urgency=medium"
  echo
  echo "  * Release $version; the changes are in"
  echo "    /usr/share/doc/position-state-brain/changelog.gz."
  echo
  echo " -- quantum_trader operators <ops@quantum-trader.invalid>  $(date -R -u -d "@${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}")"
} | gzip -9n > "$assets/changelog.Debian.gz"
# The upstream changelog where Debian keeps it (changelog.gz).
gzip -9n -c CHANGELOG.md > "$assets/changelog.gz"
# The README as installed: every file it names that the package ships, at
# its installed path (SPEC §18).
sed -e '/^`install -/b' \
    -e 's|ops/proof_p33_universe\.sh|/usr/share/position-state-brain/proof_p33_universe.sh|g' \
    -e 's|ops/failover-drill\.sh|/usr/share/position-state-brain/failover-drill.sh|g' \
    -e 's|deploy/prometheus/|/usr/share/position-state-brain/prometheus/|g' \
    -e 's|deploy/grafana/|/usr/share/position-state-brain/grafana/|g' \
    -e 's|deploy/redis/users\.acl|/usr/share/doc/position-state-brain/users.acl|g' \
    -e 's|deploy/position-state-brain-ctl\.env|/etc/quantum/position-state-brain-ctl.env|g' \
    -e 's|deploy/position-state-brain\.env|/etc/quantum/position-state-brain.env|g' \
    -e 's|deploy/systemd/|/lib/systemd/system/|g' \
    -e 's|deploy/deb/lintian-overrides|/usr/share/lintian/overrides/position-state-brain|g' \
    -e 's|docs/\([a-z]*\.md\)|/usr/share/doc/position-state-brain/\1|g' \
    -e 's|\[`CHANGELOG.md`\](CHANGELOG.md)|`/usr/share/doc/position-state-brain/changelog.gz`|g' \
    README.md > "$assets/README.md"
# Stripped, with the symbols in a -dbgsym package (.ddeb) beside the .deb.
cargo deb --no-build --dbgsym "$@" 2>&1 | grep -E '\.deb$' | tail -n 1
