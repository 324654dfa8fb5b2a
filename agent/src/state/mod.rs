//! The mesh as the agent sees it: workloads, services and redirection settings.
//!
//! Every configuration source (the mesh file today, Kubernetes later) produces a [`MeshState`];
//! everything downstream (enrolment, the proxy, the admin endpoint) reads only this model, so it
//! knows nothing about where the configuration came from. A state is immutable once built and
//! shared as `Arc<MeshState>`: a reload builds a new one and swaps it in, so a connection that
//! resolved against the old state keeps the `Arc`s it got.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use ipnet::IpNet;
use serde::{Serialize, ser::SerializeStruct};

use crate::netns::NetnsRef;

pub mod capture;
pub mod ratelimit;
pub mod routes;
pub mod upstream;
pub use self::capture::CaptureExclusions;
pub use self::routes::RouteTable;
use crate::policy::{AuthorizationPolicy, DEFAULT_TRUST_DOMAIN, PeerAuthMode, PolicySet};

/// The DNS domain of service hostnames (`<name>.<namespace>.svc.<domain>`): Kubernetes' default.
/// Istio's `destination_service` metric label is the service's hostname.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// The canonical revision of a workload without a revision label, as in Istio.
const DEFAULT_REVISION: &str = "latest";

/// Labels naming a workload's canonical service, most specific first (Istio's order).
const CANONICAL_NAME_LABELS: [&str; 3] = [
    "service.istio.io/canonical-name",
    "app.kubernetes.io/name",
    "app",
];

/// Istio's label that overrides the workload name derived from a pod's controller.
pub const WORKLOAD_NAME_LABEL: &str = "service.istio.io/workload-name";

/// Labels naming a workload's canonical revision, most specific first (Istio's order).
const CANONICAL_REVISION_LABELS: [&str; 3] = [
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
];

/// A pod (or any process group with its own network namespace) that can join the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Name, unique within the namespace (a pod's own name).
    pub name: String,
    /// The name of the controller that runs the pod (its Deployment, StatefulSet, DaemonSet,
    /// Job, CronJob...), as Istio derives it; `None` for a pod of its own. What metrics and
    /// `baggage` name the workload by: see [`Workload::workload_name`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controller: Option<String>,
    /// Namespace (tenancy scope; services select only workloads of their own namespace).
    pub namespace: String,
    /// The identity the workload runs as.
    pub service_account: String,
    /// The node whose agent serves this workload.
    pub node: String,
    /// The workload's addresses (IPv4 and/or IPv6).
    pub ips: Vec<IpAddr>,
    /// Labels, matched by service selectors.
    pub labels: BTreeMap<String, String>,
    /// Whether the agent redirects this workload's traffic; `false` leaves it untouched.
    pub enrolled: bool,
    /// Whether the workload receives service traffic.
    pub ready: bool,
    /// Where to find the workload's network namespace.
    pub netns: NetnsRef,
    /// What of the workload's traffic the mesh leaves alone (its own exclusions; the node-wide
    /// ones are [`RedirectSettings`]).
    #[serde(skip_serializing_if = "CaptureExclusions::is_unset")]
    pub capture_exclusions: CaptureExclusions,
}

impl Workload {
    /// What policies select the workload by (its namespace and labels).
    pub fn policy_target(&self) -> crate::policy::Target<'_> {
        crate::policy::Target {
            namespace: &self.namespace,
            labels: &self.labels,
        }
    }

    /// The first non-empty value of `keys`, most specific first.
    fn first_label(&self, keys: &[&str]) -> Option<&str> {
        keys.iter()
            .find_map(|key| self.labels.get(*key).filter(|v| !v.is_empty()))
            .map(String::as_str)
    }

    /// Istio's workload name, the `source_workload` / `destination_workload` of metrics: the
    /// [`WORKLOAD_NAME_LABEL`] label if set, else the controller's name, else the pod's own
    /// name. All pods of one Deployment share it, so dashboards draw them as one workload.
    pub fn workload_name(&self) -> &str {
        self.first_label(&[WORKLOAD_NAME_LABEL])
            .or(self.controller.as_deref())
            .unwrap_or(&self.name)
    }

    /// Istio's canonical service: the canonical-name labels, else the workload name
    /// ([`Self::workload_name`]). Metrics and the `baggage` the node proxy sends name the
    /// workload by it.
    pub fn canonical_service(&self) -> &str {
        self.first_label(&CANONICAL_NAME_LABELS)
            .unwrap_or_else(|| self.workload_name())
    }

    /// Istio's canonical revision: the canonical-revision labels, else `latest`.
    pub fn canonical_revision(&self) -> &str {
        self.first_label(&CANONICAL_REVISION_LABELS)
            .unwrap_or(DEFAULT_REVISION)
    }

    /// The workload's unique id, `namespace/name`.
    pub fn uid(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The workload's address of the same family as `peer` (the source of its tunnels to it).
    pub fn address_like(&self, peer: IpAddr) -> Option<IpAddr> {
        self.ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == peer.is_ipv4())
    }
}

/// One port of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// The port clients dial on a VIP.
    pub port: u16,
    /// The port the connection goes to on the chosen endpoint.
    pub target_port: u16,
}

/// A set of endpoints reachable through virtual IPs: the workloads its selector picks, or for a
/// service without selector the addresses it lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    /// Name, unique within the namespace.
    pub name: String,
    /// Namespace; only workloads of this namespace are selected.
    pub namespace: String,
    /// The virtual IPs clients dial.
    pub vips: Vec<IpAddr>,
    /// Labels an endpoint must all carry. An empty selector selects nothing: the service's
    /// endpoints are then [`Self::endpoint_addresses`] (as in Kubernetes, where a selector-less
    /// service's endpoints are managed by someone else).
    pub selector: BTreeMap<String, String>,
    /// For a service without selector: its ready endpoints, by address (Kubernetes: from its
    /// EndpointSlices). Ignored when the selector is set.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub endpoint_addresses: Vec<EndpointAddress>,
    /// The ports the service accepts.
    pub ports: Vec<ServicePort>,
    /// The waypoint its traffic must go through, if any: connections to a VIP are then
    /// tunnelled to the waypoint, never to the endpoints directly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<WaypointRef>,
}

/// An endpoint a service without selector names by address: a mesh workload's address (the
/// connection then goes to that workload, through HBONE when it is enrolled) or an address
/// outside the mesh (plain TCP, as any destination outside the mesh).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointAddress {
    /// The endpoint's address.
    pub ip: IpAddr,
    /// Service port to the port on this endpoint, for the ports where it is not the service
    /// port's `target_port` (Kubernetes: the EndpointSlice's port of the same name).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<u16, u16>,
}

impl EndpointAddress {
    /// Why `ip` cannot be an endpoint address, if it cannot: an address that means "this
    /// host" or no host at all would send the connection back into the source pod (loopback),
    /// nowhere (unspecified), or to many (multicast). Link-local addresses are refused too, as
    /// Kubernetes refuses them for endpoints: they do not name one host in the cluster.
    pub fn unusable(ip: IpAddr) -> Option<&'static str> {
        let ip = ip.to_canonical();
        let link_local = match ip {
            IpAddr::V4(v4) => v4.is_link_local(),
            IpAddr::V6(v6) => v6.is_unicast_link_local(),
        };
        if ip.is_loopback() {
            Some("is a loopback address")
        } else if ip.is_unspecified() {
            Some("is the unspecified address")
        } else if ip.is_multicast() {
            Some("is a multicast address")
        } else if link_local {
            Some("is a link-local address")
        } else {
            None
        }
    }
}

/// A waypoint, named by its service: the L7 proxy a service's traffic is sent through. Its
/// ready endpoints are the waypoint's pods, which accept HBONE on their port 15008.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WaypointRef {
    /// The waypoint service's namespace.
    pub namespace: String,
    /// The waypoint service's name.
    pub name: String,
}

impl fmt::Display for WaypointRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Service {
    /// The service's unique id, `namespace/name`.
    pub fn uid(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The service's hostname, `<name>.<namespace>.svc.cluster.local` (the value of Istio's
    /// `destination_service` label).
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.{CLUSTER_DOMAIN}", self.name, self.namespace)
    }

    /// Whether `workload` is selected by this service (readiness aside).
    pub fn selects(&self, workload: &Workload) -> bool {
        !self.selector.is_empty()
            && workload.namespace == self.namespace
            && self
                .selector
                .iter()
                .all(|(key, value)| workload.labels.get(key) == Some(value))
    }

    /// The service port clients dial as `port`.
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }

    /// Whether the service's endpoints are managed by someone else (it has no selector): they
    /// are then the addresses it lists, and when it lists none a connection goes to the address
    /// dialled.
    pub fn lists_endpoints(&self) -> bool {
        self.selector.is_empty()
    }
}

/// Node-wide redirection settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RedirectSettings {
    /// Outbound TCP to these destination ports is never redirected.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound TCP to these networks is never redirected.
    pub exclude_outbound_cidrs: Vec<IpNet>,
}

/// Where a connection to some destination should go, according to the mesh.
#[derive(Debug, Clone)]
pub enum Resolved {
    /// To a mesh workload at `addr`; `service` is set when the destination was a service VIP.
    Workload {
        /// The workload that will receive the connection.
        workload: Arc<Workload>,
        /// The address to connect to (for a VIP: the endpoint's IP and the target port).
        addr: SocketAddr,
        /// The service whose VIP was dialled, if any.
        service: Option<Arc<Service>>,
    },
    /// Not a mesh destination: connect to it as dialled.
    Passthrough(SocketAddr),
    /// A service VIP whose connection goes outside the mesh, in plain TCP: to an endpoint
    /// address of no mesh workload, or, for a service without selector that has no ready
    /// endpoint, to the address dialled (the cluster's own service routing may know more).
    OutsideMesh {
        /// Where to connect: the endpoint's address and port, or the address dialled.
        addr: SocketAddr,
        /// The service whose VIP was dialled.
        service: Arc<Service>,
    },
    /// A service VIP whose service has a waypoint: tunnel to the waypoint, which forwards to
    /// the service itself (after its L7 policy).
    Waypoint {
        /// The waypoint pod chosen (round robin over the waypoint service's ready endpoints).
        workload: Arc<Workload>,
        /// The waypoint pod's address of the dialled VIP's family (or its only one); the tunnel
        /// goes to its HBONE port.
        ip: IpAddr,
        /// The service whose VIP was dialled; the tunnel's authority is the address dialled.
        service: Arc<Service>,
    },
    /// A service VIP whose service has a waypoint that does not exist or has no ready endpoint:
    /// the connection must be refused, since going to the endpoints directly would skip the
    /// waypoint's policy.
    NoWaypoint {
        /// The service dialled.
        service: Arc<Service>,
        /// Its waypoint.
        waypoint: WaypointRef,
        /// Whether the waypoint service exists (it then has no ready endpoint).
        exists: bool,
    },
    /// A service VIP whose service selects no ready workload.
    NoEndpoints {
        /// The service dialled.
        service: Arc<Service>,
    },
    /// A service VIP dialled on a port the service does not expose.
    UnknownServicePort {
        /// The service dialled.
        service: Arc<Service>,
        /// The port dialled.
        port: u16,
    },
}

/// One place a service's connections can go: a workload, or an address outside the mesh.
#[derive(Debug, Clone)]
struct Target {
    /// The mesh workload at `ip`; `None` for an address outside the mesh.
    workload: Option<Arc<Workload>>,
    /// The address to connect to.
    ip: IpAddr,
    /// Which endpoint this is (an endpoint with addresses of both families is a target in
    /// each family's list); for a listed one, its index in [`Service::endpoint_addresses`].
    endpoint: u32,
    /// Whether the endpoint is listed by address (it may have ports of its own).
    listed: bool,
}

impl Target {
    /// The port to connect to on this target for the service port `port`.
    fn port(&self, service: &Service, port: &ServicePort) -> u16 {
        let listed = self
            .listed
            .then(|| &service.endpoint_addresses[self.endpoint as usize]);
        listed
            .and_then(|endpoint| endpoint.ports.get(&port.port))
            .copied()
            .unwrap_or(port.target_port)
    }

    /// How the config dump names it: the workload's uid, or the address.
    fn name(&self) -> String {
        match &self.workload {
            Some(workload) => workload.uid(),
            None => self.ip.to_string(),
        }
    }
}

/// A candidate endpoint before the per-family lists are built: its workload, its addresses.
struct Candidate {
    workload: Option<Arc<Workload>>,
    ips: Vec<IpAddr>,
}

/// A service's ready endpoints, with the address to use for each destination family.
#[derive(Debug, Default)]
struct Endpoints {
    /// For an IPv4 destination: endpoints with an IPv4 address, or all if none has one.
    v4: Vec<Target>,
    /// For an IPv6 destination: likewise.
    v6: Vec<Target>,
    /// Round-robin cursor. Shared by both families: only the spread matters.
    next: AtomicUsize,
}

impl Endpoints {
    /// The endpoints of the ready workloads `ready` (a service with a selector).
    fn selected(ready: &[Arc<Workload>]) -> Self {
        Self::new(
            ready
                .iter()
                .map(|w| Candidate {
                    workload: Some(Arc::clone(w)),
                    ips: w.ips.clone(),
                })
                .collect(),
            false,
        )
    }

    /// The endpoints `service` lists by address, each the workload owning it if any.
    fn listed(service: &Service, workload_by_ip: &HashMap<IpAddr, Arc<Workload>>) -> Self {
        Self::new(
            service
                .endpoint_addresses
                .iter()
                .map(|endpoint| Candidate {
                    workload: workload_by_ip.get(&endpoint.ip).cloned(),
                    ips: vec![endpoint.ip],
                })
                .collect(),
            true,
        )
    }

    /// The endpoints of `candidates`; `listed`: they are a service's
    /// [`Service::endpoint_addresses`], in order (one address each).
    fn new(candidates: Vec<Candidate>, listed: bool) -> Self {
        let target = |endpoint: usize, ip: IpAddr| Target {
            workload: candidates[endpoint].workload.clone(),
            ip,
            // Memory would run out long before one service had u32::MAX endpoints.
            endpoint: endpoint as u32,
            listed,
        };
        let for_family = |v4: bool| {
            let preferred: Vec<Target> = candidates
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    let ip = c.ips.iter().find(|ip| ip.is_ipv4() == v4)?;
                    Some(target(i, *ip))
                })
                .collect();
            if !preferred.is_empty() {
                return preferred;
            }
            // A single-stack service is still reachable through a VIP of the other family: the
            // proxy opens a new connection, so the families need not match.
            (0..candidates.len())
                .filter_map(|i| Some(target(i, *candidates[i].ips.first()?)))
                .collect()
        };
        Self {
            v4: for_family(true),
            v6: for_family(false),
            next: AtomicUsize::new(0),
        }
    }

    /// The next target for a destination of `dst`'s family (round robin) that `usable`
    /// accepts.
    fn pick(&self, dst: IpAddr, usable: impl Fn(&Target) -> bool) -> Option<&Target> {
        let candidates = if dst.is_ipv4() { &self.v4 } else { &self.v6 };
        if candidates.is_empty() {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        (0..candidates.len())
            .map(|k| &candidates[(n + k) % candidates.len()])
            .find(|target| usable(target))
    }

    /// Every endpoint once, in the sources' order.
    fn targets(&self) -> impl Iterator<Item = &Target> {
        // Every endpoint with an address is in v4 or in v6 (or both); keep v4's order.
        let extra = self
            .v6
            .iter()
            .filter(|t| !self.v4.iter().any(|v| v.endpoint == t.endpoint));
        self.v4.iter().chain(extra)
    }

    fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.targets().filter_map(|t| t.workload.as_ref())
    }
}

/// The ready workloads by (namespace, label key, label value): a service's endpoints are among
/// the workloads carrying any one pair of its selector, so matching a selector costs the size
/// of its rarest pair's list instead of a scan of every workload. Used while building only.
struct ReadyByLabel<'a> {
    /// Indexes into the workloads, ascending (so candidates keep the workloads' order).
    index: HashMap<(&'a str, &'a str, &'a str), Vec<usize>>,
}

impl<'a> ReadyByLabel<'a> {
    fn new(workloads: &'a [Arc<Workload>]) -> Self {
        let mut index: HashMap<_, Vec<usize>> = HashMap::new();
        for (i, workload) in workloads.iter().enumerate() {
            // Only ready workloads are ever endpoints.
            if !workload.ready {
                continue;
            }
            for (key, value) in &workload.labels {
                index
                    .entry((workload.namespace.as_str(), key.as_str(), value.as_str()))
                    .or_default()
                    .push(i);
            }
        }
        Self { index }
    }

    /// The ready workloads that may match `service`'s selector (a superset of its endpoints,
    /// still to be checked with [`Service::selects`]); none for an empty selector.
    fn candidates(&self, service: &'a Service) -> &[usize] {
        service
            .selector
            .iter()
            .map(|(key, value)| {
                self.index
                    .get(&(service.namespace.as_str(), key.as_str(), value.as_str()))
                    .map_or(&[][..], Vec::as_slice)
            })
            .min_by_key(|candidates| candidates.len())
            .unwrap_or_default()
    }
}

/// One consistent snapshot of the mesh, indexed for the lookups the data path makes.
///
/// Built by a configuration source, which is responsible for validation; construction itself
/// never fails, and where the input is inconsistent (an IP claimed twice) the first claimant wins.
#[derive(Debug)]
pub struct MeshState {
    redirect: RedirectSettings,
    /// The trust domain of the mesh's SPIFFE identities.
    trust_domain: String,
    /// Peer authentication and authorization policies.
    policies: PolicySet,
    workloads: Vec<Arc<Workload>>,
    services: Vec<Arc<Service>>,
    workload_by_ip: HashMap<IpAddr, Arc<Workload>>,
    /// Index into `services` / `endpoints`.
    service_by_vip: HashMap<IpAddr, usize>,
    /// Parallel to `services`.
    endpoints: Vec<Endpoints>,
    /// Parallel to `services`: for a service with a waypoint, the waypoint service's index
    /// (`None` when that service does not exist, or the service has no waypoint).
    waypoints: Vec<Option<usize>>,
    /// The HTTP routes waypoints apply ([`routes`]).
    routes: Arc<RouteTable>,
}

impl MeshState {
    /// Builds a state and its indexes.
    pub fn new(
        redirect: RedirectSettings,
        workloads: Vec<Workload>,
        services: Vec<Service>,
    ) -> Self {
        let workloads: Vec<Arc<Workload>> = workloads.into_iter().map(Arc::new).collect();
        let services: Vec<Arc<Service>> = services.into_iter().map(Arc::new).collect();

        let mut workload_by_ip = HashMap::new();
        for workload in &workloads {
            for ip in &workload.ips {
                workload_by_ip
                    .entry(*ip)
                    .or_insert_with(|| Arc::clone(workload));
            }
        }

        let by_label = ReadyByLabel::new(&workloads);
        let mut service_by_vip = HashMap::new();
        let mut endpoints = Vec::with_capacity(services.len());
        for (index, service) in services.iter().enumerate() {
            for vip in &service.vips {
                service_by_vip.entry(*vip).or_insert(index);
            }
            if service.lists_endpoints() {
                endpoints.push(Endpoints::listed(service, &workload_by_ip));
                continue;
            }
            let ready: Vec<Arc<Workload>> = by_label
                .candidates(service)
                .iter()
                .map(|&i| &workloads[i])
                .filter(|w| service.selects(w))
                .cloned()
                .collect();
            endpoints.push(Endpoints::selected(&ready));
        }

        let by_name: HashMap<(&str, &str), usize> = services
            .iter()
            .enumerate()
            .map(|(i, s)| ((s.namespace.as_str(), s.name.as_str()), i))
            .collect();
        let waypoints = services
            .iter()
            .map(|service| {
                let waypoint = service.waypoint.as_ref()?;
                by_name
                    .get(&(waypoint.namespace.as_str(), waypoint.name.as_str()))
                    .copied()
            })
            .collect();

        Self {
            redirect,
            trust_domain: DEFAULT_TRUST_DOMAIN.to_string(),
            policies: PolicySet::default(),
            workloads,
            services,
            workload_by_ip,
            service_by_vip,
            endpoints,
            waypoints,
            routes: Arc::default(),
        }
    }

    /// Sets the HTTP routes (default: none; a waypoint then sends each request to the
    /// service dialled).
    pub fn with_routes(mut self, routes: RouteTable) -> Self {
        self.routes = Arc::new(routes);
        self
    }

    /// The HTTP routes waypoints apply.
    pub fn routes(&self) -> &RouteTable {
        &self.routes
    }

    /// Sets the trust domain (default [`DEFAULT_TRUST_DOMAIN`]).
    pub fn with_trust_domain(mut self, trust_domain: impl Into<String>) -> Self {
        self.trust_domain = trust_domain.into();
        self
    }

    /// Sets the security policies (default: none, so every workload is PERMISSIVE, as in Istio,
    /// and allows any source).
    pub fn with_policies(mut self, policies: PolicySet) -> Self {
        self.policies = policies;
        self
    }

    /// A state with no workloads, no services and default settings.
    pub fn empty() -> Self {
        Self::default()
    }

    /// The trust domain of the mesh's identities, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The SPIFFE identity a workload runs as in this mesh.
    pub fn identity_of(&self, workload: &Workload) -> crate::identity::SpiffeId {
        crate::identity::SpiffeId::new(
            &self.trust_domain,
            &workload.namespace,
            &workload.service_account,
        )
    }

    /// The peer authentication and authorization policies.
    pub fn policies(&self) -> &PolicySet {
        &self.policies
    }

    /// Whether plaintext may reach `workload` (see [`PolicySet::peer_auth_mode`]).
    pub fn peer_auth_mode(&self, workload: &Workload) -> PeerAuthMode {
        self.policies.peer_auth_mode(workload.policy_target())
    }

    /// All workloads, in source order.
    pub fn workloads(&self) -> &[Arc<Workload>] {
        &self.workloads
    }

    /// All services, in source order.
    pub fn services(&self) -> &[Arc<Service>] {
        &self.services
    }

    /// The service an inbound connection to `workload` on `port` most likely came through: the
    /// first service selecting the workload with a target port equal to `port` (ztunnel's best
    /// guess; the VIP the client dialled is not known on the destination side).
    pub fn guess_inbound_service(&self, workload: &Workload, port: u16) -> Option<&Arc<Service>> {
        self.services.iter().find(|service| {
            service.selects(workload) && service.ports.iter().any(|p| p.target_port == port)
        })
    }

    /// Node-wide redirection settings.
    pub fn redirect(&self) -> &RedirectSettings {
        &self.redirect
    }

    /// The workload that owns `ip`.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workload_by_ip.get(&ip)
    }

    /// The service that owns the virtual IP `vip`.
    pub fn service_by_vip(&self, vip: IpAddr) -> Option<&Arc<Service>> {
        self.service_by_vip.get(&vip).map(|&i| &self.services[i])
    }

    /// The workloads served by the agent of `node`.
    pub fn workloads_on_node<'a>(
        &'a self,
        node: &'a str,
    ) -> impl Iterator<Item = &'a Arc<Workload>> + 'a {
        self.workloads.iter().filter(move |w| w.node == node)
    }

    /// The ready endpoints of `service` that are mesh workloads (`service` must be one of
    /// [`Self::services`], compared by pointer); empty for a service of another state.
    pub fn endpoints(&self, service: &Arc<Service>) -> Vec<Arc<Workload>> {
        self.services
            .iter()
            .position(|s| Arc::ptr_eq(s, service))
            .map(|i| self.endpoints[i].workloads().cloned().collect())
            .unwrap_or_default()
    }

    /// Decides where a connection dialled to `dst` goes.
    ///
    /// A service VIP is load-balanced round robin over the service's ready endpoints, or over
    /// its waypoint's if it has one (whether or not the service has endpoints: the waypoint
    /// decides); a workload IP goes to that workload as dialled; anything else passes through.
    /// A service without selector whose listed endpoints are all outside the mesh, or which
    /// lists none, is reached outside the mesh: at the endpoint, or at the address dialled.
    pub fn resolve(&self, dst: SocketAddr) -> Resolved {
        if let Some(&index) = self.service_by_vip.get(&dst.ip()) {
            let service = &self.services[index];
            let Some(port) = service.port(dst.port()) else {
                return Resolved::UnknownServicePort {
                    service: Arc::clone(service),
                    port: dst.port(),
                };
            };
            // Whether the service has a waypoint is the service's own field: a waypoint that
            // cannot be found must refuse, never fall through to the endpoints.
            if let Some(waypoint) = &service.waypoint {
                let found = self.waypoints[index];
                // A waypoint is a mesh workload (the tunnel checks its identity): an address
                // outside the mesh listed by a waypoint service is never one.
                let picked = found.and_then(|w| {
                    self.endpoints[w]
                        .pick(dst.ip(), |t| t.workload.is_some())
                        .and_then(|t| Some((t.workload.as_ref()?, t.ip)))
                });
                return match picked {
                    Some((workload, ip)) => Resolved::Waypoint {
                        workload: Arc::clone(workload),
                        ip,
                        service: Arc::clone(service),
                    },
                    None => Resolved::NoWaypoint {
                        service: Arc::clone(service),
                        waypoint: waypoint.clone(),
                        exists: found.is_some(),
                    },
                };
            }
            return match self.endpoints[index].pick(dst.ip(), |_| true) {
                Some(target) => {
                    let addr = SocketAddr::new(target.ip, target.port(service, port));
                    match &target.workload {
                        Some(workload) => Resolved::Workload {
                            workload: Arc::clone(workload),
                            addr,
                            service: Some(Arc::clone(service)),
                        },
                        None => Resolved::OutsideMesh {
                            addr,
                            service: Arc::clone(service),
                        },
                    }
                }
                // Someone else manages this service's endpoints and Ambit knows none: the
                // address dialled, as ztunnel does for a destination it does not know.
                None if service.lists_endpoints() => Resolved::OutsideMesh {
                    addr: dst,
                    service: Arc::clone(service),
                },
                None => Resolved::NoEndpoints {
                    service: Arc::clone(service),
                },
            };
        }
        match self.workload_by_ip.get(&dst.ip()) {
            Some(workload) => Resolved::Workload {
                workload: Arc::clone(workload),
                addr: dst,
                service: None,
            },
            None => Resolved::Passthrough(dst),
        }
    }
}

impl Default for MeshState {
    fn default() -> Self {
        Self::new(RedirectSettings::default(), Vec::new(), Vec::new())
    }
}

/// The admin endpoint's config dump: the sources' view plus the computed endpoints.
impl Serialize for MeshState {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // The shape is documented (docs/operations.md, "config_dump") and read by `ambit
        // config`: fields are only ever added.
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct ServiceDump<'a> {
            uid: String,
            hostname: String,
            #[serde(flatten)]
            service: &'a Service,
            endpoints: Vec<String>,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct WorkloadDump<'a> {
            uid: String,
            identity: String,
            workload_name: &'a str,
            canonical_service: &'a str,
            canonical_revision: &'a str,
            #[serde(flatten)]
            workload: &'a Workload,
        }
        let services: Vec<ServiceDump<'_>> = self
            .services
            .iter()
            .zip(&self.endpoints)
            .map(|(service, endpoints)| ServiceDump {
                uid: service.uid(),
                hostname: service.hostname(),
                service,
                endpoints: endpoints.targets().map(Target::name).collect(),
            })
            .collect();
        let mut s = serializer.serialize_struct("MeshState", 9)?;
        s.serialize_field("redirect", &self.redirect)?;
        s.serialize_field("trustDomain", &self.trust_domain)?;
        // Through plain references: serde's `rc` feature (Serialize for Arc) is not enabled.
        let workloads: Vec<WorkloadDump<'_>> = self
            .workloads
            .iter()
            .map(|w| WorkloadDump {
                uid: w.uid(),
                identity: self.identity_of(w).to_string(),
                workload_name: w.workload_name(),
                canonical_service: w.canonical_service(),
                canonical_revision: w.canonical_revision(),
                workload: w,
            })
            .collect();
        s.serialize_field("workloads", &workloads)?;
        s.serialize_field("services", &services)?;
        s.serialize_field("peerAuthentications", self.policies.peer_authentications())?;
        let authorizations: Vec<&AuthorizationPolicy> = self
            .policies
            .authorizations()
            .iter()
            .map(|p| &**p)
            .collect();
        s.serialize_field("authorizationPolicies", &authorizations)?;
        let waypoint = self.policies.waypoint();
        let l7: Vec<&crate::policy::l7::WaypointPolicy> =
            waypoint.authorizations().iter().map(|p| &**p).collect();
        s.serialize_field("waypointAuthorizationPolicies", &l7)?;
        let jwt: Vec<&crate::policy::l7::RequestAuthentication> =
            waypoint.authentications().iter().map(|p| &**p).collect();
        s.serialize_field("requestAuthentications", &jwt)?;
        s.serialize_field("routes", &*self.routes)?;
        s.end()
    }
}

#[cfg(test)]
mod tests;
