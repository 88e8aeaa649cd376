//! The operator's HTTP endpoints: `/healthz` (the process serves), `/readyz` (it has reached
//! the apiserver), `/metrics` (Prometheus, OpenMetrics text).

use std::sync::{
    Arc, OnceLock,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use graft_api::FineTuneJob;
use kube::runtime::reflector::Store;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// What the endpoints report on, shared with the rest of the process.
#[derive(Debug)]
pub struct Health {
    ready: AtomicBool,
    metrics: Arc<Metrics>,
    jobs: OnceLock<Store<FineTuneJob>>,
}

impl Health {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            ready: AtomicBool::new(false),
            metrics,
            jobs: OnceLock::new(),
        }
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// The FineTuneJobs the controller sees, once it runs (only on the leader).
    pub fn watch_jobs(&self, store: Store<FineTuneJob>) {
        let _ = self.jobs.set(store);
    }
}

/// Serves until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    if health.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not connected to the apiserver yet",
        )
    }
}

async fn metrics(State(health): State<Arc<Health>>) -> impl IntoResponse {
    if let Some(store) = health.jobs.get() {
        health.metrics.observe_jobs(&store.state());
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        health.metrics.encode(),
    )
}
