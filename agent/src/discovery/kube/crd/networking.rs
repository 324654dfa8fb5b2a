//! `networking.ambit.dev/v1`: Istio's `networking.istio.io/v1` `VirtualService` and
//! `DestinationRule`, field for field, as typed Rust.
//!
//! These types are the source of the CRDs' schemas (`cargo xtask crds`; [`super`]). Nobody
//! parses routes with them: [`crate::discovery::kube::routes`] keeps a resource's `spec` as JSON
//! and converts it with the mesh file's routing conversion, so that a field Ambit does not
//! implement is seen and reported (status condition `Accepted=False`, reason
//! `UnsupportedField`), never dropped while parsing.
//!
//! Every field of Istio's HTTP routing is in the schema, so that the API server keeps it for the
//! conversion to reject rather than pruning it. The parts of Istio's API a waypoint has no use
//! for at all (`tls` and `tcp` routes, a DestinationRule's TLS settings and per-port settings)
//! are objects whose content the schema does not describe: the API server refuses their fields
//! under strict validation (kubectl's default), or prunes them and keeps the empty object,
//! which the conversion rejects by name. When the waypoint
//! implements a field, its conversion accepts it (`discovery::file::routing`): the schema here
//! already has it.
//!
//! Doc comments on these types are the schema's descriptions (`kubectl explain`): they are
//! written for a cluster's users.
use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::{JsonSchema, Schema, json_schema};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::discovery::kube::security::PolicyStatus;

/// The sentence ending the description of a part of Istio's API a waypoint does not use.
macro_rules! not_for_waypoints {
    () => {
        "Not supported by Ambit's waypoints: a resource using it is rejected (status condition \
         Accepted=False, reason UnsupportedField) and its last accepted version stays in force."
    };
}

/// Istio's networking.istio.io/v1 VirtualService spec: HTTP routing by Ambit's waypoints.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[allow(
    clippy::duplicated_attributes,
    reason = "each printcolumn(...) of #[kube] has its own type_ = \"string\""
)]
#[kube(
    group = "networking.ambit.dev",
    version = "v1",
    kind = "VirtualService",
    namespaced,
    status = "PolicyStatus",
    category = "ambit",
    shortname = "avs",
    label("app.kubernetes.io/part-of", "ambit"),
    printcolumn(name = "Hosts", type_ = "string", json_path = ".spec.hosts"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Accepted")].status"#
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    doc = "HTTP routing of services bound to a waypoint (Istio's VirtualService)."
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    /// The services routed: a short name (in the resource's namespace), `name.namespace` or
    /// the FQDN `name.namespace.svc.cluster.local`. Wildcards and external hosts are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub hosts: Option<Vec<String>>,
    #[doc = concat!("Istio's gateways the routes apply to. ", not_for_waypoints!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateways: Option<Vec<String>>,
    /// HTTP routes, in order: the first whose match holds takes the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<Vec<HttpRoute>>,
    #[doc = concat!("TLS routes. ", not_for_waypoints!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "unsupported_list")]
    pub tls: Option<Vec<Value>>,
    #[doc = concat!("TCP routes. ", not_for_waypoints!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "unsupported_list")]
    pub tcp: Option<Vec<Value>>,
    #[doc = concat!("Namespaces the resource is visible to. ", not_for_waypoints!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_to: Option<Vec<String>>,
}

/// One HTTP route (Istio's HTTPRoute).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    /// The route's name, in logs and the access log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Conditions, any one of which selects the route (absent: every request).
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matches: Option<Vec<HttpMatchRequest>>,
    /// Weighted destinations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<Vec<HttpRouteDestination>>,
    /// An HTTP redirect answered instead of routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<HttpRedirect>,
    /// A response answered instead of routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<HttpDirectResponse>,
    #[doc = concat!("Istio's delegation to another VirtualService. ", not_for_waypoints!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegate: Option<Delegate>,
    /// Path and authority rewrites before forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<HttpRewrite>,
    /// The request's timeout, e.g. `5s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<HttpRetry>,
    /// Fault injection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<HttpFaultInjection>,
    /// A destination a copy of each request is sent to (responses ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Destination>,
    /// Several mirrors, each with its percentage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirrors: Option<Vec<HttpMirrorPolicy>>,
    /// The share of requests mirrored to `mirror`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_percentage: Option<Percent>,
    /// The share of requests mirrored, in whole percent (deprecated by Istio for
    /// `mirrorPercentage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub mirror_percent: Option<i64>,
    /// CORS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors_policy: Option<CorsPolicy>,
    /// Header changes on requests and responses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
}

/// Conditions on a request, all of which must hold (Istio's HTTPMatchRequest).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatchRequest {
    /// The match's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// On the path (without the query string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<StringMatch>,
    /// On the URI scheme.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<StringMatch>,
    /// On the method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<StringMatch>,
    /// On the authority (Host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<StringMatch>,
    /// On request headers, by lower-case name; `{}` requires presence only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, StringMatch>>,
    /// On the port dialled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i64>,
    /// On the source workload's labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_labels: Option<BTreeMap<String, String>>,
    #[doc = concat!("Istio's gateways the match applies to. ", not_for_waypoints!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateways: Option<Vec<String>>,
    /// On query parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_params: Option<BTreeMap<String, StringMatch>>,
    /// Whether `uri` ignores case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore_uri_case: Option<bool>,
    /// Headers that must not match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub without_headers: Option<BTreeMap<String, StringMatch>>,
    /// On the source workload's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_namespace: Option<String>,
    /// Istio's statistics prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stat_prefix: Option<String>,
}

/// How a string is matched: exactly one of `exact`, `prefix`, `regex` (RE2 syntax, whole
/// string).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StringMatch {
    /// Equal to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// Starting with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Matching the whole expression (RE2 syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// A weighted destination (Istio's HTTPRouteDestination).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteDestination {
    /// Where.
    pub destination: Destination,
    /// Relative share (absent: 0, or all of it for a route's only destination).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub weight: Option<i64>,
    /// Header changes for this destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
}

/// A service and, optionally, a subset and port (Istio's Destination).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    /// The service: short name, `name.namespace` or FQDN.
    #[schemars(length(min = 1))]
    pub host: String,
    /// A subset defined by the DestinationRule of that service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// The service port (absent: the port the client dialled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortSelector>,
}

/// A port (Istio's PortSelector).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortSelector {
    /// The port number.
    #[schemars(range(min = 1, max = 65535))]
    pub number: i64,
}

/// Istio's HTTPRedirect.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpRedirect {
    /// The path of the redirect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// The authority of the redirect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// The port of the redirect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i64>,
    /// `FROM_PROTOCOL_DEFAULT` or `FROM_REQUEST_PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derive_port: Option<String>,
    /// The scheme of the redirect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// The status (default 301).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_code: Option<i64>,
}

/// Istio's HTTPDirectResponse.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpDirectResponse {
    /// The status.
    pub status: i64,
    /// The body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<HttpBody>,
}

/// Istio's HTTPBody: one of `string`, `bytes`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpBody {
    /// Text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub string: Option<String>,
    /// Base64 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<String>,
}

/// Istio's Delegate.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Delegate {
    /// The VirtualService's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Its namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Istio's HTTPRewrite.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpRewrite {
    /// Replaces the matched part of the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// Replaces the authority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// A regular-expression rewrite of the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

/// Istio's RegexRewrite.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegexRewrite {
    /// The expression (RE2 syntax).
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matches: Option<String>,
    /// The replacement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<String>,
}

/// Istio's HTTPRetry.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpRetry {
    /// How many retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub attempts: Option<i64>,
    /// The timeout of each try, e.g. `2s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    /// The conditions retried, comma-separated (`5xx,gateway-error,reset,...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<String>,
    /// Whether to retry in other localities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_remote_localities: Option<bool>,
    /// Whether to avoid the hosts already tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_ignore_previous_hosts: Option<bool>,
    /// The base interval between retries, e.g. `25ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
}

/// Istio's HTTPFaultInjection.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpFaultInjection {
    /// A delay before forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// An error answered instead of forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// Istio's HTTPFaultInjection.Delay.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    /// The delay, e.g. `5s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed_delay: Option<String>,
    /// The share of requests delayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
    /// The share of requests delayed, in whole percent (deprecated by Istio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<i64>,
    /// An exponential delay (not implemented by Istio either).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exponential_delay: Option<String>,
}

/// Istio's HTTPFaultInjection.Abort.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    /// The HTTP status answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<i64>,
    /// The gRPC status answered (e.g. `UNAVAILABLE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<String>,
    /// The HTTP/2 error answered (not implemented by Istio either).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2_error: Option<String>,
    /// The share of requests aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
}

/// Istio's HTTPMirrorPolicy.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpMirrorPolicy {
    /// Where copies go.
    pub destination: Destination,
    /// The share of requests copied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
}

/// A percentage, 0 to 100 (Istio's Percent).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Percent {
    /// The percentage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub value: Option<f64>,
}

/// Istio's CorsPolicy.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CorsPolicy {
    /// Allowed origins, exactly (deprecated by Istio for `allowOrigins`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_origin: Option<Vec<String>>,
    /// Allowed origins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_origins: Option<Vec<StringMatch>>,
    /// Allowed methods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_methods: Option<Vec<String>>,
    /// Allowed headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_headers: Option<Vec<String>>,
    /// Exposed headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expose_headers: Option<Vec<String>>,
    /// How long a preflight may be cached, e.g. `24h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<String>,
    /// Whether credentials are allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_credentials: Option<bool>,
    /// `UNSPECIFIED`, `FORWARD` or `IGNORE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unmatched_preflights: Option<String>,
}

/// Istio's Headers: changes to requests and responses.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Headers {
    /// On the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<HeaderOperations>,
    /// On the response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<HeaderOperations>,
}

/// Istio's Headers.HeaderOperations.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeaderOperations {
    /// Replaced or added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set: Option<BTreeMap<String, String>>,
    /// Appended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add: Option<BTreeMap<String, String>>,
    /// Removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove: Option<Vec<String>>,
}

/// Istio's networking.istio.io/v1 DestinationRule spec: subsets (and traffic policies) of a
/// service for Ambit's waypoints.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[allow(
    clippy::duplicated_attributes,
    reason = "each printcolumn(...) of #[kube] has its own type_ = \"string\""
)]
#[kube(
    group = "networking.ambit.dev",
    version = "v1",
    kind = "DestinationRule",
    namespaced,
    status = "PolicyStatus",
    category = "ambit",
    shortname = "adr",
    label("app.kubernetes.io/part-of", "ambit"),
    printcolumn(name = "Host", type_ = "string", json_path = ".spec.host"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Accepted")].status"#
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    doc = "Subsets of a service for waypoint routing (Istio's DestinationRule)."
)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    /// The service: short name (in the resource's namespace), `name.namespace` or FQDN.
    #[schemars(length(min = 1))]
    pub host: String,
    /// Policies for the traffic to the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
    /// Named subsets of the service's endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subsets: Option<Vec<Subset>>,
    #[doc = concat!("Namespaces the resource is visible to. ", not_for_waypoints!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_to: Option<Vec<String>>,
    #[doc = concat!("The workloads the rule applies to. ", not_for_waypoints!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<WorkloadSelector>,
}

/// A subset: the endpoints carrying all the labels (Istio's Subset).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    /// Its name, unique in the rule.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Labels an endpoint must carry, beyond the service's selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Policies for the traffic to this subset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// Istio's WorkloadSelector.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Labels a workload must carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_labels: Option<BTreeMap<String, String>>,
}

/// Istio's TrafficPolicy.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    /// How endpoints are picked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSettings>,
    /// Connection and request limits to the endpoints (circuit breaking).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPoolSettings>,
    /// Ejection of endpoints that fail in a row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[doc = concat!("TLS to the endpoints (the mesh's is HBONE). ", not_for_waypoints!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "unsupported_object")]
    pub tls: Option<Value>,
    #[doc = concat!("Per-port policies. ", not_for_waypoints!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "unsupported_list")]
    pub port_level_settings: Option<Vec<Value>>,
    #[doc = concat!("Tunnel settings. ", not_for_waypoints!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "unsupported_object")]
    pub tunnel: Option<Value>,
    #[doc = concat!("PROXY protocol. ", not_for_waypoints!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "unsupported_object")]
    pub proxy_protocol: Option<Value>,
}

/// Istio's ConnectionPoolSettings.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPoolSettings {
    /// Settings common to TCP and HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpSettings>,
    /// HTTP settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSettings>,
}

/// Istio's ConnectionPoolSettings.TCPSettings.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TcpSettings {
    /// Connections open at once to the endpoints of the service (or subset); 0 or absent:
    /// unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_connections: Option<i64>,
    /// Timeout to open a connection, e.g. `10s` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    #[doc = concat!("TCP keepalive. ", not_for_waypoints!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "unsupported_object")]
    pub tcp_keepalive: Option<Value>,
    #[doc = concat!("Maximum connection duration. ", not_for_waypoints!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connection_duration: Option<String>,
    #[doc = concat!("TCP idle timeout. ", not_for_waypoints!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
}

/// Istio's ConnectionPoolSettings.HTTPSettings.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpSettings {
    /// Requests waiting for a connection at once; more are answered 503 (flag UO). 0 or
    /// absent: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub http1_max_pending_requests: Option<i64>,
    /// Requests in flight at once to the endpoints; more are answered 503 (flag UO). 0 or
    /// absent: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub http2_max_requests: Option<i64>,
    /// Requests one connection carries before it is closed; 0 or absent: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_requests_per_connection: Option<i64>,
    /// Retries in flight at once to the endpoints; 0 or absent: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_retries: Option<i64>,
    /// A connection unused that long is closed, e.g. `1h` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    #[doc = concat!("HTTP/2 upgrade policy. ", not_for_waypoints!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h2_upgrade_policy: Option<String>,
    #[doc = concat!("Use the client's protocol. ", not_for_waypoints!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_client_protocol: Option<bool>,
    #[doc = concat!("HTTP/2 concurrent streams per connection. ", not_for_waypoints!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_streams: Option<i64>,
}

/// Istio's OutlierDetection.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// 5xx answers (or failures without an answer) in a row that eject an endpoint; default 5,
    /// 0: off.
    #[serde(
        default,
        rename = "consecutive5xxErrors",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 0))]
    pub consecutive_5xx_errors: Option<i64>,
    /// 502, 503, 504 answers (or failures without an answer) in a row that eject an endpoint;
    /// default off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub consecutive_gateway_errors: Option<i64>,
    /// Deprecated by Istio: as Istio, gateway errors in a row (and 5xx detection off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub consecutive_errors: Option<i64>,
    /// How often ejections are reconsidered, e.g. `10s` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// An ejection lasts this times the number of ejections, e.g. `30s` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    /// The share of endpoints ejected at once, at most (default 10; one always can be).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub max_ejection_percent: Option<i64>,
    /// Below this share of endpoints not ejected, ejections are ignored (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub min_health_percent: Option<i64>,
    #[doc = concat!("Split local-origin errors. ", not_for_waypoints!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_external_local_origin_errors: Option<bool>,
    #[doc = concat!("Local-origin failures in a row. ", not_for_waypoints!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_local_origin_failures: Option<i64>,
}

/// Istio's LoadBalancerSettings.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerSettings {
    /// `ROUND_ROBIN`, `LEAST_REQUEST`, `RANDOM`, `PASSTHROUGH` or `UNSPECIFIED`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simple: Option<String>,
    /// Consistent hashing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<ConsistentHash>,
    #[doc = concat!("Locality settings. ", not_for_waypoints!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "unsupported_object")]
    pub locality_lb_setting: Option<Value>,
    /// Slow start of new endpoints, e.g. `60s` (deprecated by Istio for `warmup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_duration_secs: Option<String>,
    /// Slow start of new endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup: Option<Warmup>,
}

/// Istio's WarmupConfiguration.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Warmup {
    /// How long a new endpoint warms up, e.g. `60s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// The share of its traffic a new endpoint starts with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub minimum_percent: Option<f64>,
    /// How fast the share grows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub aggression: Option<f64>,
}

/// Istio's ConsistentHashLB.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsistentHash {
    /// Hash on this request header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_header_name: Option<String>,
    /// Hash on this cookie.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_cookie: Option<HttpCookie>,
    /// Hash on the source IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_source_ip: Option<bool>,
    /// Hash on this query parameter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_query_parameter_name: Option<String>,
    /// Ring hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_hash: Option<RingHash>,
    /// Maglev.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maglev: Option<Maglev>,
    /// The ring's minimum size (deprecated by Istio for `ringHash`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub minimum_ring_size: Option<i64>,
}

/// Istio's ConsistentHashLB.HTTPCookie.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpCookie {
    /// The cookie's name.
    pub name: String,
    /// Its path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Its lifetime, e.g. `3600s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

/// Istio's ConsistentHashLB.RingHash.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RingHash {
    /// The ring's minimum size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub minimum_ring_size: Option<i64>,
}

/// Istio's ConsistentHashLB.MagLev.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Maglev {
    /// The table's size (a prime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub table_size: Option<i64>,
}

/// An object of Istio's API whose content the schema does not describe (see the module's doc).
fn unsupported_object(_: &mut schemars::SchemaGenerator) -> Schema {
    json_schema!({"type": "object"})
}

/// A list of such objects.
fn unsupported_list(_: &mut schemars::SchemaGenerator) -> Schema {
    json_schema!({"type": "array", "items": {"type": "object"}})
}

/// Ambit's RateLimitPolicy spec: local rate limits of a service (or one of its routes) at its
/// waypoint. Istio has no such resource (its users patch Envoy's local_ratelimit in with an
/// EnvoyFilter): the buckets keep Envoy's field names.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[allow(
    clippy::duplicated_attributes,
    reason = "each printcolumn(...) of #[kube] has its own type_ = \"string\""
)]
#[kube(
    group = "networking.ambit.dev",
    version = "v1",
    kind = "RateLimitPolicy",
    namespaced,
    status = "PolicyStatus",
    category = "ambit",
    shortname = "arl",
    label("app.kubernetes.io/part-of", "ambit"),
    printcolumn(
        name = "Target",
        type_ = "string",
        json_path = ".spec.targetRefs[*].name"
    ),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Accepted")].status"#
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    doc = "Local rate limits of a service or route at its waypoint (Envoy's local_ratelimit)."
)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitPolicySpec {
    /// The Services limited (kind Service, group ""), in the policy's namespace; `sectionName`
    /// names one route of the service (a VirtualService http[].name or an HTTPRoute/GRPCRoute
    /// rule name), whose requests then get this policy instead of the service's.
    #[schemars(length(min = 1, max = 16))]
    pub target_refs: Vec<RateLimitTargetRef>,
    /// One bucket for all the target's requests, whoever sends them (Envoy's token_bucket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_bucket: Option<TokenBucket>,
    /// One bucket per client identity (the SPIFFE identity the waypoint verified).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_identity: Option<TokenBucket>,
    /// Envoy's enable_x_ratelimit_headers: OFF (the default, as Envoy's) or DRAFT_VERSION_03,
    /// the x-ratelimit-limit/-remaining/-reset headers of the deciding bucket on every response
    /// the policy applies to (they reveal a shared bucket's level to every caller). Absent is
    /// OFF; quote "OFF" in YAML.
    // A string with a pattern, not an enum: in the CRD's YAML as kubectl reads it (YAML 1.1),
    // an unquoted OFF in an enum would be a boolean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^(OFF|DRAFT_VERSION_03)$"))]
    pub enable_x_ratelimit_headers: Option<String>,
}

/// A target of a RateLimitPolicy (Istio's PolicyTargetReference, with a sectionName).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitTargetRef {
    /// The API group of the target: "" (core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub group: Option<String>,
    /// The kind of the target: Service.
    #[schemars(length(min = 1, max = 63))]
    pub kind: String,
    /// The name of the Service.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The namespace of the target (the policy's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub namespace: Option<String>,
    /// A route of the Service, by name; absent: every request of the Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub section_name: Option<String>,
}

/// Envoy's TokenBucket: maxTokens at most, tokensPerFill added every fillInterval.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenBucket {
    /// The bucket's size: the burst allowed after a quiet period.
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub max_tokens: i64,
    /// Tokens added per fill (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub tokens_per_fill: Option<i64>,
    /// How often tokens are added, e.g. 1s (50ms to 24h).
    #[schemars(length(min = 1))]
    pub fill_interval: String,
}
