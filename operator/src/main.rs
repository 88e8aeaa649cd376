//! `graft-operator`: the Graft Kubernetes operator.

use std::{io::Write, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use graft_operator::{
    adapter_deployment,
    fine_tune_job::{self, Context, Schemes, Settings, TrainerDefaults},
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
    /// Output URI schemes FineTuneJobs may write to. `file` writes into the training pod (or a
    /// volume): allow it only where that is what you want.
    #[arg(long, value_delimiter = ',', default_value = "s3")]
    output_uri_schemes: Vec<String>,
    /// Seconds between checks of a job waiting for its Secret.
    #[arg(long, default_value_t = 10)]
    blocked_retry_seconds: u64,
    /// Reconciles run at once (0: unbounded).
    #[arg(long, default_value_t = 16)]
    max_concurrent_reconciles: u16,
    /// Watch only this namespace (default: all).
    #[arg(long)]
    namespace: Option<String>,
    /// With --namespace: another namespace whose graft-server Deployments the watched
    /// namespace's AdapterDeployments may use (with a ServerGrant there). Repeatable.
    #[arg(long = "server-namespace")]
    server_namespaces: Vec<String>,
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
    /// The operator's bearer token for the servers' admin API: its ServiceAccount token,
    /// projected with the servers' audience (the kubelet rotates it; it is re-read on use).
    #[arg(long, default_value = "/var/run/secrets/graft.dev/admin/token")]
    admin_token_file: std::path::PathBuf,
    /// CA bundle (PEM) for servers whose admin API serves TLS (`graft.dev/admin-scheme:
    /// https`); their certificates must name `<server>.<namespace>.svc`. The system's roots
    /// when unset.
    #[arg(long)]
    admin_ca_file: Option<std::path::PathBuf>,
    /// Adapter URIs the AdapterDeployments of a namespace may load:
    /// `namespace=prefix[,prefix...]`, `*` for namespaces not listed. Repeatable. Without any,
    /// every URI may be loaded.
    #[arg(long = "adapter-uri-prefixes")]
    adapter_uri_prefixes: Vec<String>,
    /// How long deleting an AdapterDeployment waits for server pods that do not answer before
    /// it gives up on them (with a Warning Event; the sweep unloads it once they answer).
    #[arg(long, default_value_t = 120)]
    unload_timeout_seconds: u64,
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
    let timings = timings(&args)?;
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
            schemes: Schemes {
                model: args.model_uri_schemes.clone(),
                output: args.output_uri_schemes.clone(),
            },
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
    let ad_ctx = Arc::new(adapter_deployment::Context::new(
        client.clone(),
        adapter_settings(&args)?,
        ctx.recorder.clone(),
        metrics.clone(),
    ));
    let work = {
        let (health, metrics, shutdown) = (health.clone(), metrics.clone(), shutdown.clone());
        async move {
            metrics.set_leader(true);
            let (jobs, store) = fine_tune_job::controller(ctx, shutdown.clone().cancelled_owned());
            health.watch_jobs(store);
            let deployments =
                adapter_deployment::controller(ad_ctx.clone(), shutdown.clone().cancelled_owned());
            futures::join!(
                jobs.for_each(|()| async {}),
                deployments.for_each(|()| async {}),
                adapter_deployment::sweeper(ad_ctx, shutdown.cancelled_owned()),
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
            timings,
        );
        let led = Box::pin(lock.lead(work, shutdown.clone().cancelled_owned())).await;
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

/// The leader election's timings, checked when there is an election.
fn timings(args: &RunArgs) -> anyhow::Result<Timings> {
    let timings = Timings {
        lease_duration: Duration::from_secs(args.lease_duration_seconds),
        renew_deadline: Duration::from_secs(args.renew_deadline_seconds),
        retry_period: Duration::from_secs(args.retry_period_seconds),
    };
    if args.leader_elect {
        timings
            .validate()
            .map_err(anyhow::Error::msg)
            .context("the leader election timings")?;
    }
    Ok(timings)
}

fn adapter_settings(args: &RunArgs) -> anyhow::Result<adapter_deployment::Settings> {
    Ok(adapter_deployment::Settings {
        namespace: args.namespace.clone(),
        server_namespaces: args.server_namespaces.clone(),
        recheck: Duration::from_secs(args.adapter_recheck_seconds),
        admin_token_file: args.admin_token_file.clone(),
        admin_ca_file: args.admin_ca_file.clone(),
        sources: adapter_deployment::SourcePolicy::parse(&args.adapter_uri_prefixes)
            .map_err(anyhow::Error::msg)
            .context("--adapter-uri-prefixes")?,
        unload_timeout: Duration::from_secs(args.unload_timeout_seconds),
    })
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
