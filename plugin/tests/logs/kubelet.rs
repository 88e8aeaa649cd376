//! The kubelet's log endpoint, as far as the apiserver uses it for `pods/log`: a Node whose
//! InternalIP and kubelet port lead to this TLS server, which answers
//! `GET /containerLogs/{namespace}/{pod}/{container}` with what the test wrote for that pod,
//! and with `follow=true` keeps the response open for more until the test closes the log.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::{api::core::v1::Node, jiff::Timestamp};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::Notify,
};

#[derive(Default)]
struct PodLog {
    lines: Vec<String>,
    closed: bool,
}

#[derive(Default)]
struct Logs {
    pods: Mutex<HashMap<String, PodLog>>,
    changed: Notify,
}

pub struct Kubelet {
    logs: Arc<Logs>,
    _dir: tempfile::TempDir,
}

impl Kubelet {
    /// Starts the server and registers the Node `graft-test-node` (Ready, room for any pod)
    /// that the scheduler then places pods on.
    pub async fn start(client: &Client) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = tls_config(dir.path());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let logs = Arc::new(Logs::default());
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let served = logs.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, logs) = (acceptor.clone(), served.clone());
                tokio::spawn(async move {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        serve(stream, &logs).await;
                    }
                });
            }
        });
        register_node(client, port).await;
        Self { logs, _dir: dir }
    }

    /// Appends a line to `pod`'s trainer log.
    pub fn write(&self, pod: &str, line: &str) {
        let mut pods = self.logs.pods.lock().expect("lock");
        pods.entry(pod.to_owned())
            .or_default()
            .lines
            .push(line.to_owned());
        self.logs.changed.notify_waiters();
    }

    /// The container stopped: followed logs of `pod` end.
    pub fn close(&self, pod: &str) {
        let mut pods = self.logs.pods.lock().expect("lock");
        pods.entry(pod.to_owned()).or_default().closed = true;
        self.logs.changed.notify_waiters();
    }
}

fn tls_config(dir: &Path) -> rustls::ServerConfig {
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "kubelet.key",
            "-out",
            "kubelet.crt",
            "-days",
            "1",
            "-subj",
            "/CN=graft-test-node",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let certs = CertificateDer::pem_file_iter(dir.join("kubelet.crt"))
        .expect("certificate")
        .collect::<Result<Vec<_>, _>>()
        .expect("certificate");
    let key = PrivateKeyDer::from_pem_file(dir.join("kubelet.key")).expect("key");
    rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("TLS config")
}

/// One request: the pod's lines so far, then (when following) each new one until closed.
async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    logs: &Logs,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head);
    let target = head
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    // /containerLogs/{namespace}/{pod}/{container}
    let Some(pod) = path
        .strip_prefix("/containerLogs/")
        .and_then(|p| p.split('/').nth(1))
    else {
        let _ = stream
            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
            .await;
        return;
    };
    let follow = query.split('&').any(|kv| kv == "follow=true");
    let header = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    if stream.write_all(header.as_bytes()).await.is_err() {
        return;
    }
    let mut sent = 0;
    loop {
        let changed = logs.changed.notified();
        let (lines, closed) = {
            let pods = logs.pods.lock().expect("lock");
            let log = pods.get(pod);
            (
                log.map(|l| l.lines[sent..].to_vec()).unwrap_or_default(),
                log.is_some_and(|l| l.closed),
            )
        };
        for line in &lines {
            let chunk = format!("{:x}\r\n{line}\n\r\n", line.len() + 1);
            if stream.write_all(chunk.as_bytes()).await.is_err() {
                return;
            }
        }
        sent += lines.len();
        let _ = stream.flush().await;
        if !follow || closed {
            break;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), changed).await;
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let _ = stream.shutdown().await;
}

/// A Ready node at this server, kept Ready by a heartbeat for as long as the test runs.
async fn register_node(client: &Client, port: u16) {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": "graft-test-node", "labels": {"kubernetes.io/hostname": "graft-test-node"}},
    }))
    .expect("a Node");
    nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("create the Node");
    let status = move || {
        let now = Timestamp::now().to_string();
        let room = json!({"cpu": "64", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": "8"});
        json!({"status": {
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
            "capacity": room, "allocatable": room,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "the test plays the kubelet",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}],
        }})
    };
    nodes
        .patch_status(
            "graft-test-node",
            &PatchParams::default(),
            &Patch::Merge(status()),
        )
        .await
        .expect("the Node's status");
    let client = client.clone();
    tokio::spawn(async move {
        let nodes: Api<Node> = Api::all(client);
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let _ = nodes
                .patch_status(
                    "graft-test-node",
                    &PatchParams::default(),
                    &Patch::Merge(status()),
                )
                .await;
        }
    });
}
