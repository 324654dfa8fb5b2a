//! The mesh file's waypoint policies: `authorizationPolicies` entries with `targetRefs` (L7
//! fields allowed) and `requestAuthentications` (JWT), validated with Istio's rules into
//! [`crate::policy::l7`].
//!
//! A policy without `targetRefs` is the node agents' and keeps refusing L7 fields
//! ([`super::security::l7_field_in_use`]); one with `targetRefs` is the waypoints' and never reaches the node
//! agents (Istio ambient's split: `selector` policies at ztunnel, `targetRefs` at the waypoint).
use std::{collections::HashMap, sync::Arc};

use http::{HeaderName, Uri};
use jsonwebtoken::{DecodingKey, jwk::JwkSet};
use serde::{Deserialize, Serialize};

use super::{
    ConfigError, Validator,
    security::{
        AuthorizationPolicyFile, ConditionFile, OperationFile, PolicyError, RuleFile, SelectorFile,
        SourceFile, TargetRefFile, authorization_policy, condition, invalid, ip_block, matcher,
        operation, source, targets_waypoint,
    },
};
use crate::{
    policy::{
        Action, AuthorizationPolicy, Match, Pattern,
        l7::{
            JwksSource, JwtRule, L7Condition, L7Operation, L7Rule, L7Source, RequestAuthentication,
            TargetRef, WaypointPolicy,
        },
    },
    serdes::null_as_default,
};

/// One entry of `requestAuthentications`: Istio's `RequestAuthentication` spec plus its
/// `name` and `namespace`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAuthenticationFile {
    /// Name, unique in the namespace.
    pub name: String,
    /// The namespace (required: its targets are in it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Rejected: the node agents do not parse HTTP; attach it to a waypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<SelectorFile>,
    /// The waypoint or service it is attached to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<TargetRefFile>,
    /// The waypoints or services it is attached to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_refs: Option<Vec<TargetRefFile>>,
    /// The issuers accepted.
    #[serde(default, deserialize_with = "null_as_default")]
    pub jwt_rules: Vec<JwtRuleFile>,
}

/// One `jwtRules` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRuleFile {
    /// The `iss` of the tokens this rule checks.
    #[serde(default)]
    pub issuer: String,
    /// Accepted `aud` values (empty: any).
    #[serde(default, deserialize_with = "null_as_default")]
    pub audiences: Vec<String>,
    /// Where to fetch the JWKS (http or https).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// The JWKS itself, as a JSON string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// Headers holding the token.
    #[serde(default, deserialize_with = "null_as_default")]
    pub from_headers: Vec<JwtHeaderFile>,
    /// Query parameters holding the token.
    #[serde(default, deserialize_with = "null_as_default")]
    pub from_params: Vec<String>,
    /// Header to receive the base64url payload of a valid token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_payload_to_header: Option<String>,
    /// Headers to receive claims of a valid token.
    #[serde(default, deserialize_with = "null_as_default")]
    pub output_claim_to_headers: Vec<ClaimToHeaderFile>,
    /// Keep the token in the request sent upstream.
    #[serde(default)]
    pub forward_original_token: bool,
}

/// A `fromHeaders` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtHeaderFile {
    /// The header's name.
    pub name: String,
    /// What precedes the token in its value (`Bearer `).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

/// An `outputClaimToHeaders` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimToHeaderFile {
    /// The header to set.
    pub header: String,
    /// The claim (a top-level claim name).
    pub claim: String,
}

/// `targetRef` / `targetRefs` (at `{at}`), in `namespace`.
pub fn target_refs(
    at: &str,
    namespace: &str,
    single: Option<&TargetRefFile>,
    list: Option<&Vec<TargetRefFile>>,
) -> Result<Vec<TargetRef>, PolicyError> {
    let refs: Vec<(String, &TargetRefFile)> = match (single, list) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                format!("{at}.targetRef"),
                "set targetRef or targetRefs, not both",
            ));
        }
        (Some(one), None) => vec![(format!("{at}.targetRef"), one)],
        (None, Some(list)) if list.is_empty() => {
            return Err(invalid(format!("{at}.targetRefs"), "must not be empty"));
        }
        (None, Some(list)) => list
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("{at}.targetRefs[{i}]"), r))
            .collect(),
        (None, None) => return Ok(Vec::new()),
    };
    refs.into_iter()
        .map(|(at, r)| {
            if r.name.is_empty() {
                return Err(invalid(format!("{at}.name"), "must not be empty"));
            }
            if let Some(ns) = &r.namespace
                && ns != namespace
            {
                return Err(invalid(
                    format!("{at}.namespace"),
                    format!(
                        "{ns:?}: a policy can only target resources of its own namespace \
                         ({namespace})"
                    ),
                ));
            }
            let (namespace, name) = (namespace.to_string(), r.name.clone());
            match (r.group.as_deref().unwrap_or(""), r.kind.as_str()) {
                ("", "Service") => Ok(TargetRef::Service { namespace, name }),
                ("gateway.networking.k8s.io", "Gateway") => {
                    Ok(TargetRef::Waypoint { namespace, name })
                }
                (group, kind) => Err(invalid(
                    at,
                    format!(
                        "unsupported target {group:?}/{kind:?}: expected kind Service (group \
                         \"\") or kind Gateway (group gateway.networking.k8s.io, a waypoint)"
                    ),
                )),
            }
        })
        .collect()
}

/// Validates an authorization policy attached to waypoints (`targetRefs` set) and builds it.
pub fn waypoint_policy(
    at: &str,
    entry: &AuthorizationPolicyFile,
) -> Result<WaypointPolicy, PolicyError> {
    let Some(namespace) = entry.namespace.clone() else {
        return Err(invalid(
            format!("{at}.namespace"),
            "a policy with targetRefs needs a namespace (its targets are in it)",
        ));
    };
    if entry.selector.is_some() {
        return Err(invalid(
            format!("{at}.selector"),
            "set selector (node agents) or targetRefs (waypoints), not both",
        ));
    }
    let targets = target_refs(
        at,
        &namespace,
        entry.target_ref.as_ref(),
        entry.target_refs.as_ref(),
    )?;
    let action = match entry.action.as_deref() {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some("AUDIT") => {
            return Err(invalid(
                format!("{at}.action"),
                "AUDIT is not supported: it only marks requests for an audit provider, and \
                 Ambit has none (use dryRun to log what a policy would do)",
            ));
        }
        Some("CUSTOM") => {
            return Err(invalid(
                format!("{at}.action"),
                "CUSTOM (external authorization) is not supported: expected ALLOW or DENY",
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
             every request",
        ));
    }
    let rules = entry
        .rules
        .iter()
        .enumerate()
        .map(|(j, r)| rule(&format!("{at}.rules[{j}]"), r))
        .collect::<Result<_, _>>()?;
    Ok(WaypointPolicy {
        name: entry.name.clone(),
        namespace,
        targets,
        action,
        dry_run: entry.dry_run,
        rules,
    })
}

fn rule(at: &str, rule: &RuleFile) -> Result<L7Rule, PolicyError> {
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
            .map(|(k, f)| l7_source(&format!("{at}.from[{k}].source"), &f.source))
            .collect::<Result<_, _>>()?,
    };
    let to = match &rule.to {
        None => Vec::new(),
        Some(to) if to.is_empty() => {
            return Err(invalid(
                format!("{at}.to"),
                "must not be empty (omit it to match any operation)",
            ));
        }
        Some(to) => to
            .iter()
            .enumerate()
            .map(|(k, t)| l7_operation(&format!("{at}.to[{k}].operation"), &t.operation))
            .collect::<Result<_, _>>()?,
    };
    let when = rule
        .when
        .iter()
        .enumerate()
        .map(|(k, c)| l7_condition(&format!("{at}.when[{k}]"), c))
        .collect::<Result<_, _>>()?;
    Ok(L7Rule { from, to, when })
}

fn l7_source(at: &str, s: &SourceFile) -> Result<L7Source, PolicyError> {
    let l4 = [
        &s.principals,
        &s.not_principals,
        &s.namespaces,
        &s.not_namespaces,
        &s.service_accounts,
        &s.not_service_accounts,
        &s.ip_blocks,
        &s.not_ip_blocks,
    ]
    .iter()
    .any(|l| !l.is_empty());
    let l7 = [
        &s.request_principals,
        &s.not_request_principals,
        &s.remote_ip_blocks,
        &s.not_remote_ip_blocks,
    ]
    .iter()
    .any(|l| !l.is_empty());
    if !l4 && !l7 {
        return Err(invalid(at, "must set at least one field"));
    }
    Ok(L7Source {
        peer: if l4 {
            source(at, s)?
        } else {
            Default::default()
        },
        request_principals: matcher(
            at,
            ("requestPrincipals", &s.request_principals),
            ("notRequestPrincipals", &s.not_request_principals),
            Pattern::parse,
        )?,
        remote_ip_blocks: matcher(
            at,
            ("remoteIpBlocks", &s.remote_ip_blocks),
            ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
            ip_block,
        )?,
    })
}

fn l7_operation(at: &str, o: &OperationFile) -> Result<L7Operation, PolicyError> {
    let l7 = [
        &o.hosts,
        &o.not_hosts,
        &o.methods,
        &o.not_methods,
        &o.paths,
        &o.not_paths,
    ]
    .iter()
    .any(|l| !l.is_empty());
    let ports = !o.ports.is_empty() || !o.not_ports.is_empty();
    if !l7 && !ports {
        return Err(invalid(at, "must set at least one field"));
    }
    let host = |text: &str| Pattern::parse(&text.to_ascii_lowercase());
    let path = |text: &str| {
        if text.contains('{') {
            return Err(format!(
                "{text:?}: path templates ({{*}}, {{**}}) are not supported; use the exact, \
                 prefix (/x/*), suffix (*.txt) or * forms"
            ));
        }
        if !(text.starts_with('/') || text.starts_with('*')) {
            return Err(format!("{text:?}: a path starts with / (or is a * form)"));
        }
        Pattern::parse(text)
    };
    Ok(L7Operation {
        hosts: matcher(at, ("hosts", &o.hosts), ("notHosts", &o.not_hosts), host)?,
        methods: matcher(
            at,
            ("methods", &o.methods),
            ("notMethods", &o.not_methods),
            Pattern::parse,
        )?,
        paths: matcher(at, ("paths", &o.paths), ("notPaths", &o.not_paths), path)?,
        ports: if ports {
            operation(at, o)?.ports
        } else {
            Match::default()
        },
    })
}

/// The `when` keys a waypoint evaluates, besides the L4 ones.
pub const L7_CONDITION_KEYS: [&str; 6] = [
    "remote.ip",
    "request.headers[<name>]",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "request.auth.claims[<claim>]...",
];

fn l7_condition(at: &str, c: &ConditionFile) -> Result<L7Condition, PolicyError> {
    if super::security::CONDITION_KEYS.contains(&c.key.as_str()) {
        return condition(at, c).map(L7Condition::Connection);
    }
    if c.values.is_empty() && c.not_values.is_empty() {
        return Err(invalid(
            at,
            "at least one of values or notValues must be set",
        ));
    }
    let values: (&str, &[String]) = ("values", &c.values);
    let not_values: (&str, &[String]) = ("notValues", &c.not_values);
    let patterns = || matcher(at, values, not_values, Pattern::parse);
    let key = c.key.as_str();
    let bad_key = |why: String| invalid(format!("{at}.key"), why);
    Ok(match key {
        "remote.ip" => L7Condition::RemoteIp(matcher(at, values, not_values, ip_block)?),
        "request.auth.principal" => L7Condition::RequestPrincipal(patterns()?),
        "request.auth.audiences" => L7Condition::RequestAudiences(patterns()?),
        "request.auth.presenter" => L7Condition::RequestPresenter(patterns()?),
        _ if key.starts_with("request.headers[") => {
            let path = brackets(&key["request.headers".len()..])
                .filter(|p| p.len() == 1)
                .ok_or_else(|| bad_key(format!("{key:?}: expected request.headers[<name>]")))?;
            let name = HeaderName::from_bytes(path[0].as_bytes())
                .map_err(|_| bad_key(format!("{:?} is not a header name", path[0])))?;
            L7Condition::RequestHeader {
                name: name.as_str().to_string(),
                values: patterns()?,
            }
        }
        _ if key.starts_with("request.auth.claims[") => {
            let path = brackets(&key["request.auth.claims".len()..]).ok_or_else(|| {
                bad_key(format!(
                    "{key:?}: expected request.auth.claims[<claim>] or \
                     request.auth.claims[<claim>][<nested>]..."
                ))
            })?;
            L7Condition::Claim {
                path,
                values: patterns()?,
            }
        }
        other => {
            return Err(bad_key(format!(
                "unsupported key {other:?}: expected one of {}, {}",
                super::security::CONDITION_KEYS.join(", "),
                L7_CONDITION_KEYS.join(", ")
            )));
        }
    })
}

/// `[a][b]` as `["a", "b"]`; `None` unless the whole text is non-empty bracketed names.
fn brackets(text: &str) -> Option<Vec<String>> {
    let mut names = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let (name, after) = inner.split_once(']')?;
        if name.is_empty() || name.contains('[') {
            return None;
        }
        names.push(name.to_string());
        rest = after;
    }
    (!names.is_empty()).then_some(names)
}

/// The largest inline `jwks` accepted (a JWKS with a few RSA keys is a few KiB).
pub const MAX_JWKS_BYTES: usize = 64 * 1024;

/// Parses and checks a JWKS document: JSON, every key usable for RS*, PS*, ES256/384 or EdDSA
/// (symmetric `oct` keys are refused: a key published in a JWKS is public).
pub fn parse_jwks(text: &[u8]) -> Result<JwkSet, String> {
    if text.len() > MAX_JWKS_BYTES {
        return Err(format!(
            "{} bytes: larger than the {MAX_JWKS_BYTES}-byte bound",
            text.len()
        ));
    }
    let set: JwkSet =
        serde_json::from_slice(text).map_err(|e| format!("not a JWKS document: {e}"))?;
    if set.keys.is_empty() {
        return Err("has no keys".into());
    }
    for (i, key) in set.keys.iter().enumerate() {
        if matches!(
            key.algorithm,
            jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)
        ) {
            return Err(format!(
                "keys[{i}]: symmetric (oct) keys are not accepted in a JWKS"
            ));
        }
        DecodingKey::from_jwk(key).map_err(|e| format!("keys[{i}]: unusable key: {e}"))?;
    }
    Ok(set)
}

/// Why the waypoint will not fetch a `jwksUri` from `ip`, if it will not: Istio's jwks
/// resolver's always-on block (link-local unicast and multicast, 169.254.0.0/16 and fe80::/10,
/// where cloud instance metadata lives; the metadata addresses outside it, Alibaba's
/// 100.100.100.200 and AWS's fd00:ec2::/32), plus what is no host at all (unspecified,
/// broadcast, multicast). An IPv4-mapped IPv6 address is judged as its IPv4 address. Loopback
/// and private addresses stay allowed, as Istio's default: an in-cluster identity provider is
/// legitimate.
pub fn refused_jwks_address(ip: std::net::IpAddr) -> Option<&'static str> {
    use std::net::IpAddr;
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            if v4.is_link_local() {
                Some("a link-local address (169.254.0.0/16: cloud instance metadata)")
            } else if v4.octets() == [100, 100, 100, 200] {
                Some("a cloud instance metadata address (100.100.100.200)")
            } else if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() {
                Some("not a unicast host address")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            if first & 0xffc0 == 0xfe80 {
                Some("a link-local address (fe80::/10)")
            } else if first == 0xfd00 && v6.segments()[1] == 0x0ec2 {
                Some("a cloud instance metadata address (fd00:ec2::/32)")
            } else if v6.is_unspecified() || v6.is_multicast() {
                Some("not a unicast host address")
            } else {
                None
            }
        }
    }
}

fn header_name(field: String, text: &str) -> Result<String, PolicyError> {
    HeaderName::from_bytes(text.as_bytes())
        .map(|h| h.as_str().to_string())
        .map_err(|_| invalid(field, format!("{text:?} is not a header name")))
}

/// Validates a `requestAuthentications` entry (at `{at}`).
pub fn request_authentication(
    at: &str,
    entry: &RequestAuthenticationFile,
) -> Result<RequestAuthentication, PolicyError> {
    let Some(namespace) = entry.namespace.clone() else {
        return Err(invalid(
            format!("{at}.namespace"),
            "required (the targets are in it)",
        ));
    };
    if entry.selector.is_some() {
        return Err(invalid(
            format!("{at}.selector"),
            "a RequestAuthentication is enforced by waypoints only (the node agents do not \
             parse HTTP): attach it with targetRefs instead",
        ));
    }
    let targets = target_refs(
        at,
        &namespace,
        entry.target_ref.as_ref(),
        entry.target_refs.as_ref(),
    )?;
    if targets.is_empty() {
        return Err(invalid(
            format!("{at}.targetRefs"),
            "required: the waypoint (kind Gateway) or the services (kind Service) it applies to",
        ));
    }
    if entry.jwt_rules.is_empty() {
        return Err(invalid(format!("{at}.jwtRules"), "must not be empty"));
    }
    let mut issuers = HashMap::new();
    let jwt_rules = entry
        .jwt_rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let at = format!("{at}.jwtRules[{i}]");
            if r.issuer.is_empty() {
                return Err(invalid(format!("{at}.issuer"), "must not be empty"));
            }
            if let Some(first) = issuers.insert(r.issuer.clone(), i) {
                return Err(invalid(
                    format!("{at}.issuer"),
                    format!("{:?} is already jwtRules[{first}]", r.issuer),
                ));
            }
            jwt_rule(&at, r)
        })
        .collect::<Result<_, _>>()?;
    Ok(RequestAuthentication {
        name: entry.name.clone(),
        namespace,
        targets,
        jwt_rules,
    })
}

fn jwt_rule(at: &str, r: &JwtRuleFile) -> Result<JwtRule, PolicyError> {
    let keys = match (&r.jwks_uri, &r.jwks) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                format!("{at}.jwks"),
                "set jwksUri or jwks, not both",
            ));
        }
        (None, None) => {
            return Err(invalid(
                format!("{at}.jwksUri"),
                "set jwksUri or jwks (OpenID discovery from the issuer is not supported)",
            ));
        }
        (Some(uri), None) => {
            let parsed: Uri = uri
                .parse()
                .map_err(|e| invalid(format!("{at}.jwksUri"), format!("{uri:?}: {e}")))?;
            if !matches!(parsed.scheme_str(), Some("http" | "https")) || parsed.host().is_none() {
                return Err(invalid(
                    format!("{at}.jwksUri"),
                    format!("{uri:?}: expected an http:// or https:// URL with a host"),
                ));
            }
            let host = parsed.host().unwrap_or_default();
            if let Ok(ip) = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                && let Some(why) = refused_jwks_address(ip)
            {
                return Err(invalid(
                    format!("{at}.jwksUri"),
                    format!("{uri:?}: {ip} is {why}; the waypoint does not fetch keys from it"),
                ));
            }
            JwksSource::Uri(uri.clone())
        }
        (None, Some(jwks)) => JwksSource::Inline(Arc::new(
            parse_jwks(jwks.as_bytes()).map_err(|e| invalid(format!("{at}.jwks"), e))?,
        )),
    };
    let from_headers = r
        .from_headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let name = header_name(format!("{at}.fromHeaders[{i}].name"), &h.name)?;
            Ok((name, h.prefix.clone().unwrap_or_default()))
        })
        .collect::<Result<Vec<_>, PolicyError>>()?;
    for (i, p) in r.from_params.iter().enumerate() {
        if p.is_empty() {
            return Err(invalid(
                format!("{at}.fromParams[{i}]"),
                "must not be empty",
            ));
        }
    }
    // Istio's default locations when none is given.
    let (from_headers, from_params) = if from_headers.is_empty() && r.from_params.is_empty() {
        (
            vec![("authorization".to_string(), "Bearer ".to_string())],
            vec!["access_token".to_string()],
        )
    } else {
        (from_headers, r.from_params.clone())
    };
    let output_payload_to_header = r
        .output_payload_to_header
        .as_deref()
        .map(|h| header_name(format!("{at}.outputPayloadToHeader"), h))
        .transpose()?;
    let output_claim_to_headers = r
        .output_claim_to_headers
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if c.claim.is_empty() {
                return Err(invalid(
                    format!("{at}.outputClaimToHeaders[{i}].claim"),
                    "must not be empty",
                ));
            }
            Ok((
                header_name(format!("{at}.outputClaimToHeaders[{i}].header"), &c.header)?,
                c.claim.clone(),
            ))
        })
        .collect::<Result<_, _>>()?;
    Ok(JwtRule {
        issuer: r.issuer.clone(),
        audiences: r.audiences.clone(),
        keys,
        from_headers,
        from_params,
        output_payload_to_header,
        output_claim_to_headers,
        forward_original_token: r.forward_original_token,
    })
}

impl Validator<'_> {
    /// `authorizationPolicies`: the node agents' (no `targetRefs`) and the waypoints'.
    pub(super) fn authorization_policies(
        &self,
        entries: &[AuthorizationPolicyFile],
    ) -> Result<(Vec<AuthorizationPolicy>, Vec<WaypointPolicy>), ConfigError> {
        let mut names = HashMap::new();
        let mut policies = Vec::with_capacity(entries.len());
        let mut waypoint = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let at = format!("authorizationPolicies[{i}]");
            self.policy_name(&at, &entry.name, entry.namespace.as_deref(), &mut names, i)?;
            if targets_waypoint(entry) {
                waypoint.push(waypoint_policy(&at, entry).map_err(|e| self.policy_error(e))?);
            } else {
                policies.push(authorization_policy(&at, entry).map_err(|e| self.policy_error(e))?);
            }
        }
        Ok((policies, waypoint))
    }

    /// `requestAuthentications`.
    pub(super) fn request_authentications(
        &self,
        entries: &[RequestAuthenticationFile],
    ) -> Result<Vec<RequestAuthentication>, ConfigError> {
        let mut names = HashMap::new();
        let mut out = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            let at = format!("requestAuthentications[{i}]");
            self.non_empty(format!("{at}.name"), &entry.name)?;
            let uid = format!(
                "{}/{}",
                entry.namespace.as_deref().unwrap_or_default(),
                entry.name
            );
            if let Some(first) = names.insert(uid.clone(), i) {
                return Err(self.invalid(
                    format!("{at} ({uid})"),
                    format!("{uid} is already requestAuthentications[{first}]"),
                ));
            }
            out.push(
                request_authentication(&at, entry).map_err(|e| self.invalid(e.field, e.reason))?,
            );
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::parse_mesh;
    use crate::{
        policy::{Action, l7::TargetRef},
        state::MeshState,
    };

    fn parse(security: &str) -> Result<MeshState, String> {
        parse_mesh(Path::new("/tmp/m.yaml"), security.as_bytes()).map_err(|e| e.to_string())
    }

    #[track_caller]
    fn assert_rejected(security: &str, expected: &str) {
        match parse(security) {
            Ok(_) => panic!("accepted:\n{security}"),
            Err(message) => assert_eq!(message, format!("mesh file /tmp/m.yaml: {expected}")),
        }
    }

    /// The seed's policy, attached to the backend's service.
    const SEED: &str = r#"
authorizationPolicies:
  - name: allow-frontend-to-backend
    namespace: default
    targetRefs: [{kind: Service, group: "", name: backend}]
    action: ALLOW
    rules:
      - from: [{source: {principals: ["cluster.local/ns/default/sa/frontend"]}}]
        to: [{operation: {methods: ["GET", "POST"]}}]
"#;

    #[test]
    fn a_policy_with_target_refs_goes_to_the_waypoints_only() {
        let state = parse(SEED).unwrap();
        assert!(state.policies().authorizations().is_empty());
        let waypoint = state.policies().waypoint().authorizations();
        assert_eq!(waypoint.len(), 1);
        assert_eq!(waypoint[0].action, Action::Allow);
        assert_eq!(
            waypoint[0].targets,
            [TargetRef::Service {
                namespace: "default".into(),
                name: "backend".into()
            }]
        );
        let gateway = parse(
            "authorizationPolicies:\n  - name: p\n    namespace: default\n    targetRef: \
             {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}\n    rules: [{}]\n",
        )
        .unwrap();
        assert_eq!(
            gateway.policies().waypoint().authorizations()[0].targets,
            [TargetRef::Waypoint {
                namespace: "default".into(),
                name: "waypoint".into()
            }]
        );
    }

    #[test]
    fn waypoint_policies_are_validated_naming_the_field() {
        let policy = |body: &str| {
            format!(
                "authorizationPolicies:\n  - name: p\n    namespace: default\n    targetRefs: \
                 [{{kind: Service, name: backend}}]\n{body}"
            )
        };
        let at = "authorizationPolicies[0]";
        assert_rejected(
            &policy("    action: CUSTOM\n"),
            &format!(
                "{at}.action: CUSTOM (external authorization) is not supported: expected ALLOW \
                 or DENY"
            ),
        );
        assert!(
            parse(&policy("    action: AUDIT\n"))
                .unwrap_err()
                .contains("action: AUDIT is not supported")
        );
        assert_rejected(
            &policy("    rules: [{to: [{operation: {paths: [\"/api/{*}/x\"]}}]}]\n"),
            &format!(
                "{at}.rules[0].to[0].operation.paths[0]: \"/api/{{*}}/x\": path templates ({{*}}, \
                 {{**}}) are not supported; use the exact, prefix (/x/*), suffix (*.txt) or * \
                 forms"
            ),
        );
        assert!(
            parse(&policy(
                "    rules: [{when: [{key: \"connection.sni\", values: [a]}]}]\n"
            ))
            .unwrap_err()
            .contains("rules[0].when[0].key: unsupported key \"connection.sni\"")
        );
        assert!(
            parse(&policy(
                "    rules: [{when: [{key: \"request.auth.claims[]\", values: [a]}]}]\n"
            ))
            .unwrap_err()
            .contains("rules[0].when[0].key: \"request.auth.claims[]\": expected")
        );
        assert_rejected(
            "authorizationPolicies:\n  - name: p\n    namespace: default\n    targetRefs: \
             [{kind: Pod, name: x}]\n",
            &format!(
                "{at}.targetRefs[0]: unsupported target \"\"/\"Pod\": expected kind Service \
                 (group \"\") or kind Gateway (group gateway.networking.k8s.io, a waypoint)"
            ),
        );
        assert_rejected(
            "authorizationPolicies:\n  - name: p\n    namespace: default\n    targetRefs: \
             [{kind: Service, name: x, namespace: other}]\n",
            &format!(
                "{at}.targetRefs[0].namespace: \"other\": a policy can only target resources \
                 of its own namespace (default)"
            ),
        );
        assert_rejected(
            "authorizationPolicies:\n  - name: p\n    targetRefs: [{kind: Service, name: x}]\n",
            &format!(
                "{at}.namespace: a policy with targetRefs needs a namespace (its targets are in it)"
            ),
        );
        // Every L7 key and field is accepted on a waypoint policy.
        let state = parse(&policy(
            r#"    rules:
      - from: [{source: {requestPrincipals: ["*"], notRemoteIpBlocks: ["10.0.0.0/8"]}}]
        to: [{operation: {hosts: ["*.Example.com"], notMethods: [DELETE], paths: ["/api/*"], notPaths: ["*.txt"], ports: ["9080"]}}]
        when:
          - {key: "request.headers[X-Env]", values: [prod]}
          - {key: "request.auth.claims[groups]", values: [admin]}
          - {key: "request.auth.claims[nested][team]", notValues: [ops]}
          - {key: request.auth.audiences, values: [api]}
          - {key: source.namespace, values: [default]}
"#,
        ))
        .unwrap();
        let json = serde_json::to_value(&*state.policies().waypoint().authorizations()[0]).unwrap();
        assert_eq!(
            json["rules"][0]["to"][0]["hosts"]["values"],
            serde_json::json!(["*.example.com"])
        );
    }

    #[test]
    fn request_authentications_are_validated_naming_the_field() {
        let ra = |rule: &str| {
            format!(
                "requestAuthentications:\n  - name: jwt\n    namespace: default\n    targetRefs: \
                 [{{kind: Service, name: backend}}]\n    jwtRules:\n      - {rule}\n"
            )
        };
        let at = "requestAuthentications[0].jwtRules[0]";
        let state = parse(&ra(
            "{issuer: \"https://idp\", jwksUri: \"http://10.0.0.1/jwks\"}",
        ))
        .unwrap();
        let rule = &state.policies().waypoint().authentications()[0].jwt_rules[0];
        assert_eq!(
            rule.from_headers,
            [("authorization".into(), "Bearer ".into())]
        );
        assert_eq!(rule.from_params, ["access_token"]);
        assert!(!rule.forward_original_token);
        assert_rejected(
            &ra("{issuer: \"https://idp\"}"),
            &format!(
                "{at}.jwksUri: set jwksUri or jwks (OpenID discovery from the issuer is not \
                 supported)"
            ),
        );
        assert_rejected(
            &ra("{issuer: \"https://idp\", jwksUri: \"ftp://idp/keys\"}"),
            &format!(
                "{at}.jwksUri: \"ftp://idp/keys\": expected an http:// or https:// URL with a host"
            ),
        );
        // Link-local and metadata addresses are refused, as literals here and once resolved
        // by the fetcher; loopback and private ones are not.
        for (uri, why) in [
            (
                "http://169.254.169.254/keys",
                "169.254.169.254 is a link-local address",
            ),
            ("http://[fe80::1]/keys", "fe80::1 is a link-local address"),
            (
                "http://[::ffff:169.254.1.1]/keys",
                "169.254.1.1 is a link-local address",
            ),
            (
                "http://100.100.100.200/keys",
                "is a cloud instance metadata address",
            ),
            (
                "https://[fd00:ec2::254]/keys",
                "is a cloud instance metadata address",
            ),
            ("http://0.0.0.0/keys", "is not a unicast host address"),
        ] {
            let error = parse(&ra(&format!(
                "{{issuer: \"https://idp\", jwksUri: \"{uri}\"}}"
            )))
            .unwrap_err();
            assert!(
                error.contains(&format!("{at}.jwksUri: \"{uri}\": ")) && error.contains(why),
                "{uri}: {error}"
            );
        }
        for uri in [
            "http://127.0.0.1:8080/keys",
            "http://10.0.0.1/keys",
            "http://[fd00::1]/k",
        ] {
            parse(&ra(&format!(
                "{{issuer: \"https://idp\", jwksUri: \"{uri}\"}}"
            )))
            .unwrap_or_else(|e| panic!("{uri}: {e}"));
        }
        assert!(
            parse(&ra("{issuer: \"https://idp\", jwks: \"{\\\"keys\\\":[{\\\"kty\\\":\\\"oct\\\",\\\"k\\\":\\\"eA\\\"}]}\"}"))
                .unwrap_err()
                .contains(&format!("{at}.jwks: keys[0]: symmetric (oct) keys are not accepted"))
        );
        assert!(
            parse(&ra(
                "{issuer: \"https://idp\", jwksUri: \"http://idp/k\", fromCookies: [a]}"
            ))
            .unwrap_err()
            .contains("unknown field `fromCookies`")
        );
        assert_rejected(
            &ra(
                "{issuer: \"https://idp\", jwksUri: \"http://idp/k\", fromHeaders: [{name: \"bad header\"}]}",
            ),
            &format!("{at}.fromHeaders[0].name: \"bad header\" is not a header name"),
        );
        assert_rejected(
            "requestAuthentications:\n  - name: jwt\n    namespace: default\n    selector: \
             {matchLabels: {app: backend}}\n    jwtRules: [{issuer: i, jwksUri: \"http://i/k\"}]\n",
            "requestAuthentications[0].selector: a RequestAuthentication is enforced by \
             waypoints only (the node agents do not parse HTTP): attach it with targetRefs \
             instead",
        );
    }
}
