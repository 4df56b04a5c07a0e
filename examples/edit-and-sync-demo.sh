#!/bin/bash
# Staged writes with deferfs: edit three pages of a 64 MiB file through the
# mount, see that only the mount shows the edit while the source is
# unchanged, commit with `deferfs sync`, and see exactly those three pages
# change in the source.
#
# Usage (as root, from anywhere):  examples/edit-and-sync-demo.sh
# Environment: DEFERFS  the deferfs binary (default: ../build/src/deferfs
#                       next to this script)
#              TMPDIR   where the temporary source and mount point go
set -euo pipefail

DEFERFS=${DEFERFS:-$(dirname "$0")/../build/src/deferfs}
if ! command -v "$DEFERFS" >/dev/null 2>&1; then
  echo "edit-and-sync-demo: no deferfs binary at $DEFERFS (build it, or set DEFERFS)" >&2
  exit 2
fi

work=$(mktemp -d -t deferfs-edit.XXXXXX)
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
    echo "edit-and-sync-demo: $mnt is still mounted; leaving $work in place" >&2
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
  echo "edit-and-sync-demo: $2 not $1 after 10 s" >&2
  return 1
}

page=4096
pages=(10 5000 16000)   # three pages of the 16384 in 64 MiB
letters=(A B C)

# first 16 bytes of page $2 of file $1, in hex
peek() { dd if="$1" bs=16 count=1 skip=$(($2 * page / 16)) status=none | od -An -tx1; }
# true if page $3 of files $1 and $2 holds the same bytes
same_page() {
  cmp -s <(dd if="$1" bs=$page count=1 skip="$3" status=none) \
         <(dd if="$2" bs=$page count=1 skip="$3" status=none)
}

echo "== source: 64 MiB of random data, and a copy to compare against"
dd if=/dev/urandom of="$src/data.bin" bs=1M count=64 iflag=fullblock status=none
cp "$src/data.bin" "$work/orig.bin"

echo
echo "== mounting $src on $mnt"
"$DEFERFS" "$src" "$mnt"
wait_until mounted "$mnt"

echo
echo "== editing pages ${pages[*]} through the mount (dd conv=notrunc)"
for i in 0 1 2; do
  head -c $page /dev/zero | tr '\0' "${letters[i]}" |
    dd of="$mnt/data.bin" bs=$page count=1 seek="${pages[i]}" conv=notrunc status=none
done

echo
echo "== deferfs status: three dirty pages, staged"
"$DEFERFS" status "$mnt"

echo
echo "== the source is unchanged"
if cmp -s "$src/data.bin" "$work/orig.bin"; then
  echo "source: identical to the original"
else
  echo "edit-and-sync-demo: the source changed before sync" >&2
  exit 1
fi
for p in "${pages[@]}"; do
  printf '%-30s%s\n' "page $p through the mount:" "$(peek "$mnt/data.bin" "$p")"
  printf '%-30s%s\n' "page $p in the source:" "$(peek "$src/data.bin" "$p")"
done

echo
echo "== deferfs sync"
"$DEFERFS" sync "$mnt"

echo
echo "== the source now has the change, and only in those pages"
echo "pages of the source that differ from the original:"
{ cmp -l "$work/orig.bin" "$src/data.bin" || true; } |
  awk -v ps=$page '{ print "  page " int(($1 - 1) / ps) }' | uniq
for p in "${pages[@]}"; do
  if same_page "$mnt/data.bin" "$src/data.bin" "$p"; then
    echo "page $p: mount and source agree"
  else
    echo "page $p: mount and source DIFFER" >&2
    exit 1
  fi
done

echo
echo "== deferfs status: nothing staged any more"
"$DEFERFS" status "$mnt"

echo
echo "== deferfs stats"
"$DEFERFS" stats "$mnt"

echo
echo "== unmounting"
"$DEFERFS" umount "$mnt"
wait_until unmounted "$mnt"
echo "done"
