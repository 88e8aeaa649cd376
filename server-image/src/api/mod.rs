//! The HTTP surface: OpenAI endpoints, the admin API, health and metrics.

mod admin;
mod chat;
mod error;
mod openai;
mod request;
mod response;

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

pub use admin::{AdminAuth, AssignError, Assignments, Reviewer, assign};
use axum::{
    Router,
    extract::{MatchedPath, Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
pub use error::ApiError;

use crate::{adapters::Registry, metrics::Metrics, model::BaseModel, scheduler::Scheduler};

/// Everything a handler may need.
#[derive(Debug)]
pub struct AppState {
    pub model: Arc<BaseModel>,
    pub registry: Arc<Registry>,
    pub scheduler: Scheduler,
    pub metrics: Arc<Metrics>,
    /// Who may call the admin API.
    pub admin: AdminAuth,
    /// Who assigned each adapter name, at which generation.
    pub assignments: Assignments,
    pub ready: AtomicBool,
    pub started_at: u64,
    ids: AtomicU64,
}

impl AppState {
    pub fn new(
        model: Arc<BaseModel>,
        registry: Arc<Registry>,
        scheduler: Scheduler,
        metrics: Arc<Metrics>,
        admin: AdminAuth,
    ) -> Self {
        Self {
            model,
            registry,
            scheduler,
            metrics,
            admin,
            assignments: Assignments::starting(),
            ready: AtomicBool::new(false),
            started_at: unix_now(),
            ids: AtomicU64::new(0),
        }
    }

    fn next_id(&self) -> u64 {
        self.ids
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}

/// The public API; with `with_admin`, the admin API too (when it has no port of its own).
pub fn router(state: Arc<AppState>, with_admin: bool) -> Router {
    let public = Router::new()
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(openai::models));
    let routes = if with_admin {
        public.merge(admin_routes())
    } else {
        public
    };
    with_common(routes, state)
}

/// The admin API alone, for a port of its own (health endpoints included, for probes).
pub fn admin_router(state: Arc<AppState>) -> Router {
    with_common(admin_routes(), state)
}

fn admin_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/admin/adapters/{name}",
            put(admin::put_adapter).delete(admin::delete_adapter),
        )
        .route("/admin/adapters", get(admin::list_adapters))
        .route("/admin/info", get(admin::info))
}

fn with_common(routes: Router<Arc<AppState>>, state: Arc<AppState>) -> Router {
    routes
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.ready.load(Ordering::Relaxed) {
        "ready".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "loading adapters").into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// Counts every response by route template (not the raw path: adapter names would make
/// one series each) and status.
async fn count(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    state.metrics.request(&endpoint, response.status().as_u16());
    response
}

/// Seconds since the Unix epoch, as OpenAI's `created` fields hold.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}
