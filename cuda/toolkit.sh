#!/usr/bin/env bash
# Prints the root of a CUDA 13.0 toolkit (cuda/toolkit.txt) made from NVIDIA's PyPI wheels,
# installing it first if needed, for machines without a system CUDA (CI, a laptop):
#
#     export CUDA_ROOT=$(bash cuda/toolkit.sh)
#
# The root has the usual shape (bin/nvcc, include/, lib/) so nvcc, cudarc's build script and
# candle-kernels' find what they look for. The driver library (libcuda) is not on PyPI: a
# stub with every entry point cudarc declares is built into lib/stubs so the `cuda` build links;
# the real one comes with the GPU machine's driver. Lives under
# ${GRAFT_CACHE_DIR:-$HOME/.cache/graft}/cuda-<hash of the pins>; stdout carries the path alone.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
pins=$here/toolkit.txt
cache=${GRAFT_CACHE_DIR:-$HOME/.cache/graft}
root=$cache/cuda-$(sha256sum "$pins" | cut -c1-12)

ready() { [[ -x $root/bin/nvcc && -e $root/lib/stubs/libcuda.so ]]; }

# The driver API names cudarc's bindings call (the same source the Rust code links against).
driver_symbols() {
  local cudarc
  cudarc=$(cargo metadata --format-version 1 --locked --features graft-engine/cuda --manifest-path "$here/../Cargo.toml" |
    python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')
  grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$(dirname "$cudarc")/src/driver/sys/mod.rs" |
    awk '{print $4}' | sort -u
}

if ! ready; then
  mkdir -p "$cache"
  exec 9>"$root.lock"
  flock 9
  if ! ready; then
    rm -rf "$root" "$root".tmp.*
    tmp=$root.tmp.$$
    trap 'rm -rf "$tmp"' EXIT
    echo "cuda toolkit: installing cuda/toolkit.txt into $root" >&2
    start=$SECONDS
    python3 -m pip install --quiet --no-cache-dir --no-deps --target "$tmp/wheels" -r "$pins" >&2
    # Every wheel unpacks into nvidia/cu13/{bin,include,lib,nvvm}: that is the toolkit root.
    mv "$tmp/wheels/nvidia/cu13" "$tmp/root"
    rm -rf "$tmp/wheels"
    # The linker looks for unversioned names; the wheels ship the sonames only.
    for lib in "$tmp"/root/lib/lib*.so.*; do
      ln -sf "$(basename "$lib")" "$tmp/root/lib/$(basename "$lib" | sed -E 's/\.so\..*$/.so/')"
    done
    mkdir -p "$tmp/root/lib/stubs"
    driver_symbols | sed 's/.*/void &(void) {}/' >"$tmp/root/lib/stubs/libcuda.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$tmp/root/lib/stubs/libcuda.so" \
      "$tmp/root/lib/stubs/libcuda.c"
    "$tmp/root/bin/nvcc" --version >&2
    mv -T "$tmp/root" "$root"
    rm -rf "$tmp"
    trap - EXIT
    echo "cuda toolkit: ready in $((SECONDS - start)) s ($(du -sh "$root" | cut -f1))" >&2
  fi
  exec 9>&-
fi

echo "$root"
