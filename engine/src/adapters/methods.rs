//! The registry of methods: any adapter Graft reads, by the `peft_type` its
//! `adapter_config.json` names. A method Graft does not compute is refused by name.

use candle_core::Device;
use serde::Deserialize;

use super::{
    Adapter, BottleneckAdapter, Ia3Adapter, PeftError, PromptAdapter, Site, bottleneck,
    is_prompt_learning,
};

/// PEFT's weights file.
pub const PEFT_WEIGHTS: &str = "adapter_model.safetensors";

/// The names an adapter's weights file may have: PEFT's, then AdapterHub's.
pub const WEIGHTS_FILES: [&str; 2] = [PEFT_WEIGHTS, bottleneck::ADAPTERHUB_WEIGHTS];

/// An adapter of any method Graft computes.
// One per adapter file read, moved a few times: LoRA's config being larger than (IA)³'s costs
// nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum PeftAdapter {
    Lora(Adapter),
    Ia3(Ia3Adapter),
    /// Prompt tuning or P-tuning: virtual tokens before the input.
    Prompt(PromptAdapter),
    /// Bottleneck adapters, in AdapterHub's format.
    Bottleneck(BottleneckAdapter),
}

/// The `peft_type` of an `adapter_config.json` (the one field every PEFT config has), to pick
/// the reader for the rest.
pub fn peft_type(config_json: &[u8]) -> Result<String, PeftError> {
    #[derive(Deserialize)]
    struct PeftType {
        peft_type: String,
    }
    Ok(serde_json::from_slice::<PeftType>(config_json)?.peft_type)
}

impl PeftAdapter {
    /// Reads PEFT's two files, whichever method they hold, or AdapterHub's for bottleneck
    /// adapters.
    pub fn from_bytes(
        config_json: &[u8],
        safetensors: &[u8],
        device: &Device,
    ) -> Result<Self, PeftError> {
        if bottleneck::is_adapterhub(config_json) {
            return BottleneckAdapter::from_bytes(config_json, safetensors, device)
                .map(Self::Bottleneck);
        }
        let peft_type = peft_type(config_json)?;
        match peft_type.as_str() {
            "LORA" => Adapter::from_bytes(config_json, safetensors, device).map(Self::Lora),
            "IA3" => Ia3Adapter::from_bytes(config_json, safetensors, device).map(Self::Ia3),
            other if is_prompt_learning(other) => {
                PromptAdapter::from_bytes(config_json, safetensors, device).map(Self::Prompt)
            }
            other => Err(PeftError::Unsupported(format!(
                "peft_type {other:?} (Graft computes LORA, IA3, PROMPT_TUNING, P_TUNING and PREFIX_TUNING)"
            ))),
        }
    }

    /// Reads a trainer checkpoint's adapter: as [`from_bytes`](Self::from_bytes), but a LoRA
    /// relative to a residual base (OLoRA, PiSSA) is allowed.
    pub fn from_checkpoint_bytes(
        config_json: &[u8],
        safetensors: &[u8],
        device: &Device,
    ) -> Result<Self, PeftError> {
        if bottleneck::is_adapterhub(config_json) {
            return Self::from_bytes(config_json, safetensors, device);
        }
        let peft_type = peft_type(config_json)?;
        match peft_type.as_str() {
            "LORA" => {
                Adapter::from_checkpoint_bytes(config_json, safetensors, device).map(Self::Lora)
            }
            _ => Self::from_bytes(config_json, safetensors, device),
        }
    }

    /// The LoRA adapter, when it is one.
    pub fn lora(&self) -> Option<&Adapter> {
        match self {
            Self::Lora(adapter) => Some(adapter),
            Self::Ia3(_) | Self::Prompt(_) | Self::Bottleneck(_) => None,
        }
    }

    /// The two files' contents: `adapter_config.json` and the weights file
    /// ([`Self::weights_file`]).
    pub fn to_bytes(&self) -> Result<(Vec<u8>, Vec<u8>), PeftError> {
        match self {
            Self::Lora(adapter) => adapter.to_bytes(),
            Self::Ia3(adapter) => adapter.to_bytes(),
            Self::Prompt(adapter) => adapter.to_bytes(),
            Self::Bottleneck(adapter) => adapter.to_bytes(),
        }
    }

    /// The weights file's name: PEFT's `adapter_model.safetensors`, or AdapterHub's
    /// `adapter.safetensors` for bottleneck adapters.
    pub fn weights_file(&self) -> &'static str {
        match self {
            Self::Bottleneck(_) => bottleneck::ADAPTERHUB_WEIGHTS,
            Self::Lora(_) | Self::Ia3(_) | Self::Prompt(_) => PEFT_WEIGHTS,
        }
    }

    /// PEFT's name of the method: `LORA`, `IA3`, `PROMPT_TUNING`, `P_TUNING`,
    /// `PREFIX_TUNING`; `BOTTLENECK` for AdapterHub's bottleneck adapters.
    pub fn peft_type(&self) -> &str {
        match self {
            Self::Lora(adapter) => &adapter.config.peft_type,
            Self::Ia3(adapter) => &adapter.config.peft_type,
            Self::Prompt(adapter) => &adapter.config.peft_type,
            Self::Bottleneck(_) => "BOTTLENECK",
        }
    }

    /// The largest LoRA rank (0 for a method without one), which a server bounds.
    pub fn max_rank(&self) -> usize {
        match self {
            Self::Lora(adapter) => adapter.config.max_rank(),
            Self::Ia3(_) | Self::Prompt(_) | Self::Bottleneck(_) => 0,
        }
    }

    /// Whether every part has a layer of a model of `layers` layers and fits the shape its
    /// projection has there (`shape` gives a site's `(out, in)`). A prompt-learning adapter
    /// has no per-projection part: its fit is its width and length
    /// ([`PromptAdapter::check_fits`]).
    pub fn check_fits(
        &self,
        layers: usize,
        shape: impl Fn(Site) -> Option<(usize, usize)>,
    ) -> Result<(), PeftError> {
        match self {
            Self::Lora(adapter) => adapter.check_fits(layers, shape),
            Self::Ia3(adapter) => adapter.check_fits(layers, shape),
            Self::Prompt(_) => Ok(()),
            Self::Bottleneck(adapter) => {
                // The stream's width: what the feed-forward block's last projection puts out.
                let hidden = shape(Site::DownProj).map_or(0, |(out, _)| out);
                adapter.check_fits(layers, hidden)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_method_is_read_by_its_peft_type_and_others_are_refused_by_name() {
        let read = |config: &[u8], weights: &[u8]| {
            PeftAdapter::from_bytes(config, weights, &Device::Cpu).expect("a PEFT-made adapter")
        };
        let ia3 = read(
            include_bytes!("../../tests/data/tiny/llama-peft-ia3/adapter_config.json"),
            include_bytes!("../../tests/data/tiny/llama-peft-ia3/adapter_model.safetensors"),
        );
        assert_eq!(ia3.peft_type(), "IA3");
        let prompt = read(
            include_bytes!("../../tests/data/tiny/llama-peft-ptuning-mlp/adapter_config.json"),
            include_bytes!(
                "../../tests/data/tiny/llama-peft-ptuning-mlp/adapter_model.safetensors"
            ),
        );
        assert!(matches!(&prompt, PeftAdapter::Prompt(p) if p.config.peft_type == "P_TUNING"));
        let config = br#"{"peft_type": "ADALORA", "r": 4}"#;
        let error = PeftAdapter::from_bytes(config, &[], &Device::Cpu).expect_err("AdaLoRA");
        assert!(error.to_string().contains("ADALORA"), "{error}");
    }
}
