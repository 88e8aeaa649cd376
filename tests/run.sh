#!/usr/bin/env bash
# The test command: builds (or finds cached) the control-plane tools and the Hugging Face
# oracle's venv, then runs every test of the workspace, the integration tests against a real
# etcd + kube-apiserver, S3 server and helm, and the parity tests against transformers + PEFT.
# Ends with one line totalling every test binary's results.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/controlplane/install.sh
# The Hugging Face oracle the parity tests run (torch, transformers, peft on CPU): a virtual
# environment cached outside the work tree, installed on the first run.
GRAFT_ORACLE_PYTHON=$(bash tests/oracle/venv.sh)
# The AdapterHub `adapters` library (bottleneck adapters' oracle) pins an older transformers:
# a small environment of its own, layered on that one.
GRAFT_ADAPTERHUB_PYTHON=$(bash tests/oracle/venv.sh adapterhub)
export GRAFT_ORACLE_PYTHON GRAFT_ADAPTERHUB_PYTHON
log=$(mktemp)
# The chaos suite (operator/tests/chaos) writes its table here; it is printed at the end.
GRAFT_CHAOS_REPORT=$(mktemp)
export GRAFT_CHAOS_REPORT
trap 'rm -f "$log" "$GRAFT_CHAOS_REPORT"' EXIT
status=0
# The whole run (no arguments narrowing it) also re-derives the committed reference data.
if [[ $# -eq 0 ]]; then
  bash tests/oracle/check_references.sh 2>&1 | tee "$log" || status=$?
fi
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee -a "$log" || status=$?
cat "$GRAFT_CHAOS_REPORT"
awk '/^test result:/ {p += $4; f += $6} END {printf "tests: %d passed, %d failed\n", p, f}' "$log"
exit "$status"
