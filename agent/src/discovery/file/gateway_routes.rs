//! The Gateway API front end of the route model: `HTTPRoute` and `GRPCRoute`
//! (`gateway.networking.k8s.io/v1`, standard channel) whose `parentRefs` name Services, as
//! GAMMA (the Gateway API for service meshes) defines them.
//!
//! One conversion for both sources: the mesh file's `httpRoutes` and `grpcRoutes` (errors are
//! the file's, naming the field) and the Kubernetes resources (`discovery::kube::gateway_routes`,
//! where a problem becomes a status condition with the Gateway API's reason). The types are the
//! `gateway-api` crate's; a `spec` is kept as JSON and parsed strictly here: a field the crate's
//! standard-channel types do not have (an experimental field such as `sessionPersistence` or
//! `retry`, or a typo) is refused by name, never dropped while parsing, since a route missing a
//! field would be a different route.
//!
//! Each rule's match becomes one route of the model, and the routes of one Service from every
//! route resource are merged and ordered by the Gateway API's precedence (see [`merge`]).
use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    time::Duration,
};

use gateway_api::{
    grpcroutes::{
        GrpcRouteRules, GrpcRouteRulesMatches, GrpcRouteRulesMatchesMethodType, GrpcRouteSpec,
    },
    httproutes::{
        HttpRouteRules, HttpRouteRulesBackendRefs, HttpRouteRulesFilters,
        HttpRouteRulesFiltersRequestMirror, HttpRouteRulesFiltersRequestRedirect,
        HttpRouteRulesFiltersRequestRedirectPathType, HttpRouteRulesFiltersRequestRedirectScheme,
        HttpRouteRulesFiltersType, HttpRouteRulesFiltersUrlRewrite,
        HttpRouteRulesFiltersUrlRewritePathType, HttpRouteRulesMatches,
        HttpRouteRulesMatchesHeaders, HttpRouteRulesMatchesHeadersType,
        HttpRouteRulesMatchesPathType, HttpRouteRulesMatchesQueryParamsType, HttpRouteSpec,
    },
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

use super::{
    ConfigError, Validator,
    routing::{HeaderOperationsFile, KnownServices, ObjectMetaFile},
};
use crate::state::{
    WaypointRef,
    routes::resilience::{Mirror, RouteResilience},
    routes::{
        DirectResponse, FullRegex, HeaderMatch, HeaderOps, HeaderRules, HttpMatch, HttpRoute,
        QueryMatch, Redirect, Rewrite, RouteDestination, RouteFilters, ServiceRoutes, StringMatch,
    },
};

/// The API version of Gateway API routes.
pub const GATEWAY_API_VERSION: &str = "gateway.networking.k8s.io/v1";

/// One entry of `httpRoutes` or `grpcRoutes`: a whole Gateway API object.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayRouteFile {
    /// Must be [`GATEWAY_API_VERSION`].
    pub api_version: String,
    /// `HTTPRoute` in `httpRoutes`, `GRPCRoute` in `grpcRoutes`.
    pub kind: String,
    /// Name and namespace.
    pub metadata: ObjectMetaFile,
    /// The Gateway API spec, parsed strictly by the conversion (so that an unsupported field is
    /// named, not dropped).
    #[serde(default)]
    pub spec: Value,
}

/// The two route kinds; gRPC routes take precedence over HTTP ones of the same Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GatewayKind {
    /// `GRPCRoute`.
    GrpcRoute,
    /// `HTTPRoute`.
    HttpRoute,
}

impl GatewayKind {
    /// The kind as the API names it.
    pub fn name(self) -> &'static str {
        match self {
            GatewayKind::GrpcRoute => "GRPCRoute",
            GatewayKind::HttpRoute => "HTTPRoute",
        }
    }
}

impl fmt::Display for GatewayKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a route, or a part of it, is not taken as written: the Gateway API's condition reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayReason {
    /// `Accepted=False`: a field Ambit does not implement, or a value it refuses.
    UnsupportedValue,
    /// `Accepted=False`: the parent Service (or its port) does not exist.
    NoMatchingParent,
    /// `ResolvedRefs=False`: a backendRef names no Service, or a port it does not have.
    BackendNotFound,
    /// `ResolvedRefs=False`: a backendRef of another kind than a core Service.
    InvalidKind,
    /// `ResolvedRefs=False`: a backendRef in another namespace (Ambit has no ReferenceGrant).
    RefNotPermitted,
}

impl GatewayReason {
    /// The reason as the Gateway API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            GatewayReason::UnsupportedValue => "UnsupportedValue",
            GatewayReason::NoMatchingParent => "NoMatchingParent",
            GatewayReason::BackendNotFound => "BackendNotFound",
            GatewayReason::InvalidKind => "InvalidKind",
            GatewayReason::RefNotPermitted => "RefNotPermitted",
        }
    }

    /// Whether it is about a reference (the `ResolvedRefs` condition) rather than acceptance.
    pub fn is_ref(self) -> bool {
        matches!(
            self,
            GatewayReason::BackendNotFound
                | GatewayReason::InvalidKind
                | GatewayReason::RefNotPermitted
        )
    }
}

/// A problem with one field of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayProblem {
    /// The field, e.g. `httpRoutes[0].spec.rules[1].filters[0].type` (in Kubernetes,
    /// `spec.rules[1]...`).
    pub field: String,
    /// The Gateway API reason.
    pub reason: GatewayReason,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for GatewayProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// One Service `parentRef` of a route and whether the route binds it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParentOutcome {
    /// Its index in `spec.parentRefs`.
    pub index: usize,
    /// The reference as written (for the status' `parentRef`).
    pub parent_ref: Value,
    /// The Service's uid and the port the route is limited to, or why it is not bound.
    pub bound: Result<(String, Option<u16>), GatewayProblem>,
}

/// One route of the model and where it ranks.
#[derive(Debug, Clone, PartialEq)]
pub struct RankedRoute {
    rank: [i64; 5],
    rule: usize,
    matched: usize,
    route: HttpRoute,
}

/// A route resource converted.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedGatewayRoute {
    /// Its kind.
    pub kind: GatewayKind,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its Service parents (none: it is not a mesh route, not Ambit's).
    pub parents: Vec<ParentOutcome>,
    /// One model route per rule and match (before ranking across resources).
    pub entries: Vec<RankedRoute>,
    /// References that did not resolve: the rules naming them answer 500, as the Gateway API
    /// says (`ResolvedRefs=False`).
    pub unresolved: Vec<GatewayProblem>,
}

/// Parses `spec` into `T` strictly: a type error or a field `T` does not have is a problem
/// naming the field under `at`.
pub(crate) fn strict_spec<T: DeserializeOwned + Serialize>(
    at: &str,
    spec: &Value,
) -> Result<T, GatewayProblem> {
    let empty = Value::Object(Default::default());
    let spec = if spec.is_null() { &empty } else { spec };
    let parsed: T = serde_path_to_error::deserialize(spec).map_err(|e| {
        let path = e.path().to_string();
        GatewayProblem {
            field: if path == "." {
                format!("{at}.spec")
            } else {
                format!("{at}.spec.{path}")
            },
            reason: GatewayReason::UnsupportedValue,
            message: e.inner().to_string(),
        }
    })?;
    let kept = serde_json::to_value(&parsed).unwrap_or(Value::Null);
    if let Some(field) = dropped_field(spec, &kept, &format!("{at}.spec")) {
        return Err(GatewayProblem {
            field,
            reason: GatewayReason::UnsupportedValue,
            message: "not supported: Ambit implements the standard channel's fields (this one is \
                      experimental or unknown), and refuses a route rather than ignore a field"
                .into(),
        });
    }
    Ok(parsed)
}

/// The first field of `written` that parsing dropped (absent from `kept`).
fn dropped_field(written: &Value, kept: &Value, at: &str) -> Option<String> {
    match (written, kept) {
        (Value::Object(written), Value::Object(kept)) => written.iter().find_map(|(key, value)| {
            if value.is_null() {
                return None;
            }
            let field = format!("{at}.{key}");
            match kept.get(key) {
                None => Some(field),
                Some(kept) => dropped_field(value, kept, &field),
            }
        }),
        (Value::Array(written), Value::Array(kept)) => written
            .iter()
            .zip(kept)
            .enumerate()
            .find_map(|(i, (w, k))| dropped_field(w, k, &format!("{at}[{i}]"))),
        _ => None,
    }
}

/// A value of one of the crate's types as another type of the same shape (the gRPC route's
/// filters and backends are the HTTP route's, in other types).
fn recast<T: Serialize, U: DeserializeOwned>(value: &T) -> Option<U> {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())
}

/// Gateway API's header modifier (request or response, HTTP or gRPC: one shape).
#[derive(Debug, Default, Deserialize)]
struct HeaderModifier {
    #[serde(default)]
    set: Vec<NameValue>,
    #[serde(default)]
    add: Vec<NameValue>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct NameValue {
    name: String,
    value: String,
}

/// Gateway API's largest backend weight.
const MAX_WEIGHT: i32 = 1_000_000;

fn unsupported(field: impl Into<String>, message: impl Into<String>) -> GatewayProblem {
    GatewayProblem {
        field: field.into(),
        reason: GatewayReason::UnsupportedValue,
        message: message.into(),
    }
}

/// A validation error of the shared helpers as a problem of the route.
fn from_config(error: ConfigError) -> GatewayProblem {
    match error {
        ConfigError::Invalid { field, reason, .. } => unsupported(field, reason),
        other => unsupported("spec", other.to_string()),
    }
}

/// Converts one Gateway API route on its own (for Kubernetes: `discovery::kube::gateway_routes`),
/// its fields named after `at` (empty: `.spec...`).
pub(crate) fn gateway_route(
    at: &str,
    kind: GatewayKind,
    namespace: &str,
    name: &str,
    spec: &Value,
    known: &KnownServices<'_>,
) -> Result<CheckedGatewayRoute, GatewayProblem> {
    Validator::new(std::path::Path::new("")).gateway_route(at, kind, namespace, name, spec, known)
}

impl Validator<'_> {
    /// Converts a Gateway API route of `kind` named `namespace/name`, its fields named after
    /// `at` (e.g. `httpRoutes[0]`).
    fn gateway_route(
        &self,
        at: &str,
        kind: GatewayKind,
        namespace: &str,
        name: &str,
        spec: &Value,
        known: &KnownServices<'_>,
    ) -> Result<CheckedGatewayRoute, GatewayProblem> {
        let (hostnames, parent_refs, rules) = match kind {
            GatewayKind::HttpRoute => {
                let spec: HttpRouteSpec = strict_spec(at, spec)?;
                let rules = spec.rules.unwrap_or_default();
                (
                    spec.hostnames.unwrap_or_default(),
                    recast::<_, Vec<Value>>(&spec.parent_refs.unwrap_or_default()),
                    Rules::Http(rules),
                )
            }
            GatewayKind::GrpcRoute => {
                let spec: GrpcRouteSpec = strict_spec(at, spec)?;
                (
                    spec.hostnames.unwrap_or_default(),
                    recast::<_, Vec<Value>>(&spec.parent_refs.unwrap_or_default()),
                    Rules::Grpc(spec.rules.unwrap_or_default()),
                )
            }
        };
        let parents = self.service_parents(at, namespace, &parent_refs.unwrap_or_default(), known);
        let mut out = CheckedGatewayRoute {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
            parents,
            entries: Vec::new(),
            unresolved: Vec::new(),
        };
        if out.parents.is_empty() {
            // Not a mesh route: its parents are Gateways, not Ambit's.
            return Ok(out);
        }
        if !hostnames.is_empty() {
            return Err(unsupported(
                format!("{at}.spec.hostnames"),
                "a route whose parent is a Service matches that Service's traffic, not hostnames \
                 (GAMMA): leave hostnames empty",
            ));
        }
        let ctx = RuleContext {
            namespace,
            known,
            unresolved: &mut out.unresolved,
        };
        out.entries = match &rules {
            Rules::Http(rules) => self.http_rules(at, rules, ctx)?,
            Rules::Grpc(rules) => self.grpc_rules(at, rules, ctx)?,
        };
        Ok(out)
    }

    /// The Service parents of `refs` (others are Gateways: not Ambit's, skipped).
    fn service_parents(
        &self,
        at: &str,
        namespace: &str,
        refs: &[Value],
        known: &KnownServices<'_>,
    ) -> Vec<ParentOutcome> {
        let mut out = Vec::new();
        for (i, parent_ref) in refs.iter().enumerate() {
            let text = |key: &str| parent_ref.get(key).and_then(Value::as_str);
            let group = text("group").unwrap_or("gateway.networking.k8s.io");
            let kind = text("kind").unwrap_or("Gateway");
            if !(group.is_empty() || group == "core") || kind != "Service" {
                continue;
            }
            let field = format!("{at}.spec.parentRefs[{i}]");
            let name = text("name").unwrap_or_default();
            let bound = (|| {
                if let Some(section) = text("sectionName") {
                    return Err(unsupported(
                        format!("{field}.sectionName"),
                        format!(
                            "{section:?}: a Service parent is narrowed by port, not sectionName"
                        ),
                    ));
                }
                let ns = text("namespace").unwrap_or(namespace);
                if ns != namespace {
                    return Err(unsupported(
                        format!("{field}.namespace"),
                        format!(
                            "{ns:?}: consumer routes (in another namespace than their Service) are \
                             not supported: put the route in namespace {ns}"
                        ),
                    ));
                }
                let service = known.get(&(ns, name)).ok_or_else(|| GatewayProblem {
                    field: format!("{field}.name"),
                    reason: GatewayReason::NoMatchingParent,
                    message: format!("{ns}/{name} is not a service of the mesh"),
                })?;
                let port = match parent_ref.get("port").and_then(Value::as_i64) {
                    None => None,
                    Some(port) => {
                        let number = self
                            .port(format!("{field}.port"), port)
                            .map_err(from_config)?;
                        if service.port(number).is_none() {
                            return Err(GatewayProblem {
                                field: format!("{field}.port"),
                                reason: GatewayReason::NoMatchingParent,
                                message: format!("service {} has no port {number}", service.uid()),
                            });
                        }
                        Some(number)
                    }
                };
                Ok((service.uid(), port))
            })();
            out.push(ParentOutcome {
                index: i,
                parent_ref: parent_ref.clone(),
                bound,
            });
        }
        out
    }

    fn http_rules(
        &self,
        at: &str,
        rules: &[HttpRouteRules],
        mut ctx: RuleContext<'_, '_>,
    ) -> Result<Vec<RankedRoute>, GatewayProblem> {
        let mut entries = Vec::new();
        for (r, rule) in rules.iter().enumerate() {
            let field = format!("{at}.spec.rules[{r}]");
            let matches = match rule.matches.as_deref() {
                None | Some([]) => vec![(
                    HttpMatch {
                        uri: Some(StringMatch::PathPrefix("/".into())),
                        ..HttpMatch::default()
                    },
                    [2, 0, 0, 0, 0],
                )],
                Some(matches) => matches
                    .iter()
                    .enumerate()
                    .map(|(m, entry)| self.http_match(&format!("{field}.matches[{m}]"), entry))
                    .collect::<Result<_, _>>()?,
            };
            let mut template = self.rule_actions(
                &field,
                rule.filters.as_deref().unwrap_or_default(),
                rule.backend_refs.as_deref().unwrap_or_default(),
                &mut ctx,
            )?;
            if let Some(rewrite) = &template.filters.rewrite
                && rewrite.uri.is_some()
                && !rewrite.full_path
                && !matches
                    .iter()
                    .all(|(m, _)| matches!(m.uri, Some(StringMatch::PathPrefix(_))))
            {
                return Err(unsupported(
                    format!("{field}.filters"),
                    "URLRewrite's ReplacePrefixMatch needs every match of the rule to be a \
                     PathPrefix match",
                ));
            }
            if let Some(timeouts) = &rule.timeouts {
                let request = self.gateway_duration(
                    &format!("{field}.timeouts.request"),
                    timeouts.request.as_deref(),
                )?;
                let backend = self.gateway_duration(
                    &format!("{field}.timeouts.backendRequest"),
                    timeouts.backend_request.as_deref(),
                )?;
                if let (Some(request), Some(backend)) = (request, backend)
                    && backend > request
                {
                    return Err(unsupported(
                        format!("{field}.timeouts.backendRequest"),
                        "must not be longer than timeouts.request",
                    ));
                }
                template.resilience.timeout = request;
                template.resilience.retries.per_try_timeout = backend;
            }
            template.name = Some(rule.name.clone().unwrap_or_else(|| format!("rules[{r}]")));
            for (m, (matched, rank)) in matches.into_iter().enumerate() {
                entries.push(RankedRoute {
                    rank,
                    rule: r,
                    matched: m,
                    route: HttpRoute {
                        matches: vec![matched],
                        ..template.clone()
                    },
                });
            }
        }
        Ok(entries)
    }

    /// One HTTPRoute match and its rank (lower first): exact path, then regular expression,
    /// then the longest prefix; then a method; then more headers; then more query parameters.
    fn http_match(
        &self,
        field: &str,
        entry: &HttpRouteRulesMatches,
    ) -> Result<(HttpMatch, [i64; 5]), GatewayProblem> {
        let path = entry.path.clone().unwrap_or_default();
        let kind = path
            .r#type
            .unwrap_or(HttpRouteRulesMatchesPathType::PathPrefix);
        let value = path.value.unwrap_or_else(|| "/".into());
        let path_field = format!("{field}.path.value");
        let len = i64::try_from(value.len()).unwrap_or(i64::MAX);
        let (uri, class) = match kind {
            HttpRouteRulesMatchesPathType::Exact | HttpRouteRulesMatchesPathType::PathPrefix
                if !value.starts_with('/') =>
            {
                return Err(unsupported(
                    path_field,
                    format!("{value:?} is not a path starting with /"),
                ));
            }
            HttpRouteRulesMatchesPathType::Exact => (StringMatch::Exact(value), [0, -len]),
            HttpRouteRulesMatchesPathType::RegularExpression => {
                (self.gateway_regex(&path_field, &value)?, [1, -len])
            }
            HttpRouteRulesMatchesPathType::PathPrefix => {
                let trimmed = i64::try_from(value.trim_end_matches('/').len()).unwrap_or(0);
                (StringMatch::PathPrefix(value), [2, -trimmed])
            }
        };
        let method = entry
            .method
            .as_ref()
            .and_then(|m| serde_json::to_value(m).ok())
            .and_then(|m| m.as_str().map(|m| StringMatch::Exact(m.to_string())));
        let headers = self.gateway_headers(
            &format!("{field}.headers"),
            entry.headers.as_deref().unwrap_or_default(),
        )?;
        let mut query_params = Vec::new();
        let mut seen = HashSet::new();
        for (q, param) in entry.query_params.iter().flatten().enumerate() {
            let param_field = format!("{field}.queryParams[{q}]");
            if param.name.is_empty() {
                return Err(unsupported(
                    format!("{param_field}.name"),
                    "must not be empty",
                ));
            }
            // The Gateway API: of equal names, only the first entry counts.
            if !seen.insert(param.name.clone()) {
                continue;
            }
            let value = match param.r#type {
                Some(HttpRouteRulesMatchesQueryParamsType::RegularExpression) => {
                    self.gateway_regex(&format!("{param_field}.value"), &param.value)?
                }
                _ => StringMatch::Exact(param.value.clone()),
            };
            query_params.push(QueryMatch {
                name: param.name.clone(),
                value: Some(value),
            });
        }
        let rank = [
            class[0],
            class[1],
            -i64::from(method.is_some()),
            -i64::try_from(headers.len()).unwrap_or(0),
            -i64::try_from(query_params.len()).unwrap_or(0),
        ];
        Ok((
            HttpMatch {
                uri: Some(uri),
                headers,
                method,
                query_params,
                ..HttpMatch::default()
            },
            rank,
        ))
    }

    /// Header matches: names case-insensitive (kept lower case), the first of equal names only.
    fn gateway_headers(
        &self,
        at: &str,
        entries: &[HttpRouteRulesMatchesHeaders],
    ) -> Result<Vec<HeaderMatch>, GatewayProblem> {
        let mut headers: Vec<HeaderMatch> = Vec::new();
        for (h, header) in entries.iter().enumerate() {
            let field = format!("{at}[{h}]");
            let name = http::HeaderName::from_bytes(header.name.as_bytes()).map_err(|_| {
                unsupported(
                    format!("{field}.name"),
                    format!("{:?} is not an HTTP header name", header.name),
                )
            })?;
            if headers.iter().any(|seen| seen.name == name.as_str()) {
                continue;
            }
            let value = match header.r#type {
                Some(HttpRouteRulesMatchesHeadersType::RegularExpression) => {
                    self.gateway_regex(&format!("{field}.value"), &header.value)?
                }
                _ => StringMatch::Exact(header.value.clone()),
            };
            headers.push(HeaderMatch {
                name: name.as_str().to_string(),
                value: Some(value),
            });
        }
        Ok(headers)
    }

    fn gateway_regex(&self, field: &str, source: &str) -> Result<StringMatch, GatewayProblem> {
        FullRegex::new(source)
            .map(StringMatch::Regex)
            .map_err(|e| unsupported(field, format!("invalid regular expression {source:?}: {e}")))
    }

    /// A Gateway API duration (GEP-2257: `10s`, `500ms`, `1h30m`); `0s` means none.
    fn gateway_duration(
        &self,
        field: &str,
        text: Option<&str>,
    ) -> Result<Option<Duration>, GatewayProblem> {
        let Some(text) = text else {
            return Ok(None);
        };
        let parsed: gateway_api::Duration = text.parse().map_err(|e: String| {
            unsupported(
                field,
                format!("{text:?} is not a Gateway API duration ({e}; e.g. 10s, 500ms, 1m)"),
            )
        })?;
        let duration = Duration::from_nanos(u64::try_from(parsed.as_nanos()).unwrap_or(u64::MAX));
        Ok((!duration.is_zero()).then_some(duration))
    }

    /// A rule's filters and backends: the model route without its matches and name.
    fn rule_actions(
        &self,
        field: &str,
        filters: &[HttpRouteRulesFilters],
        backends: &[HttpRouteRulesBackendRefs],
        ctx: &mut RuleContext<'_, '_>,
    ) -> Result<HttpRoute, GatewayProblem> {
        let mut route_filters = RouteFilters::default();
        let mut resilience = RouteResilience::default();
        let mut seen = HashSet::new();
        for (k, filter) in filters.iter().enumerate() {
            let at = format!("{field}.filters[{k}]");
            let kind = serde_json::to_value(&filter.r#type)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            if filter.r#type != HttpRouteRulesFiltersType::RequestMirror
                && !seen.insert(kind.clone())
            {
                return Err(unsupported(
                    format!("{at}.type"),
                    format!(
                        "{kind} is already a filter of this rule (one of each, but RequestMirror)"
                    ),
                ));
            }
            let missing =
                |key: &str| unsupported(format!("{at}.{key}"), format!("required by type {kind}"));
            match filter.r#type {
                HttpRouteRulesFiltersType::RequestHeaderModifier => {
                    let modifier = filter
                        .request_header_modifier
                        .as_ref()
                        .ok_or_else(|| missing("requestHeaderModifier"))?;
                    route_filters.headers.request = self.header_modifier(
                        &format!("{at}.requestHeaderModifier"),
                        recast(modifier).unwrap_or_default(),
                    )?;
                }
                HttpRouteRulesFiltersType::ResponseHeaderModifier => {
                    let modifier = filter
                        .response_header_modifier
                        .as_ref()
                        .ok_or_else(|| missing("responseHeaderModifier"))?;
                    route_filters.headers.response = self.header_modifier(
                        &format!("{at}.responseHeaderModifier"),
                        recast(modifier).unwrap_or_default(),
                    )?;
                }
                HttpRouteRulesFiltersType::RequestRedirect => {
                    let redirect = filter
                        .request_redirect
                        .as_ref()
                        .ok_or_else(|| missing("requestRedirect"))?;
                    route_filters.redirect =
                        Some(self.request_redirect(&format!("{at}.requestRedirect"), redirect)?);
                }
                HttpRouteRulesFiltersType::UrlRewrite => {
                    let rewrite = filter
                        .url_rewrite
                        .as_ref()
                        .ok_or_else(|| missing("urlRewrite"))?;
                    route_filters.rewrite =
                        Some(self.url_rewrite(&format!("{at}.urlRewrite"), rewrite)?);
                }
                HttpRouteRulesFiltersType::RequestMirror => {
                    let mirror = filter
                        .request_mirror
                        .as_ref()
                        .ok_or_else(|| missing("requestMirror"))?;
                    if let Some(mirror) =
                        self.request_mirror(&format!("{at}.requestMirror"), mirror, ctx)?
                    {
                        resilience.mirrors.push(mirror);
                    }
                }
                HttpRouteRulesFiltersType::ExtensionRef | HttpRouteRulesFiltersType::Cors => {
                    return Err(unsupported(
                        format!("{at}.type"),
                        format!("{kind} filters are not supported by Ambit's waypoints"),
                    ));
                }
            }
        }
        if route_filters.redirect.is_some() {
            if route_filters.rewrite.is_some() {
                return Err(unsupported(
                    format!("{field}.filters"),
                    "a rule cannot have both RequestRedirect and URLRewrite",
                ));
            }
            if !backends.is_empty() {
                return Err(unsupported(
                    format!("{field}.backendRefs"),
                    "a rule with a RequestRedirect answers itself: it cannot also have backendRefs",
                ));
            }
            return Ok(HttpRoute {
                name: None,
                matches: Vec::new(),
                destinations: Vec::new(),
                filters: route_filters,
                resilience,
            });
        }
        let mut destinations = Vec::new();
        let mut broken = false;
        for (b, backend) in backends.iter().enumerate() {
            let at = format!("{field}.backendRefs[{b}]");
            let weight = backend.weight.unwrap_or(1);
            if !(0..=MAX_WEIGHT).contains(&weight) {
                return Err(unsupported(
                    format!("{at}.weight"),
                    format!("{weight} is not in 0..={MAX_WEIGHT}"),
                ));
            }
            let reference = BackendRef {
                group: backend.group.as_deref(),
                kind: backend.kind.as_deref(),
                name: &backend.name,
                namespace: backend.namespace.as_deref(),
                port: backend.port,
            };
            let headers = self.backend_filters(&at, backend)?;
            match self.backend_ref(&at, &reference, ctx)? {
                Some(destination) => destinations.push(RouteDestination {
                    weight: weight.unsigned_abs(),
                    headers,
                    ..destination
                }),
                None => broken = true,
            }
        }
        if broken || destinations.iter().all(|d| d.weight == 0) {
            // No backend to send to (none named, none resolved, or all weights 0): the Gateway
            // API answers 500.
            route_filters.direct_response = Some(DirectResponse {
                status: 500,
                body: None,
            });
            destinations.clear();
        }
        Ok(HttpRoute {
            name: None,
            matches: Vec::new(),
            destinations,
            filters: route_filters,
            resilience,
        })
    }

    /// A backend's own filters: header modifiers only.
    fn backend_filters(
        &self,
        at: &str,
        backend: &HttpRouteRulesBackendRefs,
    ) -> Result<HeaderRules, GatewayProblem> {
        let mut rules = HeaderRules::default();
        for (k, filter) in backend.filters.iter().flatten().enumerate() {
            let at = format!("{at}.filters[{k}]");
            if let Some(modifier) = &filter.request_header_modifier {
                rules.request = self.header_modifier(
                    &format!("{at}.requestHeaderModifier"),
                    recast(modifier).unwrap_or_default(),
                )?;
            } else if let Some(modifier) = &filter.response_header_modifier {
                rules.response = self.header_modifier(
                    &format!("{at}.responseHeaderModifier"),
                    recast(modifier).unwrap_or_default(),
                )?;
            } else {
                return Err(unsupported(
                    format!("{at}.type"),
                    "a backendRef's filters may only modify headers in Ambit \
                     (RequestHeaderModifier, ResponseHeaderModifier)",
                ));
            }
        }
        Ok(rules)
    }

    fn header_modifier(
        &self,
        at: &str,
        modifier: HeaderModifier,
    ) -> Result<HeaderOps, GatewayProblem> {
        let ops = HeaderOperationsFile {
            set: modifier
                .set
                .into_iter()
                .map(|p| (p.name, p.value))
                .collect(),
            add: modifier
                .add
                .into_iter()
                .map(|p| (p.name, p.value))
                .collect(),
            remove: modifier.remove,
        };
        self.header_ops(at, &Some(ops)).map_err(from_config)
    }

    fn request_redirect(
        &self,
        at: &str,
        redirect: &HttpRouteRulesFiltersRequestRedirect,
    ) -> Result<Redirect, GatewayProblem> {
        if let Some(hostname) = &redirect.hostname {
            self.authority(&format!("{at}.hostname"), hostname)
                .map_err(from_config)?;
        }
        let port = match redirect.port {
            Some(port) => Some(
                self.port(format!("{at}.port"), i64::from(port))
                    .map_err(from_config)?,
            ),
            None => None,
        };
        let uri = match &redirect.path {
            None => None,
            Some(path) => match path.r#type {
                HttpRouteRulesFiltersRequestRedirectPathType::ReplaceFullPath => {
                    let value = path.replace_full_path.clone().unwrap_or_else(|| "/".into());
                    if !value.starts_with('/') || value.parse::<http::uri::PathAndQuery>().is_err()
                    {
                        return Err(unsupported(
                            format!("{at}.path.replaceFullPath"),
                            format!("{value:?} is not a path starting with /"),
                        ));
                    }
                    Some(value)
                }
                HttpRouteRulesFiltersRequestRedirectPathType::ReplacePrefixMatch => {
                    return Err(unsupported(
                        format!("{at}.path.type"),
                        "ReplacePrefixMatch is not supported in a redirect (use ReplaceFullPath)",
                    ));
                }
            },
        };
        let code = redirect.status_code.unwrap_or(302);
        let code = u16::try_from(code)
            .ok()
            .filter(|c| [301, 302, 303, 307, 308].contains(c))
            .ok_or_else(|| {
                unsupported(
                    format!("{at}.statusCode"),
                    format!("{code} is not one of 301, 302, 303, 307, 308"),
                )
            })?;
        Ok(Redirect {
            uri,
            authority: redirect.hostname.clone(),
            port,
            scheme: redirect.scheme.as_ref().map(|s| {
                match s {
                    HttpRouteRulesFiltersRequestRedirectScheme::Http => "http",
                    HttpRouteRulesFiltersRequestRedirectScheme::Https => "https",
                }
                .to_string()
            }),
            code,
        })
    }

    fn url_rewrite(
        &self,
        at: &str,
        rewrite: &HttpRouteRulesFiltersUrlRewrite,
    ) -> Result<Rewrite, GatewayProblem> {
        if let Some(hostname) = &rewrite.hostname {
            self.authority(&format!("{at}.hostname"), hostname)
                .map_err(from_config)?;
        }
        let (uri, full_path) = match &rewrite.path {
            None => (None, false),
            Some(path) => {
                let (key, value, full) = match path.r#type {
                    HttpRouteRulesFiltersUrlRewritePathType::ReplaceFullPath => {
                        ("replaceFullPath", path.replace_full_path.clone(), true)
                    }
                    HttpRouteRulesFiltersUrlRewritePathType::ReplacePrefixMatch => (
                        "replacePrefixMatch",
                        path.replace_prefix_match.clone(),
                        false,
                    ),
                };
                let value = value.unwrap_or_else(|| "/".into());
                if !value.starts_with('/') || value.parse::<http::uri::PathAndQuery>().is_err() {
                    return Err(unsupported(
                        format!("{at}.path.{key}"),
                        format!("{value:?} is not a path starting with /"),
                    ));
                }
                (Some(value), full)
            }
        };
        if uri.is_none() && rewrite.hostname.is_none() {
            return Err(unsupported(at, "set hostname or path"));
        }
        Ok(Rewrite {
            uri,
            authority: rewrite.hostname.clone(),
            full_path,
        })
    }

    fn request_mirror(
        &self,
        at: &str,
        mirror: &HttpRouteRulesFiltersRequestMirror,
        ctx: &mut RuleContext<'_, '_>,
    ) -> Result<Option<Mirror>, GatewayProblem> {
        let per_million = match (&mirror.percent, &mirror.fraction) {
            (Some(_), Some(_)) => {
                return Err(unsupported(at, "set percent or fraction, not both"));
            }
            (None, None) => 1_000_000,
            (Some(percent), None) => {
                if !(0..=100).contains(percent) {
                    return Err(unsupported(
                        format!("{at}.percent"),
                        format!("{percent} is not in 0..=100"),
                    ));
                }
                percent.unsigned_abs() * 10_000
            }
            (None, Some(fraction)) => {
                let denominator = fraction.denominator.unwrap_or(100);
                if denominator <= 0 || !(0..=denominator).contains(&fraction.numerator) {
                    return Err(unsupported(
                        format!("{at}.fraction"),
                        format!(
                            "{}/{denominator} is not a fraction from 0 to 1",
                            fraction.numerator
                        ),
                    ));
                }
                u32::try_from(
                    u64::from(fraction.numerator.unsigned_abs()) * 1_000_000
                        / u64::from(denominator.unsigned_abs()),
                )
                .unwrap_or(1_000_000)
            }
        };
        let reference = &mirror.backend_ref;
        let reference = BackendRef {
            group: reference.group.as_deref(),
            kind: reference.kind.as_deref(),
            name: &reference.name,
            namespace: reference.namespace.as_deref(),
            port: reference.port,
        };
        Ok(self
            .backend_ref(&format!("{at}.backendRef"), &reference, ctx)?
            .map(|destination| Mirror {
                destination,
                per_million,
            }))
    }

    /// Resolves a backendRef: `None` (the problem recorded in `ctx`) when it names no Service
    /// of the mesh Ambit may route to.
    fn backend_ref(
        &self,
        at: &str,
        reference: &BackendRef<'_>,
        ctx: &mut RuleContext<'_, '_>,
    ) -> Result<Option<RouteDestination>, GatewayProblem> {
        let group = reference.group.unwrap_or("");
        let kind = reference.kind.unwrap_or("Service");
        let problem = if !(group.is_empty() || group == "core") || kind != "Service" {
            Some(GatewayProblem {
                field: format!("{at}.kind"),
                reason: GatewayReason::InvalidKind,
                message: format!(
                    "{kind} of group {group:?} is not a backend Ambit routes to (a core Service)"
                ),
            })
        } else if reference.namespace.is_some_and(|ns| ns != ctx.namespace) {
            Some(GatewayProblem {
                field: format!("{at}.namespace"),
                reason: GatewayReason::RefNotPermitted,
                message: format!(
                    "{:?}: backends in another namespace need a ReferenceGrant, which Ambit does \
                     not support",
                    reference.namespace.unwrap_or_default()
                ),
            })
        } else {
            None
        };
        if let Some(problem) = problem {
            ctx.unresolved.push(problem);
            return Ok(None);
        }
        let Some(port) = reference.port else {
            return Err(unsupported(
                format!("{at}.port"),
                "required for a Service backend",
            ));
        };
        let port = self
            .port(format!("{at}.port"), i64::from(port))
            .map_err(from_config)?;
        let Some(service) = ctx.known.get(&(ctx.namespace, reference.name)) else {
            ctx.unresolved.push(GatewayProblem {
                field: format!("{at}.name"),
                reason: GatewayReason::BackendNotFound,
                message: format!(
                    "{}/{} is not a service of the mesh",
                    ctx.namespace, reference.name
                ),
            });
            return Ok(None);
        };
        if service.port(port).is_none() {
            ctx.unresolved.push(GatewayProblem {
                field: format!("{at}.port"),
                reason: GatewayReason::BackendNotFound,
                message: format!("service {} has no port {port}", service.uid()),
            });
            return Ok(None);
        }
        Ok(Some(RouteDestination {
            service: WaypointRef {
                namespace: service.namespace.clone(),
                name: service.name.clone(),
            },
            port: Some(port),
            subset: None,
            weight: 0,
            headers: HeaderRules::default(),
        }))
    }

    fn grpc_rules(
        &self,
        at: &str,
        rules: &[GrpcRouteRules],
        mut ctx: RuleContext<'_, '_>,
    ) -> Result<Vec<RankedRoute>, GatewayProblem> {
        let mut entries = Vec::new();
        for (r, rule) in rules.iter().enumerate() {
            let field = format!("{at}.spec.rules[{r}]");
            let matches = match rule.matches.as_deref() {
                None | Some([]) => vec![(HttpMatch::default(), [0, 0, 0, 0, 0])],
                Some(matches) => matches
                    .iter()
                    .enumerate()
                    .map(|(m, entry)| self.grpc_match(&format!("{field}.matches[{m}]"), entry))
                    .collect::<Result<_, _>>()?,
            };
            let filters: Vec<HttpRouteRulesFilters> = rule
                .filters
                .as_ref()
                .map(|f| recast(f).unwrap_or_default())
                .unwrap_or_default();
            let backends: Vec<HttpRouteRulesBackendRefs> = rule
                .backend_refs
                .as_ref()
                .map(|b| recast(b).unwrap_or_default())
                .unwrap_or_default();
            let mut template = self.rule_actions(&field, &filters, &backends, &mut ctx)?;
            template.name = Some(rule.name.clone().unwrap_or_else(|| format!("rules[{r}]")));
            for (m, (matched, rank)) in matches.into_iter().enumerate() {
                entries.push(RankedRoute {
                    rank,
                    rule: r,
                    matched: m,
                    route: HttpRoute {
                        matches: vec![matched],
                        ..template.clone()
                    },
                });
            }
        }
        Ok(entries)
    }

    /// One GRPCRoute match and its rank: more characters of service, then of method, then
    /// more headers first.
    fn grpc_match(
        &self,
        field: &str,
        entry: &GrpcRouteRulesMatches,
    ) -> Result<(HttpMatch, [i64; 5]), GatewayProblem> {
        let headers: Vec<HttpRouteRulesMatchesHeaders> = entry
            .headers
            .as_ref()
            .map(|h| recast(h).unwrap_or_default())
            .unwrap_or_default();
        let headers = self.gateway_headers(&format!("{field}.headers"), &headers)?;
        let mut matched = HttpMatch::default();
        let (mut service_len, mut method_len) = (0, 0);
        if let Some(method) = &entry.method {
            let at = format!("{field}.method");
            let (service, name) = (method.service.as_deref(), method.method.as_deref());
            if service.is_none() && name.is_none() {
                return Err(unsupported(at, "set service, method or both"));
            }
            service_len = service.map_or(0, str::len);
            method_len = name.map_or(0, str::len);
            matched = match method.r#type {
                Some(GrpcRouteRulesMatchesMethodType::RegularExpression) => {
                    for (key, value) in [("service", service), ("method", name)] {
                        if let Some(value) = value {
                            self.gateway_regex(&format!("{at}.{key}"), value)?;
                        }
                    }
                    let path = format!(
                        "/(?:{})/(?:{})",
                        service.unwrap_or("[^/]+"),
                        name.unwrap_or("[^/]+")
                    );
                    HttpMatch {
                        uri: Some(self.gateway_regex(&at, &path)?),
                        ..HttpMatch::default()
                    }
                }
                _ => {
                    for (key, value) in [("service", service), ("method", name)] {
                        if let Some(value) = value
                            && (value.is_empty() || value.contains('/'))
                        {
                            return Err(unsupported(
                                format!("{at}.{key}"),
                                format!("{value:?} is not a gRPC {key} name"),
                            ));
                        }
                    }
                    HttpMatch::grpc(service, name).map_err(|e| unsupported(&at, e.to_string()))?
                }
            };
        }
        let rank = [
            -i64::try_from(service_len).unwrap_or(0),
            -i64::try_from(method_len).unwrap_or(0),
            -i64::try_from(headers.len()).unwrap_or(0),
            0,
            0,
        ];
        matched.headers = headers;
        Ok((matched, rank))
    }
}

enum Rules {
    Http(Vec<HttpRouteRules>),
    Grpc(Vec<GrpcRouteRules>),
}

/// What every rule of a route shares while converted.
struct RuleContext<'a, 's> {
    namespace: &'a str,
    known: &'a KnownServices<'s>,
    unresolved: &'a mut Vec<GatewayProblem>,
}

/// A backendRef or a mirror's, whichever type the crate gives it.
struct BackendRef<'a> {
    group: Option<&'a str>,
    kind: Option<&'a str>,
    name: &'a str,
    namespace: Option<&'a str>,
    port: Option<i32>,
}

/// The routes of each Service from `routes`, given in the order of precedence between route
/// resources (the Gateway API's: the oldest first, then by `namespace/name`).
///
/// Within a Service, the Gateway API's precedence orders the routes: gRPC routes before HTTP
/// ones; among HTTP routes an exact path first, then a regular expression (implementation
/// specific in the spec; Istio's order), then the longest prefix, then a method match, then
/// more header matches, then more query parameter matches; among gRPC routes more characters
/// of service, then of method, then more header matches. Ties keep the order of the route
/// resources, then of the rules, then of the matches.
pub(crate) fn merge(routes: &[&CheckedGatewayRoute]) -> BTreeMap<String, ServiceRoutes> {
    type Key = (GatewayKind, [i64; 5], usize, usize, usize);
    type Ranked = (Vec<String>, Vec<(Key, HttpRoute)>);
    let mut by_service: BTreeMap<String, Ranked> = BTreeMap::new();
    for (order, resource) in routes.iter().enumerate() {
        let label = format!("{} {}/{}", resource.kind, resource.namespace, resource.name);
        for parent in &resource.parents {
            let Ok((uid, port)) = &parent.bound else {
                continue;
            };
            let (sources, entries) = by_service.entry(uid.clone()).or_default();
            if !sources.contains(&label) {
                sources.push(label.clone());
            }
            for entry in &resource.entries {
                let mut route = entry.route.clone();
                for m in &mut route.matches {
                    m.port = *port;
                }
                route.name = route.name.map(|name| format!("{label} {name}"));
                entries.push((
                    (resource.kind, entry.rank, order, entry.rule, entry.matched),
                    route,
                ));
            }
        }
    }
    by_service
        .into_iter()
        .map(|(uid, (sources, mut entries))| {
            entries.sort_by_key(|(key, _)| *key);
            let routes = ServiceRoutes {
                source: sources.join(", "),
                http: entries.into_iter().map(|(_, route)| route).collect(),
            };
            (uid, routes)
        })
        .collect()
}

impl Validator<'_> {
    /// Checks the mesh file's `httpRoutes` and `grpcRoutes` (any problem is the file's error)
    /// and returns the routes of each Service they bind.
    pub(super) fn gateway_routes(
        &self,
        http_routes: &[GatewayRouteFile],
        grpc_routes: &[GatewayRouteFile],
        known: &KnownServices<'_>,
    ) -> Result<BTreeMap<String, ServiceRoutes>, ConfigError> {
        let mut checked = Vec::new();
        let mut names = HashSet::new();
        for (list, kind, entries) in [
            ("httpRoutes", GatewayKind::HttpRoute, http_routes),
            ("grpcRoutes", GatewayKind::GrpcRoute, grpc_routes),
        ] {
            for (i, entry) in entries.iter().enumerate() {
                let at = format!("{list}[{i}]");
                if entry.api_version != GATEWAY_API_VERSION {
                    return Err(self.invalid(
                        format!("{at}.apiVersion"),
                        format!("{:?} is not {GATEWAY_API_VERSION:?}", entry.api_version),
                    ));
                }
                if entry.kind != kind.name() {
                    return Err(self.invalid(
                        format!("{at}.kind"),
                        format!("{:?} is not {:?}", entry.kind, kind.name()),
                    ));
                }
                let namespace = self.meta(&at, &entry.metadata)?;
                if !names.insert((kind, namespace, entry.metadata.name.as_str())) {
                    return Err(self.invalid(
                        format!("{at}.metadata.name"),
                        format!(
                            "{kind} {namespace}/{} is defined twice",
                            entry.metadata.name
                        ),
                    ));
                }
                let route = self
                    .gateway_route(
                        &at,
                        kind,
                        namespace,
                        &entry.metadata.name,
                        &entry.spec,
                        known,
                    )
                    .map_err(|p| self.invalid(p.field, p.message))?;
                if route.parents.is_empty() {
                    return Err(self.invalid(
                        format!("{at}.spec.parentRefs"),
                        "names no Service: a mesh route's parentRefs are Services (group \"\", \
                         kind Service)",
                    ));
                }
                for parent in &route.parents {
                    if let Err(p) = &parent.bound {
                        return Err(self.invalid(p.field.clone(), p.message.clone()));
                    }
                }
                if let Some(p) = route.unresolved.first() {
                    return Err(self.invalid(p.field.clone(), p.message.clone()));
                }
                checked.push(route);
            }
        }
        // The file's order is the routes' age: the first written is the oldest.
        Ok(merge(&checked.iter().collect::<Vec<_>>()))
    }
}

#[cfg(test)]
mod tests;
