//! The mesh file's security sections: `trustDomain`, `peerAuthentications` and
//! `authorizationPolicies`.
//!
//! An authorization policy entry is the `spec` of an Istio `security.istio.io/v1`
//! `AuthorizationPolicy` (L4 fields only) plus its `name` and `namespace`, so a policy ports
//! between the two by moving those two keys. The rules checked here are Istio's own validation
//! rules, so a policy accepted here is accepted by Istio too.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{ConfigError, Validator};
use crate::{
    policy::{
        Action, AuthorizationPolicy, Condition, DEFAULT_TRUST_DOMAIN, Labels, Match, Operation,
        Pattern, PeerAuthMode, PeerAuthentication, Rule, Scope, ServiceAccountRef, Source,
    },
    serdes::null_as_default,
};

/// A workload selector, as in Kubernetes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SelectorFile {
    /// Labels a workload must all carry (must not be empty).
    #[serde(default, deserialize_with = "null_as_default")]
    pub match_labels: BTreeMap<String, String>,
}

/// One entry of `peerAuthentications`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationFile {
    /// Name, unique within the namespace (or among mesh-wide policies).
    pub name: String,
    /// The namespace it applies to; absent: the whole mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Narrows it to some workloads of the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<SelectorFile>,
    /// `STRICT`, `PERMISSIVE` or `UNSET` (absent: `UNSET`, inherit), checked by validation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// One entry of `authorizationPolicies`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicyFile {
    /// Name, unique within the namespace (or among mesh-wide policies).
    pub name: String,
    /// The namespace it applies to; absent: the whole mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Narrows it to the workloads carrying these labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<SelectorFile>,
    /// Attaches it to a waypoint (Istio's `targetRef`): enforced there, with L7 fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<TargetRefFile>,
    /// Attaches it to waypoints (Istio's `targetRefs`): enforced there, with L7 fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_refs: Option<Vec<TargetRefFile>>,
    /// `ALLOW` (default) or `DENY`, checked by validation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Evaluate and report, never enforce.
    #[serde(default)]
    pub dry_run: bool,
    /// Any one must match; none at all matches nothing.
    #[serde(default, deserialize_with = "null_as_default")]
    pub rules: Vec<RuleFile>,
}

/// One entry of a policy's `rules`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFile {
    /// Sources, any one of which must match (absent: any source). `Option` to tell an absent
    /// list from an empty one, which Istio rejects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<FromFile>>,
    /// Operations, any one of which must match (absent: any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<ToFile>>,
    /// Conditions, all of which must match.
    #[serde(default, deserialize_with = "null_as_default")]
    pub when: Vec<ConditionFile>,
}

/// One entry of a rule's `from`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FromFile {
    /// The source to match.
    pub source: SourceFile,
}

/// A rule's `from[].source`. Strings are parsed by validation, which names the bad one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceFile {
    /// Peer identities, `<trust domain>/ns/<namespace>/sa/<account>`, with `*` wildcards.
    #[serde(default, deserialize_with = "null_as_default")]
    pub principals: Vec<String>,
    /// Negative form of `principals`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub not_principals: Vec<String>,
    /// Peer identity namespaces, with `*` wildcards.
    #[serde(default, deserialize_with = "null_as_default")]
    pub namespaces: Vec<String>,
    /// Negative form of `namespaces`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub not_namespaces: Vec<String>,
    /// Peer service accounts, `<namespace>/<name>`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub service_accounts: Vec<String>,
    /// Negative form of `serviceAccounts`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub not_service_accounts: Vec<String>,
    /// Source addresses or CIDRs.
    #[serde(default, deserialize_with = "null_as_default")]
    pub ip_blocks: Vec<String>,
    /// Negative form of `ipBlocks`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub not_ip_blocks: Vec<String>,
    /// L7 (waypoint policies only): the JWT's `<iss>/<sub>`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub request_principals: Vec<String>,
    /// Negative form of `requestPrincipals`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub not_request_principals: Vec<String>,
    /// L7 (waypoint policies only): the client address.
    #[serde(default, deserialize_with = "null_as_default")]
    pub remote_ip_blocks: Vec<String>,
    /// Negative form of `remoteIpBlocks`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub not_remote_ip_blocks: Vec<String>,
}

/// One entry of a rule's `to`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ToFile {
    /// The operation to match.
    pub operation: OperationFile,
}

/// A rule's `to[].operation`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OperationFile {
    /// Destination ports (strings in Istio; bare numbers are accepted too).
    #[serde(default, deserialize_with = "null_as_default")]
    pub ports: Vec<String>,
    /// Negative form of `ports`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub not_ports: Vec<String>,
    /// L7 (waypoint policies only): `:authority`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub hosts: Vec<String>,
    /// Negative form of `hosts`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub not_hosts: Vec<String>,
    /// L7 (waypoint policies only): HTTP methods.
    #[serde(default, deserialize_with = "null_as_default")]
    pub methods: Vec<String>,
    /// Negative form of `methods`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub not_methods: Vec<String>,
    /// L7 (waypoint policies only): paths.
    #[serde(default, deserialize_with = "null_as_default")]
    pub paths: Vec<String>,
    /// Negative form of `paths`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub not_paths: Vec<String>,
}

/// One entry of a rule's `when`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConditionFile {
    /// The attribute: `source.ip`, `source.principal`, `source.namespace`, `destination.ip` or
    /// `destination.port`.
    pub key: String,
    /// Any one must match.
    #[serde(default, deserialize_with = "null_as_default")]
    pub values: Vec<String>,
    /// None may match.
    #[serde(default, deserialize_with = "null_as_default")]
    pub not_values: Vec<String>,
}

/// The `when` keys Ambit evaluates: the L4 attributes ztunnel supports.
pub const CONDITION_KEYS: [&str; 5] = [
    "source.ip",
    "source.principal",
    "source.namespace",
    "destination.ip",
    "destination.port",
];

/// Istio's `targetRef`/`targetRefs` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRefFile {
    /// `""` (or absent) for a Service, `gateway.networking.k8s.io` for a Gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `Service` or `Gateway`.
    pub kind: String,
    /// The service's or the waypoint's name.
    pub name: String,
    /// Must be the policy's own namespace when set (as in Istio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// The first L7 field in use in a policy the node agents would enforce, as a field path; the
/// node agents refuse it (fail closed).
pub fn l7_field_in_use(at: &str, entry: &AuthorizationPolicyFile) -> Option<String> {
    for (i, rule) in entry.rules.iter().enumerate() {
        for (j, from) in rule.from.iter().flatten().enumerate() {
            let s = &from.source;
            for (field, list) in [
                ("requestPrincipals", &s.request_principals),
                ("notRequestPrincipals", &s.not_request_principals),
                ("remoteIpBlocks", &s.remote_ip_blocks),
                ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
            ] {
                if !list.is_empty() {
                    return Some(format!("{at}.rules[{i}].from[{j}].source.{field}"));
                }
            }
        }
        for (j, to) in rule.to.iter().flatten().enumerate() {
            let o = &to.operation;
            for (field, list) in [
                ("hosts", &o.hosts),
                ("notHosts", &o.not_hosts),
                ("methods", &o.methods),
                ("notMethods", &o.not_methods),
                ("paths", &o.paths),
                ("notPaths", &o.not_paths),
            ] {
                if !list.is_empty() {
                    return Some(format!("{at}.rules[{i}].to[{j}].operation.{field}"));
                }
            }
        }
    }
    None
}

/// Whether an entry is attached to a waypoint.
pub fn targets_waypoint(entry: &AuthorizationPolicyFile) -> bool {
    entry.target_ref.is_some() || entry.target_refs.is_some()
}

/// A policy that breaks one of the rules of `docs/configuration.md` (shared by every source:
/// the mesh file reports it as [`ConfigError::Invalid`], Kubernetes as the resource's status).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct PolicyError {
    /// The offending field, under the prefix the caller gave, e.g.
    /// `spec.rules[0].from[1].source.ipBlocks[2]`.
    pub field: String,
    /// The rule broken.
    pub reason: String,
}

pub(super) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> PolicyError {
    PolicyError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Validates one authorization policy and builds it: its `selector`, `action` and `rules`,
/// with field paths under `at` (`authorizationPolicies[3]`, `spec`). The policy's `name` and
/// `namespace` are taken as they are: their rules depend on the source.
pub fn authorization_policy(
    at: &str,
    entry: &AuthorizationPolicyFile,
) -> Result<AuthorizationPolicy, PolicyError> {
    if let Some(field) = l7_field_in_use(at, entry) {
        return Err(invalid(
            field,
            "L7 field, enforced only by a waypoint: attach the policy to one with targetRefs \
             (docs/l7-policy.md); the node agents enforce L4 attributes only",
        ));
    }
    let selector = workload_selector(at, entry.selector.as_ref())?;
    let action = match entry.action.as_deref() {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some(other @ ("AUDIT" | "CUSTOM")) => {
            return Err(invalid(
                format!("{at}.action"),
                format!("{other} is not supported: expected ALLOW or DENY"),
            ));
        }
        Some(other) => {
            return Err(invalid(
                format!("{at}.action"),
                format!("unknown action {other:?}: expected ALLOW or DENY"),
            ));
        }
    };
    if action == Action::Deny && entry.rules.is_empty() {
        return Err(invalid(
            format!("{at}.rules"),
            "a DENY policy without rules would never match; add an empty rule `{}` to deny \
             every connection",
        ));
    }
    let rules = entry
        .rules
        .iter()
        .enumerate()
        .map(|(j, rule)| self::rule(&format!("{at}.rules[{j}]"), rule))
        .collect::<Result<_, _>>()?;
    Ok(AuthorizationPolicy {
        name: entry.name.clone(),
        scope: Scope::new(entry.namespace.clone(), selector),
        action,
        dry_run: entry.dry_run,
        rules,
    })
}

/// A peer authentication `mode` (`field` names it in errors): `STRICT`, `PERMISSIVE`, or
/// `UNSET`/absent (`None`, inherit).
pub fn peer_auth_mode(
    field: &str,
    mode: Option<&str>,
) -> Result<Option<PeerAuthMode>, PolicyError> {
    match mode {
        None | Some("UNSET") => Ok(None),
        Some("STRICT") => Ok(Some(PeerAuthMode::Strict)),
        Some("PERMISSIVE") => Ok(Some(PeerAuthMode::Permissive)),
        Some("DISABLE") => Err(invalid(
            field,
            "DISABLE is not supported: use PERMISSIVE to accept plaintext",
        )),
        Some(other) => Err(invalid(
            field,
            format!("unknown mode {other:?}: expected STRICT, PERMISSIVE or UNSET"),
        )),
    }
}

/// A policy's `selector` (at `{at}.selector`): `None` when absent, else its non-empty labels.
pub fn workload_selector(
    at: &str,
    selector: Option<&SelectorFile>,
) -> Result<Option<Labels>, PolicyError> {
    let Some(selector) = selector else {
        return Ok(None);
    };
    let field = format!("{at}.selector.matchLabels");
    if selector.match_labels.is_empty() {
        // Istio reads an empty selector as "the whole namespace"; being explicit costs
        // nothing and rules out a half-written selector widening the policy.
        return Err(invalid(
            field,
            "must not be empty (omit selector to select every workload of the namespace)",
        ));
    }
    if selector.match_labels.keys().any(String::is_empty) {
        return Err(invalid(field, "label keys must not be empty"));
    }
    Ok(Some(selector.match_labels.clone()))
}

fn rule(at: &str, rule: &RuleFile) -> Result<Rule, PolicyError> {
    let from = match &rule.from {
        None => Vec::new(),
        Some(from) if from.is_empty() => {
            return Err(invalid(
                format!("{at}.from"),
                "must not be empty (omit it to match any source)",
            ));
        }
        Some(from) => from
            .iter()
            .enumerate()
            .map(|(k, f)| source(&format!("{at}.from[{k}].source"), &f.source))
            .collect::<Result<_, _>>()?,
    };
    let to = match &rule.to {
        None => Vec::new(),
        Some(to) if to.is_empty() => {
            return Err(invalid(
                format!("{at}.to"),
                "must not be empty (omit it to match any port)",
            ));
        }
        Some(to) => to
            .iter()
            .enumerate()
            .map(|(k, t)| operation(&format!("{at}.to[{k}].operation"), &t.operation))
            .collect::<Result<_, _>>()?,
    };
    let when = rule
        .when
        .iter()
        .enumerate()
        .map(|(k, c)| condition(&format!("{at}.when[{k}]"), c))
        .collect::<Result<_, _>>()?;
    Ok(Rule { from, to, when })
}

pub(super) fn source(at: &str, source: &SourceFile) -> Result<Source, PolicyError> {
    let identity = [
        &source.principals,
        &source.not_principals,
        &source.namespaces,
        &source.not_namespaces,
    ];
    let accounts = [&source.service_accounts, &source.not_service_accounts];
    let ips = [&source.ip_blocks, &source.not_ip_blocks];
    let set = |lists: &[&Vec<String>]| lists.iter().any(|l| !l.is_empty());
    if !set(&identity) && !set(&accounts) && !set(&ips) {
        return Err(invalid(at, "must set at least one field"));
    }
    if set(&identity) && set(&accounts) {
        return Err(invalid(
            at,
            "serviceAccounts and notServiceAccounts cannot be combined with principals or \
             namespaces",
        ));
    }
    Ok(Source {
        principals: matcher(
            at,
            ("principals", &source.principals),
            ("notPrincipals", &source.not_principals),
            principal,
        )?,
        namespaces: matcher(
            at,
            ("namespaces", &source.namespaces),
            ("notNamespaces", &source.not_namespaces),
            Pattern::parse,
        )?,
        service_accounts: matcher(
            at,
            ("serviceAccounts", &source.service_accounts),
            ("notServiceAccounts", &source.not_service_accounts),
            ServiceAccountRef::parse,
        )?,
        ip_blocks: matcher(
            at,
            ("ipBlocks", &source.ip_blocks),
            ("notIpBlocks", &source.not_ip_blocks),
            ip_block,
        )?,
    })
}

pub(super) fn operation(at: &str, operation: &OperationFile) -> Result<Operation, PolicyError> {
    if operation.ports.is_empty() && operation.not_ports.is_empty() {
        return Err(invalid(at, "must set ports or notPorts"));
    }
    Ok(Operation {
        ports: matcher(
            at,
            ("ports", &operation.ports),
            ("notPorts", &operation.not_ports),
            port,
        )?,
    })
}

pub(super) fn condition(at: &str, condition: &ConditionFile) -> Result<Condition, PolicyError> {
    if condition.values.is_empty() && condition.not_values.is_empty() {
        return Err(invalid(
            at,
            "at least one of values or notValues must be set",
        ));
    }
    let values: (&str, &[String]) = ("values", &condition.values);
    let not_values: (&str, &[String]) = ("notValues", &condition.not_values);
    Ok(match condition.key.as_str() {
        "source.ip" => Condition::SourceIp(matcher(at, values, not_values, ip_block)?),
        "source.principal" => {
            Condition::SourcePrincipal(matcher(at, values, not_values, principal)?)
        }
        "source.namespace" => {
            Condition::SourceNamespace(matcher(at, values, not_values, Pattern::parse)?)
        }
        "destination.ip" => Condition::DestinationIp(matcher(at, values, not_values, ip_block)?),
        "destination.port" => Condition::DestinationPort(matcher(at, values, not_values, port)?),
        other => {
            return Err(invalid(
                format!("{at}.key"),
                format!(
                    "unsupported key {other:?}: expected one of {} (the node agents enforce \
                     L4 attributes only; attach the policy to a waypoint with targetRefs for \
                     L7 keys)",
                    CONDITION_KEYS.join(", ")
                ),
            ));
        }
    })
}

/// Parses a positive and a negative list; errors name the entry, e.g. `...notPorts[1]`.
pub(super) fn matcher<T>(
    at: &str,
    (field, values): (&str, &[String]),
    (not_field, not_values): (&str, &[String]),
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Match<T>, PolicyError> {
    let list = |field: &str, texts: &[String]| {
        texts
            .iter()
            .enumerate()
            .map(|(i, text)| {
                parse(text).map_err(|reason| invalid(format!("{at}.{field}[{i}]"), reason))
            })
            .collect::<Result<Vec<T>, _>>()
    };
    Ok(Match::new(
        list(field, values)?,
        list(not_field, not_values)?,
    ))
}

impl Validator<'_> {
    /// `trustDomain`: a SPIFFE trust domain name.
    pub(super) fn trust_domain(&self, trust_domain: Option<&str>) -> Result<String, ConfigError> {
        let Some(td) = trust_domain else {
            return Ok(DEFAULT_TRUST_DOMAIN.to_string());
        };
        self.non_empty("trustDomain".into(), td)?;
        let allowed = |c: char| matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_');
        if !td.chars().all(allowed) {
            return Err(self.invalid(
                "trustDomain",
                format!(
                    "{td:?} may only contain lowercase letters, digits, '.', '-' and '_' \
                     (write it without spiffe://)"
                ),
            ));
        }
        Ok(td.to_string())
    }

    /// A shared rule's error, as the mesh file reports it.
    pub(super) fn policy_error(&self, e: PolicyError) -> ConfigError {
        self.invalid(e.field, e.reason)
    }

    /// `peerAuthentications`.
    pub(super) fn peer_authentications(
        &self,
        entries: &[PeerAuthenticationFile],
    ) -> Result<Vec<PeerAuthentication>, ConfigError> {
        let mut names = HashMap::new();
        // The entry holding each namespace-wide (`Some`) or mesh-wide (`None`) mode: two at the
        // same level would be resolved by file order alone, which is too easy to miss.
        let mut wide: HashMap<Option<&str>, (usize, String)> = HashMap::new();
        let mut policies = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            let at = format!("peerAuthentications[{i}]");
            let namespace = entry.namespace.as_deref();
            let uid = self.policy_name(&at, &entry.name, namespace, &mut names, i)?;
            let selector = workload_selector(&at, entry.selector.as_ref())
                .map_err(|e| self.policy_error(e))?;
            if selector.is_some() && namespace.is_none() {
                return Err(self.invalid(
                    format!("{at}.selector"),
                    "a policy with a selector needs a namespace (without one it applies to the \
                     whole mesh)",
                ));
            }
            let mode = peer_auth_mode(&format!("{at}.mode"), entry.mode.as_deref())
                .map_err(|e| self.policy_error(e))?;
            if selector.is_none() {
                if let Some((first, first_uid)) = wide.get(&namespace) {
                    let level = match namespace {
                        Some(ns) => format!("namespace {ns} already has a namespace-wide policy"),
                        None => "there is already a mesh-wide policy".to_string(),
                    };
                    return Err(self.invalid(
                        format!("{at} ({uid})"),
                        format!("{level}, peerAuthentications[{first}] ({first_uid})"),
                    ));
                }
                wide.insert(namespace, (i, uid));
            }
            policies.push(PeerAuthentication {
                name: entry.name.clone(),
                scope: Scope::new(entry.namespace.clone(), selector),
                mode,
            });
        }
        Ok(policies)
    }

    /// Checks a policy's `name` and `namespace` and that the pair is unique; returns the
    /// policy's display name.
    pub(super) fn policy_name<'f>(
        &self,
        at: &str,
        name: &'f str,
        namespace: Option<&'f str>,
        seen: &mut HashMap<(Option<&'f str>, &'f str), usize>,
        index: usize,
    ) -> Result<String, ConfigError> {
        self.non_empty(format!("{at}.name"), name)?;
        if namespace == Some("") {
            return Err(self.invalid(
                format!("{at}.namespace"),
                "must not be empty (omit it for a mesh-wide policy)",
            ));
        }
        let uid = match namespace {
            Some(ns) => format!("{ns}/{name}"),
            None => name.to_string(),
        };
        if let Some(first) = seen.insert((namespace, name), index) {
            let list = at.split('[').next().unwrap_or(at);
            return Err(self.invalid(
                format!("{at} ({uid})"),
                format!("{uid} is already {list}[{first}]"),
            ));
        }
        Ok(uid)
    }
}

/// A principal pattern; the `spiffe://` form is a common porting slip that would never match.
pub(super) fn principal(text: &str) -> Result<Pattern, String> {
    if text.starts_with("spiffe://") {
        return Err(format!(
            "{text:?}: write principals without spiffe://, as <trust domain>/ns/<namespace>/sa/<account>"
        ));
    }
    Pattern::parse(text)
}

/// An address (a one-address network) or a CIDR; host bits are cleared.
pub(super) fn ip_block(text: &str) -> Result<IpNet, String> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    text.parse::<IpNet>()
        .map(|net| net.trunc())
        .map_err(|_| format!("invalid IP address or CIDR {text:?}"))
}

pub(super) fn port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(format!("{text:?} is not a port in 1..=65535")),
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, path::Path};

    use super::super::parse_mesh;
    use crate::{
        identity::SpiffeId,
        policy::{ConnectionInfo, PeerAuthMode, Reason},
        state::MeshState,
    };

    const WORKLOADS: &str = r#"
workloads:
  - name: web-0
    namespace: shop
    serviceAccount: web
    node: node-a
    ips: ["10.10.0.2"]
    labels: {app: web}
    netns: {pid: 1}
  - name: db-0
    namespace: shop
    node: node-a
    ips: ["10.10.0.3"]
    labels: {app: db}
    netns: {pid: 2}
"#;

    fn parse(security: &str) -> Result<MeshState, String> {
        let yaml = format!("{WORKLOADS}{security}");
        parse_mesh(Path::new("/tmp/m.yaml"), yaml.as_bytes()).map_err(|e| e.to_string())
    }

    #[track_caller]
    fn assert_rejected(security: &str, expected: &str) {
        match parse(security) {
            Ok(_) => panic!("accepted:\n{security}"),
            Err(message) => assert_eq!(message, format!("mesh file /tmp/m.yaml: {expected}")),
        }
    }

    /// `authorizationPolicies:` holding one policy of namespace shop whose body is `body`
    /// (indented by four spaces).
    fn one_policy(body: &str) -> String {
        format!("authorizationPolicies:\n  - name: p\n    namespace: shop\n{body}")
    }

    /// One ALLOW policy with one rule whose `from[0].source` is `source`.
    fn source(source: &str) -> String {
        one_policy(&format!(
            "    rules:\n      - from:\n          - source: {source}\n"
        ))
    }

    /// Authorizes `src_ns/src_sa` (or plaintext) at 10.20.0.5 to `dst`.
    fn allowed(state: &MeshState, src: Option<(&str, &str)>, dst: &str) -> bool {
        let dst: SocketAddr = dst.parse().unwrap();
        let id = src.map(|(ns, sa)| SpiffeId::new(state.trust_domain(), ns, sa));
        let workload = state.workload_by_ip(dst.ip()).unwrap();
        let conn = ConnectionInfo {
            src_ip: "10.20.0.5".parse().unwrap(),
            src_identity: id.as_ref(),
            dst_workload: workload.policy_target(),
            dst_ip: dst.ip(),
            dst_port: dst.port(),
        };
        state.policies().authorize(&conn).allowed
    }

    #[test]
    fn defaults() {
        let state = parse("").unwrap();
        assert_eq!(state.trust_domain(), "cluster.local");
        assert!(state.policies().authorizations().is_empty());
        // No peer authentication: PERMISSIVE, as in Istio.
        for w in state.workloads() {
            assert_eq!(state.peer_auth_mode(w), PeerAuthMode::Permissive);
        }
        // STRICT is one mesh-wide policy away; an UNSET namespace policy inherits it.
        let strict = parse(
            "peerAuthentications:\n  - name: default\n    mode: STRICT\n  - name: shop\n    \
             namespace: shop\n    mode: UNSET\n",
        )
        .unwrap();
        for w in strict.workloads() {
            assert_eq!(strict.peer_auth_mode(w), PeerAuthMode::Strict);
        }
        let nulls = parse("peerAuthentications:\nauthorizationPolicies:\n").unwrap();
        assert!(nulls.policies().peer_authentications().is_empty());
    }

    #[test]
    fn security_sections() {
        let state = parse(
            r#"
trustDomain: example.org
peerAuthentications:
  - name: default
    mode: STRICT
  - name: shop
    namespace: shop
    mode: PERMISSIVE
  - name: db-strict
    namespace: shop
    selector: {matchLabels: {app: db}}
    mode: STRICT
  - name: inherit
    namespace: ops
authorizationPolicies:
  - name: web-from-frontend
    namespace: shop
    selector:
      matchLabels: {app: web}
    action: ALLOW
    rules:
      - from:
          - source:
              principals: ["example.org/ns/shop/sa/frontend"]
          - source:
              namespaces: ["ops-*"]
        to:
          - operation:
              ports: ["8080", 9090]
      - when:
          - key: source.ip
            values: ["10.20.0.0/16"]
            notValues: ["10.20.0.5"]
  - name: block-legacy
    namespace: shop
    action: DENY
    dryRun: true
    rules:
      - from:
          - source: {namespaces: [legacy]}
"#,
        )
        .unwrap();
        assert_eq!(state.trust_domain(), "example.org");
        let mode = |name: &str| {
            let w = state.workloads().iter().find(|w| w.name == name).unwrap();
            state.peer_auth_mode(w)
        };
        assert_eq!(mode("web-0"), PeerAuthMode::Permissive);
        assert_eq!(mode("db-0"), PeerAuthMode::Strict);

        let policies = state.policies().authorizations();
        assert_eq!(policies.len(), 2);
        assert!(policies[1].dry_run);
        assert!(allowed(
            &state,
            Some(("shop", "frontend")),
            "10.10.0.2:8080"
        ));
        assert!(allowed(
            &state,
            Some(("shop", "frontend")),
            "10.10.0.2:9090"
        ));
        assert!(!allowed(&state, Some(("shop", "frontend")), "10.10.0.2:22"));
        assert!(allowed(&state, Some(("ops-eu", "x")), "10.10.0.2:8080"));
        assert!(!allowed(&state, Some(("shop", "other")), "10.10.0.2:8080"));
        // The second rule: 10.20.0.5 is carved out of 10.20.0.0/16.
        assert!(!allowed(&state, None, "10.10.0.2:8080"));
        // db-0 is not selected by the ALLOW policy; the DENY one is dry-run.
        assert!(allowed(&state, Some(("legacy", "x")), "10.10.0.3:5432"));

        let json = serde_json::to_value(&state).unwrap();
        assert_eq!(json["trustDomain"], "example.org");
        assert_eq!(json["peerAuthentications"][1]["mode"], "PERMISSIVE");
        assert_eq!(json["authorizationPolicies"][1]["dryRun"], true);
    }

    #[test]
    fn example_file_policies() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/mesh.yaml");
        let state = crate::discovery::file::load_mesh_file(&path).unwrap();
        assert_eq!(state.trust_domain(), "cluster.local");
        let mode = |name: &str| {
            let w = state.workloads().iter().find(|w| w.name == name).unwrap();
            state.peer_auth_mode(w)
        };
        assert_eq!(mode("web-0"), PeerAuthMode::Permissive);
        assert_eq!(mode("client"), PeerAuthMode::Strict);
        assert!(allowed(&state, Some(("shop", "default")), "10.10.0.2:8080"));
        // Plaintext from outside 10.10.0.0/16 (the helper's source is 10.20.0.5).
        assert!(!allowed(&state, None, "10.10.0.2:8080"));
        assert!(!allowed(
            &state,
            Some(("shop", "default")),
            "10.10.0.2:9090"
        ));
        assert_eq!(state.policies().authorizations().len(), 2);
    }

    /// The `spec` of an Istio policy, pasted under a name and namespace, loads as is.
    #[test]
    fn istio_spec_ports_verbatim() {
        let state = parse(
            r#"
authorizationPolicies:
  - name: tcp-policy
    namespace: shop
    # --- from here on, the spec of Istio's own example ---
    selector:
      matchLabels:
        app: web
    action: ALLOW
    rules:
    - from:
      - source:
          principals: ["cluster.local/ns/default/sa/sleep"]
      - source:
          notNamespaces: ["foo"]
      to:
      - operation:
          ports: ["9000", "9001"]
      when:
      - key: destination.ip
        values: ["10.10.0.0/24"]
  - name: deny-plaintext
    namespace: shop
    action: DENY
    rules:
    - from:
      - source:
          notPrincipals: ["*"]
"#,
        )
        .unwrap();
        assert!(allowed(
            &state,
            Some(("default", "sleep")),
            "10.10.0.2:9000"
        ));
        assert!(allowed(&state, Some(("bar", "x")), "10.10.0.2:9001"));
        assert!(!allowed(&state, Some(("foo", "x")), "10.10.0.2:9001"));
        let decision_of_plaintext = {
            let w = state.workload_by_ip("10.10.0.3".parse().unwrap()).unwrap();
            state.policies().authorize(&ConnectionInfo {
                src_ip: "10.20.0.5".parse().unwrap(),
                src_identity: None,
                dst_workload: w.policy_target(),
                dst_ip: "10.10.0.3".parse().unwrap(),
                dst_port: 5432,
            })
        };
        assert!(!decision_of_plaintext.allowed);
        assert!(matches!(decision_of_plaintext.reason, Reason::DeniedBy(_)));
    }

    #[test]
    fn trust_domain_rules() {
        assert_rejected("trustDomain: \"\"", "trustDomain: must not be empty");
        assert_rejected(
            "trustDomain: spiffe://Cluster.Local",
            "trustDomain: \"spiffe://Cluster.Local\" may only contain lowercase letters, digits, \
             '.', '-' and '_' (write it without spiffe://)",
        );
    }

    #[test]
    fn peer_authentication_rules() {
        let peer = |body: &str| format!("peerAuthentications:\n  - {body}");
        assert_rejected(
            &peer("name: \"\"\n    mode: STRICT"),
            "peerAuthentications[0].name: must not be empty",
        );
        assert_rejected(
            &peer("name: a\n    namespace: \"\""),
            "peerAuthentications[0].namespace: must not be empty (omit it for a mesh-wide policy)",
        );
        assert_rejected(
            &peer("name: a\n    mode: strict"),
            "peerAuthentications[0].mode: unknown mode \"strict\": expected STRICT, PERMISSIVE or UNSET",
        );
        assert_rejected(
            &peer("name: a\n    mode: DISABLE"),
            "peerAuthentications[0].mode: DISABLE is not supported: use PERMISSIVE to accept plaintext",
        );
        assert_rejected(
            &peer("name: a\n    selector: {matchLabels: {app: web}}"),
            "peerAuthentications[0].selector: a policy with a selector needs a namespace (without \
             one it applies to the whole mesh)",
        );
        assert_rejected(
            &peer("name: a\n    namespace: shop\n    selector: {matchLabels: {}}"),
            "peerAuthentications[0].selector.matchLabels: must not be empty (omit selector to \
             select every workload of the namespace)",
        );
        assert_rejected(
            &peer("name: a\n    namespace: shop\n  - name: b\n    namespace: shop"),
            "peerAuthentications[1] (shop/b): namespace shop already has a namespace-wide policy, \
             peerAuthentications[0] (shop/a)",
        );
        assert_rejected(
            &peer("name: a\n  - name: b\n    mode: STRICT"),
            "peerAuthentications[1] (b): there is already a mesh-wide policy, \
             peerAuthentications[0] (a)",
        );
        assert_rejected(
            &peer(
                "name: a\n    namespace: shop\n    selector: {matchLabels: {app: web}}\n  \
                 - name: a\n    namespace: shop\n    selector: {matchLabels: {app: db}}",
            ),
            "peerAuthentications[1] (shop/a): shop/a is already peerAuthentications[0]",
        );
        // Istio's `mtls: {mode: ...}` is spelled `mode` here.
        let message = parse(&peer("name: a\n    mtls: {mode: STRICT}")).unwrap_err();
        assert!(
            message.starts_with(
                "mesh file /tmp/m.yaml: peerAuthentications[0].mtls: unknown field `mtls`"
            ),
            "{message}"
        );
    }

    #[test]
    fn authorization_policy_rules() {
        assert_rejected(
            "authorizationPolicies:\n  - name: \"\"",
            "authorizationPolicies[0].name: must not be empty",
        );
        assert_rejected(
            "authorizationPolicies:\n  - name: p\n  - name: p\n    namespace: shop\n  - name: p",
            "authorizationPolicies[2] (p): p is already authorizationPolicies[0]",
        );
        assert_rejected(
            &one_policy("    action: REJECT\n"),
            "authorizationPolicies[0].action: unknown action \"REJECT\": expected ALLOW or DENY",
        );
        assert_rejected(
            &one_policy("    action: AUDIT\n"),
            "authorizationPolicies[0].action: AUDIT is not supported: expected ALLOW or DENY",
        );
        assert_rejected(
            &one_policy("    action: DENY\n"),
            "authorizationPolicies[0].rules: a DENY policy without rules would never match; add \
             an empty rule `{}` to deny every connection",
        );
        assert_rejected(
            &one_policy("    selector: {matchLabels: {\"\": x}}\n"),
            "authorizationPolicies[0].selector.matchLabels: label keys must not be empty",
        );
        // An ALLOW policy without rules is Istio's "allow nothing"; DENY with `{}` denies all.
        parse(&one_policy("    action: ALLOW\n")).unwrap();
        parse(&one_policy("    action: DENY\n    rules: [{}]\n")).unwrap();
    }

    #[test]
    fn rule_and_source_rules() {
        let at = "authorizationPolicies[0].rules[0]";
        assert_rejected(
            &one_policy("    rules: [{from: []}]\n"),
            &format!("{at}.from: must not be empty (omit it to match any source)"),
        );
        assert_rejected(
            &one_policy("    rules: [{to: []}]\n"),
            &format!("{at}.to: must not be empty (omit it to match any port)"),
        );
        let src = format!("{at}.from[0].source");
        assert_rejected(
            &source("{}"),
            &format!("{src}: must set at least one field"),
        );
        assert_rejected(
            &source("{ipBlocks: [\"10.0.0.0/33\"]}"),
            &format!("{src}.ipBlocks[0]: invalid IP address or CIDR \"10.0.0.0/33\""),
        );
        assert_rejected(
            &source("{notIpBlocks: [\"10.0.0.0/8\", \"ten\"]}"),
            &format!("{src}.notIpBlocks[1]: invalid IP address or CIDR \"ten\""),
        );
        assert_rejected(
            &source("{principals: [\"cluster.local/*/sa/web\"]}"),
            &format!(
                "{src}.principals[0]: \"cluster.local/*/sa/web\": `*` is only allowed alone, as \
                 a prefix or as a suffix"
            ),
        );
        assert_rejected(
            &source("{notPrincipals: [\"spiffe://cluster.local/ns/a/sa/b\"]}"),
            &format!(
                "{src}.notPrincipals[0]: \"spiffe://cluster.local/ns/a/sa/b\": write principals \
                 without spiffe://, as <trust domain>/ns/<namespace>/sa/<account>"
            ),
        );
        assert_rejected(
            &source("{namespaces: [\"\"]}"),
            &format!("{src}.namespaces[0]: must not be empty"),
        );
        assert_rejected(
            &source("{serviceAccounts: [web]}"),
            &format!(
                "{src}.serviceAccounts[0]: \"web\" is not of the form <namespace>/<service \
                 account> (no wildcards)"
            ),
        );
        assert_rejected(
            &source("{serviceAccounts: [shop/web], namespaces: [shop]}"),
            &format!(
                "{src}: serviceAccounts and notServiceAccounts cannot be combined with \
                 principals or namespaces"
            ),
        );
        // Host bits are cleared; a bare address is a one-address block.
        let state = parse(&source("{ipBlocks: [\"10.20.0.7/16\", \"fd00::1\"]}")).unwrap();
        let json = serde_json::to_value(&*state.policies().authorizations()[0]).unwrap();
        assert_eq!(
            json["rules"][0]["from"][0]["ipBlocks"]["values"],
            serde_json::json!(["10.20.0.0/16", "fd00::1/128"])
        );
        // HTTP attributes are not L4: without targetRefs, rejected, never silently ignored.
        let message = parse(&one_policy(
            "    rules:\n      - to:\n          - operation: {methods: [GET]}\n",
        ))
        .unwrap_err();
        assert!(
            message.contains(
                "rules[0].to[0].operation.methods: L7 field, enforced only by a waypoint: \
                 attach the policy to one with targetRefs"
            ),
            "{message}"
        );
    }

    #[test]
    fn operation_and_condition_rules() {
        let at = "authorizationPolicies[0].rules[0]";
        let to = |op: &str| {
            one_policy(&format!(
                "    rules:\n      - to:\n          - operation: {op}\n"
            ))
        };
        assert_rejected(
            &to("{}"),
            &format!("{at}.to[0].operation: must set ports or notPorts"),
        );
        assert_rejected(
            &to("{ports: [\"http\"]}"),
            &format!("{at}.to[0].operation.ports[0]: \"http\" is not a port in 1..=65535"),
        );
        assert_rejected(
            &to("{notPorts: [80, 0]}"),
            &format!("{at}.to[0].operation.notPorts[1]: \"0\" is not a port in 1..=65535"),
        );
        assert_rejected(
            &to("{ports: [65536]}"),
            &format!("{at}.to[0].operation.ports[0]: \"65536\" is not a port in 1..=65535"),
        );
        let when = |c: &str| one_policy(&format!("    rules:\n      - when:\n          - {c}\n"));
        assert_rejected(
            &when("{key: \"request.headers[x]\", values: [a]}"),
            &format!(
                "{at}.when[0].key: unsupported key \"request.headers[x]\": expected one of \
                 source.ip, source.principal, source.namespace, destination.ip, \
                 destination.port (the node agents enforce L4 attributes only; attach the \
                 policy to a waypoint with targetRefs for L7 keys)"
            ),
        );
        assert_rejected(
            &when("{key: source.ip}"),
            &format!("{at}.when[0]: at least one of values or notValues must be set"),
        );
        assert_rejected(
            &when("{key: destination.ip, notValues: [\"10.0.0.0/8\", nope]}"),
            &format!("{at}.when[0].notValues[1]: invalid IP address or CIDR \"nope\""),
        );
        assert_rejected(
            &when("{key: destination.port, values: [\"80-90\"]}"),
            &format!("{at}.when[0].values[0]: \"80-90\" is not a port in 1..=65535"),
        );
        assert_rejected(
            &when("{key: source.principal, values: [\"a*b\"]}"),
            &format!(
                "{at}.when[0].values[0]: \"a*b\": `*` is only allowed alone, as a prefix or as a \
                 suffix"
            ),
        );
    }
}
