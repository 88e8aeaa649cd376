//! `kubectl graft`: Graft's FineTuneJobs and AdapterDeployments from the terminal. kubectl
//! runs any `kubectl-graft` on the PATH as `kubectl graft`; the plugin reads the same
//! kubeconfig (`KUBECONFIG`, current context) as kubectl does.

mod edit;
mod logs;
mod loss;
mod status;
mod table;

use std::io::Write;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};

#[derive(Parser, Debug)]
#[command(name = "kubectl graft", version, about)]
struct Cli {
    /// The namespace; the kubeconfig context's by default.
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    context: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// FineTuneJobs and AdapterDeployments of a namespace in one table.
    Status {
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// A FineTuneJob's loss curve, drawn from the history the trainer keeps in its status.
    Loss {
        job: String,
        /// Columns of the plot.
        #[arg(long, default_value_t = 72, value_parser = clap::value_parser!(u16).range(16..=400))]
        width: u16,
        /// Rows of the plot.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(4..=100))]
        height: u16,
    },
    /// Make VERSION the only version of an AdapterDeployment (all traffic), then wait until
    /// every server pod serves it.
    Promote {
        deployment: String,
        /// A FineTuneJob name, or an adapter URI (with --sha256).
        version: String,
        #[command(flatten)]
        edit: EditArgs,
    },
    /// Send PERCENT of an adapter's requests to VERSION and the rest to its current version,
    /// then wait until every server pod serves both.
    Canary {
        deployment: String,
        /// A FineTuneJob name, or an adapter URI (with --sha256).
        version: String,
        #[arg(value_parser = clap::value_parser!(u32).range(1..=99))]
        percent: u32,
        #[command(flatten)]
        edit: EditArgs,
    },
    /// The trainer's logs, every attempt (retried pod) in order.
    Logs {
        job: String,
        /// Keep following new output and retries until the job finishes.
        #[arg(short, long)]
        follow: bool,
    },
}

#[derive(Args, Debug)]
struct EditArgs {
    /// SHA-256 of the version's weights file (adapter_model.safetensors, or a bottleneck
    /// adapter's adapter.safetensors), when VERSION is a URI.
    #[arg(long)]
    sha256: Option<String>,
    /// Seconds to wait for the AdapterDeployment to turn Ready.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Change `spec.versions` even where a GitOps controller (Argo CD, Flux) manages it; it
    /// puts its own back on its next sync. Versions set by hand are always taken over.
    #[arg(long)]
    force_conflicts: bool,
    /// Print the edited AdapterDeployment (to commit it to Git) instead of applying it.
    #[arg(long)]
    dry_run: bool,
}

impl EditArgs {
    /// The edit of `deployment` that makes `version` the only one, or gives it `percent`.
    fn request(
        &self,
        deployment: &str,
        version: &str,
        percent: Option<u32>,
    ) -> anyhow::Result<edit::Request> {
        let source = edit::parse_version(version, self.sha256.as_deref())?;
        Ok(edit::Request {
            deployment: deployment.to_owned(),
            change: match percent {
                Some(percent) => edit::Change::Canary(source, percent),
                None => edit::Change::Promote(source),
            },
            timeout: std::time::Duration::from_secs(self.timeout),
            force_conflicts: self.force_conflicts,
            dry_run: self.dry_run,
        })
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = config(cli.context.as_deref()).await?;
    let namespace = cli
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).context("building the Kubernetes client")?;
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Status { all_namespaces } => {
            let scope = (!all_namespaces).then_some(namespace.as_str());
            let text = status::render(&client, scope).await?;
            out.write_all(text.as_bytes())?;
        }
        Command::Loss { job, width, height } => {
            let text = loss::render(&client, &namespace, &job, width.into(), height.into()).await?;
            out.write_all(text.as_bytes())?;
        }
        Command::Promote {
            deployment,
            version,
            edit,
        } => {
            let request = edit.request(&deployment, &version, None)?;
            edit::run(&client, &namespace, &request, &mut out).await?;
        }
        Command::Canary {
            deployment,
            version,
            percent,
            edit,
        } => {
            let request = edit.request(&deployment, &version, Some(percent))?;
            edit::run(&client, &namespace, &request, &mut out).await?;
        }
        Command::Logs { job, follow } => {
            logs::run(&client, &namespace, &job, follow, &mut out).await?;
        }
    }
    out.flush()?;
    Ok(())
}

/// The kubeconfig as kubectl reads it, or the pod's service account inside a cluster.
async fn config(context: Option<&str>) -> anyhow::Result<Config> {
    let Some(context) = context else {
        return Config::infer()
            .await
            .context("reading the kubeconfig (KUBECONFIG or ~/.kube/config)");
    };
    let kubeconfig = Kubeconfig::read().context("reading the kubeconfig")?;
    let options = KubeConfigOptions {
        context: Some(context.to_owned()),
        ..KubeConfigOptions::default()
    };
    Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .with_context(|| format!("kubeconfig context {context}"))
}
