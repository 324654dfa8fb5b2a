//! The waypoint's metrics: Istio's `istio_requests_total`, reporter `waypoint`, with Istio's
//! standard labels so that dashboards and Kiali's graph read it unchanged.
//!
//! One series per (source, destination, service, protocol, response code, flags); the request
//! path, method and port are not labels (they would multiply series by whatever clients send).
use prometheus::{IntCounterVec, Opts};

use crate::{
    identity::SpiffeId,
    proxy::metrics::ConnectionLabels,
    state::{Service, Workload},
    telemetry::{
        istio::{Reporter, SecurityPolicy, UNKNOWN},
        metrics::Metrics,
    },
};

/// The label names of `istio_requests_total`, in Istio's order.
pub const REQUEST_LABEL_NAMES: [&str; 25] = [
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
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

/// Why a request got no upstream response, as Envoy's `response_flags` say it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RequestFlags {
    /// Answered by the upstream (`-`).
    #[default]
    None,
    /// No route matched (`NR`, answered 404).
    NoRoute,
    /// The chosen destination had no ready endpoint (`UH`, answered 503).
    NoHealthyUpstream,
    /// The upstream could not be reached or failed before answering (`UF`, answered 503).
    UpstreamFailure,

    // Resilience (waypoint::retry, waypoint::fault).
    /// The route's or a try's timeout expired (`UT`, answered 504).
    UpstreamRequestTimeout,
    /// Aborted by the route's fault injection (`FI`).
    FaultInjected,
    /// Delayed by the route's fault injection (`DI`).
    DelayInjected,
    /// Answered with a retriable response after the last retry allowed (`URX`).
    RetryLimitExceeded,
    /// A retry was refused by the retry budget (`UO`).
    UpstreamOverflow,
}

impl RequestFlags {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestFlags::None => "-",
            RequestFlags::NoRoute => "NR",
            RequestFlags::NoHealthyUpstream => "UH",
            RequestFlags::UpstreamFailure => "UF",
            RequestFlags::UpstreamRequestTimeout => "UT",
            RequestFlags::FaultInjected => "FI",
            RequestFlags::DelayInjected => "DI",
            RequestFlags::RetryLimitExceeded => "URX",
            RequestFlags::UpstreamOverflow => "UO",
        }
    }
}

/// The labels of one request. Who talked to whom, through which service, and how securely are
/// the labels a connection has: they are filled by the node proxy's [`ConnectionLabels`], so a
/// workload is named the same way in `istio_requests_total` and in `istio_tcp_*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestLabels {
    peers: ConnectionLabels,
    protocol: &'static str,
    response_code: u16,
    flags: RequestFlags,
}

impl RequestLabels {
    /// Everything unknown but the reporter (`waypoint`) and mutual TLS, which every request
    /// reaching a waypoint is.
    pub fn new() -> Self {
        Self {
            peers: ConnectionLabels::new(Reporter::Waypoint)
                .with_security_policy(SecurityPolicy::MutualTls),
            protocol: "http",
            response_code: 0,
            flags: RequestFlags::None,
        }
    }

    /// The source: its workload (when its address names one that runs as `principal`) and its
    /// verified identity.
    pub fn with_source(mut self, workload: Option<&Workload>, principal: &SpiffeId) -> Self {
        self.peers = self
            .peers
            .with_source(workload)
            .with_source_principal(Some(principal));
        self
    }

    /// The service the request was routed to.
    pub fn with_destination_service(mut self, service: &Service) -> Self {
        self.peers = self.peers.with_destination_service(Some(service));
        self
    }

    /// The endpoint chosen and its identity.
    pub fn with_destination(mut self, workload: &Workload, principal: &SpiffeId) -> Self {
        self.peers = self
            .peers
            .with_destination(Some(workload))
            .with_destination_principal(Some(principal));
        self
    }

    /// `grpc` or `http`.
    pub fn with_protocol(mut self, grpc: bool) -> Self {
        self.protocol = if grpc { "grpc" } else { "http" };
        self
    }

    /// The status answered and why.
    pub fn with_response(mut self, code: u16, flags: RequestFlags) -> Self {
        self.response_code = code;
        self.flags = flags;
        self
    }

    /// The value of the label `name`, for logs and tests.
    pub fn get(&self, name: &str) -> Option<String> {
        let i = REQUEST_LABEL_NAMES.iter().position(|n| *n == name)?;
        let code = self.response_code.to_string();
        Some(self.values(&code)[i].to_string())
    }

    /// The label values, in the order of [`REQUEST_LABEL_NAMES`]: the connection's peers
    /// (the first 20 of [`crate::proxy::metrics::TCP_LABEL_NAMES`]), then the request's own.
    fn values<'a>(&'a self, response_code: &'a str) -> [&'a str; 25] {
        let peers = self.peers.values();
        std::array::from_fn(|i| match i {
            0..20 => peers[i],
            20 => self.protocol,
            21 => response_code,
            // Not read from gRPC trailers yet.
            22 => UNKNOWN,
            23 => self.flags.as_str(),
            _ => self.peers.connection_security_policy.as_str(),
        })
    }
}

impl Default for RequestLabels {
    fn default() -> Self {
        Self::new()
    }
}

/// The waypoint's metric families.
pub struct WaypointMetrics {
    requests: IntCounterVec,
}

impl WaypointMetrics {
    /// Creates the families and registers them in `metrics`.
    pub fn new(metrics: &Metrics) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "istio_requests_total",
                "Requests handled, counted when the response headers are sent",
            ),
            &REQUEST_LABEL_NAMES,
        )?;
        metrics.register(Box::new(requests.clone()))?;
        Ok(Self { requests })
    }

    /// Counts one request.
    pub fn request(&self, labels: &RequestLabels) {
        let code = labels.response_code.to_string();
        self.requests.with_label_values(&labels.values(&code)).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::exposition::{parse, promtool_check, series};

    fn workload(name: &str, version: &str) -> Workload {
        Workload {
            name: name.into(),
            controller: None,
            namespace: "shop".into(),
            service_account: name.into(),
            node: "n0".into(),
            ips: vec![],
            labels: [
                ("app".to_string(), "reviews".to_string()),
                ("version".to_string(), version.to_string()),
            ]
            .into(),
            enrolled: true,
            ready: true,
            netns: crate::netns::NetnsRef::Cni,
        }
    }

    #[test]
    fn a_request_is_counted_with_istio_labels_and_passes_promtool() {
        let metrics = Metrics::new();
        let waypoint = WaypointMetrics::new(&metrics).unwrap();
        let service = Service {
            name: "reviews".into(),
            namespace: "shop".into(),
            vips: vec![],
            selector: Default::default(),
            endpoint_addresses: vec![],
            ports: vec![],
            waypoint: None,
        };
        let client = SpiffeId::new("cluster.local", "shop", "client");
        let server = SpiffeId::new("cluster.local", "shop", "reviews-v2");
        let labels = RequestLabels::new()
            .with_source(Some(&workload("client", "v1")), &client)
            .with_destination_service(&service)
            .with_destination(&workload("reviews-v2", "v2"), &server)
            .with_response(200, RequestFlags::None);
        waypoint.request(&labels);
        waypoint.request(&labels);
        let text = metrics.encode();
        promtool_check(&text);
        let samples = parse(&text);
        let expected = [
            ("reporter", "waypoint"),
            ("response_code", "200"),
            ("source_workload", "client"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/shop/sa/client",
            ),
            ("destination_workload", "reviews-v2"),
            ("destination_version", "v2"),
            ("destination_canonical_service", "reviews"),
            ("destination_service", "reviews.shop.svc.cluster.local"),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/shop/sa/reviews-v2",
            ),
            ("request_protocol", "http"),
            ("response_flags", "-"),
            ("connection_security_policy", "mutual_tls"),
        ];
        let all = series(&samples, "istio_requests_total");
        assert_eq!(all.len(), 1, "{text}");
        let (labels, count) = all[0];
        assert_eq!(labels.len(), REQUEST_LABEL_NAMES.len(), "{text}");
        for (name, value) in expected {
            assert_eq!(
                labels.get(name).map(String::as_str),
                Some(value),
                "{name}: {text}"
            );
        }
        assert_eq!(count, 2.0, "{text}");
    }
}
