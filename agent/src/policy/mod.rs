//! Peer authentication and L4 authorization: the validated policies of a mesh, and their
//! evaluation against one connection.
//!
//! The semantics are Istio's (`security.istio.io/v1` `PeerAuthentication` and
//! `AuthorizationPolicy`) as ztunnel enforces them at L4, so that a policy written for Istio
//! means the same thing here. Configuration sources (the mesh file today, Kubernetes CRDs later)
//! validate their input and build these types; evaluation itself never fails.
//!
//! The proxy asks two questions of the current [`PolicySet`], on every new inbound connection:
//! [`PolicySet::peer_auth_mode`] (may plaintext reach this workload at all?) and
//! [`PolicySet::authorize`] (may this source open this connection?); and it asks them again of
//! every open inbound connection whenever the mesh state changes, closing those now denied
//! (`crate::proxy::admission`).
use std::{collections::BTreeMap, collections::HashMap, fmt, net::IpAddr, sync::Arc};

use ipnet::IpNet;
use serde::{Serialize, Serializer};

use crate::identity::SpiffeId;

/// What a policy selects a workload by: its namespace and labels. The policy engine knows
/// nothing else of workloads, so it depends on no state model (the state holds policies, and
/// both proxies and every configuration source use the engine); `state::Workload` gives its
/// [`Target`].
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The workload's namespace.
    pub namespace: &'a str,
    /// Its labels.
    pub labels: &'a BTreeMap<String, String>,
}

pub mod l7;
mod revocable;
#[cfg(test)]
mod tests;

pub use self::revocable::{Admission, Refusal};

/// The trust domain of a mesh that does not name one (Istio's and Kubernetes' default).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Label key → value, as in a Kubernetes `matchLabels`.
pub type Labels = BTreeMap<String, String>;

/// The workloads a policy applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Scope {
    /// Every workload of the mesh: a policy without a namespace (what Istio expresses by putting
    /// the policy in its root namespace).
    Mesh,
    /// Every workload of one namespace.
    Namespace(String),
    /// The workloads carrying all of `labels`, in `namespace`, or in every namespace when it is
    /// `None` (Istio's root-namespace policy with a selector).
    Workloads {
        /// The namespace the selector is confined to; `None` for all namespaces.
        namespace: Option<String>,
        /// Labels a workload must all carry; never empty (sources reject an empty selector).
        labels: Labels,
    },
}

impl Scope {
    /// The scope of a policy in `namespace` (`None`: mesh-wide) with an optional label selector;
    /// an empty selector is no selector.
    pub fn new(namespace: Option<String>, selector: Option<Labels>) -> Self {
        match (namespace, selector.filter(|labels| !labels.is_empty())) {
            (namespace, Some(labels)) => Scope::Workloads { namespace, labels },
            (Some(namespace), None) => Scope::Namespace(namespace),
            (None, None) => Scope::Mesh,
        }
    }

    /// The namespace the policy belongs to; `None` for a mesh-wide one.
    pub fn namespace(&self) -> Option<&str> {
        match self {
            Scope::Mesh => None,
            Scope::Namespace(namespace) => Some(namespace),
            Scope::Workloads { namespace, .. } => namespace.as_deref(),
        }
    }

    /// Whether the scope covers `workload`.
    pub fn selects(&self, workload: Target<'_>) -> bool {
        let in_namespace = |ns: &str| ns == workload.namespace;
        match self {
            Scope::Mesh => true,
            Scope::Namespace(namespace) => in_namespace(namespace),
            Scope::Workloads { namespace, labels } => {
                namespace.as_deref().is_none_or(in_namespace)
                    && labels
                        .iter()
                        .all(|(key, value)| workload.labels.get(key) == Some(value))
            }
        }
    }
}

/// A string pattern of Istio's form: `*` alone (any non-empty value), `prefix*`, `*suffix`, or
/// an exact value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// `*`: any value at all (for an identity attribute: any authenticated source).
    Any,
    /// A value equal to this one.
    Exact(String),
    /// `abc*`: a value starting with this.
    Prefix(String),
    /// `*abc`: a value ending with this.
    Suffix(String),
}

impl Pattern {
    /// Parses an Istio pattern. A `*` anywhere but at one end is rejected rather than taken
    /// literally: no identity contains one, so such a pattern is always a mistake.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("must not be empty".into());
        }
        if text == "*" {
            return Ok(Pattern::Any);
        }
        let pattern = if let Some(rest) = text.strip_prefix('*') {
            Pattern::Suffix(rest.to_string())
        } else if let Some(rest) = text.strip_suffix('*') {
            Pattern::Prefix(rest.to_string())
        } else {
            Pattern::Exact(text.to_string())
        };
        match &pattern {
            Pattern::Exact(s) | Pattern::Prefix(s) | Pattern::Suffix(s) if s.contains('*') => Err(
                format!("{text:?}: `*` is only allowed alone, as a prefix or as a suffix"),
            ),
            _ => Ok(pattern),
        }
    }

    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Any => !value.is_empty(),
            Pattern::Exact(exact) => value == exact,
            Pattern::Prefix(prefix) => value.starts_with(prefix.as_str()),
            Pattern::Suffix(suffix) => value.ends_with(suffix.as_str()),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Any => f.write_str("*"),
            Pattern::Exact(s) => f.write_str(s),
            Pattern::Prefix(s) => write!(f, "{s}*"),
            Pattern::Suffix(s) => write!(f, "*{s}"),
        }
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A Kubernetes service account, written `<namespace>/<name>` (Istio's `serviceAccounts`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceAccountRef {
    /// The service account's namespace.
    pub namespace: String,
    /// The service account's name.
    pub name: String,
}

impl ServiceAccountRef {
    /// Parses `<namespace>/<name>`; wildcards are not allowed (as in Istio).
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.split_once('/') {
            Some((namespace, name))
                if !namespace.is_empty()
                    && !name.is_empty()
                    && !name.contains('/')
                    && !text.contains('*') =>
            {
                Ok(Self {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                })
            }
            _ => Err(format!(
                "{text:?} is not of the form <namespace>/<service account> (no wildcards)"
            )),
        }
    }

    fn matches(&self, id: &SpiffeId) -> bool {
        self.namespace == id.namespace && self.name == id.service_account
    }
}

impl fmt::Display for ServiceAccountRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Serialize for ServiceAccountRef {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// One attribute's positive and negative lists (`principals` / `notPrincipals`, `values` /
/// `notValues`...): the attribute matches when it is in `values` (or `values` is empty) and in
/// none of `not_values`.
///
/// An attribute the connection lacks (the identity of a plaintext source) is in no list: it
/// fails a non-empty `values` and passes any `not_values`, as in Istio.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Match<T> {
    /// Any of these must match (ignored when empty).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<T>,
    /// None of these may match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<T>,
}

impl<T> Default for Match<T> {
    fn default() -> Self {
        Self {
            values: Vec::new(),
            not_values: Vec::new(),
        }
    }
}

impl<T> Match<T> {
    /// A match from its two lists.
    pub fn new(values: Vec<T>, not_values: Vec<T>) -> Self {
        Self { values, not_values }
    }

    /// Whether neither list constrains anything.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty() && self.not_values.is_empty()
    }

    /// Evaluates the lists with `hit`, which says whether one entry matches the connection.
    pub fn matches(&self, hit: impl Fn(&T) -> bool) -> bool {
        (self.values.is_empty() || self.values.iter().any(&hit))
            && !self.not_values.iter().any(&hit)
    }
}

/// A rule's `from[].source`: every non-empty field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// Peer identities without `spiffe://`: `<trust domain>/ns/<namespace>/sa/<account>`.
    #[serde(skip_serializing_if = "Match::is_empty")]
    pub principals: Match<Pattern>,
    /// The peer identity's namespace.
    #[serde(skip_serializing_if = "Match::is_empty")]
    pub namespaces: Match<Pattern>,
    /// The peer identity's namespace and service account, any trust domain.
    #[serde(skip_serializing_if = "Match::is_empty")]
    pub service_accounts: Match<ServiceAccountRef>,
    /// The source address.
    #[serde(skip_serializing_if = "Match::is_empty")]
    pub ip_blocks: Match<IpNet>,
}

/// A rule's `to[].operation`: the destination port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// The destination port the client dialled at the workload.
    pub ports: Match<u16>,
}

/// A rule's `when[]` entry, by its `key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Condition {
    /// `source.ip`.
    SourceIp(Match<IpNet>),
    /// `source.principal`, in the form of [`Source::principals`].
    SourcePrincipal(Match<Pattern>),
    /// `source.namespace`.
    SourceNamespace(Match<Pattern>),
    /// `destination.ip`: the workload address the client dialled.
    DestinationIp(Match<IpNet>),
    /// `destination.port`.
    DestinationPort(Match<u16>),
}

/// One rule: it matches when `from`, `to` and `when` all do. An empty `from` or `to` list means
/// the rule does not constrain that part (sources reject an explicitly empty list, as Istio
/// does), so a rule with nothing in it matches every connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// Any one must match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Source>,
    /// Any one must match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Operation>,
    /// All must match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// What a matching authorization policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    /// Connections matching no ALLOW policy of a workload that has some are denied.
    Allow,
    /// Matching connections are denied, whatever the ALLOW policies say.
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
        })
    }
}

/// One L4 authorization policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    /// Name, unique within the namespace (or among mesh-wide policies).
    pub name: String,
    /// The destination workloads it applies to.
    pub scope: Scope,
    /// What a match does.
    pub action: Action,
    /// When set, the policy never affects a decision; its would-be effect is reported.
    pub dry_run: bool,
    /// Any one must match. An empty list matches nothing: an ALLOW policy without rules denies
    /// everything to the workloads it selects (Istio's "allow nothing").
    pub rules: Vec<Rule>,
}

impl AuthorizationPolicy {
    /// Whether any rule matches `conn` (scope aside).
    pub fn matches(&self, conn: &ConnectionInfo<'_>) -> bool {
        let view = ConnView::new(conn);
        self.matches_view(&view)
    }

    fn matches_view(&self, conn: &ConnView<'_>) -> bool {
        self.rules.iter().any(|rule| conn.matches_rule(rule))
    }
}

/// `namespace/name`, or just `name` for a mesh-wide policy (names never contain `/`).
impl fmt::Display for AuthorizationPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scope.namespace() {
            Some(namespace) => write!(f, "{namespace}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// Whether plaintext may reach a workload.
///
/// The default (no policy, or only `UNSET` ones) is PERMISSIVE, as Istio's: enrolling a
/// namespace must not break the clients it has outside the mesh (ingress controllers,
/// Prometheus scraping the applications). STRICT is one mesh-wide policy away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PeerAuthMode {
    /// Only mutually authenticated (HBONE) connections; inbound plaintext is refused.
    Strict,
    /// Plaintext is accepted too, and authorized as an unauthenticated source.
    #[default]
    Permissive,
}

impl fmt::Display for PeerAuthMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeerAuthMode::Strict => "STRICT",
            PeerAuthMode::Permissive => "PERMISSIVE",
        })
    }
}

/// One peer authentication policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthentication {
    /// Name, unique within the namespace (or among mesh-wide policies).
    pub name: String,
    /// The workloads it applies to.
    pub scope: Scope,
    /// The mode; `None` (Istio's `UNSET`) inherits from the next wider policy.
    pub mode: Option<PeerAuthMode>,
}

/// What authorization needs to know about one inbound connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionInfo<'a> {
    /// The client's address.
    pub src_ip: IpAddr,
    /// The client's authenticated identity; `None` for plaintext.
    pub src_identity: Option<&'a SpiffeId>,
    /// The workload receiving the connection (as in the current state: its labels decide which
    /// workload-scoped policies apply).
    pub dst_workload: Target<'a>,
    /// The workload address the client dialled.
    pub dst_ip: IpAddr,
    /// The port the client dialled.
    pub dst_port: u16,
}

/// Why a connection was allowed or denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// No DENY policy matched and no ALLOW policy selects the workload.
    NoAllowPolicy,
    /// This ALLOW policy matched (the first one that did).
    AllowedBy(Arc<AuthorizationPolicy>),
    /// This DENY policy matched (the first one that did).
    DeniedBy(Arc<AuthorizationPolicy>),
    /// ALLOW policies select the workload, which makes it default-deny, and none matched.
    NoAllowMatch {
        /// How many ALLOW policies select the workload.
        selecting: usize,
    },
}

impl Reason {
    /// A short fixed label for metrics (`denied connections by reason`) and log fields.
    pub fn label(&self) -> &'static str {
        match self {
            Reason::NoAllowPolicy => "no_allow_policy",
            Reason::AllowedBy(_) => "allow_policy",
            Reason::DeniedBy(_) => "deny_policy",
            Reason::NoAllowMatch { .. } => "no_allow_match",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NoAllowPolicy => f.write_str("allowed: no ALLOW policy selects this workload"),
            Reason::AllowedBy(policy) => write!(f, "allowed by ALLOW policy {policy}"),
            Reason::DeniedBy(policy) => write!(f, "denied by DENY policy {policy}"),
            Reason::NoAllowMatch { selecting: 1 } => f.write_str(
                "no ALLOW policy matched (default deny: 1 ALLOW policy selects this workload)",
            ),
            Reason::NoAllowMatch { selecting } => write!(
                f,
                "no ALLOW policy matched (default deny: {selecting} ALLOW policies select this workload)"
            ),
        }
    }
}

/// The outcome of [`PolicySet::authorize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the connection may proceed.
    pub allowed: bool,
    /// Why.
    pub reason: Reason,
    /// Set when dry-run policies select the workload: what they would have done. The caller logs
    /// it; it never changes `allowed`.
    pub dry_run: Option<DryRun>,
}

/// What the dry-run policies selecting a workload would have done to a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DryRun {
    /// The decision had the dry-run policies been enforced along with the others.
    pub allowed: bool,
    /// The reason of that decision.
    pub reason: Reason,
    /// The dry-run policies whose rules matched the connection.
    pub matched: Vec<Arc<AuthorizationPolicy>>,
}

/// The validated security policies of a mesh, indexed by namespace for the per-connection
/// lookups.
#[derive(Debug, Default)]
pub struct PolicySet {
    authorizations: Vec<Arc<AuthorizationPolicy>>,
    peer_authentications: Vec<PeerAuthentication>,
    /// Indexes into `authorizations` of the policies without a namespace.
    mesh_wide: Vec<usize>,
    /// Indexes into `authorizations` of each namespace's policies.
    by_namespace: HashMap<String, Vec<usize>>,
    /// The policies attached to waypoints (`targetRefs`): never the node agents'.
    waypoint: l7::WaypointPolicies,
}

impl PolicySet {
    /// Builds the set. Order matters only for reporting (the first matching policy is named)
    /// and for peer authentication, where the first policy at a level wins: a source with
    /// creation times (Kubernetes) lists the oldest first, as Istio resolves conflicts.
    pub fn new(
        authorizations: Vec<AuthorizationPolicy>,
        peer_authentications: Vec<PeerAuthentication>,
    ) -> Self {
        let authorizations: Vec<Arc<AuthorizationPolicy>> =
            authorizations.into_iter().map(Arc::new).collect();
        let mut mesh_wide = Vec::new();
        let mut by_namespace: HashMap<String, Vec<usize>> = HashMap::new();
        for (index, policy) in authorizations.iter().enumerate() {
            match policy.scope.namespace() {
                Some(namespace) => by_namespace
                    .entry(namespace.to_string())
                    .or_default()
                    .push(index),
                None => mesh_wide.push(index),
            }
        }
        Self {
            authorizations,
            peer_authentications,
            mesh_wide,
            by_namespace,
            waypoint: l7::WaypointPolicies::default(),
        }
    }

    /// Adds the policies attached to waypoints.
    pub fn with_waypoint_policies(mut self, waypoint: l7::WaypointPolicies) -> Self {
        self.waypoint = waypoint;
        self
    }

    /// The policies attached to waypoints (authorization with L7 fields, JWT).
    pub fn waypoint(&self) -> &l7::WaypointPolicies {
        &self.waypoint
    }

    /// All authorization policies, in source order.
    pub fn authorizations(&self) -> &[Arc<AuthorizationPolicy>] {
        &self.authorizations
    }

    /// All peer authentication policies, in source order.
    pub fn peer_authentications(&self) -> &[PeerAuthentication] {
        &self.peer_authentications
    }

    /// The authorization policies (enforced and dry-run) whose scope covers `workload`.
    pub fn selecting<'a>(
        &'a self,
        workload: Target<'a>,
    ) -> impl Iterator<Item = &'a Arc<AuthorizationPolicy>> + 'a {
        let local = self
            .by_namespace
            .get(workload.namespace)
            .map(Vec::as_slice)
            .unwrap_or_default();
        self.mesh_wide
            .iter()
            .chain(local)
            .map(|&index| &self.authorizations[index])
            .filter(move |policy| policy.scope.selects(workload))
    }

    /// Decides whether `conn` may reach its destination workload, as Istio does: a matching
    /// DENY policy denies; otherwise, when no ALLOW policy selects the workload the connection
    /// is allowed, and when some do, one of them must match. Dry-run policies take no part in
    /// the decision; their would-be effect is in [`Decision::dry_run`].
    pub fn authorize(&self, conn: &ConnectionInfo<'_>) -> Decision {
        let view = ConnView::new(conn);
        let (enforced, dry_run): (Vec<_>, Vec<_>) = self
            .selecting(conn.dst_workload)
            .partition(|policy| !policy.dry_run);
        let (allowed, reason) = decide(&enforced, &view);
        let dry_run = (!dry_run.is_empty()).then(|| {
            let matched = dry_run
                .iter()
                .filter(|policy| policy.matches_view(&view))
                .map(|policy| Arc::clone(policy))
                .collect();
            let all: Vec<_> = enforced.iter().chain(&dry_run).copied().collect();
            let (allowed, reason) = decide(&all, &view);
            DryRun {
                allowed,
                reason,
                matched,
            }
        });
        Decision {
            allowed,
            reason,
            dry_run,
        }
    }

    /// The peer authentication mode of `workload`: the first policy selecting it by labels, else
    /// its namespace's policy, else the mesh-wide one, else PERMISSIVE (Istio's default). A
    /// policy whose mode is unset defers to the next level.
    pub fn peer_auth_mode(&self, workload: Target<'_>) -> PeerAuthMode {
        let level = |wanted: fn(&Scope) -> bool| {
            self.peer_authentications
                .iter()
                .find(|policy| wanted(&policy.scope) && policy.scope.selects(workload))
                .and_then(|policy| policy.mode)
        };
        level(|scope| matches!(scope, Scope::Workloads { .. }))
            .or_else(|| level(|scope| matches!(scope, Scope::Namespace(_))))
            .or_else(|| level(|scope| matches!(scope, Scope::Mesh)))
            .unwrap_or_default()
    }
}

/// Istio's evaluation over the `policies` selecting the workload.
fn decide(policies: &[&Arc<AuthorizationPolicy>], conn: &ConnView<'_>) -> (bool, Reason) {
    let of = |action| policies.iter().filter(move |p| p.action == action);
    if let Some(deny) = of(Action::Deny).find(|p| p.matches_view(conn)) {
        return (false, Reason::DeniedBy(Arc::clone(deny)));
    }
    let mut selecting = 0;
    for allow in of(Action::Allow) {
        if allow.matches_view(conn) {
            return (true, Reason::AllowedBy(Arc::clone(allow)));
        }
        selecting += 1;
    }
    match selecting {
        0 => (true, Reason::NoAllowPolicy),
        selecting => (false, Reason::NoAllowMatch { selecting }),
    }
}

/// A connection prepared for matching: the principal string built once, addresses in their
/// canonical form (a dual-stack listener reports IPv4 clients as `::ffff:a.b.c.d`, which an IPv4
/// CIDR would not contain). The waypoint's L7 evaluation ([`l7`]) matches the L4 attributes of a
/// request's connection with it too, so that they mean the same thing in both places.
pub(crate) struct ConnView<'a> {
    src_identity: Option<&'a SpiffeId>,
    /// `<trust domain>/ns/<namespace>/sa/<account>`, Istio's principal form.
    principal: Option<String>,
    src_ip: IpAddr,
    dst_ip: IpAddr,
    dst_port: u16,
}

impl<'a> ConnView<'a> {
    fn new(conn: &'a ConnectionInfo<'a>) -> Self {
        Self::of(conn.src_ip, conn.src_identity, conn.dst_ip, conn.dst_port)
    }

    /// The view of a connection from `src_ip` (authenticated as `src_identity`, if at all) to
    /// `dst_ip:dst_port`.
    pub(crate) fn of(
        src_ip: IpAddr,
        src_identity: Option<&'a SpiffeId>,
        dst_ip: IpAddr,
        dst_port: u16,
    ) -> Self {
        Self {
            src_identity,
            principal: src_identity.map(|id| {
                format!(
                    "{}/ns/{}/sa/{}",
                    id.trust_domain, id.namespace, id.service_account
                )
            }),
            src_ip: src_ip.to_canonical(),
            dst_ip: dst_ip.to_canonical(),
            dst_port,
        }
    }

    fn matches_rule(&self, rule: &Rule) -> bool {
        (rule.from.is_empty() || rule.from.iter().any(|s| self.matches_source(s)))
            && (rule.to.is_empty() || rule.to.iter().any(|o| self.matches_operation(o)))
            && rule.when.iter().all(|c| self.matches_condition(c))
    }

    pub(crate) fn matches_source(&self, source: &Source) -> bool {
        self.principal_in(&source.principals)
            && self.namespace_in(&source.namespaces)
            && source
                .service_accounts
                .matches(|account| self.src_identity.is_some_and(|id| account.matches(id)))
            && source.ip_blocks.matches(|net| net.contains(&self.src_ip))
    }

    fn matches_operation(&self, operation: &Operation) -> bool {
        self.port_in(&operation.ports)
    }

    pub(crate) fn matches_condition(&self, condition: &Condition) -> bool {
        match condition {
            Condition::SourceIp(m) => m.matches(|net| net.contains(&self.src_ip)),
            Condition::SourcePrincipal(m) => self.principal_in(m),
            Condition::SourceNamespace(m) => self.namespace_in(m),
            Condition::DestinationIp(m) => m.matches(|net| net.contains(&self.dst_ip)),
            Condition::DestinationPort(m) => self.port_in(m),
        }
    }

    /// A plaintext source has no principal: it matches no pattern, not even `*`.
    pub(crate) fn principal_in(&self, m: &Match<Pattern>) -> bool {
        m.matches(|p| self.principal.as_deref().is_some_and(|id| p.matches(id)))
    }

    /// The namespace comes from the peer's identity, never from its address: a plaintext source
    /// has none.
    pub(crate) fn namespace_in(&self, m: &Match<Pattern>) -> bool {
        m.matches(|p| self.src_identity.is_some_and(|id| p.matches(&id.namespace)))
    }

    pub(crate) fn port_in(&self, m: &Match<u16>) -> bool {
        m.matches(|&port| port == self.dst_port)
    }
}
