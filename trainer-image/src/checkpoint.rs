//! Checkpoints: `<output>/checkpoints/step-N/` holds the adapter in PEFT's form, the optimizer's
//! moments and `state.json`. `state.json` is written last, so a directory without it is an
//! interrupted write and is ignored when resuming.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use graft_engine::adapters::{PeftAdapter, PeftError};
use serde::{Deserialize, Serialize};

pub const STATE_FILE: &str = "state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// P-tuning's encoder, or prefix tuning's reparameterisation MLP: the published adapter holds
/// only its output, as PEFT's does.
const ENCODER_FILE: &str = "prompt_encoder.safetensors";
const BEST_CONFIG: &str = "best/adapter_config.json";
const BEST_WEIGHTS: &str = "best/adapter_model.safetensors";
/// Every file a checkpoint may hold, the state file first (a reader stops without it).
pub const FILES: [&str; 7] = [
    STATE_FILE,
    "adapter_config.json",
    "adapter_model.safetensors",
    OPTIMIZER_FILE,
    ENCODER_FILE,
    BEST_CONFIG,
    BEST_WEIGHTS,
];

/// Where the run stands. The data cursor and dropout streams follow from `step` and `seed`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub step: u64,
    pub total_steps: u64,
    pub seed: u64,
    pub epoch: u32,
    /// First micro-batch (in the epoch's seeded order) the next step reads.
    pub next_micro_batch: usize,
    /// The evaluation with the lowest loss so far (`training.keepBest`, early stopping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<BestEval>,
    /// Evaluations since the best one (early stopping's count).
    #[serde(default)]
    pub evals_since_best: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BestEval {
    pub step: u64,
    pub eval_loss: f64,
}

#[derive(Debug)]
pub struct Checkpoint {
    pub adapter: PeftAdapter,
    /// The adapter at [`State::best`], when the run keeps it.
    pub best_adapter: Option<PeftAdapter>,
    /// P-tuning's encoder or prefix tuning's MLP, by PEFT's names.
    pub encoder: Option<HashMap<String, Tensor>>,
    pub optimizer_steps: u64,
    /// `(first, second)` moments, in the optimizer's var order.
    pub moments: Vec<(Tensor, Tensor)>,
    pub state: State,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint file {0} is missing")]
    Missing(&'static str),
    #[error("checkpoint adapter: {0}")]
    Adapter(#[from] PeftError),
    #[error("checkpoint optimizer state: {0}")]
    Optimizer(#[from] candle_core::Error),
    #[error("checkpoint {STATE_FILE}: {0}")]
    State(#[from] serde_json::Error),
}

impl Checkpoint {
    /// The files to write, in order; [`STATE_FILE`] comes last.
    pub fn to_files(&self) -> Result<Vec<(&'static str, Vec<u8>)>, CheckpointError> {
        let (config, weights) = self.adapter.to_bytes()?;
        let mut tensors = Vec::new();
        for (i, (m, v)) in self.moments.iter().enumerate() {
            tensors.push((format!("m.{i}"), m.to_dtype(DType::F32)?));
            tensors.push((format!("v.{i}"), v.to_dtype(DType::F32)?));
        }
        let metadata = HashMap::from([("steps".to_owned(), self.optimizer_steps.to_string())]);
        let optimizer = safetensors::serialize(tensors, Some(metadata))
            .map_err(|e| CheckpointError::Optimizer(candle_core::Error::wrap(e)))?;
        let mut files = vec![
            ("adapter_config.json", config),
            ("adapter_model.safetensors", weights),
            (OPTIMIZER_FILE, optimizer),
        ];
        if let Some(encoder) = &self.encoder {
            let tensors = encoder
                .iter()
                .map(|(name, t)| Ok((name.clone(), t.to_dtype(DType::F32)?.contiguous()?)))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let bytes = safetensors::serialize(tensors, None)
                .map_err(|e| CheckpointError::Optimizer(candle_core::Error::wrap(e)))?;
            files.push((ENCODER_FILE, bytes));
        }
        if let Some(best) = &self.best_adapter {
            let (config, weights) = best.to_bytes()?;
            files.push((BEST_CONFIG, config));
            files.push((BEST_WEIGHTS, weights));
        }
        files.push((STATE_FILE, serde_json::to_vec_pretty(&self.state)?));
        Ok(files)
    }

    /// Reads what [`Checkpoint::to_files`] wrote; `file(name)` returns a file's bytes.
    pub fn from_files(
        mut file: impl FnMut(&'static str) -> Option<Vec<u8>>,
    ) -> Result<Self, CheckpointError> {
        let mut read = |name| file(name).ok_or(CheckpointError::Missing(name));
        let state: State = serde_json::from_slice(&read(STATE_FILE)?)?;
        let adapter = PeftAdapter::from_checkpoint_bytes(
            &read("adapter_config.json")?,
            &read("adapter_model.safetensors")?,
            &Device::Cpu,
        )?;
        let best_adapter = match (file(BEST_CONFIG), file(BEST_WEIGHTS)) {
            (Some(config), Some(weights)) if state.best.is_some() => Some(
                PeftAdapter::from_checkpoint_bytes(&config, &weights, &Device::Cpu)?,
            ),
            _ => None,
        };
        let encoder = file(ENCODER_FILE)
            .map(|bytes| candle_core::safetensors::load_buffer(&bytes, &Device::Cpu))
            .transpose()?;
        let mut read = |name| file(name).ok_or(CheckpointError::Missing(name));
        let optimizer = read(OPTIMIZER_FILE)?;
        let steps = safetensors::SafeTensors::read_metadata(&optimizer)
            .ok()
            .and_then(|(_, meta)| meta.metadata().as_ref()?.get("steps")?.parse().ok())
            .ok_or(CheckpointError::Missing("optimizer step count"))?;
        let tensors = candle_core::safetensors::load_buffer(&optimizer, &Device::Cpu)?;
        let moments = (0..tensors.len() / 2)
            .map(|i| {
                let get = |half: &str| {
                    tensors
                        .get(&format!("{half}.{i}"))
                        .cloned()
                        .ok_or(CheckpointError::Missing("an optimizer moment"))
                };
                Ok((get("m")?, get("v")?))
            })
            .collect::<Result<_, CheckpointError>>()?;
        Ok(Self {
            adapter,
            best_adapter,
            encoder,
            optimizer_steps: steps,
            moments,
            state,
        })
    }
}

/// `checkpoints/step-N` for step `N`.
pub fn directory(step: u64) -> String {
    format!("checkpoints/step-{step}")
}

/// The step of a `step-N` directory name.
pub fn parse_directory(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}
