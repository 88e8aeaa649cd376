//! graft-server's admin API as the operator calls it: one client, a bearer token, short
//! timeouts (a pod that does not answer is reported, not waited on), TLS where the server's
//! Deployment says so (`graft.dev/admin-scheme: https`), verified against the operator's CA
//! bundle and the server's Service name (`<server>.<namespace>.svc`), whatever pod IP the
//! connection goes to.
//!
//! The token is the operator's own ServiceAccount token, projected with the servers' audience
//! and rotated by the kubelet: it is read from its file for every reconcile, so a rotated token
//! is used without a restart, and the operator never reads a Secret for it. Redirects are never
//! followed (a redirect would carry the token elsewhere), and the token never shows in `Debug`.

use std::{net::SocketAddr, path::Path, time::Duration};

use graft_api::{AdapterAssignment, AdapterListing};
use serde::de::DeserializeOwned;

/// A server pod's admin endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub pod: String,
    /// `http://<pod IP>:<admin port>`, or `https://<server>.<namespace>.svc:<admin port>`.
    pub base: String,
    /// With TLS: the pod's address, where the Service name in `base` is resolved to.
    pub address: Option<(String, SocketAddr)>,
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

/// A bearer token that never appears in logs or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// The token in `path` (trimmed), or why there is none.
    pub fn read(path: &Path) -> Result<Self, String> {
        match std::fs::read_to_string(path) {
            Ok(text) if !text.trim().is_empty() => Ok(Self(text.trim().to_owned())),
            Ok(_) => Err(format!("the admin token file {} is empty", path.display())),
            Err(e) => Err(format!(
                "reading the admin token file {}: {e}",
                path.display()
            )),
        }
    }
}

fn builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        // Loading a large adapter from object storage takes a while; the PUT waits for it.
        .timeout(Duration::from_secs(120))
        .redirect(reqwest::redirect::Policy::none())
}

/// The HTTP client every plain admin call goes through: no redirects, short connect timeout.
pub fn http_client() -> reqwest::Client {
    builder().build().unwrap_or_default()
}

/// The CA bundle in `path` (PEM), or why it cannot be used.
pub fn read_ca(path: &Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path)
        .map_err(|e| format!("reading the admin CA bundle {}: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("the admin CA bundle {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("the admin CA bundle {} is empty", path.display()));
    }
    Ok(certs)
}

#[derive(Clone, Debug)]
pub struct AdminClient {
    http: reqwest::Client,
    token: Token,
    /// The CAs a TLS admin endpoint's certificate must chain to; the system's when `None`.
    ca: Option<Vec<reqwest::Certificate>>,
}

impl AdminClient {
    pub fn new(http: reqwest::Client, token: Token) -> Self {
        Self {
            http,
            token,
            ca: None,
        }
    }

    #[must_use]
    pub fn with_ca(mut self, ca: Vec<reqwest::Certificate>) -> Self {
        self.ca = Some(ca);
        self
    }

    /// The client for `at`: the shared one, or for TLS one that resolves the Service name to
    /// the pod and trusts the configured CAs only.
    fn http_for(&self, at: &Endpoint) -> Result<reqwest::Client, String> {
        let Some((host, address)) = &at.address else {
            return Ok(self.http.clone());
        };
        let mut builder = builder().resolve(host, *address);
        if let Some(ca) = &self.ca {
            builder = builder.tls_certs_only(ca.iter().cloned());
        }
        builder.build().map_err(|e| e.to_string())
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
            .http_for(at)
            .map_err(unreachable)?
            .request(method, format!("{}{path}", at.base))
            .bearer_auth(&self.token.0);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = response.status();
        if status.is_redirection() {
            return Err(unreachable(format!(
                "{status}: the admin API redirected; not followed"
            )));
        }
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
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or(text);
            return Err(unreachable(format!("{status}: {message}")));
        }
        if text.is_empty() {
            return serde_json::from_str("null").map_err(|e| unreachable(e.to_string()));
        }
        serde_json::from_str(&text).map_err(|e| unreachable(format!("unexpected answer: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let token = Token("s3cr3t-token".to_owned());
        let client = AdminClient::new(http_client(), token.clone());
        for shown in [format!("{token:?}"), format!("{client:?}")] {
            assert!(!shown.contains("s3cr3t"), "{shown}");
        }
    }

    /// One HTTP exchange on 127.0.0.1: answers `response` and returns the request it read.
    async fn answer_once(response: &'static str) -> (String, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut buf = vec![0; 4096];
            let n = stream.read(&mut buf).await.expect("read");
            stream.write_all(response.as_bytes()).await.expect("write");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        (base, task)
    }

    #[tokio::test]
    async fn a_redirect_is_an_error_and_is_not_followed() {
        let (base, server) = answer_once(
            "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:9/steal\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        let client = AdminClient::new(http_client(), Token("t0k3n".to_owned()));
        let at = Endpoint {
            pod: "p".to_owned(),
            base,
            address: None,
        };
        let err = client.list(&at).await.expect_err("a redirect is refused");
        assert!(err.to_string().contains("not followed"), "{err}");
        let request = server.await.expect("server");
        assert!(request.contains("authorization: Bearer t0k3n"), "{request}");
    }

    #[test]
    fn a_missing_or_empty_token_file_says_which() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        assert!(Token::read(&path).expect_err("missing").contains("token"));
        std::fs::write(&path, "\n").expect("write");
        assert!(Token::read(&path).expect_err("empty").contains("empty"));
        std::fs::write(&path, "abc\n").expect("write");
        assert_eq!(Token::read(&path), Ok(Token("abc".to_owned())));
    }
}
