//! Teams and a shared server: a team's AdapterDeployment reaches a server in another namespace
//! only while the server's owner grants it (a ServerGrant, in the pattern of Gateway API's
//! ReferenceGrant), loads adapters only from the locations its namespace is allowed, and
//! learns about its FineTuneJobs' outcomes without being woken by their progress.

use std::time::Duration;

use graft_api::{AdapterDeployment, FineTuneJob, ServerGrant};
use graft_testenv::{S3Server, eventually};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

use crate::support::{
    Fleet, WAIT, complete, create_s3_secret, loaded, manifest, ready_reason, reconciles,
    set_pod_phase, setup, start_operator_with, store_adapter, versions_json, wait_for_reason,
};

#[tokio::test(flavor = "multi_thread")]
async fn a_team_uses_a_shared_server_only_while_its_owner_grants_it() {
    let (cp, client) = setup().await;
    let serving = cp.namespace("serving").await;
    let team = cp.namespace("team").await;
    let bucket = S3Server::shared().await.bucket("tenancy");
    let v1 = store_adapter(&bucket, "bot/v1", 4, 41).await;
    let fleet = Fleet::start(&client, &serving, "llama", 2, &[]).await;
    let _operator = start_operator_with(cp, &team, &["--server-namespace", &serving]).await;

    let mut ad = manifest("bot", "llama", "bot", &[(&v1, 100)]);
    ad.spec.server.namespace = Some(serving.clone());
    let api: Api<AdapterDeployment> = Api::namespaced(client.clone(), &team);
    api.create(&PostParams::default(), &ad)
        .await
        .expect("create");
    let refused = wait_for_reason(&client, &team, "bot", "RefNotPermitted").await;
    assert!(ready_reason(&refused).1.contains(&serving));
    for pod in &fleet.pods {
        assert_eq!(complete(&pod.url, "bot").await.0, 404, "nothing loaded");
    }

    let grants: Api<ServerGrant> = Api::namespaced(client.clone(), &serving);
    let grant: ServerGrant = serde_json::from_value(json!({
        "apiVersion": "graft.dev/v1alpha1", "kind": "ServerGrant",
        "metadata": {"name": "team"},
        "spec": {"from": [{"namespace": team}], "to": [{"name": "llama"}]},
    }))
    .expect("a ServerGrant");
    grants
        .create(&PostParams::default(), &grant)
        .await
        .expect("the grant");
    wait_for_reason(&client, &team, "bot", "RolledOut").await;
    for pod in &fleet.pods {
        let (code, body) = complete(&pod.url, "bot").await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["system_fingerprint"], v1.fingerprint());
    }
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &serving);
    let recorded = |cm: ConfigMap| cm.data.unwrap_or_default().contains_key("bot.json");
    assert!(recorded(
        config_maps
            .get("llama-graft-adapters")
            .await
            .expect("the server's ConfigMap")
    ));

    // The owner takes the grant back: the team's adapter leaves the servers.
    grants
        .delete("team", &DeleteParams::default())
        .await
        .expect("revoking");
    wait_for_reason(&client, &team, "bot", "RefNotPermitted").await;
    for pod in &fleet.pods {
        let url = pod.url.clone();
        eventually("the adapter withdrawn", WAIT, async || {
            complete(&url, "bot").await.0 == 404
        })
        .await;
    }
    assert!(!recorded(
        config_maps
            .get("llama-graft-adapters")
            .await
            .expect("the server's ConfigMap")
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_namespace_loads_adapters_only_from_its_allowed_locations() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("ad-sources").await;
    let bucket = S3Server::shared().await.bucket("sources");
    let ours = store_adapter(&bucket, "ours/bot/v1", 4, 51).await;
    let theirs = store_adapter(&bucket, "theirs/bot/v1", 4, 52).await;
    let fleet = Fleet::start(&client, &ns, "llama", 1, &[]).await;
    let allowed = format!("{ns}=s3://{bucket}/ours/");
    let _operator = start_operator_with(cp, &ns, &["--adapter-uri-prefixes", &allowed]).await;

    let api: Api<AdapterDeployment> = Api::namespaced(client.clone(), &ns);
    api.create(
        &PostParams::default(),
        &manifest("bot", "llama", "bot", &[(&theirs, 100)]),
    )
    .await
    .expect("create");
    let refused = wait_for_reason(&client, &ns, "bot", "SourceNotAllowed").await;
    assert!(ready_reason(&refused).1.contains(&theirs.uri));
    assert!(
        loaded(&fleet.pods[0].url).await.is_empty(),
        "the server never read it"
    );

    api.patch(
        "bot",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"versions": versions_json(&[(&ours, 100)])}})),
    )
    .await
    .expect("edit");
    wait_for_reason(&client, &ns, "bot", "RolledOut").await;
    assert_eq!(complete(&fleet.pods[0].url, "bot").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn fine_tune_job_progress_does_not_wake_adapter_deployments() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("ad-progress").await;
    create_s3_secret(&client, &ns, "s3").await;
    let _fleet = Fleet::start(&client, &ns, "llama", 1, &[]).await;
    let operator = start_operator_with(cp, &ns, &["--adapter-recheck-seconds", "300"]).await;
    let job: FineTuneJob = serde_json::from_value(json!({
        "apiVersion": "graft.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "v1"},
        "spec": {"baseModel": {"uri": "s3://models/tiny/"}, "dataset": {"uri": "s3://datasets/t.jsonl"},
                 "output": {"uri": "s3://adapters/v1/"}, "storage": {"secretRef": {"name": "s3"}},
                 "resources": {"gpus": 0}},
    }))
    .expect("a FineTuneJob");
    let jobs: Api<FineTuneJob> = Api::namespaced(client.clone(), &ns);
    jobs.create(&PostParams::default(), &job)
        .await
        .expect("create the job");
    let ad: AdapterDeployment = serde_json::from_value(json!({
        "apiVersion": "graft.dev/v1alpha1", "kind": "AdapterDeployment",
        "metadata": {"name": "bot"},
        "spec": {"server": {"name": "llama"}, "adapterName": "bot",
                 "versions": [{"source": {"fineTuneJobRef": {"name": "v1"}}}]},
    }))
    .expect("an AdapterDeployment");
    Api::<AdapterDeployment>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &ad)
        .await
        .expect("create");
    wait_for_reason(&client, &ns, "bot", "WaitingForFineTuneJob").await;
    // The trainer's identity exists once the operator made the job's children.
    let trainer = cp
        .client_as(&format!("system:serviceaccount:{ns}:v1-trainer"))
        .await;
    let trainer_jobs: Api<FineTuneJob> = Api::namespaced(trainer, &ns);
    let report = |step: u64| {
        json!({"apiVersion": "graft.dev/v1alpha1", "kind": "FineTuneJob",
               "status": {"progress": {"step": step, "totalSteps": 100, "epoch": 0, "loss": 1.5}}})
    };
    eventually("the trainer's identity", WAIT, async || {
        trainer_jobs
            .patch_status(
                "v1",
                &PatchParams::apply("graft-trainer"),
                &Patch::Apply(report(0)),
            )
            .await
            .is_ok()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let before = reconciles(&operator).await;
    for step in 1..=10 {
        trainer_jobs
            .patch_status(
                "v1",
                &PatchParams::apply("graft-trainer"),
                &Patch::Apply(report(step)),
            )
            .await
            .expect("progress");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let woken = reconciles(&operator).await - before;
    assert!(
        woken <= 1,
        "ten progress reports woke the AdapterDeployment {woken} times"
    );

    // Its outcome does wake it: the trainer exits with a config error, the Job fails.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let mut pod = None;
    eventually("the trainer pod", WAIT, async || {
        pod = pods
            .list(&ListParams::default().labels("graft.dev/finetunejob=v1"))
            .await
            .ok()
            .and_then(|l| l.items.into_iter().next())
            .and_then(|p| p.metadata.name);
        pod.is_some()
    })
    .await;
    let pod = pod.expect("found");
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    set_pod_phase(
        &client,
        &ns,
        &pod,
        json!({"terminated": {"exitCode": 2, "reason": "Error", "message": "dataset line 1: not JSON",
                              "startedAt": now, "finishedAt": now}}),
        "Failed",
    )
    .await;
    wait_for_reason(&client, &ns, "bot", "FineTuneJobFailed").await;
}
