//! Whether an adapter fits a server, decided before anything is loaded: PEFT features Graft
//! honours, rank within the server's limit, target modules the server's model has, and — for
//! an adapter Graft trained — the base model digest `graft.json` records.

use graft_api::{AssignedVersion, GraftJson, ServerInfo};
use graft_engine::{
    adapters::AdapterConfig,
    storage::{self, ObjectUri, S3Options},
};

/// The reason `version` cannot load on a server described by `info`, or `None`.
pub fn incompatibility(
    config: &[u8],
    graft_json: Option<&[u8]>,
    info: &ServerInfo,
) -> Option<String> {
    let config: AdapterConfig = match serde_json::from_slice(config) {
        Ok(config) => config,
        Err(e) => return Some(format!("adapter_config.json: {e}")),
    };
    if let Err(e) = config.check() {
        return Some(e.to_string());
    }
    if config.r > info.max_lora_rank {
        return Some(format!(
            "rank {} is above the server's limit of {}",
            config.r, info.max_lora_rank
        ));
    }
    let targets = match &config.target_modules {
        graft_engine::adapters::TargetModules::Names(names) => names.clone(),
        graft_engine::adapters::TargetModules::Pattern(p) => vec![p.clone()],
    };
    if let Some(unknown) = targets.iter().find(|t| !info.target_modules.contains(t)) {
        return Some(format!(
            "target module {unknown:?} is not one of the server model's ({})",
            info.target_modules.join(", ")
        ));
    }
    if let Some(json) = graft_json {
        match serde_json::from_slice::<GraftJson>(json) {
            Ok(record) if record.base_model.sha256 != info.model_sha256 => {
                return Some(format!(
                    "trained on another base model ({}, sha256 {}); the server serves {} (sha256 {})",
                    record.base_model.uri,
                    record.base_model.sha256,
                    info.model_uri,
                    info.model_sha256
                ));
            }
            Ok(_) => {}
            Err(e) => return Some(format!("graft.json: {e}")),
        }
    }
    None
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The adapter is not there (or the URI is unusable): it cannot load anywhere.
    #[error("{0}")]
    Missing(String),
    /// The store could not be read from here (network, credentials the operator lacks): the
    /// servers still check the adapter when they load it.
    #[error("{0}")]
    Unavailable(String),
}

/// `adapter_config.json` and, when present, `graft.json` under the version's URI.
pub async fn read_manifest(
    version: &AssignedVersion,
    s3: &S3Options,
) -> Result<(Vec<u8>, Option<Vec<u8>>), ManifestError> {
    let uri: ObjectUri = version
        .uri
        .parse()
        .map_err(|e| ManifestError::Missing(format!("{}: {e}", version.uri)))?;
    let location = storage::open(&uri, s3).map_err(|e| ManifestError::Missing(e.to_string()))?;
    let read = |name: &str, e: &object_store::Error| {
        let message = format!("reading {}{name}: {e}", version.uri);
        if matches!(
            e,
            object_store::Error::NotFound { .. } | object_store::Error::InvalidPath { .. }
        ) {
            ManifestError::Missing(message)
        } else {
            ManifestError::Unavailable(message)
        }
    };
    let config = location
        .get_opt("adapter_config.json")
        .await
        .map_err(|e| read("adapter_config.json", &e))?
        .ok_or_else(|| {
            ManifestError::Missing(format!("{} has no adapter_config.json", version.uri))
        })?;
    let graft_json = location
        .get_opt("graft.json")
        .await
        .map_err(|e| read("graft.json", &e))?;
    Ok((config.to_vec(), graft_json.map(|b| b.to_vec())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ServerInfo {
        ServerInfo {
            model: "llama".into(),
            model_uri: "s3://models/llama/".into(),
            model_sha256: "a".repeat(64),
            architecture: "llama".into(),
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            vocab_size: 100,
            target_modules: [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .map(str::to_owned)
            .to_vec(),
            max_lora_rank: 16,
            max_loaded_adapters: 8,
        }
    }

    fn config(rank: usize, targets: &[&str]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "peft_type": "LORA", "r": rank, "lora_alpha": 16, "target_modules": targets,
        }))
        .expect("json")
    }

    #[test]
    fn rank_targets_features_and_base_model_are_checked() {
        assert_eq!(
            incompatibility(&config(8, &["q_proj"]), None, &info()),
            None
        );
        let too_high = incompatibility(&config(32, &["q_proj"]), None, &info()).expect("refused");
        assert!(too_high.contains("rank 32"), "{too_high}");
        let unknown = incompatibility(&config(8, &["c_attn"]), None, &info()).expect("refused");
        assert!(unknown.contains("c_attn"), "{unknown}");
        let dora = serde_json::to_vec(&serde_json::json!({
            "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "use_dora": true,
        }))
        .expect("json");
        assert!(
            incompatibility(&dora, None, &info())
                .expect("refused")
                .contains("DoRA")
        );
        let graft_json = serde_json::to_vec(&serde_json::json!({
            "baseModel": {"uri": "s3://models/other/", "sha256": "f".repeat(64)},
            "dataset": {"uri": "s3://d/x.jsonl", "sha256": "0".repeat(64)},
            "adapter": {"uri": "s3://a/", "sha256": "1".repeat(64), "sizeBytes": 1, "trainableParameters": 1},
            "metrics": {"steps": 1, "trainExamples": 1, "evalExamples": 0},
        }))
        .expect("json");
        let other =
            incompatibility(&config(8, &["q_proj"]), Some(&graft_json), &info()).expect("refused");
        assert!(other.contains("another base model"), "{other}");
    }
}
