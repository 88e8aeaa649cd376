//! Jobs the operator can't start yet: a missing Secret, a base-model scheme this cluster
//! doesn't serve, a name someone else's object holds. No Job is created and nobody's object is
//! touched; the job is Stalled with the reason (on Ready too) and an Event; it proceeds by
//! itself once the cause is gone.

use std::time::Duration;

use graft_api::FineTuneJobPhase::*;
use graft_operator::conditions;
use graft_testenv::eventually;
use k8s_openapi::api::{
    batch::v1::Job,
    core::v1::{ConfigMap, ResourceQuota, ServiceAccount},
};
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
    eventually(
        "Stalled to clear and Reconciling to take over",
        WAIT,
        async || {
            api.get("patient").await.is_ok_and(|f| {
                condition(&f, conditions::STALLED).is_some_and(|c| c.0 == "False")
                    && condition(&f, conditions::RECONCILING)
                        .is_some_and(|c| c.0 == "True" && c.1 == conditions::POD_PENDING)
            })
        },
    )
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
        ("squatted", conditions::NAME_TAKEN, "squatted"),
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
        let stalled = condition(&ftj, conditions::STALLED).expect("Stalled");
        assert_eq!((stalled.0.as_str(), stalled.1.as_str()), ("True", reason));
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

/// The name of `ftj`'s rendered config in `ns`, as the operator will build it.
fn config_name(ftj: &graft_api::FineTuneJob, ns: &str) -> String {
    let mut local = ftj.clone();
    local.metadata.namespace = Some(ns.to_owned());
    local.metadata.uid = Some("00000000-0000-0000-0000-000000000000".to_owned());
    let defaults = graft_operator::fine_tune_job::TrainerDefaults {
        image: "i".to_owned(),
        model_cache_size: k8s_openapi::apimachinery::pkg::api::resource::Quantity("1Gi".into()),
        backoff_limit: 1,
    };
    graft_operator::fine_tune_job::build(&local, &defaults)
        .expect("build")
        .config
        .and_then(|c| c.metadata.name)
        .expect("config name")
}

/// Every child's name, not only the Job's: a ServiceAccount, a ConfigMap someone made with the
/// name the operator would use are never rewritten, owned or garbage-collected with the job.
#[tokio::test]
async fn no_child_takes_over_an_object_someone_else_made() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("ftj-taken").await;
    create_secret(&client, &ns, "s3-credentials").await;
    let ftj = manifest("hijack", "s3-credentials");
    let config_name = config_name(&ftj, &ns);

    let theirs = json!({"team.example/owner": "someone-else"});
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let account: ServiceAccount = serde_json::from_value(
        json!({"metadata": {"name": "hijack-trainer", "annotations": theirs}}),
    )
    .expect("a ServiceAccount");
    accounts
        .create(&PostParams::default(), &account)
        .await
        .expect("their ServiceAccount");
    let configs: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let config: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": config_name, "annotations": theirs},
        "data": {"theirs": "yes"},
    }))
    .expect("a ConfigMap");
    configs
        .create(&PostParams::default(), &config)
        .await
        .expect("their ConfigMap");
    let versions = (
        accounts
            .get("hijack-trainer")
            .await
            .expect("sa")
            .metadata
            .resource_version,
        configs
            .get(&config_name)
            .await
            .expect("cm")
            .metadata
            .resource_version,
    );

    let _operator = start_operator(cp, &ns, &[]).await;
    create(&client, &ns, &ftj).await;
    let api: Api<graft_api::FineTuneJob> = Api::namespaced(client.clone(), &ns);
    let stalled_on = |kind: &'static str| {
        let api = api.clone();
        async move {
            eventually(&format!("NameTaken for the {kind}"), WAIT, async || {
                api.get("hijack").await.is_ok_and(|f| {
                    condition(&f, conditions::STALLED).is_some_and(|c| {
                        c.0 == "True" && c.1 == conditions::NAME_TAKEN && c.2.contains(kind)
                    })
                })
            })
            .await;
        }
    };
    stalled_on("ServiceAccount").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(jobs_of(&client, &ns, "hijack").await.is_empty(), "no Job");
    assert_eq!(
        accounts
            .get("hijack-trainer")
            .await
            .expect("sa")
            .metadata
            .resource_version,
        versions.0,
        "their ServiceAccount is untouched"
    );

    accounts
        .delete("hijack-trainer", &DeleteParams::default())
        .await
        .expect("deleting their ServiceAccount");
    stalled_on("ConfigMap").await;
    let untouched = configs.get(&config_name).await.expect("cm");
    assert_eq!(untouched.metadata.resource_version, versions.1);
    assert!(untouched.metadata.owner_references.is_none());
    assert!(jobs_of(&client, &ns, "hijack").await.is_empty(), "no Job");

    configs
        .delete(&config_name, &DeleteParams::default())
        .await
        .expect("deleting their ConfigMap");
    eventually("the job's own Job", WAIT, async || {
        !jobs_of(&client, &ns, "hijack").await.is_empty()
    })
    .await;
    let ours = accounts
        .get("hijack-trainer")
        .await
        .expect("the job's ServiceAccount");
    assert!(
        ours.metadata
            .owner_references
            .is_some_and(|o| o.iter().any(|r| r.kind == "FineTuneJob")),
        "the name is the job's now"
    );
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
