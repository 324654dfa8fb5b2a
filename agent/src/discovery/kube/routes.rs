//! Ambit's routing resources in Kubernetes (`networking.ambit.dev/v1` `VirtualService` and
//! `DestinationRule`, `deploy/crds/`) and their conversion to the state's route model
//! ([`crate::state::routes`]).
//!
//! A resource's `spec` is Istio's, checked by the very conversion of the mesh file's
//! `virtualServices` and `destinationRules` (`discovery::file::virtual_service`): the
//! same fields are supported, the same rules hold, the errors name the same fields (under
//! `spec.`). Only the Kubernetes-specific parts live here: each resource is judged on its own,
//! conflicts between resources are settled Istio's way (the DestinationRules of one host merged,
//! the oldest VirtualService winning), and a rejected
//! resource keeps its last accepted version in force, as a rejected mesh file does.
//!
//! "Last accepted" is per process: the node agents and waypoints remember the last version of
//! each resource they accepted; one that starts while a resource is rejected has none, and
//! routes that service as if the resource did not exist (to the service itself). The status
//! (`Accepted` condition) is written by the cluster's status writer, which judges exactly as
//! the sources do.
use std::{
    collections::{HashMap, HashSet},
    fmt,
    path::Path,
    sync::Arc,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;

use super::security::{Acceptance, PolicyStatus, Verdict, creation_order, parse_spec};
use crate::{
    discovery::file::{
        ConfigError, DestinationRuleFile, DestinationRuleSpecFile, MergedRules, ObjectMetaFile,
        PolicyError, ROUTING_API_VERSION, VirtualServiceFile, VirtualServiceSpecFile,
        destination_rule, known_services, virtual_service,
    },
    state::{Service, routes::RouteTable},
};

/// The API group of Ambit's routing resources.
pub const NETWORKING_GROUP: &str = "networking.ambit.dev";

super::spec_resource!(
    /// A `virtualservices.networking.ambit.dev/v1` resource: Istio's VirtualService spec.
    VirtualServiceResource,
    status: PolicyStatus,
    ROUTING_API_VERSION,
    NETWORKING_GROUP,
    "VirtualService",
    "virtualservices"
);
super::spec_resource!(
    /// A `destinationrules.networking.ambit.dev/v1` resource: Istio's DestinationRule spec.
    DestinationRuleResource,
    status: PolicyStatus,
    ROUTING_API_VERSION,
    NETWORKING_GROUP,
    "DestinationRule",
    "destinationrules"
);

/// The kinds of resources whose last accepted version is kept: the routing resources, and the
/// policy resources (`super::security`, which reuses this key and `judge`'s rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteKind {
    /// `networking.ambit.dev/v1` VirtualService.
    VirtualService,
    /// `networking.ambit.dev/v1` DestinationRule.
    DestinationRule,
    /// `gateway.networking.k8s.io/v1` HTTPRoute.
    HttpRoute,
    /// `gateway.networking.k8s.io/v1` GRPCRoute.
    GrpcRoute,
    /// `networking.ambit.dev/v1` RateLimitPolicy (`super::ratelimit`).
    RateLimitPolicy,
    /// `security.ambit.dev/v1` AuthorizationPolicy (`super::security`).
    AuthorizationPolicy,
    /// `security.ambit.dev/v1` PeerAuthentication (`super::security`).
    PeerAuthentication,
    /// `security.ambit.dev/v1` RequestAuthentication (`super::security`).
    RequestAuthentication,
}

impl fmt::Display for RouteKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RouteKind::VirtualService => "VirtualService",
            RouteKind::DestinationRule => "DestinationRule",
            RouteKind::HttpRoute => "HTTPRoute",
            RouteKind::GrpcRoute => "GRPCRoute",
            RouteKind::RateLimitPolicy => "RateLimitPolicy",
            RouteKind::AuthorizationPolicy => "AuthorizationPolicy",
            RouteKind::PeerAuthentication => "PeerAuthentication",
            RouteKind::RequestAuthentication => "RequestAuthentication",
        })
    }
}

/// A routing (or policy) resource: its kind, namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteKey {
    /// Its kind.
    pub kind: RouteKind,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl RouteKey {
    pub(super) fn of(kind: RouteKind, meta: &ObjectMeta) -> Self {
        Self {
            kind,
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

impl fmt::Display for RouteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// The routes of the cluster, and the verdict on each resource.
#[derive(Debug, Default)]
pub struct ConvertedRoutes {
    /// The route table of the state.
    pub table: RouteTable,
    /// Every resource's verdict.
    pub verdicts: HashMap<RouteKey, Acceptance>,
    /// The spec of each resource in force: the current one if accepted, else its last accepted
    /// one (to be given back as `last_good` next time).
    pub in_force: HashMap<RouteKey, Value>,
}

/// A conversion error as a field of the resource: the shared conversion names fields after an
/// empty prefix (`.spec.http[0]...`).
pub(super) fn field_error(error: ConfigError) -> PolicyError {
    match error {
        ConfigError::Invalid { field, reason, .. } => PolicyError {
            field: field.trim_start_matches('.').to_string(),
            reason,
        },
        other => PolicyError {
            field: "spec".into(),
            reason: other.to_string(),
        },
    }
}

/// `UnsupportedField` for a field the schema has and Ambit does not implement (the parse
/// reports it as unknown), `Invalid` for anything else.
fn verdict_of(error: &PolicyError) -> Verdict {
    if error.reason.starts_with("unknown field") {
        Verdict::UnsupportedField
    } else {
        Verdict::Invalid
    }
}

pub(super) fn meta_file(meta: &ObjectMeta) -> ObjectMetaFile {
    ObjectMetaFile {
        name: meta.name.clone().unwrap_or_default(),
        namespace: meta.namespace.clone(),
        ..ObjectMetaFile::default()
    }
}

fn destination_rule_file(
    meta: &ObjectMeta,
    spec: &Value,
) -> Result<DestinationRuleFile, PolicyError> {
    Ok(DestinationRuleFile {
        api_version: ROUTING_API_VERSION.into(),
        kind: "DestinationRule".into(),
        metadata: meta_file(meta),
        spec: parse_spec::<DestinationRuleSpecFile>(spec)?,
    })
}

fn virtual_service_file(
    meta: &ObjectMeta,
    spec: &Value,
) -> Result<VirtualServiceFile, PolicyError> {
    Ok(VirtualServiceFile {
        api_version: ROUTING_API_VERSION.into(),
        kind: "VirtualService".into(),
        metadata: meta_file(meta),
        spec: parse_spec::<VirtualServiceSpecFile>(spec)?,
    })
}

/// Converts every routing resource against `services`; `last_good` holds the specs in force
/// after the previous conversion ([`ConvertedRoutes::in_force`]), used for the resources now
/// rejected.
///
/// DestinationRules first (a VirtualService's subsets are theirs), each kind oldest first
/// (`creationTimestamp`, then namespace and name), as Istio orders them: the DestinationRules
/// of one host are merged as Istio merges them (`discovery::file::MergedRules`); one VirtualService per
/// service, the older one winning (Istio merges VirtualServices only at gateways).
pub fn convert_routes(
    virtual_services: &[Arc<VirtualServiceResource>],
    destination_rules: &[Arc<DestinationRuleResource>],
    services: &[Service],
    last_good: &HashMap<RouteKey, Value>,
) -> ConvertedRoutes {
    let known = known_services(services);
    let path = Path::new("");
    let mut out = ConvertedRoutes::default();

    let mut rules: Vec<&DestinationRuleResource> = destination_rules.iter().map(|r| &**r).collect();
    rules.sort_by(|a, b| creation_order(&a.metadata).cmp(&creation_order(&b.metadata)));
    let mut merged = MergedRules::default();
    let mut rules_of: HashMap<String, Vec<RouteKey>> = HashMap::new();
    for rule in rules {
        let key = RouteKey::of(RouteKind::DestinationRule, &rule.metadata);
        let convert = |spec: &Value| {
            let file = destination_rule_file(&rule.metadata, spec)?;
            destination_rule(path, "", &file, &known).map_err(field_error)
        };
        let (mut verdict, in_force) =
            judge(&key, &rule.spec, last_good, convert, |(uid, named, _)| {
                format!("{} subset(s) of service {uid}", named.len())
            });
        if let Some((spec, checked)) = in_force {
            let uid = checked.0.clone();
            let earlier = rules_of.entry(uid).or_default();
            let duplicates = merged.add(checked);
            let accepted = verdict.verdict == Verdict::Accepted;
            if accepted && !earlier.is_empty() {
                let names: Vec<String> = earlier.iter().map(ToString::to_string).collect();
                verdict.message.push_str(&format!(
                    "; merged with the older {} as Istio merges the rules of one host",
                    names.join(", ")
                ));
            }
            if accepted && !duplicates.is_empty() {
                verdict.message.push_str(&format!(
                    "; subset(s) {} already defined by an older rule: ignored",
                    duplicates.join(", ")
                ));
            }
            earlier.push(key.clone());
            out.in_force.insert(key.clone(), spec);
        }
        out.verdicts.insert(key, verdict);
    }
    let MergedRules {
        subsets,
        load_balancers,
        upstream,
    } = merged;
    out.table.load_balancers = load_balancers;
    out.table.upstream = upstream;

    let mut routes: Vec<&VirtualServiceResource> = virtual_services.iter().map(|r| &**r).collect();
    routes.sort_by(|a, b| creation_order(&a.metadata).cmp(&creation_order(&b.metadata)));
    let mut routed_by: HashMap<String, RouteKey> = HashMap::new();
    for vs in routes {
        let key = RouteKey::of(RouteKind::VirtualService, &vs.metadata);
        let convert = |spec: &Value| {
            let file = virtual_service_file(&vs.metadata, spec)?;
            let routes = virtual_service(path, "", &file, &known, &subsets).map_err(field_error)?;
            for (h, (uid, _)) in routes.iter().enumerate() {
                if let Some(first) = routed_by.get(uid) {
                    return Err(PolicyError {
                        field: format!("spec.hosts[{h}]"),
                        reason: format!(
                            "service {uid} is already routed by {first} (Ambit does not merge \
                             VirtualServices of one host: the oldest wins)"
                        ),
                    });
                }
            }
            Ok(routes)
        };
        let (verdict, in_force) = judge(&key, &vs.spec, last_good, convert, |routes| {
            let hosts: HashSet<&str> = routes.iter().map(|(uid, _)| uid.as_str()).collect();
            let count = routes.first().map_or(0, |(_, r)| r.http.len());
            format!("{count} HTTP route(s) for {} service(s)", hosts.len())
        });
        out.verdicts.insert(key.clone(), verdict);
        if let Some((spec, routes)) = in_force {
            for (uid, service_routes) in routes {
                routed_by.insert(uid.clone(), key.clone());
                out.table.by_service.insert(uid, service_routes);
            }
            out.in_force.insert(key, spec);
        }
    }
    out
}

/// The verdict on a resource's current `spec`, and what is in force: the current spec if it
/// converts, else the last good one if that still converts, else nothing.
pub(super) fn judge<T>(
    key: &RouteKey,
    spec: &Value,
    last_good: &HashMap<RouteKey, Value>,
    convert: impl Fn(&Value) -> Result<T, PolicyError>,
    describe: impl Fn(&T) -> String,
) -> (Acceptance, Option<(Value, T)>) {
    match convert(spec) {
        Ok(converted) => (
            Acceptance {
                verdict: Verdict::Accepted,
                message: describe(&converted),
            },
            Some((spec.clone(), converted)),
        ),
        Err(error) => {
            // The same verdict whoever judges (the status writer has no last good version).
            let previous = last_good
                .get(key)
                .filter(|previous| *previous != spec)
                .and_then(|previous| Some((previous.clone(), convert(previous).ok()?)));
            (
                Acceptance {
                    verdict: verdict_of(&error),
                    message: error.to_string(),
                },
                previous,
            )
        }
    }
}

#[cfg(test)]
mod tests;
