#!/bin/bash
# Lazy reading with deferfs: a 64 GiB sparse file with a few MiB of data
# scattered through it opens and serves its first 4 KiB at once, and reading a
# few scattered blocks loads only those blocks (plus the kernel's readahead)
# from the source, never the whole file.
#
# Usage (as root, from anywhere):  examples/lazy-read-demo.sh
# Environment: DEFERFS  the deferfs binary (default: ../build/src/deferfs
#                       next to this script)
#              TMPDIR   where the temporary source and mount point go; it
#                       must hold sparse files (tmpfs, ext4, XFS, btrfs do)
set -euo pipefail

DEFERFS=${DEFERFS:-$(dirname "$0")/../build/src/deferfs}
if ! command -v "$DEFERFS" >/dev/null 2>&1; then
  echo "lazy-read-demo: no deferfs binary at $DEFERFS (build it, or set DEFERFS)" >&2
  exit 2
fi

work=$(mktemp -d -t deferfs-lazy.XXXXXX)
src=$work/src
mnt=$work/mnt
mkdir "$src" "$mnt"

# On any exit: detach the mount if it is still there (lazily, so a busy
# mount cannot block us), then remove the temporary files, but never
# through a mount that is still attached.
cleanup() {
  local status=$?
  trap - EXIT
  if mountpoint -q "$mnt" 2>/dev/null; then
    fusermount3 -uz "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
  fi
  if mountpoint -q "$mnt" 2>/dev/null; then
    echo "lazy-read-demo: $mnt is still mounted; leaving $work in place" >&2
  else
    rm -rf "$work"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

wait_until() {  # wait_until mounted|unmounted DIR: up to 10 s
  local i
  for ((i = 0; i < 100; i++)); do
    if [[ $1 == mounted ]] && mountpoint -q "$2"; then return 0; fi
    if [[ $1 == unmounted ]] && ! mountpoint -q "$2"; then return 0; fi
    sleep 0.1
  done
  echo "lazy-read-demo: $2 not $1 after 10 s" >&2
  return 1
}

now_us() { local t=${EPOCHREALTIME/[.,]/}; echo "$((10#$t))"; }

block=4096
blocks_per_8g=$((8 * 1024 * 1024 * 1024 / block))   # 2097152
file=$src/big.img

echo "== source: a 64 GiB sparse file with 8 chunks of 512 KiB of random data, one every 8 GiB"
truncate -s 64G "$file"
for i in 0 1 2 3 4 5 6 7; do
  # seek is in 512 KiB units: 16384 of them make 8 GiB
  dd if=/dev/urandom of="$file" bs=512K count=1 seek=$((i * 16384)) \
     conv=notrunc iflag=fullblock status=none
done
echo "apparent size: $(du -h --apparent-size "$file" | cut -f1)   on disk: $(du -h "$file" | cut -f1)"

echo
echo "== mounting $src on $mnt"
"$DEFERFS" "$src" "$mnt"
wait_until mounted "$mnt"

echo
echo "== deferfs stats, before any read"
"$DEFERFS" stats "$mnt"

echo
echo "== open + read of the first 4 KiB through the mount"
t0=$(now_us)
dd if="$mnt/big.img" of=/dev/null bs=$block count=1 status=none
t1=$(now_us)
us=$((t1 - t0))
printf 'took %d.%03d ms (including starting dd)\n' $((us / 1000)) $((us % 1000))

echo
echo "== reading scattered 4 KiB blocks and checking them against the source"
# block numbers: inside data chunks 1, 3, 5 and 7, in a hole, and the last block
for b in $((1 * blocks_per_8g + 5)) $((3 * blocks_per_8g + 100)) \
         $((5 * blocks_per_8g + 64)) $((7 * blocks_per_8g + 127)) \
         $((2 * blocks_per_8g + 1000)) $((8 * blocks_per_8g - 1)); do
  t0=$(now_us)
  if cmp -s <(dd if="$mnt/big.img" bs=$block count=1 skip="$b" status=none) \
            <(dd if="$file" bs=$block count=1 skip="$b" status=none); then
    same="same as the source"
  else
    same="DIFFERS from the source"
  fi
  t1=$(now_us)
  us=$((t1 - t0))
  printf 'offset %6d MiB: %s (%d.%03d ms for both reads)\n' \
    $((b * block / 1048576)) "$same" $((us / 1000)) $((us % 1000))
done

echo
echo "== deferfs stats, after the reads"
echo "   (loaded_bytes: what was read from the source; a few blocks plus the"
echo "    kernel's readahead, not 64 GiB. Holes are served as zeros, not loaded.)"
"$DEFERFS" stats "$mnt"

echo
echo "== unmounting"
"$DEFERFS" umount "$mnt"
wait_until unmounted "$mnt"
echo "done"
