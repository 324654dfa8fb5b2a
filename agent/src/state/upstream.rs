//! What a DestinationRule's `trafficPolicy` says about the connections and the health of a
//! service's endpoints: Istio's `connectionPool` (Envoy's circuit breakers and HTTP pool
//! settings) and `outlierDetection` (Envoy's passive health checking), validated and resolved
//! to Istio's defaults, whatever front end described them.
//!
//! Kept apart from [`super::routes`] (where requests go) because it is a concern of its own: the
//! waypoint's upstream connection pool and outlier detector read it (`waypoint::pool`,
//! `waypoint::outlier`).
use std::time::Duration;

use serde::{Serialize, Serializer};

/// Istio's default for the limits it documents as "2^32-1": unlimited in practice.
pub const UNLIMITED: u32 = u32::MAX;

/// Istio's default `tcp.connectTimeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Istio's default `http.idleTimeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Envoy's `max_ejection_time` default: an ejection never lasts longer (unless
/// `baseEjectionTime` is longer still).
pub const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// The traffic policy of a service or a subset for its endpoints (the parts the waypoint's
/// upstream side reads; the load balancer is in [`super::routes`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamPolicy {
    /// Connection and request limits; `None`: not set here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    /// Ejection of failing endpoints; `None`: not set here (off unless the service sets it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
}

impl UpstreamPolicy {
    /// Whether neither part is set.
    pub fn is_empty(&self) -> bool {
        self.connection_pool.is_none() && self.outlier_detection.is_none()
    }

    /// `self` where set, else `base`: a subset's `trafficPolicy` overrides its service's field
    /// by field (Istio merges `connectionPool` and `outlierDetection` as wholes).
    pub fn over(&self, base: &UpstreamPolicy) -> UpstreamPolicy {
        UpstreamPolicy {
            connection_pool: self
                .connection_pool
                .clone()
                .or_else(|| base.connection_pool.clone()),
            outlier_detection: self
                .outlier_detection
                .clone()
                .or_else(|| base.outlier_detection.clone()),
        }
    }
}

/// Istio's `ConnectionPoolSettings` as Envoy applies them to one cluster (a service, or one of
/// its subsets): limits shared by all its endpoints, connections kept per endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPool {
    /// `tcp.maxConnections`: connections open at once to the cluster's endpoints (Envoy's
    /// `max_connections`).
    pub max_connections: u32,
    /// `tcp.connectTimeout`: opening a connection (the HBONE tunnel and the HTTP handshake).
    #[serde(serialize_with = "duration")]
    pub connect_timeout: Duration,
    /// `http.http1MaxPendingRequests`: requests waiting for a connection at once (Envoy's
    /// `max_pending_requests`); one more is answered 503 `UO`.
    pub max_pending_requests: u32,
    /// `http.http2MaxRequests`: requests in flight at once to the cluster, whatever their HTTP
    /// version (Envoy's `max_requests`).
    pub max_requests: u32,
    /// `http.maxRequestsPerConnection`: requests one connection carries before it is closed; 0:
    /// unlimited.
    pub max_requests_per_connection: u32,
    /// `http.maxRetries`: retries in flight at once to the cluster (Envoy's `max_retries`).
    pub max_retries: u32,
    /// `http.idleTimeout`: a connection with no request in flight that long is closed.
    #[serde(serialize_with = "duration")]
    pub idle_timeout: Duration,
}

impl Default for ConnectionPool {
    /// Istio's defaults: no limit, 10 s to connect, 1 h idle.
    fn default() -> Self {
        Self {
            max_connections: UNLIMITED,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_pending_requests: UNLIMITED,
            max_requests: UNLIMITED,
            max_requests_per_connection: 0,
            max_retries: UNLIMITED,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Istio's `OutlierDetection` resolved as Istio's pilot writes Envoy's: consecutive-error
/// ejection only (Envoy's success-rate ejection is off, as Istio sets it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// 5xx answers (and failures without an answer) in a row that eject an endpoint; 0: never.
    pub consecutive_5xx: u32,
    /// 502, 503 and 504 answers (and failures without an answer) in a row that eject an
    /// endpoint; 0: never.
    pub consecutive_gateway_errors: u32,
    /// How often an ejected endpoint's time is checked and the ejection multiplier decays.
    #[serde(serialize_with = "duration")]
    pub interval: Duration,
    /// An ejection lasts this times the number of times the endpoint was ejected (capped at
    /// [`MAX_EJECTION_TIME`], or this if longer).
    #[serde(serialize_with = "duration")]
    pub base_ejection_time: Duration,
    /// The share of the cluster's endpoints ejected at once, at most (one always can be).
    pub max_ejection_percent: u32,
    /// Below this share of endpoints not ejected, ejections are ignored (Envoy's panic
    /// threshold); 0: never.
    pub min_health_percent: u32,
}

impl Default for OutlierDetection {
    /// Istio's defaults: eject after 5 consecutive 5xx, check every 10 s, 30 s base ejection,
    /// at most 10% ejected, no panic threshold.
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            consecutive_gateway_errors: 0,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
            min_health_percent: 0,
        }
    }
}

fn duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}ms", d.as_millis()))
}
