//! The Helm chart with real `helm` against the local control plane: it lints, its rendered
//! objects pass the apiserver's server-side dry run, and install / upgrade / uninstall leave
//! exactly the expected objects.

use std::{
    path::PathBuf,
    process::{Command, Output},
};

use graft_testenv::{ControlPlane, unique_name};
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::ServiceAccount,
        policy::v1::PodDisruptionBudget,
        rbac::v1::{ClusterRole, Role},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::Api;
use serde::Deserialize;

fn chart() -> PathBuf {
    graft_testenv::repo_root().join("charts/graft")
}

fn run(mut command: Command) -> Output {
    let shown = format!("{command:?}");
    let out = command.output().unwrap_or_else(|e| panic!("{shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn helm(cp: &ControlPlane, args: &[&str]) -> Command {
    let mut command = cp.command("helm");
    command.args(args);
    command
}

#[tokio::test]
async fn chart_lints_clean() {
    let cp = ControlPlane::shared().await;
    let chart = chart();
    let out = run(helm(
        cp,
        &["lint", "--strict", chart.to_str().expect("utf-8 path")],
    ));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 chart(s) linted, 0 chart(s) failed"));
}

#[tokio::test]
async fn rendered_chart_passes_server_side_dry_run() {
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("helm-template").await;
    let chart = chart();
    // Offline, `helm template` assumes an old Kubernetes; render for the apiserver at hand.
    let version = cp
        .client()
        .await
        .apiserver_version()
        .await
        .expect("/version")
        .git_version;
    let rendered = run(helm(
        cp,
        &[
            "template",
            "graft",
            chart.to_str().expect("utf-8 path"),
            "--namespace",
            &ns,
            "--include-crds",
            "--kube-version",
            &version,
            // One model server, so its Deployment and Service are validated too.
            "--set",
            "servers[0].name=llama,servers[0].model.uri=s3://models/llama/,servers[0].gpus=1,\
             servers[0].storage.secretName=s3-credentials,networkPolicy.enabled=true,\
             dashboards.enabled=true",
            "--set-json",
            r#"networkPolicy.serverIngressFrom=[{"namespaceSelector":{"matchLabels":{"team":"a"}}}]"#,
        ],
    ))
    .stdout;
    assert_the_operator_reaches_the_admin_port_only(&rendered);

    let stdout = cp.server_dry_run(&ns, &rendered);
    for object in [
        "customresourcedefinition.apiextensions.k8s.io/finetunejobs.graft.dev",
        "customresourcedefinition.apiextensions.k8s.io/adapterdeployments.graft.dev",
        "deployment.apps/graft-operator",
        "serviceaccount/graft-operator",
        "clusterrole.rbac.authorization.k8s.io/graft-operator",
        "role.rbac.authorization.k8s.io/graft-operator-leader-election",
        "poddisruptionbudget.policy/graft-operator",
        "deployment.apps/llama",
        "service/llama",
        "networkpolicy.networking.k8s.io/graft-operator",
        "networkpolicy.networking.k8s.io/llama",
        // The Grafana dashboards (the PrometheusRule needs the Prometheus Operator's CRD;
        // tests/monitoring/check.sh checks it with promtool).
        "configmap/graft-operator-dashboard",
        "configmap/graft-training-dashboard",
        "configmap/graft-serving-dashboard",
        "customresourcedefinition.apiextensions.k8s.io/servergrants.graft.dev",
        "clusterrole.rbac.authorization.k8s.io/graft-edit",
        "clusterrole.rbac.authorization.k8s.io/graft-view",
        "serviceaccount/graft-server",
        "clusterrolebinding.rbac.authorization.k8s.io/graft-server-auth-delegator",
        "validatingadmissionpolicy.admissionregistration.k8s.io/graft-finetunejob-output",
    ] {
        // "created", or "configured" for the cluster-scoped CRDs another test installed already.
        let accepted = stdout
            .lines()
            .any(|l| l.starts_with(&format!("{object} ")) && l.ends_with("(server dry run)"));
        assert!(accepted, "{object} missing in:\n{stdout}");
    }
}

/// With `serverIngressFrom` limiting who reaches the servers, the operator must still reach
/// their admin port, and nobody else may.
fn assert_the_operator_reaches_the_admin_port_only(rendered: &[u8]) {
    let text = String::from_utf8_lossy(rendered);
    let policy = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).expect("YAML"))
        .find(|o| o["kind"] == "NetworkPolicy" && o["metadata"]["name"] == "llama")
        .expect("the server's NetworkPolicy");
    let rules = policy["spec"]["ingress"]
        .as_sequence()
        .expect("ingress rules");
    let admin = rules
        .iter()
        .find(|r| r["ports"][0]["port"] == 8001)
        .expect("a rule for the admin port");
    let from = admin["from"].as_sequence().expect("admin peers");
    assert_eq!(from.len(), 1, "{from:?}");
    assert_eq!(
        from[0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "graft-operator"
    );
    assert!(
        from[0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"].is_string(),
        "the operator's namespace only"
    );
    let public = rules
        .iter()
        .find(|r| r["ports"][0]["port"] == 8000)
        .expect("a rule for the API port");
    assert_eq!(
        public["from"][0]["namespaceSelector"]["matchLabels"]["team"],
        "a"
    );
}

#[tokio::test]
async fn install_upgrade_and_uninstall_manage_exactly_the_charts_objects() {
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("helm-install").await;
    let release = unique_name("graft");
    let chart = chart();
    let chart = chart.to_str().expect("utf-8 path");
    let client = cp.client().await;
    let operator = format!("{release}-operator");

    run(helm(cp, &["install", &release, chart, "--namespace", &ns]));
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    assert_installed_objects(&client, &ns, &operator).await;
    assert_file_outputs_are_refused_at_apply(cp, &ns).await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());

    run(helm(
        cp,
        &[
            "upgrade",
            &release,
            chart,
            "--namespace",
            &ns,
            "--set",
            "operator.replicas=3",
            "--set",
            "operator.logLevel=debug",
        ],
    ));
    let upgraded = deployments
        .get(&operator)
        .await
        .expect("Deployment after upgrade");
    assert_eq!(upgraded.spec.as_ref().and_then(|s| s.replicas), Some(3));
    let env = upgraded
        .spec
        .and_then(|s| s.template.spec)
        .map(|p| p.containers[0].env.clone().unwrap_or_default())
        .unwrap_or_default();
    assert!(
        env.iter()
            .any(|e| e.name == "RUST_LOG" && e.value.as_deref() == Some("debug")),
        "{env:?}"
    );

    run(helm(
        cp,
        &["uninstall", &release, "--namespace", &ns, "--wait"],
    ));
    assert!(
        deployments.get_opt(&operator).await.expect("get").is_none(),
        "Deployment removed"
    );
    assert!(
        Api::<ClusterRole>::all(client.clone())
            .get_opt(&operator)
            .await
            .expect("get")
            .is_none(),
        "ClusterRole removed"
    );
    assert!(
        Api::<ServiceAccount>::namespaced(client.clone(), &ns)
            .get_opt(&operator)
            .await
            .expect("get")
            .is_none()
    );
    // Helm never deletes CRDs, so custom resources survive an uninstall.
    crds.get("finetunejobs.graft.dev")
        .await
        .expect("CRDs stay after uninstall");
}

#[tokio::test]
async fn bad_values_are_rejected_by_the_schema() {
    let cp = ControlPlane::shared().await;
    let chart = chart();
    let chart = chart.to_str().expect("utf-8 path");
    for (value, needle) in [
        ("operator.replicas=0", "replicas"),
        ("operator.logLevel=loud", "logLevel"),
        ("operator.image.pullPolicy=Sometimes", "pullPolicy"),
        ("operator.replica=2", "replica"),
        ("prometheusRule.degradedFor=soon", "degradedFor"),
        ("dashboards.namespace=Not_A_Namespace", "namespace"),
    ] {
        let out = helm(cp, &["template", "graft", chart, "--set", value])
            .output()
            .expect("helm");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{value} was accepted");
        assert!(
            stderr.contains("values don't meet the specifications of the schema"),
            "{value}: {stderr}"
        );
        assert!(stderr.contains(needle), "{value}: {stderr}");
    }
}

/// The chart's admission policy refuses a FineTuneJob writing to `file://` at `kubectl apply`.
async fn assert_file_outputs_are_refused_at_apply(cp: &ControlPlane, ns: &str) {
    let manifest = |output: &str| {
        format!(
            "apiVersion: graft.dev/v1alpha1\nkind: FineTuneJob\nmetadata: {{name: local}}\n\
             spec: {{baseModel: {{uri: 's3://models/'}}, dataset: {{uri: 's3://datasets/t.jsonl'}}, \
             output: {{uri: '{output}'}}}}\n"
        )
    };
    let apply = |manifest: String| {
        use std::io::Write;
        let mut child = cp
            .command("kubectl")
            .args(["apply", "--dry-run=server", "--namespace", ns, "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kubectl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(manifest.as_bytes())
            .expect("write");
        child.wait_with_output().expect("kubectl")
    };
    // The policy is enforced once the apiserver has loaded it.
    graft_testenv::eventually(
        "the admission policy",
        std::time::Duration::from_secs(60),
        async || !apply(manifest("file:///adapters/local/")).status.success(),
    )
    .await;
    let refused = apply(manifest("file:///adapters/local/"));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("file:// outputs are not allowed"),
        "{stderr}"
    );
    let accepted = apply(manifest("s3://adapters/local/"));
    assert!(
        accepted.status.success(),
        "{}",
        String::from_utf8_lossy(&accepted.stderr)
    );
}

/// What a default install creates: the operator Deployment with a restricted pod, its
/// ServiceAccount, least-privilege RBAC, a PDB and the CRDs.
async fn assert_installed_objects(client: &kube::Client, ns: &str, operator: &str) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let deployment = deployments
        .get(operator)
        .await
        .expect("the operator Deployment exists");
    let spec = deployment.spec.expect("spec");
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.expect("pod spec");
    assert_eq!(pod.service_account_name.as_deref(), Some(operator));
    let security = pod.containers[0]
        .security_context
        .clone()
        .expect("container security context");
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(
        pod.security_context.and_then(|s| s.run_as_non_root),
        Some(true)
    );

    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .get(operator)
        .await
        .expect("ServiceAccount");
    let role = Api::<ClusterRole>::all(client.clone())
        .get(operator)
        .await
        .expect("ClusterRole");
    let rules = role.rules.unwrap_or_default();
    assert!(
        !rules
            .iter()
            .any(|r| r.resources.iter().flatten().any(|res| res == "secrets")),
        "the operator reads no Secret"
    );
    assert!(
        !rules.iter().any(|r| r.verbs.iter().any(|v| v == "delete")),
        "the garbage collector deletes, not the operator"
    );
    assert!(
        !rules.iter().any(|r| r.verbs.iter().any(|v| v == "*")
            || r.resources.iter().flatten().any(|res| res == "*")),
        "no wildcard rules"
    );
    Api::<Role>::namespaced(client.clone(), ns)
        .get(&format!("{operator}-leader-election"))
        .await
        .expect("Role");
    Api::<PodDisruptionBudget>::namespaced(client.clone(), ns)
        .get(operator)
        .await
        .expect("PDB");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.get("finetunejobs.graft.dev")
        .await
        .expect("helm installed the CRDs");
}
