//! Authorization and request authentication at the waypoint: Istio's `AuthorizationPolicy`
//! with L7 fields and `RequestAuthentication` (JWT), for the policies that name a waypoint with
//! `targetRefs`.
//!
//! Istio ambient enforces an authorization policy in one place: a policy with a `selector` (or
//! none) at the destination's ztunnel, on connections, with L4 attributes only; a policy with
//! `targetRefs` at the waypoint, on requests, with L4 and L7 attributes. Ambit splits them the
//! same way: the node agents evaluate [`super::AuthorizationPolicy`] (and refuse L7 fields,
//! failing closed), the waypoint evaluates the [`WaypointPolicy`]s of this module. The L4
//! attributes of a request (peer principal, namespace, source address, destination port) are
//! matched by the node agents' own code (`ConnView`), so `principals` means the same thing in
//! both places; at the waypoint the peer is the client's identity (its node agent presents the
//! source pod's certificate), the destination the service VIP and port it dialled.
//!
//! The evaluation is Istio's: CUSTOM (not supported: rejected by the sources), then DENY (any
//! match denies), then ALLOW (when some ALLOW policy applies, one must match); no policy, or
//! only DENY policies that do not match, allows.
use std::{fmt, net::IpAddr, sync::Arc};

use http::HeaderMap;
use ipnet::IpNet;
use serde::Serialize;
use serde_json::Value;

use super::{Action, Condition, ConnView, Match, Pattern, Source};
use crate::identity::SpiffeId;

/// What a waypoint policy is attached to (Istio's `targetRefs`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum TargetRef {
    /// `kind: Service`: the requests to this service, at the waypoint it is bound to.
    Service {
        /// The service's namespace (the policy's: Istio allows no other).
        namespace: String,
        /// The service's name.
        name: String,
    },
    /// `kind: Gateway` (group `gateway.networking.k8s.io`): every request through this
    /// waypoint, named as services name it in their `waypoint` binding.
    Waypoint {
        /// The waypoint's namespace (the policy's).
        namespace: String,
        /// The waypoint's name.
        name: String,
    },
    /// Not one of Istio's: every service of this namespace bound to a waypoint. Only the
    /// fail-closed form of a rejected Kubernetes policy whose own targets cannot be read binds
    /// here (`discovery::kube::security`), so that it still applies somewhere.
    Namespace {
        /// The policy's namespace.
        namespace: String,
    },
}

impl TargetRef {
    fn matches(&self, at: &Attachment<'_>) -> bool {
        match self {
            TargetRef::Service { namespace, name } => {
                namespace == at.service.0 && name == at.service.1
            }
            TargetRef::Waypoint { namespace, name } => at
                .waypoint
                .is_some_and(|(ns, n)| namespace == ns && name == n),
            TargetRef::Namespace { namespace } => {
                namespace == at.service.0 && at.waypoint.is_some()
            }
        }
    }
}

impl fmt::Display for TargetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetRef::Service { namespace, name } => write!(f, "Service {namespace}/{name}"),
            TargetRef::Waypoint { namespace, name } => write!(f, "Gateway {namespace}/{name}"),
            TargetRef::Namespace { namespace } => {
                write!(f, "every waypoint-bound Service of namespace {namespace}")
            }
        }
    }
}

/// Where a request is: the service it was sent to and the waypoint that service is bound to.
/// A policy applies to the request when one of its targets names either.
#[derive(Debug, Clone, Copy)]
pub struct Attachment<'a> {
    /// The service dialled (`namespace`, `name`).
    pub service: (&'a str, &'a str),
    /// The waypoint it is bound to (`namespace`, `name` of the waypoint's service).
    pub waypoint: Option<(&'a str, &'a str)>,
}

/// A rule's `from[].source` at the waypoint: the L4 fields, plus the request's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct L7Source {
    /// `principals`, `namespaces`, `serviceAccounts`, `ipBlocks` (and their `not` forms),
    /// matched against the tunnel's peer as at the node agents.
    #[serde(flatten)]
    pub peer: Source,
    /// `requestPrincipals`: the JWT's `<iss>/<sub>`; a request without a valid JWT has none.
    #[serde(skip_serializing_if = "Match::is_empty")]
    pub request_principals: Match<Pattern>,
    /// `remoteIpBlocks`: the client address. There is no `X-Forwarded-For` trust at a
    /// waypoint, so this is the tunnel's source, as `ipBlocks`.
    #[serde(skip_serializing_if = "Match::is_empty")]
    pub remote_ip_blocks: Match<IpNet>,
}

/// A rule's `to[].operation` at the waypoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct L7Operation {
    /// `hosts`: the request's `:authority` (or `Host`), compared without case.
    #[serde(skip_serializing_if = "Match::is_empty")]
    pub hosts: Match<Pattern>,
    /// `methods`: case-sensitive (`GET`), in the same forms as `paths`.
    #[serde(skip_serializing_if = "Match::is_empty")]
    pub methods: Match<Pattern>,
    /// `paths`: the path without its query string, in Istio's exact, `prefix*`, `*suffix` or
    /// `*` forms.
    #[serde(skip_serializing_if = "Match::is_empty")]
    pub paths: Match<Pattern>,
    /// `ports`: the service port the client dialled.
    #[serde(skip_serializing_if = "Match::is_empty")]
    pub ports: Match<u16>,
}

/// A rule's `when[]` entry at the waypoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum L7Condition {
    /// An L4 key (`source.ip`, `source.principal`, `source.namespace`, `destination.ip`,
    /// `destination.port`), evaluated as at the node agents.
    Connection(Condition),
    /// `remote.ip`: the tunnel's source (as `source.ip`).
    RemoteIp(Match<IpNet>),
    /// `request.headers[<name>]`: the header's values joined with `,` (as Envoy); a request
    /// without the header matches no value.
    RequestHeader {
        /// The header name, lowercase.
        name: String,
        /// The patterns.
        values: Match<Pattern>,
    },
    /// `request.auth.principal`: `<iss>/<sub>` of the request's JWT.
    RequestPrincipal(Match<Pattern>),
    /// `request.auth.audiences`: any of the JWT's audiences.
    RequestAudiences(Match<Pattern>),
    /// `request.auth.presenter`: the JWT's `azp`.
    RequestPresenter(Match<Pattern>),
    /// `request.auth.claims[a][b]...`: the claim at that path, a string or a list of strings
    /// (any element); a missing claim or another type matches no value.
    Claim {
        /// The claim's path (`[groups]` is `["groups"]`).
        path: Vec<String>,
        /// The patterns.
        values: Match<Pattern>,
    },
}

/// One rule: `from`, `to` and `when` must all match (an absent list does not constrain).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct L7Rule {
    /// Any one must match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<L7Source>,
    /// Any one must match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<L7Operation>,
    /// All must match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<L7Condition>,
}

/// An authorization policy enforced by waypoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WaypointPolicy {
    /// Name, unique among the namespace's authorization policies.
    pub name: String,
    /// Its namespace (a waypoint policy always has one: its targets are in it).
    pub namespace: String,
    /// What it is attached to; never empty.
    pub targets: Vec<TargetRef>,
    /// ALLOW or DENY.
    pub action: Action,
    /// Evaluated and logged, never enforced.
    pub dry_run: bool,
    /// Any one must match; none: an ALLOW policy matches nothing (allow nothing).
    pub rules: Vec<L7Rule>,
}

impl WaypointPolicy {
    /// Whether the policy applies at `at`.
    pub fn applies(&self, at: &Attachment<'_>) -> bool {
        self.targets.iter().any(|t| t.matches(at))
    }

    fn matches(&self, request: &View<'_>) -> bool {
        let deny = self.action == Action::Deny;
        self.rules
            .iter()
            .any(|rule| request.matches_rule(rule, deny))
    }
}

/// `namespace/name`.
impl fmt::Display for WaypointPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What a validated JWT says about the request (Istio's `request.auth.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestAuth {
    /// `<iss>/<sub>`.
    pub principal: String,
    /// `aud` (a string or a list in the token).
    pub audiences: Vec<String>,
    /// `azp`.
    pub presenter: Option<String>,
    /// The whole payload.
    pub claims: Value,
}

impl RequestAuth {
    /// What a verified payload says.
    pub fn from_claims(claims: Value) -> Self {
        let text = |key: &str| claims.get(key).and_then(Value::as_str).map(str::to_string);
        let principal = format!(
            "{}/{}",
            text("iss").unwrap_or_default(),
            text("sub").unwrap_or_default()
        );
        let audiences = match claims.get("aud") {
            Some(Value::String(aud)) => vec![aud.clone()],
            Some(Value::Array(auds)) => auds
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        };
        Self {
            principal,
            audiences,
            presenter: text("azp"),
            claims,
        }
    }
}

/// What the waypoint knows of one request when it authorizes it.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    /// The tunnel's source address.
    pub src_ip: IpAddr,
    /// The tunnel's verified peer.
    pub src_identity: Option<&'a SpiffeId>,
    /// The address dialled (the service VIP).
    pub dst_ip: IpAddr,
    /// The port dialled (the service port).
    pub dst_port: u16,
    /// The method.
    pub method: &'a str,
    /// The path, without the query string.
    pub path: &'a str,
    /// `:authority`, or the `Host` header.
    pub host: &'a str,
    /// The request's headers.
    pub headers: &'a HeaderMap,
    /// The validated JWT, if the request carried one.
    pub auth: Option<&'a RequestAuth>,
}

/// Why a request was allowed or denied at the waypoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L7Reason {
    /// No DENY policy matched and no ALLOW policy applies.
    NoAllowPolicy,
    /// This ALLOW policy matched.
    AllowedBy(Arc<WaypointPolicy>),
    /// This DENY policy matched.
    DeniedBy(Arc<WaypointPolicy>),
    /// ALLOW policies apply and none matched.
    NoAllowMatch {
        /// How many ALLOW policies apply.
        applying: usize,
    },
}

impl L7Reason {
    /// Envoy's response code details for an RBAC decision
    /// (`rbac_access_denied_matched_policy[ns.name]`, `[none]` for a default deny), the access
    /// log's `reason`.
    pub fn details(&self) -> String {
        match self {
            L7Reason::NoAllowPolicy => "no_allow_policy".into(),
            L7Reason::AllowedBy(p) => format!("allowed_by_policy[{}.{}]", p.namespace, p.name),
            L7Reason::DeniedBy(p) => {
                format!(
                    "rbac_access_denied_matched_policy[{}.{}]",
                    p.namespace, p.name
                )
            }
            L7Reason::NoAllowMatch { .. } => "rbac_access_denied_matched_policy[none]".into(),
        }
    }
}

impl fmt::Display for L7Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            L7Reason::NoAllowPolicy => f.write_str("allowed: no ALLOW policy applies"),
            L7Reason::AllowedBy(p) => write!(f, "allowed by ALLOW policy {p}"),
            L7Reason::DeniedBy(p) => write!(f, "denied by DENY policy {p}"),
            L7Reason::NoAllowMatch { applying } => write!(
                f,
                "no ALLOW policy matched (default deny: {applying} ALLOW policies apply)"
            ),
        }
    }
}

/// The outcome of [`WaypointPolicies::authorize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L7Decision {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// Why.
    pub reason: L7Reason,
    /// When dry-run policies apply: the decision had they been enforced too (logged only).
    pub dry_run: Option<(bool, L7Reason)>,
}

/// One `jwtRules` entry of a RequestAuthentication.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JwtRule {
    /// `iss` a token must carry to be checked by this rule.
    pub issuer: String,
    /// When not empty, the token's `aud` must name one of these.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// Where the keys are.
    pub keys: JwksSource,
    /// Where the token is looked for, in order: these headers (name lowercase, value prefix)...
    pub from_headers: Vec<(String, String)>,
    /// ... then these query parameters.
    pub from_params: Vec<String>,
    /// Header to set to the base64url payload of a valid token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_payload_to_header: Option<String>,
    /// Headers to set to a claim's value (`header`, claim path).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub output_claim_to_headers: Vec<(String, String)>,
    /// Keep the token in the request sent upstream (default: removed).
    pub forward_original_token: bool,
}

/// Where a rule's keys come from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum JwksSource {
    /// `jwks`: inline.
    #[serde(serialize_with = "key_count")]
    Inline(Arc<jsonwebtoken::jwk::JwkSet>),
    /// `jwksUri`: fetched by the waypoint (http or https), refreshed, last good set kept.
    Uri(String),
}

fn key_count<S: serde::Serializer>(
    set: &Arc<jsonwebtoken::jwk::JwkSet>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&format_args!("{} key(s)", set.keys.len()))
}

/// Istio's `RequestAuthentication`, attached to waypoints.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthentication {
    /// Name, unique in the namespace.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// What it is attached to; never empty.
    pub targets: Vec<TargetRef>,
    /// The accepted issuers.
    pub jwt_rules: Vec<JwtRule>,
}

impl fmt::Display for RequestAuthentication {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The waypoints' policies of a mesh.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WaypointPolicies {
    authorizations: Vec<Arc<WaypointPolicy>>,
    authentications: Vec<Arc<RequestAuthentication>>,
}

impl WaypointPolicies {
    /// The set of these policies.
    pub fn new(
        authorizations: Vec<WaypointPolicy>,
        authentications: Vec<RequestAuthentication>,
    ) -> Self {
        Self {
            authorizations: authorizations.into_iter().map(Arc::new).collect(),
            authentications: authentications.into_iter().map(Arc::new).collect(),
        }
    }

    /// All authorization policies, in source order.
    pub fn authorizations(&self) -> &[Arc<WaypointPolicy>] {
        &self.authorizations
    }

    /// All request authentications, in source order.
    pub fn authentications(&self) -> &[Arc<RequestAuthentication>] {
        &self.authentications
    }

    /// The JWT rules that apply at `at`, in source order.
    pub fn jwt_rules<'s>(&'s self, at: &Attachment<'_>) -> Vec<&'s JwtRule> {
        self.authentications
            .iter()
            .filter(|ra| ra.targets.iter().any(|t| t.matches(at)))
            .flat_map(|ra| &ra.jwt_rules)
            .collect()
    }

    /// Decides whether `request` may pass at `at`, as Istio does: a matching DENY policy
    /// denies; otherwise, when no ALLOW policy applies the request is allowed, and when some
    /// do, one of them must match. Dry-run policies only report.
    pub fn authorize(&self, at: &Attachment<'_>, request: &RequestInfo<'_>) -> L7Decision {
        self.decide_at(at, &View::new(request, false))
    }

    /// Decides whether an opaque TCP connection (not HTTP: only its L4 side is known) may
    /// pass at `at`, with Istio's semantics for TCP traffic: an HTTP-only field keeps an ALLOW
    /// rule from matching and is ignored in a DENY rule.
    pub fn authorize_opaque(
        &self,
        at: &Attachment<'_>,
        src_ip: IpAddr,
        src_identity: &SpiffeId,
        dst: std::net::SocketAddr,
    ) -> L7Decision {
        let headers = HeaderMap::new();
        let connection = RequestInfo {
            src_ip,
            src_identity: Some(src_identity),
            dst_ip: dst.ip(),
            dst_port: dst.port(),
            method: "",
            path: "",
            host: "",
            headers: &headers,
            auth: None,
        };
        self.decide_at(at, &View::new(&connection, true))
    }

    fn decide_at(&self, at: &Attachment<'_>, view: &View<'_>) -> L7Decision {
        let (enforced, dry_run): (Vec<_>, Vec<_>) = self
            .authorizations
            .iter()
            .filter(|p| p.applies(at))
            .partition(|p| !p.dry_run);
        let (allowed, reason) = decide(&enforced, view);
        let dry_run = (!dry_run.is_empty()).then(|| {
            let all: Vec<_> = enforced.iter().chain(&dry_run).copied().collect();
            decide(&all, view)
        });
        L7Decision {
            allowed,
            reason,
            dry_run,
        }
    }
}

fn decide(policies: &[&Arc<WaypointPolicy>], request: &View<'_>) -> (bool, L7Reason) {
    let of = |action| policies.iter().filter(move |p| p.action == action);
    if let Some(deny) = of(Action::Deny).find(|p| p.matches(request)) {
        return (false, L7Reason::DeniedBy(Arc::clone(deny)));
    }
    let mut applying = 0;
    for allow in of(Action::Allow) {
        if allow.matches(request) {
            return (true, L7Reason::AllowedBy(Arc::clone(allow)));
        }
        applying += 1;
    }
    match applying {
        0 => (true, L7Reason::NoAllowPolicy),
        applying => (false, L7Reason::NoAllowMatch { applying }),
    }
}

/// A request prepared for matching.
struct View<'a> {
    conn: ConnView<'a>,
    request: &'a RequestInfo<'a>,
    host: String,
    /// Opaque TCP: the HTTP-only fields cannot be evaluated ([`View::http_only`]).
    opaque: bool,
}

impl<'a> View<'a> {
    fn new(request: &'a RequestInfo<'a>, opaque: bool) -> Self {
        Self {
            conn: ConnView::of(
                request.src_ip,
                request.src_identity,
                request.dst_ip,
                request.dst_port,
            ),
            request,
            host: request.host.to_ascii_lowercase(),
            opaque,
        }
    }

    /// Whether `rule` matches; `deny`: the rule is a DENY policy's.
    fn matches_rule(&self, rule: &L7Rule, deny: bool) -> bool {
        (rule.from.is_empty() || rule.from.iter().any(|s| self.matches_source(s, deny)))
            && (rule.to.is_empty() || rule.to.iter().any(|o| self.matches_operation(o, deny)))
            && rule.when.iter().all(|c| self.matches_condition(c, deny))
    }

    /// An HTTP-only constraint (`constrained`: the field is set), `holds` on a request. On
    /// opaque TCP it cannot be evaluated, so, as Istio does for TCP traffic, it does not hold
    /// in an ALLOW rule (the rule never matches) and is ignored in a DENY rule (the rule
    /// denies on its other fields): a client cannot dodge a DENY by not speaking HTTP.
    fn http_only(&self, constrained: bool, deny: bool, holds: impl FnOnce() -> bool) -> bool {
        match (constrained, self.opaque) {
            (false, _) => true,
            (true, true) => deny,
            (true, false) => holds(),
        }
    }

    fn matches_source(&self, source: &L7Source, deny: bool) -> bool {
        let principals = &source.request_principals;
        self.conn.matches_source(&source.peer)
            && self.http_only(!principals.is_empty(), deny, || {
                self.request_principal_in(principals)
            })
            && source
                .remote_ip_blocks
                .matches(|net| net.contains(&self.conn.src_ip))
    }

    fn matches_operation(&self, operation: &L7Operation, deny: bool) -> bool {
        let (hosts, methods, paths) = (&operation.hosts, &operation.methods, &operation.paths);
        self.http_only(!hosts.is_empty(), deny, || {
            hosts.matches(|p| p.matches(&self.host))
        }) && self.http_only(!methods.is_empty(), deny, || {
            methods.matches(|p| p.matches(self.request.method))
        }) && self.http_only(!paths.is_empty(), deny, || {
            paths.matches(|p| p.matches(self.request.path))
        }) && self.conn.port_in(&operation.ports)
    }

    fn matches_condition(&self, condition: &L7Condition, deny: bool) -> bool {
        match condition {
            L7Condition::Connection(c) => self.conn.matches_condition(c),
            L7Condition::RemoteIp(m) => m.matches(|net| net.contains(&self.conn.src_ip)),
            http => self.http_only(true, deny, || self.matches_request_condition(http)),
        }
    }

    /// A `request.*` condition (HTTP-only).
    fn matches_request_condition(&self, condition: &L7Condition) -> bool {
        let auth = self.request.auth;
        match condition {
            L7Condition::Connection(_) | L7Condition::RemoteIp(_) => false,
            L7Condition::RequestHeader { name, values } => {
                let joined = self
                    .request
                    .headers
                    .get_all(name.as_str())
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect::<Vec<_>>();
                let value = (!joined.is_empty()).then(|| joined.join(","));
                values.matches(|p| value.as_deref().is_some_and(|v| p.matches(v)))
            }
            L7Condition::RequestPrincipal(m) => self.request_principal_in(m),
            L7Condition::RequestAudiences(m) => {
                m.matches(|p| auth.is_some_and(|a| a.audiences.iter().any(|aud| p.matches(aud))))
            }
            L7Condition::RequestPresenter(m) => m.matches(|p| {
                auth.and_then(|a| a.presenter.as_deref())
                    .is_some_and(|azp| p.matches(azp))
            }),
            L7Condition::Claim { path, values } => {
                let claim = auth.and_then(|a| {
                    path.iter()
                        .try_fold(&a.claims, |value, key| value.get(key.as_str()))
                });
                values.matches(|p| match claim {
                    Some(Value::String(s)) => p.matches(s),
                    Some(Value::Array(items)) => {
                        items.iter().filter_map(Value::as_str).any(|s| p.matches(s))
                    }
                    _ => false,
                })
            }
        }
    }

    /// A request without a valid JWT has no request principal: it matches no pattern, not
    /// even `*` (which is how a policy requires a token).
    fn request_principal_in(&self, m: &Match<Pattern>) -> bool {
        m.matches(|p| self.request.auth.is_some_and(|a| p.matches(&a.principal)))
    }
}

#[cfg(test)]
mod tests;
