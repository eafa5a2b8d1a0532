# Sourced by bench/install.sh and bench/flash.sh: the "before" binary, so that one run prints
# before and after side by side.
#
# Environment: BENCH_BASE (a git ref whose code is "before", default main; "none": no before),
# BENCH_BASE_BIN (a ready "before" binary of the same kind instead of building one).
# The ref is exported with `git archive` into the work folder (the repository is not touched)
# and built in a target folder of its own, BENCH_BASE_TARGET (default: bench-base inside the
# target folder; kept, so that only the first run compiles the dependencies). Not the shared
# one: cargo names a workspace crate's build by its path inside the workspace, so the before and
# after builds of a crate would take each other's place, and one of them would be taken as up
# to date by the files' times.

# baseline OUT REL CARGO_ARGS...: builds the "before" binary (REL: its path below the target
# folder), copies it to OUT and sets BASE to OUT; BASE is empty when there is no before. Not in
# an `if`: a failed build must stop the benchmark (set -e).
baseline() {
  local out=$1 rel=$2
  shift 2
  BASE=""
  if [ -n "${BENCH_BASE_BIN:-}" ]; then
    cp "$BENCH_BASE_BIN" "$out"
    BASE=$out
    echo "before: $BENCH_BASE_BIN" >&2
    return 0
  fi
  local ref=${BENCH_BASE:-main}
  [ "$ref" != none ] || return 0
  local src=$WORK/base-src target
  target=$(realpath -m "${BENCH_BASE_TARGET:-${CARGO_TARGET_DIR:-target}/bench-base}")
  rm -rf "$src"
  mkdir -p "$src"
  # -m: the files get the current time, so that a build of another ref is never up to date.
  git archive "$ref" | tar -x -m -C "$src"
  (cd "$src" && CARGO_TARGET_DIR=$target cargo build --quiet --locked "$@")
  cp "$target/$rel" "$out"
  BASE=$out
  rm -rf "$src"
  echo "before: $ref ($(git rev-parse --short "$ref")), after: the working tree" >&2
}
