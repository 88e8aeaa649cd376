//! `graft-server`: see the library for what it does.

use clap::Parser;
use graft_server::{cli::Args, serve};
use tracing_subscriber::EnvFilter;

// Every request allocates activations per step; mimalloc keeps that cheap.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    fix_thread_count();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

/// candle asks for the CPU thread count on every matrix product (and so does the engine's own
/// gemm, to match it), and without `RAYON_NUM_THREADS` each answer came from parsing
/// `/proc/cpuinfo`: 5% of a CPU decoding step on 2 cores, more on a node with many. Set once,
/// to the threads rayon's pool has anyway (the CPUs this process may use, its cgroup's limit
/// included), before any thread exists.
fn fix_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        #[allow(unsafe_code)]
        // SAFETY: no other thread exists yet, so nothing reads the environment concurrently.
        unsafe {
            std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        }
    }
}

async fn run() -> anyhow::Result<()> {
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
