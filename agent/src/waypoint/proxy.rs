//! The waypoint's data path: HBONE in, HTTP inside, routed, HBONE out.
//!
//! [`WaypointInbound`] is the [`InboundHandler`] of the waypoint's HBONE server: it accepts a
//! CONNECT only to a service VIP and port whose service is bound to this waypoint, and
//! "connects" it to an in-process HTTP server (hyper's auto builder: HTTP/1.1 with keep-alive,
//! or HTTP/2 with prior knowledge) through an in-memory pipe, so the HBONE server's relay,
//! limits and reports are used unchanged. Each request is routed ([`super::route`]) and sent
//! over a new CONNECT stream (on a pooled HBONE connection, [`Pool`]) to the chosen endpoint's
//! 15008, presenting the waypoint's own certificate, in the HTTP version it arrived in.
//!
//! Before HTTP is served, the first bytes of the tunnel are sniffed ([`super::sniff`]): what is
//! not HTTP is authorized and forwarded as opaque TCP ([`super::tcp`]). WebSocket upgrades pass
//! ([`super::upgrade`]); each request is measured and recorded when its response stream ends
//! ([`super::observe`]).
use std::{
    convert::Infallible,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{io::DuplexStream, sync::watch};
use tracing::{debug, info, warn};

use super::{
    balance::{HashInput, InFlight, Tracked},
    fault, filters,
    metrics::{RequestFlags, RequestLabels, WaypointMetrics},
    mirror::{MIRROR_TIMEOUT, MirrorResult, shadow_host},
    observe::{self, CountedBody, ObservedBody, RequestRecord},
    outlier::TryResult,
    pool::{ClusterId, ConnKey, HttpPool, Target, UpstreamBody},
    resilience::Resilience,
    retry::{self, Failure, ReplayBody},
    route::{self, RequestView},
    sniff::{self, Protocol, Rewind},
    tcp,
    upgrade::{self, Upgrade},
};
use crate::{
    hbone::{
        ConnectRequest, ConnectionError, Deny, HBONE_PORT, HboneStream, InboundHandler, Pool,
        PoolKey, StreamReport, TunnelRequest, tls,
    },
    identity::{CertificateManager, SpiffeId},
    limits::Limits,
    policy::Admission,
    state::{
        MeshState, Service, Workload,
        routes::resilience::{AbortError, Mirror, RouteResilience, happens},
        routes::{DirectResponse, Redirect, RouteDestination, RouteFilters, cluster_name},
        upstream::ConnectionPool,
    },
};

/// The body of every response the waypoint sends (its error: a client's or an endpoint's
/// body error, or the stream idle timeout, [`super::idle`]).
pub type Body = BoxBody<Bytes, super::idle::BodyError>;

/// Bytes buffered in each direction between a tunnel and its HTTP server.
const PIPE_BUFFER: usize = 64 * 1024;

/// What the waypoint's HBONE handler and HTTP service share.
pub struct Waypoint {
    /// The mesh, as the configuration source publishes it.
    pub state: watch::Receiver<Arc<MeshState>>,
    /// Holds the waypoint's certificate.
    pub certs: Arc<CertificateManager>,
    /// The waypoint's identity.
    pub identity: SpiffeId,
    /// The waypoint workload (`namespace`, `name`).
    pub workload: (String, String),
    /// Tunnels to endpoints.
    pub pool: Pool,
    /// HTTP connections to endpoints, in those tunnels ([`super::pool`]).
    pub connections: HttpPool,
    /// Request metrics.
    pub metrics: Arc<WaypointMetrics>,
    /// Endpoint choice.
    pub balancer: super::balance::Balancer,
    /// JWT keys and what authorization keeps between requests.
    pub authz: super::authz::Authz,

    // Resilience: retry budgets, mirrors in flight, their metrics.
    /// Shared by the retries and mirrors of every request.
    pub resilience: Arc<Resilience>,
    /// Local rate limits' buckets ([`super::ratelimit`]).
    pub rate_limits: super::ratelimit::RateLimits,

    // Protocols (waypoint::sniff, waypoint::tcp).
    /// How long a tunnel's first bytes are waited for before it is taken for opaque TCP.
    pub protocol_detection_timeout: Duration,
    /// How long an HTTP/1.1 client may take to send a request's headers (idle keep-alive
    /// included) before its connection is closed.
    pub header_read_timeout: Duration,
    /// How long a pooled request's stream may see no byte either way ([`super::idle`]).
    pub stream_idle_timeout: Duration,

    /// Spans of requests and tries, when tracing is on ([`super::trace`]).
    pub tracing: super::trace::Tracing,

    /// The waypoint's budgets: its HBONE server's connection slots, and the relay-buffer bytes
    /// each client address may hold, in its tunnels and in the relays of its upgraded
    /// (WebSocket) and opaque connections alike.
    pub limits: Arc<Limits>,

    /// Set when the waypoint drains (SIGTERM): each HTTP connection in a tunnel finishes the
    /// request it is serving and closes (HTTP/1.1 `Connection: close`, HTTP/2 GOAWAY), so its
    /// client's next request opens a new tunnel, which its node agent sends to another replica.
    pub draining: watch::Sender<bool>,
}

impl Waypoint {
    /// Whether `service` is bound to a waypoint service that selects this waypoint's workload.
    fn serves(&self, state: &MeshState, service: &Service) -> bool {
        serves(state, service, &self.workload.0, &self.workload.1)
    }

    /// The waypoint's own address of `ip`'s family.
    fn own_ip(&self, state: &MeshState, like: IpAddr) -> Option<IpAddr> {
        state
            .workloads()
            .iter()
            .find(|w| w.namespace == self.workload.0 && w.name == self.workload.1)?
            .address_like(like)
    }

    /// Where a tunnel to `target` (an address and port of `endpoint`) goes: the pooled HBONE
    /// connection to the endpoint's 15008, expecting the endpoint's identity, for the client
    /// `source` (`forwarded`) and the service `service_host`.
    fn upstream(
        &self,
        state: &MeshState,
        endpoint: &Workload,
        target: SocketAddr,
        source: SocketAddr,
        service_host: String,
    ) -> Upstream {
        let endpoint_id = state.identity_of(endpoint);
        let own_ip = self
            .own_ip(state, target.ip())
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let key = PoolKey::new(
            self.identity.clone(),
            own_ip,
            SocketAddr::new(target.ip(), HBONE_PORT),
            vec![endpoint_id.clone()],
        );
        let mut tunnel = TunnelRequest::new(source, target);
        tunnel.service_host = Some(service_host);
        Upstream {
            target,
            endpoint_id,
            key,
            tunnel,
            cluster: ClusterId {
                name: String::new(),
                service: String::new(),
                subset: String::new(),
            },
            limits: ConnectionPool::default(),
        }
    }

    /// Opens a CONNECT stream to `upstream`, presenting the waypoint's certificate.
    async fn open(&self, upstream: &Upstream) -> Result<HboneStream, String> {
        let cert = self
            .certs
            .get(&self.identity)
            .ok_or_else(|| "the waypoint has no certificate".to_string())?;
        self.pool
            .open(&upstream.key, &cert, &upstream.tunnel)
            .await
            .map_err(|e| format!("tunnel to {}: {e}", upstream.target))
    }
}

/// Whether `service` is bound to a waypoint service (`service.waypoint`) that selects the
/// workload `namespace/name`: the only services whose VIPs that waypoint accepts tunnels to.
pub(super) fn serves(state: &MeshState, service: &Service, namespace: &str, name: &str) -> bool {
    let Some(waypoint) = &service.waypoint else {
        return false;
    };
    let Some(me) = state
        .workloads()
        .iter()
        .find(|w| w.namespace == namespace && w.name == name)
    else {
        return false;
    };
    state
        .services()
        .iter()
        .any(|s| s.namespace == waypoint.namespace && s.name == waypoint.name && s.selects(me))
}

/// The HBONE handler of the waypoint.
pub struct WaypointInbound {
    waypoint: Arc<Waypoint>,
    tls: tls::ServerConfigCache,
}

impl WaypointInbound {
    /// The handler of `waypoint`.
    pub fn new(waypoint: Arc<Waypoint>) -> Self {
        Self {
            waypoint,
            tls: tls::ServerConfigCache::default(),
        }
    }
}

impl InboundHandler for WaypointInbound {
    type Upstream = DuplexStream;
    /// The report's totals suffice.
    type Meter = ();

    /// The waypoint waits for its first certificate before it listens: no wait here.
    async fn tls_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        let cert = self.waypoint.certs.get(&self.waypoint.identity)?;
        self.tls
            .get(cert)
            .inspect_err(|err| warn!(%err, "unusable waypoint certificate"))
            .ok()
    }

    async fn authorize(&self, request: &ConnectRequest) -> Result<Admission, Deny> {
        let state = self.waypoint.state.borrow().clone();
        let destination = request.destination;
        let Some(service) = state.service_by_vip(destination.ip()) else {
            return Err(Deny::new(format!(
                "{destination} is not a service VIP (a waypoint serves services bound to it)"
            )));
        };
        if service.port(destination.port()).is_none() {
            return Err(Deny::new(format!(
                "service {} has no port {}",
                service.uid(),
                destination.port()
            )));
        }
        if !self.waypoint.serves(&state, service) {
            return Err(Deny::new(format!(
                "service {} is not bound to this waypoint",
                service.uid()
            )));
        }
        Ok(Admission::unconditional())
    }

    async fn connect(&self, request: &ConnectRequest) -> io::Result<DuplexStream> {
        let (ours, theirs) = tokio::io::duplex(PIPE_BUFFER);
        let downstream = Arc::new(Downstream {
            waypoint: self.waypoint.clone(),
            peer: request.peer.clone(),
            source: request.source,
            destination: request.destination,
        });
        tokio::spawn(async move {
            let mut ours = ours;
            let timeout = downstream.waypoint.protocol_detection_timeout;
            let (protocol, prefix) = match sniff::sniff(&mut ours, timeout).await {
                Ok(sniffed) => sniffed,
                Err(err) => return debug!(%err, "tunnel failed before its protocol was known"),
            };
            let http2 = sniff::is_http2(&prefix);
            let io = Rewind::new(prefix, ours);
            if protocol == Protocol::Opaque {
                let (d, waypoint) = (&downstream, &downstream.waypoint);
                let state = waypoint.state.borrow().clone();
                let conn = tcp::Opaque {
                    source: d.source,
                    peer: &d.peer,
                    dialled: d.destination,
                    buffers: waypoint.limits.buffer_share(d.source.ip()),
                };
                let tunnel_state = state.clone();
                let open = move |endpoint: Arc<Workload>, target, host| async move {
                    let upstream =
                        waypoint.upstream(&tunnel_state, &endpoint, target, d.source, host);
                    waypoint.open(&upstream).await
                };
                return tcp::forward(
                    conn,
                    &state,
                    &waypoint.balancer,
                    &waypoint.resilience.outliers,
                    io,
                    open,
                )
                .await;
            }
            let header_read_timeout = downstream.waypoint.header_read_timeout;
            let mut draining = downstream.waypoint.draining.subscribe();
            // One that starts while draining is served (its client has not yet seen this
            // replica go). HTTP/2 gets its GOAWAY at once: the requests the client sent
            // with its preface are still served. HTTP/1.1 is answered with `Connection:
            // close` (`handle`): a shutdown now would close it before its first request.
            let started_draining = *draining.borrow_and_update() && !http2;
            let service = hyper::service::service_fn(move |req| {
                let downstream = downstream.clone();
                async move { Ok::<_, Infallible>(downstream.handle(req).await) }
            });
            let mut server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            server
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            let served = server.serve_connection_with_upgrades(TokioIo::new(io), service);
            tokio::pin!(served);
            let served = tokio::select! {
                served = served.as_mut() => served,
                true = async { draining.wait_for(|d| *d).await.is_ok() }, if !started_draining => {
                    // An upgraded connection (WebSocket) is bytes by now: it runs until its
                    // end or the drain's deadline.
                    served.as_mut().graceful_shutdown();
                    served.await
                }
            };
            if let Err(err) = served {
                debug!(%err, "HTTP connection in a tunnel ended with an error");
            }
        });
        Ok(theirs)
    }

    fn report(&self, report: StreamReport) {
        if let Err(err) = &report.result {
            info!(
                src = %report.source,
                peer = %report.peer,
                dst = ?report.destination,
                status = report.status.as_u16(),
                %err,
                "waypoint tunnel refused or failed"
            );
        }
    }

    fn connection_failed(&self, source: SocketAddr, error: &ConnectionError) {
        debug!(%source, %error, "waypoint HBONE connection failed");
    }
}

/// One tunnel's HTTP side: who sent it and where it was dialled.
struct Downstream {
    waypoint: Arc<Waypoint>,
    /// The client's verified identity (its node agent presents the source pod's).
    peer: SpiffeId,
    /// The HBONE connection's TCP peer: the source pod's address.
    source: SocketAddr,
    /// The VIP and port the client dialled.
    destination: SocketAddr,
}

/// How one request was routed and answered, for the access log and the metric.
struct Outcome {
    labels: RequestLabels,
    route: Option<String>,
    upstream: Option<SocketAddr>,
    error: Option<String>,

    // Resilience.
    /// The flag of an answered request (`DI`, `FI`, `URX`, `UO`; `-` without one).
    flags: RequestFlags,
    /// Tries made upstream (the first and the retries).
    attempts: u32,
    /// The `x-ratelimit-*` headers of the rate limit that applied ([`super::ratelimit`]).
    rate_limit: Option<super::ratelimit::XRateLimit>,
    /// The request's span, when tracing is on: the parent of each try's.
    span: Option<super::trace::ServerSpan>,
}

/// An answer the waypoint makes itself: its status, flag, and why (for the log).
type LocalReply = (StatusCode, RequestFlags, String);

impl Downstream {
    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let version = request.version();
        let grpc = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        let state = self.waypoint.state.borrow().clone();
        let source_workload = state
            .workload_by_ip(self.source.ip())
            .filter(|w| state.identity_of(w) == self.peer);
        let request_bytes = Arc::new(AtomicU64::new(0));
        let request = request.map(|body| {
            CountedBody::new(body, request_bytes.clone())
                .map_err(super::idle::BodyError::new)
                .boxed()
        });
        let mut outcome = Outcome {
            labels: RequestLabels::new()
                .with_source(source_workload.map(|w| &**w), &self.peer)
                .with_protocol(grpc),
            route: None,
            upstream: None,
            error: None,
            flags: RequestFlags::None,
            attempts: 0,
            rate_limit: None,
            span: self.waypoint.tracing.server_span(
                &state,
                &request,
                self.source,
                &self.peer,
                self.destination,
            ),
        };
        let mut response = match self.forward(&state, request, &mut outcome).await {
            Ok(response) => {
                let code = response.status().as_u16();
                outcome.labels = outcome.labels.with_response(code, outcome.flags);
                response
            }
            Err((status, flags, error)) => {
                outcome.labels = outcome.labels.with_response(status.as_u16(), flags);
                outcome.error = Some(error);
                local_reply(status, flags)
            }
        };
        if let Some(rate_limit) = outcome.rate_limit {
            rate_limit.apply(response.headers_mut());
        }
        // Draining: an HTTP/1.1 client opens its next request's connection elsewhere (Envoy's
        // drain does the same). An upgrade's 101 keeps its connection.
        if version == Version::HTTP_11
            && *self.waypoint.draining.borrow()
            && response.status() != StatusCode::SWITCHING_PROTOCOLS
        {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let record = RequestRecord {
            metrics: self.waypoint.metrics.clone(),
            labels: outcome.labels,
            started,
            request_bytes,
            source: self.source,
            source_workload: source_workload.map(|w| w.uid()),
            source_principal: self.peer.clone(),
            destination: self.destination,
            method,
            path,
            version,
            route: outcome.route,
            upstream: outcome.upstream,
            attempts: outcome.attempts,
            error: outcome.error,
            span: outcome.span,
        };
        let grpc_status = observe::grpc_status(response.headers());
        response.map(|body| ObservedBody::new(body, grpc_status, record).boxed())
    }

    /// Routes and sends `request`; on failure, the status to answer, why, and what to log.
    async fn forward(
        &self,
        state: &MeshState,
        request: Request<Body>,
        outcome: &mut Outcome,
    ) -> Result<Response<Body>, LocalReply> {
        let dialled = self.destination;
        let peer = super::authz::Peer {
            identity: &self.peer,
            source: self.source,
            dialled,
        };
        // A request is reported against the service it was addressed to even when it is denied
        // or finds no route, as Envoy's per-service filter chain reports it (the endpoint labels
        // stay `unknown`): Kiali draws a denied request to its service, not to "unknown".
        let addressed = state.service_by_vip(dialled.ip());
        if let Some(service) = addressed {
            outcome.labels = std::mem::take(&mut outcome.labels).with_destination_service(service);
        }
        let mut request = super::authz::authorize(&self.waypoint.authz, state, &peer, request)?;
        let no_route = |why: String| (StatusCode::NOT_FOUND, RequestFlags::NoRoute, why);
        let service =
            addressed.ok_or_else(|| no_route(format!("{dialled} is no longer a service VIP")))?;
        let routes = state.routes().for_service(&service.uid());
        let decision = route::decide(
            routes,
            service,
            RequestView::of(&request).at_port(dialled.port()),
            |n| fastrand::u32(0..n),
        )
        .ok_or_else(|| no_route(format!("no route of {} matches", service.uid())))?;
        outcome.route = routes.map(|r| match decision.route.and_then(|r| r.name.as_deref()) {
            Some(name) => format!("{} {name}", r.source),
            None => r.source.clone(),
        });
        let route_name = decision.route.and_then(|r| r.name.as_deref());
        if let Some(limited) = self.rate_limit(state, service, route_name, outcome) {
            return Ok(limited);
        }
        // Without a route, Istio's defaults (its default retry policy, no timeout).
        let default_resilience = RouteResilience::default();
        let resilience = decision
            .route
            .map_or(&default_resilience, |r| &r.resilience);
        let no_filters = RouteFilters::default();
        let route_filters = decision.route.map_or(&no_filters, |r| &r.filters);
        let answered_by_route =
            route_filters.redirect.is_some() || route_filters.direct_response.is_some();
        if answered_by_route && let Some(reply) = self.inject_fault(resilience, outcome).await? {
            // Envoy's fault filter runs before the router: a route that answers itself too.
            return Ok(reply);
        }
        if let Some(redirect) = &route_filters.redirect {
            return Ok(self.redirect(redirect, route_filters, &request));
        }
        if let Some(direct) = &route_filters.direct_response {
            return Ok(direct_response(direct, route_filters));
        }
        let destination = decision
            .destination
            .ok_or_else(|| no_route(format!("no destination in the route of {}", service.uid())))?;
        let (target_service, target_port) = target_of(state, &destination, dialled.port())?;
        outcome.labels =
            std::mem::take(&mut outcome.labels).with_destination_service(target_service);
        if let Some(reply) = self.inject_fault(resilience, outcome).await? {
            return Ok(reply);
        }

        // What the route does to the request applies to every try and every mirror.
        filters::apply_header_ops(&destination.headers.request, request.headers_mut());
        filters::apply_header_ops(&route_filters.headers.request, request.headers_mut());
        if let Some(rewrite) = &route_filters.rewrite {
            filters::apply_rewrite(rewrite, decision.matched, &mut request);
        }
        // A WebSocket upgrade is taken before its hop-by-hop headers go; it is tried once and
        // not mirrored (its connection cannot be replayed).
        let mut upgrade = Upgrade::take(&mut request, || {
            self.waypoint.limits.buffer_share(self.source.ip())
        });
        let (mut parts, body) = request.into_parts();
        if let Some(span) = &outcome.span {
            // What is not a try (a mirror) names the request's span.
            span.inject(&mut parts.headers);
        }
        let head = Head {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            headers: parts.headers,
        };
        let body = ReplayBody::new(body);
        let mirrors: Vec<&Mirror> = resilience
            .mirrors
            .iter()
            .filter(|m| upgrade.is_none() && happens(m.per_million, fastrand::u32(0..1_000_000)))
            .collect();
        let result = self
            .tries(
                state,
                &head,
                &body,
                &mut upgrade,
                resilience,
                &destination,
                target_service,
                target_port,
                outcome,
            )
            .await;
        // Fire and forget, once the primary has its answer (or failed).
        for mirror in mirrors {
            self.mirror(state, &head, &body, mirror, resilience.timeout);
        }
        let (mut response, set_cookie) = result?;
        filters::apply_header_ops(&destination.headers.response, response.headers_mut());
        filters::apply_header_ops(&route_filters.headers.response, response.headers_mut());
        if let Some(cookie) = set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
            response.headers_mut().append(header::SET_COOKIE, cookie);
        }
        Ok(response)
    }

    /// The rate limit of the request's service or route ([`super::ratelimit`]): `Some` 429
    /// answer when it refuses the request (flag `RL`); the headers are kept for the response.
    fn rate_limit(
        &self,
        state: &MeshState,
        service: &Service,
        route: Option<&str>,
        outcome: &mut Outcome,
    ) -> Option<Response<Body>> {
        use super::ratelimit::{Verdict, limited_reply};
        let verdict = self.waypoint.rate_limits.check(
            state.routes(),
            &service.uid(),
            route,
            &self.peer.to_string(),
        )?;
        // The headers only where the policy turns them on (Envoy's default is off).
        let shown = state
            .routes()
            .rate_limits
            .get(&service.uid())
            .and_then(|limits| limits.for_route(route))
            .is_some_and(|(limit, _)| limit.x_ratelimit_headers);
        let headers = shown.then(|| verdict.headers());
        outcome.rate_limit = headers;
        let Verdict::Limited {
            per_identity,
            source,
            ..
        } = verdict
        else {
            return None;
        };
        outcome.flags = RequestFlags::RateLimited;
        let bucket = if per_identity {
            "the client's"
        } else {
            "the shared"
        };
        outcome.error = Some(format!("rate limited by {bucket} bucket of {source}"));
        Some(
            limited_reply(headers)
                .map(|body| body.map_err(|never: Infallible| match never {}).boxed()),
        )
    }

    /// The route's fault, drawn for this request: after a delay (flag `DI`), `Some` answer
    /// when it aborts with a gRPC status, `Err` when it aborts with an HTTP status (`FI`).
    async fn inject_fault(
        &self,
        resilience: &RouteResilience,
        outcome: &mut Outcome,
    ) -> Result<Option<Response<Body>>, LocalReply> {
        let Some(fault) = &resilience.fault else {
            return Ok(None);
        };
        let injected = fault::decide(fault, || fastrand::u32(0..1_000_000));
        if let Some(delay) = injected.delay {
            tokio::time::sleep(delay).await;
            outcome.flags = RequestFlags::DelayInjected;
        }
        match injected.abort {
            Some(AbortError::HttpStatus(code)) => Err((
                StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                RequestFlags::FaultInjected,
                "aborted by the route's fault injection".to_string(),
            )),
            Some(error @ AbortError::GrpcStatus(_)) => {
                outcome.flags = RequestFlags::FaultInjected;
                Ok(Some(fault::abort_reply(error).map(|body| {
                    body.map_err(|never: Infallible| match never {}).boxed()
                })))
            }
            None => Ok(None),
        }
    }

    /// The redirect a route answers with, its response header operations applied.
    fn redirect(
        &self,
        redirect: &Redirect,
        route_filters: &RouteFilters,
        request: &Request<Body>,
    ) -> Response<Body> {
        let authority = request_authority(request).unwrap_or_else(|| self.destination.to_string());
        let location = filters::redirect_location(
            redirect,
            request.uri().scheme_str().unwrap_or("http"),
            &authority,
            request.uri().path(),
            request.uri().query(),
        );
        let mut response = Response::new(empty_body());
        *response.status_mut() =
            StatusCode::from_u16(redirect.code).unwrap_or(StatusCode::MOVED_PERMANENTLY);
        if let Ok(location) = HeaderValue::from_str(&location) {
            response.headers_mut().insert(header::LOCATION, location);
        }
        filters::apply_header_ops(&route_filters.headers.response, response.headers_mut());
        response
    }

    /// Sends the request to an endpoint of `destination`, and again to another while it fails
    /// in a way the route's retry policy retries, within the route's timeout and the retry
    /// budget.
    #[allow(clippy::too_many_arguments)]
    async fn tries(
        &self,
        state: &MeshState,
        head: &Head,
        body: &ReplayBody<Body>,
        upgrade: &mut Option<Upgrade>,
        resilience: &RouteResilience,
        destination: &RouteDestination,
        target_service: &Arc<Service>,
        target_port: u16,
        outcome: &mut Outcome,
    ) -> Result<(Response<Body>, Option<String>), LocalReply> {
        let policy = &resilience.retries;
        let resilient = &self.waypoint.resilience;
        let active = resilient.budget.request(&target_service.uid());
        let hostname = target_service.hostname();
        let deadline = resilience.timeout.map(|t| tokio::time::Instant::now() + t);
        let timed_out = || {
            (
                StatusCode::GATEWAY_TIMEOUT,
                RequestFlags::UpstreamRequestTimeout,
                format!(
                    "the route's timeout ({:?}) expired",
                    resilience.timeout.unwrap_or_default()
                ),
            )
        };
        let mut backoff = retry::backoff(policy);
        let mut tried: Vec<String> = Vec::new();
        let mut retries = 0u32;
        let mut _retry_in_flight = None;
        let cluster = cluster_of(destination, target_service);
        let outlier = state
            .routes()
            .upstream_policy(destination)
            .outlier_detection;
        loop {
            outcome.attempts = retries + 1;
            let endpoints = route::subset_endpoints(
                state.endpoints(target_service),
                destination.subset.as_ref(),
            );
            let total = endpoints.len();
            let endpoints = match &outlier {
                Some(policy) => resilient.outliers.healthy(&cluster, policy, &endpoints),
                None => endpoints,
            };
            let hash_input = HashInput {
                headers: &head.headers,
                query: head.uri.query(),
                source: self.source.ip(),
            };
            let (endpoint, in_flight, set_cookie) = self
                .pick(
                    state,
                    destination,
                    &endpoints,
                    hash_input,
                    policy.ignore_previous_hosts,
                    &tried,
                )
                .ok_or_else(|| {
                    unhealthy(format!(
                        "no ready endpoint of {}{}",
                        target_service.uid(),
                        destination
                            .subset
                            .as_ref()
                            .map(|s| format!(" subset {}", s.name))
                            .unwrap_or_default()
                    ))
                })?;
            let upstream =
                self.upstream(state, &endpoint, destination, target_service, target_port)?;
            outcome.labels = std::mem::take(&mut outcome.labels)
                .with_destination(&endpoint, &upstream.endpoint_id);
            outcome.upstream = Some(upstream.target);

            let mut request = head.request(body.attempt());
            request
                .headers_mut()
                .insert("x-envoy-attempt-count", HeaderValue::from(outcome.attempts));
            let client_span = outcome.span.as_mut().map(|span| {
                let upstream = super::trace::Upstream {
                    address: upstream.target,
                    principal: &upstream.endpoint_id,
                    hostname: &hostname,
                    port: destination.port.unwrap_or(self.destination.port()),
                    subset: destination.subset.as_ref().map_or("", |s| s.name.as_str()),
                    version: request.version(),
                };
                span.client_span(upstream, outcome.attempts, request.headers_mut())
            });
            let request = upstream_request(request, self.destination);
            let now = tokio::time::Instant::now();
            let budget = match (policy.per_try_timeout, deadline) {
                (Some(per_try), Some(deadline)) => Some((now + per_try).min(deadline)),
                (Some(per_try), None) => Some(now + per_try),
                (None, deadline) => deadline,
            };
            // An upgrade's connection cannot be replayed; a body can until it outgrows the kept
            // copy, which is known only once it has streamed (checked after the try).
            let upgraded = upgrade.is_some();
            let exchange = exchange(&self.waypoint, &upstream, request, upgrade.take());
            let result = match budget {
                Some(until) => tokio::time::timeout_at(until, exchange)
                    .await
                    .unwrap_or(Err(Failure::PerTryTimeout)),
                None => exchange.await,
            };
            if let Some(span) = client_span {
                span.finish(&result);
            }
            if let Some(policy) = &outlier {
                // A failure the client caused is not the endpoint's (review M2).
                let client = super::outlier::Downstream {
                    request_complete: body.client_done(),
                    request_failed: body.client_failed(),
                };
                let counted = match &result {
                    Ok(response) => Some(TryResult::of_status(response.status().as_u16())),
                    Err(failure) => super::outlier::failure_result(failure, client),
                };
                if let Some(counted) = counted {
                    resilient
                        .outliers
                        .record(&cluster, policy, &endpoint.uid(), total, counted);
                }
            }
            let last: Result<Response<Body>, Failure>;
            let reason = match result {
                Ok(response) => {
                    match retry::response_reason(policy, response.status(), response.headers()) {
                        None => {
                            let response =
                                response.map(|body| Tracked::new(body, in_flight).boxed());
                            return Ok((response, set_cookie));
                        }
                        Some(reason) => {
                            last = Ok(response);
                            reason
                        }
                    }
                }
                Err(Failure::PerTryTimeout)
                    if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) =>
                {
                    return Err(timed_out());
                }
                Err(failure) => match failure.retry_reason(policy) {
                    None => return Err(failure_reply(failure, &upstream.target)),
                    Some(reason) => {
                        last = Err(failure);
                        reason
                    }
                },
            };
            let give_up = |last: Result<Response<Body>, Failure>,
                           flags: RequestFlags,
                           outcome: &mut Outcome| {
                match last {
                    Ok(response) => {
                        outcome.flags = flags;
                        Ok((response, None))
                    }
                    Err(failure) => Err(failure_reply(failure, &upstream.target)),
                }
            };
            if retries >= policy.attempts {
                return give_up(last, RequestFlags::RetryLimitExceeded, outcome);
            }
            if upgraded || !body.replayable() {
                return give_up(last, RequestFlags::None, outcome);
            }
            let Some(permit) = active.retry(upstream.limits.max_retries) else {
                resilient.retries.overflowed(&hostname);
                return give_up(last, RequestFlags::UpstreamOverflow, outcome);
            };
            drop(last);
            resilient.retries.retried(&hostname, reason);
            debug!(upstream = %upstream.target, reason, retry = retries + 1, "retrying");
            let wake = tokio::time::Instant::now() + backoff.next_delay();
            if let Some(deadline) = deadline
                && wake >= deadline
            {
                tokio::time::sleep_until(deadline).await;
                return Err(timed_out());
            }
            tokio::time::sleep_until(wake).await;
            _retry_in_flight = Some(permit);
            retries += 1;
            tried.push(endpoint.uid());
        }
    }

    /// The next endpoint of `endpoints` for `destination` by its load balancer, counted in
    /// flight, and the cookie the response must set; with `avoid_tried`, one not tried yet when
    /// there is one (Envoy's `previous_hosts` predicate, 5 picks at most).
    fn pick(
        &self,
        state: &MeshState,
        destination: &RouteDestination,
        endpoints: &[Arc<Workload>],
        hash_input: HashInput<'_>,
        avoid_tried: bool,
        tried: &[String],
    ) -> Option<(Arc<Workload>, InFlight, Option<String>)> {
        let policy = state.routes().load_balancer(destination);
        let mut chosen = None;
        for _ in 0..5 {
            let pick = self
                .waypoint
                .balancer
                .pick(policy, destination, endpoints, hash_input)?;
            let fresh = !avoid_tried || !tried.contains(&pick.endpoint.uid());
            chosen = Some((pick.endpoint.clone(), pick.in_flight, pick.set_cookie));
            if fresh {
                break;
            }
        }
        chosen
    }

    /// Where a request to `endpoint` goes: its address (of the family dialled), the pool key
    /// and the tunnel.
    ///
    /// The tunnel is pooled (it carries the requests of many clients): its `forwarded: for=`
    /// names the waypoint.
    fn upstream(
        &self,
        state: &MeshState,
        endpoint: &Workload,
        destination: &RouteDestination,
        target_service: &Service,
        target_port: u16,
    ) -> Result<Upstream, LocalReply> {
        let ip = endpoint
            .address_like(self.destination.ip())
            .or_else(|| endpoint.ips.first().copied())
            .ok_or_else(|| unhealthy(format!("endpoint {} has no address", endpoint.uid())))?;
        let own = self
            .waypoint
            .own_ip(state, ip)
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let mut upstream = self.waypoint.upstream(
            state,
            endpoint,
            SocketAddr::new(ip, target_port),
            SocketAddr::new(own, 0),
            target_service.hostname(),
        );
        upstream.cluster = cluster_of(destination, target_service);
        upstream.limits = state
            .routes()
            .upstream_policy(destination)
            .connection_pool
            .unwrap_or_default();
        Ok(upstream)
    }

    /// Sends a copy of the request to `mirror`, fire and forget ([`super::mirror`]).
    fn mirror(
        &self,
        state: &MeshState,
        head: &Head,
        body: &ReplayBody<Body>,
        mirror: &Mirror,
        timeout: Option<Duration>,
    ) {
        let mirrors = &self.waypoint.resilience.mirrors;
        let destination = &mirror.destination;
        let Ok((service, target_port)) = target_of(state, destination, self.destination.port())
        else {
            mirrors.count(&destination.service.to_string(), MirrorResult::Failed);
            return;
        };
        let hostname = service.hostname();
        let Some(frames) = body.complete() else {
            mirrors.count(&hostname, MirrorResult::DroppedBody);
            return;
        };
        let Some(permit) = mirrors.try_start(&hostname) else {
            mirrors.count(&hostname, MirrorResult::DroppedOverflow);
            return;
        };
        let mut endpoints =
            route::subset_endpoints(state.endpoints(service), destination.subset.as_ref());
        if let Some(policy) = state
            .routes()
            .upstream_policy(destination)
            .outlier_detection
        {
            let cluster = cluster_of(destination, service);
            endpoints = self
                .waypoint
                .resilience
                .outliers
                .healthy(&cluster, &policy, &endpoints);
        }
        let hash_input = HashInput {
            headers: &head.headers,
            query: head.uri.query(),
            source: self.source.ip(),
        };
        let picked = self.pick(state, destination, &endpoints, hash_input, false, &[]);
        let upstream = picked.as_ref().ok_or(()).and_then(|(endpoint, _, _)| {
            self.upstream(state, endpoint, destination, service, target_port)
                .map_err(|_| ())
        });
        let (Ok(upstream), Some((_, in_flight, _))) = (upstream, picked) else {
            mirrors.count(&hostname, MirrorResult::Failed);
            return;
        };
        let body = StreamBody::new(futures::stream::iter(
            frames.into_iter().map(Ok::<Frame<Bytes>, Infallible>),
        ));
        let mut request = upstream_request(head.request(body), self.destination);
        shadow(&mut request);
        let waypoint = self.waypoint.clone();
        tokio::spawn(async move {
            let sent = tokio::time::timeout(timeout.unwrap_or(MIRROR_TIMEOUT), async {
                let response = exchange(&waypoint, &upstream, request, None).await?;
                let mut body = response.into_body();
                // Read the answer to its end (so the stream closes cleanly) and drop it.
                while let Some(frame) = body.frame().await {
                    if frame.is_err() {
                        break;
                    }
                }
                Ok::<_, Failure>(())
            })
            .await;
            let result = match sent {
                Ok(Ok(())) => MirrorResult::Answered,
                _ => MirrorResult::Failed,
            };
            waypoint.resilience.mirrors.count(&hostname, result);
            drop((permit, in_flight));
        });
    }
}

/// A request's head, kept to send it more than once (retries, mirrors).
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Head {
    /// The request with this head and `body`.
    fn request<B>(&self, body: B) -> Request<B> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// Where one try goes.
struct Upstream {
    /// The endpoint's address and the service's target port.
    target: SocketAddr,
    /// The endpoint's identity.
    endpoint_id: SpiffeId,
    key: PoolKey,
    tunnel: TunnelRequest,
    /// The cluster (service or subset) whose connection limits apply.
    cluster: ClusterId,
    /// Its `connectionPool`.
    limits: ConnectionPool,
}

/// The cluster (service or subset) of `destination`, whose limits and outlier detection apply.
fn cluster_of(destination: &RouteDestination, service: &Service) -> ClusterId {
    ClusterId {
        name: cluster_name(destination),
        service: service.hostname(),
        subset: destination
            .subset
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default(),
    }
}

/// The service a destination names and the target port of the port it is sent to (the
/// destination's, else the one dialled).
fn target_of<'s>(
    state: &'s MeshState,
    destination: &RouteDestination,
    dialled_port: u16,
) -> Result<(&'s Arc<Service>, u16), LocalReply> {
    let service = state
        .services()
        .iter()
        .find(|s| {
            s.namespace == destination.service.namespace && s.name == destination.service.name
        })
        .ok_or_else(|| unhealthy(format!("service {} is gone", destination.service)))?;
    let port = destination.port.unwrap_or(dialled_port);
    let target_port = service
        .port(port)
        .ok_or_else(|| unhealthy(format!("service {} has no port {port}", service.uid())))?
        .target_port;
    Ok((service, target_port))
}

fn unhealthy(why: String) -> LocalReply {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        RequestFlags::NoHealthyUpstream,
        why,
    )
}

/// The answer to a try that got no response.
fn failure_reply(failure: Failure, target: &SocketAddr) -> LocalReply {
    match failure {
        Failure::PerTryTimeout => (
            StatusCode::GATEWAY_TIMEOUT,
            RequestFlags::UpstreamRequestTimeout,
            format!("per-try timeout waiting for {target}"),
        ),
        Failure::Connect(why) | Failure::RefusedStream(why) | Failure::Reset(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            RequestFlags::UpstreamFailure,
            format!("{target}: {why}"),
        ),
        Failure::Response(status, _) => (
            status,
            RequestFlags::UpstreamFailure,
            format!("{target} answered {status}"),
        ),
        Failure::Overflow(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            RequestFlags::UpstreamOverflow,
            why,
        ),
        // Envoy's answer to its stream idle timeout.
        Failure::StreamIdleTimeout => (
            StatusCode::REQUEST_TIMEOUT,
            RequestFlags::StreamIdleTimeout,
            format!("stream idle timeout: nothing moved to or from {target}"),
        ),
    }
}

/// Sends `request` to `upstream` on a pooled connection ([`super::pool`]); with `upgrade`, as
/// an upgrade in a tunnel of its own (an upgraded connection is never reused).
async fn exchange<B>(
    waypoint: &Waypoint,
    upstream: &Upstream,
    request: Request<B>,
    upgrade: Option<Upgrade>,
) -> Result<Response<Body>, Failure>
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if upgrade.is_some() {
        let stream = waypoint.open(upstream).await.map_err(Failure::Connect)?;
        let response = send(TokioIo::new(stream), request, upgrade).await?;
        return Ok(response.map(|body| body.map_err(super::idle::BodyError::new).boxed()));
    }
    let key = ConnKey {
        cluster: upstream.cluster.name.clone(),
        hbone: upstream.key.clone(),
        target: upstream.target,
        service_host: upstream.tunnel.service_host.clone().unwrap_or_default(),
        http2: request.version() == Version::HTTP_2,
    };
    let target = Target {
        key,
        cluster: &upstream.cluster,
        limits: &upstream.limits,
        stream_idle_timeout: waypoint.stream_idle_timeout,
    };
    let request: Request<UpstreamBody> = request.map(|b| b.map_err(Into::into).boxed_unsync());
    let mut response = waypoint
        .connections
        .send(target, || waypoint.open(upstream), request)
        .await?;
    strip_hop_by_hop(response.headers_mut());
    Ok(response.map(BodyExt::boxed))
}

/// The fixed answer of a route, its response header operations applied.
fn direct_response(direct: &DirectResponse, route_filters: &RouteFilters) -> Response<Body> {
    let body = direct.body.clone().unwrap_or_default();
    let has_body = !body.is_empty();
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *response.status_mut() = StatusCode::from_u16(direct.status).unwrap_or(StatusCode::OK);
    if has_body {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    filters::apply_header_ops(&route_filters.headers.response, response.headers_mut());
    response
}

/// An empty response body.
fn empty_body() -> Body {
    Full::new(Bytes::new())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// The authority a request names: its URI's (HTTP/2, absolute form), else its `host`.
fn request_authority<B>(request: &Request<B>) -> Option<String> {
    request
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
}

/// Sets a mirrored request's host to its `-shadow` form (`host` for HTTP/1, the URI's
/// authority for HTTP/2).
fn shadow<B>(request: &mut Request<B>) {
    if let Some(authority) = request.uri().authority().map(|a| a.to_string()) {
        let mut parts = request.uri().clone().into_parts();
        if let Ok(shadowed) = shadow_host(&authority).parse() {
            parts.authority = Some(shadowed);
            if let Ok(uri) = Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
        }
    }
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(shadow_host);
    if let Some(host) = host.and_then(|h| HeaderValue::from_str(&h).ok()) {
        request.headers_mut().insert(header::HOST, host);
    }
}

/// Sends `request` over `io` in the request's own HTTP version: a failed handshake is a
/// connect failure, a failed request a reset (or a refused stream). With `upgrade`, as an
/// upgrade request whose 101 answer splices the two connections.
async fn send<IO, B>(
    io: IO,
    mut request: Request<B>,
    upgrade: Option<Upgrade>,
) -> Result<Response<Incoming>, Failure>
where
    IO: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let handshake = |e: hyper::Error| Failure::Connect(format!("HTTP handshake: {e}"));
    let mut response = if request.version() == Version::HTTP_2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(handshake)?;
        tokio::spawn(connection);
        sender
            .send_request(request)
            .await
            .map_err(|e| Failure::from_send(&e))?
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(handshake)?;
        if let Some(upgrade) = &upgrade {
            upgrade.restore(request.headers_mut());
        }
        tokio::spawn(connection.with_upgrades());
        sender
            .send_request(request)
            .await
            .map_err(|e| Failure::from_send(&e))?
    };
    let switched = upgrade.and_then(|upgrade| upgrade.on_response(&mut response));
    strip_hop_by_hop(response.headers_mut());
    if let Some(protocol) = switched {
        upgrade::set_headers(response.headers_mut(), protocol);
    }
    Ok(response)
}

/// The request as sent upstream: hop-by-hop headers removed, the target in the form its
/// version wants (origin-form with `host` for HTTP/1, absolute for HTTP/2).
fn upstream_request<B>(mut request: Request<B>, dialled: SocketAddr) -> Request<B> {
    strip_hop_by_hop(request.headers_mut());
    let authority = request_authority(&request).unwrap_or_else(|| dialled.to_string());
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    if request.version() == Version::HTTP_2 {
        if let Ok(uri) = Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(path)
            .build()
        {
            *request.uri_mut() = uri;
        }
    } else {
        if !request.headers().contains_key(header::HOST)
            && let Ok(host) = HeaderValue::from_str(&authority)
        {
            request.headers_mut().insert(header::HOST, host);
        }
        if let Ok(uri) = path.parse() {
            *request.uri_mut() = uri;
        }
    }
    request
}

/// Removes the headers that describe one hop's connection (RFC 9110 §7.6.1), keeping
/// `te: trailers`, which gRPC needs end to end.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
    let trailers_only = headers
        .get(header::TE)
        .is_none_or(|te| te.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !trailers_only {
        headers.remove(header::TE);
    }
}

/// A response the waypoint makes itself, as Envoy's: a short text body naming the flag.
fn local_reply(status: StatusCode, flags: RequestFlags) -> Response<Body> {
    let body = match flags {
        RequestFlags::NoRoute => "no route matched\n",
        RequestFlags::NoHealthyUpstream => "no healthy upstream\n",
        RequestFlags::UpstreamFailure => "upstream connect error\n",
        RequestFlags::UpstreamRequestTimeout => "upstream request timeout\n",
        RequestFlags::FaultInjected => "fault filter abort\n",
        // Envoy's words for a circuit breaker's overflow.
        RequestFlags::UpstreamOverflow => {
            "upstream connect error or disconnect/reset before headers. reset reason: overflow\n"
        }
        RequestFlags::None => match status {
            StatusCode::FORBIDDEN => super::authz::RBAC_DENIED_BODY,
            StatusCode::UNAUTHORIZED => super::authz::JWT_DENIED_BODY,
            _ => "",
        },
        RequestFlags::DelayInjected
        | RequestFlags::RetryLimitExceeded
        | RequestFlags::UpstreamReset
        | RequestFlags::DownstreamDisconnect => "",
        RequestFlags::RateLimited => super::ratelimit::RATE_LIMITED_BODY,
        RequestFlags::StreamIdleTimeout => "stream timeout\n",
    };
    let mut response = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        discovery::parse_mesh,
        state::{MeshState, Service},
    };

    fn service<'s>(state: &'s MeshState, name: &str) -> &'s Service {
        state.services().iter().find(|s| s.name == name).unwrap()
    }

    /// A waypoint accepts tunnels only to services bound to a waypoint service that selects
    /// its own workload: not to unbound services, nor to services bound to another waypoint.
    #[test]
    fn a_waypoint_serves_only_the_services_bound_to_it() {
        let mesh = r#"
workloads:
- {name: wp-a, namespace: shop, node: n0, ips: [10.10.0.2], labels: {app: wp-a}, enrolled: false, netns: {pid: 1}}
- {name: wp-b, namespace: shop, node: n0, ips: [10.10.0.3], labels: {app: wp-b}, enrolled: false, netns: {pid: 1}}
- {name: web-0, namespace: shop, node: n0, ips: [10.10.0.4], labels: {app: web}, netns: {pid: 1}}
services:
- {name: wp-a, namespace: shop, vips: [10.96.0.1], selector: {app: wp-a}, ports: [{port: 15008}]}
- {name: wp-b, namespace: shop, vips: [10.96.0.2], selector: {app: wp-b}, ports: [{port: 15008}]}
- {name: web, namespace: shop, vips: [10.96.0.10], selector: {app: web}, ports: [{port: 80}], waypoint: {name: wp-a}}
- {name: db, namespace: shop, vips: [10.96.0.11], selector: {app: web}, ports: [{port: 5432}], waypoint: {name: wp-b}}
- {name: open, namespace: shop, vips: [10.96.0.12], selector: {app: web}, ports: [{port: 80}]}
"#;
        let state = parse_mesh(std::path::Path::new("mesh.yaml"), mesh.as_bytes()).unwrap();
        assert!(serves(&state, service(&state, "web"), "shop", "wp-a"));
        assert!(!serves(&state, service(&state, "db"), "shop", "wp-a"));
        assert!(serves(&state, service(&state, "db"), "shop", "wp-b"));
        assert!(!serves(&state, service(&state, "open"), "shop", "wp-a"));
        // A workload of that name in another namespace is not this waypoint.
        assert!(!serves(&state, service(&state, "web"), "other", "wp-a"));
    }

    #[test]
    fn hop_by_hop_headers_are_removed_and_te_trailers_kept() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", HeaderValue::from_static("keep-alive, x-hop"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.insert("end-user", HeaderValue::from_static("jason"));
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["end-user", "te"]);
        headers.insert("te", HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut headers);
        assert!(!headers.contains_key("te"));
    }
}
