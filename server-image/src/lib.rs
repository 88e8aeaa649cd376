//! `graft-server`: one base model, many LoRA adapters mixed in each batch, an OpenAI-compatible
//! HTTP API, and an admin API through which the operator hot-swaps adapter versions.

pub mod adapters;
pub mod api;
pub mod cli;
pub mod constrain;
pub mod detokenize;
pub mod kv_budget;
pub mod metrics;
pub mod model;
pub mod prefix_cache;
pub mod sampling;
pub mod scheduler;
pub mod tool_calls;

mod tls;

use std::{path::Path, sync::Arc};

use graft_api::AdaptersFile;
use tokio::{net::TcpListener, sync::watch};
use tokio_rustls::TlsAcceptor;

use crate::{
    adapters::Registry,
    api::{AdminAuth, AppState, Reviewer},
    cli::Args,
    metrics::Metrics,
    model::BaseModel,
    scheduler::{Limits, Scheduler},
};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Model(#[from] model::LoadError),
    #[error("{what} {}: {source}", path.display())]
    File {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("adapters file {}: {source}", path.display())]
    AdaptersFile {
        path: std::path::PathBuf,
        source: serde_json::Error,
    },
    #[error("admin token file {}: it is empty", path.display())]
    EmptyToken { path: std::path::PathBuf },
    #[error("listening on {listen}: {source}")]
    Listen {
        listen: String,
        source: std::io::Error,
    },
    #[error("--admin-audience needs --admin-allowed-users: the identities allowed in")]
    NoAllowedUsers,
    #[error("a Kubernetes client for TokenReviews: {0}")]
    Kube(#[source] kube::Error),
    #[error("the admin API's TLS certificate: {0}")]
    Tls(String),
    #[error("{0}")]
    KvCache(String),
}

/// Loads the model, serves, loads the start-up adapters, turns ready, and drains in-flight
/// requests once `shutdown` completes.
pub async fn serve(
    args: Args,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (admin, tls) = admin_access(&args).await?;
    let adapters_file = match &args.adapters_file {
        Some(path) => read_adapters_file(path)?,
        None => AdaptersFile::default(),
    };
    let cache = args.cache_dir.clone();
    let s3 = args.s3_options();
    let model = Arc::new(BaseModel::load(&args.model_options(), &s3, &cache).await?);
    tracing::info!(model = %model.info.model, uri = %model.info.model_uri, sha256 = %model.info.model_sha256, "base model loaded");
    let metrics = Arc::new(Metrics::default());
    let registry = Arc::new(Registry::new(model.clone(), s3, cache, metrics.clone()));
    let kv_cache_tokens = kv_budget::kv_cache_tokens(
        &model,
        args.kv_cache_tokens,
        args.kv_cache_memory_fraction,
        args.max_batch_size,
    )
    .map_err(ServeError::KvCache)?;
    tracing::info!(
        tokens = kv_cache_tokens,
        mib = (kv_cache_tokens * kv_budget::bytes_per_token(&model)) >> 20,
        "KV cache budget"
    );
    let scheduler = Scheduler::spawn(
        model.clone(),
        Limits {
            max_batch: args.max_batch_size,
            max_waiting: args.max_waiting,
            kv_cache_tokens,
        },
        metrics.clone(),
    );
    let state = Arc::new(AppState::new(
        model,
        registry.clone(),
        scheduler,
        metrics,
        admin,
    ));

    let bind = |listen: &str| {
        let listen = listen.to_owned();
        async move {
            TcpListener::bind(&listen)
                .await
                .map_err(|source| ServeError::Listen { listen, source })
        }
    };
    let listener = bind(&args.listen).await?;
    let admin_listener = match &args.admin_listen {
        Some(listen) => Some(bind(listen).await?),
        None => None,
    };
    tracing::info!(listen = %args.listen, admin = ?args.admin_listen, "serving");
    let app = api::router(state.clone(), admin_listener.is_none());
    let (stopping, stop) = watch::channel(false);
    let admin_server = admin_listener.map(|listener| {
        let app = api::admin_router(state.clone());
        let stop = stop.clone();
        match tls {
            Some(acceptor) => tokio::spawn(tls::serve(listener, app, acceptor, stop)),
            None => tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stopped(stop))
                    .await
            }),
        }
    });
    tokio::spawn(load_start_up(state.clone(), registry, adapters_file));
    let draining = state.clone();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            draining
                .ready
                .store(false, std::sync::atomic::Ordering::Relaxed);
            tracing::info!("shutting down: draining in-flight requests");
            let _ = stopping.send(true);
        })
        .await
        .map_err(|source| ServeError::Listen {
            listen: args.listen.clone(),
            source,
        });
    if let Some(admin_server) = admin_server {
        let _ = admin_server.await;
    }
    served
}

/// Who may call the admin API (a static token file and/or TokenReviews of ServiceAccount
/// tokens), and TLS for its own port.
async fn admin_access(args: &Args) -> Result<(AdminAuth, Option<TlsAcceptor>), ServeError> {
    // The token file must hold a token at start (a typo'd path fails loudly); it is read again
    // whenever it changes afterwards.
    if let Some(path) = args.admin_token_file.as_deref()
        && read_file("admin token file", path)?.trim().is_empty()
    {
        // An empty token would match a request without one.
        return Err(ServeError::EmptyToken {
            path: path.to_owned(),
        });
    }
    let reviewer = match &args.admin_audience {
        Some(audience) => {
            if args.admin_allowed_users.is_empty() {
                return Err(ServeError::NoAllowedUsers);
            }
            let client = kube::Client::try_default()
                .await
                .map_err(ServeError::Kube)?;
            Some(Reviewer::new(
                client,
                audience.clone(),
                args.admin_allowed_users.clone(),
            ))
        }
        None => None,
    };
    let tls = match (&args.admin_tls_cert, &args.admin_tls_key) {
        (Some(cert), Some(key)) => {
            Some(tls::acceptor(cert.clone(), key.clone()).map_err(ServeError::Tls)?)
        }
        _ => None,
    };
    Ok((AdminAuth::new(args.admin_token_file.clone(), reviewer), tls))
}

/// Loads the adapters listed at start-up (a name deleted meanwhile stays deleted), then turns
/// the server ready.
async fn load_start_up(state: Arc<AppState>, registry: Arc<Registry>, adapters: AdaptersFile) {
    for (name, assignment) in &adapters.adapters {
        match api::assign(&state, name, assignment, true).await {
            Ok(()) => tracing::info!(adapter = %name, "start-up adapter loaded"),
            Err(api::AssignError::Load(e)) => {
                tracing::error!(adapter = %name, error = %e, "start-up adapter failed");
                registry.record_failure(name, assignment, &e);
            }
            Err(e) => tracing::info!(adapter = %name, reason = ?e, "start-up adapter skipped"),
        }
    }
    state.assignments.started();
    state
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!("ready");
}

/// Completes once `stop` says so (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopping| *stopping).await;
}

fn read_file(what: &'static str, path: &Path) -> Result<String, ServeError> {
    std::fs::read_to_string(path).map_err(|source| ServeError::File {
        what,
        path: path.to_owned(),
        source,
    })
}

/// The adapters to load at start-up: a JSON file (`{"adapters": {name: {versions}}}`) or a
/// directory — the operator's ConfigMap mounted as a volume — with one `<name>.json` per
/// adapter. A missing path is an empty list: the ConfigMap may not exist before the first
/// adapter.
fn read_adapters_file(path: &Path) -> Result<AdaptersFile, ServeError> {
    let parse_error = |source| ServeError::AdaptersFile {
        path: path.to_owned(),
        source,
    };
    let io_error = |source| ServeError::File {
        what: "adapters file",
        path: path.to_owned(),
        source,
    };
    if path.is_dir() {
        let mut file = AdaptersFile::default();
        for entry in std::fs::read_dir(path).map_err(io_error)? {
            let entry = entry.map_err(io_error)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // ConfigMap volumes also hold `..data` and timestamped directories.
            let Some(adapter) = name.strip_suffix(".json").filter(|n| !n.starts_with('.')) else {
                continue;
            };
            let text = std::fs::read_to_string(entry.path()).map_err(io_error)?;
            let assignment = serde_json::from_str(&text).map_err(parse_error)?;
            file.adapters.insert(adapter.to_owned(), assignment);
        }
        return Ok(file);
    }
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(AdaptersFile::default()),
        Err(source) => return Err(io_error(source)),
    };
    if text.trim().is_empty() {
        return Ok(AdaptersFile::default());
    }
    serde_json::from_str(&text).map_err(parse_error)
}
