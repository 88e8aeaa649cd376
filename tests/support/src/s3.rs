use std::{path::PathBuf, process::Command, time::Instant};

use tokio::sync::OnceCell;

use crate::{
    control_plane::{free_port, random_hex, wait_for_port},
    process::{self, Process},
    tool, unique_name,
};

/// A real S3-protocol server (`s3s-fs`) on 127.0.0.1 with its own credentials, storing
/// buckets as directories under a scratch root.
#[derive(Debug)]
pub struct S3Server {
    endpoint: String,
    access_key_id: String,
    secret_access_key: String,
    root: PathBuf,
    process: Process,
}

static SHARED: OnceCell<S3Server> = OnceCell::const_new();

impl S3Server {
    /// The S3 server of this test binary, started on first use.
    pub async fn shared() -> &'static S3Server {
        SHARED.get_or_init(Self::start).await
    }

    async fn start() -> Self {
        let started = Instant::now();
        let dir = process::scratch_dir("graft-s3-");
        let root = dir.join("data");
        std::fs::create_dir(&root).expect("creating the S3 root");
        let port = free_port();
        let access_key_id = format!("graft{}", random_hex(6));
        let secret_access_key = random_hex(20);
        let mut command = Command::new(tool("s3s-fs"));
        command
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--access-key",
                &access_key_id,
                "--secret-key",
                &secret_access_key,
            ])
            .arg(&root);
        let process = process::spawn("s3s-fs", command, &dir);
        wait_for_port(&process, port).await;
        eprintln!(
            "graft-testenv: S3 server ready on 127.0.0.1:{port} in {:.1?}",
            started.elapsed()
        );
        Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            access_key_id,
            secret_access_key,
            root,
            process,
        }
    }

    /// `http://127.0.0.1:<port>`: needs path-style requests.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    pub fn secret_access_key(&self) -> &str {
        &self.secret_access_key
    }

    /// The region to sign requests for (the server accepts any).
    pub fn region(&self) -> &'static str {
        "us-east-1"
    }

    /// The engine's options for this server: its endpoint, region and credentials.
    pub fn options(&self) -> graft_engine::storage::S3Options {
        graft_engine::storage::S3Options {
            endpoint: Some(self.endpoint.clone()),
            region: Some(self.region().to_owned()),
            access_key_id: Some(self.access_key_id.clone()),
            secret_access_key: Some(self.secret_access_key.clone()),
            session_token: None,
        }
    }

    /// The store and prefix behind `uri` (an `s3://` URI in this server).
    ///
    /// # Panics
    /// When `uri` is not a valid object-store URI.
    pub fn location(&self, uri: &str) -> graft_engine::storage::Location {
        let parsed: graft_engine::storage::ObjectUri = uri.parse().expect("an object-store URI");
        graft_engine::storage::open(&parsed, &self.options()).expect("opening the test S3 server")
    }

    /// Creates an empty bucket with a name unique to this run and returns the name.
    pub fn bucket(&self, prefix: &str) -> String {
        assert!(
            self.process.is_running(),
            "s3s-fs died:\n{}",
            self.process.log_tail()
        );
        let name = unique_name(prefix);
        // s3s-fs keeps each bucket as a directory under its root.
        std::fs::create_dir(self.root.join(&name)).expect("creating a bucket");
        name
    }
}
