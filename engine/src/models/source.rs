//! Where a base model's files come from: a `file://` directory read in place, or an object
//! store prefix mirrored into a local cache. Trainer and server load models the same way.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::storage::{DownloadError, Location, ObjectUri};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("downloading the base model: {0}")]
    Download(#[from] DownloadError),
    #[error("the base model {uri} has no config.json (expected a Hugging Face model directory)")]
    NotAModel { uri: String },
    #[error("reading the base model {}: {source}", dir.display())]
    Read {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// The model's files on local disk. Downloads go to `<cache>/models/<hash of the URI>/`,
/// reused by a restarted process (files already there with the right size are skipped).
pub async fn fetch(
    uri: &ObjectUri,
    location: &Location,
    cache: &Path,
) -> Result<PathBuf, SourceError> {
    let dir = if let ObjectUri::File { path } = uri {
        PathBuf::from(path)
    } else {
        let dir = cache
            .join("models")
            .join(&format!("{:x}", Sha256::digest(uri.to_string()))[..16]);
        location.download_to(&dir).await?;
        dir
    };
    if !dir.join("config.json").is_file() {
        return Err(SourceError::NotAModel {
            uri: uri.to_string(),
        });
    }
    Ok(dir)
}

/// The model's identity: SHA-256 over `name  sha256(file)` lines of its files in name order.
/// `graft.json` records it, and the server refuses adapters trained on another digest.
pub fn digest(dir: &Path) -> Result<String, SourceError> {
    let read = |source| SourceError::Read {
        dir: dir.to_owned(),
        source,
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    let mut all = Sha256::new();
    for path in paths {
        let mut file = std::fs::File::open(&path).map_err(read)?;
        let mut one = Sha256::new();
        std::io::copy(&mut file, &mut one).map_err(read)?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        all.update(format!("{name}  {:x}\n", one.finalize()));
    }
    Ok(format!("{:x}", all.finalize()))
}
