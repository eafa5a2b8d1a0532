#!/usr/bin/env bash
# Flash benchmark on a target that behaves like an SD card (issue 17 item 6; docs/flashing.md
# "On a card-speed target"): a loop device throttled by the kernel's block cgroup to
# BENCH_WRITE_MBS MB/s of writes and BENCH_READ_MBS MB/s of reads (defaults 20 and 80, a
# common class-10 card), and on it, in the same run and with the same image:
#   dd bs=4M conv=fsync of the whole image;
#   bmaptool copy (the mapped blocks, checked against the bmap's checksums while it writes);
#   imager flash (the mapped blocks, then read back from the card and checked).
# Prints each time and the ratios imager / dd (target <= 0.6x) and imager / bmaptool (target
# <= 1.0x). Every tool runs inside the throttled cgroup, and the cgroup's own byte counters are
# checked after each run: a tool whose writes went around the throttle (writeback by the
# kernel's flusher threads, which are not in the cgroup) would fail the run rather than look
# fast. Each copy is compared with the image.
#
# Needs root, losetup, bmaptool and a block cgroup (v2 with the io controller, else v1 blkio).
# Environment: BENCH_SIZE (MiB, default 1024), BENCH_MAPPED (percent, default 50),
# BENCH_ROUNDS (default 1; best of), BENCH_DIR (work folder, default a new one in /var/tmp,
# removed at the end unless BENCH_KEEP=1), BENCH_BIN (an imager binary instead of building the
# release one).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${BENCH_SIZE:-1024}
MAPPED=${BENCH_MAPPED:-50}
ROUNDS=${BENCH_ROUNDS:-1}
WBPS=$(( ${BENCH_WRITE_MBS:-20} * 1000 * 1000 ))
RBPS=$(( ${BENCH_READ_MBS:-80} * 1000 * 1000 ))
[ "$(id -u)" = 0 ] || { echo "bench: the card benchmark needs root (loop device, cgroup)" >&2; exit 1; }
WORK=${BENCH_DIR:-$(mktemp -d /var/tmp/metrica-flash-card.XXXXXX)}
mkdir -p "$WORK"
if [ -n "${BENCH_BIN:-}" ]; then
  BIN=$BENCH_BIN
else
  cargo build --quiet --release -p imager --bin imager
  BIN=${CARGO_TARGET_DIR:-target}/release/imager
fi

. bench/image.sh
IMG=$WORK/bench.img
make_image "$IMG" "$SIZE_MIB" "$MAPPED"

# The card: a loop device over a file of the image's size (plus 16 MiB), on the work disk.
truncate -s $(( (SIZE_MIB + 16) << 20 )) "$WORK/card.backing"
CARD=$(losetup --find --show "$WORK/card.backing")
majmin=$(lsblk -dno MAJ:MIN "$CARD" | tr -d ' ')

# The throttled cgroup: v2 io.max where the io controller is there, else v1 blkio.throttle.
cg=""
v2=/sys/fs/cgroup
[ -f $v2/cgroup.controllers ] || v2=/sys/fs/cgroup/unified
if grep -qw io "$v2/cgroup.controllers" 2>/dev/null; then
  echo "+io" >"$v2/cgroup.subtree_control" 2>/dev/null || true
  cg=$v2/metrica-flash-card-$$
  mkdir "$cg"
  echo "$majmin wbps=$WBPS rbps=$RBPS" >"$cg/io.max"
  procs=$cg/cgroup.procs
  written() { sed -n "s/^$majmin .*wbytes=\([0-9]*\).*/\1/p" "$cg/io.stat"; }
elif [ -d /sys/fs/cgroup/blkio ]; then
  cg=/sys/fs/cgroup/blkio/metrica-flash-card-$$
  mkdir "$cg"
  echo "$majmin $WBPS" >"$cg/blkio.throttle.write_bps_device"
  echo "$majmin $RBPS" >"$cg/blkio.throttle.read_bps_device"
  procs=$cg/tasks
  counter() { awk -v d="$majmin" -v k="$1" '$1 == d && $2 == k { print $3 }' \
    "$cg/blkio.throttle.io_service_bytes"; }
  written() { counter Write; }
else
  echo "bench: no block cgroup (neither io in cgroup v2 nor blkio in v1)" >&2
  exit 1
fi
cleanup() {
  losetup -d "$CARD" 2>/dev/null || true
  rmdir "$cg" 2>/dev/null || true
  [ "${BENCH_KEEP:-0}" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT
echo "card: $CARD ($majmin) throttled to $((WBPS / 1000000)) MB/s writes, $((RBPS / 1000000)) MB/s reads ($cg)" >&2
echo "image: $SIZE_MIB MiB, $(( MAPPED_BYTES * 100 / IMAGE_BYTES ))% mapped" >&2

# throttled NAME MIN_WRITTEN CMD...: runs CMD in the cgroup, timed; checks that at least
# MIN_WRITTEN bytes went through the throttle and that the card now holds the image.
throttled() {
  local name=$1 min=$2 w0 w1 r0 r1 start
  shift 2
  sync
  echo 3 >/proc/sys/vm/drop_caches
  w0=$(written); s0=$(sectors)
  start=$(date +%s%N)
  sh -c 'echo $$ > "$0" && exec "$@"' "$procs" "$@"
  wall=$(python3 -c "print(round(($(date +%s%N) - $start) / 1e9, 2))")
  w1=$(written); s1=$(sectors)
  through=$(( ${w1:-0} - ${w0:-0} ))
  if [ "$through" -lt "$min" ]; then
    echo "bench: $name wrote only $through of $min bytes through the throttle" >&2
    exit 1
  fi
  cmp -s -n "$IMAGE_BYTES" "$IMG" "$CARD" || { echo "bench: the card differs from the image after $name" >&2; exit 1; }
  read -r rs ws <<<"$(python3 -c "a='$s0'.split(); b='$s1'.split(); print((int(b[0])-int(a[0]))*512 >> 20, (int(b[1])-int(a[1]))*512 >> 20)")"
  echo "  $name: ${wall} s; the card read ${rs} MiB and wrote ${ws} MiB ($(( through >> 20 )) MiB through the throttle)" >&2
}
# The card's own counters (/sys/block/loopN/stat): sectors read and written.
sectors() { awk '{print $3, $7}' "/sys/block/$(basename "$CARD")/stat"; }
# A fresh card between runs: zeros where the image has holes must come from the tool.
blank() { dd if=/dev/zero of="$CARD" bs=4M count=$(( SIZE_MIB / 4 )) oflag=direct status=none; }

dd_t=(); bm_t=(); im_t=()
for r in $(seq "$ROUNDS"); do
  echo "round $r:" >&2
  blank
  throttled "dd" "$IMAGE_BYTES" dd if="$IMG" of="$CARD" bs=4M conv=fsync status=none
  dd_t+=("$wall")
  # bmaptool and the imager write only the mapped blocks: the card must read back as the
  # image, holes included, so it starts from zeros (not timed).
  blank
  throttled "bmaptool copy" "$MAPPED_BYTES" bmaptool -q copy --bmap "${IMG%.img}.bmap" "$IMG" "$CARD"
  bm_t+=("$wall")
  blank
  throttled "imager flash" "$MAPPED_BYTES" "$BIN" flash "$IMG" "$CARD" --bmap "${IMG%.img}.bmap" --yes
  im_t+=("$wall")
done

best() { python3 -c "import sys; print(min(float(x) for x in sys.argv[1:]))" "$@"; }
python3 - "$IMAGE_BYTES" "$MAPPED_BYTES" "$(best "${dd_t[@]}")" "$(best "${bm_t[@]}")" \
  "$(best "${im_t[@]}")" "$WBPS" "$RBPS" <<'EOF'
import sys
size, mapped = int(sys.argv[1]), int(sys.argv[2])
dd, bm, im = map(float, sys.argv[3:6])
w, r = int(sys.argv[6]) / 1e6, int(sys.argv[7]) / 1e6
mib = lambda b, s: b / 2**20 / s
print(f"card                          loop device, {w:.0f} MB/s writes, {r:.0f} MB/s reads")
print(f"image                         {size / 2**20:.0f} MiB, {mapped / 2**20:.0f} MiB mapped ({100 * mapped / size:.0f}%)")
print(f"dd bs=4M conv=fsync           {dd:7.2f} s  {mib(size, dd):6.1f} MiB/s")
print(f"bmaptool copy                 {bm:7.2f} s  {mib(size, bm):6.1f} MiB/s effective")
print(f"imager flash (verified)       {im:7.2f} s  {mib(size, im):6.1f} MiB/s effective")
print(f"imager / dd                   {im / dd:7.2f}x (target <= 0.6x)")
print(f"imager / bmaptool             {im / bm:7.2f}x (target <= 1.0x)")
EOF
