#!/usr/bin/env bash
# Packs built kubectl-graft binaries as krew archives and writes the manifest with their
# digests:
#   plugin/krew/package.sh OUT_DIR linux/amd64=path/to/kubectl-graft [darwin/arm64=...]
# Each archive holds the binary and the README. Platforms without a binary keep their
# placeholder, so the manifest is published only once every platform is built.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: package.sh OUT_DIR OS/ARCH=BINARY...}
shift
mkdir -p "$out"
version=$(sed -n 's/^  version: \(v[0-9.]*\)$/\1/p' "$here/graft.yaml")
manifest=$(cat "$here/graft.yaml")
for pair in "$@"; do
  platform=${pair%%=*} binary=${pair#*=}
  os=${platform%/*} arch=${platform#*/}
  stage=$(mktemp -d)
  cp "$binary" "$stage/kubectl-graft"
  chmod 0755 "$stage/kubectl-graft"
  cp "$here/../../README.md" "$stage/README.md"
  archive="$out/kubectl-graft_${version}_${os}_${arch}.tar.gz"
  # Fixed order (as listed), owner and times: the same binary always packs to the same digest.
  tar --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$stage" -cf - kubectl-graft README.md \
    | gzip -n >"$archive"
  rm -rf "$stage"
  digest=$(sha256sum "$archive" | cut -d' ' -f1)
  placeholder="SHA256_$(echo "${os}_${arch}" | tr '[:lower:]' '[:upper:]')"
  grep -q "$placeholder" <<<"$manifest" || { echo "no $os/$arch platform in graft.yaml" >&2; exit 1; }
  manifest=${manifest//$placeholder/$digest}
done
printf '%s\n' "$manifest" >"$out/graft.yaml"
echo "$out/graft.yaml"
