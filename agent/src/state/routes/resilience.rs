//! What a route does to a request besides choosing its destination: timeouts, retries,
//! mirrors and injected faults (Istio's `timeout`, `retries`, `mirror`/`mirrors` and `fault` of
//! an `HTTPRoute`), already validated and resolved, whatever front end described them.
//!
//! A child of [`super`] (matches and destinations), in a file of its own because it is a concern
//! of its own: the waypoint's `retry`, `mirror` and `fault` modules read it. A mirror names a
//! [`RouteDestination`], so this module sits below the route model rather than beside it. Percentages are kept as
//! parts per million, as Envoy's `FractionalPercent`, so the model stays exact and comparable.
use std::time::Duration;

use serde::{Serialize, Serializer};

use super::RouteDestination;

/// Istio's retry policy when a route has no `retries` block: 2 retries on
/// `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes` with no
/// retriable status code (Istio's `retry.DefaultPolicy`), previous hosts avoided.
pub const ISTIO_DEFAULT_RETRIES: u32 = 2;

/// Envoy's base backoff interval between retries (its maximum is 10 times it).
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);

/// Timeouts, retries, mirrors and faults of one route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteResilience {
    /// The whole request's budget (every try and the backoff between them), until the
    /// response headers; `None`: no timeout, Istio's default for HTTP.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "optional_duration"
    )]
    pub timeout: Option<Duration>,
    /// Retries.
    pub retries: RetryPolicy,
    /// Where copies of the requests go (fire and forget).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<Mirror>,
    /// Faults injected before the request goes upstream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
}

impl Default for RouteResilience {
    /// Istio's defaults: no timeout, the default retry policy, no mirror, no fault.
    fn default() -> Self {
        Self {
            timeout: None,
            retries: RetryPolicy::default(),
            mirrors: Vec::new(),
            fault: None,
        }
    }
}

/// When and how often a failed try is retried (Envoy's `RetryPolicy` as Istio builds it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Retries after the first try (Istio's `attempts`, Envoy's `num_retries`); 0: none.
    pub attempts: u32,
    /// Each try's budget until its response headers; `None`: only the route's timeout.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "optional_duration"
    )]
    pub per_try_timeout: Option<Duration>,
    /// Which failures are retried.
    pub retry_on: Vec<RetryOn>,
    /// HTTP status codes retried under [`RetryOn::RetriableStatusCodes`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub retriable_status_codes: Vec<u16>,
    /// The backoff's base interval (its cap is 10 times it; full jitter).
    #[serde(serialize_with = "duration")]
    pub backoff: Duration,
    /// Whether a retry avoids the endpoints already tried when others are ready.
    pub ignore_previous_hosts: bool,
}

impl RetryPolicy {
    /// No retries at all (`attempts: 0`).
    pub fn none() -> Self {
        Self {
            attempts: 0,
            ..Self::default()
        }
    }

    /// Whether `condition` is one of the policy's.
    pub fn on(&self, condition: RetryOn) -> bool {
        self.retry_on.contains(&condition)
    }
}

impl Default for RetryPolicy {
    /// Istio's policy for a route without `retries`.
    fn default() -> Self {
        Self {
            attempts: ISTIO_DEFAULT_RETRIES,
            per_try_timeout: None,
            retry_on: vec![
                RetryOn::ConnectFailure,
                RetryOn::RefusedStream,
                RetryOn::Unavailable,
                RetryOn::Cancelled,
                RetryOn::RetriableStatusCodes,
            ],
            retriable_status_codes: Vec::new(),
            backoff: DEFAULT_BACKOFF_BASE,
            ignore_previous_hosts: true,
        }
    }
}

/// One of Envoy's `retry_on` conditions (the HTTP and gRPC ones; Istio passes them through).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum RetryOn {
    /// `5xx`: any 5xx answer, or no answer (connect failure, reset, per-try timeout).
    #[serde(rename = "5xx")]
    FiveXx,
    /// `gateway-error`: a 502, 503 or 504 answer, or no answer.
    #[serde(rename = "gateway-error")]
    GatewayError,
    /// `reset`: no answer (the connection or stream reset, or a per-try timeout).
    #[serde(rename = "reset")]
    Reset,
    /// `reset-before-request`: a reset before the request was sent (a connect failure).
    #[serde(rename = "reset-before-request")]
    ResetBeforeRequest,
    /// `connect-failure`: the endpoint could not be reached.
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    /// `refused-stream`: the endpoint refused the HTTP/2 stream (`REFUSED_STREAM`).
    #[serde(rename = "refused-stream")]
    RefusedStream,
    /// `retriable-4xx`: a 409 answer.
    #[serde(rename = "retriable-4xx")]
    Retriable4xx,
    /// `retriable-status-codes`: an answer with one of the policy's status codes.
    #[serde(rename = "retriable-status-codes")]
    RetriableStatusCodes,
    /// `envoy-ratelimited`: an answer carrying `x-envoy-ratelimited`.
    #[serde(rename = "envoy-ratelimited")]
    EnvoyRateLimited,
    /// gRPC `cancelled` (1) in the response headers.
    #[serde(rename = "cancelled")]
    Cancelled,
    /// gRPC `deadline-exceeded` (4).
    #[serde(rename = "deadline-exceeded")]
    DeadlineExceeded,
    /// gRPC `internal` (13).
    #[serde(rename = "internal")]
    Internal,
    /// gRPC `resource-exhausted` (8).
    #[serde(rename = "resource-exhausted")]
    ResourceExhausted,
    /// gRPC `unavailable` (14).
    #[serde(rename = "unavailable")]
    Unavailable,
}

impl RetryOn {
    /// Every condition, with its name in `retryOn`.
    pub const ALL: [(&'static str, RetryOn); 14] = [
        ("5xx", RetryOn::FiveXx),
        ("gateway-error", RetryOn::GatewayError),
        ("reset", RetryOn::Reset),
        ("reset-before-request", RetryOn::ResetBeforeRequest),
        ("connect-failure", RetryOn::ConnectFailure),
        ("refused-stream", RetryOn::RefusedStream),
        ("retriable-4xx", RetryOn::Retriable4xx),
        ("retriable-status-codes", RetryOn::RetriableStatusCodes),
        ("envoy-ratelimited", RetryOn::EnvoyRateLimited),
        ("cancelled", RetryOn::Cancelled),
        ("deadline-exceeded", RetryOn::DeadlineExceeded),
        ("internal", RetryOn::Internal),
        ("resource-exhausted", RetryOn::ResourceExhausted),
        ("unavailable", RetryOn::Unavailable),
    ];

    /// The condition named `name` in `retryOn`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, c)| *c)
    }

    /// Its name in `retryOn`.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, c)| *c == self)
            .map_or("", |(n, _)| n)
    }
}

/// A copy of the route's requests sent elsewhere (Istio's `mirror`/`mirrors`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Mirror {
    /// Where (its `weight` is unused).
    pub destination: RouteDestination,
    /// Share of the requests copied, in parts per million.
    pub per_million: u32,
}

/// Faults a route injects (Istio's `HTTPFaultInjection`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    /// A delay before the request goes on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// An answer made by the waypoint instead of the upstream's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// Istio's `fault.delay` (`fixedDelay`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    /// How long.
    #[serde(serialize_with = "duration")]
    pub fixed_delay: Duration,
    /// Share of the requests delayed, in parts per million.
    pub per_million: u32,
}

/// Istio's `fault.abort`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    /// What the aborted requests are answered.
    pub error: AbortError,
    /// Share of the requests aborted, in parts per million.
    pub per_million: u32,
}

/// How an aborted request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum AbortError {
    /// This HTTP status.
    HttpStatus(u16),
    /// HTTP 200 with this `grpc-status` (a trailers-only gRPC answer).
    GrpcStatus(u16),
}

/// Whether an event of probability `per_million` / 1,000,000 happens, given a uniform draw in
/// `0..1_000_000`.
pub fn happens(per_million: u32, draw: u32) -> bool {
    draw < per_million
}

fn duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}ms", d.as_millis()))
}

fn optional_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => duration(d, s),
        None => s.serialize_none(),
    }
}
