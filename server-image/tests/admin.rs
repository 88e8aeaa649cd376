//! The admin API's guard and fencing, against a real `graft-server`: a port of its own, TLS
//! with a certificate renewed in place, a static token rotated without a restart, the
//! operator's ServiceAccount token checked by TokenReview against the real local control
//! plane, and assignments from an older generation of their AdapterDeployment refused.

mod common;

use std::{path::Path, process::Command};

use common::{TOKEN, model_dir, random_adapter, store};
use graft_engine::adapters::Site;
use graft_testenv::{ControlPlane, Daemon, S3Server, eventually};
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::{Value, json};

const WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A `graft-server` on the tiny model with `extra` arguments and environment; its directory
/// holds `token` (the static admin token).
async fn server(extra: &[&str], env: &[(&str, &str)]) -> (Daemon, std::path::PathBuf) {
    let s3 = S3Server::shared().await;
    let dir = tempfile::tempdir().expect("tempdir").keep();
    std::fs::write(dir.join("token"), format!("{TOKEN}\n")).expect("token");
    let model = format!("file://{}", model_dir().display());
    let cache = dir.join("cache").display().to_string();
    let mut args = vec![
        "--model",
        &model,
        "--listen",
        "127.0.0.1:{port}",
        "--cache-dir",
        &cache,
        "--s3-endpoint",
        s3.endpoint(),
        "--s3-region",
        s3.region(),
    ];
    args.extend_from_slice(extra);
    let mut vars = vec![
        ("AWS_ACCESS_KEY_ID", s3.access_key_id()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_access_key()),
    ];
    vars.extend_from_slice(env);
    let daemon = Daemon::start_with_env(
        "graft-server",
        env!("CARGO_BIN_EXE_graft-server"),
        &args,
        &vars,
    )
    .await;
    (daemon, dir)
}

async fn status(request: reqwest::RequestBuilder) -> u16 {
    request.send().await.expect("an answer").status().as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_has_a_port_of_its_own_and_a_rotated_token_needs_no_restart() {
    let dir = tempfile::tempdir().expect("tempdir").keep();
    std::fs::write(dir.join("token"), TOKEN).expect("token");
    let token = dir.join("token").display().to_string();
    let (daemon, _) = server(
        &[
            "--admin-listen",
            "127.0.0.1:{port2}",
            "--admin-token-file",
            &token,
        ],
        &[],
    )
    .await;
    let http = reqwest::Client::new();
    let public = format!("http://127.0.0.1:{}", daemon.port());
    let admin = format!("http://127.0.0.1:{}", daemon.port2());
    let list = |base: &str, token: &str| {
        http.get(format!("{base}/admin/adapters"))
            .bearer_auth(token)
    };
    assert_eq!(
        status(list(&public, TOKEN)).await,
        404,
        "not on the public port"
    );
    assert_eq!(status(list(&admin, TOKEN)).await, 200);
    assert_eq!(status(http.get(format!("{admin}/v1/models"))).await, 404);
    assert_eq!(status(http.get(format!("{admin}/healthz"))).await, 200);

    // The mounted Secret is replaced: the new token works at once, the old one no more.
    std::fs::write(&token, "rotated-token\n").expect("rotating");
    assert_eq!(status(list(&admin, TOKEN)).await, 401);
    assert_eq!(status(list(&admin, "rotated-token")).await, 200);
    assert!(daemon.is_running(), "no restart");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_older_generation_of_the_same_owner_is_refused() {
    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("fencing");
    let v1 = store(s3, &bucket, "v1", &random_adapter(4, 71, &Site::SEPARATE)).await;
    let v2 = store(s3, &bucket, "v2", &random_adapter(4, 72, &Site::SEPARATE)).await;
    let dir = tempfile::tempdir().expect("tempdir").keep();
    let token = dir.join("token");
    std::fs::write(&token, TOKEN).expect("token");
    let (daemon, _) = server(&["--admin-token-file", token.to_str().expect("utf-8")], &[]).await;
    let base = format!("http://127.0.0.1:{}", daemon.port());
    let put = async |version: &common::TestAdapter, owner: &str, generation: i64| {
        let response = reqwest::Client::new()
            .put(format!("{base}/admin/adapters/bot"))
            .bearer_auth(TOKEN)
            .json(&json!({
                "versions": [{"uri": version.uri, "sha256": version.sha256, "weight": 100}],
                "owner": {"uid": owner, "generation": generation},
            }))
            .send()
            .await
            .expect("PUT");
        let code = response.status().as_u16();
        (code, response.json::<Value>().await.unwrap_or(Value::Null))
    };
    assert_eq!(put(&v2, "uid-a", 3).await.0, 200);
    // A deposed operator's late request from generation 2 must not bring v1 back.
    let (code, body) = put(&v1, "uid-a", 2).await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["error"]["code"], "stale_generation");
    let listing: Value = reqwest::Client::new()
        .get(format!("{base}/admin/adapters"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    assert_eq!(listing["adapters"]["bot"][0]["sha256"], v2.sha256);
    // The same generation again (a retry, a re-check) and a new owner are accepted.
    assert_eq!(put(&v2, "uid-a", 3).await.0, 200);
    assert_eq!(put(&v1, "uid-b", 1).await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operators_service_account_token_is_checked_by_token_review() {
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("admin-auth").await;
    let client = cp.client().await;
    // The server's own identity may create TokenReviews, as the chart binds it.
    let server_user = format!("system:serviceaccount:{ns}:server");
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": format!("{ns}-server-auth-delegator")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:auth-delegator"},
        "subjects": [{"kind": "ServiceAccount", "name": "server", "namespace": ns}],
    }))
    .expect("a binding");
    Api::<ClusterRoleBinding>::all(client)
        .patch(
            &format!("{ns}-server-auth-delegator"),
            &PatchParams::apply("graft-test").force(),
            &Patch::Apply(&binding),
        )
        .await
        .expect("binding the server's identity");
    let kubeconfig = cp.kubeconfig_as(&server_user);
    let operator = format!("system:serviceaccount:{ns}:operator");
    let (daemon, _) = server(
        &[
            "--admin-audience",
            "graft-server.test",
            "--admin-allowed-users",
            &operator,
        ],
        &[("KUBECONFIG", kubeconfig.to_str().expect("utf-8"))],
    )
    .await;
    let base = format!("http://127.0.0.1:{}", daemon.port());
    let call = async |token: &str| {
        status(
            reqwest::Client::new()
                .get(format!("{base}/admin/adapters"))
                .bearer_auth(token),
        )
        .await
    };
    let good = cp
        .service_account_token(&ns, "operator", "graft-server.test", 600)
        .await;
    assert_eq!(call(&good).await, 200, "the operator's projected token");
    let wrong_audience = cp
        .service_account_token(&ns, "operator", "https://kubernetes.default.svc", 600)
        .await;
    assert_eq!(
        call(&wrong_audience).await,
        401,
        "a token for another audience"
    );
    let intruder = cp
        .service_account_token(&ns, "intruder", "graft-server.test", 600)
        .await;
    assert_eq!(call(&intruder).await, 403, "a valid token of someone else");
    assert_eq!(call("not-a-token").await, 401);
    // The kubelet rotates the projected token: the fresh one works the same.
    let rotated = cp
        .service_account_token(&ns, "operator", "graft-server.test", 600)
        .await;
    assert_ne!(rotated, good);
    assert_eq!(call(&rotated).await, 200);
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`ca.crt`, `ca.key`) in `dir`.
fn authority(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=graft-test-admin-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
    );
}

/// A serving certificate for `name` signed by the CA in `ca_dir`, into `cert`/`key` in `dir`
/// (and its DER form as `<cert>.der`).
fn certificate(dir: &Path, ca_dir: &Path, name: &str, cert: &str, key: &str) {
    let ext = dir.join("leaf.ext");
    std::fs::write(
        &ext,
        format!(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n\
             subjectAltName=DNS:{name}\n"
        ),
    )
    .expect("extensions");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            key,
            "-out",
            "leaf.csr",
        ],
    );
    let (ca_cert, ca_key) = (ca_dir.join("ca.crt"), ca_dir.join("ca.key"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-days",
            "2",
            "-CA",
            ca_cert.to_str().expect("utf-8"),
            "-CAkey",
            ca_key.to_str().expect("utf-8"),
            "-CAcreateserial",
            "-extfile",
            ext.to_str().expect("utf-8"),
            "-out",
            cert,
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-in",
            cert,
            "-outform",
            "der",
            "-out",
            &format!("{cert}.der"),
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_port_serves_tls_and_a_renewed_certificate_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir").keep();
    authority(&dir);
    certificate(&dir, &dir, "llama.serving.svc", "tls.crt", "tls.key");
    let token = dir.join("token");
    std::fs::write(&token, TOKEN).expect("token");
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let (daemon, _) = server(
        &[
            "--admin-listen",
            "127.0.0.1:{port2}",
            "--admin-token-file",
            token.to_str().expect("utf-8"),
            "--admin-tls-cert",
            cert.to_str().expect("utf-8"),
            "--admin-tls-key",
            key.to_str().expect("utf-8"),
        ],
        &[],
    )
    .await;
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], daemon.port2()));
    let ca = std::fs::read(dir.join("ca.crt")).expect("CA");
    let url = format!(
        "https://llama.serving.svc:{}/admin/adapters",
        daemon.port2()
    );
    // The certificate the server presents, as DER: a new client each time, so that neither a
    // pooled connection nor a resumed TLS session hides a renewal.
    let served = async || {
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&ca).expect("PEM")])
            .resolve("llama.serving.svc", address)
            .tls_info(true)
            .build()
            .expect("a client");
        let response = client
            .get(&url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("TLS");
        assert_eq!(response.status().as_u16(), 200);
        response
            .extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|i| i.peer_certificate().map(<[u8]>::to_vec))
            .expect("the peer certificate")
    };
    assert_eq!(
        served().await,
        std::fs::read(dir.join("tls.crt.der")).expect("DER")
    );
    let plain = reqwest::Client::new()
        .get(format!(
            "http://127.0.0.1:{}/admin/adapters",
            daemon.port2()
        ))
        .send()
        .await;
    assert!(
        plain.map_or(true, |r| !r.status().is_success()),
        "no plain HTTP on the TLS port"
    );
    let wrong_name = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).expect("PEM")])
        .resolve("qwen.serving.svc", address)
        .build()
        .expect("a client")
        .get(format!(
            "https://qwen.serving.svc:{}/admin/adapters",
            daemon.port2()
        ))
        .send()
        .await;
    assert!(wrong_name.is_err(), "the certificate names its server");

    // cert-manager renews the certificate in the mounted Secret.
    let renewed = tempfile::tempdir().expect("tempdir");
    certificate(
        renewed.path(),
        &dir,
        "llama.serving.svc",
        "tls.crt",
        "tls.key",
    );
    std::fs::copy(renewed.path().join("tls.key"), &key).expect("key");
    std::fs::copy(renewed.path().join("tls.crt"), &cert).expect("cert");
    let new = std::fs::read(renewed.path().join("tls.crt.der")).expect("DER");
    eventually("the renewed certificate served", WAIT, async || {
        served().await == new
    })
    .await;
    assert!(daemon.is_running(), "no restart");
}
