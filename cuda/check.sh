#!/usr/bin/env bash
# CI's compile of the `cuda` feature, on a machine without a GPU or a system CUDA: lints the
# CUDA code of the engine, trainer and server, compiles candle's and Graft's kernels with nvcc
# from cuda/toolkit.sh, and links the release binaries and the GPU test binaries (against the
# toolkit's libraries and its driver stub), so CUDA code never rots unseen. Nothing here runs
# on a GPU. Everything is the release profile: the binaries are what the CUDA images ship
# (images/build.sh), and a second profile would compile candle's kernels a second time.
#
#     bash cuda/check.sh   # → $CARGO_TARGET_DIR/release/graft-{trainer,server}, GPU test binaries
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=cuda/env.sh
source cuda/env.sh
cargo clippy --locked "${cuda[@]}" --all-targets -- -D warnings
cargo build --locked "${cuda[@]}" --bins --test cuda
