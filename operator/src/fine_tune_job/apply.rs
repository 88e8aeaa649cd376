//! Server-side apply of a FineTuneJob's children under the operator's field manager.

use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams},
};
use serde::{Serialize, de::DeserializeOwned};

use k8s_openapi::api::batch::v1::Job;

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

/// Applies every child and returns the Job as the apiserver has it. Idempotent: applying the
/// same children again changes nothing, and applying changed ones updates only the fields the
/// operator owns.
pub async fn apply_children(client: &Client, children: &Children) -> Result<Job, ApplyError> {
    // Identity and config first, so the Job's pod never starts without them.
    apply(client, &children.service_account).await?;
    apply(client, &children.role).await?;
    apply(client, &children.role_binding).await?;
    apply(client, &children.config).await?;
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
    // `force`: the operator is the only writer of these objects; a conflict can only come
    // from someone editing them by hand, and the spec must win.
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(name, &params, &Patch::Apply(object))
        .await
        .map_err(error)
}
