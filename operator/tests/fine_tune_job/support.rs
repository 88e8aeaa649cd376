//! Shared steps of the FineTuneJob tests. There is no kubelet: the tests play its part by
//! writing pod status, and the trainer's by writing `status.progress` as the trainer would.

use std::{path::Path, time::Duration};

use graft_api::{FineTuneJob, FineTuneJobPhase, all_crds};
use graft_testenv::{ControlPlane, Daemon, eventually, install_crds, unique_name};
use k8s_openapi::{
    api::{
        batch::v1::Job,
        core::v1::{ConfigMap, Pod, Secret, ServiceAccount},
        events::v1::Event,
        rbac::v1::{Role, RoleBinding},
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::OnceCell,
};

const OPERATOR: &str = env!("CARGO_BIN_EXE_graft-operator");
pub const SECRET: &str = "s3-credentials";
pub const WAIT: Duration = Duration::from_secs(60);

/// The shared control plane with the CRDs and the Kubernetes controllers.
pub async fn setup() -> (&'static ControlPlane, Client) {
    static READY: OnceCell<()> = OnceCell::const_new();
    let cp = ControlPlane::shared().await;
    READY
        .get_or_init(async || {
            // CRDs first: the garbage collector learns resources at its start, later ones only
            // at its next 30 s discovery resync, which would slow every cascade.
            install_crds(&cp.client().await, &all_crds()).await;
            cp.start_controllers().await;
        })
        .await;
    (cp, cp.client().await)
}

/// Starts `graft-operator run` for `namespace` only, with short election and retry timings.
pub async fn start_operator(cp: &ControlPlane, namespace: &str, extra: &[&str]) -> Daemon {
    start_operator_with(cp.kubeconfig(), namespace, namespace, extra).await
}

/// [`start_operator`] with the identity `kubeconfig` gives it and its Lease in
/// `lease_namespace`.
pub async fn start_operator_with(
    kubeconfig: &Path,
    namespace: &str,
    lease_namespace: &str,
    extra: &[&str],
) -> Daemon {
    let identity = unique_name("operator");
    let mut args = vec![
        "run",
        "--namespace",
        namespace,
        "--trainer-image",
        "ghcr.io/graft-dev/graft-trainer:test",
        "--metrics-port",
        "{port}",
        "--leader-election-namespace",
        lease_namespace,
        "--identity",
        &identity,
        "--lease-duration-seconds",
        "4",
        "--renew-deadline-seconds",
        "3",
        "--retry-period-seconds",
        "1",
        "--blocked-retry-seconds",
        "1",
    ];
    args.extend_from_slice(extra);
    Daemon::start(kubeconfig, &identity, OPERATOR, &args).await
}

/// A small CPU FineTuneJob whose storage credentials come from `secret`.
pub fn manifest(name: &str, secret: &str) -> FineTuneJob {
    serde_json::from_value(json!({
        "apiVersion": "graft.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "s3://models/tiny/"},
            "dataset": {"uri": "s3://datasets/train.jsonl"},
            "output": {"uri": format!("s3://adapters/{name}/")},
            "storage": {"secretRef": {"name": secret}, "endpoint": "http://127.0.0.1:9000"},
            "resources": {"gpus": 0},
        }
    }))
    .expect("a FineTuneJob manifest")
}

pub async fn create(client: &Client, ns: &str, ftj: &FineTuneJob) {
    Api::<FineTuneJob>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), ftj)
        .await
        .expect("creating the FineTuneJob");
}

pub async fn create_secret(client: &Client, ns: &str, name: &str) {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name},
        "stringData": {"AWS_ACCESS_KEY_ID": "graft", "AWS_SECRET_ACCESS_KEY": "graft-secret"},
    }))
    .expect("a Secret");
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("creating the Secret");
}

pub async fn get(client: &Client, ns: &str, name: &str) -> FineTuneJob {
    Api::<FineTuneJob>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .expect("reading the FineTuneJob")
}

pub fn phase(ftj: &FineTuneJob) -> Option<FineTuneJobPhase> {
    ftj.status.as_ref().and_then(|s| s.phase)
}

/// Waits for `phase` and returns the FineTuneJob as it was then.
pub async fn wait_for_phase(
    client: &Client,
    ns: &str,
    name: &str,
    want: FineTuneJobPhase,
) -> FineTuneJob {
    let api: Api<FineTuneJob> = Api::namespaced(client.clone(), ns);
    eventually(&format!("{name} to be {want:?}"), WAIT, async || {
        api.get(name).await.is_ok_and(|f| phase(&f) == Some(want))
    })
    .await;
    get(client, ns, name).await
}

/// The condition `type_` of `ftj` as (status, reason, message).
pub fn condition(ftj: &FineTuneJob, type_: &str) -> Option<(String, String, String)> {
    ftj.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

pub async fn jobs_of(client: &Client, ns: &str, name: &str) -> Vec<Job> {
    Api::<Job>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("graft.dev/finetunejob={name}")))
        .await
        .expect("listing Jobs")
        .items
}

/// Waits for the job's one live (not terminal, not deleting) pod and returns its name.
pub async fn live_pod(client: &Client, ns: &str, name: &str) -> String {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = ListParams::default().labels(&format!("graft.dev/finetunejob={name}"));
    let live = |p: &Pod| {
        p.metadata.deletion_timestamp.is_none()
            && !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
    };
    let mut found = None;
    eventually(&format!("a live pod of {name}"), WAIT, async || {
        found = pods
            .list(&selector)
            .await
            .ok()
            .and_then(|l| l.items.into_iter().find(|p| live(p)))
            .and_then(|p| p.metadata.name);
        found.is_some()
    })
    .await;
    found.expect("found above")
}

/// What the kubelet would write for a started trainer container.
pub async fn set_pod_running(client: &Client, ns: &str, pod: &str) {
    let now = Timestamp::now().to_string();
    set_pod_status(
        client,
        ns,
        pod,
        json!({
            "phase": "Running",
            "startTime": now,
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
            "containerStatuses": [container_status(true, &json!({"running": {"startedAt": now}}))],
        }),
    )
    .await;
}

/// What the kubelet would write for a trainer that exited with `code` and `message` in its
/// termination log.
pub async fn set_pod_terminated(client: &Client, ns: &str, pod: &str, code: i32, message: &str) {
    let now = Timestamp::now().to_string();
    let phase = if code == 0 { "Succeeded" } else { "Failed" };
    let state = json!({"terminated": {
        "exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" },
        "message": message, "startedAt": now, "finishedAt": now,
    }});
    set_pod_status(
        client,
        ns,
        pod,
        json!({
            "phase": phase,
            "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": now}],
            "containerStatuses": [container_status(false, &state)],
        }),
    )
    .await;
}

fn container_status(ready: bool, state: &Value) -> Value {
    json!({
        "name": "trainer", "image": "ghcr.io/graft-dev/graft-trainer:test", "imageID": "",
        "ready": ready, "restartCount": 0, "state": state,
    })
}

async fn set_pod_status(client: &Client, ns: &str, pod: &str, status: Value) {
    Api::<Pod>::namespaced(client.clone(), ns)
        .patch_status(
            pod,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await
        .unwrap_or_else(|e| panic!("writing the status of pod {pod}: {e}"));
}

/// Writes `status.progress` as the trainer does: server-side apply under its own field
/// manager, with the per-job identity the operator created for it.
pub async fn report_progress(cp: &ControlPlane, ns: &str, name: &str, step: u64, loss: f64) {
    let progress = json!({"step": step, "totalSteps": 100, "epoch": 0, "loss": loss});
    apply_as_trainer(cp, ns, name, json!({"progress": progress})).await;
}

/// Server-side apply of `status` to FineTuneJob `name` as its trainer: field manager
/// `graft-trainer`, with the job's own ServiceAccount.
async fn apply_as_trainer(cp: &ControlPlane, ns: &str, name: &str, status: Value) {
    let trainer = cp
        .client_as(&format!("system:serviceaccount:{ns}:{name}-trainer"))
        .await;
    let patch =
        json!({"apiVersion": "graft.dev/v1alpha1", "kind": "FineTuneJob", "status": status});
    Api::<FineTuneJob>::namespaced(trainer, ns)
        .patch_status(
            name,
            &PatchParams::apply("graft-trainer"),
            &Patch::Apply(&patch),
        )
        .await
        .expect("the trainer's identity may write its job's status");
}

/// The (type, reason) of every Event about `name`.
pub async fn events_of(client: &Client, ns: &str, name: &str) -> Vec<(String, String)> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("listing Events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| (e.type_.unwrap_or_default(), e.reason.unwrap_or_default()))
        .collect()
}

/// A plain HTTP/1.0 GET on 127.0.0.1: the status code and body.
pub async fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connecting to the operator");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .expect("sending a request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("reading the response");
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// The operator's `graft_reconciles_total` for FineTuneJobs.
pub async fn reconciles(port: u16) -> u64 {
    let (_, metrics) = http_get(port, "/metrics").await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"graft_reconciles_total{controller="finetunejob"} "#))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until the operator has run `more` reconciles beyond `since` — so that a check made
/// afterwards sees what the operator did, not what it had yet to do.
pub async fn wait_for_reconciles(port: u16, since: u64, more: u64) {
    eventually("the operator to reconcile", WAIT, async || {
        reconciles(port).await >= since + more
    })
    .await;
}

/// Waits until the garbage collector has removed every child of `name`.
pub async fn assert_children_removed(client: &Client, ns: &str, name: &str) {
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    let configs: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let roles: Api<Role> = Api::namespaced(client.clone(), ns);
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), ns);
    let identity = format!("{name}-trainer");
    let labelled = ListParams::default().labels(&format!("graft.dev/finetunejob={name}"));
    eventually(
        "the garbage collector to remove every child",
        WAIT,
        async || {
            jobs.get_opt(name).await.is_ok_and(|o| o.is_none())
                && configs
                    .list(&labelled)
                    .await
                    .is_ok_and(|l| l.items.is_empty())
                && accounts.get_opt(&identity).await.is_ok_and(|o| o.is_none())
                && roles.get_opt(&identity).await.is_ok_and(|o| o.is_none())
                && bindings.get_opt(&identity).await.is_ok_and(|o| o.is_none())
        },
    )
    .await;
}

/// Writes `status.adapter` as the trainer does when it has published its adapter.
pub async fn record_adapter(cp: &ControlPlane, ns: &str, name: &str, sha256: &str) {
    let adapter = json!({"uri": format!("s3://adapters/{name}/"), "sha256": sha256,
                         "sizeBytes": 10, "trainableParameters": 5});
    apply_as_trainer(cp, ns, name, json!({"adapter": adapter})).await;
}

/// What the kubelet writes when it cannot build the trainer container's configuration.
pub async fn set_pod_config_error(client: &Client, ns: &str, pod: &str, message: &str) {
    set_pod_status(
        client,
        ns,
        pod,
        json!({
            "phase": "Pending",
            "containerStatuses": [container_status(false, &json!({"waiting": {
                "reason": "CreateContainerConfigError", "message": message,
            }}))],
        }),
    )
    .await;
}
