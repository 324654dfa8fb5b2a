//! Prometheus metrics: Istio's TCP metrics, named and labelled as ztunnel emits them so that
//! Istio's dashboards and Kiali work unchanged, and the agent's own health (`ambit_*`).
//!
//! The proxy opens a [`ConnectionRecorder`] per connection ([`Metrics::connection_opened`]) and
//! finishes it where the access log is written. Values the kernel or other parts of the agent
//! already keep (eBPF counters, map occupancy, enrolment, configuration generation) are read at
//! scrape time by a collector, never polled, so a scrape always sees the current figures and an
//! idle agent does no work for metrics.
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::SystemTime,
};

use prometheus::{
    GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
    core::{Collector, Desc},
    proto::MetricFamily,
};
use tokio::sync::watch;

use crate::{
    config::ConfigStatus,
    identity::{CertificateManager, SpiffeId},
    inpod::EnrolmentStatus,
    limits::Limits,
    proxy::Transferred,
    redirect::{RedirectStats, Redirector},
    state::{MeshState, Resolved, Service, Workload},
};

/// The content type of the text exposition format, which every Prometheus version parses.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

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

/// The label names of the `istio_tcp_*` series, in ztunnel's order. No port label: a label per
/// port would multiply the series by every port clients use.
pub const TCP_LABEL_NAMES: [&str; 23] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
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

/// The labels of one connection's `istio_tcp_*` series. Every field not known is
/// [`UNKNOWN`], as in ztunnel; `request_protocol` is always `tcp` (the agent is an L4 proxy).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConnectionLabels {
    /// Which side reports.
    pub reporter: Reporter,
    /// The source workload's name.
    pub source_workload: String,
    /// The source's canonical service (from its labels, else its name).
    pub source_canonical_service: String,
    /// The source's canonical revision (from its labels, else `latest`).
    pub source_canonical_revision: String,
    /// The source workload's namespace.
    pub source_workload_namespace: String,
    /// The source's SPIFFE ID, only when proven by mutual TLS (ztunnel never guesses it).
    pub source_principal: String,
    /// Same as the canonical service (ztunnel's choice).
    pub source_app: String,
    /// Same as the canonical revision (ztunnel's choice).
    pub source_version: String,
    /// The source's cluster.
    pub source_cluster: String,
    /// The destination service's hostname, `<name>.<namespace>.svc.cluster.local`.
    pub destination_service: String,
    /// The destination service's namespace.
    pub destination_service_namespace: String,
    /// The destination service's name.
    pub destination_service_name: String,
    /// The destination workload's name.
    pub destination_workload: String,
    /// The destination's canonical service.
    pub destination_canonical_service: String,
    /// The destination's canonical revision.
    pub destination_canonical_revision: String,
    /// The destination workload's namespace.
    pub destination_workload_namespace: String,
    /// The destination's SPIFFE ID.
    pub destination_principal: String,
    /// Same as the destination's canonical service.
    pub destination_app: String,
    /// Same as the destination's canonical revision.
    pub destination_version: String,
    /// The destination's cluster.
    pub destination_cluster: String,
    /// How the connection ended; set by [`ConnectionRecorder::finish`] for the closed series.
    pub response_flags: ResponseFlags,
    /// Mutual TLS or not.
    pub connection_security_policy: SecurityPolicy,
}

/// A workload's name, namespace, canonical service and revision, as the labels use them.
struct WorkloadLabels {
    name: String,
    namespace: String,
    canonical_service: String,
    canonical_revision: String,
}

impl WorkloadLabels {
    fn of(workload: &Workload) -> Self {
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

/// The identity `workload` runs as in `state`'s trust domain.
fn workload_identity(state: &MeshState, workload: &Workload) -> SpiffeId {
    SpiffeId::new(
        state.trust_domain(),
        &workload.namespace,
        &workload.service_account,
    )
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

impl ConnectionLabels {
    /// Labels with everything unknown, no response flag, not mutual TLS.
    pub fn new(reporter: Reporter) -> Self {
        let unknown = || UNKNOWN.to_string();
        Self {
            reporter,
            source_workload: unknown(),
            source_canonical_service: unknown(),
            source_canonical_revision: unknown(),
            source_workload_namespace: unknown(),
            source_principal: unknown(),
            source_app: unknown(),
            source_version: unknown(),
            source_cluster: unknown(),
            destination_service: unknown(),
            destination_service_namespace: unknown(),
            destination_service_name: unknown(),
            destination_workload: unknown(),
            destination_canonical_service: unknown(),
            destination_canonical_revision: unknown(),
            destination_workload_namespace: unknown(),
            destination_principal: unknown(),
            destination_app: unknown(),
            destination_version: unknown(),
            destination_cluster: unknown(),
            response_flags: ResponseFlags::None,
            connection_security_policy: SecurityPolicy::Unknown,
        }
    }

    /// The outbound path's labels: reported by the source, from `source` to wherever `resolved`
    /// sends the connection (a passthrough destination stays unknown). The destination
    /// principal is the identity the destination workload runs as in `state`'s trust domain, as
    /// ztunnel reports it; the source principal stays unknown until mutual TLS proves it.
    pub fn outbound(state: &MeshState, source: &Workload, resolved: &Resolved) -> Self {
        let labels = Self::new(Reporter::Source).with_source(Some(source));
        match resolved {
            Resolved::Workload {
                workload, service, ..
            } => labels
                .with_destination(Some(workload))
                .with_destination_principal(Some(&workload_identity(state, workload)))
                .with_destination_service(service.as_deref()),
            // As ztunnel: the waypoint is the destination workload, the service dialled the
            // destination service.
            Resolved::Waypoint {
                workload, service, ..
            } => labels
                .with_destination(Some(workload))
                .with_destination_principal(Some(&workload_identity(state, workload)))
                .with_destination_service(Some(service)),
            Resolved::NoEndpoints { service }
            | Resolved::UnknownServicePort { service, .. }
            | Resolved::NoWaypoint { service, .. }
            | Resolved::OutsideMesh { service, .. } => {
                labels.with_destination_service(Some(service))
            }
            Resolved::Passthrough(_) => labels,
        }
    }

    /// The inbound plaintext path's labels: reported by the destination, from `source` (looked
    /// up by the client's address, if it is a mesh workload) to `destination` on `port`.
    /// A plaintext source's principal is unknown whatever its address says: nothing proved it.
    pub fn inbound_plaintext(
        state: &MeshState,
        source: Option<&Workload>,
        destination: &Workload,
        port: u16,
    ) -> Self {
        let service = guess_inbound_service(state, destination, port);
        Self::new(Reporter::Destination)
            .with_source(source)
            .with_destination(Some(destination))
            .with_destination_principal(Some(&workload_identity(state, destination)))
            .with_destination_service(service.map(|s| &**s))
    }

    /// Fills the source workload's labels. The principal is left alone: only a verified
    /// identity may fill it ([`Self::with_source_principal`]).
    pub fn with_source(mut self, workload: Option<&Workload>) -> Self {
        let Some(workload) = workload else {
            return self;
        };
        let w = WorkloadLabels::of(workload);
        self.source_workload = w.name;
        self.source_workload_namespace = w.namespace;
        self.source_app = w.canonical_service.clone();
        self.source_canonical_service = w.canonical_service;
        self.source_version = w.canonical_revision.clone();
        self.source_canonical_revision = w.canonical_revision;
        self.source_cluster = CLUSTER_ID.to_string();
        self
    }

    /// Sets the source's SPIFFE ID (the peer certificate's on inbound HBONE, the own one on
    /// outbound HBONE).
    pub fn with_source_principal(mut self, id: Option<&SpiffeId>) -> Self {
        if let Some(id) = id {
            self.source_principal = id.to_string();
        }
        self
    }

    /// Fills the destination workload's labels.
    pub fn with_destination(mut self, workload: Option<&Workload>) -> Self {
        let Some(workload) = workload else {
            return self;
        };
        let w = WorkloadLabels::of(workload);
        self.destination_workload = w.name;
        self.destination_workload_namespace = w.namespace;
        self.destination_app = w.canonical_service.clone();
        self.destination_canonical_service = w.canonical_service;
        self.destination_version = w.canonical_revision.clone();
        self.destination_canonical_revision = w.canonical_revision;
        self.destination_cluster = CLUSTER_ID.to_string();
        self
    }

    /// Sets the destination's SPIFFE ID.
    pub fn with_destination_principal(mut self, id: Option<&SpiffeId>) -> Self {
        if let Some(id) = id {
            self.destination_principal = id.to_string();
        }
        self
    }

    /// Fills the destination service's labels.
    pub fn with_destination_service(mut self, service: Option<&Service>) -> Self {
        let Some(service) = service else {
            return self;
        };
        self.destination_service = service_hostname(service);
        self.destination_service_namespace = service.namespace.clone();
        self.destination_service_name = service.name.clone();
        self
    }

    /// Sets `connection_security_policy`.
    pub fn with_security_policy(mut self, policy: SecurityPolicy) -> Self {
        self.connection_security_policy = policy;
        self
    }

    /// The label values, in the order of [`TCP_LABEL_NAMES`].
    pub fn values(&self) -> [&str; 23] {
        [
            self.reporter.as_str(),
            &self.source_workload,
            &self.source_canonical_service,
            &self.source_canonical_revision,
            &self.source_workload_namespace,
            &self.source_principal,
            &self.source_app,
            &self.source_version,
            &self.source_cluster,
            &self.destination_service,
            &self.destination_service_namespace,
            &self.destination_service_name,
            &self.destination_workload,
            &self.destination_canonical_service,
            &self.destination_canonical_revision,
            &self.destination_workload_namespace,
            &self.destination_principal,
            &self.destination_app,
            &self.destination_version,
            &self.destination_cluster,
            "tcp",
            self.response_flags.as_str(),
            self.connection_security_policy.as_str(),
        ]
    }
}

/// The four `istio_tcp_*` families.
#[derive(Clone)]
struct TcpFamilies {
    opened: IntCounterVec,
    closed: IntCounterVec,
    /// Bytes from the client towards the server (the request direction).
    received: IntCounterVec,
    /// Bytes from the server back to the client (the response direction).
    sent: IntCounterVec,
}

/// One connection's metrics, from open to close.
///
/// Byte directions follow Istio, whose names are from the server's point of view on both
/// reporters: `istio_tcp_received_bytes_total` counts what the client sent (the proxy's
/// [`Transferred::sent`], client → upstream) and `istio_tcp_sent_bytes_total` what it got back
/// ([`Transferred::received`]). The closed counter is incremented exactly once: by
/// [`Self::finish`], or on drop (a task cancelled mid-connection still closes it).
pub struct ConnectionRecorder {
    labels: ConnectionLabels,
    closed: IntCounterVec,
    /// Child of `istio_tcp_received_bytes_total`.
    to_server: IntCounter,
    /// Child of `istio_tcp_sent_bytes_total`.
    to_client: IntCounter,
    /// What [`Self::add_sent`] / [`Self::add_received`] already counted, so that
    /// [`Self::finish`] adds only the rest of the totals.
    counted_sent: AtomicU64,
    counted_received: AtomicU64,
    closed_recorded: AtomicBool,
}

impl ConnectionRecorder {
    /// Counts `n` more bytes from the client to the upstream (the proxy's "sent").
    pub fn add_sent(&self, n: u64) {
        self.counted_sent.fetch_add(n, Ordering::Relaxed);
        self.to_server.inc_by(n);
    }

    /// Counts `n` more bytes from the upstream to the client (the proxy's "received").
    pub fn add_received(&self, n: u64) {
        self.counted_received.fetch_add(n, Ordering::Relaxed);
        self.to_client.inc_by(n);
    }

    /// The connection's labels.
    pub fn labels(&self) -> &ConnectionLabels {
        &self.labels
    }

    /// Ends the connection: `transferred` holds the totals of the whole connection (whatever
    /// [`Self::add_sent`] / [`Self::add_received`] did not count yet is added) and `flags` how it
    /// ended, which labels the closed series (the opened one always has `-`, as in ztunnel).
    pub fn finish(mut self, transferred: Transferred, flags: ResponseFlags) {
        let sent = transferred
            .sent
            .saturating_sub(self.counted_sent.load(Ordering::Relaxed));
        let received = transferred
            .received
            .saturating_sub(self.counted_received.load(Ordering::Relaxed));
        self.add_sent(sent);
        self.add_received(received);
        self.labels.response_flags = flags;
        self.record_closed();
    }

    fn record_closed(&self) {
        if !self.closed_recorded.swap(true, Ordering::Relaxed) {
            self.closed.with_label_values(&self.labels.values()).inc();
        }
    }
}

impl Drop for ConnectionRecorder {
    fn drop(&mut self) {
        self.record_closed();
    }
}

/// Where the health collector reads the kernel side's figures; implemented by [`Redirector`],
/// and by fakes in tests (loading eBPF needs privileges).
pub trait DatapathStats: Send + Sync {
    /// The eBPF programs' event counters.
    fn redirect_stats(&self) -> RedirectStats;
    /// Entries in each pinned map.
    fn map_occupancy(&self) -> Vec<(&'static str, usize)>;
}

impl DatapathStats for Redirector {
    fn redirect_stats(&self) -> RedirectStats {
        self.stats()
    }

    fn map_occupancy(&self) -> Vec<(&'static str, usize)> {
        Redirector::map_occupancy(self)
    }
}

/// What the health collector reads at scrape time; each is attached once the agent has it.
#[derive(Default)]
struct Sources {
    datapath: Option<Arc<dyn DatapathStats>>,
    enrolment: Option<watch::Receiver<EnrolmentStatus>>,
    config: Option<watch::Receiver<ConfigStatus>>,
    certificates: Option<Arc<dyn CertificateStats>>,
    limits: Option<Arc<Limits>>,
}

/// What the metrics read of the certificates held: implemented by the certificate manager.
pub trait CertificateStats: Send + Sync {
    /// Failed CA calls since start.
    fn ca_errors_total(&self) -> u64;
    /// Each held certificate's identity and end of validity.
    fn expiries(&self) -> Vec<(String, SystemTime)>;
}

impl CertificateStats for CertificateManager {
    fn ca_errors_total(&self) -> u64 {
        self.stats().ca_errors_total
    }

    fn expiries(&self) -> Vec<(String, SystemTime)> {
        CertificateManager::expiries(self)
            .into_iter()
            .map(|(id, not_after)| (id.to_string(), not_after))
            .collect()
    }
}

/// The `ambit_*` metrics whose values live elsewhere and are refreshed right before each scrape.
struct HealthCollector {
    /// Also serialises scrapes: a refresh resets and re-adds counters, which two concurrent
    /// scrapes must not interleave.
    sources: Mutex<Sources>,
    enrolled_pods: IntGauge,
    enrolment_failed_pods: IntGauge,
    closed_pods: IntGauge,
    redirected: IntCounterVec,
    excluded: IntCounter,
    map_full: IntCounter,
    pod_quota: IntCounter,
    closed_refused: IntCounter,
    inbound_steered: IntCounter,
    inbound_no_listener: IntCounter,
    inbound_from_node: IntCounter,
    map_entries: IntGaugeVec,
    config_generation: IntGauge,
    /// 0 while the configuration source cannot reach its origin (the API server).
    config_source_up: IntGauge,
    /// `result="ok"` is derived from the generation at scrape time; `result="failed"` is counted
    /// as rejections happen ([`Metrics::config_reload_failed`]).
    config_reloads: IntCounterVec,
    certificate_expiry: GaugeVec,
    ca_errors: IntCounter,
    limits: LimitMetrics,
}

/// The connection limits and what they refused ([`crate::limits`]), and the process's
/// descriptors under the names Prometheus' process collector gives them.
struct LimitMetrics {
    open_fds: IntGauge,
    max_fds: IntGauge,
    limit: IntGaugeVec,
    in_use: IntGaugeVec,
    over_limit: IntCounterVec,
    timed_out: IntCounterVec,
    accept_errors: IntCounterVec,
}

impl LimitMetrics {
    fn new() -> prometheus::Result<Self> {
        Ok(Self {
            open_fds: IntGauge::new("process_open_fds", "Number of open file descriptors")?,
            max_fds: IntGauge::new(
                "process_max_fds",
                "Maximum number of open file descriptors (the soft RLIMIT_NOFILE)",
            )?,
            limit: IntGaugeVec::new(
                Opts::new(
                    "ambit_connection_limit",
                    "The agent's connection limits: proxied connections in all (total) and per \
                     source address (per_source), HBONE handshakes in progress in all and per \
                     source",
                ),
                &["limit"],
            )?,
            in_use: IntGaugeVec::new(
                Opts::new(
                    "ambit_connection_slots_in_use",
                    "Slots held now: proxied connections and HBONE tunnels (connections), HBONE \
                     connections in their handshake (handshakes)",
                ),
                &["slots"],
            )?,
            over_limit: IntCounterVec::new(
                Opts::new(
                    "ambit_connections_over_limit_total",
                    "Connections (and HBONE tunnels) refused because a limit was reached, by \
                     path and limit",
                ),
                &["path", "limit"],
            )?,
            timed_out: IntCounterVec::new(
                Opts::new(
                    "ambit_connections_timed_out_total",
                    "Connections closed because a phase took too long (TLS handshake, HTTP/2 \
                     preface, HTTP request, connection age), by path and phase",
                ),
                &["path", "phase"],
            )?,
            accept_errors: IntCounterVec::new(
                Opts::new(
                    "ambit_accept_errors_total",
                    "Failed accepts (out of descriptors and the like: the listener backs off), \
                     by path",
                ),
                &["path"],
            )?,
        })
    }

    fn parts(&self) -> [&dyn Collector; 7] {
        [
            &self.open_fds,
            &self.max_fds,
            &self.limit,
            &self.in_use,
            &self.over_limit,
            &self.timed_out,
            &self.accept_errors,
        ]
    }

    fn refresh(&self, limits: Option<&Limits>) {
        fn set_counter(counter: &IntCounter, value: u64) {
            counter.reset();
            counter.inc_by(value);
        }
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        if let Ok(open) = crate::limits::open_descriptors() {
            self.open_fds.set(i64::try_from(open).unwrap_or(i64::MAX));
        }
        if let Ok(limit) = crate::limits::nofile_limit() {
            self.max_fds
                .set(i64::try_from(limit.soft).unwrap_or(i64::MAX));
        }
        let Some(limits) = limits else {
            return;
        };
        let settings = limits.settings();
        for (name, value) in [
            ("total", settings.max_connections),
            ("per_source", settings.max_connections_per_source),
            ("handshakes", settings.max_handshakes),
            ("handshakes_per_source", settings.max_handshakes_per_source),
        ] {
            self.limit.with_label_values(&[name]).set(gauge(value));
        }
        let snapshot = limits.snapshot();
        self.in_use
            .with_label_values(&["connections"])
            .set(gauge(snapshot.connections));
        self.in_use
            .with_label_values(&["handshakes"])
            .set(gauge(snapshot.handshakes));
        for (path, limit, n) in snapshot.over_limit {
            set_counter(
                &self
                    .over_limit
                    .with_label_values(&[path.as_str(), limit.as_str()]),
                n,
            );
        }
        for (path, phase, n) in snapshot.timed_out {
            set_counter(
                &self
                    .timed_out
                    .with_label_values(&[path.as_str(), phase.as_str()]),
                n,
            );
        }
        for (path, n) in snapshot.accept_errors {
            set_counter(&self.accept_errors.with_label_values(&[path.as_str()]), n);
        }
    }
}

impl HealthCollector {
    fn new() -> prometheus::Result<Self> {
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "ambit_config_reloads_total",
                "Configurations offered after the first: accepted (result=ok) or rejected, the \
                 previous one staying in force (result=failed)",
            ),
            &["result"],
        )?;
        // Both series exist from the start, so rate() and alerts work before the first event.
        config_reloads.with_label_values(&["ok"]);
        config_reloads.with_label_values(&["failed"]);
        Ok(Self {
            sources: Mutex::new(Sources::default()),
            enrolled_pods: IntGauge::new(
                "ambit_enrolled_pods",
                "Pods of this node whose traffic the agent currently redirects",
            )?,
            enrolment_failed_pods: IntGauge::new(
                "ambit_enrolment_failed_pods",
                "Pods that should be enrolled but are not (retried; see config_dump for why)",
            )?,
            closed_pods: IntGauge::new(
                "ambit_closed_pods",
                "Pods whose enrolment failed with their namespace present: their inbound is \
                 dropped and their outbound refused until it succeeds (see config_dump)",
            )?,
            redirected: IntCounterVec::new(
                Opts::new(
                    "ambit_redirected_connections_total",
                    "Outbound connects rewritten to the agent by the eBPF programs, by family",
                ),
                &["family"],
            )?,
            excluded: IntCounter::new(
                "ambit_redirect_excluded_total",
                "Outbound connects of enrolled pods left alone by a port or network exclusion",
            )?,
            map_full: IntCounter::new(
                "ambit_redirect_map_full_total",
                "Outbound connects refused or closed because an eBPF map or a socket's storage \
                 could not take their original destination",
            )?,
            pod_quota: IntCounter::new(
                "ambit_redirect_pod_quota_total",
                "Outbound connects beyond their pod's share of handshakes in flight (closed)",
            )?,
            closed_refused: IntCounter::new(
                "ambit_redirect_closed_refused_total",
                "Outbound connects of closed pods refused by the eBPF programs",
            )?,
            inbound_steered: IntCounter::new(
                "ambit_inbound_steered_total",
                "Inbound connections steered to a pod's listener by sk_lookup",
            )?,
            inbound_no_listener: IntCounter::new(
                "ambit_inbound_no_listener_total",
                "Inbound connections dropped because the pod's listener was gone (agent down, \
                 pod closed)",
            )?,
            inbound_from_node: IntCounter::new(
                "ambit_inbound_from_node_total",
                "Inbound connections from the node's own addresses (kubelet's probes) let \
                 through to the application",
            )?,
            map_entries: IntGaugeVec::new(
                Opts::new("ambit_ebpf_map_entries", "Entries in each pinned eBPF map"),
                &["map"],
            )?,
            config_generation: IntGauge::new(
                "ambit_config_generation",
                "Configurations accepted since the agent started (the one in force)",
            )?,
            config_source_up: IntGauge::new(
                "ambit_config_source_up",
                "1 while the configuration source reaches where its configuration comes from; 0 \
                 while the Kubernetes API server is unreachable (the last state stays in force)",
            )?,
            config_reloads,
            certificate_expiry: GaugeVec::new(
                Opts::new(
                    "ambit_certificate_expiry_seconds",
                    "Seconds until the certificate held for an identity expires (negative once \
                     expired)",
                ),
                &["identity"],
            )?,
            ca_errors: IntCounter::new(
                "ambit_ca_errors_total",
                "Failed certificate requests to the CA (certificates held stay in use until \
                 expiry)",
            )?,
            limits: LimitMetrics::new()?,
        })
    }

    fn parts(&self) -> Vec<&dyn Collector> {
        let mut parts: Vec<&dyn Collector> = vec![
            &self.enrolled_pods,
            &self.enrolment_failed_pods,
            &self.closed_pods,
            &self.redirected,
            &self.excluded,
            &self.map_full,
            &self.pod_quota,
            &self.closed_refused,
            &self.inbound_steered,
            &self.inbound_no_listener,
            &self.inbound_from_node,
            &self.map_entries,
            &self.config_generation,
            &self.config_source_up,
            &self.config_reloads,
            &self.certificate_expiry,
            &self.ca_errors,
        ];
        parts.extend(self.limits.parts());
        parts
    }

    /// Copies the current figures of every attached source into the metrics.
    fn refresh(&self, sources: &Sources) {
        fn set_counter(counter: &IntCounter, value: u64) {
            counter.reset();
            counter.inc_by(value);
        }
        if let Some(datapath) = &sources.datapath {
            let stats = datapath.redirect_stats();
            set_counter(
                &self.redirected.with_label_values(&["ipv4"]),
                stats.redirected_v4,
            );
            set_counter(
                &self.redirected.with_label_values(&["ipv6"]),
                stats.redirected_v6,
            );
            set_counter(&self.excluded, stats.excluded);
            set_counter(&self.map_full, stats.map_full);
            set_counter(&self.pod_quota, stats.pod_quota);
            set_counter(&self.closed_refused, stats.closed_refused);
            set_counter(&self.inbound_steered, stats.inbound_steered);
            set_counter(&self.inbound_no_listener, stats.inbound_no_listener);
            set_counter(&self.inbound_from_node, stats.inbound_from_node);
            for (map, entries) in datapath.map_occupancy() {
                self.map_entries
                    .with_label_values(&[map])
                    .set(i64::try_from(entries).unwrap_or(i64::MAX));
            }
        }
        if let Some(enrolment) = &sources.enrolment {
            let status = enrolment.borrow();
            self.enrolled_pods.set(status.enrolled.len() as i64);
            self.enrolment_failed_pods.set(status.failed.len() as i64);
            self.closed_pods.set(status.closed.len() as i64);
        }
        if let Some(config) = &sources.config {
            let (generation, up) = {
                let status = config.borrow();
                (status.generation, status.unreachable_since.is_none())
            };
            self.config_generation
                .set(i64::try_from(generation).unwrap_or(i64::MAX));
            self.config_source_up.set(i64::from(up));
            set_counter(
                &self.config_reloads.with_label_values(&["ok"]),
                generation.saturating_sub(1),
            );
        }
        // Identities whose certificate was dropped are gone: rebuild the series.
        self.certificate_expiry.reset();
        self.limits.refresh(sources.limits.as_deref());
        if let Some(certs) = &sources.certificates {
            set_counter(&self.ca_errors, certs.ca_errors_total());
            let now = SystemTime::now();
            for (identity, not_after) in certs.expiries() {
                let remaining = match not_after.duration_since(now) {
                    Ok(left) => left.as_secs_f64(),
                    Err(past) => -past.duration().as_secs_f64(),
                };
                self.certificate_expiry
                    .with_label_values(&[identity.as_str()])
                    .set(remaining.round());
            }
        }
    }
}

/// Registers the shared collector: the registry wants a box it owns.
struct SharedHealth(Arc<HealthCollector>);

impl Collector for SharedHealth {
    fn desc(&self) -> Vec<&Desc> {
        self.0
            .parts()
            .into_iter()
            .flat_map(|part| part.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let sources = self.0.sources.lock().unwrap();
        self.0.refresh(&sources);
        let families = self
            .0
            .parts()
            .into_iter()
            .flat_map(|part| part.collect())
            .collect();
        drop(sources);
        families
    }
}

/// The agent's metrics registry and the handles every part of the agent records into.
pub struct Metrics {
    registry: Registry,
    tcp: TcpFamilies,
    denied: IntCounterVec,
    closed_by_policy: IntCounterVec,
    health: Arc<HealthCollector>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered and no source attached yet.
    pub fn new() -> Self {
        // Only fails on an invalid or duplicate name, which the tests would catch.
        Self::build().expect("metric definitions are valid")
    }

    fn build() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let tcp_family = |name: &str, help: &str| -> prometheus::Result<IntCounterVec> {
            let family = IntCounterVec::new(Opts::new(name, help), &TCP_LABEL_NAMES)?;
            registry.register(Box::new(family.clone()))?;
            Ok(family)
        };
        // Names and help texts are ztunnel's.
        let tcp = TcpFamilies {
            opened: tcp_family(
                "istio_tcp_connections_opened_total",
                "The total number of TCP connections opened",
            )?,
            closed: tcp_family(
                "istio_tcp_connections_closed_total",
                "The total number of TCP connections closed",
            )?,
            received: tcp_family(
                "istio_tcp_received_bytes_total",
                "The size of total bytes received during request in case of a TCP connection",
            )?,
            sent: tcp_family(
                "istio_tcp_sent_bytes_total",
                "The size of total bytes sent during response in case of a TCP connection",
            )?,
        };
        let denied = IntCounterVec::new(
            Opts::new(
                "ambit_connections_denied_total",
                "Connections refused by the agent (authorization policy, peer authentication), \
                 by reason",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(denied.clone()))?;
        let closed_by_policy = IntCounterVec::new(
            Opts::new(
                "ambit_connections_closed_by_policy_total",
                "Open inbound connections the agent closed because a change of policies, peer \
                 authentication or workloads no longer allows them, by reason",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(closed_by_policy.clone()))?;
        let health = Arc::new(HealthCollector::new()?);
        registry.register(Box::new(SharedHealth(health.clone())))?;
        Ok(Self {
            registry,
            tcp,
            denied,
            closed_by_policy,
            health,
        })
    }

    /// Records a connection opened and returns its recorder; call it as soon as the connection
    /// is accepted and its endpoints are known, before connecting upstream.
    pub fn connection_opened(&self, labels: &ConnectionLabels) -> ConnectionRecorder {
        let values = labels.values();
        self.tcp.opened.with_label_values(&values).inc();
        // The children are fetched once: counting bytes is then a plain atomic add.
        ConnectionRecorder {
            to_server: self.tcp.received.with_label_values(&values),
            to_client: self.tcp.sent.with_label_values(&values),
            closed: self.tcp.closed.clone(),
            labels: labels.clone(),
            counted_sent: AtomicU64::new(0),
            counted_received: AtomicU64::new(0),
            closed_recorded: AtomicBool::new(false),
        }
    }

    /// Adds a subsystem's own metrics to what `/metrics` serves.
    pub fn register(&self, collector: Box<dyn Collector>) -> prometheus::Result<()> {
        self.registry.register(collector)
    }

    /// Counts a connection refused by the agent. `reason` should come from a small fixed set
    /// (e.g. `policy`, `plaintext_strict`): each value is a series of its own.
    pub fn connection_denied(&self, reason: &str) {
        self.denied.with_label_values(&[reason]).inc();
    }

    /// Counts an open connection closed because a configuration change no longer allows it
    /// (it was counted opened, and its close is counted in `istio_tcp_connections_closed_total`
    /// as any other). `reason` is one of the labels of [`Self::connection_denied`].
    pub fn connection_closed_by_policy(&self, reason: &str) {
        self.closed_by_policy.with_label_values(&[reason]).inc();
    }

    /// Counts a configuration rejected while the previous one stays in force.
    pub fn config_reload_failed(&self) {
        self.health
            .config_reloads
            .with_label_values(&["failed"])
            .inc();
    }

    /// Reads the eBPF counters and map occupancy from `datapath` at each scrape.
    pub fn observe_datapath(&self, datapath: Arc<dyn DatapathStats>) {
        self.health.sources.lock().unwrap().datapath = Some(datapath);
    }

    /// Reads the enrolled and failed pod counts from `status` at each scrape.
    pub fn observe_enrolment(&self, status: watch::Receiver<EnrolmentStatus>) {
        self.health.sources.lock().unwrap().enrolment = Some(status);
    }

    /// Reads the certificates held (their expiry) and the CA error count at each scrape.
    pub fn observe_certificates(&self, certs: Arc<dyn CertificateStats>) {
        self.health.sources.lock().unwrap().certificates = Some(certs);
    }

    /// Reads the connection limits and their counters at each scrape.
    pub fn observe_limits(&self, limits: Arc<Limits>) {
        self.health.sources.lock().unwrap().limits = Some(limits);
    }

    /// Reads the configuration generation from `status` at each scrape.
    pub fn observe_config(&self, status: watch::Receiver<ConfigStatus>) {
        self.health.sources.lock().unwrap().config = Some(status);
    }

    /// Counts rejected configurations from a source's status until the source ends: each
    /// status published with an error is one rejection (a source publishes once per event).
    /// A rejection and a quick second one may coalesce into one count if this task lags.
    pub async fn count_config_rejections(
        self: Arc<Self>,
        mut status: watch::Receiver<ConfigStatus>,
    ) {
        // What is already there was not a reload.
        status.borrow_and_update();
        while status.changed().await.is_ok() {
            let status = status.borrow_and_update();
            // An unreachable API server rejects nothing: it has its own gauge.
            if status.last_error.is_some() && status.unreachable_since.is_none() {
                self.config_reload_failed();
            }
        }
    }

    /// The current metric families (refreshing the scrape-time ones).
    pub fn gather(&self) -> Vec<MetricFamily> {
        self.registry.gather()
    }

    /// The current metrics in the Prometheus text exposition format ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.gather())
            .unwrap_or_else(|err| {
                // Only malformed families fail, which the definitions above cannot produce.
                tracing::error!(%err, "encoding metrics");
                String::new()
            })
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        net::SocketAddr,
        path::PathBuf,
        time::{Duration, SystemTime},
    };

    use super::*;
    use crate::{
        inpod::EnrolledPodInfo,
        state::{NetnsRef, RedirectSettings, ServicePort},
    };

    fn workload(namespace: &str, name: &str, ip: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            name: name.into(),
            namespace: namespace.into(),
            service_account: format!("{name}-sa"),
            node: "node-a".into(),
            ips: vec![ip.parse().unwrap()],
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            enrolled: true,
            ready: true,
            netns: NetnsRef::Path(PathBuf::from("/run/netns/x")),
        }
    }

    /// `client` (plain `app` label) calls service `shop/web` (VIP 10.96.0.10:80 → 8080), whose
    /// endpoint `web-0` carries Istio's own canonical labels.
    fn mesh() -> MeshState {
        MeshState::new(
            RedirectSettings::default(),
            vec![
                workload(
                    "default",
                    "client-7d9f",
                    "10.0.0.1",
                    &[("app", "client"), ("version", "v2")],
                ),
                workload(
                    "shop",
                    "web-0",
                    "10.0.0.2",
                    &[
                        ("app", "web"),
                        ("service.istio.io/canonical-name", "storefront"),
                        ("service.istio.io/canonical-revision", "r7"),
                    ],
                ),
                workload("shop", "bare", "10.0.0.3", &[]),
            ],
            vec![Service {
                name: "web".into(),
                namespace: "shop".into(),
                vips: vec!["10.96.0.10".parse().unwrap()],
                selector: [("app".to_string(), "web".to_string())].into(),
                endpoint_addresses: Vec::new(),
                ports: vec![ServicePort {
                    port: 80,
                    target_port: 8080,
                }],
                waypoint: None,
            }],
        )
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Parses the text exposition into `(name, labels) -> value`, checking the structure a
    /// Prometheus text parser relies on: `# HELP` and `# TYPE` before a family's samples, names
    /// and label names of the allowed characters, quoted label values, numeric values.
    fn parse(text: &str) -> BTreeMap<(String, BTreeMap<String, String>), f64> {
        let valid_name = |s: &str| {
            !s.is_empty()
                && !s.starts_with(|c: char| c.is_ascii_digit())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        };
        let mut typed = std::collections::BTreeSet::new();
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(valid_name(name), "bad name in {line:?}");
                assert!(["counter", "gauge"].contains(&kind), "{line:?}");
                assert!(
                    typed.insert(name.to_string()),
                    "family typed twice: {line:?}"
                );
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
            let (series, value) = line.rsplit_once(' ').unwrap();
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line:?}"));
            let (name, labels) = match series.split_once('{') {
                None => (series, BTreeMap::new()),
                Some((name, rest)) => {
                    let mut labels = BTreeMap::new();
                    let mut rest = rest.strip_suffix('}').unwrap();
                    while !rest.is_empty() {
                        let (key, after) = rest.split_once("=\"").unwrap();
                        assert!(valid_name(key), "bad label name in {line:?}");
                        // Values here hold no quotes or backslashes, so the next quote ends it.
                        let (value, after) = after.split_once('"').unwrap();
                        labels.insert(key.to_string(), value.to_string());
                        rest = after.strip_prefix(',').unwrap_or(after);
                    }
                    (name, labels)
                }
            };
            assert!(typed.contains(name), "sample before its # TYPE: {line:?}");
            samples.insert((name.to_string(), labels), value);
        }
        samples
    }

    fn series<'a>(
        samples: &'a BTreeMap<(String, BTreeMap<String, String>), f64>,
        name: &str,
    ) -> Vec<(&'a BTreeMap<String, String>, f64)> {
        samples
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|((_, labels), value)| (labels, *value))
            .collect()
    }

    #[test]
    fn outbound_labels_through_a_service() {
        let state = mesh();
        let source = state.workload_by_ip("10.0.0.1".parse().unwrap()).unwrap();
        let resolved = state.resolve(addr("10.96.0.10:80"));
        let labels = ConnectionLabels::outbound(&state, source, &resolved);

        assert_eq!(labels.reporter, Reporter::Source);
        assert_eq!(labels.source_workload, "client-7d9f");
        assert_eq!(labels.source_workload_namespace, "default");
        // `app` and `version` are the fallbacks after Istio's own labels.
        assert_eq!(labels.source_canonical_service, "client");
        assert_eq!(labels.source_app, "client");
        assert_eq!(labels.source_canonical_revision, "v2");
        assert_eq!(labels.source_version, "v2");
        assert_eq!(labels.source_cluster, CLUSTER_ID);
        // Plaintext: nothing proved who the source is.
        assert_eq!(labels.source_principal, UNKNOWN);

        assert_eq!(labels.destination_service, "web.shop.svc.cluster.local");
        assert_eq!(labels.destination_service_name, "web");
        assert_eq!(labels.destination_service_namespace, "shop");
        assert_eq!(labels.destination_workload, "web-0");
        assert_eq!(labels.destination_workload_namespace, "shop");
        assert_eq!(labels.destination_canonical_service, "storefront");
        assert_eq!(labels.destination_canonical_revision, "r7");
        assert_eq!(labels.destination_app, "storefront");
        assert_eq!(labels.destination_version, "r7");
        assert_eq!(
            labels.destination_principal,
            format!("spiffe://{}/ns/shop/sa/web-0-sa", state.trust_domain())
        );
        assert_eq!(labels.response_flags, ResponseFlags::None);
        assert_eq!(labels.connection_security_policy, SecurityPolicy::Unknown);

        let values = labels.values();
        assert_eq!(values[0], "source");
        assert_eq!(values[20], "tcp");
        assert_eq!(values[21], "-");
        assert_eq!(values[22], "unknown");
    }

    #[test]
    fn outbound_labels_of_unknown_and_unresolvable_destinations() {
        let state = mesh();
        let source = state.workload_by_ip("10.0.0.1".parse().unwrap()).unwrap();

        let passthrough = state.resolve(addr("192.0.2.9:443"));
        let labels = ConnectionLabels::outbound(&state, source, &passthrough);
        assert_eq!(labels.source_workload, "client-7d9f");
        for value in &labels.values()[9..20] {
            assert_eq!(*value, UNKNOWN);
        }

        let no_port = state.resolve(addr("10.96.0.10:81"));
        let labels = ConnectionLabels::outbound(&state, source, &no_port);
        assert_eq!(labels.destination_service, "web.shop.svc.cluster.local");
        assert_eq!(labels.destination_workload, UNKNOWN);
    }

    #[test]
    fn inbound_labels_guess_the_service_and_default_canonical_names() {
        let state = mesh();
        let source = state.workload_by_ip("10.0.0.3".parse().unwrap());
        let destination = state.workload_by_ip("10.0.0.2".parse().unwrap()).unwrap();

        let labels =
            ConnectionLabels::inbound_plaintext(&state, source.map(|w| &**w), destination, 8080);
        assert_eq!(labels.reporter, Reporter::Destination);
        // No canonical label at all: the workload's name and `latest`, as Istio does.
        assert_eq!(labels.source_canonical_service, "bare");
        assert_eq!(labels.source_canonical_revision, "latest");
        assert_eq!(labels.source_principal, UNKNOWN);
        assert_eq!(labels.destination_service, "web.shop.svc.cluster.local");
        assert_eq!(labels.destination_workload, "web-0");

        // A port no service targets: no service guessed; an unknown client stays unknown.
        let labels = ConnectionLabels::inbound_plaintext(&state, None, destination, 9999);
        assert_eq!(labels.destination_service, UNKNOWN);
        assert_eq!(labels.source_workload, UNKNOWN);
        assert_eq!(labels.source_cluster, UNKNOWN);
    }

    #[test]
    fn principals_and_security_policy_from_mutual_tls() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/client"
            .parse()
            .unwrap();
        let labels = ConnectionLabels::new(Reporter::Destination)
            .with_source_principal(Some(&id))
            .with_security_policy(SecurityPolicy::MutualTls);
        assert_eq!(
            labels.source_principal,
            "spiffe://cluster.local/ns/default/sa/client"
        );
        assert_eq!(labels.values()[22], "mutual_tls");
    }

    #[test]
    fn a_recorded_connection_produces_the_four_istio_series() {
        let metrics = Metrics::new();
        let state = mesh();
        let source = state.workload_by_ip("10.0.0.1".parse().unwrap()).unwrap();
        let resolved = state.resolve(addr("10.96.0.10:80"));
        let labels = ConnectionLabels::outbound(&state, source, &resolved);

        let conn = metrics.connection_opened(&labels);
        // Opened counts at once, closed only at the end.
        let samples = parse(&metrics.encode());
        assert_eq!(
            series(&samples, "istio_tcp_connections_opened_total").len(),
            1
        );
        assert!(series(&samples, "istio_tcp_connections_closed_total").is_empty());

        conn.add_sent(10);
        conn.finish(
            Transferred {
                sent: 78,
                received: 927,
            },
            ResponseFlags::None,
        );
        let text = metrics.encode();
        let samples = parse(&text);
        let expected: BTreeMap<String, String> = TCP_LABEL_NAMES
            .iter()
            .zip(labels.values())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (name, value) in [
            ("istio_tcp_connections_opened_total", 1.0),
            ("istio_tcp_connections_closed_total", 1.0),
            // The request direction (client → server) is "received", as in Istio.
            ("istio_tcp_received_bytes_total", 78.0),
            ("istio_tcp_sent_bytes_total", 927.0),
        ] {
            let found = series(&samples, name);
            assert_eq!(found.len(), 1, "{name} in\n{text}");
            assert_eq!(found[0].0, &expected, "{name}");
            assert_eq!(found[0].1, value, "{name}");
            assert!(text.contains(&format!("# TYPE {name} counter\n")));
        }
        // Exactly the labels ztunnel emits: no port, nothing extra.
        assert_eq!(
            found_label_names(&samples, "istio_tcp_sent_bytes_total"),
            TCP_LABEL_NAMES
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
        );
        assert!(text.contains("destination_workload=\"web-0\""));
        assert!(text.contains("reporter=\"source\""));
    }

    fn found_label_names(
        samples: &BTreeMap<(String, BTreeMap<String, String>), f64>,
        name: &str,
    ) -> Vec<String> {
        let mut names: Vec<String> = series(samples, name)[0].0.keys().cloned().collect();
        let order = |n: &String| TCP_LABEL_NAMES.iter().position(|l| l == n);
        names.sort_by_key(order);
        names
    }

    #[test]
    fn closed_carries_the_response_flag_and_drop_closes() {
        let metrics = Metrics::new();
        let labels = ConnectionLabels::new(Reporter::Source);
        metrics
            .connection_opened(&labels)
            .finish(Transferred::default(), ResponseFlags::Connect);
        drop(metrics.connection_opened(&labels));

        let samples = parse(&metrics.encode());
        let closed = series(&samples, "istio_tcp_connections_closed_total");
        let by_flag: BTreeMap<&str, f64> = closed
            .iter()
            .map(|(labels, v)| (labels["response_flags"].as_str(), *v))
            .collect();
        assert_eq!(by_flag, BTreeMap::from([("-", 1.0), ("CONNECT", 1.0)]));
        let opened = series(&samples, "istio_tcp_connections_opened_total");
        assert_eq!(opened.len(), 1);
        assert_eq!(opened[0].0["response_flags"], "-");
        assert_eq!(opened[0].1, 2.0);
    }

    struct FakeDatapath;

    /// Certificates held, as the certificate manager would report them.
    #[derive(Default)]
    struct FakeCertificates {
        ca_errors: u64,
        held: Mutex<Vec<(String, SystemTime)>>,
    }

    impl CertificateStats for FakeCertificates {
        fn ca_errors_total(&self) -> u64 {
            self.ca_errors
        }

        fn expiries(&self) -> Vec<(String, SystemTime)> {
            self.held.lock().unwrap().clone()
        }
    }

    impl DatapathStats for FakeDatapath {
        fn redirect_stats(&self) -> RedirectStats {
            RedirectStats {
                redirected_v4: 5,
                redirected_v6: 2,
                excluded: 1,
                map_full: 0,
                inbound_steered: 4,
                inbound_no_listener: 3,
                pod_quota: 6,
                closed_refused: 8,
                inbound_from_node: 9,
            }
        }

        fn map_occupancy(&self) -> Vec<(&'static str, usize)> {
            vec![("ENROLLED_NETNS", 2), ("ORIG_DST_TUPLE", 7)]
        }
    }

    fn value(
        samples: &BTreeMap<(String, BTreeMap<String, String>), f64>,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Option<f64> {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        samples.get(&(name.to_string(), labels)).copied()
    }

    #[test]
    fn health_metrics_are_read_at_scrape_time() {
        let metrics = Metrics::new();
        metrics.observe_datapath(Arc::new(FakeDatapath));
        let (enrolment_tx, enrolment_rx) = watch::channel(EnrolmentStatus::default());
        metrics.observe_enrolment(enrolment_rx);
        let (config_tx, config_rx) = watch::channel(ConfigStatus {
            generation: 1,
            ..Default::default()
        });
        metrics.observe_config(config_rx);
        metrics.connection_denied("policy");
        metrics.connection_denied("policy");
        metrics.connection_closed_by_policy("deny_policy");
        metrics.observe_certificates(Arc::new(FakeCertificates {
            ca_errors: 1,
            ..Default::default()
        }));
        metrics.config_reload_failed();

        // Changes after attaching show at the next scrape: nothing is polled.
        enrolment_tx.send_modify(|status| {
            status.enrolled.push(EnrolledPodInfo {
                uid: "shop/web-0".into(),
                netns_cookie: 1,
                ips: vec![],
            });
            status.failed.insert("shop/web-1".into(), "no netns".into());
            status
                .failed
                .insert("shop/web-2".into(), "closed: port taken".into());
            status.closed.insert("shop/web-2".into());
        });
        config_tx.send_modify(|status| status.generation = 3);

        let samples = parse(&metrics.encode());
        let get = |name: &str, labels: &[(&str, &str)]| value(&samples, name, labels);
        assert_eq!(get("ambit_enrolled_pods", &[]), Some(1.0));
        assert_eq!(get("ambit_enrolment_failed_pods", &[]), Some(2.0));
        assert_eq!(get("ambit_closed_pods", &[]), Some(1.0));
        assert_eq!(get("ambit_redirect_pod_quota_total", &[]), Some(6.0));
        assert_eq!(get("ambit_redirect_closed_refused_total", &[]), Some(8.0));
        assert_eq!(get("ambit_inbound_from_node_total", &[]), Some(9.0));
        assert_eq!(
            get("ambit_redirected_connections_total", &[("family", "ipv4")]),
            Some(5.0)
        );
        assert_eq!(
            get("ambit_redirected_connections_total", &[("family", "ipv6")]),
            Some(2.0)
        );
        assert_eq!(get("ambit_redirect_excluded_total", &[]), Some(1.0));
        assert_eq!(get("ambit_redirect_map_full_total", &[]), Some(0.0));
        assert_eq!(get("ambit_inbound_steered_total", &[]), Some(4.0));
        assert_eq!(get("ambit_inbound_no_listener_total", &[]), Some(3.0));
        assert_eq!(
            get("ambit_ebpf_map_entries", &[("map", "ORIG_DST_TUPLE")]),
            Some(7.0)
        );
        assert_eq!(get("ambit_config_generation", &[]), Some(3.0));
        assert_eq!(
            get("ambit_config_reloads_total", &[("result", "ok")]),
            Some(2.0)
        );
        assert_eq!(
            get("ambit_config_reloads_total", &[("result", "failed")]),
            Some(1.0)
        );
        assert_eq!(
            get("ambit_connections_denied_total", &[("reason", "policy")]),
            Some(2.0)
        );
        assert_eq!(
            get(
                "ambit_connections_closed_by_policy_total",
                &[("reason", "deny_policy")]
            ),
            Some(1.0)
        );
        assert_eq!(get("ambit_ca_errors_total", &[]), Some(1.0));

        // A second scrape re-reads rather than adds up.
        let again = parse(&metrics.encode());
        assert_eq!(
            value(
                &again,
                "ambit_redirected_connections_total",
                &[("family", "ipv4")]
            ),
            Some(5.0)
        );
    }

    #[test]
    fn certificate_expiry_is_the_time_left_and_goes_with_the_certificate() {
        let metrics = Metrics::new();
        let id = "spiffe://cluster.local/ns/shop/sa/web";
        let certs = Arc::new(FakeCertificates::default());
        *certs.held.lock().unwrap() = vec![
            (
                id.to_string(),
                SystemTime::now() + Duration::from_secs(3600),
            ),
            (
                "spiffe://cluster.local/ns/shop/sa/old".to_string(),
                SystemTime::now() - Duration::from_secs(60),
            ),
        ];
        metrics.observe_certificates(certs.clone());
        let samples = parse(&metrics.encode());
        let left = value(
            &samples,
            "ambit_certificate_expiry_seconds",
            &[("identity", id)],
        )
        .unwrap();
        assert!((3590.0..=3600.0).contains(&left), "{left}");
        let expired = value(
            &samples,
            "ambit_certificate_expiry_seconds",
            &[("identity", "spiffe://cluster.local/ns/shop/sa/old")],
        )
        .unwrap();
        assert!(expired <= -60.0, "{expired}");

        certs.held.lock().unwrap().retain(|(held, _)| held != id);
        let samples = parse(&metrics.encode());
        assert_eq!(
            series(&samples, "ambit_certificate_expiry_seconds").len(),
            1
        );
    }

    /// Every metric populated, checked by Prometheus' own parser and linter when `promtool` is
    /// installed (the test bed installs Prometheus); skipped otherwise.
    #[test]
    fn exposition_passes_promtool() {
        use std::io::Write as _;
        let metrics = Metrics::new();
        metrics.observe_datapath(Arc::new(FakeDatapath));
        let (_enrolment_tx, enrolment_rx) = watch::channel(EnrolmentStatus::default());
        metrics.observe_enrolment(enrolment_rx);
        let (_config_tx, config_rx) = watch::channel(ConfigStatus::default());
        metrics.observe_config(config_rx);
        let state = mesh();
        let source = state.workload_by_ip("10.0.0.1".parse().unwrap()).unwrap();
        metrics
            .connection_opened(&ConnectionLabels::outbound(
                &state,
                source,
                &state.resolve(addr("10.96.0.10:80")),
            ))
            .finish(
                Transferred {
                    sent: 1,
                    received: 2,
                },
                ResponseFlags::None,
            );
        metrics.connection_denied("policy");
        let certs = FakeCertificates::default();
        certs.held.lock().unwrap().push((
            "spiffe://cluster.local/ns/shop/sa/web".to_string(),
            SystemTime::now() + Duration::from_secs(60),
        ));
        metrics.observe_certificates(Arc::new(certs));
        let limits = Arc::new(crate::limits::Limits::new(
            crate::limits::LimitSettings::for_descriptors(1024),
        ));
        limits.timed_out(
            crate::limits::Path::Hbone,
            crate::limits::Phase::TlsHandshake,
        );
        metrics.observe_limits(limits);
        let text = metrics.encode();

        let child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn();
        let Ok(mut child) = child else {
            eprintln!("promtool not installed: skipping");
            return;
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "promtool: {}{}\n{text}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    #[test]
    fn limits_and_descriptors_are_read_at_scrape_time() {
        use crate::limits::{LimitSettings, Limits, Path, Phase};
        let metrics = Metrics::new();
        let mut settings = LimitSettings::for_descriptors(20_000);
        settings.max_connections_per_source = 1;
        let limits = Arc::new(Limits::new(settings));
        metrics.observe_limits(limits.clone());
        let ip = "10.0.0.1".parse().unwrap();
        let held = limits.admit(Path::Inbound, ip).unwrap();
        assert!(limits.admit(Path::Inbound, ip).is_none());
        assert!(limits.admit(Path::HboneTunnel, ip).is_none());
        limits.timed_out(Path::Readiness, Phase::HttpRequest);
        let samples = parse(&metrics.encode());
        let get = |name: &str, labels: &[(&str, &str)]| value(&samples, name, labels);
        assert_eq!(
            get("ambit_connection_limit", &[("limit", "total")]),
            Some(8_750.0)
        );
        assert_eq!(
            get("ambit_connection_limit", &[("limit", "per_source")]),
            Some(1.0)
        );
        assert_eq!(
            get("ambit_connection_slots_in_use", &[("slots", "connections")]),
            Some(1.0)
        );
        assert_eq!(
            get(
                "ambit_connections_over_limit_total",
                &[("path", "inbound"), ("limit", "per_source")]
            ),
            Some(1.0)
        );
        assert_eq!(
            get(
                "ambit_connections_over_limit_total",
                &[("path", "hbone_tunnel"), ("limit", "per_source")]
            ),
            Some(1.0)
        );
        assert_eq!(
            get(
                "ambit_connections_timed_out_total",
                &[("path", "readiness"), ("phase", "http_request")]
            ),
            Some(1.0)
        );
        // The process's own descriptors, as Prometheus' process collector names them.
        let open = get("process_open_fds", &[]).unwrap();
        let max = get("process_max_fds", &[]).unwrap();
        assert!(open >= 3.0 && max >= open, "{open} of {max}");
        drop(held);
        let samples = parse(&metrics.encode());
        assert_eq!(
            value(
                &samples,
                "ambit_connection_slots_in_use",
                &[("slots", "connections")]
            ),
            Some(0.0)
        );
    }

    #[tokio::test]
    async fn config_rejections_are_counted_from_the_status() {
        let metrics = Arc::new(Metrics::new());
        let (tx, rx) = watch::channel(ConfigStatus {
            generation: 1,
            ..Default::default()
        });
        let task = tokio::spawn(metrics.clone().count_config_rejections(rx));
        // The task takes what is there when it starts as the baseline: let it start.
        tokio::task::yield_now().await;
        let failed = |metrics: &Metrics| {
            value(
                &parse(&metrics.encode()),
                "ambit_config_reloads_total",
                &[("result", "failed")],
            )
        };
        metrics.observe_config(tx.subscribe());
        let up =
            |metrics: &Metrics| value(&parse(&metrics.encode()), "ambit_config_source_up", &[]);
        assert_eq!(up(&metrics), Some(1.0));
        for status in [
            (1, Some("bad field"), None),
            (1, None, None),
            (2, None, None),
            (2, Some("unreadable"), None),
            // The API server going away is no rejection, but the gauge says so.
            (
                2,
                Some("API server unreachable"),
                Some("2026-12-04T12:00:00Z"),
            ),
        ] {
            tx.send_replace(ConfigStatus {
                generation: status.0,
                last_error: status.1.map(String::from),
                unreachable_since: status.2.map(String::from),
                ..Default::default()
            });
            // Let the counting task see each publication before the next.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(up(&metrics), Some(0.0));
        drop(tx);
        task.await.unwrap();
        assert_eq!(failed(&metrics), Some(2.0));
    }
}
