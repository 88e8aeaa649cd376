//! `graft-server`: one base model, many LoRA adapters, OpenAI-compatible HTTP.
//!
//! Only the command line exists so far: serving arrives with issue 5. Until then the binary
//! refuses to start rather than pretend to serve.

use anyhow::{Context, bail};
use clap::Parser;
use graft_engine::storage::ObjectUri;

#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// The base model: `s3://`, `file://` or `hf://`.
    #[arg(long, env = "GRAFT_MODEL")]
    model: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let model: ObjectUri = cli.model.parse().context("--model")?;
    bail!("cannot serve {model}: inference is not built yet (tracked in issue 5)")
}
