//! The server an AdapterDeployment names: its Deployment, its pods' admin endpoints, and
//! whether a ServerGrant admits a deployment from another namespace to it.

use graft_api::{AdapterDeployment, ServerGrant};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod};
use kube::{Api, Client, ResourceExt, api::ListParams};

use super::{admin::Endpoint, controller::Error};

/// The label on a server Deployment's pods naming the Deployment (the chart sets it).
pub const SERVER_LABEL: &str = "graft.dev/server";
/// The admin API's port, on a server Deployment (or, winning, on a pod).
pub const ADMIN_PORT_ANNOTATION: &str = "graft.dev/admin-port";
/// `https` when the admin API serves TLS, on a server Deployment (or, winning, on a pod).
pub const ADMIN_SCHEME_ANNOTATION: &str = "graft.dev/admin-scheme";
const DEFAULT_ADMIN_PORT: u16 = 8000;

/// How a server's pods are reached: the admin port and scheme its Deployment announces.
#[derive(Clone, Debug)]
pub struct Reach {
    port: u16,
    tls: bool,
    /// `<server>.<namespace>.svc`: the name a TLS certificate is checked against.
    service: String,
}

impl Reach {
    pub fn of(deployment: &Deployment) -> Self {
        let annotations = deployment.annotations();
        Self {
            port: annotations
                .get(ADMIN_PORT_ANNOTATION)
                .and_then(|p| p.parse().ok())
                .unwrap_or(DEFAULT_ADMIN_PORT),
            tls: annotations
                .get(ADMIN_SCHEME_ANNOTATION)
                .is_some_and(|s| s == "https"),
            service: format!(
                "{}.{}.svc",
                deployment.name_any(),
                deployment.namespace().unwrap_or_default()
            ),
        }
    }
}

/// A server Deployment and the pods the operator can reach.
#[derive(Debug)]
pub struct Server {
    pub namespace: String,
    pub deployment: Deployment,
    /// Ready pods: the ones a rollout goes to.
    pub ready: Vec<Endpoint>,
    /// Every pod with an address, ready or not (starting, failing its probe): the ones an
    /// unload must reach.
    pub addressed: Vec<Endpoint>,
}

/// The server `ad` names, or `None` when its Deployment does not exist.
pub async fn find(client: &Client, ad: &AdapterDeployment) -> Result<Option<Server>, Error> {
    let namespace = ad.server_namespace().unwrap_or_default().to_owned();
    let name = &ad.spec.server.name;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let Some(deployment) = deployments
        .get_opt(name)
        .await
        .map_err(|source| Error::Read {
            what: format!("Deployment {namespace}/{name}"),
            source,
        })?
    else {
        return Ok(None);
    };
    let reach = Reach::of(&deployment);
    let pods = pods_of(client, &namespace, name).await?;
    let ready = pods
        .iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none() && is_ready(pod))
        .filter_map(|pod| endpoint(pod, &reach))
        .collect();
    let addressed = pods
        .iter()
        .filter_map(|pod| endpoint(pod, &reach))
        .collect();
    Ok(Some(Server {
        namespace,
        deployment,
        ready,
        addressed,
    }))
}

/// Every pod labelled as one of `server`'s.
pub async fn pods_of(client: &Client, namespace: &str, server: &str) -> Result<Vec<Pod>, Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    Ok(pods
        .list(&ListParams::default().labels(&format!("{SERVER_LABEL}={server}")))
        .await
        .map_err(|source| Error::Read {
            what: format!("the pods of {namespace}/{server}"),
            source,
        })?
        .items)
}

/// A pod's admin endpoint, once it has an address. A pod without one has started no
/// container, so it serves nothing yet.
pub fn endpoint(pod: &Pod, reach: &Reach) -> Option<Endpoint> {
    let ip = pod.status.as_ref()?.pod_ip.clone()?;
    let annotations = pod.annotations();
    let port = annotations
        .get(ADMIN_PORT_ANNOTATION)
        .and_then(|p| p.parse().ok())
        .unwrap_or(reach.port);
    let tls = annotations
        .get(ADMIN_SCHEME_ANNOTATION)
        .map_or(reach.tls, |s| s == "https");
    if tls {
        let address = std::net::SocketAddr::new(ip.parse().ok()?, port);
        return Some(Endpoint {
            pod: pod.name_any(),
            base: format!("https://{}:{port}", reach.service),
            address: Some((reach.service.clone(), address)),
        });
    }
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip
    };
    Some(Endpoint {
        pod: pod.name_any(),
        base: format!("http://{host}:{port}"),
        address: None,
    })
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Whether `ad` may use its server: always in its own namespace; in another only while a
/// ServerGrant there admits `ad`'s namespace to the server.
pub async fn permitted(client: &Client, ad: &AdapterDeployment) -> Result<bool, Error> {
    let own = ad.namespace().unwrap_or_default();
    let Some(target) = ad.server_namespace() else {
        return Ok(false);
    };
    if target == own {
        return Ok(true);
    }
    let grants: Api<ServerGrant> = Api::namespaced(client.clone(), target);
    let list = match grants.list(&ListParams::default()).await {
        Ok(list) => list,
        // A namespace this operator may not look into (namespaced Roles elsewhere): none of
        // its servers is this operator's to roll out to.
        Err(kube::Error::Api(status)) if status.code == 403 => return Ok(false),
        Err(source) => {
            return Err(Error::Read {
                what: format!("the ServerGrants of {target}"),
                source,
            });
        }
    };
    Ok(list
        .items
        .iter()
        .any(|g| g.admits(&own, &ad.spec.server.name)))
}
