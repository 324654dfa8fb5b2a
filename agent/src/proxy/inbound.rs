//! The inbound plaintext path: connections from outside a pod that sk_lookup steered to its
//! 15006 listener. The accepted socket's local address is the address the client dialled.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use super::{PodContext, ProxyContext, Transferred, connect_from, relay};
use crate::telemetry::{AccessLog, ConnectionLabels, Direction, ResponseFlags};

/// Accepts steered connections of one pod until the task is aborted (un-enrolment).
pub async fn serve(listener: TcpListener, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                tokio::spawn(handle(client, peer, pod.clone(), ctx.clone()));
            }
            Err(err) => {
                warn!(pod = %pod.workload.uid(), %err, "inbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(client: TcpStream, peer: SocketAddr, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) {
    let started = Instant::now();
    let dst_workload = pod.workload.uid();
    let state = ctx.state.borrow().clone();
    let src = state.workload_by_ip(peer.ip());
    let src_workload = src.map(|w| w.uid());
    let dst = match client.local_addr() {
        Ok(addr) => addr,
        Err(err) => {
            warn!(pod = %dst_workload, %peer, %err, "inbound connection without local address");
            return;
        }
    };
    let mut log = AccessLog {
        direction: Direction::InboundPlaintext,
        src: peer,
        src_workload: src_workload.as_deref(),
        dst,
        upstream: Some(dst),
        dst_workload: Some(&dst_workload),
        dst_service: None,
        bytes_sent: 0,
        bytes_received: 0,
        duration: Default::default(),
        outcome: Ok(()),
    };
    let conn = ctx
        .metrics
        .connection_opened(&ConnectionLabels::inbound_plaintext(
            &state,
            src.map(|w| &**w),
            &pod.workload,
            dst.port(),
        ));
    // From the pod's own address to itself: the kernel routes it over loopback to the
    // application, and sk_lookup lets it through (local == remote) instead of steering it back.
    let bind = SocketAddr::new(dst.ip(), 0);
    match connect_from(&pod.netns, dst, Some(bind), ctx.mark).await {
        Ok(upstream) => {
            let (moved, result) = relay(client, upstream).await;
            log.bytes_sent = moved.sent;
            log.bytes_received = moved.received;
            log.outcome = result.map_err(|err| format!("relay: {err}"));
            conn.finish(moved, ResponseFlags::None);
        }
        Err(err) => {
            log.outcome = Err(format!("connect {dst}: {err}"));
            conn.finish(Transferred::default(), ResponseFlags::Connect);
        }
    }
    log.duration = started.elapsed();
    log.emit();
}
