//! The HTTP route model: what a waypoint does with a request to a service, whatever front end
//! described it (today the mesh file's Istio-shaped `virtualServices` and `destinationRules`;
//! Gateway API HTTPRoute and the Kubernetes CRDs are to feed the same model).
//!
//! It lives in the state, not in the waypoint, because the configuration sources (below the
//! waypoint) build it and the state is the one model every source feeds; the waypoint decides
//! with it (`waypoint::route`). Everything here is already validated and resolved: hosts are
//! services of the mesh, subsets are label sets, ports exist, weights are not all zero.
use std::{collections::BTreeMap, fmt, sync::Arc};

use serde::Serialize;

use self::resilience::RouteResilience;
use super::ratelimit::ServiceRateLimits;
use super::{WaypointRef, upstream::UpstreamPolicy};

pub mod resilience;

/// The routes of every service that has some, by service (`namespace/name`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RouteTable {
    /// Service uid to its routes, first match wins.
    pub by_service: BTreeMap<String, ServiceRoutes>,
    /// Service uid to the load balancer of its endpoints (a DestinationRule's
    /// `trafficPolicy.loadBalancer`); absent: round robin.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub load_balancers: BTreeMap<String, LoadBalancer>,
    /// Service uid to the connection pool and outlier detection of its endpoints (a
    /// DestinationRule's `trafficPolicy`); absent: Istio's defaults, no outlier detection.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub upstream: BTreeMap<String, UpstreamPolicy>,
    /// Service uid to its local rate limits (`RateLimitPolicy`, [`super::ratelimit`]); absent:
    /// none.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub rate_limits: BTreeMap<String, ServiceRateLimits>,
}

impl RouteTable {
    /// The routes of the service `namespace/name`, if a route resource names it.
    pub fn for_service(&self, uid: &str) -> Option<&ServiceRoutes> {
        self.by_service.get(uid)
    }

    /// How `destination` spreads its requests over its endpoints: its subset's policy, else its
    /// service's, else round robin (Istio's: a subset's `trafficPolicy` overrides the host's).
    pub fn load_balancer<'s>(&'s self, destination: &'s RouteDestination) -> &'s LoadBalancer {
        destination
            .subset
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .or_else(|| self.load_balancers.get(&format!("{}", destination.service)))
            .unwrap_or(&LoadBalancer::RoundRobin)
    }

    /// The connection pool and outlier detection of `destination`: its subset's, field by
    /// field over its service's (Istio's merge of a subset's `trafficPolicy`).
    pub fn upstream_policy(&self, destination: &RouteDestination) -> UpstreamPolicy {
        let service = self
            .upstream
            .get(&format!("{}", destination.service))
            .cloned()
            .unwrap_or_default();
        match &destination.subset {
            Some(subset) => subset.upstream.over(&service),
            None => service,
        }
    }
}

/// The name of the cluster (Envoy's word) `destination` is sent to: its service, or one subset
/// of it. Connection limits and outlier detection are kept per cluster, as Envoy's.
pub fn cluster_name(destination: &RouteDestination) -> String {
    match &destination.subset {
        Some(subset) => format!("{}|{}", destination.service, subset.name),
        None => destination.service.to_string(),
    }
}

/// The ordered HTTP routes of one service, from one resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRoutes {
    /// The resource they come from, e.g. `VirtualService shop/reviews`, for logs and metrics.
    pub source: String,
    /// In order: the first route one of whose matches holds takes the request.
    pub http: Vec<HttpRoute>,
}

/// One route: conditions and where matching requests go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    /// The route's name, if the resource gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any one must hold; empty: every request matches.
    pub matches: Vec<HttpMatch>,
    /// Weighted destinations (weights not all zero); empty only when `filters` answers the
    /// request itself (a redirect or a direct response).
    pub destinations: Vec<RouteDestination>,
    /// What the route does to requests and responses besides choosing where they go.
    #[serde(skip_serializing_if = "RouteFilters::is_empty")]
    pub filters: RouteFilters,

    // Resilience (timeouts, retries, mirrors, faults): [`super::resilience`].
    /// Timeouts, retries, mirrors and faults.
    pub resilience: RouteResilience,
}

/// Conditions on a request, all of which must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatch {
    /// On the path (without the query string, as Envoy matches it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri: Option<StringMatch>,
    /// On request headers, by lower-case name.
    pub headers: Vec<HeaderMatch>,
    /// On the method (Istio matches it as a string).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<StringMatch>,
    /// On query parameters (the raw values, not percent-decoded, as Envoy's).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<QueryMatch>,
    /// Headers whose condition must NOT hold (Istio's `withoutHeaders`; a presence condition:
    /// the header must be absent).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub without_headers: Vec<HeaderMatch>,
    /// `uri`'s `exact` and `prefix` ignore ASCII case (not `regex`, as Istio's).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ignore_uri_case: bool,
    /// The service port the client dialled must be this one (a Gateway API route whose
    /// `parentRef` names a port); `None`: any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// A condition on one request header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    /// The header's name, lower case.
    pub name: String,
    /// What its value must be (`None`: present, any value).
    pub value: Option<StringMatch>,
}

/// How a string is matched (Istio's `StringMatch`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum StringMatch {
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// The whole string matches the RE2-style expression.
    Regex(FullRegex),
    /// Gateway API's `PathPrefix`: the path's leading `/`-separated elements are the prefix's
    /// (`/foo` matches `/foo` and `/foo/bar`, not `/foobar`; a trailing `/` is ignored).
    PathPrefix(String),
}

impl StringMatch {
    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(exact) => value == exact,
            StringMatch::Prefix(prefix) => value.starts_with(prefix.as_str()),
            StringMatch::Regex(regex) => regex.is_match(value),
            StringMatch::PathPrefix(prefix) => {
                let prefix = prefix.trim_end_matches('/');
                value.starts_with(prefix)
                    && (value.len() == prefix.len() || value.as_bytes()[prefix.len()] == b'/')
            }
        }
    }
}

/// A regular expression that must match the whole string, as Envoy's `safe_regex` does.
#[derive(Clone)]
pub struct FullRegex {
    source: String,
    compiled: Arc<regex::Regex>,
}

/// The longest expression a route may hold, in bytes.
pub const MAX_REGEX_LEN: usize = 1024;

/// The most memory one compiled expression may take (the `regex` crate's own default is
/// 10 MiB). Every agent, waypoint and the CA compile every route's expressions on each rebuild,
/// so one namespace's routes must not be able to make them all spend much: like Envoy's RE2
/// program-size limit, an expression over it is refused.
const MAX_REGEX_PROGRAM: usize = 256 * 1024;

impl FullRegex {
    /// Compiles `source` (Rust's `regex` syntax, RE2's without its few extensions); longer
    /// than [`MAX_REGEX_LEN`] or compiling to too large a program, it is refused.
    pub fn new(source: &str) -> Result<Self, regex::Error> {
        if source.len() > MAX_REGEX_LEN {
            return Err(regex::Error::Syntax(format!(
                "the expression is {} bytes long, more than the {MAX_REGEX_LEN} allowed",
                source.len()
            )));
        }
        let compiled = regex::RegexBuilder::new(&format!("^(?:{source})$"))
            .size_limit(MAX_REGEX_PROGRAM)
            .dfa_size_limit(MAX_REGEX_PROGRAM)
            .build()?;
        Ok(Self {
            source: source.to_string(),
            compiled: Arc::new(compiled),
        })
    }

    /// Whether the whole of `value` matches.
    pub fn is_match(&self, value: &str) -> bool {
        self.compiled.is_match(value)
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl fmt::Debug for FullRegex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.source)
    }
}

impl PartialEq for FullRegex {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for FullRegex {}

impl Serialize for FullRegex {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.source)
    }
}

/// Where a route sends a share of its requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteDestination {
    /// The destination service (`namespace`, `name`).
    pub service: WaypointRef,
    /// The service port; `None`: the port the client dialled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The subset of the service's endpoints, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset: Option<Subset>,
    /// Relative share of the route's requests (0: none).
    pub weight: u32,
    /// Header operations for requests sent to this destination (applied before the route's).
    #[serde(skip_serializing_if = "HeaderRules::is_empty")]
    pub headers: HeaderRules,
}

/// A named subset of a service's endpoints (Istio's DestinationRule subset).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    /// Its name.
    pub name: String,
    /// Labels an endpoint must all carry, beyond the service's selector.
    pub labels: BTreeMap<String, String>,
    /// Its own load balancer (the subset's `trafficPolicy`), overriding the service's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    /// Its own connection pool and outlier detection, overriding the service's.
    #[serde(skip_serializing_if = "UpstreamPolicy::is_empty")]
    pub upstream: UpstreamPolicy,
}

// ---------------------------------------------------------------------------------------------
// Matches beyond path and headers: query parameters, gRPC.

/// A condition on one query parameter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QueryMatch {
    /// The parameter's name, as written in the query string.
    pub name: String,
    /// What its (first) value must be (`None`: present, any value).
    pub value: Option<StringMatch>,
}

impl HttpMatch {
    /// The match of a gRPC method (Gateway API `GRPCRoute`'s `method: {service, method}`): gRPC
    /// requests are `POST /<package.Service>/<Method>`, so it is a path match. Both given: that
    /// method; only the service: its methods; only the method: that method of any service;
    /// neither: any request.
    pub fn grpc(service: Option<&str>, method: Option<&str>) -> Result<HttpMatch, regex::Error> {
        let uri = match (service, method) {
            (Some(service), Some(method)) => {
                Some(StringMatch::Exact(format!("/{service}/{method}")))
            }
            (Some(service), None) => Some(StringMatch::Prefix(format!("/{service}/"))),
            (None, Some(method)) => Some(StringMatch::Regex(FullRegex::new(&format!(
                "/[^/]+/{}",
                regex::escape(method)
            ))?)),
            (None, None) => None,
        };
        Ok(HttpMatch {
            uri,
            ..HttpMatch::default()
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Filters: header operations, rewrite, redirect, direct response.

/// What a route does besides choosing a destination (Istio's `headers`, `rewrite`, `redirect`,
/// `directResponse`). At most one of `redirect` and `direct_response`, and then no
/// destinations and no `rewrite`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteFilters {
    /// Header operations (after the destination's).
    #[serde(skip_serializing_if = "HeaderRules::is_empty")]
    pub headers: HeaderRules,
    /// Rewrites of the request sent on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    /// Answer with a redirect instead of forwarding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
    /// Answer with a fixed response instead of forwarding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<DirectResponse>,
}

impl RouteFilters {
    /// Whether it does nothing.
    pub fn is_empty(&self) -> bool {
        self == &RouteFilters::default()
    }
}

/// Header operations on requests and on responses (Istio's `Headers`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderRules {
    /// On the request sent on.
    pub request: HeaderOps,
    /// On the response sent back.
    pub response: HeaderOps,
}

impl HeaderRules {
    /// Whether it does nothing.
    pub fn is_empty(&self) -> bool {
        self.request.is_empty() && self.response.is_empty()
    }
}

/// Istio's `HeaderOperations`, applied in Envoy's order: `remove`, then `set`, then `add`.
/// Names are lower case and valid, values valid header values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderOps {
    /// Replace (or create) the header with this value.
    pub set: Vec<(String, String)>,
    /// Append this value (a further field line of the header).
    pub add: Vec<(String, String)>,
    /// Remove every value of these headers.
    pub remove: Vec<String>,
}

impl HeaderOps {
    /// Whether it does nothing.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// Istio's `HTTPRewrite`: what the request sent on says instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rewrite {
    /// Replaces the path part the `uri` match took: a `prefix` match's prefix (the rest of the
    /// path kept), the whole path for `exact` and `regex`, and the leading `/` when the match
    /// entry has no `uri` (as Istio, whose catch-all is prefix `/`). The query string is kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// Replaces the `host`/`:authority`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// `uri` replaces the whole path, whatever the match took (Gateway API's
    /// `ReplaceFullPath`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub full_path: bool,
}

/// Istio's `HTTPRedirect`: a redirect answered by the waypoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Redirect {
    /// The new path (with its own query string if it has one, else the request's is kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// The new authority (host, and port if it has one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// The new port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The new scheme (`http` or `https`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// The status: 301 (Istio's default), 302, 303, 307 or 308.
    pub code: u16,
}

/// Istio's `HTTPDirectResponse`: a fixed answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DirectResponse {
    /// The status code.
    pub status: u16,
    /// The body, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Load balancing (a DestinationRule's `trafficPolicy.loadBalancer`).

/// How a destination's requests are spread over its endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancer {
    /// In turn (Istio's default).
    #[default]
    RoundRobin,
    /// The one with fewer requests in flight of two picked at random ("power of two choices").
    LeastRequest,
    /// At random.
    Random,
    /// By a hash of something in the request, on a Maglev table: a key stays on one endpoint,
    /// and a change of endpoints moves about the changed share of keys.
    ConsistentHash(ConsistentHash),
}

/// A consistent-hash balancer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsistentHash {
    /// What is hashed.
    pub key: HashKey,
    /// The Maglev table's size, a prime (Envoy's default 65537).
    pub table_size: u32,
}

/// What a consistent hash is computed from. A request without it is balanced at random (as
/// Envoy's, when a hash policy yields no hash), except a cookie with a `ttl`, which is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum HashKey {
    /// A request header (lower-case name).
    Header(String),
    /// A cookie; with a `ttl`, the waypoint creates it when absent (`Set-Cookie`).
    Cookie {
        /// Its name.
        name: String,
        /// The `Path` of a created cookie.
        path: Option<String>,
        /// The `Max-Age` of a created cookie, in seconds; `None`: never created.
        ttl_seconds: Option<u64>,
    },
    /// The client's address.
    SourceIp,
    /// A query parameter.
    QueryParameter(String),
}
