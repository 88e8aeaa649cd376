//! Object-store access: the one place that turns a Graft URI (`s3://`, `file://`, `hf://`)
//! into an [`ObjectStore`] and a path inside it.

use std::{fmt, str::FromStr, sync::Arc};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::{
    ObjectStore, ObjectStoreExt, PutPayload, aws::AmazonS3Builder, local::LocalFileSystem,
    path::Path,
};
use url::Url;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid object-store URI {uri:?}: {reason}")]
    InvalidUri { uri: String, reason: String },
    #[error("{scheme}:// URIs are not supported here: {reason}")]
    UnsupportedScheme {
        scheme: &'static str,
        reason: &'static str,
    },
    #[error("opening the object store for {uri}: {source}")]
    Open {
        uri: String,
        source: object_store::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A parsed object-store location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObjectUri {
    /// `s3://bucket/key/prefix`
    S3 { bucket: String, key: String },
    /// `file:///absolute/path`
    File { path: String },
    /// `hf://org/name[/path]`: a repository on the Hugging Face hub.
    Hf { repo: String, path: String },
}

impl ObjectUri {
    /// The URI scheme: `s3`, `file` or `hf`.
    pub fn scheme(&self) -> &'static str {
        match self {
            Self::S3 { .. } => "s3",
            Self::File { .. } => "file",
            Self::Hf { .. } => "hf",
        }
    }
}

impl FromStr for ObjectUri {
    type Err = Error;

    fn from_str(uri: &str) -> Result<Self> {
        let invalid = |reason: &str| Error::InvalidUri {
            uri: uri.to_owned(),
            reason: reason.to_owned(),
        };
        let url = Url::parse(uri).map_err(|e| invalid(&e.to_string()))?;
        match url.scheme() {
            "s3" => {
                let bucket = url
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| invalid("no bucket"))?;
                let key = url.path().trim_start_matches('/').to_owned();
                Ok(Self::S3 {
                    bucket: bucket.to_owned(),
                    key,
                })
            }
            "file" => {
                if url.host_str().is_some_and(|h| !h.is_empty()) {
                    return Err(invalid(
                        "file URIs take no host: write file:///absolute/path",
                    ));
                }
                Ok(Self::File {
                    path: url.path().to_owned(),
                })
            }
            "hf" => {
                let org = url
                    .host_str()
                    .filter(|o| !o.is_empty())
                    .ok_or_else(|| invalid("no organisation"))?;
                let mut segments = url.path().trim_start_matches('/').splitn(2, '/');
                let name = segments
                    .next()
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| invalid("no repository name"))?;
                let path = segments.next().unwrap_or_default().to_owned();
                Ok(Self::Hf {
                    repo: format!("{org}/{name}"),
                    path,
                })
            }
            other => Err(invalid(&format!(
                "unknown scheme {other:?}; use s3://, file:// or hf://"
            ))),
        }
    }
}

impl fmt::Display for ObjectUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::S3 { bucket, key } => write!(f, "s3://{bucket}/{key}"),
            Self::File { path } => write!(f, "file://{path}"),
            Self::Hf { repo, path } if path.is_empty() => write!(f, "hf://{repo}"),
            Self::Hf { repo, path } => write!(f, "hf://{repo}/{path}"),
        }
    }
}

/// How to reach S3: the FineTuneJob's `spec.storage` plus credentials from the environment.
#[derive(Clone, Default)]
pub struct S3Options {
    /// Endpoint of an S3-compatible store; AWS when `None`. Path-style addressing is used
    /// whenever an endpoint is set, since MinIO-like stores rarely have per-bucket DNS.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
}

impl fmt::Debug for S3Options {
    // Credentials never reach a log line through Debug.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field(
                "access_key_id",
                &self.access_key_id.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl S3Options {
    /// Credentials from the standard `AWS_*` variables (what the operator injects from the
    /// job's Secret); `endpoint` and `region` from the arguments, falling back to
    /// `AWS_ENDPOINT_URL` and `AWS_REGION`.
    pub fn from_env(endpoint: Option<String>, region: Option<String>) -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            endpoint: endpoint.or_else(|| var("AWS_ENDPOINT_URL")),
            region: region
                .or_else(|| var("AWS_REGION"))
                .or_else(|| var("AWS_DEFAULT_REGION")),
            access_key_id: var("AWS_ACCESS_KEY_ID"),
            secret_access_key: var("AWS_SECRET_ACCESS_KEY"),
            session_token: var("AWS_SESSION_TOKEN"),
        }
    }
}

/// An open store and the prefix the URI points at inside it.
#[derive(Debug, Clone)]
pub struct Location {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: Path,
}

impl Location {
    /// The path of `name` under this location's prefix.
    pub fn child(&self, name: &str) -> Path {
        name.split('/')
            .filter(|s| !s.is_empty())
            .fold(self.prefix.clone(), Path::join)
    }
}

impl Location {
    /// The whole object `name` under the prefix.
    pub async fn get(&self, name: &str) -> Result<Bytes, object_store::Error> {
        self.store.get(&self.child(name)).await?.bytes().await
    }

    /// `None` when `name` does not exist.
    pub async fn get_opt(&self, name: &str) -> Result<Option<Bytes>, object_store::Error> {
        match self.get(name).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes `name` whole: object stores (and `LocalFileSystem`, through a temporary file and a
    /// rename) never show a partly written object.
    pub async fn put(&self, name: &str, bytes: Vec<u8>) -> Result<(), object_store::Error> {
        self.store
            .put(&self.child(name), PutPayload::from(bytes))
            .await
            .map(|_| ())
    }

    pub async fn delete(&self, name: &str) -> Result<(), object_store::Error> {
        match self.store.delete(&self.child(name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Server-side copy of `from` to `to`, both under the prefix.
    pub async fn copy(&self, from: &str, to: &str) -> Result<(), object_store::Error> {
        self.store.copy(&self.child(from), &self.child(to)).await
    }

    /// Names of the immediate sub-"directories" of `name`.
    pub async fn list_dirs(&self, name: &str) -> Result<Vec<String>, object_store::Error> {
        let listing = match self
            .store
            .list_with_delimiter(Some(&self.child(name)))
            .await
        {
            Ok(listing) => listing,
            Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        Ok(listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_owned))
            .collect())
    }

    /// Every object under the prefix, as `(path relative to the prefix, size)`.
    pub async fn list_all(&self) -> Result<Vec<(String, u64)>, object_store::Error> {
        let objects: Vec<_> = self.store.list(Some(&self.prefix)).try_collect().await?;
        Ok(objects
            .into_iter()
            .filter_map(|meta| {
                let relative = meta.location.prefix_match(&self.prefix)?;
                let name = relative
                    .map(|p| p.as_ref().to_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                Some((name, meta.size))
            })
            .collect())
    }

    /// Copies every object under the prefix into `dest`, skipping files already there with
    /// the right size (a restarted pod reuses its cache); each file appears under its final
    /// name only once complete.
    pub async fn download_to(&self, dest: &std::path::Path) -> Result<(), DownloadError> {
        for (name, size) in self.list_all().await? {
            let target = dest.join(&name);
            if std::fs::metadata(&target).is_ok_and(|m| m.len() == size) {
                continue;
            }
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(|source| DownloadError::Write {
                    path: target.clone(),
                    source,
                })?;
            }
            let partial = target.with_extension("partial");
            let bytes = self.get(&name).await?;
            std::fs::write(&partial, &bytes)
                .and_then(|()| std::fs::rename(&partial, &target))
                .map_err(|source| DownloadError::Write {
                    path: target.clone(),
                    source,
                })?;
        }
        Ok(())
    }
}

impl Location {
    /// Copies the one object the location names (the URI's key itself, not a prefix) to
    /// `target`, streamed, unless a file of its size is already there; the file appears under
    /// its final name only once complete.
    pub async fn download_object_to(&self, target: &std::path::Path) -> Result<(), DownloadError> {
        use std::io::Write as _;

        let size = self.store.head(&self.prefix).await?.size;
        if std::fs::metadata(target).is_ok_and(|m| m.len() == size) {
            return Ok(());
        }
        let write = |source| DownloadError::Write {
            path: target.to_owned(),
            source,
        };
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(write)?;
        }
        let partial = target.with_extension("partial");
        let mut file = std::io::BufWriter::new(std::fs::File::create(&partial).map_err(write)?);
        let mut chunks = self.store.get(&self.prefix).await?.into_stream();
        while let Some(chunk) = chunks.try_next().await? {
            file.write_all(&chunk).map_err(write)?;
        }
        file.into_inner()
            .map_err(|e| write(e.into_error()))?
            .sync_all()
            .map_err(write)?;
        std::fs::rename(&partial, target).map_err(write)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error(transparent)]
    Store(#[from] object_store::Error),
    #[error("writing {}: {source}", path.display())]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Whether an object-store error is the caller's doing (a missing object, refused
/// credentials), which retrying cannot fix, rather than the network's or the store's.
pub fn is_permanent(error: &object_store::Error) -> bool {
    matches!(
        error,
        object_store::Error::NotFound { .. }
            | object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. }
            | object_store::Error::InvalidPath { .. }
    )
}

/// Opens the store behind `uri`.
pub fn open(uri: &ObjectUri, s3: &S3Options) -> Result<Location> {
    let open_err = |source| Error::Open {
        uri: uri.to_string(),
        source,
    };
    match uri {
        ObjectUri::S3 { bucket, key } => {
            let mut builder = AmazonS3Builder::new()
                .with_bucket_name(bucket)
                .with_region(s3.region.clone().unwrap_or_else(|| "us-east-1".to_owned()));
            if let Some(endpoint) = &s3.endpoint {
                builder = builder
                    .with_endpoint(endpoint)
                    .with_virtual_hosted_style_request(false)
                    .with_allow_http(endpoint.starts_with("http://"));
            }
            if let (Some(id), Some(secret)) = (&s3.access_key_id, &s3.secret_access_key) {
                builder = builder
                    .with_access_key_id(id)
                    .with_secret_access_key(secret);
            }
            if let Some(token) = &s3.session_token {
                builder = builder.with_token(token);
            }
            let store = builder.build().map_err(open_err)?;
            Ok(Location {
                store: Arc::new(store),
                prefix: Path::from(key.as_str()),
            })
        }
        ObjectUri::File { path } => {
            let store = LocalFileSystem::new_with_prefix("/").map_err(open_err)?;
            Ok(Location {
                store: Arc::new(store),
                prefix: Path::from(path.as_str()),
            })
        }
        ObjectUri::Hf { .. } => Err(Error::UnsupportedScheme {
            scheme: "hf",
            reason: "this build reads models from s3:// or file://; mirror the hub repository there",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_scheme_and_prints_it_back() {
        for (uri, parsed) in [
            (
                "s3://models/llama/3/",
                ObjectUri::S3 {
                    bucket: "models".into(),
                    key: "llama/3/".into(),
                },
            ),
            (
                "s3://bucket",
                ObjectUri::S3 {
                    bucket: "bucket".into(),
                    key: String::new(),
                },
            ),
            (
                "file:///data/model",
                ObjectUri::File {
                    path: "/data/model".into(),
                },
            ),
            (
                "hf://meta-llama/Llama-3.1-8B",
                ObjectUri::Hf {
                    repo: "meta-llama/Llama-3.1-8B".into(),
                    path: String::new(),
                },
            ),
            (
                "hf://org/name/sub/file.json",
                ObjectUri::Hf {
                    repo: "org/name".into(),
                    path: "sub/file.json".into(),
                },
            ),
        ] {
            let got: ObjectUri = uri.parse().expect(uri);
            assert_eq!(got, parsed, "{uri}");
            let expected = if uri == "s3://bucket" {
                "s3://bucket/"
            } else {
                uri
            };
            assert_eq!(got.to_string(), expected);
        }
    }

    #[test]
    fn rejects_what_it_cannot_name() {
        for (uri, needle) in [
            ("gs://bucket/x", "unknown scheme"),
            ("file://host/path", "no host"),
            ("hf://org", "no repository name"),
            ("not a uri", "invalid object-store URI"),
        ] {
            let err = uri.parse::<ObjectUri>().expect_err(uri).to_string();
            assert!(err.contains(needle), "{uri}: {err}");
        }
    }

    #[test]
    fn debug_output_redacts_credentials() {
        let opts = S3Options {
            access_key_id: Some("AKIDSECRET".into()),
            secret_access_key: Some("verysecret".into()),
            ..S3Options::default()
        };
        let shown = format!("{opts:?}");
        assert!(
            !shown.contains("AKIDSECRET") && !shown.contains("verysecret"),
            "{shown}"
        );
    }

    #[test]
    fn child_joins_under_the_prefix() {
        let loc = open(
            &"file:///tmp/graft".parse().expect("uri"),
            &S3Options::default(),
        )
        .expect("open");
        assert_eq!(loc.child("a/b.json").as_ref(), "tmp/graft/a/b.json");
    }
}
