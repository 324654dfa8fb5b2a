//! The outbound path: connections the kernel redirected from a pod to its 127.0.0.1:15001.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use super::{PodContext, ProxyContext, Transferred, connect_from, relay};
use crate::{
    state::Resolved,
    telemetry::{AccessLog, ConnectionLabels, Direction, ResponseFlags},
};

/// Accepts redirected connections of one pod until the task is aborted (un-enrolment).
/// Connections already accepted run in their own tasks and outlive the listener.
pub async fn serve(listener: TcpListener, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                tokio::spawn(handle(client, peer, pod.clone(), ctx.clone()));
            }
            Err(err) => {
                // Typically EMFILE: back off instead of spinning, keep serving.
                warn!(pod = %pod.workload.uid(), %err, "outbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(client: TcpStream, peer: SocketAddr, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) {
    let started = Instant::now();
    let src_workload = pod.workload.uid();
    let Some(dst) = ctx
        .redirector
        .original_destination(pod.netns.cookie(), peer)
    else {
        // Not redirected by our programs (someone dialled 127.0.0.1:15001 directly), or the
        // client is already gone: there is nowhere legitimate to send it.
        warn!(pod = %src_workload, %peer, "no original destination recorded; closing");
        return;
    };
    let state = ctx.state.borrow().clone();
    let mut log = AccessLog {
        direction: Direction::Outbound,
        src: peer,
        src_workload: Some(&src_workload),
        dst,
        upstream: None,
        dst_workload: None,
        dst_service: None,
        bytes_sent: 0,
        bytes_received: 0,
        duration: Default::default(),
        outcome: Ok(()),
    };
    let dst_workload;
    let dst_service;
    let resolved = state.resolve(dst);
    let conn = ctx.metrics.connection_opened(&ConnectionLabels::outbound(
        &state,
        &pod.workload,
        &resolved,
    ));
    let upstream = match resolved {
        Resolved::Workload {
            workload,
            addr,
            service,
        } => {
            dst_workload = workload.uid();
            dst_service = service.map(|s| format!("{}/{}", s.namespace, s.name));
            log.dst_workload = Some(&dst_workload);
            log.dst_service = dst_service.as_deref();
            addr
        }
        Resolved::Passthrough(addr) => addr,
        Resolved::NoEndpoints { service } => {
            log.outcome = Err(format!(
                "service {}/{} has no ready endpoints",
                service.namespace, service.name
            ));
            conn.finish(Transferred::default(), ResponseFlags::Connect);
            log.duration = started.elapsed();
            log.emit();
            return;
        }
        Resolved::UnknownServicePort { service, port } => {
            log.outcome = Err(format!(
                "service {}/{} has no port {port}",
                service.namespace, service.name
            ));
            conn.finish(Transferred::default(), ResponseFlags::Connect);
            log.duration = started.elapsed();
            log.emit();
            return;
        }
    };
    log.upstream = Some(upstream);
    match connect_from(&pod.netns, upstream, None, ctx.mark).await {
        Ok(upstream) => {
            let (moved, result) = relay(client, upstream).await;
            log.bytes_sent = moved.sent;
            log.bytes_received = moved.received;
            log.outcome = result.map_err(|err| format!("relay: {err}"));
            conn.finish(moved, ResponseFlags::None);
        }
        Err(err) => {
            log.outcome = Err(format!("connect {upstream}: {err}"));
            conn.finish(Transferred::default(), ResponseFlags::Connect);
        }
    }
    log.duration = started.elapsed();
    log.emit();
}
