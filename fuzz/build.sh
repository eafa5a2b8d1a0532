#!/usr/bin/env bash
# Builds fuzz targets (all of fuzz/fuzz_targets/, or the ones named) with libFuzzer on the
# stable toolchain:
#   fuzz/build.sh [TARGET...]
# Sanitizer coverage as cargo-fuzz sets it (without a sanitizer: stable rustc has none), and
# debug assertions and overflow checks, so that an arithmetic overflow is a crash too.
# --target keeps these flags off build scripts and proc macros. (The seed writer make-corpus
# is built without them: instrumented code links only with libFuzzer's main.)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
names=("$@")
if [ $# -eq 0 ]; then
  for f in "$here"/fuzz_targets/*.rs; do names+=("$(basename "$f" .rs)"); done
fi
bins=()
for b in "${names[@]}"; do bins+=(--bin "$b"); done
cargo build --manifest-path "$here/Cargo.toml" --locked --release --target x86_64-unknown-linux-gnu \
  --target-dir "$here/../target/fuzz" "${bins[@]}" >&2
