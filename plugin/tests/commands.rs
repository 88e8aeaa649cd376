//! `kubectl graft status`, `loss`, and the edits' server-side apply, against the real local
//! control plane (no operator: the tests write the statuses an operator and a trainer would).

use graft_api::{AdapterDeployment, FineTuneJob, all_crds};
use graft_testenv::{ControlPlane, install_crds};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

const PLUGIN: &str = env!("CARGO_BIN_EXE_kubectl-graft");

async fn setup(prefix: &str) -> (&'static ControlPlane, Client, String) {
    let cp = ControlPlane::shared().await;
    let client = cp.client().await;
    install_crds(&client, &all_crds()).await;
    let ns = cp.namespace(prefix).await;
    (cp, client, ns)
}

fn plugin(cp: &ControlPlane, args: &[&str]) -> (bool, String) {
    cp.run(std::path::Path::new(PLUGIN), args)
}

/// A FineTuneJob with `status` written through the status subresource.
async fn job(client: &Client, ns: &str, name: &str, status: Value) {
    let api: Api<FineTuneJob> = Api::namespaced(client.clone(), ns);
    let job: FineTuneJob = serde_json::from_value(json!({
        "apiVersion": "graft.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {"baseModel": {"uri": "s3://models/tiny/"}, "dataset": {"uri": "s3://data/train.jsonl"},
                 "output": {"uri": format!("s3://adapters/{name}/")}},
    }))
    .expect("a FineTuneJob");
    api.create(&PostParams::default(), &job)
        .await
        .expect("create");
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await
    .expect("status");
}

async fn deployment(client: &Client, ns: &str, manager: &str, versions: Value, status: Value) {
    let api: Api<AdapterDeployment> = Api::namespaced(client.clone(), ns);
    let ad = json!({
        "apiVersion": "graft.dev/v1alpha1", "kind": "AdapterDeployment",
        "metadata": {"name": "bot"},
        "spec": {"server": {"name": "llama"}, "adapterName": "bot", "versions": versions},
    });
    api.patch("bot", &PatchParams::apply(manager), &Patch::Apply(&ad))
        .await
        .expect("apply");
    api.patch_status(
        "bot",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await
    .expect("status");
}

/// The field managers that own `spec.versions`.
fn owners_of_versions(ad: &AdapterDeployment) -> Vec<String> {
    ad.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|f| {
            f.fields_v1
                .as_ref()
                .is_some_and(|v| v.0["f:spec"].get("f:versions").is_some())
        })
        .filter_map(|f| f.manager.clone())
        .collect()
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

#[tokio::test]
async fn status_shows_jobs_and_deployments_in_one_table() {
    let (cp, client, ns) = setup("plugin-status").await;
    job(
        &client,
        &ns,
        "bot-v3",
        json!({"phase": "Running", "progress": {"step": 120, "totalSteps": 480, "loss": 1.2345,
               "tokensPerSecond": 1900.0, "etaSeconds": 720}}),
    )
    .await;
    job(
        &client,
        &ns,
        "bot-v2",
        json!({"phase": "Succeeded", "adapter": {"uri": "s3://adapters/bot-v2/", "sha256": "a".repeat(64),
               "sizeBytes": 10, "trainableParameters": 5}}),
    )
    .await;
    deployment(
        &client,
        &ns,
        "kubectl",
        json!([{"source": {"fineTuneJobRef": {"name": "bot-v2"}}, "weight": 90},
               {"source": {"fineTuneJobRef": {"name": "bot-v3"}}, "weight": 10}]),
        json!({"phase": "Loading", "replicas": {"desired": 3, "ready": 1},
               "conditions": [{"type": "Ready", "status": "False", "reason": "RollingOut",
                               "message": "1 of 3 server pods serve the versions", "lastTransitionTime": now()}]}),
    )
    .await;

    let (ok, out) = plugin(cp, &["status", "-n", &ns]);
    assert!(ok, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("KIND") && lines[0].contains("PROGRESS"),
        "{out}"
    );
    let row = |name: &str| {
        lines
            .iter()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("no row for {name} in\n{out}"))
            .to_owned()
    };
    let running = row("bot-v3");
    assert!(running.starts_with("FineTuneJob"), "{running}");
    assert!(
        running.contains("Running") && running.contains("120/480 steps (25%)"),
        "{running}"
    );
    assert!(
        running.contains("loss 1.2345, 1900 tok/s, 12m left"),
        "{running}"
    );
    assert!(
        row("bot-v2").contains("adapter s3://adapters/bot-v2/"),
        "{out}"
    );
    let ad = row("bot");
    assert!(
        ad.starts_with("AdapterDeployment") && ad.contains("Loading"),
        "{ad}"
    );
    assert!(ad.contains("1/3 pods"), "{ad}");
    assert!(ad.contains("bot on llama: bot-v2 90% + bot-v3 10%"), "{ad}");
    assert!(
        ad.contains("RollingOut: 1 of 3 server pods serve the versions"),
        "{ad}"
    );

    // Every namespace: a NAMESPACE column first.
    let (ok, out) = plugin(cp, &["status", "--all-namespaces"]);
    assert!(ok, "{out}");
    assert!(out.starts_with("NAMESPACE"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with(&format!("{ns} ")) && l.contains("bot-v3")),
        "{out}"
    );

    let empty = cp.namespace("plugin-empty").await;
    let (ok, out) = plugin(cp, &["status", "-n", &empty]);
    assert!(
        ok && out.contains("No FineTuneJobs or AdapterDeployments"),
        "{out}"
    );
}

#[tokio::test]
async fn loss_draws_the_status_history() {
    let (cp, client, ns) = setup("plugin-loss").await;
    let history: Vec<Value> = (1..=30_u32)
        .map(|s| {
            let mut point = json!({"step": s, "loss": 3.0 / f64::from(s)});
            if s == 15 {
                point["evalLoss"] = json!(0.4);
            }
            point
        })
        .collect();
    job(
        &client,
        &ns,
        "bot-v3",
        json!({"phase": "Running", "progress": {"step": 30, "totalSteps": 60, "epoch": 0,
               "loss": 0.1, "evalLoss": 0.4, "history": history}}),
    )
    .await;
    let (ok, out) = plugin(
        cp,
        &[
            "loss", "bot-v3", "-n", &ns, "--width", "40", "--height", "8",
        ],
    );
    assert!(ok, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "bot-v3: step 30 of 60, epoch 1, loss 0.1000, validation loss 0.4000"
    );
    let plot: Vec<&str> = lines[1..9].to_vec();
    assert!(plot[0].starts_with("3.0000 ┤•"), "{out}");
    assert!(
        plot[7].starts_with("0.1000 ┤") && plot[7].ends_with('•'),
        "{out}"
    );
    assert!(
        plot.iter().any(|l| l.contains('o')),
        "the evaluation is marked:\n{out}"
    );
    assert!(out.contains("• training loss   o validation loss"), "{out}");

    job(&client, &ns, "queued", json!({"phase": "Pending"})).await;
    let (ok, out) = plugin(cp, &["loss", "queued", "-n", &ns]);
    assert!(ok, "{out}");
    assert!(
        out.contains("no loss reported yet (phase Pending)"),
        "{out}"
    );
    let (ok, out) = plugin(cp, &["loss", "missing", "-n", &ns]);
    assert!(
        !ok && out.contains("no FineTuneJob missing in namespace"),
        "{out}"
    );
}

#[tokio::test]
async fn edits_apply_only_the_versions_and_leave_gitops_owned_ones_alone() {
    let (cp, client, ns) = setup("plugin-edit").await;
    let v2 = json!({"source": {"fineTuneJobRef": {"name": "bot-v2"}}, "weight": 100});
    deployment(&client, &ns, "argocd-controller", json!([v2]), json!({})).await;

    // The manifest to commit, and nothing changed in the cluster.
    let (ok, out) = plugin(
        cp,
        &["canary", "bot", "bot-v3", "10", "-n", &ns, "--dry-run"],
    );
    assert!(ok, "{out}");
    let manifest: Value = serde_yaml::from_str(&out).expect("YAML");
    assert_eq!(
        manifest["spec"]["versions"],
        json!([{"source": {"fineTuneJobRef": {"name": "bot-v2"}}, "weight": 90},
               {"source": {"fineTuneJobRef": {"name": "bot-v3"}}, "weight": 10}])
    );
    assert_eq!(manifest["spec"]["server"]["name"], "llama");
    let api: Api<AdapterDeployment> = Api::namespaced(client.clone(), &ns);
    assert_eq!(api.get("bot").await.expect("get").spec.versions.len(), 1);

    // Argo CD owns the versions: the plugin does not take them silently.
    let (ok, out) = plugin(cp, &["promote", "bot", "bot-v3", "-n", &ns]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("managed by argocd-controller") && out.contains("--force-conflicts"),
        "{out}"
    );
    assert_eq!(api.get("bot").await.expect("get").spec.versions.len(), 1);

    // Taken over, applied, and waited for: nothing reports Ready here, so it times out.
    let (ok, out) = plugin(
        cp,
        &[
            "promote",
            "bot",
            "bot-v3",
            "-n",
            &ns,
            "--force-conflicts",
            "--timeout",
            "2",
        ],
    );
    assert!(!ok, "{out}");
    assert!(out.contains("versions: bot-v3 100%"), "{out}");
    assert!(out.contains("not Ready after 2s"), "{out}");
    assert!(out.contains("no pods of server llama"), "{out}");
    let ad = api.get("bot").await.expect("get");
    assert_eq!(
        serde_json::to_value(&ad.spec.versions).expect("json"),
        json!([{"source": {"fineTuneJobRef": {"name": "bot-v3"}}, "weight": 100}])
    );
    assert_eq!(owners_of_versions(&ad), ["kubectl-graft"]);

    // Versions set by hand (`kubectl apply`) are simply taken over.
    let by_hand = cp.namespace("plugin-edit").await;
    deployment(
        &client,
        &by_hand,
        "kubectl-client-side-apply",
        json!([v2]),
        json!({}),
    )
    .await;
    let (ok, out) = plugin(
        cp,
        &[
            "canary",
            "bot",
            "bot-v3",
            "10",
            "-n",
            &by_hand,
            "--timeout",
            "1",
        ],
    );
    assert!(!ok && out.contains("not Ready after 1s"), "{out}");
    assert!(out.contains("versions: bot-v2 90% + bot-v3 10%"), "{out}");
    let api: Api<AdapterDeployment> = Api::namespaced(client.clone(), &by_hand);
    let ad = api.get("bot").await.expect("get");
    assert_eq!(ad.spec.versions.len(), 2);
    assert_eq!(owners_of_versions(&ad), ["kubectl-graft"]);

    let (ok, out) = plugin(cp, &["canary", "bot", "s3://adapters/x/", "10", "-n", &ns]);
    assert!(!ok && out.contains("--sha256"), "{out}");
}
