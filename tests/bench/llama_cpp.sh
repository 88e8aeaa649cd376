#!/usr/bin/env bash
# Builds llama.cpp's server (`llama-server`) from the llama.cpp sources that PyPI's
# `llama-cpp-python` ships in its source distribution, and an environment for the GGUF
# converters that come with them, for tests/bench/peers.py. Everything lives under
# ${GRAFT_CACHE_DIR:-$HOME/.cache/graft}/bench/llama-cpp-python-<version>/; a warm run only
# prints the paths.
#
#     eval "$(bash tests/bench/llama_cpp.sh)"   # sets LLAMA_SERVER, LLAMA_CPP_SRC, CONVERT_PYTHON
#
# The server is built rather than llama-cpp-python's own `llama_cpp.server`: that one answers
# one request at a time and applies one LoRA per loaded model, while llama-server batches
# requests continuously and picks adapters per request — the stronger peer. The converter
# environment is the oracle's (torch, transformers, safetensors) with sentencepiece added,
# which the converter imports for Llama models. stdout carries the assignments alone.
set -euo pipefail
version=0.3.36
sentencepiece=0.2.3
here=$(cd "$(dirname "$0")" && pwd)
cache=${GRAFT_CACHE_DIR:-$HOME/.cache/graft}/bench/llama-cpp-python-$version
src=$cache/src/llama_cpp_python-$version/vendor/llama.cpp
server=$cache/build/bin/llama-server
oracle=$(bash "$here/../oracle/venv.sh")
venv=$cache/convert-venv

mkdir -p "$cache"
exec 9>"$cache.lock"
flock 9
if [[ ! -d $src ]]; then
  echo "llama_cpp: pip download llama-cpp-python==$version (source distribution)" >&2
  rm -rf "$cache/sdist" "$cache/src"
  python3 -m venv "$cache/pip-venv" >&2
  "$cache/pip-venv/bin/pip" download --no-deps --no-binary :all: --disable-pip-version-check \
    --progress-bar off -d "$cache/sdist" "llama-cpp-python==$version" >&2
  mkdir -p "$cache/src.tmp"
  tar xzf "$cache/sdist/llama_cpp_python-$version.tar.gz" -C "$cache/src.tmp"
  mv "$cache/src.tmp" "$cache/src"
fi
if [[ ! -x $server ]]; then
  echo "llama_cpp: building llama-server (CPU, native; several minutes on 2 cores)" >&2
  cmake -S "$src" -B "$cache/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >&2
  ninja -C "$cache/build" llama-server >&2
fi
if [[ ! -f $venv/ready ]]; then
  rm -rf "$venv"
  "$oracle" -m venv --without-pip "$venv" >&2
  "$oracle" -m pip install --disable-pip-version-check --progress-bar off \
    --target "$venv/site" "sentencepiece==$sentencepiece" >&2
  # The converters' own gguf-py first (the oracle has an older gguf), then sentencepiece,
  # then the oracle's packages.
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  {
    echo "$src/gguf-py"
    echo "$venv/site"
    "$oracle" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith("site-packages")))'
  } > "$site/bench.pth"
  "$venv/bin/python" -c 'import gguf, sentencepiece, torch, transformers' >&2
  touch "$venv/ready"
fi
echo "LLAMA_SERVER=$server"
echo "LLAMA_CPP_SRC=$src"
echo "CONVERT_PYTHON=$venv/bin/python"
