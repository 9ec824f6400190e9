//! Outbound HTTP for plugins: `wasi:http/outgoing-handler`, to the hosts a plugin's
//! configuration allows and nowhere else.
//!
//! A plugin that posts push notifications, calls a webhook or asks a directory needs HTTP; a
//! plugin that can reach any address could also reach the operator's internal services. So,
//! as Spin's `allowed_outbound_hosts` does, each plugin names in its `[host]` table the
//! origins it may call (`allowed_outbound_hosts = ["https://push.example.com"]`); a request
//! to any other is refused with `HTTP-request-denied` before anything is sent, and the refusal
//! is logged under the plugin's name. Every request is bounded: connecting and the response's
//! first byte within `http_timeout_ms`, request and response bodies within
//! `http_max_body_kib`.
//!
//! The host sends the requests itself (not through `wasmtime-wasi-http`'s default sender):
//! TLS with the public web roots plus the CA file the plugin's configuration may name (a
//! private gateway), HTTP/2 when the server offers it (APNs speaks nothing else), HTTP/1.1
//! otherwise.

use bytes::Bytes;
use http::uri::Scheme;
use http_body_util::BodyExt;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

/// An origin a plugin may call: a scheme, a host (or every subdomain of one: `*.example.com`)
/// and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    https: bool,
    host: String,
    port: u16,
}

impl AllowedHost {
    /// Parses `https://host[:port]` or `http://host[:port]` (no path); the port defaults to the
    /// scheme's.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("{text:?}: {why} (write scheme://host[:port])");
        let (https, rest) = if let Some(rest) = text.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = text.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(bad("the scheme must be https:// or http://"));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@']) || rest.is_empty() {
            return Err(bad("only a host and a port, no path or user"));
        }
        let authority: http::uri::Authority = rest.parse().map_err(|_| bad("not a host"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let wildcard = host.strip_prefix("*.");
        if host.contains('*') && wildcard.is_none_or(|h| h.contains('*') || h.is_empty()) {
            return Err(bad("a wildcard is only `*.` before a domain"));
        }
        Ok(Self {
            https,
            host: host.to_ascii_lowercase(),
            port: authority.port_u16().unwrap_or(if https { 443 } else { 80 }),
        })
    }

    /// Whether a request to `host:port` over `https` (or not) is to this origin.
    fn allows(&self, https: bool, host: &str, port: u16) -> bool {
        if self.https != https || self.port != port {
            return false;
        }
        let host = host.to_ascii_lowercase();
        match self.host.strip_prefix("*.") {
            Some(domain) => host
                .strip_suffix(domain)
                .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
            None => host == self.host,
        }
    }
}

impl std::fmt::Display for AllowedHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

/// What a plugin's `[host]` table says about its outbound HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// The origins it may call; none by default.
    pub allowed: Vec<AllowedHost>,
    /// Connecting, TLS and the response's first byte, at most, in milliseconds.
    pub timeout_ms: u64,
    /// A request's or a response's body, at most, in KiB.
    pub max_body_kib: u64,
    /// More roots to trust than the public web's: a PEM file.
    pub ca_file: Option<PathBuf>,
}

impl Default for Outbound {
    fn default() -> Self {
        Self {
            allowed: Vec::new(),
            timeout_ms: 5_000,
            max_body_kib: 64,
            ca_file: None,
        }
    }
}

/// A plugin's outbound HTTP, ready to send: its limits and its TLS configuration.
#[derive(Debug)]
pub struct Policy {
    plugin: Arc<str>,
    outbound: Outbound,
    /// Made only for a plugin that may call some origin: most call none.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Policy {
    /// The policy of `plugin` for `outbound`: reads its CA file, if it may call any origin.
    /// The error says what is wrong with the file.
    pub fn new(plugin: &str, outbound: &Outbound) -> Result<Self, String> {
        let tls = match outbound.allowed.is_empty() {
            true => None,
            false => Some(Arc::new(tls_config(outbound.ca_file.as_deref())?)),
        };
        Ok(Self {
            plugin: plugin.into(),
            outbound: outbound.clone(),
            tls,
        })
    }

    /// A policy that allows nothing: for a plugin run outside a loaded host.
    pub fn none(plugin: &str) -> Self {
        Self {
            plugin: plugin.into(),
            outbound: Outbound::default(),
            tls: None,
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.outbound.timeout_ms)
    }

    fn max_body(&self) -> usize {
        usize::try_from(self.outbound.max_body_kib.saturating_mul(1024)).unwrap_or(usize::MAX)
    }

    /// Whether a request to `uri` may be sent; if not, says why in the log.
    fn check(&self, uri: &http::Uri) -> Result<(), Error> {
        let https = uri.scheme() == Some(&Scheme::HTTPS);
        let (Some(host), true) = (uri.host(), https || uri.scheme() == Some(&Scheme::HTTP)) else {
            return Err(Error::HttpRequestUriInvalid);
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        if self
            .outbound
            .allowed
            .iter()
            .any(|allowed| allowed.allows(https, host, port))
        {
            return Ok(());
        }
        tracing::warn!(
            plugin = %self.plugin,
            %uri,
            "outbound HTTP refused: not in the plugin's host.allowed_outbound_hosts"
        );
        Err(Error::HttpRequestDenied)
    }
}

/// TLS for outbound requests: the public web's roots and those of `ca_file`, HTTP/2 or 1.1.
fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        for cert in read_certs(path)? {
            roots
                .add(cert)
                .map_err(|e| format!("host.http_ca_file {}: {e}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tls)
}

/// Reads the certificates of a PEM file.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("host.http_ca_file {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "host.http_ca_file {}: no certificate in the file",
            path.display()
        ));
    }
    Ok(certs)
}

/// The `wasi:http` hooks of one plugin instance.
pub struct PluginHttp(pub Arc<Policy>);

type Sent = Result<
    (
        http::Response<WasiBody>,
        Box<dyn Future<Output = Result<(), Error>> + Send>,
    ),
    Error,
>;

impl WasiHttpHooks for PluginHttp {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> Box<dyn Future<Output = Sent> + Send> {
        drop(fut);
        let policy = Arc::clone(&self.0);
        Box::new(async move {
            policy.check(request.uri())?;
            // The guest may ask for less time, never for more.
            let limit = policy.timeout();
            let asked = options
                .and_then(|o| {
                    o.connect_timeout
                        .into_iter()
                        .chain(o.first_byte_timeout)
                        .min()
                })
                .unwrap_or(limit);
            let timeout = asked.min(limit);
            match tokio::time::timeout(timeout, send(&policy, request)).await {
                Ok(sent) => sent,
                Err(_) => {
                    tracing::warn!(plugin = %policy.plugin, ?timeout, "outbound HTTP timed out");
                    Err(Error::ConnectionReadTimeout)
                }
            }
        })
    }
}

/// Sends `request` (whose origin was allowed) and returns its response once its head is in.
async fn send(policy: &Policy, mut request: http::Request<WasiBody>) -> Sent {
    let uri = request.uri().clone();
    let https = uri.scheme() == Some(&Scheme::HTTPS);
    let host = uri
        .host()
        .ok_or(Error::HttpRequestUriInvalid)?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(Error::Connect)?;
    let max = policy.max_body();
    let request_body = std::mem::replace(request.body_mut(), empty());
    *request.body_mut() = limited(request_body, max, Error::HttpRequestBodySize(None));
    let response = if https {
        let tls = policy.tls.as_ref().ok_or(Error::HttpRequestDenied)?;
        let name = ServerName::try_from(host.clone()).map_err(|_| Error::HttpRequestUriInvalid)?;
        let tls = tokio_rustls::TlsConnector::from(Arc::clone(tls))
            .connect(name, tcp)
            .await
            .map_err(Error::Tls)?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = hyper_util::rt::TokioIo::new(tls);
        if h2 {
            // HTTP/2 takes the scheme and authority from the URI; Host has no place in it.
            request.headers_mut().remove(http::header::HOST);
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .map_err(Error::Hyper)?;
            tokio::spawn(conn);
            sender.send_request(request).await.map_err(Error::Hyper)?
        } else {
            http1(io, request).await?
        }
    } else {
        http1(hyper_util::rt::TokioIo::new(tcp), request).await?
    };
    let response = response.map(|body| {
        let body = body.map_err(Error::Hyper).boxed_unsync();
        limited(body, max, Error::HttpResponseBodySize(None))
    });
    let done: Box<dyn Future<Output = Result<(), Error>> + Send> = Box::new(async { Ok(()) });
    Ok((response, done))
}

/// Sends `request` over HTTP/1.1 on `io`: its line names only the path and query (an origin
/// server's form).
async fn http1<IO>(
    io: IO,
    mut request: http::Request<WasiBody>,
) -> Result<http::Response<hyper::body::Incoming>, Error>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    origin_form(&mut request);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(Error::Hyper)?;
    tokio::spawn(conn);
    sender.send_request(request).await.map_err(Error::Hyper)
}

/// An empty body.
fn empty() -> WasiBody {
    http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// `body`, failing with `too_large` past `max` bytes.
fn limited(body: WasiBody, max: usize, too_large: Error) -> WasiBody {
    let too_large = Arc::new(std::sync::Mutex::new(Some(too_large)));
    http_body_util::Limited::new(body, max)
        .map_err(move |e| match e.downcast::<Error>() {
            Ok(e) => *e,
            Err(_) => too_large
                .lock()
                .ok()
                .and_then(|mut e| e.take())
                .unwrap_or(Error::HttpProtocolError),
        })
        .boxed_unsync()
}

/// HTTP/1.1 to an origin server sends only the path and query in the request line.
fn origin_form(request: &mut http::Request<WasiBody>) {
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    if let Ok(uri) = http::Uri::builder().path_and_query(path).build() {
        *request.uri_mut() = uri;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_hosts_match_scheme_host_and_port_and_wildcards_only_subdomains() {
        let a = AllowedHost::parse("https://push.example.com").expect("parses");
        assert!(a.allows(true, "push.example.com", 443));
        assert!(a.allows(true, "PUSH.example.com", 443));
        assert!(!a.allows(false, "push.example.com", 443));
        assert!(!a.allows(true, "push.example.com", 8443));
        assert!(!a.allows(true, "evil.push.example.com", 443));
        let w = AllowedHost::parse("https://*.example.com:8443/").expect("parses");
        assert!(w.allows(true, "a.example.com", 8443));
        assert!(w.allows(true, "a.b.example.com", 8443));
        assert!(!w.allows(true, "example.com", 8443));
        assert!(!w.allows(true, "badexample.com", 8443));
        let ip = AllowedHost::parse("http://127.0.0.1:9000").expect("parses");
        assert!(ip.allows(false, "127.0.0.1", 9000));
        assert_eq!(ip.to_string(), "http://127.0.0.1:9000");
        let v6 = AllowedHost::parse("https://[::1]:9443").expect("parses");
        assert!(v6.allows(true, "::1", 9443));
        for bad in [
            "push.example.com",
            "ftp://x",
            "https://x/path",
            "https://user@x",
            "https://",
            "https://a.*.com",
            "https://*.",
        ] {
            assert!(AllowedHost::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn a_request_to_an_origin_not_allowed_is_denied() {
        let outbound = Outbound {
            allowed: vec![AllowedHost::parse("https://push.example.com").expect("parses")],
            ..Outbound::default()
        };
        let policy = Policy::new("push", &outbound).expect("policy");
        let uri = |s: &str| s.parse::<http::Uri>().expect("uri");
        assert!(
            policy
                .check(&uri("https://push.example.com/v1/send"))
                .is_ok()
        );
        assert!(matches!(
            policy.check(&uri("https://other.example.com/")),
            Err(Error::HttpRequestDenied)
        ));
        assert!(matches!(
            policy.check(&uri("http://push.example.com/")),
            Err(Error::HttpRequestDenied)
        ));
        assert!(matches!(
            Policy::none("p").check(&uri("https://push.example.com/")),
            Err(Error::HttpRequestDenied)
        ));
    }
}
