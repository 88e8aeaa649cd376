//! The operator's part of a FineTuneJob's status, derived from its Job and pods.
//!
//! Pure: the reconciler reads the objects, this decides. `progress` is the trainer's and is
//! never part of what is computed here, so the operator's status apply can't overwrite it.
//! `adapter` is written by the trainer itself as it publishes, and by the operator from the
//! trainer's termination message: whichever lands first records the outcome.

use graft_api::{AdapterArtifact, FineTuneJob, FineTuneJobPhase, FineTuneJobStatus, TrainerResult};
use k8s_openapi::{
    api::{
        batch::v1::{Job, JobCondition},
        core::v1::{ContainerState, ContainerStateTerminated, Pod},
    },
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};

use super::{build::CONTAINER, validate::Blocked};
use crate::conditions::{self, Summary, new};

/// The status of a job that cannot start yet: Pending and Stalled, with the reason.
pub fn blocked(ftj: &FineTuneJob, why: &Blocked, now: Timestamp) -> FineTuneJobStatus {
    let mut status = operator_part(ftj);
    status.phase = Some(FineTuneJobPhase::Pending);
    conditions::summarize(
        &mut status.conditions,
        Summary::Stalled,
        why.reason,
        &why.message,
        ftj.metadata.generation,
        now,
    );
    status
}

/// The status of a job whose Job exists.
pub fn observe(ftj: &FineTuneJob, job: &Job, pods: &[Pod], now: Timestamp) -> FineTuneJobStatus {
    let generation = ftj.metadata.generation;
    let mut status = operator_part(ftj);
    let job_status = job.status.clone().unwrap_or_default();
    let job_conditions = job_status.conditions.as_deref().unwrap_or_default();
    let failed_pods = u32::try_from(job_status.failed.unwrap_or(0)).unwrap_or(0);

    status.start_time = status
        .start_time
        .or_else(|| Some(job.metadata.creation_timestamp.clone().unwrap_or(Time(now))));
    status.retries = Some(failed_pods);

    let outcome = outcome(ftj, job, pods);
    if matches!(outcome, Outcome::Failed { .. }) {
        // The last failure ended the Job; only the ones before it were retried.
        status.retries = Some(failed_pods.saturating_sub(1));
    }

    let terminal = matches!(outcome, Outcome::Succeeded(_) | Outcome::Failed { .. });
    if terminal {
        status.completion_time = status.completion_time.or_else(|| {
            job_status
                .completion_time
                .clone()
                .or_else(|| finished_at(job_conditions))
                .or(Some(Time(now)))
        });
    }
    record(&mut status, outcome, generation, now);
    status
}

/// The status of a started job whose Job is gone (deleted by a user, a TTL, a cleanup) before
/// its outcome was recorded. The operator never trains again on its own: the adapter the
/// trainer recorded is the outcome, and without one the job failed.
pub fn vanished(ftj: &FineTuneJob, now: Timestamp) -> FineTuneJobStatus {
    let mut status = operator_part(ftj);
    let outcome = match status.adapter.clone() {
        Some(adapter) => Outcome::Succeeded(Ok(TrainerResult { adapter })),
        None => Outcome::Failed {
            reason: conditions::JOB_DELETED,
            message: format!(
                "the training Job {} was deleted before the job finished; the operator does not \
                 train again by itself: create a new FineTuneJob with the same output to resume \
                 from its checkpoints",
                ftj.metadata.name.as_deref().unwrap_or_default()
            ),
        },
    };
    status.completion_time = status.completion_time.or(Some(Time(now)));
    record(&mut status, outcome, ftj.metadata.generation, now);
    status
}

/// A finished job's status, unchanged but for the generation it describes: its outcome is
/// final, and a later spec edit (an image for the record) must still read as observed.
pub fn caught_up(ftj: &FineTuneJob) -> FineTuneJobStatus {
    let mut status = operator_part(ftj);
    conditions::observe_generation(&mut status.conditions, ftj.metadata.generation);
    status
}

/// Sets phase, conditions and adapter for `outcome`.
fn record(
    status: &mut FineTuneJobStatus,
    outcome: Outcome,
    generation: Option<i64>,
    now: Timestamp,
) {
    let terminal = matches!(outcome, Outcome::Succeeded(_) | Outcome::Failed { .. });
    let set = |status: &mut FineTuneJobStatus, type_, on, reason, message: String| {
        conditions::set(
            &mut status.conditions,
            new(type_, on, reason, message, generation, now),
        );
    };
    let stuck = matches!(outcome, Outcome::Stuck { .. });
    let (running_reason, running_message) = match &outcome {
        Outcome::Running => (conditions::POD_RUNNING, "the trainer pod is running"),
        Outcome::Suspended => (conditions::SUSPENDED_BY_SPEC, "spec.suspend is true"),
        Outcome::Pending => (conditions::POD_PENDING, "waiting for the trainer pod"),
        Outcome::Stuck { reason, message } => (*reason, message.as_str()),
        Outcome::Queued => (
            conditions::QUEUED,
            "the Job waits for admission by its queue (kueue.x-k8s.io/queue-name)",
        ),
        Outcome::Succeeded(_) | Outcome::Failed { .. } => (conditions::FINISHED, "training ended"),
    };
    let running_message = running_message.to_owned();
    set(
        status,
        conditions::RUNNING,
        matches!(outcome, Outcome::Running),
        running_reason,
        running_message.clone(),
    );
    let suspended = matches!(outcome, Outcome::Suspended);
    set(
        status,
        conditions::SUSPENDED,
        suspended,
        if suspended {
            conditions::SUSPENDED_BY_SPEC
        } else {
            conditions::NOT_SUSPENDED
        },
        String::new(),
    );

    let (phase, succeeded, failed) = match outcome {
        Outcome::Succeeded(Ok(result)) => {
            let message = format!(
                "adapter at {} (sha256 {})",
                result.adapter.uri, result.adapter.sha256
            );
            status.adapter = Some(result.adapter);
            (
                FineTuneJobPhase::Succeeded,
                Some((conditions::TRAINING_COMPLETE, message)),
                None,
            )
        }
        // A run that exited 0 without saying where its adapter is produced nothing usable.
        Outcome::Succeeded(Err(why)) => (
            FineTuneJobPhase::Failed,
            None,
            Some((conditions::ADAPTER_NOT_REPORTED, why)),
        ),
        Outcome::Failed { reason, message } => {
            (FineTuneJobPhase::Failed, None, Some((reason, message)))
        }
        Outcome::Suspended => (FineTuneJobPhase::Suspended, None, None),
        Outcome::Running => (FineTuneJobPhase::Running, None, None),
        Outcome::Pending | Outcome::Queued | Outcome::Stuck { .. } => {
            (FineTuneJobPhase::Pending, None, None)
        }
    };

    status.phase = Some(phase);
    let not_yet = if terminal {
        conditions::FINISHED
    } else {
        conditions::IN_PROGRESS
    };
    let summary = match (&succeeded, &failed) {
        (Some((reason, message)), _) => (Summary::Ready, *reason, message.clone()),
        (_, Some((reason, message))) => (Summary::Stalled, *reason, message.clone()),
        _ if suspended => (Summary::Idle, running_reason, running_message),
        _ if stuck => (Summary::Stalled, running_reason, running_message),
        _ => (Summary::Reconciling, running_reason, running_message),
    };
    for (type_, value) in [
        (conditions::SUCCEEDED, succeeded),
        (conditions::FAILED, failed),
    ] {
        match value {
            Some((reason, message)) => set(status, type_, true, reason, message),
            None => set(status, type_, false, not_yet, String::new()),
        }
    }
    let (summary, reason, message) = summary;
    conditions::summarize(
        &mut status.conditions,
        summary,
        reason,
        &message,
        generation,
        now,
    );
}

/// The part of the current status the operator owns: everything but `progress`.
pub fn operator_part(ftj: &FineTuneJob) -> FineTuneJobStatus {
    let mut status = ftj.status.clone().unwrap_or_default();
    status.progress = None;
    status.observed_generation = ftj.metadata.generation;
    status.method = Some(ftj.spec.method.name().to_owned());
    status
}

fn outcome(ftj: &FineTuneJob, job: &Job, pods: &[Pod]) -> Outcome {
    let job_status = job.status.clone().unwrap_or_default();
    let job_conditions = job_status.conditions.as_deref().unwrap_or_default();
    if job_condition(job_conditions, "Complete") {
        // What the trainer recorded itself first: its pod (and termination message) may be
        // gone by now, garbage-collected or on a node that was scaled down.
        let recorded = ftj.status.as_ref().and_then(|s| s.adapter.clone());
        Outcome::Succeeded(recorded.map_or_else(
            || succeeded_pod_result(pods),
            |adapter: AdapterArtifact| Ok(TrainerResult { adapter }),
        ))
    } else if job_condition(job_conditions, "Failed") {
        Outcome::Failed {
            reason: conditions::TRAINER_FAILED,
            message: failure_message(pods).unwrap_or_else(|| {
                job_conditions
                    .iter()
                    .find(|c| c.type_ == "Failed")
                    .and_then(|c| c.message.clone())
                    .unwrap_or_else(|| "the training Job failed".to_owned())
            }),
        }
    } else if job.spec.as_ref().and_then(|s| s.suspend) == Some(true) {
        // Suspended without the FineTuneJob asking: its queue hasn't admitted it yet.
        if ftj.spec.suspend {
            Outcome::Suspended
        } else {
            Outcome::Queued
        }
    } else if job_status.ready.unwrap_or(0) > 0 || pods.iter().any(is_running) {
        Outcome::Running
    } else if let Some(message) = pods.iter().find_map(config_error) {
        // The kubelet cannot start the trainer: a Secret (or a key of it) it needs is missing.
        // It retries by itself; the job waits, and says why.
        let reason = if message.contains("secret") {
            conditions::SECRET_NOT_FOUND
        } else {
            conditions::POD_CONFIG_ERROR
        };
        Outcome::Stuck { reason, message }
    } else {
        Outcome::Pending
    }
}

/// The kubelet's message when it cannot build the trainer container's configuration.
fn config_error(pod: &Pod) -> Option<String> {
    let waiting = trainer_state(pod)?.waiting.as_ref()?;
    (waiting.reason.as_deref() == Some("CreateContainerConfigError"))
        .then(|| waiting.message.clone().unwrap_or_default())
}

enum Outcome {
    Pending,
    /// Waiting on something the spec references that the kubelet cannot find.
    Stuck {
        reason: &'static str,
        message: String,
    },
    Queued,
    Running,
    Suspended,
    Succeeded(Result<TrainerResult, String>),
    Failed {
        reason: &'static str,
        message: String,
    },
}

/// The trainer container's state, as the kubelet last reported it.
fn trainer_state(pod: &Pod) -> Option<&ContainerState> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == CONTAINER)?
        .state
        .as_ref()
}

fn trainer_terminated(pod: &Pod) -> Option<&ContainerStateTerminated> {
    trainer_state(pod)?.terminated.as_ref()
}

fn is_running(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

fn succeeded_pod_result(pods: &[Pod]) -> Result<TrainerResult, String> {
    let message = pods
        .iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded"))
        .find_map(|p| trainer_terminated(p)?.message.clone())
        .ok_or("the trainer exited 0 but left no termination message naming its adapter")?;
    serde_json::from_str(message.trim()).map_err(|e| {
        format!("the trainer exited 0 but its termination message is not a result ({e})")
    })
}

/// The newest failed trainer's own words, else what the kubelet saw (OOMKilled, exit code).
fn failure_message(pods: &[Pod]) -> Option<String> {
    let (_, terminated) = pods
        .iter()
        .filter_map(|p| {
            let t = trainer_terminated(p).filter(|t| t.exit_code != 0)?;
            Some((t.finished_at.as_ref().map(|f| f.0), t))
        })
        .max_by_key(|(finished, _)| *finished)?;
    let message = terminated.message.as_deref().map_or("", str::trim);
    Some(if message.is_empty() {
        format!(
            "the trainer exited with code {} ({})",
            terminated.exit_code,
            terminated.reason.as_deref().unwrap_or("no reason given")
        )
    } else {
        message.to_owned()
    })
}

fn job_condition(job_conditions: &[JobCondition], type_: &str) -> bool {
    job_conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

fn finished_at(job_conditions: &[JobCondition]) -> Option<Time> {
    job_conditions
        .iter()
        .find(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        .and_then(|c| c.last_transition_time.clone())
}

#[cfg(test)]
mod tests {
    use graft_api::Progress;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
    use serde_json::{Value, json};

    use super::*;
    use crate::fine_tune_job::fixtures::job_from_yaml;

    const MINIMAL: &str = include_str!("fixtures/minimal.yaml");

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).expect("valid timestamp")
    }

    #[allow(clippy::needless_pass_by_value)] // callers build the values inline
    fn job(spec: Value, status: Value) -> Job {
        serde_json::from_value(json!({
            "metadata": {"name": "cpu-smoke", "creationTimestamp": "2026-11-23T10:00:00Z"},
            "spec": spec,
            "status": status,
        }))
        .expect("a Job")
    }

    fn pod(phase: &str, terminated: Option<Value>) -> Pod {
        let state = terminated.map_or_else(|| json!({"running": {}}), |t| json!({"terminated": t}));
        serde_json::from_value(json!({
            "metadata": {"name": "cpu-smoke-abcde"},
            "status": {
                "phase": phase,
                "containerStatuses": [{
                    "name": "trainer", "image": "i", "imageID": "", "ready": false,
                    "restartCount": 0, "state": state,
                }],
            },
        }))
        .expect("a Pod")
    }

    fn condition<'a>(status: &'a FineTuneJobStatus, type_: &str) -> &'a Condition {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap_or_else(|| panic!("no {type_} condition in {:?}", status.conditions))
    }

    fn complete() -> Value {
        json!({"succeeded": 1, "completionTime": "2026-11-23T11:00:00Z",
               "conditions": [{"type": "Complete", "status": "True"}]})
    }

    /// The printer column's method: the named one, `lora` when none is.
    #[test]
    fn the_status_names_the_method_trained() {
        for (method, name) in [
            ("{}", "lora"),
            ("{ia3: {}}", "ia3"),
            ("{promptTuning: {numVirtualTokens: 4}}", "promptTuning"),
            ("{pTuning: {numVirtualTokens: 4}}", "pTuning"),
            ("{prefixTuning: {numVirtualTokens: 4}}", "prefixTuning"),
            ("{bottleneck: {placement: houlsby}}", "bottleneck"),
        ] {
            let mut ftj = job_from_yaml(MINIMAL);
            ftj.spec.method = serde_yaml::from_str(method).expect("a method");
            assert_eq!(
                operator_part(&ftj).method.as_deref(),
                Some(name),
                "{method}"
            );
        }
    }

    #[test]
    fn a_running_pod_makes_the_job_running_from_the_jobs_creation() {
        let ftj = job_from_yaml(MINIMAL);
        let status = observe(
            &ftj,
            &job(json!({}), json!({"active": 1})),
            &[pod("Running", None)],
            now(),
        );
        assert_eq!(status.phase, Some(FineTuneJobPhase::Running));
        assert_eq!(
            status.method.as_deref(),
            Some("lora"),
            "no method named: LoRA"
        );
        assert_eq!(condition(&status, conditions::RUNNING).status, "True");
        assert_eq!(condition(&status, conditions::READY).status, "False");
        assert_eq!(condition(&status, conditions::RECONCILING).status, "True");
        assert_eq!(condition(&status, conditions::STALLED).status, "False");
        assert_eq!(
            status.start_time.map(|t| t.0.to_string()),
            Some("2026-11-23T10:00:00Z".to_owned())
        );
        assert_eq!(status.completion_time, None);
    }

    #[test]
    fn a_pending_pod_is_pending_and_a_restart_keeps_the_first_start_time() {
        let mut ftj = job_from_yaml(MINIMAL);
        let first = Time(Timestamp::from_second(1_700_000_000).expect("valid"));
        ftj.status = Some(FineTuneJobStatus {
            start_time: Some(first.clone()),
            ..FineTuneJobStatus::default()
        });
        let status = observe(&ftj, &job(json!({}), json!({"active": 1})), &[], now());
        assert_eq!(status.phase, Some(FineTuneJobPhase::Pending));
        assert_eq!(status.start_time, Some(first));
    }

    #[test]
    fn a_complete_job_copies_the_adapter_from_the_termination_message() {
        let ftj = job_from_yaml(MINIMAL);
        let result = json!({"adapter": {"uri": "file:///adapters/tiny/", "sha256": "ab12",
                                        "sizeBytes": 4096, "trainableParameters": 1024}});
        let terminated = json!({"exitCode": 0, "message": result.to_string()});
        let status = observe(
            &ftj,
            &job(json!({}), complete()),
            &[pod("Succeeded", Some(terminated))],
            now(),
        );
        assert_eq!(status.phase, Some(FineTuneJobPhase::Succeeded));
        let adapter = status.adapter.as_ref().expect("adapter");
        assert_eq!(
            (
                adapter.sha256.as_str(),
                adapter.size_bytes,
                adapter.trainable_parameters
            ),
            ("ab12", 4096, 1024)
        );
        assert!(
            condition(&status, conditions::SUCCEEDED)
                .message
                .contains("ab12")
        );
        assert_eq!(condition(&status, conditions::RUNNING).status, "False");
        assert_eq!(kstatus(&status), ("True", "False", "False"));
        assert_eq!(
            status.completion_time.map(|t| t.0.to_string()),
            Some("2026-11-23T11:00:00Z".to_owned())
        );
    }

    /// (Ready, Reconciling, Stalled).
    fn kstatus(status: &FineTuneJobStatus) -> (&str, &str, &str) {
        (
            condition(status, conditions::READY).status.as_str(),
            condition(status, conditions::RECONCILING).status.as_str(),
            condition(status, conditions::STALLED).status.as_str(),
        )
    }

    fn artifact() -> AdapterArtifact {
        AdapterArtifact {
            uri: "s3://adapters/tiny/".to_owned(),
            sha256: "cd34".to_owned(),
            size_bytes: 1,
            trainable_parameters: 1,
        }
    }

    #[test]
    fn a_pod_the_kubelet_cannot_configure_stalls_the_job_with_its_message() {
        let ftj = job_from_yaml(MINIMAL);
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "cpu-smoke-abcde"},
            "status": {"phase": "Pending", "containerStatuses": [{
                "name": "trainer", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "CreateContainerConfigError",
                                      "message": "secret \"s3-credentials\" not found"}},
            }]},
        }))
        .expect("a Pod");
        let status = observe(&ftj, &job(json!({}), json!({"active": 1})), &[pod], now());
        assert_eq!(status.phase, Some(FineTuneJobPhase::Pending));
        assert_eq!(kstatus(&status), ("False", "False", "True"));
        let stalled = condition(&status, conditions::STALLED);
        assert_eq!(stalled.reason, conditions::SECRET_NOT_FOUND);
        assert!(
            stalled.message.contains("s3-credentials"),
            "{}",
            stalled.message
        );
    }

    #[test]
    fn the_adapter_the_trainer_recorded_survives_its_pod() {
        let mut ftj = job_from_yaml(MINIMAL);
        ftj.status = Some(FineTuneJobStatus {
            adapter: Some(artifact()),
            ..FineTuneJobStatus::default()
        });
        // Complete, and the pod with its termination message already collected.
        let status = observe(&ftj, &job(json!({}), complete()), &[], now());
        assert_eq!(status.phase, Some(FineTuneJobPhase::Succeeded));
        assert_eq!(status.adapter, Some(artifact()));
    }

    #[test]
    fn a_job_gone_before_its_outcome_fails_unless_the_trainer_recorded_one() {
        let mut ftj = job_from_yaml(MINIMAL);
        ftj.status = Some(FineTuneJobStatus {
            start_time: Some(Time(now())),
            ..FineTuneJobStatus::default()
        });
        let lost = vanished(&ftj, now());
        assert_eq!(lost.phase, Some(FineTuneJobPhase::Failed));
        assert_eq!(
            condition(&lost, conditions::FAILED).reason,
            conditions::JOB_DELETED
        );
        assert_eq!(kstatus(&lost), ("False", "False", "True"));

        ftj.status.get_or_insert_default().adapter = Some(artifact());
        let kept = vanished(&ftj, now());
        assert_eq!(kept.phase, Some(FineTuneJobPhase::Succeeded));
        assert_eq!(kstatus(&kept), ("True", "False", "False"));
    }

    #[test]
    fn a_finished_jobs_status_catches_up_with_a_new_generation() {
        let mut ftj = job_from_yaml(MINIMAL);
        ftj.metadata.generation = Some(1);
        let done = observe(&ftj, &job(json!({}), complete()), &[], now());
        ftj.status = Some(done);
        ftj.metadata.generation = Some(2);
        let status = caught_up(&ftj);
        assert_eq!(status.observed_generation, Some(2));
        assert!(
            status
                .conditions
                .iter()
                .all(|c| c.observed_generation == Some(2))
        );
        assert_eq!(status.phase, Some(FineTuneJobPhase::Failed));
    }

    #[test]
    fn exiting_zero_without_a_result_is_a_failure_not_a_success() {
        let ftj = job_from_yaml(MINIMAL);
        let terminated = json!({"exitCode": 0});
        let status = observe(
            &ftj,
            &job(json!({}), complete()),
            &[pod("Succeeded", Some(terminated))],
            now(),
        );
        assert_eq!(status.phase, Some(FineTuneJobPhase::Failed));
        let failed = condition(&status, conditions::FAILED);
        assert_eq!(failed.reason, conditions::ADAPTER_NOT_REPORTED);
        assert_eq!(status.adapter, None);
    }

    #[test]
    fn failed_pod_sets_failed_condition_with_the_newest_termination_message() {
        let ftj = job_from_yaml(MINIMAL);
        let older = json!({"exitCode": 1, "message": "CUDA out of memory",
                           "finishedAt": "2026-11-23T10:10:00Z"});
        let newer = json!({"exitCode": 2, "message": "dataset line 7: not JSON\n",
                           "finishedAt": "2026-11-23T10:20:00Z"});
        let failed_job = job(
            json!({}),
            json!({"failed": 2, "conditions": [{"type": "Failed", "status": "True",
                   "message": "Job has reached the specified backoff limit",
                   "lastTransitionTime": "2026-11-23T10:21:00Z"}]}),
        );
        let status = observe(
            &ftj,
            &failed_job,
            &[pod("Failed", Some(older)), pod("Failed", Some(newer))],
            now(),
        );
        assert_eq!(status.phase, Some(FineTuneJobPhase::Failed));
        let failed = condition(&status, conditions::FAILED);
        assert_eq!(failed.status, "True");
        assert_eq!(failed.message, "dataset line 7: not JSON");
        assert_eq!(kstatus(&status), ("False", "False", "True"));
        assert_eq!(
            condition(&status, conditions::STALLED).message,
            "dataset line 7: not JSON"
        );
        assert_eq!(status.retries, Some(1));
        assert_eq!(
            status.completion_time.map(|t| t.0.to_string()),
            Some("2026-11-23T10:21:00Z".to_owned())
        );
    }

    #[test]
    fn a_failure_without_a_message_says_what_the_kubelet_saw() {
        let ftj = job_from_yaml(MINIMAL);
        let killed = json!({"exitCode": 137, "reason": "OOMKilled"});
        let failed_job = job(
            json!({}),
            json!({"failed": 1, "conditions": [{"type": "Failed", "status": "True"}]}),
        );
        let status = observe(&ftj, &failed_job, &[pod("Failed", Some(killed))], now());
        let failed = condition(&status, conditions::FAILED);
        assert!(failed.message.contains("137"), "{}", failed.message);
        assert!(failed.message.contains("OOMKilled"), "{}", failed.message);
    }

    #[test]
    fn a_suspended_job_is_suspended() {
        let mut ftj = job_from_yaml(MINIMAL);
        ftj.spec.suspend = true;
        let status = observe(&ftj, &job(json!({"suspend": true}), json!({})), &[], now());
        assert_eq!(status.phase, Some(FineTuneJobPhase::Suspended));
        assert_eq!(condition(&status, conditions::SUSPENDED).status, "True");
        assert_eq!(kstatus(&status), ("False", "False", "False"));
        assert_eq!(condition(&status, conditions::RUNNING).status, "False");
    }

    #[test]
    fn a_job_suspended_by_its_queue_is_pending_not_suspended() {
        let ftj = job_from_yaml(MINIMAL);
        let status = observe(&ftj, &job(json!({"suspend": true}), json!({})), &[], now());
        assert_eq!(status.phase, Some(FineTuneJobPhase::Pending));
        assert_eq!(
            condition(&status, conditions::RUNNING).reason,
            conditions::QUEUED
        );
        assert_eq!(condition(&status, conditions::SUSPENDED).status, "False");
    }

    #[test]
    fn the_trainers_progress_is_never_part_of_the_operators_status() {
        let mut ftj = job_from_yaml(MINIMAL);
        ftj.status = Some(FineTuneJobStatus {
            progress: Some(Progress {
                step: 5,
                total_steps: 10,
                ..Progress::default()
            }),
            ..FineTuneJobStatus::default()
        });
        let status = observe(&ftj, &job(json!({}), json!({})), &[], now());
        assert_eq!(status.progress, None);
        let why = Blocked {
            reason: conditions::SECRET_NOT_FOUND,
            message: "no secret".to_owned(),
        };
        let status = blocked(&ftj, &why, now());
        assert_eq!(status.progress, None);
        assert_eq!(status.phase, Some(FineTuneJobPhase::Pending));
        assert_eq!(
            condition(&status, conditions::READY).reason,
            conditions::SECRET_NOT_FOUND
        );
        assert_eq!(kstatus(&status), ("False", "False", "True"));
    }
}
