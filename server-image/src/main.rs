//! `graft-server`: see the library for what it does.

use clap::Parser;
use graft_server::{cli::Args, serve};
use tracing_subscriber::EnvFilter;

// Every request allocates activations per step; mimalloc keeps that cheap.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    let termination_log = args.termination_log.clone();
    if let Err(e) = serve(args, shutdown).await {
        tracing::error!(error = %e, "graft-server failed");
        // One line, so `kubectl get pod -o yaml` (lastState.terminated.message) shows it whole.
        let reason = e.to_string().replace('\n', " ");
        let _ = std::fs::write(&termination_log, &reason);
        return Err(e.into());
    }
    Ok(())
}
