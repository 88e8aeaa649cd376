//! Safetensors weights of a Hugging Face model directory: `model.safetensors`, or the shards
//! `model.safetensors.index.json` lists.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::llama::Precision;
use crate::{
    backend::{FrozenLinear, FrozenWeight},
    quant::{Nf4Tensor, is_bnb_nf4, load_bnb_nf4},
};

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{dir}: no model.safetensors or model.safetensors.index.json")]
    Missing { dir: PathBuf },
    #[error("{path}: {source}")]
    Index {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("memory-mapping the weights: {0}")]
    Map(#[from] candle_core::Error),
}

/// The weight files of the model in `dir`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, WeightsError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let error = |source: Box<dyn std::error::Error + Send + Sync>| WeightsError::Index {
        path: index.clone(),
        source,
    };
    let text = std::fs::read_to_string(&index).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            WeightsError::Missing {
                dir: dir.to_owned(),
            }
        } else {
            error(e.into())
        }
    })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| error(e.into()))?;
    let shards: BTreeSet<&str> = json["weight_map"]
        .as_object()
        .ok_or_else(|| error("no weight_map".into()))?
        .values()
        .filter_map(serde_json::Value::as_str)
        .collect();
    Ok(shards.into_iter().map(|s| dir.join(s)).collect())
}

/// A `VarBuilder` over the model's weights, memory-mapped.
#[allow(unsafe_code)]
pub fn load_weights(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, WeightsError> {
    let files = weight_files(dir)?;
    // SAFETY: the files are mapped read-only and must not change while mapped; they are the
    // trainer's or server's own downloaded copy, which nothing else writes.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device)? };
    Ok(vb)
}

/// What replaces a projection's weight before it is frozen.
pub(crate) type Rewrite<'a> = &'a dyn Fn(&Tensor) -> candle_core::Result<Tensor>;

/// A projection's frozen weight: NF4 as stored when the checkpoint holds it in bitsandbytes'
/// 4-bit form (whatever `precision` asks: expanding it would only cost memory); otherwise
/// read dense, and quantized on the CPU (from `on_cpu`, the same weights read there) for
/// [`Precision::Nf4`].
///
/// With `rewrite`, the weight is read in f32 on the model's device and what `rewrite` returns
/// is frozen instead (stored as `precision` asks: PiSSA's and OLoRA's residual is what QLoRA
/// quantizes, as PEFT requantizes it).
pub(crate) fn frozen_linear(
    vb: &VarBuilder<'_>,
    on_cpu: &VarBuilder<'_>,
    shape: (usize, usize),
    bias: Option<Tensor>,
    precision: Precision,
    rewrite: Option<Rewrite<'_>>,
) -> candle_core::Result<FrozenLinear> {
    if let Some(rewrite) = rewrite {
        if is_bnb_nf4(on_cpu) {
            candle_core::bail!(
                "the weight is stored pre-quantized (bitsandbytes NF4): an init that rewrites \
                 the base (olora, pissa) needs a dense checkpoint"
            );
        }
        let weight =
            vb.get_with_hints_dtype(shape, "weight", candle_nn::Init::Const(0.0), DType::F32)?;
        let rewritten = rewrite(&weight)?;
        return match precision {
            Precision::Nf4 => FrozenLinear::quantize_nf4(&rewritten, bias, vb.device()),
            Precision::Dense => Ok(FrozenLinear::new(
                FrozenWeight::Dense(rewritten.to_dtype(vb.dtype())?),
                bias,
            )),
        };
    }
    if is_bnb_nf4(on_cpu) {
        let matrix = load_bnb_nf4(on_cpu, shape)?;
        let tensor = Nf4Tensor::new(&matrix, vb.device())?;
        return Ok(FrozenLinear::new(FrozenWeight::Nf4(Arc::new(tensor)), bias));
    }
    match precision {
        Precision::Nf4 => {
            FrozenLinear::quantize_nf4(&on_cpu.get(shape, "weight")?, bias, vb.device())
        }
        Precision::Dense => Ok(FrozenLinear::new(
            FrozenWeight::Dense(vb.get(shape, "weight")?),
            bias,
        )),
    }
}
