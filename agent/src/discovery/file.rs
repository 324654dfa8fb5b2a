//! The standalone configuration source: a YAML mesh file, validated and hot-reloaded.
//!
//! The format is specified in `docs/configuration.md`; the structs below mirror it one to one.
use std::{
    collections::{BTreeMap, HashMap, hash_map::Entry},
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;
use notify::{
    EventKind, RecursiveMode, Watcher as _,
    event::{AccessKind, AccessMode},
};
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{mpsc, watch},
    time::{Instant, MissedTickBehavior},
};

use super::ConfigStatus;
use crate::{
    netns::NetnsRef,
    policy::{PolicySet, l7::WaypointPolicies},
    serdes::null_as_default,
    state::{
        CaptureExclusions, EndpointAddress, MeshState, RedirectSettings, Service, ServicePort,
        WaypointRef, Workload,
    },
};

mod gateway_routes;
mod l7;
mod rate_limit;
mod resilience;
mod routing;
mod security;
mod traffic_policy;

pub use self::gateway_routes::{
    CheckedGatewayRoute, GATEWAY_API_VERSION, GatewayKind, GatewayProblem, GatewayReason,
    GatewayRouteFile, ParentOutcome,
};
pub(crate) use self::gateway_routes::{gateway_route, merge as merge_gateway_routes};
pub use self::l7::{
    ClaimToHeaderFile, JwtHeaderFile, JwtRuleFile, L7_CONDITION_KEYS, MAX_JWKS_BYTES,
    RequestAuthenticationFile, parse_jwks, refused_jwks_address, request_authentication,
    target_refs, waypoint_policy,
};
pub use self::rate_limit::{
    RateLimitPolicyFile, RateLimitPolicySpecFile, RateLimitTargetRefFile, TokenBucketFile,
};
pub(crate) use self::rate_limit::{attach as attach_rate_limit, rate_limit_policy};
pub use self::resilience::{
    FaultAbortFile, FaultDelayFile, GrpcStatusFile, HttpFaultInjectionFile, HttpMirrorPolicyFile,
    HttpRetryFile, PercentFile,
};
pub use self::routing::{
    DestinationFile, DestinationRuleFile, DestinationRuleSpecFile, HttpMatchRequestFile,
    HttpRouteDestinationFile, HttpRouteFile, ObjectMetaFile, PortSelectorFile, ROUTING_API_VERSION,
    StringMatchFile, SubsetFile, VirtualServiceFile, VirtualServiceSpecFile,
};
pub(crate) use self::routing::{
    SubsetsByService, destination_rule, known_services, virtual_service,
};
pub use self::security::{
    AuthorizationPolicyFile, CONDITION_KEYS, ConditionFile, FromFile, OperationFile,
    PeerAuthenticationFile, PolicyError, RuleFile, SelectorFile, SourceFile, TargetRefFile, ToFile,
    authorization_policy, peer_auth_mode, workload_selector,
};
pub use self::traffic_policy::{
    ConnectionPoolFile, HttpSettingsFile, OutlierDetectionFile, TcpSettingsFile,
};

/// The whole mesh file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshFile {
    /// Node-wide redirection settings (optional).
    #[serde(default, deserialize_with = "null_as_default")]
    pub redirect: RedirectFile,
    /// The workloads of the mesh.
    #[serde(default, deserialize_with = "null_as_default")]
    pub workloads: Vec<WorkloadFile>,
    /// The services of the mesh.
    #[serde(default, deserialize_with = "null_as_default")]
    pub services: Vec<ServiceFile>,
    /// The trust domain of the mesh's identities (default `cluster.local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
    /// Which workloads accept plaintext.
    #[serde(default, deserialize_with = "null_as_default")]
    pub peer_authentications: Vec<PeerAuthenticationFile>,
    /// Authorization policies: L4 for the node agents, or attached to waypoints
    /// (`targetRefs`) with L7 fields.
    #[serde(default, deserialize_with = "null_as_default")]
    pub authorization_policies: Vec<AuthorizationPolicyFile>,
    /// JWT authentication at waypoints (Istio's RequestAuthentication).
    #[serde(default, deserialize_with = "null_as_default")]
    pub request_authentications: Vec<RequestAuthenticationFile>,
    /// HTTP routing for waypoints: Istio VirtualServices in `networking.ambit.dev/v1`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub virtual_services: Vec<VirtualServiceFile>,
    /// Subsets for waypoints' routes: Istio DestinationRules in `networking.ambit.dev/v1`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub destination_rules: Vec<DestinationRuleFile>,
    /// HTTP routing for waypoints: Gateway API HTTPRoutes whose parents are Services (GAMMA).
    #[serde(default, deserialize_with = "null_as_default")]
    pub http_routes: Vec<GatewayRouteFile>,
    /// gRPC routing for waypoints: Gateway API GRPCRoutes whose parents are Services (GAMMA).
    #[serde(default, deserialize_with = "null_as_default")]
    pub grpc_routes: Vec<GatewayRouteFile>,
    /// Local rate limits at waypoints: Ambit's RateLimitPolicy (`networking.ambit.dev/v1`).
    #[serde(default, deserialize_with = "null_as_default")]
    pub rate_limit_policies: Vec<RateLimitPolicyFile>,
}

/// The `redirect` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedirectFile {
    /// Destination ports never redirected. Wider than `u16` so that an out-of-range port is
    /// reported by validation, with the rule, rather than as a bare type error.
    #[serde(default, deserialize_with = "null_as_default")]
    pub exclude_outbound_ports: Vec<i64>,
    /// Destination networks never redirected, as CIDR strings.
    #[serde(default, deserialize_with = "null_as_default")]
    pub exclude_outbound_cidrs: Vec<String>,
}

/// One entry of `workloads`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadFile {
    /// Name, unique within the namespace.
    pub name: String,
    /// The workload this pod is one instance of (its Deployment, StatefulSet...), the
    /// `source_workload` / `destination_workload` of metrics; default: `name`. In Kubernetes
    /// mode it is derived from the pod's controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_name: Option<String>,
    /// Namespace.
    pub namespace: String,
    /// Service account (default `default`).
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// The node whose agent serves the workload.
    pub node: String,
    /// The workload's addresses, as strings (parsed by validation, which names the bad one).
    /// May be empty only when the CNI plugin names the namespace (`netns: {cni: true}`): the
    /// addresses are then the ones the runtime's network plugin gave the sandbox.
    #[serde(default)]
    pub ips: Vec<String>,
    /// Labels matched by service selectors.
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: BTreeMap<String, String>,
    /// Whether the agent redirects the workload's traffic (default true).
    #[serde(default = "yes")]
    pub enrolled: bool,
    /// Whether the workload receives service traffic (default true).
    #[serde(default = "yes")]
    pub ready: bool,
    /// How to find the workload's network namespace.
    pub netns: NetnsFile,
    /// Destination ports whose outbound TCP the mesh leaves alone for this workload (Istio's
    /// `traffic.sidecar.istio.io/excludeOutboundPorts`). Wider than `u16`, as in `redirect`.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub exclude_outbound_ports: Vec<i64>,
    /// Destination networks (CIDR strings) whose outbound TCP the mesh leaves alone for this
    /// workload (Istio's `excludeOutboundIPRanges`).
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub exclude_outbound_cidrs: Vec<String>,
    /// Ports of this workload whose inbound TCP reaches the application directly: plaintext, no
    /// peer authentication, no policy (Istio's `excludeInboundPorts`).
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub exclude_inbound_ports: Vec<i64>,
}

/// A workload's `netns`: exactly one field must be set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetnsFile {
    /// A namespace file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// A process in the workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// A cgroup v2 directory of the workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// `true`: the pod's sandbox namespace, named by the CNI plugin when the runtime creates
    /// it (the workload is enrolled before its first process runs).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cni: bool,
}

/// One entry of `services`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceFile {
    /// Name, unique within the namespace.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Virtual IPs, as strings.
    pub vips: Vec<String>,
    /// Labels an endpoint must all carry.
    #[serde(default, deserialize_with = "null_as_default")]
    pub selector: BTreeMap<String, String>,
    /// For a service without selector: its endpoints' addresses, as strings (a workload's
    /// address, or one outside the mesh).
    #[serde(default, deserialize_with = "null_as_default")]
    pub endpoints: Vec<String>,
    /// The ports the service exposes.
    pub ports: Vec<PortFile>,
    /// The waypoint its traffic goes through (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<WaypointFile>,
}

/// A service's `waypoint`: another service of the file, whose endpoints are waypoint pods.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaypointFile {
    /// The waypoint service's name.
    pub name: String,
    /// The waypoint service's namespace (default: the service's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// One entry of a service's `ports`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortFile {
    /// The port clients dial (range-checked by validation).
    pub port: i64,
    /// The port on the endpoint (default: `port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<i64>,
}

fn default_service_account() -> String {
    "default".into()
}

fn yes() -> bool {
    true
}

/// Why a mesh file was rejected. Every message starts with `mesh file <path>: `.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("mesh file {}: cannot read: {error}", path.display())]
    Read {
        /// The mesh file.
        path: PathBuf,
        /// The underlying error.
        error: io::Error,
    },
    /// The file is not well-formed YAML.
    #[error("mesh file {}: YAML syntax error at line {line}, column {column}: {message}", path.display())]
    Syntax {
        /// The mesh file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// The file holds no document at all (an empty mesh is written `{}`: an empty file is more
    /// likely a write caught half-way, and must not un-enrol every pod).
    #[error("mesh file {}: the file is empty (write `{{}}` for an empty mesh)", path.display())]
    Empty {
        /// The mesh file.
        path: PathBuf,
    },
    /// Well-formed YAML that does not fit the schema: unknown key, missing key, wrong type.
    #[error("mesh file {}: {field}: {message}{}", path.display(), at_line(*.location))]
    Schema {
        /// The mesh file.
        path: PathBuf,
        /// The path of the offending field, e.g. `workloads[0].enrolled`, or `(top level)`.
        field: String,
        /// What is wrong with it.
        message: String,
        /// 1-based line and column, when the parser knows them.
        location: Option<(usize, usize)>,
    },
    /// The file fits the schema but breaks a rule (bad address, duplicate, out of range...).
    #[error("mesh file {}: {field}: {reason}", path.display())]
    Invalid {
        /// The mesh file.
        path: PathBuf,
        /// The offending field or entry, e.g. `workloads[2].ips[0]` or `services[0] (shop/web)`.
        field: String,
        /// The rule broken.
        reason: String,
    },
}

fn at_line(location: Option<(usize, usize)>) -> String {
    location
        .map(|(line, column)| format!(" (line {line}, column {column})"))
        .unwrap_or_default()
}

/// Reads, parses and validates the mesh file at `path`.
pub fn load_mesh_file(path: &Path) -> Result<MeshState, ConfigError> {
    parse_mesh(path, &read(path)?)
}

fn read(path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|error| ConfigError::Read {
        path: path.into(),
        error,
    })
}

/// Parses and validates mesh-file `content`; `path` only names the file in errors.
pub fn parse_mesh(path: &Path, content: &[u8]) -> Result<MeshState, ConfigError> {
    let text = std::str::from_utf8(content).map_err(|e| ConfigError::Read {
        path: path.into(),
        error: io::Error::new(io::ErrorKind::InvalidData, format!("not UTF-8: {e}")),
    })?;
    let file = parse_yaml(path, text)?;
    Validator::new(path).build(file)
}

fn parse_yaml(path: &Path, text: &str) -> Result<MeshFile, ConfigError> {
    // A first untyped pass tells syntax errors (with their position) from schema errors (with
    // their field path), and spots the empty document.
    match serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text) {
        Ok(serde_yaml_ng::Value::Null) => {
            return Err(ConfigError::Empty { path: path.into() });
        }
        Ok(_) => {}
        Err(e) => {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((0, 0));
            return Err(ConfigError::Syntax {
                path: path.into(),
                line,
                column,
                message: strip_location(&e.to_string(), e.location()).to_string(),
            });
        }
    }
    serde_path_to_error::deserialize(serde_yaml_ng::Deserializer::from_str(text)).map_err(|e| {
        let field = match e.path().to_string() {
            root if root == "." => "(top level)".to_string(),
            field => field,
        };
        let inner = e.inner();
        let location = inner.location().map(|l| (l.line(), l.column()));
        // serde_yaml_ng prefixes its own field path (up to the enclosing mapping, a prefix of
        // ours) and appends the position; we print ours and the position separately.
        let message = inner.to_string();
        let message = strip_location(&message, inner.location());
        let message = match message.split_once(": ") {
            Some((theirs, rest)) if field.starts_with(theirs) => rest,
            _ => message,
        };
        ConfigError::Schema {
            path: path.into(),
            field,
            message: message.to_string(),
            location,
        }
    })
}

/// `message` without the ` at line L column C` suffix serde_yaml_ng appends.
fn strip_location(message: &str, location: Option<serde_yaml_ng::Location>) -> &str {
    let Some(location) = location else {
        return message;
    };
    let suffix = format!(" at line {} column {}", location.line(), location.column());
    message.strip_suffix(&suffix).unwrap_or(message)
}

/// Checks the rules of `docs/configuration.md` while converting to the model.
struct Validator<'a> {
    path: &'a Path,
}

impl Validator<'_> {
    fn new(path: &Path) -> Validator<'_> {
        Validator { path }
    }

    fn invalid(&self, field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.into(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn build(&self, file: MeshFile) -> Result<MeshState, ConfigError> {
        let redirect = self.redirect(&file.redirect)?;
        // Who owns each address so far, as it is named in a conflict message.
        let mut owners: HashMap<IpAddr, Owner> = HashMap::new();
        let workloads = self.workloads(&file.workloads, &mut owners)?;
        let services = self.services(&file.services, &mut owners)?;
        let trust_domain = self.trust_domain(file.trust_domain.as_deref())?;
        let (authorizations, waypoint) =
            self.authorization_policies(&file.authorization_policies)?;
        let policies = PolicySet::new(
            authorizations,
            self.peer_authentications(&file.peer_authentications)?,
        )
        .with_waypoint_policies(WaypointPolicies::new(
            waypoint,
            self.request_authentications(&file.request_authentications)?,
        ));
        let mut routes = self.routes(&file.virtual_services, &file.destination_rules, &services)?;
        let gateway = self.gateway_routes(
            &file.http_routes,
            &file.grpc_routes,
            &known_services(&services),
        )?;
        for (uid, service_routes) in gateway {
            if let Some(virtual_service) = routes.by_service.get(&uid) {
                return Err(self.invalid(
                    "httpRoutes",
                    format!(
                        "service {uid} is routed by {} and by {}: route a service with                          Gateway API routes or a VirtualService, not both",
                        service_routes.source, virtual_service.source
                    ),
                ));
            }
            routes.by_service.insert(uid, service_routes);
        }
        routes.rate_limits =
            self.rate_limits(&file.rate_limit_policies, &known_services(&services))?;
        Ok(MeshState::new(redirect, workloads, services)
            .with_trust_domain(trust_domain)
            .with_policies(policies)
            .with_routes(routes))
    }

    fn redirect(&self, redirect: &RedirectFile) -> Result<RedirectSettings, ConfigError> {
        let ports = redirect
            .exclude_outbound_ports
            .iter()
            .enumerate()
            .map(|(i, &port)| self.port(format!("redirect.excludeOutboundPorts[{i}]"), port))
            .collect::<Result<_, _>>()?;
        let cidrs = redirect
            .exclude_outbound_cidrs
            .iter()
            .enumerate()
            .map(|(i, cidr)| {
                cidr.parse::<IpNet>()
                    // Host bits set (10.0.0.1/8) name the same network; the maps want it clean.
                    .map(|net| net.trunc())
                    .map_err(|_| {
                        self.invalid(
                            format!("redirect.excludeOutboundCidrs[{i}]"),
                            format!("invalid CIDR {cidr:?}"),
                        )
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(RedirectSettings {
            exclude_outbound_ports: ports,
            exclude_outbound_cidrs: cidrs,
        })
    }

    fn port(&self, field: String, port: i64) -> Result<u16, ConfigError> {
        match u16::try_from(port) {
            Ok(port) if port != 0 => Ok(port),
            _ => Err(self.invalid(field, format!("{port} is out of range 1..=65535"))),
        }
    }

    fn ip(&self, field: String, ip: &str) -> Result<IpAddr, ConfigError> {
        ip.parse()
            .map_err(|_| self.invalid(field, format!("invalid IP address {ip:?}")))
    }

    fn non_empty(&self, field: String, value: &str) -> Result<(), ConfigError> {
        if value.is_empty() {
            return Err(self.invalid(field, "must not be empty"));
        }
        Ok(())
    }

    fn workloads(
        &self,
        entries: &[WorkloadFile],
        owners: &mut HashMap<IpAddr, Owner>,
    ) -> Result<Vec<Workload>, ConfigError> {
        let mut names: HashMap<(&str, &str), usize> = HashMap::new();
        let mut workloads = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            let at = format!("workloads[{i}]");
            self.non_empty(format!("{at}.name"), &entry.name)?;
            self.non_empty(format!("{at}.namespace"), &entry.namespace)?;
            if let Some(workload_name) = &entry.workload_name {
                self.non_empty(format!("{at}.workloadName"), workload_name)?;
            }
            let uid = format!("{}/{}", entry.namespace, entry.name);
            let entry_at = format!("{at} ({uid})");
            if let Some(first) = names.insert((&entry.namespace, &entry.name), i) {
                return Err(self.invalid(entry_at, format!("{uid} is already workloads[{first}]")));
            }

            let mut ips = Vec::with_capacity(entry.ips.len());
            for (k, text) in entry.ips.iter().enumerate() {
                let ip = self.ip(format!("{at}.ips[{k}]"), text)?;
                let owner = Owner::Workload {
                    index: i,
                    uid: uid.clone(),
                    field: k,
                };
                self.claim(owners, ip, owner, &entry_at, &format!("ips[{k}]"))?;
                ips.push(ip);
            }

            let netns = self.netns(&format!("{at}.netns"), &entry.netns)?;
            if ips.is_empty() && netns != NetnsRef::Cni {
                return Err(self.invalid(
                    format!("{at}.ips"),
                    "empty: only a workload whose namespace the CNI plugin names \
                     (netns: {cni: true}) may leave its addresses to the runtime",
                ));
            }
            let capture_exclusions = CaptureExclusions::new(
                &entry.exclude_outbound_ports,
                &entry.exclude_outbound_cidrs,
                &entry.exclude_inbound_ports,
            )
            .map_err(|refusal| {
                let field = match refusal.index {
                    Some(k) => format!("{at}.{}[{k}]", refusal.list.field()),
                    None => format!("{at}.{}", refusal.list.field()),
                };
                self.invalid(field, format!("{} (workload {uid})", refusal.error))
            })?;
            workloads.push(Workload {
                name: entry.name.clone(),
                controller: entry.workload_name.clone(),
                namespace: entry.namespace.clone(),
                service_account: entry.service_account.clone(),
                node: entry.node.clone(),
                ips,
                labels: entry.labels.clone(),
                enrolled: entry.enrolled,
                ready: entry.ready,
                netns,
                capture_exclusions,
            });
        }
        Ok(workloads)
    }

    fn netns(&self, at: &str, netns: &NetnsFile) -> Result<NetnsRef, ConfigError> {
        let set: Vec<&str> = [
            ("path", netns.path.is_some()),
            ("pid", netns.pid.is_some()),
            ("cgroup", netns.cgroup.is_some()),
            ("cni", netns.cni),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect();
        if set.len() != 1 {
            let found = if set.is_empty() {
                "none".to_string()
            } else {
                set.join(" and ")
            };
            return Err(self.invalid(
                at,
                format!("exactly one of path, pid, cgroup, cni must be set, found {found}"),
            ));
        }
        let absolute = |field: &str, path: &PathBuf| {
            if path.is_absolute() {
                Ok(path.clone())
            } else {
                Err(self.invalid(
                    format!("{at}.{field}"),
                    format!("{:?} is not an absolute path", path.display().to_string()),
                ))
            }
        };
        match (&netns.path, netns.pid, &netns.cgroup) {
            (Some(path), _, _) => Ok(NetnsRef::Path(absolute("path", path)?)),
            (_, Some(0), _) => Err(self.invalid(format!("{at}.pid"), "0 is not a process id")),
            (_, Some(pid), _) => Ok(NetnsRef::Pid(pid)),
            (_, _, Some(cgroup)) => Ok(NetnsRef::Cgroup(absolute("cgroup", cgroup)?)),
            (None, None, None) => Ok(NetnsRef::Cni),
        }
    }

    fn services(
        &self,
        entries: &[ServiceFile],
        owners: &mut HashMap<IpAddr, Owner>,
    ) -> Result<Vec<Service>, ConfigError> {
        let mut names: HashMap<(&str, &str), usize> = HashMap::new();
        let mut services = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            let at = format!("services[{i}]");
            self.non_empty(format!("{at}.name"), &entry.name)?;
            self.non_empty(format!("{at}.namespace"), &entry.namespace)?;
            let uid = format!("{}/{}", entry.namespace, entry.name);
            let entry_at = format!("{at} ({uid})");
            if let Some(first) = names.insert((&entry.namespace, &entry.name), i) {
                return Err(self.invalid(entry_at, format!("{uid} is already services[{first}]")));
            }

            let mut vips = Vec::with_capacity(entry.vips.len());
            for (k, text) in entry.vips.iter().enumerate() {
                let ip = self.ip(format!("{at}.vips[{k}]"), text)?;
                let owner = Owner::Service {
                    index: i,
                    uid: uid.clone(),
                    field: k,
                };
                self.claim(owners, ip, owner, &entry_at, &format!("vips[{k}]"))?;
                vips.push(ip);
            }

            let mut ports: Vec<ServicePort> = Vec::with_capacity(entry.ports.len());
            for (k, p) in entry.ports.iter().enumerate() {
                let port = self.port(format!("{at}.ports[{k}].port"), p.port)?;
                let target_port = match p.target_port {
                    Some(target) => self.port(format!("{at}.ports[{k}].targetPort"), target)?,
                    None => port,
                };
                if let Some(first) = ports.iter().position(|q| q.port == port) {
                    return Err(self.invalid(
                        entry_at,
                        format!("ports[{k}].port {port} is already ports[{first}].port"),
                    ));
                }
                ports.push(ServicePort { port, target_port });
            }

            let endpoint_addresses = self.endpoint_addresses(&at, entry)?;
            let waypoint = match &entry.waypoint {
                Some(waypoint) => Some(self.waypoint(&at, entry, waypoint)?),
                None => None,
            };
            services.push(Service {
                name: entry.name.clone(),
                namespace: entry.namespace.clone(),
                vips,
                selector: entry.selector.clone(),
                endpoint_addresses,
                ports,
                waypoint,
            });
        }
        // Only now are all the VIPs known: an endpoint is a workload's address or one outside
        // the mesh, never a service's VIP.
        for (i, service) in services.iter().enumerate() {
            for (k, endpoint) in service.endpoint_addresses.iter().enumerate() {
                if let Some(Owner::Service { uid, .. }) = owners.get(&endpoint.ip) {
                    return Err(self.invalid(
                        format!("services[{i}].endpoints[{k}]"),
                        format!(
                            "{} is service {uid}'s VIP (an endpoint is a workload's address or \
                             one outside the mesh)",
                            endpoint.ip
                        ),
                    ));
                }
            }
        }
        // Only now are all the services known: a waypoint may be listed after its users.
        for (i, service) in services.iter().enumerate() {
            if let Some(waypoint) = &service.waypoint
                && !names.contains_key(&(waypoint.namespace.as_str(), waypoint.name.as_str()))
            {
                return Err(self.invalid(
                    format!("services[{i}].waypoint"),
                    format!("{waypoint} is not a service of this file"),
                ));
            }
        }
        Ok(services)
    }

    /// A service's `endpoints`: addresses, for a service without selector only.
    fn endpoint_addresses(
        &self,
        at: &str,
        entry: &ServiceFile,
    ) -> Result<Vec<EndpointAddress>, ConfigError> {
        if !entry.selector.is_empty() && !entry.endpoints.is_empty() {
            return Err(self.invalid(
                format!("{at}.endpoints"),
                "a service with a selector gets its endpoints from it: set selector or \
                 endpoints, not both",
            ));
        }
        let mut endpoints: Vec<EndpointAddress> = Vec::with_capacity(entry.endpoints.len());
        for (k, text) in entry.endpoints.iter().enumerate() {
            let field = format!("{at}.endpoints[{k}]");
            let ip = self.ip(field.clone(), text)?;
            if let Some(why) = EndpointAddress::unusable(ip) {
                return Err(self.invalid(field, format!("{ip} {why}")));
            }
            if let Some(first) = endpoints.iter().position(|e| e.ip == ip) {
                return Err(self.invalid(field, format!("{ip} is already endpoints[{first}]")));
            }
            endpoints.push(EndpointAddress {
                ip,
                ports: BTreeMap::new(),
            });
        }
        Ok(endpoints)
    }

    fn waypoint(
        &self,
        at: &str,
        entry: &ServiceFile,
        waypoint: &WaypointFile,
    ) -> Result<WaypointRef, ConfigError> {
        self.non_empty(format!("{at}.waypoint.name"), &waypoint.name)?;
        if let Some(namespace) = &waypoint.namespace {
            self.non_empty(format!("{at}.waypoint.namespace"), namespace)?;
        }
        let waypoint = WaypointRef {
            namespace: waypoint
                .namespace
                .clone()
                .unwrap_or_else(|| entry.namespace.clone()),
            name: waypoint.name.clone(),
        };
        if waypoint.namespace == entry.namespace && waypoint.name == entry.name {
            return Err(self.invalid(
                format!("{at}.waypoint"),
                format!("{waypoint} is this service itself"),
            ));
        }
        Ok(waypoint)
    }

    /// Records `owner` as the owner of `ip`, unless someone already is.
    fn claim(
        &self,
        owners: &mut HashMap<IpAddr, Owner>,
        ip: IpAddr,
        owner: Owner,
        entry_at: &str,
        field: &str,
    ) -> Result<(), ConfigError> {
        match owners.entry(ip) {
            Entry::Vacant(slot) => {
                slot.insert(owner);
                Ok(())
            }
            Entry::Occupied(slot) => {
                let previous = slot.get();
                let whose = if previous.same_entry(&owner) {
                    format!("this entry's {}", previous.field_name())
                } else {
                    previous.describe()
                };
                Err(self.invalid(entry_at, format!("{field} {ip} is already {whose}")))
            }
        }
    }
}

/// The holder of an address, to name it in conflict messages.
enum Owner {
    Workload {
        index: usize,
        uid: String,
        field: usize,
    },
    Service {
        index: usize,
        uid: String,
        field: usize,
    },
}

impl Owner {
    fn same_entry(&self, other: &Owner) -> bool {
        match (self, other) {
            (Owner::Workload { index: a, .. }, Owner::Workload { index: b, .. })
            | (Owner::Service { index: a, .. }, Owner::Service { index: b, .. }) => a == b,
            _ => false,
        }
    }

    fn field_name(&self) -> String {
        match self {
            Owner::Workload { field, .. } => format!("ips[{field}]"),
            Owner::Service { field, .. } => format!("vips[{field}]"),
        }
    }

    fn describe(&self) -> String {
        match self {
            Owner::Workload { uid, .. } => format!("workload {uid}'s IP"),
            Owner::Service { uid, .. } => format!("service {uid}'s VIP"),
        }
    }
}

/// How long the file must stay quiet after an event before it is read: an editor writing in
/// place produces a burst (truncate, writes, close), and reading mid-burst sees a partial file.
const SETTLE_QUIET: Duration = Duration::from_millis(100);
/// The longest a burst of events can delay a read, to keep detection within a second.
const SETTLE_MAX: Duration = Duration::from_millis(400);
/// The safety-net content check while file events work: catches whatever events miss (the
/// parent directory replaced, a symlink target edited elsewhere).
const SLOW_POLL: Duration = Duration::from_secs(5);
/// The content check when file events are unavailable (inotify limits): the only detector.
const FAST_POLL: Duration = Duration::from_secs(1);

/// Loads the mesh file at `path`, publishes it, then reloads it whenever its content changes,
/// until the returned future is dropped.
///
/// The first load must succeed (an error is returned: the agent refuses to start on a bad file).
/// Afterwards a bad file is reported on `status_tx` and in the log, and the last good state
/// stays published. Changes are seen through events on the file's directory, which covers
/// in-place writes, atomic rename-over and Kubernetes ConfigMap symlink swaps, plus a periodic
/// content check; a state is published only when the file's content actually changed.
pub async fn watch_mesh_file(
    path: PathBuf,
    state_tx: watch::Sender<Arc<MeshState>>,
    status_tx: watch::Sender<ConfigStatus>,
) -> anyhow::Result<()> {
    let source = format!("file:{}", path.display());
    // Watch before the first read, so that a change racing the read still triggers a check.
    let (event_tx, mut events) = mpsc::channel(1);
    let watcher = match watch_directory(&path, event_tx) {
        Ok(watcher) => Some(watcher),
        Err(e) => {
            tracing::warn!(
                path = %path.display(),
                "cannot watch the mesh file's directory ({e}); checking the file every {FAST_POLL:?}"
            );
            None
        }
    };

    let content = match tokio::fs::read(&path).await {
        Ok(content) => content,
        Err(error) => {
            let e = ConfigError::Read {
                path: path.clone(),
                error,
            };
            return Err(first_load_failed(&status_tx, &source, e));
        }
    };
    let state = match parse_mesh(&path, &content) {
        Ok(state) => state,
        Err(e) => return Err(first_load_failed(&status_tx, &source, e)),
    };
    tracing::info!(
        path = %path.display(),
        workloads = state.workloads().len(),
        services = state.services().len(),
        "mesh file loaded"
    );
    state_tx.send_replace(Arc::new(state));
    let mut reloader = Reloader {
        path,
        source,
        generation: 1,
        last_error: None,
        seen: Some(content.clone()),
        applied: content,
        state_tx,
        status_tx,
    };
    reloader.publish_status();

    let period = if watcher.is_some() {
        SLOW_POLL
    } else {
        FAST_POLL
    };
    let mut poll = tokio::time::interval_at(Instant::now() + period, period);
    poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            Some(()) = events.recv(), if watcher.is_some() => settle(&mut events).await,
            _ = poll.tick() => {}
        }
        let content = tokio::fs::read(&reloader.path).await;
        reloader.check(content);
    }
}

fn first_load_failed(
    status_tx: &watch::Sender<ConfigStatus>,
    source: &str,
    e: ConfigError,
) -> anyhow::Error {
    status_tx.send_replace(ConfigStatus {
        generation: 0,
        last_error: Some(e.to_string()),
        source: source.into(),
        unreachable_since: None,
    });
    e.into()
}

/// Watches the directory holding `path`: a rename-over or a ConfigMap's `..data` swap replaces
/// the file's inode, which a watch on the file itself would not survive.
fn watch_directory(
    path: &Path,
    events: mpsc::Sender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_os_string());
    // Other files in the directory (logs, editors' swap files) are none of our business; the
    // file itself, and a ConfigMap's `..data` swap behind it, are.
    let concerns_us = move |event: &notify::Event| {
        event.paths.is_empty()
            || event.paths.iter().any(|p| {
                p.file_name().is_some_and(|n| {
                    Some(n) == name.as_deref() || n.to_string_lossy().starts_with("..")
                })
            })
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match &event {
            // Opens and read-only closes include our own reads: reacting to them would loop.
            Ok(event) => {
                concerns_us(event)
                    && !matches!(
                        event.kind,
                        EventKind::Access(access) if access != AccessKind::Close(AccessMode::Write)
                    )
            }
            // Events may have been lost (queue overflow): look at the file.
            Err(_) => true,
        };
        if relevant {
            // A full channel already holds a pending check, which will see this change too.
            let _ = events.try_send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// Waits until the events stop for [`SETTLE_QUIET`], or at most [`SETTLE_MAX`].
async fn settle(events: &mut mpsc::Receiver<()>) {
    let deadline = Instant::now() + SETTLE_MAX;
    loop {
        let wait = SETTLE_QUIET.min(deadline.saturating_duration_since(Instant::now()));
        if wait.is_zero() {
            return;
        }
        match tokio::time::timeout(wait, events.recv()).await {
            Ok(Some(())) => continue,
            _ => return,
        }
    }
}

/// The reload loop's memory.
struct Reloader {
    path: PathBuf,
    source: String,
    generation: u64,
    last_error: Option<String>,
    /// The content last looked at (`None` after a failed read), so that an unchanged file,
    /// good or bad, is neither re-parsed nor re-reported.
    seen: Option<Vec<u8>>,
    /// The content of the published state.
    applied: Vec<u8>,
    state_tx: watch::Sender<Arc<MeshState>>,
    status_tx: watch::Sender<ConfigStatus>,
}

impl Reloader {
    fn check(&mut self, content: io::Result<Vec<u8>>) {
        let content = match content {
            Ok(content) => content,
            Err(error) => {
                if self.seen.take().is_some() {
                    self.reject(ConfigError::Read {
                        path: self.path.clone(),
                        error,
                    });
                }
                return;
            }
        };
        if self.seen.as_ref() == Some(&content) {
            return;
        }
        self.seen = Some(content.clone());
        if content == self.applied {
            // Back to what is in force (a bad edit undone): nothing to publish, nothing wrong.
            tracing::info!(
                path = %self.path.display(),
                generation = self.generation,
                "mesh file is back to the configuration in force"
            );
            self.last_error = None;
            self.publish_status();
            return;
        }
        match parse_mesh(&self.path, &content) {
            Ok(state) => {
                self.generation += 1;
                self.last_error = None;
                self.applied = content;
                tracing::info!(
                    path = %self.path.display(),
                    generation = self.generation,
                    workloads = state.workloads().len(),
                    services = state.services().len(),
                    "mesh file reloaded"
                );
                self.state_tx.send_replace(Arc::new(state));
                self.publish_status();
            }
            Err(e) => self.reject(e),
        }
    }

    fn reject(&mut self, e: ConfigError) {
        tracing::error!(
            generation = self.generation,
            "{e}; keeping the configuration in force"
        );
        self.last_error = Some(e.to_string());
        self.publish_status();
    }

    fn publish_status(&self) {
        self.status_tx.send_replace(ConfigStatus {
            generation: self.generation,
            last_error: self.last_error.clone(),
            source: self.source.clone(),
            unreachable_since: None,
        });
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, time::Duration};

    use super::*;
    use crate::state::Resolved;

    const GOOD: &str = r#"
redirect:
  excludeOutboundPorts: [22]
  excludeOutboundCidrs: ["192.0.2.0/24", "2001:db8::/32"]
workloads:
  - name: web-0
    namespace: shop
    serviceAccount: web
    node: node-a
    ips: ["10.10.0.2"]
    labels: {app: web}
    netns: {path: /run/netns/web-0}
  - name: web-1
    namespace: shop
    node: node-a
    ips: ["10.10.0.3"]
    labels: {app: web}
    netns: {pid: 4242}
services:
  - name: web
    namespace: shop
    vips: ["10.96.0.10"]
    selector: {app: web}
    ports:
      - port: 80
        targetPort: 8080
"#;

    fn parse(yaml: &str) -> Result<MeshState, ConfigError> {
        parse_mesh(Path::new("/tmp/m.yaml"), yaml.as_bytes())
    }

    fn error(yaml: &str) -> String {
        match parse(yaml) {
            Ok(_) => panic!("accepted:\n{yaml}"),
            Err(e) => e.to_string(),
        }
    }

    /// `GOOD` with `from` replaced by `to` (which must occur).
    fn edit(from: &str, to: &str) -> String {
        assert!(GOOD.contains(from), "{from:?} not in GOOD");
        GOOD.replacen(from, to, 1)
    }

    #[track_caller]
    fn assert_rejected(yaml: &str, expected: &str) {
        let message = error(yaml);
        assert_eq!(message, format!("mesh file /tmp/m.yaml: {expected}"));
    }

    #[test]
    fn good_file() {
        let state = parse(GOOD).unwrap();
        assert_eq!(state.redirect().exclude_outbound_ports, [22]);
        assert_eq!(
            state.redirect().exclude_outbound_cidrs,
            [
                "192.0.2.0/24".parse::<IpNet>().unwrap(),
                "2001:db8::/32".parse().unwrap()
            ]
        );
        let web0 = state.workload_by_ip("10.10.0.2".parse().unwrap()).unwrap();
        assert_eq!(web0.uid(), "shop/web-0");
        assert_eq!(web0.service_account, "web");
        assert_eq!(web0.netns, NetnsRef::Path("/run/netns/web-0".into()));
        assert_eq!(state.workloads()[1].netns, NetnsRef::Pid(4242));
        let dst: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let Resolved::Workload { addr, .. } = state.resolve(dst) else {
            panic!("VIP did not resolve");
        };
        assert_eq!(addr.port(), 8080);
    }

    #[test]
    fn example_file_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/mesh.yaml");
        let state = load_mesh_file(&path).unwrap();
        assert_eq!(state.workloads().len(), 3);
        assert_eq!(state.services().len(), 2);
        let web = &state.services()[0];
        assert_eq!(state.endpoints(web).len(), 2);
        assert!(matches!(
            state.resolve("10.96.0.30:5432".parse().unwrap()),
            Resolved::OutsideMesh { addr, .. } if addr == "192.0.2.20:5432".parse().unwrap()
        ));
        assert_eq!(
            web.ports,
            [
                ServicePort {
                    port: 80,
                    target_port: 8080
                },
                ServicePort {
                    port: 8080,
                    target_port: 8080
                },
            ]
        );
    }

    #[test]
    fn defaults() {
        let state = parse(
            r#"
workloads:
  - name: a
    namespace: ns
    node: n
    ips: ["10.0.0.1"]
    netns: {cgroup: /sys/fs/cgroup/pod-a}
services:
  - name: s
    namespace: ns
    vips: ["10.96.0.1"]
    selector: {app: a}
    ports: [{port: 443}]
"#,
        )
        .unwrap();
        let a = &state.workloads()[0];
        assert_eq!(a.service_account, "default");
        assert!(a.enrolled);
        assert!(a.ready);
        assert!(a.labels.is_empty());
        assert_eq!(a.netns, NetnsRef::Cgroup("/sys/fs/cgroup/pod-a".into()));
        assert_eq!(
            state.services()[0].ports,
            [ServicePort {
                port: 443,
                target_port: 443
            }]
        );
        assert_eq!(state.redirect(), &RedirectSettings::default());

        let empty = parse("{}").unwrap();
        assert!(empty.workloads().is_empty() && empty.services().is_empty());
        let nulls = parse("redirect:\nworkloads:\nservices:\n").unwrap();
        assert!(nulls.workloads().is_empty());

        let flags = parse(&edit(
            "    netns: {pid: 4242}",
            "    netns: {pid: 4242}\n    enrolled: false\n    ready: false",
        ))
        .unwrap();
        assert!(!flags.workloads()[1].enrolled);
        assert!(!flags.workloads()[1].ready);
    }

    #[test]
    fn workload_name_names_the_controller_and_defaults_to_the_name() {
        let state = parse(&edit(
            "  - name: web-0\n",
            "  - name: web-0\n    workloadName: web\n",
        ))
        .unwrap();
        let [web0, web1] = state.workloads() else {
            panic!("two workloads expected");
        };
        assert_eq!(web0.controller.as_deref(), Some("web"));
        assert_eq!(web0.workload_name(), "web");
        // Unstated: the workload is its own (the pod's name), as a pod without owner.
        assert_eq!(web1.controller, None);
        assert_eq!(web1.workload_name(), "web-1");
        // Istio's override label wins over either.
        let state = parse(&edit(
            "    labels: {app: web}\n    netns: {pid: 4242}",
            "    labels: {app: web, service.istio.io/workload-name: legacy}\n    netns: {pid: 4242}",
        ))
        .unwrap();
        assert_eq!(state.workloads()[1].workload_name(), "legacy");

        assert_rejected(
            &edit(
                "  - name: web-0\n",
                "  - name: web-0\n    workloadName: \"\"\n",
            ),
            "workloads[0].workloadName: must not be empty",
        );
    }

    #[test]
    fn cidr_host_bits_are_cleared() {
        let state = parse(&edit("192.0.2.0/24", "192.0.2.7/24")).unwrap();
        assert_eq!(
            state.redirect().exclude_outbound_cidrs[0],
            "192.0.2.0/24".parse::<IpNet>().unwrap()
        );
    }

    #[test]
    fn unknown_key_rejected() {
        let message = error(&edit("    serviceAccount: web", "    serviceAcount: web"));
        assert!(
            message.starts_with(
                "mesh file /tmp/m.yaml: workloads[0].serviceAcount: unknown field `serviceAcount`"
            ),
            "{message}"
        );
        let message = error(&edit("redirect:", "redirects: {}\nredirect:"));
        assert!(message.contains("unknown field `redirects`"), "{message}");
        let message = error(&edit(
            "{path: /run/netns/web-0}",
            "{path: /run/netns/web-0, pod: x}",
        ));
        assert!(
            message.starts_with("mesh file /tmp/m.yaml: workloads[0].netns.pod: unknown field"),
            "{message}"
        );
    }

    #[test]
    fn type_errors_name_the_field_and_line() {
        let message = error(&edit(
            "    labels: {app: web}\n    netns: {pid",
            "    labels: {app: web}\n    ready: maybe\n    netns: {pid",
        ));
        assert!(
            message.starts_with("mesh file /tmp/m.yaml: workloads[1].ready: invalid type: string \"maybe\", expected a boolean (line 18, column 12)"),
            "{message}"
        );
        let message = error(&edit(
            "    node: node-a\n    ips: [\"10.10.0.3\"]",
            "    ips: [\"10.10.0.3\"]",
        ));
        assert!(
            message.starts_with("mesh file /tmp/m.yaml: workloads[1]: missing field `node`"),
            "{message}"
        );
        let message = error(&edit("{pid: 4242}", "{pid: -1}"));
        assert!(
            message.starts_with("mesh file /tmp/m.yaml: workloads[1].netns.pid: invalid type: integer `-1`, expected u32"),
            "{message}"
        );
    }

    #[test]
    fn unquoted_label_values_are_strings() {
        // Kubernetes insists on quoting `version: "1"`; a hand-written mesh file need not.
        let state = parse(&edit(
            "labels: {app: web}",
            "labels: {app: web, version: 1, on: yes}",
        ))
        .unwrap();
        let labels = &state.workloads()[0].labels;
        assert_eq!(labels["version"], "1");
        assert_eq!(labels["on"], "yes");
    }

    #[test]
    fn top_level_type_error() {
        assert_rejected(
            "- a",
            "(top level): invalid type: sequence, expected struct MeshFile (line 1, column 1)",
        );
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let err = parse("workloads:\n  - name: [a\n").unwrap_err();
        assert!(
            matches!(err, ConfigError::Syntax { line: 3, .. }),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .starts_with("mesh file /tmp/m.yaml: YAML syntax error at line 3, column "),
            "{err}"
        );
    }

    #[test]
    fn empty_file_rejected() {
        for text in ["", "  \n# nothing\n", "~"] {
            assert!(
                matches!(parse(text), Err(ConfigError::Empty { .. })),
                "{text:?}"
            );
        }
    }

    #[test]
    fn unreadable_file() {
        let err = load_mesh_file(Path::new("/nonexistent/mesh.yaml")).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
        assert!(
            err.to_string()
                .starts_with("mesh file /nonexistent/mesh.yaml: cannot read: "),
            "{err}"
        );
    }

    #[test]
    fn workload_capture_exclusions() {
        let with = |lists: &str| {
            edit(
                "    netns: {pid: 4242}",
                &format!("    netns: {{pid: 4242}}\n{lists}"),
            )
        };
        let state = parse(&with(
            "    excludeOutboundPorts: [5432, 22, 22]\n    excludeOutboundCidrs: [\"10.9.1.1/16\"]\n    excludeInboundPorts: [9090]",
        ))
        .unwrap();
        let got = &state.workloads()[1].capture_exclusions;
        assert_eq!(got.outbound_ports, [22, 5432]);
        assert_eq!(
            got.outbound_cidrs,
            ["10.9.0.0/16".parse::<IpNet>().unwrap()]
        );
        assert_eq!(got.inbound_ports, [9090]);
        assert!(state.workloads()[0].capture_exclusions.is_unset());

        assert_rejected(
            &with("    excludeInboundPorts: [8080, 15008]"),
            "workloads[1].excludeInboundPorts[1]: 15008 is one of the agent's own ports in the pod (15001, 15006, 15008), which cannot be excluded (workload shop/web-1)",
        );
        assert_rejected(
            &with("    excludeOutboundPorts: [70000]"),
            "workloads[1].excludeOutboundPorts[0]: 70000 is out of range 1..=65535 (workload shop/web-1)",
        );
        assert_rejected(
            &with("    excludeOutboundCidrs: [\"10.0.0.0/40\"]"),
            "workloads[1].excludeOutboundCidrs[0]: invalid CIDR \"10.0.0.0/40\" (workload shop/web-1)",
        );
        let many: Vec<String> = (1..=40).map(|p| p.to_string()).collect();
        assert_rejected(
            &with(&format!("    excludeInboundPorts: [{}]", many.join(", "))),
            "workloads[1].excludeInboundPorts: 40 entries, more than the 32 a pod may have (workload shop/web-1)",
        );
    }

    #[test]
    fn workload_rules() {
        assert_rejected(
            &edit("name: web-0", "name: \"\""),
            "workloads[0].name: must not be empty",
        );
        assert_rejected(
            &edit(
                "    namespace: shop\n    serviceAccount",
                "    namespace: \"\"\n    serviceAccount",
            ),
            "workloads[0].namespace: must not be empty",
        );
        assert_rejected(
            &edit("name: web-1", "name: web-0"),
            "workloads[1] (shop/web-0): shop/web-0 is already workloads[0]",
        );
        // Same name in another namespace is another workload.
        parse(&edit(
            "    namespace: shop\n    node: node-a",
            "    namespace: shop2\n    node: node-a",
        ))
        .unwrap();
        assert_rejected(
            &edit("10.10.0.3", "10.0.0.300"),
            "workloads[1].ips[0]: invalid IP address \"10.0.0.300\"",
        );
        assert_rejected(
            &edit("10.10.0.3", "10.10.0.2"),
            "workloads[1] (shop/web-1): ips[0] 10.10.0.2 is already workload shop/web-0's IP",
        );
        assert_rejected(
            &edit("[\"10.10.0.3\"]", "[\"10.10.0.3\", \"10.10.0.3\"]"),
            "workloads[1] (shop/web-1): ips[1] 10.10.0.3 is already this entry's ips[0]",
        );
        assert_rejected(
            &edit("{pid: 4242}", "{}"),
            "workloads[1].netns: exactly one of path, pid, cgroup, cni must be set, found none",
        );
        assert_rejected(
            &edit("{pid: 4242}", "{pid: 4242, cgroup: /sys/fs/cgroup/x}"),
            "workloads[1].netns: exactly one of path, pid, cgroup, cni must be set, found pid and cgroup",
        );
        // Addresses may be left to the CNI plugin only with the namespace.
        assert_rejected(
            &edit("[\"10.10.0.3\"]", "[]"),
            "workloads[1].ips: empty: only a workload whose namespace the CNI plugin names (netns: {cni: true}) may leave its addresses to the runtime",
        );
        let cni = parse(&edit("[\"10.10.0.3\"]\n", "[]\n").replace("{pid: 4242}", "{cni: true}"))
            .unwrap();
        assert_eq!(cni.workloads()[1].netns, NetnsRef::Cni);
        assert!(cni.workloads()[1].ips.is_empty());
        assert_rejected(
            &edit("{pid: 4242}", "{pid: 0}"),
            "workloads[1].netns.pid: 0 is not a process id",
        );
        assert_rejected(
            &edit("/run/netns/web-0", "run/netns/web-0"),
            "workloads[0].netns.path: \"run/netns/web-0\" is not an absolute path",
        );
    }

    #[test]
    fn service_rules() {
        let second = "  - name: api\n    namespace: shop\n    vips: [\"10.96.0.11\"]\n    selector: {app: api}\n    ports: [{port: 80}]\n";
        let two = format!("{GOOD}{second}");
        parse(&two).unwrap();
        assert_rejected(
            &format!("{GOOD}{}", second.replace("name: api", "name: web")),
            "services[1] (shop/web): shop/web is already services[0]",
        );
        assert_rejected(
            &format!("{GOOD}{}", second.replace("name: api", "name: \"\"")),
            "services[1].name: must not be empty",
        );
        assert_rejected(
            &edit("10.96.0.10", "10.96.0.1000"),
            "services[0].vips[0]: invalid IP address \"10.96.0.1000\"",
        );
        assert_rejected(
            &edit("10.96.0.10", "10.10.0.2"),
            "services[0] (shop/web): vips[0] 10.10.0.2 is already workload shop/web-0's IP",
        );
        assert_rejected(
            &format!("{GOOD}{}", second.replace("10.96.0.11", "10.96.0.10")),
            "services[1] (shop/api): vips[0] 10.96.0.10 is already service shop/web's VIP",
        );
        assert_rejected(
            &edit("port: 80\n", "port: 0\n"),
            "services[0].ports[0].port: 0 is out of range 1..=65535",
        );
        assert_rejected(
            &edit("targetPort: 8080", "targetPort: 65536"),
            "services[0].ports[0].targetPort: 65536 is out of range 1..=65535",
        );
        assert_rejected(
            &edit(
                "        targetPort: 8080",
                "        targetPort: 8080\n      - port: 80",
            ),
            "services[0] (shop/web): ports[1].port 80 is already ports[0].port",
        );
    }

    #[test]
    fn service_endpoints() {
        // A service without selector lists its endpoints: a workload's address (reached as
        // that workload) and one outside the mesh; without any, the address dialled.
        let listed = "  - name: db\n    namespace: shop\n    vips: [\"10.96.0.30\"]\n    \
                      endpoints: [\"10.10.0.3\", \"192.0.2.7\"]\n    ports: [{port: 5432, \
                      targetPort: 15432}]\n";
        let state = parse(&format!("{GOOD}{listed}")).unwrap();
        let db = &state.services()[1];
        assert_eq!(
            db.endpoint_addresses
                .iter()
                .map(|e| e.ip.to_string())
                .collect::<Vec<_>>(),
            ["10.10.0.3", "192.0.2.7"]
        );
        let dst: SocketAddr = "10.96.0.30:5432".parse().unwrap();
        let mut seen = Vec::new();
        for _ in 0..2 {
            match state.resolve(dst) {
                Resolved::Workload { workload, addr, .. } => {
                    assert_eq!(workload.uid(), "shop/web-1");
                    seen.push(addr.to_string());
                }
                Resolved::OutsideMesh { addr, service } => {
                    assert_eq!(service.uid(), "shop/db");
                    seen.push(addr.to_string());
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        seen.sort();
        assert_eq!(seen, ["10.10.0.3:15432", "192.0.2.7:15432"]);
        let dump = serde_json::to_value(&state).unwrap();
        assert_eq!(
            dump["services"][1]["endpoints"],
            serde_json::json!(["shop/web-1", "192.0.2.7"])
        );
        let none = parse(&format!(
            "{GOOD}{}",
            listed.replace("[\"10.10.0.3\", \"192.0.2.7\"]", "[]")
        ))
        .unwrap();
        assert!(matches!(
            none.resolve(dst),
            Resolved::OutsideMesh { addr, .. } if addr == dst
        ));

        let with = |endpoints: &str| {
            format!(
                "{GOOD}{}",
                listed.replace("[\"10.10.0.3\", \"192.0.2.7\"]", endpoints)
            )
        };
        assert_rejected(
            &edit(
                "    selector: {app: web}\n",
                "    selector: {app: web}\n    endpoints: [\"10.10.0.9\"]\n",
            ),
            "services[0].endpoints: a service with a selector gets its endpoints from it: set \
             selector or endpoints, not both",
        );
        assert_rejected(
            &with("[\"10.10.0.3\", \"ten\"]"),
            "services[1].endpoints[1]: invalid IP address \"ten\"",
        );
        assert_rejected(
            &with("[\"10.10.0.3\", \"10.10.0.3\"]"),
            "services[1].endpoints[1]: 10.10.0.3 is already endpoints[0]",
        );
        assert_rejected(
            &with("[\"127.0.0.1\"]"),
            "services[1].endpoints[0]: 127.0.0.1 is a loopback address",
        );
        assert_rejected(
            &with("[\"::\"]"),
            "services[1].endpoints[0]: :: is the unspecified address",
        );
        assert_rejected(
            &with("[\"169.254.169.254\"]"),
            "services[1].endpoints[0]: 169.254.169.254 is a link-local address",
        );
        assert_rejected(
            &with("[\"10.96.0.10\"]"),
            "services[1].endpoints[0]: 10.96.0.10 is service shop/web's VIP (an endpoint is a \
             workload's address or one outside the mesh)",
        );
        // Port overrides are the Kubernetes source's (EndpointSlices): the file has none.
        let message = error(&with("[{ip: \"10.10.0.3\"}]"));
        assert!(
            message.starts_with("mesh file /tmp/m.yaml: services[1].endpoints[0]: "),
            "{message}"
        );
    }

    #[test]
    fn service_waypoint() {
        let wp = "  - name: wp\n    namespace: shop\n    vips: [\"10.96.0.20\"]\n    selector: {app: wp}\n    ports: [{port: 15008}]\n";
        let with = |waypoint: &str| {
            format!(
                "{}{wp}",
                edit(
                    "    selector: {app: web}\n    ports:",
                    &format!("    selector: {{app: web}}\n    waypoint: {waypoint}\n    ports:"),
                )
            )
        };
        let state = parse(&with("{name: wp}")).unwrap();
        assert_eq!(
            state.services()[0].waypoint,
            Some(WaypointRef {
                namespace: "shop".into(),
                name: "wp".into()
            })
        );
        assert_eq!(state.services()[1].waypoint, None);
        let dump = serde_json::to_value(&state).unwrap();
        assert_eq!(
            dump["services"][0]["waypoint"],
            serde_json::json!({"namespace": "shop", "name": "wp"})
        );
        assert!(dump["services"][1].get("waypoint").is_none());

        assert_rejected(
            &with("{name: wq}"),
            "services[0].waypoint: shop/wq is not a service of this file",
        );
        assert_rejected(
            &with("{name: wp, namespace: infra}"),
            "services[0].waypoint: infra/wp is not a service of this file",
        );
        assert_rejected(
            &with("{name: web}"),
            "services[0].waypoint: shop/web is this service itself",
        );
        assert_rejected(
            &with("{name: \"\"}"),
            "services[0].waypoint.name: must not be empty",
        );
        assert_rejected(
            &with("{name: wp, namespace: \"\"}"),
            "services[0].waypoint.namespace: must not be empty",
        );
        let message = error(&with("{name: wp, port: 15008}"));
        assert!(
            message.starts_with(
                "mesh file /tmp/m.yaml: services[0].waypoint.port: unknown field `port`"
            ),
            "{message}"
        );
    }

    #[test]
    fn redirect_rules() {
        assert_rejected(
            &edit("[22]", "[22, 0]"),
            "redirect.excludeOutboundPorts[1]: 0 is out of range 1..=65535",
        );
        assert_rejected(
            &edit("[22]", "[-5]"),
            "redirect.excludeOutboundPorts[0]: -5 is out of range 1..=65535",
        );
        assert_rejected(
            &edit("\"192.0.2.0/24\"", "\"192.0.2.0\""),
            "redirect.excludeOutboundCidrs[0]: invalid CIDR \"192.0.2.0\"",
        );
        assert_rejected(
            &edit("2001:db8::/32", "2001:db8::/129"),
            "redirect.excludeOutboundCidrs[1]: invalid CIDR \"2001:db8::/129\"",
        );
    }

    fn replace_atomically(path: &Path, content: &str) {
        let temp = path.with_extension("tmp");
        std::fs::write(&temp, content).unwrap();
        std::fs::rename(&temp, path).unwrap();
    }

    /// Detection must take under a second; allow slack for a loaded test machine while staying
    /// well under the safety-net poll, so that these tests exercise the file events.
    const DETECT: Duration = Duration::from_secs(3);

    async fn wait_status(
        status: &mut watch::Receiver<ConfigStatus>,
        what: &str,
        f: impl FnMut(&ConfigStatus) -> bool,
    ) -> ConfigStatus {
        let waited = tokio::time::timeout(DETECT, status.wait_for(f))
            .await
            .map(|r| r.unwrap().clone());
        waited.unwrap_or_else(|_| panic!("timed out waiting for {what}: {:?}", *status.borrow()))
    }

    type Channels = (
        watch::Receiver<Arc<MeshState>>,
        watch::Receiver<ConfigStatus>,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    );

    fn start(path: &Path) -> Channels {
        let (state_tx, state_rx) = watch::channel(Arc::new(MeshState::empty()));
        let (status_tx, status_rx) = watch::channel(ConfigStatus::default());
        let task = tokio::spawn(watch_mesh_file(path.into(), state_tx, status_tx));
        (state_rx, status_rx, task)
    }

    #[tokio::test]
    async fn watch_reloads_and_keeps_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let (state, mut status, task) = start(&path);

        let s = wait_status(&mut status, "first load", |s| s.generation == 1).await;
        assert_eq!(s.last_error, None);
        assert_eq!(s.source, format!("file:{}", path.display()));
        let first = state.borrow().clone();
        assert_eq!(first.workloads().len(), 2);

        // A bad edit, written in place.
        std::fs::write(&path, edit("10.10.0.3", "10.0.0.300")).unwrap();
        let s = wait_status(&mut status, "the error", |s| s.last_error.is_some()).await;
        assert_eq!(s.generation, 1);
        assert!(
            s.last_error
                .unwrap()
                .contains("workloads[1].ips[0]: invalid IP address \"10.0.0.300\""),
        );
        assert!(
            Arc::ptr_eq(&state.borrow(), &first),
            "a bad file must not be published"
        );

        // A good one, renamed over the file.
        replace_atomically(&path, &edit("10.10.0.3", "10.10.0.33"));
        let s = wait_status(&mut status, "generation 2", |s| s.generation == 2).await;
        assert_eq!(s.last_error, None);
        assert!(
            state
                .borrow()
                .workload_by_ip("10.10.0.33".parse().unwrap())
                .is_some()
        );

        // Same content again: nothing to publish.
        replace_atomically(&path, &edit("10.10.0.3", "10.10.0.33"));
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(status.borrow().generation, 2);

        // A bad edit undone: the error clears without a new generation.
        std::fs::write(&path, "workloads: [").unwrap();
        wait_status(&mut status, "the syntax error", |s| s.last_error.is_some()).await;
        std::fs::write(&path, edit("10.10.0.3", "10.10.0.33")).unwrap();
        let s = wait_status(&mut status, "the error cleared", |s| s.last_error.is_none()).await;
        assert_eq!(s.generation, 2);

        task.abort();
    }

    #[tokio::test]
    async fn watch_follows_configmap_symlink_swaps() {
        // The layout kubelet gives a mounted ConfigMap: mesh.yaml -> ..data/mesh.yaml,
        // ..data -> ..<timestamp>/, swapped by renaming a new ..data_tmp link over ..data.
        let dir = tempfile::tempdir().unwrap();
        let version = |name: &str, content: &str| {
            let d = dir.path().join(name);
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("mesh.yaml"), content).unwrap();
        };
        version("..v1", GOOD);
        std::os::unix::fs::symlink("..v1", dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/mesh.yaml", dir.path().join("mesh.yaml")).unwrap();
        let (state, mut status, task) = start(&dir.path().join("mesh.yaml"));
        wait_status(&mut status, "first load", |s| s.generation == 1).await;

        version("..v2", &edit("10.10.0.3", "10.10.0.44"));
        std::os::unix::fs::symlink("..v2", dir.path().join("..data_tmp")).unwrap();
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        std::fs::remove_dir_all(dir.path().join("..v1")).unwrap();
        wait_status(&mut status, "generation 2", |s| s.generation == 2).await;
        assert!(
            state
                .borrow()
                .workload_by_ip("10.10.0.44".parse().unwrap())
                .is_some()
        );
        task.abort();
    }

    #[tokio::test]
    async fn watch_refuses_a_bad_first_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, "workloads: {}").unwrap();
        let (state, status, task) = start(&path);
        let err = task.await.unwrap().unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("mesh file {}: workloads", path.display())),
            "{err}"
        );
        assert!(status.borrow().last_error.is_some());
        assert_eq!(status.borrow().generation, 0);
        assert!(state.borrow().workloads().is_empty());
    }
}
