#!/usr/bin/env bash
# Builds the signed bundles (.mfr) of the roles whose only image is metrica.invalid/busybox:
# the safe-mode stack (roles/safe-mode) and the QEMU Pi image's test role (qemu/roles/hello).
# The image is made here, with no registry: Debian's busybox-static for ARCH (apt-get
# download; arm64 needs `dpkg --add-architecture arm64`, which .ci/setup does), unpacked into
# an empty root with the applets the roles use, `docker import`ed and marked ARCH, then saved
# (`docker save`) beside the bundles and passed to `imager role build --images`.
#
#   recipes/pi/role-bundles.sh ARCH OUT [KEY ROLE_DIR...]
#   recipes/pi/role-bundles.sh arm64 out/pi-roles keys/dev.key roles/safe-mode qemu/roles/hello
#
# Without KEY it only saves the image (OUT/busybox-VERSION-ARCH.tar), as the Docker tests use it.
# Bundles are not byte-reproducible: `docker import` stamps the image with the time of import.
set -euo pipefail
usage="usage: role-bundles.sh ARCH OUT [KEY ROLE_DIR...]"
arch=${1:?$usage}
out=${2:?$usage}
key=${3:-}
shift $(( $# < 3 ? $# : 3 ))
if [ -n "$key" ] && [ $# -eq 0 ]; then echo "role-bundles: KEY but no role folder; $usage" >&2; exit 2; fi
repo=$(cd "$(dirname "$0")/../.." && pwd)
imager=${IMAGER:-$repo/target/debug/imager}
# The tag every role.toml lists in [images]; the package's upstream version must match it.
version=1.35.0
tag=metrica.invalid/busybox:$version
applets=(sh httpd nc wget cat printf echo test env ls mkdir sleep)

[ -z "$key" ] || [ -x "$imager" ] || { echo "role-bundles: $imager is missing: cargo build -p imager" >&2; exit 1; }
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# apt's download user (_apt) must be able to write there.
chmod 0755 "$work"
mkdir -m 0777 "$work/deb"
(cd "$work/deb" && apt-get download -q "busybox-static:$arch" >/dev/null) || {
  echo "role-bundles: apt-get download busybox-static:$arch failed (for arm64 on an amd64 host: dpkg --add-architecture arm64 && apt-get update)" >&2
  exit 1
}
deb=$(echo "$work"/deb/busybox-static_*.deb)
got=$(dpkg-deb -f "$deb" Version)
case "$got" in
  *:"$version"-*) ;;
  *) echo "role-bundles: busybox-static $got is not $version, the version the roles' [images] name ($tag)" >&2; exit 1 ;;
esac
dpkg-deb -x "$deb" "$work/pkg"
root=$work/root
mkdir -p "$root/bin" "$root/tmp" "$root/www"
cp "$work/pkg/bin/busybox" "$root/bin/busybox"
for a in "${applets[@]}"; do ln -s busybox "$root/bin/$a"; done
tar -C "$root" --owner=0 --group=0 --sort=name -c . |
  docker import --platform "linux/$arch" --change 'ENV PATH=/bin' --change 'CMD ["/bin/sh"]' \
    - "$tag" >/dev/null
images=$out/busybox-$version-$arch.tar
docker save --output "$work/saved.tar" "$tag"
# `docker import --platform` needs an experimental engine (bookworm's 20.10 is not), so the
# image is stamped with the host's architecture: set ARCH in its config, which renames the
# config (its name is its sha256, the image ID) in manifest.json. `docker load` accepts it.
python3 - "$work/saved.tar" "$images" "$arch" <<'PY'
import hashlib, io, json, sys, tarfile
src, dst, arch = sys.argv[1:]
with tarfile.open(src) as t:
    files = [(m, t.extractfile(m).read() if m.isfile() else None) for m in t.getmembers()]
data = {m.name: b for m, b in files}
manifest = json.loads(data["manifest.json"])
old = manifest[0]["Config"]
config = json.loads(data[old])
config["architecture"] = arch
new_bytes = json.dumps(config, separators=(",", ":")).encode()
new = hashlib.sha256(new_bytes).hexdigest() + ".json"
manifest[0]["Config"] = new
replaced = {old: (new, new_bytes), "manifest.json": ("manifest.json", json.dumps(manifest).encode())}
with tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as out:
    for m, b in files:
        if m.name in replaced:
            m.name, b = replaced[m.name]
            m.size = len(b)
        out.addfile(m, io.BytesIO(b) if b is not None else None)
PY
echo "role-bundles: $tag ($arch, busybox-static $got) -> $images"
for dir in "$@"; do
  "$imager" role build "$dir" --key "$key" --output "$out" --images "$images"
done
