//! A FineTuneJob through the running operator: created → Running → progress → Succeeded,
//! failures with the trainer's reason, suspend and resume, and deletion.

use std::time::Duration;

use graft_api::{FineTuneJob, FineTuneJobPhase::*};
use graft_operator::{conditions, fine_tune_job::QUEUE_LABEL};
use graft_testenv::eventually;
use k8s_openapi::api::{batch::v1::Job, core::v1::Pod};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams},
};
use serde_json::{Value, json};

use crate::support::{
    SECRET, WAIT, assert_children_removed, condition, create, create_secret, events_of, get,
    http_get, jobs_of, live_pod, manifest, phase, reconciles, report_progress, set_pod_running,
    set_pod_terminated, setup, start_operator, wait_for_phase, wait_for_reconciles,
};

#[tokio::test]
async fn a_job_runs_reports_progress_and_succeeds_with_its_adapter() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("ftj-success").await;
    create_secret(&client, &ns, SECRET).await;
    let operator = start_operator(cp, &ns, &[]).await;
    create(&client, &ns, &manifest("tiny", SECRET)).await;

    let pending = wait_for_phase(&client, &ns, "tiny", Pending).await;
    assert_eq!(
        condition(&pending, conditions::RECONCILING).map(|c| (c.0, c.1)),
        Some(("True".to_owned(), conditions::POD_PENDING.to_owned()))
    );
    let started = pending.status.as_ref().and_then(|s| s.start_time.clone());
    assert!(started.is_some(), "startTime is set with the Job");

    let pod = live_pod(&client, &ns, "tiny").await;
    set_pod_running(&client, &ns, &pod).await;
    wait_for_phase(&client, &ns, "tiny", Running).await;

    report_progress(cp, &ns, "tiny", 42, 1.25).await;
    let table = cp
        .command("kubectl")
        .args(["get", "ftj", "tiny", "--namespace", &ns])
        .output()
        .expect("kubectl get ftj");
    let table = String::from_utf8_lossy(&table.stdout);
    let row = table.lines().nth(1).unwrap_or_default();
    let cells: Vec<&str> = row.split_whitespace().collect();
    // The method column: the operator writes `status.method` (the job names none: LoRA).
    assert_eq!(
        &cells[..6],
        ["tiny", "Running", "lora", "42", "100", "1.25"],
        "{table}"
    );

    let adapter = json!({"adapter": {"uri": "s3://adapters/tiny/", "sha256": "9f2c",
                                     "sizeBytes": 65536, "trainableParameters": 4096}});
    set_pod_terminated(&client, &ns, &pod, 0, &adapter.to_string()).await;
    let done = wait_for_phase(&client, &ns, "tiny", Succeeded).await;
    let status = done.status.clone().expect("status");
    let artifact = status.adapter.expect("status.adapter");
    assert_eq!(
        (
            artifact.uri.as_str(),
            artifact.sha256.as_str(),
            artifact.size_bytes
        ),
        ("s3://adapters/tiny/", "9f2c", 65536)
    );
    assert_eq!(artifact.trainable_parameters, 4096);
    assert!(status.completion_time.is_some());
    assert_eq!(status.start_time, started, "startTime never moves");
    assert_eq!(status.observed_generation, done.metadata.generation);
    let progress = status.progress.expect("the trainer's progress survives");
    assert_eq!(progress.step, 42);

    // Pods go (pod GC, a node scaled down): a finished job stays as it finished.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.delete(&pod, &DeleteParams::default())
        .await
        .expect("deleting the pod");
    eventually("the pod to be gone", WAIT, async || {
        pods.get_opt(&pod).await.is_ok_and(|p| p.is_none())
    })
    .await;
    let before = reconciles(operator.port()).await;
    let touch = json!({"metadata": {"annotations": {"example.com/touched": "yes"}}});
    Api::<FineTuneJob>::namespaced(client.clone(), &ns)
        .patch("tiny", &PatchParams::default(), &Patch::Merge(touch))
        .await
        .expect("touching the job");
    wait_for_reconciles(operator.port(), before, 1).await;
    let later = get(&client, &ns, "tiny").await;
    assert_eq!(phase(&later), Some(Succeeded));
    assert_eq!(
        later.status.and_then(|s| s.adapter),
        status_adapter_again(&done)
    );

    let events = events_of(&client, &ns, "tiny").await;
    for reason in ["Pending", "Running", "Succeeded"] {
        assert!(
            events.iter().any(|(_, r)| r == reason),
            "no {reason} Event in {events:?}"
        );
    }
    assert_operator_endpoints(operator.port()).await;
    assert_json_logs_name_the_object(&operator.log(), &ns, "tiny");
}

fn status_adapter_again(ftj: &FineTuneJob) -> Option<graft_api::AdapterArtifact> {
    ftj.status.as_ref().and_then(|s| s.adapter.clone())
}

async fn assert_operator_endpoints(port: u16) {
    assert_eq!(http_get(port, "/healthz").await.0, 200);
    assert_eq!(http_get(port, "/readyz").await.0, 200);
    let (code, metrics) = http_get(port, "/metrics").await;
    assert_eq!(code, 200);
    for series in [
        r#"graft_reconciles_total{controller="finetunejob"}"#,
        r#"graft_reconcile_duration_seconds_count{controller="finetunejob"}"#,
        r#"graft_finetunejobs{phase="Succeeded"} 1"#,
        "graft_leader 1",
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(series)),
            "{series} missing:\n{metrics}"
        );
    }
}

fn assert_json_logs_name_the_object(log: &str, ns: &str, name: &str) {
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let about_job: Vec<&Value> = lines
        .iter()
        .filter(|l| l["span"]["finetunejob"] == name)
        .collect();
    assert!(!about_job.is_empty(), "no log line names {name}:\n{log}");
    for line in about_job {
        assert_eq!(line["span"]["namespace"], ns, "{line}");
    }
}

#[tokio::test]
async fn failed_pod_sets_failed_condition_with_termination_message_and_counts_retries() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("ftj-fail").await;
    create_secret(&client, &ns, SECRET).await;
    let _operator = start_operator(cp, &ns, &["--backoff-limit", "1"]).await;
    create(&client, &ns, &manifest("flaky", SECRET)).await;

    let first = live_pod(&client, &ns, "flaky").await;
    set_pod_running(&client, &ns, &first).await;
    set_pod_terminated(&client, &ns, &first, 1, "CUDA out of memory at step 3").await;
    let api: Api<FineTuneJob> = Api::namespaced(client.clone(), &ns);
    eventually("the first failure to count as a retry", WAIT, async || {
        api.get("flaky")
            .await
            .is_ok_and(|f| f.status.and_then(|s| s.retries) == Some(1))
    })
    .await;
    assert_ne!(phase(&get(&client, &ns, "flaky").await), Some(Failed));

    // The Job controller replaces the pod after its back-off (10 s).
    let second = live_pod(&client, &ns, "flaky").await;
    assert_ne!(first, second);
    set_pod_terminated(&client, &ns, &second, 1, "loss is NaN at step 12\n").await;
    let failed = wait_for_phase(&client, &ns, "flaky", Failed).await;
    let (on, reason, message) = condition(&failed, conditions::FAILED).expect("Failed");
    assert_eq!(
        (on.as_str(), reason.as_str(), message.as_str()),
        ("True", conditions::TRAINER_FAILED, "loss is NaN at step 12")
    );
    let status = failed.status.expect("status");
    assert_eq!(
        status.retries,
        Some(1),
        "one pod was retried, the last was not"
    );
    assert!(status.completion_time.is_some());
    assert!(
        events_of(&client, &ns, "flaky")
            .await
            .contains(&("Warning".to_owned(), "Failed".to_owned()))
    );
}

#[tokio::test]
async fn a_config_error_fails_at_once_without_a_retry() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("ftj-config-error").await;
    create_secret(&client, &ns, SECRET).await;
    let _operator = start_operator(cp, &ns, &["--backoff-limit", "3"]).await;
    create(&client, &ns, &manifest("bad-data", SECRET)).await;

    let pod = live_pod(&client, &ns, "bad-data").await;
    let reason = "dataset line 7: expected one of messages, prompt/completion, text";
    set_pod_terminated(&client, &ns, &pod, 2, reason).await;
    let failed = wait_for_phase(&client, &ns, "bad-data", Failed).await;
    assert_eq!(
        condition(&failed, conditions::FAILED).map(|c| c.2),
        Some(reason.to_owned())
    );
    assert_eq!(failed.status.and_then(|s| s.retries), Some(0));
}

#[tokio::test]
async fn suspend_stops_the_pod_resume_starts_one_and_delete_cascades() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("ftj-suspend").await;
    create_secret(&client, &ns, SECRET).await;
    let operator = start_operator(cp, &ns, &[]).await;
    create(&client, &ns, &manifest("pausable", SECRET)).await;
    let first = live_pod(&client, &ns, "pausable").await;
    set_pod_running(&client, &ns, &first).await;
    wait_for_phase(&client, &ns, "pausable", Running).await;

    let api: Api<FineTuneJob> = Api::namespaced(client.clone(), &ns);
    // The image may change on a started job (for its next run), but the running Job's pod
    // template is immutable: the operator keeps it and goes on reconciling.
    let image = json!({"spec": {"image": "ghcr.io/graft-dev/graft-trainer:newer"}});
    let before = reconciles(operator.port()).await;
    let log_before = operator.log().len();
    api.patch("pausable", &PatchParams::default(), &Patch::Merge(image))
        .await
        .expect("changing the image");
    wait_for_reconciles(operator.port(), before, 1).await;
    // A conflict is the optimistic concurrency the reconciler asks for when it keeps the
    // Job's spec (the Job changed since it was read: the next reconcile starts again from
    // it); a changed pod template applied over the Job would be refused as invalid instead.
    let log = operator.log();
    let refused: Vec<&str> = log[log_before..]
        .lines()
        .filter(|line| line.contains("reconcile failed") && !line.contains("Conflict"))
        .collect();
    assert!(refused.is_empty(), "{log}");
    let suspend = |on: bool| json!({"spec": {"suspend": on}});
    api.patch(
        "pausable",
        &PatchParams::default(),
        &Patch::Merge(suspend(true)),
    )
    .await
    .expect("suspending");
    let suspended = wait_for_phase(&client, &ns, "pausable", Suspended).await;
    assert_eq!(
        condition(&suspended, conditions::SUSPENDED).map(|c| c.0),
        Some("True".to_owned())
    );
    let jobs = jobs_of(&client, &ns, "pausable").await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].spec.as_ref().and_then(|s| s.suspend), Some(true));

    api.patch(
        "pausable",
        &PatchParams::default(),
        &Patch::Merge(suspend(false)),
    )
    .await
    .expect("resuming");
    let second = live_pod(&client, &ns, "pausable").await;
    assert_ne!(first, second, "resuming starts a new pod");
    set_pod_running(&client, &ns, &second).await;
    wait_for_phase(&client, &ns, "pausable", Running).await;
    assert_eq!(jobs_of(&client, &ns, "pausable").await.len(), 1);

    api.delete("pausable", &DeleteParams::background())
        .await
        .expect("deleting");
    assert_children_removed(&client, &ns, "pausable").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        jobs_of(&client, &ns, "pausable").await.is_empty(),
        "the operator doesn't recreate the Job of a deleted FineTuneJob"
    );
}

#[tokio::test]
async fn a_queued_job_waits_for_admission_and_its_queue_owns_suspend() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("ftj-queue").await;
    create_secret(&client, &ns, SECRET).await;
    let _operator = start_operator(cp, &ns, &[]).await;
    let mut queued = manifest("queued", SECRET);
    queued.metadata.labels = Some([(QUEUE_LABEL.to_owned(), "gpus".to_owned())].into());
    create(&client, &ns, &queued).await;

    let api: Api<FineTuneJob> = Api::namespaced(client.clone(), &ns);
    eventually("the job to wait for its queue", WAIT, async || {
        api.get("queued").await.is_ok_and(|f| {
            condition(&f, conditions::RUNNING).is_some_and(|c| c.1 == conditions::QUEUED)
        })
    })
    .await;
    assert_eq!(phase(&get(&client, &ns, "queued").await), Some(Pending));
    let jobs = jobs_of(&client, &ns, "queued").await;
    assert_eq!(jobs[0].spec.as_ref().and_then(|s| s.suspend), Some(true));
    assert_eq!(
        jobs[0]
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(QUEUE_LABEL))
            .map(String::as_str),
        Some("gpus"),
        "Kueue finds the Job by its queue label"
    );

    // Kueue admits the workload by unsuspending the Job.
    let admit = PatchParams {
        field_manager: Some("kueue-admission".to_owned()),
        ..PatchParams::default()
    };
    Api::<Job>::namespaced(client.clone(), &ns)
        .patch(
            "queued",
            &admit,
            &Patch::Merge(json!({"spec": {"suspend": false}})),
        )
        .await
        .expect("admitting the Job");
    let pod = live_pod(&client, &ns, "queued").await;
    set_pod_running(&client, &ns, &pod).await;
    wait_for_phase(&client, &ns, "queued", Running).await;
    let jobs = jobs_of(&client, &ns, "queued").await;
    assert_eq!(
        jobs[0].spec.as_ref().and_then(|s| s.suspend),
        Some(false),
        "the operator doesn't suspend an admitted Job again"
    );
}
