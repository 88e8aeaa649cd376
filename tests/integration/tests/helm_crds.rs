//! CRD upgrades through Helm, on a control plane of this binary's own (the CRDs are
//! cluster-wide, and here a Helm release owns them): `helm upgrade` with a changed schema serves
//! the new schema; `helm uninstall` leaves the CRDs and every object of Graft's kinds, and a new
//! install takes them over again, its operator finishing what was left (an AdapterDeployment's
//! unload finalizer).

use std::{path::Path, process::Command, time::Duration};

use graft_api::{AdapterDeployment, FineTuneJob};
use graft_testenv::{ControlPlane, Daemon, eventually, repo_root, workspace_binary};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

fn run(mut command: Command) {
    let shown = format!("{command:?}");
    let out = command.output().unwrap_or_else(|e| panic!("{shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn helm(cp: &ControlPlane, args: &[&str]) {
    let mut command = cp.command("helm");
    command.args(args);
    run(command);
}

/// The chart as an earlier release shipped it: FineTuneJobs without `activeDeadlineSeconds`.
fn older_chart(into: &Path) -> String {
    run({
        let mut cp = Command::new("cp");
        cp.arg("-r").arg(repo_root().join("charts/graft")).arg(into);
        cp
    });
    let chart = into.join("graft");
    let crds = chart.join("files/crds.yaml");
    let text = std::fs::read_to_string(&crds).expect("the chart's CRDs");
    let mut docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML"))
        .collect();
    let mut removed = false;
    for doc in &mut docs {
        if doc["metadata"]["name"] == "finetunejobs.graft.dev" {
            let spec = &mut doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
                ["properties"];
            removed = spec
                .as_mapping_mut()
                .and_then(|m| m.remove("activeDeadlineSeconds"))
                .is_some();
        }
    }
    assert!(removed, "the current schema has activeDeadlineSeconds");
    let older = docs.iter().fold(String::new(), |mut out, d| {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(d).expect("YAML"));
        out
    });
    std::fs::write(&crds, older).expect("the older CRDs");
    chart.to_str().expect("utf-8").to_owned()
}

/// `graft-operator run` for `team` with the rights the chart grants its ServiceAccount.
async fn chart_operator(cp: &ControlPlane, system: &str, team: &str) -> Daemon {
    let account = format!("system:serviceaccount:{system}:graft-operator");
    let kubeconfig = cp.kubeconfig_as(&account);
    let operator = workspace_binary("graft-operator");
    Daemon::start(
        &kubeconfig,
        "graft-operator",
        operator.to_str().expect("utf-8"),
        &[
            "run",
            "--trainer-image",
            "ghcr.io/graft-dev/graft-trainer:test",
            "--metrics-port",
            "{port}",
            "--leader-elect",
            "false",
            "--namespace",
            team,
            "--server-namespace",
            system,
            "--adapter-recheck-seconds",
            "2",
        ],
    )
    .await
}

fn job(name: &str) -> FineTuneJob {
    serde_json::from_value(json!({
        "apiVersion": "graft.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {"baseModel": {"uri": "s3://models/tiny/"}, "dataset": {"uri": "s3://datasets/t.jsonl"},
                 "output": {"uri": format!("s3://adapters/{name}/")}, "activeDeadlineSeconds": 3600},
    }))
    .expect("a FineTuneJob")
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_upgrades_the_crds_and_uninstall_leaves_them_and_their_objects() {
    let cp = ControlPlane::shared().await;
    cp.start_controllers().await;
    let client = cp.client().await;
    let system = cp.namespace("graft-system").await;
    let team = cp.namespace("team").await;
    let chart = repo_root().join("charts/graft");
    let chart = chart.to_str().expect("utf-8");
    let scratch = tempfile::tempdir().expect("tempdir");
    let older = older_chart(scratch.path());

    helm(cp, &["install", "graft", &older, "--namespace", &system]);
    let jobs: Api<FineTuneJob> = Api::namespaced(client.clone(), &team);
    let before = jobs
        .create(&PostParams::default(), &job("before"))
        .await
        .expect("create");
    assert_eq!(
        before.spec.active_deadline_seconds, None,
        "the older schema prunes the field it does not know"
    );

    helm(cp, &["upgrade", "graft", chart, "--namespace", &system]);
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    eventually("the upgraded schema to be served", WAIT, async || {
        jobs.create(&PostParams::default(), &job("after"))
            .await
            .is_ok_and(|j| j.spec.active_deadline_seconds == Some(3600))
            || jobs
                .get_opt("after")
                .await
                .ok()
                .flatten()
                .is_some_and(|j| j.spec.active_deadline_seconds == Some(3600))
    })
    .await;
    assert!(
        crds.get("servergrants.graft.dev").await.is_ok(),
        "a new kind arrives with the upgrade"
    );

    // The chart's operator (as its ServiceAccount) puts its finalizer on an AdapterDeployment.
    let _operator = chart_operator(cp, &system, &team).await;
    let ads: Api<AdapterDeployment> = Api::namespaced(client.clone(), &team);
    let ad: AdapterDeployment = serde_json::from_value(json!({
        "apiVersion": "graft.dev/v1alpha1", "kind": "AdapterDeployment",
        "metadata": {"name": "bot"},
        "spec": {"server": {"name": "llama", "namespace": system}, "adapterName": "bot",
                 "versions": [{"source": {"uri": "s3://adapters/bot/", "sha256": "a".repeat(64)}}]},
    }))
    .expect("an AdapterDeployment");
    ads.create(&PostParams::default(), &ad)
        .await
        .expect("create");
    eventually("the operator's finalizer", WAIT, async || {
        ads.get("bot").await.is_ok_and(|a| {
            a.metadata
                .finalizers
                .is_some_and(|f| f.iter().any(|f| f == "graft.dev/unload-adapter"))
        })
    })
    .await;

    helm(
        cp,
        &["uninstall", "graft", "--namespace", &system, "--wait"],
    );
    for name in [
        "finetunejobs.graft.dev",
        "adapterdeployments.graft.dev",
        "servergrants.graft.dev",
    ] {
        crds.get(name)
            .await
            .unwrap_or_else(|e| panic!("{name} kept after uninstall: {e}"));
    }
    assert!(jobs.get("before").await.is_ok() && jobs.get("after").await.is_ok());
    let left = ads.get("bot").await.expect("the AdapterDeployment is left");
    assert_eq!(
        left.spec.server.namespace.as_deref(),
        Some(system.as_str()),
        "with every field"
    );

    // Installed again under the same name, the release takes the CRDs back and its operator
    // finishes the deletion the finalizer holds.
    helm(cp, &["install", "graft", chart, "--namespace", &system]);
    ads.delete("bot", &DeleteParams::default())
        .await
        .expect("delete");
    eventually("the AdapterDeployment to go", WAIT, async || {
        ads.get_opt("bot").await.is_ok_and(|a| a.is_none())
    })
    .await;
}
