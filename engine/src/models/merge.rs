//! Base + adapter merged into a standalone Hugging Face model, for users who serve elsewhere.
//! Computed in f32, stored in the checkpoint's own dtype, as PEFT merges:
//! - LoRA: every adapted projection's weight becomes `W + scale · B · A`; a DoRA pair's rows are
//!   then rescaled, `r ⊙ (W + scale · B · A)` with `r = m / ‖W + scale · B · A‖`;
//! - (IA)³: a vector `l` that scales a projection's output scales its weight's rows (and its
//!   bias), `diag(l) · W`; one that scales its input (feed-forward) scales the columns,
//!   `W · diag(l)`.
//!
//! Every other tensor and file is the base's unchanged, and the safetensors files keep their
//! names and grouping, so a shard index stays valid as it is.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use candle_core::{DType, Device, Tensor};

use super::{Checkpoint, ModelFiles};
use crate::adapters::{Lora, PeftAdapter};

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
    #[error("{method} adapters cannot be merged: {reason}")]
    NotMergeable {
        method: String,
        reason: &'static str,
    },
}

/// What merging does to one tensor of the base.
#[derive(Clone, Copy)]
enum Edit<'a> {
    /// `W + scale · B · A`, rows rescaled for DoRA.
    Lora(&'a Lora),
    /// (IA)³ on the output: each row (or bias entry) times its entry of the vector.
    ScaleRows(&'a Tensor),
    /// (IA)³ on the input: each column times its entry of the vector.
    ScaleColumns(&'a Tensor),
}

impl Edit<'_> {
    fn apply(self, tensor: &Tensor) -> candle_core::Result<Tensor> {
        let weight = tensor.to_dtype(DType::F32)?;
        let merged = match self {
            Self::Lora(lora) => {
                let delta = (lora
                    .b
                    .to_dtype(DType::F32)?
                    .matmul(&lora.a.to_dtype(DType::F32)?)?
                    * lora.scale)?;
                let merged = (weight + delta)?;
                match &lora.magnitude {
                    Some(magnitude) => {
                        let norm = merged.sqr()?.sum_keepdim(1)?.sqrt()?;
                        let r = (magnitude.to_dtype(DType::F32)?.unsqueeze(1)? / norm)?;
                        merged.broadcast_mul(&r)?
                    }
                    None => merged,
                }
            }
            Self::ScaleRows(vector) => {
                let vector = vector.to_dtype(DType::F32)?;
                match weight.rank() {
                    1 => (weight * vector)?,
                    _ => weight.broadcast_mul(&vector.unsqueeze(1)?)?,
                }
            }
            Self::ScaleColumns(vector) => {
                weight.broadcast_mul(&vector.to_dtype(DType::F32)?.unsqueeze(0)?)?
            }
        };
        merged.to_dtype(tensor.dtype())
    }
}

/// The edits `adapter` makes, by the name of the tensor each applies to: those that must find
/// their tensor, and those whose tensor may be absent (the bias of a projection that has none).
fn edits(adapter: &PeftAdapter) -> Result<[BTreeMap<String, Edit<'_>>; 2], MergeError> {
    let (mut required, mut optional) = (BTreeMap::new(), BTreeMap::new());
    match adapter {
        PeftAdapter::Lora(adapter) => {
            for (&(layer, site), lora) in &adapter.weights {
                required.insert(format!("{}.weight", site.module(layer)), Edit::Lora(lora));
            }
        }
        PeftAdapter::Ia3(adapter) => {
            for (&(layer, site), ia3) in &adapter.vectors {
                let module = site.module(layer);
                if ia3.feedforward {
                    let edit = Edit::ScaleColumns(&ia3.vector);
                    required.insert(format!("{module}.weight"), edit);
                } else {
                    let edit = Edit::ScaleRows(&ia3.vector);
                    required.insert(format!("{module}.weight"), edit);
                    optional.insert(format!("{module}.bias"), edit);
                }
            }
        }
        PeftAdapter::Prompt(adapter) => {
            return Err(MergeError::NotMergeable {
                method: adapter.config.peft_type.clone(),
                reason: "they change the input, not the weights, so no merged model holds them",
            });
        }
        PeftAdapter::Bottleneck(_) => {
            return Err(MergeError::NotMergeable {
                method: "bottleneck".to_owned(),
                reason: "they add modules with a non-linearity between the layers, which no \
                         weight of the base can hold",
            });
        }
    }
    Ok([required, optional])
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
    adapter: &PeftAdapter,
    mut emit: impl FnMut(String, Vec<u8>) -> Result<(), MergeError>,
) -> Result<(), MergeError> {
    check_mergeable(base)?;
    // Each edit is taken out once made.
    let [mut pending, mut optional] = edits(adapter)?;
    let dir = base.files().path();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read(dir))? {
        let entry = entry.map_err(read(dir))?;
        if entry.file_type().map_err(read(dir))?.is_file() {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let bytes = std::fs::read(&path).map_err(read(&path))?;
        if Path::new(&name)
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
        {
            emit(
                name,
                merge_file(&path, &bytes, [&mut pending, &mut optional])?,
            )?;
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

/// One safetensors file with the tensors `edits` name edited (and taken out of them).
fn merge_file(
    path: &Path,
    bytes: &[u8],
    edits: [&mut BTreeMap<String, Edit<'_>>; 2],
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
    let [required, optional] = edits;
    for (name, tensor) in tensors {
        let edit = required.remove(&name).or_else(|| optional.remove(&name));
        let tensor = match edit {
            Some(edit) => edit.apply(&tensor).map_err(|source| MergeError::Tensor {
                name: name.clone(),
                source,
            })?,
            None => tensor,
        };
        out.push((name, tensor));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    safetensors::serialize(out, metadata.metadata().clone()).map_err(file_error)
}
