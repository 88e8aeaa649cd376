//! One adapter version from object storage to memory: downloaded into the local disk cache
//! (under its digest, visible only once verified), then read and checked against the base
//! model. Every refusal carries the reason an operator needs to fix the adapter.

use std::path::{Path, PathBuf};

use candle_core::Device;
use graft_api::GraftJson;
use graft_engine::{
    adapters::{PeftAdapter, ServingAdapter, WEIGHTS_FILES},
    storage::{self, ObjectUri, S3Options},
};
use sha2::{Digest, Sha256};

use crate::{kv_budget, model::BaseModel};

const CONFIG: &str = "adapter_config.json";
const GRAFT_JSON: &str = "graft.json";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The adapter itself is wrong: retrying cannot help (HTTP 422).
    #[error("{0}")]
    Invalid(String),
    /// The store or the disk failed (HTTP 502).
    #[error("{0}")]
    Unavailable(String),
}

/// An adapter version in memory, shared by every request that uses it; a request holds it
/// to the end, so a swap or an eviction never changes the weights under a running request.
#[derive(Debug)]
pub struct LoadedAdapter {
    pub uri: String,
    pub sha256: String,
    /// The weights in the layout the batched LoRA op reads.
    pub serving: ServingAdapter,
}

/// Whether `sha256` looks like a SHA-256 digest (64 lower-case hex digits).
pub fn is_digest(sha256: &str) -> bool {
    sha256.len() == 64
        && sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The local copy of a version: `<cache>/adapters/<sha256>/`.
pub fn cache_dir(cache: &Path, sha256: &str) -> PathBuf {
    cache.join("adapters").join(sha256)
}

/// A version's files, their digest verified.
#[derive(Debug)]
pub struct Files {
    config: Vec<u8>,
    /// The weights file's name: PEFT's, or AdapterHub's for bottleneck adapters.
    weights_name: &'static str,
    weights: Vec<u8>,
    graft_json: Option<Vec<u8>>,
}

/// The version's files: from the local disk cache when a verified copy is there, otherwise
/// from the store (then kept on disk, under its digest, for a reload after eviction).
pub async fn fetch(
    uri: &str,
    sha256: &str,
    s3: &S3Options,
    cache: &Path,
) -> Result<Files, LoadError> {
    let dir = cache_dir(cache, sha256);
    if let Some(files) = from_disk(&dir, sha256) {
        return Ok(files);
    }
    let parsed: ObjectUri = uri
        .parse()
        .map_err(|e| LoadError::Invalid(format!("uri {uri:?}: {e}")))?;
    let location = storage::open(&parsed, s3).map_err(|e| LoadError::Invalid(e.to_string()))?;
    let get = |name: &'static str| {
        let location = location.clone();
        async move {
            location.get_opt(name).await.map_err(|e| {
                let message = format!("reading {name} under {uri}: {e}");
                if storage::is_permanent(&e) {
                    LoadError::Invalid(message)
                } else {
                    LoadError::Unavailable(message)
                }
            })
        }
    };
    // The weights file has one of two names; asking for both costs one more small request.
    let [peft, adapterhub] = WEIGHTS_FILES;
    let (peft_weights, adapterhub_weights, config, graft_json) =
        futures::try_join!(get(peft), get(adapterhub), get(CONFIG), get(GRAFT_JSON))?;
    let missing = |name: &str| LoadError::Invalid(format!("{uri} has no {name}"));
    let (weights_name, weights) = match (peft_weights, adapterhub_weights) {
        (Some(weights), None) => (peft, weights.to_vec()),
        (None, Some(weights)) => (adapterhub, weights.to_vec()),
        (Some(_), Some(_)) => {
            return Err(LoadError::Invalid(format!(
                "{uri} has both {peft} and {adapterhub}: one adapter per prefix"
            )));
        }
        (None, None) => {
            return Err(LoadError::Invalid(format!(
                "{uri} has no {peft} (or {adapterhub}; Graft does not read AdapterHub's pickled \
                 pytorch_adapter.bin: save with use_safetensors=True)"
            )));
        }
    };
    let actual = format!("{:x}", Sha256::digest(&weights));
    if actual != sha256 {
        return Err(LoadError::Invalid(format!(
            "digest mismatch: {weights_name} under {uri} has sha256 {actual}, expected {sha256}"
        )));
    }
    let files = Files {
        config: config.ok_or_else(|| missing(CONFIG))?.to_vec(),
        weights_name,
        weights,
        graft_json: graft_json.map(|b| b.to_vec()),
    };
    keep_on_disk(&dir, &files)?;
    Ok(files)
}

fn from_disk(dir: &Path, sha256: &str) -> Option<Files> {
    let (weights_name, weights) = WEIGHTS_FILES
        .into_iter()
        .find_map(|name| Some((name, std::fs::read(dir.join(name)).ok()?)))?;
    if format!("{:x}", Sha256::digest(&weights)) != sha256 {
        // A damaged copy: fetch it again.
        let _ = std::fs::remove_dir_all(dir);
        return None;
    }
    Some(Files {
        config: std::fs::read(dir.join(CONFIG)).ok()?,
        weights_name,
        weights,
        graft_json: std::fs::read(dir.join(GRAFT_JSON)).ok(),
    })
}

/// Written beside, then renamed into place: a copy on disk is always whole.
fn keep_on_disk(dir: &Path, files: &Files) -> Result<(), LoadError> {
    let partial = dir.with_extension("partial");
    let write =
        |e: std::io::Error| LoadError::Unavailable(format!("writing {}: {e}", partial.display()));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(write)?;
    std::fs::write(partial.join(files.weights_name), &files.weights).map_err(write)?;
    std::fs::write(partial.join(CONFIG), &files.config).map_err(write)?;
    if let Some(json) = &files.graft_json {
        std::fs::write(partial.join(GRAFT_JSON), json).map_err(write)?;
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&partial, dir).map_err(write)
}

/// Reads verified files and checks the adapter fits `model`.
pub fn read(
    files: &Files,
    uri: &str,
    sha256: &str,
    model: &BaseModel,
) -> Result<LoadedAdapter, LoadError> {
    // Any method Graft computes (LoRA, DoRA, (IA)³, prompt tuning, P-tuning, prefix tuning,
    // bottleneck adapters); others are refused by name.
    let adapter = PeftAdapter::from_bytes(&files.config, &files.weights, &Device::Cpu)
        .map_err(|e| LoadError::Invalid(format!("{uri}: {e}")))?;
    let info = &model.info;
    if adapter.max_rank() > info.max_lora_rank {
        return Err(LoadError::Invalid(format!(
            "{uri}: rank {} is above this server's --max-lora-rank {}",
            adapter.max_rank(),
            info.max_lora_rank
        )));
    }
    if let Some(text) = &files.graft_json {
        let record: GraftJson = serde_json::from_slice(text)
            .map_err(|e| LoadError::Invalid(format!("{uri}: graft.json: {e}")))?;
        if record.base_model.sha256 != info.model_sha256 {
            return Err(LoadError::Invalid(format!(
                "{uri} was trained on another base model ({} sha256 {}); this server serves {} (sha256 {})",
                record.base_model.uri, record.base_model.sha256, info.model_uri, info.model_sha256
            )));
        }
    }
    model
        .llama
        .check(&adapter)
        .map_err(|e| LoadError::Invalid(format!("{uri}: {e}")))?;
    // What stays with the version in its share of the adapter cache (which the KV cache's
    // budget leaves room for): virtual tokens' keys and values, or bottleneck modules in the
    // model's dtype.
    let held = match &adapter {
        PeftAdapter::Prompt(prompt) => Some((
            prompt.num_virtual_tokens() * kv_budget::bytes_per_token(model),
            format!(
                "its {} virtual tokens' keys and values",
                prompt.num_virtual_tokens()
            ),
            "use fewer virtual tokens",
        )),
        PeftAdapter::Bottleneck(bottleneck) => Some((
            bottleneck.parameters() * model.llama.dtype().size_in_bytes(),
            "its bottleneck modules".to_owned(),
            "use a larger reduction factor",
        )),
        PeftAdapter::Lora(_) | PeftAdapter::Ia3(_) => None,
    };
    let share = kv_budget::adapter_slot_bytes(model);
    if let Some((bytes, what, remedy)) = held
        && bytes > share
    {
        return Err(LoadError::Invalid(format!(
            "{uri}: {what} take {} KiB, more than an adapter's share of the adapter cache ({} \
             KiB, a rank-{} LoRA's): {remedy} or raise --max-lora-rank",
            bytes >> 10,
            share >> 10,
            info.max_lora_rank
        )));
    }
    // DoRA's scales, and virtual tokens' keys and values, are computed here, once.
    let serving = model
        .llama
        .serving_with(&adapter, model.lora_dtype)
        .map_err(|e| LoadError::Invalid(format!("{uri}: {e}")))?;
    Ok(LoadedAdapter {
        uri: uri.to_owned(),
        sha256: sha256.to_owned(),
        serving,
    })
}
