//! Opaque TCP through the waypoint: a tunnel whose bytes are not HTTP ([`super::sniff`]) is
//! forwarded with L4 semantics, as the node proxy forwards a connection to a service: to an
//! endpoint of the service dialled, round robin among its ready endpoints, over HBONE to that
//! endpoint's 15008 with the waypoint's identity, its bytes copied both ways unchanged. No
//! route applies (routes are HTTP's); the endpoint's agent authorizes the waypoint as it does
//! for HTTP. One access-log line per connection when it ends.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::info;

use super::proxy::Waypoint;
use crate::{
    hbone::{HBONE_PORT, HboneStream, PoolKey, TunnelRequest},
    identity::SpiffeId,
    relay::relay,
    state::{MeshState, WaypointRef, Workload, routes::RouteDestination},
};

impl Waypoint {
    /// Opens a CONNECT stream to `target` (an address and port of `endpoint`) on the pooled
    /// HBONE connection to the endpoint's 15008, presenting the waypoint's certificate and
    /// expecting the endpoint's identity. `source` is the client's address (`forwarded`),
    /// `service_host` the service's hostname.
    pub(super) async fn tunnel_to(
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

/// Forwards the opaque connection `io`, dialled to the VIP and port `dialled` by `source`
/// (verified as `peer`), to an endpoint of that service, until both directions end.
pub(super) async fn forward<S>(
    waypoint: &Arc<Waypoint>,
    source: SocketAddr,
    peer: &SpiffeId,
    dialled: SocketAddr,
    io: S,
) where
    S: AsyncRead + AsyncWrite,
{
    let started = Instant::now();
    let state = waypoint.state.borrow().clone();
    let mut upstream = None;
    let mut endpoint_name = None;
    let result: Result<(u64, u64), String> = async {
        let service = state
            .service_by_vip(dialled.ip())
            .ok_or_else(|| format!("{dialled} is no longer a service VIP"))?;
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
        };
        let endpoints = state.endpoints(service);
        let endpoint = waypoint
            .balancer
            .pick(&destination, &endpoints)
            .ok_or_else(|| format!("no ready endpoint of {}", service.uid()))?;
        let ip = endpoint
            .address_like(dialled.ip())
            .or_else(|| endpoint.ips.first().copied())
            .ok_or_else(|| format!("endpoint {} has no address", endpoint.uid()))?;
        let target = SocketAddr::new(ip, target_port);
        upstream = Some(target);
        endpoint_name = Some(endpoint.uid());
        let stream = waypoint
            .tunnel_to(&state, endpoint, target, source, service.hostname())
            .await?;
        let (moved, ended) = relay(io, stream).await;
        ended.map_err(|e| format!("relay: {e}"))?;
        Ok((moved.sent, moved.received))
    }
    .await;
    let (bytes_received, bytes_sent, error) = match &result {
        Ok((received, sent)) => (*received, *sent, None),
        Err(e) => (0, 0, Some(e.as_str())),
    };
    info!(
        target: "access",
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
