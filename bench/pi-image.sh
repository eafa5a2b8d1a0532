#!/usr/bin/env bash
# Raspberry Pi image benchmark (issue 14 item 8; docs/pi.md "Measured"), in one run:
# - `imager build recipes/pi-qemu.toml` from the cached bootstrap (a cold bootstrap is timed by
#   the first build on a machine, and by tier 6 of .ci/test), with the sizes of what it made:
#   image (and mapped), root content, .img.zst, OS bundle;
# - QEMU start to `metrica-updater: healthy` of that image (systemd, Docker) against the lean
#   busybox image of recipes/qemu.toml booted the same way in the same run, as a ratio;
# - memory after boot, printed by a probe on a test disk: MemAvailable and the sum of the
#   processes' RSS (shared pages counted in each, so an upper bound of userspace).
# Needs .ci/setup, the cross-built updater (.ci/cross-updater), keys/dev.key, and out/qemu
# (the busybox image, as .ci/test builds it).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d /var/tmp/metrica-bench-pi.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
PATH=$PATH:/usr/sbin:/sbin
cargo build --quiet -p imager -p qemu
IMAGER=${CARGO_TARGET_DIR:-target}/debug/imager
PIQEMU=${CARGO_TARGET_DIR:-target}/debug/pi-qemu
BUSYBOX_IMG=$(ls out/qemu/metrica-qemu-1.0.0.img 2>/dev/null) ||
  { echo "bench: build out/qemu first (docs/testing.md)" >&2; exit 1; }

start=$(date +%s%N)
SOURCE_DATE_EPOCH=1700000000 "$IMAGER" build recipes/pi-qemu.toml -o "$WORK/out" >"$WORK/build.log" 2>&1 ||
  { cat "$WORK/build.log" >&2; exit 1; }
build=$(( ($(date +%s%N) - start) / 1000000 ))
grep -q "base: cached" "$WORK/build.log" || echo "note: this build bootstrapped the root (cold)"

# The probe: run by the Pi image's test hook unit once the updater's boot step is done.
cat >"$WORK/hook.sh" <<'EOF'
echo "probe: mem $(awk '/MemTotal|MemAvailable/ {printf "%s %s ", $1, $2}' /proc/meminfo)"
echo "probe: rss $(ps -eo rss= | awk '{s+=$1} END {print s}')"
echo "probe: end"
EOF
truncate -s 16M "$WORK/probe.img"
mkfs.vfat -n PROBE "$WORK/probe.img" >/dev/null
mcopy -i "$WORK/probe.img" "$WORK/hook.sh" ::hook.sh

# QEMU start to the healthy line (ms), from the run report.
boot() { # DISK UNTIL [EXTRA_DISK] -> ready_ms
  local disk=$WORK/boot.img
  cp --sparse=always "$1" "$disk"
  "$PIQEMU" boot "$disk" --memory 1024 --max-boots 1 --ready "metrica-updater: healthy" \
    --until "$2" ${3:+--extra-disk "$3"} --log-dir "$WORK/log" --json >"$WORK/run.json"
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["boots"][0]["ready_ms"])' "$WORK/run.json"
}
lean=$(boot "$BUSYBOX_IMG" "metrica-updater: healthy")
pi=$(boot "$WORK/out/metrica-pi-qemu-1.0.0.img" "probe: end" "$WORK/probe.img")
mem=$(grep -a "probe: mem" "$WORK/log/console.log" | tail -n 1 | sed 's/.*probe: mem //')
rss=$(grep -a "probe: rss" "$WORK/log/console.log" | tail -n 1 | sed 's/.*probe: rss //')

python3 - "$WORK/out" "$build" "$lean" "$pi" "$mem" "$rss" <<'EOF'
import json, os, sys
out, build, lean, pi, mem, rss = sys.argv[1:]
mib = lambda b: f"{b / 2**20:.1f} MiB"
m = json.load(open(os.path.join(out, "metrica-pi-qemu-1.0.0.manifest.json")))
img = os.path.join(out, "metrica-pi-qemu-1.0.0.img")
st = os.stat(img)
print(f"build from the cached bootstrap   {int(build) / 1000:6.1f} s")
print(f"image                             {mib(st.st_size)}, {mib(st.st_blocks * 512)} mapped")
print(f"root content                      {mib(m['root_content_bytes'])}")
for ext in ("img.zst", "mfb"):
    p = os.path.join(out, f"metrica-pi-qemu-1.0.0.{ext}")
    print(f"{ext:<34}{mib(os.path.getsize(p))}")
lean, pi = int(lean) / 1000, int(pi) / 1000
print(f"QEMU start to healthy, busybox    {lean:6.1f} s")
print(f"QEMU start to healthy, Pi root    {pi:6.1f} s  (target <= 60 s; ratio {pi / lean:.2f}x the busybox image)")
print(f"memory after boot (kB)            {mem}; RSS sum {rss} kB")
EOF
