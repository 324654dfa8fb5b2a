//! Istio's standard metric label values, shared by every proxy Ambit runs (the node proxy's TCP
//! metrics, the waypoint's request metrics): which side reports, how a connection ended, whether
//! it was mutual TLS, and what an unknown value reads. A workload's canonical service and
//! revision and a service's hostname come from the state model (`state::Workload`,
//! `state::Service`). The values are ztunnel's, so that Istio's dashboards and Kiali read
//! Ambit's metrics unchanged.
/// The value of a label Ambit cannot fill, as ztunnel writes it.
pub const UNKNOWN: &str = "unknown";

/// The cluster id of every workload: Istio's default cluster name, which Kiali also assumes for
/// a single cluster. Ambit has no multi-cluster notion yet.
pub const CLUSTER_ID: &str = "Kubernetes";

/// Which side of a connection reported it: Istio counts each connection once per side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The source pod's agent (the outbound path).
    Source,
    /// The destination pod's agent (the inbound paths).
    Destination,
    /// A waypoint, for the requests it proxies.
    Waypoint,
}

impl Reporter {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
            Reporter::Waypoint => "waypoint",
        }
    }
}

/// Whether the connection was carried over mutual TLS (`connection_security_policy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SecurityPolicy {
    /// Plaintext, or not known to be mutual TLS.
    #[default]
    Unknown,
    /// Carried in an HBONE tunnel with both identities verified.
    MutualTls,
}

impl SecurityPolicy {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityPolicy::Unknown => "unknown",
            SecurityPolicy::MutualTls => "mutual_tls",
        }
    }
}

/// How a connection ended, as ztunnel's `response_flags` label says it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ResponseFlags {
    /// Nothing special (`-`), including a relay that ended with an error after connecting.
    #[default]
    None,
    /// Refused by an authorization policy (`DENY`).
    Deny,
    /// No upstream connection could be established (`CONNECT`): connect failed, or a service
    /// had no ready endpoint or no such port.
    Connect,
}

impl ResponseFlags {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::Deny => "DENY",
            ResponseFlags::Connect => "CONNECT",
        }
    }
}
