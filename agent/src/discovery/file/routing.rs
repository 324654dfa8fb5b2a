//! The mesh file's routing sections: `virtualServices` and `destinationRules`.
//!
//! Each entry is a whole Istio object (`apiVersion`, `kind`, `metadata`, `spec`) in Ambit's API
//! group `networking.ambit.dev/v1`, field for field Istio's `networking.istio.io/v1`, so that
//! Istio YAML ports by changing only `apiVersion`. Only the fields the waypoint implements are
//! accepted (the resilience fields `timeout`, `retries`, `mirror`, `fault`... are read by
//! [`super::resilience`]): any other (`corsPolicy`, `trafficPolicy`...) is rejected with its
//! path, never ignored, since a route silently missing a field would be a different route.
//! The result is the state's route model ([`crate::state::routes`]).
use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::{
    ConfigError, HttpFaultInjectionFile, HttpMirrorPolicyFile, HttpRetryFile, PercentFile,
    Validator, resilience::ResilienceFields,
};
use crate::{
    serdes::null_as_default,
    state::{
        Service, WaypointRef,
        routes::{
            FullRegex, HeaderMatch, HttpMatch, HttpRoute, RouteDestination, RouteTable,
            ServiceRoutes, StringMatch, Subset,
        },
    },
};

/// The API version routing resources must carry.
pub const ROUTING_API_VERSION: &str = "networking.ambit.dev/v1";

/// An object's `metadata`: the fields routing reads (labels and annotations are accepted and
/// not used).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMetaFile {
    /// Name, unique per kind within the namespace.
    pub name: String,
    /// Namespace (default `default`, as kubectl's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels (not used).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations (not used).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// One entry of `virtualServices`: an Istio VirtualService.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualServiceFile {
    /// Must be [`ROUTING_API_VERSION`].
    pub api_version: String,
    /// Must be `VirtualService`.
    pub kind: String,
    /// Name and namespace.
    pub metadata: ObjectMetaFile,
    /// Istio's `VirtualService` spec (the supported fields).
    pub spec: VirtualServiceSpecFile,
}

/// A VirtualService's `spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualServiceSpecFile {
    /// The services it routes, by short name (the VirtualService's namespace) or FQDN.
    pub hosts: Vec<String>,
    /// HTTP routes, first match wins.
    #[serde(default, deserialize_with = "null_as_default")]
    pub http: Vec<HttpRouteFile>,
}

/// One entry of `spec.http`: Istio's `HTTPRoute`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteFile {
    /// The route's name (for logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Conditions, any one of which must hold (absent or empty: all requests).
    #[serde(
        rename = "match",
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub matches: Vec<HttpMatchRequestFile>,
    /// Weighted destinations.
    #[serde(default, deserialize_with = "null_as_default")]
    pub route: Vec<HttpRouteDestinationFile>,

    // Resilience (timeouts, retries, mirrors, faults): `super::resilience`.
    /// The whole request's timeout, e.g. `10s` (default: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Retries (absent: Istio's default policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<HttpRetryFile>,
    /// One destination copies of the requests go to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<DestinationFile>,
    /// Share of the requests `mirror` gets (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_percentage: Option<PercentFile>,
    /// Several mirrors, each with its percentage.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub mirrors: Vec<HttpMirrorPolicyFile>,
    /// Faults injected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<HttpFaultInjectionFile>,
}

/// One entry of `match`: Istio's `HTTPMatchRequest`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatchRequestFile {
    /// The match's name (for logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// On the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<StringMatchFile>,
    /// On headers, by lower-case name; an empty match (`{}`) requires presence only.
    #[serde(default, deserialize_with = "null_as_default")]
    pub headers: BTreeMap<String, StringMatchFile>,
}

/// Istio's `StringMatch`: exactly one field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StringMatchFile {
    /// Equal to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// Starting with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Matching (whole string) the RE2-style expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// One entry of `route`: Istio's `HTTPRouteDestination`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteDestinationFile {
    /// Where.
    pub destination: DestinationFile,
    /// Relative share (absent: 0, or all of it when it is the route's only destination).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,
}

/// Istio's `Destination`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationFile {
    /// A service, by short name or FQDN.
    pub host: String,
    /// A subset defined by a DestinationRule of that host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// The service port (absent: the port the client dialled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortSelectorFile>,
}

/// Istio's `PortSelector`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSelectorFile {
    /// The port number.
    pub number: i64,
}

/// One entry of `destinationRules`: an Istio DestinationRule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRuleFile {
    /// Must be [`ROUTING_API_VERSION`].
    pub api_version: String,
    /// Must be `DestinationRule`.
    pub kind: String,
    /// Name and namespace.
    pub metadata: ObjectMetaFile,
    /// Istio's `DestinationRule` spec (the supported fields).
    pub spec: DestinationRuleSpecFile,
}

/// A DestinationRule's `spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRuleSpecFile {
    /// The service, by short name or FQDN.
    pub host: String,
    /// Named subsets of its endpoints.
    #[serde(default, deserialize_with = "null_as_default")]
    pub subsets: Vec<SubsetFile>,
}

/// Istio's `Subset`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubsetFile {
    /// Its name, unique in the rule.
    pub name: String,
    /// Labels an endpoint must carry.
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: BTreeMap<String, String>,
}

/// The DNS suffix of services (`<name>.<namespace>.svc.cluster.local`).
const SERVICE_SUFFIX: &str = ".svc.cluster.local";

impl Validator<'_> {
    /// Checks the routing sections against the services and builds the route table.
    pub(super) fn routes(
        &self,
        virtual_services: &[VirtualServiceFile],
        destination_rules: &[DestinationRuleFile],
        services: &[Service],
    ) -> Result<RouteTable, ConfigError> {
        let known: HashMap<(&str, &str), &Service> = services
            .iter()
            .map(|s| ((s.namespace.as_str(), s.name.as_str()), s))
            .collect();
        // Subsets by service uid, then by name.
        let mut subsets: HashMap<String, BTreeMap<String, Subset>> = HashMap::new();
        let mut rule_of: HashMap<String, usize> = HashMap::new();
        for (i, rule) in destination_rules.iter().enumerate() {
            let at = format!("destinationRules[{i}]");
            self.header(&at, &rule.api_version, &rule.kind, "DestinationRule")?;
            let namespace = self.meta(&at, &rule.metadata)?;
            let service = self.host(
                &format!("{at}.spec.host"),
                &rule.spec.host,
                namespace,
                &known,
            )?;
            let uid = service.uid();
            if let Some(first) = rule_of.insert(uid.clone(), i) {
                return Err(self.invalid(
                    format!("{at}.spec.host"),
                    format!(
                        "service {uid} already has destinationRules[{first}] (one rule per host)"
                    ),
                ));
            }
            let mut named = BTreeMap::new();
            for (k, subset) in rule.spec.subsets.iter().enumerate() {
                let field = format!("{at}.spec.subsets[{k}]");
                self.non_empty(format!("{field}.name"), &subset.name)?;
                if subset.labels.is_empty() {
                    return Err(self.invalid(
                        format!("{field}.labels"),
                        "must name at least one label (a subset without labels is the whole \
                         service)",
                    ));
                }
                let entry = Subset {
                    name: subset.name.clone(),
                    labels: subset.labels.clone(),
                };
                if named.insert(subset.name.clone(), entry).is_some() {
                    return Err(self.invalid(
                        format!("{field}.name"),
                        format!("subset {:?} is defined twice", subset.name),
                    ));
                }
            }
            subsets.insert(uid, named);
        }

        let mut table = RouteTable::default();
        let mut vs_of: HashMap<String, usize> = HashMap::new();
        for (i, vs) in virtual_services.iter().enumerate() {
            let at = format!("virtualServices[{i}]");
            self.header(&at, &vs.api_version, &vs.kind, "VirtualService")?;
            let namespace = self.meta(&at, &vs.metadata)?;
            if vs.spec.hosts.is_empty() {
                return Err(self.invalid(format!("{at}.spec.hosts"), "must not be empty"));
            }
            if vs.spec.http.is_empty() {
                return Err(self.invalid(format!("{at}.spec.http"), "must not be empty"));
            }
            let mut http = Vec::with_capacity(vs.spec.http.len());
            for (r, route) in vs.spec.http.iter().enumerate() {
                let field = format!("{at}.spec.http[{r}]");
                http.push(self.http_route(&field, route, namespace, &known, &subsets)?);
            }
            let source = format!("VirtualService {namespace}/{}", vs.metadata.name);
            for (h, host) in vs.spec.hosts.iter().enumerate() {
                let field = format!("{at}.spec.hosts[{h}]");
                let service = self.host(&field, host, namespace, &known)?;
                let uid = service.uid();
                if let Some(first) = vs_of.insert(uid.clone(), i) {
                    return Err(self.invalid(
                        field,
                        format!(
                            "service {uid} is already routed by virtualServices[{first}] (Ambit \
                             does not merge VirtualServices of one host)"
                        ),
                    ));
                }
                table.by_service.insert(
                    uid,
                    ServiceRoutes {
                        source: source.clone(),
                        http: http.clone(),
                    },
                );
            }
        }
        Ok(table)
    }

    /// Checks `apiVersion` and `kind`.
    fn header(
        &self,
        at: &str,
        api_version: &str,
        kind: &str,
        expected: &str,
    ) -> Result<(), ConfigError> {
        if api_version != ROUTING_API_VERSION {
            return Err(self.invalid(
                format!("{at}.apiVersion"),
                format!(
                    "{api_version:?} is not {ROUTING_API_VERSION:?} (Ambit's group for \
                     Istio-shaped routing: change only the apiVersion of an Istio object)"
                ),
            ));
        }
        if kind != expected {
            return Err(self.invalid(
                format!("{at}.kind"),
                format!("{kind:?} is not {expected:?}"),
            ));
        }
        Ok(())
    }

    /// The object's namespace, after checking its metadata.
    fn meta<'m>(&self, at: &str, meta: &'m ObjectMetaFile) -> Result<&'m str, ConfigError> {
        self.non_empty(format!("{at}.metadata.name"), &meta.name)?;
        match meta.namespace.as_deref() {
            Some(namespace) => {
                self.non_empty(format!("{at}.metadata.namespace"), namespace)?;
                Ok(namespace)
            }
            None => Ok("default"),
        }
    }

    /// Resolves a host (short name in `namespace`, `name.namespace`, or the FQDN) to a service
    /// of the file.
    fn host<'s>(
        &self,
        field: &str,
        host: &str,
        namespace: &str,
        known: &HashMap<(&str, &str), &'s Service>,
    ) -> Result<&'s Service, ConfigError> {
        let name = host.strip_suffix(SERVICE_SUFFIX).unwrap_or(host);
        let (name, ns) = match name.split_once('.') {
            Some((name, ns)) if !ns.contains('.') => (name, ns),
            Some(_) => ("", ""),
            None => (name, namespace),
        };
        known.get(&(ns, name)).copied().ok_or_else(|| {
            self.invalid(
                field,
                format!(
                    "{host:?} is not a service of this file (hosts are services, by short \
                     name, name.namespace or FQDN; wildcards and external hosts are not \
                     supported)"
                ),
            )
        })
    }

    fn http_route(
        &self,
        at: &str,
        route: &HttpRouteFile,
        namespace: &str,
        known: &HashMap<(&str, &str), &Service>,
        subsets: &HashMap<String, BTreeMap<String, Subset>>,
    ) -> Result<HttpRoute, ConfigError> {
        let mut matches = Vec::with_capacity(route.matches.len());
        for (m, entry) in route.matches.iter().enumerate() {
            let field = format!("{at}.match[{m}]");
            let uri = match &entry.uri {
                Some(uri) => Some(
                    self.string_match(&format!("{field}.uri"), uri)?
                        .ok_or_else(|| {
                            self.invalid(
                                format!("{field}.uri"),
                                "one of exact, prefix, regex must be set",
                            )
                        })?,
                ),
                None => None,
            };
            let mut headers = Vec::with_capacity(entry.headers.len());
            for (name, value) in &entry.headers {
                let header_field = format!("{field}.headers.{name}");
                if name.is_empty()
                    || name.chars().any(|c| c.is_ascii_uppercase())
                    || http::HeaderName::from_bytes(name.as_bytes()).is_err()
                {
                    return Err(self.invalid(
                        header_field,
                        format!("{name:?} is not a lower-case HTTP header name"),
                    ));
                }
                headers.push(HeaderMatch {
                    name: name.clone(),
                    value: self.string_match(&header_field, value)?,
                });
            }
            matches.push(HttpMatch { uri, headers });
        }
        if route.route.is_empty() {
            return Err(self.invalid(
                format!("{at}.route"),
                "must name at least one destination (redirects and direct responses are not \
                 supported yet)",
            ));
        }
        let only = route.route.len() == 1;
        let mut destinations = Vec::with_capacity(route.route.len());
        for (d, entry) in route.route.iter().enumerate() {
            let field = format!("{at}.route[{d}]");
            let destination = self.destination(
                &format!("{field}.destination"),
                &entry.destination,
                namespace,
                known,
                subsets,
            )?;
            let weight = match entry.weight {
                None if only => 100,
                None => 0,
                Some(w) => u32::try_from(w).map_err(|_| {
                    self.invalid(format!("{field}.weight"), format!("{w} is negative"))
                })?,
            };
            destinations.push(RouteDestination {
                weight,
                ..destination
            });
        }
        if destinations.iter().all(|d| d.weight == 0) {
            return Err(self.invalid(
                format!("{at}.route"),
                "the weights are all 0: no destination would get any request",
            ));
        }
        let resilience = self.resilience(
            at,
            ResilienceFields {
                timeout: route.timeout.as_deref(),
                retries: route.retries.as_ref(),
                mirror: route.mirror.as_ref(),
                mirror_percentage: route.mirror_percentage.as_ref(),
                mirrors: &route.mirrors,
                fault: route.fault.as_ref(),
            },
            namespace,
            known,
            subsets,
        )?;
        Ok(HttpRoute {
            name: route.name.clone(),
            matches,
            destinations,
            resilience,
        })
    }

    /// Resolves a `Destination` at `field` (its host, port and subset); its weight is 0.
    pub(super) fn destination(
        &self,
        field: &str,
        destination: &DestinationFile,
        namespace: &str,
        known: &HashMap<(&str, &str), &Service>,
        subsets: &HashMap<String, BTreeMap<String, Subset>>,
    ) -> Result<RouteDestination, ConfigError> {
        let service = self.host(
            &format!("{field}.host"),
            &destination.host,
            namespace,
            known,
        )?;
        let port = match &destination.port {
            Some(port) => {
                let number = self.port(format!("{field}.port.number"), port.number)?;
                if service.port(number).is_none() {
                    return Err(self.invalid(
                        format!("{field}.port.number"),
                        format!("service {} has no port {number}", service.uid()),
                    ));
                }
                Some(number)
            }
            None => None,
        };
        let subset = match &destination.subset {
            Some(name) => Some(
                subsets
                    .get(&service.uid())
                    .and_then(|named| named.get(name))
                    .cloned()
                    .ok_or_else(|| {
                        self.invalid(
                            format!("{field}.subset"),
                            format!(
                                "subset {name:?} is not defined by a DestinationRule of service {}",
                                service.uid()
                            ),
                        )
                    })?,
            ),
            None => None,
        };
        Ok(RouteDestination {
            service: WaypointRef {
                namespace: service.namespace.clone(),
                name: service.name.clone(),
            },
            port,
            subset,
            weight: 0,
        })
    }

    /// A `StringMatch`: `None` when empty (for headers: presence).
    fn string_match(
        &self,
        field: &str,
        value: &StringMatchFile,
    ) -> Result<Option<StringMatch>, ConfigError> {
        match (&value.exact, &value.prefix, &value.regex) {
            (None, None, None) => Ok(None),
            (Some(exact), None, None) => Ok(Some(StringMatch::Exact(exact.clone()))),
            (None, Some(prefix), None) => Ok(Some(StringMatch::Prefix(prefix.clone()))),
            (None, None, Some(regex)) => FullRegex::new(regex)
                .map(|r| Some(StringMatch::Regex(r)))
                .map_err(|e| {
                    self.invalid(
                        format!("{field}.regex"),
                        format!("invalid regular expression {regex:?}: {e}"),
                    )
                }),
            _ => Err(self.invalid(field, "set only one of exact, prefix, regex")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::{
        discovery::parse_mesh,
        state::routes::{StringMatch, Subset},
    };

    const MESH: &str = r#"
workloads:
- {name: client, namespace: default, node: n0, ips: [10.10.0.2], netns: {pid: 1}}
- {name: reviews-v1, namespace: default, node: n0, ips: [10.10.0.3], labels: {app: reviews, version: v1}, netns: {pid: 1}}
- {name: reviews-v2, namespace: default, node: n0, ips: [10.10.0.4], labels: {app: reviews, version: v2}, netns: {pid: 1}}
services:
- {name: reviews, namespace: default, vips: [10.96.0.10], selector: {app: reviews}, ports: [{port: 9080}], waypoint: {name: waypoint}}
- {name: waypoint, namespace: default, vips: [10.96.0.11], selector: {app: waypoint}, ports: [{port: 15008}]}
"#;

    /// The seed's canary example, unchanged but for `apiVersion` (and the YAML list around it).
    const SEED_VS: &str = r#"
virtualServices:
- apiVersion: networking.ambit.dev/v1
  kind: VirtualService
  metadata:
    name: reviews-canary
  spec:
    hosts:
    - reviews
    http:
    - match:
      - headers:
          end-user:
            exact: jason
      route:
      - destination:
          host: reviews
          subset: v2
    - route:
      - destination:
          host: reviews
          subset: v1
        weight: 90
      - destination:
          host: reviews
          subset: v2
        weight: 10
"#;

    const DR: &str = r#"
destinationRules:
- apiVersion: networking.ambit.dev/v1
  kind: DestinationRule
  metadata: {name: reviews}
  spec:
    host: reviews
    subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
"#;

    fn parse(extra: &str) -> Result<crate::state::MeshState, String> {
        let text = format!("{MESH}{extra}");
        parse_mesh(Path::new("/etc/mesh.yaml"), text.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn the_seed_canary_parses_after_changing_only_api_version() {
        let state = parse(&format!("{SEED_VS}{DR}")).unwrap();
        let routes = state.routes().for_service("default/reviews").unwrap();
        assert_eq!(routes.source, "VirtualService default/reviews-canary");
        assert_eq!(routes.http.len(), 2);
        let jason = &routes.http[0];
        assert_eq!(jason.matches[0].headers[0].name, "end-user");
        assert_eq!(
            jason.matches[0].headers[0].value,
            Some(StringMatch::Exact("jason".into()))
        );
        assert_eq!(jason.destinations.len(), 1);
        assert_eq!(jason.destinations[0].weight, 100);
        let split: Vec<(String, u32)> = routes.http[1]
            .destinations
            .iter()
            .map(|d| (d.subset.as_ref().unwrap().name.clone(), d.weight))
            .collect();
        assert_eq!(split, [("v1".to_string(), 90), ("v2".to_string(), 10)]);
        assert_eq!(
            routes.http[1].destinations[1].subset,
            Some(Subset {
                name: "v2".into(),
                labels: [("version".to_string(), "v2".to_string())].into()
            })
        );

        // As written for Istio, it is refused with the field and what to change.
        let istio = SEED_VS.replace("networking.ambit.dev/v1", "networking.istio.io/v1beta1");
        let err = parse(&format!("{istio}{DR}")).unwrap_err();
        assert!(
            err.contains("virtualServices[0].apiVersion")
                && err.contains("networking.istio.io/v1beta1")
                && err.contains("networking.ambit.dev/v1"),
            "{err}"
        );
    }

    #[test]
    fn unsupported_fields_are_rejected_by_path_never_ignored() {
        let retries = SEED_VS.replace(
            "    - route:\n",
            "    - corsPolicy: {allowOrigins: [{exact: x}]}\n      route:\n",
        );
        let err = parse(&format!("{retries}{DR}")).unwrap_err();
        assert!(
            err.contains("mesh file /etc/mesh.yaml")
                && err.contains("virtualServices[0].spec.http[1]")
                && err.contains("unknown field `corsPolicy`"),
            "{err}"
        );
        let policy = DR.replace(
            "    host: reviews\n",
            "    host: reviews\n    trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}\n",
        );
        let err = parse(&format!("{SEED_VS}{policy}")).unwrap_err();
        assert!(
            err.contains("destinationRules[0].spec")
                && err.contains("unknown field `trafficPolicy`"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            // A subset no DestinationRule defines.
            (
                SEED_VS.replace("subset: v1", "subset: v3"),
                DR.to_string(),
                "virtualServices[0].spec.http[1].route[0].destination.subset",
            ),
            // A host that is not a service.
            (
                SEED_VS.replace(
                    "host: reviews\n          subset: v1",
                    "host: ratings\n          subset: v1",
                ),
                DR.to_string(),
                "virtualServices[0].spec.http[1].route[0].destination.host",
            ),
            // A negative weight.
            (
                SEED_VS.replace("weight: 90", "weight: -1"),
                DR.to_string(),
                "virtualServices[0].spec.http[1].route[0].weight",
            ),
            // An invalid regex.
            (
                SEED_VS.replace("exact: jason", "regex: \"(\""),
                DR.to_string(),
                "virtualServices[0].spec.http[0].match[0].headers.end-user.regex",
            ),
            // Two kinds of match at once.
            (
                SEED_VS.replace("exact: jason", "{exact: jason, prefix: j}"),
                DR.to_string(),
                "virtualServices[0].spec.http[0].match[0].headers.end-user",
            ),
            // An upper-case header name.
            (
                SEED_VS.replace("end-user:", "End-User:"),
                DR.to_string(),
                "virtualServices[0].spec.http[0].match[0].headers.End-User",
            ),
            // A port the service does not have.
            (
                SEED_VS.replace(
                    "subset: v2\n    - route",
                    "subset: v2\n          port: {number: 80}\n    - route",
                ),
                DR.to_string(),
                "virtualServices[0].spec.http[0].route[0].destination.port.number",
            ),
            // The wrong kind.
            (
                SEED_VS.replace("kind: VirtualService", "kind: DestinationRule"),
                DR.to_string(),
                "virtualServices[0].kind",
            ),
            // All weights zero.
            (
                SEED_VS
                    .replace("weight: 90", "weight: 0")
                    .replace("weight: 10", "weight: 0"),
                DR.to_string(),
                "virtualServices[0].spec.http[1].route",
            ),
        ];
        for (vs, dr, field) in cases {
            let err = parse(&format!("{vs}{dr}")).unwrap_err();
            assert!(err.contains(&format!("{field}:")), "{field}: {err}");
        }
    }

    #[test]
    fn hosts_resolve_by_short_name_namespace_or_fqdn_and_one_virtual_service_per_host() {
        for host in [
            "reviews",
            "reviews.default",
            "reviews.default.svc.cluster.local",
        ] {
            let vs = SEED_VS.replace(
                "    hosts:\n    - reviews",
                &format!("    hosts:\n    - {host}"),
            );
            let state = parse(&format!("{vs}{DR}")).unwrap();
            assert!(
                state.routes().for_service("default/reviews").is_some(),
                "{host}"
            );
        }
        let twice = format!(
            "{SEED_VS}{}",
            SEED_VS
                .replace("virtualServices:\n", "")
                .replace("reviews-canary", "again")
        );
        let err = parse(&format!("{twice}{DR}")).unwrap_err();
        assert!(
            err.contains("virtualServices[1].spec.hosts[0]") && err.contains("virtualServices[0]"),
            "{err}"
        );
    }
}
