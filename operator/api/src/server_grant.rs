use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{DNS_LABEL_PATTERN, NAME_PATTERN};

/// Admits AdapterDeployments of other namespaces to the graft-server Deployments of this
/// namespace, in the pattern of Gateway API's ReferenceGrant: the owner of the servers writes
/// it, in the servers' namespace; a team's AdapterDeployment naming a server elsewhere is
/// served only while a grant there lists the team's namespace. Deleting the grant unloads the
/// team's adapters from those servers.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "graft.dev",
    version = "v1alpha1",
    kind = "ServerGrant",
    plural = "servergrants",
    shortname = "sg",
    category = "graft",
    namespaced,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ServerGrantSpec {
    /// Who may refer to the servers: AdapterDeployments in these namespaces.
    #[schemars(length(min = 1, max = 64))]
    pub from: Vec<GrantFrom>,
    /// Which servers they may refer to: Deployments of this namespace, by name; an entry
    /// without a name admits every server here.
    #[schemars(length(min = 1, max = 64))]
    pub to: Vec<GrantTo>,
}

/// A kind of referring object, in a namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrantFrom {
    /// API group of the referring kind.
    #[serde(default = "graft_group")]
    #[schemars(extend("enum" = ["graft.dev"]))]
    pub group: String,
    /// The referring kind.
    #[serde(default = "adapter_deployment_kind")]
    #[schemars(extend("enum" = ["AdapterDeployment"]))]
    pub kind: String,
    /// The namespace of the referring objects.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub namespace: String,
}

/// A kind of object that may be referred to, optionally by name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrantTo {
    /// API group of the referred kind.
    #[serde(default = "apps_group")]
    #[schemars(extend("enum" = ["apps"]))]
    pub group: String,
    /// The referred kind: a graft-server Deployment.
    #[serde(default = "deployment_kind")]
    #[schemars(extend("enum" = ["Deployment"]))]
    pub kind: String,
    /// The Deployment's name; every graft-server Deployment of this namespace when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub name: Option<String>,
}

fn graft_group() -> String {
    crate::GROUP.to_owned()
}
fn adapter_deployment_kind() -> String {
    "AdapterDeployment".to_owned()
}
fn apps_group() -> String {
    "apps".to_owned()
}
fn deployment_kind() -> String {
    "Deployment".to_owned()
}

impl ServerGrant {
    /// Whether this grant lets AdapterDeployments of `namespace` use the server `server` of
    /// the grant's own namespace.
    pub fn admits(&self, namespace: &str, server: &str) -> bool {
        self.spec
            .from
            .iter()
            .any(|f| f.kind == "AdapterDeployment" && f.namespace == namespace)
            && self
                .spec
                .to
                .iter()
                .any(|t| t.kind == "Deployment" && t.name.as_deref().is_none_or(|n| n == server))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(yaml: &str) -> ServerGrant {
        serde_yaml::from_str(yaml).expect("a ServerGrant")
    }

    #[test]
    fn a_grant_admits_its_namespaces_to_its_servers_only() {
        let named = grant(
            "apiVersion: graft.dev/v1alpha1\nkind: ServerGrant\nmetadata: {name: g, namespace: serving}\n\
             spec: {from: [{namespace: team-a}], to: [{name: llama}]}",
        );
        assert!(named.admits("team-a", "llama"));
        assert!(!named.admits("team-b", "llama"));
        assert!(!named.admits("team-a", "qwen"));
        let every = grant(
            "apiVersion: graft.dev/v1alpha1\nkind: ServerGrant\nmetadata: {name: g, namespace: serving}\n\
             spec: {from: [{namespace: team-a}], to: [{}]}",
        );
        assert!(every.admits("team-a", "qwen"));
        assert_eq!(every.spec.from[0].group, "graft.dev");
        assert_eq!(every.spec.to[0].kind, "Deployment");
    }
}
