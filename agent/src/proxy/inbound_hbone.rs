//! The inbound HBONE path: tunnels arriving at `<pod IP>:15008` inside an enrolled pod.
//!
//! The HBONE server ([`crate::hbone::HboneServer`]) terminates mutual TLS with the pod's own
//! certificate and checks the CONNECT authority names this pod; this handler supplies the
//! pod-specific parts: the certificate, authorization with the client's verified identity (its
//! [`Admission`] keeps the tunnel registered for re-evaluation while it is open), the connection
//! to the application, and the access log and metrics of every tunnel.
use std::{io, net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;
use tracing::info;

use super::{
    PodContext, ProxyContext,
    admission::{self, Inbound},
    connect_to_application,
};
use crate::{
    hbone::{
        ConnectRequest, ConnectionError, Deny, InboundHandler, StreamReport, server::StreamError,
        tls,
    },
    identity::SpiffeId,
    policy::Admission,
    proxy::metrics::{ConnectionLabels, ConnectionRecorder},
    state::MeshState,
    telemetry::{
        AccessLog, Direction,
        istio::{ResponseFlags, SecurityPolicy},
    },
};

/// One enrolled pod's HBONE handler.
pub struct PodInbound {
    pod: Arc<PodContext>,
    ctx: Arc<ProxyContext>,
    /// The server configuration built for the current certificate, rebuilt when it is renewed.
    tls: tls::ServerConfigCache,
}

impl PodInbound {
    /// The handler of `pod`.
    pub fn new(pod: Arc<PodContext>, ctx: Arc<ProxyContext>) -> Self {
        Self {
            pod,
            ctx,
            tls: tls::ServerConfigCache::default(),
        }
    }

    /// The metric labels of a tunnel from `source` proven to be `peer` to `destination`, as
    /// the state says now ([`tunnel_labels`]).
    fn labels(
        &self,
        source: SocketAddr,
        peer: &SpiffeId,
        destination: Option<SocketAddr>,
    ) -> ConnectionLabels {
        tunnel_labels(
            &self.ctx.state.borrow().clone(),
            source,
            peer,
            destination,
            &self.pod,
        )
    }
}

/// The metric labels of a tunnel into `pod` from `source` (the HBONE peer address) proven to
/// be `peer`, to `destination` (when the request named a valid one), as `state` says. The
/// destination service is guessed from the port as on the plaintext path (ztunnel's guess when
/// the client does not name the service). The same-node fast path reports its inbound side with
/// these labels too.
pub fn tunnel_labels(
    state: &MeshState,
    source: SocketAddr,
    peer: &SpiffeId,
    destination: Option<SocketAddr>,
    pod: &PodContext,
) -> ConnectionLabels {
    let src = state.workload_by_ip(source.ip());
    // The current workload (labels may have changed since enrolment), as for policy.
    let workload = destination
        .and_then(|dst| state.workload_by_ip(dst.ip()))
        .unwrap_or(&pod.workload);
    let service = destination.and_then(|dst| state.guess_inbound_service(workload, dst.port()));
    ConnectionLabels::new(crate::telemetry::istio::Reporter::Destination)
        .with_source(src.map(|w| &**w))
        .with_source_principal(Some(peer))
        .with_destination(Some(workload))
        .with_destination_principal(Some(&pod.identity))
        .with_destination_service(service.map(|s| &**s))
        .with_security_policy(SecurityPolicy::MutualTls)
}

impl InboundHandler for PodInbound {
    type Upstream = TcpStream;
    /// Opened when the application is reached, bytes counted as they flow.
    type Meter = ConnectionRecorder;

    /// Waits up to [`super::CERTIFICATE_WAIT`] for the pod's first certificate: a client may
    /// reach a pod the moment it is enrolled, before the CA has answered.
    async fn tls_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        let cert = self.ctx.certificate(&self.pod.identity).await.ok()?;
        self.tls
            .get(cert)
            .inspect_err(
                |err| tracing::warn!(pod = %self.pod.workload.uid(), %err, "unusable certificate"),
            )
            .ok()
    }

    async fn authorize(&self, request: &ConnectRequest) -> Result<Admission, Deny> {
        let inbound = Arc::new(Inbound::hbone(
            request.source.ip(),
            request.peer.clone(),
            request.destination,
            self.pod.workload.clone(),
        ));
        // Registered before the state is read: see `admission`.
        let admission = self.ctx.connections.register(inbound.clone());
        let state = self.ctx.state.borrow().clone();
        let workload = state
            .workload_by_ip(request.destination.ip())
            .cloned()
            .unwrap_or_else(|| self.pod.workload.clone());
        admission::check(&state, &inbound, &workload).map_err(|refusal| {
            // The tunnel is answered 401 by the HBONE server; its refusal is counted here.
            self.ctx.metrics.connection_denied(refusal.reason);
            Deny::new(refusal.message)
        })?;
        Ok(admission)
    }

    async fn connect(&self, request: &ConnectRequest) -> io::Result<TcpStream> {
        // From the source pod's address (the tunnel's TCP peer: its agent dials from inside
        // the source pod), so the application sees the client as without the mesh.
        connect_to_application(
            &self.ctx.redirector,
            &self.pod.netns,
            request.destination,
            request.source,
        )
        .await
    }

    fn opened(&self, request: &ConnectRequest) -> Option<ConnectionRecorder> {
        let labels = self.labels(request.source, &request.peer, Some(request.destination));
        Some(self.ctx.metrics.connection_opened(&labels))
    }

    fn report(&self, report: StreamReport<ConnectionRecorder>) {
        let state = self.ctx.state.borrow().clone();
        let src = state.workload_by_ip(report.source.ip());
        let dst = report.destination.unwrap_or(report.source);
        let mut log = AccessLog::new(Direction::Inbound, report.source, dst);
        log.started = std::time::Instant::now() - report.duration;
        log.mtls = true;
        log.src_workload = src.map(|w| w.uid());
        log.src_principal = Some(report.peer.to_string());
        log.dst_workload = Some(self.pod.workload.uid());
        log.dst_principal = Some(self.pod.identity.to_string());
        log.upstream = report.destination;
        log.bytes_sent = report.transferred.sent;
        log.bytes_received = report.transferred.received;
        let flags = match &report.result {
            Ok(()) => ResponseFlags::None,
            Err(StreamError::Denied(_)) => ResponseFlags::Deny,
            // Admitted, then closed by a change: `-` as ztunnel reports it (DENY is for
            // tunnels refused at open); the closed-by-policy counter says why.
            Err(StreamError::Revoked(refusal)) => {
                self.ctx.metrics.connection_closed_by_policy(refusal.reason);
                ResponseFlags::None
            }
            Err(StreamError::Relay(_)) => ResponseFlags::None,
            Err(_) => ResponseFlags::Connect,
        };
        log.outcome = match &report.result {
            Ok(()) => Ok(()),
            Err(err) => Err(format!("{} {err}", report.status.as_u16())),
        };
        // A tunnel refused before it reached the application is opened and closed here.
        let conn = report.meter.unwrap_or_else(|| {
            self.ctx.metrics.connection_opened(&self.labels(
                report.source,
                &report.peer,
                report.destination,
            ))
        });
        conn.finish(report.transferred, flags);
        log.emit();
    }

    fn connection_failed(&self, source: SocketAddr, error: &ConnectionError) {
        let reason = match error {
            ConnectionError::Handshake(err) if tls::identity_error(err).is_some() => {
                "peer_identity"
            }
            ConnectionError::Handshake(_) | ConnectionError::NoPeerIdentity => "tls_handshake",
            ConnectionError::NoCertificate => "no_certificate",
            _ => {
                info!(pod = %self.pod.workload.uid(), %source, %error, "HBONE connection ended");
                return;
            }
        };
        self.ctx.metrics.connection_denied(reason);
        info!(
            target: crate::telemetry::ACCESS_TARGET,
            direction = "inbound",
            src = %source,
            dst_workload = %self.pod.workload.uid(),
            security = "mtls",
            outcome = "error",
            error = %error,
            "connection refused"
        );
    }
}
