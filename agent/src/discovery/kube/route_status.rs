//! The status of Ambit's routing resources (`networking.ambit.dev/v1` VirtualService and
//! DestinationRule): whether each is accepted as written.
//!
//! A route is judged against the others and the services (a host must be a service, a subset
//! defined by a DestinationRule, one VirtualService per host), so unlike a policy it cannot be
//! judged alone: this writer keeps watch caches of both kinds and of the Services, and once all
//! three are listed, converts them all exactly as the sources do ([`routes::convert_routes`])
//! after every change (debounced), and writes each resource's `Accepted` condition with the
//! policy status writer's code ([`StatusWriter`]: same condition, same Events).
use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::StreamExt as _;
use kube::{
    Api,
    runtime::{
        reflector::{Store, store::Writer},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use super::{
    BACKOFF_MAX, BACKOFF_MIN, ClusterView, Converter, ResilientWatch, StatusWriter, WatchProblem,
    WatchedKind,
    objects::ServiceView,
    routes::{self, DestinationRuleResource, RouteKey, RouteKind, VirtualServiceResource},
};

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
    K: kube::Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
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
        let (services_stream, services) =
            watch_into(Api::<ServiceView>::all(client), WatchedKind::Services);
        let mut heard = futures::stream::select_all([vs_stream, dr_stream, services_stream]);
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
                        WatchedKind::Services,
                    ]
                    .iter()
                    .all(|k| synced.get(k) == Some(&true));
                    dirty_at = None;
                    retry_at = None;
                    if all_synced {
                        let failed = self
                            .pass(&mut converter, &virtual_services, &destination_rules, &services)
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
        virtual_services: &Store<VirtualServiceResource>,
        destination_rules: &Store<DestinationRuleResource>,
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
        failed
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
