//! The node proxy's metrics: Istio's `istio_tcp_*` families, named and labelled as ztunnel
//! emits them (reporter `source` on the outbound path, `destination` on the inbound ones) so that
//! Istio's dashboards and Kiali work unchanged, and the agent's refusals.
//!
//! Each connection gets a [`ConnectionRecorder`] ([`ProxyMetrics::connection_opened`]) as soon as
//! it is accepted and its endpoints are known, finished where its access-log line is written.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use prometheus::{IntCounter, IntCounterVec, Opts};

use super::Transferred;
use crate::{
    identity::SpiffeId,
    state::{MeshState, Resolved, Service, Workload},
    telemetry::{
        istio::{CLUSTER_ID, Reporter, ResponseFlags, SecurityPolicy, UNKNOWN},
        metrics::Metrics,
    },
};

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

/// The labels of one connection's `istio_tcp_*` series. Every field not known is
/// [`UNKNOWN`], as in ztunnel; `request_protocol` is always `tcp` (the agent is an L4 proxy).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConnectionLabels {
    /// Which side reports.
    pub reporter: Reporter,
    /// The source's workload name: its controller's (Deployment, StatefulSet...), else the
    /// pod's ([`Workload::workload_name`]), as ztunnel labels it.
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
    /// The destination's workload name, as [`Self::source_workload`].
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
                .with_destination_principal(Some(&state.identity_of(workload)))
                .with_destination_service(service.as_deref()),
            // As ztunnel: the waypoint is the destination workload, the service dialled the
            // destination service.
            Resolved::Waypoint {
                workload, service, ..
            } => labels
                .with_destination(Some(workload))
                .with_destination_principal(Some(&state.identity_of(workload)))
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
        let service = state.guess_inbound_service(destination, port);
        Self::new(Reporter::Destination)
            .with_source(source)
            .with_destination(Some(destination))
            .with_destination_principal(Some(&state.identity_of(destination)))
            .with_destination_service(service.map(|s| &**s))
    }

    /// Fills the source workload's labels. The principal is left alone: only a verified
    /// identity may fill it ([`Self::with_source_principal`]).
    pub fn with_source(mut self, workload: Option<&Workload>) -> Self {
        let Some(workload) = workload else {
            return self;
        };
        self.source_workload = workload.workload_name().to_string();
        self.source_workload_namespace = workload.namespace.clone();
        self.source_app = workload.canonical_service().to_string();
        self.source_canonical_service = workload.canonical_service().to_string();
        self.source_version = workload.canonical_revision().to_string();
        self.source_canonical_revision = workload.canonical_revision().to_string();
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
        self.destination_workload = workload.workload_name().to_string();
        self.destination_workload_namespace = workload.namespace.clone();
        self.destination_app = workload.canonical_service().to_string();
        self.destination_canonical_service = workload.canonical_service().to_string();
        self.destination_version = workload.canonical_revision().to_string();
        self.destination_canonical_revision = workload.canonical_revision().to_string();
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
        self.destination_service = service.hostname();
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

/// The relay counts a connection's bytes into its series as they flow, so a long connection
/// shows in `rate()` while it is open: two relaxed atomic adds per chunk (the connection's own
/// tally and the series', whose child was fetched once at open).
impl crate::relay::Meter for ConnectionRecorder {
    fn sent(&self, n: u64) {
        self.add_sent(n);
    }

    fn received(&self, n: u64) {
        self.add_received(n);
    }
}

impl Drop for ConnectionRecorder {
    fn drop(&mut self) {
        self.record_closed();
    }
}

/// The proxy's metrics: the TCP families, the refusals and the same-node fast path.
pub struct ProxyMetrics {
    tcp: TcpFamilies,
    denied: IntCounterVec,
    closed_by_policy: IntCounterVec,
    fast_path: IntCounterVec,
    splice_declined: IntCounterVec,
}

impl ProxyMetrics {
    /// The proxy's metrics, registered with `registry`.
    pub fn new(registry: &Metrics) -> prometheus::Result<Self> {
        let family =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
                let family = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(family.clone()))?;
                Ok(family)
            };
        // Names and help texts are ztunnel's.
        let tcp = TcpFamilies {
            opened: family(
                "istio_tcp_connections_opened_total",
                "The total number of TCP connections opened",
                &TCP_LABEL_NAMES,
            )?,
            closed: family(
                "istio_tcp_connections_closed_total",
                "The total number of TCP connections closed",
                &TCP_LABEL_NAMES,
            )?,
            received: family(
                "istio_tcp_received_bytes_total",
                "The size of total bytes received during request in case of a TCP connection",
                &TCP_LABEL_NAMES,
            )?,
            sent: family(
                "istio_tcp_sent_bytes_total",
                "The size of total bytes sent during response in case of a TCP connection",
                &TCP_LABEL_NAMES,
            )?,
        };
        Ok(Self {
            tcp,
            denied: family(
                "ambit_connections_denied_total",
                "Connections refused by the agent (authorization policy, peer authentication), \
                 by reason",
                &["reason"],
            )?,
            closed_by_policy: family(
                "ambit_connections_closed_by_policy_total",
                "Open inbound connections the agent closed because a change of policies, peer \
                 authentication or workloads no longer allows them, by reason",
                &["reason"],
            )?,
            fast_path: family(
                "ambit_fast_path_connections_total",
                "Connections between two pods of this node carried by the same-node fast path \
                 instead of HBONE, by how: spliced in the kernel, relayed by the agent, or \
                 broken (reset while the splice was being made)",
                &["carried"],
            )?,
            splice_declined: family(
                "ambit_splice_declined_total",
                "Same-node connections relayed by the agent instead of spliced in the kernel, \
                 by reason (pod_share, full, off, not_established, kernel)",
                &["reason"],
            )?,
        })
    }

    /// Counts a connection the same-node fast path carried: `splice` or `relay`.
    pub fn fast_path(&self, carried: &str) {
        self.fast_path.with_label_values(&[carried]).inc();
    }

    /// Counts a same-node connection that could not be spliced, and why.
    pub fn splice_declined(&self, reason: &str) {
        self.splice_declined.with_label_values(&[reason]).inc();
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
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

    use super::*;
    use crate::{
        netns::NetnsRef,
        state::{RedirectSettings, ServicePort},
        telemetry::metrics::exposition::{Samples, parse, series, value},
    };

    fn workload(namespace: &str, name: &str, ip: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            name: name.into(),
            controller: None,
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
            capture_exclusions: Default::default(),
        }
    }

    /// `client` (a pod of the Deployment `client`, plain `app` label) calls service `shop/web`
    /// (VIP 10.96.0.10:80 → 8080), whose endpoint `web-0` carries Istio's own canonical labels.
    fn mesh() -> MeshState {
        MeshState::new(
            RedirectSettings::default(),
            vec![
                Workload {
                    // One pod of the Deployment `client`.
                    controller: Some("client".into()),
                    ..workload(
                        "default",
                        "client-7d9f-x2x4q",
                        "10.0.0.1",
                        &[("app", "client"), ("version", "v2")],
                    )
                },
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

    #[test]
    fn outbound_labels_through_a_service() {
        let state = mesh();
        let source = state.workload_by_ip("10.0.0.1".parse().unwrap()).unwrap();
        let resolved = state.resolve(addr("10.96.0.10:80"));
        let labels = ConnectionLabels::outbound(&state, source, &resolved);

        assert_eq!(labels.reporter, Reporter::Source);
        // The controller's name, not the pod's.
        assert_eq!(labels.source_workload, "client");
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
        assert_eq!(labels.source_workload, "client");
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
        let proxy = ProxyMetrics::new(&metrics).unwrap();
        let state = mesh();
        let source = state.workload_by_ip("10.0.0.1".parse().unwrap()).unwrap();
        let resolved = state.resolve(addr("10.96.0.10:80"));
        let labels = ConnectionLabels::outbound(&state, source, &resolved);

        let conn = proxy.connection_opened(&labels);
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

    fn found_label_names(samples: &Samples, name: &str) -> Vec<String> {
        let mut names: Vec<String> = series(samples, name)[0].0.keys().cloned().collect();
        let order = |n: &String| TCP_LABEL_NAMES.iter().position(|l| l == n);
        names.sort_by_key(order);
        names
    }

    #[test]
    fn closed_carries_the_response_flag_and_drop_closes() {
        let metrics = Metrics::new();
        let proxy = ProxyMetrics::new(&metrics).unwrap();
        let labels = ConnectionLabels::new(Reporter::Source);
        proxy
            .connection_opened(&labels)
            .finish(Transferred::default(), ResponseFlags::Connect);
        drop(proxy.connection_opened(&labels));

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

    #[test]
    fn refusals_are_counted_by_reason() {
        let metrics = Metrics::new();
        let proxy = ProxyMetrics::new(&metrics).unwrap();
        proxy.connection_denied("policy");
        proxy.connection_denied("policy");
        proxy.connection_closed_by_policy("deny_policy");
        let samples = parse(&metrics.encode());
        assert_eq!(
            value(
                &samples,
                "ambit_connections_denied_total",
                &[("reason", "policy")]
            ),
            Some(2.0)
        );
        assert_eq!(
            value(
                &samples,
                "ambit_connections_closed_by_policy_total",
                &[("reason", "deny_policy")]
            ),
            Some(1.0)
        );
    }
}
