//! Istio's standard metric labels, shared by every proxy Ambit runs (the node proxy's TCP
//! metrics, the waypoint's request metrics): how a workload is named (canonical service and
//! revision), which side reports, how a connection ended. The values are ztunnel's, so that
//! Istio's dashboards and Kiali read Ambit's metrics unchanged.
use std::sync::Arc;

use crate::state::{MeshState, Service, Workload};

/// The value of a label Ambit cannot fill, as ztunnel writes it.
pub const UNKNOWN: &str = "unknown";

/// The cluster id of every workload: Istio's default cluster name, which Kiali also assumes for
/// a single cluster. Ambit has no multi-cluster notion yet.
pub const CLUSTER_ID: &str = "Kubernetes";

/// The DNS domain of service hostnames (`<name>.<namespace>.svc.<domain>`): Kubernetes' default.
/// Istio's `destination_service` label is the service's hostname.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// The canonical revision of a workload without a revision label, as in Istio.
const DEFAULT_REVISION: &str = "latest";

/// Labels naming a workload's canonical service, most specific first (Istio's order).
const CANONICAL_NAME_LABELS: [&str; 3] = [
    "service.istio.io/canonical-name",
    "app.kubernetes.io/name",
    "app",
];

/// Labels naming a workload's canonical revision, most specific first (Istio's order).
const CANONICAL_REVISION_LABELS: [&str; 3] = [
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
];

/// Which side of a connection reported it: Istio counts each connection once per side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The source pod's agent (the outbound path).
    Source,
    /// The destination pod's agent (the inbound paths).
    Destination,
}

impl Reporter {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
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

/// A workload's name, namespace, canonical service and revision, as the labels use them.
pub struct WorkloadLabels {
    /// The workload's name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Its canonical service: Istio's canonical-name labels, else its name.
    pub canonical_service: String,
    /// Its canonical revision: Istio's canonical-revision labels, else `latest`.
    pub canonical_revision: String,
}

impl WorkloadLabels {
    /// The labels of `workload`; an empty label value counts as absent.
    pub fn of(workload: &Workload) -> Self {
        let first_label = |keys: &[&str]| {
            keys.iter()
                .find_map(|key| workload.labels.get(*key).filter(|v| !v.is_empty()))
                .cloned()
        };
        Self {
            name: workload.name.clone(),
            namespace: workload.namespace.clone(),
            canonical_service: first_label(&CANONICAL_NAME_LABELS)
                .unwrap_or_else(|| workload.name.clone()),
            canonical_revision: first_label(&CANONICAL_REVISION_LABELS)
                .unwrap_or_else(|| DEFAULT_REVISION.to_string()),
        }
    }
}

/// A service's hostname, the value of `destination_service`.
pub fn service_hostname(service: &Service) -> String {
    format!(
        "{}.{}.svc.{CLUSTER_DOMAIN}",
        service.name, service.namespace
    )
}

/// The service an inbound connection to `workload` on `port` most likely came through: the first
/// service selecting the workload with a target port equal to `port` (ztunnel's best guess; the
/// VIP the client dialled is not known on the destination side).
pub fn guess_inbound_service<'a>(
    state: &'a MeshState,
    workload: &Workload,
    port: u16,
) -> Option<&'a Arc<Service>> {
    state.services().iter().find(|service| {
        service.selects(workload) && service.ports.iter().any(|p| p.target_port == port)
    })
}
