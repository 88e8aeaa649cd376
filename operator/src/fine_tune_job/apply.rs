//! Server-side apply of a FineTuneJob's children under the operator's field manager, and the
//! check that runs before it: no child may take over an object someone else made.

use std::fmt::Debug;

use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        batch::v1::Job,
        core::v1::{ConfigMap, ServiceAccount},
        rbac::v1::{Role, RoleBinding},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams},
    core::PartialObjectMeta,
};
use serde::{Serialize, de::DeserializeOwned};

use super::Children;
use crate::FIELD_MANAGER;

#[derive(Debug, thiserror::Error)]
#[error("applying {kind} {name}: {source}")]
pub struct ApplyError {
    kind: String,
    name: String,
    #[source]
    source: kube::Error,
}

impl ApplyError {
    /// The apiserver refused the object itself (400 bad request, 403 forbidden — e.g. by a
    /// quota —, 422 invalid), as opposed to a conflict or an outage worth retrying.
    pub fn is_refusal(&self) -> bool {
        matches!(&self.source, kube::Error::Api(s) if matches!(s.code, 400 | 403 | 422))
    }
}

/// A child's name that an object not controlled by the FineTuneJob `owner_uid` already holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Taken {
    pub kind: String,
    pub name: String,
}

/// The first child but the Job whose name is held by an object this FineTuneJob does not
/// control. Applying over it would rewrite someone else's object, make it the job's, and have
/// the garbage collector delete it with the job. (The reconciler reads the Job itself, as late
/// as it can before applying it.)
pub async fn taken_name(
    client: &Client,
    children: &Children,
    owner_uid: &str,
) -> Result<Option<Taken>, kube::Error> {
    if let Some(taken) = check(client, &children.service_account, owner_uid).await? {
        return Ok(Some(taken));
    }
    if let Some(taken) = check(client, &children.role, owner_uid).await? {
        return Ok(Some(taken));
    }
    if let Some(taken) = check(client, &children.role_binding, owner_uid).await? {
        return Ok(Some(taken));
    }
    match &children.config {
        Some(config) => check(client, config, owner_uid).await,
        None => Ok(None),
    }
}

async fn check<K>(
    client: &Client,
    object: &K,
    owner_uid: &str,
) -> Result<Option<Taken>, kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + DeserializeOwned
        + Clone
        + Debug,
{
    let name = object.meta().name.as_deref().unwrap_or_default();
    let namespace = object.meta().namespace.as_deref().unwrap_or_default();
    // Metadata only: the operator never needs more to decide whose an object is.
    let existing: Option<PartialObjectMeta<K>> = Api::<K>::namespaced(client.clone(), namespace)
        .get_metadata_opt(name)
        .await?;
    Ok(existing
        .filter(|m| !controlled_by(&m.metadata, owner_uid))
        .map(|_| Taken {
            kind: K::kind(&()).into_owned(),
            name: name.to_owned(),
        }))
}

/// Whether `meta` names `owner_uid` as its controller.
pub fn controlled_by(meta: &ObjectMeta, owner_uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|r| r.controller == Some(true) && r.uid == owner_uid)
}

/// Applies every child and returns the Job as the apiserver has it. Idempotent: applying the
/// same children again changes nothing, and applying changed ones updates only the fields the
/// operator owns.
pub async fn apply_children(client: &Client, children: &Children) -> Result<Job, ApplyError> {
    // Identity and config first, so the Job's pod never starts without them.
    apply::<ServiceAccount>(client, &children.service_account).await?;
    apply::<Role>(client, &children.role).await?;
    apply::<RoleBinding>(client, &children.role_binding).await?;
    if let Some(config) = &children.config {
        apply::<ConfigMap>(client, config).await?;
    }
    apply(client, &children.job).await
}

async fn apply<K>(client: &Client, object: &K) -> Result<K, ApplyError>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let error = |source| ApplyError {
        kind: K::kind(&()).into_owned(),
        name: object.meta().name.clone().unwrap_or_default(),
        source,
    };
    let name = object.meta().name.as_deref().unwrap_or_default();
    let namespace = object.meta().namespace.as_deref().unwrap_or_default();
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    // `force`: `taken_name` made sure these objects are the job's own, so a conflict can only
    // come from someone editing them by hand, and the spec must win.
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(name, &params, &Patch::Apply(object))
        .await
        .map_err(error)
}
