//! `graft-trainer`: trains a LoRA / QLoRA adapter from a rendered FineTuneJob spec.
//!
//! This first cut checks a config the way the training run will read it; training itself
//! arrives with the engine (issue 4).

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use graft_api::FineTuneJobSpec;
use graft_engine::storage::ObjectUri;

/// Exit code for a bad config: the Job's podFailurePolicy fails fast on it instead of retrying.
const EXIT_CONFIG_ERROR: u8 = 2;
const TERMINATION_LOG: &str = "/dev/termination-log";

#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Parse a training config (a FineTuneJob spec, YAML or JSON) and check its URIs.
    CheckConfig {
        /// The rendered FineTuneJob spec.
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line, so the pod's termination message (and the Failed condition built
            // from it) reads as a sentence.
            let reason = format!("{err:#}").replace('\n', " ");
            eprintln!("graft-trainer: {reason}");
            // Outside a pod the termination log is absent or read-only; stderr suffices then.
            let _ = std::fs::write(TERMINATION_LOG, &reason);
            ExitCode::from(EXIT_CONFIG_ERROR)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::CheckConfig { config } => {
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("reading config {}", config.display()))?;
            let spec: FineTuneJobSpec = serde_yaml::from_str(&text)
                .with_context(|| format!("parsing config {}", config.display()))?;
            for (field, uri) in [
                ("baseModel.uri", &spec.base_model.uri),
                ("dataset.uri", &spec.dataset.uri),
                ("output.uri", &spec.output.uri),
            ] {
                uri.parse::<ObjectUri>()
                    .with_context(|| format!("spec.{field}"))?;
            }
            Ok(())
        }
    }
}
