//! `security.ambit.dev/v1`: Istio's `security.istio.io/v1` `AuthorizationPolicy`,
//! `PeerAuthentication` and `RequestAuthentication`, field for field, as typed Rust.
//!
//! These types are the source of the CRDs' schemas (`cargo xtask crds`; [`super`]). The node
//! agents do not parse policies with them: [`crate::discovery::kube::security`] keeps a resource's
//! `spec` as JSON, so that a field Ambit rejects is seen and reported, never dropped while
//! parsing.
//!
//! The schema is Istio's with Ambit's stricter API checks (patterns, lengths, non-empty
//! lists; docs/crds.md), and refuses what the API has always refused: `action` `AUDIT` and
//! `CUSTOM` (and so `provider`), and `mtls.mode: DISABLE`. Those are kept in the types, marked
//! `#[schemars(skip)]` or removed from the schema by `refuse_disable`, so admitting them
//! later is a one-line change. The L7 and waypoint fields are in the schema: a policy bound to
//! waypoints (`targetRefs`) is enforced there with them; the node agents reject a policy using
//! L7 fields without `targetRefs` with a status condition rather than the API server pruning
//! them. Fields no Ambit component supports (`fromCookies`, `timeout` of a JWT rule) are in the
//! schema for the same reason: the status names them.
//!
//! Doc comments on these types are the schema's descriptions (`kubectl explain`): they are
//! written for a cluster's users.
use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::{JsonSchema, Schema, json_schema};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::discovery::kube::security::PolicyStatus;

/// One `*` allowed: `*`, `prefix*`, `*suffix` or an exact value.
const STAR_PATTERN: &str = r"^(\*|\*[^*]+|[^*]+\*|[^*]+)$";
/// `<namespace>/<account>`.
const SERVICE_ACCOUNT_PATTERN: &str = r"^[^/]+/[^/]+$";
/// An IPv4 or IPv6 address, optionally with a prefix length (parsed by Ambit).
const IP_BLOCK_PATTERN: &str = r"^[0-9A-Fa-f:.]+(/[0-9]{1,3})?$";
/// A port 1-65535, in decimal without leading zeros.
const PORT_PATTERN: &str =
    r"^([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$";

/// The sentence every L7 field's description ends with.
macro_rules! l7 {
    () => {
        "L7 (HTTP/JWT) field, enforced by waypoints when the policy is bound to them with \
         targetRefs. The node agents do not parse HTTP: a policy with a selector (or neither) \
         using it is rejected (status condition Accepted=False, reason UnsupportedField), and a \
         rejected ALLOW policy fails closed."
    };
}

/// The description of `targetRef` and `targetRefs`.
macro_rules! waypoint_binding {
    () => {
        "Binds the policy to waypoints, as Istio ambient: a Service of the policy's namespace \
         (kind Service, group \"\"), whose waypoint enforces it for that service's traffic, or \
         a waypoint (kind Gateway, group gateway.networking.k8s.io) for all it serves. The node \
         agents then ignore the policy. Not with selector."
    };
}

/// Istio's security.istio.io/v1 AuthorizationPolicy spec, enforced at L4 by the node agents.
#[derive(
    CustomResource, Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema,
)]
#[allow(
    clippy::duplicated_attributes,
    reason = "each printcolumn(...) of #[kube] has its own type_ = \"string\""
)]
#[kube(
    group = "security.ambit.dev",
    version = "v1",
    kind = "AuthorizationPolicy",
    namespaced,
    status = "PolicyStatus",
    category = "ambit",
    label("app.kubernetes.io/part-of", "ambit"),
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
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
    doc = "L4 authorization for the workloads of a namespace (or, in the root namespace, of the mesh)."
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// The workloads the policy applies to: those carrying all these labels (in the policy's
    /// namespace; in the root namespace, in every namespace). Absent: every workload of the
    /// namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[doc = waypoint_binding!()]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    #[doc = waypoint_binding!()]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub target_refs: Option<Vec<PolicyTargetReference>>,
    /// Any one rule must match. ALLOW without rules allows nothing; DENY without rules is
    /// rejected (write `rules: [{}]` to deny everything).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<Rule>>,
    /// ALLOW (default) or DENY. Istio's AUDIT and CUSTOM are not supported and refused by the
    /// API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    /// Istio's extension provider of a CUSTOM policy. Not in the schema: CUSTOM is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub provider: Option<ExtensionProvider>,
}

/// What a policy does with the connections its rules match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
// The field's doc is the description: kube-derive hoists an `Option<enum>`'s schema over the
// field's, so a description here would replace it.
#[schemars(description = "")]
pub enum Action {
    /// Allow a connection only if a rule matches (the default).
    Allow,
    /// Deny a connection if any rule matches.
    Deny,
    /// Istio's audit action: not supported, refused by the API.
    #[schemars(skip)]
    Audit,
    /// Istio's external authorization: not supported, refused by the API.
    #[schemars(skip)]
    Custom,
}

/// Istio's `provider` of a CUSTOM policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionProvider {
    /// The extension provider's name (Istio's MeshConfig).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A workload selector: the workloads carrying all the labels.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Labels a workload must all carry. At least one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "match_labels")]
    pub match_labels: Option<BTreeMap<String, String>>,
}

/// `matchLabels`: 1 to 4096 labels (Istio's bound), values of at most 63 characters (a
/// Kubernetes label value).
fn match_labels(_: &mut schemars::SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "minProperties": 1,
        "maxProperties": 4096,
        "additionalProperties": {"type": "string", "maxLength": 63},
    })
}

/// A waypoint or gateway reference.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetReference {
    /// The API group of the target (`gateway.networking.k8s.io`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub group: Option<String>,
    /// The kind of the target (`Gateway`, `Service`, ...).
    #[schemars(length(min = 1, max = 63))]
    pub kind: String,
    /// The name of the target.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The namespace of the target (the policy's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub namespace: Option<String>,
}

/// Matches a connection when `from`, `to` and `when` all match. `{}` matches every connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// Any one source must match (absent: any peer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub from: Option<Vec<RuleFrom>>,
    /// Any one operation must match (absent: any destination port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub to: Option<Vec<RuleTo>>,
    /// Every condition must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub when: Option<Vec<Condition>>,
}

/// One entry of `from`: a source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuleFrom {
    /// The peer. Every field set must match; at least one must be set.
    pub source: Source,
}

/// One entry of `to`: an operation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuleTo {
    /// The destination. Every field set must match; at least one must be set.
    pub operation: Operation,
}

/// The peer of a connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// Peer identities, `<trust domain>/ns/<namespace>/sa/<account>` without `spiffe://`. One
    /// `*` allowed: `*`, `prefix*`, `*suffix`. Never matches a plaintext (unauthenticated)
    /// peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1), regex(pattern = STAR_PATTERN)))]
    pub principals: Option<Vec<String>>,
    /// Matches when the peer identity is none of these (always for a plaintext peer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1), regex(pattern = STAR_PATTERN)))]
    pub not_principals: Option<Vec<String>>,
    #[doc = concat!("JWT request principals. ", l7!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1)))]
    pub request_principals: Option<Vec<String>>,
    #[doc = concat!("Negated JWT request principals. ", l7!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1)))]
    pub not_request_principals: Option<Vec<String>>,
    /// Namespaces of the peer's authenticated identity. One `*` allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1), regex(pattern = STAR_PATTERN)))]
    pub namespaces: Option<Vec<String>>,
    /// Matches when the peer identity's namespace is none of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1), regex(pattern = STAR_PATTERN)))]
    pub not_namespaces: Option<Vec<String>>,
    /// `<namespace>/<account>` of the peer identity, any trust domain. Not with `principals`
    /// or `namespaces` in the same source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1), regex(pattern = SERVICE_ACCOUNT_PATTERN)))]
    pub service_accounts: Option<Vec<String>>,
    /// Matches when the peer is none of these `<namespace>/<account>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1), regex(pattern = SERVICE_ACCOUNT_PATTERN)))]
    pub not_service_accounts: Option<Vec<String>>,
    /// Source addresses or CIDRs (IPv4 or IPv6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1), regex(pattern = IP_BLOCK_PATTERN)))]
    pub ip_blocks: Option<Vec<String>>,
    /// Matches when the source address is in none of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1), regex(pattern = IP_BLOCK_PATTERN)))]
    pub not_ip_blocks: Option<Vec<String>>,
    #[doc = concat!("Original client addresses from X-Forwarded-For. ", l7!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1)))]
    pub remote_ip_blocks: Option<Vec<String>>,
    #[doc = concat!("Negated X-Forwarded-For client addresses. ", l7!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1)))]
    pub not_remote_ip_blocks: Option<Vec<String>>,
}

/// The destination of a connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    #[doc = concat!("HTTP Host / authority values. ", l7!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1)))]
    pub hosts: Option<Vec<String>>,
    #[doc = concat!("Negated HTTP hosts. ", l7!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1)))]
    pub not_hosts: Option<Vec<String>>,
    /// Destination ports, as strings ("8080"), 1-65535.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1), regex(pattern = PORT_PATTERN)))]
    pub ports: Option<Vec<String>>,
    /// Matches when the destination port is none of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1), regex(pattern = PORT_PATTERN)))]
    pub not_ports: Option<Vec<String>>,
    #[doc = concat!("HTTP methods. ", l7!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1)))]
    pub methods: Option<Vec<String>>,
    #[doc = concat!("Negated HTTP methods. ", l7!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1)))]
    pub not_methods: Option<Vec<String>>,
    #[doc = concat!("HTTP paths. ", l7!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1)))]
    pub paths: Option<Vec<String>>,
    #[doc = concat!("Negated HTTP paths. ", l7!())]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1)))]
    pub not_paths: Option<Vec<String>>,
}

/// An additional condition; every condition of a rule must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Enforced keys: `source.ip`, `destination.ip`, `destination.port`, `source.principal`,
    /// `source.namespace`. Any other key (`request.*`, `remote.ip`, `connection.sni`, ...) is
    /// accepted by the API but rejected by Ambit (Accepted=False, reason UnsupportedField).
    #[schemars(length(min = 1))]
    pub key: String,
    /// The attribute must match one of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1)))]
    pub values: Option<Vec<String>>,
    /// The attribute must match none of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1)))]
    pub not_values: Option<Vec<String>>,
}

/// Istio's security.istio.io/v1 PeerAuthentication spec: whether plaintext may reach a
/// workload.
#[derive(
    CustomResource, Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema,
)]
#[allow(
    clippy::duplicated_attributes,
    reason = "each printcolumn(...) of #[kube] has its own type_ = \"string\""
)]
#[kube(
    group = "security.ambit.dev",
    version = "v1",
    kind = "PeerAuthentication",
    namespaced,
    status = "PolicyStatus",
    category = "ambit",
    label("app.kubernetes.io/part-of", "ambit"),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mtls.mode"),
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
    doc = "Whether plaintext may reach the workloads of a namespace (or, in the root namespace, of the mesh)."
)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// The workloads the policy applies to: those carrying all these labels (in the policy's
    /// namespace; in the root namespace, in every namespace). Absent: every workload of the
    /// namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// The mutual TLS mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = refuse_disable)]
    pub mtls: Option<MutualTls>,
    /// Istio's per-port modes, by port number. Not supported: a policy using it is rejected
    /// (Accepted=False, reason UnsupportedField) and applies STRICT to the workloads it selects
    /// (fails closed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // JSON object keys are strings: a port-number key would make schemars write
    // `patternProperties`, which a structural schema may not have.
    #[schemars(with = "Option<BTreeMap<String, MutualTls>>")]
    pub port_level_mtls: Option<BTreeMap<u32, MutualTls>>,
}

/// Mutual TLS settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MutualTls {
    /// STRICT: only mutual TLS (HBONE). PERMISSIVE: plaintext too. UNSET (or absent): inherit
    /// from the namespace or mesh-wide policy; PERMISSIVE when none sets one. Istio's DISABLE
    /// is not supported (refused by the API in `mtls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MtlsMode>,
}

/// A mutual TLS mode. (The order is the schema's; Istio's is UNSET, DISABLE, PERMISSIVE,
/// STRICT.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
// The field's doc is the description (see `Action`).
#[schemars(description = "")]
pub enum MtlsMode {
    /// Inherit from the next wider policy; PERMISSIVE when none sets a mode.
    Unset,
    /// Only mutual TLS.
    Strict,
    /// Mutual TLS or plaintext.
    Permissive,
    /// Istio's plaintext-only mode: not supported.
    Disable,
}

/// `mtls.mode` as the API admits it: without Istio's `DISABLE`, which Ambit does not
/// support (docs/crds.md). `portLevelMtls` keeps it: that field is rejected as a whole.
///
/// The values are an `enum`, or (with doc comments on the variants, before kube-derive's
/// rewriting) a `oneOf` of one `const` each: `DISABLE` goes from either.
fn refuse_disable(schema: &mut Schema) {
    const DISABLE: &str = "DISABLE";
    fn walk(value: &mut Value) {
        match value {
            Value::Object(object) => {
                if let Some(Value::Array(values)) = object.get_mut("enum") {
                    values.retain(|v| v != DISABLE);
                }
                for key in ["oneOf", "anyOf"] {
                    if let Some(Value::Array(variants)) = object.get_mut(key) {
                        variants.retain(|v| v.get("const").is_none_or(|c| c != DISABLE));
                    }
                }
                object.values_mut().for_each(walk);
            }
            Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    if let Some(object) = schema.as_object_mut() {
        object.values_mut().for_each(walk);
    }
}

/// Istio's security.istio.io/v1 RequestAuthentication spec: JWT validation by waypoints.
#[derive(
    CustomResource, Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema,
)]
#[allow(
    clippy::duplicated_attributes,
    reason = "each printcolumn(...) of #[kube] has its own type_ = \"string\""
)]
#[kube(
    group = "security.ambit.dev",
    version = "v1",
    kind = "RequestAuthentication",
    namespaced,
    status = "PolicyStatus",
    category = "ambit",
    label("app.kubernetes.io/part-of", "ambit"),
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
    doc = "JWT validation at waypoints: a request carrying an invalid token is refused (401); a valid one gives the request its principal (iss/sub) and claims for AuthorizationPolicies."
)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    /// Istio's workload selector. Not supported: the node agents do not parse HTTP, so a
    /// RequestAuthentication must be bound to waypoints with targetRefs; one using selector is
    /// rejected (Accepted=False) and not enforced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[doc = waypoint_binding!()]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    #[doc = waypoint_binding!()]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub target_refs: Option<Vec<PolicyTargetReference>>,
    /// The issuers accepted, one rule each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub jwt_rules: Option<Vec<JwtRule>>,
}

/// How tokens of one issuer are found and checked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtRule {
    /// The `iss` of the tokens this rule checks.
    #[schemars(length(min = 1))]
    pub issuer: String,
    /// Accepted `aud` values (absent: any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audiences: Option<Vec<String>>,
    /// Where the waypoint fetches (and refreshes) the JWKS, http or https. Set this or jwks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// The JWKS itself, as a JSON string (at most 64 KiB). Set this or jwksUri.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// Headers holding the token (absent: `Authorization: Bearer <token>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_headers: Option<Vec<JwtHeader>>,
    /// Query parameters holding the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_params: Option<Vec<String>>,
    /// Istio's cookies holding the token. Not supported: a rule using it is rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_cookies: Option<Vec<String>>,
    /// A header that receives the base64url payload of a valid token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_payload_to_header: Option<String>,
    /// Headers that receive claims of a valid token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_claim_to_headers: Option<Vec<ClaimToHeader>>,
    /// Keep the token in the request sent upstream (default: removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_original_token: Option<bool>,
    /// Istio's JWKS fetch timeout. Not supported: a rule using it is rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// A header holding a token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtHeader {
    /// The header's name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// What precedes the token in the value (e.g. `Bearer `).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

/// A claim copied to a request header.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimToHeader {
    /// The header to set.
    #[schemars(length(min = 1))]
    pub header: String,
    /// The claim's name (a top-level claim).
    #[schemars(length(min = 1))]
    pub claim: String,
}
