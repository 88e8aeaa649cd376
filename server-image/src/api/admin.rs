//! The admin API the operator drives: load or swap an adapter's versions, remove an adapter,
//! list what is loaded, describe the base model.
//!
//! Who may call it: a static bearer token from a file (re-read when the file changes, so a
//! rotated Secret needs no restart), and/or Kubernetes ServiceAccount tokens bound to this
//! server's audience, checked with a TokenReview and allowed by username (the operator's
//! projected token: no Secret to share). Assignments carry the assigning AdapterDeployment's
//! generation: one older than the last accepted from the same owner is refused, so a deposed
//! operator's late request cannot undo a newer one.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use axum::{
    Json,
    extract::{Path, State, rejection::JsonRejection},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use graft_api::{AdapterAssignment, AdapterListing, Owner, ServerInfo};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};

use super::{AppState, error::ApiError};
use crate::adapters::LoadError;

/// How long a TokenReview's answer is trusted: the operator calls every few seconds, and the
/// kubelet rotates its token long before it expires.
const REVIEW_TTL: Duration = Duration::from_secs(60);
const REFUSAL_TTL: Duration = Duration::from_secs(5);
const REVIEW_CACHE_ENTRIES: usize = 1024;

/// Who may call the admin API. With neither a token file nor a reviewer, nobody.
#[derive(Debug, Default)]
pub struct AdminAuth {
    token_file: Option<PathBuf>,
    /// The token as last read, with the file's modification time then.
    token: Mutex<Option<(Option<SystemTime>, String)>>,
    reviewer: Option<Reviewer>,
}

/// Checks ServiceAccount tokens with the apiserver's TokenReview API.
pub struct Reviewer {
    client: kube::Client,
    audience: String,
    /// Usernames allowed in, e.g. `system:serviceaccount:graft-system:graft-operator`.
    allowed: HashSet<String>,
    cache: Mutex<Reviews>,
}

/// TokenReview answers by the token's digest: when each expires, and the username or the
/// refusal.
type Reviews = HashMap<[u8; 32], (Instant, Result<String, Refusal>)>;

impl std::fmt::Debug for Reviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reviewer")
            .field("audience", &self.audience)
            .field("allowed", &self.allowed)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// Not a valid token for this audience: 401.
    Unauthenticated,
    /// A valid token of someone not allowed: 403.
    Forbidden,
}

impl Reviewer {
    pub fn new(client: kube::Client, audience: String, allowed: Vec<String>) -> Self {
        Self {
            client,
            audience,
            allowed: allowed.into_iter().collect(),
            cache: Mutex::default(),
        }
    }

    async fn review(&self, token: &str) -> Result<(), ApiError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
            .filter(|(until, _)| *until > Instant::now())
            .map(|(_, answer)| answer.clone());
        let answer = if let Some(answer) = cached {
            answer
        } else {
            let answer = self.ask(token).await?;
            let ttl = if answer.is_ok() {
                REVIEW_TTL
            } else {
                REFUSAL_TTL
            };
            let mut cache = self
                .cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if cache.len() >= REVIEW_CACHE_ENTRIES {
                cache.retain(|_, (until, _)| *until > Instant::now());
                if cache.len() >= REVIEW_CACHE_ENTRIES {
                    cache.clear();
                }
            }
            cache.insert(key, (Instant::now() + ttl, answer.clone()));
            answer
        };
        match answer {
            Ok(_) => Ok(()),
            Err(Refusal::Unauthenticated) => Err(ApiError::unauthorized()),
            Err(Refusal::Forbidden) => Err(forbidden()),
        }
    }

    async fn ask(&self, token: &str) -> Result<Result<String, Refusal>, ApiError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "TokenReview failed");
                ApiError::unavailable("cannot check the token now: the apiserver did not answer")
            })?;
        let status = reviewed.status.unwrap_or_default();
        let audience_ok = status
            .audiences
            .as_ref()
            .is_some_and(|a| a.contains(&self.audience));
        if status.authenticated != Some(true) || !audience_ok {
            return Ok(Err(Refusal::Unauthenticated));
        }
        let user = status.user.and_then(|u| u.username).unwrap_or_default();
        if self.allowed.contains(&user) {
            Ok(Ok(user))
        } else {
            tracing::warn!(user = %user, "admin API call by a user not allowed");
            Ok(Err(Refusal::Forbidden))
        }
    }
}

fn forbidden() -> ApiError {
    ApiError {
        status: StatusCode::FORBIDDEN,
        message: "this identity may not use the admin API".to_owned(),
        kind: "permission_error",
        param: None,
        code: None,
    }
}

impl AdminAuth {
    pub fn new(token_file: Option<PathBuf>, reviewer: Option<Reviewer>) -> Self {
        Self {
            token_file,
            token: Mutex::default(),
            reviewer,
        }
    }

    /// The static token as the file holds it now: read again whenever the file changed (a
    /// mounted Secret is replaced by the kubelet, which moves its modification time).
    fn current_token(&self) -> Option<String> {
        let path = self.token_file.as_ref()?;
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let mut cached = self
            .token
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, token)) = &*cached
            && *at == modified
            && modified.is_some()
        {
            return Some(token.clone());
        }
        // An empty or unreadable file admits nobody: an empty token would match a request
        // without one.
        let token = std::fs::read_to_string(path)
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())?;
        *cached = Some((modified, token.clone()));
        Some(token)
    }

    /// Whether the request's bearer token may use the admin API.
    pub async fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(ApiError::unauthorized)?;
        // Digests are compared, so the comparison takes the same time wherever they differ.
        if let Some(expected) = self.current_token()
            && Sha256::digest(given.as_bytes()) == Sha256::digest(expected.as_bytes())
        {
            return Ok(());
        }
        match &self.reviewer {
            Some(reviewer) => reviewer.review(given).await,
            None => Err(ApiError::unauthorized()),
        }
    }
}

/// The owners of assigned names, and the names removed while the start-up adapters load.
#[derive(Debug, Default)]
pub struct Assignments {
    /// One lock per name, held from the generation check to the end of the load, so two
    /// assignments of a name never interleave.
    names: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Owner>>>>>,
    /// While the start-up adapters load: the names deleted meanwhile, which they must not
    /// bring back. `None` once start-up is done.
    starting: Mutex<Option<HashSet<String>>>,
}

/// Why an assignment was not made.
#[derive(Debug)]
pub enum AssignError {
    /// An older generation than the last one accepted from the same owner.
    Stale {
        had: i64,
        got: i64,
    },
    /// Deleted while the start-up adapters loaded.
    Deleted,
    Load(LoadError),
}

impl Assignments {
    /// Assignments made before start-up finishes are checked against deletions meanwhile.
    pub fn starting() -> Self {
        Self {
            names: Mutex::default(),
            starting: Mutex::new(Some(HashSet::new())),
        }
    }

    fn lock_for(&self, name: &str) -> Arc<tokio::sync::Mutex<Option<Owner>>> {
        self.names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    fn deleted_during_start_up(&self, name: &str) -> bool {
        self.starting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .is_some_and(|deleted| deleted.contains(name))
    }

    /// Start-up is over: deletions need no remembering any more.
    pub fn started(&self) {
        *self
            .starting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }
}

/// Assigns `name` its versions unless the assignment is stale (or, at start-up, deleted).
pub async fn assign(
    state: &AppState,
    name: &str,
    assignment: &AdapterAssignment,
    at_start_up: bool,
) -> Result<(), AssignError> {
    let lock = state.assignments.lock_for(name);
    let mut owner = lock.lock().await;
    if let (Some(had), Some(got)) = (owner.as_ref(), assignment.owner.as_ref())
        && had.uid == got.uid
        && got.generation < had.generation
    {
        return Err(AssignError::Stale {
            had: had.generation,
            got: got.generation,
        });
    }
    if at_start_up && state.assignments.deleted_during_start_up(name) {
        return Err(AssignError::Deleted);
    }
    state
        .registry
        .put(name, assignment)
        .await
        .map_err(AssignError::Load)?;
    if at_start_up && state.assignments.deleted_during_start_up(name) {
        state.registry.delete(name);
        return Err(AssignError::Deleted);
    }
    if assignment.owner.is_some() {
        (*owner).clone_from(&assignment.owner);
    }
    Ok(())
}

pub async fn put_adapter(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Result<Json<AdapterAssignment>, JsonRejection>,
) -> Result<Response, ApiError> {
    state.admin.check(&headers).await?;
    let Json(assignment) = body?;
    match assign(&state, &name, &assignment, false).await {
        Ok(()) => {
            tracing::info!(adapter = %name, versions = assignment.versions.len(), "adapter assigned");
            let listing = state.registry.listing();
            Ok(Json(serde_json::json!({
                "name": name,
                "versions": listing.adapters.get(&name),
            }))
            .into_response())
        }
        Err(AssignError::Stale { had, got }) => {
            tracing::warn!(adapter = %name, had, got, "stale assignment refused");
            Err(ApiError {
                status: StatusCode::CONFLICT,
                message: format!(
                    "generation {got} of this adapter's AdapterDeployment is older than the \
                     generation {had} already assigned"
                ),
                kind: "invalid_request_error",
                param: None,
                code: Some("stale_generation"),
            })
        }
        Err(AssignError::Deleted) => Err(ApiError::unavailable("the adapter was just deleted")),
        Err(AssignError::Load(e @ LoadError::Invalid(_))) => {
            tracing::warn!(adapter = %name, error = %e, "adapter refused");
            Err(ApiError::unprocessable(e.to_string()))
        }
        Err(AssignError::Load(e @ LoadError::Unavailable(_))) => {
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
    state.admin.check(&headers).await?;
    let lock = state.assignments.lock_for(&name);
    let _owner = lock.lock().await;
    // While the start-up adapters load, the name may be among them: it must not come back.
    let starting = state
        .assignments
        .starting
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .as_mut()
        .map(|deleted| deleted.insert(name.clone()))
        .is_some();
    if state.registry.delete(&name) || starting {
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
    state.admin.check(&headers).await?;
    Ok(Json(state.registry.listing()))
}

pub async fn info(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<ServerInfo>, ApiError> {
    state.admin.check(&headers).await?;
    Ok(Json(state.model.info.clone()))
}
