//! Why a proxied connection did not go (all) the way: one error type for every path, which
//! knows how Istio's metrics flag it and under which reason the agent counts a refusal of its
//! own. Each path ends in one place that records it (access log, `istio_tcp_*`,
//! `ambit_connections_denied_total`), whatever went wrong.
use std::net::{IpAddr, SocketAddr};

use crate::{
    hbone::HboneError, policy::Refusal, state::WaypointRef, telemetry::istio::ResponseFlags,
};

/// Why a connection failed or was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A connection on a pod's outbound listener that the programs did not redirect (someone
    /// dialled 127.0.0.1:15001), or whose pod was over its share of handshakes in flight.
    #[error("no original destination recorded")]
    NoOriginalDestination,
    /// A service bound to a waypoint whose waypoint is missing or has no ready pod: reaching
    /// the endpoints directly would skip the policy the waypoint exists to apply.
    #[error("service {service} must go through waypoint {waypoint}, which {}", if *.exists { "has no ready endpoint" } else { "does not exist" })]
    NoWaypoint {
        /// The service dialled, `namespace/name`.
        service: String,
        /// Its waypoint.
        waypoint: WaypointRef,
        /// Whether the waypoint's service exists (without a ready pod).
        exists: bool,
    },
    /// A service with a selector that selects no ready endpoint.
    #[error("service {0} has no ready endpoints")]
    NoEndpoints(String),
    /// A service dialled on a port it does not have.
    #[error("service {service} has no port {port}")]
    UnknownServicePort {
        /// The service, `namespace/name`.
        service: String,
        /// The port dialled.
        port: u16,
    },
    /// The source pod has no address of the destination's family to tunnel from.
    #[error("{workload} has no address of {peer}'s family")]
    NoSourceAddress {
        /// The source pod, `namespace/name`.
        workload: String,
        /// The address it would tunnel to.
        peer: IpAddr,
    },
    /// The source pod's certificate is not there (no CA, or not fetched in time).
    #[error("{0}")]
    NoCertificate(String),
    /// The upstream TCP connection failed.
    #[error("connect {addr}: {source}")]
    Connect {
        /// Where to.
        addr: SocketAddr,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// The destination's agent refused the tunnel (its authorization policy).
    #[error("denied by the destination's authorization policy ({0})")]
    DeniedByDestination(HboneError),
    /// The destination refused it: on the same-node fast path the agent decides for the
    /// destination as its HBONE server would, and records the refusal on the inbound side.
    #[error("denied by the destination's authorization policy ({0})")]
    DestinationRefused(Refusal),
    /// The tunnel could not be opened.
    #[error("HBONE: {0}")]
    Hbone(HboneError),
    /// Plaintext to one of the proxy's own ports, which would loop back into the proxy.
    #[error("port {0} belongs to the proxy")]
    ProxyPort(u16),
    /// Refused at accept by peer authentication or an authorization policy.
    #[error("{0}")]
    Refused(Refusal),
    /// Closed while open because a change no longer allows it.
    #[error("closed after a policy change: {0}")]
    ClosedByPolicy(Refusal),
    /// The relay ended with an error.
    #[error("relay: {0}")]
    Relay(std::io::Error),
}

impl ProxyError {
    /// The tunnel error `err`, told apart by whether the destination refused it.
    pub fn hbone(err: HboneError) -> Self {
        match err.status() {
            Some(status) if status == http::StatusCode::UNAUTHORIZED => {
                Self::DeniedByDestination(err)
            }
            _ => Self::Hbone(err),
        }
    }

    /// The `response_flags` of the connection's closed series, as ztunnel sets them.
    pub fn response_flags(&self) -> ResponseFlags {
        match self {
            Self::DeniedByDestination(_)
            | Self::DestinationRefused(_)
            | Self::ProxyPort(_)
            | Self::Refused(_) => ResponseFlags::Deny,
            // It did connect: `-`, even when a policy change closed it (as ztunnel reports a
            // late rejection).
            Self::Relay(_) | Self::ClosedByPolicy(_) => ResponseFlags::None,
            Self::NoOriginalDestination
            | Self::NoWaypoint { .. }
            | Self::NoEndpoints(_)
            | Self::UnknownServicePort { .. }
            | Self::NoSourceAddress { .. }
            | Self::NoCertificate(_)
            | Self::Connect { .. }
            | Self::Hbone(_) => ResponseFlags::Connect,
        }
    }

    /// The `reason` under which `ambit_connections_denied_total` counts it, for the refusals
    /// this agent makes itself.
    pub fn denial_reason(&self) -> Option<&'static str> {
        match self {
            Self::NoOriginalDestination => Some("no_original_destination"),
            Self::NoWaypoint { .. } => Some("no_waypoint"),
            Self::ProxyPort(_) => Some("proxy_port"),
            Self::Refused(refusal) => Some(refusal.reason),
            _ => None,
        }
    }

    /// The `reason` under which `ambit_connections_closed_by_policy_total` counts it.
    pub fn closed_by_policy_reason(&self) -> Option<&'static str> {
        match self {
            Self::ClosedByPolicy(refusal) => Some(refusal.reason),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_knows_its_flags_and_reasons() {
        let refusal = || Refusal {
            reason: "plaintext_strict",
            message: "STRICT".into(),
        };
        let waypoint = ProxyError::NoWaypoint {
            service: "shop/web".into(),
            waypoint: WaypointRef {
                namespace: "infra".into(),
                name: "wp".into(),
            },
            exists: false,
        };
        assert_eq!(waypoint.response_flags(), ResponseFlags::Connect);
        assert_eq!(waypoint.denial_reason(), Some("no_waypoint"));
        assert_eq!(
            waypoint.to_string(),
            "service shop/web must go through waypoint infra/wp, which does not exist"
        );
        let refused = ProxyError::Refused(refusal());
        assert_eq!(refused.response_flags(), ResponseFlags::Deny);
        assert_eq!(refused.denial_reason(), Some("plaintext_strict"));
        let closed = ProxyError::ClosedByPolicy(refusal());
        assert_eq!(closed.response_flags(), ResponseFlags::None);
        assert_eq!(closed.denial_reason(), None);
        assert_eq!(closed.closed_by_policy_reason(), Some("plaintext_strict"));
        let connect = ProxyError::Connect {
            addr: "10.0.0.1:80".parse().unwrap(),
            source: std::io::ErrorKind::ConnectionRefused.into(),
        };
        assert_eq!(connect.response_flags(), ResponseFlags::Connect);
        assert_eq!(connect.denial_reason(), None);
        assert_eq!(
            ProxyError::ProxyPort(15001).denial_reason(),
            Some("proxy_port")
        );
    }
}
