"""Checks the rendered chart's dashboards and rules; writes what promtool checks next.

Usage: check.py RENDERED_CHART OUT_DIR

Writes OUT_DIR/graft-rules.yaml (the PrometheusRule's groups, as a Prometheus rule file) and
OUT_DIR/dashboard-queries.yaml (every dashboard query as a recording rule, so promtool parses
it). Fails on a dashboard that breaks dashboard.schema.json, on a duplicate panel id or
dashboard uid, and on a metric name that neither the operator nor the server exports.
"""

import json
import pathlib
import re
import sys

import jsonschema
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
# Exported by a later version of the server; the serving dashboard shows it once it exists.
PENDING = {"graft_server_kv_cache_usage_ratio"}


def exported_metrics():
    """Metric names as Prometheus sees them, from each registry's register() calls."""
    names = set()
    for source, prefix in [
        ("operator/src/metrics.rs", "graft"),
        ("server-image/src/metrics.rs", "graft_server"),
    ]:
        text = (ROOT / source).read_text()
        assert f'with_prefix("{prefix}")' in text, f"{source} no longer uses prefix {prefix}"
        for name in re.findall(r'^\s*"([a-z_]+)",\s*$', text, re.M):
            base = f"{prefix}_{name}"
            names |= {base, base + "_total", base + "_bucket", base + "_sum", base + "_count"}
    return names


def metric_names(expr):
    """The graft_* metric names in a PromQL expression."""
    return set(re.findall(r"\bgraft_[a-z_]+\b", expr))


def as_promql(expr):
    """A dashboard query with Grafana's variables replaced, so that promtool can parse it."""
    expr = expr.replace("$__rate_interval", "5m")
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


def main(rendered_path, out_dir):
    out = pathlib.Path(out_dir)
    docs = [d for d in yaml.safe_load_all(open(rendered_path)) if d]
    known = exported_metrics()
    unknown = []

    rules = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert len(rules) == 1, f"expected one PrometheusRule, found {len(rules)}"
    groups = rules[0]["spec"]["groups"]
    (out / "graft-rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    alerts = [r for g in groups for r in g["rules"]]
    for rule in alerts:
        unknown += [(rule["alert"], m) for m in metric_names(rule["expr"]) - known]

    schema = json.loads((HERE / "dashboard.schema.json").read_text())
    configmaps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    assert len(configmaps) == 3, f"expected 3 dashboards, found {len(configmaps)}"
    queries, uids = [], set()
    for cm in configmaps:
        assert cm["metadata"]["labels"].get("grafana_dashboard") == "1", cm["metadata"]
        for key, text in cm["data"].items():
            dashboard = json.loads(text)
            where = f"{cm['metadata']['name']}/{key}"
            jsonschema.validate(dashboard, schema)
            assert dashboard["uid"] not in uids, f"{where}: uid {dashboard['uid']} used twice"
            uids.add(dashboard["uid"])
            ids = [p["id"] for p in dashboard["panels"]]
            assert len(ids) == len(set(ids)), f"{where}: duplicate panel ids"
            for panel in dashboard["panels"]:
                right = panel["gridPos"]["x"] + panel["gridPos"]["w"]
                assert right <= 24, f"{where}: panel {panel['title']!r} ends at column {right}"
                for target in panel.get("targets", []):
                    expr = target["expr"]
                    queries.append({"record": f"dashboard:query:{len(queries)}", "expr": as_promql(expr)})
                    unknown += [(f"{where}: {panel['title']}", m) for m in metric_names(expr) - known - PENDING]
            for variable in dashboard["templating"]["list"]:
                if variable["type"] == "query":
                    unknown += [(f"{where}: ${variable['name']}", m)
                                for m in metric_names(variable["definition"]) - known]
    (out / "dashboard-queries.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": queries}]}, sort_keys=False))

    if unknown:
        for where, name in unknown:
            print(f"{where}: {name} is not a metric Graft exports", file=sys.stderr)
        sys.exit(1)
    print(f"{len(alerts)} alerts, {len(configmaps)} dashboards with {len(queries)} queries: "
          f"schema and metric names check")


if __name__ == "__main__":
    main(*sys.argv[1:])
