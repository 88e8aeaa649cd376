//! An AdapterDeployment's status from what its reconcile found; pure.

use graft_api::{
    AdapterDeployment, AdapterDeploymentPhase, AdapterDeploymentStatus, AssignedVersion,
    ReplicaCounts, VersionStatus,
};
use k8s_openapi::jiff::Timestamp;

use super::rollout::Rollout;
use crate::conditions::{self, Summary};

/// What a reconcile ended with.
#[derive(Debug)]
pub enum Outcome {
    /// Not rolled out yet, for a reason that may pass (a job still training, no server yet).
    Waiting {
        reason: &'static str,
        message: String,
    },
    /// Not rolled out, for a reason only a spec change fixes; servers keep what they serve.
    Failed {
        reason: &'static str,
        message: String,
    },
    /// Not rolled out, for a reason outside the spec that should pass (an outage, missing
    /// credentials); retried with backoff.
    Degraded {
        reason: &'static str,
        message: String,
    },
    Rolled {
        /// The Deployment's replicas.
        desired: u32,
        /// Server pods ready to be rolled out to.
        pods: usize,
        versions: Vec<AssignedVersion>,
        rollout: Rollout,
    },
}

pub fn status(
    ad: &AdapterDeployment,
    outcome: &Outcome,
    now: Timestamp,
) -> AdapterDeploymentStatus {
    let previous = ad.status.clone().unwrap_or_default();
    let generation = ad.metadata.generation;
    let mut status = AdapterDeploymentStatus {
        observed_generation: generation,
        conditions: previous.conditions.clone(),
        replicas: previous.replicas,
        versions: previous.versions.clone(),
        phase: previous.phase,
    };
    let (phase, ready, reason, message) = match outcome {
        Outcome::Waiting { reason, message } => (
            AdapterDeploymentPhase::Pending,
            false,
            *reason,
            message.clone(),
        ),
        Outcome::Failed { reason, message } => (
            AdapterDeploymentPhase::Failed,
            false,
            *reason,
            message.clone(),
        ),
        Outcome::Degraded { reason, message } => (
            AdapterDeploymentPhase::Degraded,
            false,
            *reason,
            message.clone(),
        ),
        Outcome::Rolled {
            desired,
            pods,
            versions,
            rollout,
        } => rolled(&mut status, *desired, *pods, versions, rollout),
    };
    status.phase = Some(phase);
    // kstatus: only what needs a spec change stalls; an outage or a rollout under way is
    // still being reconciled (and retried), so `kubectl wait` and Flux keep waiting.
    let summary = match phase {
        _ if ready => Summary::Ready,
        AdapterDeploymentPhase::Failed => Summary::Stalled,
        _ => Summary::Reconciling,
    };
    conditions::summarize(
        &mut status.conditions,
        summary,
        reason,
        &message,
        generation,
        now,
    );
    status
}

/// Phase, readiness, reason and message of a rollout that ran, with its replica counts.
fn rolled(
    status: &mut AdapterDeploymentStatus,
    desired: u32,
    pods: usize,
    versions: &[AssignedVersion],
    rollout: &Rollout,
) -> (AdapterDeploymentPhase, bool, &'static str, String) {
    #[allow(clippy::cast_possible_truncation)]
    let ready = rollout.verified.len() as u32;
    status.replicas = Some(ReplicaCounts { desired, ready });
    status.versions = versions
        .iter()
        .map(|v| VersionStatus {
            uri: v.uri.clone(),
            sha256: v.sha256.clone(),
            weight: v.weight,
            ready_replicas: rollout
                .ready_per_version
                .get(&v.sha256)
                .copied()
                .unwrap_or(0),
        })
        .collect();
    if let Some(refused) = &rollout.refused {
        (
            AdapterDeploymentPhase::Failed,
            false,
            conditions::INCOMPATIBLE,
            refused.clone(),
        )
    } else if !rollout.failures.is_empty() {
        (
            AdapterDeploymentPhase::Degraded,
            false,
            conditions::LOAD_FAILED,
            rollout.failures.join("; "),
        )
    } else if pods == 0 {
        (
            AdapterDeploymentPhase::Loading,
            false,
            conditions::NO_READY_PODS,
            "no server pod is ready yet; new pods load the adapter before they turn ready"
                .to_owned(),
        )
    } else if ready < desired {
        (
            AdapterDeploymentPhase::Loading,
            false,
            conditions::ROLLING_OUT,
            format!("{ready} of {desired} server pods serve the versions"),
        )
    } else {
        (
            AdapterDeploymentPhase::Ready,
            true,
            conditions::ROLLED_OUT,
            format!("all {desired} server pods serve the versions"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ad() -> AdapterDeployment {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "graft.dev/v1alpha1", "kind": "AdapterDeployment",
            "metadata": {"name": "bot", "namespace": "team-a", "generation": 4},
            "spec": {"server": {"name": "llama"}, "adapterName": "bot",
                     "versions": [{"source": {"uri": "s3://a/v1/", "sha256": "a".repeat(64)}}]},
        }))
        .expect("an AdapterDeployment")
    }

    fn kstatus(status: &AdapterDeploymentStatus) -> Vec<(&str, &str)> {
        status
            .conditions
            .iter()
            .map(|c| (c.type_.as_str(), c.status.as_str()))
            .collect()
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).expect("valid")
    }

    #[test]
    fn each_outcome_reads_as_kstatus_expects() {
        let message = String::new;
        let cases = [
            (
                Outcome::Failed {
                    reason: conditions::INCOMPATIBLE,
                    message: message(),
                },
                [
                    ("Ready", "False"),
                    ("Reconciling", "False"),
                    ("Stalled", "True"),
                ],
            ),
            (
                Outcome::Degraded {
                    reason: conditions::ADMIN_CREDENTIALS_UNAVAILABLE,
                    message: message(),
                },
                [
                    ("Ready", "False"),
                    ("Reconciling", "True"),
                    ("Stalled", "False"),
                ],
            ),
            (
                Outcome::Waiting {
                    reason: conditions::WAITING_FOR_FINE_TUNE_JOB,
                    message: message(),
                },
                [
                    ("Ready", "False"),
                    ("Reconciling", "True"),
                    ("Stalled", "False"),
                ],
            ),
            (
                Outcome::Rolled {
                    desired: 1,
                    pods: 1,
                    versions: Vec::new(),
                    rollout: Rollout {
                        verified: vec!["p".to_owned()],
                        ..Rollout::default()
                    },
                },
                [
                    ("Ready", "True"),
                    ("Reconciling", "False"),
                    ("Stalled", "False"),
                ],
            ),
        ];
        for (outcome, expected) in cases {
            let status = status(&ad(), &outcome, now());
            assert_eq!(kstatus(&status), expected, "{outcome:?}");
            assert_eq!(status.observed_generation, Some(4));
            assert!(
                status
                    .conditions
                    .iter()
                    .all(|c| c.observed_generation == Some(4))
            );
        }
    }
}
