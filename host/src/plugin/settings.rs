//! A plugin's configuration file, `NAME.toml`, beside `NAME.wasm`.
//!
//! Its top-level `key = value` pairs are the plugin's own configuration, handed to its `init`
//! as strings. Its `[host]` table is not handed on: it says how the host runs this plugin
//! (how many instances, how much memory each, how long a call) within the host's limits
//! (`[plugins]` in the host's configuration):
//!
//! ```toml
//! max_body = 64          # the plugin's
//!
//! [host]                 # the host's
//! instances = 2
//! max_memory_mib = 96
//! call_timeout_ms = 2000
//! ```

use crate::config::{MAX_PLUGIN_INSTANCES, PluginsConfig};
use std::path::Path;
use std::time::Duration;

/// The longest `call_timeout_ms` a plugin may be given (or the host's own, if higher).
pub const MAX_CALL_TIMEOUT_MS: u64 = 60_000;

/// How the host runs one plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Instances handling its events side by side (lanes), 1 to [`MAX_PLUGIN_INSTANCES`].
    pub instances: usize,
    /// Linear memory one instance may grow to, in MiB; at most the host's
    /// `plugins.max_memory_mib`.
    pub max_memory_mib: u64,
    /// Milliseconds one call (`init` or `handle`) may run, 1 to [`MAX_CALL_TIMEOUT_MS`].
    pub call_timeout_ms: u64,
}

impl Settings {
    /// The host's defaults, for a plugin whose file sets none.
    pub fn defaults(config: &PluginsConfig) -> Self {
        Self {
            instances: config.instances,
            max_memory_mib: config.max_memory_mib,
            call_timeout_ms: config.call_timeout_ms,
        }
    }

    /// How long one call may run.
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }

    /// The memory one instance may grow to, in bytes.
    pub fn max_memory(&self) -> usize {
        usize::try_from(self.max_memory_mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX)
    }
}

/// A plugin's configuration file, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginFile {
    /// The pairs handed to `init`, in the file's order of keys (sorted).
    pub config: Vec<(String, String)>,
    /// How the host runs it.
    pub settings: Settings,
}

/// Reads `path`; a file that does not exist gives no configuration and the host's defaults.
/// The error says what is wrong, naming the key.
pub fn read(path: &Path, host: &PluginsConfig) -> Result<PluginFile, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, host),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PluginFile {
            config: Vec::new(),
            settings: Settings::defaults(host),
        }),
        Err(e) => Err(e.to_string()),
    }
}

/// Parses a configuration file's text.
pub fn parse(text: &str, host: &PluginsConfig) -> Result<PluginFile, String> {
    let table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut config = Vec::new();
    let mut settings = Settings::defaults(host);
    for (key, value) in table {
        match value {
            toml::Value::String(s) => config.push((key, s)),
            toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_) => {
                config.push((key, value.to_string()));
            }
            toml::Value::Table(table) if key == "host" => {
                settings = host_settings(table, host)?;
            }
            _ => {
                return Err(format!(
                    "{key}: only strings, numbers and booleans are passed to a plugin \
                     (and a [host] table says how the host runs it)"
                ));
            }
        }
    }
    Ok(PluginFile { config, settings })
}

fn host_settings(table: toml::Table, host: &PluginsConfig) -> Result<Settings, String> {
    let mut settings = Settings::defaults(host);
    for (key, value) in table {
        let number = |min: u64, max: u64| match value.as_integer() {
            Some(n) if (min as i64..=max as i64).contains(&n) => Ok(n as u64),
            _ => Err(format!(
                "host.{key} must be a whole number from {min} to {max}, not {value}"
            )),
        };
        match key.as_str() {
            "instances" => settings.instances = number(1, MAX_PLUGIN_INSTANCES as u64)? as usize,
            "max_memory_mib" => settings.max_memory_mib = number(1, host.max_memory_mib)?,
            "call_timeout_ms" => {
                let most = MAX_CALL_TIMEOUT_MS.max(host.call_timeout_ms);
                settings.call_timeout_ms = number(1, most)?;
            }
            _ => {
                return Err(format!(
                    "host.{key} is not a setting; the [host] table takes instances, \
                     max_memory_mib and call_timeout_ms"
                ));
            }
        }
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_table_is_the_host_s_and_the_rest_the_plugin_s() {
        let host = PluginsConfig::default();
        let file = parse(
            "max_body = 64\npolicy = \"friends\"\n[host]\ninstances = 2\ncall_timeout_ms = 5000\n",
            &host,
        )
        .expect("parses");
        assert_eq!(
            file.config,
            [
                ("max_body".to_owned(), "64".to_owned()),
                ("policy".to_owned(), "friends".to_owned())
            ]
        );
        assert_eq!(
            file.settings,
            Settings {
                instances: 2,
                max_memory_mib: host.max_memory_mib,
                call_timeout_ms: 5000
            }
        );
        assert_eq!(
            parse("", &host).expect("empty").settings,
            Settings::defaults(&host)
        );
    }

    #[test]
    fn settings_out_of_bounds_or_unknown_are_refused_naming_the_key() {
        let host = PluginsConfig::default();
        for (text, says) in [
            (
                "[host]\ninstances = 0",
                "host.instances must be a whole number from 1 to 16",
            ),
            ("[host]\ninstances = 17", "from 1 to 16"),
            ("[host]\ninstances = \"2\"", "host.instances"),
            (
                "[host]\nmax_memory_mib = 129",
                "host.max_memory_mib must be a whole number from 1 to 128",
            ),
            ("[host]\ncall_timeout_ms = 60001", "host.call_timeout_ms"),
            ("[host]\nthreads = 2", "host.threads is not a setting"),
            (
                "[other]\nx = 1",
                "other: only strings, numbers and booleans",
            ),
            ("list = [1]", "list: only strings"),
            ("x = ", "TOML parse error"),
        ] {
            let error = parse(text, &host).expect_err(text);
            assert!(error.contains(says), "{text:?}: {error}");
        }
    }
}
