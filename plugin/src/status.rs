//! `kubectl graft status`: every FineTuneJob and AdapterDeployment of a namespace, one row
//! each, with what a user asks first: how far training is, which versions serve where.

use anyhow::Context as _;
use graft_api::{
    AdapterDeployment, AdapterDeploymentPhase, AdapterSource, FineTuneJob, FineTuneJobPhase,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{Api, Client, ResourceExt, api::ListParams};

use crate::table;

/// The table for `namespace` (every namespace when `None`).
pub async fn render(client: &Client, namespace: Option<&str>) -> anyhow::Result<String> {
    let (jobs, deployments): (Api<FineTuneJob>, Api<AdapterDeployment>) = match namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let params = ListParams::default();
    let mut jobs = jobs
        .list(&params)
        .await
        .context("listing FineTuneJobs (are Graft's CRDs installed?)")?
        .items;
    let mut deployments = deployments
        .list(&params)
        .await
        .context("listing AdapterDeployments")?
        .items;
    if jobs.is_empty() && deployments.is_empty() {
        return Ok(match namespace {
            Some(ns) => format!("No FineTuneJobs or AdapterDeployments in namespace {ns}.\n"),
            None => "No FineTuneJobs or AdapterDeployments.\n".to_owned(),
        });
    }
    jobs.sort_by_key(|j| (j.namespace(), j.name_any()));
    deployments.sort_by_key(|d| (d.namespace(), d.name_any()));
    let mut rows: Vec<Vec<String>> = jobs.iter().map(job_row).collect();
    rows.extend(deployments.iter().map(deployment_row));
    let mut header = vec!["KIND", "NAME", "PHASE", "PROGRESS", "AGE", "DETAIL"];
    if namespace.is_none() {
        header.insert(0, "NAMESPACE");
        let namespaces = jobs
            .iter()
            .map(ResourceExt::namespace)
            .chain(deployments.iter().map(ResourceExt::namespace));
        for (row, ns) in rows.iter_mut().zip(namespaces) {
            row.insert(0, ns.unwrap_or_default());
        }
    }
    Ok(table::render(&header, &rows))
}

fn job_row(job: &FineTuneJob) -> Vec<String> {
    let status = job.status.clone().unwrap_or_default();
    let progress = status.progress.as_ref();
    let steps = progress.filter(|p| p.total_steps > 0).map_or_else(
        || "-".to_owned(),
        |p| {
            format!(
                "{}/{} steps ({}%)",
                p.step,
                p.total_steps,
                p.step * 100 / p.total_steps
            )
        },
    );
    let detail = match status.phase {
        Some(FineTuneJobPhase::Succeeded) => status
            .adapter
            .as_ref()
            .map(|a| format!("adapter {}", a.uri))
            .unwrap_or_default(),
        Some(FineTuneJobPhase::Failed) => reason(&status.conditions, "Failed"),
        Some(FineTuneJobPhase::Running) => progress.map(training).unwrap_or_default(),
        _ => reason(&status.conditions, "Ready"),
    };
    vec![
        "FineTuneJob".to_owned(),
        job.name_any(),
        phase(status.phase.map(|p| format!("{p:?}"))),
        steps,
        table::since(job.metadata.creation_timestamp.as_ref()),
        detail,
    ]
}

/// `loss 1.234, eval 1.301, 1900 tok/s, 12m left`.
fn training(progress: &graft_api::Progress) -> String {
    let mut parts = Vec::new();
    if let Some(loss) = progress.loss {
        parts.push(format!("loss {loss:.4}"));
    }
    if let Some(eval) = progress.eval_loss {
        parts.push(format!("eval {eval:.4}"));
    }
    if let Some(speed) = progress.tokens_per_second {
        parts.push(format!("{speed:.0} tok/s"));
    }
    if let Some(eta) = progress.eta_seconds {
        parts.push(format!(
            "{} left",
            table::age(i64::try_from(eta).unwrap_or(i64::MAX))
        ));
    }
    parts.join(", ")
}

fn deployment_row(ad: &AdapterDeployment) -> Vec<String> {
    let status = ad.status.clone().unwrap_or_default();
    let pods = status.replicas.map_or_else(
        || "-".to_owned(),
        |r| format!("{}/{} pods", r.ready, r.desired),
    );
    let versions = ad
        .spec
        .versions
        .iter()
        .map(|v| format!("{} {}%", version_name(&v.source), v.weight))
        .collect::<Vec<_>>()
        .join(" + ");
    let mut detail = format!(
        "{} on {}: {versions}",
        ad.spec.adapter_name, ad.spec.server.name
    );
    if status.phase != Some(AdapterDeploymentPhase::Ready) {
        let why = reason(&status.conditions, "Ready");
        if !why.is_empty() {
            detail = format!("{detail} — {why}");
        }
    }
    vec![
        "AdapterDeployment".to_owned(),
        ad.name_any(),
        phase(status.phase.map(|p| format!("{p:?}"))),
        pods,
        table::since(ad.metadata.creation_timestamp.as_ref()),
        detail,
    ]
}

/// How a version is named in the spec: its FineTuneJob, or its URI.
pub fn version_name(source: &AdapterSource) -> String {
    match (&source.fine_tune_job_ref, &source.uri) {
        (Some(job), _) => job.name.clone(),
        (None, Some(uri)) => uri.clone(),
        (None, None) => "?".to_owned(),
    }
}

fn phase(phase: Option<String>) -> String {
    phase.unwrap_or_else(|| "-".to_owned())
}

/// `Reason: message` of the condition `type_`, when it is not True.
pub fn reason(conditions: &[Condition], type_: &str) -> String {
    conditions
        .iter()
        .find(|c| c.type_ == type_ && (c.status != "True" || type_ == "Failed"))
        .map(|c| {
            if c.message.is_empty() {
                c.reason.clone()
            } else {
                format!("{}: {}", c.reason, c.message)
            }
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::needless_pass_by_value)]
    fn job(status: serde_json::Value) -> FineTuneJob {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "graft.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "bot-v3", "namespace": "team-a"},
            "spec": {"baseModel": {"uri": "s3://m/x/"}, "dataset": {"uri": "s3://d/x"},
                     "output": {"uri": "s3://o/bot/v3/"}},
            "status": status,
        }))
        .expect("a FineTuneJob")
    }

    #[test]
    fn a_running_job_shows_its_steps_loss_speed_and_time_left() {
        let row = job_row(&job(serde_json::json!({
            "phase": "Running",
            "progress": {"step": 120, "totalSteps": 480, "loss": 1.23456, "evalLoss": 1.3,
                         "tokensPerSecond": 1900.4, "etaSeconds": 720},
        })));
        assert_eq!(row[2], "Running");
        assert_eq!(row[3], "120/480 steps (25%)");
        assert_eq!(row[5], "loss 1.2346, eval 1.3000, 1900 tok/s, 12m left");
    }

    #[test]
    fn a_failed_job_shows_why() {
        let row = job_row(&job(serde_json::json!({
            "phase": "Failed",
            "conditions": [{"type": "Failed", "status": "True", "reason": "TrainerFailed",
                            "message": "dataset line 3: not JSON", "lastTransitionTime": "2025-01-01T00:00:00Z"}],
        })));
        assert_eq!(row[5], "TrainerFailed: dataset line 3: not JSON");
    }
}
