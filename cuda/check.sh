#!/usr/bin/env bash
# CI's compile of the `cuda` feature, on a machine without a GPU or a system CUDA: lints the
# CUDA code of the engine, trainer and server, compiles candle's and Graft's kernels with nvcc
# from cuda/toolkit.sh, and links the binaries and the GPU test binaries (against the toolkit's
# libraries and its driver stub), so CUDA code never rots unseen. Nothing here runs on a GPU.
#
#     bash cuda/check.sh            # what CI runs
#     bash cuda/check.sh --release  # also the release binaries to copy to a GPU machine
#     bash cuda/check.sh --bundle DIR  # release binaries + GPU tests, stripped, for device-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA_ROOT=$(bash cuda/toolkit.sh)
export CUDA_ROOT PATH=$CUDA_ROOT/bin:$PATH
# candle-kernels compiles its static kernels for one GPU generation: Hopper (H100, H200) by
# default. Graft's own kernels are PTX from compute_80 up, whatever this says.
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
# Always the same packages, features and dev-dependencies (every command builds a test target):
# another resolution of candle-kernels' build dependencies reruns nvcc on its kernels (17 min).
cuda=(-p graft-engine -p graft-trainer -p graft-server
  --features "graft-engine/cuda,graft-trainer/cuda,graft-server/cuda")
cargo clippy --locked "${cuda[@]}" --all-targets -- -D warnings
cargo build --locked "${cuda[@]}" --bins --test cuda
if [[ ${1:-} == --release ]]; then
  cargo build --locked --release "${cuda[@]}" --bins
fi
if [[ ${1:-} == --bundle ]]; then
  # What a GPU machine needs besides a checkout of the same commit (cuda/device-check.sh):
  # the release binaries and the GPU test binaries, stripped, under 64 MiB in all.
  out=${2:?usage: cuda/check.sh --bundle DIR}
  cargo build --locked --release "${cuda[@]}" --bins
  mkdir -p "$out"
  for bin in graft-trainer graft-server; do
    strip -o "$out/$bin" "${CARGO_TARGET_DIR:-target}/release/$bin"
  done
  # The test binaries of the `cuda` test targets, as cargo names them.
  cargo test --locked --release "${cuda[@]}" --test cuda --no-run --message-format=json \
    | python3 -c '
import json, os, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(os.path.basename(os.path.dirname(m["manifest_path"])), m["executable"])
' | while read -r package exe; do
    strip -o "$out/cuda-test-$package" "$exe"
  done
  size=$(du -cb "$out"/* | tail -1 | cut -f1)
  echo "bundle: $(cd "$out" && echo *) — $((size / 1048576)) MiB" >&2
  (( size < 64 * 1048576 )) || { echo "the bundle is over 64 MiB" >&2; exit 1; }
fi
