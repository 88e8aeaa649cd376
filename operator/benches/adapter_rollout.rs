//! Rollout latency: from an edited AdapterDeployment (a new version) to `Ready` with every one
//! of 3 real graft-server processes serving it and verified, p50/p99 over 20 rollouts, on the
//! committed tiny model and the local control plane and S3 server.
//!
//!     cargo build --release -p graft-server && cargo bench -p graft-operator --bench adapter_rollout
//!
//! Target (issue 6): under 2 s.

#![allow(clippy::print_stdout)] // a benchmark reports on stdout

#[path = "../tests/adapter_deployment/support.rs"]
#[allow(dead_code)]
mod support;

use std::time::{Duration, Instant};

use graft_api::AdapterDeployment;
use graft_testenv::S3Server;
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;
use support::{Fleet, manifest, setup, start_operator, store_adapter, versions_json};

const ROLLOUTS: usize = 20;

#[tokio::main]
async fn main() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("ad-bench").await;
    let bucket = S3Server::shared().await.bucket("ad-bench");
    let mut versions = Vec::new();
    for i in 0..=ROLLOUTS {
        versions.push(store_adapter(&bucket, &format!("bot/v{i}"), 16, 500 + i as u64).await);
    }
    let _fleet = Fleet::start(&client, &ns, "llama", 3, &[]).await;
    let _operator = start_operator(cp, &ns).await;
    let api: Api<AdapterDeployment> = Api::namespaced(client.clone(), &ns);
    api.create(
        &PostParams::default(),
        &manifest("bot", "llama", "bot", &[(&versions[0], 100)]),
    )
    .await
    .expect("create");
    wait_ready(&api).await;

    let mut latencies = Vec::new();
    for version in &versions[1..] {
        let started = Instant::now();
        api.patch(
            "bot",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"versions": versions_json(&[(version, 100)])}})),
        )
        .await
        .expect("edit");
        wait_ready(&api).await;
        latencies.push(started.elapsed());
    }
    latencies.sort();
    let at = |p: f64| {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((latencies.len() - 1) as f64 * p).round() as usize;
        latencies[i].as_secs_f64() * 1e3
    };
    println!(
        "apply → Ready on 3 servers (rank-16 adapter from local S3, {ROLLOUTS} rollouts): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        at(0.5),
        at(0.99),
        at(1.0)
    );
}

/// Until the current generation is Ready, polling every 20 ms.
async fn wait_ready(api: &Api<AdapterDeployment>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ad = api.get("bot").await.expect("get");
        let status = ad.status.unwrap_or_default();
        if status.observed_generation == ad.metadata.generation
            && status.phase == Some(graft_api::AdapterDeploymentPhase::Ready)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not Ready within 60 s: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
