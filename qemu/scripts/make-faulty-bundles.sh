#!/usr/bin/env bash
# Makes signed OS bundles that really contain a fault, for the pi-qemu scenarios (docs/qemu.md,
# "Fault bundles"). Each starts from a sparse copy of the v2 image, changes one file in the
# copy's boot_a (FAT, with mtools on the image at the partition's offset) or root_a (ext4, with
# `debugfs -w` on the partition extracted with dd, then written back), and is bundled and
# signed by `imager bundle` exactly like a release. No root, no mounts, no loop devices.
#
#   bad-kernel.mfb  boot: initramfs8 is garbage; the kernel finds no /init and no root device
#                   and panics ("VFS: Unable to mount root fs"; panic=1 resets it)
#   bad-init.mfb    root: /sbin/init exits 1 at once ("Attempted to kill init!", a panic)
#   hang.mfb        root: /sbin/init prints a line and sleeps forever before `updater boot`,
#                   so nothing feeds the watchdog the initramfs armed
#   unhealthy.mfb   root: /etc/metrica/health.d/50-always-fails exits 1, so the trial's health
#                   checks never pass and the updater reboots out of the trial at its deadline
#   v3.mfb          root: a good image whose release says 3.0.0 (a newer version to install
#                   after the power-cut tests, whatever slot they left committed)
#
# Usage: make-faulty-bundles.sh V2_IMAGE SIGNING_KEY OUT_DIR [IMAGER]
# The security epoch is taken from the v2 bundle beside V2_IMAGE (V2_IMAGE without .img, plus
# .mfb); the manifest time from SOURCE_DATE_EPOCH, else the image's build epoch.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin
export LC_ALL=C

if [ $# -lt 3 ]; then
    echo "usage: $0 V2_IMAGE SIGNING_KEY OUT_DIR [IMAGER]" >&2
    exit 2
fi
image=$1
key=$2
out=$3
imager=${4:-imager}
v2_bundle=${image%.img}.mfb

die() { echo "make-faulty-bundles: error: $*" >&2; exit 1; }
for tool in partx dd mcopy debugfs tar cp; do
    command -v "$tool" >/dev/null || die "$tool not found (install mtools, e2fsprogs, util-linux)"
done
[ -f "$image" ] || die "no image $image"
[ -f "$key" ] || die "no signing key $key (make one with: imager keygen --dir keys --name dev)"
[ -f "$v2_bundle" ] || die "no bundle $v2_bundle beside the image"

epoch=$(tar -xOf "$v2_bundle" manifest.toml | sed -n 's/^security_epoch *= *\([0-9]*\).*/\1/p')
[ -n "$epoch" ] || die "no security_epoch in the manifest of $v2_bundle"

mkdir -p "$out"
work=$(mktemp -d "$out/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Byte offset and size of a partition, by GPT name.
part() {
    local line
    line=$(partx --show --bytes --noheadings --output START,SECTORS,NAME "$1" | awk -v n="$2" '$3 == n')
    [ -n "$line" ] || die "$1 has no partition $2"
    set -- $line
    echo "$(($1 * 512)) $(($2 * 512))"
}

# Runs debugfs commands (stdin) on root_a of an image, in place: extract, edit, write back.
edit_root() {
    local img=$1 offset size
    read -r offset size < <(part "$img" root_a)
    dd if="$img" of="$work/root.ext4" bs=1M iflag=skip_bytes,count_bytes \
        skip="$offset" count="$size" status=none
    debugfs -w -f - "$work/root.ext4" >"$work/debugfs.log" 2>&1
    dd if="$work/root.ext4" of="$img" bs=1M oflag=seek_bytes seek="$offset" \
        conv=notrunc,sparse status=none
    rm -f "$work/root.ext4"
}

# debugfs exits 0 even when a command fails: read the file back and compare.
root_file_is() {
    local img=$1 path=$2 expected=$3 offset size
    read -r offset size < <(part "$img" root_a)
    dd if="$img" of="$work/check.ext4" bs=1M iflag=skip_bytes,count_bytes \
        skip="$offset" count="$size" status=none
    debugfs -R "cat $path" "$work/check.ext4" 2>/dev/null | cmp -s - "$expected" ||
        die "$path in root_a of $img is not what was written (debugfs: $(tr '\n' ' ' <"$work/debugfs.log"))"
    debugfs -R "stat $path" "$work/check.ext4" 2>/dev/null | grep -q 'Mode:  *0755' ||
        die "$path in root_a of $img is not mode 0755"
    rm -f "$work/check.ext4"
}

root_cat() {
    local img=$1 path=$2 offset size
    read -r offset size < <(part "$img" root_a)
    dd if="$img" of="$work/cat.ext4" bs=1M iflag=skip_bytes,count_bytes \
        skip="$offset" count="$size" status=none
    debugfs -R "cat $path" "$work/cat.ext4" 2>/dev/null
    rm -f "$work/cat.ext4"
}

build_epoch=$(root_cat "$image" /etc/metrica/release.toml | sed -n 's/^build_epoch *= *\([0-9]*\).*/\1/p')
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-${build_epoch:-0}}

copy() {
    cp --sparse=always "$image" "$work/$1.img"
    echo "$work/$1.img"
}

bundle() {
    local img=$1 name=$2
    "$imager" bundle "$img" --key "$key" --security-epoch "$epoch" -o "$out/$name.mfb.tmp" \
        >"$work/bundle.log" 2>&1 || die "imager bundle $name failed: $(cat "$work/bundle.log")"
    mv "$out/$name.mfb.tmp" "$out/$name.mfb"
    rm -f "$img"
    echo "made $out/$name.mfb"
}

# A file for root_a, owned by root with mode 0755.
write_exec() { # DEBUGFS_PATH LOCAL_FILE
    printf 'rm %s\nwrite %s %s\nsif %s mode 0100755\nsif %s uid 0\nsif %s gid 0\n' \
        "$1" "$2" "$1" "$1" "$1" "$1"
}

# bad-kernel: garbage where the initramfs should be.
img=$(copy bad-kernel)
read -r offset _ < <(part "$img" boot_a)
{ yes 'metrica fault injection: this is not an initramfs' || true; } | head -c 65536 >"$work/initramfs8"
mcopy -o -i "$img@@$offset" "$work/initramfs8" ::initramfs8
mcopy -n -i "$img@@$offset" ::initramfs8 "$work/initramfs8.back"
cmp -s "$work/initramfs8" "$work/initramfs8.back" || die "initramfs8 was not replaced in boot_a"
bundle "$img" bad-kernel

# bad-init: /sbin/init exits at once.
img=$(copy bad-init)
printf '#!/bin/sh\necho "metrica-fault: this init exits with 1"\nexit 1\n' >"$work/init"
write_exec /sbin/init "$work/init" | edit_root "$img"
root_file_is "$img" /sbin/init "$work/init"
bundle "$img" bad-init

# hang: /sbin/init never gets to `updater boot` and never feeds the watchdog.
img=$(copy hang)
printf '#!/bin/sh\necho "metrica-fault: this init hangs before updater boot"\nwhile :; do sleep 3600; done\n' >"$work/init"
write_exec /sbin/init "$work/init" | edit_root "$img"
root_file_is "$img" /sbin/init "$work/init"
bundle "$img" hang

# unhealthy: a health check that always fails.
img=$(copy unhealthy)
printf '#!/bin/sh\necho "metrica-fault: this health check always fails" >&2\nexit 1\n' >"$work/check"
{
    echo "mkdir /etc/metrica/health.d"
    echo "sif /etc/metrica/health.d uid 0"
    echo "sif /etc/metrica/health.d gid 0"
    write_exec /etc/metrica/health.d/50-always-fails "$work/check"
} | edit_root "$img"
root_file_is "$img" /etc/metrica/health.d/50-always-fails "$work/check"
bundle "$img" unhealthy

# v3: a good, newer version (release.toml and os-release say 3.0.0).
img=$(copy v3)
root_cat "$img" /etc/metrica/release.toml | sed 's/^version *=.*/version = "3.0.0"/' >"$work/release.toml"
root_cat "$img" /etc/os-release | sed 's/^VERSION_ID=.*/VERSION_ID=3.0.0/; s/^VERSION=.*/VERSION="3.0.0"/' >"$work/os-release"
grep -q '^version = "3.0.0"' "$work/release.toml" || die "no version in release.toml"
printf 'rm %s\nwrite %s %s\nsif %s mode 0100644\nsif %s uid 0\nsif %s gid 0\n' \
    /etc/metrica/release.toml "$work/release.toml" /etc/metrica/release.toml \
    /etc/metrica/release.toml /etc/metrica/release.toml /etc/metrica/release.toml >"$work/cmds"
printf 'rm %s\nwrite %s %s\nsif %s mode 0100644\nsif %s uid 0\nsif %s gid 0\n' \
    /etc/os-release "$work/os-release" /etc/os-release /etc/os-release /etc/os-release \
    /etc/os-release >>"$work/cmds"
edit_root "$img" <"$work/cmds"
root_cat "$img" /etc/metrica/release.toml | cmp -s - "$work/release.toml" ||
    die "release.toml was not replaced in root_a"
bundle "$img" v3
