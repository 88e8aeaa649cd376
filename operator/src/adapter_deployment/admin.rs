//! graft-server's admin API as the operator calls it: one client, a bearer token, short
//! timeouts (a pod that does not answer is reported, not waited on).

use std::time::Duration;

use graft_api::{AdapterAssignment, AdapterListing, ServerInfo};
use serde::de::DeserializeOwned;

/// A server pod's admin endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub pod: String,
    /// `http://<pod IP>:<admin port>`.
    pub base: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The server refused the request (its error message): for a `PUT`, the adapter.
    #[error("pod {pod}: {message}")]
    Refused {
        pod: String,
        status: u16,
        message: String,
    },
    #[error("pod {pod} did not answer: {reason}")]
    Unreachable { pod: String, reason: String },
}

#[derive(Clone, Debug)]
pub struct AdminClient {
    http: reqwest::Client,
    token: String,
}

impl AdminClient {
    pub fn new(token: String) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            // Loading a large adapter from object storage takes a while; the PUT waits for it.
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap_or_default();
        Self { http, token }
    }

    pub async fn info(&self, at: &Endpoint) -> Result<ServerInfo, CallError> {
        self.call(at, reqwest::Method::GET, "/admin/info", None)
            .await
    }

    pub async fn list(&self, at: &Endpoint) -> Result<AdapterListing, CallError> {
        self.call(at, reqwest::Method::GET, "/admin/adapters", None)
            .await
    }

    pub async fn put(
        &self,
        at: &Endpoint,
        name: &str,
        assignment: &AdapterAssignment,
    ) -> Result<(), CallError> {
        let body = serde_json::to_value(assignment).unwrap_or_default();
        self.call::<serde_json::Value>(
            at,
            reqwest::Method::PUT,
            &format!("/admin/adapters/{name}"),
            Some(body),
        )
        .await
        .map(|_| ())
    }

    /// Removes `name`; one the server does not have is already removed.
    pub async fn delete(&self, at: &Endpoint, name: &str) -> Result<(), CallError> {
        match self
            .call::<serde_json::Value>(
                at,
                reqwest::Method::DELETE,
                &format!("/admin/adapters/{name}"),
                None,
            )
            .await
        {
            Ok(_) | Err(CallError::Refused { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        at: &Endpoint,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, CallError> {
        let unreachable = |reason: String| CallError::Unreachable {
            pod: at.pod.clone(),
            reason,
        };
        let mut request = self
            .http
            .request(method, format!("{}{path}", at.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        if status.is_client_error() {
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or(text);
            return Err(CallError::Refused {
                pod: at.pod.clone(),
                status: status.as_u16(),
                message,
            });
        }
        if !status.is_success() {
            return Err(unreachable(format!("{status}: {text}")));
        }
        if text.is_empty() {
            return serde_json::from_str("null").map_err(|e| unreachable(e.to_string()));
        }
        serde_json::from_str(&text).map_err(|e| unreachable(format!("unexpected answer: {e}")))
    }
}
