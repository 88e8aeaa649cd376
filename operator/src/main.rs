//! `graft-operator`: the Graft Kubernetes operator.

use std::{io::Write, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use graft_engine::storage::S3Options;
use graft_operator::{
    adapter_deployment,
    fine_tune_job::{self, Context, Settings, TrainerDefaults},
    http::{self, Health},
    leader::{LeaseLock, Timings},
    metrics::Metrics,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{
    Client,
    runtime::events::{Recorder, Reporter},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML (what `crds/` and the chart hold).
    Crd,
    /// Print the API reference of both kinds as Markdown (what `docs/reference/api.md` holds).
    Docs,
    /// Run the controllers.
    Run(Box<RunArgs>),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Trainer image for FineTuneJobs that don't set `spec.image`.
    #[arg(long, env = "GRAFT_TRAINER_IMAGE")]
    trainer_image: String,
    /// Size limit of the emptyDir a training pod downloads its base model into.
    #[arg(long, default_value = "100Gi")]
    model_cache_size: String,
    /// Training pod failures (disruptions not counted) before a job fails.
    #[arg(long, default_value_t = 3)]
    backoff_limit: i32,
    /// Base-model URI schemes the trainers can read. `hf` (the Hugging Face hub) is off until
    /// the trainer can download from it.
    #[arg(long, value_delimiter = ',', default_value = "s3,file")]
    model_uri_schemes: Vec<String>,
    /// Seconds between checks of a job waiting for its Secret.
    #[arg(long, default_value_t = 10)]
    blocked_retry_seconds: u64,
    /// Reconciles run at once (0: unbounded).
    #[arg(long, default_value_t = 16)]
    max_concurrent_reconciles: u16,
    /// Watch only this namespace (default: all).
    #[arg(long)]
    namespace: Option<String>,
    /// Port of /healthz, /readyz and /metrics.
    #[arg(long, default_value_t = 8080)]
    metrics_port: u16,
    /// Run only while holding the leader Lease (for more than one replica).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Namespace of the leader Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    leader_election_namespace: String,
    #[arg(long, default_value = "graft-operator")]
    lease_name: String,
    /// This replica's name in the Lease (default: the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    #[arg(long, default_value_t = 10)]
    renew_deadline_seconds: u64,
    #[arg(long, default_value_t = 2)]
    retry_period_seconds: u64,
    /// How often each AdapterDeployment is compared with what its server pods serve (drift
    /// repair; changes are acted on at once regardless).
    #[arg(long, default_value_t = 30)]
    adapter_recheck_seconds: u64,
    /// S3 endpoint for reading adapter manifests (credentials from the AWS_* environment).
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    s3_endpoint: Option<String>,
    #[arg(long, env = "AWS_REGION")]
    s3_region: Option<String>,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => {
            let yaml = graft_api::crds_yaml().context("serialising the CRDs")?;
            std::io::stdout()
                .lock()
                .write_all(yaml.as_bytes())
                .context("writing the CRDs to stdout")?;
            Ok(())
        }
        Command::Docs => std::io::stdout()
            .lock()
            .write_all(graft_api::api_reference().as_bytes())
            .context("writing the API reference to stdout"),
        Command::Run(args) => {
            init_logging();
            tokio::runtime::Runtime::new()
                .context("starting the async runtime")?
                .block_on(run(*args))
        }
    }
}

/// JSON lines on stdout; the reconcile span puts the object's namespace and name on each.
fn init_logging() {
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));

    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::new(metrics.clone()));
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", args.metrics_port))
        .await
        .with_context(|| format!("binding port {}", args.metrics_port))?;
    let server = tokio::spawn(http::serve(
        listener,
        health.clone(),
        shutdown.clone().cancelled_owned(),
    ));

    let client = Client::try_default()
        .await
        .context("configuring the Kubernetes client")?;
    let version = client
        .apiserver_version()
        .await
        .context("reaching the apiserver")?;
    info!(apiserver = %version.git_version, "connected");
    health.set_ready();

    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let ctx = Arc::new(Context {
        client: client.clone(),
        settings: Settings {
            trainer: TrainerDefaults {
                image: args.trainer_image.clone(),
                model_cache_size: Quantity(args.model_cache_size.clone()),
                backoff_limit: args.backoff_limit,
            },
            model_schemes: args.model_uri_schemes.clone(),
            blocked_retry: Duration::from_secs(args.blocked_retry_seconds),
            namespace: args.namespace.clone(),
            concurrency: args.max_concurrent_reconciles,
        },
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: graft_operator::FIELD_MANAGER.to_owned(),
                instance: Some(identity.clone()),
            },
        ),
        metrics: metrics.clone(),
    });
    let ad_ctx = Arc::new(adapter_deployment::Context {
        client: client.clone(),
        settings: adapter_deployment::Settings {
            namespace: args.namespace.clone(),
            recheck: Duration::from_secs(args.adapter_recheck_seconds),
            s3: S3Options::from_env(args.s3_endpoint.clone(), args.s3_region.clone()),
        },
        recorder: ctx.recorder.clone(),
        metrics: metrics.clone(),
    });
    let work = {
        let (health, metrics, shutdown) = (health.clone(), metrics.clone(), shutdown.clone());
        async move {
            metrics.set_leader(true);
            let (jobs, store) = fine_tune_job::controller(ctx, shutdown.clone().cancelled_owned());
            health.watch_jobs(store);
            let deployments = adapter_deployment::controller(ad_ctx, shutdown.cancelled_owned());
            futures::join!(
                jobs.for_each(|()| async {}),
                deployments.for_each(|()| async {})
            );
            metrics.set_leader(false);
        }
    };

    let outcome = if args.leader_elect {
        let lock = LeaseLock::new(
            client,
            &args.leader_election_namespace,
            &args.lease_name,
            &identity,
            Timings {
                lease_duration: Duration::from_secs(args.lease_duration_seconds),
                renew_deadline: Duration::from_secs(args.renew_deadline_seconds),
                retry_period: Duration::from_secs(args.retry_period_seconds),
            },
        );
        let led = lock.lead(work, shutdown.clone().cancelled_owned()).await;
        if let Err(e) = lock.release().await {
            warn!(error = %e, "releasing the leader Lease");
        }
        led.map(|_| ()).map_err(anyhow::Error::from)
    } else {
        work.await;
        Ok(())
    };
    // Losing the Lease ends the process: a restarted replica rejoins the election cleanly.
    shutdown.cancel();
    server.await.context("the HTTP server task")??;
    outcome
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    info!("shutting down");
    shutdown.cancel();
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}
