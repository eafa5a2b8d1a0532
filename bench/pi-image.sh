#!/usr/bin/env bash
# Raspberry Pi image benchmark (issue 14 item 8; docs/pi.md "Measured"), in one run:
# - `imager build recipes/pi-qemu.toml` from the cached bootstrap (and first, with --cold, with
#   the bootstrap made again: about 13 minutes more), with the sizes of what it made:
#   image (and mapped), root content, .img.zst, OS bundle;
# - QEMU start to `metrica-updater: healthy` of that image (systemd, Docker) against the lean
#   busybox image of recipes/qemu.toml booted the same way in the same run, as a ratio;
# - memory after boot of a copy provisioned with the test role, printed by a probe on a test
#   disk once start-up is done: MemAvailable and the sum of the processes' RSS (shared pages
#   counted in each, so an upper bound of userspace).
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

recipes/pi/role-bundles.sh arm64 out/pi-roles keys/dev.key roles/safe-mode qemu/roles/hello

# One build (ms), its log in $WORK/build.log.
build() {
  local start=$(date +%s%N)
  SOURCE_DATE_EPOCH=1700000000 "$IMAGER" build recipes/pi-qemu.toml -o "$WORK/out" \
    >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log" >&2; exit 1; }
  echo $(( ($(date +%s%N) - start) / 1000000 ))
}
# --cold: bootstrap again (about 13 minutes): the cached bootstraps are moved aside for the
# first build and put back if it fails.
cold=0
if [ "${1:-}" = --cold ]; then
  mkdir "$WORK/cache"
  mv cache/base/mmdebstrap-* "$WORK/cache/" 2>/dev/null || true
  trap 'mv -n "$WORK"/cache/* cache/base/ 2>/dev/null; rm -rf "$WORK"' EXIT
  cold=$(build)
  grep -q "base: cached" "$WORK/build.log" && { echo "bench: --cold build used a cache" >&2; exit 1; }
  rm -rf "$WORK/out"
fi
build=$(build)
grep -q "base: cached" "$WORK/build.log" || echo "note: this build bootstrapped the root (cold)"

# The booted copy is provisioned with the test role, so that the daemon starts it from the
# baked bundle and the memory probe sees the whole userspace: systemd, Docker, the daemon and
# the role's container.
cp --sparse=always "$WORK/out/metrica-pi-qemu-1.0.0.img" "$WORK/provisioned.img"
printf '%s\n' 'device_id = "bench-0001"' 'role = "hello"' 'segment = "canary"' 'hostname = "bench-0001"' \
  '[channel]' 'name = "stable"' 'url = "https://updates.example.com/fleet"' >"$WORK/device.toml"
"$IMAGER" provision "$WORK/provisioned.img" --device "$WORK/device.toml" --yes >/dev/null

# The probe: run by the Pi image's test hook unit once the updater's boot step is done; it
# waits for start-up to finish (the daemon says READY=1 once the role is up).
cat >"$WORK/hook.sh" <<'EOF'
systemctl is-system-running --wait >/dev/null
echo "probe: role $(updater role status | grep '^role hello')"
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
  "$PIQEMU" boot "$disk" --memory 1024 --cpus 2 --max-boots 1 --ready "metrica-updater: healthy" \
    --until "$2" ${3:+--extra-disk "$3"} --log-dir "$WORK/log" --json >"$WORK/run.json"
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["boots"][0]["ready_ms"])' "$WORK/run.json"
}
lean=$(boot "$BUSYBOX_IMG" "metrica-updater: healthy")
pi=$(boot "$WORK/provisioned.img" "probe: end" "$WORK/probe.img")
grep -a "probe: role" "$WORK/log/console.log" | tail -n 1 | sed 's/.*probe: //' >&2
mem=$(grep -a "probe: mem" "$WORK/log/console.log" | tail -n 1 | sed 's/.*probe: mem //')
rss=$(grep -a "probe: rss" "$WORK/log/console.log" | tail -n 1 | sed 's/.*probe: rss //')

python3 - "$WORK/out" "$build" "$lean" "$pi" "$mem" "$rss" "$cold" <<'EOF'
import json, os, sys
out, build, lean, pi, mem, rss, cold = sys.argv[1:]
mib = lambda b: f"{b / 2**20:.1f} MiB"
m = json.load(open(os.path.join(out, "metrica-pi-qemu-1.0.0.manifest.json")))
img = os.path.join(out, "metrica-pi-qemu-1.0.0.img")
st = os.stat(img)
if int(cold):
    print(f"build with a cold bootstrap       {int(cold) / 1000:6.1f} s")
print(f"build from the cached bootstrap   {int(build) / 1000:6.1f} s")
print(f"image                             {mib(st.st_size)}, {mib(st.st_blocks * 512)} mapped")
print(f"root content                      {mib(m['root_content_bytes'])}")
for ext in ("img.zst", "mfb"):
    p = os.path.join(out, f"metrica-pi-qemu-1.0.0.{ext}")
    print(f"{ext:<34}{mib(os.path.getsize(p))}")
lean, pi = int(lean) / 1000, int(pi) / 1000
print(f"QEMU start to healthy, busybox    {lean:6.1f} s  (TCG, 2 vCPUs, 1 GiB)")
print(f"QEMU start to healthy, Pi root    {pi:6.1f} s  (target <= 60 s; ratio {pi / lean:.2f}x the busybox image)")
print(f"memory after boot (kB)            {mem}; RSS sum {rss} kB")
EOF
