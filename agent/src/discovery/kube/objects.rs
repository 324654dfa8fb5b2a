//! The parts of Kubernetes objects the source reads, deserialized straight from the API's JSON.
//!
//! The watchers and their stores hold these instead of k8s-openapi's full types: a `Pod` is
//! 2.4 kB before any of its content (every optional field of a pod spec is inline), and its
//! containers, volumes, annotations and managed fields would all be parsed and kept for
//! nothing. Here every other field is skipped while parsing, so the stores cost memory in
//! proportion to the mesh (docs/operations.md, "Footprint"), not to the size of pod specs.
//!
//! Each view is a kube resource of the same kind, group and version as the object it views,
//! so kube's `Api` and kube-runtime's watcher and stores work with it unchanged.
use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::{
    ClusterResourceScope, NamespaceResourceScope,
    apimachinery::pkg::{
        apis::meta::v1::{ObjectMeta, OwnerReference, Time},
        util::intstr::IntOrString,
    },
};
use serde::{Deserialize, Deserializer};

use crate::serdes::null_as_default;

/// The label by which an EndpointSlice names its service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A Pod: name, namespace, UID, labels, `generateName` and controller; service account, node,
/// host network; phase, addresses, readiness.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct PodView {
    /// Name, namespace, UID, resource version, labels, `generateName` and the controller's owner
    /// reference, its kind and name only (nothing else is kept; see [`super::owner`]).
    #[serde(default, deserialize_with = "pod_meta")]
    pub metadata: ObjectMeta,
    /// `spec`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub spec: PodSpecView,
    /// `status`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub status: PodStatusView,
}
kube_resource!(
    PodView,
    "v1",
    "",
    "v1",
    "Pod",
    "pods",
    NamespaceResourceScope
);

/// The service account a pod runs as: `serviceAccountName`, else the deprecated
/// `serviceAccount` (the first that is not empty), else `default`, as admission fills it in.
/// The agent's mesh and the CA's placement checks must agree on it.
pub fn pod_service_account<'a>(
    service_account_name: Option<&'a str>,
    service_account: Option<&'a str>,
) -> &'a str {
    [service_account_name, service_account]
        .into_iter()
        .flatten()
        .find(|sa| !sa.is_empty())
        .unwrap_or("default")
}

/// The fields of a pod's `spec` the source reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpecView {
    /// `serviceAccountName`.
    pub service_account_name: Option<String>,
    /// `serviceAccount`, the deprecated alias older objects may carry alone.
    pub service_account: Option<String>,
    /// `nodeName`: where the pod is scheduled.
    pub node_name: Option<String>,
    /// `hostNetwork`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub host_network: bool,
}

/// The fields of a pod's `status` the source reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatusView {
    /// `phase`: Pending, Running, Succeeded, Failed, Unknown.
    pub phase: Option<String>,
    /// `podIPs`, parsed (an unparsable entry is dropped).
    #[serde(default, rename = "podIPs", deserialize_with = "pod_ips")]
    pub pod_ips: Vec<IpAddr>,
    /// `podIP`, for servers that do not send `podIPs`.
    #[serde(default, rename = "podIP", deserialize_with = "optional_ip")]
    pub pod_ip: Option<IpAddr>,
    /// Whether the `Ready` condition is `True`.
    #[serde(default, rename = "conditions", deserialize_with = "ready_condition")]
    pub ready: bool,
}

/// A Namespace: its name and labels.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct NamespaceView {
    /// Name, UID, resource version and labels.
    #[serde(default, deserialize_with = "slim_meta")]
    pub metadata: ObjectMeta,
}
kube_resource!(
    NamespaceView,
    "v1",
    "",
    "v1",
    "Namespace",
    "namespaces",
    ClusterResourceScope
);

/// A Service: name, namespace, labels, type, cluster IPs, selector, ports.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ServiceView {
    /// Name, namespace, UID, resource version and labels.
    #[serde(default, deserialize_with = "slim_meta")]
    pub metadata: ObjectMeta,
    /// `spec`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub spec: ServiceSpecView,
}
kube_resource!(
    ServiceView,
    "v1",
    "",
    "v1",
    "Service",
    "services",
    NamespaceResourceScope
);

/// The fields of a service's `spec` the source reads.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpecView {
    /// `type`: ClusterIP, NodePort, LoadBalancer, ExternalName.
    #[serde(rename = "type")]
    pub type_: Option<String>,
    /// `clusterIP` (`None` for a headless service).
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    /// `clusterIPs`: one per IP family.
    #[serde(default, rename = "clusterIPs", deserialize_with = "null_as_default")]
    pub cluster_ips: Vec<String>,
    /// `selector`.
    pub selector: Option<BTreeMap<String, String>>,
    /// `ports`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub ports: Vec<ServicePortView>,
}

/// One of a service's `ports`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePortView {
    /// `name`; required when a service has several ports, and what EndpointSlices use.
    pub name: Option<String>,
    /// `port`, the port clients dial.
    pub port: i32,
    /// `protocol`: TCP (default), UDP, SCTP.
    pub protocol: Option<String>,
    /// `targetPort`: a number, or the name of a container port.
    pub target_port: Option<IntOrString>,
}

/// An EndpointSlice: its namespace, its service, its ports and its endpoints' addresses.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSliceView {
    /// Name, namespace, UID, resource version, and of the labels only
    /// `kubernetes.io/service-name`.
    #[serde(default, deserialize_with = "slice_meta")]
    pub metadata: ObjectMeta,
    /// `ports`: for each service port, the port number the slice's endpoints resolved it to.
    #[serde(default, deserialize_with = "null_as_default")]
    pub ports: Vec<EndpointPortView>,
    /// `endpoints`: each one's address and readiness only (a service without selector is
    /// reached through them; a selector's endpoints are its pods, found by their labels).
    #[serde(default, deserialize_with = "null_as_default")]
    pub endpoints: Vec<SliceEndpointView>,
}
kube_resource!(
    EndpointSliceView,
    "discovery.k8s.io/v1",
    "discovery.k8s.io",
    "v1",
    "EndpointSlice",
    "endpointslices",
    NamespaceResourceScope
);

/// One of an EndpointSlice's `endpoints`: its first address (the one Kubernetes' proxies use)
/// and whether it is ready.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SliceEndpointView {
    /// `addresses[0]`, parsed; `None` when absent or not an IP address (an FQDN slice's).
    pub address: Option<IpAddr>,
    /// `conditions.ready`, where absent (`null`) means ready, as the API says.
    pub ready: bool,
}

impl<'de> Deserialize<'de> for SliceEndpointView {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Endpoint {
            #[serde(default, deserialize_with = "null_as_default")]
            addresses: Vec<String>,
            #[serde(default)]
            conditions: Option<Conditions>,
        }
        #[derive(Deserialize)]
        struct Conditions {
            #[serde(default)]
            ready: Option<bool>,
        }
        let endpoint = Endpoint::deserialize(deserializer)?;
        Ok(Self {
            address: endpoint.addresses.first().and_then(|a| a.parse().ok()),
            ready: endpoint.conditions.and_then(|c| c.ready).unwrap_or(true),
        })
    }
}

/// One of an EndpointSlice's `ports`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPortView {
    /// `name`: the service port's name (empty for a service's single unnamed port).
    pub name: Option<String>,
    /// `port`: the endpoints' port number.
    pub port: Option<i32>,
    /// `protocol`: TCP (default), UDP, SCTP.
    pub protocol: Option<String>,
}

/// The metadata fields kept: everything else (annotations, managed fields, owners...) is
/// skipped while parsing.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SlimMeta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    labels: Option<BTreeMap<String, String>>,
}

impl From<SlimMeta> for ObjectMeta {
    fn from(slim: SlimMeta) -> Self {
        ObjectMeta {
            name: slim.name,
            namespace: slim.namespace,
            uid: slim.uid,
            // The watcher resumes from the last object's version: it must be kept.
            resource_version: slim.resource_version,
            labels: slim.labels,
            ..ObjectMeta::default()
        }
    }
}

/// A pod's metadata: [`SlimMeta`]'s fields, plus what names its workload ([`super::owner`]):
/// `generateName` and, of its owner references, the controller's kind and name; and
/// `deletionTimestamp`, since a terminating pod is no longer an endpoint.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SlimPodMeta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    generate_name: Option<String>,
    #[serde(default, deserialize_with = "controller_reference")]
    owner_references: Option<OwnerReference>,
    deletion_timestamp: Option<Time>,
    #[serde(default, deserialize_with = "capture_annotations")]
    annotations: Option<BTreeMap<String, String>>,
}

/// Of a pod's annotations, only its capture exclusions ([`crate::state::capture`]).
fn capture_annotations<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    use crate::state::capture::ExclusionList;
    let all: Option<BTreeMap<String, String>> = Option::deserialize(deserializer)?;
    let kept: BTreeMap<String, String> = all
        .unwrap_or_default()
        .into_iter()
        .filter(|(key, _)| ExclusionList::ALL.iter().any(|l| l.annotation() == key))
        .collect();
    Ok((!kept.is_empty()).then_some(kept))
}

/// The owner reference with `controller: true`, kind and name only.
fn controller_reference<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<OwnerReference>, D::Error> {
    #[derive(Deserialize)]
    struct Owner {
        kind: String,
        name: String,
        controller: Option<bool>,
    }
    let owners: Option<Vec<Owner>> = Option::deserialize(deserializer)?;
    Ok(owners
        .unwrap_or_default()
        .into_iter()
        .find(|owner| owner.controller == Some(true))
        .map(|owner| OwnerReference {
            kind: owner.kind,
            name: owner.name,
            controller: Some(true),
            ..OwnerReference::default()
        }))
}

fn pod_meta<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    let Some(slim) = Option::<SlimPodMeta>::deserialize(deserializer)? else {
        return Ok(ObjectMeta::default());
    };
    Ok(ObjectMeta {
        generate_name: slim.generate_name,
        owner_references: slim.owner_references.map(|owner| vec![owner]),
        deletion_timestamp: slim.deletion_timestamp,
        annotations: slim.annotations,
        ..ObjectMeta::from(SlimMeta {
            name: slim.name,
            namespace: slim.namespace,
            uid: slim.uid,
            resource_version: slim.resource_version,
            labels: slim.labels,
        })
    })
}

fn slim_meta<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    Ok(Option::<SlimMeta>::deserialize(deserializer)?
        .map(ObjectMeta::from)
        .unwrap_or_default())
}

/// A slice's metadata: the EndpointSlice controller copies all of the service's labels onto
/// every slice, and only the one naming the service is of use here.
fn slice_meta<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    let mut meta = slim_meta(deserializer)?;
    meta.labels = meta.labels.and_then(|mut labels| {
        let service = labels.remove(SERVICE_NAME_LABEL)?;
        Some(BTreeMap::from([(SERVICE_NAME_LABEL.to_string(), service)]))
    });
    Ok(meta)
}

fn pod_ips<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<IpAddr>, D::Error> {
    #[derive(Deserialize)]
    struct PodIp {
        ip: Option<String>,
    }
    let ips: Option<Vec<PodIp>> = Option::deserialize(deserializer)?;
    Ok(ips
        .unwrap_or_default()
        .into_iter()
        .filter_map(|entry| entry.ip?.parse().ok())
        .collect())
}

fn optional_ip<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<IpAddr>, D::Error> {
    let ip: Option<String> = Option::deserialize(deserializer)?;
    Ok(ip.and_then(|ip| ip.parse().ok()))
}

fn ready_condition<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    struct Condition {
        #[serde(rename = "type")]
        type_: String,
        status: String,
    }
    let conditions: Option<Vec<Condition>> = Option::deserialize(deserializer)?;
    Ok(conditions
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn pod_from_api_json() {
        let pod: PodView = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "web-0", "namespace": "shop", "uid": "u-1", "resourceVersion": "42",
                "generateName": "web-",
                "labels": {"app": "web"},
                "annotations": {"big": "x"},
                "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}],
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "other", "uid": "c"},
                    {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "web", "uid": "s",
                     "controller": true, "blockOwnerDeletion": true},
                ],
            },
            "spec": {
                "serviceAccountName": "web", "nodeName": "node-a",
                "containers": [{"name": "app", "image": "example/app", "ports": [{"containerPort": 80}]}],
            },
            "status": {
                "phase": "Running", "podIP": "10.0.0.2",
                "podIPs": [{"ip": "10.0.0.2"}, {"ip": "fd00::2"}, {"ip": "bogus"}],
                "conditions": [
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"},
                ],
                "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "image": "x", "imageID": "y"}],
            },
        }))
        .unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("web-0"));
        assert_eq!(pod.metadata.resource_version.as_deref(), Some("42"));
        assert!(pod.metadata.annotations.is_none() && pod.metadata.managed_fields.is_none());
        // Of the owners, only the controller's kind and name are kept: what names the workload.
        let owners = pod.metadata.owner_references.as_deref().unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(
            (owners[0].kind.as_str(), owners[0].name.as_str()),
            ("StatefulSet", "web")
        );
        assert_eq!(owners[0].controller, Some(true));
        assert!(owners[0].uid.is_empty() && owners[0].api_version.is_empty());
        assert_eq!(pod.metadata.generate_name.as_deref(), Some("web-"));
        assert_eq!(
            super::super::owner::controller_name(&pod.metadata).as_deref(),
            Some("web")
        );
        assert_eq!(pod.spec.node_name.as_deref(), Some("node-a"));
        assert!(!pod.spec.host_network);
        assert_eq!(
            pod.status.pod_ips,
            vec![
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "fd00::2".parse().unwrap()
            ]
        );
        assert!(pod.status.ready);
    }

    #[test]
    fn nulls_and_absences() {
        let pod: PodView = serde_json::from_value(json!({
            "metadata": {"name": "p", "labels": null},
            "spec": {"hostNetwork": null},
            "status": {"podIPs": null, "conditions": null},
        }))
        .unwrap();
        assert_eq!(pod.status, PodStatusView::default());
        let pod: PodView =
            serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": null})).unwrap();
        assert_eq!(pod.spec, PodSpecView::default());
    }

    #[test]
    fn slice_keeps_service_label_and_endpoints() {
        let slice: EndpointSliceView = serde_json::from_value(json!({
            "metadata": {"name": "web-x", "namespace": "shop", "labels": {
                "kubernetes.io/service-name": "web", "app": "web",
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            }},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.0.0.2"], "conditions": {"ready": null, "serving": true},
                 "targetRef": {"kind": "Pod", "name": "web-0"}, "nodeName": "node-a"},
                {"addresses": ["10.0.0.3", "10.0.0.4"], "conditions": {"ready": false}},
                {"addresses": ["db.example.com"]},
            ],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }))
        .unwrap();
        assert_eq!(
            slice.metadata.labels,
            Some(BTreeMap::from([(
                SERVICE_NAME_LABEL.to_string(),
                "web".to_string()
            )]))
        );
        assert_eq!(
            slice.endpoints,
            [
                SliceEndpointView {
                    address: Some("10.0.0.2".parse().unwrap()),
                    ready: true
                },
                SliceEndpointView {
                    address: Some("10.0.0.3".parse().unwrap()),
                    ready: false
                },
                SliceEndpointView {
                    address: None,
                    ready: true
                },
            ]
        );
        assert_eq!(slice.ports[0].port, Some(8080));
        let empty: EndpointSliceView =
            serde_json::from_value(json!({"metadata": {"name": "e"}, "endpoints": null})).unwrap();
        assert!(empty.endpoints.is_empty());
    }
}
