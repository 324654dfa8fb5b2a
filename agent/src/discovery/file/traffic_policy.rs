//! The upstream parts of a DestinationRule's `trafficPolicy`: `connectionPool` and
//! `outlierDetection`, with Istio's names, defaults and meaning, built into the state's
//! [`UpstreamPolicy`]. Shared by the mesh file and Kubernetes (whose specs are converted with
//! the mesh file's types).
//!
//! As in Istio's API, an integer 0 is "not set" (proto3): it means the default, except where
//! Istio gives 0 a meaning (`maxRequestsPerConnection: 0` is unlimited, `consecutive5xxErrors:
//! 0` and `consecutiveGatewayErrors: 0` disable that detection). Negative numbers and
//! percentages above 100 are refused.
//!
//! The deprecated `outlierDetection.consecutiveErrors` is taken as Istio's pilot takes it
//! (istio/api#617): it counts gateway errors (502, 503, 504 and failures without an answer),
//! and turns off the default 5xx detection; `consecutiveGatewayErrors` and
//! `consecutive5xxErrors`, when set, take precedence.
//!
//! Fields of Istio's API not implemented (`tcp.tcpKeepalive`, `tcp.maxConnectionDuration`,
//! `tcp.idleTimeout`, `http.h2UpgradePolicy`, `http.useClientProtocol`,
//! `http.maxConcurrentStreams`, `outlierDetection.splitExternalLocalOriginErrors`,
//! `consecutiveLocalOriginFailures`) are unknown fields: refused by name.
use serde::{Deserialize, Serialize};

use super::{ConfigError, Validator};
use crate::state::upstream::{ConnectionPool, OutlierDetection, UNLIMITED, UpstreamPolicy};

/// Istio's `ConnectionPoolSettings`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPoolFile {
    /// Settings common to TCP and HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpSettingsFile>,
    /// HTTP settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSettingsFile>,
}

/// Istio's `ConnectionPoolSettings.TCPSettings` (the implemented fields).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpSettingsFile {
    /// Connections to the cluster at once (0: unlimited, Istio's 2^32-1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<i64>,
    /// Connect timeout, e.g. `10s` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
}

/// Istio's `ConnectionPoolSettings.HTTPSettings` (the implemented fields).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpSettingsFile {
    /// Requests waiting for a connection at once (0: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http1_max_pending_requests: Option<i64>,
    /// Requests in flight to the cluster at once (0: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2_max_requests: Option<i64>,
    /// Requests per connection (0: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<i64>,
    /// Retries in flight to the cluster at once (0: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<i64>,
    /// How long an unused connection is kept, e.g. `1h` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
}

/// Istio's `OutlierDetection` (the implemented fields).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetectionFile {
    /// 5xx in a row that eject (default 5; 0: off).
    #[serde(
        default,
        rename = "consecutive5xxErrors",
        skip_serializing_if = "Option::is_none"
    )]
    pub consecutive_5xx_errors: Option<i64>,
    /// 502/503/504 in a row that eject (default off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<i64>,
    /// Deprecated by Istio: gateway errors in a row (see the module's doc).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_errors: Option<i64>,
    /// Sweep interval, e.g. `10s` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// Base ejection time, e.g. `30s` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    /// The share of endpoints ejected at once, at most (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<i64>,
    /// Below this share of healthy endpoints, ejections are ignored (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_health_percent: Option<i64>,
}

impl Validator<'_> {
    /// The `connectionPool` and `outlierDetection` of a `trafficPolicy` at `at`.
    pub(super) fn upstream_policy(
        &self,
        at: &str,
        connection_pool: Option<&ConnectionPoolFile>,
        outlier_detection: Option<&OutlierDetectionFile>,
    ) -> Result<UpstreamPolicy, ConfigError> {
        Ok(UpstreamPolicy {
            connection_pool: connection_pool
                .map(|p| self.connection_pool(&format!("{at}.connectionPool"), p))
                .transpose()?,
            outlier_detection: outlier_detection
                .map(|o| self.outlier_detection(&format!("{at}.outlierDetection"), o))
                .transpose()?,
        })
    }

    fn connection_pool(
        &self,
        at: &str,
        file: &ConnectionPoolFile,
    ) -> Result<ConnectionPool, ConfigError> {
        let mut pool = ConnectionPool::default();
        if let Some(tcp) = &file.tcp {
            let at = format!("{at}.tcp");
            pool.max_connections = self.count(
                &format!("{at}.maxConnections"),
                tcp.max_connections,
                UNLIMITED,
            )?;
            if let Some(timeout) = &tcp.connect_timeout {
                pool.connect_timeout = self.duration(&format!("{at}.connectTimeout"), timeout)?;
            }
        }
        if let Some(http) = &file.http {
            let at = format!("{at}.http");
            pool.max_pending_requests = self.count(
                &format!("{at}.http1MaxPendingRequests"),
                http.http1_max_pending_requests,
                UNLIMITED,
            )?;
            pool.max_requests = self.count(
                &format!("{at}.http2MaxRequests"),
                http.http2_max_requests,
                UNLIMITED,
            )?;
            pool.max_requests_per_connection = self.count(
                &format!("{at}.maxRequestsPerConnection"),
                http.max_requests_per_connection,
                0,
            )?;
            pool.max_retries =
                self.count(&format!("{at}.maxRetries"), http.max_retries, UNLIMITED)?;
            if let Some(timeout) = &http.idle_timeout {
                pool.idle_timeout = self.duration(&format!("{at}.idleTimeout"), timeout)?;
            }
        }
        Ok(pool)
    }

    fn outlier_detection(
        &self,
        at: &str,
        file: &OutlierDetectionFile,
    ) -> Result<OutlierDetection, ConfigError> {
        let mut outlier = OutlierDetection::default();
        let field = |name: &str| format!("{at}.{name}");
        let number = |name: &str, value: Option<i64>| -> Result<Option<u32>, ConfigError> {
            value
                .map(|v| {
                    u32::try_from(v).map_err(|_| {
                        self.invalid(field(name), format!("{v} must be between 0 and 2^32-1"))
                    })
                })
                .transpose()
        };
        // Istio's pilot: the deprecated field counts gateway errors and turns 5xx off.
        if let Some(n) = number("consecutiveErrors", file.consecutive_errors)?
            && n > 0
        {
            outlier.consecutive_gateway_errors = n;
            outlier.consecutive_5xx = 0;
        }
        if let Some(n) = number("consecutive5xxErrors", file.consecutive_5xx_errors)? {
            outlier.consecutive_5xx = n;
        }
        if let Some(n) = number("consecutiveGatewayErrors", file.consecutive_gateway_errors)? {
            outlier.consecutive_gateway_errors = n;
        }
        if let Some(interval) = &file.interval {
            outlier.interval = self.duration(&field("interval"), interval)?;
        }
        if let Some(base) = &file.base_ejection_time {
            outlier.base_ejection_time = self.duration(&field("baseEjectionTime"), base)?;
        }
        // Istio: 0 is "not set" for maxEjectionPercent (default 10).
        if let Some(p) = self.percent(&field("maxEjectionPercent"), file.max_ejection_percent)?
            && p > 0
        {
            outlier.max_ejection_percent = p;
        }
        if let Some(p) = self.percent(&field("minHealthPercent"), file.min_health_percent)? {
            outlier.min_health_percent = p;
        }
        Ok(outlier)
    }

    /// A limit: at least 0, 0 (or absent) meaning `unset`.
    fn count(&self, field: &str, value: Option<i64>, unset: u32) -> Result<u32, ConfigError> {
        match value {
            None | Some(0) => Ok(unset),
            Some(v) if v < 0 => Err(self.invalid(
                field,
                format!("must be >= 0 (got {v}; 0 means Istio's default)"),
            )),
            Some(v) => u32::try_from(v)
                .map_err(|_| self.invalid(field, format!("{v} is more than 2^32-1"))),
        }
    }

    fn percent(&self, field: &str, value: Option<i64>) -> Result<Option<u32>, ConfigError> {
        match value {
            None => Ok(None),
            Some(v @ 0..=100) => Ok(Some(v as u32)),
            Some(v) => Err(self.invalid(field, format!("{v} is not a percentage (0..=100)"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{path::Path, time::Duration};

    use crate::{
        discovery::parse_mesh,
        state::{
            MeshState,
            routes::{RouteDestination, Subset},
            upstream::{ConnectionPool, OutlierDetection, UNLIMITED},
        },
    };

    const MESH: &str = r#"
workloads:
- {name: reviews-v1, namespace: default, node: n0, ips: [10.10.0.3], labels: {app: reviews, version: v1}, netns: {pid: 1}}
services:
- {name: reviews, namespace: default, vips: [10.96.0.10], selector: {app: reviews}, ports: [{port: 9080}], waypoint: {name: waypoint}}
- {name: waypoint, namespace: default, vips: [10.96.0.11], selector: {app: waypoint}, ports: [{port: 15008}]}
"#;

    /// The seed's circuit breaker, unchanged but for `apiVersion` (and the YAML list).
    const SEED_DR: &str = r#"
destinationRules:
- apiVersion: networking.ambit.dev/v1
  kind: DestinationRule
  metadata:
    name: reviews-circuit-breaker
  spec:
    host: reviews
    trafficPolicy:
      connectionPool:
        tcp:
          maxConnections: 100
        http:
          http1MaxPendingRequests: 10
          maxRequestsPerConnection: 2
      outlierDetection:
        consecutiveErrors: 5
        interval: 30s
        baseEjectionTime: 30s
        maxEjectionPercent: 50
"#;

    fn parse(text: &str) -> Result<MeshState, String> {
        parse_mesh(
            Path::new("/etc/mesh.yaml"),
            format!("{MESH}{text}").as_bytes(),
        )
        .map_err(|e| e.to_string())
    }

    fn destination(subset: Option<Subset>) -> RouteDestination {
        RouteDestination {
            service: crate::state::WaypointRef {
                namespace: "default".into(),
                name: "reviews".into(),
            },
            port: None,
            subset,
            weight: 100,
            headers: Default::default(),
        }
    }

    #[test]
    fn the_seed_circuit_breaker_parses_with_istio_defaults_and_consecutive_errors_as_istio() {
        let state = parse(SEED_DR).unwrap();
        let policy = state.routes().upstream_policy(&destination(None));
        assert_eq!(
            policy.connection_pool,
            Some(ConnectionPool {
                max_connections: 100,
                max_pending_requests: 10,
                max_requests_per_connection: 2,
                ..ConnectionPool::default()
            })
        );
        let pool = policy.connection_pool.unwrap();
        assert_eq!(pool.max_requests, UNLIMITED);
        assert_eq!(pool.max_retries, UNLIMITED);
        assert_eq!(pool.idle_timeout, Duration::from_secs(3600));
        assert_eq!(pool.connect_timeout, Duration::from_secs(10));
        // Istio's pilot: the deprecated consecutiveErrors counts gateway errors, 5xx off.
        assert_eq!(
            policy.outlier_detection,
            Some(OutlierDetection {
                consecutive_5xx: 0,
                consecutive_gateway_errors: 5,
                interval: Duration::from_secs(30),
                base_ejection_time: Duration::from_secs(30),
                max_ejection_percent: 50,
                min_health_percent: 0,
            })
        );
    }

    #[test]
    fn every_field_parses_and_a_subset_overrides_field_by_field() {
        let text = r#"
destinationRules:
- apiVersion: networking.ambit.dev/v1
  kind: DestinationRule
  metadata: {name: reviews}
  spec:
    host: reviews
    trafficPolicy:
      connectionPool:
        tcp: {maxConnections: 1, connectTimeout: 250ms}
        http: {http1MaxPendingRequests: 1, http2MaxRequests: 7, maxRequestsPerConnection: 0, maxRetries: 3, idleTimeout: 5s}
      outlierDetection: {consecutive5xxErrors: 2, consecutiveGatewayErrors: 1, consecutiveErrors: 9, interval: 1s, baseEjectionTime: 3s, maxEjectionPercent: 100, minHealthPercent: 20}
    subsets:
    - name: v1
      labels: {version: v1}
      trafficPolicy:
        connectionPool: {tcp: {maxConnections: 4}}
virtualServices:
- apiVersion: networking.ambit.dev/v1
  kind: VirtualService
  metadata: {name: reviews}
  spec:
    hosts: [reviews]
    http:
    - route:
      - destination: {host: reviews, subset: v1}
"#;
        let state = parse(text).unwrap();
        let service = state.routes().upstream_policy(&destination(None));
        let pool = service.connection_pool.clone().unwrap();
        assert_eq!(
            pool,
            ConnectionPool {
                max_connections: 1,
                connect_timeout: Duration::from_millis(250),
                max_pending_requests: 1,
                max_requests: 7,
                max_requests_per_connection: 0,
                max_retries: 3,
                idle_timeout: Duration::from_secs(5),
            }
        );
        // The explicit fields win over the deprecated one.
        let outlier = service.outlier_detection.clone().unwrap();
        assert_eq!(
            (outlier.consecutive_5xx, outlier.consecutive_gateway_errors),
            (2, 1)
        );
        assert_eq!(outlier.min_health_percent, 20);
        // The subset's connection pool replaces the service's; its outlier detection is the
        // service's.
        let v1 = state.routes().by_service["default/reviews"].http[0].destinations[0].clone();
        assert_eq!(v1.subset.as_ref().map(|s| s.name.as_str()), Some("v1"));
        let merged = state.routes().upstream_policy(&v1);
        assert_eq!(merged.connection_pool.unwrap().max_connections, 4);
        assert_eq!(merged.outlier_detection, Some(outlier));
        // Without outlierDetection, none; with an empty one, Istio's defaults (5 x 5xx).
        let empty = SEED_DR.replace(
            "      outlierDetection:\n        consecutiveErrors: 5\n        interval: 30s\n        baseEjectionTime: 30s\n        maxEjectionPercent: 50\n",
            "      outlierDetection: {}\n",
        );
        let state = parse(&empty).unwrap();
        assert_eq!(
            state
                .routes()
                .upstream_policy(&destination(None))
                .outlier_detection,
            Some(OutlierDetection::default())
        );
    }

    #[test]
    fn bad_values_and_unimplemented_fields_name_their_field() {
        let cases = [
            (
                "http1MaxPendingRequests: 10",
                "http1MaxPendingRequests: -1",
                "destinationRules[0].spec.trafficPolicy.connectionPool.http.http1MaxPendingRequests",
            ),
            (
                "maxConnections: 100",
                "maxConnections: 5000000000",
                "destinationRules[0].spec.trafficPolicy.connectionPool.tcp.maxConnections",
            ),
            (
                "maxConnections: 100",
                "maxConnections: 1\n          connectTimeout: soon",
                "destinationRules[0].spec.trafficPolicy.connectionPool.tcp.connectTimeout",
            ),
            (
                "maxRequestsPerConnection: 2",
                "maxRequestsPerConnection: 2\n          idleTimeout: 0s",
                "destinationRules[0].spec.trafficPolicy.connectionPool.http.idleTimeout",
            ),
            (
                "maxEjectionPercent: 50",
                "maxEjectionPercent: 101",
                "destinationRules[0].spec.trafficPolicy.outlierDetection.maxEjectionPercent",
            ),
            (
                "consecutiveErrors: 5",
                "consecutiveErrors: -5",
                "destinationRules[0].spec.trafficPolicy.outlierDetection.consecutiveErrors",
            ),
            (
                "interval: 30s",
                "interval: often",
                "destinationRules[0].spec.trafficPolicy.outlierDetection.interval",
            ),
            (
                "maxConnections: 100",
                "maxConnections: 1\n          tcpKeepalive: {time: 7200s}",
                "unknown field `tcpKeepalive`",
            ),
            (
                "maxRequestsPerConnection: 2",
                "maxRequestsPerConnection: 2\n          h2UpgradePolicy: UPGRADE",
                "unknown field `h2UpgradePolicy`",
            ),
            (
                "consecutiveErrors: 5",
                "consecutiveLocalOriginFailures: 5",
                "unknown field `consecutiveLocalOriginFailures`",
            ),
        ];
        for (from, to, expected) in cases {
            assert!(SEED_DR.contains(from), "{from}");
            let err = parse(&SEED_DR.replace(from, to)).unwrap_err();
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }
}
