# Sourced (not run) by cuda/check.sh and images/build.sh: the environment and the cargo
# arguments of the `cuda` build, so both make the very same one (another set of packages,
# features or flags would resolve candle-kernels' build anew and rerun nvcc: 15 minutes).
# shellcheck shell=bash
CUDA_ROOT=$(bash "$(dirname "${BASH_SOURCE[0]}")/toolkit.sh")
export CUDA_ROOT PATH=$CUDA_ROOT/bin:$PATH
# candle-kernels compiles its static kernels for one GPU generation: Hopper (H100, H200) by
# default. Graft's own kernels are PTX from compute_80 up, whatever this says.
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
# The release binaries ship (images/build.sh): no machine paths in them.
# shellcheck source=images/release-flags.sh
source "$(dirname "${BASH_SOURCE[0]}")/../images/release-flags.sh"
# nvcc reads this itself: CUB's asserts in candle's static kernels name the toolkit's headers.
# (candle-kernels does not rebuild when it changes: a cached build keeps what it was built with.)
export NVCC_APPEND_FLAGS="-Xcompiler=-ffile-prefix-map=$CUDA_ROOT=/cuda"
# Always the same packages, features and dev-dependencies: every command builds a test target.
# shellcheck disable=SC2034 # used by the scripts that source this
cuda=(--release -p graft-engine -p graft-trainer -p graft-server
  --features "graft-engine/cuda,graft-trainer/cuda,graft-server/cuda")
