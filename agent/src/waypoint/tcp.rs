//! Opaque TCP through the waypoint: a tunnel whose bytes are not HTTP ([`super::sniff`]) is
//! forwarded with L4 semantics, as the node proxy forwards a connection to a service: first
//! authorized by the waypoint's policies with Istio's TCP semantics ([`super::authz`]: a
//! client that does not speak HTTP must not slip past a DENY), then to an endpoint of the
//! service dialled, picked by its DestinationRule's load balancer (round robin by default)
//! among its ready endpoints, over HBONE to that endpoint's 15008 with the waypoint's
//! identity, its bytes copied both ways unchanged. No route applies (routes are HTTP's); the
//! endpoint's agent authorizes the waypoint as it does for HTTP. One access-log line per
//! connection when it ends.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use http::HeaderMap;
use tracing::info;

use super::{
    authz::{self, Peer},
    balance::{Balancer, HashInput},
    outlier::Outliers,
    pool::ClusterId,
};
use crate::{
    hbone::HboneStream,
    identity::SpiffeId,
    limits::BufferShare,
    relay::{Relayable, relay},
    state::{
        MeshState, WaypointRef, Workload,
        routes::{RouteDestination, cluster_name},
    },
};

/// Where an opaque connection came from and went to.
pub(super) struct Opaque<'a> {
    /// The client's address.
    pub source: SocketAddr,
    /// The client's verified identity.
    pub peer: &'a SpiffeId,
    /// The VIP and port dialled.
    pub dialled: SocketAddr,
    /// The client's share of the relay-buffer budget.
    pub buffers: BufferShare,
}

/// Authorizes the opaque connection `io` and forwards it to an endpoint of the service
/// dialled, picked by `balancer` in `state`, through the tunnel `open(endpoint, target,
/// service hostname)` returns, until both directions end. A denied connection is closed.
pub(super) async fn forward<S, F, T>(
    conn: Opaque<'_>,
    state: &MeshState,
    balancer: &Balancer,
    outliers: &Outliers,
    io: S,
    open: F,
) where
    S: Relayable,
    F: FnOnce(Arc<Workload>, SocketAddr, String) -> T,
    T: Future<Output = Result<HboneStream, String>>,
{
    let Opaque {
        source,
        peer,
        dialled,
        buffers,
    } = conn;
    let started = Instant::now();
    let mut upstream = None;
    let mut endpoint_name = None;
    let result: Result<(u64, u64), String> = async {
        let peer_of = Peer {
            identity: peer,
            source,
            dialled,
        };
        authz::authorize_opaque(state, &peer_of).map_err(|reason| format!("denied: {reason}"))?;
        let service = state
            .service_by_vip(dialled.ip())
            .ok_or_else(|| format!("{dialled} is no longer a service VIP"))?;
        if let Some(reason) = authz::http_only(state, service) {
            return Err(format!("refused: {reason}"));
        }
        let target_port = service
            .port(dialled.port())
            .ok_or_else(|| format!("service {} has no port {}", service.uid(), dialled.port()))?
            .target_port;
        let destination = RouteDestination {
            service: WaypointRef {
                namespace: service.namespace.clone(),
                name: service.name.clone(),
            },
            port: None,
            subset: None,
            weight: 100,
            headers: Default::default(),
        };
        let mut endpoints = state.endpoints(service);
        // Ejected endpoints are skipped here too (TCP results are not counted: Envoy counts
        // connect failures only with split local-origin errors, which Istio leaves off).
        if let Some(policy) = state
            .routes()
            .upstream_policy(&destination)
            .outlier_detection
        {
            let cluster = ClusterId {
                name: cluster_name(&destination),
                service: service.hostname(),
                subset: String::new(),
            };
            endpoints = outliers.healthy(&cluster, &policy, &endpoints);
        }
        let no_headers = HeaderMap::new();
        let hash_input = HashInput {
            headers: &no_headers,
            query: None,
            source: source.ip(),
        };
        let pick = balancer
            .pick(
                state.routes().load_balancer(&destination),
                &destination,
                &endpoints,
                hash_input,
            )
            .ok_or_else(|| format!("no ready endpoint of {}", service.uid()))?;
        // Counted in flight (least request) for as long as the connection lasts.
        let (endpoint, _in_flight) = (pick.endpoint, pick.in_flight);
        let ip = endpoint
            .address_like(dialled.ip())
            .or_else(|| endpoint.ips.first().copied())
            .ok_or_else(|| format!("endpoint {} has no address", endpoint.uid()))?;
        let target = SocketAddr::new(ip, target_port);
        upstream = Some(target);
        endpoint_name = Some(endpoint.uid());
        let stream = open(endpoint.clone(), target, service.hostname()).await?;
        let (moved, ended) = relay(io, stream, &(), &buffers).await;
        ended.map_err(|e| format!("relay: {e}"))?;
        Ok((moved.sent, moved.received))
    }
    .await;
    let (bytes_received, bytes_sent, error) = match &result {
        Ok((received, sent)) => (*received, *sent, None),
        Err(e) => (0, 0, Some(e.as_str())),
    };
    if !crate::telemetry::access_logged(error.is_some()) {
        return;
    }
    info!(
        target: crate::telemetry::ACCESS_TARGET,
        reporter = "waypoint",
        src = %source,
        src_principal = %peer,
        dst = %dialled,
        protocol = "tcp",
        dst_workload = endpoint_name.as_deref(),
        upstream = upstream.map(|u| u.to_string()),
        bytes_received,
        bytes_sent,
        duration_ms = started.elapsed().as_millis() as u64,
        error,
        "connection"
    );
}
