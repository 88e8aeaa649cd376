#!/usr/bin/env bash
# The test command: builds (or finds cached) the control-plane tools, then runs every test of
# the workspace, the integration tests against a real etcd + kube-apiserver, S3 server and helm.
# Ends with one line totalling every test binary's results.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/controlplane/install.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ {p += $4; f += $6} END {printf "tests: %d passed, %d failed\n", p, f}' "$log"
exit "$status"
