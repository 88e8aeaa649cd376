//! Jobs the operator can't start yet: a missing Secret, a base-model scheme this cluster
//! doesn't serve, a Job name someone else took. No Job is created; the reason is in the
//! Ready condition and an Event; the job proceeds by itself once the cause is gone.

use std::time::Duration;

use graft_api::FineTuneJobPhase::*;
use graft_operator::conditions;
use graft_testenv::eventually;
use k8s_openapi::api::{batch::v1::Job, core::v1::ResourceQuota};
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use serde_json::json;

use crate::support::{
    WAIT, condition, create, create_secret, events_of, get, jobs_of, manifest, setup,
    start_operator,
};

#[tokio::test]
async fn a_missing_secret_waits_without_a_job_and_proceeds_once_it_appears() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("ftj-secret").await;
    let _operator = start_operator(cp, &ns, &[]).await;
    create(&client, &ns, &manifest("patient", "late-credentials")).await;

    let api: Api<graft_api::FineTuneJob> = Api::namespaced(client.clone(), &ns);
    eventually("the SecretNotFound condition", WAIT, async || {
        api.get("patient").await.is_ok_and(|f| {
            condition(&f, conditions::READY).is_some_and(|c| c.1 == conditions::SECRET_NOT_FOUND)
        })
    })
    .await;
    let waiting = get(&client, &ns, "patient").await;
    let (on, _, message) = condition(&waiting, conditions::READY).expect("Ready");
    assert_eq!(on, "False");
    assert!(message.contains("late-credentials"), "{message}");
    assert_eq!(waiting.status.and_then(|s| s.phase), Some(Pending));
    // Several retry periods pass without a Job.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(jobs_of(&client, &ns, "patient").await.is_empty());
    assert!(
        events_of(&client, &ns, "patient")
            .await
            .contains(&("Warning".to_owned(), "Waiting".to_owned()))
    );

    create_secret(&client, &ns, "late-credentials").await;
    eventually("the Job once the Secret exists", WAIT, async || {
        !jobs_of(&client, &ns, "patient").await.is_empty()
    })
    .await;
    eventually("Ready to turn True", WAIT, async || {
        api.get("patient")
            .await
            .is_ok_and(|f| condition(&f, conditions::READY).is_some_and(|c| c.0 == "True"))
    })
    .await;
}

#[tokio::test]
async fn a_disabled_model_scheme_or_a_taken_job_name_blocks_with_the_reason() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("ftj-blocked").await;
    create_secret(&client, &ns, "s3-credentials").await;
    let _operator = start_operator(cp, &ns, &["--model-uri-schemes", "s3,file"]).await;

    let mut hub = manifest("from-hub", "s3-credentials");
    hub.spec.base_model.uri = "hf://meta-llama/Llama-3.2-1B".to_owned();
    create(&client, &ns, &hub).await;

    // Someone else's Job already has the name the operator would use.
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let foreign: Job = serde_json::from_value(json!({
        "metadata": {"name": "squatted"},
        "spec": {"suspend": true, "template": {"spec": {"restartPolicy": "Never",
                 "containers": [{"name": "c", "image": "busybox"}]}}},
    }))
    .expect("a Job");
    jobs.create(&PostParams::default(), &foreign)
        .await
        .expect("creating the foreign Job");
    create(&client, &ns, &manifest("squatted", "s3-credentials")).await;

    let api: Api<graft_api::FineTuneJob> = Api::namespaced(client.clone(), &ns);
    for (name, reason, says) in [
        ("from-hub", conditions::UNSUPPORTED_MODEL_SOURCE, "hf://"),
        ("squatted", conditions::JOB_NAME_TAKEN, "squatted"),
    ] {
        eventually(&format!("{name} to wait with {reason}"), WAIT, async || {
            api.get(name)
                .await
                .is_ok_and(|f| condition(&f, conditions::READY).is_some_and(|c| c.1 == reason))
        })
        .await;
        let ftj = get(&client, &ns, name).await;
        let message = condition(&ftj, conditions::READY).expect("Ready").2;
        assert!(message.contains(says), "{message}");
    }
    assert!(jobs_of(&client, &ns, "from-hub").await.is_empty());
    let squatted = jobs.get("squatted").await.expect("the foreign Job");
    assert!(
        squatted.metadata.owner_references.is_none(),
        "the operator leaves a Job it doesn't own alone"
    );

    jobs.delete("squatted", &DeleteParams::foreground())
        .await
        .expect("deleting the foreign Job");
    eventually("the operator's own Job", WAIT, async || {
        jobs.get_opt("squatted").await.is_ok_and(|j| {
            j.is_some_and(|j| j.metadata.owner_references.is_some_and(|o| !o.is_empty()))
        })
    })
    .await;
}

#[tokio::test]
async fn objects_the_apiserver_refuses_are_reported_on_the_job() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("ftj-quota").await;
    create_secret(&client, &ns, "s3-credentials").await;
    // A namespace allowed no Jobs at all.
    let quotas: Api<ResourceQuota> = Api::namespaced(client.clone(), &ns);
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "no-jobs"},
        "spec": {"hard": {"count/jobs.batch": "0"}},
    }))
    .expect("a ResourceQuota");
    quotas
        .create(&PostParams::default(), &quota)
        .await
        .expect("creating the quota");
    eventually(
        "the quota controller to account the quota",
        WAIT,
        async || {
            quotas.get("no-jobs").await.is_ok_and(|q| {
                q.status
                    .and_then(|s| s.hard)
                    .is_some_and(|h| h.contains_key("count/jobs.batch"))
            })
        },
    )
    .await;
    let _operator = start_operator(cp, &ns, &[]).await;
    create(&client, &ns, &manifest("over-quota", "s3-credentials")).await;

    let api: Api<graft_api::FineTuneJob> = Api::namespaced(client.clone(), &ns);
    eventually("the ApplyRefused condition", WAIT, async || {
        api.get("over-quota").await.is_ok_and(|f| {
            condition(&f, conditions::READY).is_some_and(|c| c.1 == conditions::APPLY_REFUSED)
        })
    })
    .await;
    let message = condition(&get(&client, &ns, "over-quota").await, conditions::READY)
        .expect("Ready")
        .2;
    assert!(message.contains("exceeded quota"), "{message}");
    assert!(
        events_of(&client, &ns, "over-quota")
            .await
            .contains(&("Warning".to_owned(), "Waiting".to_owned()))
    );
}
