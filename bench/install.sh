#!/usr/bin/env bash
# Install benchmark (issue 4 item 10; docs/bundle.md "Benchmark"):
#   updater install of a bundle into a slot of a sparse disk image  vs  `zstd -dc root.zst > slot`
# on the same root image, compressed at the same zstd level, in the same run.
# Prints the throughput ratio (target >= 0.9), the CPU time ratio (all threads; steadier than
# wall time on a shared machine), bundle size / whole-image .zst (target <= 1.1)
# and the installer's peak RSS (target <= 24 MiB). With a "before" (bench/baseline.sh: BENCH_BASE,
# default main, or BENCH_BASE_BIN, a bench_install binary) it also installs with the before
# binary in each round (the two in alternating order) and prints after / before ratios.
#
# Environment: BENCH_SRC (folder to fill the ext4 root image with, default /usr/share),
# BENCH_SIZE (root image size, default: the folder's size plus a third), BENCH_LEVEL (zstd level, default 15 = the bundle default),
# BENCH_ROUNDS (default 3; best of), BENCH_DIR (work folder, default a new one in /var/tmp,
# removed at the end unless BENCH_KEEP=1).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${BENCH_SRC:-/usr/share}
if [ -n "${BENCH_SIZE:-}" ]; then
  SIZE=$BENCH_SIZE
else
  # The folder's size plus a third for ext4 metadata and free space, in MiB.
  SIZE=$(( $(du -sbx "$SRC" | cut -f1) * 4 / 3 / 1048576 + 64 ))M
fi
LEVEL=${BENCH_LEVEL:-15}
ROUNDS=${BENCH_ROUNDS:-3}
WORK=${BENCH_DIR:-$(mktemp -d /var/tmp/metrica-bench.XXXXXX)}
mkdir -p "$WORK"
[ "${BENCH_KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT

. bench/baseline.sh
# The workspace's release profile is opt-level 3 (docs/design.md): sha2's SHA-NI/ARMv8 code
# needs it to inline its intrinsics.
baseline "$WORK/bench_install.before" release/examples/bench_install --release -p imager --example bench_install
cargo build --quiet --release -p imager --example bench_install
BIN=${CARGO_TARGET_DIR:-target}/release/examples/bench_install
if [ -n "$BASE" ] && cmp -s "$BASE" "$BIN"; then
  echo "warning: the before and after binaries are identical" >&2
fi

echo "root image: ext4 of $SIZE from $SRC" >&2
rm -f "$WORK/root.img"
mke2fs -q -F -t ext4 -i 4096 -E root_owner=0:0 -d "$SRC" "$WORK/root.img" "$SIZE"
zstd -q -f -"$LEVEL" -T0 "$WORK/root.img" -o "$WORK/root.zst"
"$BIN" prepare "$WORK" "$LEVEL"

now() { date +%s.%N; }
best() { python3 -c "import sys; print(min(float(x) for x in sys.argv[1:]))" "$@"; }
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
base_t=(); base_c=(); sync_t=(); inst_t=(); inst_c=(); before_t=(); before_c=(); rss=0; before_rss=0
# One install with binary $1 after a `sync`: sets t (seconds), c (CPU seconds), kib (peak RSS).
install_with() { sync; local line; line=$("$1" install "$WORK"); t=$(field "$line" seconds); c=$(field "$line" cpu_seconds); kib=$(field "$line" peak_rss_kib); }
# Each timed step starts with no dirty pages left by the one before (`sync` first), and the
# baseline writes over an existing slot file of the right size, as the install does.
zstd -dc "$WORK/root.zst" > "$WORK/slot"
for r in $(seq "$ROUNDS"); do
  sync; t0=$(now); /usr/bin/time -f "%U %S" -o "$WORK/cpu" zstd -dc "$WORK/root.zst" 1<> "$WORK/slot"; t1=$(now)
  base_t+=("$(python3 -c "print($t1-$t0)")")
  base_c+=("$(python3 -c "import sys; print(sum(map(float, open(sys.argv[1]).read().split()[-2:])))" "$WORK/cpu")")
  sync; t0=$(now); zstd -dc "$WORK/root.zst" 1<> "$WORK/slot"; sync "$WORK/slot"; t1=$(now)
  sync_t+=("$(python3 -c "print($t1-$t0)")")
  # Before and after take turns going first, so that neither always finds the other's pages.
  for which in $( [ $((r % 2)) = 1 ] && echo "before after" || echo "after before"); do
    if [ "$which" = before ]; then
      [ -n "$BASE" ] || continue
      install_with "$BASE"; before_t+=("$t"); before_c+=("$c"); before_rss=$(( kib > before_rss ? kib : before_rss ))
      note=", before ${t}s (cpu ${c}s, rss ${kib} KiB)"
    else
      install_with "$BIN"; inst_t+=("$t"); inst_c+=("$c"); rss=$(( kib > rss ? kib : rss ))
      after="install ${t}s (cpu ${c}s), rss ${kib} KiB"
    fi
  done
  echo "round $r: zstd -dc ${base_t[-1]}s (cpu ${base_c[-1]}s), zstd -dc + fsync ${sync_t[-1]}s, $after${BASE:+$note}, load $(cut -d' ' -f1 /proc/loadavg)" >&2
done
best_base=$(best "${base_t[@]}"); best_base_sync=$(best "${sync_t[@]}"); best_inst=$(best "${inst_t[@]}")
best_base_cpu=$(best "${base_c[@]}"); best_inst_cpu=$(best "${inst_c[@]}")
best_before=""; best_before_cpu=""
if [ -n "$BASE" ]; then best_before=$(best "${before_t[@]}"); best_before_cpu=$(best "${before_c[@]}"); fi

python3 - "$WORK" "$best_base" "$best_base_sync" "$best_inst" "$rss" "$LEVEL" "$best_base_cpu" "$best_inst_cpu" \
  "$best_before" "$best_before_cpu" "$before_rss" <<'EOF'
import os, sys
work, base, base_sync, inst, rss, level = sys.argv[1], *map(float, sys.argv[2:5]), int(sys.argv[5]), sys.argv[6]
base_cpu, inst_cpu = map(float, sys.argv[7:9])
before, before_cpu, before_rss = sys.argv[9], sys.argv[10], int(sys.argv[11])
size = os.path.getsize(f"{work}/root.img")
mfb, zst = os.path.getsize(f"{work}/root.mfb"), os.path.getsize(f"{work}/root.zst")
mib = size / 1048576
print(f"root image            {mib:.0f} MiB, zstd level {level}")
print(f"zstd -dc > slot       {mib/base:8.1f} MiB/s")
print(f"zstd -dc > slot+fsync {mib/base_sync:8.1f} MiB/s")
print(f"install (verified)    {mib/inst:8.1f} MiB/s")
print(f"throughput ratio      {base/inst:8.2f}x  (vs +fsync: {base_sync/inst:.2f}x; target >= 0.9)")
print(f"CPU time ratio        {base_cpu/inst_cpu:8.2f}x  (zstd -dc {base_cpu:.2f}s, install {inst_cpu:.2f}s, all threads)")
print(f"bundle / .zst size    {mfb/zst:8.3f}x  ({mfb} / {zst} bytes; target <= 1.1)")
print(f"install peak RSS      {rss/1024:8.1f} MiB (target <= 24)")
if before:
    before, before_cpu = float(before), float(before_cpu)
    print(f"install before        {mib/before:8.1f} MiB/s  (cpu {before_cpu:.2f}s, peak RSS {before_rss/1024:.1f} MiB)")
    print(f"after / before        {before/inst:8.2f}x throughput, {before_cpu/inst_cpu:.2f}x CPU time (above 1: after is faster)")
EOF
