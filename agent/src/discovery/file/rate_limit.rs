//! `rateLimitPolicies`: Ambit's `RateLimitPolicy` (`networking.ambit.dev/v1`), the waypoint's
//! local rate limits ([`crate::state::ratelimit`]), checked here for the mesh file and for
//! Kubernetes (`discovery::kube::ratelimit`), with errors naming the field.
//!
//! Istio has no first-class field for local rate limits (its users patch Envoy's
//! `local_ratelimit` filter in with an EnvoyFilter); the spec keeps Envoy's words
//! (`maxTokens`, `tokensPerFill`, `fillInterval`) and Istio's `targetRefs`, so that such an
//! EnvoyFilter translates field for field (docs/waypoint.md, "Local rate limiting").
use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

use super::{ConfigError, ObjectMetaFile, Validator, routing::KnownServices};
use crate::state::ratelimit::{RateLimit, ServiceRateLimits, TokenBucket};

/// Envoy's floor on `fill_interval` (its local rate limit refuses shorter ones).
pub const MIN_FILL_INTERVAL: Duration = Duration::from_millis(50);

/// The longest `fillInterval`: a day (longer ones would be no limit an operator can reason about,
/// and would overflow time arithmetic at the extreme).
pub const MAX_FILL_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// The most tokens a bucket may hold or gain per fill.
pub const MAX_TOKENS: i64 = 1_000_000_000;

/// The most targets one policy may name (as the CRD's schema says).
pub const MAX_TARGETS: usize = 16;

/// One entry of `rateLimitPolicies`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitPolicyFile {
    /// Must be `networking.ambit.dev/v1`.
    pub api_version: String,
    /// Must be `RateLimitPolicy`.
    pub kind: String,
    /// Name and namespace.
    pub metadata: ObjectMetaFile,
    /// What is limited, and how.
    pub spec: RateLimitPolicySpecFile,
}

/// A `RateLimitPolicy`'s `spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitPolicySpecFile {
    /// The services (and optionally one named route of each, `sectionName`) limited.
    #[serde(default)]
    pub target_refs: Vec<RateLimitTargetRefFile>,
    /// One bucket for all the target's requests, whoever sends them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_bucket: Option<TokenBucketFile>,
    /// One bucket per client identity (the SPIFFE identity the waypoint verified).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_identity: Option<TokenBucketFile>,
    /// Envoy's `enable_x_ratelimit_headers`: `OFF` (the default, as Envoy's) or
    /// `DRAFT_VERSION_03` (the `x-ratelimit-*` headers on every response the policy applies to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_x_ratelimit_headers: Option<String>,
}

/// A `targetRefs` entry: Istio's `PolicyTargetReference`, plus `sectionName` naming a route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitTargetRefFile {
    /// `""` or absent (the core group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `Service`.
    pub kind: String,
    /// The service's name (in the policy's namespace).
    pub name: String,
    /// Must be the policy's namespace when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// A route of the service by name (a VirtualService `http[].name` or an HTTPRoute/GRPCRoute
    /// rule `name`); absent: the whole service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

/// Envoy's `TokenBucket`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenBucketFile {
    /// The bucket's size (1 to 10^9). Wider than `u32` so that a negative or huge value is
    /// reported by validation, with the field.
    pub max_tokens: i64,
    /// Tokens added per fill (default 1, at most 10^9).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_fill: Option<i64>,
    /// How often tokens are added, e.g. `1s` (50 ms to 24 h).
    pub fill_interval: String,
}

/// A checked policy: each target's service uid, route name (`None`: the whole service) and
/// limits, in `targetRefs` order.
pub(crate) type CheckedRateLimit = Vec<(String, Option<String>, RateLimit)>;

/// Checks one RateLimitPolicy (its fields named after `at`, e.g. `rateLimitPolicies[0]`);
/// shared by the mesh file and Kubernetes (`discovery::kube::ratelimit`).
pub(crate) fn rate_limit_policy(
    path: &std::path::Path,
    at: &str,
    policy: &RateLimitPolicyFile,
    known: &KnownServices<'_>,
) -> Result<CheckedRateLimit, ConfigError> {
    Validator::new(path).rate_limit_policy(at, policy, known)
}

/// Attaches a checked policy to `table`, all its targets or none: `Err` names the first target
/// (its index in `targetRefs`) that already has a policy, and that policy's source.
pub(crate) fn attach(
    table: &mut BTreeMap<String, ServiceRateLimits>,
    checked: CheckedRateLimit,
) -> Result<(), (usize, String)> {
    for (i, (uid, route, _)) in checked.iter().enumerate() {
        let Some(limits) = table.get(uid) else {
            continue;
        };
        let existing = match route {
            Some(route) => limits.routes.get(route),
            None => limits.service.as_ref(),
        };
        if let Some(existing) = existing {
            return Err((i, existing.source.clone()));
        }
    }
    for (uid, route, limit) in checked {
        let limits = table.entry(uid).or_default();
        match route {
            Some(route) => {
                limits.routes.insert(route, limit);
            }
            None => limits.service = Some(limit),
        }
    }
    Ok(())
}

impl Validator<'_> {
    /// Checks `rateLimitPolicies` against the services: the rate limits by service. Two
    /// policies for one service (or one route of it) are refused.
    pub(super) fn rate_limits(
        &self,
        policies: &[RateLimitPolicyFile],
        known: &KnownServices<'_>,
    ) -> Result<BTreeMap<String, ServiceRateLimits>, ConfigError> {
        let mut table = BTreeMap::new();
        for (i, policy) in policies.iter().enumerate() {
            let at = format!("rateLimitPolicies[{i}]");
            let checked = self.rate_limit_policy(&at, policy, known)?;
            if let Err((t, first)) = attach(&mut table, checked) {
                return Err(self.invalid(
                    format!("{at}.spec.targetRefs[{t}]"),
                    format!("its target already has {first} (one RateLimitPolicy per target)"),
                ));
            }
        }
        Ok(table)
    }

    fn rate_limit_policy(
        &self,
        at: &str,
        policy: &RateLimitPolicyFile,
        known: &KnownServices<'_>,
    ) -> Result<CheckedRateLimit, ConfigError> {
        self.header(at, &policy.api_version, &policy.kind, "RateLimitPolicy")?;
        let namespace = self.meta(at, &policy.metadata)?;
        let spec = &policy.spec;
        let bucket = |field: &str, file: &Option<TokenBucketFile>| match file {
            Some(file) => self
                .token_bucket(&format!("{at}.spec.{field}"), file)
                .map(Some),
            None => Ok(None),
        };
        let limit = RateLimit {
            source: format!("RateLimitPolicy {namespace}/{}", policy.metadata.name),
            token_bucket: bucket("tokenBucket", &spec.token_bucket)?,
            per_identity: bucket("perIdentity", &spec.per_identity)?,
            x_ratelimit_headers: match spec.enable_x_ratelimit_headers.as_deref() {
                None | Some("OFF") => false,
                Some("DRAFT_VERSION_03") => true,
                Some(other) => {
                    return Err(self.invalid(
                        format!("{at}.spec.enableXRatelimitHeaders"),
                        format!("{other:?}: expected OFF or DRAFT_VERSION_03"),
                    ));
                }
            },
        };
        if limit.token_bucket.is_none() && limit.per_identity.is_none() {
            return Err(self.invalid(
                format!("{at}.spec"),
                "set tokenBucket, perIdentity or both (a policy without a bucket limits nothing)",
            ));
        }
        let refs_at = format!("{at}.spec.targetRefs");
        if spec.target_refs.is_empty() {
            return Err(self.invalid(refs_at, "must name at least one Service"));
        }
        if spec.target_refs.len() > MAX_TARGETS {
            return Err(self.invalid(
                refs_at,
                format!("{} targets: at most {MAX_TARGETS}", spec.target_refs.len()),
            ));
        }
        let mut checked: CheckedRateLimit = Vec::with_capacity(spec.target_refs.len());
        for (t, target) in spec.target_refs.iter().enumerate() {
            let field = format!("{refs_at}[{t}]");
            match (target.group.as_deref().unwrap_or(""), target.kind.as_str()) {
                ("", "Service") => {}
                (group, kind) => {
                    return Err(self.invalid(
                        field,
                        format!(
                            "unsupported target {group:?}/{kind:?}: expected kind Service (group \
                             \"\")"
                        ),
                    ));
                }
            }
            if let Some(ns) = &target.namespace
                && ns != namespace
            {
                return Err(self.invalid(
                    format!("{field}.namespace"),
                    format!(
                        "{ns:?}: a policy can only target services of its own namespace \
                         ({namespace})"
                    ),
                ));
            }
            self.non_empty(format!("{field}.name"), &target.name)?;
            let Some(service) = known.get(&(namespace, target.name.as_str())) else {
                return Err(self.invalid(
                    format!("{field}.name"),
                    format!("no service {namespace}/{}", target.name),
                ));
            };
            let route = match &target.section_name {
                Some(name) => {
                    self.non_empty(format!("{field}.sectionName"), name)?;
                    Some(name.clone())
                }
                None => None,
            };
            let uid = service.uid();
            if checked.iter().any(|(u, r, _)| *u == uid && *r == route) {
                return Err(self.invalid(field, "names the same target as an earlier entry"));
            }
            checked.push((uid, route, limit.clone()));
        }
        Ok(checked)
    }

    fn token_bucket(&self, at: &str, file: &TokenBucketFile) -> Result<TokenBucket, ConfigError> {
        let count = |field: &str, value: i64| {
            if (1..=MAX_TOKENS).contains(&value) {
                Ok(value as u32)
            } else {
                Err(self.invalid(
                    format!("{at}.{field}"),
                    format!("{value} is not in 1..={MAX_TOKENS}"),
                ))
            }
        };
        let max_tokens = count("maxTokens", file.max_tokens)?;
        let tokens_per_fill = count("tokensPerFill", file.tokens_per_fill.unwrap_or(1))?;
        let field = format!("{at}.fillInterval");
        let fill_interval = self.duration(&field, &file.fill_interval)?;
        if !(MIN_FILL_INTERVAL..=MAX_FILL_INTERVAL).contains(&fill_interval) {
            return Err(self.invalid(
                field,
                format!(
                    "{:?} is not between 50ms (Envoy's minimum) and 24h",
                    file.fill_interval
                ),
            ));
        }
        Ok(TokenBucket {
            max_tokens,
            tokens_per_fill,
            fill_interval,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::parse_mesh;

    const SERVICES: &str = r#"
workloads:
- {name: web-0, namespace: shop, node: n0, ips: [10.10.0.4], labels: {app: web}, netns: {pid: 1}}
services:
- {name: web, namespace: shop, vips: [10.96.0.10], selector: {app: web}, ports: [{port: 80}]}
- {name: api, namespace: shop, vips: [10.96.0.11], selector: {app: web}, ports: [{port: 80}]}
- {name: db, namespace: other, vips: [10.96.0.12], selector: {app: web}, ports: [{port: 80}]}
rateLimitPolicies:
"#;

    fn mesh(policies: &str) -> Result<crate::state::MeshState, String> {
        let text = format!("{SERVICES}{policies}");
        parse_mesh(std::path::Path::new("mesh.yaml"), text.as_bytes()).map_err(|e| e.to_string())
    }

    fn error(policies: &str) -> String {
        mesh(policies).expect_err("must be rejected")
    }

    const GOOD: &str = r#"
- apiVersion: networking.ambit.dev/v1
  kind: RateLimitPolicy
  metadata: {name: limit, namespace: shop}
  spec:
    targetRefs: [{kind: Service, name: web}, {kind: Service, group: "", name: api, sectionName: reads}]
    tokenBucket: {maxTokens: 100, tokensPerFill: 10, fillInterval: 1s}
    perIdentity: {maxTokens: 5, fillInterval: 500ms}
"#;

    #[test]
    fn a_policy_attaches_to_services_and_routes() {
        let state = mesh(GOOD).unwrap();
        let limits = &state.routes().rate_limits;
        let web = limits["shop/web"].service.as_ref().unwrap();
        assert_eq!(web.source, "RateLimitPolicy shop/limit");
        // No x-ratelimit-* headers unless asked for (Envoy's default).
        assert!(!web.x_ratelimit_headers);
        for (value, shown) in [("OFF", false), ("DRAFT_VERSION_03", true)] {
            let state = mesh(&GOOD.replace(
                "    perIdentity: {maxTokens: 5, fillInterval: 500ms}\n",
                &format!(
                    "    perIdentity: {{maxTokens: 5, fillInterval: 500ms}}\n    enableXRatelimitHeaders: {value}\n"
                ),
            ))
            .unwrap();
            let web = state.routes().rate_limits["shop/web"]
                .service
                .clone()
                .unwrap();
            assert_eq!(web.x_ratelimit_headers, shown, "{value}");
        }
        assert_eq!(
            web.token_bucket,
            Some(TokenBucket {
                max_tokens: 100,
                tokens_per_fill: 10,
                fill_interval: Duration::from_secs(1)
            })
        );
        assert_eq!(
            web.per_identity,
            Some(TokenBucket {
                max_tokens: 5,
                tokens_per_fill: 1,
                fill_interval: Duration::from_millis(500)
            })
        );
        assert!(limits["shop/api"].service.is_none());
        assert!(limits["shop/api"].routes.contains_key("reads"));
    }

    /// Every field is checked, and the error names it.
    #[test]
    fn each_field_is_validated_and_named() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "kind: RateLimitPolicy",
                "kind: RateLimit",
                "rateLimitPolicies[0].kind",
            ),
            (
                "apiVersion: networking.ambit.dev/v1",
                "apiVersion: networking.istio.io/v1",
                "rateLimitPolicies[0].apiVersion",
            ),
            (
                "name: limit,",
                "name: \"\",",
                "rateLimitPolicies[0].metadata.name",
            ),
            (
                "maxTokens: 100,",
                "maxTokens: 0,",
                "rateLimitPolicies[0].spec.tokenBucket.maxTokens: 0 is not in 1..=1000000000",
            ),
            (
                "maxTokens: 5,",
                "maxTokens: -5,",
                "rateLimitPolicies[0].spec.perIdentity.maxTokens: -5",
            ),
            (
                "tokensPerFill: 10,",
                "tokensPerFill: 1000000001,",
                "rateLimitPolicies[0].spec.tokenBucket.tokensPerFill",
            ),
            (
                "fillInterval: 1s}",
                "fillInterval: 10ms}",
                "rateLimitPolicies[0].spec.tokenBucket.fillInterval: \"10ms\" is not between 50ms",
            ),
            (
                "fillInterval: 500ms}",
                "fillInterval: 25h}",
                "rateLimitPolicies[0].spec.perIdentity.fillInterval",
            ),
            (
                "fillInterval: 1s}",
                "fillInterval: soon}",
                "rateLimitPolicies[0].spec.tokenBucket.fillInterval: invalid duration",
            ),
            (
                "{kind: Service, name: web}",
                "{kind: Gateway, name: web}",
                "rateLimitPolicies[0].spec.targetRefs[0]: unsupported target",
            ),
            (
                "{kind: Service, name: web}",
                "{kind: Service, name: nope}",
                "rateLimitPolicies[0].spec.targetRefs[0].name: no service shop/nope",
            ),
            (
                "{kind: Service, name: web}",
                "{kind: Service, name: db, namespace: other}",
                "rateLimitPolicies[0].spec.targetRefs[0].namespace",
            ),
            (
                "sectionName: reads",
                "sectionName: \"\"",
                "rateLimitPolicies[0].spec.targetRefs[1].sectionName: must not be empty",
            ),
            (
                "group: \"\", name: api, sectionName: reads",
                "name: web",
                "rateLimitPolicies[0].spec.targetRefs[1]: names the same target",
            ),
            (
                "targetRefs: [{kind: Service, name: web}, {kind: Service, group: \"\", name: api, sectionName: reads}]",
                "targetRefs: []",
                "rateLimitPolicies[0].spec.targetRefs: must name at least one Service",
            ),
            ("perIdentity:", "perPod:", "unknown field `perPod`"),
            (
                "    perIdentity: {maxTokens: 5, fillInterval: 500ms}\n",
                "    perIdentity: {maxTokens: 5, fillInterval: 500ms}\n    enableXRatelimitHeaders: DRAFT_VERSION_02\n",
                "rateLimitPolicies[0].spec.enableXRatelimitHeaders: \"DRAFT_VERSION_02\": expected OFF or DRAFT_VERSION_03",
            ),
        ];
        for (from, to, expected) in cases {
            assert!(GOOD.contains(from), "{from}");
            let err = error(&GOOD.replacen(from, to, 1));
            assert!(err.contains(expected), "{to}: {err}");
        }
        // Neither bucket.
        let neither = GOOD
            .replace(
                "    tokenBucket: {maxTokens: 100, tokensPerFill: 10, fillInterval: 1s}\n",
                "",
            )
            .replace("    perIdentity: {maxTokens: 5, fillInterval: 500ms}\n", "");
        assert!(error(&neither).contains("rateLimitPolicies[0].spec: set tokenBucket"));
    }

    #[test]
    fn two_policies_for_one_target_are_refused() {
        let second = GOOD.replace("name: limit,", "name: again,").replace(
            "targetRefs: [{kind: Service, name: web}, {kind: Service, group: \"\", name: api, sectionName: reads}]",
            "targetRefs: [{kind: Service, name: api}, {kind: Service, name: api, sectionName: reads}]",
        );
        let err = error(&format!("{GOOD}{second}"));
        assert!(
            err.contains("rateLimitPolicies[1].spec.targetRefs[1]: its target already has RateLimitPolicy shop/limit"),
            "{err}"
        );
    }
}
