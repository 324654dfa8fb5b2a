//! The mesh file's routing sections: `virtualServices` and `destinationRules`.
//!
//! Each entry is a whole Istio object (`apiVersion`, `kind`, `metadata`, `spec`) in Ambit's API
//! group `networking.ambit.dev/v1`, field for field Istio's `networking.istio.io/v1`, so that
//! Istio YAML ports by changing only `apiVersion`. Only the fields the waypoint implements are
//! accepted (the resilience fields `timeout`, `retries`, `mirror`, `fault`... are read by
//! [`super::resilience`]): any other (`corsPolicy`, `tls`...) is rejected with its
//! path, never ignored, since a route silently missing a field would be a different route.
//! The result is the state's route model ([`crate::state::routes`]).
use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::{
    ConfigError, HttpFaultInjectionFile, HttpMirrorPolicyFile, HttpRetryFile, PercentFile,
    Validator, resilience::ResilienceFields,
};
use crate::{
    serdes::null_as_default,
    state::{
        Service, WaypointRef,
        routes::{
            ConsistentHash, DirectResponse, FullRegex, HashKey, HeaderMatch, HeaderOps,
            HeaderRules, HttpMatch, HttpRoute, LoadBalancer, QueryMatch, Redirect, Rewrite,
            RouteDestination, RouteFilters, RouteTable, ServiceRoutes, StringMatch, Subset,
        },
        upstream::UpstreamPolicy,
    },
};

/// The API version routing resources must carry.
pub const ROUTING_API_VERSION: &str = "networking.ambit.dev/v1";

/// An object's `metadata`: the fields routing reads (labels and annotations are accepted and
/// not used).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMetaFile {
    /// Name, unique per kind within the namespace.
    pub name: String,
    /// Namespace (default `default`, as kubectl's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels (not used).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations (not used).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// One entry of `virtualServices`: an Istio VirtualService.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualServiceFile {
    /// Must be [`ROUTING_API_VERSION`].
    pub api_version: String,
    /// Must be `VirtualService`.
    pub kind: String,
    /// Name and namespace.
    pub metadata: ObjectMetaFile,
    /// Istio's `VirtualService` spec (the supported fields).
    pub spec: VirtualServiceSpecFile,
}

/// A VirtualService's `spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualServiceSpecFile {
    /// The services it routes, by short name (the VirtualService's namespace) or FQDN.
    pub hosts: Vec<String>,
    /// HTTP routes, first match wins.
    #[serde(default, deserialize_with = "null_as_default")]
    pub http: Vec<HttpRouteFile>,
}

/// One entry of `spec.http`: Istio's `HTTPRoute`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteFile {
    /// The route's name (for logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Conditions, any one of which must hold (absent or empty: all requests).
    #[serde(
        rename = "match",
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub matches: Vec<HttpMatchRequestFile>,
    /// Weighted destinations.
    #[serde(default, deserialize_with = "null_as_default")]
    pub route: Vec<HttpRouteDestinationFile>,
    /// Header operations on requests and responses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<HeadersFile>,
    /// Rewrite of the request sent on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<HttpRewriteFile>,
    /// Answer with a redirect (no `route`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<HttpRedirectFile>,
    /// Answer with a fixed response (no `route`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<HttpDirectResponseFile>,

    // Resilience (timeouts, retries, mirrors, faults): `super::resilience`.
    /// The whole request's timeout, e.g. `10s` (default: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Retries (absent: Istio's default policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<HttpRetryFile>,
    /// One destination copies of the requests go to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<DestinationFile>,
    /// Share of the requests `mirror` gets (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_percentage: Option<PercentFile>,
    /// Several mirrors, each with its percentage.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub mirrors: Vec<HttpMirrorPolicyFile>,
    /// Faults injected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<HttpFaultInjectionFile>,
}

/// One entry of `match`: Istio's `HTTPMatchRequest`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatchRequestFile {
    /// The match's name (for logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// On the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<StringMatchFile>,
    /// On headers, by lower-case name; an empty match (`{}`) requires presence only.
    #[serde(default, deserialize_with = "null_as_default")]
    pub headers: BTreeMap<String, StringMatchFile>,
    /// On the method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<StringMatchFile>,
    /// On query parameters (`exact` or `regex`; `{}`: present).
    #[serde(default, deserialize_with = "null_as_default")]
    pub query_params: BTreeMap<String, StringMatchFile>,
    /// Header conditions that must not hold (`{}`: the header must be absent).
    #[serde(default, deserialize_with = "null_as_default")]
    pub without_headers: BTreeMap<String, StringMatchFile>,
    /// `uri`'s `exact` and `prefix` ignore case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore_uri_case: Option<bool>,
}

/// Istio's `StringMatch`: exactly one field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StringMatchFile {
    /// Equal to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// Starting with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Matching (whole string) the RE2-style expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// One entry of `route`: Istio's `HTTPRouteDestination`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteDestinationFile {
    /// Where.
    pub destination: DestinationFile,
    /// Relative share (absent: 0, or all of it when it is the route's only destination).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,
    /// Header operations for requests sent to this destination and their responses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<HeadersFile>,
}

/// Istio's `Destination`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationFile {
    /// A service, by short name or FQDN.
    pub host: String,
    /// A subset defined by a DestinationRule of that host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// The service port (absent: the port the client dialled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortSelectorFile>,
}

/// Istio's `PortSelector`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSelectorFile {
    /// The port number.
    pub number: i64,
}

/// One entry of `destinationRules`: an Istio DestinationRule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRuleFile {
    /// Must be [`ROUTING_API_VERSION`].
    pub api_version: String,
    /// Must be `DestinationRule`.
    pub kind: String,
    /// Name and namespace.
    pub metadata: ObjectMetaFile,
    /// Istio's `DestinationRule` spec (the supported fields).
    pub spec: DestinationRuleSpecFile,
}

/// A DestinationRule's `spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRuleSpecFile {
    /// The service, by short name or FQDN.
    pub host: String,
    /// Named subsets of its endpoints.
    #[serde(default, deserialize_with = "null_as_default")]
    pub subsets: Vec<SubsetFile>,
    /// The service's traffic policy (its subsets' override it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicyFile>,
}

/// Istio's `Subset`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubsetFile {
    /// Its name, unique in the rule.
    pub name: String,
    /// Labels an endpoint must carry.
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: BTreeMap<String, String>,
    /// The subset's traffic policy, overriding the rule's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicyFile>,
}

/// Istio's `Headers`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeadersFile {
    /// On the request sent on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<HeaderOperationsFile>,
    /// On the response sent back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<HeaderOperationsFile>,
}

/// Istio's `HeaderOperations`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderOperationsFile {
    /// Overwrite these headers.
    #[serde(default, deserialize_with = "null_as_default")]
    pub set: BTreeMap<String, String>,
    /// Append these values.
    #[serde(default, deserialize_with = "null_as_default")]
    pub add: BTreeMap<String, String>,
    /// Remove these headers.
    #[serde(default, deserialize_with = "null_as_default")]
    pub remove: Vec<String>,
}

/// Istio's `HTTPRewrite`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRewriteFile {
    /// Replaces the matched part of the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// Replaces the authority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

/// Istio's `HTTPRedirect`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRedirectFile {
    /// The new path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// The new authority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// The new port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    /// The new scheme.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// The status (default 301).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_code: Option<i64>,
}

/// Istio's `HTTPDirectResponse`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpDirectResponseFile {
    /// The status code.
    pub status: i64,
    /// The body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<HttpBodyFile>,
}

/// Istio's `HTTPBody` (`string` only; `bytes` is not supported).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpBodyFile {
    /// The body as text.
    pub string: String,
}

/// Istio's `TrafficPolicy` (`loadBalancer`, `connectionPool`, `outlierDetection`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicyFile {
    /// How requests are spread over endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSettingsFile>,
    /// Connection and request limits ([`super::traffic_policy`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<super::ConnectionPoolFile>,
    /// Ejection of failing endpoints ([`super::traffic_policy`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<super::OutlierDetectionFile>,
}

/// Istio's `LoadBalancerSettings`: `simple` or `consistentHash`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerSettingsFile {
    /// `ROUND_ROBIN`, `LEAST_REQUEST`, `RANDOM` (`LEAST_CONN`: `LEAST_REQUEST`, as Istio's;
    /// `UNSPECIFIED`: the default, round robin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simple: Option<String>,
    /// Consistent hashing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<ConsistentHashFile>,
}

/// Istio's `ConsistentHashLB`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsistentHashFile {
    /// Hash this request header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_header_name: Option<String>,
    /// Hash this cookie (created when absent if it has a `ttl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_cookie: Option<HttpCookieFile>,
    /// Hash the client's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_source_ip: Option<bool>,
    /// Hash this query parameter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_query_parameter_name: Option<String>,
    /// The Maglev table (Ambit's consistent hash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maglev: Option<MagLevFile>,
    /// Ring hash: not implemented (refused with a message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_hash: Option<serde_yaml_ng::Value>,
    /// The ring hash's size: not implemented (refused with a message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_ring_size: Option<serde_yaml_ng::Value>,
}

/// Istio's `HTTPCookie`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpCookieFile {
    /// The cookie's name.
    pub name: String,
    /// The path of a created cookie.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The lifetime of a created cookie (absent: never created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

/// Istio's `MagLev`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MagLevFile {
    /// The table's size, a prime (default 65537).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_size: Option<i64>,
}

/// The DNS suffix of services (`<name>.<namespace>.svc.cluster.local`).
const SERVICE_SUFFIX: &str = ".svc.cluster.local";

/// The services routes may name, by (`namespace`, `name`).
pub(crate) type KnownServices<'s> = HashMap<(&'s str, &'s str), &'s Service>;

/// The subsets of each service (by uid), then by name.
pub(crate) type SubsetsByService = HashMap<String, BTreeMap<String, Subset>>;

/// The services of `services`, as routes look them up.
pub(crate) fn known_services(services: &[Service]) -> KnownServices<'_> {
    services
        .iter()
        .map(|s| ((s.namespace.as_str(), s.name.as_str()), s))
        .collect()
}

/// Checks one DestinationRule (its fields named after `at`, e.g. `destinationRules[0]`):
/// the uid of its service, its subsets by name and its load balancer (`trafficPolicy`). Shared by the mesh file and Kubernetes
/// (`discovery::kube::routes`), whose errors are `ConfigError::Invalid` with the field.
pub(crate) fn destination_rule(
    path: &std::path::Path,
    at: &str,
    rule: &DestinationRuleFile,
    known: &KnownServices<'_>,
) -> Result<CheckedRule, ConfigError> {
    Validator::new(path).destination_rule(at, rule, known)
}

/// A DestinationRule checked: its service's uid, subsets by name, the rule's load balancer
/// and upstream policy (connection pool, outlier detection).
pub(crate) type CheckedRule = (
    String,
    BTreeMap<String, Subset>,
    (Option<LoadBalancer>, UpstreamPolicy),
);

/// The DestinationRules of every host, merged as Istio merges the rules of one host (pilot's
/// `mergeDestinationRule`), oldest first: the first rule's subsets and top-level traffic policy
/// stay; a later rule adds the subsets whose names are new, and its top-level traffic policy
/// applies only when no earlier rule of the host had one. So a circuit breaker in one rule and
/// the subsets in another both apply, as in Istio.
#[derive(Debug, Default)]
pub(crate) struct MergedRules {
    /// Subsets by service uid.
    pub subsets: SubsetsByService,
    /// Load balancer by service uid.
    pub load_balancers: BTreeMap<String, LoadBalancer>,
    /// Connection pool and outlier detection by service uid.
    pub upstream: BTreeMap<String, UpstreamPolicy>,
}

impl MergedRules {
    /// Adds one checked rule (see the type's doc); returns the names of its subsets that an
    /// earlier rule of the host already defined, which are ignored.
    pub fn add(&mut self, (uid, named, (load_balancer, upstream)): CheckedRule) -> Vec<String> {
        let has_policy = load_balancer.is_some() || !upstream.is_empty();
        // A rule with a policy always fills one of the two maps, so they say which hosts an
        // earlier rule already gave a policy.
        let earlier_policy =
            self.load_balancers.contains_key(&uid) || self.upstream.contains_key(&uid);
        if has_policy && !earlier_policy {
            if let Some(policy) = load_balancer {
                self.load_balancers.insert(uid.clone(), policy);
            }
            if !upstream.is_empty() {
                self.upstream.insert(uid.clone(), upstream);
            }
        }
        let subsets = self.subsets.entry(uid).or_default();
        let mut duplicates = Vec::new();
        for (name, subset) in named {
            match subsets.entry(name) {
                std::collections::btree_map::Entry::Occupied(taken) => {
                    duplicates.push(taken.key().clone())
                }
                std::collections::btree_map::Entry::Vacant(free) => {
                    free.insert(subset);
                }
            }
        }
        duplicates
    }
}

/// Checks one VirtualService (its fields named after `at`) against the services and subsets:
/// the routes of each of its hosts, by service uid, in the order of `spec.hosts`. Shared like
/// [`destination_rule`].
pub(crate) fn virtual_service(
    path: &std::path::Path,
    at: &str,
    vs: &VirtualServiceFile,
    known: &KnownServices<'_>,
    subsets: &SubsetsByService,
) -> Result<Vec<(String, ServiceRoutes)>, ConfigError> {
    Validator::new(path).virtual_service(at, vs, known, subsets)
}

impl Validator<'_> {
    /// Checks the routing sections against the services and builds the route table.
    pub(super) fn routes(
        &self,
        virtual_services: &[VirtualServiceFile],
        destination_rules: &[DestinationRuleFile],
        services: &[Service],
    ) -> Result<RouteTable, ConfigError> {
        let known = known_services(services);
        let mut rules = MergedRules::default();
        for (i, rule) in destination_rules.iter().enumerate() {
            let at = format!("destinationRules[{i}]");
            let checked = self.destination_rule(&at, rule, &known)?;
            let uid = checked.0.clone();
            for name in rules.add(checked) {
                tracing::warn!(
                    service = %uid,
                    subset = %name,
                    rule = %at,
                    "subset already defined by an earlier DestinationRule of the host: ignored"
                );
            }
        }
        let MergedRules {
            subsets,
            load_balancers,
            upstream: upstream_policies,
        } = rules;

        let mut table = RouteTable {
            load_balancers,
            upstream: upstream_policies,
            ..RouteTable::default()
        };
        let mut vs_of: HashMap<String, usize> = HashMap::new();
        for (i, vs) in virtual_services.iter().enumerate() {
            let at = format!("virtualServices[{i}]");
            let routes = self.virtual_service(&at, vs, &known, &subsets)?;
            for (h, (uid, routes)) in routes.into_iter().enumerate() {
                if let Some(first) = vs_of.insert(uid.clone(), i) {
                    return Err(self.invalid(
                        format!("{at}.spec.hosts[{h}]"),
                        format!(
                            "service {uid} is already routed by virtualServices[{first}] (Ambit \
                             does not merge VirtualServices of one host)"
                        ),
                    ));
                }
                table.by_service.insert(uid, routes);
            }
        }
        Ok(table)
    }

    fn destination_rule(
        &self,
        at: &str,
        rule: &DestinationRuleFile,
        known: &KnownServices<'_>,
    ) -> Result<CheckedRule, ConfigError> {
        self.header(at, &rule.api_version, &rule.kind, "DestinationRule")?;
        let namespace = self.meta(at, &rule.metadata)?;
        let service = self.owned_host(
            &format!("{at}.spec.host"),
            &rule.spec.host,
            namespace,
            known,
        )?;
        let mut named = BTreeMap::new();
        for (k, subset) in rule.spec.subsets.iter().enumerate() {
            let field = format!("{at}.spec.subsets[{k}]");
            self.non_empty(format!("{field}.name"), &subset.name)?;
            if subset.labels.is_empty() {
                return Err(self.invalid(
                    format!("{field}.labels"),
                    "must name at least one label (a subset without labels is the whole \
                     service)",
                ));
            }
            let policy_at = format!("{field}.trafficPolicy");
            let entry = Subset {
                name: subset.name.clone(),
                labels: subset.labels.clone(),
                load_balancer: self.traffic_policy(&policy_at, &subset.traffic_policy)?,
                upstream: self.upstream_of(&policy_at, &subset.traffic_policy)?,
            };
            if named.insert(subset.name.clone(), entry).is_some() {
                return Err(self.invalid(
                    format!("{field}.name"),
                    format!("subset {:?} is defined twice", subset.name),
                ));
            }
        }
        let policy_at = format!("{at}.spec.trafficPolicy");
        let load_balancer = self.traffic_policy(&policy_at, &rule.spec.traffic_policy)?;
        let upstream = self.upstream_of(&policy_at, &rule.spec.traffic_policy)?;
        Ok((service.uid(), named, (load_balancer, upstream)))
    }

    fn virtual_service(
        &self,
        at: &str,
        vs: &VirtualServiceFile,
        known: &KnownServices<'_>,
        subsets: &SubsetsByService,
    ) -> Result<Vec<(String, ServiceRoutes)>, ConfigError> {
        self.header(at, &vs.api_version, &vs.kind, "VirtualService")?;
        let namespace = self.meta(at, &vs.metadata)?;
        if vs.spec.hosts.is_empty() {
            return Err(self.invalid(format!("{at}.spec.hosts"), "must not be empty"));
        }
        if vs.spec.http.is_empty() {
            return Err(self.invalid(format!("{at}.spec.http"), "must not be empty"));
        }
        let mut http = Vec::with_capacity(vs.spec.http.len());
        for (r, route) in vs.spec.http.iter().enumerate() {
            let field = format!("{at}.spec.http[{r}]");
            http.push(self.http_route(&field, route, namespace, known, subsets)?);
        }
        let source = format!("VirtualService {namespace}/{}", vs.metadata.name);
        let mut out: Vec<(String, ServiceRoutes)> = Vec::with_capacity(vs.spec.hosts.len());
        for (h, host) in vs.spec.hosts.iter().enumerate() {
            let field = format!("{at}.spec.hosts[{h}]");
            let service = self.owned_host(&field, host, namespace, known)?;
            let uid = service.uid();
            if out.iter().any(|(seen, _)| *seen == uid) {
                return Err(self.invalid(field, format!("service {uid} is named twice")));
            }
            out.push((
                uid,
                ServiceRoutes {
                    source: source.clone(),
                    http: http.clone(),
                },
            ));
        }
        Ok(out)
    }

    /// Checks `apiVersion` and `kind`.
    pub(super) fn header(
        &self,
        at: &str,
        api_version: &str,
        kind: &str,
        expected: &str,
    ) -> Result<(), ConfigError> {
        if api_version != ROUTING_API_VERSION {
            return Err(self.invalid(
                format!("{at}.apiVersion"),
                format!(
                    "{api_version:?} is not {ROUTING_API_VERSION:?} (Ambit's group for \
                     Istio-shaped routing: change only the apiVersion of an Istio object)"
                ),
            ));
        }
        if kind != expected {
            return Err(self.invalid(
                format!("{at}.kind"),
                format!("{kind:?} is not {expected:?}"),
            ));
        }
        Ok(())
    }

    /// The object's namespace, after checking its metadata.
    pub(super) fn meta<'m>(
        &self,
        at: &str,
        meta: &'m ObjectMetaFile,
    ) -> Result<&'m str, ConfigError> {
        self.non_empty(format!("{at}.metadata.name"), &meta.name)?;
        match meta.namespace.as_deref() {
            Some(namespace) => {
                self.non_empty(format!("{at}.metadata.namespace"), namespace)?;
                Ok(namespace)
            }
            None => Ok("default"),
        }
    }

    /// Resolves a host (short name in `namespace`, `name.namespace`, or the FQDN) to a service
    /// of the file.
    fn host<'s>(
        &self,
        field: &str,
        host: &str,
        namespace: &str,
        known: &KnownServices<'s>,
    ) -> Result<&'s Service, ConfigError> {
        let name = host.strip_suffix(SERVICE_SUFFIX).unwrap_or(host);
        let (name, ns) = match name.split_once('.') {
            Some((name, ns)) if !ns.contains('.') => (name, ns),
            Some(_) => ("", ""),
            None => (name, namespace),
        };
        known.get(&(ns, name)).copied().ok_or_else(|| {
            self.invalid(
                field,
                format!(
                    "{host:?} is not a service of this file (hosts are services, by short \
                     name, name.namespace or FQDN; wildcards and external hosts are not \
                     supported)"
                ),
            )
        })
    }

    /// [`Self::host`] for a resource that configures the service it names (a VirtualService's
    /// `hosts`, a DestinationRule's `host`): the service must be of the resource's own
    /// namespace. Istio lets any namespace's rule name any host unless `exportTo` narrows it;
    /// here a namespace owner could then reroute, throttle or eject another team's service.
    fn owned_host<'s>(
        &self,
        field: &str,
        host: &str,
        namespace: &str,
        known: &KnownServices<'s>,
    ) -> Result<&'s Service, ConfigError> {
        let service = self.host(field, host, namespace, known)?;
        if service.namespace != namespace {
            return Err(self.invalid(
                field,
                format!(
                    "{host:?} is service {} of another namespace: a resource of namespace \
                     {namespace:?} may only configure that namespace's services",
                    service.uid()
                ),
            ));
        }
        Ok(service)
    }

    fn http_route(
        &self,
        at: &str,
        route: &HttpRouteFile,
        namespace: &str,
        known: &KnownServices<'_>,
        subsets: &SubsetsByService,
    ) -> Result<HttpRoute, ConfigError> {
        let mut matches = Vec::with_capacity(route.matches.len());
        for (m, entry) in route.matches.iter().enumerate() {
            let field = format!("{at}.match[{m}]");
            let uri = match &entry.uri {
                Some(uri) => Some(
                    self.string_match(&format!("{field}.uri"), uri)?
                        .ok_or_else(|| {
                            self.invalid(
                                format!("{field}.uri"),
                                "one of exact, prefix, regex must be set",
                            )
                        })?,
                ),
                None => None,
            };
            let headers = self.header_matches(&format!("{field}.headers"), &entry.headers)?;
            let without_headers =
                self.header_matches(&format!("{field}.withoutHeaders"), &entry.without_headers)?;
            let method = match &entry.method {
                Some(method) => Some(
                    self.string_match(&format!("{field}.method"), method)?
                        .ok_or_else(|| {
                            self.invalid(
                                format!("{field}.method"),
                                "one of exact, prefix, regex must be set",
                            )
                        })?,
                ),
                None => None,
            };
            let mut query_params = Vec::with_capacity(entry.query_params.len());
            for (name, value) in &entry.query_params {
                let param_field = format!("{field}.queryParams.{name}");
                if name.is_empty() {
                    return Err(self.invalid(param_field, "a query parameter needs a name"));
                }
                if value.prefix.is_some() {
                    return Err(self.invalid(
                        format!("{param_field}.prefix"),
                        "query parameters match by exact or regex only (as Istio's)",
                    ));
                }
                query_params.push(QueryMatch {
                    name: name.clone(),
                    value: self.string_match(&param_field, value)?,
                });
            }
            matches.push(HttpMatch {
                uri,
                headers,
                method,
                query_params,
                without_headers,
                ignore_uri_case: entry.ignore_uri_case.unwrap_or(false),
                port: None,
            });
        }
        let filters = self.route_filters(at, route)?;
        let resilience = self.resilience(
            at,
            ResilienceFields {
                timeout: route.timeout.as_deref(),
                retries: route.retries.as_ref(),
                mirror: route.mirror.as_ref(),
                mirror_percentage: route.mirror_percentage.as_ref(),
                mirrors: &route.mirrors,
                fault: route.fault.as_ref(),
            },
            namespace,
            known,
            subsets,
        )?;
        if filters.redirect.is_some() || filters.direct_response.is_some() {
            let which = if filters.redirect.is_some() {
                "redirect"
            } else {
                "directResponse"
            };
            if !route.route.is_empty() {
                return Err(self.invalid(
                    format!("{at}.route"),
                    format!("a route with {which} answers itself: it cannot also have a route"),
                ));
            }
            return Ok(HttpRoute {
                name: route.name.clone(),
                matches,
                destinations: vec![],
                filters,
                resilience,
            });
        }
        if route.route.is_empty() {
            return Err(self.invalid(
                format!("{at}.route"),
                "must name at least one destination (or the route must have a redirect or a \
                 directResponse)",
            ));
        }
        let only = route.route.len() == 1;
        let mut destinations = Vec::with_capacity(route.route.len());
        for (d, entry) in route.route.iter().enumerate() {
            let field = format!("{at}.route[{d}]");
            let destination = self.destination(
                &format!("{field}.destination"),
                &entry.destination,
                namespace,
                known,
                subsets,
            )?;
            let weight = match entry.weight {
                None if only => 100,
                None => 0,
                Some(w) => u32::try_from(w).map_err(|_| {
                    self.invalid(format!("{field}.weight"), format!("{w} is negative"))
                })?,
            };
            destinations.push(RouteDestination {
                weight,
                headers: self.header_rules(&format!("{field}.headers"), &entry.headers)?,
                ..destination
            });
        }
        if destinations.iter().all(|d| d.weight == 0) {
            return Err(self.invalid(
                format!("{at}.route"),
                "the weights are all 0: no destination would get any request",
            ));
        }
        Ok(HttpRoute {
            name: route.name.clone(),
            matches,
            destinations,
            filters,
            resilience,
        })
    }

    /// Resolves a `Destination` at `field` (its host, port and subset); its weight is 0.
    pub(super) fn destination(
        &self,
        field: &str,
        destination: &DestinationFile,
        namespace: &str,
        known: &HashMap<(&str, &str), &Service>,
        subsets: &HashMap<String, BTreeMap<String, Subset>>,
    ) -> Result<RouteDestination, ConfigError> {
        let service = self.host(
            &format!("{field}.host"),
            &destination.host,
            namespace,
            known,
        )?;
        let port = match &destination.port {
            Some(port) => {
                let number = self.port(format!("{field}.port.number"), port.number)?;
                if service.port(number).is_none() {
                    return Err(self.invalid(
                        format!("{field}.port.number"),
                        format!("service {} has no port {number}", service.uid()),
                    ));
                }
                Some(number)
            }
            None => None,
        };
        let subset = match &destination.subset {
            Some(name) => Some(
                subsets
                    .get(&service.uid())
                    .and_then(|named| named.get(name))
                    .cloned()
                    .ok_or_else(|| {
                        self.invalid(
                            format!("{field}.subset"),
                            format!(
                                "subset {name:?} is not defined by a DestinationRule of service {}",
                                service.uid()
                            ),
                        )
                    })?,
            ),
            None => None,
        };
        Ok(RouteDestination {
            service: WaypointRef {
                namespace: service.namespace.clone(),
                name: service.name.clone(),
            },
            port,
            subset,
            weight: 0,
            headers: Default::default(),
        })
    }

    /// A `StringMatch`: `None` when empty (for headers: presence).
    fn string_match(
        &self,
        field: &str,
        value: &StringMatchFile,
    ) -> Result<Option<StringMatch>, ConfigError> {
        match (&value.exact, &value.prefix, &value.regex) {
            (None, None, None) => Ok(None),
            (Some(exact), None, None) => Ok(Some(StringMatch::Exact(exact.clone()))),
            (None, Some(prefix), None) => Ok(Some(StringMatch::Prefix(prefix.clone()))),
            (None, None, Some(regex)) => FullRegex::new(regex)
                .map(|r| Some(StringMatch::Regex(r)))
                .map_err(|e| {
                    self.invalid(
                        format!("{field}.regex"),
                        format!("invalid regular expression {regex:?}: {e}"),
                    )
                }),
            _ => Err(self.invalid(field, "set only one of exact, prefix, regex")),
        }
    }
}

/// Headers a route may not touch: `host` (that is `rewrite.authority`), `content-length` (the
/// message's framing is the proxy's to write) and the hop-by-hop ones, which describe one
/// connection.
const RESERVED_HEADERS: [&str; 8] = [
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
];

/// The redirect codes Istio accepts.
const REDIRECT_CODES: [u16; 5] = [301, 302, 303, 307, 308];

/// The Maglev table's default size (Envoy's) and largest (Envoy's bound).
const MAGLEV_DEFAULT_SIZE: u32 = 65537;
const MAGLEV_MAX_SIZE: u32 = 5_000_011;

// Matches beyond path and headers, filters and load balancing.
impl Validator<'_> {
    /// Header conditions (`headers`, `withoutHeaders`), by lower-case name.
    fn header_matches(
        &self,
        at: &str,
        entries: &BTreeMap<String, StringMatchFile>,
    ) -> Result<Vec<HeaderMatch>, ConfigError> {
        let mut headers = Vec::with_capacity(entries.len());
        for (name, value) in entries {
            let header_field = format!("{at}.{name}");
            if name.is_empty()
                || name.chars().any(|c| c.is_ascii_uppercase())
                || http::HeaderName::from_bytes(name.as_bytes()).is_err()
            {
                return Err(self.invalid(
                    header_field,
                    format!("{name:?} is not a lower-case HTTP header name"),
                ));
            }
            headers.push(HeaderMatch {
                name: name.clone(),
                value: self.string_match(&header_field, value)?,
            });
        }
        Ok(headers)
    }

    /// A route's `headers`, `rewrite`, `redirect` and `directResponse`.
    fn route_filters(&self, at: &str, route: &HttpRouteFile) -> Result<RouteFilters, ConfigError> {
        let headers = self.header_rules(&format!("{at}.headers"), &route.headers)?;
        let rewrite = match &route.rewrite {
            Some(rewrite) => {
                let field = format!("{at}.rewrite");
                if rewrite.uri.is_none() && rewrite.authority.is_none() {
                    return Err(self.invalid(field, "set uri or authority"));
                }
                if let Some(uri) = &rewrite.uri
                    && format!("/{uri}")
                        .parse::<http::uri::PathAndQuery>()
                        .is_err()
                {
                    return Err(
                        self.invalid(format!("{field}.uri"), format!("{uri:?} is not a path"))
                    );
                }
                if let Some(authority) = &rewrite.authority {
                    self.authority(&format!("{field}.authority"), authority)?;
                }
                Some(Rewrite {
                    uri: rewrite.uri.clone(),
                    authority: rewrite.authority.clone(),
                    full_path: false,
                })
            }
            None => None,
        };
        let redirect = match &route.redirect {
            Some(redirect) => {
                let field = format!("{at}.redirect");
                if let Some(uri) = &redirect.uri
                    && (!uri.starts_with('/') || uri.parse::<http::uri::PathAndQuery>().is_err())
                {
                    return Err(self.invalid(
                        format!("{field}.uri"),
                        format!("{uri:?} is not a path starting with /"),
                    ));
                }
                if let Some(authority) = &redirect.authority {
                    self.authority(&format!("{field}.authority"), authority)?;
                }
                let port = match redirect.port {
                    Some(port) => Some(self.port(format!("{field}.port"), port)?),
                    None => None,
                };
                if let Some(scheme) = &redirect.scheme
                    && scheme != "http"
                    && scheme != "https"
                {
                    return Err(self.invalid(
                        format!("{field}.scheme"),
                        format!("{scheme:?} is not http or https"),
                    ));
                }
                let code = redirect.redirect_code.unwrap_or(301);
                let code = u16::try_from(code)
                    .ok()
                    .filter(|c| REDIRECT_CODES.contains(c))
                    .ok_or_else(|| {
                        self.invalid(
                            format!("{field}.redirectCode"),
                            format!("{code} is not one of 301, 302, 303, 307, 308"),
                        )
                    })?;
                if route.rewrite.is_some() {
                    return Err(self.invalid(
                        format!("{at}.rewrite"),
                        "a route with a redirect sends nothing on: it cannot rewrite",
                    ));
                }
                Some(Redirect {
                    uri: redirect.uri.clone(),
                    authority: redirect.authority.clone(),
                    port,
                    scheme: redirect.scheme.clone(),
                    code,
                })
            }
            None => None,
        };
        let direct_response = match &route.direct_response {
            Some(direct) => {
                let field = format!("{at}.directResponse");
                if redirect.is_some() {
                    return Err(self.invalid(
                        field,
                        "a route cannot have both redirect and directResponse",
                    ));
                }
                if rewrite.is_some() {
                    return Err(self.invalid(
                        format!("{at}.rewrite"),
                        "a route with a directResponse sends nothing on: it cannot rewrite",
                    ));
                }
                let status = u16::try_from(direct.status)
                    .ok()
                    .filter(|s| (200..=599).contains(s))
                    .ok_or_else(|| {
                        self.invalid(
                            format!("{field}.status"),
                            format!("{} is not an HTTP status from 200 to 599", direct.status),
                        )
                    })?;
                Some(DirectResponse {
                    status,
                    body: direct.body.as_ref().map(|b| b.string.clone()),
                })
            }
            None => None,
        };
        Ok(RouteFilters {
            headers,
            rewrite,
            redirect,
            direct_response,
        })
    }

    /// An authority (`host` or `host:port`).
    pub(super) fn authority(&self, field: &str, authority: &str) -> Result<(), ConfigError> {
        match authority.parse::<http::uri::Authority>() {
            Ok(parsed)
                if !authority.is_empty() && !authority.contains('@') && parsed.host() != "" =>
            {
                Ok(())
            }
            _ => Err(self.invalid(field, format!("{authority:?} is not a host or host:port"))),
        }
    }

    /// Istio's `Headers`.
    fn header_rules(
        &self,
        at: &str,
        headers: &Option<HeadersFile>,
    ) -> Result<HeaderRules, ConfigError> {
        let Some(headers) = headers else {
            return Ok(HeaderRules::default());
        };
        Ok(HeaderRules {
            request: self.header_ops(&format!("{at}.request"), &headers.request)?,
            response: self.header_ops(&format!("{at}.response"), &headers.response)?,
        })
    }

    /// Istio's `HeaderOperations`: names lower-cased, values literal.
    pub(super) fn header_ops(
        &self,
        at: &str,
        ops: &Option<HeaderOperationsFile>,
    ) -> Result<HeaderOps, ConfigError> {
        let Some(ops) = ops else {
            return Ok(HeaderOps::default());
        };
        let name = |field: String, name: &str| -> Result<String, ConfigError> {
            let parsed = http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                self.invalid(
                    field.clone(),
                    format!("{name:?} is not an HTTP header name"),
                )
            })?;
            if RESERVED_HEADERS.contains(&parsed.as_str()) {
                return Err(self.invalid(
                    field,
                    format!(
                        "{name:?} cannot be changed by a route (host is rewrite.authority; \
                         content-length is the message's framing; the others are hop-by-hop)"
                    ),
                ));
            }
            Ok(parsed.as_str().to_string())
        };
        let pairs = |kind: &str, entries: &BTreeMap<String, String>| {
            let mut out = Vec::with_capacity(entries.len());
            for (key, value) in entries {
                let field = format!("{at}.{kind}.{key}");
                let key = name(field.clone(), key)?;
                if http::HeaderValue::from_str(value).is_err() {
                    return Err(
                        self.invalid(field, format!("{value:?} is not a valid header value"))
                    );
                }
                if value.contains('%') {
                    return Err(self.invalid(
                        field,
                        format!(
                            "{value:?}: Envoy's %VARIABLE% substitutions are not supported (values \
                             are literal)"
                        ),
                    ));
                }
                out.push((key, value.clone()));
            }
            Ok(out)
        };
        let mut remove = Vec::with_capacity(ops.remove.len());
        for (i, header) in ops.remove.iter().enumerate() {
            remove.push(name(format!("{at}.remove[{i}]"), header)?);
        }
        Ok(HeaderOps {
            set: pairs("set", &ops.set)?,
            add: pairs("add", &ops.add)?,
            remove,
        })
    }

    /// A `trafficPolicy`'s connection pool and outlier detection (empty: not set).
    fn upstream_of(
        &self,
        at: &str,
        policy: &Option<TrafficPolicyFile>,
    ) -> Result<UpstreamPolicy, ConfigError> {
        match policy {
            Some(p) => {
                self.upstream_policy(at, p.connection_pool.as_ref(), p.outlier_detection.as_ref())
            }
            None => Ok(UpstreamPolicy::default()),
        }
    }

    /// A `trafficPolicy`'s load balancer (`None`: not set).
    fn traffic_policy(
        &self,
        at: &str,
        policy: &Option<TrafficPolicyFile>,
    ) -> Result<Option<LoadBalancer>, ConfigError> {
        let Some(settings) = policy.as_ref().and_then(|p| p.load_balancer.as_ref()) else {
            return Ok(None);
        };
        let at = format!("{at}.loadBalancer");
        match (&settings.simple, &settings.consistent_hash) {
            (Some(_), Some(_)) => Err(self.invalid(at, "set only one of simple, consistentHash")),
            (None, None) => Err(self.invalid(at, "set one of simple, consistentHash")),
            (Some(simple), None) => match simple.as_str() {
                "UNSPECIFIED" | "ROUND_ROBIN" => Ok(Some(LoadBalancer::RoundRobin)),
                "LEAST_REQUEST" | "LEAST_CONN" => Ok(Some(LoadBalancer::LeastRequest)),
                "RANDOM" => Ok(Some(LoadBalancer::Random)),
                "PASSTHROUGH" => Err(self.invalid(
                    format!("{at}.simple"),
                    "PASSTHROUGH is not supported: a waypoint always picks an endpoint",
                )),
                other => Err(self.invalid(
                    format!("{at}.simple"),
                    format!("{other:?} is not one of ROUND_ROBIN, LEAST_REQUEST, RANDOM"),
                )),
            },
            (None, Some(hash)) => {
                let at = format!("{at}.consistentHash");
                if hash.ring_hash.is_some() || hash.minimum_ring_size.is_some() {
                    let which = if hash.ring_hash.is_some() {
                        "ringHash"
                    } else {
                        "minimumRingSize"
                    };
                    return Err(self.invalid(
                        format!("{at}.{which}"),
                        "ring hash is not implemented: Ambit's consistent hash is Maglev (set \
                         maglev, or nothing)",
                    ));
                }
                let mut keys = Vec::new();
                if let Some(name) = &hash.http_header_name {
                    let parsed = http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                        self.invalid(
                            format!("{at}.httpHeaderName"),
                            format!("{name:?} is not an HTTP header name"),
                        )
                    })?;
                    keys.push(HashKey::Header(parsed.as_str().to_string()));
                }
                if let Some(cookie) = &hash.http_cookie {
                    let field = format!("{at}.httpCookie");
                    self.non_empty(format!("{field}.name"), &cookie.name)?;
                    let ttl_seconds = match &cookie.ttl {
                        Some(ttl) => {
                            let parsed = humantime::parse_duration(ttl.trim()).map_err(|e| {
                                self.invalid(
                                    format!("{field}.ttl"),
                                    format!("{ttl:?} is not a duration ({e}; e.g. 3600s, 1h)"),
                                )
                            })?;
                            if parsed.subsec_nanos() != 0 {
                                return Err(self.invalid(
                                    format!("{field}.ttl"),
                                    format!("{ttl:?}: a cookie's Max-Age is whole seconds"),
                                ));
                            }
                            Some(parsed.as_secs())
                        }
                        None => None,
                    };
                    keys.push(HashKey::Cookie {
                        name: cookie.name.clone(),
                        path: cookie.path.clone(),
                        ttl_seconds,
                    });
                }
                if hash.use_source_ip == Some(true) {
                    keys.push(HashKey::SourceIp);
                }
                if let Some(name) = &hash.http_query_parameter_name {
                    self.non_empty(format!("{at}.httpQueryParameterName"), name)?;
                    keys.push(HashKey::QueryParameter(name.clone()));
                }
                if keys.len() != 1 {
                    return Err(self.invalid(
                        at,
                        "set exactly one of httpHeaderName, httpCookie, useSourceIp: true, \
                         httpQueryParameterName",
                    ));
                }
                let table_size = match hash.maglev.as_ref().and_then(|m| m.table_size) {
                    None => MAGLEV_DEFAULT_SIZE,
                    Some(size) => u32::try_from(size)
                        .ok()
                        .filter(|&s| (2..=MAGLEV_MAX_SIZE).contains(&s) && is_prime(s))
                        .ok_or_else(|| {
                            self.invalid(
                                format!("{at}.maglev.tableSize"),
                                format!("{size} is not a prime up to {MAGLEV_MAX_SIZE}"),
                            )
                        })?,
                };
                Ok(Some(LoadBalancer::ConsistentHash(ConsistentHash {
                    key: keys.remove(0),
                    table_size,
                })))
            }
        }
    }
}

/// Whether `n` is prime (trial division: table sizes are at most a few million).
fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..)
            .take_while(|d: &u32| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::{
        discovery::parse_mesh,
        state::routes::{StringMatch, Subset},
    };

    const MESH: &str = r#"
workloads:
- {name: client, namespace: default, node: n0, ips: [10.10.0.2], netns: {pid: 1}}
- {name: reviews-v1, namespace: default, node: n0, ips: [10.10.0.3], labels: {app: reviews, version: v1}, netns: {pid: 1}}
- {name: reviews-v2, namespace: default, node: n0, ips: [10.10.0.4], labels: {app: reviews, version: v2}, netns: {pid: 1}}
services:
- {name: reviews, namespace: default, vips: [10.96.0.10], selector: {app: reviews}, ports: [{port: 9080}], waypoint: {name: waypoint}}
- {name: waypoint, namespace: default, vips: [10.96.0.11], selector: {app: waypoint}, ports: [{port: 15008}]}
"#;

    /// The seed's canary example, unchanged but for `apiVersion` (and the YAML list around it).
    const SEED_VS: &str = r#"
virtualServices:
- apiVersion: networking.ambit.dev/v1
  kind: VirtualService
  metadata:
    name: reviews-canary
  spec:
    hosts:
    - reviews
    http:
    - match:
      - headers:
          end-user:
            exact: jason
      route:
      - destination:
          host: reviews
          subset: v2
    - route:
      - destination:
          host: reviews
          subset: v1
        weight: 90
      - destination:
          host: reviews
          subset: v2
        weight: 10
"#;

    const DR: &str = r#"
destinationRules:
- apiVersion: networking.ambit.dev/v1
  kind: DestinationRule
  metadata: {name: reviews}
  spec:
    host: reviews
    subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
"#;

    fn parse(extra: &str) -> Result<crate::state::MeshState, String> {
        let text = format!("{MESH}{extra}");
        parse_mesh(Path::new("/etc/mesh.yaml"), text.as_bytes()).map_err(|e| e.to_string())
    }

    /// The seed's circuit breaker unchanged and the subsets in a rule of their own: merged as
    /// Istio merges the rules of one host (the first policy stays, subsets are added).
    #[test]
    fn destination_rules_of_one_host_merge() {
        let breaker = r#"
- apiVersion: networking.ambit.dev/v1
  kind: DestinationRule
  metadata: {name: reviews-circuit-breaker}
  spec:
    host: reviews
    trafficPolicy:
      connectionPool:
        http: {maxRequestsPerConnection: 2}
"#;
        let text = format!("{SEED_VS}{DR}{breaker}");
        let state = parse(&text).unwrap();
        let routes = state.routes();
        assert!(routes.for_service("default/reviews").is_some());
        let upstream = routes
            .upstream
            .get("default/reviews")
            .expect("merged policy");
        assert_eq!(
            upstream
                .connection_pool
                .as_ref()
                .map(|p| p.max_requests_per_connection),
            Some(2),
            "{upstream:?}"
        );
    }

    #[test]
    fn the_seed_canary_parses_after_changing_only_api_version() {
        let state = parse(&format!("{SEED_VS}{DR}")).unwrap();
        let routes = state.routes().for_service("default/reviews").unwrap();
        assert_eq!(routes.source, "VirtualService default/reviews-canary");
        assert_eq!(routes.http.len(), 2);
        let jason = &routes.http[0];
        assert_eq!(jason.matches[0].headers[0].name, "end-user");
        assert_eq!(
            jason.matches[0].headers[0].value,
            Some(StringMatch::Exact("jason".into()))
        );
        assert_eq!(jason.destinations.len(), 1);
        assert_eq!(jason.destinations[0].weight, 100);
        let split: Vec<(String, u32)> = routes.http[1]
            .destinations
            .iter()
            .map(|d| (d.subset.as_ref().unwrap().name.clone(), d.weight))
            .collect();
        assert_eq!(split, [("v1".to_string(), 90), ("v2".to_string(), 10)]);
        assert_eq!(
            routes.http[1].destinations[1].subset,
            Some(Subset {
                name: "v2".into(),
                labels: [("version".to_string(), "v2".to_string())].into(),
                load_balancer: None,
                upstream: Default::default(),
            })
        );

        // As written for Istio, it is refused with the field and what to change.
        let istio = SEED_VS.replace("networking.ambit.dev/v1", "networking.istio.io/v1beta1");
        let err = parse(&format!("{istio}{DR}")).unwrap_err();
        assert!(
            err.contains("virtualServices[0].apiVersion")
                && err.contains("networking.istio.io/v1beta1")
                && err.contains("networking.ambit.dev/v1"),
            "{err}"
        );
    }

    #[test]
    fn unsupported_fields_are_rejected_by_path_never_ignored() {
        let retries = SEED_VS.replace(
            "    - route:\n",
            "    - corsPolicy: {allowOrigins: [{exact: x}]}\n      route:\n",
        );
        let err = parse(&format!("{retries}{DR}")).unwrap_err();
        assert!(
            err.contains("mesh file /etc/mesh.yaml")
                && err.contains("virtualServices[0].spec.http[1]")
                && err.contains("unknown field `corsPolicy`"),
            "{err}"
        );
        let policy = DR.replace(
            "    host: reviews\n",
            "    host: reviews\n    trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}\n",
        );
        let err = parse(&format!("{SEED_VS}{policy}")).unwrap_err();
        assert!(
            err.contains("destinationRules[0].spec.trafficPolicy")
                && err.contains("unknown field `tls`"),
            "{err}"
        );
    }

    /// A namespace's rules configure only its own services: another team's DestinationRule
    /// could otherwise throttle or eject them, its VirtualService reroute them.
    #[test]
    fn rules_may_only_configure_services_of_their_own_namespace() {
        let foreign_dr = DR.replace(
            "metadata: {name: reviews}\n  spec:\n    host: reviews\n",
            "metadata: {name: reviews, namespace: team-a}\n  spec:\n    host: reviews.default\n",
        );
        assert_ne!(foreign_dr, DR);
        let err = parse(&format!("{SEED_VS}{foreign_dr}")).unwrap_err();
        assert!(
            err.contains("destinationRules[0].spec.host")
                && err.contains("service default/reviews of another namespace")
                && err.contains("\"team-a\""),
            "{err}"
        );
        let foreign_vs = SEED_VS
            .replace(
                "    name: reviews-canary\n",
                "    name: reviews-canary\n    namespace: team-a\n",
            )
            .replace(
                "    - reviews\n",
                "    - reviews.default.svc.cluster.local\n",
            )
            // Routing to another namespace's service stays allowed.
            .replace("host: reviews\n", "host: reviews.default\n");
        let err = parse(&format!("{foreign_vs}{DR}")).unwrap_err();
        assert!(
            err.contains("virtualServices[0].spec.hosts[0]")
                && err.contains("service default/reviews of another namespace"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            // A subset no DestinationRule defines.
            (
                SEED_VS.replace("subset: v1", "subset: v3"),
                DR.to_string(),
                "virtualServices[0].spec.http[1].route[0].destination.subset",
            ),
            // A host that is not a service.
            (
                SEED_VS.replace(
                    "host: reviews\n          subset: v1",
                    "host: ratings\n          subset: v1",
                ),
                DR.to_string(),
                "virtualServices[0].spec.http[1].route[0].destination.host",
            ),
            // A negative weight.
            (
                SEED_VS.replace("weight: 90", "weight: -1"),
                DR.to_string(),
                "virtualServices[0].spec.http[1].route[0].weight",
            ),
            // An invalid regex.
            (
                SEED_VS.replace("exact: jason", "regex: \"(\""),
                DR.to_string(),
                "virtualServices[0].spec.http[0].match[0].headers.end-user.regex",
            ),
            // Two kinds of match at once.
            (
                SEED_VS.replace("exact: jason", "{exact: jason, prefix: j}"),
                DR.to_string(),
                "virtualServices[0].spec.http[0].match[0].headers.end-user",
            ),
            // An upper-case header name.
            (
                SEED_VS.replace("end-user:", "End-User:"),
                DR.to_string(),
                "virtualServices[0].spec.http[0].match[0].headers.End-User",
            ),
            // A port the service does not have.
            (
                SEED_VS.replace(
                    "subset: v2\n    - route",
                    "subset: v2\n          port: {number: 80}\n    - route",
                ),
                DR.to_string(),
                "virtualServices[0].spec.http[0].route[0].destination.port.number",
            ),
            // The wrong kind.
            (
                SEED_VS.replace("kind: VirtualService", "kind: DestinationRule"),
                DR.to_string(),
                "virtualServices[0].kind",
            ),
            // All weights zero.
            (
                SEED_VS
                    .replace("weight: 90", "weight: 0")
                    .replace("weight: 10", "weight: 0"),
                DR.to_string(),
                "virtualServices[0].spec.http[1].route",
            ),
        ];
        for (vs, dr, field) in cases {
            let err = parse(&format!("{vs}{dr}")).unwrap_err();
            assert!(err.contains(&format!("{field}:")), "{field}: {err}");
        }
    }

    #[test]
    fn hosts_resolve_by_short_name_namespace_or_fqdn_and_one_virtual_service_per_host() {
        for host in [
            "reviews",
            "reviews.default",
            "reviews.default.svc.cluster.local",
        ] {
            let vs = SEED_VS.replace(
                "    hosts:\n    - reviews",
                &format!("    hosts:\n    - {host}"),
            );
            let state = parse(&format!("{vs}{DR}")).unwrap();
            assert!(
                state.routes().for_service("default/reviews").is_some(),
                "{host}"
            );
        }
        let twice = format!(
            "{SEED_VS}{}",
            SEED_VS
                .replace("virtualServices:\n", "")
                .replace("reviews-canary", "again")
        );
        let err = parse(&format!("{twice}{DR}")).unwrap_err();
        assert!(
            err.contains("virtualServices[1].spec.hosts[0]") && err.contains("virtualServices[0]"),
            "{err}"
        );
    }

    /// Every field of this slice, as Istio writes it.
    const FULL_VS: &str = r#"
virtualServices:
- apiVersion: networking.ambit.dev/v1
  kind: VirtualService
  metadata: {name: reviews}
  spec:
    hosts: [reviews]
    http:
    - name: writes
      match:
      - method: {regex: "PUT|POST"}
        queryParams: {canary: {exact: "yes"}, debug: {}}
        withoutHeaders: {x-opt-out: {}}
        uri: {prefix: /API}
        ignoreUriCase: true
      rewrite: {uri: /v2, authority: reviews.internal}
      headers:
        request: {set: {X-Route: writes}, add: {x-added: "1"}, remove: [x-secret]}
        response: {set: {x-resp: "yes"}}
      route:
      - destination: {host: reviews, subset: v2}
        headers: {request: {set: {x-dest: v2}}}
    - name: moved
      match: [{uri: {prefix: /old}}]
      redirect: {uri: /new, authority: shop.example, port: 8443, scheme: https, redirectCode: 308}
    - name: gone
      match: [{uri: {exact: /gone}}]
      directResponse: {status: 410, body: {string: gone}}
    - route:
      - destination: {host: reviews, subset: v1}
"#;

    const LB_DR: &str = r#"
destinationRules:
- apiVersion: networking.ambit.dev/v1
  kind: DestinationRule
  metadata: {name: reviews}
  spec:
    host: reviews
    trafficPolicy:
      loadBalancer: {simple: LEAST_REQUEST}
    subsets:
    - name: v1
      labels: {version: v1}
    - name: v2
      labels: {version: v2}
      trafficPolicy:
        loadBalancer:
          consistentHash:
            httpCookie: {name: session, path: /, ttl: 1h}
            maglev: {tableSize: 1031}
"#;

    #[test]
    fn matches_filters_and_load_balancers_parse_with_istio_names() {
        use crate::state::routes::{
            ConsistentHash, DirectResponse, HashKey, LoadBalancer, Redirect, Rewrite,
        };
        let state = parse(&format!("{FULL_VS}{LB_DR}")).unwrap();
        let table = state.routes();
        let routes = table.for_service("default/reviews").unwrap();
        let writes = &routes.http[0];
        let m = &writes.matches[0];
        assert!(matches!(&m.method, Some(StringMatch::Regex(r)) if r.as_str() == "PUT|POST"));
        assert_eq!(m.query_params.len(), 2);
        assert_eq!(m.query_params[0].name, "canary");
        assert_eq!(m.query_params[1].value, None);
        assert_eq!(m.without_headers[0].name, "x-opt-out");
        assert!(m.ignore_uri_case);
        assert_eq!(
            writes.filters.rewrite,
            Some(Rewrite {
                uri: Some("/v2".into()),
                authority: Some("reviews.internal".into()),
                full_path: false,
            })
        );
        // Header names are lower-cased.
        assert_eq!(
            writes.filters.headers.request.set,
            [("x-route".to_string(), "writes".to_string())]
        );
        assert_eq!(writes.filters.headers.request.remove, ["x-secret"]);
        assert_eq!(
            writes.destinations[0].headers.request.set,
            [("x-dest".to_string(), "v2".to_string())]
        );
        let moved = &routes.http[1];
        assert!(moved.destinations.is_empty());
        assert_eq!(
            moved.filters.redirect,
            Some(Redirect {
                uri: Some("/new".into()),
                authority: Some("shop.example".into()),
                port: Some(8443),
                scheme: Some("https".into()),
                code: 308
            })
        );
        assert_eq!(
            routes.http[2].filters.direct_response,
            Some(DirectResponse {
                status: 410,
                body: Some("gone".into())
            })
        );
        // The redirect code defaults to 301.
        let default_code = FULL_VS.replace(", redirectCode: 308", "");
        let state = parse(&format!("{default_code}{LB_DR}")).unwrap();
        let code = state.routes().for_service("default/reviews").unwrap().http[1]
            .filters
            .redirect
            .as_ref()
            .unwrap()
            .code;
        assert_eq!(code, 301);

        // The service's policy, and the subset's overriding it.
        let v1 = &routes.http[3].destinations[0];
        assert_eq!(table.load_balancer(v1), &LoadBalancer::LeastRequest);
        assert_eq!(
            table.load_balancer(&writes.destinations[0]),
            &LoadBalancer::ConsistentHash(ConsistentHash {
                key: HashKey::Cookie {
                    name: "session".into(),
                    path: Some("/".into()),
                    ttl_seconds: Some(3600)
                },
                table_size: 1031
            })
        );
    }

    #[test]
    fn bad_matches_filters_and_policies_name_their_field() {
        let vs_cases = [
            (
                "canary: {exact: \"yes\"}",
                "canary: {prefix: \"y\"}",
                "spec.http[0].match[0].queryParams.canary.prefix",
            ),
            (
                "redirectCode: 308",
                "redirectCode: 300",
                "spec.http[1].redirect.redirectCode",
            ),
            (
                "scheme: https",
                "scheme: ftp",
                "spec.http[1].redirect.scheme",
            ),
            ("uri: /new", "uri: new", "spec.http[1].redirect.uri"),
            (
                "status: 410",
                "status: 99",
                "spec.http[2].directResponse.status",
            ),
            (
                "X-Route: writes",
                "host: writes",
                "spec.http[0].headers.request.set.host",
            ),
            (
                "x-added: \"1\"",
                "x-added: \"%REQ(x)%\"",
                "spec.http[0].headers.request.add.x-added",
            ),
            (
                "remove: [x-secret]",
                "remove: [\"bad name\"]",
                "spec.http[0].headers.request.remove[0]",
            ),
            (
                "method: {regex: \"PUT|POST\"}",
                "method: {}",
                "spec.http[0].match[0].method",
            ),
            (
                "withoutHeaders: {x-opt-out: {}}",
                "withoutHeaders: {X-Opt: {}}",
                "spec.http[0].match[0].withoutHeaders.X-Opt",
            ),
            // A redirect that also routes.
            (
                "redirectCode: 308}",
                "redirectCode: 308}\n      route: [{destination: {host: reviews}}]",
                "spec.http[1].route",
            ),
            // A field of Istio's not implemented.
            (
                "scheme: https",
                "derivePort: FROM_REQUEST_PORT",
                "spec.http[1].redirect",
            ),
            (
                "authority: reviews.internal",
                "authority: \"bad host\"",
                "spec.http[0].rewrite.authority",
            ),
        ];
        for (from, to, field) in vs_cases {
            assert!(FULL_VS.contains(from), "{from}");
            let err = parse(&format!("{}{LB_DR}", FULL_VS.replace(from, to))).unwrap_err();
            assert!(
                err.contains(&format!("virtualServices[0].{field}")),
                "{field}: {err}"
            );
        }
        let dr_cases = [
            (
                "simple: LEAST_REQUEST",
                "simple: PASSTHROUGH",
                "spec.trafficPolicy.loadBalancer.simple",
            ),
            (
                "simple: LEAST_REQUEST",
                "simple: FASTEST",
                "spec.trafficPolicy.loadBalancer.simple",
            ),
            (
                "{simple: LEAST_REQUEST}",
                "{simple: RANDOM, consistentHash: {useSourceIp: true}}",
                "spec.trafficPolicy.loadBalancer",
            ),
            (
                "tableSize: 1031",
                "tableSize: 1024",
                "spec.subsets[1].trafficPolicy.loadBalancer.consistentHash.maglev.tableSize",
            ),
            (
                "maglev: {tableSize: 1031}",
                "ringHash: {minimumRingSize: 1024}",
                "spec.subsets[1].trafficPolicy.loadBalancer.consistentHash.ringHash",
            ),
            (
                "ttl: 1h",
                "ttl: soon",
                "spec.subsets[1].trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl",
            ),
            (
                "httpCookie: {name: session, path: /, ttl: 1h}",
                "httpHeaderName: x-user\n            useSourceIp: true",
                "spec.subsets[1].trafficPolicy.loadBalancer.consistentHash",
            ),
            (
                "loadBalancer: {simple: LEAST_REQUEST}",
                "portLevelSettings: [{port: {number: 80}}]",
                "spec.trafficPolicy",
            ),
        ];
        for (from, to, field) in dr_cases {
            assert!(LB_DR.contains(from), "{from}");
            let err = parse(&format!("{FULL_VS}{}", LB_DR.replace(from, to))).unwrap_err();
            assert!(
                err.contains(&format!("destinationRules[0].{field}")),
                "{field}: {err}"
            );
        }
    }
}
