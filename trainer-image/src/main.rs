//! `graft-trainer`: trains a LoRA / QLoRA adapter from a rendered FineTuneJob spec.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use graft_engine::{
    device::DeviceChoice,
    models::{Config, Precision},
};
use graft_trainer::{
    job::{self, JobError},
    memory,
    tiny::{TinySpec, write_tiny_model},
};

// Training allocates and frees activation-sized buffers on every op; glibc's malloc hands
// large ones back to the kernel each time, and the page faults of getting them again cost
// more than a third of a CPU training step. mimalloc keeps them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` (the same index in its v2 and v3 headers).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Every step frees and reallocates the same activation buffers, so freed pages are kept
/// instead of handed back to the kernel a second later: handed back, each step faulted them in
/// again, zeroed (30× the page faults, about 15% of a CPU step), for no lower peak RSS.
/// `MIMALLOC_PURGE_DELAY` in the environment still wins.
fn keep_freed_pages() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        #[allow(unsafe_code)]
        // SAFETY: setting an option is a plain store mimalloc allows at any time.
        unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        }
    }
}

#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Where the kubelet reads the container's termination message (the pod's
    /// `terminationMessagePath`): the adapter's JSON on success, the reason on failure.
    #[arg(
        long,
        global = true,
        env = "GRAFT_TERMINATION_LOG",
        default_value = "/dev/termination-log"
    )]
    termination_log: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train an adapter as the config says and publish it to the output URI.
    Train {
        /// The rendered FineTuneJob spec (YAML or JSON).
        #[arg(long)]
        config: PathBuf,
        /// Where a downloaded base model is kept (an emptyDir in a pod, so a retried pod
        /// reuses it).
        #[arg(long, env = "GRAFT_CACHE_DIR", default_value = "/tmp/graft-cache")]
        cache_dir: PathBuf,
        /// auto (the GPU when this build has CUDA and one is present), cpu, cuda or
        /// cuda:<ordinal>.
        #[arg(long, env = "GRAFT_DEVICE", default_value = "auto")]
        device: DeviceChoice,
    },
    /// Parse a training config and check its URIs, without training.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Write a tiny Llama model with random weights and a tokenizer trained on a text file,
    /// in Hugging Face's format, for tests and the local quick start.
    MakeTinyModel {
        /// An empty or new directory.
        #[arg(long)]
        out: PathBuf,
        /// Text to train the tokenizer on: one document per line.
        #[arg(long)]
        corpus: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The most tokens the tokenizer may learn (a small corpus may give fewer).
        #[arg(long, default_value_t = 512)]
        vocab_size: usize,
        #[arg(long, default_value_t = 64)]
        hidden_size: usize,
        #[arg(long, default_value_t = 128)]
        intermediate_size: usize,
        #[arg(long, default_value_t = 2)]
        layers: usize,
        #[arg(long, default_value_t = 4)]
        heads: usize,
        #[arg(long, default_value_t = 2)]
        kv_heads: usize,
        /// Standard deviation of the random weights. Wider than a real model's 0.02 by
        /// default: the frozen LM head of a narrow model at 0.02 cannot move a logit by more
        /// than about one nat, so no adapter could teach it anything.
        #[arg(long, default_value_t = 0.2)]
        init_std: f32,
    },
    /// Print the modelled peak GPU memory of a training step (bf16 compute, layer
    /// recomputation, LoRA on every projection), part by part.
    MemoryModel {
        /// A model's config.json; Llama-3-8B's when not given.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 2048)]
        seq: usize,
        #[arg(long, default_value_t = 16)]
        rank: usize,
        /// nf4 (QLoRA) or none.
        #[arg(long, default_value = "nf4")]
        quantization: String,
        /// DoRA (`method.lora.useDora`).
        #[arg(long)]
        dora: bool,
    },
}

fn main() -> ExitCode {
    keep_freed_pages();
    // The cores to train on (RAYON_NUM_THREADS, or all), then one shard per core with
    // single-threaded matmuls; see `backward::set_shards`.
    graft_trainer::backward::set_shards(candle_core::utils::get_num_threads());
    #[allow(unsafe_code)]
    // SAFETY: no other thread exists yet, so nothing reads the environment concurrently.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    let cli = Cli::parse();
    let termination_log = cli.termination_log;
    let result = match cli.command {
        Command::Train {
            config,
            cache_dir,
            device,
        } => job::read_config(&config)
            .and_then(|config| {
                let device = device
                    .open()
                    .map_err(|e| JobError::BadInput(e.to_string()))?;
                job::run(&config, &cache_dir, &device)
            })
            .map(|result| {
                // One JSON line: the operator copies it into status.adapter.
                let line = serde_json::to_string(&result).expect("serialisable");
                let _ = std::fs::write(&termination_log, &line);
                eprintln!("graft-trainer: adapter published: {line}");
            }),
        Command::CheckConfig { config } => job::read_config(&config).map(|_| ()),
        Command::MemoryModel {
            config,
            batch,
            seq,
            rank,
            quantization,
            dora,
        } => memory_model(config.as_deref(), batch, seq, rank, &quantization, dora)
            .map_err(|e| JobError::BadInput(format!("{e:#}"))),
        Command::MakeTinyModel {
            out,
            corpus,
            seed,
            vocab_size,
            hidden_size,
            intermediate_size,
            layers,
            heads,
            kv_heads,
            init_std,
        } => {
            let spec = TinySpec {
                seed,
                vocab_size,
                hidden_size,
                intermediate_size,
                num_layers: layers,
                num_heads: heads,
                num_kv_heads: kv_heads,
                init_std,
                ..TinySpec::default()
            };
            make_tiny_model(&out, &corpus, &spec).map_err(|e| JobError::BadInput(format!("{e:#}")))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line, so the pod's termination message (and the Failed condition built
            // from it) reads as a sentence.
            let reason = err.to_string().replace('\n', " ");
            eprintln!("graft-trainer: {reason}");
            // Outside a pod the termination log is absent or read-only; stderr suffices then.
            let _ = std::fs::write(&termination_log, &reason);
            ExitCode::from(err.exit_code())
        }
    }
}

fn memory_model(
    config: Option<&std::path::Path>,
    batch: usize,
    seq: usize,
    rank: usize,
    quantization: &str,
    dora: bool,
) -> anyhow::Result<()> {
    let text = match config {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        None => memory::LLAMA_3_8B.to_owned(),
    };
    let config = Config::from_json(&text).context("the model's config")?;
    let precision = match quantization {
        "nf4" => Precision::Nf4,
        "none" => Precision::Dense,
        other => anyhow::bail!("--quantization {other:?}: expected nf4 or none"),
    };
    let shape = memory::StepShape {
        batch,
        seq,
        rank,
        sites: config.sites().to_vec(),
        precision,
        compute_bytes: 2,
        dropout: true,
        dora,
        runtime_bytes: 1 << 30,
    };
    let estimate = memory::training_step(&config, &shape);
    #[allow(clippy::print_stdout)]
    {
        let dora = if dora { ", DoRA" } else { "" };
        println!("batch {batch} × {seq} tokens, rank {rank}{dora}, {quantization}, bf16:");
        print!("{}", estimate.table());
    }
    Ok(())
}

fn make_tiny_model(
    out: &std::path::Path,
    corpus: &std::path::Path,
    spec: &TinySpec,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(corpus)
        .with_context(|| format!("reading the corpus {}", corpus.display()))?;
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let made = write_tiny_model(out, spec, &lines).context("writing the tiny model")?;
    eprintln!(
        "graft-trainer: wrote {} ({} parameters, {} tokens)",
        out.display(),
        made.num_parameters,
        made.vocab_size
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(unsafe_code)]
    fn purge_delay() -> std::ffi::c_long {
        // SAFETY: reading an option is a plain load.
        unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }
    }

    #[test]
    fn freed_pages_are_kept() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            // The index names purge_delay: its documented default is a second.
            assert_eq!(purge_delay(), 1000);
        }
        keep_freed_pages();
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(purge_delay(), -1);
        }
    }
}
