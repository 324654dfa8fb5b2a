//! The outbound path: connections the kernel redirected from a pod to its 127.0.0.1:15001.
//!
//! A destination in the mesh (an enrolled workload, directly or behind a service VIP) is reached
//! through an HBONE tunnel to its pod's 15008, presenting the source pod's certificate and
//! accepting only the destination's identity. Anything else is passed through as plain TCP, as
//! ambient does for destinations outside the mesh.
use std::{net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use super::{
    PodContext, ProxyContext, Transferred, connect_from,
    hbone::{HBONE_PORT, HboneError, PoolKey, TunnelRequest, headers::Baggage},
    relay,
};
use crate::{
    state::{Resolved, Workload},
    telemetry::{AccessLog, ConnectionLabels, Direction, ResponseFlags, SecurityPolicy},
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
    let Some(dst) = ctx
        .redirector
        .original_destination(pod.netns.cookie(), peer)
    else {
        // Not redirected by our programs (someone dialled 127.0.0.1:15001 directly), or the
        // client is already gone: there is nowhere legitimate to send it.
        warn!(pod = %pod.workload.uid(), %peer, "no original destination recorded; closing");
        return;
    };
    let state = ctx.state.borrow().clone();
    let mut log = AccessLog::new(Direction::Outbound, peer, dst);
    log.src_workload = Some(pod.workload.uid());
    let resolved = state.resolve(dst);
    let mut labels = ConnectionLabels::outbound(&state, &pod.workload, &resolved);
    let (upstream, destination) = match resolved {
        Resolved::Workload {
            workload,
            addr,
            service,
        } => {
            log.dst_workload = Some(workload.uid());
            log.dst_service = service.map(|s| format!("{}/{}", s.namespace, s.name));
            (addr, workload.enrolled.then_some(workload))
        }
        Resolved::Passthrough(addr) => (addr, None),
        Resolved::NoEndpoints { service } => {
            let why = format!(
                "service {}/{} has no ready endpoints",
                service.namespace, service.name
            );
            return refuse(&ctx, &labels, log, why);
        }
        Resolved::UnknownServicePort { service, port } => {
            let why = format!(
                "service {}/{} has no port {port}",
                service.namespace, service.name
            );
            return refuse(&ctx, &labels, log, why);
        }
    };
    log.upstream = Some(upstream);
    let Some(destination) = destination else {
        // Outside the mesh: plain TCP from the pod's own namespace and address.
        let conn = ctx.metrics.connection_opened(&labels);
        match connect_from(&pod.netns, upstream, None, ctx.mark).await {
            Ok(upstream) => {
                let (moved, result) = relay(client, upstream).await;
                finish(&mut log, moved, result);
                conn.finish(moved, ResponseFlags::None);
            }
            Err(err) => {
                log.outcome = Err(format!("connect {upstream}: {err}"));
                conn.finish(Transferred::default(), ResponseFlags::Connect);
            }
        }
        log.emit();
        return;
    };

    let dst_id = state.identity_of(&destination);
    log.mtls = true;
    log.src_principal = Some(pod.identity.to_string());
    log.dst_principal = Some(dst_id.to_string());
    labels = labels
        .with_source_principal(Some(&pod.identity))
        .with_destination_principal(Some(&dst_id))
        .with_security_policy(SecurityPolicy::MutualTls);
    let conn = ctx.metrics.connection_opened(&labels);
    let Some(source_ip) = pod.address_for(upstream.ip()) else {
        log.outcome = Err(format!(
            "{} has no address of {upstream}'s family",
            pod.workload.uid()
        ));
        conn.finish(Transferred::default(), ResponseFlags::Connect);
        log.emit();
        return;
    };
    let certificate = match ctx.certificate(&pod.identity).await {
        Ok(cert) => cert,
        Err(why) => {
            log.outcome = Err(why);
            conn.finish(Transferred::default(), ResponseFlags::Connect);
            log.emit();
            return;
        }
    };
    let key = PoolKey::new(
        pod.identity.clone(),
        source_ip,
        SocketAddr::new(upstream.ip(), HBONE_PORT),
        vec![dst_id],
    );
    let mut request = TunnelRequest::new(SocketAddr::new(source_ip, peer.port()), upstream);
    request.baggage = baggage(&pod.workload);
    request.service_host = log
        .dst_service
        .as_ref()
        .and_then(|uid| uid.split_once('/'))
        .map(|(ns, name)| format!("{name}.{ns}.svc.cluster.local"));
    match pod.pool.open(&key, &certificate, &request).await {
        Ok(tunnel) => {
            let (moved, result) = relay(client, tunnel).await;
            finish(&mut log, moved, result);
            conn.finish(moved, ResponseFlags::None);
        }
        Err(err) => {
            let flags = match err.status() {
                Some(status) if status == http::StatusCode::UNAUTHORIZED => ResponseFlags::Deny,
                _ => ResponseFlags::Connect,
            };
            log.outcome = Err(describe(&err));
            conn.finish(Transferred::default(), flags);
        }
    }
    log.emit();
}

fn finish(log: &mut AccessLog, moved: Transferred, result: std::io::Result<()>) {
    log.bytes_sent = moved.sent;
    log.bytes_received = moved.received;
    log.outcome = result.map_err(|err| format!("relay: {err}"));
}

/// Closes a connection that has nowhere to go, counting and logging why.
fn refuse(ctx: &ProxyContext, labels: &ConnectionLabels, mut log: AccessLog, why: String) {
    ctx.metrics
        .connection_opened(labels)
        .finish(Transferred::default(), ResponseFlags::Connect);
    log.outcome = Err(why);
    log.emit();
}

fn describe(err: &HboneError) -> String {
    match err.status() {
        Some(status) if status == http::StatusCode::UNAUTHORIZED => {
            format!("denied by the destination's authorization policy ({err})")
        }
        _ => format!("HBONE: {err}"),
    }
}

/// The source workload's metadata as ztunnel sends it in `baggage`.
fn baggage(workload: &Workload) -> Baggage {
    let label = |keys: &[&str]| keys.iter().find_map(|k| workload.labels.get(*k).cloned());
    Baggage {
        cluster: Some("Kubernetes".into()),
        namespace: Some(workload.namespace.clone()),
        workload_kind: Some("pod".into()),
        workload_name: Some(workload.name.clone()),
        service_name: label(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ])
        .or_else(|| Some(workload.name.clone())),
        service_version: label(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .or_else(|| Some("latest".into())),
        region: None,
        zone: None,
    }
}
