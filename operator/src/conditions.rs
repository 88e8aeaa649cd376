//! Condition types and reasons, and the one helper that sets a condition the Kubernetes way:
//! `lastTransitionTime` moves only when the status flips.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

// Condition types of a FineTuneJob.
/// The job has what it needs (inputs resolvable) and its Job exists.
pub const READY: &str = "Ready";
/// A training pod is running.
pub const RUNNING: &str = "Running";
pub const SUCCEEDED: &str = "Succeeded";
pub const FAILED: &str = "Failed";
pub const SUSPENDED: &str = "Suspended";

// Reasons.
pub const JOB_CREATED: &str = "JobCreated";
pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
pub const UNSUPPORTED_MODEL_SOURCE: &str = "UnsupportedModelSource";
pub const JOB_NAME_TAKEN: &str = "JobNameTaken";
/// The apiserver refused one of the job's objects (invalid, over quota, forbidden).
pub const APPLY_REFUSED: &str = "ApplyRefused";
pub const POD_PENDING: &str = "PodPending";
pub const POD_RUNNING: &str = "PodRunning";
pub const TRAINING_COMPLETE: &str = "TrainingComplete";
pub const TRAINER_FAILED: &str = "TrainerFailed";
pub const ADAPTER_NOT_REPORTED: &str = "AdapterNotReported";
pub const SUSPENDED_BY_SPEC: &str = "SuspendedBySpec";
/// Suspended by its Kueue queue until admitted.
pub const QUEUED: &str = "Queued";
pub const NOT_SUSPENDED: &str = "NotSuspended";
pub const IN_PROGRESS: &str = "InProgress";
pub const FINISHED: &str = "Finished";

// Reasons of an AdapterDeployment's Ready condition.
pub const WAITING_FOR_FINE_TUNE_JOB: &str = "WaitingForFineTuneJob";
pub const FINE_TUNE_JOB_FAILED: &str = "FineTuneJobFailed";
pub const SERVER_NOT_FOUND: &str = "ServerNotFound";
pub const INCOMPATIBLE: &str = "Incompatible";
pub const CONFLICT: &str = "Conflict";
pub const NO_READY_PODS: &str = "NoReadyPods";
pub const ROLLING_OUT: &str = "RollingOut";
pub const LOAD_FAILED: &str = "LoadFailed";
pub const ROLLED_OUT: &str = "RolledOut";

/// Sets `new` in `conditions`, replacing the condition of the same type. When the status is
/// unchanged the old `lastTransitionTime` is kept, so readers can tell how long it has held.
pub fn set(conditions: &mut Vec<Condition>, mut new: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(old) => {
            if old.status == new.status {
                new.last_transition_time = old.last_transition_time.clone();
            }
            *old = new;
        }
        None => conditions.push(new),
    }
}

/// A condition of `type_` at `now`.
pub fn new(
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(now),
    }
}

/// True when `conditions` has `type_` with status `True`.
pub fn is_true<'a>(conditions: impl IntoIterator<Item = &'a Condition>, type_: &str) -> bool {
    conditions
        .into_iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).expect("valid timestamp")
    }

    #[test]
    fn unchanged_status_keeps_its_transition_time() {
        let mut conditions = vec![new(RUNNING, true, POD_RUNNING, "", Some(1), at(10))];
        set(
            &mut conditions,
            new(RUNNING, true, POD_RUNNING, "step 5", Some(2), at(20)),
        );
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, Time(at(10)));
        assert_eq!(conditions[0].message, "step 5");
        assert_eq!(conditions[0].observed_generation, Some(2));
    }

    #[test]
    fn flipped_status_moves_the_transition_time() {
        let mut conditions = vec![new(RUNNING, true, POD_RUNNING, "", Some(1), at(10))];
        set(
            &mut conditions,
            new(RUNNING, false, FINISHED, "", Some(1), at(20)),
        );
        assert_eq!(conditions[0].last_transition_time, Time(at(20)));
        assert!(!is_true(&conditions, RUNNING));
    }

    #[test]
    fn new_types_are_appended() {
        let mut conditions = Vec::new();
        set(
            &mut conditions,
            new(READY, true, JOB_CREATED, "", None, at(1)),
        );
        set(
            &mut conditions,
            new(RUNNING, false, POD_PENDING, "", None, at(1)),
        );
        assert_eq!(conditions.len(), 2);
        assert!(is_true(&conditions, READY));
    }
}
