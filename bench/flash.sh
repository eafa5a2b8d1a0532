#!/usr/bin/env bash
# Flash benchmark (issue 6 item 6; docs/flashing.md "Benchmark"):
#   imager flash of a half-empty image through its bmap   vs   dd bs=4M conv=fsync of the whole image
# to a file on the same disk, same image, same run. Prints the time ratio (target <= 0.5x) and the
# MB/s of both (MB = 10^6 bytes; "effective" = image size / time, "written" = bytes written / time).
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
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${BENCH_SIZE:-2048}
MAPPED=${BENCH_MAPPED:-50}
ROUNDS=${BENCH_ROUNDS:-3}
PROFILE=${BENCH_PROFILE:-release}
WORK=${BENCH_DIR:-$(mktemp -d /var/tmp/metrica-flash-bench.XXXXXX)}
mkdir -p "$WORK"
[ "${BENCH_KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT

if [ -n "${BENCH_BIN:-}" ]; then
  BIN=$BENCH_BIN
else
  cargo build --quiet --profile "$PROFILE" -p imager --bin imager
  dir=$PROFILE; [ "$PROFILE" = dev ] && dir=debug
  BIN=${CARGO_TARGET_DIR:-target}/$dir/imager
fi

# The image: 64 MiB slots, of which the first MAPPED percent hold random data and the rest is a
# hole, like a fresh image whose partitions are partly filled.
IMG=$WORK/bench.img
rm -f "$IMG"
truncate -s "${SIZE_MIB}M" "$IMG"
slots=$(( SIZE_MIB / 64 ))
fill=$(( 64 * MAPPED / 100 ))
for i in $(seq 0 $(( slots - 1 ))); do
  [ "$fill" -gt 0 ] || break
  head -c "$(( fill << 20 ))" /dev/urandom | dd of="$IMG" bs=1M seek=$(( i * 64 )) conv=notrunc,fsync status=none
done
bmaptool -q create "$IMG" -o "$WORK/bench.bmap"
mapped=$(python3 -c "import re,sys; t=open(sys.argv[1]).read(); m=re.search(r'<MappedBlocksCount>\s*(\d+)', t); b=re.search(r'<BlockSize>\s*(\d+)', t); print(int(m[1])*int(b[1]))" "$WORK/bench.bmap")
size=$(stat -c %s "$IMG")
echo "image: $SIZE_MIB MiB, $(( mapped * 100 / size ))% mapped, in $WORK" >&2
echo "load average at the start: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores" >&2

# Each command runs under /usr/bin/time: wall seconds, and CPU seconds (user + system), since on
# a shared machine a command that needs the CPU (hashing) waits for it and one that waits for
# the disk (dd) does not.
timed() { /usr/bin/time -f "%e %U %S" -o "$WORK/time" "$@"; read -r wall user sys < "$WORK/time"; cpu=$(python3 -c "print(round($user + $sys, 2))"); }
best() { python3 -c "import sys; print(min(float(x) for x in sys.argv[1:]))" "$@"; }
dd_t=(); fl_t=(); nv_t=(); dd_c=(); fl_c=(); nv_c=(); steps=""
for r in $(seq "$ROUNDS"); do
  rm -f "$WORK/dd.out" "$WORK/flash.out" "$WORK/noverify.out"; sync
  timed dd if="$IMG" of="$WORK/dd.out" bs=4M conv=fsync status=none
  dd_t+=("$wall"); dd_c+=("$cpu"); sync
  timed "$BIN" flash "$IMG" "$WORK/flash.out" --bmap "$WORK/bench.bmap" --yes --json 2>/dev/null >"$WORK/report.json"
  fl_t+=("$wall"); fl_c+=("$cpu"); sync
  # The imager's own split of its time: check / write (with fsync; read-back alongside) / the
  # read-back left after the fsync.
  steps="$steps$(python3 -c "import json; r=json.load(open('$WORK/report.json')); print(f\"{r['check_seconds']:.2f}/{r['write_seconds']:.2f}/{r['verify_seconds']:.2f}\")") "
  timed "$BIN" flash "$IMG" "$WORK/noverify.out" --bmap "$WORK/bench.bmap" --yes --no-verify 2>/dev/null
  nv_t+=("$wall"); nv_c+=("$cpu")
  cmp -s "$IMG" "$WORK/flash.out" || { echo "flash.out differs from the image" >&2; exit 1; }
  cmp -s "$IMG" "$WORK/dd.out" || { echo "dd.out differs from the image" >&2; exit 1; }
  echo "round $r: dd ${dd_t[-1]}s (cpu ${dd_c[-1]}s), imager flash ${fl_t[-1]}s (cpu ${fl_c[-1]}s; check/write/verify $(echo $steps | awk '{print $NF}') s), --no-verify ${nv_t[-1]}s (cpu ${nv_c[-1]}s)" >&2
done
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores" >&2

python3 - "$size" "$mapped" "$(best "${dd_t[@]}")" "$(best "${fl_t[@]}")" "$(best "${nv_t[@]}")" \
  "$(best "${dd_c[@]}")" "$(best "${fl_c[@]}")" "$(best "${nv_c[@]}")" <<'EOF'
import sys
size, mapped = int(sys.argv[1]), int(sys.argv[2])
dd, fl, nv, ddc, flc, nvc = map(float, sys.argv[3:9])
mb = lambda b, s: b / 1e6 / s
print(f"image                          {size/2**20:.0f} MiB, {mapped/2**20:.0f} MiB mapped ({100*mapped/size:.0f}%)")
print(f"dd bs=4M conv=fsync            {dd:6.2f} s  {mb(size, dd):8.1f} MB/s written            (cpu {ddc:.2f} s)")
print(f"imager flash (verified)        {fl:6.2f} s  {mb(size, fl):8.1f} MB/s effective, {mb(mapped, fl):.1f} MB/s written (cpu {flc:.2f} s)")
print(f"imager flash --no-verify       {nv:6.2f} s  {mb(size, nv):8.1f} MB/s effective, {mb(mapped, nv):.1f} MB/s written (cpu {nvc:.2f} s)")
print(f"time ratio flash / dd          {fl/dd:6.2f}x (target <= 0.5x; --no-verify: {nv/dd:.2f}x)")
EOF
