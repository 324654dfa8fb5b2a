//! The outbound path: connections the kernel redirected from a pod to its 127.0.0.1:15001.
//!
//! A destination in the mesh (an enrolled workload, directly or behind a service VIP) is reached
//! through an HBONE tunnel to its pod's 15008, presenting the source pod's certificate and
//! accepting only the destination's identity. A service bound to a waypoint is reached through
//! a tunnel to a waypoint pod's 15008 instead, carrying the address the client dialled, and is
//! refused when no waypoint pod is ready. Anything else is passed through as plain TCP, as
//! ambient does for destinations outside the mesh: unknown addresses, and the endpoints of a
//! service without selector that are no mesh workload's (or the VIP itself when it has none).
//! A mesh workload enrolled on this node is reached through the same-node fast path instead of
//! a tunnel ([`super::same_node`]), with the same identities, policy and reports.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use super::{PodContext, ProxyContext, connect_from, error::ProxyError, record, same_node};
use crate::{
    hbone::{HBONE_PORT, Pool, PoolKey, TunnelRequest, headers::Baggage},
    identity::{SpiffeId, WorkloadCertificate},
    limits::{BufferShare, Path, refuse},
    proxy::metrics::{ConnectionLabels, ConnectionRecorder, ProxyMetrics},
    relay::{Transferred, relay},
    state::{MeshState, Resolved, Service, Workload},
    telemetry::{AccessLog, Direction, istio::SecurityPolicy},
};

/// Accepts redirected connections of one pod until the task is aborted (un-enrolment).
/// Connections already accepted run in their own tasks and outlive the listener. Each holds a
/// slot of the agent's connection budget under the pod's address (the source of them all).
pub async fn serve(listener: TcpListener, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) {
    let limits = &ctx.limits;
    let source = pod.workload.ips.first().copied();
    limits
        .accept_loop(&listener, Path::Outbound, |client, peer| {
            let source = source.unwrap_or(peer.ip());
            let Some(permit) = limits.admit(Path::Outbound, source) else {
                return refuse(client);
            };
            let buffers = limits.buffer_share(source);
            let (pod, ctx) = (pod.clone(), ctx.clone());
            tokio::spawn(async move {
                handle(client, peer, pod, ctx, buffers).await;
                drop(permit);
            });
        })
        .await
}

async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    ctx: Arc<ProxyContext>,
    buffers: BufferShare,
) {
    super::no_delay(&client);
    let Some(dst) = ctx.redirector.original_destination(&client) else {
        // Not redirected by our programs (someone dialled 127.0.0.1:15001 directly), or the pod
        // is over its share of handshakes in flight: there is nowhere legitimate to send it.
        let err = ProxyError::NoOriginalDestination;
        warn!(pod = %pod.workload.uid(), %peer, %err, "closing");
        ctx.metrics
            .connection_denied(err.denial_reason().unwrap_or_default());
        return;
    };
    let state = ctx.state.borrow().clone();
    let outbound = Outbound {
        state: &state,
        metrics: &ctx.metrics,
        workload: &pod.workload,
        identity: &pod.identity,
        pool: &pod.pool,
        buffers,
        upstreams: Live {
            ctx: &ctx,
            pod: &pod,
        },
    };
    outbound.forward(client, peer, dst).await;
}

/// How the outbound path reaches beyond the proxy: the source pod's certificate and plain TCP
/// from its namespace. [`Live`] is the agent's; tests supply theirs, so the path runs without
/// the kernel side or a CA.
trait Upstreams {
    /// The certificate of `id` (the source pod's identity), waiting briefly for a first fetch.
    async fn certificate(&self, id: &SpiffeId) -> Result<Arc<WorkloadCertificate>, String>;
    /// A plain TCP connection to `dst` from the source pod.
    async fn connect(&self, dst: SocketAddr) -> std::io::Result<TcpStream>;
    /// Carries `client` through the same-node fast path when the tunnel's destination `to`,
    /// expected to run as `identity`, is a pod enrolled on this node; gives it back otherwise.
    async fn same_node(
        &self,
        client: TcpStream,
        to: IpAddr,
        identity: &SpiffeId,
        hop: same_node::Hop<'_>,
    ) -> Result<(Transferred, Result<(), ProxyError>), TcpStream>;
}

/// The running agent's [`Upstreams`].
struct Live<'a> {
    ctx: &'a ProxyContext,
    pod: &'a PodContext,
}

impl Upstreams for Live<'_> {
    async fn certificate(&self, id: &SpiffeId) -> Result<Arc<WorkloadCertificate>, String> {
        self.ctx.certificate(id).await
    }

    async fn connect(&self, dst: SocketAddr) -> std::io::Result<TcpStream> {
        connect_from(&self.pod.netns, dst, None).await
    }

    async fn same_node(
        &self,
        client: TcpStream,
        to: IpAddr,
        identity: &SpiffeId,
        hop: same_node::Hop<'_>,
    ) -> Result<(Transferred, Result<(), ProxyError>), TcpStream> {
        if !self.ctx.fast_path {
            return Err(client);
        }
        // Only a workload dialled at its own address (directly or through a service), never a
        // waypoint (whose tunnel carries another address), and only the pod the state names.
        let dest = match self.ctx.local_pods.get(to) {
            Some(dest) if hop.authority.ip() == to && dest.identity == *identity => dest,
            _ => return Err(client),
        };
        Ok(same_node::forward(self.ctx, self.pod, &dest, client, hop).await)
    }
}

/// One redirected connection's surroundings: the state it resolves against, its source pod
/// and the agent's services.
struct Outbound<'a, U> {
    state: &'a MeshState,
    metrics: &'a ProxyMetrics,
    /// The source pod.
    workload: &'a Arc<Workload>,
    /// The source pod's identity.
    identity: &'a SpiffeId,
    /// The source pod's HBONE connections.
    pool: &'a Pool,
    /// The source pod's share of the relay's read buffers.
    buffers: BufferShare,
    upstreams: U,
}

/// Where an outbound connection goes.
#[derive(Debug, PartialEq)]
enum Route {
    /// Plain TCP from the source pod to a destination outside the mesh.
    Plain(SocketAddr),
    /// An HBONE tunnel from `source_ip` to `to`:15008, carrying `authority`, to a server that
    /// must prove it runs as `identity`.
    Tunnel {
        to: IpAddr,
        source_ip: IpAddr,
        authority: SocketAddr,
        identity: SpiffeId,
        /// The hostname of the service dialled, for the `Forwarded` header.
        service_host: Option<String>,
    },
}

/// An outbound connection as the state decides it, before any I/O: where it goes (or why it
/// goes nowhere), how its metrics are labelled and what its access log names.
#[derive(Debug)]
struct Request {
    route: Result<Route, ProxyError>,
    labels: ConnectionLabels,
    /// What the access log names as upstream: the workload's address (tunnelled or not), or
    /// the waypoint's HBONE port.
    upstream: Option<SocketAddr>,
    dst_workload: Option<String>,
    dst_service: Option<String>,
}

/// Decides where a connection from `source` (running as `source_id`) to `dst` goes, from
/// `state` alone (ztunnel's `build_request`): a mesh workload (directly or behind a service VIP)
/// through an HBONE tunnel to its pod, a service bound to a waypoint through a tunnel to a
/// waypoint pod carrying the address dialled, anything else in plain TCP; or why nowhere.
fn build_request(
    state: &MeshState,
    source: &Workload,
    source_id: &SpiffeId,
    dst: SocketAddr,
) -> Request {
    let resolved = state.resolve(dst);
    let labels = ConnectionLabels::outbound(state, source, &resolved);
    let mut request = Request {
        route: Err(ProxyError::NoOriginalDestination),
        labels,
        upstream: None,
        dst_workload: None,
        dst_service: None,
    };
    // The tunnel's target: a workload (and its identity), the address it is reached at, the
    // authority to carry, the service dialled.
    let (target, to, authority, service) = match resolved {
        Resolved::Workload {
            workload,
            addr,
            service,
        } => {
            request.dst_workload = Some(workload.uid());
            request.dst_service = service.as_ref().map(|s| s.uid());
            request.upstream = Some(addr);
            if !workload.enrolled {
                request.route = Ok(Route::Plain(addr));
                return request;
            }
            (workload, addr.ip(), addr, service)
        }
        // The waypoint applies the service's L7 policy and picks the endpoint: it is told the
        // address the client dialled, not an endpoint.
        Resolved::Waypoint {
            workload,
            ip,
            service,
        } => {
            request.dst_workload = Some(workload.uid());
            request.dst_service = Some(service.uid());
            request.upstream = Some(SocketAddr::new(ip, HBONE_PORT));
            (workload, ip, dst, Some(service))
        }
        Resolved::Passthrough(addr) => {
            request.upstream = Some(addr);
            request.route = Ok(Route::Plain(addr));
            return request;
        }
        Resolved::OutsideMesh { addr, service } => {
            request.dst_service = Some(service.uid());
            request.upstream = Some(addr);
            request.route = Ok(Route::Plain(addr));
            return request;
        }
        Resolved::NoWaypoint {
            service,
            waypoint,
            exists,
        } => {
            request.route = Err(ProxyError::NoWaypoint {
                service: service.uid(),
                waypoint,
                exists,
            });
            return request;
        }
        Resolved::NoEndpoints { service } => {
            request.route = Err(ProxyError::NoEndpoints(service.uid()));
            return request;
        }
        Resolved::UnknownServicePort { service, port } => {
            request.route = Err(ProxyError::UnknownServicePort {
                service: service.uid(),
                port,
            });
            return request;
        }
    };
    let identity = state.identity_of(&target);
    request.labels = request
        .labels
        .with_source_principal(Some(source_id))
        .with_destination_principal(Some(&identity))
        .with_security_policy(SecurityPolicy::MutualTls);
    request.route = match source.address_like(to) {
        Some(source_ip) => Ok(Route::Tunnel {
            to,
            source_ip,
            authority,
            identity,
            service_host: service.as_deref().map(Service::hostname),
        }),
        None => Err(ProxyError::NoSourceAddress {
            workload: source.uid(),
            peer: to,
        }),
    };
    request
}

impl<U: Upstreams> Outbound<'_, U> {
    /// Sends the connection `client` (from `peer`, dialled to `dst`) where the mesh says,
    /// relays until it ends, and records how it went (the one place that does).
    async fn forward(&self, client: TcpStream, peer: SocketAddr, dst: SocketAddr) {
        let request = build_request(self.state, self.workload, self.identity, dst);
        let conn = self.metrics.connection_opened(&request.labels);
        let mut log = AccessLog::new(Direction::Outbound, peer, dst);
        log.src_workload = Some(self.workload.uid());
        log.dst_workload = request.dst_workload;
        log.dst_service = request.dst_service;
        let (moved, result) = match request.route {
            Ok(route) => {
                log.upstream = request.upstream;
                if let Route::Tunnel { identity, .. } = &route {
                    log.mtls = true;
                    log.src_principal = Some(self.identity.to_string());
                    log.dst_principal = Some(identity.to_string());
                }
                self.send(client, peer, route, &conn, &mut log).await
            }
            Err(err) => (Transferred::default(), Err(err)),
        };
        record(self.metrics, conn, log, moved, result);
    }

    /// The I/O: connects (or tunnels) as `route` says and relays, counting bytes into `conn`
    /// as they flow (and telling `log` when the fast path carried them).
    async fn send(
        &self,
        client: TcpStream,
        peer: SocketAddr,
        route: Route,
        conn: &ConnectionRecorder,
        log: &mut AccessLog,
    ) -> (Transferred, Result<(), ProxyError>) {
        let failed = |err| (Transferred::default(), Err(err));
        match route {
            // Outside the mesh: plain TCP from the pod's own namespace and address.
            Route::Plain(addr) => match self.upstreams.connect(addr).await {
                Ok(upstream) => relayed(relay(client, upstream, conn, &self.buffers).await),
                Err(source) => failed(ProxyError::Connect { addr, source }),
            },
            Route::Tunnel {
                to,
                source_ip,
                authority,
                identity,
                service_host,
            } => {
                let hop = same_node::Hop {
                    peer,
                    source_ip,
                    authority,
                    conn,
                    log,
                    buffers: &self.buffers,
                };
                // Boxed, as the pool's open below: a future's state is as large as its largest
                // phase, and a connection's task holds it for as long as the connection lasts.
                // Inline, these two set-up phases made every outbound connection's task 9.0 KiB;
                // boxed, 4.1 KiB (debug build, `-Zprint-type-sizes`), and the HBONE set-up's
                // state is freed once the tunnel is open (the same-node path relays inside its
                // own, 3.2 KiB).
                let same_node = self.upstreams.same_node(client, to, &identity, hop);
                let client = match Box::pin(same_node).await {
                    Ok(done) => return done,
                    Err(client) => client,
                };
                let certificate = match self.upstreams.certificate(self.identity).await {
                    Ok(cert) => cert,
                    Err(why) => return failed(ProxyError::NoCertificate(why)),
                };
                let key = PoolKey::new(
                    self.identity.clone(),
                    source_ip,
                    SocketAddr::new(to, HBONE_PORT),
                    vec![identity],
                );
                let mut request =
                    TunnelRequest::new(SocketAddr::new(source_ip, peer.port()), authority);
                request.baggage = baggage(self.workload);
                request.service_host = service_host;
                match Box::pin(self.pool.open(&key, &certificate, &request)).await {
                    Ok(tunnel) => relayed(relay(client, tunnel, conn, &self.buffers).await),
                    Err(err) => failed(ProxyError::hbone(err)),
                }
            }
        }
    }
}

fn relayed(
    (moved, result): (Transferred, std::io::Result<()>),
) -> (Transferred, Result<(), ProxyError>) {
    (moved, result.map_err(ProxyError::Relay))
}

/// The source workload's metadata as ztunnel sends it in `baggage`: the same canonical service
/// and revision as its metrics labels.
fn baggage(workload: &Workload) -> Baggage {
    Baggage {
        cluster: Some(crate::telemetry::istio::CLUSTER_ID.into()),
        namespace: Some(workload.namespace.clone()),
        workload_kind: Some("pod".into()),
        workload_name: Some(workload.workload_name().into()),
        service_name: Some(workload.canonical_service().into()),
        service_version: Some(workload.canonical_revision().into()),
        region: None,
        zone: None,
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, path::PathBuf, sync::Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::{
        hbone::PoolConfig,
        netns::NetnsRef,
        state::{EndpointAddress, RedirectSettings, ServicePort, WaypointRef},
        telemetry::{Metrics, istio::ResponseFlags},
        testing::{
            ca::TestCa,
            hbone::{TD, recv, start_upstream, start_waypoint},
        },
    };

    const VIP: &str = "10.96.0.10:80";

    fn workload(namespace: &str, name: &str, sa: &str, ip: &str, app: &str) -> Workload {
        Workload {
            name: name.into(),
            controller: None,
            namespace: namespace.into(),
            service_account: sa.into(),
            node: "node-a".into(),
            ips: vec![ip.parse().unwrap()],
            labels: BTreeMap::from([("app".to_string(), app.to_string())]),
            enrolled: true,
            ready: true,
            netns: NetnsRef::Path(PathBuf::from("/nonexistent")),
            capture_exclusions: Default::default(),
        }
    }

    fn service(namespace: &str, name: &str, vip: &str, app: &str) -> Service {
        Service {
            name: name.into(),
            namespace: namespace.into(),
            vips: vec![vip.parse().unwrap()],
            selector: BTreeMap::from([("app".to_string(), app.to_string())]),
            endpoint_addresses: Vec::new(),
            ports: vec![ServicePort {
                port: 80,
                target_port: 8080,
            }],
            waypoint: None,
        }
    }

    /// `shop/client` (at 127.0.0.1), the enrolled `shop/web-0` (10.10.0.2), and `shop/db`
    /// (VIP 10.96.0.10), a service without selector listing `endpoints`, bound to the missing
    /// waypoint `infra/wp` if `waypoint`.
    fn listing(endpoints: &[&str], waypoint: bool) -> MeshState {
        let mut db = service("shop", "db", "10.96.0.10", "db");
        db.selector.clear();
        db.endpoint_addresses = endpoints
            .iter()
            .map(|ip| EndpointAddress {
                ip: ip.parse().unwrap(),
                ports: BTreeMap::new(),
            })
            .collect();
        db.waypoint = waypoint.then(|| WaypointRef {
            namespace: "infra".into(),
            name: "wp".into(),
        });
        MeshState::new(
            RedirectSettings::default(),
            vec![
                workload("shop", "client", "client", "127.0.0.1", "client"),
                workload("shop", "web-0", "web", "10.10.0.2", "web"),
            ],
            vec![db],
        )
        .with_trust_domain(TD)
    }

    /// `shop/client` (at 127.0.0.1) and `shop/web` bound to the waypoint `infra/wp`, whose
    /// one pod `wp-0` (10.30.0.1, service account `waypoint`) is ready if `waypoint_ready`;
    /// without `waypoint_exists` the waypoint's service is not in the mesh at all.
    fn mesh(waypoint_ready: bool, waypoint_exists: bool) -> MeshState {
        let mut web = service("shop", "web", "10.96.0.10", "web");
        web.waypoint = Some(WaypointRef {
            namespace: "infra".into(),
            name: "wp".into(),
        });
        let mut wp_pod = workload("infra", "wp-0", "waypoint", "10.30.0.1", "wp");
        wp_pod.ready = waypoint_ready;
        let mut services = vec![web];
        if waypoint_exists {
            services.push(service("infra", "wp", "10.96.9.9", "wp"));
        }
        MeshState::new(
            RedirectSettings::default(),
            vec![
                workload("shop", "client", "client", "127.0.0.1", "client"),
                // The service's own endpoint: ready, enrolled, and never to be reached directly.
                workload("shop", "web-0", "web", "10.10.0.2", "web"),
                wp_pod,
            ],
            services,
        )
        .with_trust_domain(TD)
    }

    /// `build_request` on `state`, from `shop/client`.
    fn route_of(state: &MeshState, dst: &str) -> Request {
        let client = state.workload_by_ip("127.0.0.1".parse().unwrap()).unwrap();
        build_request(
            state,
            client,
            &state.identity_of(client),
            dst.parse().unwrap(),
        )
    }

    #[test]
    fn build_request_tunnels_to_mesh_workloads_and_waypoints_with_their_identity() {
        let state = mesh(true, true);
        let web_id = SpiffeId::new(TD, "shop", "web");
        // A workload dialled directly: a tunnel to its pod, carrying the address dialled.
        let direct = route_of(&state, "10.10.0.2:8080");
        assert_eq!(
            direct.route.unwrap(),
            Route::Tunnel {
                to: "10.10.0.2".parse().unwrap(),
                source_ip: "127.0.0.1".parse().unwrap(),
                authority: "10.10.0.2:8080".parse().unwrap(),
                identity: web_id.clone(),
                service_host: None,
            }
        );
        assert_eq!(
            direct.labels.connection_security_policy,
            SecurityPolicy::MutualTls
        );
        assert_eq!(direct.labels.destination_principal, web_id.to_string());
        assert_eq!(direct.dst_workload.as_deref(), Some("shop/web-0"));
        // A VIP bound to a waypoint: a tunnel to the waypoint's pod with the VIP as authority,
        // accepting only the waypoint's identity; never the endpoint.
        let via_waypoint = route_of(&state, VIP);
        assert_eq!(
            via_waypoint.route.unwrap(),
            Route::Tunnel {
                to: "10.30.0.1".parse().unwrap(),
                source_ip: "127.0.0.1".parse().unwrap(),
                authority: VIP.parse().unwrap(),
                identity: SpiffeId::new(TD, "infra", "waypoint"),
                service_host: Some("web.shop.svc.cluster.local".into()),
            }
        );
        assert_eq!(via_waypoint.dst_service.as_deref(), Some("shop/web"));
        assert_eq!(via_waypoint.dst_workload.as_deref(), Some("infra/wp-0"));
    }

    #[test]
    fn build_request_sends_the_rest_in_plain_tcp_or_says_why_not() {
        let state = mesh(true, true);
        // Outside the mesh: passed through as dialled, unlabelled, not mutual TLS.
        let outside = route_of(&state, "192.0.2.7:443");
        assert_eq!(
            outside.route.unwrap(),
            Route::Plain("192.0.2.7:443".parse().unwrap())
        );
        assert_eq!(
            outside.labels.connection_security_policy,
            SecurityPolicy::Unknown
        );
        // A mesh workload the client has no address of the family of, to tunnel from.
        let v6_only = MeshState::new(
            RedirectSettings::default(),
            vec![
                workload("shop", "client", "client", "127.0.0.1", "client"),
                workload("shop", "v6-0", "v6", "fd00::9", "v6"),
            ],
            vec![],
        )
        .with_trust_domain(TD);
        let err = route_of(&v6_only, "[fd00::9]:8080").route.unwrap_err();
        assert_eq!(
            err.to_string(),
            "shop/client has no address of fd00::9's family"
        );
        // A waypoint that is missing or not ready: refused, counted as no_waypoint.
        for state in [mesh(false, true), mesh(true, false)] {
            let err = route_of(&state, VIP).route.unwrap_err();
            assert!(matches!(err, ProxyError::NoWaypoint { .. }), "{err}");
            assert_eq!(err.denial_reason(), Some("no_waypoint"));
            assert_eq!(err.response_flags(), ResponseFlags::Connect);
        }
        // A port the service does not have.
        let err = route_of(&state, "10.96.0.10:81").route.unwrap_err();
        assert_eq!(err.to_string(), "service shop/web has no port 81");
        // A selector-less service: its listed endpoint outside the mesh, in plain TCP.
        let listed = route_of(&listing(&["192.0.2.7"], false), "10.96.0.10:80");
        assert_eq!(
            listed.route.unwrap(),
            Route::Plain("192.0.2.7:8080".parse().unwrap())
        );
        assert_eq!(listed.dst_service.as_deref(), Some("shop/db"));
    }

    /// The test's way out of the proxy: a fixed certificate, and plain TCP that only records.
    struct TestUpstreams {
        certificate: Arc<WorkloadCertificate>,
        plain: Mutex<Vec<SocketAddr>>,
    }

    impl Upstreams for &TestUpstreams {
        async fn certificate(&self, id: &SpiffeId) -> Result<Arc<WorkloadCertificate>, String> {
            assert_eq!(id, &self.certificate.id);
            Ok(self.certificate.clone())
        }

        async fn connect(&self, dst: SocketAddr) -> std::io::Result<TcpStream> {
            self.plain.lock().unwrap().push(dst);
            Err(std::io::Error::other("no plain TCP in these tests"))
        }

        async fn same_node(
            &self,
            client: TcpStream,
            _: IpAddr,
            _: &SpiffeId,
            _: same_node::Hop<'_>,
        ) -> Result<(Transferred, Result<(), ProxyError>), TcpStream> {
            // Every destination is on another node here.
            Err(client)
        }
    }

    /// Runs one connection from `shop/client` to `dst` through the outbound path, with HBONE
    /// connections to any `<ip>:15008` dialled to `hbone_server` instead (and recorded).
    /// Returns what the client read back and the HBONE endpoints dialled.
    async fn connect_through(
        state: &MeshState,
        metrics: &TestMetrics,
        ca: &TestCa,
        hbone_server: SocketAddr,
        dst: SocketAddr,
    ) -> (Vec<u8>, Vec<SocketAddr>, Vec<SocketAddr>) {
        let dialled = Arc::new(Mutex::new(Vec::new()));
        let record = dialled.clone();
        let pool = Pool::new(
            move |key: &PoolKey| {
                record.lock().unwrap().push(key.destination());
                TcpStream::connect(hbone_server)
            },
            PoolConfig::default(),
        );
        let client = state.workload_by_ip("127.0.0.1".parse().unwrap()).unwrap();
        let identity = state.identity_of(client);
        let upstreams = TestUpstreams {
            certificate: Arc::new(ca.issue(&identity)),
            plain: Mutex::default(),
        };
        let outbound = Outbound {
            state,
            metrics: &metrics.proxy,
            workload: client,
            identity: &identity,
            pool: &pool,
            buffers: BufferShare::unlimited(),
            upstreams: &upstreams,
        };

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut app = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, peer) = listener.accept().await.unwrap();
        let application = async {
            // A refused connection may be reset rather than closed: either way nothing comes.
            let _ = app.write_all(b"GET / HTTP/1.0\r\n\r\n").await;
            let _ = app.shutdown().await;
            let mut got = Vec::new();
            let _ = app.read_to_end(&mut got).await;
            got
        };
        let (got, ()) = tokio::join!(application, outbound.forward(accepted, peer, dst));
        let dialled = dialled.lock().unwrap().clone();
        let plain = upstreams.plain.lock().unwrap().clone();
        (got, dialled, plain)
    }

    /// The proxy's metrics in a registry of their own.
    struct TestMetrics {
        registry: Metrics,
        proxy: ProxyMetrics,
    }

    impl TestMetrics {
        fn new() -> Self {
            let registry = Metrics::new();
            let proxy = ProxyMetrics::new(&registry).unwrap();
            Self { registry, proxy }
        }
    }

    fn no_waypoint_denials(metrics: &TestMetrics) -> f64 {
        metrics
            .registry
            .gather()
            .iter()
            .filter(|family| family.name() == "ambit_connections_denied_total")
            .flat_map(|family| family.get_metric())
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "reason" && l.value() == "no_waypoint")
            })
            .map(|m| m.get_counter().get_value())
            .sum()
    }

    #[tokio::test]
    async fn a_service_with_a_waypoint_is_tunnelled_to_the_waypoint() {
        let ca = TestCa::new("root");
        let (app, mut app_received) = start_upstream(b"HTTP/1.0 200 OK\r\n\r\n".to_vec()).await;
        let waypoint_id = SpiffeId::new(TD, "infra", "waypoint");
        let mut waypoint = start_waypoint(&ca.issue(&waypoint_id), app).await;
        let (state, metrics) = (mesh(true, true), TestMetrics::new());

        let (got, dialled, plain) =
            connect_through(&state, &metrics, &ca, waypoint.addr, VIP.parse().unwrap()).await;

        assert_eq!(got, b"HTTP/1.0 200 OK\r\n\r\n", "the answer came back");
        assert_eq!(recv(&mut app_received).await, b"GET / HTTP/1.0\r\n\r\n");
        // To the waypoint pod's HBONE port, never to the endpoint 10.10.0.2...
        assert_eq!(dialled, ["10.30.0.1:15008".parse().unwrap()]);
        assert!(plain.is_empty());
        // ...telling it the address the client dialled, not an endpoint's.
        let request = recv(&mut waypoint.requests).await;
        assert_eq!(request.destination, VIP.parse().unwrap());
        assert_eq!(
            request.peer,
            state.identity_of(&state.workloads()[0]),
            "the waypoint saw the source pod's identity"
        );
        let forwarded = request.headers.get("forwarded").unwrap().to_str().unwrap();
        assert!(
            forwarded.ends_with(";host=web.shop.svc.cluster.local"),
            "{forwarded}"
        );
        assert_eq!(no_waypoint_denials(&metrics), 0.0);
    }

    #[tokio::test]
    async fn a_waypoint_with_another_identity_is_refused() {
        let ca = TestCa::new("root");
        let (app, mut app_received) = start_upstream(b"hello".to_vec()).await;
        // The endpoint's identity, not the waypoint's: the client must not accept it.
        let impostor = SpiffeId::new(TD, "shop", "web");
        let waypoint = start_waypoint(&ca.issue(&impostor), app).await;
        let (state, metrics) = (mesh(true, true), TestMetrics::new());

        let (got, dialled, _) =
            connect_through(&state, &metrics, &ca, waypoint.addr, VIP.parse().unwrap()).await;

        assert!(got.is_empty(), "{got:?}");
        assert_eq!(dialled, ["10.30.0.1:15008".parse().unwrap()]);
        assert!(
            app_received.try_recv().is_err(),
            "nothing reached the application"
        );
    }

    #[tokio::test]
    async fn no_ready_or_no_waypoint_refuses_the_connection() {
        let ca = TestCa::new("root");
        let (app, mut app_received) = start_upstream(b"hello".to_vec()).await;
        let waypoint_id = SpiffeId::new(TD, "infra", "waypoint");
        let mut waypoint = start_waypoint(&ca.issue(&waypoint_id), app).await;
        let metrics = TestMetrics::new();

        for (n, state) in [mesh(false, true), mesh(true, false)].iter().enumerate() {
            let (got, dialled, plain) =
                connect_through(state, &metrics, &ca, waypoint.addr, VIP.parse().unwrap()).await;
            assert!(got.is_empty(), "{got:?}");
            assert!(
                dialled.is_empty(),
                "no tunnel, to the waypoint or around it"
            );
            assert!(plain.is_empty(), "no plain connection either");
            assert_eq!(no_waypoint_denials(&metrics), (n + 1) as f64);
        }
        assert!(waypoint.requests.try_recv().is_err());
        assert_eq!(
            waypoint.accepted.load(std::sync::atomic::Ordering::SeqCst),
            0
        );
        assert!(app_received.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_service_without_selector_reaches_its_listed_endpoints() {
        let ca = TestCa::new("root");
        let (app, mut app_received) = start_upstream(b"hi".to_vec()).await;
        let mut web = start_waypoint(&ca.issue(&SpiffeId::new(TD, "shop", "web")), app).await;
        let (state, metrics) = (
            listing(&["10.10.0.2", "192.0.2.7"], false),
            TestMetrics::new(),
        );
        let vip = VIP.parse().unwrap();

        // Round robin: first the enrolled workload's address, in HBONE with its identity...
        let (got, dialled, plain) = connect_through(&state, &metrics, &ca, web.addr, vip).await;
        assert_eq!(got, b"hi");
        assert_eq!(dialled, ["10.10.0.2:15008".parse().unwrap()]);
        assert!(plain.is_empty());
        assert_eq!(
            recv(&mut web.requests).await.destination,
            "10.10.0.2:8080".parse().unwrap()
        );
        assert_eq!(recv(&mut app_received).await, b"GET / HTTP/1.0\r\n\r\n");
        // ...then the address outside the mesh, in plain TCP at the target port.
        let (_, dialled, plain) = connect_through(&state, &metrics, &ca, web.addr, vip).await;
        assert!(dialled.is_empty());
        assert_eq!(plain, ["192.0.2.7:8080".parse().unwrap()]);
    }

    #[tokio::test]
    async fn a_service_without_selector_or_endpoints_passes_through_unless_bound() {
        let ca = TestCa::new("root");
        let metrics = TestMetrics::new();
        let vip: SocketAddr = VIP.parse().unwrap();
        let unused: SocketAddr = "127.0.0.1:9".parse().unwrap();
        // No endpoint known: to the address dialled, as for any destination outside the mesh.
        let (_, dialled, plain) =
            connect_through(&listing(&[], false), &metrics, &ca, unused, vip).await;
        assert!(dialled.is_empty());
        assert_eq!(plain, [vip]);
        // Bound to a waypoint that is missing: refused, never passed through around it.
        let (got, dialled, plain) =
            connect_through(&listing(&[], true), &metrics, &ca, unused, vip).await;
        assert!(got.is_empty() && dialled.is_empty() && plain.is_empty());
        assert_eq!(no_waypoint_denials(&metrics), 1.0);
    }
}
