#!/usr/bin/env bash
# Pi root benchmark (issue 14 item 1; docs/recipes.md "[base]"): how long `imager build` takes
# to turn a realistic Debian root (trixie arm64, variant apt, with systemd, udev, kmod,
# docker.io, docker-cli) into an image, step by step (the plain progress lines: "assembling
# root" is the tarball into the tree, "populating root_a" is debugfs writing the ext4 root).
#
# The root comes from a `[base] type = "mmdebstrap"` recipe: the first run bootstraps it
# (minutes; needs the network and qemu-user binfmt for arm64) into BENCH_CACHE (default
# cache/base), later runs take it from there with --offline. BENCH_TARBALL=FILE uses a ready
# root tarball instead (a `tarball` base). Uses the debug imager unless BENCH_RELEASE=1.
set -euo pipefail
cd "$(dirname "$0")/.."
TOP=$PWD
WORK=$(mktemp -d /var/tmp/metrica-bench-pi.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
if [ "${BENCH_RELEASE:-0}" = 1 ]; then
  cargo build --quiet --release -p imager
  IMAGER=${CARGO_TARGET_DIR:-target}/release/imager
else
  cargo build --quiet -p imager
  IMAGER=${CARGO_TARGET_DIR:-target}/debug/imager
fi
mkdir -p "$WORK/recipes"
head -c 100000 /dev/zero > "$WORK/recipes/kernel"
printf 'arm_64bit=1\n' > "$WORK/recipes/config.txt"
if [ -n "${BENCH_TARBALL:-}" ]; then
  BASE=$(printf '[base]\ntype = "tarball"\npath = "%s"\n' "$(realpath "$BENCH_TARBALL")")
  OFFLINE=""
else
  BASE=$(printf '[base]\ntype = "mmdebstrap"\nsuite = "trixie"\narchitecture = "arm64"\npackages = ["systemd", "udev", "kmod", "docker.io", "docker-cli"]\ncache = "%s"\n' "$(realpath -m "${BENCH_CACHE:-$TOP/cache/base}")")
  OFFLINE="--offline"
fi
cat > "$WORK/recipes/pi-root.toml" <<RECIPE
name = "pi-root"
version = "1.0.0"
compatible = "metrica-bench-arm64"
[partitions]
config = "16MiB"
boot_a = "32MiB"
boot_b = "32MiB"
root_a = "1GiB"
root_b = "1GiB"
provision = "16MiB"
data = "32MiB"
$BASE
[boot]
kernel = "kernel"
config_txt = "config.txt"
cmdline = "quiet"
RECIPE
build() {
  rm -rf "$WORK/out"
  SOURCE_DATE_EPOCH=1700000000 "$IMAGER" build "$WORK/recipes/pi-root.toml" -o "$WORK/out" --no-bundle "$@" 2>&1 | cat
}
if [ -n "$OFFLINE" ]; then
  echo "== first build (bootstraps unless cached)"
  build
fi
echo "== build from the cached root"
build $OFFLINE
grep -o '"root_files": [0-9]*\|"root_content_bytes": [0-9]*' "$WORK/out/pi-root-1.0.0.manifest.json"
