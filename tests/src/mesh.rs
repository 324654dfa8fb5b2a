//! The mesh file (docs/configuration.md), as the test bed writes it.
//!
//! Field names are the documented camelCase keys; every field is written explicitly (no
//! reliance on the agent's defaults) so a test reading the file sees exactly what is in force.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The whole mesh file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshFile {
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// Redirect exclusions.
    pub redirect: Redirect,
    /// Workloads (one per pod of the bed).
    pub workloads: Vec<Workload>,
    /// Services.
    pub services: Vec<Service>,
    /// Peer authentication policies, as written in docs/configuration.md (kept as JSON values
    /// so tests can write any shape, including invalid ones).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peer_authentications: Vec<serde_json::Value>,
    /// Authorization policies, as written in docs/configuration.md.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorization_policies: Vec<serde_json::Value>,
    /// JWT authentication at waypoints, as written in docs/l7-policy.md.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_authentications: Vec<serde_json::Value>,
    /// Istio-shaped VirtualServices (`networking.ambit.dev/v1` objects), as JSON values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub virtual_services: Vec<serde_json::Value>,
    /// Istio-shaped DestinationRules, as JSON values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_rules: Vec<serde_json::Value>,
    /// Gateway API HTTPRoutes whose parents are Services, as JSON values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_routes: Vec<serde_json::Value>,
    /// Gateway API GRPCRoutes whose parents are Services, as JSON values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grpc_routes: Vec<serde_json::Value>,
    /// Ambit RateLimitPolicies (local rate limits at waypoints), as JSON values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rate_limit_policies: Vec<serde_json::Value>,
}

/// The routing sections of the mesh file (docs/waypoint.md).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Routing {
    /// `virtualServices`.
    pub virtual_services: Vec<serde_json::Value>,
    /// `destinationRules`.
    pub destination_rules: Vec<serde_json::Value>,
}

/// The Gateway API routing sections of the mesh file (docs/waypoint.md).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GatewayRoutes {
    /// `httpRoutes`.
    pub http_routes: Vec<serde_json::Value>,
    /// `grpcRoutes`.
    pub grpc_routes: Vec<serde_json::Value>,
}

/// The policy sections of the mesh file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policies {
    /// `peerAuthentications`.
    pub peer_authentications: Vec<serde_json::Value>,
    /// `authorizationPolicies`.
    pub authorization_policies: Vec<serde_json::Value>,
    /// `requestAuthentications`.
    pub request_authentications: Vec<serde_json::Value>,
}

/// `redirect:` — outbound TCP to these destination ports / networks is never redirected.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Redirect {
    /// Destination ports never redirected.
    pub exclude_outbound_ports: Vec<u16>,
    /// Destination CIDRs never redirected, e.g. `"192.0.2.0/24"`.
    pub exclude_outbound_cidrs: Vec<String>,
}

/// One workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    /// Unique within its namespace.
    pub name: String,
    /// Kubernetes-style namespace.
    pub namespace: String,
    /// Service account (identity).
    pub service_account: String,
    /// The node whose agent serves it (`n<i>`).
    pub node: String,
    /// Pod addresses (IPv4 and IPv6).
    pub ips: Vec<String>,
    /// Labels matched by service selectors.
    pub labels: BTreeMap<String, String>,
    /// Whether the pod's traffic is meshed.
    pub enrolled: bool,
    /// Whether the workload receives service traffic.
    pub ready: bool,
    /// How the agent finds the pod's network namespace.
    pub netns: NetnsRef,
    /// Destination ports its outbound TCP reaches directly (its own capture exclusions; wider
    /// types than the agent accepts, so that tests can write values it must refuse).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_outbound_ports: Vec<i64>,
    /// Destination networks its outbound TCP reaches directly.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_outbound_cidrs: Vec<String>,
    /// Its ports whose inbound TCP reaches the application directly.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_inbound_ports: Vec<i64>,
}

/// How the agent finds a pod's network namespace: exactly one of the fields is set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetnsRef {
    /// A namespace file (`/run/netns/<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A process in the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// A cgroup directory whose `cgroup.procs` lists a process of the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// Named by the CNI plugin when the pod's sandbox is created.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cni: bool,
}

/// One service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    /// Name, unique with its namespace.
    pub name: String,
    /// Namespace; its endpoints are workloads of this namespace.
    pub namespace: String,
    /// Virtual IPs clients dial.
    pub vips: Vec<String>,
    /// Endpoints: workloads of the same namespace carrying all these labels.
    pub selector: BTreeMap<String, String>,
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// The waypoint (a service of the file) its traffic goes through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<WaypointRef>,
}

/// A service's `waypoint`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaypointRef {
    /// The waypoint service's name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
}

/// A service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    /// The port clients dial on a VIP.
    pub port: u16,
    /// The port on the endpoint.
    pub target_port: u16,
}

impl MeshFile {
    /// Renders the file as YAML.
    pub fn to_yaml(&self) -> anyhow::Result<String> {
        Ok(serde_yaml_ng::to_string(self)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_uses_documented_keys() {
        let m = MeshFile {
            trust_domain: "cluster.local".into(),
            redirect: Redirect {
                exclude_outbound_ports: vec![22],
                exclude_outbound_cidrs: vec!["192.0.2.0/24".into()],
            },
            workloads: vec![Workload {
                name: "p0-0".into(),
                namespace: "default".into(),
                service_account: "default".into(),
                node: "n0".into(),
                ips: vec!["10.10.0.2".into(), "fd00:10:0::2".into()],
                labels: [("app".to_string(), "web".to_string())].into(),
                enrolled: true,
                ready: true,
                netns: NetnsRef {
                    path: Some("/run/netns/x".into()),
                    ..Default::default()
                },
                exclude_outbound_ports: Vec::new(),
                exclude_outbound_cidrs: Vec::new(),
                exclude_inbound_ports: Vec::new(),
            }],
            services: vec![Service {
                name: "web".into(),
                namespace: "default".into(),
                vips: vec!["10.96.0.10".into()],
                selector: [("app".to_string(), "web".to_string())].into(),
                ports: vec![ServicePort {
                    port: 80,
                    target_port: 8080,
                }],
                waypoint: None,
            }],
            peer_authentications: Vec::new(),
            authorization_policies: Vec::new(),
            request_authentications: Vec::new(),
            virtual_services: Vec::new(),
            destination_rules: Vec::new(),
            http_routes: Vec::new(),
            grpc_routes: Vec::new(),
            rate_limit_policies: Vec::new(),
        };
        let y = m.to_yaml().unwrap();
        for key in [
            "excludeOutboundPorts:",
            "excludeOutboundCidrs:",
            "serviceAccount: default",
            "enrolled: true",
            "netns:\n    path: /run/netns/x",
            "targetPort: 8080",
            "vips:",
            "selector:",
        ] {
            assert!(y.contains(key), "missing {key:?} in\n{y}");
        }
        let back: MeshFile = serde_yaml_ng::from_str(&y).unwrap();
        assert_eq!(back, m);
    }
}
