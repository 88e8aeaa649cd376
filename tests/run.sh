#!/usr/bin/env bash
# The test command: builds (or finds cached) the control-plane tools, then runs every test of
# the workspace, the integration tests against a real etcd + kube-apiserver, S3 server and helm.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/controlplane/install.sh
cargo test --workspace --locked "$@"
