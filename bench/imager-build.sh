#!/usr/bin/env bash
# Build benchmark (issue 3 item 10; docs/imager.md "Benchmark"):
#   `imager build recipes/qemu.toml`  vs  the same work done with plain tools in the same run:
#   unpack the same packages and overlays into a folder, cpio+gzip the initramfs, mke2fs -d for
#   the two roots and data, mkfs.vfat + mcopy for the four FAT partitions, sgdisk for the GPT,
#   dd into the image, zstd -T0 of the image.
# Prints both times (best of BENCH_ROUNDS, default 3) and the ratio (target <= 1.3).
# Needs the cross-built updater (.ci/cross-updater) and the recipe's packages (fetched by a
# first `imager build`).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${BENCH_ROUNDS:-3}
EPOCH=1700000000
WORK=$(mktemp -d /var/tmp/metrica-bench-build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
PATH=$PATH:/usr/sbin:/sbin

cargo build --quiet --release -p imager
IMAGER=${CARGO_TARGET_DIR:-target}/release/imager
UPDATER=target/cross/aarch64-unknown-linux-gnu/release/updater
[ -x "$UPDATER" ] || { echo "bench: build the updater first: .ci/cross-updater" >&2; exit 1; }
# Warm-up build: fills the package cache, so neither side downloads.
SOURCE_DATE_EPOCH=$EPOCH "$IMAGER" build recipes/qemu.toml -o "$WORK/warm" >/dev/null 2>&1

KVER=6.1.0-50-arm64
KDEB=$(ls cache/debs/linux-image-${KVER}_*.deb)
BBDEB=$(ls cache/debs/busybox-static_*.deb)
MODULES="virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk crc16 mbcache crc32c_generic jbd2 ext4 fat vfat nls_cp437 nls_ascii i6300esb"

imager_run() {
  rm -rf "$WORK/out"
  # The baseline makes no bundle, so neither does this side.
  SOURCE_DATE_EPOCH=$EPOCH "$IMAGER" build recipes/qemu.toml -o "$WORK/out" --no-bundle
}

baseline_run() {
  local b=$WORK/base
  rm -rf "$b"; mkdir -p "$b/root/bin" "$b/root/usr/bin" "$b/root/etc/metrica" "$b/ird" "$b/k" "$b/fat"
  # Root tree: the same packages, overlays and files as the recipe.
  dpkg-deb --fsys-tarfile "$BBDEB" | tar -x -C "$b/root" ./bin/busybox
  cp -a overlays/base/. overlays/qemu/. "$b/root/"
  install -m 0755 "$UPDATER" "$b/root/usr/bin/updater"
  for n in sh mount umount sleep cat echo; do ln -s busybox "$b/root/bin/$n"; done
  mkdir -p "$b/root/data" "$b/root/proc" "$b/root/sys" "$b/root/dev" "$b/root/run" "$b/root/tmp"
  printf 'name = "metrica-qemu"\n' > "$b/root/etc/metrica/release.toml"
  # Kernel and modules, initramfs.
  dpkg-deb --fsys-tarfile "$KDEB" | tar -x -C "$b/k" ./boot/vmlinuz-$KVER --wildcards $(for m in $MODULES; do echo "*/$m.ko"; done)
  mkdir -p "$b/ird/bin" "$b/ird/lib/modules" "$b/ird/etc"
  cp recipes/qemu/initramfs-init "$b/ird/init"; cp "$b/root/bin/busybox" "$b/root/usr/bin/updater" "$b/ird/bin/"
  for m in $MODULES; do find "$b/k" -name "$m.ko" -exec cp {} "$b/ird/lib/modules/" \; ; echo "$m" >> "$b/ird/etc/modules.order"; done
  (cd "$b/ird" && find . | sort | cpio -o -H newc --quiet | gzip -6 > "$b/fat/initramfs8")
  cp "$b/k/boot/vmlinuz-$KVER" "$b/fat/kernel8.img"; cp recipes/qemu/config.txt "$b/fat/"
  echo "console=ttyAMA0 root=PARTUUID=x" > "$b/fat/cmdline.txt"
  printf '[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n' > "$b/autoboot.txt"
  # Filesystems.
  for r in root_a root_b; do mke2fs -q -F -t ext4 -O ^has_journal -E root_owner=0:0 -d "$b/root" "$b/$r.ext4" 128M; done
  mke2fs -q -F -t ext4 -E root_owner=0:0 "$b/data.ext4" 128M
  for f in config boot_a boot_b provision; do
    local size=16; case $f in boot_*) size=64;; esac
    truncate -s ${size}M "$b/$f.fat"; mkfs.vfat -n "${f^^}" "$b/$f.fat" >/dev/null
  done
  mcopy -i "$b/config.fat" "$b/autoboot.txt" ::
  for f in boot_a boot_b; do mcopy -i "$b/$f.fat" "$b/fat/"* ::; done
  # GPT and the disk.
  truncate -s 556M "$b/disk.img"
  sgdisk -a 8192 -n1:4M:+16M -c1:config -n2:0:+64M -c2:boot_a -n3:0:+64M -c3:boot_b \
    -n4:0:+128M -c4:root_a -n5:0:+128M -c5:root_b -n6:0:+16M -c6:provision -n7:0:+128M -c7:data "$b/disk.img" >/dev/null
  local off=4
  for p in config:16 boot_a:64 boot_b:64 root_a:128 root_b:128 provision:16 data:128; do
    local name=${p%%:*} size=${p##*:} file
    file=$(ls "$b/$name".*)
    dd if="$file" of="$b/disk.img" bs=1M seek=$off conv=notrunc,sparse status=none
    off=$((off + size))
  done
  zstd -q -3 -T0 "$b/disk.img" -o "$b/disk.img.zst"
}

best() {
  local fn=$1 best=""
  for _ in $(seq "$ROUNDS"); do
    local t0 t1 t
    t0=$(date +%s.%N); "$fn" >"$WORK/$fn.log" 2>&1 || { cat "$WORK/$fn.log" >&2; exit 1; }; t1=$(date +%s.%N)
    t=$(echo "$t1 - $t0" | bc)
    if [ -z "$best" ] || [ "$(echo "$t < $best" | bc)" = 1 ]; then best=$t; fi
  done
  echo "$best"
}

t_imager=$(best imager_run)
t_base=$(best baseline_run)
ratio=$(echo "scale=2; $t_imager / $t_base" | bc)
printf 'imager build recipes/qemu.toml: %.2f s (best of %d)\n' "$t_imager" "$ROUNDS"
printf 'plain-tools baseline:           %.2f s (best of %d)\n' "$t_base" "$ROUNDS"
printf 'ratio imager/baseline:          %s (target <= 1.3)\n' "$ratio"
