//! Guaranteed unloads. Deleting an AdapterDeployment first removes its ConfigMap key (so no pod
//! that starts from then on loads it), then unloads it from every pod of the server that has an
//! address, ready or not; the finalizer stays until every one of them confirmed, or until the
//! unload timeout, with a Warning Event. A per-server sweep unloads names that no
//! AdapterDeployment owns: a pod that started from a stale copy of the ConfigMap, a deletion
//! that timed out, a name loaded by hand.

use std::collections::{BTreeMap, BTreeSet};

use futures::future::join_all;
use graft_api::AdapterDeployment;
use k8s_openapi::{
    api::{apps::v1::Deployment, core::v1::Pod},
    jiff::Timestamp,
};
use kube::{
    Api, Resource, ResourceExt,
    api::ListParams,
    runtime::{
        controller::Action,
        events::{Event, EventType},
    },
};
use tracing::{info, warn};

use super::{
    admin::AdminClient,
    config_map,
    controller::{Context, Error, all_deployments, claimed_by_other},
    rollout,
    servers::{self, SERVER_LABEL},
};
use crate::scoped;

/// The finalizer's cleanup: see the module documentation. Once it lets the finalizer go, the
/// deployment's phase metric goes too.
pub async fn cleanup(ad: &AdapterDeployment, ctx: &Context) -> Result<Action, Error> {
    let action = unload(ad, ctx).await?;
    ctx.metrics.set_adapter_deployment_phase(
        &ad.namespace().unwrap_or_default(),
        &ad.name_any(),
        None,
    );
    Ok(action)
}

async fn unload(ad: &AdapterDeployment, ctx: &Context) -> Result<Action, Error> {
    // A deployment that never got its name loaded nothing, and leaves the owner's alone.
    if claimed_by_other(ad, ctx).await?.is_some() {
        return Ok(Action::await_change());
    }
    let Some(server) = servers::find(&ctx.client, ad).await? else {
        return Ok(Action::await_change());
    };
    config_map::record(&ctx.client, ad, &server, None).await?;
    let name = &ad.spec.adapter_name;
    let pending = match ctx.admin_client() {
        Ok(client) => rollout::remove(&client, &server.addressed, name).await,
        Err(why) => vec![why],
    };
    if pending.is_empty() {
        info!(
            pods = server.addressed.len(),
            "adapter unloaded from every pod"
        );
        return Ok(Action::await_change());
    }
    let since = ad
        .metadata
        .deletion_timestamp
        .as_ref()
        .map_or_else(Timestamp::now, |t| t.0);
    let waited = Timestamp::now().duration_since(since).unsigned_abs();
    if waited < ctx.settings.unload_timeout {
        return Err(Error::UnloadPending(pending.join("; ")));
    }
    let note = format!(
        "gave up unloading {name:?} after {}s; the operator's sweep unloads it once the pods \
         answer: {}",
        ctx.settings.unload_timeout.as_secs(),
        pending.join("; ")
    );
    warn!("{note}");
    let event = Event {
        type_: EventType::Warning,
        reason: "UnloadTimedOut".to_owned(),
        note: Some(note),
        action: "Unload".to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &ad.object_ref(&())).await {
        warn!(error = %e, "publishing an Event");
    }
    Ok(Action::await_change())
}

/// Unloads `ad`'s name from every addressed pod of its server and drops its ConfigMap key,
/// without waiting on pods that do not answer (the sweep reaches them later): for an
/// AdapterDeployment that may no longer use the server.
pub async fn withdraw(ad: &AdapterDeployment, ctx: &Context) -> Result<(), Error> {
    let server = match servers::find(&ctx.client, ad).await {
        Ok(Some(server)) => server,
        // Not there, or in a namespace this operator may not touch: nothing of ours is loaded.
        Ok(None) => return Ok(()),
        Err(Error::Read {
            source: kube::Error::Api(status),
            ..
        }) if status.code == 403 => return Ok(()),
        Err(e) => return Err(e),
    };
    config_map::record(&ctx.client, ad, &server, None).await?;
    if let Ok(client) = ctx.admin_client() {
        let failures = rollout::remove(&client, &server.addressed, &ad.spec.adapter_name).await;
        if !failures.is_empty() {
            warn!(failures = ?failures, "withdrawing the adapter");
        }
    }
    Ok(())
}

/// One pass of the sweep over every server in the operator's scope.
pub async fn sweep(ctx: &Context) -> Result<(), Error> {
    let Ok(admin) = ctx.admin_client() else {
        return Ok(());
    };
    let mut servers: BTreeMap<(String, String), Vec<Pod>> = BTreeMap::new();
    for namespace in ctx.settings.pod_scopes() {
        let pods: kube::Api<Pod> = scoped(&ctx.client, namespace.as_deref());
        let listed = pods
            .list(&ListParams::default().labels(SERVER_LABEL))
            .await
            .map_err(|source| Error::Read {
                what: "server pods".to_owned(),
                source,
            })?;
        for pod in listed.items {
            let (Some(ns), Some(server)) = (pod.namespace(), pod.labels().get(SERVER_LABEL)) else {
                continue;
            };
            servers.entry((ns, server.clone())).or_default().push(pod);
        }
    }
    for ((namespace, server), pods) in servers {
        sweep_server(ctx, &admin, &namespace, &server, &pods).await?;
    }
    Ok(())
}

async fn sweep_server(
    ctx: &Context,
    admin: &AdminClient,
    namespace: &str,
    server: &str,
    pods: &[Pod],
) -> Result<(), Error> {
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(deployment) = deployments
        .get_opt(server)
        .await
        .map_err(|source| Error::Read {
            what: format!("Deployment {namespace}/{server}"),
            source,
        })?
    else {
        return Ok(());
    };
    let reach = servers::Reach::of(&deployment);
    let endpoints: Vec<_> = pods
        .iter()
        .filter_map(|p| servers::endpoint(p, &reach))
        .collect();
    // What the pods serve first, then who owns what: a name loaded by an AdapterDeployment
    // created meanwhile is then sure to show up as owned.
    let listings = join_all(endpoints.iter().map(|e| admin.list(e))).await;
    let loaded: BTreeSet<&String> = listings
        .iter()
        .flatten()
        .flat_map(|l| l.adapters.keys())
        .collect();
    if loaded.is_empty() {
        return Ok(());
    }
    let mut owned = config_map::recorded_names(&ctx.client, namespace, server).await?;
    owned.extend(
        all_deployments(ctx)
            .await?
            .iter()
            .filter(|ad| {
                ad.metadata.deletion_timestamp.is_none()
                    && ad.spec.server.name == server
                    && ad.server_namespace() == Some(namespace)
            })
            .map(|ad| ad.spec.adapter_name.clone()),
    );
    for name in loaded.into_iter().filter(|n| !owned.contains(*n)) {
        let serving: Vec<_> = endpoints
            .iter()
            .zip(&listings)
            .filter(|(_, l)| l.as_ref().is_ok_and(|l| l.adapters.contains_key(name)))
            .map(|(e, _)| e.clone())
            .collect();
        let failures = rollout::remove(admin, &serving, name).await;
        let note = format!(
            "unloaded adapter {name:?}, which no AdapterDeployment owns, from {} pod(s){}",
            serving.len() - failures.len(),
            if failures.is_empty() {
                String::new()
            } else {
                format!("; not reached: {}", failures.join("; "))
            }
        );
        info!(namespace, server, adapter = %name, "{note}");
        let event = Event {
            type_: EventType::Normal,
            reason: "UnloadedOrphan".to_owned(),
            note: Some(note),
            action: "Sweep".to_owned(),
            secondary: None,
        };
        if let Err(e) = ctx
            .recorder
            .publish(&event, &deployment.object_ref(&()))
            .await
        {
            warn!(error = %e, "publishing an Event");
        }
    }
    Ok(())
}
