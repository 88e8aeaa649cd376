//! One adapter version from object storage to memory: downloaded into the local disk cache
//! (under its digest, visible only once verified), then read and checked against the base
//! model. Every refusal carries the reason an operator needs to fix the adapter.

use std::path::{Path, PathBuf};

use candle_core::Device;
use graft_api::GraftJson;
use graft_engine::{
    peft::Adapter,
    storage::{self, ObjectUri, S3Options},
};
use sha2::{Digest, Sha256};

use crate::model::BaseModel;

const CONFIG: &str = "adapter_config.json";
const WEIGHTS: &str = "adapter_model.safetensors";
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
    pub adapter: Adapter,
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

/// Downloads the version unless its verified copy is already on disk.
pub async fn fetch(
    uri: &str,
    sha256: &str,
    s3: &S3Options,
    cache: &Path,
) -> Result<PathBuf, LoadError> {
    let dir = cache_dir(cache, sha256);
    if dir.join(WEIGHTS).is_file() {
        return Ok(dir);
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
    let missing = |name: &str| LoadError::Invalid(format!("{uri} has no {name}"));
    let weights = get(WEIGHTS).await?.ok_or_else(|| missing(WEIGHTS))?;
    let actual = format!("{:x}", Sha256::digest(&weights));
    if actual != sha256 {
        return Err(LoadError::Invalid(format!(
            "digest mismatch: {WEIGHTS} under {uri} has sha256 {actual}, expected {sha256}"
        )));
    }
    let config = get(CONFIG).await?.ok_or_else(|| missing(CONFIG))?;
    let graft_json = get(GRAFT_JSON).await?;

    let partial = dir.with_extension("partial");
    let write =
        |e: std::io::Error| LoadError::Unavailable(format!("writing {}: {e}", partial.display()));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(write)?;
    std::fs::write(partial.join(WEIGHTS), &weights).map_err(write)?;
    std::fs::write(partial.join(CONFIG), &config).map_err(write)?;
    if let Some(json) = graft_json {
        std::fs::write(partial.join(GRAFT_JSON), &json).map_err(write)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&partial, &dir).map_err(write)?;
    Ok(dir)
}

/// Reads a verified local copy and checks it fits `model`.
pub fn read(
    dir: &Path,
    uri: &str,
    sha256: &str,
    model: &BaseModel,
) -> Result<LoadedAdapter, LoadError> {
    let read = |name: &str| {
        std::fs::read(dir.join(name))
            .map_err(|e| LoadError::Unavailable(format!("reading the cached {name}: {e}")))
    };
    let weights = read(WEIGHTS)?;
    let actual = format!("{:x}", Sha256::digest(&weights));
    if actual != sha256 {
        let _ = std::fs::remove_dir_all(dir);
        return Err(LoadError::Unavailable(format!(
            "the cached copy of {uri} is damaged (sha256 {actual}); removed, load it again"
        )));
    }
    let config = read(CONFIG)?;
    let adapter = Adapter::from_bytes(&config, &weights, &Device::Cpu)
        .map_err(|e| LoadError::Invalid(format!("{uri}: {e}")))?;
    let info = &model.info;
    if adapter.config.r > info.max_lora_rank {
        return Err(LoadError::Invalid(format!(
            "{uri}: rank {} is above this server's --max-lora-rank {}",
            adapter.config.r, info.max_lora_rank
        )));
    }
    if let Ok(text) = std::fs::read(dir.join(GRAFT_JSON)) {
        let record: GraftJson = serde_json::from_slice(&text)
            .map_err(|e| LoadError::Invalid(format!("{uri}: graft.json: {e}")))?;
        if record.base_model.sha256 != info.model_sha256 {
            return Err(LoadError::Invalid(format!(
                "{uri} was trained on another base model ({} sha256 {}); this server serves {} (sha256 {})",
                record.base_model.uri, record.base_model.sha256, info.model_uri, info.model_sha256
            )));
        }
    }
    adapter
        .check_fits(&model.llama)
        .map_err(|e| LoadError::Invalid(format!("{uri}: {e}")))?;
    Ok(LoadedAdapter {
        uri: uri.to_owned(),
        sha256: sha256.to_owned(),
        adapter,
    })
}
