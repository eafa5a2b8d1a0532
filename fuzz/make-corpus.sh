#!/usr/bin/env bash
# Writes the committed seed corpus of every fuzz target (fuzz/corpus/TARGET/): small valid
# inputs made by the formats' own writers, so that the same commit gives the same seeds.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cargo run --manifest-path "$here/Cargo.toml" --locked --release --target-dir "$here/../target" \
  --bin make-corpus -- "$here/corpus/bundle_reader"
