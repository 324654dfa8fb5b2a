//! The same-node fast path: a connection between two pods enrolled on this node, carried
//! without HBONE.
//!
//! The HBONE path would have this agent present the source pod's certificate to itself, verify
//! the destination's, decrypt what it just encrypted and relay it twice. The agent holds both
//! identities, and the bytes never leave the node, so the fast path does the inbound path's work
//! directly and skips the wire:
//!
//! - It requires both pods' certificates, as the tunnel would (no CA, no identity: refused).
//! - It authorizes the connection exactly as the destination's HBONE server would: registered
//!   with [`admission`] as a tunnel from the source pod's address and identity to the address
//!   dialled, decided with the same function, and decided again on every state change, so a
//!   policy change cuts it like any inbound connection.
//! - It connects to the application from inside the destination pod, from the source pod's
//!   address, as the inbound paths do ([`super::connect_to_application`]).
//! - It reports both sides as the two halves of a same-node HBONE connection are reported: the
//!   outbound access-log line and `istio_tcp_*` series (reporter `source`) by the caller, the
//!   inbound ones (reporter `destination`, the tunnel's labels) here, both with
//!   `connection_security_policy="mutual_tls"` (both identities are proven, by the agent that
//!   holds them) and the access log's `fast_path` saying how the bytes went.
//! - The agent relays the bytes itself ([`crate::relay`]), without TLS. Only with
//!   `--max-spliced-connections` (off by default: the kernel splice measured slower for bulk
//!   and setup, and it does not bound the memory a fast sender queues) are they spliced in the
//!   kernel ([`crate::redirect::splice`]) and counted there, read into both sides' meters every
//!   second (so `istio_tcp_*` lag the bytes by up to a second while a connection is open; its
//!   last figures are exact when it ends). When a splice is not possible (the node's splice
//!   slots, or the source pod's share of them, are taken; a socket already half-closed; a
//!   kernel that cannot splice) the agent relays: never refused. A connection the splice broke
//!   while it was being made (or whose admission was revoked meanwhile) is reset and counted
//!   `broken`, not `splice`.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use ambit_common::POD_PROXY_PORTS;
use tokio::net::TcpStream;
use tracing::debug;

use super::{
    PodContext, ProxyContext,
    admission::{self, Inbound},
    connect_to_application,
    error::ProxyError,
    inbound_hbone::tunnel_labels,
    record,
};
use crate::{
    limits::BufferShare,
    policy::Refusal,
    proxy::metrics::ConnectionRecorder,
    redirect::splice::{SpliceFailed, Spliced},
    relay::{Meter, Relayed, Transferred, relay_until},
    telemetry::{AccessLog, Direction},
};

/// A connection the outbound path resolved to a pod of this node.
pub struct Hop<'a> {
    /// The client's address on the outbound listener (its pod's address: the kernel bound
    /// the redirected socket to it).
    pub peer: SocketAddr,
    /// The source pod's address of the destination's family: the tunnel's source.
    pub source_ip: IpAddr,
    /// The address and port dialled, resolved to the destination pod (the tunnel's authority).
    pub authority: SocketAddr,
    /// The source pod's outbound series: told of the bytes as they flow.
    pub conn: &'a ConnectionRecorder,
    /// The source pod's outbound access-log line, told how the bytes went.
    pub log: &'a mut AccessLog,
    /// The source pod's share of the relay's read buffers.
    pub buffers: &'a BufferShare,
}

/// Both sides' meters: the fast path's bytes count on the outbound and the inbound series, as
/// the two relays of a same-node HBONE connection count them.
struct BothSides<'a>(&'a ConnectionRecorder, &'a ConnectionRecorder);

impl Meter for BothSides<'_> {
    fn sent(&self, n: u64) {
        self.0.add_sent(n);
        self.1.add_sent(n);
    }

    fn received(&self, n: u64) {
        self.0.add_received(n);
        self.1.add_received(n);
    }
}

/// How the fast path carries a connection's bytes.
enum Carried {
    /// In the kernel.
    Spliced(Spliced),
    /// By the agent (the splice was declined): the client's and the upstream socket.
    Relayed(TcpStream, TcpStream),
    /// Nowhere: the splice broke the connection while it was being made.
    Broken(std::io::Error),
    /// Nowhere: the admission was revoked while the splice was being made.
    Revoked(Refusal),
}

impl Carried {
    /// The access log's `fast_path` and the metric's `carried`.
    fn label(&self) -> &'static str {
        match self {
            Self::Spliced(_) => "splice",
            Self::Relayed(..) => "relay",
            Self::Broken(_) | Self::Revoked(_) => "broken",
        }
    }
}

/// Carries `client` from `source` to `dest`, both enrolled on this node, as said above.
/// Records the inbound side; returns what the outbound side records.
pub async fn forward(
    ctx: &ProxyContext,
    source: &PodContext,
    dest: &Arc<PodContext>,
    client: TcpStream,
    hop: Hop<'_>,
) -> (Transferred, Result<(), ProxyError>) {
    let failed = |err| (Transferred::default(), Err(err));
    // Both identities, as the tunnel's two ends would present them.
    for id in [&source.identity, &dest.identity] {
        if let Err(why) = ctx.certificate(id).await {
            return failed(ProxyError::NoCertificate(why));
        }
    }
    let tunnel_source = SocketAddr::new(hop.source_ip, hop.peer.port());
    let inbound = Arc::new(Inbound::hbone(
        hop.source_ip,
        source.identity.clone(),
        hop.authority,
        dest.workload.clone(),
    ));
    // Registered before the state is read: see `admission`.
    let mut admission = ctx.connections.register(inbound.clone());
    let state = ctx.state.borrow().clone();
    let workload = state
        .workload_by_ip(hop.authority.ip())
        .cloned()
        .unwrap_or_else(|| dest.workload.clone());
    let labels = tunnel_labels(
        &state,
        tunnel_source,
        &source.identity,
        Some(hop.authority),
        dest,
    );
    let in_conn = ctx.metrics.connection_opened(&labels);
    let mut in_log = AccessLog::new(Direction::Inbound, tunnel_source, hop.authority);
    in_log.mtls = true;
    in_log.src_workload = state.workload_by_ip(hop.source_ip).map(|w| w.uid());
    in_log.src_principal = Some(source.identity.to_string());
    in_log.dst_workload = Some(dest.workload.uid());
    in_log.dst_principal = Some(dest.identity.to_string());
    in_log.upstream = Some(hop.authority);

    let decided = if POD_PROXY_PORTS.contains(&hop.authority.port()) {
        // As the HBONE server: the proxy's own ports are never forwarded to (they would loop).
        let port = hop.authority.port();
        Err((
            ProxyError::ProxyPort(port),
            Refusal {
                reason: "proxy_port",
                message: format!("port {port} belongs to the proxy"),
            },
        ))
    } else {
        admission::check(&state, &inbound, &workload)
            .map_err(|refusal| (ProxyError::Refused(refusal.clone()), refusal))
    };
    let (moved, inbound_result, outbound_result) = match decided {
        Err((inbound_err, refusal)) => (
            Transferred::default(),
            Err(inbound_err),
            Err(ProxyError::DestinationRefused(refusal)),
        ),
        Ok(()) => {
            // From the source pod's address, as the inbound path connects.
            match connect_to_application(&ctx.redirector, &dest.netns, hop.authority, tunnel_source)
                .await
            {
                Err(source) => {
                    let again = std::io::Error::new(source.kind(), source.to_string());
                    let addr = hop.authority;
                    (
                        Transferred::default(),
                        Err(ProxyError::Connect { addr, source }),
                        Err(ProxyError::Connect {
                            addr,
                            source: again,
                        }),
                    )
                }
                Ok(upstream) => {
                    let pod = source.workload.ips.first().copied();
                    let carried = match ctx.redirector.splicer() {
                        // Asked right before the first byte flows and again after the queued
                        // ones went through: a deny that landed meanwhile cuts it.
                        Some(splicer) => match splicer.splice(
                            pod.unwrap_or(hop.source_ip),
                            client,
                            upstream,
                            || admission.try_revoked(),
                        ) {
                            Ok(spliced) => Carried::Spliced(spliced),
                            Err(SpliceFailed::Declined(declined)) => {
                                debug!(
                                    reason = declined.reason,
                                    detail = %declined.detail,
                                    "same-node connection relayed by the agent, not spliced"
                                );
                                ctx.metrics.splice_declined(declined.reason);
                                Carried::Relayed(declined.client, declined.upstream)
                            }
                            Err(SpliceFailed::Broken(err)) => Carried::Broken(err),
                            Err(SpliceFailed::Revoked(refusal)) => Carried::Revoked(refusal),
                        },
                        // No splice asked for (the default), or the kernel cannot splice: the
                        // fast path relays, which is no decline.
                        None => Carried::Relayed(client, upstream),
                    };
                    let how = carried.label();
                    ctx.metrics.fast_path(how);
                    hop.log.fast_path = Some(how);
                    in_log.fast_path = Some(how);
                    let sides = BothSides(hop.conn, &in_conn);
                    let revoked = admission.revoked();
                    let (moved, ended) = match carried {
                        Carried::Spliced(spliced) => spliced.relay_until(&sides, revoked).await,
                        Carried::Relayed(client, upstream) => {
                            relay_until(client, upstream, &sides, hop.buffers, revoked).await
                        }
                        Carried::Broken(err) => {
                            (Transferred::default(), Relayed::Finished(Err(err)))
                        }
                        Carried::Revoked(refusal) => {
                            (Transferred::default(), Relayed::Stopped(refusal))
                        }
                    };
                    let (inbound_result, outbound_result) = match ended {
                        Relayed::Finished(Ok(())) => (Ok(()), Ok(())),
                        Relayed::Finished(Err(err)) => {
                            let again = std::io::Error::new(err.kind(), err.to_string());
                            (Err(ProxyError::Relay(err)), Err(ProxyError::Relay(again)))
                        }
                        // The inbound side closed it, as the destination's agent resets a
                        // tunnel; the source side sees its connection end.
                        Relayed::Stopped(refusal) => {
                            let reset = std::io::Error::new(
                                std::io::ErrorKind::ConnectionReset,
                                format!(
                                    "closed by the destination after a policy change: {}",
                                    refusal.message
                                ),
                            );
                            (
                                Err(ProxyError::ClosedByPolicy(refusal)),
                                Err(ProxyError::Relay(reset)),
                            )
                        }
                    };
                    (moved, inbound_result, outbound_result)
                }
            }
        }
    };
    record(&ctx.metrics, in_conn, in_log, moved, inbound_result);
    (moved, outbound_result)
}
