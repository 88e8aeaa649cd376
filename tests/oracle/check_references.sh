#!/usr/bin/env bash
# Re-derives the reference data committed under engine/tests/data/ with the pinned Hugging Face
# oracle and checks it is what is committed: the scripts nf4_reference.py, tiny_models.py,
# bnb_reference.py, peft_adapter.py, peft_prompt.py, peft_prefix.py, tokenizer_reference.py and (in the
# AdapterHub library's own environment) adapterhub_bottleneck.py run on a copy of
# the tree in a temporary directory (they write beside themselves, at ../../engine/tests/data),
# and every file they write that is committed is compared with the committed one:
#
#   safetensors  same names, dtypes, shapes and metadata; integers equal, floats within
#                1e-6 (relative above magnitude 1); a forward pass's outputs
#                (reference.safetensors) within 1e-4, the parity tests' own tolerance:
#                torch picks its CPU kernels by instruction set, and the same logits come out
#                up to a few 1e-5 apart on different CPUs
#   JSON         equal, floats as above; in adapter_config.json, target_modules (and IA3's
#                feedforward_modules) compared as the sets they are and base_model_name_or_path
#                and AdapterHub's model_name (the path the script ran from) left out
#
# Prints one line per file on stderr and ends with a `test result:` line tests/run.sh counts.
# The Python is $GRAFT_ORACLE_PYTHON, or the one tests/oracle/venv.sh makes.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
python=${GRAFT_ORACLE_PYTHON:-$(bash "$here/venv.sh")}
adapterhub_python=$(bash "$here/venv.sh" adapterhub)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/tests/oracle" "$work/engine/tests/data/tiny/made"
scripts=(nf4_reference tiny_models bnb_reference peft_adapter peft_prompt peft_prefix tokenizer_reference
  adapterhub_bottleneck)
for script in "${scripts[@]}"; do
  cp "$here/$script.py" "$work/tests/oracle/"
done
# The inputs: what graft_engine::tiny::write_tiny_model wrote, which tokenizer_reference.py reads.
inputs=(config.json generation_config.json model.safetensors tokenizer.json tokenizer_config.json)
for name in "${inputs[@]}"; do
  cp "$root/engine/tests/data/tiny/made/$name" "$work/engine/tests/data/tiny/made/"
done

failed_scripts=0
for script in "${scripts[@]}"; do
  echo "check_references: $script.py" >&2
  # peft_adapter.py, peft_prompt.py, peft_prefix.py and bnb_reference.py read the models tiny_models.py
  # writes: the order matters.
  interpreter=$python
  [[ $script == adapterhub_* ]] && interpreter=$adapterhub_python
  if ! "$interpreter" "$work/tests/oracle/$script.py" >&2; then
    echo "check_references: FAILED $script.py" >&2
    failed_scripts=$((failed_scripts + 1))
  fi
done

for name in "${inputs[@]}"; do
  rm "$work/engine/tests/data/tiny/made/$name"
done
status=0
"$python" - "$work/engine/tests/data" "$root/engine/tests/data" "$failed_scripts" <<'EOF' || status=$?
import json
import pathlib
import sys

import torch
from safetensors import safe_open

derived, committed, failed_scripts = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3])


def close(a, b):
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def compare_safetensors(new, old):
    tolerance = 1e-4 if new.name == "reference.safetensors" else 1e-6
    with safe_open(new, "pt") as n, safe_open(old, "pt") as o:
        if n.metadata() != o.metadata():
            return f"metadata {n.metadata()} != {o.metadata()}"
        if sorted(n.keys()) != sorted(o.keys()):
            return f"tensors {sorted(n.keys())} != {sorted(o.keys())}"
        for key in o.keys():
            a, b = n.get_tensor(key), o.get_tensor(key)
            if (a.dtype, a.shape) != (b.dtype, b.shape):
                return f"{key}: {a.dtype}{list(a.shape)} != {b.dtype}{list(b.shape)}"
            if a.dtype.is_floating_point:
                a, b = a.double(), b.double()
                excess = ((a - b).abs() - tolerance * b.abs().clamp(min=1.0)).max().item()
                if not excess <= 0:
                    return f"{key}: differs by up to {(a - b).abs().max().item():.3e}"
            elif not torch.equal(a, b):
                return f"{key}: {(a != b).sum().item()} of {a.numel()} values differ"
    return None


def normalise(value, name):
    if name == "adapter_config.json" and isinstance(value, dict):
        value = dict(value)
        value.pop("base_model_name_or_path", None)
        value.pop("model_name", None)
        for key in ("target_modules", "feedforward_modules"):
            if isinstance(value.get(key), list):
                value[key] = sorted(value[key])
    return value


def same_json(a, b, where="$"):
    if isinstance(a, float) or isinstance(b, float):
        ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and close(a, b)
        return None if ok else f"{where}: {a!r} != {b!r}"
    if type(a) is not type(b):
        return f"{where}: {a!r} != {b!r}"
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return f"{where}: keys {sorted(a)} != {sorted(b)}"
        return next((d for k in a if (d := same_json(a[k], b[k], f"{where}.{k}"))), None)
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} items != {len(b)}"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := same_json(x, y, f"{where}[{i}]"))), None)
    return None if a == b else f"{where}: {a!r} != {b!r}"


def compare(new, old):
    if new.suffix == ".safetensors":
        return compare_safetensors(new, old)
    if new.suffix == ".json":
        a = normalise(json.loads(new.read_text(encoding="utf-8")), new.name)
        b = normalise(json.loads(old.read_text(encoding="utf-8")), new.name)
        return same_json(a, b)
    return None if new.read_bytes() == old.read_bytes() else "bytes differ"


passed = failed = 0
for new in sorted(p for p in derived.rglob("*") if p.is_file()):
    relative = new.relative_to(derived)
    old = committed / relative
    if not old.is_file():
        print(f"  {relative}: not committed, not compared", file=sys.stderr)
        continue
    problem = compare(new, old)
    if problem is None:
        passed += 1
        print(f"  {relative}: ok", file=sys.stderr)
    else:
        failed += 1
        print(f"  {relative}: MISMATCH: {problem}", file=sys.stderr)
failed += failed_scripts
if passed + failed == 0:
    failed = 1
    print("  nothing was re-derived", file=sys.stderr)
outcome = "ok" if failed == 0 else "FAILED"
print(f"test result: {outcome}. {passed} passed; {failed} failed; (re-derived engine/tests/data references)")
sys.exit(0 if failed == 0 else 1)
EOF
exit "$status"
