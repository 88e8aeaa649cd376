# Sourced (not run) by every build whose binaries ship: images/build.sh and cuda/check.sh
# (through cuda/env.sh).
# Release binaries must not carry the paths of the machine that built them (panic messages name
# their source files; C code compiled by build scripts keeps __FILE__), or the same commit
# would give different bytes, and different image digests, on every machine. Cargo's own
# `trim-paths` would do this but is unstable (cargo 1.95), so the flags say it.
#
# Both scripts must export exactly the same flags: cargo fingerprints them, and a difference
# rebuilds every crate (and reruns nvcc on candle's kernels for the CUDA build).

# shellcheck shell=bash
_graft_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_graft_target=${CARGO_TARGET_DIR:-$_graft_root/target}
_graft_cargo_home=${CARGO_HOME:-$HOME/.cargo}
# rustc and gcc apply the last matching prefix: the target directory may sit inside the
# checkout, so it comes after it.
_graft_remaps=("$_graft_cargo_home=/cargo" "$_graft_root=/graft" "$_graft_target=/target")

_graft_rustflags=()
_graft_cflags=()
for _graft_remap in "${_graft_remaps[@]}"; do
  _graft_rustflags+=("--remap-path-prefix=$_graft_remap")
  _graft_cflags+=("-ffile-prefix-map=$_graft_remap")
done
# CARGO_ENCODED_RUSTFLAGS (separated by 0x1f) keeps a path with a space in one flag.
CARGO_ENCODED_RUSTFLAGS=$(IFS=$'\x1f'; echo "${_graft_rustflags[*]}")
# The cc and cmake crates (mimalloc, aws-lc) add these to their own flags (a path with a space
# would split here).
CFLAGS="${_graft_cflags[*]}"
CXXFLAGS=$CFLAGS
# C compilers put SOURCE_DATE_EPOCH where code asks for __DATE__ and __TIME__, and the cc crate
# rebuilds (aws-lc, mimalloc and all that depends on them) when it changes: a fixed value keeps
# both the bytes and cargo's cache the same from commit to commit. The images' own times are
# the commit's (images/build.sh).
SOURCE_DATE_EPOCH=315532800
export CARGO_ENCODED_RUSTFLAGS CFLAGS CXXFLAGS SOURCE_DATE_EPOCH
unset _graft_root _graft_target _graft_cargo_home _graft_remaps _graft_rustflags _graft_cflags _graft_remap
