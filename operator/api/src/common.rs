use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A URI the trainer or server can read from: `s3://bucket/key`, `file:///path` or
/// `hf://org/name`. Kept in one place so the schemas of both kinds agree.
pub(crate) const SOURCE_URI_PATTERN: &str = r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?|file:///.*|hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(/.*)?)$";

/// A URI the trainer can write to: `s3://bucket/prefix/` or `file:///path/`.
pub(crate) const OUTPUT_URI_PATTERN: &str =
    r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?|file:///.+)$";

/// A lowercase hex SHA-256 digest.
pub(crate) const SHA256_PATTERN: &str = "^[0-9a-f]{64}$";

/// A Kubernetes object name (RFC 1123 subdomain).
pub(crate) const NAME_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// A Kubernetes namespace name (RFC 1123 label).
pub(crate) const DNS_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// A reference to a Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret, in the namespace of the referring object.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub name: String,
}

/// A reference to another object of a known kind in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalObjectRef {
    /// Name of the object, in the namespace of the referring object.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub name: String,
}
