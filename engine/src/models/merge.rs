//! Base + adapter merged into a standalone Hugging Face model, for users who serve elsewhere:
//! every adapted projection's weight becomes `W + scale · B · A` (computed in f32, stored in the
//! checkpoint's own dtype; a DoRA pair's rows are then rescaled, `r ⊙ (W + scale · B · A)` with
//! `r = m / ‖W + scale · B · A‖`, as PEFT merges DoRA), every other tensor and file is the base's unchanged, and the
//! safetensors files keep their names and grouping, so a shard index stays valid as it is.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use candle_core::{DType, Device, Tensor};

use super::{Checkpoint, ModelFiles};
use crate::adapters::{Adapter, Lora};

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(
        "a merged model is written from a Hugging Face safetensors checkpoint; this base is {0}"
    )]
    Unsupported(&'static str),
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Safetensors {
        path: PathBuf,
        source: safetensors::SafeTensorError,
    },
    #[error("merging {name}: {source}")]
    Tensor {
        name: String,
        source: candle_core::Error,
    },
    #[error("the adapter's {0} has no weight in the checkpoint")]
    Missing(String),
    #[error("writing {name}: {reason}")]
    Write { name: String, reason: String },
}

/// Whether `base` can be merged into: refused before a run trains, not after.
pub fn check_mergeable(base: &Checkpoint) -> Result<(), MergeError> {
    match base.files() {
        ModelFiles::Gguf(_) => Err(MergeError::Unsupported("a GGUF file")),
        ModelFiles::Directory(_) if base.prequantized().is_some() => Err(MergeError::Unsupported(
            "pre-quantized (bitsandbytes 4-bit); merge into its dense original",
        )),
        ModelFiles::Directory(_) => Ok(()),
    }
}

/// The merged model's files, `(name, bytes)`, one at a time: each safetensors file of the
/// base with its adapted weights replaced, then every other file of the directory as it is.
/// `emit` is called once per file, so at most one shard is held at a time.
pub fn merged_files(
    base: &Checkpoint,
    adapter: &Adapter,
    mut emit: impl FnMut(String, Vec<u8>) -> Result<(), MergeError>,
) -> Result<(), MergeError> {
    check_mergeable(base)?;
    let dir = base.files().path();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read(dir))? {
        let entry = entry.map_err(read(dir))?;
        if entry.file_type().map_err(read(dir))?.is_file() {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    // Pairs by the name of the weight they adapt; each is taken out once merged.
    let mut pending: BTreeMap<String, &Lora> = adapter
        .weights
        .iter()
        .map(|(&(layer, site), lora)| (format!("{}.weight", site.module(layer)), lora))
        .collect();
    for name in names {
        let path = dir.join(&name);
        let bytes = std::fs::read(&path).map_err(read(&path))?;
        if Path::new(&name)
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
        {
            emit(name, merge_file(&path, &bytes, &mut pending)?)?;
        } else {
            emit(name, bytes)?;
        }
    }
    match pending.into_keys().next() {
        Some(missing) => Err(MergeError::Missing(missing)),
        None => Ok(()),
    }
}

fn read(path: &Path) -> impl Fn(std::io::Error) -> MergeError + '_ {
    move |source| MergeError::Read {
        path: path.to_owned(),
        source,
    }
}

/// One safetensors file with the adapted weights in `pending` replaced (and taken out of it).
fn merge_file(
    path: &Path,
    bytes: &[u8],
    pending: &mut BTreeMap<String, &Lora>,
) -> Result<Vec<u8>, MergeError> {
    let file_error = |source| MergeError::Safetensors {
        path: path.to_owned(),
        source,
    };
    let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes).map_err(file_error)?;
    let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|source| {
        MergeError::Tensor {
            name: path.display().to_string(),
            source,
        }
    })?;
    let mut out: Vec<(String, Tensor)> = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let tensor = match pending.remove(&name) {
            Some(lora) => {
                let merge = || -> candle_core::Result<Tensor> {
                    let delta = (lora
                        .b
                        .to_dtype(DType::F32)?
                        .matmul(&lora.a.to_dtype(DType::F32)?)?
                        * lora.scale)?;
                    let merged = (tensor.to_dtype(DType::F32)? + delta)?;
                    let merged = match &lora.magnitude {
                        Some(magnitude) => {
                            let norm = merged.sqr()?.sum_keepdim(1)?.sqrt()?;
                            let r = (magnitude.to_dtype(DType::F32)?.unsqueeze(1)? / norm)?;
                            merged.broadcast_mul(&r)?
                        }
                        None => merged,
                    };
                    merged.to_dtype(tensor.dtype())
                };
                merge().map_err(|source| MergeError::Tensor {
                    name: name.clone(),
                    source,
                })?
            }
            None => tensor,
        };
        out.push((name, tensor));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    safetensors::serialize(out, metadata.metadata().clone()).map_err(file_error)
}
