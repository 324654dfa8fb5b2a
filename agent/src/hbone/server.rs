//! The server side of HBONE for one pod: mTLS on `<pod IP>:15008`, then one tunnel per CONNECT.
//!
//! For each CONNECT stream, in order:
//! 1. the method must be CONNECT (else 405);
//! 2. `:authority` must be an `ip:port` whose IP is one of the pod's (else 400; a waypoint
//!    leaves this to its handler, see [`Destinations`]), on a port that is not one of the
//!    proxy's own (else 503, as ztunnel answers such self-calls);
//! 3. [`InboundHandler::authorize`] must allow it (else 401);
//! 4. [`InboundHandler::connect`] must reach the application (else 503);
//! 5. then 200, and bytes are relayed until both directions end, or until the [`Admission`]
//!    `authorize` gave is revoked (a policy change no longer allows the tunnel): the stream is
//!    then reset and the connection to the application closed.
//!
//! Every stream ends with one [`StreamReport`] to [`InboundHandler::report`], so the caller
//! can log and count it; connections refused at TLS go to [`InboundHandler::connection_failed`].
//!
//! What a client can hold is bounded ([`crate::limits`]): each connection holds a slot of the
//! agent's connection budget under its source address, and a handshake slot until its TLS
//! handshake ([`InboundSettings::handshake_timeout`]) and HTTP/2 preface
//! ([`InboundSettings::preface_timeout`]) are done; a connection over a limit is reset as soon
//! as it is accepted. Each tunnel holds a slot too, so no source opens more tunnels than its
//! share whatever its number of connections; a tunnel over it is answered 503 and not reported
//! (it is counted in `ambit_connections_over_limit_total`, so a flood adds no log lines).
use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use super::{
    HboneStream, Http2Config, MAX_HEADER_LIST_SIZE,
    headers::{Baggage, ForwardedFor, TRACEPARENT, forwarded_for},
    tls,
};
use crate::{
    identity::SpiffeId,
    limits::{ConnectionPermit, Limits, Path, Phase, refuse as reset},
    policy::{Admission, Refusal},
    relay::{Meter, Relayable, Relayed, Transferred, relay_until},
};

/// One CONNECT request that passed the authority check, as the handler sees it.
#[derive(Clone, Debug)]
pub struct ConnectRequest {
    /// The client's verified identity (from its certificate).
    pub peer: SpiffeId,
    /// The TCP peer of the HBONE connection: the source pod's address when the client dials
    /// from the pod's namespace (Ambit) or spoofs it (ztunnel).
    pub source: SocketAddr,
    /// Where the tunnel leads (`:authority`): one of this pod's addresses and the
    /// application's port.
    pub destination: SocketAddr,
    /// All request headers (`forwarded`, `baggage`, `traceparent`...).
    pub headers: HeaderMap,
}

impl ConnectRequest {
    /// The original client named by `forwarded: for=`, if the client sent one.
    pub fn forwarded_for(&self) -> Option<ForwardedFor> {
        forwarded_for(&self.headers)
    }

    /// The source workload's metadata from `baggage`.
    pub fn baggage(&self) -> Baggage {
        Baggage::from_headers(&self.headers)
    }

    /// The client's `traceparent`, if any.
    pub fn traceparent(&self) -> Option<&HeaderValue> {
        self.headers.get(TRACEPARENT)
    }
}

/// An authorization refusal, with the reason to log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Deny {
    /// Why (e.g. the policy that denied).
    pub reason: String,
}

impl Deny {
    /// A refusal for `reason`.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

/// How one CONNECT stream failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Not a CONNECT (405).
    #[error("method {0} is not CONNECT")]
    MethodNotAllowed(Method),
    /// `:authority` is not an `ip:port` (400).
    #[error("authority {0:?} is not an ip:port")]
    BadAuthority(String),
    /// `:authority` names an address that is not this pod's (400).
    #[error("{0} is not an address of this pod")]
    NotThisPod(SocketAddr),
    /// `:authority` names one of the proxy's own ports (503).
    #[error("port {0} belongs to the proxy")]
    ReservedPort(u16),
    /// The authorization hook refused (401).
    #[error("denied: {0}")]
    Denied(Deny),
    /// The application could not be reached (503).
    #[error("connecting to the application failed: {0}")]
    Upstream(io::Error),
    /// The response could not be sent (the client went away).
    #[error("sending the response failed: {0}")]
    Respond(h2::Error),
    /// The tunnel was established (200) and then failed while relaying.
    #[error("relay failed: {0}")]
    Relay(io::Error),
    /// The tunnel was established (200) and then closed because a change no longer allows it.
    #[error("closed after a policy change: {0}")]
    Revoked(Refusal),
}

impl StreamError {
    /// The status answered for this failure (200 for failures after the tunnel was up).
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::BadAuthority(_) | Self::NotThisPod(_) => StatusCode::BAD_REQUEST,
            Self::Denied(_) => StatusCode::UNAUTHORIZED,
            Self::ReservedPort(_) | Self::Upstream(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Respond(_) | Self::Relay(_) | Self::Revoked(_) => StatusCode::OK,
        }
    }
}

/// The end of one CONNECT stream; `M` is the handler's [`InboundHandler::Meter`].
#[derive(Debug)]
pub struct StreamReport<M = ()> {
    /// The client's verified identity.
    pub peer: SpiffeId,
    /// The HBONE connection's TCP peer.
    pub source: SocketAddr,
    /// The tunnel's destination, when `:authority` was a valid address.
    pub destination: Option<SocketAddr>,
    /// The status answered.
    pub status: StatusCode,
    /// How it ended.
    pub result: Result<(), StreamError>,
    /// Bytes relayed: `sent` from the tunnel to the application, `received` back.
    pub transferred: Transferred,
    /// What [`InboundHandler::opened`] gave for the stream (which has counted `transferred`
    /// as it flowed); `None` for a stream that never reached the application.
    pub meter: Option<M>,
    /// From the request's arrival to the end of the relay.
    pub duration: Duration,
}

/// The pod-specific decisions of an HBONE server.
pub trait InboundHandler: Send + Sync + 'static {
    /// The connection to the application.
    type Upstream: Relayable + Send + 'static;

    /// What counts a tunnel's bytes while they flow (`()`: nothing, the report's totals only).
    type Meter: Meter + Send + 'static;

    /// The pod's current TLS configuration (see [`tls::server_config`]), asked for every
    /// accepted connection so a renewed certificate takes effect at once. A pod enrolled a
    /// moment ago may still be waiting for its first certificate: the handler waits for it
    /// (bounded), so the first clients are served rather than reset. `None` (no certificate in
    /// time) refuses the connection.
    fn tls_config(&self) -> impl Future<Output = Option<Arc<rustls::ServerConfig>>> + Send;

    /// Decides whether the tunnel may be opened. The [`Admission`] is held until the tunnel
    /// ends; when it is revoked, the tunnel is closed ([`Admission::unconditional`]: never).
    fn authorize(
        &self,
        request: &ConnectRequest,
    ) -> impl Future<Output = Result<Admission, Deny>> + Send;

    /// Connects to the application at `request.destination`.
    fn connect(
        &self,
        request: &ConnectRequest,
    ) -> impl Future<Output = io::Result<Self::Upstream>> + Send;

    /// Called once the application is reached, before relaying: the stream's meter, told of
    /// every chunk the relay moves and handed back in the report.
    fn opened(&self, request: &ConnectRequest) -> Option<Self::Meter> {
        let _ = request;
        None
    }

    /// Called once for every CONNECT stream, when it ends.
    fn report(&self, report: StreamReport<Self::Meter>) {
        let _ = report;
    }

    /// Called for every connection that ended before or outside its streams: refused at
    /// TLS, no certificate, or an HTTP/2 protocol failure.
    fn connection_failed(&self, source: SocketAddr, error: &ConnectionError) {
        let _ = (source, error);
    }
}

/// Why an HBONE connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The handler has no certificate for the pod yet.
    #[error("no certificate for this pod yet")]
    NoCertificate,
    /// The TLS handshake did not finish in time.
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
    /// The client did not send its HTTP/2 preface in time after the TLS handshake.
    #[error("HTTP/2 preface timed out")]
    PrefaceTimeout,
    /// The TLS handshake failed: untrusted or foreign-trust-domain client (see
    /// [`tls::identity_error`] and [`tls::handshake_error`]), or not TLS at all.
    #[error("TLS handshake failed: {0}")]
    Handshake(io::Error),
    /// The client certificate has no SPIFFE ID (cannot happen with [`tls::server_config`]).
    #[error("client certificate carries no SPIFFE ID")]
    NoPeerIdentity,
    /// HTTP/2 failed (bad preface, protocol error, connection lost).
    #[error("HTTP/2: {0}")]
    Http2(h2::Error),
    /// The client stopped answering PINGs.
    #[error("client unresponsive: {0}")]
    Unresponsive(String),
}

/// One connection in [`ServerInner::live`], counted down however it ends (a panic included).
struct LiveConnection<'a>(&'a watch::Sender<usize>);

impl<'a> LiveConnection<'a> {
    fn count(live: &'a watch::Sender<usize>) -> Self {
        live.send_modify(|n| *n += 1);
        Self(live)
    }
}

impl Drop for LiveConnection<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// Which `:authority` addresses the server itself accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destinations {
    /// A workload's own server: only its addresses (else 400).
    Pod(Vec<IpAddr>),
    /// A waypoint's server: tunnels name the destination the client originally dialled
    /// (usually a service VIP), which only the handler can judge in
    /// [`InboundHandler::authorize`] and [`InboundHandler::connect`].
    DecidedByHandler,
}

/// Settings of one HBONE server.
#[derive(Clone, Debug)]
pub struct InboundSettings {
    /// The addresses a CONNECT may name.
    pub destinations: Destinations,
    /// Ports a CONNECT may not name: the proxy's own, which would loop back into it.
    pub reserved_ports: Vec<u16>,
    /// HTTP/2 settings.
    pub http2: Http2Config,
    /// Most tunnels one client connection may carry at once (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_concurrent_streams: u32,
    /// Bound on the TLS handshake, from accept, so idle or slow clients cannot hold sockets.
    pub handshake_timeout: Duration,
    /// Bound on the client's HTTP/2 preface, once TLS is up.
    pub preface_timeout: Duration,
    /// Once this turns true, every connection sends GOAWAY: its client opens new tunnels on
    /// a new connection (to whichever listener serves then), while those open run to their end.
    /// The agent retiring for a successor sets it ([`crate::handover`]).
    pub drain: Option<watch::Receiver<bool>>,
}

impl InboundSettings {
    /// ztunnel's settings for a pod with addresses `pod_addrs`.
    pub fn new(pod_addrs: Vec<IpAddr>) -> Self {
        Self::with_destinations(Destinations::Pod(pod_addrs))
    }

    /// ztunnel's settings, accepting `destinations`.
    pub fn with_destinations(destinations: Destinations) -> Self {
        Self {
            destinations,
            reserved_ports: ambit_common::POD_PROXY_PORTS.to_vec(),
            http2: Http2Config::default(),
            // hyper's default, which ztunnel uses; above the clients' pool cap of 100.
            max_concurrent_streams: 200,
            // The usual TLS server default (tls-listener's, Go's net/http's): ample for a
            // handshake across a cluster, short for an idle socket.
            handshake_timeout: Duration::from_secs(10),
            preface_timeout: Duration::from_secs(10),
            drain: None,
        }
    }
}

/// Resolves once `drain` turns true (`true`), or its sender is gone (`false`); never without one.
async fn until_draining(drain: &mut Option<watch::Receiver<bool>>) -> bool {
    match drain {
        Some(drain) => drain.wait_for(|d| *d).await.is_ok(),
        None => std::future::pending().await,
    }
}

/// An HBONE server for one pod. Cheap to clone.
pub struct HboneServer<H> {
    inner: Arc<ServerInner<H>>,
}

struct ServerInner<H> {
    handler: H,
    settings: InboundSettings,
    limits: Arc<Limits>,
    /// Connections accepted and not yet ended.
    live: watch::Sender<usize>,
}

impl<H> Clone for HboneServer<H> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<H: InboundHandler> HboneServer<H> {
    /// A server deciding with `handler`, its connections and tunnels admitted through `limits`
    /// (shared by every listener of the agent).
    pub fn new(handler: H, settings: InboundSettings, limits: Arc<Limits>) -> Self {
        Self {
            inner: Arc::new(ServerInner {
                handler,
                settings,
                limits,
                live: watch::Sender::new(0),
            }),
        }
    }

    /// The handler.
    pub fn handler(&self) -> &H {
        &self.inner.handler
    }

    /// Waits until no connection is left (all closed by their clients, or ended with their
    /// last tunnel once [`InboundSettings::drain`] turned true).
    pub async fn connections_closed(&self) {
        let mut live = self.inner.live.subscribe();
        let _ = live.wait_for(|n| *n == 0).await;
    }

    /// Connections accepted and not yet ended.
    pub fn live_connections(&self) -> usize {
        *self.inner.live.borrow()
    }

    /// Accepts connections until the future is dropped (abort the task to stop listening).
    /// Connections already accepted run in their own tasks and are not cut.
    pub async fn serve(&self, listener: TcpListener) {
        let limits = &self.inner.limits;
        limits
            .accept_loop(&listener, Path::Hbone, |tcp, source| {
                let source = canonical(source);
                let Some(admitted) = limits.admit_hbone(source.ip()) else {
                    return reset(tcp);
                };
                let server = self.clone();
                tokio::spawn(async move { server.serve_admitted(tcp, source, admitted).await });
            })
            .await
    }

    /// Serves one admitted connection until the client closes it.
    async fn serve_admitted(
        &self,
        tcp: TcpStream,
        source: SocketAddr,
        (slot, handshake): (ConnectionPermit, ConnectionPermit),
    ) {
        let _live = LiveConnection::count(&self.inner.live);
        if let Err(err) = self.connection(tcp, source, handshake).await {
            debug!(%source, %err, "HBONE connection failed");
            self.inner.handler.connection_failed(source, &err);
        }
        drop(slot);
    }

    /// Handshakes (holding `handshake` until done), then serves the connection's tunnels.
    async fn connection(
        &self,
        tcp: TcpStream,
        source: SocketAddr,
        handshake: ConnectionPermit,
    ) -> Result<(), ConnectionError> {
        let settings = &self.inner.settings;
        let limits = &self.inner.limits;
        let tls_config = self
            .inner
            .handler
            .tls_config()
            .await
            .ok_or(ConnectionError::NoCertificate)?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(
            settings.handshake_timeout,
            TlsAcceptor::from(tls_config).accept(super::transport(tcp)),
        )
        .await
        .map_err(|_| {
            limits.timed_out(Path::Hbone, Phase::TlsHandshake);
            ConnectionError::HandshakeTimeout
        })?
        .map_err(ConnectionError::Handshake)?;
        let mut tls = tls;
        super::size_tls_buffers(tls.get_mut().1);
        let peer = tls::peer_identity(tls.get_ref().1).ok_or(ConnectionError::NoPeerIdentity)?;
        debug!(%source, %peer, "HBONE connection accepted");

        let handshaking = h2::server::Builder::new()
            .initial_window_size(settings.http2.stream_window)
            .initial_connection_window_size(settings.http2.connection_window)
            .max_frame_size(settings.http2.max_frame_size)
            .max_header_list_size(MAX_HEADER_LIST_SIZE)
            .max_concurrent_streams(settings.max_concurrent_streams)
            // See client::handshake: flow control bounds buffering; the budget would kill
            // every tunnel of the connection over one application's small writes.
            .data_frame_budget(usize::MAX)
            .handshake::<_, Bytes>(tls);
        let mut connection = tokio::time::timeout(settings.preface_timeout, handshaking)
            .await
            .map_err(|_| {
                limits.timed_out(Path::Hbone, Phase::Http2Preface);
                ConnectionError::PrefaceTimeout
            })?
            .map_err(ConnectionError::Http2)?;
        drop(handshake);
        let keepalive = settings.http2.keepalive(connection.ping_pong());
        tokio::pin!(keepalive);
        let mut drain = settings.drain.clone();
        // Polling `accept` also drives the connection's I/O for the streams already open, so
        // keep at it until the client is done (after a GOAWAY: until its last tunnel ends).
        loop {
            let accepted = tokio::select! {
                accepted = connection.accept() => accepted,
                // Dropping the connection resets its tunnels, which are as dead as it is.
                failure = &mut keepalive => return Err(ConnectionError::Unresponsive(failure)),
                draining = until_draining(&mut drain) => {
                    if draining {
                        debug!(%source, "HBONE connection: GOAWAY, the agent is retiring");
                        connection.graceful_shutdown();
                    }
                    drain = None;
                    continue;
                }
            };
            let Some(accepted) = accepted else {
                return Ok(());
            };
            let (request, mut respond) = accepted.map_err(ConnectionError::Http2)?;
            let Some(slot) = limits.admit(Path::HboneTunnel, source.ip()) else {
                refuse(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
                continue;
            };
            let server = self.clone();
            let peer = peer.clone();
            tokio::spawn(async move {
                let report = server.serve_stream(request, respond, peer, source).await;
                server.inner.handler.report(report);
                drop(slot);
            });
        }
    }

    async fn serve_stream(
        &self,
        request: http::Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        peer: SpiffeId,
        source: SocketAddr,
    ) -> StreamReport<H::Meter> {
        let started = Instant::now();
        let (parts, body) = request.into_parts();
        let mut report = StreamReport {
            peer,
            source,
            destination: None,
            status: StatusCode::OK,
            result: Ok(()),
            transferred: Transferred::default(),
            meter: None,
            duration: Duration::ZERO,
        };
        let outcome = self.tunnel(parts, &mut report, body, &mut respond).await;
        if let Err(err) = &outcome {
            report.status = err.status();
            if report.status != StatusCode::OK {
                refuse(&mut respond, report.status);
            }
        }
        report.result = outcome;
        report.duration = started.elapsed();
        report
    }

    /// Checks, authorizes, connects and relays one stream, filling in the report as it goes.
    ///
    /// The request (`parts`) is dropped once the tunnel is set up, before the relay: h2 decodes
    /// `:authority` and header values into slices of buffers it shares (its read buffer, its
    /// HPACK scratch buffer), which a request kept for the tunnel's life kept alive. With the
    /// relay's last chunk (`relay::consume`), that was more than half of what a held tunnel
    /// cost (docs/perf/README.md, "What a held tunnel pins").
    async fn tunnel(
        &self,
        parts: http::request::Parts,
        report: &mut StreamReport<H::Meter>,
        body: RecvStream,
        respond: &mut SendResponse<Bytes>,
    ) -> Result<(), StreamError> {
        // Every part is moved out here, so each can go as soon as it has served.
        let http::request::Parts {
            method,
            uri,
            headers,
            extensions,
            ..
        } = parts;
        drop(extensions);
        if method != Method::CONNECT {
            return Err(StreamError::MethodNotAllowed(method));
        }
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
        let destination = authority
            .parse::<SocketAddr>()
            .map(canonical)
            .map_err(|_| StreamError::BadAuthority(authority.to_string()))?;
        drop(uri);
        report.destination = Some(destination);
        let settings = &self.inner.settings;
        if let Destinations::Pod(addrs) = &settings.destinations
            && !addrs.contains(&destination.ip())
        {
            return Err(StreamError::NotThisPod(destination));
        }
        if settings.reserved_ports.contains(&destination.port()) {
            return Err(StreamError::ReservedPort(destination.port()));
        }
        let request = ConnectRequest {
            peer: report.peer.clone(),
            source: report.source,
            destination,
            headers,
        };
        let handler = &self.inner.handler;
        let checked = async {
            let admission = handler
                .authorize(&request)
                .await
                .map_err(StreamError::Denied)?;
            let upstream = handler
                .connect(&request)
                .await
                .map_err(StreamError::Upstream)?;
            Ok((admission, upstream, handler.opened(&request)))
        }
        .await;
        drop(request);
        let (mut admission, upstream, meter) = checked?;
        report.meter = meter;
        let meter = &report.meter;

        let send = respond
            .send_response(Response::new(()), false)
            .map_err(StreamError::Respond)?;
        let tunnel = HboneStream::new(send, body, None);
        // Under the peer, as the tunnel's slot is.
        let buffers = self.inner.limits.buffer_share(report.source.ip());
        let (transferred, ended) =
            relay_until(tunnel, upstream, meter, &buffers, admission.revoked()).await;
        report.transferred = transferred;
        match ended {
            Relayed::Finished(result) => result.map_err(StreamError::Relay),
            Relayed::Stopped(refusal) => Err(StreamError::Revoked(refusal)),
        }
    }
}

/// Answers a refused stream with `status` and ends it.
fn refuse(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    // The client may already have reset the stream; there is nobody left to tell.
    let _ = respond.send_response(response, true);
}

/// IPv4-mapped IPv6 addresses as plain IPv4, so comparisons with pod addresses hold.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}
