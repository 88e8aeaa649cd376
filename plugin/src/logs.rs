//! `kubectl graft logs JOB`: the trainer container's logs of every pod the job ran, oldest
//! first, each under a header; with `--follow`, new output and new attempts (the Job retries
//! a failed pod in a new one) as they come, until the FineTuneJob finishes.

use std::{collections::HashSet, io::Write, time::Duration};

use anyhow::Context as _;
use futures::{AsyncBufReadExt, TryStreamExt};
use graft_api::{FineTuneJob, FineTuneJobPhase};
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, LogParams},
};

use crate::status::reason;

/// The label the operator puts on a job's pods, and the container the trainer runs in.
const JOB_LABEL: &str = "graft.dev/finetunejob";
const CONTAINER: &str = "trainer";
const POLL: Duration = Duration::from_secs(1);

pub async fn run(
    client: &Client,
    namespace: &str,
    job: &str,
    follow: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let jobs: Api<FineTuneJob> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    jobs.get_opt(job)
        .await
        .with_context(|| format!("reading FineTuneJob {job}"))?
        .with_context(|| format!("no FineTuneJob {job} in namespace {namespace}"))?;
    let selector = ListParams::default().labels(&format!("{JOB_LABEL}={job}"));
    let mut done = HashSet::new();
    let mut attempt = 0;
    loop {
        let mut list = pods
            .list(&selector)
            .await
            .context("listing the job's pods")?
            .items;
        list.sort_by_key(|p| (p.metadata.creation_timestamp.clone(), p.name_any()));
        let next = list.into_iter().find(|p| !done.contains(&p.name_any()));
        if let Some(pod) = next {
            let name = pod.name_any();
            if !started(&pod) {
                if follow {
                    tokio::time::sleep(POLL).await;
                    continue;
                }
                attempt += 1;
                writeln!(
                    out,
                    "==> pod {name} (attempt {attempt}): not started yet <=="
                )?;
                done.insert(name);
                continue;
            }
            attempt += 1;
            writeln!(out, "==> pod {name} (attempt {attempt}) <==")?;
            out.flush()?;
            copy_logs(&pods, &name, follow && terminated(&pod).is_none(), out).await?;
            if follow {
                wait_terminated(&pods, &name).await?;
            }
            if let Some(end) = pods.get_opt(&name).await?.as_ref().and_then(terminated) {
                // On success the termination message is the adapter's JSON, which the
                // job's outcome line below says better.
                let why = match end.message.as_deref().map(str::trim) {
                    Some(message) if end.exit_code != 0 => message,
                    _ => "",
                };
                writeln!(
                    out,
                    "==> pod {name} exited with code {}{} <==",
                    end.exit_code,
                    if why.is_empty() {
                        String::new()
                    } else {
                        format!(": {why}")
                    }
                )?;
            }
            done.insert(name);
            continue;
        }
        let ftj = jobs.get(job).await.context("reading the FineTuneJob")?;
        let status = ftj.status.unwrap_or_default();
        let finished = match status.phase {
            Some(FineTuneJobPhase::Succeeded) => Some(status.adapter.map_or_else(
                || "Succeeded".to_owned(),
                |a| format!("Succeeded: adapter {}", a.uri),
            )),
            Some(FineTuneJobPhase::Failed) => {
                Some(format!("Failed: {}", reason(&status.conditions, "Failed")))
            }
            _ => None,
        };
        if let Some(finished) = finished {
            writeln!(out, "==> finetunejob/{job} {finished} <==")?;
            return Ok(());
        }
        if !follow {
            if attempt == 0 {
                writeln!(out, "finetunejob/{job} has no trainer pod yet")?;
            }
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Whether the trainer container has started (so there are logs to read).
fn started(pod: &Pod) -> bool {
    container(pod).is_some_and(|c| {
        c.state
            .as_ref()
            .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
    })
}

fn terminated(pod: &Pod) -> Option<ContainerStateTerminated> {
    container(pod)?.state.as_ref()?.terminated.clone()
}

fn container(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::ContainerStatus> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == CONTAINER)
}

async fn copy_logs(
    pods: &Api<Pod>,
    name: &str,
    follow: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let params = LogParams {
        container: Some(CONTAINER.to_owned()),
        follow,
        ..LogParams::default()
    };
    let mut lines = pods
        .log_stream(name, &params)
        .await
        .with_context(|| format!("reading the logs of pod {name}"))?
        .lines();
    while let Some(line) = lines
        .try_next()
        .await
        .with_context(|| format!("reading the logs of pod {name}"))?
    {
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    Ok(())
}

/// A followed log ends when the container stops; its status may lag a moment behind.
async fn wait_terminated(pods: &Api<Pod>, name: &str) -> anyhow::Result<()> {
    loop {
        match pods.get_opt(name).await? {
            Some(pod)
                if terminated(&pod).is_none() && pod.metadata.deletion_timestamp.is_none() =>
            {
                tokio::time::sleep(POLL).await;
            }
            _ => return Ok(()),
        }
    }
}
