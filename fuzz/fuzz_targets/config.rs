//! The host's configuration files, from the same TOML text: the host's own
//! (`iim_host::config::Config`, as `Config::from_file` reads it, then `validate`) and a
//! plugin's (`plugin::settings::parse`, under the host's `[plugins]` if valid, else the
//! defaults).
//!
//! Checked: parsing and validating never panic, whatever the text. A host configuration that
//! `validate` accepts is one the host can start from: its paths are made without a panic, the
//! data key file is beside the data directory and never inside it, and a client connection's
//! session machine made from its limits takes a `Hello` and answers `Welcome`, with deadlines
//! that the clock can hold. A plugin's settings that parse are within their documented bounds.

#![no_main]

use iim_host::config::{Config, MAX_PLUGIN_INSTANCES};
use iim_host::plugin::settings::{self, MAX_CALL_TIMEOUT_MS, MAX_HTTP_BODY_KIB};
use iim_proto::session::HostSession;
use iim_proto::{ClientFrame, PROTOCOL_VERSION, ServerFrame, encode_frame};
use libfuzzer_sys::fuzz_target;
use std::time::Instant;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = match toml::from_str::<Config>(text) {
        Ok(config) if config.validate().is_ok() => Some(config),
        Ok(_) => None,
        Err(e) => {
            // What `from_file` puts in its error: the message, with line and column.
            let _ = e.to_string();
            None
        }
    };
    let plugins = config
        .as_ref()
        .map(|c| c.plugins.clone())
        .unwrap_or_default();
    if let Ok(file) = settings::parse(text, &plugins) {
        let s = &file.settings;
        assert!((1..=MAX_PLUGIN_INSTANCES).contains(&s.instances), "{s:?}");
        assert!(
            (1..=plugins.max_memory_mib).contains(&s.max_memory_mib),
            "{s:?}"
        );
        let most = MAX_CALL_TIMEOUT_MS.max(plugins.call_timeout_ms);
        assert!((1..=most).contains(&s.call_timeout_ms), "{s:?}");
        assert!(
            (1..=MAX_CALL_TIMEOUT_MS).contains(&s.outbound.timeout_ms),
            "{s:?}"
        );
        assert!(
            (1..=MAX_HTTP_BODY_KIB).contains(&s.outbound.max_body_kib),
            "{s:?}"
        );
    }
    if let Some(config) = config {
        check_valid(&config);
    }
});

/// What a configuration that `validate` accepted must give.
fn check_valid(config: &Config) {
    let _ = (config.plugins_dir(), config.plugin_cache_dir());
    let key = config.key_file();
    if config.storage.key_file.is_none() {
        assert!(
            key.parent() == config.data_dir.parent() && !key.starts_with(&config.data_dir),
            "key file {key:?} is not beside data directory {:?}",
            config.data_dir
        );
    }
    let _ = (
        config.limits.message_ttl(),
        config.limits.retry_policy().give_up_after(),
    );

    let now = Instant::now();
    let mut session = HostSession::new(now, config.limits.session(&config.server_id), false);
    let hello = ClientFrame::Hello {
        version: PROTOCOL_VERSION,
        agent: "fuzz".into(),
    };
    let hello = encode_frame(&hello, config.limits.max_frame).expect("a Hello fits any limit");
    session.handle_data(now, &hello);
    let welcome = session.poll_transmit().expect("a Hello is answered");
    let mut decoder = iim_proto::FrameDecoder::new(config.limits.max_frame);
    decoder.push(&welcome);
    assert!(matches!(
        decoder.decode::<ServerFrame>(),
        Ok(Some(ServerFrame::Welcome { .. }))
    ));
    assert!(
        session.poll_timeout().is_some_and(|t| t >= now),
        "no deadline for the login"
    );
}
