//! The FineTuneJob controller: validate → build → apply → status, on every change of a
//! FineTuneJob, its Job or its pods.
//!
//! No finalizer: everything the operator creates is in the cluster and owned by the
//! FineTuneJob, so garbage collection cleans it up; the adapter in object storage is the
//! product and outlives the job on purpose.

use std::{sync::Arc, time::Duration};

use futures::{Stream, StreamExt};
use graft_api::{FineTuneJob, FineTuneJobPhase, FineTuneJobStatus};
use k8s_openapi::{
    api::{
        batch::v1::Job,
        core::v1::{ObjectReference, Pod, Secret},
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    runtime::{
        Controller,
        controller::{self, Action},
        events::{Event, EventType, Recorder},
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use serde_json::json;
use tracing::{Instrument, info, info_span, warn};

use super::{
    apply::{ApplyError, Taken, apply_children, controlled_by, taken_name},
    build::{BuildError, Children, TrainerDefaults, build},
    status,
    validate::{self, Lookups, Schemes},
};
use crate::{FIELD_MANAGER, conditions, metrics::Metrics, scoped};

const CONTROLLER: &str = "finetunejob";
/// The label every child carries, naming its FineTuneJob; pods inherit it from the Job template.
const JOB_LABEL: &str = "graft.dev/finetunejob";
/// How soon a job whose objects the apiserver refused is tried again (a quota may free up).
const REFUSED_RETRY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("reading {what}: {source}")]
    Read {
        what: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("writing the status: {0}")]
    WriteStatus(#[source] kube::Error),
}

impl Error {
    /// The metric label of this kind of error.
    fn label(&self) -> &'static str {
        match self {
            Self::Build(_) => "build",
            Self::Apply(_) => "apply",
            Self::Read { .. } => "read",
            Self::WriteStatus(_) => "write_status",
        }
    }
}

/// Operator-wide settings of the FineTuneJob controller.
#[derive(Clone, Debug)]
pub struct Settings {
    pub trainer: TrainerDefaults,
    /// URI schemes of base models (what the trainers in this cluster can read) and of outputs.
    pub schemes: Schemes,
    /// How often a job waiting for its Secret looks again. Polling, not a watch, keeps the
    /// operator's Secret access to `get` on the one name a job references.
    pub blocked_retry: Duration,
    /// Watch this namespace only; all when `None`.
    pub namespace: Option<String>,
    /// Reconciles run at once (0: unbounded). Bounding them bounds the operator's memory when
    /// hundreds of jobs arrive together.
    pub concurrency: u16,
}

pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Builds the controller. The caller drives the returned stream (and so decides when it
/// runs: only while leading); `store` gives the current FineTuneJobs, for metrics.
pub fn controller(
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> (impl Stream<Item = ()>, Store<FineTuneJob>) {
    let namespace = ctx.settings.namespace.as_deref();
    let ftjs: Api<FineTuneJob> = scoped(&ctx.client, namespace);
    let jobs: Api<Job> = scoped(&ctx.client, namespace);
    let pods: Api<Pod> = scoped(&ctx.client, namespace);
    let children = watcher::Config::default().labels(JOB_LABEL);
    let controller = Controller::new(ftjs, watcher::Config::default())
        .owns(jobs, children.clone())
        // Pods are not owned by the FineTuneJob (the Job owns them); their label leads back.
        .watches(pods, children, |pod: Pod| {
            let name = pod.labels().get(JOB_LABEL)?.clone();
            Some(ObjectRef::new(&name).within(&pod.namespace()?))
        })
        .with_config(controller::Config::default().concurrency(ctx.settings.concurrency))
        .graceful_shutdown_on(shutdown);
    let store = controller.store();
    let stream = controller.run(reconcile, error_policy, ctx).map(|result| {
        if let Err(e) = result {
            // Errors of reconciles are logged in `error_policy`; these are the
            // controller's own (a watch failing, an object gone).
            warn!(error = %e, "controller");
        }
    });
    (stream, store)
}

async fn reconcile(ftj: Arc<FineTuneJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = ftj.namespace().unwrap_or_default();
    let name = ftj.name_any();
    let span = info_span!("reconcile", namespace = %namespace, finetunejob = %name);
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    reconcile_in(&ftj, &ctx, &namespace, &name)
        .instrument(span)
        .await
}

async fn reconcile_in(
    ftj: &FineTuneJob,
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<Action, Error> {
    let client = &ctx.client;
    let now = Timestamp::now();

    // A finished job is final: its outcome was recorded when its Job ended, and pods or the
    // Job disappearing later (pod GC, a node scaled down, a deleted Job) must not rewrite it,
    // nor may a missing Job be recreated (that would train again). Only the generation its
    // status describes moves, so tools waiting on observedGeneration see the edit observed.
    if is_finished(ftj) {
        let next = status::caught_up(ftj);
        if ftj.status.as_ref().map(|s| s.observed_generation) != Some(next.observed_generation) {
            write_status(client, namespace, name, &next).await?;
        }
        return Ok(Action::await_change());
    }

    // Someone else's objects under the names the children would take: nothing is written.
    let mut children = build(ftj, &ctx.settings.trainer)?;
    let owner = ftj.uid().unwrap_or_default();
    let mut taken = taken_name(client, &children, &owner)
        .await
        .map_err(|source| Error::Read {
            what: "the job's children",
            source,
        })?;

    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    let existing = jobs.get_opt(name).await.map_err(|source| Error::Read {
        what: "the Job",
        source,
    })?;
    // The outcome is decided on the FineTuneJob as the apiserver has it, not as the watch's
    // cache last saw it: when the Job is gone, or never was (once the job has started a
    // missing Job is never made again: a GPU would train a second time), and when it ended
    // (a stale copy would not show the Succeeded already recorded, or the adapter the trainer
    // recorded, and a pod collected since would turn the outcome into a failure).
    let fresh;
    let ftj = if existing.as_ref().is_none_or(has_ended) {
        fresh = Api::<FineTuneJob>::namespaced(client.clone(), namespace)
            .get(name)
            .await
            .map_err(|source| Error::Read {
                what: "the FineTuneJob",
                source,
            })?;
        if is_finished(&fresh) {
            return Ok(Action::await_change());
        }
        &fresh
    } else {
        ftj
    };
    if existing.is_none() && started(ftj) {
        let next = status::vanished(ftj, now);
        warn!("the training Job is gone before the outcome was recorded; not training again");
        write_status(client, namespace, name, &next).await?;
        publish_transition(ctx, ftj, ftj.status.as_ref(), &next).await;
        return Ok(Action::await_change());
    }

    if let Some(job) = &existing {
        if !controlled_by(&job.metadata, &owner) {
            taken.get_or_insert(Taken {
                kind: "Job".to_owned(),
                name: name.to_owned(),
            });
        }
        children.keep_job_spec_of(job, ftj);
    }
    let (next, action) = match taken {
        Some(taken) => {
            let blocked = validate::Blocked {
                reason: conditions::NAME_TAKEN,
                message: format!(
                    "a {} named {} exists and is not this FineTuneJob's; delete or rename one \
                     of them (the job starts once the name is free)",
                    taken.kind, taken.name
                ),
            };
            info!(reason = blocked.reason, "waiting: {}", blocked.message);
            (
                status::blocked(ftj, &blocked, now),
                Action::requeue(ctx.settings.blocked_retry),
            )
        }
        // Inputs are checked before the Job exists only: a Secret deleted mid-run doesn't
        // stop a pod that already read it.
        None if existing.is_none() => {
            let lookups = Lookups {
                secret_exists: secret_exists(client, namespace, ftj).await?,
            };
            match validate::validate(ftj, &ctx.settings.schemes, lookups) {
                Err(blocked) => {
                    info!(reason = blocked.reason, "waiting: {}", blocked.message);
                    (
                        status::blocked(ftj, &blocked, now),
                        Action::requeue(ctx.settings.blocked_retry),
                    )
                }
                Ok(()) => apply_and_observe(ctx, ftj, &children, now).await?,
            }
        }
        None => apply_and_observe(ctx, ftj, &children, now).await?,
    };

    let current = status::operator_part(ftj);
    if next != current {
        write_status(client, namespace, name, &next).await?;
        publish_transition(ctx, ftj, ftj.status.as_ref(), &next).await;
    }
    Ok(action)
}

fn is_finished(ftj: &FineTuneJob) -> bool {
    matches!(
        ftj.status.as_ref().and_then(|s| s.phase),
        Some(FineTuneJobPhase::Succeeded | FineTuneJobPhase::Failed)
    )
}

/// Whether the Job has finished, one way or the other.
fn has_ended(job: &Job) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        })
}

fn started(ftj: &FineTuneJob) -> bool {
    ftj.status.as_ref().is_some_and(|s| s.start_time.is_some())
}

async fn apply_and_observe(
    ctx: &Context,
    ftj: &FineTuneJob,
    children: &Children,
    now: Timestamp,
) -> Result<(FineTuneJobStatus, Action), Error> {
    let job = match apply_children(&ctx.client, children).await {
        Ok(job) => job,
        // The apiserver refused an object (invalid, forbidden by quota or policy): retrying
        // soon won't help, and the user must see why.
        Err(e) if e.is_refusal() => {
            let blocked = validate::Blocked {
                reason: conditions::APPLY_REFUSED,
                message: e.to_string(),
            };
            return Ok((
                status::blocked(ftj, &blocked, now),
                Action::requeue(REFUSED_RETRY),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    Ok((observe(ctx, ftj, &job, now).await?, Action::await_change()))
}

async fn observe(
    ctx: &Context,
    ftj: &FineTuneJob,
    job: &Job,
    now: Timestamp,
) -> Result<FineTuneJobStatus, Error> {
    let namespace = ftj.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    // This Job's pods only, not those of an earlier Job of the same name.
    let selector = format!(
        "batch.kubernetes.io/controller-uid={}",
        job.metadata.uid.as_deref().unwrap_or_default()
    );
    let pods = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|source| Error::Read {
            what: "the training pods",
            source,
        })?;
    Ok(status::observe(ftj, job, &pods.items, now))
}

async fn secret_exists(client: &Client, namespace: &str, ftj: &FineTuneJob) -> Result<bool, Error> {
    let Some(name) = validate::secret_name(ftj) else {
        return Ok(true);
    };
    // Metadata only: the operator never needs the credentials themselves.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    match secrets.get_metadata_opt(name).await {
        Ok(found) => Ok(found.is_some()),
        // Installed without `get` on Secrets (the chart's default): the kubelet reports a
        // missing Secret instead, once the pod is scheduled.
        Err(kube::Error::Api(status)) if status.code == 403 => Ok(true),
        Err(source) => Err(Error::Read {
            what: "the storage Secret",
            source,
        }),
    }
}

/// Server-side apply of the operator's status fields. `progress` is absent from the patch,
/// so the trainer's field manager keeps it.
async fn write_status(
    client: &Client,
    namespace: &str,
    name: &str,
    status: &FineTuneJobStatus,
) -> Result<(), Error> {
    let api: Api<FineTuneJob> = Api::namespaced(client.clone(), namespace);
    let patch = json!({
        "apiVersion": FineTuneJob::api_version(&()),
        "kind": FineTuneJob::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::WriteStatus)?;
    Ok(())
}

/// An Event for every phase change, and for every new reason a job is waiting.
async fn publish_transition(
    ctx: &Context,
    ftj: &FineTuneJob,
    before: Option<&FineTuneJobStatus>,
    after: &FineTuneJobStatus,
) {
    let ready = |s: &FineTuneJobStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == conditions::READY)
            .map(|c| (c.status.clone(), c.reason.clone()))
    };
    let phase_changed = before.and_then(|s| s.phase) != after.phase;
    let ready_changed = before.and_then(ready) != ready(after);
    if !phase_changed && !ready_changed {
        return;
    }
    let Some(phase) = after.phase else { return };
    let (type_, reason, note) = event_for(phase, after);
    info!(phase = ?phase, reason, "{note}");
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    let reference: ObjectReference = ftj.object_ref(&());
    if let Err(e) = ctx.recorder.publish(&event, &reference).await {
        warn!(error = %e, "publishing an Event");
    }
}

fn event_for(
    phase: FineTuneJobPhase,
    status: &FineTuneJobStatus,
) -> (EventType, &'static str, String) {
    let message = |type_: &str| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| c.message.clone())
            .unwrap_or_default()
    };
    match phase {
        FineTuneJobPhase::Pending => {
            let ready = message(conditions::READY);
            if conditions::is_true(&status.conditions, conditions::STALLED) {
                (EventType::Warning, "Waiting", ready)
            } else {
                (EventType::Normal, "Pending", ready)
            }
        }
        FineTuneJobPhase::Running => (
            EventType::Normal,
            "Running",
            "the trainer pod is running".to_owned(),
        ),
        FineTuneJobPhase::Suspended => (
            EventType::Normal,
            "Suspended",
            "spec.suspend is true; the training pod was stopped".to_owned(),
        ),
        FineTuneJobPhase::Succeeded => (
            EventType::Normal,
            "Succeeded",
            message(conditions::SUCCEEDED),
        ),
        FineTuneJobPhase::Failed => (EventType::Warning, "Failed", message(conditions::FAILED)),
    }
}

/// A spec problem waits for the spec to change; anything else is retried with backoff
/// (the controller's own backoff applies on top of this delay).
#[allow(clippy::needless_pass_by_value)] // the signature `Controller::run` requires
fn error_policy(ftj: Arc<FineTuneJob>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(CONTROLLER, error.label());
    warn!(
        namespace = %ftj.namespace().unwrap_or_default(),
        finetunejob = %ftj.name_any(),
        error = %error,
        "reconcile failed"
    );
    match error {
        Error::Build(_) => Action::requeue(Duration::from_secs(300)),
        Error::Apply(_) | Error::Read { .. } | Error::WriteStatus(_) => {
            Action::requeue(Duration::from_secs(5))
        }
    }
}
