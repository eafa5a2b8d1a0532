# Sourced by bench/flash.sh and bench/flash-card.sh: the benchmark image.
# make_image IMG SIZE_MIB MAPPED: a raw image of SIZE_MIB MiB in 64 MiB slots, of which the
# first MAPPED percent hold random data and the rest is a hole (a fresh image whose partitions
# are partly filled), with IMG's bmap beside it (bmaptool create: IMG with .bmap for .img).
# Sets MAPPED_BYTES and IMAGE_BYTES.
make_image() {
  local img=$1 size_mib=$2 mapped=$3 i
  rm -f "$img"
  truncate -s "${size_mib}M" "$img"
  local slots=$(( size_mib / 64 )) fill=$(( 64 * mapped / 100 ))
  for i in $(seq 0 $(( slots - 1 ))); do
    [ "$fill" -gt 0 ] || break
    head -c "$(( fill << 20 ))" /dev/urandom |
      dd of="$img" bs=1M seek=$(( i * 64 )) conv=notrunc,fsync status=none
  done
  bmaptool -q create "$img" -o "${img%.img}.bmap"
  MAPPED_BYTES=$(python3 -c "import re,sys; t=open(sys.argv[1]).read(); m=re.search(r'<MappedBlocksCount>\s*(\d+)', t); b=re.search(r'<BlockSize>\s*(\d+)', t); print(int(m[1])*int(b[1]))" "${img%.img}.bmap")
  IMAGE_BYTES=$(stat -c %s "$img")
}
