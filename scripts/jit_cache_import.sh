#!/usr/bin/env bash
# Fills .jit_cache/jit/ (the JIT cache scripts/gpu_check.sh uses) with kernels an earlier GPU run compiled:
#
#   scripts/jit_cache_import.sh SOURCE...
#
# SOURCE: a folder of .cubin / .ptx files, a jit_cache.tar.gz that gpu_check.sh wrote, or a folder holding
# one (a device run's files folder). Then pass carry: [".jit_cache"] to the device run. The cache is trimmed
# to JIT_CACHE_MAX_MIB (default 56; everything a device run carries must stay under 64 MiB), oldest first.
# Only compiled kernels are taken: a topology probe cached on one GPU must not be reused on another.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 SOURCE... (folder of .cubin/.ptx, or jit_cache.tar.gz)"; exit 2; }
DEST=$(cd "$(dirname "$0")/.." && pwd)/.jit_cache/jit
MAX=$(( ${JIT_CACHE_MAX_MIB:-56} << 20 ))
mkdir -p "$DEST"
UNPACKED=$(mktemp -d)
trap 'rm -rf "$UNPACKED"' EXIT

take_kernels_of() {  # the .cubin / .ptx files directly in a folder (not *.tmp: a compile still writing)
  find "$1" -maxdepth 1 -type f \( -name '*.cubin' -o -name '*.ptx' \) \
    -exec cp --preserve=timestamps -t "$DEST" -- {} +
}
unpack() {  # unpacked apart first, so only kernel files reach the cache
  local into
  into=$(mktemp -d -p "$UNPACKED")
  tar xzf "$1" -C "$into"
  take_kernels_of "$into"
}

for source in "$@"; do
  if [ -d "$source" ]; then
    take_kernels_of "$source"
    for archive in "$source"/*.tar.gz; do
      if [ -f "$archive" ]; then unpack "$archive"; fi
    done
  elif [ -f "$source" ]; then
    unpack "$source"
  else
    echo "$0: no such file or folder: $source"; exit 2
  fi
done

# over the limit: drop the oldest (by compile time, which the copies keep)
total=$(find "$DEST" -maxdepth 1 -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
while [ "$total" -gt "$MAX" ]; do
  oldest=$(find "$DEST" -maxdepth 1 -type f -printf '%T@ %p\n' | sort -n | head -1 | cut -d' ' -f2-)
  [ -n "$oldest" ] || break
  total=$(( total - $(stat -c %s "$oldest") ))
  rm -f -- "$oldest"
done
echo "jit cache: $(find "$DEST" -maxdepth 1 -type f | wc -l) files, $total bytes in $DEST"
