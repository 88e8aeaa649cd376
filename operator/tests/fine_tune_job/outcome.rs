//! The outcome of a training run is never lost and never paid for twice: a Job deleted before
//! its outcome was recorded is not made again (that would train again on a GPU); the adapter the
//! trainer recorded itself survives its pod and its Job. Statuses read as kstatus, `kubectl
//! wait` and the Argo CD health checks we ship expect.

use std::time::Duration;

use graft_api::{FineTuneJob, FineTuneJobPhase::*};
use graft_operator::conditions;
use graft_testenv::eventually;
use k8s_openapi::api::batch::v1::Job;
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams},
};
use serde_json::json;

use crate::{
    health::{argocd_health, kubectl_wait},
    support::{
        SECRET, WAIT, condition, create, create_secret, get, jobs_of, live_pod, manifest,
        record_adapter, set_pod_running, set_pod_terminated, setup, start_operator, wait_for_phase,
    },
};

#[tokio::test]
async fn a_job_deleted_mid_run_is_never_made_again() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("ftj-deleted").await;
    create_secret(&client, &ns, SECRET).await;
    let _operator = start_operator(cp, &ns, &[]).await;
    create(&client, &ns, &manifest("once", SECRET)).await;
    let pod = live_pod(&client, &ns, "once").await;
    set_pod_running(&client, &ns, &pod).await;
    wait_for_phase(&client, &ns, "once", Running).await;
    let first = jobs_of(&client, &ns, "once").await[0].metadata.uid.clone();

    // A user (or a TTL) deletes the Job while the trainer runs.
    Api::<Job>::namespaced(client.clone(), &ns)
        .delete("once", &DeleteParams::background())
        .await
        .expect("deleting the Job");
    let failed = wait_for_phase(&client, &ns, "once", Failed).await;
    let (on, reason, message) = condition(&failed, conditions::FAILED).expect("Failed");
    assert_eq!(
        (on.as_str(), reason.as_str()),
        ("True", conditions::JOB_DELETED)
    );
    assert!(message.contains("resume"), "{message}");
    assert_eq!(
        condition(&failed, conditions::STALLED).map(|c| c.0),
        Some("True".to_owned())
    );
    // Several reconciles later, still no second Job.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let jobs = jobs_of(&client, &ns, "once").await;
    assert!(
        jobs.iter().all(|j| j.metadata.uid == first),
        "no second Job: {:?}",
        jobs.iter().map(|j| &j.metadata.uid).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn the_adapter_the_trainer_recorded_outlives_its_pod_and_its_job() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("ftj-recorded").await;
    create_secret(&client, &ns, SECRET).await;
    let operator = start_operator(cp, &ns, &[]).await;
    create(&client, &ns, &manifest("kept", SECRET)).await;
    let pod = live_pod(&client, &ns, "kept").await;
    set_pod_running(&client, &ns, &pod).await;
    wait_for_phase(&client, &ns, "kept", Running).await;

    // The operator is down while the run ends: the trainer records its adapter, exits (its
    // termination message lost with the pod), and the Job is cleaned up (a TTL) before any
    // operator has seen it finish.
    operator.kill();
    record_adapter(cp, &ns, "kept", &"e".repeat(64)).await;
    set_pod_terminated(&client, &ns, &pod, 0, "").await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    eventually("the Job to complete", WAIT, async || {
        jobs.get("kept").await.is_ok_and(|j| {
            j.status.and_then(|s| s.conditions).is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Complete" && c.status == "True")
            })
        })
    })
    .await;
    jobs.delete("kept", &DeleteParams::background())
        .await
        .expect("deleting the Job");
    eventually("the Job to be gone", WAIT, async || {
        jobs.get_opt("kept").await.is_ok_and(|j| j.is_none())
    })
    .await;

    let _operator = start_operator(cp, &ns, &[]).await;
    let done = wait_for_phase(&client, &ns, "kept", Succeeded).await;
    assert_eq!(
        done.status.and_then(|s| s.adapter).map(|a| a.sha256),
        Some("e".repeat(64))
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        jobs_of(&client, &ns, "kept").await.is_empty(),
        "no Job made again"
    );
}

#[tokio::test]
async fn statuses_read_as_kubectl_wait_and_argo_cd_expect() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("ftj-kstatus").await;
    create_secret(&client, &ns, SECRET).await;
    let _operator = start_operator(cp, &ns, &["--backoff-limit", "0"]).await;
    create(&client, &ns, &manifest("good", SECRET)).await;
    create(&client, &ns, &manifest("bad", SECRET)).await;
    create(&client, &ns, &manifest("blocked", "absent")).await;

    let good = live_pod(&client, &ns, "good").await;
    set_pod_running(&client, &ns, &good).await;
    let running = wait_for_phase(&client, &ns, "good", Running).await;
    assert_eq!(argocd_health("FineTuneJob", &running).0, "Progressing");
    assert!(
        !kubectl_wait(cp, &ns, "finetunejob/good", "condition=Ready", "1s"),
        "a running job is not Ready"
    );
    let result = json!({"adapter": {"uri": "s3://adapters/good/", "sha256": "ab",
                                    "sizeBytes": 1, "trainableParameters": 1}});
    set_pod_terminated(&client, &ns, &good, 0, &result.to_string()).await;
    assert!(kubectl_wait(
        cp,
        &ns,
        "finetunejob/good",
        "condition=Ready",
        "60s"
    ));
    let done = get(&client, &ns, "good").await;
    assert_eq!(
        argocd_health("FineTuneJob", &done),
        (
            "Healthy".to_owned(),
            "adapter at s3://adapters/good/ (sha256 ab)".to_owned()
        )
    );

    let bad = live_pod(&client, &ns, "bad").await;
    set_pod_terminated(&client, &ns, &bad, 1, "CUDA out of memory").await;
    assert!(kubectl_wait(
        cp,
        &ns,
        "finetunejob/bad",
        "condition=Stalled",
        "60s"
    ));
    assert!(!kubectl_wait(
        cp,
        &ns,
        "finetunejob/bad",
        "condition=Ready",
        "1s"
    ));
    let failed = get(&client, &ns, "bad").await;
    let (health, message) = argocd_health("FineTuneJob", &failed);
    assert_eq!(health, "Degraded");
    assert!(message.contains("CUDA out of memory"), "{message}");

    assert!(kubectl_wait(
        cp,
        &ns,
        "finetunejob/blocked",
        "condition=Stalled",
        "60s"
    ));
    let (health, message) = argocd_health("FineTuneJob", &get(&client, &ns, "blocked").await);
    assert_eq!(health, "Degraded");
    assert!(message.starts_with("SecretNotFound"), "{message}");

    // A finished job's status still catches up with a later edit, so whoever waits for the
    // edit to be observed is not left waiting.
    let api: Api<FineTuneJob> = Api::namespaced(client.clone(), &ns);
    let edited = api
        .patch(
            "good",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"image": "ghcr.io/graft-dev/graft-trainer:next"}})),
        )
        .await
        .expect("editing the image");
    let generation = edited.metadata.generation.expect("generation");
    assert!(kubectl_wait(
        cp,
        &ns,
        "finetunejob/good",
        &format!("jsonpath={{.status.observedGeneration}}={generation}"),
        "60s"
    ));
    let after = get(&client, &ns, "good").await;
    assert_eq!(after.status.as_ref().and_then(|s| s.phase), Some(Succeeded));
    assert_eq!(argocd_health("FineTuneJob", &after).0, "Healthy");
}
