//! An AdapterDeployment's status from what its reconcile found; pure.

use graft_api::{
    AdapterDeployment, AdapterDeploymentPhase, AdapterDeploymentStatus, AssignedVersion,
    ReplicaCounts, VersionStatus,
};
use k8s_openapi::jiff::Timestamp;

use super::rollout::Rollout;
use crate::conditions::{self, READY};

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
        Outcome::Rolled {
            desired,
            pods,
            versions,
            rollout,
        } => {
            #[allow(clippy::cast_possible_truncation)]
            let ready = rollout.verified.len() as u32;
            status.replicas = Some(ReplicaCounts {
                desired: *desired,
                ready,
            });
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
            } else if *pods == 0 {
                (
                    AdapterDeploymentPhase::Loading,
                    false,
                    conditions::NO_READY_PODS,
                    "no server pod is ready yet; new pods load the adapter before they turn ready"
                        .to_owned(),
                )
            } else if ready < *desired {
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
    };
    status.phase = Some(phase);
    conditions::set(
        &mut status.conditions,
        conditions::new(READY, ready, reason, message, generation, now),
    );
    status
}
