#!/usr/bin/env bash
# Rewrites images/debian.lock with the versions (and .deb checksums) apt offers now for the
# packages it lists. Run after `apt-get update` on a Debian 12 machine; commit the result.
set -euo pipefail
lock=$(dirname "$0")/debian.lock
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
grep '^#' "$lock" >"$tmp"
grep -v '^#' "$lock" | while read -r name _; do
  version=$(apt-cache policy "$name" | awk '/Candidate:/ {print $2}')
  [[ -n $version && $version != "(none)" ]] || { echo "apt knows no $name" >&2; exit 1; }
  apt-cache show "$name=$version" | awk -v n="$name" -v v="$version" '
    /^Architecture:/ && !a {a = $2} /^SHA256:/ && !s {s = $2}
    END {print n, v, a, s}'
done >>"$tmp"
cp "$tmp" "$lock"
