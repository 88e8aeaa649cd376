//! The AdapterDeployment controller: resolve the versions → check them against the server →
//! record them in the server's adapters ConfigMap → roll them out to every ready pod through
//! the admin API → verify → status. Reconciled on every change of the AdapterDeployment, its
//! server's pods and its FineTuneJobs, and re-checked periodically to repair drift (a pod
//! restarted, an adapter removed behind the operator's back).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::{Stream, StreamExt};
use graft_api::{AdapterAssignment, AdapterDeployment, AdapterDeploymentStatus, FineTuneJob};
use graft_engine::storage::S3Options;
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, ObjectReference, Pod, Secret},
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
        finalizer::{self, finalizer},
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use serde_json::json;
use tracing::{Instrument, info, info_span, warn};

use super::{
    admin::{AdminClient, Endpoint},
    compat, resolve, rollout,
    status::{Outcome, status},
};
use crate::{FIELD_MANAGER, conditions, metrics::Metrics, scoped};

const CONTROLLER: &str = "adapterdeployment";
/// The finalizer that unloads the adapter from the servers before the object goes.
pub const FINALIZER: &str = "graft.dev/unload-adapter";
/// The label on a server Deployment's pods naming the Deployment (the chart sets it).
pub const SERVER_LABEL: &str = "graft.dev/server";
/// Annotations on a server Deployment: the Secret holding the admin token (key `token`) and
/// the admin API's port; the pod annotation wins for the port.
pub const TOKEN_SECRET_ANNOTATION: &str = "graft.dev/admin-token-secret";
pub const ADMIN_PORT_ANNOTATION: &str = "graft.dev/admin-port";
const DEFAULT_ADMIN_PORT: u16 = 8000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {what}: {source}")]
    Read {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing {what}: {source}")]
    Write {
        what: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("the admin token: {0}")]
    Token(String),
    #[error(transparent)]
    Finalizer(#[from] Box<finalizer::Error<Error>>),
}

impl Error {
    fn label(&self) -> &'static str {
        match self {
            Self::Read { .. } => "read",
            Self::Write { .. } => "write",
            Self::Token(_) => "token",
            Self::Finalizer(_) => "finalizer",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub namespace: Option<String>,
    /// How often every AdapterDeployment is checked against its servers.
    pub recheck: Duration,
    /// Credentials and endpoint for reading adapter manifests.
    pub s3: S3Options,
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

/// Builds the controller; the caller drives the stream (while leading).
pub fn controller(
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> impl Stream<Item = ()> {
    let client = &ctx.client;
    let namespace = ctx.settings.namespace.as_deref();
    let ads: Api<AdapterDeployment> = scoped(client, namespace);
    let pods: Api<Pod> = scoped(client, namespace);
    let jobs: Api<FineTuneJob> = scoped(client, namespace);
    let controller = Controller::new(ads, watcher::Config::default());
    let store = controller.store();
    let (by_server, by_job) = (store.clone(), store);
    controller
        // A pod that starts, restarts or turns ready: roll the adapters out to it.
        .watches(
            pods,
            watcher::Config::default().labels(SERVER_LABEL),
            move |pod: Pod| {
                let (Some(server), Some(namespace)) =
                    (pod.labels().get(SERVER_LABEL).cloned(), pod.namespace())
                else {
                    return Vec::new();
                };
                targeting(&by_server, &namespace, |ad| ad.spec.server.name == server)
            },
        )
        // A FineTuneJob that finishes: its adapter can be rolled out.
        .watches(jobs, watcher::Config::default(), move |job: FineTuneJob| {
            let (name, Some(namespace)) = (job.name_any(), job.namespace()) else {
                return Vec::new();
            };
            targeting(&by_job, &namespace, |ad| {
                ad.spec.versions.iter().any(|v| {
                    v.source
                        .fine_tune_job_ref
                        .as_ref()
                        .is_some_and(|r| r.name == name)
                })
            })
        })
        .with_config(controller::Config::default().concurrency(8))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .map(|result| {
            if let Err(e) = result {
                warn!(error = %e, "controller");
            }
        })
}

fn targeting(
    store: &Store<AdapterDeployment>,
    namespace: &str,
    matches: impl Fn(&AdapterDeployment) -> bool,
) -> Vec<ObjectRef<AdapterDeployment>> {
    store
        .state()
        .iter()
        .filter(|ad| ad.namespace().as_deref() == Some(namespace) && matches(ad))
        .map(|ad| ObjectRef::from_obj(ad.as_ref()))
        .collect()
}

async fn reconcile(ad: Arc<AdapterDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = ad.namespace().unwrap_or_default();
    let span = info_span!("reconcile", namespace = %namespace, adapterdeployment = %ad.name_any());
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let api: Api<AdapterDeployment> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, ad, |event| async {
        match event {
            // Boxed: a rollout's future (every pod's calls at once) is large.
            finalizer::Event::Apply(ad) => Box::pin(apply(&ad, &ctx)).await,
            finalizer::Event::Cleanup(ad) => cleanup(&ad, &ctx).await,
        }
    })
    .instrument(span)
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// The servers a deployment rolls out to: the Deployment, its ready pods' admin endpoints
/// and an admin client with the token.
struct Servers {
    deployment: Deployment,
    pods: Vec<Endpoint>,
    /// The admin client, or why there is none (no Secret, no `token` key).
    client: Result<AdminClient, String>,
}

async fn apply(ad: &AdapterDeployment, ctx: &Context) -> Result<Action, Error> {
    let recheck = Action::requeue(ctx.settings.recheck);
    let outcome = match plan(ad, ctx).await? {
        Err(outcome) => outcome,
        Ok((servers, desired)) => {
            let client = servers.client.clone().map_err(Error::Token)?;
            let name = &ad.spec.adapter_name;
            let staged = rollout::stage(&client, &servers.pods, name, &desired).await;
            // Recorded for pods that start later only once no running pod refused it.
            if staged.refused().is_none() {
                record_in_config_map(ctx, ad, &servers.deployment, Some(&desired)).await?;
            }
            let rollout = rollout::finish(&client, &servers.pods, name, &desired, staged).await;
            Outcome::Rolled {
                desired: desired_replicas(&servers.deployment),
                pods: servers.pods.len(),
                versions: desired.versions,
                rollout,
            }
        }
    };
    let next = status(ad, &outcome, Timestamp::now());
    ctx.metrics.set_adapter_deployment_phase(
        &ad.namespace().unwrap_or_default(),
        &ad.name_any(),
        next.phase,
    );
    // Rolling out or repairing: look again soon. Ready, or waiting on something a watch
    // reports (a job, a spec change): at the re-check interval.
    // A conflict ends when the other deployment is gone, which no watch of this one reports.
    let conflict = next
        .conditions
        .iter()
        .any(|c| c.type_ == conditions::READY && c.reason == conditions::CONFLICT);
    let busy = conflict
        || matches!(
            next.phase,
            Some(
                graft_api::AdapterDeploymentPhase::Loading
                    | graft_api::AdapterDeploymentPhase::Degraded
            )
        );
    if ad.status.as_ref() != Some(&next) {
        publish(ctx, ad, ad.status.as_ref(), &next).await;
        write_status(ctx, ad, &next).await?;
    }
    // Until everything is verified, look again soon; then at the re-check interval.
    Ok(if busy {
        Action::requeue(Duration::from_secs(2).min(ctx.settings.recheck))
    } else {
        recheck
    })
}

/// What to roll out where, or the outcome that stops it.
async fn plan(
    ad: &AdapterDeployment,
    ctx: &Context,
) -> Result<Result<(Servers, AdapterAssignment), Outcome>, Error> {
    let namespace = ad.namespace().unwrap_or_default();
    if let Some(owner) = conflicting_owner(ad, ctx, &namespace).await? {
        return Ok(Err(Outcome::Failed {
            reason: conditions::CONFLICT,
            message: format!(
                "AdapterDeployment {owner} already serves adapterName {:?} on server {}",
                ad.spec.adapter_name, ad.spec.server.name
            ),
        }));
    }
    let jobs = referenced_jobs(ad, ctx, &namespace).await?;
    let versions = match resolve::resolve(ad, |name| jobs.get(name).cloned()) {
        Ok(versions) => versions,
        Err(resolve::Unresolved::Waiting { why, .. }) => {
            return Ok(Err(Outcome::Waiting {
                reason: conditions::WAITING_FOR_FINE_TUNE_JOB,
                message: why,
            }));
        }
        Err(resolve::Unresolved::JobFailed { why, .. }) => {
            return Ok(Err(Outcome::Failed {
                reason: conditions::FINE_TUNE_JOB_FAILED,
                message: why,
            }));
        }
    };
    let Some(servers) = servers(ad, ctx, &namespace).await? else {
        return Ok(Err(Outcome::Waiting {
            reason: conditions::SERVER_NOT_FOUND,
            message: format!(
                "Deployment {} does not exist in {namespace}",
                ad.spec.server.name
            ),
        }));
    };
    // Checked against a live server before anything is loaded; with no pod ready, the pods
    // check each adapter themselves when they start.
    if let (Some(first), Ok(client)) = (servers.pods.first(), &servers.client) {
        match client.info(first).await {
            Ok(info) => {
                for version in &versions {
                    let reason = match compat::read_manifest(version, &ctx.settings.s3).await {
                        Ok((config, graft_json)) => {
                            compat::incompatibility(&config, graft_json.as_deref(), &info)
                        }
                        Err(e @ compat::ManifestError::Missing(_)) => Some(e.to_string()),
                        Err(e @ compat::ManifestError::Unavailable(_)) => {
                            warn!(error = %e, "checking the adapter here; the servers check it as they load it");
                            None
                        }
                    };
                    if let Some(reason) = reason {
                        return Ok(Err(Outcome::Failed {
                            reason: conditions::INCOMPATIBLE,
                            message: format!("{}: {reason}", version.uri),
                        }));
                    }
                }
            }
            Err(e) => warn!(error = %e, "reading the server's admin info"),
        }
    }
    Ok(Ok((servers, AdapterAssignment { versions })))
}

/// Another AdapterDeployment that claimed the same adapter name on the same server first. One
/// being deleted still counts until its cleanup has unloaded the name, so a successor never
/// loads it just before that cleanup removes it.
async fn conflicting_owner(
    ad: &AdapterDeployment,
    ctx: &Context,
    namespace: &str,
) -> Result<Option<String>, Error> {
    let api: Api<AdapterDeployment> = Api::namespaced(ctx.client.clone(), namespace);
    let all = api
        .list(&ListParams::default())
        .await
        .map_err(|source| Error::Read {
            what: "AdapterDeployments".to_owned(),
            source,
        })?;
    let key = |a: &AdapterDeployment| {
        (
            a.metadata.creation_timestamp.clone().map(|t| t.0),
            a.name_any(),
        )
    };
    Ok(all
        .items
        .iter()
        .filter(|other| {
            other.uid() != ad.uid()
                && other.spec.server.name == ad.spec.server.name
                && other.spec.adapter_name == ad.spec.adapter_name
                && key(other) < key(ad)
        })
        .map(ResourceExt::name_any)
        .next())
}

async fn referenced_jobs(
    ad: &AdapterDeployment,
    ctx: &Context,
    namespace: &str,
) -> Result<BTreeMap<String, FineTuneJob>, Error> {
    let api: Api<FineTuneJob> = Api::namespaced(ctx.client.clone(), namespace);
    let mut jobs = BTreeMap::new();
    for version in &ad.spec.versions {
        let Some(reference) = &version.source.fine_tune_job_ref else {
            continue;
        };
        let job = api
            .get_opt(&reference.name)
            .await
            .map_err(|source| Error::Read {
                what: format!("FineTuneJob {}", reference.name),
                source,
            })?;
        if let Some(job) = job {
            jobs.insert(reference.name.clone(), job);
        }
    }
    Ok(jobs)
}

async fn servers(
    ad: &AdapterDeployment,
    ctx: &Context,
    namespace: &str,
) -> Result<Option<Servers>, Error> {
    let name = &ad.spec.server.name;
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(deployment) = deployments
        .get_opt(name)
        .await
        .map_err(|source| Error::Read {
            what: format!("Deployment {name}"),
            source,
        })?
    else {
        return Ok(None);
    };
    let annotations = deployment.annotations();
    let port: u16 = annotations
        .get(ADMIN_PORT_ANNOTATION)
        .and_then(|p| p.parse().ok())
        .unwrap_or(DEFAULT_ADMIN_PORT);
    let secret_name = annotations
        .get(TOKEN_SECRET_ANNOTATION)
        .cloned()
        .unwrap_or_else(|| format!("{name}-admin-token"));
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let token = secrets
        .get_opt(&secret_name)
        .await
        .map_err(|source| Error::Read {
            what: format!("Secret {secret_name}"),
            source,
        })?
        .ok_or_else(|| format!("Secret {secret_name} does not exist"))
        .and_then(|secret| {
            secret
                .data
                .as_ref()
                .and_then(|d| d.get("token"))
                .map(|b| String::from_utf8_lossy(&b.0).trim().to_owned())
                .filter(|t| !t.is_empty())
                .ok_or_else(|| format!("Secret {secret_name} has no non-empty key \"token\""))
        });

    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let listed = pods
        .list(&ListParams::default().labels(&format!("{SERVER_LABEL}={name}")))
        .await
        .map_err(|source| Error::Read {
            what: format!("the pods of {name}"),
            source,
        })?;
    let pods = listed
        .items
        .iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none() && is_ready(pod))
        .filter_map(|pod| {
            let ip = pod.status.as_ref()?.pod_ip.clone()?;
            let port = pod
                .annotations()
                .get(ADMIN_PORT_ANNOTATION)
                .and_then(|p| p.parse().ok())
                .unwrap_or(port);
            let host = if ip.contains(':') {
                format!("[{ip}]")
            } else {
                ip
            };
            Some(Endpoint {
                pod: pod.name_any(),
                base: format!("http://{host}:{port}"),
            })
        })
        .collect();
    Ok(Some(Servers {
        deployment,
        pods,
        client: token.map(AdminClient::new),
    }))
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn desired_replicas(deployment: &Deployment) -> u32 {
    let replicas = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    u32::try_from(replicas).unwrap_or(0)
}

/// Server-side apply of this deployment's key (`<adapterName>.json`) in the server's
/// `<deployment>-graft-adapters` ConfigMap, under a field manager of its own: each
/// AdapterDeployment owns its key, so writers never overwrite each other, and applying
/// without the key (`None`) removes it.
async fn record_in_config_map(
    ctx: &Context,
    ad: &AdapterDeployment,
    deployment: &Deployment,
    desired: Option<&AdapterAssignment>,
) -> Result<(), Error> {
    let namespace = ad.namespace().unwrap_or_default();
    let name = format!("{}-graft-adapters", deployment.name_any());
    let mut data = serde_json::Map::new();
    if let Some(desired) = desired {
        data.insert(
            format!("{}.json", ad.spec.adapter_name),
            json!(serde_json::to_string(desired).unwrap_or_default()),
        );
    }
    let owner = deployment.controller_owner_ref(&()).map(|mut r| {
        r.controller = Some(false);
        r.block_owner_deletion = None;
        r
    });
    let patch = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {SERVER_LABEL: deployment.name_any()},
            "ownerReferences": owner.into_iter().collect::<Vec<_>>(),
        },
        "data": data,
    });
    let manager = format!("{FIELD_MANAGER}/{}", ad.uid().unwrap_or_default());
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
    api.patch(
        &name,
        &PatchParams::apply(&manager).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| Error::Write {
        what: "the adapters ConfigMap",
        source,
    })?;
    Ok(())
}

/// Unloads the adapter from every ready server pod and drops its ConfigMap key. A conflicting
/// deployment never loaded anything, and leaves the owner's adapter alone.
async fn cleanup(ad: &AdapterDeployment, ctx: &Context) -> Result<Action, Error> {
    let namespace = ad.namespace().unwrap_or_default();
    if conflicting_owner(ad, ctx, &namespace).await?.is_some() {
        return Ok(Action::await_change());
    }
    if let Some(servers) = servers(ad, ctx, &namespace).await? {
        match &servers.client {
            Ok(client) => {
                let failures = rollout::remove(client, &servers.pods, &ad.spec.adapter_name).await;
                if !failures.is_empty() {
                    warn!(failures = ?failures, "unloading the adapter; pods that restart will not load it");
                }
            }
            Err(e) => {
                warn!(error = %e, "no admin token: the running pods keep the adapter until they restart");
            }
        }
        record_in_config_map(ctx, ad, &servers.deployment, None).await?;
    }
    ctx.metrics
        .set_adapter_deployment_phase(&namespace, &ad.name_any(), None);
    info!("adapter unloaded");
    Ok(Action::await_change())
}

async fn write_status(
    ctx: &Context,
    ad: &AdapterDeployment,
    status: &AdapterDeploymentStatus,
) -> Result<(), Error> {
    let api: Api<AdapterDeployment> =
        Api::namespaced(ctx.client.clone(), &ad.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": AdapterDeployment::api_version(&()),
        "kind": AdapterDeployment::kind(&()),
        "status": status,
    });
    api.patch_status(
        &ad.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| Error::Write {
        what: "the status",
        source,
    })?;
    Ok(())
}

/// An Event when the phase or the Ready condition's reason changes.
async fn publish(
    ctx: &Context,
    ad: &AdapterDeployment,
    before: Option<&AdapterDeploymentStatus>,
    after: &AdapterDeploymentStatus,
) {
    let ready = |s: &AdapterDeploymentStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == conditions::READY)
            .map(|c| (c.reason.clone(), c.message.clone()))
    };
    let (Some(phase), Some((reason, message))) = (after.phase, ready(after)) else {
        return;
    };
    if before.and_then(|s| s.phase) == Some(phase)
        && before.and_then(ready).map(|r| r.0) == Some(reason.clone())
    {
        return;
    }
    let type_ = match phase {
        graft_api::AdapterDeploymentPhase::Failed | graft_api::AdapterDeploymentPhase::Degraded => {
            EventType::Warning
        }
        _ => EventType::Normal,
    };
    info!(phase = ?phase, reason, "{message}");
    let event = Event {
        type_,
        reason,
        note: Some(message),
        action: "Rollout".to_owned(),
        secondary: None,
    };
    let reference: ObjectReference = ad.object_ref(&());
    if let Err(e) = ctx.recorder.publish(&event, &reference).await {
        warn!(error = %e, "publishing an Event");
    }
}

#[allow(clippy::needless_pass_by_value)] // the signature `Controller::run` requires
fn error_policy(ad: Arc<AdapterDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(CONTROLLER, error.label());
    warn!(
        namespace = %ad.namespace().unwrap_or_default(),
        adapterdeployment = %ad.name_any(),
        error = %error,
        "reconcile failed"
    );
    Action::requeue(Duration::from_secs(5))
}
