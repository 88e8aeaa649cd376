//! Faults during rollouts, with clients sending requests throughout: the operator's leader
//! killed mid-promotion, a server process restarted during a canary, the apiserver restarted
//! and the object store stopped mid-rollout, and twenty hot swaps in a row.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use graft_api::{AdapterDeployment, AdapterDeploymentPhase};
use graft_testenv::{ControlPlane, Daemon, S3Server, eventually};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;

use crate::{
    Row,
    load::{Load, Seen},
    support::{
        Fleet, Version, WAIT, listing, manifest, start_operator_with, store_adapter, versions_json,
        wait_for_reason,
    },
};

const CLIENTS: usize = 32;

async fn set_versions(api: &Api<AdapterDeployment>, versions: &[(&Version, u32)]) {
    api.patch(
        "bot",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"versions": versions_json(versions)}})),
    )
    .await
    .expect("edit the versions");
}

/// Every answer came from one of `assigned`, and none failed.
fn check(seen: &Seen, assigned: &[&Version]) {
    assert!(
        seen.failures.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        seen.failures.len(),
        seen.requests,
        &seen.failures[..seen.failures.len().min(3)]
    );
    let allowed: BTreeSet<String> = assigned.iter().map(|v| v.fingerprint()).collect();
    let strays: Vec<&String> = seen
        .by_version
        .keys()
        .filter(|v| !allowed.contains(*v))
        .collect();
    assert!(
        strays.is_empty(),
        "answers from versions never assigned: {strays:?}"
    );
    assert!(seen.requests > 0, "no request was sent");
}

fn urls(fleet: &Fleet) -> Vec<String> {
    fleet.pods.iter().map(|p| p.url.clone()).collect()
}

async fn leading(operator: &Daemon) -> bool {
    let Ok(response) = reqwest::get(format!("http://127.0.0.1:{}/metrics", operator.port())).await
    else {
        return false;
    };
    response
        .text()
        .await
        .is_ok_and(|t| t.contains("graft_leader 1"))
}

fn elected(lease: &str) -> [&str; 12] {
    [
        "--leader-elect",
        "true",
        "--lease-name",
        lease,
        "--lease-duration-seconds",
        "4",
        "--renew-deadline-seconds",
        "3",
        "--retry-period-seconds",
        "1",
        "--adapter-recheck-seconds",
        "2",
    ]
}

/// The leader is killed (SIGKILL) while it promotes v2 under 32 clients: the standby takes the
/// Lease over and finishes the promotion.
pub async fn leader_failover(cp: &ControlPlane, client: &Client) -> Row {
    let ns = cp.namespace("chaos-leader").await;
    let bucket = S3Server::shared().await.bucket("chaos-leader");
    let v1 = store_adapter(&bucket, "bot/v1", 8, 101).await;
    let v2 = store_adapter(&bucket, "bot/v2", 8, 102).await;
    let fleet = Fleet::start(client, &ns, "llama", 3, &[]).await;
    let lease_ns = ["--leader-election-namespace", &ns];
    let args: Vec<&str> = elected("chaos").iter().chain(&lease_ns).copied().collect();
    let first = start_operator_with(cp, &ns, &args).await;
    eventually("the first replica to lead", WAIT, async || {
        leading(&first).await
    })
    .await;
    let standby = start_operator_with(cp, &ns, &args).await;
    let api: Api<AdapterDeployment> = Api::namespaced(client.clone(), &ns);
    api.create(
        &PostParams::default(),
        &manifest("bot", "llama", "bot", &[(&v1, 100)]),
    )
    .await
    .expect("create");
    wait_for_reason(client, &ns, "bot", "RolledOut").await;

    let load = Load::start(&urls(&fleet), "bot", CLIENTS);
    tokio::time::sleep(Duration::from_millis(500)).await;
    set_versions(&api, &[(&v2, 100)]).await;
    // Mid-promotion: as soon as any pod has v2 staged or swapped in.
    let url = fleet.pods[0].url.clone();
    eventually("the promotion under way", WAIT, async || {
        listing(&url).await["adapters"]["bot"]
            .as_array()
            .is_some_and(|v| v.iter().any(|v| v["sha256"] == v2.sha256.as_str()))
    })
    .await;
    first.kill();
    let killed = Instant::now();
    eventually("the standby to lead", WAIT, async || {
        leading(&standby).await
    })
    .await;
    let done = wait_for_reason(client, &ns, "bot", "RolledOut").await;
    let recovered = killed.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = load.finish().await;
    check(&seen, &[&v1, &v2]);
    let status = done.status.expect("status");
    assert_eq!(status.phase, Some(AdapterDeploymentPhase::Ready));
    assert_eq!(status.versions[0].sha256, v2.sha256);
    assert_eq!(status.versions[0].ready_replicas, 3);
    Row {
        scenario: "leader killed mid-promotion".to_owned(),
        faults: "SIGKILL of the leading operator; standby takes the Lease".to_owned(),
        requests: Some(seen.requests),
        failures: seen.failures.len(),
        recovered: Some(recovered),
    }
}

/// A server process restarts during a 90/10 canary: it comes back serving both versions at
/// their weights, from the ConfigMap, before it turns ready.
pub async fn server_restart(cp: &ControlPlane, client: &Client) -> Row {
    let ns = cp.namespace("chaos-restart").await;
    let bucket = S3Server::shared().await.bucket("chaos-restart");
    let v1 = store_adapter(&bucket, "bot/v1", 8, 111).await;
    let v2 = store_adapter(&bucket, "bot/v2", 8, 112).await;
    let mut fleet = Fleet::start(client, &ns, "llama", 2, &[]).await;
    let _operator = start_operator_with(cp, &ns, &[]).await;
    let api: Api<AdapterDeployment> = Api::namespaced(client.clone(), &ns);
    api.create(
        &PostParams::default(),
        &manifest("bot", "llama", "bot", &[(&v1, 90), (&v2, 10)]),
    )
    .await
    .expect("create");
    wait_for_reason(client, &ns, "bot", "RolledOut").await;

    // Clients of the Service reach only ready pods: the survivor while the other restarts.
    let survivor = Load::start(&[fleet.pods[1].url.clone()], "bot", CLIENTS);
    let restarted = Instant::now();
    fleet.restart(0).await;
    let recovered = restarted.elapsed();
    let before_restart = survivor.finish().await;
    check(&before_restart, &[&v1, &v2]);
    let serving = listing(&fleet.pods[0].url).await["adapters"]["bot"].clone();
    let weights: BTreeSet<(String, u64)> = serving
        .as_array()
        .expect("bot is served")
        .iter()
        .map(|v| {
            (
                v["sha256"].as_str().unwrap_or_default().to_owned(),
                v["weight"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        weights,
        [(v1.sha256.clone(), 90), (v2.sha256.clone(), 10)].into(),
        "{serving}"
    );
    // Requests to the restarted pod pick the versions by their weights.
    let mut seen = Seen::default();
    for _ in 0..60 {
        if seen.requests >= 400 {
            break;
        }
        let more = Load::start(&[fleet.pods[0].url.clone()], "bot", 8);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let next = more.finish().await;
        seen.requests += next.requests;
        for (version, n) in next.by_version {
            *seen.by_version.entry(version).or_default() += n;
        }
        seen.failures.extend(next.failures);
    }
    check(&seen, &[&v1, &v2]);
    let canary = seen.by_version.get(&v2.fingerprint()).copied().unwrap_or(0);
    #[allow(clippy::cast_precision_loss)] // counts of requests, far below 2^52
    let share = canary as f64 / seen.requests as f64;
    // 10% of at least 400: outside 3%..20% happens with probability under 1e-6.
    assert!(
        (0.03..=0.20).contains(&share),
        "the canary answered {canary} of {} requests",
        seen.requests
    );
    wait_for_reason(client, &ns, "bot", "RolledOut").await;
    Row {
        scenario: "server restarted in a 90/10 canary".to_owned(),
        faults: format!(
            "SIGKILL + restart of a server; back at 90/10 (canary {:.0}%)",
            share * 100.0
        ),
        requests: Some(before_restart.requests + seen.requests),
        failures: before_restart.failures.len() + seen.failures.len(),
        recovered: Some(recovered),
    }
}

/// The object store stops and the apiserver restarts while v2 rolls out: Degraded with the
/// reason, then Ready by itself once both are back; v1 keeps serving throughout.
pub async fn outage(cp: &ControlPlane, client: &Client) -> Row {
    let ns = cp.namespace("chaos-outage").await;
    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("chaos-outage");
    let v1 = store_adapter(&bucket, "bot/v1", 8, 121).await;
    let v2 = store_adapter(&bucket, "bot/v2", 8, 122).await;
    let fleet = Fleet::start(client, &ns, "llama", 2, &[]).await;
    // No election: with the apiserver down past the renew deadline an elected operator exits
    // (and its Deployment restarts it); here one process lives through the outage.
    let _operator = start_operator_with(cp, &ns, &[]).await;
    let api: Api<AdapterDeployment> = Api::namespaced(client.clone(), &ns);
    api.create(
        &PostParams::default(),
        &manifest("bot", "llama", "bot", &[(&v1, 100)]),
    )
    .await
    .expect("create");
    wait_for_reason(client, &ns, "bot", "RolledOut").await;

    let load = Load::start(&urls(&fleet), "bot", CLIENTS);
    s3.stop();
    set_versions(&api, &[(&v2, 100)]).await;
    let degraded = wait_for_reason(client, &ns, "bot", "LoadFailed").await;
    let status = degraded.status.clone().expect("status");
    assert_eq!(status.phase, Some(AdapterDeploymentPhase::Degraded));
    let message = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(!message.is_empty(), "Degraded says why");
    cp.restart_apiserver(Duration::from_secs(3)).await;
    s3.start().await;
    let back = Instant::now();
    let ready = wait_for_reason(client, &ns, "bot", "RolledOut").await;
    let recovered = back.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = load.finish().await;
    check(&seen, &[&v1, &v2]);
    assert_eq!(ready.status.expect("status").versions[0].sha256, v2.sha256);
    Row {
        scenario: "apiserver restart + S3 down mid-rollout".to_owned(),
        faults: format!(
            "S3 stopped, apiserver SIGKILL + 3 s down; Degraded: {}",
            message.chars().take(60).collect::<String>()
        ),
        requests: Some(seen.requests),
        failures: seen.failures.len(),
        recovered: Some(recovered),
    }
}

/// Twenty promotions in a row under 32 clients.
pub async fn hot_swaps(cp: &ControlPlane, client: &Client) -> Row {
    let ns = cp.namespace("chaos-swaps").await;
    let bucket = S3Server::shared().await.bucket("chaos-swaps");
    let mut versions = Vec::new();
    for i in 0..=20 {
        versions.push(store_adapter(&bucket, &format!("bot/v{i}"), 8, 200 + i).await);
    }
    let fleet = Fleet::start(client, &ns, "llama", 2, &[]).await;
    let _operator = start_operator_with(cp, &ns, &[]).await;
    let api: Api<AdapterDeployment> = Api::namespaced(client.clone(), &ns);
    api.create(
        &PostParams::default(),
        &manifest("bot", "llama", "bot", &[(&versions[0], 100)]),
    )
    .await
    .expect("create");
    wait_for_reason(client, &ns, "bot", "RolledOut").await;
    let load = Load::start(&urls(&fleet), "bot", CLIENTS);
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for version in &versions[1..] {
        let swap = Instant::now();
        set_versions(&api, &[(version, 100)]).await;
        let done = wait_for_reason(client, &ns, "bot", "RolledOut").await;
        assert_eq!(
            done.status.expect("status").versions[0].sha256,
            version.sha256
        );
        slowest = slowest.max(swap.elapsed());
    }
    let seen = load.finish().await;
    let all: Vec<&Version> = versions.iter().collect();
    check(&seen, &all);
    Row {
        scenario: "20 hot swaps".to_owned(),
        faults: format!(
            "20 promotions in {:.1} s, every answer from an assigned version",
            started.elapsed().as_secs_f64()
        ),
        requests: Some(seen.requests),
        failures: seen.failures.len(),
        recovered: Some(slowest),
    }
}
