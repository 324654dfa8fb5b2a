//! Waypoints in Kubernetes: a Gateway API `Gateway` of class `ambit-waypoint` (GAMMA, as
//! Istio's `istio-waypoint`) becomes the objects that run `ambit waypoint` in its namespace.
//!
//! The controller runs in `ambit ca serve --kube` (the cluster's one central component, which
//! already writes the policies' status). For each Gateway of the class it applies, with
//! server-side apply (field manager [`FIELD_MANAGER`]), a ServiceAccount (the waypoint's
//! identity), a ConfigMap with the mesh's trust bundle, a Deployment running `ambit waypoint
//! --kube` and a Service on 15008 named as the Gateway (so that `ambit.dev/use-waypoint:
//! <gateway name>` names it), every one owned by the Gateway: Kubernetes' garbage collector
//! deletes them with it, and each Gateway event applies them again (an edit of the Gateway, or
//! of the controller's settings after a restart, reaches them). The waypoint's pods are not
//! enrolled (`ambit.dev/mode: none`, as Istio's waypoint pods carry
//! `istio.io/dataplane-mode: none`): their tunnels to the endpoints must leave as they are.
//!
//! The Gateway's status says what happened, with Gateway API's conditions: `Accepted` (the
//! listeners are what a waypoint serves: HBONE on 15008, no requested addresses) and
//! `Programmed` (the objects are applied), with the Service's DNS name as its address.
//! [`generate`] prints the Gateway itself (`ambit waypoint generate`).
use std::{collections::BTreeMap, collections::HashMap, fmt::Debug, time::Duration};

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec},
        core::v1::{
            Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar,
            EnvVarSource, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
            ProjectedVolumeSource, SeccompProfile, SecurityContext, Service, ServiceAccount,
            ServiceAccountTokenProjection, ServicePort, ServiceSpec, TCPSocketAction, Volume,
            VolumeMount, VolumeProjection,
        },
        rbac::v1::{ClusterRoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::watcher,
};
use serde::Serialize;
use serde_json::{Value, json};

use super::{
    BACKOFF_MAX, BACKOFF_MIN, ResilientWatch,
    convert::{MODE_LABEL, MODE_NONE},
    gateway::{GATEWAY_API_VERSION, GatewayResource},
};
use crate::timefmt;

/// The GatewayClass whose Gateways are Ambit waypoints (the chart ships it).
pub const WAYPOINT_CLASS: &str = "ambit-waypoint";
/// The `controllerName` of that class.
pub const CONTROLLER_NAME: &str = "ambit.dev/waypoint-controller";
/// The server-side apply field manager of the objects the controller writes.
pub const FIELD_MANAGER: &str = "ambit-waypoint-controller";
/// The port a waypoint listens on for HBONE.
pub const HBONE_PORT: u16 = 15008;
/// The listener protocol of a waypoint (Istio's).
pub const HBONE_PROTOCOL: &str = "HBONE";
/// Gateway API's label naming the Gateway of the objects it deploys.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// The label giving the Gateway's namespace on the cluster-scoped objects (the binding).
pub const GATEWAY_NAMESPACE_LABEL: &str = "ambit.dev/gateway-namespace";
/// The audience of the waypoint's token for the CA (the agents' too).
pub const CA_TOKEN_AUDIENCE: &str = "ambit-ca";

/// The ClusterRole (shipped by the chart) granting a waypoint's ServiceAccount the reads of
/// the Kubernetes source (pods, services, routes...): the node agents' reads.
pub const WAYPOINT_CLUSTER_ROLE: &str = "ambit-waypoint";

/// Where the waypoint's pod finds its files.
const ROOTS_DIR: &str = "/var/run/ambit/ca";
const TOKEN_DIR: &str = "/var/run/secrets/ambit";

/// `ambit waypoint generate`'s output: the Gateway of a waypoint named `name` in `namespace`,
/// as YAML (Istio's `istioctl waypoint generate`, with Ambit's class).
pub fn generate(namespace: &str, name: &str) -> String {
    let gateway = json!({
        "apiVersion": GATEWAY_API_VERSION,
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "gatewayClassName": WAYPOINT_CLASS,
            "listeners": [{"name": "mesh", "port": HBONE_PORT, "protocol": HBONE_PROTOCOL}],
        },
    });
    serde_yaml_ng::to_string(&gateway).expect("JSON serializes to YAML")
}

/// How the waypoints' pods are configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaypointSettings {
    /// The image holding `ambit` (the agents' and the CA's).
    pub image: String,
    /// The CA's address, as the waypoint dials it (`https://ambit-ca.ambit-system.svc:15012`).
    pub ca_address: String,
    /// The mesh's trust bundle (PEM), copied into the waypoint's namespace.
    pub roots_pem: String,
    /// The namespace whose policies are mesh-wide (as the agents').
    pub root_namespace: String,
}

/// Reconciles the Gateways of class [`WAYPOINT_CLASS`]; see the module's doc.
#[derive(Clone)]
pub struct WaypointController {
    client: Client,
    settings: WaypointSettings,
    retry: Duration,
}

impl Debug for WaypointController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WaypointController")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Why a Gateway is not accepted: Gateway API's reason and the message (naming the field).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// `ListenersNotValid` or `UnsupportedAddress`.
    pub reason: &'static str,
    /// The field and why.
    pub message: String,
}

/// Whether `gateway` is a waypoint Ambit can run: its listeners all HBONE on 15008, no
/// addresses requested (the Service's address is the waypoint's).
pub fn check(gateway: &GatewayResource) -> Result<(), Rejection> {
    let spec = &gateway.spec;
    if spec.addresses.as_ref().is_some_and(|a| !a.is_empty()) {
        return Err(Rejection {
            reason: "UnsupportedAddress",
            message: "spec.addresses: a waypoint's address is its Service's; requested addresses \
                      are not supported"
                .into(),
        });
    }
    if spec.listeners.is_empty() {
        return Err(Rejection {
            reason: "ListenersNotValid",
            message: format!(
                "spec.listeners: a waypoint needs one listener, port {HBONE_PORT} protocol \
                 {HBONE_PROTOCOL}"
            ),
        });
    }
    for (i, listener) in spec.listeners.iter().enumerate() {
        if listener.protocol != HBONE_PROTOCOL {
            return Err(Rejection {
                reason: "ListenersNotValid",
                message: format!(
                    "spec.listeners[{i}].protocol: {:?} is not supported by a waypoint (only \
                     {HBONE_PROTOCOL})",
                    listener.protocol
                ),
            });
        }
        if listener.port != i32::from(HBONE_PORT) {
            return Err(Rejection {
                reason: "ListenersNotValid",
                message: format!(
                    "spec.listeners[{i}].port: {} is not {HBONE_PORT}, where a waypoint serves \
                     HBONE",
                    listener.port
                ),
            });
        }
        if listener.tls.is_some() || listener.hostname.is_some() {
            return Err(Rejection {
                reason: "ListenersNotValid",
                message: format!(
                    "spec.listeners[{i}]: hostname and tls are not supported on an HBONE \
                     listener (HBONE is mutual TLS with the mesh's certificates)"
                ),
            });
        }
    }
    Ok(())
}

/// The objects that run the waypoint of `gateway` (which must have a name, namespace and UID).
#[derive(Debug, Clone, PartialEq)]
pub struct WaypointObjects {
    /// Its identity: `spiffe://<td>/ns/<namespace>/sa/<gateway name>`.
    pub service_account: ServiceAccount,
    /// The trust bundle, `<gateway name>-ca-roots`.
    pub roots: ConfigMap,
    /// `ambit waypoint --kube`.
    pub deployment: Deployment,
    /// Port 15008 of the waypoint's pods, named as the Gateway.
    pub service: Service,
    /// Binds [`WAYPOINT_CLUSTER_ROLE`] to the ServiceAccount. Cluster-scoped, so it cannot be
    /// owned by the Gateway: the controller deletes it when the Gateway goes.
    pub binding: ClusterRoleBinding,
}

/// The name of the ClusterRoleBinding of waypoint `namespace/name`.
pub fn binding_name(namespace: &str, name: &str) -> String {
    format!("ambit-waypoint:{namespace}:{name}")
}

impl WaypointSettings {
    /// The objects of `gateway`'s waypoint.
    pub fn objects(&self, gateway: &GatewayResource) -> WaypointObjects {
        let meta = &gateway.metadata;
        let name = meta.name.clone().unwrap_or_default();
        let namespace = meta.namespace.clone().unwrap_or_default();
        let owner = OwnerReference {
            api_version: GATEWAY_API_VERSION.to_string(),
            kind: "Gateway".to_string(),
            name: name.clone(),
            uid: meta.uid.clone().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        let selector = BTreeMap::from([(GATEWAY_NAME_LABEL.to_string(), name.clone())]);
        let mut labels = selector.clone();
        labels.insert("app.kubernetes.io/name".into(), name.clone());
        labels.insert("app.kubernetes.io/component".into(), "waypoint".into());
        labels.insert("app.kubernetes.io/managed-by".into(), FIELD_MANAGER.into());
        labels.insert("app.kubernetes.io/part-of".into(), "ambit".into());
        let object_meta = |object_name: String| ObjectMeta {
            name: Some(object_name),
            namespace: Some(namespace.clone()),
            labels: Some(labels.clone()),
            owner_references: Some(vec![owner.clone()]),
            ..ObjectMeta::default()
        };
        let roots_name = format!("{name}-ca-roots");
        let mut pod_labels = labels.clone();
        // Not enrolled: its tunnels to endpoints must not be captured by its node's agent.
        pod_labels.insert(MODE_LABEL.into(), MODE_NONE.into());
        let field_env = |env: &str, path: &str| EnvVar {
            name: env.into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: path.into(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        };
        let tcp_probe = |initial_delay| Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(HBONE_PORT.into()),
                ..TCPSocketAction::default()
            }),
            initial_delay_seconds: initial_delay,
            period_seconds: Some(10),
            ..Probe::default()
        };
        let container = Container {
            name: "waypoint".into(),
            image: Some(self.image.clone()),
            args: Some(vec![
                "waypoint".into(),
                "--kube".into(),
                format!("--ca-address={}", self.ca_address),
                format!("--ca-roots={ROOTS_DIR}/roots.pem"),
                format!("--ca-token-file={TOKEN_DIR}/token"),
                format!("--root-namespace={}", self.root_namespace),
            ]),
            env: Some(vec![
                field_env("POD_NAME", "metadata.name"),
                field_env("POD_NAMESPACE", "metadata.namespace"),
                field_env("NODE_NAME", "spec.nodeName"),
            ]),
            ports: Some(vec![
                ContainerPort {
                    name: Some("hbone".into()),
                    container_port: HBONE_PORT.into(),
                    protocol: Some("TCP".into()),
                    ..ContainerPort::default()
                },
                ContainerPort {
                    name: Some("metrics".into()),
                    container_port: 15020,
                    protocol: Some("TCP".into()),
                    ..ContainerPort::default()
                },
            ]),
            // It listens only once its configuration and certificate are in.
            readiness_probe: Some(tcp_probe(None)),
            security_context: Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(true),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".into()]),
                    ..Capabilities::default()
                }),
                ..SecurityContext::default()
            }),
            volume_mounts: Some(vec![
                VolumeMount {
                    name: "ca-roots".into(),
                    mount_path: ROOTS_DIR.into(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                },
                VolumeMount {
                    name: "ca-token".into(),
                    mount_path: TOKEN_DIR.into(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                },
            ]),
            ..Container::default()
        };
        let pod = PodSpec {
            service_account_name: Some(name.clone()),
            // `ambit waypoint --kube` reads the API in-cluster with its ServiceAccount's token
            // (the ClusterRole ambit-waypoint's reads); the CA gets the projected token below.
            automount_service_account_token: Some(true),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(65532),
                run_as_group: Some(65532),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            containers: vec![container],
            // Kubernetes' default, said out loud: the waypoint drains for `--drain-timeout`
            // (25 s) after SIGTERM, within it.
            termination_grace_period_seconds: Some(30),
            volumes: Some(vec![
                Volume {
                    name: "ca-roots".into(),
                    config_map: Some(ConfigMapVolumeSource {
                        name: roots_name.clone(),
                        ..ConfigMapVolumeSource::default()
                    }),
                    ..Volume::default()
                },
                Volume {
                    name: "ca-token".into(),
                    projected: Some(ProjectedVolumeSource {
                        sources: Some(vec![VolumeProjection {
                            service_account_token: Some(ServiceAccountTokenProjection {
                                audience: Some(CA_TOKEN_AUDIENCE.into()),
                                expiration_seconds: Some(3600),
                                path: "token".into(),
                                ..ServiceAccountTokenProjection::default()
                            }),
                            ..VolumeProjection::default()
                        }]),
                        ..ProjectedVolumeSource::default()
                    }),
                    ..Volume::default()
                },
            ]),
            ..PodSpec::default()
        };
        let mut binding_labels = labels.clone();
        binding_labels.insert(GATEWAY_NAMESPACE_LABEL.into(), namespace.clone());
        WaypointObjects {
            binding: ClusterRoleBinding {
                metadata: ObjectMeta {
                    name: Some(binding_name(&namespace, &name)),
                    labels: Some(binding_labels),
                    ..ObjectMeta::default()
                },
                role_ref: RoleRef {
                    api_group: Some("rbac.authorization.k8s.io".into()),
                    kind: "ClusterRole".into(),
                    name: WAYPOINT_CLUSTER_ROLE.into(),
                },
                subjects: Some(vec![Subject {
                    kind: "ServiceAccount".into(),
                    name: name.clone(),
                    namespace: Some(namespace.clone()),
                    ..Subject::default()
                }]),
            },
            service_account: ServiceAccount {
                metadata: object_meta(name.clone()),
                automount_service_account_token: Some(false),
                ..ServiceAccount::default()
            },
            roots: ConfigMap {
                metadata: object_meta(roots_name),
                data: Some(BTreeMap::from([(
                    "roots.pem".to_string(),
                    self.roots_pem.clone(),
                )])),
                ..ConfigMap::default()
            },
            deployment: Deployment {
                metadata: object_meta(name.clone()),
                spec: DeploymentSpec {
                    // No `replicas`: left to `kubectl scale` or an autoscaler (default 1).
                    selector: LabelSelector {
                        match_labels: Some(selector.clone()),
                        ..LabelSelector::default()
                    },
                    template: PodTemplateSpec {
                        metadata: Some(ObjectMeta {
                            labels: Some(pod_labels),
                            ..ObjectMeta::default()
                        }),
                        spec: Some(pod),
                    },
                    ..DeploymentSpec::default()
                },
                ..Deployment::default()
            },
            service: Service {
                metadata: object_meta(name.clone()),
                spec: Some(ServiceSpec {
                    selector: Some(selector),
                    ports: Some(vec![ServicePort {
                        name: Some("mesh".into()),
                        port: HBONE_PORT.into(),
                        target_port: Some(IntOrString::Int(HBONE_PORT.into())),
                        protocol: Some("TCP".into()),
                        app_protocol: Some("all".into()),
                        ..ServicePort::default()
                    }]),
                    ..ServiceSpec::default()
                }),
                ..Service::default()
            },
        }
    }
}

/// A Gateway API condition (metav1.Condition), as written in a status patch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
struct GatewayCondition {
    #[serde(rename = "type")]
    type_: &'static str,
    status: &'static str,
    reason: &'static str,
    message: String,
    observed_generation: Option<i64>,
    last_transition_time: String,
}

/// What one reconciliation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Not a waypoint, or gone.
    Skipped,
    /// Rejected: status written, nothing deployed.
    Rejected,
    /// Objects applied and status written.
    Programmed,
}

impl WaypointController {
    /// A controller talking to the API server through `client`.
    pub fn new(client: Client, settings: WaypointSettings) -> Self {
        Self {
            client,
            settings,
            retry: Duration::from_secs(5),
        }
    }

    /// How soon a Gateway whose reconciliation failed is tried again (default 5 s).
    pub fn retry_interval(mut self, retry: Duration) -> Self {
        self.retry = retry;
        self
    }

    /// Watches every Gateway and reconciles those of class [`WAYPOINT_CLASS`]. Returns only if
    /// the watcher ends (it retries errors with backoff, so in practice never).
    pub async fn run(self) -> anyhow::Result<()> {
        let mut watch = ResilientWatch::new(
            Api::<GatewayResource>::all(self.client.clone()),
            watcher::Config::default(),
            BACKOFF_MIN,
            BACKOFF_MAX,
        );
        let mut pending: HashMap<(String, String), GatewayResource> = HashMap::new();
        let mut last_error: Option<String> = None;
        let mut retry = tokio::time::interval(self.retry);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(class = WAYPOINT_CLASS, "reconciling waypoint Gateways");
        loop {
            tokio::select! {
                event = watch.next() => match event {
                    Ok(watcher::Event::Apply(gateway) | watcher::Event::InitApply(gateway)) => {
                        last_error = None;
                        let key = key(&gateway);
                        pending.remove(&key);
                        if !self.reconcile_logged(&gateway).await {
                            pending.insert(key, gateway);
                        }
                    }
                    Ok(watcher::Event::Delete(gateway)) => {
                        // Its namespaced objects go with it (owner references); the binding is
                        // cluster-scoped.
                        pending.remove(&key(&gateway));
                        if gateway.spec.gateway_class_name == WAYPOINT_CLASS {
                            self.unbind(&gateway).await;
                        }
                    }
                    Ok(_) => {}
                    Err(error) => {
                        let message = super::error_chain(&error);
                        if last_error.as_ref() != Some(&message) {
                            tracing::warn!(error = %message, "waypoint controller: watch failed; retrying");
                            last_error = Some(message);
                        }
                    }
                },
                _ = retry.tick(), if !pending.is_empty() => {
                    let batch: Vec<_> = pending.drain().collect();
                    for (key, gateway) in batch {
                        if !self.reconcile_logged(&gateway).await {
                            pending.insert(key, gateway);
                        }
                    }
                }
            }
        }
    }

    /// Deletes the ClusterRoleBinding of a deleted waypoint (best effort: a binding left behind
    /// names a ServiceAccount that no longer exists).
    async fn unbind(&self, gateway: &GatewayResource) {
        let (namespace, name) = key(gateway);
        let api: Api<ClusterRoleBinding> = Api::all(self.client.clone());
        match api
            .delete(&binding_name(&namespace, &name), &Default::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => {
                tracing::warn!(%namespace, %name, %error, "cannot delete the waypoint's ClusterRoleBinding")
            }
        }
    }

    /// Reconciles one Gateway; `false` if it should be tried again.
    async fn reconcile_logged(&self, gateway: &GatewayResource) -> bool {
        match self.reconcile(gateway).await {
            Ok(outcome) => {
                tracing::debug!(gateway = ?key(gateway), ?outcome, "waypoint Gateway reconciled");
                true
            }
            Err(error) => {
                let (namespace, name) = key(gateway);
                tracing::warn!(%namespace, %name, error = %super::error_chain(&error), "cannot reconcile the waypoint Gateway; will retry");
                false
            }
        }
    }

    async fn reconcile(&self, gateway: &GatewayResource) -> Result<Outcome, kube::Error> {
        let meta = &gateway.metadata;
        let (Some(namespace), Some(_), Some(_)) = (
            meta.namespace.as_deref(),
            meta.name.as_deref(),
            meta.uid.as_deref(),
        ) else {
            return Ok(Outcome::Skipped);
        };
        if gateway.spec.gateway_class_name != WAYPOINT_CLASS || meta.deletion_timestamp.is_some() {
            return Ok(Outcome::Skipped);
        }
        if let Err(rejection) = check(gateway) {
            self.write_status(
                gateway,
                ("False", rejection.reason, rejection.message.clone()),
                (
                    "False",
                    "Invalid",
                    format!("not deployed: {}", rejection.message),
                ),
                None,
            )
            .await?;
            return Ok(Outcome::Rejected);
        }
        let objects = self.settings.objects(gateway);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let client = &self.client;
        apply(client, namespace, &objects.service_account, &params).await?;
        apply(client, namespace, &objects.roots, &params).await?;
        apply(client, namespace, &objects.deployment, &params).await?;
        apply(client, namespace, &objects.service, &params).await?;
        let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
        let binding_name = objects.binding.metadata.name.clone().unwrap_or_default();
        bindings
            .patch(&binding_name, &params, &Patch::Apply(&objects.binding))
            .await?;
        let name = meta.name.as_deref().unwrap_or_default();
        let address = format!("{name}.{namespace}.svc.cluster.local");
        self.write_status(
            gateway,
            (
                "True",
                "Accepted",
                "accepted by Ambit's waypoint controller".into(),
            ),
            (
                "True",
                "Programmed",
                format!(
                    "Deployment, Service and ServiceAccount {name} applied; bind services with \
                     the label ambit.dev/use-waypoint={name}"
                ),
            ),
            Some(address),
        )
        .await?;
        Ok(Outcome::Programmed)
    }

    /// Writes the `Accepted` and `Programmed` conditions (and the address) when they differ
    /// from the Gateway's status.
    async fn write_status(
        &self,
        gateway: &GatewayResource,
        accepted: (&'static str, &'static str, String),
        programmed: (&'static str, &'static str, String),
        address: Option<String>,
    ) -> Result<(), kube::Error> {
        let meta = &gateway.metadata;
        let generation = meta.generation;
        let current = serde_json::to_value(&gateway.status).unwrap_or(Value::Null);
        let current_conditions = current["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let condition =
            |type_: &'static str,
             (status, reason, message): (&'static str, &'static str, String)| {
                let previous = current_conditions.iter().find(|c| c["type"] == type_);
                // metav1.Condition: the transition time moves only when the status does.
                let last_transition_time = previous
                    .filter(|c| c["status"] == status)
                    .and_then(|c| c["lastTransitionTime"].as_str())
                    .map_or_else(timefmt::now_rfc3339, str::to_string);
                GatewayCondition {
                    type_,
                    status,
                    reason,
                    message,
                    observed_generation: generation,
                    last_transition_time,
                }
            };
        let conditions = [
            condition("Accepted", accepted),
            condition("Programmed", programmed),
        ];
        let addresses: Vec<Value> = address
            .into_iter()
            .map(|value| json!({"type": "Hostname", "value": value}))
            .collect();
        let up_to_date = conditions.iter().all(|wanted| {
            current_conditions.iter().any(|c| {
                c["type"] == wanted.type_
                    && c["status"] == wanted.status
                    && c["reason"] == wanted.reason
                    && c["message"] == wanted.message.as_str()
                    && c["observedGeneration"].as_i64() == wanted.observed_generation
            })
        }) && current["addresses"].as_array().cloned().unwrap_or_default()
            == addresses;
        if up_to_date {
            return Ok(());
        }
        // Other writers' conditions are kept; a merge patch replaces the whole list.
        let mut all: Vec<Value> = current_conditions
            .into_iter()
            .filter(|c| c["type"] != "Accepted" && c["type"] != "Programmed")
            .collect();
        all.extend(conditions.iter().map(|c| json!(c)));
        let patch = json!({"status": {"conditions": all, "addresses": addresses}});
        let api: Api<GatewayResource> = Api::namespaced(
            self.client.clone(),
            meta.namespace.as_deref().unwrap_or_default(),
        );
        match api
            .patch_status(
                meta.name.as_deref().unwrap_or_default(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {
                tracing::info!(
                    gateway = ?key(gateway),
                    accepted = conditions[0].status,
                    reason = conditions[0].reason,
                    message = %conditions[0].message,
                    "waypoint Gateway status written"
                );
                Ok(())
            }
            // Deleted meanwhile.
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Server-side applies `object` in `namespace`.
async fn apply<K>(
    client: &Client,
    namespace: &str,
    object: &K,
    params: &PatchParams,
) -> Result<(), kube::Error>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Debug
        + Serialize
        + serde::de::DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let name = object.meta().name.clone().unwrap_or_default();
    api.patch(&name, params, &Patch::Apply(object)).await?;
    Ok(())
}

fn key(gateway: &GatewayResource) -> (String, String) {
    (
        gateway.metadata.namespace.clone().unwrap_or_default(),
        gateway.metadata.name.clone().unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests;
