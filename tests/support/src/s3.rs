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
    dir: PathBuf,
    port: u16,
    /// `None` while stopped ([`S3Server::stop`]).
    process: std::sync::Mutex<Option<Process>>,
}

static SHARED: OnceCell<S3Server> = OnceCell::const_new();

impl S3Server {
    /// The S3 server of this test binary, started on first use.
    pub async fn shared() -> &'static S3Server {
        SHARED.get_or_init(Self::launch).await
    }

    async fn launch() -> Self {
        let started = Instant::now();
        let dir = process::scratch_dir("graft-s3-");
        let root = dir.join("data");
        std::fs::create_dir(&root).expect("creating the S3 root");
        let port = free_port();
        let server = Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            access_key_id: format!("graft{}", random_hex(6)),
            secret_access_key: random_hex(20),
            root,
            dir,
            port,
            process: std::sync::Mutex::new(None),
        };
        server.start().await;
        eprintln!(
            "graft-testenv: S3 server ready on 127.0.0.1:{port} in {:.1?}",
            started.elapsed()
        );
        server
    }

    fn spawn(&self) -> Process {
        let mut command = Command::new(tool("s3s-fs"));
        command
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--access-key",
                &self.access_key_id,
                "--secret-key",
                &self.secret_access_key,
            ])
            .arg(&self.root);
        process::spawn("s3s-fs", command, &self.dir)
    }

    /// Starts the server (again, after [`S3Server::stop`]) on its port, with its data.
    ///
    /// # Panics
    /// When it does not listen.
    pub async fn start(&self) {
        let process = self.spawn();
        wait_for_port(&process, self.port).await;
        *self.process() = Some(process);
    }

    /// Kills the server (SIGKILL): requests fail until [`S3Server::start`].
    pub fn stop(&self) {
        if let Some(process) = self.process().take() {
            process.signal(libc::SIGKILL);
            process.wait(std::time::Duration::from_secs(10));
        }
    }

    fn process(&self) -> std::sync::MutexGuard<'_, Option<Process>> {
        self.process
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
        if let Some(process) = &*self.process() {
            assert!(process.is_running(), "s3s-fs died:\n{}", process.log_tail());
        }
        let name = unique_name(prefix);
        // s3s-fs keeps each bucket as a directory under its root.
        std::fs::create_dir(self.root.join(&name)).expect("creating a bucket");
        name
    }
}
