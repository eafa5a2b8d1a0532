#!/usr/bin/env bash
# Builds one fuzz target (fuzz/build.sh) and runs it for SECONDS:
#   fuzz/run.sh TARGET SECONDS [libFuzzer options...]      e.g. fuzz/run.sh bundle_reader 300
# Seeds: fuzz/corpus/TARGET (committed, made by fuzz/make-corpus.sh). Inputs the run finds
# go to target/fuzz/corpus/TARGET; crashes to fuzz/artifacts/TARGET/ (docs/fuzzing.md).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
target=${1:?usage: fuzz/run.sh TARGET SECONDS [libFuzzer options...]}
seconds=${2:?usage: fuzz/run.sh TARGET SECONDS [libFuzzer options...]}
shift 2
target_dir=$here/../target/fuzz
"$here/build.sh" "$target"
found=$target_dir/corpus/$target
artifacts=$here/artifacts/$target
mkdir -p "$found" "$artifacts"
dict=()
if [ -f "$here/$target.dict" ]; then dict=(-dict="$here/$target.dict"); fi
# New inputs go to the first folder; the committed seeds are read from the second. Memory
# is bounded (-rss_limit_mb, -malloc_limit_mb) and so is each input's time (-timeout).
exec "$target_dir/x86_64-unknown-linux-gnu/release/$target" -max_total_time="$seconds" \
  -print_final_stats=1 -rss_limit_mb=512 -malloc_limit_mb=256 -timeout=10 \
  -artifact_prefix="$artifacts/" "${dict[@]}" "$@" "$found" "$here/corpus/$target"
