//! Rolling a version list out to every ready server pod without failing a request: first each
//! pod loads the new versions at weight 0 beside the ones it serves (traffic unchanged), and
//! only when every pod has them do the weights move and the old versions go — one atomic swap
//! per pod. A pod that refuses an adapter stops the rollout before any traffic moves.

use std::collections::BTreeMap;

use futures::future::join_all;
use graft_api::{AdapterAssignment, AdapterListing, AssignedVersion, LoadState, VersionState};

use super::admin::{AdminClient, CallError, Endpoint};

/// What a rollout found and did.
#[derive(Debug, Default)]
pub struct Rollout {
    /// Pods that serve exactly the desired versions and weights.
    pub verified: Vec<String>,
    /// Per version digest: pods that have it loaded (or on disk) with its desired weight.
    pub ready_per_version: BTreeMap<String, u32>,
    /// Pods that could not be brought there, and why.
    pub failures: Vec<String>,
    /// A pod refused an adapter (422): the versions cannot load, on any pod.
    pub refused: Option<String>,
}

/// What stage 1 found and did: each reachable pod with what it served before.
#[derive(Debug)]
pub struct Staged {
    current: Vec<(Endpoint, Vec<VersionState>)>,
    rollout: Rollout,
}

impl Staged {
    /// A pod's reason for refusing a version: the rollout stops here.
    pub fn refused(&self) -> Option<&str> {
        self.rollout.refused.as_deref()
    }
}

/// Stage 1: every ready pod loads the versions it lacks at weight 0, beside what it serves.
pub async fn stage(
    client: &AdminClient,
    pods: &[Endpoint],
    name: &str,
    desired: &AdapterAssignment,
) -> Staged {
    let mut rollout = Rollout::default();
    let listings = join_all(pods.iter().map(|pod| client.list(pod))).await;
    let mut current = Vec::new();
    for (pod, listing) in pods.iter().zip(listings) {
        match listing {
            Ok(listing) => current.push((pod.clone(), versions_of(&listing, name))),
            Err(e) => rollout.failures.push(e.to_string()),
        }
    }
    let staging: Vec<(&Endpoint, AdapterAssignment)> = current
        .iter()
        .filter(|(_, serving)| !matches(serving, desired))
        .filter_map(|(pod, serving)| Some((pod, staged(serving, desired)?)))
        .collect();
    let results = join_all(staging.iter().map(|(pod, a)| client.put(pod, name, a))).await;
    record(&mut rollout, results);
    Staged { current, rollout }
}

/// Stage 2 (unless a pod refused in stage 1): the desired versions and weights, old versions
/// out; then every pod is verified.
pub async fn finish(
    client: &AdminClient,
    pods: &[Endpoint],
    name: &str,
    desired: &AdapterAssignment,
    staged: Staged,
) -> Rollout {
    let Staged {
        current,
        mut rollout,
    } = staged;
    if rollout.refused.is_none() {
        let swapping: Vec<&Endpoint> = current
            .iter()
            .filter(|(_, serving)| !matches(serving, desired))
            .map(|(pod, _)| pod)
            .collect();
        let swapped = join_all(swapping.iter().map(|pod| client.put(pod, name, desired))).await;
        record(&mut rollout, swapped);
    }
    verify(client, pods, name, desired, rollout).await
}

/// Removes `name` from every pod; the pods that could not be reached, with why.
pub async fn remove(client: &AdminClient, pods: &[Endpoint], name: &str) -> Vec<String> {
    join_all(pods.iter().map(|pod| client.delete(pod, name)))
        .await
        .into_iter()
        .filter_map(|r| r.err().map(|e| e.to_string()))
        .collect()
}

/// Notes failures and refusals.
fn record(rollout: &mut Rollout, results: Vec<Result<(), CallError>>) {
    for result in results {
        match result {
            Ok(()) => {}
            Err(CallError::Refused {
                message,
                status: 422,
                ..
            }) => {
                rollout.refused.get_or_insert(message);
            }
            Err(e) => rollout.failures.push(e.to_string()),
        }
    }
}

async fn verify(
    client: &AdminClient,
    pods: &[Endpoint],
    name: &str,
    desired: &AdapterAssignment,
    mut rollout: Rollout,
) -> Rollout {
    let listings = join_all(pods.iter().map(|pod| client.list(pod))).await;
    for (pod, listing) in pods.iter().zip(listings) {
        let Ok(listing) = listing else { continue };
        let serving = versions_of(&listing, name);
        for want in &desired.versions {
            let has = serving.iter().any(|v| {
                v.sha256 == want.sha256 && v.weight == want.weight && v.state != LoadState::Failed
            });
            if has {
                *rollout
                    .ready_per_version
                    .entry(want.sha256.clone())
                    .or_default() += 1;
            }
        }
        if matches(&serving, desired) {
            rollout.verified.push(pod.pod.clone());
        }
    }
    rollout
}

fn versions_of(listing: &AdapterListing, name: &str) -> Vec<VersionState> {
    listing.adapters.get(name).cloned().unwrap_or_default()
}

/// Whether a pod serves exactly `desired`: the same digests with the same weights, all usable.
fn matches(serving: &[VersionState], desired: &AdapterAssignment) -> bool {
    serving.len() == desired.versions.len()
        && desired.versions.iter().all(|want| {
            serving.iter().any(|v| {
                v.sha256 == want.sha256 && v.weight == want.weight && v.state != LoadState::Failed
            })
        })
}

/// What a pod serves plus the desired versions it lacks at weight 0; `None` when nothing new
/// needs loading first, or when the pod serves nothing usable (it then takes `desired`
/// directly: there is no traffic to protect).
fn staged(serving: &[VersionState], desired: &AdapterAssignment) -> Option<AdapterAssignment> {
    let usable: Vec<&VersionState> = serving
        .iter()
        .filter(|v| v.state != LoadState::Failed && v.weight > 0)
        .collect();
    let missing: Vec<&AssignedVersion> = desired
        .versions
        .iter()
        .filter(|want| !usable.iter().any(|v| v.sha256 == want.sha256))
        .collect();
    if usable.is_empty() || missing.is_empty() {
        return None;
    }
    let mut versions: Vec<AssignedVersion> = usable
        .iter()
        .map(|v| AssignedVersion {
            uri: v.uri.clone(),
            sha256: v.sha256.clone(),
            weight: v.weight,
        })
        .collect();
    versions.extend(missing.into_iter().map(|want| AssignedVersion {
        weight: 0,
        ..want.clone()
    }));
    Some(AdapterAssignment {
        versions,
        owner: desired.owner.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serving(sha: &str, weight: u32) -> VersionState {
        VersionState {
            uri: format!("s3://a/{sha}/"),
            sha256: sha.to_owned(),
            weight,
            state: LoadState::Loaded,
            error: None,
            loaded_at: None,
        }
    }

    fn desired(versions: &[(&str, u32)]) -> AdapterAssignment {
        AdapterAssignment {
            versions: versions
                .iter()
                .map(|(sha, weight)| AssignedVersion {
                    uri: format!("s3://a/{sha}/"),
                    sha256: (*sha).to_owned(),
                    weight: *weight,
                })
                .collect(),
            owner: None,
        }
    }

    #[test]
    fn a_new_version_is_staged_at_weight_zero_beside_the_serving_one() {
        let staged = staged(&[serving("v1", 100)], &desired(&[("v2", 100)])).expect("staged");
        let pairs: Vec<(&str, u32)> = staged
            .versions
            .iter()
            .map(|v| (v.sha256.as_str(), v.weight))
            .collect();
        assert_eq!(pairs, [("v1", 100), ("v2", 0)]);
    }

    #[test]
    fn a_weight_change_or_an_empty_pod_needs_no_staging() {
        assert!(
            staged(
                &[serving("v1", 90), serving("v2", 10)],
                &desired(&[("v1", 50), ("v2", 50)])
            )
            .is_none()
        );
        assert!(staged(&[], &desired(&[("v1", 100)])).is_none());
    }

    #[test]
    fn a_pod_matches_only_with_the_same_digests_and_weights() {
        let want = desired(&[("v1", 90), ("v2", 10)]);
        assert!(matches(&[serving("v2", 10), serving("v1", 90)], &want));
        assert!(!matches(&[serving("v1", 100)], &want));
        assert!(!matches(&[serving("v1", 50), serving("v2", 50)], &want));
    }
}
