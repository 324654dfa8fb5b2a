//! The Kubernetes configuration source: pods, namespaces, services and EndpointSlices, and
//! Ambit's policy resources (`security.ambit.dev/v1` AuthorizationPolicy and
//! PeerAuthentication, [`security`]; their CRDs are generated from the types of [`crd`]), watched
//! through the API server and turned into the [`MeshState`].
//!
//! One kube-runtime [`watcher()`] per resource type feeds a reflector store (a [`Writer`]) with
//! the few fields the source reads ([`objects`]: memory in proportion to the mesh); every
//! change marks the state dirty, and after a short quiet period (100 ms by default) the stores
//! are converted ([`convert`]) and the new state is published on the same channels as the mesh
//! file's ([`super::watch_mesh_file`]), with a [`ConfigStatus`] whose source is `kubernetes`.
//!
//! Failures never empty the mesh: no state is published until every store has completed its
//! first list, a re-list (after `410 Gone`) replaces a store's content in one step once the list
//! is complete, and while the API server is unreachable the last state stays in force and the
//! status says since when. Watchers retry with exponential backoff and jitter.
//!
//! The policy resources are custom resources: on a cluster where their CRD is not installed
//! (the list answers 404), that kind counts as listed and empty (no policy can exist), with a
//! warning in the log, and its watcher keeps retrying, so policies are picked up once the CRD
//! is installed. Any other error listing them (403: no RBAC for them) holds the first state
//! back like any other kind: publishing a mesh without policies that do exist would open
//! traffic they deny.
//!
//! The resources' status is written by [`run_policy_status`], run once per cluster (by
//! `ambit ca`), not by every agent.
use std::{
    collections::HashMap,
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::{StreamExt as _, stream::BoxStream};
use kube::{
    Api, Client,
    runtime::{
        reflector::{Store, store::Writer},
        watcher::{self, watcher},
    },
};
use serde::de::DeserializeOwned;
use tokio::{sync::watch, time::Instant};

use super::ConfigStatus;
use crate::{
    backoff::Backoff,
    policy::PolicySet,
    state::{MeshState, RedirectSettings, routes::RouteTable},
    timefmt::rfc3339,
};

/// Declares `$type`, a struct with a `metadata: ObjectMeta` field, as the kube resource `$kind`
/// (`$plural`) of `$group`/`$version` (`$api_version` is `group/version`, or `version` for the
/// core group): the traits kube's `Api`, watchers and stores need. The one way Ambit declares
/// the resource types it reads with types of its own (slim views, specs kept as JSON, the
/// Gateway API's structs wrapped for kube 5).
macro_rules! kube_resource {
    ($type:ty, $api_version:expr, $group:expr, $version:literal, $kind:literal, $plural:literal, $scope:ty) => {
        impl k8s_openapi::Resource for $type {
            const API_VERSION: &'static str = $api_version;
            const GROUP: &'static str = $group;
            const KIND: &'static str = $kind;
            const VERSION: &'static str = $version;
            const URL_PATH_SEGMENT: &'static str = $plural;
            type Scope = $scope;
        }

        impl k8s_openapi::Metadata for $type {
            type Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

            fn metadata(&self) -> &Self::Ty {
                &self.metadata
            }

            fn metadata_mut(&mut self) -> &mut Self::Ty {
                &mut self.metadata
            }
        }
    };
}
pub(crate) use kube_resource;

/// Declares `$type`, a namespaced `v1` resource of `$group` kept as the source reads it: its
/// metadata slimmed by [`security::policy_meta`], its `spec` as JSON (so that a field Ambit
/// refuses is seen and named, not dropped while parsing) and its `status` as `$status`. The one
/// way Ambit declares the Istio-shaped and Gateway API resources it judges and reports on.
macro_rules! spec_resource {
    ($(#[$doc:meta])* $type:ident, status: $status:ty, $api_version:expr, $group:expr, $kind:literal, $plural:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, serde::Serialize)]
        pub struct $type {
            /// Name, namespace, UID, resource version, generation, creation time and the
            /// dry-run annotation (nothing else is kept).
            #[serde(
                default,
                deserialize_with = "crate::discovery::kube::security::policy_meta"
            )]
            pub metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
            /// The spec, as JSON.
            #[serde(default)]
            pub spec: serde_json::Value,
            /// What Ambit (and, for the Gateway API, other controllers) reported about it.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub status: Option<$status>,
        }

        $crate::discovery::kube::kube_resource!(
            $type,
            $api_version,
            $group,
            "v1",
            $kind,
            $plural,
            k8s_openapi::NamespaceResourceScope
        );
    };
}
pub(crate) use spec_resource;

mod cgroup;
pub mod convert;
pub mod crd;
pub mod events;
pub mod gateway;
pub mod gateway_routes;
pub mod objects;
pub mod owner;
pub mod policies;
pub mod ratelimit;
mod route_status;
pub mod routes;
pub mod security;
#[cfg(test)]
mod security_tests;
mod status;
#[cfg(test)]
mod tests;
pub mod waypoint_controller;

pub use self::{
    cgroup::pod_cgroup_dir,
    convert::{ClusterView, Converted, Converter},
    security::DEFAULT_ROOT_NAMESPACE,
    status::StatusWriter,
};
use self::{
    gateway_routes::{GrpcRouteResource, HttpRouteResource},
    objects::{EndpointSliceView, NamespaceView, PodView, ServiceView},
    ratelimit::RateLimitPolicyResource,
    routes::{DestinationRuleResource, VirtualServiceResource},
    security::{
        AuthorizationPolicyResource, PeerAuthenticationResource, RequestAuthenticationResource,
    },
};

/// The `source` of this source's [`ConfigStatus`].
pub const SOURCE_NAME: &str = "kubernetes";

/// A client for the API server: from `kubeconfig` if given, else in-cluster credentials (the
/// pod's ServiceAccount), else `$KUBECONFIG` or `~/.kube/config`, as kubectl finds them.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<Client> {
    use anyhow::Context as _;
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading --kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .with_context(|| format!("using --kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no Kubernetes credentials: not in a pod and no kubeconfig (--kubeconfig)")?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// The resource types the source watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WatchedKind {
    /// `v1` Pods.
    Pods,
    /// `v1` Namespaces.
    Namespaces,
    /// `v1` Services.
    Services,
    /// `discovery.k8s.io/v1` EndpointSlices.
    EndpointSlices,
    /// `security.ambit.dev/v1` AuthorizationPolicies (a custom resource).
    AuthorizationPolicies,
    /// `security.ambit.dev/v1` PeerAuthentications (a custom resource).
    PeerAuthentications,
    /// `security.ambit.dev/v1` RequestAuthentications (a custom resource; for waypoints).
    RequestAuthentications,
    /// `networking.ambit.dev/v1` VirtualServices (a custom resource).
    VirtualServices,
    /// `networking.ambit.dev/v1` DestinationRules (a custom resource).
    DestinationRules,
    /// `gateway.networking.k8s.io/v1` HTTPRoutes (the Gateway API's CRDs).
    HttpRoutes,
    /// `gateway.networking.k8s.io/v1` GRPCRoutes (the Gateway API's CRDs).
    GrpcRoutes,
    /// `networking.ambit.dev/v1` RateLimitPolicies (a custom resource).
    RateLimitPolicies,
}

/// How many kinds the source watches.
const KINDS: usize = WatchedKind::ALL.len();

impl WatchedKind {
    /// Every kind, in the order used for indexing.
    pub const ALL: [WatchedKind; 12] = [
        WatchedKind::Pods,
        WatchedKind::Namespaces,
        WatchedKind::Services,
        WatchedKind::EndpointSlices,
        WatchedKind::AuthorizationPolicies,
        WatchedKind::PeerAuthentications,
        WatchedKind::RequestAuthentications,
        WatchedKind::VirtualServices,
        WatchedKind::DestinationRules,
        WatchedKind::HttpRoutes,
        WatchedKind::GrpcRoutes,
        WatchedKind::RateLimitPolicies,
    ];

    /// The resource's plural name, as in the API's paths.
    pub fn plural(self) -> &'static str {
        match self {
            WatchedKind::Pods => "pods",
            WatchedKind::Namespaces => "namespaces",
            WatchedKind::Services => "services",
            WatchedKind::EndpointSlices => "endpointslices",
            WatchedKind::AuthorizationPolicies => "authorizationpolicies",
            WatchedKind::PeerAuthentications => "peerauthentications",
            WatchedKind::RequestAuthentications => "requestauthentications",
            WatchedKind::VirtualServices => "virtualservices",
            WatchedKind::DestinationRules => "destinationrules",
            WatchedKind::HttpRoutes => "httproutes",
            WatchedKind::GrpcRoutes => "grpcroutes",
            WatchedKind::RateLimitPolicies => "ratelimitpolicies",
        }
    }

    /// Whether the kind is one of Ambit's custom resources, whose CRD may not be installed.
    pub fn is_custom(self) -> bool {
        self.group().is_some()
    }

    /// The API group of one of Ambit's custom resources.
    pub fn group(self) -> Option<&'static str> {
        match self {
            WatchedKind::AuthorizationPolicies
            | WatchedKind::PeerAuthentications
            | WatchedKind::RequestAuthentications => Some(security::GROUP),
            WatchedKind::VirtualServices
            | WatchedKind::DestinationRules
            | WatchedKind::RateLimitPolicies => Some(routes::NETWORKING_GROUP),
            WatchedKind::HttpRoutes | WatchedKind::GrpcRoutes => Some(gateway::GATEWAY_GROUP),
            _ => None,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for WatchedKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.plural())?;
        if let Some(group) = self.group() {
            write!(f, ".{group}")?;
        }
        Ok(())
    }
}

/// What a watcher error means for the source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchProblem {
    /// The watch fell out of the API server's history (`410 Gone`): the watcher re-lists. Part
    /// of normal operation, not reported as an error.
    #[error("{kind}: resource version expired, re-listing")]
    Resync {
        /// The resource concerned.
        kind: WatchedKind,
    },
    /// No answer from the API server (connection refused or cut, timeout, TLS failure).
    #[error("{kind}: {message}")]
    Unreachable {
        /// The resource concerned.
        kind: WatchedKind,
        /// The transport error.
        message: String,
    },
    /// A custom resource's type is not served (404 listing it): its CRD is not installed.
    #[error("{kind}: not served by the API server (CRD not installed)")]
    NotInstalled {
        /// The resource concerned.
        kind: WatchedKind,
    },
    /// The API server answered with an error (forbidden, bad request...) or something the
    /// client could not decode.
    #[error("{kind}: {message}")]
    Rejected {
        /// The resource concerned.
        kind: WatchedKind,
        /// The server's status, or the decoding error.
        message: String,
    },
}

impl WatchProblem {
    /// Classifies an error of `kind`'s watcher.
    pub fn classify(kind: WatchedKind, error: &watcher::Error) -> Self {
        let client_error = match error {
            watcher::Error::InitialListFailed(e)
            | watcher::Error::WatchStartFailed(e)
            | watcher::Error::WatchFailed(e) => e,
            watcher::Error::WatchError(status) if status.code == 410 => {
                return WatchProblem::Resync { kind };
            }
            watcher::Error::WatchError(status) => {
                return WatchProblem::Rejected {
                    kind,
                    message: format!("watch error {}: {}", status.code, status.message),
                };
            }
            watcher::Error::NoResourceVersion => {
                return WatchProblem::Rejected {
                    kind,
                    message: error.to_string(),
                };
            }
        };
        match client_error {
            kube::Error::Api(status) if status.code == 410 => WatchProblem::Resync { kind },
            kube::Error::Api(status) if status.code == 404 && kind.is_custom() => {
                WatchProblem::NotInstalled { kind }
            }
            kube::Error::Api(status) => WatchProblem::Rejected {
                kind,
                message: format!("{} {}: {}", status.code, status.reason, status.message),
            },
            kube::Error::SerdeError(_)
            | kube::Error::FromUtf8(_)
            | kube::Error::LinesCodecMaxLineLengthExceeded => WatchProblem::Rejected {
                kind,
                message: client_error.to_string(),
            },
            // Transport: hyper, the tower stack (connect errors), reading the stream, auth
            // refresh... all mean the server could not be talked to.
            _ => WatchProblem::Unreachable {
                kind,
                message: error_chain(client_error),
            },
        }
    }
}

/// `error` and its sources, `: `-separated (connect errors hide the useful part in a source).
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = e.source();
    }
    message
}

/// The Kubernetes configuration source, with its settings.
///
/// ```no_run
/// # async fn doc(state_tx: tokio::sync::watch::Sender<std::sync::Arc<ambit::state::MeshState>>,
/// #              status_tx: tokio::sync::watch::Sender<ambit::discovery::ConfigStatus>) -> anyhow::Result<()> {
/// use ambit::discovery::kube::KubeSource;
/// let client = kube::Client::try_default().await?;
/// KubeSource::new(client, "node-a", "/sys/fs/cgroup").run(state_tx, status_tx).await
/// # }
/// ```
#[derive(Clone)]
pub struct KubeSource {
    client: Client,
    node: String,
    cgroup_root: PathBuf,
    debounce: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
    probe_interval: Duration,
    cgroup_retry: Duration,
    watch_timeout: Option<u32>,
    trust_domain: Option<String>,
    redirect: RedirectSettings,
    root_namespace: String,
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("node", &self.node)
            .field("cgroup_root", &self.cgroup_root)
            .field("debounce", &self.debounce)
            .field("backoff", &(self.backoff_min, self.backoff_max))
            .field("root_namespace", &self.root_namespace)
            .finish_non_exhaustive()
    }
}

impl KubeSource {
    /// A source for the agent of `node`, talking to the API server through `client`; the
    /// node's pods' cgroups are below `cgroup_root`.
    pub fn new(client: Client, node: impl Into<String>, cgroup_root: impl Into<PathBuf>) -> Self {
        Self {
            client,
            node: node.into(),
            cgroup_root: cgroup_root.into(),
            debounce: Duration::from_millis(100),
            backoff_min: BACKOFF_MIN,
            backoff_max: BACKOFF_MAX,
            probe_interval: Duration::from_secs(5),
            cgroup_retry: Duration::from_secs(2),
            watch_timeout: None,
            trust_domain: None,
            redirect: RedirectSettings::default(),
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_string(),
        }
    }

    /// How long the stores must be quiet before a new state is built (default 100 ms; a burst
    /// of changes is never delayed by more than five times this).
    pub fn debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// The watchers' retry delays after an error: from `min`, doubling up to `max`, with
    /// ±25 % jitter (default 800 ms to 30 s).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min;
        self.backoff_max = max.max(min);
        self
    }

    /// While the API server is unreachable, how often `GET /version` checks whether it is back
    /// (default 5 s). A watch that resumes without news is otherwise silent, and the status
    /// would keep saying "unreachable".
    pub fn probe_interval(mut self, interval: Duration) -> Self {
        self.probe_interval = interval;
        self
    }

    /// How soon the state is rebuilt when an enrolled pod of this node has no cgroup yet
    /// (default 2 s).
    pub fn cgroup_retry(mut self, retry: Duration) -> Self {
        self.cgroup_retry = retry;
        self
    }

    /// The server-side timeout of each watch request, in seconds (default: kube-runtime's,
    /// 290 s); the watcher re-watches from where it was when it expires.
    pub fn watch_timeout(mut self, seconds: u32) -> Self {
        self.watch_timeout = Some(seconds);
        self
    }

    /// The trust domain of the states built (default `cluster.local`).
    pub fn trust_domain(mut self, trust_domain: impl Into<String>) -> Self {
        self.trust_domain = Some(trust_domain.into());
        self
    }

    /// The node-wide redirection settings of the states built (default: no exclusions).
    pub fn redirect(mut self, redirect: RedirectSettings) -> Self {
        self.redirect = redirect;
        self
    }

    /// The root namespace, whose policies apply to the whole mesh (default `ambit-system`,
    /// [`DEFAULT_ROOT_NAMESPACE`]: the namespace Ambit is installed in).
    pub fn root_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.root_namespace = namespace.into();
        self
    }

    fn watcher_config(&self) -> watcher::Config {
        let config = watcher::Config::default();
        match self.watch_timeout {
            Some(seconds) => config.timeout(seconds),
            None => config,
        }
    }

    fn reflector<K>(&self, kind: WatchedKind) -> (BoxStream<'static, Signal>, Store<K>)
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        let writer = Writer::default();
        let store = writer.as_reader();
        let reflector = Reflector {
            kind,
            writer,
            watch: ResilientWatch::new(
                Api::all(self.client.clone()),
                self.watcher_config(),
                self.backoff_min,
                self.backoff_max,
            ),
        };
        (reflector.into_stream(), store)
    }

    /// Watches the cluster and publishes a state on `state_tx` on every relevant change, and
    /// the source's health on `status_tx`, until every receiver of `state_tx` is dropped.
    ///
    /// The first state is published once every resource type is listed (a policy kind whose
    /// CRD is not installed counts as listed and empty); until then, and whenever the API
    /// server cannot be reached, `status_tx` carries the reason in `last_error` (the last state
    /// stays published).
    pub async fn run(
        self,
        state_tx: watch::Sender<Arc<MeshState>>,
        status_tx: watch::Sender<ConfigStatus>,
    ) -> anyhow::Result<()> {
        let (pods_stream, pods) = self.reflector(WatchedKind::Pods);
        let (namespaces_stream, namespaces) = self.reflector(WatchedKind::Namespaces);
        let (services_stream, services) = self.reflector(WatchedKind::Services);
        let (slices_stream, endpoint_slices) = self.reflector(WatchedKind::EndpointSlices);
        let (authorizations_stream, authorizations) =
            self.reflector(WatchedKind::AuthorizationPolicies);
        let (peers_stream, peer_authentications) = self.reflector(WatchedKind::PeerAuthentications);
        let (authentications_stream, request_authentications) =
            self.reflector(WatchedKind::RequestAuthentications);
        let (virtual_services_stream, virtual_services) =
            self.reflector(WatchedKind::VirtualServices);
        let (destination_rules_stream, destination_rules) =
            self.reflector(WatchedKind::DestinationRules);
        let (http_routes_stream, http_routes) = self.reflector(WatchedKind::HttpRoutes);
        let (grpc_routes_stream, grpc_routes) = self.reflector(WatchedKind::GrpcRoutes);
        let (rate_limits_stream, rate_limit_policies) =
            self.reflector(WatchedKind::RateLimitPolicies);
        let mut signals = futures::stream::select_all([
            pods_stream,
            namespaces_stream,
            services_stream,
            slices_stream,
            authorizations_stream,
            peers_stream,
            authentications_stream,
            virtual_services_stream,
            destination_rules_stream,
            http_routes_stream,
            grpc_routes_stream,
            rate_limits_stream,
        ]);
        let stores = Stores {
            pods,
            namespaces,
            services,
            endpoint_slices,
            authorizations,
            peer_authentications,
            request_authentications,
            virtual_services,
            destination_rules,
            http_routes,
            grpc_routes,
            rate_limit_policies,
        };

        let mut run = Run {
            converter: Converter::new(self.node.clone(), self.cgroup_root.clone()),
            source: self,
            stores,
            synced: [false; KINDS],
            not_installed: [false; KINDS],
            reported_rejections: HashMap::new(),
            policies_in_force: HashMap::new(),
            reported_route_rejections: HashMap::new(),
            routes_in_force: HashMap::new(),
            health: Health::default(),
            generation: 0,
            published: None,
            dirty: None,
            cgroup_retry_at: None,
            probe: None,
            next_probe: None,
        };
        run.publish_status(&status_tx);
        tracing::info!(node = %run.source.node, "watching the Kubernetes API");

        loop {
            let rebuild_at = match (run.dirty.as_ref().map(Dirty::deadline), run.cgroup_retry_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tokio::select! {
                signal = signals.next() => match signal {
                    Some(signal) => run.on_signal(signal),
                    None => anyhow::bail!("the Kubernetes watchers ended"),
                },
                () = sleep_until(rebuild_at) => {
                    run.dirty = None;
                    run.cgroup_retry_at = None;
                    run.rebuild(&state_tx);
                }
                () = sleep_until(run.next_probe), if run.probe.is_none() => {
                    run.start_probe();
                }
                reachable = poll_probe(&mut run.probe) => {
                    run.on_probe(reachable);
                }
                () = state_tx.closed() => return Ok(()),
            }
            run.publish_status(&status_tx);
        }
    }
}

/// Sleeps until `deadline`; forever if there is none.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

type Probe = Pin<Box<dyn Future<Output = bool> + Send>>;

/// Completes with the running probe's outcome (and clears it); pending if none runs.
async fn poll_probe(probe: &mut Option<Probe>) -> bool {
    match probe {
        Some(running) => {
            let reachable = running.await;
            *probe = None;
            reachable
        }
        None => std::future::pending().await,
    }
}

/// The reflector stores, read when a state is built.
struct Stores {
    pods: Store<PodView>,
    namespaces: Store<NamespaceView>,
    services: Store<ServiceView>,
    endpoint_slices: Store<EndpointSliceView>,
    authorizations: Store<AuthorizationPolicyResource>,
    peer_authentications: Store<PeerAuthenticationResource>,
    request_authentications: Store<RequestAuthenticationResource>,
    virtual_services: Store<VirtualServiceResource>,
    destination_rules: Store<DestinationRuleResource>,
    http_routes: Store<HttpRouteResource>,
    grpc_routes: Store<GrpcRouteResource>,
    rate_limit_policies: Store<RateLimitPolicyResource>,
}

/// One watcher's report to the source's loop.
struct Signal {
    kind: WatchedKind,
    what: SignalKind,
}

enum SignalKind {
    /// A (re-)list is about to start (nothing heard from the server yet).
    Starting,
    /// A (re-)list delivered an object; the store changes only at its end.
    Listing,
    /// A list completed: the store now holds exactly the listed objects.
    Synced,
    /// An object was added, modified or deleted.
    Changed,
    /// The watcher failed; it retries after a backoff.
    Failed(watcher::Error),
}

/// Watchers' first retry delay after an error: client-go's reflector backoff, 800 ms doubling
/// up to [`BACKOFF_MAX`].
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(800);
/// Watchers' longest retry delay.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A kube-runtime [`watcher()`] that retries errors with [`watch_backoff`] and never ends.
///
/// Written out instead of kube-runtime's `StreamBackoff` for one case that does not handle: an
/// API server that answers a watch from an expired resource version with HTTP 410 (rather than
/// a 410 event in the stream) leaves the watcher retrying that version forever, so here the
/// watcher is restarted, which re-lists. Every watch of the Kubernetes code goes through it.
pub(crate) struct ResilientWatch<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    api: Api<K>,
    config: watcher::Config,
    stream: BoxStream<'static, watcher::Result<watcher::Event<K>>>,
    backoff: Backoff,
    /// Set after an error: wait this long before polling the watcher again.
    delay: Option<Duration>,
}

impl<K> ResilientWatch<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    /// Watches `api` with `config`, retrying after an error from `backoff_min`, doubling up to
    /// `backoff_max`, with jitter.
    pub(crate) fn new(
        api: Api<K>,
        config: watcher::Config,
        backoff_min: Duration,
        backoff_max: Duration,
    ) -> Self {
        let stream = watcher(api.clone(), config.clone()).boxed();
        Self {
            api,
            config,
            stream,
            backoff: watch_backoff(backoff_min, backoff_max),
            delay: None,
        }
    }

    /// Starts over with a fresh watcher (list, then watch).
    fn restart(&mut self) {
        self.stream = watcher(self.api.clone(), self.config.clone()).boxed();
    }

    /// The next event, or the error the watcher will retry after a backoff.
    pub(crate) async fn next(&mut self) -> watcher::Result<watcher::Event<K>> {
        loop {
            if let Some(delay) = self.delay.take() {
                tokio::time::sleep(delay).await;
            }
            match self.stream.next().await {
                Some(Ok(event)) => {
                    self.backoff.reset();
                    return Ok(event);
                }
                Some(Err(error)) => {
                    self.delay = Some(self.backoff.next_delay());
                    if matches!(
                        &error,
                        watcher::Error::WatchStartFailed(kube::Error::Api(status)) if status.code == 410
                    ) {
                        self.restart();
                    }
                    return Err(error);
                }
                // kube-runtime's watcher never ends; should it, starting over is the only way on.
                None => {
                    self.delay = Some(self.backoff.next_delay());
                    self.restart();
                }
            }
        }
    }
}

/// A watcher and the store it fills.
struct Reflector<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    kind: WatchedKind,
    writer: Writer<K>,
    watch: ResilientWatch<K>,
}

impl<K> Reflector<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    fn into_stream(self) -> BoxStream<'static, Signal> {
        futures::stream::unfold(self, |mut reflector| async move {
            let signal = reflector.next().await;
            Some((signal, reflector))
        })
        .boxed()
    }

    async fn next(&mut self) -> Signal {
        let what = match self.watch.next().await {
            Ok(event) => {
                self.writer.apply_watcher_event(&event);
                match event {
                    // A (re-)list starting is no answer from the server: the watcher announces
                    // it before its request (a kind whose CRD is not installed does so at
                    // every retry, also while the server is down).
                    watcher::Event::Init => SignalKind::Starting,
                    watcher::Event::InitApply(_) => SignalKind::Listing,
                    watcher::Event::InitDone => SignalKind::Synced,
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) => SignalKind::Changed,
                }
            }
            Err(error) => SignalKind::Failed(error),
        };
        Signal {
            kind: self.kind,
            what,
        }
    }
}

/// Watchers' retry delays: from `min`, doubling up to `max`, each scaled by a factor drawn
/// from [0.75, 1.25] so that a fleet of agents does not retry in step.
fn watch_backoff(min: Duration, max: Duration) -> Backoff {
    Backoff::new(min, max).with_jitter(0.75..=1.25)
}

/// What is wrong with the source right now.
#[derive(Debug, Default)]
struct Health {
    /// Since when the API server has not answered, and the latest transport error.
    unreachable: Option<(SystemTime, String)>,
    /// Per kind: the latest error the server answered with, until that watcher makes progress.
    rejected: [Option<String>; KINDS],
}

impl Health {
    fn message(&self, generation: u64) -> Option<String> {
        let mut parts = Vec::new();
        if let Some((since, error)) = &self.unreachable {
            let since = rfc3339(*since);
            let serving = if generation == 0 {
                "no state received yet".to_string()
            } else {
                format!("serving the last state (generation {generation})")
            };
            parts.push(format!(
                "API server unreachable since {since} ({error}); {serving}"
            ));
        }
        parts.extend(self.rejected.iter().flatten().cloned());
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

/// A pending rebuild.
struct Dirty {
    first: Instant,
    last: Instant,
    debounce: Duration,
}

impl Dirty {
    fn deadline(&self) -> Instant {
        (self.last + self.debounce).min(self.first + self.debounce * 5)
    }
}

/// The source's loop state.
struct Run {
    source: KubeSource,
    converter: Converter,
    stores: Stores,
    /// Per kind: whether the first list completed.
    synced: [bool; KINDS],
    /// Per kind: the type is not served (a custom resource whose CRD is not installed): it
    /// counts as listed and empty, whatever its store still holds.
    not_installed: [bool; KINDS],
    /// The rejected policies last logged, and why: each rejection is logged once.
    reported_rejections: HashMap<routes::RouteKey, String>,
    /// The spec in force of each waypoint policy: a rejected one may keep its last accepted
    /// version (`policies::convert_policies`).
    policies_in_force: HashMap<routes::RouteKey, serde_json::Value>,
    /// Likewise for the routing resources.
    reported_route_rejections: HashMap<routes::RouteKey, String>,
    /// The spec in force of each routing resource: a rejected one keeps its last accepted
    /// version.
    routes_in_force: HashMap<routes::RouteKey, serde_json::Value>,
    health: Health,
    generation: u64,
    published: Option<Arc<MeshState>>,
    dirty: Option<Dirty>,
    cgroup_retry_at: Option<Instant>,
    probe: Option<Probe>,
    next_probe: Option<Instant>,
}

impl Run {
    fn on_signal(&mut self, signal: Signal) {
        let Signal { kind, what } = signal;
        let error = match what {
            SignalKind::Starting => return,
            SignalKind::Failed(error) => error,
            progress => {
                // The server answered this watcher: whatever was wrong with it is over.
                self.health.rejected[kind.index()] = None;
                self.set_reachable(kind);
                match progress {
                    SignalKind::Synced => {
                        if !self.synced[kind.index()] {
                            tracing::debug!(%kind, "first list complete");
                        }
                        if self.not_installed[kind.index()] {
                            tracing::info!(%kind, "now served by the API server (CRD installed)");
                            self.not_installed[kind.index()] = false;
                        }
                        self.synced[kind.index()] = true;
                        self.mark_dirty();
                    }
                    SignalKind::Changed => self.mark_dirty(),
                    SignalKind::Starting | SignalKind::Listing | SignalKind::Failed(_) => {}
                }
                return;
            }
        };
        match WatchProblem::classify(kind, &error) {
            WatchProblem::Resync { .. } => {
                tracing::debug!(%kind, "watch expired (410 Gone); re-listing");
            }
            WatchProblem::NotInstalled { .. } => {
                // The server answered: this is no outage, and no rejection either.
                self.health.rejected[kind.index()] = None;
                self.set_reachable(kind);
                if !self.not_installed[kind.index()] {
                    tracing::warn!(
                        %kind,
                        "CRD not installed: no policies of this kind are enforced until it is \
                         (install deploy/crds/); checking again with backoff"
                    );
                    self.not_installed[kind.index()] = true;
                    self.synced[kind.index()] = true;
                    self.mark_dirty();
                }
            }
            WatchProblem::Unreachable { message, .. } => {
                if self.health.unreachable.is_none() {
                    tracing::warn!(%kind, error = %message, "API server unreachable; keeping the last state");
                    self.next_probe = Some(Instant::now() + self.source.probe_interval);
                }
                let since = self
                    .health
                    .unreachable
                    .as_ref()
                    .map_or_else(SystemTime::now, |(since, _)| *since);
                self.health.unreachable = Some((since, message));
            }
            problem @ WatchProblem::Rejected { .. } => {
                let message = problem.to_string();
                if self.health.rejected[kind.index()].as_ref() != Some(&message) {
                    tracing::warn!(error = %message, "watch failed; retrying");
                }
                self.health.rejected[kind.index()] = Some(message);
            }
        }
    }

    fn set_reachable(&mut self, kind: impl std::fmt::Display) {
        if let Some((since, _)) = self.health.unreachable.take() {
            let down_for = since.elapsed().unwrap_or_default();
            tracing::info!(via = %kind, ?down_for, "API server reachable again");
        }
        self.next_probe = None;
        self.probe = None;
    }

    fn mark_dirty(&mut self) {
        let now = Instant::now();
        let debounce = self.source.debounce;
        let dirty = self.dirty.get_or_insert(Dirty {
            first: now,
            last: now,
            debounce,
        });
        dirty.last = now;
    }

    fn start_probe(&mut self) {
        if self.health.unreachable.is_none() {
            self.next_probe = None;
            return;
        }
        let client = self.source.client.clone();
        let timeout = self.source.probe_interval.max(Duration::from_secs(1));
        self.probe = Some(Box::pin(async move {
            matches!(
                tokio::time::timeout(timeout, client.apiserver_version()).await,
                Ok(Ok(_))
            )
        }));
        self.next_probe = Some(Instant::now() + self.source.probe_interval);
    }

    fn on_probe(&mut self, reachable: bool) {
        if reachable {
            self.set_reachable("GET /version");
        }
    }

    /// Converts the stores and publishes the result if it differs from the last state.
    fn rebuild(&mut self, state_tx: &watch::Sender<Arc<MeshState>>) {
        if let Some(kind) = WatchedKind::ALL.iter().find(|k| !self.synced[k.index()]) {
            // A state built now would miss a whole resource type (every namespace, say, which
            // would un-enrol every pod): wait for the first complete list of each.
            tracing::debug!(waiting_for = %kind, "not all resources listed yet");
            return;
        }
        let (pods, namespaces) = (self.stores.pods.state(), self.stores.namespaces.state());
        let (services, endpoint_slices) = (
            self.stores.services.state(),
            self.stores.endpoint_slices.state(),
        );
        let converted = self.converter.convert(ClusterView {
            pods: &pods,
            namespaces: &namespaces,
            services: &services,
            endpoint_slices: &endpoint_slices,
        });
        drop((pods, namespaces, services, endpoint_slices));
        let policies = self.convert_policies();
        let routes = self.convert_routes(&converted.services);
        if !converted.missing_cgroups.is_empty() {
            tracing::debug!(pods = ?converted.missing_cgroups, "no cgroup found yet for these pods; will look again");
            self.cgroup_retry_at = Some(Instant::now() + self.source.cgroup_retry);
        }
        if let Some(published) = &self.published
            && same_mesh(published, &converted)
            && same_policies(published.policies(), &policies)
            && *published.routes() == routes
        {
            return;
        }
        let (authorization_count, peer_count) = (
            policies.authorizations().len(),
            policies.peer_authentications().len(),
        );
        let enrolled_here = converted
            .workloads
            .iter()
            .filter(|w| w.enrolled && w.node == self.source.node)
            .count();
        let (workloads, services) = (converted.workloads.len(), converted.services.len());
        let mut state = MeshState::new(
            self.source.redirect.clone(),
            converted.workloads,
            converted.services,
        );
        if let Some(trust_domain) = &self.source.trust_domain {
            state = state.with_trust_domain(trust_domain.clone());
        }
        let route_count = routes.by_service.len();
        let state = Arc::new(state.with_policies(policies).with_routes(routes));
        self.generation += 1;
        self.published = Some(state.clone());
        state_tx.send_replace(state);
        tracing::info!(
            generation = self.generation,
            workloads,
            services,
            enrolled_here,
            authorization_policies = authorization_count,
            peer_authentications = peer_count,
            routed_services = route_count,
            "mesh state from Kubernetes published"
        );
    }

    /// The policies of the stores (none of a kind whose CRD is not installed); logs each
    /// rejected resource once.
    fn convert_policies(&mut self) -> PolicySet {
        let served = |kind: WatchedKind| !self.not_installed[kind.index()];
        let authorizations = if served(WatchedKind::AuthorizationPolicies) {
            self.stores.authorizations.state()
        } else {
            Vec::new()
        };
        let peers = if served(WatchedKind::PeerAuthentications) {
            self.stores.peer_authentications.state()
        } else {
            Vec::new()
        };
        let authentications = if served(WatchedKind::RequestAuthentications) {
            self.stores.request_authentications.state()
        } else {
            Vec::new()
        };
        let converted = policies::convert_policies(
            &authorizations,
            &peers,
            &authentications,
            &self.source.root_namespace,
            &self.policies_in_force,
        );
        let mut reported = HashMap::with_capacity(converted.rejected.len());
        report_rejections(
            &self.reported_rejections,
            &mut reported,
            "policy",
            "its fail-closed form (docs/crds.md)",
            converted
                .rejected
                .iter()
                .map(|(key, acceptance)| (key, acceptance)),
            &converted.in_force,
        );
        self.policies_in_force = converted.in_force;
        self.reported_rejections = reported;
        converted.set
    }

    /// The route table of the stores (none of a kind whose CRD is not installed); a rejected
    /// resource keeps its last accepted version, and is logged once.
    fn convert_routes(&mut self, services: &[crate::state::Service]) -> RouteTable {
        let served = |kind: WatchedKind| !self.not_installed[kind.index()];
        let virtual_services = if served(WatchedKind::VirtualServices) {
            self.stores.virtual_services.state()
        } else {
            Vec::new()
        };
        let destination_rules = if served(WatchedKind::DestinationRules) {
            self.stores.destination_rules.state()
        } else {
            Vec::new()
        };
        let converted = routes::convert_routes(
            &virtual_services,
            &destination_rules,
            services,
            &self.routes_in_force,
        );
        let (http_routes, grpc_routes) = (
            if served(WatchedKind::HttpRoutes) {
                self.stores.http_routes.state()
            } else {
                Vec::new()
            },
            if served(WatchedKind::GrpcRoutes) {
                self.stores.grpc_routes.state()
            } else {
                Vec::new()
            },
        );
        let gateway = gateway_routes::convert_gateway_routes(
            &http_routes,
            &grpc_routes,
            services,
            &self.routes_in_force,
        );
        let mut reported = HashMap::new();
        for (key, verdicts) in &gateway.verdicts {
            let Some(rejected) = verdicts
                .iter()
                .find(|v| !v.accepted.status || !v.resolved_refs.status)
            else {
                continue;
            };
            let message = if rejected.accepted.status {
                &rejected.resolved_refs.message
            } else {
                &rejected.accepted.message
            };
            if self.reported_route_rejections.get(key) != Some(message) {
                tracing::warn!(
                    resource = %key,
                    accepted = rejected.accepted.status,
                    reason = if rejected.accepted.status { rejected.resolved_refs.reason } else { rejected.accepted.reason },
                    %message,
                    last_accepted_in_force = gateway.in_force.contains_key(key),
                    "Gateway API route not taken as written; its last accepted version, if any, \
                     stays in force"
                );
            }
            reported.insert(key.clone(), message.clone());
        }
        report_rejections(
            &self.reported_route_rejections,
            &mut reported,
            "routing resource",
            "nothing",
            &converted.verdicts,
            &converted.in_force,
        );
        let rate_limit_policies = if served(WatchedKind::RateLimitPolicies) {
            self.stores.rate_limit_policies.state()
        } else {
            Vec::new()
        };
        let rate_limits =
            ratelimit::convert_rate_limits(&rate_limit_policies, services, &self.routes_in_force);
        report_rejections(
            &self.reported_route_rejections,
            &mut reported,
            "RateLimitPolicy",
            "nothing",
            &rate_limits.verdicts,
            &rate_limits.in_force,
        );
        self.reported_route_rejections = reported;
        let mut table = converted.table;
        table.rate_limits = rate_limits.table;
        for (uid, routes) in gateway.by_service {
            if let Some(virtual_service) = table.by_service.get(&uid) {
                tracing::debug!(
                    service = %uid,
                    gateway_api = %routes.source,
                    ignored = %virtual_service.source,
                    "a service routed by both front ends takes its Gateway API routes"
                );
            }
            table.by_service.insert(uid, routes);
        }
        self.routes_in_force = converted.in_force;
        self.routes_in_force.extend(gateway.in_force);
        self.routes_in_force.extend(rate_limits.in_force);
        table
    }

    fn publish_status(&self, status_tx: &watch::Sender<ConfigStatus>) {
        let status = ConfigStatus {
            generation: self.generation,
            last_error: self.health.message(self.generation),
            source: SOURCE_NAME.to_string(),
            unreachable_since: self
                .health
                .unreachable
                .as_ref()
                .map(|(since, _)| rfc3339(*since)),
        };
        status_tx.send_if_modified(|current| {
            if *current == status {
                return false;
            }
            *current = status;
            true
        });
    }
}

/// Logs each rejected resource of `verdicts` (a `what`: routing resource, RateLimitPolicy,
/// policy) unless it was already reported with the same message (`previous`), and records it in
/// `reported`; what is in force for it is its last accepted version if `in_force` has it, else
/// `otherwise`.
fn report_rejections<'a>(
    previous: &HashMap<routes::RouteKey, String>,
    reported: &mut HashMap<routes::RouteKey, String>,
    what: &str,
    otherwise: &str,
    verdicts: impl IntoIterator<Item = (&'a routes::RouteKey, &'a security::Acceptance)>,
    in_force: &HashMap<routes::RouteKey, serde_json::Value>,
) {
    for (key, acceptance) in verdicts {
        if acceptance.accepted() {
            continue;
        }
        if previous.get(key) != Some(&acceptance.message) {
            let last_accepted_in_force = in_force.contains_key(key);
            tracing::warn!(
                resource = %key,
                reason = %acceptance.verdict,
                message = %acceptance.message,
                last_accepted_in_force,
                "{what} rejected; in force: {}",
                if last_accepted_in_force { "its last accepted version" } else { otherwise }
            );
        }
        reported.insert(key.clone(), acceptance.message.clone());
    }
}

/// Whether two policy sets hold the same policies in the same order (a status written on a
/// policy resource changes nothing the mesh uses).
fn same_policies(a: &PolicySet, b: &PolicySet) -> bool {
    a.authorizations().len() == b.authorizations().len()
        && a.authorizations()
            .iter()
            .zip(b.authorizations())
            .all(|(a, b)| **a == **b)
        && a.peer_authentications() == b.peer_authentications()
        && a.waypoint() == b.waypoint()
}

/// Whether `converted` describes the same mesh as `state` (then nothing is published, so a pod
/// status update that changes nothing the mesh uses costs no reconciliation).
fn same_mesh(state: &MeshState, converted: &Converted) -> bool {
    state.workloads().len() == converted.workloads.len()
        && state.services().len() == converted.services.len()
        && state
            .workloads()
            .iter()
            .zip(&converted.workloads)
            .all(|(a, b)| **a == *b)
        && state
            .services()
            .iter()
            .zip(&converted.services)
            .all(|(a, b)| **a == *b)
}

/// Runs the status writers (policies, and routing resources) with default settings until one
/// fails; see [`StatusWriter`]. Here, not in `status.rs`: the route status writer builds on it.
/// `root_namespace` is the namespace whose policies are mesh-wide (as given to the agents'
/// [`KubeSource::root_namespace`]).
pub async fn run_policy_status(client: Client, root_namespace: String) -> anyhow::Result<()> {
    let writer = StatusWriter::new(client, root_namespace);
    tokio::try_join!(
        writer.clone().run(),
        route_status::RouteStatusWriter::new(writer).run()
    )?;
    Ok(())
}
