//! Where a base model's files come from: a `file://` directory or GGUF file read in place, or
//! an object store prefix (or `.gguf` object) mirrored into a local cache. Trainer and server
//! load models the same way.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::storage::{DownloadError, Location, ObjectUri};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("downloading the base model: {0}")]
    Download(#[from] DownloadError),
    #[error(
        "the base model {uri} has no config.json (expected a Hugging Face model directory, or \
         a URI ending in .gguf)"
    )]
    NotAModel { uri: String },
    #[error("the base model {uri}: no such GGUF file")]
    NoGgufFile { uri: String },
    #[error("reading the base model {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A base model's files on local disk, in one of the two layouts Graft reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelFiles {
    /// A Hugging Face model directory: `config.json`, safetensors, tokenizer files.
    Directory(PathBuf),
    /// One GGUF file (llama.cpp's format): configuration, tokenizer and weights together.
    Gguf(PathBuf),
}

impl ModelFiles {
    /// The directory or the file.
    pub fn path(&self) -> &Path {
        match self {
            Self::Directory(path) | Self::Gguf(path) => path,
        }
    }
}

/// Whether `uri` names a GGUF file rather than a model directory.
pub fn is_gguf(uri: &ObjectUri) -> bool {
    let path = match uri {
        ObjectUri::S3 { key, .. } => key,
        ObjectUri::File { path } | ObjectUri::Hf { path, .. } => path,
    };
    Path::new(path)
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// The model's files on local disk. Downloads go to `<cache>/models/<hash of the URI>/`,
/// reused by a restarted process (files already there with the right size are skipped).
pub async fn fetch(
    uri: &ObjectUri,
    location: &Location,
    cache: &Path,
) -> Result<ModelFiles, SourceError> {
    let local = if let ObjectUri::File { path } = uri {
        PathBuf::from(path)
    } else {
        let dir = cache
            .join("models")
            .join(&format!("{:x}", Sha256::digest(uri.to_string()))[..16]);
        if is_gguf(uri) {
            let name = location.prefix.filename().unwrap_or("model.gguf");
            let file = dir.join(name);
            match location.download_object_to(&file).await {
                Err(DownloadError::Store(object_store::Error::NotFound { .. })) => {
                    return Err(SourceError::NoGgufFile {
                        uri: uri.to_string(),
                    });
                }
                other => other?,
            }
            file
        } else {
            location.download_to(&dir).await?;
            dir
        }
    };
    if is_gguf(uri) {
        if !local.is_file() {
            return Err(SourceError::NoGgufFile {
                uri: uri.to_string(),
            });
        }
        return Ok(ModelFiles::Gguf(local));
    }
    if !local.join("config.json").is_file() {
        return Err(SourceError::NotAModel {
            uri: uri.to_string(),
        });
    }
    Ok(ModelFiles::Directory(local))
}

/// The model's identity: SHA-256 over `name  sha256(file)` lines of its files in name order
/// (a GGUF model is its one file). `graft.json` records it, and the server refuses adapters
/// trained on another digest.
pub fn digest(files: &ModelFiles) -> Result<String, SourceError> {
    let read = |path: &Path| {
        let path = path.to_owned();
        move |source| SourceError::Read { path, source }
    };
    let mut paths: Vec<PathBuf> = match files {
        ModelFiles::Directory(dir) => std::fs::read_dir(dir)
            .map_err(read(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect(),
        ModelFiles::Gguf(file) => vec![file.clone()],
    };
    paths.sort();
    let mut named = Vec::with_capacity(paths.len());
    for path in paths {
        let mut file = std::fs::File::open(&path).map_err(read(&path))?;
        let mut one = Sha256::new();
        std::io::copy(&mut file, &mut one).map_err(read(&path))?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        named.push((name.into_owned(), format!("{:x}", one.finalize())));
    }
    Ok(digest_named(&named))
}

/// The digest of several named files: the sha256 of their `name  sha256` lines in order, as
/// `sha256sum` prints them (hex digests given).
pub fn digest_named(files: &[(String, String)]) -> String {
    let mut all = Sha256::new();
    for (name, sha256) in files {
        all.update(format!("{name}  {sha256}\n"));
    }
    format!("{:x}", all.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uri_ending_in_gguf_names_a_gguf_file() {
        for (uri, gguf) in [
            ("s3://models/smollm2/model.Q4_1.gguf", true),
            ("file:///models/SmolLM2.GGUF", true),
            ("s3://models/llama-3.1-8b/", false),
            ("file:///models/tiny", false),
        ] {
            let parsed: ObjectUri = uri.parse().expect("a valid URI");
            assert_eq!(is_gguf(&parsed), gguf, "{uri}");
        }
    }
}
