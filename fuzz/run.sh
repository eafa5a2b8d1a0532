#!/usr/bin/env bash
# Builds one fuzz target with libFuzzer on the stable toolchain and runs it for SECONDS:
#   fuzz/run.sh TARGET SECONDS [libFuzzer options...]      e.g. fuzz/run.sh bundle_reader 300
# Seeds: fuzz/corpus/TARGET (committed, made by fuzz/make-corpus.sh). Inputs the run finds
# go to target/fuzz/corpus/TARGET; crashes to fuzz/artifacts/TARGET/ (docs/fuzzing.md).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
target=${1:?usage: fuzz/run.sh TARGET SECONDS [libFuzzer options...]}
seconds=${2:?usage: fuzz/run.sh TARGET SECONDS [libFuzzer options...]}
shift 2
triple=x86_64-unknown-linux-gnu
target_dir=$here/../target/fuzz
# Sanitizer coverage as cargo-fuzz sets it (without a sanitizer: stable rustc has none), and
# debug assertions and overflow checks, so that an arithmetic overflow is a crash too.
# --target keeps these flags off build scripts and proc macros.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
cargo build --manifest-path "$here/Cargo.toml" --locked --release --target "$triple" \
  --target-dir "$target_dir" --bin "$target" >&2
found=$target_dir/corpus/$target
artifacts=$here/artifacts/$target
mkdir -p "$found" "$artifacts"
dict=()
if [ -f "$here/$target.dict" ]; then dict=(-dict="$here/$target.dict"); fi
# New inputs go to the first folder; the committed seeds are read from the second.
exec "$target_dir/$triple/release/$target" -max_total_time="$seconds" -print_final_stats=1 \
  -artifact_prefix="$artifacts/" "${dict[@]}" "$@" "$found" "$here/corpus/$target"
