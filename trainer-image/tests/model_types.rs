//! The architectures the API lists (`graft_api::SUPPORTED_MODEL_TYPES`, which the CRD's
//! description and the README show) are exactly the ones the engine runs: each listed
//! `model_type` is accepted, and the other Hugging Face model types a user may bring are
//! refused by name. Adding an architecture to the engine without listing it fails here.

use graft_api::SUPPORTED_MODEL_TYPES;
use graft_engine::models::{Config, ConfigError};

/// `model_type` values of popular Hugging Face causal LMs, supported or not.
const KNOWN: &[&str] = &[
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "phi",
    "phi3",
    "phi4",
    "gpt2",
    "gpt_neox",
    "falcon",
    "olmo",
    "olmo2",
    "starcoder2",
    "deepseek_v2",
    "deepseek_v3",
    "cohere",
    "granite",
    "smollm3",
    "mpt",
    "bloom",
];

fn accepts(model_type: &str) -> bool {
    let json = format!(
        r#"{{"model_type":"{model_type}","vocab_size":8,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2,"rms_norm_eps":1e-6}}"#
    );
    // Accepted as an architecture, or refused for a field this minimal config lacks.
    if let Err(ConfigError::Architecture(name)) = Config::from_json(&json) {
        assert_eq!(name, model_type, "the refusal names the architecture");
        false
    } else {
        true
    }
}

#[test]
fn the_listed_model_types_are_the_ones_the_engine_runs() {
    for model_type in SUPPORTED_MODEL_TYPES {
        assert!(accepts(model_type), "{model_type} is listed but refused");
    }
    for model_type in KNOWN {
        assert_eq!(
            accepts(model_type),
            SUPPORTED_MODEL_TYPES.contains(model_type),
            "{model_type}: the engine and graft_api::SUPPORTED_MODEL_TYPES disagree"
        );
    }
}
