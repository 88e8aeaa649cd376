//! The server's `<deployment>-graft-adapters` ConfigMap: one key per adapter name
//! (`<adapterName>.json`), each owned by the AdapterDeployment that assigns it. Pods that start
//! later load what it lists before they turn ready.

use std::collections::BTreeSet;

use graft_api::{AdapterAssignment, AdapterDeployment};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
};
use serde_json::json;

use super::{
    controller::Error,
    servers::{SERVER_LABEL, Server},
};
use crate::FIELD_MANAGER;

pub fn name_for(server: &str) -> String {
    format!("{server}-graft-adapters")
}

/// Server-side apply of `ad`'s key under a field manager of its own: each AdapterDeployment
/// owns its key, so writers never overwrite each other, and applying without the key
/// (`None`) removes it.
pub async fn record(
    client: &Client,
    ad: &AdapterDeployment,
    server: &Server,
    desired: Option<&AdapterAssignment>,
) -> Result<(), Error> {
    let deployment = &server.deployment;
    let name = name_for(&deployment.name_any());
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
            "namespace": server.namespace,
            "labels": {SERVER_LABEL: deployment.name_any()},
            "ownerReferences": owner.into_iter().collect::<Vec<_>>(),
        },
        "data": data,
    });
    let manager = format!("{FIELD_MANAGER}/{}", ad.uid().unwrap_or_default());
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &server.namespace);
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

/// The adapter names the server's ConfigMap assigns.
pub async fn recorded_names(
    client: &Client,
    namespace: &str,
    server: &str,
) -> Result<BTreeSet<String>, Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let cm = api
        .get_opt(&name_for(server))
        .await
        .map_err(|source| Error::Read {
            what: format!("ConfigMap {namespace}/{}", name_for(server)),
            source,
        })?;
    Ok(cm
        .and_then(|cm| cm.data)
        .unwrap_or_default()
        .keys()
        .filter_map(|k| k.strip_suffix(".json").map(str::to_owned))
        .collect())
}
