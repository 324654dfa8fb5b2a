//! The inbound plaintext path: connections from outside a pod that sk_lookup steered to its
//! 15006 listener. The accepted socket's local address is the address the client dialled.
//!
//! Plaintext has no verified source. Under STRICT peer authentication it is refused outright;
//! under PERMISSIVE (the default) it is authorized as an unauthenticated source (its address
//! only) and forwarded, and closed if a later change (the pod becoming STRICT, a new policy) no
//! longer allows it ([`super::admission`]).
use std::{net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use ambit_common::POD_PROXY_PORTS;

use super::{
    PodContext, ProxyContext,
    admission::{self, Inbound},
    connect_to_application,
    error::ProxyError,
    record,
};
use crate::{
    limits::{BufferShare, Path, refuse},
    policy::Refusal,
    proxy::metrics::{ConnectionLabels, ConnectionRecorder},
    relay::{Relayed, Transferred, relay_until},
    telemetry::{AccessLog, Direction},
};

/// Accepts steered connections of one pod until the task is aborted (un-enrolment). Each
/// holds a slot of the agent's connection budget under its source address while it lives.
pub async fn serve(listener: TcpListener, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) {
    let limits = &ctx.limits;
    limits
        .accept_loop(&listener, Path::Inbound, |client, peer| {
            let Some(permit) = limits.admit(Path::Inbound, peer.ip().to_canonical()) else {
                return refuse(client);
            };
            let (pod, ctx) = (pod.clone(), ctx.clone());
            tokio::spawn(async move {
                handle(client, peer, pod, ctx).await;
                drop(permit);
            });
        })
        .await
}

async fn handle(client: TcpStream, peer: SocketAddr, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) {
    super::no_delay(&client);
    let dst = match client.local_addr() {
        Ok(addr) => addr,
        Err(err) => {
            warn!(pod = %pod.workload.uid(), %peer, %err, "inbound connection without local address");
            return;
        }
    };
    let inbound = Arc::new(Inbound::plaintext(peer.ip(), dst, pod.workload.clone()));
    // Registered before the state is read: see `admission`.
    let mut admission = ctx.connections.register(inbound.clone());
    let state = ctx.state.borrow().clone();
    // The current workload (labels may have changed since enrolment), for policy.
    let workload = state
        .workload_by_ip(dst.ip())
        .cloned()
        .unwrap_or_else(|| pod.workload.clone());
    let src = state.workload_by_ip(peer.ip());
    let mut log = AccessLog::new(Direction::InboundPlaintext, peer, dst);
    log.src_workload = src.map(|w| w.uid());
    log.dst_workload = Some(workload.uid());
    log.upstream = Some(dst);
    let conn = ctx
        .metrics
        .connection_opened(&ConnectionLabels::inbound_plaintext(
            &state,
            src.map(|w| &**w),
            &workload,
            dst.port(),
        ));
    let (moved, result) = if POD_PROXY_PORTS.contains(&dst.port()) {
        // The proxy's own ports: forwarding there would land back on this listener, forever.
        (
            Transferred::default(),
            Err(ProxyError::ProxyPort(dst.port())),
        )
    } else {
        // Peer authentication (STRICT refuses plaintext), then authorization.
        match admission::check(&state, &inbound, &workload) {
            Err(refusal) => (Transferred::default(), Err(ProxyError::Refused(refusal))),
            Ok(()) => {
                let hop = (&*ctx.redirector, peer, dst);
                // Under the peer, as its connection slot is.
                let buffers = ctx.limits.buffer_share(peer.ip());
                forward(client, hop, &pod, (&conn, &buffers), admission.revoked()).await
            }
        }
    };
    record(&ctx.metrics, conn, log, moved, result);
}

/// Connects to the application and relays until the connection ends or a change closes it,
/// counting bytes into `conn` as they flow, reading into buffers of the peer's share.
async fn forward(
    client: TcpStream,
    (redirector, peer, dst): (&crate::redirect::Redirector, SocketAddr, SocketAddr),
    pod: &PodContext,
    (conn, buffers): (&ConnectionRecorder, &BufferShare),
    revoked: impl Future<Output = Refusal>,
) -> (Transferred, Result<(), ProxyError>) {
    // From the client's address, over loopback inside the pod: the application sees the peer.
    match connect_to_application(redirector, &pod.netns, dst, peer).await {
        Ok(upstream) => {
            let (moved, ended) = relay_until(client, upstream, conn, buffers, revoked).await;
            let result = match ended {
                Relayed::Finished(result) => result.map_err(ProxyError::Relay),
                Relayed::Stopped(refusal) => Err(ProxyError::ClosedByPolicy(refusal)),
            };
            (moved, result)
        }
        Err(source) => (
            Transferred::default(),
            Err(ProxyError::Connect { addr: dst, source }),
        ),
    }
}
