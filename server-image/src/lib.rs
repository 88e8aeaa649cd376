//! `graft-server`: one base model, many LoRA adapters mixed in each batch, an OpenAI-compatible
//! HTTP API, and an admin API through which the operator hot-swaps adapter versions.

pub mod adapters;
pub mod api;
pub mod cli;
pub mod constrain;
pub mod detokenize;
pub mod metrics;
pub mod model;
pub mod sampling;
pub mod scheduler;
pub mod tool_calls;

use std::{path::Path, sync::Arc};

use graft_api::AdaptersFile;
use tokio::net::TcpListener;

use crate::{
    adapters::Registry, api::AppState, cli::Args, metrics::Metrics, model::BaseModel,
    scheduler::Scheduler,
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
}

/// Loads the model, serves, loads the start-up adapters, turns ready, and drains in-flight
/// requests once `shutdown` completes.
pub async fn serve(
    args: Args,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let admin_token = match args.admin_token_file.as_deref() {
        // An empty token would match a request without one.
        Some(path) => match read_file("admin token file", path)?.trim() {
            "" => {
                return Err(ServeError::EmptyToken {
                    path: path.to_owned(),
                });
            }
            token => Some(token.to_owned()),
        },
        None => None,
    };
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
    let scheduler = Scheduler::spawn(
        model.clone(),
        args.max_batch_size,
        args.max_waiting,
        metrics.clone(),
    );
    let state = Arc::new(AppState::new(
        model,
        registry.clone(),
        scheduler,
        metrics,
        admin_token,
    ));

    let listener = TcpListener::bind(&args.listen)
        .await
        .map_err(|source| ServeError::Listen {
            listen: args.listen.clone(),
            source,
        })?;
    tracing::info!(listen = %args.listen, "serving");
    let app = api::router(state.clone());
    let ready_state = state.clone();
    tokio::spawn(async move {
        for (name, assignment) in &adapters_file.adapters {
            match registry.put(name, assignment).await {
                Ok(()) => tracing::info!(adapter = %name, "start-up adapter loaded"),
                Err(e) => {
                    tracing::error!(adapter = %name, error = %e, "start-up adapter failed");
                    registry.record_failure(name, assignment, &e);
                }
            }
        }
        ready_state
            .ready
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!("ready");
    });
    let draining = state.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            draining
                .ready
                .store(false, std::sync::atomic::Ordering::Relaxed);
            tracing::info!("shutting down: draining in-flight requests");
        })
        .await
        .map_err(|source| ServeError::Listen {
            listen: args.listen.clone(),
            source,
        })
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
