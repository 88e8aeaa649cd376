//! 500 FineTuneJobs applied at once: how long until every one has its Job, and the operator's
//! peak RSS. The peer, run side by side against the same apiserver, is the floor: this process
//! applying the very same children (ServiceAccount, Role, RoleBinding, ConfigMap, Job) for 500
//! jobs directly, with no watch, no reconcile and no status. The ratio is the operator's
//! overhead over that floor.
//!
//! `cargo bench -p graft-operator --bench fine_tune_job_scale` (`JOBS=n` to change the count,
//! `CONCURRENCY=n` for the operator's `--max-concurrent-reconciles`, default 16).

#![allow(clippy::print_stdout)] // a benchmark reports on stdout

use std::{
    path::Path,
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use graft_api::{FineTuneJob, all_crds};
use graft_operator::fine_tune_job::{TrainerDefaults, apply_children, build};
use graft_testenv::{ControlPlane, Daemon, install_crds};
use k8s_openapi::{
    api::{batch::v1::Job, core::v1::Secret},
    apimachinery::pkg::api::resource::Quantity,
};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};
use serde_json::json;

const OPERATOR: &str = env!("CARGO_BIN_EXE_graft-operator");
/// Concurrent requests of the client applying the jobs (and of the peer): `kubectl apply` of
/// a directory is sequential; a GitOps controller applies in parallel. 32 is in between.
const IN_FLIGHT: usize = 32;

fn manifest(name: &str) -> FineTuneJob {
    serde_json::from_value(json!({
        "apiVersion": "graft.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "s3://models/llama-3.1-8b/"},
            "dataset": {"uri": format!("s3://datasets/{name}.jsonl")},
            "output": {"uri": format!("s3://adapters/{name}/")},
            "storage": {"secretRef": {"name": "s3-credentials"}, "endpoint": "http://minio:9000"},
            "resources": {"gpus": 1},
        }
    }))
    .expect("a FineTuneJob manifest")
}

async fn create_secret(client: &Client, ns: &str) {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "s3-credentials"},
        "stringData": {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"},
    }))
    .expect("a Secret");
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("creating the Secret");
}

async fn create_all(client: &Client, ns: &str, count: usize) -> Vec<FineTuneJob> {
    let api: Api<FineTuneJob> = Api::namespaced(client.clone(), ns);
    stream::iter(0..count)
        .map(|i| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), &manifest(&format!("job-{i:04}")))
                    .await
                    .expect("creating a FineTuneJob")
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await
}

async fn count_jobs(client: &Client, ns: &str) -> usize {
    Api::<Job>::namespaced(client.clone(), ns)
        .list_metadata(&ListParams::default())
        .await
        .map_or(0, |l| l.items.len())
}

/// The floor: create the FineTuneJobs, then apply their children from here, as fast as the
/// apiserver takes them.
async fn peer(client: &Client, ns: &str, count: usize) -> Duration {
    let started = Instant::now();
    let ftjs = create_all(client, ns, count).await;
    let defaults = TrainerDefaults {
        image: "ghcr.io/graft-dev/graft-trainer:0.1.0".to_owned(),
        model_cache_size: Quantity("100Gi".to_owned()),
        backoff_limit: 3,
    };
    stream::iter(&ftjs)
        .map(|ftj| {
            let defaults = &defaults;
            async move {
                let children = build(ftj, defaults).expect("building children");
                apply_children(client, &children)
                    .await
                    .expect("applying children");
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<()>>()
        .await;
    started.elapsed()
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN);
    kib / 1024.0
}

#[tokio::main]
async fn main() {
    let count: usize = std::env::var("JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(500);
    let concurrency = std::env::var("CONCURRENCY").unwrap_or_else(|_| "16".to_owned());
    let cp = ControlPlane::shared().await;
    let client = cp.client().await;
    install_crds(&client, &all_crds()).await;

    // The peer: FineTuneJobs created without an operator, then their children applied here.
    let peer_ns = cp.namespace("bench-peer").await;
    create_secret(&client, &peer_ns).await;
    let floor = peer(&client, &peer_ns, count).await;
    assert_eq!(count_jobs(&client, &peer_ns).await, count);

    // The operator: all FineTuneJobs at once, then wait for every Job.
    let ns = cp.namespace("bench-operator").await;
    create_secret(&client, &ns).await;
    let operator = Daemon::start(
        Path::new(cp.kubeconfig()),
        "bench-operator",
        OPERATOR,
        &[
            "run",
            "--namespace",
            &ns,
            "--trainer-image",
            "ghcr.io/graft-dev/graft-trainer:0.1.0",
            "--metrics-port",
            "{port}",
            "--leader-elect=false",
            "--max-concurrent-reconciles",
            &concurrency,
        ],
    )
    .await;
    let idle_rss = peak_rss_mib(operator.pid());
    let started = Instant::now();
    create_all(&client, &ns, count).await;
    let applied = started.elapsed();
    let deadline = started + Duration::from_secs(300);
    while count_jobs(&client, &ns).await < count {
        assert!(
            Instant::now() < deadline,
            "not every FineTuneJob had its Job after 300 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_jobs = started.elapsed();
    let rss = peak_rss_mib(operator.pid());

    println!(
        "fine_tune_job_scale: {count} FineTuneJobs, --max-concurrent-reconciles {concurrency}"
    );
    println!(
        "  client applied all FineTuneJobs in        {:>8.2} s",
        applied.as_secs_f64()
    );
    println!(
        "  operator: every FineTuneJob has its Job   {:>8.2} s   (target < 60 s)",
        all_jobs.as_secs_f64()
    );
    println!(
        "  peer: created and children applied here   {:>8.2} s",
        floor.as_secs_f64()
    );
    println!(
        "  ratio operator / peer                     {:>8.2}",
        all_jobs.as_secs_f64() / floor.as_secs_f64()
    );
    println!(
        "  operator peak RSS                         {rss:>8.1} MiB (target < 100 MiB; {idle_rss:.1} MiB idle)"
    );
}
