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

use super::{WaypointRef, resilience::RouteResilience};

/// The routes of every service that has some, by service (`namespace/name`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RouteTable {
    /// Service uid to its routes, first match wins.
    pub by_service: BTreeMap<String, ServiceRoutes>,
}

impl RouteTable {
    /// The routes of the service `namespace/name`, if a route resource names it.
    pub fn for_service(&self, uid: &str) -> Option<&ServiceRoutes> {
        self.by_service.get(uid)
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
    /// Weighted destinations (at least one, weights not all zero).
    pub destinations: Vec<RouteDestination>,

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
}

impl StringMatch {
    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(exact) => value == exact,
            StringMatch::Prefix(prefix) => value.starts_with(prefix.as_str()),
            StringMatch::Regex(regex) => regex.is_match(value),
        }
    }
}

/// A regular expression that must match the whole string, as Envoy's `safe_regex` does.
#[derive(Clone)]
pub struct FullRegex {
    source: String,
    compiled: Arc<regex::Regex>,
}

impl FullRegex {
    /// Compiles `source` (Rust's `regex` syntax, RE2's without its few extensions).
    pub fn new(source: &str) -> Result<Self, regex::Error> {
        let compiled = regex::Regex::new(&format!("^(?:{source})$"))?;
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
}

/// A named subset of a service's endpoints (Istio's DestinationRule subset).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    /// Its name.
    pub name: String,
    /// Labels an endpoint must all carry, beyond the service's selector.
    pub labels: BTreeMap<String, String>,
}
