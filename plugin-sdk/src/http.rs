//! Outbound HTTP: a plugin calls a web service (a push gateway, a webhook) through
//! `wasi:http/outgoing-handler`, which the host offers.
//!
//! The host sends a request only to the origins the plugin's configuration allows (its
//! `[host]` table: `allowed_outbound_hosts = ["https://push.example.com"]`), within its time
//! and size limits (`http_timeout_ms`, `http_max_body_kib`); anything else fails with
//! [`HttpError::Denied`] before a byte leaves. A request blocks the plugin's instance until the
//! response is in, and counts against the call's time (`call_timeout_ms`).
//!
//! A request is an effect outside the host: unlike `send` and the storage writes, it is not
//! undone when `handle` fails, and an event handled again makes it again.
//!
//! Outside a component, [`Request::send`] goes to the
//! [`FakeHost`](crate::testing::FakeHost), which records the request and answers what the test
//! told it to ([`FakeHost::answer_http`](crate::testing::FakeHost::answer_http)).
//!
//! ```no_run
//! use iim_plugin_sdk::http::Request;
//!
//! let response = Request::post("https://push.example.com/v1/send")
//!     .header("content-type", "application/json")
//!     .body(br#"{"to":"..."}"#.to_vec())
//!     .send()?;
//! if response.status >= 300 {
//!     iim_plugin_sdk::warn!("gateway said {}", response.status);
//! }
//! # Ok::<(), iim_plugin_sdk::http::HttpError>(())
//! ```

use std::time::Duration;

/// An HTTP method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// GET.
    Get,
    /// POST.
    Post,
    /// PUT.
    Put,
    /// DELETE.
    Delete,
}

/// An outbound request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Its method.
    pub method: Method,
    /// Its URL: `https://host[:port]/path?query` (or `http://`).
    pub url: String,
    /// Its headers, in order.
    pub headers: Vec<(String, String)>,
    /// Its body.
    pub body: Vec<u8>,
    /// How long to wait for the connection and for the response to begin; the host's limit
    /// (`http_timeout_ms`) applies if it is shorter, or if this is `None`.
    pub timeout: Option<Duration>,
}

/// The response to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Its status code.
    pub status: u16,
    /// Its headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// Its body.
    pub body: Vec<u8>,
}

impl Response {
    /// The first header named `name` (any case), if any.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Why a request got no response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// The host refused it: its origin is not in the plugin's `allowed_outbound_hosts`.
    #[error("HTTP request denied: its origin is not in the plugin's allowed_outbound_hosts")]
    Denied,
    /// No connection, or no response, within the time allowed.
    #[error("HTTP request timed out")]
    Timeout,
    /// The request could not be made: a bad URL or header.
    #[error("invalid HTTP request: {0}")]
    Invalid(String),
    /// The request's or the response's body is over the host's limit.
    #[error("HTTP body over the host's limit")]
    TooLarge,
    /// Anything else: the connection failed, TLS failed, the response was malformed.
    #[error("HTTP request failed: {0}")]
    Failed(String),
}

impl Request {
    /// A request with `method` to `url`, no headers, no body.
    pub fn new(method: Method, url: &str) -> Self {
        Self {
            method,
            url: url.to_owned(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout: None,
        }
    }

    /// A GET of `url`.
    pub fn get(url: &str) -> Self {
        Self::new(Method::Get, url)
    }

    /// A POST to `url`.
    pub fn post(url: &str) -> Self {
        Self::new(Method::Post, url)
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: Vec<u8>) -> Self {
        self.body = body;
        self
    }

    /// Sets how long to wait for the connection and for the response to begin.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sends the request and waits for the whole response.
    pub fn send(&self) -> Result<Response, HttpError> {
        imp::http_send(self)
    }

    /// The URL's parts: whether it is https, its authority (`host[:port]`) and its path with
    /// its query.
    pub fn parts(&self) -> Result<(bool, &str, &str), HttpError> {
        let (https, rest) = if let Some(rest) = self.url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = self.url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(HttpError::Invalid(format!(
                "{}: the URL must start with https:// or http://",
                self.url
            )));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return Err(HttpError::Invalid(format!("{}: no host", self.url)));
        }
        Ok((https, authority, path))
    }
}

#[cfg(not(target_arch = "wasm32"))]
use crate::testing::calls as imp;

/// The request through `wasi:http`, in a component.
#[cfg(target_arch = "wasm32")]
mod imp {
    use super::{HttpError, Method, Request, Response};
    use wasip2::http::outgoing_handler;
    use wasip2::http::types::{
        ErrorCode, Fields, IncomingBody, Method as WasiMethod, OutgoingBody, OutgoingRequest,
        RequestOptions, Scheme,
    };
    use wasip2::io::streams::StreamError;

    /// Bytes read from the response at a time.
    const CHUNK: u64 = 16 * 1024;

    pub fn http_send(request: &Request) -> Result<Response, HttpError> {
        let (https, authority, path) = request.parts()?;
        let invalid = |what: &str| HttpError::Invalid(what.to_owned());
        let entries: Vec<(String, Vec<u8>)> = request
            .headers
            .iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), v.as_bytes().to_vec()))
            .collect();
        let headers = Fields::from_list(&entries)
            .map_err(|e| HttpError::Invalid(format!("headers: {e:?}")))?;
        let outgoing = OutgoingRequest::new(headers);
        let method = match request.method {
            Method::Get => WasiMethod::Get,
            Method::Post => WasiMethod::Post,
            Method::Put => WasiMethod::Put,
            Method::Delete => WasiMethod::Delete,
        };
        outgoing
            .set_method(&method)
            .map_err(|()| invalid("method"))?;
        let scheme = if https { Scheme::Https } else { Scheme::Http };
        outgoing
            .set_scheme(Some(&scheme))
            .map_err(|()| invalid("scheme"))?;
        outgoing
            .set_authority(Some(authority))
            .map_err(|()| invalid("authority"))?;
        outgoing
            .set_path_with_query(Some(path))
            .map_err(|()| invalid("path"))?;
        let body = outgoing.body().map_err(|()| invalid("body"))?;
        let options = RequestOptions::new();
        if let Some(timeout) = request.timeout {
            let nanos = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
            // The host caps these by its own limit; a refusal to set them changes nothing.
            let _ = options.set_connect_timeout(Some(nanos));
            let _ = options.set_first_byte_timeout(Some(nanos));
        }
        let future = outgoing_handler::handle(outgoing, Some(options)).map_err(error)?;
        // The body goes once the host has the request: it streams it as it is written.
        {
            let stream = body.write().map_err(|()| invalid("body stream"))?;
            for chunk in request.body.chunks(4096) {
                stream
                    .blocking_write_and_flush(chunk)
                    .map_err(|e| stream_error(&e))?;
            }
        }
        OutgoingBody::finish(body, None).map_err(error)?;
        future.subscribe().block();
        let response = match future.get() {
            Some(Ok(Ok(response))) => response,
            Some(Ok(Err(e))) => return Err(error(e)),
            Some(Err(())) | None => return Err(HttpError::Failed("no response".into())),
        };
        let status = response.status();
        let headers = response
            .headers()
            .entries()
            .into_iter()
            .map(|(n, v)| (n, String::from_utf8_lossy(&v).into_owned()))
            .collect();
        let incoming = response
            .consume()
            .map_err(|()| HttpError::Failed("no response body".into()))?;
        let mut body = Vec::new();
        {
            let stream = incoming
                .stream()
                .map_err(|()| HttpError::Failed("no response body".into()))?;
            loop {
                match stream.blocking_read(CHUNK) {
                    Ok(bytes) => body.extend_from_slice(&bytes),
                    Err(StreamError::Closed) => break,
                    Err(e) => return Err(stream_error(&e)),
                }
            }
        }
        drop(IncomingBody::finish(incoming));
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    fn error(e: ErrorCode) -> HttpError {
        match e {
            ErrorCode::HttpRequestDenied => HttpError::Denied,
            ErrorCode::ConnectionTimeout
            | ErrorCode::ConnectionReadTimeout
            | ErrorCode::HttpResponseTimeout => HttpError::Timeout,
            ErrorCode::HttpRequestBodySize(_) | ErrorCode::HttpResponseBodySize(_) => {
                HttpError::TooLarge
            }
            ErrorCode::HttpRequestUriInvalid | ErrorCode::HttpRequestMethodInvalid => {
                HttpError::Invalid(format!("{e}"))
            }
            other => HttpError::Failed(format!("{other}")),
        }
    }

    fn stream_error(e: &StreamError) -> HttpError {
        match e {
            StreamError::LastOperationFailed(inner) => {
                match wasip2::http::types::http_error_code(inner) {
                    Some(code) => error(code),
                    None => HttpError::Failed(inner.to_debug_string()),
                }
            }
            StreamError::Closed => HttpError::Failed("the stream closed".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_splits_into_scheme_authority_and_path() {
        let r = Request::post("https://push.example.com:8443/v1/send?x=1");
        assert_eq!(
            r.parts(),
            Ok((true, "push.example.com:8443", "/v1/send?x=1"))
        );
        assert_eq!(
            Request::get("http://127.0.0.1:9000").parts(),
            Ok((false, "127.0.0.1:9000", "/"))
        );
        assert!(matches!(
            Request::get("ftp://x/").parts(),
            Err(HttpError::Invalid(_))
        ));
        assert!(matches!(
            Request::get("https:///x").parts(),
            Err(HttpError::Invalid(_))
        ));
    }
}
