//! The AdapterDeployment reconciler: `servers` (the Deployment, its pods, the grant) →
//! `resolve` (versions → URIs and digests) → `policy` (the namespace's allowed sources) →
//! `rollout` (through each pod's admin API, `admin`; recorded in `config_map`) → `status`
//! (pure); `cleanup` unloads on delete and sweeps what no deployment owns. `controller` wires
//! them together.

mod admin;
mod cleanup;
mod config_map;
mod controller;
mod policy;
mod resolve;
mod rollout;
mod servers;
mod status;

use std::{sync::Arc, time::Duration};

pub use controller::{Context, Error, FINALIZER, Settings, controller};
pub use policy::SourcePolicy;
pub use servers::{ADMIN_PORT_ANNOTATION, ADMIN_SCHEME_ANNOTATION, SERVER_LABEL};
use tracing::warn;

/// The per-server sweep, every re-check interval until `shutdown`: unloads adapter names no
/// AdapterDeployment owns from the servers' pods.
pub async fn sweeper(ctx: Arc<Context>, shutdown: impl Future<Output = ()>) {
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(ctx.settings.recheck.max(Duration::from_secs(1))) => {}
        }
        if let Err(e) = cleanup::sweep(&ctx).await {
            warn!(error = %e, "sweeping the servers");
        }
    }
}
