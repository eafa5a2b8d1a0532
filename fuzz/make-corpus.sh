#!/usr/bin/env bash
# Writes the committed seed corpus of every fuzz target (fuzz/corpus/TARGET/): small valid
# inputs made by the formats' own writers (fuzz/src/bin/make-corpus.rs), and the
# repository's own role.toml files and recipes, and a block map made by bmaptool. The same
# commit gives the same seeds, except secrets.age (age encryption is randomized).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$here/..
corpus=$here/corpus
# Built without the fuzz flags (fuzz/build.sh), in its own target folder.
cargo run --manifest-path "$here/Cargo.toml" --locked --target-dir "$repo/target/fuzz-seeds" \
  --bin make-corpus -- "$corpus"
mkdir -p "$corpus/role_spec" "$corpus/recipe" "$corpus/bmap"
for f in "$repo"/roles/*/role.toml; do
  cp "$f" "$corpus/role_spec/$(basename "$(dirname "$f")").toml"
done
cp "$repo"/recipes/*.toml "$corpus/recipe/"
# A half-mapped image: 1 MiB of data, a 2 MiB hole, 1 MiB of data.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
{ yes metrica-fuzz-seed || true; } | head -c 1048576 >"$tmp/img"
truncate -s 3M "$tmp/img"
{ yes metrica-fuzz-seed || true; } | head -c 1048576 >>"$tmp/img"
bmaptool create -o "$corpus/bmap/half-mapped.bmap" "$tmp/img"
truncate -s 64K "$tmp/sparse" && bmaptool create -o "$corpus/bmap/empty.bmap" "$tmp/sparse"
ls "$corpus"/*/ | wc -l
