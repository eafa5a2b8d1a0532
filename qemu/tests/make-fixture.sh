#!/usr/bin/env bash
# Builds the disk image that the pi-qemu real-boot tests use, with no root and no loop devices:
#   p1 config  (FAT, 4 MiB)   autoboot.txt for "slot A committed", padded to 512 bytes
#   p2 boot_a  (FAT, 48 MiB)  kernel8.img, initramfs8, cmdline.txt, config.txt
#   p3 boot_b  (FAT, 48 MiB)  the same
#   p4 fixture_state (raw, 1 MiB)  step counter and action script of the fixture init
# The kernel is Debian's arm64 kernel and userspace is busybox-static (arm64), both taken
# from .deb files in the cache folder (downloaded with apt-get download when missing).
#
# Usage: qemu/tests/make-fixture.sh OUTDIR      (writes OUTDIR/disk.img; reuses it if newer
#                                               than this script and the fixture files)
# Env:   METRICA_DEB_CACHE  folder of .deb files (default: <workspace>/cache/debs)
# Needs: dpkg-deb, apt-get (only to download), cpio, gzip, sgdisk, mkfs.vfat, mcopy,
#        aarch64-linux-gnu-gcc (static, with libc6-dev-arm64-cross).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
workspace=$(cd "$here/../.." && pwd)
out=${1:?usage: make-fixture.sh OUTDIR}
cache=${METRICA_DEB_CACHE:-$workspace/cache/debs}
mkdir -p "$out" "$cache"
out=$(cd "$out" && pwd)

if [ -f "$out/disk.img" ] && [ "$out/disk.img" -nt "$0" ] \
  && [ "$out/disk.img" -nt "$here/fixture/init" ] && [ "$out/disk.img" -nt "$here/fixture/rebootarg.c" ]; then
  echo "make-fixture: $out/disk.img is up to date"
  exit 0
fi

for tool in dpkg-deb cpio gzip sgdisk mkfs.vfat mcopy aarch64-linux-gnu-gcc; do
  command -v "$tool" >/dev/null || { echo "make-fixture: missing tool: $tool" >&2; exit 1; }
done

find_deb() { find "$cache" -maxdepth 1 -name "$1" | sort -V | tail -n 1; }
kdeb=$(find_deb 'linux-image-6.1.0-*-arm64_*_arm64.deb')
bdeb=$(find_deb 'busybox-static_*_arm64.deb')
if [ -z "$kdeb" ] || [ -z "$bdeb" ]; then
  # Follow the meta package to the versioned kernel package.
  kpkg=$(apt-cache depends linux-image-arm64:arm64 | sed -n 's/^ *Depends: \(linux-image-6[^ ]*-arm64\).*/\1/p' | head -n 1)
  [ -n "$kpkg" ] || { echo "make-fixture: cannot resolve linux-image-arm64:arm64 (dpkg --add-architecture arm64 && apt-get update?)" >&2; exit 1; }
  echo "make-fixture: downloading $kpkg busybox-static:arm64 into $cache"
  (cd "$cache" && apt-get download "$kpkg" busybox-static:arm64 2> >(grep -v 'Permission denied' >&2))
  kdeb=$(find_deb 'linux-image-6.1.0-*-arm64_*_arm64.deb')
  bdeb=$(find_deb 'busybox-static_*_arm64.deb')
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dpkg-deb -x "$kdeb" "$work/k"
dpkg-deb -x "$bdeb" "$work/b"
kver=$(ls "$work/k/lib/modules")
echo "make-fixture: kernel $kver from $(basename "$kdeb"), busybox from $(basename "$bdeb")"

# initramfs: busybox, the reboot helper, /init and the few modules the fixture loads.
root=$work/root
mkdir -p "$root/bin" "$root/dev" "$root/proc" "$root/sys"
cp "$work/b/bin/busybox" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
aarch64-linux-gnu-gcc -static -Os -s -o "$root/bin/rebootarg" "$here/fixture/rebootarg.c"
install -m 0755 "$here/fixture/init" "$root/init"
for m in drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci_modern_dev \
         drivers/virtio/virtio_pci drivers/block/virtio_blk drivers/watchdog/i6300esb; do
  mkdir -p "$root/lib/modules/$kver/kernel/$(dirname "$m")"
  cp "$work/k/lib/modules/$kver/kernel/$m.ko" "$root/lib/modules/$kver/kernel/$m.ko"
done
(cd "$root" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 | gzip -9 -n) >"$work/initramfs8"

echo "console=ttyAMA0 panic=-1 quiet" >"$work/cmdline.txt"
printf 'arm_64bit=1\nkernel=kernel8.img\ninitramfs initramfs8 followkernel\n' >"$work/config.txt"
printf '[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n' >"$work/autoboot.txt"
# Pad autoboot.txt with newlines to 512 bytes, as the imager does.
size=$(stat -c %s "$work/autoboot.txt")
head -c $((512 - size)) /dev/zero | tr '\0' '\n' >>"$work/autoboot.txt"

mib=$((1024 * 1024))
fat() { # fat NAME MIB FILES...
  local img=$work/$1.fat; shift
  local size=$1; shift
  truncate -s $((size * mib)) "$img"
  mkfs.vfat -n "$(basename "$img" .fat | tr a-z A-Z)" "$img" >/dev/null
  mcopy -i "$img" "$@" ::/
}
fat config 4 "$work/autoboot.txt"
cp "$work/k/boot/vmlinuz-$kver" "$work/kernel8.img"
fat boot_a 48 "$work/kernel8.img" "$work/initramfs8" "$work/cmdline.txt" "$work/config.txt"
fat boot_b 48 "$work/kernel8.img" "$work/initramfs8" "$work/cmdline.txt" "$work/config.txt"

disk=$work/disk.img
truncate -s $((104 * mib)) "$disk"
sgdisk \
  -n 1:1M:+4M -t 1:0700 -c 1:config \
  -n 2:0:+48M -t 2:0700 -c 2:boot_a \
  -n 3:0:+48M -t 3:0700 -c 3:boot_b \
  -n 4:0:+1M -t 4:8300 -c 4:fixture_state \
  "$disk" >/dev/null
dd if="$work/config.fat" of="$disk" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$work/boot_a.fat" of="$disk" bs=1M seek=5 conv=notrunc,sparse status=none
dd if="$work/boot_b.fat" of="$disk" bs=1M seek=53 conv=notrunc,sparse status=none
cp "$work/kernel8.img" "$work/initramfs8" "$out/"
mv "$disk" "$out/disk.img"
echo "make-fixture: wrote $out/disk.img"
