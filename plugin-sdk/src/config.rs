//! `Config`: the `key = "value"` pairs a plugin is loaded with, and typed reads of them.

use crate::PluginError;
use std::fmt::Display;
use std::str::FromStr;

/// A plugin's configuration: the `key = "value"` pairs of the `.toml` file beside its `.wasm`,
/// as the host hands them to `init`.
///
/// Every read that can fail fails with [`PluginError::InvalidConfig`] and a message that names
/// the key and the value, so that the operator sees at load time what to fix.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pairs: Vec<(String, String)>,
}

impl Config {
    /// A configuration made of `pairs`, in the order the host gave them.
    pub fn new(pairs: Vec<(String, String)>) -> Self {
        Self { pairs }
    }

    /// A configuration made of borrowed pairs: handy in tests.
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        Self::new(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    /// The value of `key`, if it is set (the first one, if the host gave it twice).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `key`, or `default` if it is not set.
    pub fn get_or<'a>(&'a self, key: &str, default: &'a str) -> &'a str {
        self.get(key).unwrap_or(default)
    }

    /// The value of `key`; `invalid-config` if it is not set.
    pub fn require(&self, key: &str) -> Result<&str, PluginError> {
        self.get(key)
            .ok_or_else(|| PluginError::InvalidConfig(format!("`{key}` is required")))
    }

    /// The value of `key` parsed as a `T`, or `None` if it is not set; `invalid-config` if it
    /// does not parse.
    pub fn parse<T>(&self, key: &str) -> Result<Option<T>, PluginError>
    where
        T: FromStr,
        T::Err: Display,
    {
        match self.get(key) {
            None => Ok(None),
            Some(value) => value
                .parse()
                .map(Some)
                .map_err(|e| PluginError::InvalidConfig(format!("`{key} = {value:?}`: {e}"))),
        }
    }

    /// The value of `key` parsed as a `T`, or `default` if it is not set; `invalid-config` if
    /// it does not parse.
    pub fn parse_or<T>(&self, key: &str, default: T) -> Result<T, PluginError>
    where
        T: FromStr,
        T::Err: Display,
    {
        Ok(self.parse(key)?.unwrap_or(default))
    }

    /// `invalid-config` naming the first key that is not one of `known`: a misspelt key would
    /// otherwise fall back to its default without a word.
    pub fn deny_unknown(&self, known: &[&str]) -> Result<(), PluginError> {
        match self
            .pairs
            .iter()
            .find(|(k, _)| !known.contains(&k.as_str()))
        {
            None => Ok(()),
            Some((key, _)) => Err(PluginError::InvalidConfig(format!(
                "unknown key `{key}` (known keys: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ))),
        }
    }

    /// Every pair, in the order the host gave them.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_typed_values_and_defaults() {
        let config = Config::from_pairs(&[("limit", "12"), ("name", "x"), ("limit", "13")]);
        assert_eq!(config.get("name"), Some("x"));
        assert_eq!(config.get_or("missing", "d"), "d");
        assert_eq!(config.parse::<u32>("limit"), Ok(Some(12)));
        assert_eq!(config.parse_or::<bool>("flag", true), Ok(true));
        assert_eq!(config.require("name"), Ok("x"));
    }

    #[test]
    fn names_the_key_and_value_that_are_wrong() {
        let config = Config::from_pairs(&[("limit", "many"), ("polcy", "friends")]);
        let Err(PluginError::InvalidConfig(text)) = config.parse::<u32>("limit") else {
            panic!("a bad number must be invalid-config");
        };
        assert!(text.contains("limit") && text.contains("many"), "{text}");
        assert_eq!(
            config.require("policy"),
            Err(PluginError::InvalidConfig("`policy` is required".into()))
        );
        let Err(PluginError::InvalidConfig(text)) = config.deny_unknown(&["limit", "policy"])
        else {
            panic!("an unknown key must be invalid-config");
        };
        assert!(text.contains("`polcy`"), "{text}");
        assert_eq!(config.deny_unknown(&["limit", "polcy"]), Ok(()));
    }
}
