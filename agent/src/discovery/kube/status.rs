//! The status of Ambit's policy resources: whether each is accepted as written
//! (`docs/crds.md`, "Status").
//!
//! One writer per cluster (run by `ambit ca`, the central Deployment) watches both kinds,
//! converts each resource exactly as the node agents do ([`super::security`]) and, when the
//! resource's `Accepted` condition is not what the conversion says, patches the `status`
//! subresource. An Event (`events.k8s.io/v1`, regarding the policy, reason the condition's) is
//! emitted when the condition itself changes, not when only `observedGeneration` catches up, so
//! a resource edited without changing the verdict produces no Event, and a restarted writer
//! produces none either.
use std::{collections::HashMap, fmt::Debug, time::Duration};

use futures::{StreamExt as _, stream::BoxStream};
use k8s_openapi::{NamespaceResourceScope, api::core::v1::ObjectReference};
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams},
    runtime::watcher,
};
use serde::de::DeserializeOwned;
use serde_json::json;

use super::{
    BACKOFF_MAX, BACKOFF_MIN, ResilientWatch, WatchedKind,
    events::{self, EventReport},
    security::{
        ACCEPTED_CONDITION, Acceptance, AuthorizationPolicyResource, PeerAuthenticationResource,
        PolicyCondition, PolicyStatus, RequestAuthenticationResource, authorization_acceptance,
        peer_authentication, request_authentication,
    },
};
use crate::timefmt;

/// The `reportingController` of the Events written.
pub const REPORTING_CONTROLLER: &str = "ambit.dev/policy-status";

/// Writes the `Accepted` condition of every AuthorizationPolicy, PeerAuthentication and
/// RequestAuthentication of the cluster, and an Event whenever it changes.
#[derive(Clone)]
pub struct StatusWriter {
    pub(super) client: Client,
    root_namespace: String,
    instance: String,
    pub(super) retry: Duration,
}

impl Debug for StatusWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusWriter")
            .field("root_namespace", &self.root_namespace)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

/// A resource whose `Accepted` condition the writer maintains (a policy or a routing resource).
pub(super) trait StatusResource:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + Debug
    + Send
    + Sync
    + 'static
{
    fn status(&self) -> Option<&PolicyStatus>;
}

/// One of the two policy kinds, as the writer handles it: judged on its own.
trait PolicyResource: StatusResource {
    const WATCHED: WatchedKind;

    fn acceptance(&self, root_namespace: &str) -> Acceptance;
}

macro_rules! status_resource {
    ($($type:ty),*) => {$(
        impl StatusResource for $type {
            fn status(&self) -> Option<&PolicyStatus> {
                self.status.as_ref()
            }
        }
    )*};
}
status_resource!(
    AuthorizationPolicyResource,
    PeerAuthenticationResource,
    RequestAuthenticationResource,
    super::routes::VirtualServiceResource,
    super::routes::DestinationRuleResource,
    super::ratelimit::RateLimitPolicyResource
);

impl PolicyResource for AuthorizationPolicyResource {
    const WATCHED: WatchedKind = WatchedKind::AuthorizationPolicies;

    fn acceptance(&self, root_namespace: &str) -> Acceptance {
        authorization_acceptance(self, root_namespace)
    }
}

impl PolicyResource for RequestAuthenticationResource {
    const WATCHED: WatchedKind = WatchedKind::RequestAuthentications;

    fn acceptance(&self, _root_namespace: &str) -> Acceptance {
        request_authentication(self).acceptance
    }
}

impl PolicyResource for PeerAuthenticationResource {
    const WATCHED: WatchedKind = WatchedKind::PeerAuthentications;

    fn acceptance(&self, root_namespace: &str) -> Acceptance {
        peer_authentication(self, root_namespace).acceptance
    }
}

/// A resource seen by a watcher.
#[derive(Debug, Clone)]
enum Seen {
    Authorization(AuthorizationPolicyResource),
    Peer(PeerAuthenticationResource),
    Authentication(RequestAuthenticationResource),
}

impl Seen {
    fn key(&self) -> (WatchedKind, String, String) {
        let (kind, meta) = match self {
            Seen::Authorization(r) => (WatchedKind::AuthorizationPolicies, &r.metadata),
            Seen::Peer(r) => (WatchedKind::PeerAuthentications, &r.metadata),
            Seen::Authentication(r) => (WatchedKind::RequestAuthentications, &r.metadata),
        };
        (
            kind,
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        )
    }
}

/// What one reconciliation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The status was already right.
    UpToDate,
    /// The status was patched (and an Event emitted if the condition changed).
    Written,
    /// The resource no longer exists.
    Gone,
}

impl StatusWriter {
    /// A writer talking to the API server through `client`; `root_namespace`'s policies are
    /// mesh-wide.
    pub fn new(client: Client, root_namespace: impl Into<String>) -> Self {
        Self {
            client,
            root_namespace: root_namespace.into(),
            // The pod's name (the hostname in Kubernetes) tells replicas apart in Events.
            instance: std::env::var("HOSTNAME")
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "ambit-ca".to_string()),
            retry: Duration::from_secs(5),
        }
    }

    /// The `reportingInstance` of the Events written (default: `$HOSTNAME`, the pod name).
    pub fn reporting_instance(mut self, instance: impl Into<String>) -> Self {
        self.instance = instance.into();
        self
    }

    /// How soon a status write that failed is tried again (default 5 s).
    pub fn retry_interval(mut self, retry: Duration) -> Self {
        self.retry = retry;
        self
    }

    fn watch<K: PolicyResource>(
        &self,
        wrap: fn(K) -> Seen,
    ) -> BoxStream<'static, Result<Seen, (WatchedKind, watcher::Error)>> {
        let watch = ResilientWatch::new(
            Api::<K>::all(self.client.clone()),
            watcher::Config::default(),
            BACKOFF_MIN,
            BACKOFF_MAX,
        );
        futures::stream::unfold(watch, |mut watch| async move {
            let item = watch.next().await;
            Some((item, watch))
        })
        .filter_map(move |item| {
            std::future::ready(match item {
                Ok(watcher::Event::Apply(object) | watcher::Event::InitApply(object)) => {
                    Some(Ok(wrap(object)))
                }
                Ok(_) => None,
                Err(error) => Some(Err((K::WATCHED, error))),
            })
        })
        .boxed()
    }

    /// Watches the three kinds and keeps their status current. Returns only if the watchers
    /// end (they retry errors with backoff, so in practice never).
    pub async fn run(self) -> anyhow::Result<()> {
        let mut seen = futures::stream::select_all([
            self.watch(Seen::Authorization),
            self.watch(Seen::Peer),
            self.watch(Seen::Authentication),
        ]);
        // Writes that failed, by resource, with the latest version seen: tried again on a timer
        // (a watch does not deliver an unchanged object again).
        let mut pending: HashMap<(WatchedKind, String, String), Seen> = HashMap::new();
        let mut last_errors: HashMap<WatchedKind, String> = HashMap::new();
        let mut retry = tokio::time::interval(self.retry);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(root_namespace = %self.root_namespace, "writing the status of policy resources");
        loop {
            tokio::select! {
                item = seen.next() => match item {
                    Some(Ok(resource)) => {
                        last_errors.remove(&resource.key().0);
                        let key = resource.key();
                        pending.remove(&key);
                        if !self.reconcile_logged(&resource).await {
                            pending.insert(key, resource);
                        }
                    }
                    Some(Err((kind, error))) => {
                        let message = super::WatchProblem::classify(kind, &error).to_string();
                        if last_errors.get(&kind) != Some(&message) {
                            tracing::warn!(error = %message, "policy status: watch failed; retrying");
                            last_errors.insert(kind, message);
                        }
                    }
                    None => anyhow::bail!("the policy watchers ended"),
                },
                _ = retry.tick(), if !pending.is_empty() => {
                    let batch: Vec<_> = pending.drain().collect();
                    for (key, resource) in batch {
                        if !self.reconcile_logged(&resource).await {
                            pending.insert(key, resource);
                        }
                    }
                }
            }
        }
    }

    /// Reconciles one resource; `false` if it should be tried again.
    async fn reconcile_logged(&self, seen: &Seen) -> bool {
        let result = match seen {
            Seen::Authorization(resource) => self.reconcile(resource).await,
            Seen::Peer(resource) => self.reconcile(resource).await,
            Seen::Authentication(resource) => self.reconcile(resource).await,
        };
        match result {
            Ok(outcome) => {
                tracing::trace!(resource = ?seen.key(), ?outcome, "policy status reconciled");
                true
            }
            Err(error) => {
                let (kind, namespace, name) = seen.key();
                tracing::warn!(%kind, %namespace, %name, %error, "cannot write the policy's status; will retry");
                false
            }
        }
    }

    /// Brings `resource`'s `Accepted` condition in line with its conversion.
    async fn reconcile<K: PolicyResource>(&self, resource: &K) -> Result<Outcome, kube::Error> {
        let acceptance = resource.acceptance(&self.root_namespace);
        self.write_acceptance(resource, &acceptance).await
    }

    /// Brings `resource`'s `Accepted` condition in line with `acceptance`.
    pub(super) async fn write_acceptance<K: StatusResource>(
        &self,
        resource: &K,
        acceptance: &Acceptance,
    ) -> Result<Outcome, kube::Error> {
        let meta = resource.meta();
        let (Some(namespace), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref())
        else {
            return Ok(Outcome::UpToDate);
        };
        let generation = meta.generation;
        let status = resource.status().cloned().unwrap_or_default();
        let current = status.accepted();
        let wanted_status = if acceptance.accepted() {
            "True"
        } else {
            "False"
        };
        let reason = acceptance.verdict.reason();
        let condition_changed = current.is_none_or(|c| {
            c.status != wanted_status || c.reason != reason || c.message != acceptance.message
        });
        if !condition_changed
            && status.observed_generation == generation
            && current.is_some_and(|c| c.observed_generation == generation)
        {
            return Ok(Outcome::UpToDate);
        }
        // metav1.Condition: the transition time moves only when the status does.
        let last_transition_time = match current {
            Some(c) if c.status == wanted_status && c.last_transition_time.is_some() => {
                c.last_transition_time.clone()
            }
            _ => Some(timefmt::now_rfc3339()),
        };
        let condition = PolicyCondition {
            type_: ACCEPTED_CONDITION.to_string(),
            status: wanted_status.to_string(),
            reason: reason.to_string(),
            message: acceptance.message.clone(),
            observed_generation: generation,
            last_transition_time,
        };
        // Other writers' conditions are kept; a merge patch replaces the whole list.
        let mut conditions: Vec<PolicyCondition> = status
            .conditions
            .iter()
            .filter(|c| c.type_ != ACCEPTED_CONDITION)
            .cloned()
            .collect();
        conditions.push(condition);
        // Written against the version judged (optimistic concurrency): when another writer (the
        // other CA replica) got there first, the server answers 409 and this one stands down,
        // so a change is reported by one Event, not one per replica.
        let patch = json!({
            "metadata": {"resourceVersion": meta.resource_version},
            "status": {
                "observedGeneration": generation,
                "conditions": conditions,
            }
        });
        let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok(Outcome::Gone),
            // A newer version exists; the watch delivers it, and it is judged then.
            Err(kube::Error::Api(status)) if status.code == 409 => return Ok(Outcome::UpToDate),
            Err(e) => return Err(e),
        }
        if condition_changed {
            tracing::info!(
                kind = K::kind(&()).as_ref(),
                %namespace,
                %name,
                reason,
                message = %acceptance.message,
                "policy status changed"
            );
            self.emit_event(resource, acceptance).await;
        }
        Ok(Outcome::Written)
    }

    /// Emits the Event of a condition change; a failure is logged, never retried (the status
    /// carries the same information).
    async fn emit_event<K: StatusResource>(&self, resource: &K, acceptance: &Acceptance) {
        let meta = resource.meta();
        let regarding = ObjectReference {
            api_version: Some(K::api_version(&()).into_owned()),
            kind: Some(K::kind(&()).into_owned()),
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
            ..ObjectReference::default()
        };
        let report = EventReport {
            regarding,
            action: "Validate",
            reason: acceptance.verdict.reason(),
            note: acceptance.message.clone(),
            warning: !acceptance.accepted(),
            controller: REPORTING_CONTROLLER,
            instance: &self.instance,
        };
        events::emit(&self.client, report).await;
    }
}
