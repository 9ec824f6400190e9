//! The host's TLS identity: a configured certificate, or a self-signed one generated on first
//! start and kept in the data directory so that clients can be pointed at it (`--ca`).

use crate::config::Config;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};

/// Why the certificate could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file (or the reset key) could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// Generating the certificate failed.
    #[error("generating a certificate: {0}")]
    Generate(String),
    /// Writing the generated certificate failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// rustls refused the certificate or key.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A certificate chain and its key.
pub struct Identity {
    /// The chain, leaf first.
    pub certs: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// Where the chain was read from (what clients trust with `--ca`).
    pub cert_path: PathBuf,
}

/// Loads the configured identity, or the generated one, generating it if it does not exist.
pub fn load_or_generate(config: &Config) -> Result<Identity, TlsError> {
    let (cert_path, key_path) = match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        _ => {
            let cert = config.data_dir.join("cert.pem");
            let key = config.data_dir.join("key.pem");
            if !cert.exists() || !key.exists() {
                generate(&cert, &key, &config.tls.names)?;
                tracing::info!(cert = %cert.display(), "generated a self-signed certificate");
            }
            (cert, key)
        }
    };
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Pem {
            path: cert_path.clone(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: cert_path,
            reason: "no certificate in the file".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| TlsError::Pem {
        path: key_path.clone(),
        reason: e.to_string(),
    })?;
    Ok(Identity {
        certs,
        key,
        cert_path,
    })
}

fn generate(cert_path: &Path, key_path: &Path, extra: &[String]) -> Result<(), TlsError> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    names.extend(extra.iter().cloned());
    let generated =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    write_file(cert_path, generated.cert.pem().as_bytes(), 0o644)?;
    write_file(
        key_path,
        generated.signing_key.serialize_pem().as_bytes(),
        0o600,
    )
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)
}

/// The length of the stateless-reset secret, in bytes.
const RESET_SECRET_LEN: usize = 64;

/// What QUIC stateless resets are made with, derived from a secret kept in the data directory
/// (`reset.key`, generated on first start).
///
/// A client whose host was killed and started again still sends to its old connection. The new
/// process knows nothing of it and answers with a stateless reset, whose token comes from the
/// reset key and the connection id. With the old process's keys, the new one recognises the
/// connection id as one of its own (the id carries a signature made with the id key) and makes
/// the token the client was given, so the client learns at once that its connection is gone and
/// reconnects, instead of waiting for its idle timeout.
pub struct ResetKeys {
    /// Signs stateless-reset tokens.
    pub reset: ring::hmac::Key,
    /// Signs connection ids.
    pub cid: u64,
}

impl ResetKeys {
    /// Loads the secret in `data_dir`, or makes it.
    pub fn load_or_generate(data_dir: &Path) -> Result<Self, TlsError> {
        let path = data_dir.join("reset.key");
        let secret = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = vec![0u8; RESET_SECRET_LEN];
                rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
                write_file(&path, &bytes, 0o600)?;
                bytes
            }
            Err(e) => {
                return Err(TlsError::Pem {
                    path,
                    reason: e.to_string(),
                });
            }
        };
        if secret.len() != RESET_SECRET_LEN {
            return Err(TlsError::Pem {
                path,
                reason: format!(
                    "holds {} bytes, not the {RESET_SECRET_LEN} of a reset key; remove it to make a new one",
                    secret.len()
                ),
            });
        }
        let reset = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
        let derived = ring::hmac::sign(&reset, b"iim connection ids");
        let mut cid = [0u8; 8];
        cid.copy_from_slice(&derived.as_ref()[..8]);
        Ok(Self {
            reset,
            cid: u64::from_le_bytes(cid),
        })
    }

    /// The QUIC endpoint configuration that uses these keys.
    pub fn endpoint_config(self) -> quinn::EndpointConfig {
        let cid = self.cid;
        let mut config = quinn::EndpointConfig::new(std::sync::Arc::new(self.reset));
        config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid))
        });
        config
    }
}

/// The rustls server configuration: TLS 1.3 only, ALPN `alpn` (`iim/1` for clients,
/// `iim-peer/1` for the exchange).
pub fn server_config(identity: Identity, alpn: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.certs, identity.key)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    // 0-RTT for resuming clients (QUIC allows only 0 or u32::MAX); what the session does with
    // early data is limited to what is safe to replay (`ClientFrame::allowed_early`).
    config.max_early_data_size = u32::MAX;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reset_keys_are_kept_across_starts_and_a_damaged_one_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = |dir: &Path| {
            let keys = ResetKeys::load_or_generate(dir).expect("reset keys");
            let tag = ring::hmac::sign(&keys.reset, b"connection id");
            (tag.as_ref().to_vec(), keys.cid)
        };
        let first = keys(dir.path());
        assert_eq!(
            first,
            keys(dir.path()),
            "a restarted host makes the same ids and tokens"
        );

        let other = tempfile::tempdir().expect("tempdir");
        let elsewhere = keys(other.path());
        assert_ne!(
            first.0, elsewhere.0,
            "each data directory has its own reset key"
        );
        assert_ne!(first.1, elsewhere.1, "and its own connection-id key");

        std::fs::write(dir.path().join("reset.key"), b"short").expect("write");
        let Err(err) = ResetKeys::load_or_generate(dir.path()) else {
            panic!("a 5-byte key was taken");
        };
        let err = err.to_string();
        assert!(
            err.contains("reset.key") && err.contains("5 bytes"),
            "{err}"
        );
    }
}
