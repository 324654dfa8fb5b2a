//! The waypoint's metrics: Istio's HTTP metrics, reporter `waypoint`, with Istio's standard
//! labels so that dashboards and Kiali's graph read them unchanged: `istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes` and `istio_response_bytes`.
//!
//! One series per (source, destination, service, protocol, response code, gRPC status, flags);
//! the request path, method and port are not labels (they would multiply series by whatever
//! clients send). All four are recorded once per request, when its response stream ends (as
//! Envoy's stats filter does): a gRPC status sent in the trailers is known only then, and a long
//! stream is counted when it is done.
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};

use crate::{
    identity::SpiffeId,
    proxy::metrics::ConnectionLabels,
    state::{Service, Workload},
    telemetry::{
        istio::{Reporter, SecurityPolicy},
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

/// The position of the label `name` in [`REQUEST_LABEL_NAMES`]; a name that is not there fails
/// the build where a constant is made of it.
pub const fn label_index(name: &str) -> usize {
    let mut i = 0;
    while i < REQUEST_LABEL_NAMES.len() {
        let (a, b) = (REQUEST_LABEL_NAMES[i].as_bytes(), name.as_bytes());
        if a.len() == b.len() {
            let mut j = 0;
            while j < a.len() && a[j] == b[j] {
                j += 1;
            }
            if j == a.len() {
                return i;
            }
        }
        i += 1;
    }
    panic!("not a label of istio_requests_total")
}

// The labels the access-log line and the span repeat, by position in REQUEST_LABEL_NAMES.
/// `destination_service`'s position in [`REQUEST_LABEL_NAMES`].
pub const DESTINATION_SERVICE: usize = label_index("destination_service");
/// `destination_workload`'s position in [`REQUEST_LABEL_NAMES`].
pub const DESTINATION_WORKLOAD: usize = label_index("destination_workload");
/// `destination_principal`'s position in [`REQUEST_LABEL_NAMES`].
pub const DESTINATION_PRINCIPAL: usize = label_index("destination_principal");
/// `response_code`'s position in [`REQUEST_LABEL_NAMES`].
pub const RESPONSE_CODE: usize = label_index("response_code");
/// `grpc_response_status`'s position in [`REQUEST_LABEL_NAMES`].
pub const GRPC_RESPONSE_STATUS: usize = label_index("grpc_response_status");
/// `response_flags`'s position in [`REQUEST_LABEL_NAMES`].
pub const RESPONSE_FLAGS: usize = label_index("response_flags");

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
    /// The upstream's response stream failed after its headers were sent (`UR`).
    UpstreamReset,
    /// The client went away before the response ended (`DC`).
    DownstreamDisconnect,
    /// Refused by a local rate limit (`RL`, answered 429; `waypoint::ratelimit`).
    RateLimited,
    /// Nothing moved for the stream idle timeout before the answer (`SI`, answered 408;
    /// `waypoint::idle`).
    StreamIdleTimeout,
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
            RequestFlags::UpstreamReset => "UR",
            RequestFlags::DownstreamDisconnect => "DC",
            RequestFlags::RateLimited => "RL",
            RequestFlags::StreamIdleTimeout => "SI",
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
    grpc_status: Option<u32>,
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
            grpc_status: None,
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

    /// The gRPC status the response ended with (`grpc-status`, from its trailers or, for a
    /// trailers-only response, its headers).
    pub fn with_grpc_status(mut self, status: Option<u32>) -> Self {
        self.grpc_status = status;
        self
    }

    /// Why the request ended as it did, when that is learnt after its response headers.
    pub fn with_flags(mut self, flags: RequestFlags) -> Self {
        self.flags = flags;
        self
    }

    /// Whether the request is gRPC.
    pub fn is_grpc(&self) -> bool {
        self.protocol == "grpc"
    }

    /// Whether the request failed: answered with an error status (400 and above) or none,
    /// with response flags, with a `grpc-status` other than OK whatever the request's
    /// content type said (a client must not make its failures look successful by naming
    /// another), or, for gRPC, with no status at all (UNKNOWN, as its `grpc_response_status`
    /// label says). A failed request's access-log line is never sampled out.
    pub fn failed(&self) -> bool {
        let grpc_failed = match self.grpc_status {
            Some(status) => status != 0,
            None => self.is_grpc() && grpc_status_of_http(self.response_code) != 0,
        };
        !(100..400).contains(&self.response_code) || self.flags != RequestFlags::None || grpc_failed
    }

    /// Calls `f` with the label values, in the order of [`REQUEST_LABEL_NAMES`] (index them
    /// with [`label_index`]): the request's metrics and its access-log line take them from
    /// one call.
    pub fn with_values<R>(&self, f: impl FnOnce(&[&str; 25]) -> R) -> R {
        let (code, grpc) = self.owned_values();
        f(&self.values(&code, &grpc))
    }

    /// The values that are numbers, as text: the response code and the gRPC status.
    fn owned_values(&self) -> (String, String) {
        (self.response_code.to_string(), self.grpc_status_value())
    }

    /// `grpc_response_status`, as Istio's stats filter sets it: empty for a request that is
    /// not gRPC; for a gRPC request, the `grpc-status` the response ended with, or when it
    /// sent none, the status its HTTP status maps to ([`grpc_status_of_http`]).
    fn grpc_status_value(&self) -> String {
        if !self.is_grpc() {
            return String::new();
        }
        self.grpc_status
            .unwrap_or_else(|| grpc_status_of_http(self.response_code))
            .to_string()
    }

    /// The label values, in the order of [`REQUEST_LABEL_NAMES`]: the connection's peers
    /// (the first 20 of [`crate::proxy::metrics::TCP_LABEL_NAMES`]), then the request's own.
    fn values<'a>(&'a self, response_code: &'a str, grpc_status: &'a str) -> [&'a str; 25] {
        let peers = self.peers.values();
        std::array::from_fn(|i| match i {
            0..20 => peers[i],
            20 => self.protocol,
            21 => response_code,
            22 => grpc_status,
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

/// The gRPC status of a response that carries no `grpc-status`, from its HTTP status (Envoy's
/// `httpToGrpcStatus`, after gRPC's "HTTP to gRPC status code mapping"): a 200 without a
/// status is UNKNOWN too.
pub fn grpc_status_of_http(code: u16) -> u32 {
    match code {
        400 => 13,             // INTERNAL
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 => 12,             // UNIMPLEMENTED
        429 | 502..=504 => 14, // UNAVAILABLE
        _ => 2,                // UNKNOWN
    }
}

/// The bounds of the three histograms: Envoy's default buckets, which Istio keeps for its
/// duration (milliseconds) and size (bytes) histograms alike.
pub const ISTIO_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// What was measured of one request, besides its labels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestMeasures {
    /// From the request's arrival to the end of its response stream.
    pub duration: Duration,
    /// Request body bytes read from the client.
    pub request_bytes: u64,
    /// Response body bytes sent to the client.
    pub response_bytes: u64,
}

/// The waypoint's metric families.
pub struct WaypointMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    request_bytes: HistogramVec,
    response_bytes: HistogramVec,
}

impl WaypointMetrics {
    /// Creates the families and registers them in `metrics`.
    pub fn new(metrics: &Metrics) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "istio_requests_total",
                "Requests handled, counted when their response stream ends",
            ),
            &REQUEST_LABEL_NAMES,
        )?;
        let histogram = |name: &str, help: &str| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(ISTIO_BUCKETS.to_vec()),
                &REQUEST_LABEL_NAMES,
            )
        };
        let duration = histogram(
            "istio_request_duration_milliseconds",
            "From a request's arrival to the end of its response stream, in milliseconds",
        )?;
        let request_bytes = histogram("istio_request_bytes", "Request body sizes, in bytes")?;
        let response_bytes = histogram("istio_response_bytes", "Response body sizes, in bytes")?;
        metrics.register(Box::new(requests.clone()))?;
        metrics.register(Box::new(duration.clone()))?;
        metrics.register(Box::new(request_bytes.clone()))?;
        metrics.register(Box::new(response_bytes.clone()))?;
        Ok(Self {
            requests,
            duration,
            request_bytes,
            response_bytes,
        })
    }

    /// Records one request whose response stream ended, labelled with `values`
    /// ([`RequestLabels::with_values`]).
    pub fn request(&self, values: &[&str; 25], measures: &RequestMeasures) {
        self.requests.with_label_values(values).inc();
        self.duration
            .with_label_values(values)
            .observe(measures.duration.as_secs_f64() * 1000.0);
        self.request_bytes
            .with_label_values(values)
            .observe(measures.request_bytes as f64);
        self.response_bytes
            .with_label_values(values)
            .observe(measures.response_bytes as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::exposition::{parse, promtool_check_allowing, series};

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
            capture_exclusions: Default::default(),
        }
    }

    /// What a request's access-log line is kept for whatever the sampling: an error status or
    /// none, response flags, a gRPC status other than OK.
    #[test]
    fn a_request_failed_by_its_status_flags_or_grpc_status() {
        let http = |code| RequestLabels::new().with_response(code, RequestFlags::None);
        assert!(!http(200).failed());
        assert!(!http(302).failed());
        assert!(http(404).failed());
        assert!(http(503).failed());
        assert!(http(0).failed(), "no response at all");
        assert!(http(200).with_flags(RequestFlags::UpstreamReset).failed());
        let grpc = |status| http(200).with_protocol(true).with_grpc_status(status);
        assert!(!grpc(Some(0)).failed());
        assert!(grpc(Some(5)).failed());
        assert!(grpc(None).failed(), "no grpc-status: UNKNOWN");
        assert!(
            http(200).with_grpc_status(Some(7)).failed(),
            "a grpc-status other than OK on a request not announced as gRPC"
        );
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
        let measures = RequestMeasures {
            duration: Duration::from_millis(7),
            request_bytes: 300,
            response_bytes: 120,
        };
        labels.with_values(|values| {
            waypoint.request(values, &measures);
            waypoint.request(values, &measures);
        });
        let grpc = labels.clone().with_protocol(true).with_grpc_status(Some(5));
        grpc.with_values(|values| waypoint.request(values, &measures));
        let text = metrics.encode();
        // Istio's name, which Kiali and Istio's dashboards read, is in milliseconds.
        promtool_check_allowing(
            &text,
            &[
                "istio_request_duration_milliseconds use base unit \"seconds\" instead of \"milliseconds\"",
            ],
        );
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
        assert_eq!(all.len(), 2, "{text}");
        let (labels, count) = all
            .iter()
            .copied()
            .find(|(l, _)| l.get("request_protocol").map(String::as_str) == Some("http"))
            .unwrap();
        // Not gRPC: the label is empty, as Envoy's stats filter leaves it.
        assert_eq!(
            labels.get("grpc_response_status").map(String::as_str),
            Some("")
        );
        let (grpc_labels, _) = all
            .iter()
            .copied()
            .find(|(l, _)| l.get("request_protocol").map(String::as_str) == Some("grpc"))
            .unwrap();
        assert_eq!(
            grpc_labels.get("grpc_response_status").map(String::as_str),
            Some("5"),
            "{text}"
        );
        // The histograms have the counter's labels, Istio's buckets, and what was measured:
        // 7 ms falls in (5, 10], 120 bytes in (100, 250], 300 in (250, 500].
        for (family, le_below, le_at) in [
            ("istio_request_duration_milliseconds", "5", "10"),
            ("istio_response_bytes", "100", "250"),
            ("istio_request_bytes", "250", "500"),
        ] {
            let buckets = series(&samples, &format!("{family}_bucket"));
            let bucket = |le: &str| {
                buckets
                    .iter()
                    .filter(|(l, _)| {
                        l.get("le").map(String::as_str) == Some(le)
                            && l.get("request_protocol").map(String::as_str) == Some("http")
                    })
                    .map(|(_, v)| *v)
                    .sum::<f64>()
            };
            assert_eq!(bucket(le_at), 2.0, "{family} le={le_at}: {text}");
            assert_eq!(bucket(le_below), 0.0, "{family} le={le_below}: {text}");
            assert_eq!(
                buckets.len(),
                2 * (ISTIO_BUCKETS.len() + 1),
                "{family}: {text}"
            );
            let count = series(&samples, &format!("{family}_count"));
            assert_eq!(count.len(), 2, "{family}: {text}");
            assert_eq!(
                count[0].0.len(),
                REQUEST_LABEL_NAMES.len(),
                "{family}: {text}"
            );
        }
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
