//! The status of Ambit's routing resources (`networking.ambit.dev/v1` VirtualService,
//! DestinationRule and RateLimitPolicy): whether each is accepted as written.
//!
//! A route is judged against the others and the services (a host must be a service, a subset
//! defined by a DestinationRule, one VirtualService per host), so unlike a policy it cannot be
//! judged alone: this writer keeps watch caches of both kinds and of the Services, and once all
//! three are listed, converts them all exactly as the sources do ([`routes::convert_routes`])
//! after every change (debounced), and writes each resource's `Accepted` condition with the
//! policy status writer's code ([`StatusWriter`]: same condition, same Events).
//!
//! Gateway API routes with a Service parent (`gateway_routes`) are judged in the same pass and
//! get the Gateway API's status: one `status.parents[]` entry per Service parent under Ambit's
//! `controllerName` ([`CONTROLLER_NAME`]), with `Accepted` and `ResolvedRefs`; the entries of
//! other controllers (a gateway's, for the same route's Gateway parents) are kept.
use std::{collections::HashMap, fmt::Debug, sync::Arc, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::NamespaceResourceScope;
use kube::{
    Api, Resource,
    api::{Patch, PatchParams},
    runtime::{
        reflector::{Store, store::Writer},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{
    BACKOFF_MAX, BACKOFF_MIN, ClusterView, Converter, ResilientWatch, StatusWriter, WatchProblem,
    WatchedKind,
    gateway_routes::{self, GrpcRouteResource, HttpRouteResource, ParentVerdict, RouteCondition},
    objects::ServiceView,
    ratelimit::{self, RateLimitPolicyResource},
    routes::{self, DestinationRuleResource, RouteKey, RouteKind, VirtualServiceResource},
    waypoint_controller::CONTROLLER_NAME,
};
use crate::timefmt;

/// How long the caches must be quiet before the resources are judged again.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Writes the `Accepted` condition of every routing resource; see the module's doc.
pub struct RouteStatusWriter {
    writer: StatusWriter,
}

/// What the loop heard from one watcher.
enum Heard {
    Progress {
        kind: WatchedKind,
        synced: bool,
    },
    Failed {
        kind: WatchedKind,
        error: watcher::Error,
    },
}

fn watch_into<K>(
    api: Api<K>,
    kind: WatchedKind,
) -> (futures::stream::BoxStream<'static, Heard>, Store<K>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let writer: Writer<K> = Writer::default();
    let store = writer.as_reader();
    let watch = ResilientWatch::new(api, watcher::Config::default(), BACKOFF_MIN, BACKOFF_MAX);
    let stream =
        futures::stream::unfold((watch, writer), move |(mut watch, mut writer)| async move {
            let heard = match watch.next().await {
                Ok(event) => {
                    writer.apply_watcher_event(&event);
                    Heard::Progress {
                        kind,
                        synced: !matches!(
                            event,
                            watcher::Event::Init | watcher::Event::InitApply(_)
                        ),
                    }
                }
                Err(error) => Heard::Failed { kind, error },
            };
            Some((heard, (watch, writer)))
        })
        .boxed();
    (stream, store)
}

impl RouteStatusWriter {
    /// A writer using `writer`'s client and Event settings.
    pub fn new(writer: StatusWriter) -> Self {
        Self { writer }
    }

    /// Watches the routing resources and the services, and keeps the routing resources'
    /// status current. Returns only if the watchers end.
    pub async fn run(self) -> anyhow::Result<()> {
        let client = self.writer.client.clone();
        let (vs_stream, virtual_services) = watch_into(
            Api::<VirtualServiceResource>::all(client.clone()),
            WatchedKind::VirtualServices,
        );
        let (dr_stream, destination_rules) = watch_into(
            Api::<DestinationRuleResource>::all(client.clone()),
            WatchedKind::DestinationRules,
        );
        let (http_stream, http_routes) = watch_into(
            Api::<HttpRouteResource>::all(client.clone()),
            WatchedKind::HttpRoutes,
        );
        let (grpc_stream, grpc_routes) = watch_into(
            Api::<GrpcRouteResource>::all(client.clone()),
            WatchedKind::GrpcRoutes,
        );
        let (rl_stream, rate_limit_policies) = watch_into(
            Api::<RateLimitPolicyResource>::all(client.clone()),
            WatchedKind::RateLimitPolicies,
        );
        let (services_stream, services) =
            watch_into(Api::<ServiceView>::all(client), WatchedKind::Services);
        let mut heard = futures::stream::select_all([
            vs_stream,
            dr_stream,
            http_stream,
            grpc_stream,
            rl_stream,
            services_stream,
        ]);
        let mut synced: HashMap<WatchedKind, bool> = HashMap::new();
        let mut last_errors: HashMap<WatchedKind, String> = HashMap::new();
        let mut dirty_at: Option<Instant> = None;
        // Resources whose status could not be written: judged again on the next pass.
        let mut retry_at: Option<Instant> = None;
        let mut converter = Converter::new(String::new(), std::path::PathBuf::new());
        loop {
            let deadline = match (dirty_at, retry_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tokio::select! {
                item = heard.next() => match item {
                    Some(Heard::Progress { kind, synced: done }) => {
                        last_errors.remove(&kind);
                        if done {
                            synced.insert(kind, true);
                        }
                        dirty_at.get_or_insert_with(|| Instant::now() + DEBOUNCE);
                    }
                    Some(Heard::Failed { kind, error }) => {
                        let problem = WatchProblem::classify(kind, &error);
                        if matches!(problem, WatchProblem::NotInstalled { .. }) {
                            // No resource of this kind can exist: nothing to write.
                            synced.insert(kind, true);
                        }
                        let message = problem.to_string();
                        if last_errors.get(&kind) != Some(&message) {
                            tracing::warn!(error = %message, "route status: watch failed; retrying");
                            last_errors.insert(kind, message);
                        }
                    }
                    None => anyhow::bail!("the route status watchers ended"),
                },
                () = super::sleep_until(deadline) => {
                    let all_synced = [
                        WatchedKind::VirtualServices,
                        WatchedKind::DestinationRules,
                        WatchedKind::HttpRoutes,
                        WatchedKind::GrpcRoutes,
                        WatchedKind::RateLimitPolicies,
                        WatchedKind::Services,
                    ]
                    .iter()
                    .all(|k| synced.get(k) == Some(&true));
                    dirty_at = None;
                    retry_at = None;
                    if all_synced {
                        let failed = self
                            .pass(
                                &mut converter,
                                (&virtual_services, &destination_rules),
                                (&http_routes, &grpc_routes),
                                &rate_limit_policies,
                                &services,
                            )
                            .await;
                        if failed {
                            retry_at = Some(Instant::now() + self.writer.retry);
                        }
                    }
                }
            }
        }
    }

    /// Judges every routing resource and writes the conditions that differ; `true` if a write
    /// failed.
    async fn pass(
        &self,
        converter: &mut Converter,
        (virtual_services, destination_rules): (
            &Store<VirtualServiceResource>,
            &Store<DestinationRuleResource>,
        ),
        (http_routes, grpc_routes): (&Store<HttpRouteResource>, &Store<GrpcRouteResource>),
        rate_limit_policies: &Store<RateLimitPolicyResource>,
        services: &Store<ServiceView>,
    ) -> bool {
        let service_views = services.state();
        let model = converter.convert(ClusterView {
            services: &service_views,
            ..ClusterView::default()
        });
        let (vs, dr): (
            Vec<Arc<VirtualServiceResource>>,
            Vec<Arc<DestinationRuleResource>>,
        ) = (virtual_services.state(), destination_rules.state());
        let converted = routes::convert_routes(&vs, &dr, &model.services, &HashMap::new());
        let mut failed = false;
        let verdict = |kind, meta| converted.verdicts.get(&RouteKey::of(kind, meta)).cloned();
        for resource in &vs {
            if let Some(acceptance) = verdict(RouteKind::VirtualService, &resource.metadata) {
                failed |= !self.write(&**resource, &acceptance).await;
            }
        }
        for resource in &dr {
            if let Some(acceptance) = verdict(RouteKind::DestinationRule, &resource.metadata) {
                failed |= !self.write(&**resource, &acceptance).await;
            }
        }
        let policies = rate_limit_policies.state();
        let limits = ratelimit::convert_rate_limits(&policies, &model.services, &HashMap::new());
        for resource in &policies {
            let key = RouteKey::of(RouteKind::RateLimitPolicy, &resource.metadata);
            if let Some(acceptance) = limits.verdicts.get(&key) {
                failed |= !self.write(&**resource, acceptance).await;
            }
        }
        let (http, grpc) = (http_routes.state(), grpc_routes.state());
        let gateway =
            gateway_routes::convert_gateway_routes(&http, &grpc, &model.services, &HashMap::new());
        let parents = |kind, meta| gateway.verdicts.get(&RouteKey::of(kind, meta));
        for resource in &http {
            if let Some(verdicts) = parents(RouteKind::HttpRoute, &resource.metadata) {
                failed |= !self
                    .write_parents(&**resource, resource.status.as_ref(), verdicts)
                    .await;
            }
        }
        for resource in &grpc {
            if let Some(verdicts) = parents(RouteKind::GrpcRoute, &resource.metadata) {
                failed |= !self
                    .write_parents(&**resource, resource.status.as_ref(), verdicts)
                    .await;
            }
        }
        failed
    }

    /// Brings Ambit's `status.parents[]` entries of a Gateway API route in line with
    /// `verdicts`; `false` if the write failed.
    async fn write_parents<K>(
        &self,
        resource: &K,
        status: Option<&Value>,
        verdicts: &[ParentVerdict],
    ) -> bool
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + Debug,
    {
        let meta = resource.meta();
        let (Some(namespace), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref())
        else {
            return true;
        };
        let current: Vec<Value> = status
            .and_then(|s| s["parents"].as_array())
            .cloned()
            .unwrap_or_default();
        let ours: Vec<&Value> = current
            .iter()
            .filter(|p| p["controllerName"] == CONTROLLER_NAME)
            .collect();
        let wanted: Vec<Value> = verdicts
            .iter()
            .map(|verdict| {
                let previous = ours.iter().find(|p| p["parentRef"] == verdict.parent_ref);
                let condition = |type_: &str, c: &RouteCondition| {
                    let status = if c.status { "True" } else { "False" };
                    // metav1.Condition: the transition time moves only when the status does.
                    let last_transition_time = previous
                        .and_then(|p| p["conditions"].as_array())
                        .and_then(|cs| {
                            cs.iter()
                                .find(|x| x["type"] == type_ && x["status"] == status)
                        })
                        .and_then(|x| x["lastTransitionTime"].as_str())
                        .map_or_else(timefmt::now_rfc3339, str::to_string);
                    json!({
                        "type": type_,
                        "status": status,
                        "reason": c.reason,
                        "message": c.message,
                        "observedGeneration": meta.generation,
                        "lastTransitionTime": last_transition_time,
                    })
                };
                json!({
                    "parentRef": verdict.parent_ref,
                    "controllerName": CONTROLLER_NAME,
                    "conditions": [
                        condition("Accepted", &verdict.accepted),
                        condition("ResolvedRefs", &verdict.resolved_refs),
                    ],
                })
            })
            .collect();
        if ours.len() == wanted.len() && ours.iter().zip(&wanted).all(|(a, b)| *a == b) {
            return true;
        }
        // Other controllers' entries are kept; a merge patch replaces the whole list.
        let mut parents: Vec<Value> = current
            .iter()
            .filter(|p| p["controllerName"] != CONTROLLER_NAME)
            .cloned()
            .collect();
        parents.extend(wanted);
        // Against the version judged: a newer one is judged when the watch delivers it.
        let patch = json!({
            "metadata": {"resourceVersion": meta.resource_version},
            "status": {"parents": parents},
        });
        let api: Api<K> = Api::namespaced(self.writer.client.clone(), namespace);
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                for verdict in verdicts {
                    tracing::info!(
                        kind = K::kind(&()).as_ref(),
                        %namespace,
                        %name,
                        parent = %verdict.parent_ref,
                        accepted = verdict.accepted.reason,
                        resolved_refs = verdict.resolved_refs.reason,
                        message = %verdict.accepted.message,
                        "Gateway API route status written"
                    );
                }
                true
            }
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => true,
            Err(error) => {
                tracing::warn!(
                    kind = K::kind(&()).as_ref(),
                    %namespace,
                    %name,
                    %error,
                    "cannot write the route's status; will retry"
                );
                false
            }
        }
    }

    async fn write<K: super::status::StatusResource>(
        &self,
        resource: &K,
        acceptance: &super::security::Acceptance,
    ) -> bool {
        match self.writer.write_acceptance(resource, acceptance).await {
            Ok(_) => true,
            Err(error) => {
                let meta = resource.meta();
                tracing::warn!(
                    kind = K::kind(&()).as_ref(),
                    namespace = meta.namespace.as_deref().unwrap_or_default(),
                    name = meta.name.as_deref().unwrap_or_default(),
                    %error,
                    "cannot write the routing resource's status; will retry"
                );
                false
            }
        }
    }
}
