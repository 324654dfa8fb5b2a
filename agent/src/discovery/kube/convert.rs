//! Kubernetes objects to the mesh model: which pods are workloads, which are enrolled, what a
//! service's VIPs, ports and (for a service without selector) endpoints are.
//!
//! [`Converter::convert`] reads the reflector stores (of the [`objects`](super::objects) views)
//! and builds the workloads and services. It is pure apart from the cgroup lookups of this
//! node's pods.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
};

use k8s_openapi::apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString};

use super::{
    cgroup::pod_cgroup_dir,
    objects::{
        EndpointSliceView, NamespaceView, PodView, SERVICE_NAME_LABEL, ServiceView,
        pod_service_account,
    },
};
use crate::{
    netns::NetnsRef,
    state::{CaptureExclusions, EndpointAddress, Service, ServicePort, WaypointRef, Workload},
};

/// The label that enrols a namespace or a pod (`ambient`), or opts a pod out (`none`).
pub const MODE_LABEL: &str = "ambit.dev/mode";
/// [`MODE_LABEL`]'s value that enrols.
pub const MODE_AMBIENT: &str = "ambient";
/// [`MODE_LABEL`]'s value that opts a pod out even in an enrolled namespace.
pub const MODE_NONE: &str = "none";
/// The label that binds a service, or every service of a namespace, to a waypoint: its value
/// names the waypoint's Service (Istio's `istio.io/use-waypoint`).
pub const USE_WAYPOINT_LABEL: &str = "ambit.dev/use-waypoint";
/// The label giving the namespace of the waypoint named by [`USE_WAYPOINT_LABEL`] on the same
/// object (default: the service's own namespace).
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "ambit.dev/use-waypoint-namespace";
/// [`USE_WAYPOINT_LABEL`]'s value that opts a service out of its namespace's waypoint.
pub const WAYPOINT_NONE: &str = "none";

/// The stores' contents, as the conversion reads them.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClusterView<'a> {
    /// Every pod of the cluster (other nodes' pods are endpoints of services).
    pub pods: &'a [Arc<PodView>],
    /// Every namespace (for the enrolment label).
    pub namespaces: &'a [Arc<NamespaceView>],
    /// Every service.
    pub services: &'a [Arc<ServiceView>],
    /// Every EndpointSlice (to resolve named target ports, and the endpoints of services
    /// without selector).
    pub endpoint_slices: &'a [Arc<EndpointSliceView>],
}

/// The outcome of one conversion.
#[derive(Debug, Default)]
pub struct Converted {
    /// The workloads, sorted by namespace and name.
    pub workloads: Vec<Workload>,
    /// The services, sorted by namespace and name.
    pub services: Vec<Service>,
    /// `namespace/name` of this node's enrolled pods whose cgroup was not found: their
    /// `netns` is a guess, and the conversion is worth redoing shortly.
    pub missing_cgroups: Vec<String>,
}

/// Converts the cluster's objects for the agent of one node; remembers where this node's pods'
/// cgroups are between conversions.
#[derive(Debug)]
pub struct Converter {
    node: String,
    cgroup_root: PathBuf,
    /// Pod UID to its cgroup directory, for this node's pods found so far.
    cgroups: HashMap<String, PathBuf>,
}

impl Converter {
    /// A converter for the agent of `node`, whose pods' cgroups are below `cgroup_root`.
    pub fn new(node: impl Into<String>, cgroup_root: impl Into<PathBuf>) -> Self {
        Self {
            node: node.into(),
            cgroup_root: cgroup_root.into(),
            cgroups: HashMap::new(),
        }
    }

    /// Builds the workloads and services of `view`.
    ///
    /// Rules (docs/configuration.md, "The Kubernetes source"): a pod is a workload when it is
    /// Running and has an address; it is enrolled when it or its namespace carries
    /// `ambit.dev/mode=ambient`, it does not carry `ambit.dev/mode=none`, and it is not on the
    /// host network. A service is kept when it has a cluster IP; its TCP ports are kept, with a
    /// named `targetPort` resolved through the service's EndpointSlices; a service without
    /// selector lists its slices' ready endpoints.
    pub fn convert(&mut self, view: ClusterView<'_>) -> Converted {
        let namespaces: HashMap<&str, &ObjectMeta> = view
            .namespaces
            .iter()
            .filter_map(|ns| Some((ns.metadata.name.as_deref()?, &ns.metadata)))
            .collect();

        let mut missing_cgroups = Vec::new();
        let mut live_uids = Vec::new();
        let mut workloads: Vec<Workload> = view
            .pods
            .iter()
            .filter_map(|pod| {
                let namespace = pod.metadata.namespace.as_deref()?;
                let namespace_enrolled = namespaces
                    .get(namespace)
                    .is_some_and(|meta| mode(meta) == Some(MODE_AMBIENT));
                let Some(mut workload) = workload_from_pod(pod, namespace_enrolled) else {
                    // A pod of this node whose sandbox is being made: known without addresses,
                    // so the CNI plugin's request for it can be answered before it runs.
                    return starting_workload_from_pod(pod, namespace_enrolled)
                        .filter(|w| w.node == self.node);
                };
                if workload.node == self.node {
                    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
                    match self.pod_cgroup(uid) {
                        Some(dir) => {
                            live_uids.push(uid.to_string());
                            workload.netns = NetnsRef::Cgroup(dir);
                        }
                        None => {
                            // Where a cgroupfs kubelet would have put a Guaranteed pod: the
                            // enrolment error then names the pod, and a later conversion
                            // replaces it once the cgroup appears.
                            workload.netns = NetnsRef::Cgroup(
                                self.cgroup_root.join(format!("kubepods/pod{uid}")),
                            );
                            if workload.enrolled {
                                missing_cgroups.push(workload.uid());
                            }
                        }
                    }
                }
                Some(workload)
            })
            .collect();
        workloads.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        // Forget pods that are gone, so the cache stays as large as the node's pod count.
        if self.cgroups.len() > live_uids.len() {
            let live: HashSet<&str> = live_uids.iter().map(String::as_str).collect();
            self.cgroups.retain(|uid, _| live.contains(uid.as_str()));
        }

        let slices = SlicesByService::new(view.endpoint_slices);
        let mut services: Vec<Service> = view
            .services
            .iter()
            .filter_map(|service| {
                let mut converted = service_from(service, &slices)?;
                let namespace = namespaces.get(converted.namespace.as_str()).copied();
                converted.waypoint = waypoint_for(&service.metadata, namespace);
                Some(converted)
            })
            .collect();
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

        Converted {
            workloads,
            services,
            missing_cgroups,
        }
    }

    fn pod_cgroup(&mut self, uid: &str) -> Option<PathBuf> {
        if let Some(dir) = self.cgroups.get(uid) {
            if dir.is_dir() {
                return Some(dir.clone());
            }
            self.cgroups.remove(uid);
        }
        let dir = pod_cgroup_dir(&self.cgroup_root, uid)?;
        self.cgroups.insert(uid.to_string(), dir.clone());
        Some(dir)
    }
}

fn mode(meta: &ObjectMeta) -> Option<&str> {
    meta.labels.as_ref()?.get(MODE_LABEL).map(String::as_str)
}

/// The workload of `pod`, or `None` if the pod is not one (not Running, or no address).
///
/// `namespace_enrolled` says whether the pod's namespace carries the enrolment label. The
/// workload's `netns` is left empty ([`NetnsRef::Path`] of an empty path): only the agent of the
/// pod's node opens it, and [`Converter::convert`] fills it in for that node's pods.
pub fn workload_from_pod(pod: &PodView, namespace_enrolled: bool) -> Option<Workload> {
    let status = &pod.status;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let ips: Vec<IpAddr> = if status.pod_ips.is_empty() {
        status.pod_ip.into_iter().collect()
    } else {
        status.pod_ips.clone()
    };
    if ips.is_empty() {
        return None;
    }
    pod_workload(pod, namespace_enrolled, ips, NetnsRef::Path(PathBuf::new()))
}

/// The workload of a pod whose sandbox is being created (phase Pending, scheduled): no
/// addresses yet, its namespace to be named by the CNI plugin.
pub fn starting_workload_from_pod(pod: &PodView, namespace_enrolled: bool) -> Option<Workload> {
    let status = &pod.status;
    if !matches!(status.phase.as_deref(), None | Some("Pending")) || pod.spec.node_name.is_none() {
        return None;
    }
    pod_workload(pod, namespace_enrolled, Vec::new(), NetnsRef::Cni)
}

fn pod_workload(
    pod: &PodView,
    namespace_enrolled: bool,
    ips: Vec<IpAddr>,
    netns: NetnsRef,
) -> Option<Workload> {
    let (meta, spec, status) = (&pod.metadata, &pod.spec, &pod.status);
    let enrolled = !spec.host_network
        && match mode(meta) {
            Some(MODE_NONE) => false,
            Some(MODE_AMBIENT) => true,
            _ => namespace_enrolled,
        };
    let service_account = pod_service_account(
        spec.service_account_name.as_deref(),
        spec.service_account.as_deref(),
    )
    .to_string();
    Some(Workload {
        name: meta.name.clone()?,
        controller: super::owner::controller_name(meta),
        namespace: meta.namespace.clone()?,
        service_account,
        node: spec.node_name.clone().unwrap_or_default(),
        labels: meta.labels.clone().unwrap_or_default(),
        enrolled,
        // A terminating pod is no endpoint any more, as the EndpointSlice controller marks it
        // (`ready: false`, `terminating: true`): new connections go elsewhere while it drains.
        ready: status.ready && !ips.is_empty() && meta.deletion_timestamp.is_none(),
        ips,
        netns,
        // A refused annotation leaves the pod captured whole; the agent of its node reports it.
        capture_exclusions: CaptureExclusions::from_annotations_or_none(
            meta.annotations.as_ref().unwrap_or(&BTreeMap::new()),
        ),
    })
}

/// The waypoint of the service with metadata `service`, whose namespace has metadata
/// `namespace` (`None` if not known yet).
///
/// The service's [`USE_WAYPOINT_LABEL`] wins over its namespace's; [`WAYPOINT_NONE`] on the
/// service opts it out. The waypoint's namespace is [`USE_WAYPOINT_NAMESPACE_LABEL`] of the
/// object that named it, or the service's namespace. Any other value, even one naming no
/// service, binds: traffic is then refused rather than sent around the waypoint. A waypoint's
/// own service is never bound to itself (a namespace label reaches it too), so the waypoint's
/// pods are reached directly.
pub fn waypoint_for(service: &ObjectMeta, namespace: Option<&ObjectMeta>) -> Option<WaypointRef> {
    let (name, own_namespace) = (service.name.as_deref()?, service.namespace.as_deref()?);
    // `Some(None)`: the object opts out; `None`: it says nothing.
    let named_by = |meta: &ObjectMeta| -> Option<Option<WaypointRef>> {
        let labels = meta.labels.as_ref()?;
        let waypoint = labels.get(USE_WAYPOINT_LABEL)?;
        if waypoint == WAYPOINT_NONE {
            return Some(None);
        }
        let waypoint_namespace = labels
            .get(USE_WAYPOINT_NAMESPACE_LABEL)
            .map_or(own_namespace, String::as_str);
        Some(Some(WaypointRef {
            namespace: waypoint_namespace.to_string(),
            name: waypoint.clone(),
        }))
    };
    let waypoint = named_by(service)
        .or_else(|| namespace.and_then(named_by))
        .flatten()?;
    (waypoint.namespace != own_namespace || waypoint.name != name).then_some(waypoint)
}

/// The EndpointSlices in use, by (namespace, service name).
pub struct SlicesByService<'a> {
    by_service: HashMap<(&'a str, &'a str), Vec<&'a EndpointSliceView>>,
}

impl<'a> SlicesByService<'a> {
    /// Indexes `slices` by the service they belong to; slices without endpoints are left out
    /// (their port mapping is used by no endpoint).
    pub fn new(slices: &'a [Arc<EndpointSliceView>]) -> Self {
        let mut by_service: HashMap<(&str, &str), Vec<&EndpointSliceView>> = HashMap::new();
        for slice in slices {
            let in_use = !slice.endpoints.is_empty();
            let namespace = slice.metadata.namespace.as_deref();
            let service = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|labels| labels.get(SERVICE_NAME_LABEL));
            if let (true, Some(namespace), Some(service)) = (in_use, namespace, service) {
                by_service
                    .entry((namespace, service))
                    .or_default()
                    .push(slice);
            }
        }
        // Slice order decides ties below; make it independent of the store's order.
        for slices in by_service.values_mut() {
            slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        }
        Self { by_service }
    }

    /// The endpoint port number of the service port named `port_name` ("" for an unnamed
    /// port): the one most endpoints use, the lowest on a tie. EndpointSlices carry, per group
    /// of endpoints, the number those endpoints resolved the named target port to; the mesh
    /// model has one target port per service port, so endpoints that resolved it differently
    /// (pods of two versions naming different ports alike) are reached on the majority's.
    fn resolve(&self, namespace: &str, service: &str, port_name: &str) -> Option<u16> {
        let mut votes: BTreeMap<u16, usize> = BTreeMap::new();
        for slice in self.by_service.get(&(namespace, service))? {
            for port in &slice.ports {
                let tcp = port.protocol.as_deref().unwrap_or("TCP") == "TCP";
                if tcp
                    && port.name.as_deref().unwrap_or("") == port_name
                    && let Some(number) = port
                        .port
                        .and_then(|p| u16::try_from(p).ok())
                        .filter(|&p| p != 0)
                {
                    *votes.entry(number).or_default() += slice.endpoints.len();
                }
            }
        }
        let best = votes.values().copied().max()?;
        votes
            .into_iter()
            .find(|&(_, n)| n == best)
            .map(|(port, _)| port)
    }

    /// The ready endpoints of the service `namespace/service`, whose TCP ports are `ports`
    /// (`(name, port)`, the name "" for an unnamed port), by address: each slice's ready
    /// endpoints in slice-name order, an address listed twice once (the first), with the port
    /// numbers their slice gives the service's ports by name. Addresses that cannot be an
    /// endpoint ([`EndpointAddress::unusable`]) are left out, as Kubernetes' own validation
    /// refuses them.
    fn endpoint_addresses(
        &self,
        namespace: &str,
        service: &str,
        ports: &[(&str, u16)],
    ) -> Vec<EndpointAddress> {
        let Some(slices) = self.by_service.get(&(namespace, service)) else {
            return Vec::new();
        };
        let mut seen = HashSet::new();
        let mut endpoints = Vec::new();
        for slice in slices {
            let slice_ports: BTreeMap<u16, u16> = slice
                .ports
                .iter()
                .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                .filter_map(|p| {
                    let name = p.name.as_deref().unwrap_or("");
                    let number = p
                        .port
                        .and_then(|n| u16::try_from(n).ok())
                        .filter(|&n| n != 0)?;
                    let (_, service_port) = ports.iter().find(|(n, _)| *n == name)?;
                    Some((*service_port, number))
                })
                .collect();
            for endpoint in &slice.endpoints {
                let Some(ip) = endpoint.address.filter(|_| endpoint.ready) else {
                    continue;
                };
                if EndpointAddress::unusable(ip).is_none() && seen.insert(ip) {
                    endpoints.push(EndpointAddress {
                        ip,
                        ports: slice_ports.clone(),
                    });
                }
            }
        }
        endpoints
    }
}

/// The mesh service of `service`, or `None` if it has no cluster IP (headless, ExternalName).
///
/// Only TCP ports are kept (the mesh carries TCP only). A numeric `targetPort` is used as is;
/// a named one is resolved through `slices`, and a port whose name no in-use slice resolves yet
/// is left out until one does: sending its traffic to a guessed port would be worse than
/// refusing it. A service without selector gets its endpoints from `slices` (ready ones, by
/// address, with the slice's port for each service port of the same name).
pub fn service_from(service: &ServiceView, slices: &SlicesByService<'_>) -> Option<Service> {
    let meta = &service.metadata;
    let spec = &service.spec;
    let name = meta.name.as_deref()?;
    let namespace = meta.namespace.as_deref()?;
    let cluster_ips = if spec.cluster_ips.is_empty() {
        spec.cluster_ip.as_slice()
    } else {
        spec.cluster_ips.as_slice()
    };
    // "None" (headless) does not parse, and neither does the empty ExternalName clusterIP.
    let vips: Vec<IpAddr> = cluster_ips
        .iter()
        .filter_map(|ip| ip.parse().ok())
        .collect();
    if vips.is_empty() {
        return None;
    }
    let mut ports: Vec<ServicePort> = Vec::new();
    // (name, port) of the TCP ports kept, to match a selector-less service's slices by name.
    let mut names: Vec<(&str, u16)> = Vec::new();
    for port in &spec.ports {
        if port.protocol.as_deref().unwrap_or("TCP") != "TCP" {
            continue;
        }
        let Some(number) = u16::try_from(port.port).ok().filter(|&p| p != 0) else {
            continue;
        };
        let target_port = match &port.target_port {
            None => Some(number),
            Some(IntOrString::Int(target)) => u16::try_from(*target).ok().filter(|&p| p != 0),
            Some(IntOrString::String(target)) => match target.parse::<u16>() {
                // The API server accepts "8080" as a string too.
                Ok(target) if target != 0 => Some(target),
                _ => slices.resolve(namespace, name, port.name.as_deref().unwrap_or("")),
            },
        };
        if let Some(target_port) = target_port
            && !ports.iter().any(|p| p.port == number)
        {
            ports.push(ServicePort {
                port: number,
                target_port,
            });
            names.push((port.name.as_deref().unwrap_or(""), number));
        }
    }
    let selector = spec.selector.clone().unwrap_or_default();
    // Without a selector, the endpoints are whatever the service's EndpointSlices list (the
    // `kubernetes` service, hand-made slices): no pod is selected by labels.
    let endpoint_addresses = if selector.is_empty() {
        slices.endpoint_addresses(namespace, name, &names)
    } else {
        Vec::new()
    };
    Some(Service {
        name: name.to_string(),
        namespace: namespace.to_string(),
        vips,
        selector,
        endpoint_addresses,
        ports,
        // Set by the conversion, which knows the namespace's labels.
        waypoint: None,
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::{
        core::v1::{
            Container, Namespace, Pod, PodCondition, PodIP, PodSpec, PodStatus,
            Service as KubeService, ServicePort as KubeServicePort, ServiceSpec,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    };
    use serde::{Serialize, de::DeserializeOwned};

    use super::*;

    /// What a watcher would deliver for `object`: its JSON, parsed into a view.
    fn view<V: DeserializeOwned>(object: &impl Serialize) -> V {
        serde_json::from_value(serde_json::to_value(object).unwrap()).unwrap()
    }

    fn views<V: DeserializeOwned>(objects: &[impl Serialize]) -> Vec<Arc<V>> {
        objects.iter().map(|o| Arc::new(view(o))).collect()
    }

    fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn pod(name: &str, node: &str, ip: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                uid: Some(format!("uid-{name}")),
                labels: labels(&[("app", "web")]),
                annotations: labels(&[("big", "annotation")]),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                service_account_name: Some("web".into()),
                containers: vec![Container {
                    name: "app".into(),
                    image: Some("example/app:1".into()),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some(ip.into()),
                pod_ips: Some(vec![PodIP { ip: ip.into() }]),
                conditions: Some(vec![
                    PodCondition {
                        type_: "PodScheduled".into(),
                        status: "True".into(),
                        ..PodCondition::default()
                    },
                    PodCondition {
                        type_: "Ready".into(),
                        status: "True".into(),
                        message: Some("all good".into()),
                        ..PodCondition::default()
                    },
                ]),
                ..PodStatus::default()
            }),
        }
    }

    fn namespace(name: &str, mode: Option<&str>) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: mode.and_then(|m| labels(&[(MODE_LABEL, m)])),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        }
    }

    fn service(ports: Vec<KubeServicePort>) -> KubeService {
        KubeService {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("shop".into()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some("10.96.0.10".into()),
                cluster_ips: Some(vec!["10.96.0.10".into(), "fd00::10".into()]),
                selector: labels(&[("app", "web")]),
                ports: Some(ports),
                ..ServiceSpec::default()
            }),
            status: None,
        }
    }

    fn port(name: &str, port: i32, target: Option<IntOrString>) -> KubeServicePort {
        KubeServicePort {
            name: Some(name.into()),
            port,
            target_port: target,
            protocol: Some("TCP".into()),
            ..KubeServicePort::default()
        }
    }

    fn slice(name: &str, ports: &[(&str, i32)], endpoints: usize) -> EndpointSlice {
        slice_of(name, ports, &vec![("10.0.0.2", None); endpoints])
    }

    /// A slice of `web` whose endpoints are `(address, ready condition)`.
    fn slice_of(
        name: &str,
        ports: &[(&str, i32)],
        endpoints: &[(&str, Option<bool>)],
    ) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                labels: labels(&[(SERVICE_NAME_LABEL, "web")]),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints: Some(
                endpoints
                    .iter()
                    .map(|(address, ready)| Endpoint {
                        addresses: vec![address.to_string()],
                        conditions: Some(EndpointConditions {
                            ready: *ready,
                            ..EndpointConditions::default()
                        }),
                        ..Endpoint::default()
                    })
                    .collect(),
            ),
            ports: Some(
                ports
                    .iter()
                    .map(|(name, port)| EndpointPort {
                        name: Some(name.to_string()),
                        port: Some(*port),
                        protocol: Some("TCP".into()),
                        ..EndpointPort::default()
                    })
                    .collect(),
            ),
        }
    }

    fn workload(pod: &Pod, namespace_enrolled: bool) -> Option<Workload> {
        workload_from_pod(&view(pod), namespace_enrolled)
    }

    fn convert(pods: &[Pod], namespaces: &[Namespace]) -> Converted {
        let (pods, namespaces) = (views(pods), views(namespaces));
        Converter::new("node-a", "/nonexistent").convert(ClusterView {
            pods: &pods,
            namespaces: &namespaces,
            ..ClusterView::default()
        })
    }

    #[test]
    fn pod_fields() {
        let w = workload(&pod("web-0", "node-b", "10.0.0.2"), true).unwrap();
        assert_eq!(w.name, "web-0");
        assert_eq!(w.namespace, "shop");
        assert_eq!(w.service_account, "web");
        assert_eq!(w.node, "node-b");
        assert_eq!(w.ips, vec!["10.0.0.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(w.labels, labels(&[("app", "web")]).unwrap());
        assert!(w.enrolled && w.ready);
    }

    #[test]
    fn capture_exclusion_annotations() {
        use crate::state::capture::ExclusionList;
        let annotated = |pairs: &[(ExclusionList, &str)]| {
            let mut p = pod("p", "node-b", "10.0.0.2");
            let annotations = p.metadata.annotations.get_or_insert_default();
            for (list, value) in pairs {
                annotations.insert(list.annotation().into(), (*value).into());
            }
            workload(&p, true).unwrap().capture_exclusions
        };
        let got = annotated(&[
            (ExclusionList::OutboundPorts, "5432, 22"),
            (ExclusionList::OutboundCidrs, "10.9.0.0/16"),
            (ExclusionList::InboundPorts, "9090"),
        ]);
        assert_eq!(got.outbound_ports, [22, 5432]);
        assert_eq!(got.outbound_cidrs.len(), 1);
        assert_eq!(got.inbound_ports, [9090]);
        assert_eq!(got.refused, None);
        assert!(annotated(&[]).is_unset());
        // A bad value: no exclusions at all (captured whole), and why.
        let refused = annotated(&[
            (ExclusionList::OutboundPorts, "22"),
            (ExclusionList::InboundPorts, "15006"),
        ]);
        assert!(refused.is_empty());
        assert_eq!(
            refused.refused.as_deref(),
            Some(
                "annotation ambit.dev/exclude-inbound-ports: 15006 is one of the agent's own ports in the pod (15001, 15006, 15008), which cannot be excluded"
            )
        );
    }

    #[test]
    fn enrolment_rules() {
        let with_label = |mode: Option<&str>| {
            let mut p = pod("p", "node-b", "10.0.0.2");
            if let Some(mode) = mode {
                p.metadata
                    .labels
                    .as_mut()
                    .unwrap()
                    .insert(MODE_LABEL.into(), mode.into());
            }
            p
        };
        let enrolled = |p: &Pod, ns: bool| workload(p, ns).unwrap().enrolled;
        assert!(enrolled(&with_label(None), true));
        assert!(!enrolled(&with_label(None), false));
        assert!(enrolled(&with_label(Some(MODE_AMBIENT)), false));
        assert!(!enrolled(&with_label(Some(MODE_NONE)), true));
        let mut host = with_label(Some(MODE_AMBIENT));
        host.spec.as_mut().unwrap().host_network = Some(true);
        assert!(
            !enrolled(&host, true),
            "host-network pods are never enrolled"
        );
    }

    #[test]
    fn skipped_pods_and_defaults() {
        let mut pending = pod("p", "node-b", "10.0.0.2");
        pending.status.as_mut().unwrap().phase = Some("Pending".into());
        assert!(workload(&pending, true).is_none());
        let mut no_ip = pod("p", "node-b", "10.0.0.2");
        let status = no_ip.status.as_mut().unwrap();
        status.pod_ips = None;
        status.pod_ip = None;
        assert!(workload(&no_ip, true).is_none());
        let mut old_server = pod("p", "node-b", "10.0.0.2");
        old_server.status.as_mut().unwrap().pod_ips = None;
        assert_eq!(
            workload(&old_server, true).unwrap().ips.len(),
            1,
            "podIP alone is enough"
        );
        let mut unready = pod("p", "node-b", "10.0.0.2");
        unready.status.as_mut().unwrap().conditions = None;
        assert!(!workload(&unready, true).unwrap().ready);
        let mut terminating = pod("p", "node-b", "10.0.0.2");
        terminating.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()),
        );
        let terminating = workload(&terminating, true).unwrap();
        assert!(
            !terminating.ready && terminating.enrolled,
            "a terminating pod stays enrolled but is no endpoint"
        );
        let mut no_sa = pod("p", "node-b", "10.0.0.2");
        no_sa.spec.as_mut().unwrap().service_account_name = None;
        assert_eq!(workload(&no_sa, true).unwrap().service_account, "default");
        no_sa.spec.as_mut().unwrap().service_account = Some("legacy".into());
        assert_eq!(workload(&no_sa, true).unwrap().service_account, "legacy");
    }

    #[test]
    fn namespace_label_enrols() {
        let pods = [
            pod("a", "node-b", "10.0.0.2"),
            pod("b", "node-b", "10.0.0.3"),
        ];
        let out = convert(&pods, &[namespace("shop", Some(MODE_AMBIENT))]);
        assert!(out.workloads.iter().all(|w| w.enrolled));
        let out = convert(&pods, &[namespace("shop", None)]);
        assert!(out.workloads.iter().all(|w| !w.enrolled));
        // A namespace not (yet) in the store enrols nothing.
        let out = convert(&pods, &[]);
        assert!(out.workloads.iter().all(|w| !w.enrolled));
        assert_eq!(out.workloads.len(), 2);
    }

    #[test]
    fn local_pods_get_their_cgroup() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("kubepods/besteffort/poduid-web-0");
        std::fs::create_dir_all(&dir).unwrap();
        let pods = views(&[
            pod("web-0", "node-a", "10.0.0.2"),
            pod("web-1", "node-a", "10.0.0.3"),
            pod("web-2", "node-b", "10.0.0.4"),
        ]);
        let namespaces = views(&[namespace("shop", Some(MODE_AMBIENT))]);
        let view = ClusterView {
            pods: &pods,
            namespaces: &namespaces,
            ..ClusterView::default()
        };
        let mut converter = Converter::new("node-a", root.path());
        let out = converter.convert(view);
        assert_eq!(out.workloads[0].netns, NetnsRef::Cgroup(dir));
        assert_eq!(
            out.workloads[1].netns,
            NetnsRef::Cgroup(root.path().join("kubepods/poduid-web-1"))
        );
        assert_eq!(out.workloads[2].netns, NetnsRef::Path(PathBuf::new()));
        assert_eq!(out.missing_cgroups, vec!["shop/web-1".to_string()]);

        // The cgroup appears: the next conversion finds it.
        let dir1 = root
            .path()
            .join("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-poduid_web_1.slice");
        std::fs::create_dir_all(&dir1).unwrap();
        let out = converter.convert(view);
        assert_eq!(out.workloads[1].netns, NetnsRef::Cgroup(dir1));
        assert!(out.missing_cgroups.is_empty());
    }

    #[test]
    fn service_fields() {
        let svc = service(vec![
            port("http", 80, Some(IntOrString::Int(8080))),
            port("plain", 81, None),
            port("str", 82, Some(IntOrString::String("9090".into()))),
            KubeServicePort {
                protocol: Some("UDP".into()),
                ..port("dns", 53, None)
            },
        ]);
        let out = service_from(&view(&svc), &SlicesByService::new(&[])).unwrap();
        assert_eq!(out.name, "web");
        assert_eq!(out.namespace, "shop");
        assert_eq!(
            out.vips,
            vec![
                "10.96.0.10".parse::<IpAddr>().unwrap(),
                "fd00::10".parse().unwrap()
            ]
        );
        assert_eq!(out.selector, labels(&[("app", "web")]).unwrap());
        assert_eq!(
            out.ports,
            vec![
                ServicePort {
                    port: 80,
                    target_port: 8080
                },
                ServicePort {
                    port: 81,
                    target_port: 81
                },
                ServicePort {
                    port: 82,
                    target_port: 9090
                },
            ]
        );
    }

    #[test]
    fn headless_and_external_services_are_skipped() {
        let mut headless = service(vec![port("http", 80, None)]);
        let spec = headless.spec.as_mut().unwrap();
        spec.cluster_ip = Some("None".into());
        spec.cluster_ips = Some(vec!["None".into()]);
        assert!(service_from(&view(&headless), &SlicesByService::new(&[])).is_none());
        let mut external = service(vec![]);
        let spec = external.spec.as_mut().unwrap();
        spec.type_ = Some("ExternalName".into());
        spec.external_name = Some("db.example.com".into());
        spec.cluster_ip = None;
        spec.cluster_ips = None;
        assert!(service_from(&view(&external), &SlicesByService::new(&[])).is_none());
    }

    #[test]
    fn named_target_port_from_slices() {
        let svc: ServiceView = view(&service(vec![
            port("http", 80, Some(IntOrString::String("web".into()))),
            port("admin", 81, Some(IntOrString::String("admin".into()))),
        ]));
        // No slice yet: the named ports are left out rather than guessed.
        let out = service_from(&svc, &SlicesByService::new(&[])).unwrap();
        assert!(out.ports.is_empty());

        let slices = views(&[
            slice("web-a", &[("http", 8080), ("admin", 9000)], 2),
            slice("web-b", &[("http", 8081)], 1),
            slice("web-c", &[("http", 8081)], 2),
            // An empty slice's mapping is used by nobody.
            slice("web-d", &[("http", 7000), ("admin", 7001)], 0),
        ]);
        let out = service_from(&svc, &SlicesByService::new(&slices)).unwrap();
        assert_eq!(
            out.ports,
            vec![
                ServicePort {
                    port: 80,
                    target_port: 8081
                },
                ServicePort {
                    port: 81,
                    target_port: 9000
                },
            ]
        );
    }

    #[test]
    fn a_service_without_selector_lists_its_slices_endpoints() {
        let mut svc = service(vec![
            port("https", 443, Some(IntOrString::Int(6443))),
            port("metrics", 9100, None),
        ]);
        svc.spec.as_mut().unwrap().selector = None;
        let svc: ServiceView = view(&svc);
        // No slice: no endpoint (a connection then goes to the address dialled).
        let out = service_from(&svc, &SlicesByService::new(&[])).unwrap();
        assert!(out.selector.is_empty() && out.endpoint_addresses.is_empty());

        let slices = views(&[
            // Sorted by name: b's endpoints come after a's whatever the store's order.
            slice_of(
                "web-b",
                &[("https", 7443), ("metrics", 9100), ("other", 1)],
                &[("192.0.2.10", None), ("10.0.0.3", Some(true))],
            ),
            slice_of(
                "web-a",
                &[("https", 6443)],
                &[
                    ("192.0.2.10", Some(true)),
                    ("192.0.2.11", Some(false)),
                    ("127.0.0.1", None),
                    ("169.254.0.1", None),
                    ("db.example.com", None),
                ],
            ),
        ]);
        let out = service_from(&svc, &SlicesByService::new(&slices)).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            out.endpoint_addresses,
            [
                // The first slice's port for https; its slice has none for metrics.
                EndpointAddress {
                    ip: ip("192.0.2.10"),
                    ports: BTreeMap::from([(443, 6443)]),
                },
                EndpointAddress {
                    ip: ip("10.0.0.3"),
                    ports: BTreeMap::from([(443, 7443), (9100, 9100)]),
                },
            ]
        );

        // With a selector, the slices mirror the selected pods: the labels decide.
        let mut selected: ServiceView = svc.clone();
        selected.spec.selector = labels(&[("app", "web")]);
        let out = service_from(&selected, &SlicesByService::new(&slices)).unwrap();
        assert!(out.endpoint_addresses.is_empty());
    }

    fn meta(namespace: Option<&str>, name: &str, pairs: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: namespace.map(Into::into),
            labels: labels(pairs),
            ..ObjectMeta::default()
        }
    }

    fn waypoint(namespace: &str, name: &str) -> Option<WaypointRef> {
        Some(WaypointRef {
            namespace: namespace.into(),
            name: name.into(),
        })
    }

    #[test]
    fn waypoint_binding_rules() {
        let svc = |pairs: &[(&str, &str)]| meta(Some("shop"), "web", pairs);
        let ns = |pairs: &[(&str, &str)]| meta(None, "shop", pairs);
        let bound = ns(&[(USE_WAYPOINT_LABEL, "wp")]);

        // On the namespace: every service of it, the waypoint in the same namespace.
        assert_eq!(
            waypoint_for(&svc(&[]), Some(&bound)),
            waypoint("shop", "wp")
        );
        // Not bound anywhere, or the namespace not known yet.
        assert_eq!(waypoint_for(&svc(&[]), Some(&ns(&[]))), None);
        assert_eq!(waypoint_for(&svc(&[]), None), None);
        // On the service, alone or winning over the namespace's.
        let own = svc(&[(USE_WAYPOINT_LABEL, "own")]);
        assert_eq!(waypoint_for(&own, None), waypoint("shop", "own"));
        assert_eq!(waypoint_for(&own, Some(&bound)), waypoint("shop", "own"));
        // `none` on the service opts out of the namespace's waypoint.
        let opted_out = svc(&[(USE_WAYPOINT_LABEL, WAYPOINT_NONE)]);
        assert_eq!(waypoint_for(&opted_out, Some(&bound)), None);
        // The namespace label goes with the name label of the same object.
        let elsewhere = svc(&[
            (USE_WAYPOINT_LABEL, "shared"),
            (USE_WAYPOINT_NAMESPACE_LABEL, "infra"),
        ]);
        assert_eq!(
            waypoint_for(&elsewhere, Some(&bound)),
            waypoint("infra", "shared")
        );
        let ns_elsewhere = ns(&[
            (USE_WAYPOINT_LABEL, "shared"),
            (USE_WAYPOINT_NAMESPACE_LABEL, "infra"),
        ]);
        assert_eq!(
            waypoint_for(&svc(&[]), Some(&ns_elsewhere)),
            waypoint("infra", "shared")
        );
        assert_eq!(
            waypoint_for(&own, Some(&ns_elsewhere)),
            waypoint("shop", "own")
        );
        let stray_namespace = svc(&[(USE_WAYPOINT_NAMESPACE_LABEL, "infra")]);
        assert_eq!(
            waypoint_for(&stray_namespace, Some(&bound)),
            waypoint("shop", "wp")
        );
        // The waypoint's own service, reached by its namespace's label, is not bound to itself;
        // a waypoint of the same name in another namespace is another service.
        let wp = meta(Some("shop"), "wp", &[]);
        assert_eq!(waypoint_for(&wp, Some(&bound)), None);
        let other = meta(Some("other"), "wp", &[]);
        assert_eq!(
            waypoint_for(
                &other,
                Some(&ns(&[
                    (USE_WAYPOINT_LABEL, "wp"),
                    (USE_WAYPOINT_NAMESPACE_LABEL, "shop")
                ]))
            ),
            waypoint("shop", "wp")
        );
    }

    #[test]
    fn conversion_binds_services_to_their_namespace_waypoint() {
        let mut web = service(vec![port("http", 80, None)]);
        let mut wp = service(vec![port("mesh", 15008, None)]);
        wp.metadata.name = Some("wp".into());
        wp.spec.as_mut().unwrap().cluster_ips = Some(vec!["10.96.0.20".into()]);
        let mut api = service(vec![port("http", 80, None)]);
        api.metadata.name = Some("api".into());
        api.metadata.labels = labels(&[(USE_WAYPOINT_LABEL, WAYPOINT_NONE)]);
        api.spec.as_mut().unwrap().cluster_ips = Some(vec!["10.96.0.30".into()]);
        let mut shop = namespace("shop", Some(MODE_AMBIENT));
        shop.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(USE_WAYPOINT_LABEL.into(), "wp".into());
        web.metadata.labels = labels(&[("app", "web")]);
        let (services, namespaces) = (views(&[web, wp, api]), views(&[shop]));
        let out = Converter::new("node-a", "/nonexistent").convert(ClusterView {
            services: &services,
            namespaces: &namespaces,
            ..ClusterView::default()
        });
        let by_name = |name: &str| {
            out.services
                .iter()
                .find(|s| s.name == name)
                .unwrap()
                .waypoint
                .clone()
        };
        assert_eq!(by_name("web"), waypoint("shop", "wp"));
        assert_eq!(by_name("wp"), None, "a waypoint does not use itself");
        assert_eq!(by_name("api"), None, "opted out");
    }
}
