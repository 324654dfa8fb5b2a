//! The client side of one HBONE connection: TLS, the HTTP/2 handshake, and CONNECT requests.
//!
//! [`super::Pool`] is built on this and is what the proxy uses. Use these pieces directly only
//! for connections that must not be pooled (e.g. a tunnel inside another tunnel's stream).
use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::client::{Connection, SendRequest};
use http::{HeaderValue, Method, StatusCode, Version, header::FORWARDED};
use rustls::{ClientConfig, pki_types::ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::{
    HboneStream, Http2Config, MAX_HEADER_LIST_SIZE,
    headers::{BAGGAGE, Baggage, TRACEPARENT, forwarded},
    slot::Slot,
    tls::{self, PeerIdentityError, TlsConfigError},
};
use crate::identity::SpiffeId;

/// What one CONNECT request says about the connection it carries.
#[derive(Clone, Debug)]
pub struct TunnelRequest {
    /// The workload address the tunnel leads to (`:authority`): the destination pod's
    /// `ip:port` (the application's port, not 15008).
    pub target: SocketAddr,
    /// The application's end of the tunnelled connection, sent as `forwarded: for=`.
    pub source: SocketAddr,
    /// The service hostname the client addressed, if any, sent as `forwarded: ;host=`.
    pub service_host: Option<String>,
    /// The source workload's metadata, sent as `baggage` (omitted when empty).
    pub baggage: Baggage,
    /// A W3C `traceparent` to pass on unchanged, if the caller has one.
    pub traceparent: Option<HeaderValue>,
}

impl TunnelRequest {
    /// A request for a tunnel from `source` to `target` with no optional metadata.
    pub fn new(source: SocketAddr, target: SocketAddr) -> Self {
        Self {
            target,
            source,
            service_host: None,
            baggage: Baggage::default(),
            traceparent: None,
        }
    }

    /// The HTTP/2 CONNECT request: `:method CONNECT`, `:authority <target>`, no `:scheme` and
    /// no `:path` (RFC 9113 §8.5), plus the metadata headers.
    pub fn to_http(&self) -> Result<http::Request<()>, HboneError> {
        let mut builder = http::Request::builder()
            .method(Method::CONNECT)
            .uri(self.target.to_string())
            .version(Version::HTTP_2)
            .header(
                FORWARDED,
                forwarded(self.source, self.service_host.as_deref()),
            );
        let baggage = self.baggage.to_header_value();
        if !baggage.is_empty() {
            builder = builder.header(BAGGAGE, baggage);
        }
        if let Some(traceparent) = &self.traceparent {
            builder = builder.header(TRACEPARENT, traceparent.clone());
        }
        builder.body(()).map_err(HboneError::Request)
    }
}

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    /// The source certificate or the allowed identities cannot make a TLS configuration.
    #[error("HBONE TLS configuration: {0}")]
    Config(#[from] TlsConfigError),
    /// The source certificate is not the pool key's source identity.
    #[error("the certificate is for {certificate}, the tunnel is from {source_id}")]
    SourceMismatch {
        /// Identity of the certificate given.
        certificate: Box<SpiffeId>,
        /// Identity the pool key names.
        source_id: Box<SpiffeId>,
    },
    /// The TCP connection to the peer's HBONE port failed.
    #[error("TCP connect to {peer} failed: {source}")]
    Connect {
        /// The HBONE endpoint.
        peer: SocketAddr,
        /// The dialer's error.
        source: std::io::Error,
    },
    /// The server's certificate chain is valid but it is not an identity allowed there.
    #[error("{peer}: {source}")]
    Identity {
        /// The HBONE endpoint.
        peer: SocketAddr,
        /// What was wrong with its identity.
        source: Box<PeerIdentityError>,
    },
    /// The TLS handshake failed otherwise (untrusted or expired chain, or the server refused
    /// our certificate; see [`tls::handshake_error`]).
    #[error("TLS handshake with {peer} failed: {source}")]
    Tls {
        /// The HBONE endpoint.
        peer: SocketAddr,
        /// The handshake error (wraps a `rustls::Error`).
        source: std::io::Error,
    },
    /// The HTTP/2 connection preface failed.
    #[error("HTTP/2 handshake with {peer} failed: {source}")]
    Http2Handshake {
        /// The HBONE endpoint.
        peer: SocketAddr,
        /// The h2 error.
        source: h2::Error,
    },
    /// The connection was unusable before the request went out (GOAWAY received, closed).
    /// Nothing reached the server, so opening again on another connection is safe.
    #[error("HBONE connection closed before the request was sent: {0}")]
    ConnectionClosed(h2::Error),
    /// The request was sent but no response came (stream reset, connection lost).
    #[error("HBONE CONNECT failed: {0}")]
    Http2(h2::Error),
    /// The server answered the CONNECT with a status other than 200.
    #[error("HBONE CONNECT to {target} answered {status}")]
    Status {
        /// The requested `:authority`.
        target: SocketAddr,
        /// The response status: 400 (authority not served there), 401 (denied by policy),
        /// 503 (application unreachable), or anything a foreign implementation sends.
        status: StatusCode,
    },
    /// Connecting, handshaking and the response together took longer than allowed.
    #[error("HBONE tunnel not established within {0:?}")]
    Timeout(Duration),
    /// The request could not be built (a header value is not valid HTTP).
    #[error("invalid CONNECT request: {0}")]
    Request(http::Error),
}

impl HboneError {
    /// The status the server answered, when it answered with a refusal.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether nothing reached the server's application and opening again (on a fresh
    /// connection) is safe: the connection was already closing, the server refused the stream
    /// before processing it (REFUSED_STREAM, RFC 9113 §8.7), or the stream ended with the
    /// server's graceful GOAWAY (NO_ERROR) before any response. The last is a draining agent or
    /// waypoint whose GOAWAY crossed our request: a graceful server answers every stream it
    /// processes, so one that gets the GOAWAY instead was not processed (RFC 9113 §6.8).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::ConnectionClosed(_) => true,
            Self::Http2(err) => {
                err.reason() == Some(h2::Reason::REFUSED_STREAM)
                    || (err.is_go_away()
                        && err.is_remote()
                        && err.reason() == Some(h2::Reason::NO_ERROR))
            }
            _ => false,
        }
    }
}

/// TLS handshake as the client over `io` (already connected to `peer`), sorting identity
/// failures from other ones.
pub async fn connect_tls<IO>(
    io: IO,
    config: Arc<ClientConfig>,
    peer: SocketAddr,
) -> Result<TlsStream<IO>, HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    // With SNI disabled the name is never sent; our verifier ignores it too.
    let name = ServerName::from(peer.ip());
    TlsConnector::from(config)
        .connect(name, io)
        .await
        .map_err(|source| match tls::identity_error(&source) {
            Some(identity) => HboneError::Identity {
                peer,
                source: Box::new(identity),
            },
            None => HboneError::Tls { peer, source },
        })
}

/// DATA a stream may queue in h2 ahead of the connection's writes and the peer's window.
///
/// ztunnel queues a whole stream window (4 MiB), so a fast writer can fill the peer's window in
/// one go. The window is what keeps a tunnel busy across a round trip; this queue only has to
/// hold what the next write takes, and one largest frame does: with 1 MiB, iperf3's throughput
/// through HBONE did not move (1 and 8 streams) while the sending agent's peak fell by 8-12 MiB
/// (docs/perf/README.md, "Which load sets the peak").
const SEND_BUFFER_PER_STREAM: usize = 1024 * 1024;

/// The HTTP/2 client handshake with ztunnel's settings, but for `SEND_BUFFER_PER_STREAM`.
/// The returned [`Connection`] must be polled (spawned) for any stream to make progress; it
/// completes when the connection closes, which happens on its own (GOAWAY) once every
/// [`Http2Client`] clone and stream is dropped.
///
/// `max_streams` is how many streams we expect to open at once before the server's SETTINGS
/// arrive; beyond the server's limit h2 queues new streams.
pub async fn handshake<IO>(
    io: IO,
    http2: &Http2Config,
    max_streams: usize,
    peer: SocketAddr,
) -> Result<(Http2Client, Connection<IO, Bytes>), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(http2.stream_window)
        .initial_connection_window_size(http2.connection_window)
        .max_frame_size(http2.max_frame_size)
        .initial_max_send_streams(max_streams)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(SEND_BUFFER_PER_STREAM)
        .enable_push(false)
        // Flow control already bounds buffered DATA; h2's small-frame budget would instead
        // close the whole connection (all its tunnels) when an application writes in small
        // pieces to a slow reader. ztunnel turns it off for the same reason.
        .data_frame_budget(usize::MAX)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|source| HboneError::Http2Handshake { peer, source })?;
    Ok((Http2Client { send, peer }, connection))
}

/// Opens CONNECT streams on one HTTP/2 connection. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Http2Client {
    send: SendRequest<Bytes>,
    peer: SocketAddr,
}

impl Http2Client {
    /// The HBONE endpoint this connection goes to.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Sends a CONNECT and waits for a 200; the stream then carries the tunnelled bytes.
    pub async fn connect(&self, request: &TunnelRequest) -> Result<HboneStream, HboneError> {
        self.open(request, None).await
    }

    /// Whether the connection can still take new streams (no GOAWAY, not closed), checked
    /// without waiting.
    pub(crate) fn is_usable(&self) -> bool {
        let mut send = self.send.clone();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        // A fresh clone has no request in flight, so Pending only means "not yet known".
        !matches!(send.poll_ready(&mut cx), std::task::Poll::Ready(Err(_)))
    }

    pub(crate) async fn open(
        &self,
        request: &TunnelRequest,
        slot: Option<Slot>,
    ) -> Result<HboneStream, HboneError> {
        let http_request = request.to_http()?;
        // Each request goes through its own handle: h2 tracks readiness per handle.
        let mut send = self.send.clone();
        std::future::poll_fn(|cx| send.poll_ready(cx))
            .await
            .map_err(HboneError::ConnectionClosed)?;
        let (response, stream) = send
            .send_request(http_request, false)
            .map_err(HboneError::ConnectionClosed)?;
        let response = response.await.map_err(HboneError::Http2)?;
        if response.status() != StatusCode::OK {
            return Err(HboneError::Status {
                target: request.target,
                status: response.status(),
            });
        }
        Ok(HboneStream::new(stream, response.into_body(), slot))
    }
}
