#!/usr/bin/env bash
# CI's compile of the `cuda` feature, on a machine without a GPU or a system CUDA: lints the
# CUDA code of the engine, trainer and server, compiles candle's and Graft's kernels with nvcc
# from cuda/toolkit.sh, and links the release binaries and the GPU test binaries (against the
# toolkit's libraries and its driver stub), so CUDA code never rots unseen. Nothing here runs
# on a GPU. Everything is the release profile: the binaries are what the CUDA images ship
# (images/build.sh) and what a GPU machine runs (--bundle), and a second profile would compile
# candle's kernels a second time.
#
#     bash cuda/check.sh               # what CI runs → $CARGO_TARGET_DIR/release/graft-{trainer,server}
#     bash cuda/check.sh --bundle DIR  # also the binaries + GPU tests, stripped, for device-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=cuda/env.sh
source cuda/env.sh
cargo clippy --locked "${cuda[@]}" --all-targets -- -D warnings
cargo build --locked "${cuda[@]}" --bins --test cuda
if [[ ${1:-} == --bundle ]]; then
  # What a GPU machine needs besides a checkout of the same commit (cuda/device-check.sh):
  # the release binaries and the GPU test binaries, stripped and xz-compressed (each carries
  # candle's 33 MB of kernels: 236 MB stripped, 36 MB compressed), under 64 MiB in all.
  # device-check.sh unpacks them.
  out=${2:?usage: cuda/check.sh --bundle DIR}
  mkdir -p "$out"
  for bin in graft-trainer graft-server; do
    strip -o "$out/$bin" "${CARGO_TARGET_DIR:-target}/release/$bin"
  done
  # The test binaries of the `cuda` test targets, as cargo names them (built above: this only
  # asks for their paths).
  cargo test --locked "${cuda[@]}" --test cuda --no-run --message-format=json \
    | python3 -c '
import json, os, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(os.path.basename(os.path.dirname(m["manifest_path"])), m["executable"])
' | while read -r package exe; do
    strip -o "$out/cuda-test-$package" "$exe"
  done
  for file in "$out"/graft-trainer "$out"/graft-server "$out"/cuda-test-*; do
    [[ $file == *.xz ]] || xz -T0 -6 -f "$file"
  done
  size=$(du -cb "$out"/* | tail -1 | cut -f1)
  echo "bundle: $(cd "$out" && echo *) — $((size / 1048576)) MiB" >&2
  (( size < 64 * 1048576 )) || { echo "the bundle is over 64 MiB" >&2; exit 1; }
fi
