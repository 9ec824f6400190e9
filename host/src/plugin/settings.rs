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
//! allowed_outbound_hosts = ["https://push.example.com"]   # wasi:http, see http.rs
//! http_timeout_ms = 5000
//! http_max_body_kib = 64
//! http_ca_file = "gateway-ca.pem"   # beside this file, unless absolute
//! ```

use super::http::{AllowedHost, Outbound};
use crate::config::{MAX_PLUGIN_INSTANCES, PluginsConfig};
use std::path::Path;
use std::time::Duration;

/// The longest `call_timeout_ms` a plugin may be given (or the host's own, if higher).
pub const MAX_CALL_TIMEOUT_MS: u64 = 60_000;

/// The largest body a plugin's outbound HTTP request or response may be given, in KiB.
pub const MAX_HTTP_BODY_KIB: u64 = 16 * 1024;

/// How the host runs one plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Instances handling its events side by side (lanes), 1 to [`MAX_PLUGIN_INSTANCES`].
    pub instances: usize,
    /// Linear memory one instance may grow to, in MiB; at most the host's
    /// `plugins.max_memory_mib`.
    pub max_memory_mib: u64,
    /// Milliseconds one call (`init` or `handle`) may run, 1 to [`MAX_CALL_TIMEOUT_MS`].
    pub call_timeout_ms: u64,
    /// Where it may send HTTP requests, and their limits.
    pub outbound: Outbound,
}

impl Settings {
    /// The host's defaults, for a plugin whose file sets none.
    pub fn defaults(config: &PluginsConfig) -> Self {
        Self {
            instances: config.instances,
            max_memory_mib: config.max_memory_mib,
            call_timeout_ms: config.call_timeout_ms,
            outbound: Outbound::default(),
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
        Ok(text) => {
            let mut file = parse(&text, host)?;
            // A CA file is named from beside the configuration file.
            if let (Some(ca), Some(dir)) = (&mut file.settings.outbound.ca_file, path.parent())
                && ca.is_relative()
            {
                *ca = dir.join(&*ca);
            }
            Ok(file)
        }
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
            "allowed_outbound_hosts" => {
                let list = value.as_array().ok_or_else(|| {
                    format!("host.{key} must be a list of origins like \"https://host[:port]\"")
                })?;
                settings.outbound.allowed = list
                    .iter()
                    .map(|item| {
                        let text = item.as_str().ok_or_else(|| {
                            format!("host.{key}: {item} is not a string like \"https://host\"")
                        })?;
                        AllowedHost::parse(text).map_err(|e| format!("host.{key}: {e}"))
                    })
                    .collect::<Result<_, _>>()?;
            }
            "http_timeout_ms" => settings.outbound.timeout_ms = number(1, MAX_CALL_TIMEOUT_MS)?,
            "http_max_body_kib" => {
                settings.outbound.max_body_kib = number(1, MAX_HTTP_BODY_KIB)?;
            }
            "http_ca_file" => {
                let path = value
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| format!("host.{key} must be the path of a PEM file"))?;
                settings.outbound.ca_file = Some(path.into());
            }
            _ => {
                return Err(format!(
                    "host.{key} is not a setting; the [host] table takes instances, \
                     max_memory_mib, call_timeout_ms, allowed_outbound_hosts, http_timeout_ms, \
                     http_max_body_kib and http_ca_file"
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
                call_timeout_ms: 5000,
                outbound: Outbound::default(),
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
            (
                "[host]\nallowed_outbound_hosts = \"https://x\"",
                "host.allowed_outbound_hosts must be a list",
            ),
            (
                "[host]\nallowed_outbound_hosts = [\"x.example.com\"]",
                "host.allowed_outbound_hosts: \"x.example.com\": the scheme",
            ),
            ("[host]\nallowed_outbound_hosts = [1]", "1 is not a string"),
            ("[host]\nhttp_max_body_kib = 0", "host.http_max_body_kib"),
            (
                "[host]\nhttp_ca_file = 3",
                "host.http_ca_file must be the path",
            ),
            ("x = ", "TOML parse error"),
        ] {
            let error = parse(text, &host).expect_err(text);
            assert!(error.contains(says), "{text:?}: {error}");
        }
    }
}
