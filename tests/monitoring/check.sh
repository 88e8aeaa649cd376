#!/usr/bin/env bash
# CI: the chart's monitoring, rendered as a user enabling it gets it.
# - The PrometheusRule's rules pass `promtool check rules`, and fire (and stay quiet) as
#   rules-test.yaml expects under `promtool test rules`.
# - Each Grafana dashboard passes dashboard.schema.json, every query in it parses as PromQL
#   (promtool again), and every metric a dashboard or rule names is one the code exports.
# Cold: promtool's build (about 5 minutes on 2 cores) and a small venv (seconds); warm: ~1 s.
set -euo pipefail
cd "$(dirname "$0")/../.."
here=tests/monitoring
# shellcheck source=tests/controlplane/versions.env
source tests/controlplane/versions.env
tools=${GRAFT_TOOLS_DIR:-$HOME/.cache/graft/tools}

bash tests/controlplane/install.sh >&2
bash tests/controlplane/install.sh promtool >&2
helm="$tools/helm-$HELM_VERSION/helm"
promtool="$tools/prometheus-$PROMETHEUS_VERSION/promtool"

venv="$tools/monitoring-venv-$(sha256sum "$here/requirements.txt" | cut -c1-12)"
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv.tmp"
  "$venv.tmp/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
  rm -rf "$venv" && mv "$venv.tmp" "$venv"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
HELM_CACHE_HOME="$work/helm" HELM_CONFIG_HOME="$work/helm" HELM_DATA_HOME="$work/helm" \
  "$helm" template graft charts/graft --namespace graft-system --kube-version "$KUBERNETES_VERSION" \
  --set dashboards.enabled=true,prometheusRule.enabled=true >"$work/rendered.yaml"
"$venv/bin/python" "$here/check.py" "$work/rendered.yaml" "$work"
"$promtool" check rules "$work/graft-rules.yaml" "$work/dashboard-queries.yaml"
cp "$here/rules-test.yaml" "$work/"
(cd "$work" && "$promtool" test rules rules-test.yaml)
