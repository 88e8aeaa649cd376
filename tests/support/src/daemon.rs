//! Long-running programs under test (the operator, the server): started against the shared
//! control plane, logged to a file, and killable mid-run.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::{
    control_plane::{free_port, wait_for_port},
    process::{self, Process},
};

/// A program under test, stopped when the test binary exits if the test didn't stop it.
#[derive(Debug)]
pub struct Daemon {
    process: Process,
    port: u16,
    port2: u16,
}

impl Daemon {
    /// Starts `program` with `args` and `KUBECONFIG` set to `kubeconfig` (e.g.
    /// [`crate::ControlPlane::kubeconfig`]). `{port}` in an argument becomes a free port, which the
    /// program must listen on before this returns; `{port2}` another free port (a second
    /// listener, e.g. an admin API), listened on too when used.
    ///
    /// # Panics
    /// When the program cannot start or never listens.
    pub async fn start(kubeconfig: &Path, name: &str, program: &str, args: &[&str]) -> Self {
        let kubeconfig = kubeconfig.to_string_lossy();
        Self::start_with_env(name, program, args, &[("KUBECONFIG", &kubeconfig)]).await
    }

    /// Like [`Daemon::start`], with `env` added to the program's environment instead of a
    /// kubeconfig.
    ///
    /// # Panics
    /// When the program cannot start or never listens.
    pub async fn start_with_env(
        name: &str,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let (port, port2) = (free_port(), free_port());
        let mut command = Command::new(program);
        command
            .args(args.iter().map(|a| {
                a.replace("{port}", &port.to_string())
                    .replace("{port2}", &port2.to_string())
            }))
            .envs(env.iter().copied());
        let dir = process::scratch_dir("graft-daemon-");
        let process = process::spawn(name, command, &dir);
        wait_for_port(&process, port).await;
        if args.iter().any(|a| a.contains("{port2}")) {
            wait_for_port(&process, port2).await;
        }
        Self {
            process,
            port,
            port2,
        }
    }

    /// The port substituted for `{port}`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The port substituted for `{port2}`.
    pub fn port2(&self) -> u16 {
        self.port2
    }

    pub fn pid(&self) -> u32 {
        self.process.pid
    }

    pub fn log_path(&self) -> PathBuf {
        self.process.log.clone()
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.process.log).unwrap_or_default()
    }

    pub fn is_running(&self) -> bool {
        self.process.is_running()
    }

    /// SIGKILL: the program gets no chance to clean up, as when its node dies.
    pub fn kill(&self) {
        self.process.signal(libc::SIGKILL);
        self.process.wait(Duration::from_secs(10));
    }

    /// SIGTERM, then waits for the program to exit (as a pod's graceful shutdown).
    ///
    /// # Panics
    /// When the program is still running after `grace`.
    pub fn terminate(&self, grace: Duration) {
        self.process.signal(libc::SIGTERM);
        assert!(
            self.process.wait(grace),
            "{} still running {grace:?} after SIGTERM:\n{}",
            self.process.name,
            self.process.log_tail()
        );
    }
}

/// Polls `check` every 250 ms until it holds.
///
/// # Panics
/// When it doesn't hold within `timeout`.
pub async fn eventually(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
