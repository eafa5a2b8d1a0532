#!/usr/bin/env bash
# Flash benchmark (issue 6 item 6; docs/flashing.md "Benchmark"):
#   imager flash of a half-empty image through its bmap   vs   dd bs=4M conv=fsync of the whole image
# to a file on the same disk, same image, same run. Prints the time ratio (target <= 0.5x) and the
# MiB/s of both (IEC units, as the tools print them; "effective" = image size / time, "written" = bytes written / time).
# `imager flash` is timed as a user runs it: check the image against its bmap, write the mapped
# ranges while a second thread makes each written 64 MiB window durable, drops its cached pages
# and has it read back against the checksums, fsync, wait for the read-back to finish.
# It is also timed with --no-verify, for information. The imager's own split, check/write/verify
# (its JSON report): check_seconds = hashing the image before writing; write_seconds = first
# write to the end of the final fsync, with the read-back running alongside; verify_seconds =
# the read-back left after that fsync.
#
# Environment: BENCH_SIZE (image size in MiB, default 2048), BENCH_MAPPED (percent of the image
# that holds data, default 50), BENCH_ROUNDS (default 3; best of), BENCH_DIR (work folder, default
# a new one in /var/tmp, removed at the end unless BENCH_KEEP=1), BENCH_PROFILE (cargo profile of
# the imager, default release), BENCH_BIN (an imager binary to use instead of building one).
# With a "before" (bench/baseline.sh: BENCH_BASE, default main, or BENCH_BASE_BIN, an imager
# binary) each round also flashes with the before binary (before and after in alternating order)
# and the end prints after / before ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${BENCH_SIZE:-2048}
MAPPED=${BENCH_MAPPED:-50}
ROUNDS=${BENCH_ROUNDS:-3}
PROFILE=${BENCH_PROFILE:-release}
WORK=${BENCH_DIR:-$(mktemp -d /var/tmp/metrica-flash-bench.XXXXXX)}
mkdir -p "$WORK"
[ "${BENCH_KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT

. bench/baseline.sh
dir=$PROFILE; [ "$PROFILE" = dev ] && dir=debug
baseline "$WORK/imager.before" "$dir/imager" --profile "$PROFILE" -p imager --bin imager
if [ -n "${BENCH_BIN:-}" ]; then
  BIN=$BENCH_BIN
else
  cargo build --quiet --profile "$PROFILE" -p imager --bin imager
  BIN=${CARGO_TARGET_DIR:-target}/$dir/imager
fi
if [ -n "$BASE" ] && cmp -s "$BASE" "$BIN"; then
  echo "warning: the before and after binaries are identical" >&2
fi

. bench/image.sh
IMG=$WORK/bench.img
make_image "$IMG" "$SIZE_MIB" "$MAPPED"
mapped=$MAPPED_BYTES
size=$IMAGE_BYTES
echo "image: $SIZE_MIB MiB, $(( mapped * 100 / size ))% mapped, in $WORK" >&2
echo "load average at the start: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores" >&2

# Each command runs under /usr/bin/time: wall seconds, and CPU seconds (user + system), since on
# a shared machine a command that needs the CPU (hashing) waits for it and one that waits for
# the disk (dd) does not.
timed() { /usr/bin/time -f "%e %U %S" -o "$WORK/time" "$@"; read -r wall user sys < "$WORK/time"; cpu=$(python3 -c "print(round($user + $sys, 2))"); }
best() { python3 -c "import sys; print(min(float(x) for x in sys.argv[1:]))" "$@"; }
dd_t=(); fl_t=(); nv_t=(); dd_c=(); fl_c=(); nv_c=(); steps=""; bf_t=(); bf_c=(); bn_t=(); bn_c=()
# flash_with BIN: a verified flash and a --no-verify flash with BIN, each to a new file, both
# checked against the image; sets fw/fc (verified wall/CPU), nw/nc (--no-verify) and split.
flash_with() {
  rm -f "$WORK/flash.out" "$WORK/noverify.out"; sync
  timed "$1" flash "$IMG" "$WORK/flash.out" --bmap "$WORK/bench.bmap" --yes --json 2>/dev/null >"$WORK/report.json"
  fw=$wall; fc=$cpu; sync
  # The imager's own split of its time: check / write (with fsync; read-back alongside) / the
  # read-back left after the fsync.
  split=$(python3 -c "import json; r=json.load(open('$WORK/report.json')); print(f\"{r['check_seconds']:.2f}/{r['write_seconds']:.2f}/{r['verify_seconds']:.2f}\")")
  timed "$1" flash "$IMG" "$WORK/noverify.out" --bmap "$WORK/bench.bmap" --yes --no-verify 2>/dev/null
  nw=$wall; nc=$cpu
  cmp -s "$IMG" "$WORK/flash.out" || { echo "flash.out differs from the image ($1)" >&2; exit 1; }
  cmp -s "$IMG" "$WORK/noverify.out" || { echo "noverify.out differs from the image ($1)" >&2; exit 1; }
}
for r in $(seq "$ROUNDS"); do
  rm -f "$WORK/dd.out"; sync
  timed dd if="$IMG" of="$WORK/dd.out" bs=4M conv=fsync status=none
  dd_t+=("$wall"); dd_c+=("$cpu"); sync
  cmp -s "$IMG" "$WORK/dd.out" || { echo "dd.out differs from the image" >&2; exit 1; }
  rm -f "$WORK/dd.out"
  note=""
  # Before and after take turns going first.
  for which in $( [ $((r % 2)) = 1 ] && echo "before after" || echo "after before"); do
    if [ "$which" = before ]; then
      [ -n "$BASE" ] || continue
      flash_with "$BASE"
      bf_t+=("$fw"); bf_c+=("$fc"); bn_t+=("$nw"); bn_c+=("$nc")
      note="; before: flash ${fw}s (cpu ${fc}s; $split s), --no-verify ${nw}s (cpu ${nc}s)"
    else
      flash_with "$BIN"
      fl_t+=("$fw"); fl_c+=("$fc"); nv_t+=("$nw"); nv_c+=("$nc"); steps="$steps$split "
      after="imager flash ${fw}s (cpu ${fc}s; check/write/verify $split s), --no-verify ${nw}s (cpu ${nc}s)"
    fi
  done
  echo "round $r: dd ${dd_t[-1]}s (cpu ${dd_c[-1]}s), $after$note" >&2
done
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores" >&2

before=()
[ -z "$BASE" ] || before=("$(best "${bf_t[@]}")" "$(best "${bn_t[@]}")" "$(best "${bf_c[@]}")" "$(best "${bn_c[@]}")")
python3 - "$size" "$mapped" "$(best "${dd_t[@]}")" "$(best "${fl_t[@]}")" "$(best "${nv_t[@]}")" \
  "$(best "${dd_c[@]}")" "$(best "${fl_c[@]}")" "$(best "${nv_c[@]}")" "${before[@]}" <<'EOF'
import sys
size, mapped = int(sys.argv[1]), int(sys.argv[2])
dd, fl, nv, ddc, flc, nvc = map(float, sys.argv[3:9])
before = list(map(float, sys.argv[9:13]))
mb = lambda b, s: b / 2**20 / s
print(f"image                          {size/2**20:.0f} MiB, {mapped/2**20:.0f} MiB mapped ({100*mapped/size:.0f}%)")
print(f"dd bs=4M conv=fsync            {dd:6.2f} s  {mb(size, dd):8.1f} MiB/s written            (cpu {ddc:.2f} s)")
print(f"imager flash (verified)        {fl:6.2f} s  {mb(size, fl):8.1f} MiB/s effective, {mb(mapped, fl):.1f} MiB/s written (cpu {flc:.2f} s)")
print(f"imager flash --no-verify       {nv:6.2f} s  {mb(size, nv):8.1f} MiB/s effective, {mb(mapped, nv):.1f} MiB/s written (cpu {nvc:.2f} s)")
print(f"time ratio flash / dd          {fl/dd:6.2f}x (target <= 0.5x; --no-verify: {nv/dd:.2f}x)")
if before:
    bf, bn, bfc, bnc = before
    print(f"before: imager flash           {bf:6.2f} s  {mb(size, bf):8.1f} MiB/s effective (cpu {bfc:.2f} s); --no-verify {bn:.2f} s (cpu {bnc:.2f} s)")
    print(f"after / before time            {fl/bf:6.2f}x verified, {nv/bn:.2f}x --no-verify; CPU {flc/bfc:.2f}x, {nvc/bnc:.2f}x (below 1: after is faster)")
EOF
