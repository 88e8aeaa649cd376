//! From `spec.versions` to what a server can load: each version's URI and digest, taken from
//! the spec or from its FineTuneJob's `status.adapter` once that job has succeeded.

use graft_api::{AdapterDeployment, AssignedVersion, FineTuneJob, FineTuneJobPhase};

/// Why the versions cannot be rolled out yet (or ever, as they stand).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unresolved {
    /// A referenced FineTuneJob has not succeeded yet (or does not exist yet).
    Waiting { job: String, why: String },
    /// A referenced FineTuneJob failed: only a spec change helps.
    JobFailed { job: String, why: String },
}

/// The versions with URI and digest, in spec order, or the first reason they can't be.
/// `job` looks a FineTuneJob up by name in the deployment's namespace.
pub fn resolve(
    ad: &AdapterDeployment,
    job: impl Fn(&str) -> Option<FineTuneJob>,
) -> Result<Vec<AssignedVersion>, Unresolved> {
    ad.spec
        .versions
        .iter()
        .map(|version| {
            let source = &version.source;
            let (uri, sha256) = match (&source.fine_tune_job_ref, &source.uri, &source.sha256) {
                (Some(reference), _, _) => from_job(&reference.name, job(&reference.name))?,
                (None, Some(uri), Some(sha256)) => (uri.clone(), sha256.clone()),
                // The schema requires one of the two; an object written before the schema
                // had that rule is still refused clearly.
                _ => {
                    return Err(Unresolved::JobFailed {
                        job: String::new(),
                        why: "a version needs fineTuneJobRef, or uri with sha256".to_owned(),
                    });
                }
            };
            Ok(AssignedVersion {
                uri,
                sha256,
                weight: version.weight,
            })
        })
        .collect()
}

fn from_job(name: &str, job: Option<FineTuneJob>) -> Result<(String, String), Unresolved> {
    let Some(job) = job else {
        return Err(Unresolved::Waiting {
            job: name.to_owned(),
            why: format!("FineTuneJob {name} does not exist (yet)"),
        });
    };
    let status = job.status.unwrap_or_default();
    match (status.phase, status.adapter) {
        (Some(FineTuneJobPhase::Succeeded), Some(adapter)) => Ok((adapter.uri, adapter.sha256)),
        (Some(FineTuneJobPhase::Failed), _) => Err(Unresolved::JobFailed {
            job: name.to_owned(),
            why: format!("FineTuneJob {name} failed; point this version at another adapter"),
        }),
        (phase, _) => Err(Unresolved::Waiting {
            job: name.to_owned(),
            why: format!(
                "FineTuneJob {name} is {}; waiting for it to succeed",
                phase.map_or_else(|| "new".to_owned(), |p| format!("{p:?}"))
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use graft_api::{AdapterArtifact, FineTuneJobStatus};

    use super::*;

    fn deployment(versions: &serde_json::Value) -> AdapterDeployment {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "graft.dev/v1alpha1", "kind": "AdapterDeployment",
            "metadata": {"name": "bot", "namespace": "team-a"},
            "spec": {"server": {"name": "llama"}, "adapterName": "bot", "versions": versions},
        }))
        .expect("a valid AdapterDeployment")
    }

    fn job(phase: FineTuneJobPhase, adapter: bool) -> FineTuneJob {
        let mut job: FineTuneJob = serde_json::from_value(serde_json::json!({
            "apiVersion": "graft.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "v3", "namespace": "team-a"},
            "spec": {"baseModel": {"uri": "s3://m/"}, "dataset": {"uri": "s3://d/x.jsonl"},
                     "output": {"uri": "s3://a/v3/"}},
        }))
        .expect("a valid FineTuneJob");
        job.status = Some(FineTuneJobStatus {
            phase: Some(phase),
            adapter: adapter.then(|| AdapterArtifact {
                uri: "s3://a/v3/".to_owned(),
                sha256: "b".repeat(64),
                size_bytes: 1,
                trainable_parameters: 1,
            }),
            ..FineTuneJobStatus::default()
        });
        job
    }

    #[test]
    fn a_succeeded_jobs_adapter_and_a_uri_resolve_in_spec_order() {
        let ad = deployment(&serde_json::json!([
            {"source": {"fineTuneJobRef": {"name": "v3"}}, "weight": 90},
            {"source": {"uri": "s3://a/v4/", "sha256": "c".repeat(64)}, "weight": 10},
        ]));
        let resolved =
            resolve(&ad, |_| Some(job(FineTuneJobPhase::Succeeded, true))).expect("resolves");
        assert_eq!(
            resolved,
            [
                AssignedVersion {
                    uri: "s3://a/v3/".into(),
                    sha256: "b".repeat(64),
                    weight: 90
                },
                AssignedVersion {
                    uri: "s3://a/v4/".into(),
                    sha256: "c".repeat(64),
                    weight: 10
                },
            ]
        );
    }

    #[test]
    fn a_running_or_missing_job_waits_and_a_failed_one_fails() {
        let ad = deployment(&serde_json::json!([{"source": {"fineTuneJobRef": {"name": "v3"}}}]));
        assert!(matches!(
            resolve(&ad, |_| Some(job(FineTuneJobPhase::Running, false))),
            Err(Unresolved::Waiting { .. })
        ));
        assert!(matches!(
            resolve(&ad, |_| None),
            Err(Unresolved::Waiting { .. })
        ));
        assert!(matches!(
            resolve(&ad, |_| Some(job(FineTuneJobPhase::Failed, false))),
            Err(Unresolved::JobFailed { .. })
        ));
    }
}
