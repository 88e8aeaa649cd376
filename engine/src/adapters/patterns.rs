//! PEFT's `rank_pattern` and `alpha_pattern`: per-module ranks and alphas keyed by regular
//! expressions over module names (`model.layers.0.self_attn.q_proj`). PEFT tries the keys in
//! the order its JSON lists them and takes the first that matches the end of the name at a
//! dot (`(.*\.)?(key)$` from the start: its `get_pattern_key`); so do we.

use std::fmt;

use regex::Regex;
use serde::{
    Deserialize, Deserializer, Serialize, Serializer,
    de::{MapAccess, Visitor},
    ser::SerializeMap,
};

/// Keys and values in the order the JSON object lists them.
#[derive(Clone, Debug, PartialEq)]
pub struct Patterns<T>(Vec<(String, T)>);

impl<T> Default for Patterns<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T> Patterns<T> {
    pub fn new(entries: Vec<(String, T)>) -> Self {
        Self(entries)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The same keys, in the same order, with each value through `f`.
    #[must_use]
    pub fn map(&self, f: impl Fn(&T) -> T) -> Self {
        Self(self.0.iter().map(|(k, v)| (k.clone(), f(v))).collect())
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.0.iter().map(|(_, v)| v)
    }

    /// Whether every key is a regular expression we can match as PEFT (Python's `re`) would;
    /// the reason for the first that is not.
    pub fn check(&self) -> Result<(), String> {
        for (key, _) in &self.0 {
            matcher(key).map_err(|e| format!("pattern {key:?}: {e}"))?;
        }
        Ok(())
    }

    /// The value of the first key matching `module`, a module's full name.
    pub fn lookup(&self, module: &str) -> Option<&T> {
        self.0
            .iter()
            .find(|(key, _)| matcher(key).is_ok_and(|m| m.is_match(module)))
            .map(|(_, value)| value)
    }
}

/// `key` as PEFT applies it with `re.match(rf"(.*\.)?({key})$", name)`.
fn matcher(key: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
}

impl<T: Serialize> Serialize for Patterns<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, value) in &self.0 {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Patterns<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct InOrder<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for InOrder<T> {
            type Value = Patterns<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of patterns")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut access: M) -> Result<Self::Value, M::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = access.next_entry()? {
                    entries.push(entry);
                }
                Ok(Patterns(entries))
            }
        }
        deserializer.deserialize_map(InOrder(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_key_matching_at_a_dot_wins_in_json_order() {
        let patterns: Patterns<usize> =
            serde_json::from_str(r#"{"layers.1.self_attn.q_proj": 2, "q_proj": 8, "proj": 3}"#)
                .expect("patterns");
        let at = |name: &str| patterns.lookup(name).copied();
        assert_eq!(at("model.layers.1.self_attn.q_proj"), Some(2));
        assert_eq!(at("model.layers.0.self_attn.q_proj"), Some(8));
        // `proj` must match from a dot: `o_proj` ends in `proj` but not at one.
        assert_eq!(at("model.layers.0.self_attn.o_proj"), None);
        assert_eq!(
            serde_json::to_string(&patterns).expect("json"),
            r#"{"layers.1.self_attn.q_proj":2,"q_proj":8,"proj":3}"#,
            "written back in the same order"
        );
        let bad: Patterns<usize> = serde_json::from_str(r#"{"(?<=x)q": 2}"#).expect("parses");
        assert!(bad.check().is_err(), "look-behind is refused, not ignored");
    }
}
