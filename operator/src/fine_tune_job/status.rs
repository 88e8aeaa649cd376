//! The operator's part of a FineTuneJob's status, derived from its Job and pods.
//!
//! Pure: the reconciler reads the objects, this decides. `progress` is the trainer's and is
//! never part of what is computed here, so the operator's status apply can't overwrite it.

use graft_api::{FineTuneJob, FineTuneJobPhase, FineTuneJobStatus, TrainerResult};
use k8s_openapi::{
    api::{
        batch::v1::{Job, JobCondition},
        core::v1::{ContainerStateTerminated, Pod},
    },
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};

use super::{build::CONTAINER, validate::Blocked};
use crate::conditions::{self, new};

/// The status of a job that cannot start yet: Pending, with the reason on Ready.
pub fn blocked(ftj: &FineTuneJob, why: &Blocked, now: Timestamp) -> FineTuneJobStatus {
    let mut status = operator_part(ftj);
    status.phase = Some(FineTuneJobPhase::Pending);
    conditions::set(
        &mut status.conditions,
        new(
            conditions::READY,
            false,
            why.reason,
            why.message.clone(),
            ftj.metadata.generation,
            now,
        ),
    );
    status
}

/// The status of a job whose Job exists.
pub fn observe(ftj: &FineTuneJob, job: &Job, pods: &[Pod], now: Timestamp) -> FineTuneJobStatus {
    let generation = ftj.metadata.generation;
    let mut status = operator_part(ftj);
    let set = |status: &mut FineTuneJobStatus, type_, on, reason, message: String| {
        conditions::set(
            &mut status.conditions,
            new(type_, on, reason, message, generation, now),
        );
    };
    let job_name = job.metadata.name.as_deref().unwrap_or_default();
    let job_status = job.status.clone().unwrap_or_default();
    let job_conditions = job_status.conditions.as_deref().unwrap_or_default();
    let failed_pods = u32::try_from(job_status.failed.unwrap_or(0)).unwrap_or(0);

    status.start_time = status
        .start_time
        .or_else(|| Some(job.metadata.creation_timestamp.clone().unwrap_or(Time(now))));
    status.retries = Some(failed_pods);
    set(
        &mut status,
        conditions::READY,
        true,
        conditions::JOB_CREATED,
        format!("Job {job_name} created"),
    );

    let outcome = outcome(ftj, job, pods);
    if matches!(outcome, Outcome::Failed(_)) {
        // The last failure ended the Job; only the ones before it were retried.
        status.retries = Some(failed_pods.saturating_sub(1));
    }

    let terminal = matches!(outcome, Outcome::Succeeded(_) | Outcome::Failed(_));
    if terminal {
        status.completion_time = status.completion_time.or_else(|| {
            job_status
                .completion_time
                .clone()
                .or_else(|| finished_at(job_conditions))
                .or(Some(Time(now)))
        });
    }
    record(&mut status, outcome, terminal, generation, now);
    status
}

/// Sets phase, conditions and adapter for `outcome`.
fn record(
    status: &mut FineTuneJobStatus,
    outcome: Outcome,
    terminal: bool,
    generation: Option<i64>,
    now: Timestamp,
) {
    let set = |status: &mut FineTuneJobStatus, type_, on, reason, message: String| {
        conditions::set(
            &mut status.conditions,
            new(type_, on, reason, message, generation, now),
        );
    };
    let (running_reason, running_message) = match &outcome {
        Outcome::Running => (conditions::POD_RUNNING, "the trainer pod is running"),
        Outcome::Suspended => (conditions::SUSPENDED_BY_SPEC, "spec.suspend is true"),
        Outcome::Pending => (conditions::POD_PENDING, "waiting for the trainer pod"),
        Outcome::Queued => (
            conditions::QUEUED,
            "the Job waits for admission by its queue (kueue.x-k8s.io/queue-name)",
        ),
        Outcome::Succeeded(_) | Outcome::Failed(_) => (conditions::FINISHED, "training ended"),
    };
    set(
        status,
        conditions::RUNNING,
        matches!(outcome, Outcome::Running),
        running_reason,
        running_message.to_owned(),
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
        Outcome::Failed(message) => (
            FineTuneJobPhase::Failed,
            None,
            Some((conditions::TRAINER_FAILED, message)),
        ),
        Outcome::Suspended => (FineTuneJobPhase::Suspended, None, None),
        Outcome::Running => (FineTuneJobPhase::Running, None, None),
        Outcome::Pending | Outcome::Queued => (FineTuneJobPhase::Pending, None, None),
    };
    status.phase = Some(phase);
    let not_yet = if terminal {
        conditions::FINISHED
    } else {
        conditions::IN_PROGRESS
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
}

/// The part of the current status the operator owns: everything but `progress`.
pub fn operator_part(ftj: &FineTuneJob) -> FineTuneJobStatus {
    let mut status = ftj.status.clone().unwrap_or_default();
    status.progress = None;
    status.observed_generation = ftj.metadata.generation;
    status
}

fn outcome(ftj: &FineTuneJob, job: &Job, pods: &[Pod]) -> Outcome {
    let job_status = job.status.clone().unwrap_or_default();
    let job_conditions = job_status.conditions.as_deref().unwrap_or_default();
    if job_condition(job_conditions, "Complete") {
        Outcome::Succeeded(succeeded_pod_result(pods))
    } else if job_condition(job_conditions, "Failed") {
        Outcome::Failed(failure_message(pods).unwrap_or_else(|| {
            job_conditions
                .iter()
                .find(|c| c.type_ == "Failed")
                .and_then(|c| c.message.clone())
                .unwrap_or_else(|| "the training Job failed".to_owned())
        }))
    } else if job.spec.as_ref().and_then(|s| s.suspend) == Some(true) {
        // Suspended without the FineTuneJob asking: its queue hasn't admitted it yet.
        if ftj.spec.suspend {
            Outcome::Suspended
        } else {
            Outcome::Queued
        }
    } else if job_status.ready.unwrap_or(0) > 0 || pods.iter().any(is_running) {
        Outcome::Running
    } else {
        Outcome::Pending
    }
}

enum Outcome {
    Pending,
    Queued,
    Running,
    Suspended,
    Succeeded(Result<TrainerResult, String>),
    Failed(String),
}

fn trainer_terminated(pod: &Pod) -> Option<&ContainerStateTerminated> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == CONTAINER)?
        .state
        .as_ref()?
        .terminated
        .as_ref()
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
        assert_eq!(condition(&status, conditions::RUNNING).status, "True");
        assert_eq!(condition(&status, conditions::READY).status, "True");
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
        assert_eq!(
            status.completion_time.map(|t| t.0.to_string()),
            Some("2026-11-23T11:00:00Z".to_owned())
        );
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
    }
}
