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
deb=$(cargo deb --no-build --dbgsym "$@" 2>&1 | grep -E '\.deb$' | tail -n 1)
[ -f "$deb" ] || { echo "ops/package.sh: cargo deb built no package" >&2; exit 1; }
ddeb="${deb%/*}/position-state-brain-dbgsym_${deb##*/position-state-brain_}"
ddeb="${ddeb%.deb}.ddeb"
# cargo-deb writes no md5sums, so dpkg --verify could not tell an operator
# whether the installed binary is the packaged one; and its -dbgsym package
# is not what debhelper makes (Priority extra, no doc, Recommends where
# debhelper has Depends, no Build-Ids), for which lintian reports errors.
# Both packages are unpacked and built again with dpkg-deb: md5sums of every
# file but the conffiles (dpkg keeps theirs), and the -dbgsym package as
# debhelper makes it, its doc a link to the main package's.
repack() { # package-file [dbgsym]
  local work
  work=$(mktemp -d)
  dpkg-deb -R "$1" "$work/p"
  if [ "${2:-}" = dbgsym ]; then
    sed -i -e 's/^Priority: extra$/Priority: optional/' -e 's/^Recommends: /Depends: /' "$work/p/DEBIAN/control"
    ids=$(cd "$work/p/usr/lib/debug/.build-id" && ls -- */*.debug | sed 's|/||; s|\.debug$||' | tr '\n' ' ' | sed 's/ $//')
    sed -i "/^Installed-Size:/a Build-Ids: $ids" "$work/p/DEBIAN/control"
    mkdir -p "$work/p/usr/share/doc"
    ln -s position-state-brain "$work/p/usr/share/doc/position-state-brain-dbgsym"
  fi
  (cd "$work/p" && find . -type f ! -path './DEBIAN/*' -printf '%P\n' | LC_ALL=C sort \
     | grep -vxF -f <(sed 's|^/||' DEBIAN/conffiles 2>/dev/null || true) \
     | tr '\n' '\0' | xargs -0r md5sum) > "$work/md5sums"
  mv "$work/md5sums" "$work/p/DEBIAN/md5sums"
  chmod 0644 "$work/p/DEBIAN/md5sums"
  dpkg-deb --root-owner-group -b "$work/p" "$1" >/dev/null
  rm -rf "$work"
}
[ -f "$ddeb" ] || { echo "ops/package.sh: cargo deb built no -dbgsym package ($ddeb)" >&2; exit 1; }
repack "$deb"
repack "$ddeb" dbgsym
echo "$deb"
