//! The AdapterDeployment controller: check the claim and the grant → resolve the versions →
//! check them against the namespace's allowed sources → stage them on every ready server pod
//! through the admin API → record them in the server's adapters ConfigMap → swap and verify →
//! status. Reconciled on every change of the AdapterDeployment, its server's pods, the outcome
//! of its FineTuneJobs and the ServerGrants, and re-checked periodically to repair drift (a pod
//! restarted, an adapter removed behind the operator's back).

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{Stream, StreamExt};
use graft_api::{
    AdapterAssignment, AdapterDeployment, AdapterDeploymentPhase, AdapterDeploymentStatus,
    AssignedVersion, FineTuneJob, Owner, ServerGrant,
};
use k8s_openapi::{
    api::core::v1::{ObjectReference, Pod},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    runtime::{
        Controller, PredicateConfig, WatchStreamExt,
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
    admin::{AdminClient, Token},
    cleanup, config_map,
    policy::SourcePolicy,
    resolve, rollout,
    servers::{self, SERVER_LABEL},
    status::{Outcome, status},
};
use crate::{FIELD_MANAGER, conditions, metrics::Metrics, scoped};

const CONTROLLER: &str = "adapterdeployment";
/// The finalizer that unloads the adapter from the servers before the object goes.
pub const FINALIZER: &str = "graft.dev/unload-adapter";

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
    /// Some server pods have not confirmed an unload yet; the finalizer stays.
    #[error("waiting for server pods to unload the adapter: {0}")]
    UnloadPending(String),
    #[error(transparent)]
    Finalizer(#[from] Box<finalizer::Error<Error>>),
}

impl Error {
    fn label(&self) -> &'static str {
        match self {
            Self::Read { .. } => "read",
            Self::Write { .. } => "write",
            Self::UnloadPending(_) => "unload_pending",
            Self::Finalizer(_) => "finalizer",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Settings {
    /// Watch this namespace only; all when `None`.
    pub namespace: Option<String>,
    /// With `namespace` set, the other namespaces whose servers the operator may roll out to.
    pub server_namespaces: Vec<String>,
    /// How often every AdapterDeployment is checked against its servers, and the longest a
    /// rollout under way waits between attempts.
    pub recheck: Duration,
    /// The operator's token for the servers' admin API: its ServiceAccount token projected
    /// with the servers' audience. Read for every reconcile, so a rotated token is picked up.
    pub admin_token_file: PathBuf,
    /// The CAs a TLS admin API's certificate must chain to (PEM), read like the token.
    pub admin_ca_file: Option<PathBuf>,
    /// Which adapter URIs each namespace may load.
    pub sources: SourcePolicy,
    /// How long a deletion waits for server pods that do not answer before it gives up on them.
    pub unload_timeout: Duration,
}

impl Settings {
    /// The scopes pods of servers are watched in: every namespace, or the watched one and the
    /// servers' namespaces.
    pub fn pod_scopes(&self) -> Vec<Option<String>> {
        match &self.namespace {
            None => vec![None],
            Some(ns) => std::iter::once(ns.clone())
                .chain(self.server_namespaces.iter().filter(|s| *s != ns).cloned())
                .map(Some)
                .collect(),
        }
    }
}

pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    http: reqwest::Client,
    /// Versions a server refused, by server (uid and generation of its Deployment) and the
    /// versions' digests: not offered to that server again until either changes.
    refusals: Mutex<HashMap<(String, i64, String), String>>,
    /// Consecutive reconciles of each AdapterDeployment that found it not settled.
    attempts: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        settings: Settings,
        recorder: Recorder,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            client,
            settings,
            recorder,
            metrics,
            http: super::admin::http_client(),
            refusals: Mutex::default(),
            attempts: Mutex::default(),
        }
    }

    /// An admin client with the current token (and CA bundle), or why there is none.
    pub fn admin_client(&self) -> Result<AdminClient, String> {
        let client = AdminClient::new(
            self.http.clone(),
            Token::read(&self.settings.admin_token_file)?,
        );
        match &self.settings.admin_ca_file {
            Some(path) => Ok(client.with_ca(super::admin::read_ca(path)?)),
            None => Ok(client),
        }
    }

    /// How long to wait before looking at `ad` again: at once-ish, then doubling, while it is
    /// rolling out or degraded; the re-check interval once it is settled.
    fn next_look(&self, ad: &AdapterDeployment, settled: bool) -> Duration {
        let key = ad.uid().unwrap_or_default();
        let mut attempts = self
            .attempts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if settled {
            attempts.remove(&key);
            return self.settings.recheck;
        }
        let n = attempts.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        backoff(*n, self.settings.recheck)
    }
}

/// 1 s, 2 s, 4 s… up to `cap`.
fn backoff(attempt: u32, cap: Duration) -> Duration {
    let exponent = attempt.saturating_sub(1).min(16);
    Duration::from_secs(1u64 << exponent).min(cap)
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// What of a FineTuneJob an AdapterDeployment depends on: its outcome, not its progress.
#[allow(clippy::unnecessary_wraps)] // the signature of a predicate
fn job_outcome(job: &FineTuneJob) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let status = job.status.as_ref();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    status
        .and_then(|s| s.phase)
        .map(|p| format!("{p:?}"))
        .hash(&mut hasher);
    status
        .and_then(|s| s.adapter.as_ref())
        .map(|a| (&a.uri, &a.sha256))
        .hash(&mut hasher);
    Some(hasher.finish())
}

/// Builds the controller; the caller drives the stream (while leading).
pub fn controller(
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> impl Stream<Item = ()> {
    let client = &ctx.client;
    let namespace = ctx.settings.namespace.as_deref();
    let ads: Api<AdapterDeployment> = scoped(client, namespace);
    let jobs: Api<FineTuneJob> = scoped(client, namespace);
    let mut controller = Controller::new(ads, watcher::Config::default());
    let store = controller.store();
    // A pod that starts, restarts or turns ready: roll the adapters out to it.
    for scope in ctx.settings.pod_scopes() {
        let pods: Api<Pod> = scoped(client, scope.as_deref());
        let by_server = store.clone();
        controller = controller.watches(
            pods,
            watcher::Config::default().labels(SERVER_LABEL),
            move |pod: Pod| {
                let (Some(server), Some(namespace)) =
                    (pod.labels().get(SERVER_LABEL).cloned(), pod.namespace())
                else {
                    return Vec::new();
                };
                targeting(&by_server, |ad| {
                    ad.spec.server.name == server && ad.server_namespace() == Some(&namespace)
                })
            },
        );
    }
    // A grant made or revoked: the deployments of the namespaces it names, for its servers.
    for scope in ctx.settings.pod_scopes() {
        let grants: Api<ServerGrant> = scoped(client, scope.as_deref());
        let by_grant = store.clone();
        controller = controller.watches(
            grants,
            watcher::Config::default(),
            move |grant: ServerGrant| {
                let namespace = grant.namespace();
                targeting(&by_grant, |ad| {
                    ad.server_namespace() == namespace.as_deref()
                        && grant
                            .spec
                            .from
                            .iter()
                            .any(|f| ad.namespace().as_deref() == Some(&f.namespace))
                })
            },
        );
    }
    // A FineTuneJob whose outcome changes (not its progress, reported every few seconds).
    let outcomes = watcher(jobs, watcher::Config::default())
        .default_backoff()
        .touched_objects()
        .predicate_filter(job_outcome, PredicateConfig::default());
    let by_job = store;
    controller
        .watches_stream(outcomes, move |job: FineTuneJob| {
            let (name, Some(namespace)) = (job.name_any(), job.namespace()) else {
                return Vec::new();
            };
            targeting(&by_job, |ad| {
                ad.namespace().as_deref() == Some(&namespace)
                    && ad.spec.versions.iter().any(|v| {
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
    matches: impl Fn(&AdapterDeployment) -> bool,
) -> Vec<ObjectRef<AdapterDeployment>> {
    store
        .state()
        .iter()
        .filter(|ad| matches(ad))
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
            finalizer::Event::Cleanup(ad) => cleanup::cleanup(&ad, &ctx).await,
        }
    })
    .instrument(span)
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

async fn apply(ad: &AdapterDeployment, ctx: &Context) -> Result<Action, Error> {
    let outcome = match roll(ad, ctx).await {
        Ok(outcome) => outcome,
        Err(error) => {
            // What failed is shown on the object (when the apiserver takes a status at all),
            // then retried with backoff.
            let degraded = Outcome::Degraded {
                reason: conditions::API_ERROR,
                message: error.to_string(),
            };
            let _ = report(ad, ctx, &degraded).await;
            return Err(error);
        }
    };
    let next = report(ad, ctx, &outcome).await?;
    let settled = matches!(
        next.phase,
        Some(AdapterDeploymentPhase::Ready | AdapterDeploymentPhase::Pending)
    ) || (next.phase == Some(AdapterDeploymentPhase::Failed)
        // A conflict ends when the other deployment is gone, which no watch of this one
        // reports: look again soon, with backoff.
        && !next
            .conditions
            .iter()
            .any(|c| c.type_ == conditions::READY && c.reason == conditions::CONFLICT));
    Ok(Action::requeue(ctx.next_look(ad, settled)))
}

/// Writes the status for `outcome` when it changed, with an Event.
async fn report(
    ad: &AdapterDeployment,
    ctx: &Context,
    outcome: &Outcome,
) -> Result<AdapterDeploymentStatus, Error> {
    let next = status(ad, outcome, Timestamp::now());
    ctx.metrics.set_adapter_deployment_phase(
        &ad.namespace().unwrap_or_default(),
        &ad.name_any(),
        next.phase,
    );
    if ad.status.as_ref() != Some(&next) {
        publish(ctx, ad, ad.status.as_ref(), &next).await;
        write_status(ctx, ad, &next).await?;
    }
    Ok(next)
}

/// The versions to roll out, or the outcome that stops them before any server is asked: a
/// claim by another deployment, no grant, a job not done, a source not allowed.
async fn admitted_versions(
    ad: &AdapterDeployment,
    ctx: &Context,
) -> Result<Result<Vec<AssignedVersion>, Outcome>, Error> {
    let client = &ctx.client;
    let own_namespace = ad.namespace().unwrap_or_default();
    let server_namespace = ad.server_namespace().unwrap_or_default().to_owned();
    if let Some(owner) = claimed_by_other(ad, ctx).await? {
        return Ok(Err(Outcome::Failed {
            reason: conditions::CONFLICT,
            message: format!(
                "AdapterDeployment {owner} already serves adapterName {:?} on server {}/{}",
                ad.spec.adapter_name, server_namespace, ad.spec.server.name
            ),
        }));
    }
    if !servers::permitted(client, ad).await? {
        // Revoked (or never granted): nothing of this deployment may stay on those servers.
        cleanup::withdraw(ad, ctx).await?;
        return Ok(Err(Outcome::Failed {
            reason: conditions::REF_NOT_PERMITTED,
            message: format!(
                "no ServerGrant in namespace {server_namespace} admits AdapterDeployments of \
                 namespace {own_namespace} to server {}; its owner must create one",
                ad.spec.server.name
            ),
        }));
    }
    let jobs = referenced_jobs(ad, ctx, &own_namespace).await?;
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
    if let Some(refusal) = versions
        .iter()
        .find_map(|v| ctx.settings.sources.refusal(&own_namespace, &v.uri))
    {
        return Ok(Err(Outcome::Failed {
            reason: conditions::SOURCE_NOT_ALLOWED,
            message: refusal,
        }));
    }
    Ok(Ok(versions))
}

/// Everything up to and including the rollout; the outcome that stops it, or what it did.
async fn roll(ad: &AdapterDeployment, ctx: &Context) -> Result<Outcome, Error> {
    let client = &ctx.client;
    let versions = match admitted_versions(ad, ctx).await? {
        Ok(versions) => versions,
        Err(outcome) => return Ok(outcome),
    };
    let Some(server) = servers::find(client, ad).await? else {
        return Ok(Outcome::Waiting {
            reason: conditions::SERVER_NOT_FOUND,
            message: format!(
                "Deployment {} does not exist in {}",
                ad.spec.server.name,
                ad.server_namespace().unwrap_or_default()
            ),
        });
    };
    let admin = match ctx.admin_client() {
        Ok(admin) => admin,
        Err(why) => {
            return Ok(Outcome::Degraded {
                reason: conditions::ADMIN_CREDENTIALS_UNAVAILABLE,
                message: why,
            });
        }
    };
    let desired = AdapterAssignment {
        versions,
        owner: Some(Owner {
            uid: ad.uid().unwrap_or_default(),
            generation: ad.metadata.generation.unwrap_or_default(),
        }),
    };
    // The servers check every adapter against their model as they load it; a refusal is
    // remembered, so a version that cannot load is not fetched again on every re-check.
    let refusal_key = (
        server.deployment.uid().unwrap_or_default(),
        server.deployment.metadata.generation.unwrap_or_default(),
        desired
            .versions
            .iter()
            .map(|v| v.sha256.as_str())
            .collect::<Vec<_>>()
            .join(","),
    );
    if let Some(refused) = ctx
        .refusals
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&refusal_key)
    {
        return Ok(Outcome::Failed {
            reason: conditions::INCOMPATIBLE,
            message: refused.clone(),
        });
    }
    let name = &ad.spec.adapter_name;
    let staged = rollout::stage(&admin, &server.ready, name, &desired).await;
    match staged.refused() {
        Some(refused) => {
            ctx.refusals
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(refusal_key, refused.to_owned());
        }
        // Recorded for pods that start later only once no running pod refused it.
        None => config_map::record(client, ad, &server, Some(&desired)).await?,
    }
    let rollout = rollout::finish(&admin, &server.ready, name, &desired, staged).await;
    Ok(Outcome::Rolled {
        desired: desired_replicas(&server.deployment),
        pods: server.ready.len(),
        versions: desired.versions,
        rollout,
    })
}

/// Another AdapterDeployment that claimed the same adapter name on the same server first. One
/// being deleted still counts until its cleanup has unloaded the name, so a successor never
/// loads it just before that cleanup removes it.
pub async fn claimed_by_other(
    ad: &AdapterDeployment,
    ctx: &Context,
) -> Result<Option<String>, Error> {
    let all = all_deployments(ctx).await?;
    let key = |a: &AdapterDeployment| {
        (
            a.metadata.creation_timestamp.clone().map(|t| t.0),
            a.namespace(),
            a.name_any(),
        )
    };
    Ok(all
        .iter()
        .filter(|other| {
            other.uid() != ad.uid()
                && other.spec.server.name == ad.spec.server.name
                && other.server_namespace() == ad.server_namespace()
                && other.spec.adapter_name == ad.spec.adapter_name
                && key(other) < key(ad)
        })
        .map(|other| {
            format!(
                "{}/{}",
                other.namespace().unwrap_or_default(),
                other.name_any()
            )
        })
        .next())
}

/// Every AdapterDeployment in the operator's scope, read afresh (not from the watch's cache).
pub async fn all_deployments(ctx: &Context) -> Result<Vec<AdapterDeployment>, Error> {
    let api: Api<AdapterDeployment> = scoped(&ctx.client, ctx.settings.namespace.as_deref());
    Ok(api
        .list(&ListParams::default())
        .await
        .map_err(|source| Error::Read {
            what: "AdapterDeployments".to_owned(),
            source,
        })?
        .items)
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

fn desired_replicas(deployment: &k8s_openapi::api::apps::v1::Deployment) -> u32 {
    let replicas = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    u32::try_from(replicas).unwrap_or(0)
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
        AdapterDeploymentPhase::Failed | AdapterDeploymentPhase::Degraded => EventType::Warning,
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
    let pending = matches!(
        error,
        Error::Finalizer(e) if matches!(**e, finalizer::Error::CleanupFailed(Error::UnloadPending(_)))
    );
    if pending {
        info!(
            namespace = %ad.namespace().unwrap_or_default(),
            adapterdeployment = %ad.name_any(),
            "{error}"
        );
    } else {
        warn!(
            namespace = %ad.namespace().unwrap_or_default(),
            adapterdeployment = %ad.name_any(),
            error = %error,
            "reconcile failed"
        );
    }
    Action::requeue(ctx.next_look(&ad, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_recheck_interval() {
        let cap = Duration::from_secs(30);
        let waits: Vec<u64> = (1..=7).map(|n| backoff(n, cap).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(backoff(u32::MAX, cap), cap);
    }

    #[test]
    fn server_pods_are_watched_where_the_operator_may_find_servers() {
        let mut settings = Settings {
            namespace: None,
            server_namespaces: vec!["serving".to_owned()],
            recheck: Duration::from_secs(30),
            admin_token_file: PathBuf::from("/token"),
            admin_ca_file: None,
            sources: SourcePolicy::default(),
            unload_timeout: Duration::from_secs(60),
        };
        assert_eq!(settings.pod_scopes(), [None]);
        settings.namespace = Some("team-a".to_owned());
        assert_eq!(
            settings.pod_scopes(),
            [Some("team-a".to_owned()), Some("serving".to_owned())]
        );
    }
}
