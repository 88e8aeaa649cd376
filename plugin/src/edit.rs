//! `kubectl graft promote` and `kubectl graft canary`: a new `spec.versions` for an
//! AdapterDeployment, applied server-side under this plugin's own field manager, then the
//! rollout followed until the operator reports `Ready` (or a failure), and each server pod's
//! state printed.

use std::{io::Write, time::Duration};

use anyhow::{Context as _, bail};
use graft_api::{
    AdapterDeployment, AdapterDeploymentPhase, AdapterSource, AdapterVersion, LocalObjectRef,
};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::json;

use crate::{
    status::{reason, version_name},
    table,
};

/// The field manager of the plugin's edits: `kubectl get ad -o yaml --show-managed-fields`
/// shows who moved the versions last.
pub const FIELD_MANAGER: &str = "kubectl-graft";
/// Field managers of GitOps controllers (Argo CD, Flux): versions they own are not taken
/// over without `--force-conflicts`.
const GITOPS_MANAGERS: [&str; 4] = [
    "argocd-controller",
    "argocd-application-controller",
    "kustomize-controller",
    "helm-controller",
];
const POLL: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub enum Change {
    /// The only version, at weight 100.
    Promote(AdapterSource),
    /// This version at this weight, the current main version at the rest.
    Canary(AdapterSource, u32),
}

/// What the command line asked for.
#[derive(Debug)]
pub struct Request {
    /// The AdapterDeployment's name.
    pub deployment: String,
    pub change: Change,
    pub timeout: Duration,
    pub force_conflicts: bool,
    pub dry_run: bool,
}

/// A version as the command line names it: a FineTuneJob, or a URI with its digest.
pub fn parse_version(version: &str, sha256: Option<&str>) -> anyhow::Result<AdapterSource> {
    if version.contains("://") {
        let Some(sha256) = sha256 else {
            bail!(
                "{version} is a URI: give the SHA-256 of its weights file (adapter_model.safetensors, or adapter.safetensors) with --sha256"
            );
        };
        return Ok(AdapterSource {
            fine_tune_job_ref: None,
            uri: Some(version.to_owned()),
            sha256: Some(sha256.to_owned()),
        });
    }
    if sha256.is_some() {
        bail!("--sha256 goes with a URI version; {version} names a FineTuneJob");
    }
    Ok(AdapterSource {
        fine_tune_job_ref: Some(LocalObjectRef {
            name: version.to_owned(),
        }),
        uri: None,
        sha256: None,
    })
}

/// The versions after `change`, given the current ones.
pub fn versions(
    current: &[AdapterVersion],
    change: &Change,
) -> anyhow::Result<Vec<AdapterVersion>> {
    match change {
        Change::Promote(source) => Ok(vec![AdapterVersion {
            source: source.clone(),
            weight: 100,
        }]),
        Change::Canary(source, percent) => {
            // The version that keeps the rest: the heaviest one that is not the canary.
            let stable = current
                .iter()
                .filter(|v| v.source != *source)
                .max_by_key(|v| v.weight)
                .with_context(|| {
                    format!(
                        "{} is the only version: a canary splits traffic with another one",
                        version_name(source)
                    )
                })?;
            Ok(vec![
                AdapterVersion {
                    source: stable.source.clone(),
                    weight: 100 - percent,
                },
                AdapterVersion {
                    source: source.clone(),
                    weight: *percent,
                },
            ])
        }
    }
}

pub async fn run(
    client: &Client,
    namespace: &str,
    request: &Request,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let name = request.deployment.as_str();
    let api: Api<AdapterDeployment> = Api::namespaced(client.clone(), namespace);
    let current = api
        .get_opt(name)
        .await
        .with_context(|| format!("reading AdapterDeployment {name}"))?
        .with_context(|| format!("no AdapterDeployment {name} in namespace {namespace}"))?;
    let versions = versions(&current.spec.versions, &request.change)?;
    if request.dry_run {
        let manifest = json!({
            "apiVersion": "graft.dev/v1alpha1",
            "kind": "AdapterDeployment",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "server": current.spec.server,
                "adapterName": current.spec.adapter_name,
                "versions": versions,
            },
        });
        out.write_all(serde_yaml::to_string(&manifest)?.as_bytes())?;
        return Ok(());
    }
    // A GitOps controller would put its versions back on its next sync: change them in Git.
    let gitops: Vec<String> = owners_of_versions(&current)
        .into_iter()
        .filter(|m| GITOPS_MANAGERS.contains(&m.as_str()))
        .collect();
    if !gitops.is_empty() && !request.force_conflicts {
        bail!(
            "spec.versions of adapterdeployment/{name} is managed by {}: change it in Git \
             (--dry-run prints the manifest to commit), or take it over with --force-conflicts \
             until the next sync puts it back",
            gitops.join(", ")
        );
    }
    // Only `spec.versions`, taken over from whoever set it by hand (kubectl apply, edit).
    let patch = json!({
        "apiVersion": "graft.dev/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": name},
        "spec": {"versions": versions},
    });
    let applied = api
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .with_context(|| format!("applying AdapterDeployment {name}"))?;
    let shown: Vec<String> = versions
        .iter()
        .map(|v| format!("{} {}%", version_name(&v.source), v.weight))
        .collect();
    writeln!(
        out,
        "adapterdeployment/{name} versions: {}",
        shown.join(" + ")
    )?;
    let generation = applied.metadata.generation.unwrap_or_default();
    let outcome = wait(&api, name, generation, request.timeout, out).await;
    let latest = api
        .get(name)
        .await
        .context("reading the AdapterDeployment")?;
    write_pods(client, namespace, &latest, out).await?;
    outcome
}

/// The field managers, other than this plugin, that own `spec.versions`.
fn owners_of_versions(ad: &AdapterDeployment) -> Vec<String> {
    ad.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|f| {
            f.fields_v1
                .as_ref()
                .is_some_and(|v| v.0["f:spec"].get("f:versions").is_some())
        })
        .filter_map(|f| f.manager.clone())
        .filter(|m| m != FIELD_MANAGER)
        .collect()
}

/// Follows the status until the operator has seen `generation` and reports Ready; prints
/// each change of phase or reason.
async fn wait(
    api: &Api<AdapterDeployment>,
    name: &str,
    generation: i64,
    timeout: Duration,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let ad = api
            .get(name)
            .await
            .context("reading the AdapterDeployment")?;
        let status = ad.status.clone().unwrap_or_default();
        let seen = status.observed_generation.unwrap_or_default() >= generation;
        if seen {
            let replicas = status
                .replicas
                .map(|r| format!(" ({}/{} pods)", r.ready, r.desired))
                .unwrap_or_default();
            let why = reason(&status.conditions, "Ready");
            let phase = status
                .phase
                .map_or_else(|| "-".to_owned(), |p| format!("{p:?}"));
            let line = format!(
                "{phase}{replicas}{}",
                if why.is_empty() {
                    String::new()
                } else {
                    format!(" {why}")
                }
            );
            if line != last {
                writeln!(out, "  {line}")?;
                out.flush()?;
                last = line;
            }
            match status.phase {
                Some(AdapterDeploymentPhase::Ready) => return Ok(()),
                // Only a spec change gets it out of Failed; Degraded may still recover.
                Some(AdapterDeploymentPhase::Failed) => {
                    bail!("adapterdeployment/{name} failed: {why}")
                }
                _ => {}
            }
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "adapterdeployment/{name} not Ready after {}s (last: {})",
                timeout.as_secs(),
                if last.is_empty() {
                    "the operator has not seen the change"
                } else {
                    &last
                }
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Each server pod's state, then what the operator verified for each version.
async fn write_pods(
    client: &Client,
    namespace: &str,
    ad: &AdapterDeployment,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let server = &ad.spec.server.name;
    let mut list = pods
        .list(&ListParams::default().labels(&format!("graft.dev/server={server}")))
        .await
        .context("listing the server's pods")?
        .items;
    list.sort_by_key(ResourceExt::name_any);
    let rows: Vec<Vec<String>> = list.iter().map(pod_row).collect();
    writeln!(out)?;
    if rows.is_empty() {
        writeln!(out, "no pods of server {server}")?;
    } else {
        out.write_all(
            table::render(&["POD", "READY", "STATUS", "RESTARTS", "AGE"], &rows).as_bytes(),
        )?;
    }
    let status = ad.status.clone().unwrap_or_default();
    let desired = status.replicas.map_or(0, |r| r.desired);
    let rows: Vec<Vec<String>> = ad
        .spec
        .versions
        .iter()
        .zip(&status.versions)
        .map(|(spec, seen)| {
            vec![
                version_name(&spec.source),
                format!("{}%", seen.weight),
                seen.sha256.chars().take(12).collect(),
                format!("{}/{desired}", seen.ready_replicas),
            ]
        })
        .collect();
    if !rows.is_empty() {
        writeln!(out)?;
        out.write_all(
            table::render(&["VERSION", "WEIGHT", "SHA256", "PODS SERVING"], &rows).as_bytes(),
        )?;
    }
    Ok(())
}

fn pod_row(pod: &Pod) -> Vec<String> {
    let status = pod.status.clone().unwrap_or_default();
    let ready = status
        .conditions
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let containers = status.container_statuses.unwrap_or_default();
    let restarts: i32 = containers.iter().map(|c| c.restart_count).sum();
    // What kubectl shows: a waiting or terminated container's reason over the pod's phase.
    let state = containers
        .iter()
        .find_map(|c| {
            let state = c.state.as_ref()?;
            state
                .waiting
                .as_ref()
                .and_then(|w| w.reason.clone())
                .or_else(|| state.terminated.as_ref().and_then(|t| t.reason.clone()))
        })
        .or(status.phase)
        .unwrap_or_else(|| "Unknown".to_owned());
    let state = if pod.metadata.deletion_timestamp.is_some() {
        "Terminating".to_owned()
    } else {
        state
    };
    vec![
        pod.name_any(),
        if ready { "yes" } else { "no" }.to_owned(),
        state,
        restarts.to_string(),
        table::since(pod.metadata.creation_timestamp.as_ref()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(name: &str) -> AdapterSource {
        parse_version(name, None).expect("a job name")
    }

    #[test]
    fn a_canary_keeps_the_heaviest_other_version_for_the_rest() {
        let current = versions(&[], &Change::Promote(job("v3"))).expect("promote");
        let canary = versions(&current, &Change::Canary(job("v4"), 10)).expect("canary");
        assert_eq!(
            canary
                .iter()
                .map(|v| (version_name(&v.source), v.weight))
                .collect::<Vec<_>>(),
            [("v3".to_owned(), 90), ("v4".to_owned(), 10)]
        );
        // Raising the canary's share keeps the same stable version.
        let raised = versions(&canary, &Change::Canary(job("v4"), 50)).expect("canary");
        assert_eq!(
            raised
                .iter()
                .map(|v| (version_name(&v.source), v.weight))
                .collect::<Vec<_>>(),
            [("v3".to_owned(), 50), ("v4".to_owned(), 50)]
        );
    }

    #[test]
    fn a_canary_of_the_only_version_is_refused() {
        let current = versions(&[], &Change::Promote(job("v3"))).expect("promote");
        let error = versions(&current, &Change::Canary(job("v3"), 10)).expect_err("refused");
        assert!(error.to_string().contains("only version"), "{error}");
    }

    #[test]
    fn a_uri_version_needs_its_digest() {
        let error = parse_version("s3://adapters/bot/v4/", None).expect_err("refused");
        assert!(error.to_string().contains("--sha256"), "{error}");
        let source = parse_version("s3://adapters/bot/v4/", Some(&"a".repeat(64))).expect("uri");
        assert_eq!(source.uri.as_deref(), Some("s3://adapters/bot/v4/"));
    }
}
