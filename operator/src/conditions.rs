//! Condition types and reasons, and the one helper that sets a condition the Kubernetes way:
//! `lastTransitionTime` moves only when the status flips.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

// Condition types both kinds carry, as kstatus (Flux, `kubectl wait`, cli-utils) reads them:
// `Ready` True once the resource's purpose is met; `Reconciling` True while the operator is
// still working towards the spec; `Stalled` True when progress stopped until something
// changes. The last two are "abnormal-true": False (or absent) is the normal state.
/// A FineTuneJob's adapter is published; an AdapterDeployment's versions serve on every pod.
pub const READY: &str = "Ready";
pub const RECONCILING: &str = "Reconciling";
pub const STALLED: &str = "Stalled";

// Condition types of a FineTuneJob only.
/// A training pod is running.
pub const RUNNING: &str = "Running";
pub const SUCCEEDED: &str = "Succeeded";
pub const FAILED: &str = "Failed";
pub const SUSPENDED: &str = "Suspended";

// Reasons.
pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
pub const UNSUPPORTED_MODEL_SOURCE: &str = "UnsupportedModelSource";
/// `spec.output.uri` names a scheme the operator does not allow (e.g. `file://`).
pub const UNSUPPORTED_OUTPUT: &str = "UnsupportedOutput";
/// An object the job needs (its Job, ConfigMap, ServiceAccount, Role, RoleBinding) has a name
/// another object already holds.
pub const NAME_TAKEN: &str = "NameTaken";
/// The training Job went away before its outcome was recorded; it is never created again.
pub const JOB_DELETED: &str = "JobDeleted";
/// The apiserver refused one of the job's objects (invalid, over quota, forbidden).
pub const APPLY_REFUSED: &str = "ApplyRefused";
pub const POD_PENDING: &str = "PodPending";
/// The kubelet cannot build the trainer container's configuration (a missing ConfigMap key…).
pub const POD_CONFIG_ERROR: &str = "PodConfigError";
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
/// The server is in another namespace and no ServerGrant there admits this one.
pub const REF_NOT_PERMITTED: &str = "RefNotPermitted";
/// A version's URI is outside the prefixes the operator allows this namespace.
pub const SOURCE_NOT_ALLOWED: &str = "SourceNotAllowed";
/// The operator has no credentials for the servers' admin API (its token file).
pub const ADMIN_CREDENTIALS_UNAVAILABLE: &str = "AdminCredentialsUnavailable";
/// Reading or writing a Kubernetes object failed (an outage, a refusal).
pub const API_ERROR: &str = "ApiError";

/// What a resource is doing, as the three kstatus conditions say it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Summary {
    /// Its purpose is met: Ready.
    Ready,
    /// The operator is working towards the spec: Reconciling.
    Reconciling,
    /// No progress until something changes (the spec, a missing object): Stalled.
    Stalled,
    /// Nothing to do and nothing ready (a suspended job): none of them true.
    Idle,
}

/// Sets `Ready`, `Reconciling` and `Stalled` for `summary`, each with the same reason and
/// message, so every tool reads the same story.
pub fn summarize(
    conditions: &mut Vec<Condition>,
    summary: Summary,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    for (type_, on) in [
        (READY, summary == Summary::Ready),
        (RECONCILING, summary == Summary::Reconciling),
        (STALLED, summary == Summary::Stalled),
    ] {
        set(conditions, new(type_, on, reason, message, generation, now));
    }
}

/// Marks every condition as describing `generation`: for a resource whose status is final, a
/// newer spec changes nothing but must still read as observed.
pub fn observe_generation(conditions: &mut [Condition], generation: Option<i64>) {
    for condition in conditions {
        condition.observed_generation = generation;
    }
}

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
            new(READY, true, TRAINING_COMPLETE, "", None, at(1)),
        );
        set(
            &mut conditions,
            new(RUNNING, false, POD_PENDING, "", None, at(1)),
        );
        assert_eq!(conditions.len(), 2);
        assert!(is_true(&conditions, READY));
    }

    #[test]
    fn a_summary_sets_exactly_one_kstatus_condition_true() {
        let mut conditions = Vec::new();
        for (summary, expected) in [
            (Summary::Ready, Some(READY)),
            (Summary::Reconciling, Some(RECONCILING)),
            (Summary::Stalled, Some(STALLED)),
            (Summary::Idle, None),
        ] {
            summarize(&mut conditions, summary, POD_RUNNING, "m", Some(3), at(1));
            let on: Vec<&str> = conditions
                .iter()
                .filter(|c| c.status == "True")
                .map(|c| c.type_.as_str())
                .collect();
            assert_eq!(on, expected.into_iter().collect::<Vec<_>>(), "{summary:?}");
            assert!(conditions.iter().all(|c| c.observed_generation == Some(3)));
        }
    }
}
