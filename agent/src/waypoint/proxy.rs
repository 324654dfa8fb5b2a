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
//! not HTTP is forwarded as opaque TCP ([`super::tcp`]). WebSocket upgrades pass
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
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{io::DuplexStream, sync::watch};
use tracing::{debug, info, warn};

use super::{
    metrics::{RequestFlags, RequestLabels, WaypointMetrics},
    observe::{self, CountedBody, ObservedBody, RequestRecord},
    route::{self, RequestView, RoundRobin},
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
    policy::Admission,
    state::{MeshState, Service, Workload},
};

/// The body of every response the waypoint sends.
pub type Body = BoxBody<Bytes, hyper::Error>;

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
    /// Request metrics.
    pub metrics: Arc<WaypointMetrics>,
    /// Endpoint choice.
    pub balancer: RoundRobin,
    /// How long a tunnel's first bytes are waited for before it is taken for opaque TCP.
    pub protocol_detection_timeout: Duration,
    /// How long an HTTP/1.1 client may take to send a request's headers (idle keep-alive
    /// included) before its connection is closed.
    pub header_read_timeout: Duration,
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

    /// Opens a CONNECT stream to `target` (an address and port of `endpoint`) on the pooled
    /// HBONE connection to the endpoint's 15008, presenting the waypoint's certificate and
    /// expecting the endpoint's identity. `source` is the client's address (`forwarded`),
    /// `service_host` the service's hostname.
    async fn tunnel_to(
        &self,
        state: &MeshState,
        endpoint: &Workload,
        target: SocketAddr,
        source: SocketAddr,
        service_host: String,
    ) -> Result<HboneStream, String> {
        let cert = self
            .certs
            .get(&self.identity)
            .ok_or_else(|| "the waypoint has no certificate".to_string())?;
        let own_ip = self
            .own_ip(state, target.ip())
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let key = PoolKey::new(
            self.identity.clone(),
            own_ip,
            SocketAddr::new(target.ip(), HBONE_PORT),
            vec![state.identity_of(endpoint)],
        );
        let mut tunnel = TunnelRequest::new(source, target);
        tunnel.service_host = Some(service_host);
        self.pool
            .open(&key, &cert, &tunnel)
            .await
            .map_err(|e| format!("tunnel to {target}: {e}"))
    }
}

/// Whether `service` is bound to a waypoint service (`service.waypoint`) that selects the
/// workload `namespace/name`: the only services whose VIPs that waypoint accepts tunnels to.
fn serves(state: &MeshState, service: &Service, namespace: &str, name: &str) -> bool {
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

    fn tls_config(&self) -> Option<Arc<rustls::ServerConfig>> {
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
            let io = Rewind::new(prefix, ours);
            if protocol == Protocol::Opaque {
                let (d, waypoint) = (&downstream, &downstream.waypoint);
                let state = waypoint.state.borrow().clone();
                let conn = tcp::Opaque {
                    source: d.source,
                    peer: &d.peer,
                    dialled: d.destination,
                };
                let tunnel_state = state.clone();
                let open = move |endpoint: Arc<Workload>, target, host| async move {
                    let state = &tunnel_state;
                    waypoint
                        .tunnel_to(state, &endpoint, target, d.source, host)
                        .await
                };
                return tcp::forward(conn, &state, &waypoint.balancer, io, open).await;
            }
            let header_read_timeout = downstream.waypoint.header_read_timeout;
            let service = hyper::service::service_fn(move |req| {
                let downstream = downstream.clone();
                async move { Ok::<_, Infallible>(downstream.handle(req).await) }
            });
            let mut server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            server
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            let served = server
                .serve_connection_with_upgrades(TokioIo::new(io), service)
                .await;
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
}

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
        let request_bytes = Arc::new(AtomicU64::new(0));
        let request = request.map(|body| CountedBody::new(body, request_bytes.clone()).boxed());
        let state = self.waypoint.state.borrow().clone();
        let source_workload = state
            .workload_by_ip(self.source.ip())
            .filter(|w| state.identity_of(w) == self.peer);
        let mut outcome = Outcome {
            labels: RequestLabels::new()
                .with_source(source_workload.map(|w| &**w), &self.peer)
                .with_protocol(grpc),
            route: None,
            upstream: None,
            error: None,
        };
        let response = match self.forward(&state, request, &mut outcome).await {
            Ok(response) => {
                let code = response.status().as_u16();
                outcome.labels = outcome.labels.with_response(code, RequestFlags::None);
                response.map(BodyExt::boxed)
            }
            Err((status, flags, error)) => {
                outcome.labels = outcome.labels.with_response(status.as_u16(), flags);
                outcome.error = Some(error);
                local_reply(status, flags)
            }
        };
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
            error: outcome.error,
        };
        let grpc_status = observe::grpc_status(response.headers());
        response.map(|body| ObservedBody::new(body, grpc_status, record).boxed())
    }

    /// Routes and sends `request`; on failure, the status to answer, why, and what to log.
    async fn forward(
        &self,
        state: &MeshState,
        mut request: Request<Body>,
        outcome: &mut Outcome,
    ) -> Result<Response<Incoming>, (StatusCode, RequestFlags, String)> {
        let dialled = self.destination;
        let no_route = |why: String| (StatusCode::NOT_FOUND, RequestFlags::NoRoute, why);
        let unhealthy = |why: String| {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                RequestFlags::NoHealthyUpstream,
                why,
            )
        };
        let failed = |why: String| {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                RequestFlags::UpstreamFailure,
                why,
            )
        };
        let service = state
            .service_by_vip(dialled.ip())
            .ok_or_else(|| no_route(format!("{dialled} is no longer a service VIP")))?;
        let routes = state.routes().for_service(&service.uid());
        let view = RequestView {
            path: request.uri().path(),
            headers: request.headers(),
        };
        let decision = route::decide(routes, service, view, |n| fastrand::u32(0..n))
            .ok_or_else(|| no_route(format!("no route of {} matches", service.uid())))?;
        outcome.route = routes.map(|r| match decision.route.and_then(|r| r.name.as_deref()) {
            Some(name) => format!("{} {name}", r.source),
            None => r.source.clone(),
        });
        let destination = decision.destination;
        let target_service = state
            .services()
            .iter()
            .find(|s| {
                s.namespace == destination.service.namespace && s.name == destination.service.name
            })
            .ok_or_else(|| unhealthy(format!("service {} is gone", destination.service)))?;
        outcome.labels =
            std::mem::take(&mut outcome.labels).with_destination_service(target_service);
        let port = destination.port.unwrap_or(dialled.port());
        let target_port = target_service
            .port(port)
            .ok_or_else(|| {
                unhealthy(format!(
                    "service {} has no port {port}",
                    target_service.uid()
                ))
            })?
            .target_port;
        let endpoints =
            route::subset_endpoints(state.endpoints(target_service), destination.subset.as_ref());
        let endpoint = self
            .waypoint
            .balancer
            .pick(&destination, &endpoints)
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
        let ip = endpoint
            .address_like(dialled.ip())
            .or_else(|| endpoint.ips.first().copied())
            .ok_or_else(|| unhealthy(format!("endpoint {} has no address", endpoint.uid())))?;
        let endpoint_id = state.identity_of(endpoint);
        outcome.labels =
            std::mem::take(&mut outcome.labels).with_destination(endpoint, &endpoint_id);
        let target = SocketAddr::new(ip, target_port);
        outcome.upstream = Some(target);

        let stream = self
            .waypoint
            .tunnel_to(
                state,
                endpoint,
                target,
                self.source,
                target_service.hostname(),
            )
            .await
            .map_err(failed)?;
        let upgrade = Upgrade::take(&mut request);
        send(
            TokioIo::new(stream),
            upstream_request(request, dialled),
            upgrade,
        )
        .await
        .map_err(|e| failed(format!("HTTP to {target}: {e}")))
    }
}

/// Sends `request` over `io` in the request's own HTTP version; with `upgrade`, as an
/// upgrade request whose 101 answer splices the two connections.
async fn send<IO>(
    io: IO,
    mut request: Request<Body>,
    upgrade: Option<Upgrade>,
) -> Result<Response<Incoming>, hyper::Error>
where
    IO: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
{
    let mut response = if request.version() == Version::HTTP_2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(connection);
        sender.send_request(request).await?
    } else {
        if let Some(upgrade) = &upgrade {
            upgrade.restore(request.headers_mut());
        }
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(connection.with_upgrades());
        sender.send_request(request).await?
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
fn upstream_request(mut request: Request<Body>, dialled: SocketAddr) -> Request<Body> {
    strip_hop_by_hop(request.headers_mut());
    let authority = request
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
        .unwrap_or_else(|| dialled.to_string());
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
        RequestFlags::None | RequestFlags::UpstreamReset | RequestFlags::DownstreamDisconnect => "",
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
