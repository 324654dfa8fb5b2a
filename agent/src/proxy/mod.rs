//! The node proxy: per-pod listeners and what they do with each connection (the byte relay
//! itself is [`crate::relay`], shared with the waypoint).
//!
//! Every path has one shape: accept, work out where the connection was going and who is
//! talking, decide (identity, authorization), open the upstream from inside the right pod's
//! namespace, relay, log and count. Inbound connections stay registered while they relay and
//! are decided again on every state change; those no longer allowed are closed ([`admission`]).
//! Between two enrolled pods the upstream is an HBONE tunnel
//! (HTTP/2 CONNECT over mutual TLS, [`crate::hbone`]) to the destination pod's 15008; to anything
//! outside the mesh it is a plain TCP connection. Between two enrolled pods of this node the
//! agent holds both identities, so nothing needs encrypting: the same-node fast path
//! ([`same_node`]) authorizes the connection as the inbound path would and splices it in the
//! kernel.
pub mod admission;
pub mod error;
pub mod inbound;
pub mod inbound_hbone;
pub mod metrics;
pub mod outbound;
pub mod same_node;

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, PoisonError, RwLock},
};

use tokio::net::TcpStream;

use crate::{
    identity::{CertificateManager, SpiffeId},
    netns::Netns,
    redirect::Redirector,
    relay::Transferred,
    state::Workload,
};

/// What every accept loop needs.
pub struct ProxyContext {
    /// The kernel side (original destinations).
    pub redirector: Arc<Redirector>,
    /// The current mesh state.
    pub state: tokio::sync::watch::Receiver<Arc<crate::state::MeshState>>,
    /// Where connections are counted (opened, closed, bytes).
    pub metrics: Arc<metrics::ProxyMetrics>,
    /// The certificates of this node's pods; `None` without a CA, and then mesh traffic is
    /// refused (there is no identity to present), never sent in the clear.
    pub certs: Option<Arc<CertificateManager>>,
    /// The connection budget every accept loop admits through.
    pub limits: Arc<crate::limits::Limits>,
    /// The inbound connections open, re-evaluated on every state change
    /// ([`admission::reevaluate_on_change`]).
    pub connections: Arc<admission::OpenConnections>,
    /// The settings of every pod's HBONE connection pool.
    pub pool: crate::hbone::PoolConfig,
    /// The pods enrolled on this node, by address: the same-node fast path's destinations.
    pub local_pods: Arc<LocalPods>,
    /// Whether connections between two pods of this node take the same-node fast path
    /// (`--same-node-fast-path`); else they take HBONE like any other.
    pub fast_path: bool,
}

/// The pods enrolled on this node, by address. Enrolment registers each pod once its listeners
/// are up ([`LocalPods::register`]); the entry goes when the pod is un-enrolled.
#[derive(Default)]
pub struct LocalPods {
    by_ip: RwLock<HashMap<IpAddr, Arc<PodContext>>>,
}

impl LocalPods {
    /// The pod enrolled here at `ip`, if any.
    pub fn get(&self, ip: IpAddr) -> Option<Arc<PodContext>> {
        let by_ip = self.by_ip.read().unwrap_or_else(PoisonError::into_inner);
        by_ip.get(&ip.to_canonical()).cloned()
    }

    /// Registers `pod` under its addresses until the returned entry is dropped.
    pub fn register(self: &Arc<Self>, pod: &Arc<PodContext>) -> LocalPod {
        let mut by_ip = self.by_ip.write().unwrap_or_else(PoisonError::into_inner);
        for ip in &pod.workload.ips {
            by_ip.insert(ip.to_canonical(), pod.clone());
        }
        LocalPod {
            registry: self.clone(),
            pod: pod.clone(),
        }
    }
}

/// A pod's registration in [`LocalPods`], removed on drop (only where it still names this pod:
/// a newer pod may have taken one of its addresses).
pub struct LocalPod {
    registry: Arc<LocalPods>,
    pod: Arc<PodContext>,
}

impl Drop for LocalPod {
    fn drop(&mut self) {
        let mut by_ip = self
            .registry
            .by_ip
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        for ip in &self.pod.workload.ips {
            if by_ip
                .get(&ip.to_canonical())
                .is_some_and(|pod| Arc::ptr_eq(pod, &self.pod))
            {
                by_ip.remove(&ip.to_canonical());
            }
        }
    }
}

/// How long a connection waits for its pod's first certificate before it is refused.
pub const CERTIFICATE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl ProxyContext {
    /// The certificate of `id`, waiting briefly for a first fetch to finish.
    pub async fn certificate(
        &self,
        id: &SpiffeId,
    ) -> Result<Arc<crate::identity::WorkloadCertificate>, String> {
        let certs = self
            .certs
            .as_ref()
            .ok_or("no CA configured (--ca-address): the agent holds no identities")?;
        certs
            .wait_for(id, CERTIFICATE_WAIT)
            .await
            .map_err(|err| format!("no certificate for {id}: {err}"))
    }
}

/// An enrolled pod as the proxy sees it.
pub struct PodContext {
    /// The workload.
    pub workload: Arc<Workload>,
    /// The identity it runs as.
    pub identity: SpiffeId,
    /// Its network namespace.
    pub netns: Arc<Netns>,
    /// Its HBONE connections to other pods, dialled from inside its namespace.
    pub pool: crate::hbone::Pool,
}

/// Turns Nagle's algorithm off on an accepted pod connection, as on every socket the agent
/// opens ([`connect_from`]) and as ztunnel does.
///
/// The relay writes what it has as soon as it has it, often as several writes in a row (a
/// tunnel's DATA frames, each a write; a read buffer that starts at 1 KiB). With Nagle on, the
/// second write waits for the ACK of the first, and a client waiting for the rest of its
/// answer delays that ACK (up to 40 ms on Linux): every exchange of a request and an answer
/// stalled for 40 ms, so a burst of 2,000 connections each echoing 16 KiB took over 3 minutes
/// instead of half a minute.
pub(crate) fn no_delay(socket: &TcpStream) {
    if let Err(err) = socket.set_nodelay(true) {
        tracing::debug!(%err, "TCP_NODELAY not set on an accepted connection");
    }
}

/// Opens a TCP connection to `dst` from inside `netns`, optionally from a given local address.
/// The eBPF programs leave it alone because the agent's cgroup is exempt.
pub async fn connect_from(
    netns: &Netns,
    dst: SocketAddr,
    bind: Option<SocketAddr>,
) -> io::Result<TcpStream> {
    let socket = netns.run(|| -> io::Result<socket2::Socket> {
        let domain = socket2::Domain::for_address(dst);
        // Non-blocking from socket(2) on (SOCK_NONBLOCK): no fcntl pair per connection.
        let stream = socket2::Type::STREAM.nonblocking();
        let socket = socket2::Socket::new(domain, stream, Some(socket2::Protocol::TCP))?;
        socket.set_tcp_nodelay(true)?;
        if let Some(bind) = bind {
            socket.bind(&bind.into())?;
        }
        Ok(socket)
    })??;
    let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    socket.connect(dst).await
}

/// Opens the inbound hop to the application of an enrolled pod: from inside its namespace
/// (`netns`) to `dst` (the pod's address and the application's port), from `client`'s address,
/// so the application sees the real client as it would without the mesh.
///
/// The socket is transparent (`IP_TRANSPARENT`: it may use an address the pod does not own)
/// and marked ([`routing::MARK`]); the kernel delivers the SYN over loopback, sk_lookup lets
/// it through (its 4-tuple is registered while it connects: [`Redirector::agent_hop`]), the
/// accepted socket takes the mark, and the pod's
/// policy routing ([`routing`]) brings every answer back over loopback to this socket. A
/// client of the other family than `dst` (never from Ambit's paths), or the pod itself, is
/// connected from the pod's own address.
///
/// The local port is never the client's own: a plaintext client's connection to the same
/// application port is held by the agent in this namespace under (client address and port,
/// pod address and port), and a second connection with that 4-tuple would take its packets.
///
/// [`routing`]: crate::netns::routing
/// [`routing::MARK`]: crate::netns::routing::MARK
pub async fn connect_to_application(
    redirector: &Redirector,
    netns: &Netns,
    dst: SocketAddr,
    client: SocketAddr,
) -> io::Result<TcpStream> {
    let client_ip = client.ip().to_canonical();
    let dst_ip = dst.ip().to_canonical();
    if client_ip.is_ipv4() != dst_ip.is_ipv4() || client_ip == dst_ip {
        return connect_from(netns, dst, Some(SocketAddr::new(dst.ip(), 0))).await;
    }
    // Port 0: the kernel picks a free one at bind (as ztunnel binds), again if it is the
    // client's own.
    let from = match (client_ip, dst) {
        (IpAddr::V4(v4), SocketAddr::V6(_)) => IpAddr::V6(v4.to_ipv6_mapped()),
        (ip, _) => ip,
    };
    let socket = netns.run(|| -> io::Result<socket2::Socket> {
        let mut tries = 0;
        loop {
            tries += 1;
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(dst),
                socket2::Type::STREAM.nonblocking(),
                Some(socket2::Protocol::TCP),
            )?;
            socket.set_tcp_nodelay(true)?;
            if dst.is_ipv4() {
                socket.set_ip_transparent_v4(true)?;
            } else {
                socket.set_ip_transparent_v6(true)?;
            }
            socket.set_mark(crate::netns::routing::MARK)?;
            socket.bind(&SocketAddr::new(from, 0).into())?;
            let port = socket.local_addr()?.as_socket().map(|a| a.port());
            if port != Some(client.port()) || tries == 3 {
                return Ok(socket);
            }
        }
    })??;
    let from = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("a TCP socket without an IP address"))?;
    // The SYN arrives at the pod like a client's: sk_lookup passes it only while this lives.
    let _hop = redirector
        .agent_hop(dst, from)
        .map_err(|err| io::Error::other(format!("{err:#}")))?;
    let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    // Bounded, so that an application that never accepts cannot hold hops (and their
    // AGENT_HOPS entries) through the kernel's SYN retries.
    tokio::time::timeout(HOP_CONNECT_TIMEOUT, socket.connect(dst))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the application at {dst} did not accept within {HOP_CONNECT_TIMEOUT:?}"),
            )
        })?
}

/// How long the hop to an application may take to connect (ztunnel's connect timeout).
pub const HOP_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Ends a connection in one place, however it went: its closed series with the response flags
/// of the error if any, the agent's refusal counters, and its access-log line.
pub fn record(
    metrics: &metrics::ProxyMetrics,
    conn: metrics::ConnectionRecorder,
    mut log: crate::telemetry::AccessLog,
    moved: Transferred,
    result: Result<(), error::ProxyError>,
) {
    if let Err(err) = &result {
        if let Some(reason) = err.denial_reason() {
            metrics.connection_denied(reason);
        }
        if let Some(reason) = err.closed_by_policy_reason() {
            metrics.connection_closed_by_policy(reason);
        }
    }
    let flags = result.as_ref().err().map_or(
        crate::telemetry::istio::ResponseFlags::None,
        error::ProxyError::response_flags,
    );
    conn.finish(moved, flags);
    log.bytes_sent = moved.sent;
    log.bytes_received = moved.received;
    log.outcome = result.map_err(|err| err.to_string());
    log.emit();
}
