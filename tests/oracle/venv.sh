#!/usr/bin/env bash
# Prints the python of the Hugging Face oracle's virtual environment (tests/oracle/
# requirements.txt), creating it first if needed. It lives outside the work tree, under
# ${GRAFT_CACHE_DIR:-$HOME/.cache/graft}/oracle-venv-<hash>, the hash taken over the pins and
# the interpreter: a warm run only prints the path, a changed pin or Python makes a new one.
#
#     GRAFT_ORACLE_PYTHON=$(bash tests/oracle/venv.sh)
#
# The install (about 5.7 GB, mostly torch's CUDA wheels) is built in a temporary directory and
# moved into place only once it imports, so a killed install is never taken as ready.
# stdout carries the path alone; everything else goes to stderr.
#
# Small pins added later go in requirements-extra.txt: they are installed into a second,
# small environment layered on the first (a `.pth` file puts the first one's packages on its
# path), keyed by both files, so adding one does not rebuild torch's environment.
# `venv.sh adapterhub` prints another such layer's python instead, with
# requirements-adapterhub.txt (the AdapterHub library and the transformers it pins).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
requirements=$here/requirements.txt
cache=${GRAFT_CACHE_DIR:-$HOME/.cache/graft}
# The interpreter the venv is made from.
python=${GRAFT_ORACLE_BASE_PYTHON:-python3}

# The real interpreter (not a pyenv shim) and its version, so a different Python gets its own.
interpreter=$("$python" -c 'import sys; print(sys.executable, sys.version)')
hash=$({ cat "$requirements"; echo "$interpreter"; } | sha256sum | cut -c1-12)
venv=$cache/oracle-venv-$hash

ready() {
  [[ -x $venv/bin/python ]] && "$venv/bin/python" -c '' 2>/dev/null
}

if ! ready; then
  mkdir -p "$cache"
  # One install at a time per environment: a second caller waits, then finds it ready.
  exec 9>"$venv.lock"
  flock 9
  if ! ready; then
    # Under the lock, anything left here is from an install that was killed.
    rm -rf "$venv" "$venv".tmp.*
    tmp=$venv.tmp.$$
    trap 'rm -rf "$tmp"' EXIT
    echo "oracle venv: installing tests/oracle/requirements.txt into $venv" >&2
    start=$SECONDS
    "$python" -m venv --prompt "oracle-venv-$hash" "$tmp" >&2
    # The pins are exact; the environment itself is the cache, so pip keeps no second copy.
    "$tmp/bin/python" -m pip install --no-cache-dir --progress-bar off \
      -r "$requirements" >&2
    "$tmp/bin/python" -m pip check >&2
    "$tmp/bin/python" -c 'import bitsandbytes, numpy, peft, safetensors, tokenizers, torch, transformers' >&2
    # A venv names its own directory in its scripts (activate, pip's and other entry points):
    # point them at where it will live.
    { grep -rlIF -- "$tmp" "$tmp/bin" "$tmp/pyvenv.cfg" || true; } | xargs -r sed -i "s|$tmp|$venv|g"
    mv -T "$tmp" "$venv"
    trap - EXIT
    echo "oracle venv: ready in $((SECONDS - start)) s ($(du -sh "$venv" | cut -f1))" >&2
    # Environments of other pins are only disk now (one that another caller is still
    # installing, holding its lock, is left alone).
    for lock in "$cache"/oracle-venv-*.lock; do
      other=${lock%.lock}
      [[ $other == "$venv" ]] && continue
      # The lock file is removed while held, on purpose: whoever held it is gone.
      # shellcheck disable=SC2094
      (flock -n 9 && rm -rf "$other" "$other".tmp.* "$lock") 9>>"$lock" || true
    done
  fi
  exec 9>&-
fi

# A small environment layered on the first: `$1` its requirements file, `$2` its cache name.
# Sets venv to it.
layer() {
  local requirements=$1 name=$2
  local base=$venv
  local hash
  hash=$({ echo "$base"; cat "$requirements"; } | sha256sum | cut -c1-12)
  venv=$cache/$name-$hash
  ready && return
  exec 9>"$venv.lock"
  flock 9
  if ! ready; then
    rm -rf "$venv" "$venv".tmp.*
    tmp=$venv.tmp.$$
    trap 'rm -rf "$tmp"' EXIT
    echo "oracle venv: installing tests/oracle/$(basename "$requirements") into $venv" >&2
    # No pip of its own: an older bundled pip and setuptools would shadow the first's.
    "$base/bin/python" -m venv --without-pip "$tmp" >&2
    "$base/bin/python" -c 'import site; print(site.getsitepackages()[0])' \
      >"$("$tmp/bin/python" -c 'import site; print(site.getsitepackages()[0])')/oracle-base.pth"
    "$base/bin/python" -m pip --python "$tmp/bin/python" install --no-cache-dir \
      --progress-bar off -r "$requirements" >&2
    "$base/bin/python" -m pip --python "$tmp/bin/python" check >&2
    { grep -rlIF -- "$tmp" "$tmp/bin" "$tmp/pyvenv.cfg" || true; } | xargs -r sed -i "s|$tmp|$venv|g"
    mv -T "$tmp" "$venv"
    trap - EXIT
    for lock in "$cache/$name"-*.lock; do
      other=${lock%.lock}
      [[ $other == "$venv" ]] && continue
      # shellcheck disable=SC2094 # the lock is held while its own file is removed
      (flock -n 9 && rm -rf "$other" "$other".tmp.* "$lock") 9>>"$lock" || true
    done
  fi
  exec 9>&-
}

case ${1:-} in
  "")
    if [[ -s $here/requirements-extra.txt ]]; then
      layer "$here/requirements-extra.txt" oracle-extra
    fi
    ;;
  # The AdapterHub `adapters` library pins transformers 4.x: its own layer, whose packages come
  # before the first environment's on the path, so its transformers shadows the newer one.
  adapterhub)
    layer "$here/requirements-adapterhub.txt" oracle-adapterhub
    ;;
  *)
    echo "usage: venv.sh [adapterhub]" >&2
    exit 2
    ;;
esac

echo "$venv/bin/python"
