//! Which adapter URIs each namespace's AdapterDeployments may load: an admin's allow-list of
//! URI prefixes per namespace. A server loads an adapter with its own credentials, so without
//! this a team could have a server read (and serve) another team's adapter by naming its URI.

use std::collections::BTreeMap;

/// Allowed URI prefixes by namespace; `*` stands for every namespace not listed. No entries
/// at all: every URI is allowed (the default, for single-team clusters).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourcePolicy {
    prefixes: BTreeMap<String, Vec<String>>,
}

impl SourcePolicy {
    /// From `namespace=prefix[,prefix…]` entries (the `--adapter-uri-prefixes` flag).
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let mut prefixes: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for entry in entries {
            let (namespace, list) = entry.split_once('=').ok_or_else(|| {
                format!(
                    "{entry:?}: expected namespace=prefix[,prefix...] (namespace * for the rest)"
                )
            })?;
            let list: Vec<String> = list
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect();
            if namespace.is_empty() || list.is_empty() {
                return Err(format!("{entry:?}: a namespace and at least one prefix"));
            }
            prefixes
                .entry(namespace.to_owned())
                .or_default()
                .extend(list);
        }
        Ok(Self { prefixes })
    }

    /// Why `uri` may not be loaded for an AdapterDeployment in `namespace`, or `None`.
    pub fn refusal(&self, namespace: &str, uri: &str) -> Option<String> {
        if self.prefixes.is_empty() {
            return None;
        }
        let allowed = self
            .prefixes
            .get(namespace)
            .or_else(|| self.prefixes.get("*"))
            .map(Vec::as_slice)
            .unwrap_or_default();
        if allowed
            .iter()
            .any(|prefix| uri.starts_with(prefix.as_str()))
        {
            return None;
        }
        Some(if allowed.is_empty() {
            format!("{uri}: namespace {namespace} may not load adapters on this cluster")
        } else {
            format!(
                "{uri} is outside the adapter locations allowed to namespace {namespace} ({})",
                allowed.join(", ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(entries: &[&str]) -> SourcePolicy {
        SourcePolicy::parse(&entries.iter().map(|&e| e.to_owned()).collect::<Vec<_>>())
            .expect("valid")
    }

    #[test]
    fn each_namespace_loads_only_under_its_prefixes() {
        let p = policy(&[
            "team-a=s3://adapters/team-a/,s3://shared/",
            "*=s3://shared/",
        ]);
        assert_eq!(p.refusal("team-a", "s3://adapters/team-a/bot/v1/"), None);
        assert_eq!(p.refusal("team-a", "s3://shared/base/"), None);
        let refused = p
            .refusal("team-a", "s3://adapters/team-b/bot/")
            .expect("refused");
        assert!(refused.contains("team-a"), "{refused}");
        assert_eq!(p.refusal("team-c", "s3://shared/x/"), None);
        assert!(p.refusal("team-c", "s3://adapters/team-a/").is_some());
    }

    #[test]
    fn no_policy_allows_everything_and_an_unlisted_namespace_without_default_nothing() {
        assert_eq!(SourcePolicy::default().refusal("any", "file:///x/"), None);
        let p = policy(&["team-a=s3://a/"]);
        assert!(p.refusal("team-b", "s3://a/").is_some());
    }

    #[test]
    fn malformed_entries_are_refused() {
        for bad in ["team-a", "=s3://a/", "team-a="] {
            assert!(SourcePolicy::parse(&[bad.to_owned()]).is_err(), "{bad}");
        }
    }
}
