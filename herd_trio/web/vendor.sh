#!/bin/sh
# Refresh the map page's vendored files from the npm registry (npm pack: no install,
# no node_modules), and record their sha256 checksums in static/vendor/SHA256SUMS.
# Run from anywhere: sh herd_trio/web/vendor.sh. Needs npm and tar; CI and builds don't.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out="$here/static/vendor"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# name@version  file-in-package  vendored-name
set -- \
  "d3-array@3.2.4 dist/d3-array.min.js d3-array.min.js" \
  "d3-geo@3.1.1 dist/d3-geo.min.js d3-geo.min.js" \
  "topojson-client@3.1.0 dist/topojson-client.min.js topojson-client.min.js" \
  "world-atlas@2.0.2 countries-110m.json countries-110m.json"
mkdir -p "$out"
for entry in "$@"; do
  set -- $entry
  spec=$1 file=$2 name=$3
  package=${spec%@*}
  (cd "$work" && npm pack --silent "$spec" > /dev/null)
  tarball=$(ls "$work"/"$package"-*.tgz)
  mkdir -p "$work/$package"
  tar -xzf "$tarball" -C "$work/$package"
  cp "$work/$package/package/$file" "$out/$name"
  cp "$work/$package/package/LICENSE" "$out/$package.LICENSE"
  echo "$spec" >> "$work/VERSIONS"
done
cp "$work/VERSIONS" "$out/VERSIONS"
(cd "$out" && sha256sum -- *.js *.json *.LICENSE VERSIONS > SHA256SUMS)
echo "vendored into $out:"
cat "$out/VERSIONS"
