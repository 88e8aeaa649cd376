#!/usr/bin/env bash
# The GPU check, run once on a machine with an NVIDIA GPU (driver ≥ 580, CUDA 13.0) from a
# checkout of the commit the bundle was built from:
#
#     bash cuda/check.sh --bundle cuda/bundle        # where the toolchain is, no GPU needed
#     bash cuda/device-check.sh cuda/bundle          # on the GPU machine
#
# The GPU machine needs Python with torch (its CUDA 13 libraries serve the binaries too),
# transformers and peft; bitsandbytes for the QLoRA peer, from `cuda/wheels/*.whl` when it is
# not installed. It prints the device, each CUDA test's result, and the trainer against
# transformers + PEFT + bitsandbytes at a Llama-3-8B shape (seq 2048, rank 16, seven targets,
# dropout 0.05, evaluation on): tokens/s, peak memory, MFU and the ratios, with the memory
# model's prediction beside graft's measured peak. Every stage has a time limit, and the whole
# stays within GRAFT_DEVICE_CHECK_SECONDS (default 540). Results also go to $OUT (the device
# tool's folder) when it is set.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
bundle=${1:-cuda/bundle}
budget=${GRAFT_DEVICE_CHECK_SECONDS:-540}
python=${PYTHON:-python3}
results=${OUT:-$(mktemp -d)}
mkdir -p "$results"
start=$SECONDS
failed=()
say() { printf '[device-check %4ds] %s\n' "$((SECONDS - start))" "$*" | tee -a "$results/summary.txt"; }
left() { echo $((budget - (SECONDS - start))); }

say "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1 | cut -d. -f1)
if ((driver < 580)); then
  say "driver $driver is older than 580, which CUDA 13.0 needs: stopping"
  exit 1
fi

# The CUDA 13 libraries the binaries link (cuBLAS, cuBLASLt, cuRAND, NVRTC), from the Python
# environment's NVIDIA wheels (torch's).
libs=$("$python" - <<'PY'
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
dirs = set()
for root in roots:
    for name in ("libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libnvrtc.so.13"):
        for path in glob.glob(os.path.join(root, "nvidia", "**", name), recursive=True):
            dirs.add(os.path.dirname(path))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
missing=$(ldd "$bundle/graft-trainer" "$bundle/graft-server" | grep 'not found' | sort -u)
if [[ -n $missing ]]; then
  say "unresolved libraries: $missing"
  exit 1
fi

# 1. The CUDA tests (the engine's and the trainer's), each against its CPU twin.
for test in "$bundle"/cuda-test-*; do
  crate=${test##*/cuda-test-}
  say "CUDA tests of $crate"
  if CARGO_MANIFEST_DIR=$PWD/$crate timeout 240 "$test" --test-threads 1 \
    >"$results/cuda-tests-$crate.txt" 2>&1; then
    :
  else
    failed+=("cuda tests of $crate")
  fi
  grep -E '^test |test result' "$results/cuda-tests-$crate.txt" | tee -a "$results/summary.txt"
done

# 2. The trainer against transformers + PEFT + bitsandbytes.
if ! "$python" -c 'import bitsandbytes' 2>/dev/null; then
  wheels=(cuda/wheels/bitsandbytes-*.whl)
  wheel=${wheels[0]}
  if [[ -f $wheel ]]; then
    "$python" -m pip install --quiet --no-deps "$wheel" || say "installing $wheel failed"
  fi
fi
modes=nf4
"$python" -c 'import bitsandbytes' 2>/dev/null || {
  say "no bitsandbytes: the peer runs plain LoRA (bf16) only"
  modes=none
}
model=${GRAFT_BENCH_MODEL:-/tmp/graft-llama3-8b-shaped}
if [[ ! -f $model/config.json ]]; then
  say "writing a Llama-3-8B-shaped model with random weights to $model"
  timeout "$(left)" "$python" tests/bench/gpu/make_model.py --out "$model" \
    --trainer "$bundle/graft-trainer" >"$results/make-model.txt" 2>&1 || failed+=("making the model")
fi
if (($(left) > 60)); then
  say "trainer benchmark ($modes), $(left) s left"
  timeout "$(left)" "$python" tests/bench/gpu/trainer_vs_peft.py --model "$model" \
    --trainer "$bundle/graft-trainer" --modes "$modes" --seq 2048 --batch 4 --steps 8 \
    --eval-rows 8 --eval-every 4 --dropout 0.05 >"$results/trainer-vs-peft.txt" 2>&1 \
    || failed+=("the trainer benchmark")
  tee -a "$results/summary.txt" <"$results/trainer-vs-peft.txt"
else
  failed+=("the trainer benchmark (no time left)")
fi

if ((${#failed[@]})); then
  say "FAILED: ${failed[*]}"
  exit 1
fi
say "done"
