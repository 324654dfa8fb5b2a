//! The waypoint's data path: HBONE in, HTTP inside, routed, HBONE out.
//!
//! [`WaypointInbound`] is the [`InboundHandler`] of the waypoint's HBONE server: it accepts a
//! CONNECT only to a service VIP and port whose service is bound to this waypoint, and
//! "connects" it to an in-process HTTP server (hyper's auto builder: HTTP/1.1 with keep-alive,
//! or HTTP/2 with prior knowledge) through an in-memory pipe, so the HBONE server's relay,
//! limits and reports are used unchanged. Each request is routed ([`super::route`]) and sent
//! over a new CONNECT stream (on a pooled HBONE connection, [`Pool`]) to the chosen endpoint's
//! 15008, presenting the waypoint's own certificate, in the HTTP version it arrived in.
use std::{
    convert::Infallible,
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{io::DuplexStream, sync::watch};
use tracing::{debug, info, warn};

use super::{
    balance::{Balancer, HashInput, Tracked},
    filters,
    metrics::{RequestFlags, RequestLabels, WaypointMetrics},
    route::{self, RequestView},
};
use crate::{
    hbone::{
        ConnectRequest, ConnectionError, Deny, HBONE_PORT, InboundHandler, Pool, PoolKey,
        StreamReport, TunnelRequest, tls,
    },
    identity::{CertificateManager, SpiffeId},
    policy::Admission,
    state::{
        MeshState, Service,
        routes::{DirectResponse, Redirect, RouteFilters},
    },
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
    pub balancer: Balancer,
    /// JWT keys and what authorization keeps between requests.
    pub authz: super::authz::Authz,
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
    /// The report's totals suffice.
    type Meter = ();

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
            let service = hyper::service::service_fn(move |req| {
                let downstream = downstream.clone();
                async move { Ok::<_, Infallible>(downstream.handle(req).await) }
            });
            let served = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(ours), service)
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

/// How one request ended, for the access log and the metric.
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
                response
            }
            Err((status, flags, error)) => {
                outcome.labels = outcome.labels.with_response(status.as_u16(), flags);
                outcome.error = Some(error);
                local_reply(status, flags)
            }
        };
        self.waypoint.metrics.request(&outcome.labels);
        let label = |name| outcome.labels.get(name).unwrap_or_default();
        info!(
            target: "access",
            reporter = "waypoint",
            src = %self.source,
            src_workload = source_workload.map(|w| w.uid()),
            src_principal = %self.peer,
            dst = %self.destination,
            method = %method,
            path = %path,
            protocol = ?version,
            route = outcome.route.as_deref(),
            dst_service = label("destination_service"),
            dst_workload = label("destination_workload"),
            dst_principal = label("destination_principal"),
            upstream = outcome.upstream.map(|u| u.to_string()),
            response_code = response.status().as_u16(),
            response_flags = label("response_flags"),
            duration_ms = started.elapsed().as_millis() as u64,
            error = outcome.error.as_deref(),
            "request"
        );
        response
    }

    /// Routes and sends `request`; on failure, the status to answer, why, and what to log.
    async fn forward(
        &self,
        state: &MeshState,
        request: Request<Incoming>,
        outcome: &mut Outcome,
    ) -> Result<Response<Body>, (StatusCode, RequestFlags, String)> {
        let dialled = self.destination;
        let peer = super::authz::Peer {
            identity: &self.peer,
            source: self.source,
            dialled,
        };
        let request = super::authz::authorize(&self.waypoint.authz, state, &peer, request)?;
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
        let decision = route::decide(routes, service, RequestView::of(&request), |n| {
            fastrand::u32(0..n)
        })
        .ok_or_else(|| no_route(format!("no route of {} matches", service.uid())))?;
        outcome.route = routes.map(|r| match decision.route.and_then(|r| r.name.as_deref()) {
            Some(name) => format!("{} {name}", r.source),
            None => r.source.clone(),
        });
        let no_filters = RouteFilters::default();
        let route_filters = decision.route.map_or(&no_filters, |r| &r.filters);
        if let Some(redirect) = &route_filters.redirect {
            return Ok(self.redirect(redirect, route_filters, &request));
        }
        if let Some(direct) = &route_filters.direct_response {
            return Ok(direct_response(direct, route_filters));
        }
        let destination = decision
            .destination
            .ok_or_else(|| no_route(format!("no destination in the route of {}", service.uid())))?;
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
        let hash_input = HashInput {
            headers: request.headers(),
            query: request.uri().query(),
            source: self.source.ip(),
        };
        let pick = self
            .waypoint
            .balancer
            .pick(
                state.routes().load_balancer(&destination),
                &destination,
                &endpoints,
                hash_input,
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
        let (endpoint, in_flight, set_cookie) = (pick.endpoint, pick.in_flight, pick.set_cookie);
        let ip = endpoint
            .address_like(dialled.ip())
            .or_else(|| endpoint.ips.first().copied())
            .ok_or_else(|| unhealthy(format!("endpoint {} has no address", endpoint.uid())))?;
        let endpoint_id = state.identity_of(endpoint);
        outcome.labels =
            std::mem::take(&mut outcome.labels).with_destination(endpoint, &endpoint_id);
        let target = SocketAddr::new(ip, target_port);
        outcome.upstream = Some(target);

        let cert = self
            .waypoint
            .certs
            .get(&self.waypoint.identity)
            .ok_or_else(|| failed("the waypoint has no certificate".to_string()))?;
        let own_ip = self
            .waypoint
            .own_ip(state, ip)
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let key = PoolKey::new(
            self.waypoint.identity.clone(),
            own_ip,
            SocketAddr::new(ip, HBONE_PORT),
            vec![endpoint_id],
        );
        let mut tunnel = TunnelRequest::new(self.source, target);
        tunnel.service_host = Some(target_service.hostname());
        let stream = self
            .waypoint
            .pool
            .open(&key, &cert, &tunnel)
            .await
            .map_err(|e| failed(format!("tunnel to {target}: {e}")))?;
        let mut request = request;
        filters::apply_header_ops(&destination.headers.request, request.headers_mut());
        filters::apply_header_ops(&route_filters.headers.request, request.headers_mut());
        if let Some(rewrite) = &route_filters.rewrite {
            filters::apply_rewrite(rewrite, decision.matched, &mut request);
        }
        let mut response = send(TokioIo::new(stream), upstream_request(request, dialled))
            .await
            .map_err(|e| failed(format!("HTTP to {target}: {e}")))?;
        filters::apply_header_ops(&destination.headers.response, response.headers_mut());
        filters::apply_header_ops(&route_filters.headers.response, response.headers_mut());
        if let Some(cookie) = set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
            response.headers_mut().append(header::SET_COOKIE, cookie);
        }
        Ok(response.map(|body| Tracked::new(body, in_flight).boxed()))
    }

    /// The redirect a route answers with, its response header operations applied.
    fn redirect(
        &self,
        redirect: &Redirect,
        route_filters: &RouteFilters,
        request: &Request<Incoming>,
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

/// Sends `request` over `io` in the request's own HTTP version.
async fn send<IO>(io: IO, request: Request<Incoming>) -> Result<Response<Incoming>, hyper::Error>
where
    IO: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
{
    let mut response = if request.version() == Version::HTTP_2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(connection);
        sender.send_request(request).await?
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(connection);
        sender.send_request(request).await?
    };
    strip_hop_by_hop(response.headers_mut());
    Ok(response)
}

/// The request as sent upstream: hop-by-hop headers removed, the target in the form its
/// version wants (origin-form with `host` for HTTP/1, absolute for HTTP/2).
fn upstream_request(mut request: Request<Incoming>, dialled: SocketAddr) -> Request<Incoming> {
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
        RequestFlags::None => match status {
            StatusCode::FORBIDDEN => super::authz::RBAC_DENIED_BODY,
            StatusCode::UNAUTHORIZED => super::authz::JWT_DENIED_BODY,
            _ => "",
        },
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
