//! The admin API the operator drives, behind a bearer token: load or swap an adapter's
//! versions, remove an adapter, list what is loaded, describe the base model.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Path, State, rejection::JsonRejection},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use graft_api::{AdapterAssignment, AdapterListing, ServerInfo};
use sha2::{Digest, Sha256};

use super::{AppState, error::ApiError};
use crate::adapters::LoadError;

/// Compares digests of the tokens so the comparison takes the same time wherever they differ.
pub fn authorized(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(expected) = &state.admin_token else {
        return false;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    Sha256::digest(given.as_bytes()) == Sha256::digest(expected.as_bytes())
}

fn guard(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    if authorized(state, headers) {
        Ok(())
    } else {
        Err(ApiError::unauthorized())
    }
}

pub async fn put_adapter(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Result<Json<AdapterAssignment>, JsonRejection>,
) -> Result<Response, ApiError> {
    guard(&state, &headers)?;
    let Json(assignment) = body?;
    match state.registry.put(&name, &assignment).await {
        Ok(()) => {
            tracing::info!(adapter = %name, versions = assignment.versions.len(), "adapter assigned");
            let listing = state.registry.listing();
            Ok(Json(serde_json::json!({
                "name": name,
                "versions": listing.adapters.get(&name),
            }))
            .into_response())
        }
        Err(e @ LoadError::Invalid(_)) => {
            tracing::warn!(adapter = %name, error = %e, "adapter refused");
            Err(ApiError::unprocessable(e.to_string()))
        }
        Err(e @ LoadError::Unavailable(_)) => {
            tracing::warn!(adapter = %name, error = %e, "adapter could not be fetched");
            Err(ApiError {
                status: StatusCode::BAD_GATEWAY,
                message: e.to_string(),
                kind: "server_error",
                param: None,
                code: Some("adapter_unavailable"),
            })
        }
    }
}

pub async fn delete_adapter(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    guard(&state, &headers)?;
    if state.registry.delete(&name) {
        tracing::info!(adapter = %name, "adapter removed");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no adapter named {name:?}")))
    }
}

pub async fn list_adapters(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<AdapterListing>, ApiError> {
    guard(&state, &headers)?;
    Ok(Json(state.registry.listing()))
}

pub async fn info(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<ServerInfo>, ApiError> {
    guard(&state, &headers)?;
    Ok(Json(state.model.info.clone()))
}
