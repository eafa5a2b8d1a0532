#!/usr/bin/env bash
# Install benchmark (issue 4 item 10; docs/bundle.md "Benchmark"):
#   updater install of a bundle into a slot of a sparse disk image  vs  `zstd -dc root.zst > slot`
# on the same root image, compressed at the same zstd level, in the same run.
# Prints the throughput ratio (target >= 0.9), the CPU time ratio (all threads; steadier than
# wall time on a shared machine), bundle size / whole-image .zst (target <= 1.1)
# and the installer's peak RSS (target <= 24 MiB).
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

# The workspace's release profile is opt-level 3 (docs/design.md): sha2's SHA-NI/ARMv8 code
# needs it to inline its intrinsics.
cargo build --quiet --release -p imager --example bench_install
BIN=${CARGO_TARGET_DIR:-target}/release/examples/bench_install

echo "root image: ext4 of $SIZE from $SRC" >&2
rm -f "$WORK/root.img"
mke2fs -q -F -t ext4 -i 4096 -E root_owner=0:0 -d "$SRC" "$WORK/root.img" "$SIZE"
zstd -q -f -"$LEVEL" -T0 "$WORK/root.img" -o "$WORK/root.zst"
"$BIN" prepare "$WORK" "$LEVEL"

now() { date +%s.%N; }
best_base=""; best_base_sync=""; best_inst=""; rss=0; best_base_cpu=""; best_inst_cpu=""
# Each timed step starts with no dirty pages left by the one before (`sync` first), and the
# baseline writes over an existing slot file of the right size, as the install does.
zstd -dc "$WORK/root.zst" > "$WORK/slot"
for r in $(seq "$ROUNDS"); do
  sync; t0=$(now); /usr/bin/time -f "%U %S" -o "$WORK/cpu" zstd -dc "$WORK/root.zst" 1<> "$WORK/slot"; t1=$(now)
  base=$(python3 -c "print($t1-$t0)")
  base_cpu=$(python3 -c "import sys; print(sum(map(float, open(sys.argv[1]).read().split()[-2:])))" "$WORK/cpu")
  sync; t0=$(now); zstd -dc "$WORK/root.zst" 1<> "$WORK/slot"; sync "$WORK/slot"; t1=$(now)
  base_sync=$(python3 -c "print($t1-$t0)")
  sync; line=$("$BIN" install "$WORK")
  inst=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['seconds'])" "$line")
  r_kib=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['peak_rss_kib'])" "$line")
  inst_cpu=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['cpu_seconds'])" "$line")
  echo "round $r: zstd -dc ${base}s (cpu ${base_cpu}s), zstd -dc + fsync ${base_sync}s, install ${inst}s (cpu ${inst_cpu}s), rss ${r_kib} KiB, load $(cut -d' ' -f1 /proc/loadavg)" >&2
  best_base_cpu=$(python3 -c "print(min(float(x) for x in '$best_base_cpu $base_cpu'.split()))")
  best_inst_cpu=$(python3 -c "print(min(float(x) for x in '$best_inst_cpu $inst_cpu'.split()))")
  best_base=$(python3 -c "print(min(float(x) for x in '$best_base $base'.split()))")
  best_base_sync=$(python3 -c "print(min(float(x) for x in '$best_base_sync $base_sync'.split()))")
  best_inst=$(python3 -c "print(min(float(x) for x in '$best_inst $inst'.split()))")
  rss=$(( r_kib > rss ? r_kib : rss ))
done

python3 - "$WORK" "$best_base" "$best_base_sync" "$best_inst" "$rss" "$LEVEL" "$best_base_cpu" "$best_inst_cpu" <<'EOF'
import os, sys
work, base, base_sync, inst, rss, level = sys.argv[1], *map(float, sys.argv[2:5]), int(sys.argv[5]), sys.argv[6]
base_cpu, inst_cpu = map(float, sys.argv[7:9])
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
EOF
