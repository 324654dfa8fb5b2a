//! Ambit's `RateLimitPolicy` (`networking.ambit.dev/v1`, `deploy/crds/`) in Kubernetes: local
//! rate limits of a service or route at its waypoint ([`crate::state::ratelimit`]).
//!
//! A resource's `spec` is the mesh file's `rateLimitPolicies[].spec`, checked by the same
//! conversion (`discovery::file::rate_limit`): the errors name the same fields (under `spec.`).
//! As for the routing resources ([`super::routes`]): each resource is judged on its own, two
//! policies for one target are settled by age (the oldest wins, the other is rejected naming
//! the first), and a rejected resource keeps its last accepted version in force. The status
//! (`Accepted` condition) is written by the route status writer, which judges exactly as the
//! sources do.
use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::Arc,
};

use serde_json::Value;

use super::{
    routes::{NETWORKING_GROUP, RouteKey, RouteKind, field_error, judge, meta_file},
    security::{Acceptance, PolicyStatus, creation_order, parse_spec},
};
use crate::{
    discovery::file::{
        PolicyError, ROUTING_API_VERSION, RateLimitPolicyFile, RateLimitPolicySpecFile,
        attach_rate_limit, known_services, rate_limit_policy,
    },
    state::{Service, ratelimit::ServiceRateLimits},
};

super::spec_resource!(
    /// A `ratelimitpolicies.networking.ambit.dev/v1` resource.
    RateLimitPolicyResource,
    status: PolicyStatus,
    ROUTING_API_VERSION,
    NETWORKING_GROUP,
    "RateLimitPolicy",
    "ratelimitpolicies"
);

/// The rate limits of the cluster, and the verdict on each resource.
#[derive(Debug, Default)]
pub struct ConvertedRateLimits {
    /// Service uid to its rate limits (the state's `RouteTable::rate_limits`).
    pub table: BTreeMap<String, ServiceRateLimits>,
    /// Every resource's verdict.
    pub verdicts: HashMap<RouteKey, Acceptance>,
    /// The spec in force of each resource (its current one if accepted, else its last
    /// accepted one).
    pub in_force: HashMap<RouteKey, Value>,
}

/// Converts every RateLimitPolicy against `services`, oldest first; `last_good` holds the specs
/// in force after the previous conversion, used for the resources now rejected.
pub fn convert_rate_limits(
    policies: &[Arc<RateLimitPolicyResource>],
    services: &[Service],
    last_good: &HashMap<RouteKey, Value>,
) -> ConvertedRateLimits {
    let known = known_services(services);
    let mut out = ConvertedRateLimits::default();
    let mut sorted: Vec<&RateLimitPolicyResource> = policies.iter().map(|p| &**p).collect();
    sorted.sort_by(|a, b| creation_order(&a.metadata).cmp(&creation_order(&b.metadata)));
    for policy in sorted {
        let key = RouteKey::of(RouteKind::RateLimitPolicy, &policy.metadata);
        let convert = |spec: &Value| {
            let file = RateLimitPolicyFile {
                api_version: ROUTING_API_VERSION.into(),
                kind: "RateLimitPolicy".into(),
                metadata: meta_file(&policy.metadata),
                spec: parse_spec::<RateLimitPolicySpecFile>(spec)?,
            };
            let checked =
                rate_limit_policy(Path::new(""), "", &file, &known).map_err(field_error)?;
            // Judged against the older policies in force, without changing the table yet.
            let mut trial = out.table.clone();
            attach_rate_limit(&mut trial, checked.clone()).map_err(|(t, first)| PolicyError {
                field: format!("spec.targetRefs[{t}]"),
                reason: format!(
                    "its target already has {first} (one RateLimitPolicy per target: the \
                     oldest wins)"
                ),
            })?;
            Ok(checked)
        };
        let (verdict, in_force) = judge(&key, &policy.spec, last_good, convert, |checked| {
            let targets: Vec<String> = checked
                .iter()
                .map(|(uid, route, _)| match route {
                    Some(route) => format!("route {route} of service {uid}"),
                    None => format!("service {uid}"),
                })
                .collect();
            format!("limits {}", targets.join(", "))
        });
        out.verdicts.insert(key.clone(), verdict);
        if let Some((spec, checked)) = in_force
            && attach_rate_limit(&mut out.table, checked).is_ok()
        {
            out.in_force.insert(key, spec);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::discovery::kube::security::Verdict;

    fn services() -> Vec<Service> {
        let mesh = r#"
workloads:
- {name: web-0, namespace: shop, node: n0, ips: [10.10.0.4], labels: {app: web}, netns: {pid: 1}}
services:
- {name: web, namespace: shop, vips: [10.96.0.10], selector: {app: web}, ports: [{port: 80}]}
"#;
        let state = crate::discovery::parse_mesh(Path::new("mesh.yaml"), mesh.as_bytes()).unwrap();
        state.services().iter().map(|s| (**s).clone()).collect()
    }

    fn resource(name: &str, created: &str, spec: Value) -> Arc<RateLimitPolicyResource> {
        let meta: ObjectMeta = serde_json::from_value(json!({
            "name": name,
            "namespace": "shop",
            "creationTimestamp": created,
        }))
        .unwrap();
        Arc::new(RateLimitPolicyResource {
            metadata: meta,
            spec,
            status: None,
        })
    }

    fn good() -> Value {
        json!({
            "targetRefs": [{"kind": "Service", "name": "web"}],
            "perIdentity": {"maxTokens": 10, "fillInterval": "1s"}
        })
    }

    fn key(name: &str) -> RouteKey {
        RouteKey {
            kind: RouteKind::RateLimitPolicy,
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    #[test]
    fn an_accepted_policy_limits_its_service() {
        let converted = convert_rate_limits(
            &[resource("limit", "2026-01-01T00:00:00Z", good())],
            &services(),
            &HashMap::new(),
        );
        let verdict = &converted.verdicts[&key("limit")];
        assert!(verdict.accepted(), "{verdict:?}");
        assert_eq!(verdict.message, "limits service shop/web");
        let limit = converted.table["shop/web"].service.as_ref().unwrap();
        assert_eq!(limit.source, "RateLimitPolicy shop/limit");
        assert_eq!(limit.per_identity.unwrap().max_tokens, 10);
    }

    /// Each field is checked with an error naming it under `spec.`; a rejected resource keeps
    /// its last accepted version in force (and has none the first time).
    #[test]
    fn a_bad_field_is_named_and_the_last_good_version_stays() {
        let bad: &[(Value, &str, Verdict)] = &[
            (
                json!({"targetRefs": [{"kind": "Service", "name": "web"}],
                       "perIdentity": {"maxTokens": 0, "fillInterval": "1s"}}),
                "spec.perIdentity.maxTokens: 0 is not in 1..=1000000000",
                Verdict::Invalid,
            ),
            (
                json!({"targetRefs": [{"kind": "Service", "name": "web"}],
                       "tokenBucket": {"maxTokens": 1, "tokensPerFill": -1, "fillInterval": "1s"}}),
                "spec.tokenBucket.tokensPerFill: -1",
                Verdict::Invalid,
            ),
            (
                json!({"targetRefs": [{"kind": "Service", "name": "web"}],
                       "tokenBucket": {"maxTokens": 1, "fillInterval": "1ms"}}),
                "spec.tokenBucket.fillInterval: \"1ms\" is not between 50ms",
                Verdict::Invalid,
            ),
            (
                json!({"targetRefs": [{"kind": "Service", "name": "nope"}],
                       "tokenBucket": {"maxTokens": 1, "fillInterval": "1s"}}),
                "spec.targetRefs[0].name: no service shop/nope",
                Verdict::Invalid,
            ),
            (
                json!({"targetRefs": [{"kind": "HTTPRoute", "name": "web"}],
                       "tokenBucket": {"maxTokens": 1, "fillInterval": "1s"}}),
                "spec.targetRefs[0]: unsupported target",
                Verdict::Invalid,
            ),
            (
                json!({"targetRefs": [{"kind": "Service", "name": "web"}]}),
                "spec: set tokenBucket, perIdentity or both",
                Verdict::Invalid,
            ),
            (
                json!({"targetRefs": [{"kind": "Service", "name": "web"}],
                       "perIdentity": {"maxTokens": 1, "fillInterval": "1s", "burst": 2}}),
                "spec.perIdentity.burst: unknown field `burst`",
                Verdict::UnsupportedField,
            ),
            (
                json!({"targetRefs": [{"kind": "Service", "name": "web"}],
                       "perIdentity": {"maxTokens": "ten", "fillInterval": "1s"}}),
                "spec.perIdentity.maxTokens",
                Verdict::Invalid,
            ),
        ];
        let accepted = convert_rate_limits(
            &[resource("limit", "2026-01-01T00:00:00Z", good())],
            &services(),
            &HashMap::new(),
        );
        for (spec, expected, verdict) in bad {
            let policies = [resource("limit", "2026-01-01T00:00:00Z", spec.clone())];
            let first = convert_rate_limits(&policies, &services(), &HashMap::new());
            let acceptance = &first.verdicts[&key("limit")];
            assert_eq!(acceptance.verdict, *verdict, "{spec}: {acceptance:?}");
            assert!(
                acceptance.message.contains(expected),
                "{spec}: {}",
                acceptance.message
            );
            assert!(
                first.table.is_empty(),
                "nothing in force without a last good version"
            );
            let later = convert_rate_limits(&policies, &services(), &accepted.in_force);
            assert!(!later.verdicts[&key("limit")].accepted());
            assert_eq!(
                later.table, accepted.table,
                "{spec}: the last good version stays"
            );
            assert_eq!(later.in_force[&key("limit")], good());
        }
    }

    #[test]
    fn the_oldest_policy_of_a_target_wins() {
        let converted = convert_rate_limits(
            &[
                resource("newer", "2026-02-01T00:00:00Z", good()),
                resource("older", "2026-01-01T00:00:00Z", good()),
            ],
            &services(),
            &HashMap::new(),
        );
        assert!(converted.verdicts[&key("older")].accepted());
        let newer = &converted.verdicts[&key("newer")];
        assert!(
            newer
                .message
                .contains("spec.targetRefs[0]: its target already has RateLimitPolicy shop/older"),
            "{newer:?}"
        );
        assert_eq!(
            converted.table["shop/web"].service.as_ref().unwrap().source,
            "RateLimitPolicy shop/older"
        );
    }
}
