//! Ambit's policy resources (`security.ambit.dev/v1` `AuthorizationPolicy` and
//! `PeerAuthentication`, `deploy/crds/`) and their conversion to the [`crate::policy`] model.
//!
//! The rules are those of `docs/crds.md`. A resource's `spec` is Istio's, and is checked by the
//! same validation as the mesh file's policies ([`crate::discovery::file::authorization_policy`]):
//! only the Kubernetes-specific parts live here (the root namespace, the L7 fields the schema
//! accepts and Ambit rejects, what a rejected resource still enforces).
//!
//! A rejected resource never opens traffic: a rejected ALLOW policy allows nothing to the
//! workloads it selects; a rejected DENY policy is enforced with every rejected part counted as
//! matching (a rejected source field, operation field or condition constrains nothing, so the
//! policy denies at least what it names); a rejected PeerAuthentication is STRICT.
use std::{collections::BTreeMap, fmt};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::{
    discovery::file::{
        AuthorizationPolicyFile, CONDITION_KEYS, JwtRuleFile, PolicyError,
        RequestAuthenticationFile, RuleFile, SelectorFile, TargetRefFile,
        authorization_policy as validate_authorization_policy, peer_auth_mode,
        request_authentication as validate_request_authentication, target_refs, waypoint_policy,
        workload_selector,
    },
    policy::{
        Action, AuthorizationPolicy, PeerAuthMode, PeerAuthentication, Rule, Scope,
        l7::{L7Rule, RequestAuthentication, TargetRef, WaypointPolicy},
    },
    serdes::null_as_default,
};

/// The API group of Ambit's policy resources.
pub const GROUP: &str = "security.ambit.dev";
/// The namespace whose policies apply to the whole mesh, unless configured otherwise (where
/// Ambit is installed; Istio's `istio-system`).
pub const DEFAULT_ROOT_NAMESPACE: &str = "ambit-system";
/// Istio's annotation making a policy dry-run (evaluated and logged, never enforced).
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";
/// The status condition Ambit writes on its policy resources.
pub const ACCEPTED_CONDITION: &str = "Accepted";

super::spec_resource!(
    /// An `authorizationpolicies.security.ambit.dev/v1` resource: Istio's AuthorizationPolicy
    /// spec.
    AuthorizationPolicyResource,
    status: PolicyStatus,
    "security.ambit.dev/v1",
    GROUP,
    "AuthorizationPolicy",
    "authorizationpolicies"
);
super::spec_resource!(
    /// A `peerauthentications.security.ambit.dev/v1` resource: Istio's PeerAuthentication spec.
    PeerAuthenticationResource,
    status: PolicyStatus,
    "security.ambit.dev/v1",
    GROUP,
    "PeerAuthentication",
    "peerauthentications"
);
super::spec_resource!(
    /// A `requestauthentications.security.ambit.dev/v1` resource: Istio's RequestAuthentication
    /// spec (JWT), enforced by waypoints.
    RequestAuthenticationResource,
    status: PolicyStatus,
    "security.ambit.dev/v1",
    GROUP,
    "RequestAuthentication",
    "requestauthentications"
);

/// Written by Ambit: whether the policy is accepted as written.
// (A policy resource's `status`. The doc comments of this type and of `PolicyCondition` are
// the CRDs' schema descriptions, `super::crd`.)
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// The metadata.generation the status was written for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,
    /// The conditions: Ambit writes `Accepted`.
    #[serde(default, deserialize_with = "null_as_default")]
    #[schemars(
        length(max = 8),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"])
    )]
    pub conditions: Vec<PolicyCondition>,
}

impl PolicyStatus {
    /// The `Accepted` condition, if any.
    pub fn accepted(&self) -> Option<&PolicyCondition> {
        self.conditions
            .iter()
            .find(|c| c.type_ == ACCEPTED_CONDITION)
    }
}

/// A condition in the shape of metav1.Condition.
// Read leniently (every field has a default): a condition someone else wrote badly must not
// make the whole resource unreadable. The schema is `metav1.Condition`'s, which requires what
// is read leniently here (schemars leaves a `#[serde(default)]` field optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("required" = ["type", "status", "lastTransitionTime", "reason", "message"]))]
pub struct PolicyCondition {
    /// `Accepted`: whether the node agents enforce the policy as written.
    #[serde(rename = "type", default)]
    #[schemars(length(max = 316), regex(pattern = CONDITION_TYPE_PATTERN))]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    #[serde(default)]
    #[schemars(extend("enum" = ["True", "False", "Unknown"]))]
    pub status: String,
    /// `Accepted`, `UnsupportedField` or `Invalid`.
    #[serde(default)]
    #[schemars(length(min = 1, max = 1024), regex(pattern = CONDITION_REASON_PATTERN))]
    pub reason: String,
    /// For a rejection: the field path and why, e.g. `spec.rules[0].to[0].operation.methods:
    /// L7 field not enforced at L4`.
    #[serde(default)]
    #[schemars(length(max = 32768))]
    pub message: String,
    /// The metadata.generation the condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,
    /// When `status` last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: Option<String>,
}

/// metav1.Condition's `type`: a qualified name.
const CONDITION_TYPE_PATTERN: &str = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$";
/// metav1.Condition's `reason`: CamelCase.
const CONDITION_REASON_PATTERN: &str = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$";

/// Whether Ambit enforces a resource as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Enforced as written.
    Accepted,
    /// Uses a field the node agents cannot enforce (L7, waypoints, per-port modes).
    UnsupportedField,
    /// Breaks a rule of `docs/crds.md`.
    Invalid,
}

impl Verdict {
    /// The condition's `reason`.
    pub fn reason(self) -> &'static str {
        match self {
            Verdict::Accepted => "Accepted",
            Verdict::UnsupportedField => "UnsupportedField",
            Verdict::Invalid => "Invalid",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

/// The verdict on a resource, and the message of its `Accepted` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acceptance {
    /// Accepted, or why not.
    pub verdict: Verdict,
    /// For a rejection, the field paths and why (`; `-separated); for an acceptance, what is
    /// enforced.
    pub message: String,
}

impl Acceptance {
    /// Whether the resource is enforced as written.
    pub fn accepted(&self) -> bool {
        self.verdict == Verdict::Accepted
    }

    fn rejected(verdict: Verdict, problems: &[PolicyError]) -> Self {
        Self {
            verdict,
            message: problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        }
    }
}

/// A resource converted to the model, with the verdict on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Converted<P> {
    /// What the node agents enforce (for a rejected resource, the fail-closed form).
    pub policy: P,
    /// Accepted, or why not.
    pub acceptance: Acceptance,
}

/// The L7 fields of an authorization policy's `from[].source`.
const L7_SOURCE_FIELDS: [&str; 4] = [
    "requestPrincipals",
    "notRequestPrincipals",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
];
/// The L7 fields of an authorization policy's `to[].operation`.
const L7_OPERATION_FIELDS: [&str; 6] = [
    "hosts",
    "notHosts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
];
/// The fields binding a policy to a waypoint or gateway.
const TARGET_FIELDS: [&str; 2] = ["targetRef", "targetRefs"];

/// The namespace of a resource in the model: `None` (mesh-wide) for the root namespace.
fn model_namespace(meta: &ObjectMeta, root_namespace: &str) -> Option<String> {
    meta.namespace
        .clone()
        .filter(|namespace| namespace != root_namespace)
}

/// Whether a field is in use: present, and not `null` or an empty list or map (which Istio
/// reads as unset).
fn in_use(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) => false,
        Some(Value::Array(items)) => !items.is_empty(),
        Some(Value::Object(fields)) => !fields.is_empty(),
        Some(_) => true,
    }
}

/// Removes the fields Ambit does not enforce from an authorization policy `spec`; returns the
/// ones that were in use, as errors naming them.
fn strip_unsupported_authorization(spec: &mut Value) -> Vec<PolicyError> {
    let mut unsupported = Vec::new();
    let Some(spec) = spec.as_object_mut() else {
        return unsupported;
    };
    for field in TARGET_FIELDS {
        if in_use(spec.get(field)) {
            unsupported.push(PolicyError {
                field: format!("spec.{field}"),
                reason: "binding to a waypoint or gateway is not supported by the node agents"
                    .into(),
            });
        }
        spec.remove(field);
    }
    let Some(Value::Array(rules)) = spec.get_mut("rules") else {
        return unsupported;
    };
    let l7 = "L7 field, not enforced at L4";
    for (i, rule) in rules.iter_mut().enumerate() {
        for (list, inner, fields) in [
            ("from", "source", &L7_SOURCE_FIELDS[..]),
            ("to", "operation", &L7_OPERATION_FIELDS[..]),
        ] {
            let Some(Value::Array(entries)) = rule.get_mut(list) else {
                continue;
            };
            for (j, entry) in entries.iter_mut().enumerate() {
                let Some(object) = entry.get_mut(inner).and_then(Value::as_object_mut) else {
                    continue;
                };
                for field in fields {
                    if in_use(object.get(*field)) {
                        unsupported.push(PolicyError {
                            field: format!("spec.rules[{i}].{list}[{j}].{inner}.{field}"),
                            reason: l7.into(),
                        });
                    }
                    object.remove(*field);
                }
            }
        }
        if let Some(Value::Array(conditions)) = rule.get_mut("when") {
            let mut k = 0;
            conditions.retain(|condition| {
                let key = condition.get("key").and_then(Value::as_str);
                let keep = key.is_none_or(|key| CONDITION_KEYS.contains(&key));
                if !keep {
                    unsupported.push(PolicyError {
                        field: format!("spec.rules[{i}].when[{k}].key"),
                        reason: format!(
                            "{:?} is not an L4 attribute (enforced: {})",
                            key.unwrap_or_default(),
                            CONDITION_KEYS.join(", ")
                        ),
                    });
                }
                k += 1;
                keep
            });
        }
    }
    unsupported
}

/// An authorization policy `spec` as the schema has it once the unsupported fields are out.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AuthorizationPolicySpec {
    selector: Option<SelectorFile>,
    action: Option<String>,
    rules: Option<Vec<RuleFile>>,
}

/// A peer authentication `spec` once `portLevelMtls` is out.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PeerAuthenticationSpec {
    selector: Option<SelectorFile>,
    mtls: Option<MtlsSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MtlsSpec {
    mode: Option<String>,
}

/// Parses `spec` into `T`, an error naming the field.
pub(super) fn parse_spec<T: serde::de::DeserializeOwned>(spec: &Value) -> Result<T, PolicyError> {
    let spec = if spec.is_null() {
        &Value::Object(Default::default())
    } else {
        spec
    };
    serde_path_to_error::deserialize(spec).map_err(|e| {
        let field = match e.path().to_string() {
            root if root == "." => "spec".to_string(),
            path => format!("spec.{path}"),
        };
        PolicyError {
            field,
            reason: e.inner().to_string(),
        }
    })
}

/// The policy of `spec` if it is valid (the shared validation of the mesh file's policies).
fn validated_authorization(
    name: &str,
    namespace: Option<String>,
    dry_run: bool,
    spec: &Value,
) -> Result<AuthorizationPolicy, PolicyError> {
    let parsed: AuthorizationPolicySpec = parse_spec(spec)?;
    let entry = AuthorizationPolicyFile {
        name: name.to_string(),
        namespace,
        selector: parsed.selector,
        target_ref: None,
        target_refs: None,
        action: parsed.action,
        dry_run,
        rules: parsed.rules.unwrap_or_default(),
    };
    validate_authorization_policy("spec", &entry)
}

/// The scope of a rejected resource: its selector if that is valid, else its whole namespace
/// (or the mesh, in the root namespace). Never narrower than what the resource names.
fn lenient_scope(spec: &Value, namespace: Option<String>) -> Scope {
    let selector = spec
        .get("selector")
        .and_then(|s| SelectorFile::deserialize(s).ok());
    let labels = workload_selector("spec", selector.as_ref()).ok().flatten();
    Scope::new(namespace, labels)
}

/// Converts one AuthorizationPolicy resource; `root_namespace`'s are mesh-wide.
pub fn authorization_policy(
    resource: &AuthorizationPolicyResource,
    root_namespace: &str,
) -> Converted<AuthorizationPolicy> {
    let meta = &resource.metadata;
    let name = meta.name.clone().unwrap_or_default();
    let namespace = model_namespace(meta, root_namespace);
    let dry_run = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(DRY_RUN_ANNOTATION))
        .is_some_and(|v| v == "true");
    let mut spec = resource.spec.clone();
    let unsupported = strip_unsupported_authorization(&mut spec);
    let invalid = match validated_authorization(&name, namespace.clone(), dry_run, &spec) {
        Ok(policy) if unsupported.is_empty() => {
            let acceptance = Acceptance {
                verdict: Verdict::Accepted,
                message: format!(
                    "{} policy with {} rule(s) {}",
                    policy.action,
                    policy.rules.len(),
                    if dry_run {
                        "evaluated in dry-run (logged, not enforced)"
                    } else {
                        "enforced"
                    }
                ),
            };
            return Converted { policy, acceptance };
        }
        Ok(_) => None,
        Err(e) => Some(e),
    };
    let acceptance = match invalid {
        Some(e) if unsupported.is_empty() => Acceptance::rejected(Verdict::Invalid, &[e]),
        _ => Acceptance::rejected(Verdict::UnsupportedField, &unsupported),
    };
    let is_deny = spec.get("action").and_then(Value::as_str) == Some("DENY");
    let policy = if is_deny {
        broadened_deny(&name, namespace, dry_run, spec)
    } else {
        // Anything but a DENY (ALLOW, or an action Ambit does not know) fails closed.
        AuthorizationPolicy {
            name,
            scope: lenient_scope(&spec, namespace),
            action: Action::Allow,
            dry_run,
            rules: Vec::new(),
        }
    };
    Converted { policy, acceptance }
}

/// A rejected DENY policy, enforced with each rejected part counted as matching: the parts the
/// validation refuses are taken out one by one (every removal widens what the policy matches)
/// until it validates. If that does not converge, it denies everything it selects.
fn broadened_deny(
    name: &str,
    namespace: Option<String>,
    dry_run: bool,
    mut spec: Value,
) -> AuthorizationPolicy {
    // Each step removes at least one field or list entry, so the number of steps is bounded
    // by the size of the spec; this bound only guards against a bug.
    for _ in 0..1024 {
        match validated_authorization(name, namespace.clone(), dry_run, &spec) {
            Ok(policy) => return policy,
            Err(e) => {
                if !broaden(&mut spec, &e.field) {
                    break;
                }
            }
        }
    }
    AuthorizationPolicy {
        name: name.to_string(),
        scope: lenient_scope(&spec, namespace),
        action: Action::Deny,
        dry_run,
        rules: vec![Rule::default()],
    }
}

/// One step of a path such as `spec.rules[0].from[1].source.ipBlocks[2]`.
#[derive(Debug, PartialEq, Eq)]
enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

fn segments(path: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = part.split_at(part.find('[').unwrap_or(part.len()));
        if !key.is_empty() {
            out.push(Segment::Key(key));
        }
        while let Some(inner) = rest.strip_prefix('[') {
            let Some((index, after)) = inner.split_once(']') else {
                break;
            };
            if let Ok(index) = index.parse() {
                out.push(Segment::Index(index));
            }
            rest = after;
        }
    }
    out
}

/// Widens a DENY `spec` so that the part at `field` (an error's path) no longer constrains
/// anything; `false` if the path is not one it knows how to widen.
fn broaden(spec: &mut Value, field: &str) -> bool {
    use Segment::{Index, Key};
    fn rule(spec: &mut Value, i: usize) -> Option<&mut Value> {
        spec.get_mut("rules")?.get_mut(i)
    }
    fn remove(parent: Option<&mut Value>, key: &str) -> bool {
        parent
            .and_then(Value::as_object_mut)
            .and_then(|o| o.remove(key))
            .is_some()
    }
    let path = segments(field);
    let Some((Key("spec"), path)) = path.split_first() else {
        return false;
    };
    match path {
        // An unusable selector: the policy's whole namespace.
        [Key("selector"), ..] => remove(Some(spec), "selector"),
        // A DENY without rules names nothing; deny everything rather than nothing.
        [Key("rules")] => match spec.as_object_mut() {
            Some(object) => {
                object.insert("rules".into(), serde_json::json!([{}]));
                true
            }
            None => false,
        },
        // A field of one source or operation: without it the entry matches more. An entry
        // left with no field (or broken as a whole) matches anything, and so does its list.
        [
            Key("rules"),
            Index(i),
            Key(list @ ("from" | "to")),
            rest @ ..,
        ] => {
            let inner = if *list == "from" {
                "source"
            } else {
                "operation"
            };
            let Some(rule) = rule(spec, *i) else {
                return false;
            };
            if let [Index(j), Key(k), Key(field), ..] = rest
                && *k == inner
            {
                let object = rule
                    .get_mut(*list)
                    .and_then(|l| l.get_mut(*j))
                    .and_then(|e| e.get_mut(inner));
                let emptied = object.as_ref().is_some_and(|o| {
                    o.as_object()
                        .is_some_and(|o| o.len() == 1 && o.contains_key(*field))
                });
                if !emptied && remove(object, field) {
                    return true;
                }
            }
            remove(Some(rule), list)
        }
        // A condition that cannot be evaluated counts as met.
        [Key("rules"), Index(i), Key("when"), Index(k), ..] => {
            match rule(spec, *i)
                .and_then(|r| r.get_mut("when"))
                .and_then(Value::as_array_mut)
            {
                Some(conditions) if *k < conditions.len() => {
                    conditions.remove(*k);
                    true
                }
                _ => false,
            }
        }
        // Anything else wrong with a rule: the rule matches everything.
        [Key("rules"), Index(i), ..] => match rule(spec, *i) {
            Some(rule) if *rule != serde_json::json!({}) => {
                *rule = serde_json::json!({});
                true
            }
            _ => false,
        },
        // A field the schema does not have: ignored, as the API server would have pruned it.
        [Key(field), ..] if !matches!(*field, "rules" | "action") => remove(Some(spec), field),
        _ => false,
    }
}

/// Converts one PeerAuthentication resource; `root_namespace`'s are mesh-wide.
pub fn peer_authentication(
    resource: &PeerAuthenticationResource,
    root_namespace: &str,
) -> Converted<PeerAuthentication> {
    let meta = &resource.metadata;
    let name = meta.name.clone().unwrap_or_default();
    let namespace = model_namespace(meta, root_namespace);
    let mut spec = resource.spec.clone();
    let mut unsupported = Vec::new();
    if let Some(object) = spec.as_object_mut() {
        if in_use(object.get("portLevelMtls")) {
            unsupported.push(PolicyError {
                field: "spec.portLevelMtls".into(),
                reason: "per-port modes are not supported".into(),
            });
        }
        object.remove("portLevelMtls");
    }
    let validated = parse_spec::<PeerAuthenticationSpec>(&spec).and_then(|parsed| {
        let selector = workload_selector("spec", parsed.selector.as_ref())?;
        let mode = peer_auth_mode(
            "spec.mtls.mode",
            parsed.mtls.and_then(|m| m.mode).as_deref(),
        )?;
        Ok((selector, mode))
    });
    let acceptance = match validated {
        Ok((selector, mode)) if unsupported.is_empty() => {
            let message = match mode {
                Some(mode) => format!("{mode} enforced"),
                None => "UNSET: inherits the mode of the next wider policy".to_string(),
            };
            return Converted {
                policy: PeerAuthentication {
                    name,
                    scope: Scope::new(namespace, selector),
                    mode,
                },
                acceptance: Acceptance {
                    verdict: Verdict::Accepted,
                    message,
                },
            };
        }
        Err(e) if unsupported.is_empty() => Acceptance::rejected(Verdict::Invalid, &[e]),
        _ => Acceptance::rejected(Verdict::UnsupportedField, &unsupported),
    };
    Converted {
        policy: PeerAuthentication {
            name,
            scope: lenient_scope(&spec, namespace),
            mode: Some(PeerAuthMode::Strict),
        },
        acceptance,
    }
}

/// The order Istio resolves conflicts in: oldest first, then by namespace and name.
pub(super) fn creation_order(meta: &ObjectMeta) -> (Option<&Time>, Option<&str>, Option<&str>) {
    (
        meta.creation_timestamp.as_ref(),
        meta.namespace.as_deref(),
        meta.name.as_deref(),
    )
}

/// Whether an authorization policy `spec` binds it to waypoints (`targetRef`/`targetRefs`):
/// then the waypoints enforce it, L7 fields included, and the node agents never see it
/// (Istio ambient's split).
pub fn targets_waypoint(spec: &Value) -> bool {
    TARGET_FIELDS.iter().any(|field| in_use(spec.get(*field)))
}

/// An authorization policy `spec` bound to waypoints, as the schema has it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WaypointAuthorizationSpec {
    selector: Option<SelectorFile>,
    target_ref: Option<TargetRefFile>,
    target_refs: Option<Vec<TargetRefFile>>,
    action: Option<String>,
    rules: Option<Vec<RuleFile>>,
}

/// Its targets as far as they can be read, for the fail-closed form of a rejected policy.
fn lenient_targets(spec: &Value, namespace: &str) -> Vec<TargetRef> {
    let refs: Vec<TargetRefFile> = match (spec.get("targetRef"), spec.get("targetRefs")) {
        (Some(one), _) if in_use(Some(one)) => {
            TargetRefFile::deserialize(one).ok().into_iter().collect()
        }
        (_, Some(Value::Array(list))) => list
            .iter()
            .filter_map(|r| TargetRefFile::deserialize(r).ok())
            .collect(),
        _ => Vec::new(),
    };
    refs.iter()
        .filter_map(|r| target_refs("spec", namespace, Some(r), None).ok()?.pop())
        .collect()
}

/// Validates an AuthorizationPolicy bound to waypoints: `spec` is its current spec, or its last
/// accepted one.
pub(super) fn waypoint_policy_of(
    resource: &AuthorizationPolicyResource,
    spec: &Value,
) -> Result<WaypointPolicy, PolicyError> {
    let meta = &resource.metadata;
    let dry_run = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(DRY_RUN_ANNOTATION))
        .is_some_and(|v| v == "true");
    let spec = parse_spec::<WaypointAuthorizationSpec>(spec)?;
    let entry = AuthorizationPolicyFile {
        name: meta.name.clone().unwrap_or_default(),
        namespace: Some(meta.namespace.clone().unwrap_or_default()),
        selector: spec.selector,
        target_ref: spec.target_ref,
        target_refs: spec.target_refs,
        action: spec.action,
        dry_run,
        rules: spec.rules.unwrap_or_default(),
    };
    waypoint_policy("spec", &entry)
}

/// Converts an AuthorizationPolicy bound to waypoints ([`targets_waypoint`]), validated as the
/// mesh file's are ([`waypoint_policy`]). Rejected, it fails closed at every target that can
/// be read: an ALLOW (or an unknown action) allows nothing there, a DENY denies everything
/// there. With no readable target it binds to every waypoint-bound service of its namespace
/// ([`TargetRef::Namespace`]), and the status says so; `super::policies::convert_policies`
/// puts its last accepted version in force instead when there is one.
pub fn waypoint_authorization_policy(
    resource: &AuthorizationPolicyResource,
) -> Converted<WaypointPolicy> {
    match waypoint_policy_of(resource, &resource.spec) {
        Ok(policy) => Converted {
            acceptance: Acceptance {
                verdict: Verdict::Accepted,
                message: format!(
                    "{} policy with {} rule(s) {} by the waypoints of {}",
                    policy.action,
                    policy.rules.len(),
                    if policy.dry_run {
                        "evaluated in dry-run (logged, not enforced)"
                    } else {
                        "enforced"
                    },
                    policy
                        .targets
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
            policy,
        },
        Err(e) => {
            let meta = &resource.metadata;
            let namespace = meta.namespace.clone().unwrap_or_default();
            let deny = resource.spec.get("action").and_then(Value::as_str) == Some("DENY");
            let mut acceptance = Acceptance::rejected(Verdict::Invalid, &[e]);
            let mut targets = lenient_targets(&resource.spec, &namespace);
            if targets.is_empty() {
                acceptance.message.push_str(&format!(
                    "; no target can be read: its last accepted version stays in force, or \
                     without one it {} every request to the waypoint-bound services of \
                     namespace {namespace}",
                    if deny { "denies" } else { "allows no" }
                ));
                targets = vec![TargetRef::Namespace {
                    namespace: namespace.clone(),
                }];
            }
            let policy = WaypointPolicy {
                name: meta.name.clone().unwrap_or_default(),
                targets,
                namespace,
                action: if deny { Action::Deny } else { Action::Allow },
                dry_run: meta
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(DRY_RUN_ANNOTATION))
                    .is_some_and(|v| v == "true"),
                // DENY with a rule that matches everything; ALLOW with none: nothing allowed.
                rules: if deny {
                    vec![L7Rule::default()]
                } else {
                    Vec::new()
                },
            };
            Converted { policy, acceptance }
        }
    }
}

/// A RequestAuthentication `spec`, as the schema has it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RequestAuthenticationSpec {
    selector: Option<SelectorFile>,
    target_ref: Option<TargetRefFile>,
    target_refs: Option<Vec<TargetRefFile>>,
    #[serde(default, deserialize_with = "null_as_default")]
    jwt_rules: Vec<JwtRuleFile>,
}

/// Validates a RequestAuthentication: `spec` is its current spec, or its last accepted one.
pub(super) fn request_authentication_of(
    resource: &RequestAuthenticationResource,
    spec: &Value,
) -> Result<RequestAuthentication, PolicyError> {
    let meta = &resource.metadata;
    let spec = parse_spec::<RequestAuthenticationSpec>(spec)?;
    let entry = RequestAuthenticationFile {
        name: meta.name.clone().unwrap_or_default(),
        namespace: meta.namespace.clone(),
        selector: spec.selector,
        target_ref: spec.target_ref,
        target_refs: spec.target_refs,
        jwt_rules: spec.jwt_rules,
    };
    validate_request_authentication("spec", &entry)
}

/// The `Accepted` message of a RequestAuthentication in force.
pub(super) fn describe_authentication(authentication: &RequestAuthentication) -> String {
    format!(
        "{} JWT rule(s) enforced by the waypoints of {}",
        authentication.jwt_rules.len(),
        authentication
            .targets
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Converts a RequestAuthentication (validated as the mesh file's are). A rejected one is
/// `None` here; `super::policies::convert_policies` keeps its last accepted version in force
/// (the status says it was rejected, and why), so that its targets keep their JWT validation
/// and claim-header stripping. Without one, nothing is enforced for it: tokens its rules would have checked give
/// no request principal, so a policy that requires one denies (fail closed).
pub fn request_authentication(
    resource: &RequestAuthenticationResource,
) -> Converted<Option<RequestAuthentication>> {
    match request_authentication_of(resource, &resource.spec) {
        Ok(authentication) => Converted {
            acceptance: Acceptance {
                verdict: Verdict::Accepted,
                message: describe_authentication(&authentication),
            },
            policy: Some(authentication),
        },
        Err(e) => Converted {
            policy: None,
            acceptance: Acceptance::rejected(Verdict::Invalid, &[e]),
        },
    }
}

/// The verdict on an AuthorizationPolicy, whoever enforces it (node agents or waypoints).
pub fn authorization_acceptance(
    resource: &AuthorizationPolicyResource,
    root_namespace: &str,
) -> Acceptance {
    if targets_waypoint(&resource.spec) {
        waypoint_authorization_policy(resource).acceptance
    } else {
        authorization_policy(resource, root_namespace).acceptance
    }
}

/// The metadata fields kept: managed fields, other annotations, labels and owners are skipped
/// while parsing (memory in proportion to the policies, not to what tools attach to them).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PolicyMeta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    generation: Option<i64>,
    creation_timestamp: Option<Time>,
    annotations: Option<BTreeMap<String, String>>,
}

pub(super) fn policy_meta<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<ObjectMeta, D::Error> {
    let Some(meta) = Option::<PolicyMeta>::deserialize(deserializer)? else {
        return Ok(ObjectMeta::default());
    };
    let annotations = meta.annotations.and_then(|mut annotations| {
        let dry_run = annotations.remove(DRY_RUN_ANNOTATION)?;
        Some(BTreeMap::from([(DRY_RUN_ANNOTATION.to_string(), dry_run)]))
    });
    Ok(ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        // The watcher resumes from the last object's version: it must be kept.
        resource_version: meta.resource_version,
        generation: meta.generation,
        creation_timestamp: meta.creation_timestamp,
        annotations,
        ..ObjectMeta::default()
    })
}
