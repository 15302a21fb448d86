//! One exchange with an OpenAI-compatible backend, owned end to end: the gateway holds the full
//! request body and writes it itself on every attempt, so fallbacks resend bodies of any size
//! intact (Pingora's own retry buffer keeps only 64 KiB).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::HttpPeer;
use pingora::ErrorType;

use super::error::ApiError;
use crate::config::Backend;

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a resolved backend address is reused.
const DNS_TTL: Duration = Duration::from_secs(30);

/// Why an attempt produced no usable response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Could not connect or the connection failed before a response header.
    Connect,
    /// No response header, or no body bytes, within the backend's timeouts.
    Timeout,
    /// A success whose body is not what the API promises (e.g. truncated JSON).
    Malformed,
}

/// A failed attempt: what went wrong, at which backend (its configured name), and the detail for
/// the log (addresses and I/O errors, never the backend's key). Tenants are told only the first
/// two ([`AttemptError::to_api_error`]).
#[derive(Debug)]
pub struct AttemptError {
    pub failure: Failure,
    pub backend: String,
    detail: String,
}

impl AttemptError {
    pub fn new(failure: Failure, backend: &Backend, detail: impl std::fmt::Display) -> Self {
        AttemptError {
            failure,
            backend: backend.name.clone(),
            detail: super::redact::redact(&detail.to_string(), backend.bearer()).into_owned(),
        }
    }

    fn from_pingora(backend: &Backend, e: &pingora::Error) -> AttemptError {
        let failure = match e.etype() {
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                Failure::Timeout
            }
            _ => Failure::Connect,
        };
        AttemptError::new(failure, backend, e)
    }

    /// What the tenant sees: the kind of failure and the backend's name, no address, no
    /// connection detail.
    pub fn to_api_error(&self) -> ApiError {
        let backend = &self.backend;
        match self.failure {
            Failure::Timeout => ApiError::gateway_timeout(format!(
                "No backend answered in time (last tried: `{backend}`)."
            )),
            Failure::Malformed => ApiError::bad_gateway(format!(
                "The answer of backend `{backend}` could not be read."
            )),
            Failure::Connect => ApiError::bad_gateway(format!(
                "No backend could serve the request (last tried: `{backend}`)."
            )),
        }
    }
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "backend `{}`: {:?}: {}",
            self.backend, self.failure, self.detail
        )
    }
}

/// Connections to every backend, pooled, plus a small DNS cache.
pub struct Upstreams {
    connector: Connector,
    resolved: Mutex<HashMap<(String, u16), (SocketAddr, Instant)>>,
}

/// A request sent and its response header received.
pub struct Exchange<'a> {
    upstreams: &'a Upstreams,
    session: HttpSession,
    peer: HttpPeer,
    backend: Arc<Backend>,
}

impl Upstreams {
    pub fn new() -> Upstreams {
        Upstreams {
            connector: Connector::new(None),
            resolved: Mutex::new(HashMap::new()),
        }
    }

    async fn resolve(&self, backend: &Backend) -> Result<SocketAddr, AttemptError> {
        if let Ok(ip) = backend.host.parse::<std::net::IpAddr>() {
            return Ok(SocketAddr::new(ip, backend.port()));
        }
        let key = (backend.host.clone(), backend.port());
        if let Some((addr, at)) = self
            .resolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            if at.elapsed() < DNS_TTL {
                return Ok(*addr);
            }
        }
        let addr = tokio::net::lookup_host((backend.host.as_str(), backend.port()))
            .await
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| AttemptError::new(Failure::Connect, backend, "cannot resolve host"))?;
        self.resolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, (addr, Instant::now()));
        Ok(addr)
    }

    fn peer(&self, backend: &Backend, addr: SocketAddr) -> HttpPeer {
        let mut peer = HttpPeer::new(addr, backend.tls, backend.host.clone());
        peer.options.connection_timeout = Some(backend.connect_timeout);
        peer.options.total_connection_timeout = Some(backend.connect_timeout * 2);
        peer.options.read_timeout = Some(backend.read_timeout);
        peer.options.write_timeout = Some(backend.read_timeout);
        peer.options.idle_timeout = Some(POOL_IDLE_TIMEOUT);
        peer
    }

    /// Sends `body` to `backend` and waits for the response header. A pooled connection that
    /// turns out to be dead is replaced transparently (that is not a fallback).
    pub async fn send(
        &self,
        backend: &Arc<Backend>,
        path_suffix: &str,
        body: Bytes,
        stream: bool,
        request_id: &str,
    ) -> Result<Exchange<'_>, AttemptError> {
        let addr = self.resolve(backend).await?;
        let peer = self.peer(backend, addr);
        let mut tries = 0;
        loop {
            tries += 1;
            let (mut session, reused) = self
                .connector
                .get_http_session(&peer)
                .await
                .map_err(|e| AttemptError::from_pingora(backend, &e))?;
            let header = request_header(backend, path_suffix, body.len(), stream, request_id);
            let result = async {
                session.write_request_header(Box::new(header)).await?;
                session.write_request_body(body.clone(), true).await?;
                session.finish_request_body().await?;
                session.set_read_timeout(Some(backend.read_timeout));
                session.read_response_header().await
            }
            .await;
            match result {
                Ok(()) => {
                    return Ok(Exchange {
                        upstreams: self,
                        session,
                        peer,
                        backend: backend.clone(),
                    });
                }
                Err(e) if reused && tries < 3 && !matches!(e.etype(), ErrorType::ReadTimedout) => {
                    tracing::debug!(backend = %backend.name, "pooled connection failed, reconnecting: {e}");
                    session.shutdown().await;
                }
                Err(e) => {
                    session.shutdown().await;
                    return Err(AttemptError::from_pingora(backend, &e));
                }
            }
        }
    }
}

fn request_header(
    backend: &Backend,
    suffix: &str,
    len: usize,
    stream: bool,
    request_id: &str,
) -> RequestHeader {
    let path = format!("{}{}", backend.base_path, suffix);
    let mut header =
        RequestHeader::build("POST", path.as_bytes(), Some(8)).expect("static method and path");
    let default_port = if backend.tls { 443 } else { 80 };
    let port = backend.port();
    let host = match (port == default_port, backend.host.contains(':')) {
        (true, false) => backend.host.clone(),
        (true, true) => format!("[{}]", backend.host),
        (false, false) => format!("{}:{port}", backend.host),
        (false, true) => format!("[{}]:{port}", backend.host),
    };
    let accept = if stream {
        "text/event-stream"
    } else {
        "application/json"
    };
    // Header names and values here are static or validated; insertion cannot fail.
    let _ = header.insert_header("host", host);
    let _ = header.insert_header("content-type", "application/json");
    let _ = header.insert_header("content-length", len.to_string());
    let _ = header.insert_header("accept", accept);
    let _ = header.insert_header(
        "user-agent",
        concat!("tollgate/", env!("CARGO_PKG_VERSION")),
    );
    let _ = header.insert_header("x-request-id", request_id);
    if let Some(key) = backend.bearer() {
        let _ = header.insert_header("authorization", format!("Bearer {key}"));
    }
    header
}

impl Exchange<'_> {
    pub fn status(&self) -> u16 {
        self.session
            .response_header()
            .map(|h| h.status.as_u16())
            .unwrap_or(502)
    }

    pub fn header(&self, name: &str) -> Option<String> {
        let header = self.session.response_header()?;
        header
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    pub fn backend_name(&self) -> &str {
        &self.backend.name
    }

    /// Next piece of the body; `None` at its end.
    pub async fn read(&mut self) -> Result<Option<Bytes>, AttemptError> {
        self.session
            .read_response_body()
            .await
            .map_err(|e| AttemptError::from_pingora(&self.backend, &e))
    }

    /// The whole body, refused past `limit` bytes.
    pub async fn read_to_end(&mut self, limit: usize) -> Result<Bytes, AttemptError> {
        let mut body = BytesMut::new();
        while let Some(chunk) = self.read().await? {
            if body.len() + chunk.len() > limit {
                return Err(AttemptError::new(
                    Failure::Connect,
                    &self.backend,
                    format!("response larger than {limit} bytes"),
                ));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }

    /// Returns the connection to the pool when the response was read to its end; closes it
    /// otherwise (an abandoned stream must stop the provider's generation).
    pub async fn finish(mut self) {
        if self.session.response_done() {
            self.upstreams
                .connector
                .release_http_session(self.session, &self.peer, Some(POOL_IDLE_TIMEOUT))
                .await;
        } else {
            self.session.shutdown().await;
        }
    }
}
