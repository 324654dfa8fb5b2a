//! `ambit ca serve --kube`: who may get which certificate when the mesh runs on Kubernetes.
//!
//! **Authentication.** A caller sends a projected ServiceAccount token (gRPC metadata
//! `authorization: Bearer <token>`; the agents' DaemonSet and the waypoints' Deployments project
//! one with audience `ambit-ca`). The CA asks the API server about it with a `TokenReview`
//! (`authentication.k8s.io/v1`) naming that audience, and accepts it only if the review says
//! authenticated, the returned audiences include the CA's (an API server that ignores audiences
//! returns none: refused), the user is a ServiceAccount (`system:serviceaccount:<ns>:<name>`),
//! and the token is bound to a pod (`user.extra` names it): a token bound to nothing (a legacy
//! Secret token) proves no pod and is refused. What the token proves then depends on whose it is:
//!
//! - **A node agent's** (the agents' ServiceAccount, `ambit-system/ambit-agent` by default)
//!   proves a node: since Kubernetes 1.30 the review's `user.extra` carries
//!   `authentication.kubernetes.io/node-name`, signed into the token by the API server; older
//!   servers give only the bound pod (`authentication.kubernetes.io/pod-name` and `pod-uid`), and
//!   the CA takes that pod's `spec.nodeName` from its pod cache. The agent may get the identity of
//!   any pod **placed** on that node: `spiffe://<td>/ns/<ns>/sa/<sa>` only if the pod cache holds
//!   a pod of namespace `<ns>` running as `<sa>`, scheduled on the node (`spec.nodeName`) and not
//!   terminated (phase neither `Succeeded` nor `Failed`).
//! - **Any other ServiceAccount's** (a waypoint's, deployed by the waypoint controller, or any
//!   workload that asks for its own certificate, as Istio's CA allows every pod) proves only its
//!   own identity, `spiffe://<td>/ns/<its namespace>/sa/<its name>`, and only while the pod the
//!   token is bound to (name and UID) is in the pod cache, runs as that account and has not
//!   terminated. It never gets any other identity, whatever node it runs on.
//!
//! The cache is a kube-runtime watcher of every pod, keeping only the fields used here. Until its
//! first list completes, every request is answered `UNAVAILABLE` (retryable), never
//! `PERMISSION_DENIED`.
//!
//! **What reviews cost.** Reviews are cached by the SHA-256 of the token, never the token itself:
//! an accepted one for a minute, so an agent's burst of requests costs one `TokenReview`; a
//! refused one for 10 s, so a client repeating a bad token costs one `TokenReview` per 10 s
//! and is answered the same refusal meanwhile. A review the cache cannot answer is made only
//! within the rate limits of the client's address and of all clients together; past them the
//! request is refused (`RESOURCE_EXHAUSTED`, `UNAVAILABLE`) without calling the API server.
//! Every cache and table is an LRU of fixed capacity (see [`super::guard`]). Tokens are never
//! logged.
use std::{fmt, net::IpAddr, str::FromStr, sync::Arc, time::Duration};

use k8s_openapi::{
    NamespaceResourceScope,
    api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client,
    api::PostParams,
    runtime::{
        reflector::{ObjectRef, Store, store::Writer},
        watcher,
    },
};
use serde::{Deserialize, Deserializer};
use tokio::sync::watch;
use tonic::{Code, Status};
use tracing::{info, warn};

use super::{
    Principal,
    guard::{ExpiringCache, ReviewLimiter, ReviewLimits, Throttled},
    metrics::{CaMetrics, ReviewOutcome},
};
use crate::{
    discovery::kube::{
        BACKOFF_MAX, BACKOFF_MIN, ResilientWatch, error_chain, objects::pod_service_account,
    },
    identity::SpiffeId,
    serdes::null_as_default,
};

/// The audience agents' tokens must be issued for, unless `--token-audience` says otherwise.
pub const DEFAULT_TOKEN_AUDIENCE: &str = "ambit-ca";
/// The agents' ServiceAccount, unless `--agent-service-account` says otherwise.
pub const DEFAULT_AGENT_SERVICE_ACCOUNT: &str = "ambit-system/ambit-agent";
/// How long a positive token review is trusted without asking again.
pub const DEFAULT_REVIEW_CACHE_TTL: Duration = Duration::from_secs(60);

/// The `user.extra` key naming the node of the pod a token is bound to (Kubernetes ≥ 1.30).
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// The `user.extra` key naming the pod a token is bound to.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// The `user.extra` key holding the UID of the pod a token is bound to.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// How long one TokenReview may take before the request is answered `UNAVAILABLE` (the agent's
/// own deadline is 10 s).
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// A ServiceAccount, written `<namespace>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccountRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// The prefix of a ServiceAccount's user name.
const SERVICE_ACCOUNT_USER: &str = "system:serviceaccount:";

impl ServiceAccountRef {
    /// The user name its tokens authenticate as, `system:serviceaccount:<namespace>:<name>`.
    pub fn username(&self) -> String {
        format!("{SERVICE_ACCOUNT_USER}{}:{}", self.namespace, self.name)
    }

    /// The ServiceAccount a user name (`system:serviceaccount:<namespace>:<name>`) is, if it is
    /// one.
    pub fn from_username(user: &str) -> Option<Self> {
        let (namespace, name) = user.strip_prefix(SERVICE_ACCOUNT_USER)?.split_once(':')?;
        (!namespace.is_empty() && !name.is_empty() && !name.contains(':')).then(|| Self {
            namespace: namespace.into(),
            name: name.into(),
        })
    }
}

impl fmt::Display for ServiceAccountRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for ServiceAccountRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((namespace, name))
                if !namespace.is_empty()
                    && !name.is_empty()
                    && !name.contains('/')
                    && !s.contains(':') =>
            {
                Ok(Self {
                    namespace: namespace.into(),
                    name: name.into(),
                })
            }
            _ => Err(format!(
                "invalid service account {s:?}: write <namespace>/<name>, e.g. {DEFAULT_AGENT_SERVICE_ACCOUNT}"
            )),
        }
    }
}

/// How `ambit ca serve --kube` authenticates its callers.
#[derive(Clone)]
pub struct KubeAuthOptions {
    /// The API server: TokenReviews and the pod watch.
    pub client: Client,
    /// The audience callers' tokens must carry.
    pub audience: String,
    /// The node agents' ServiceAccount: its tokens prove a node (any other ServiceAccount's
    /// prove only its own identity).
    pub agent_service_account: ServiceAccountRef,
    /// How long a positive review is cached.
    pub review_cache_ttl: Duration,
    /// Negative cache, capacities and rate limits of token reviews.
    pub limits: ReviewLimits,
}

impl KubeAuthOptions {
    /// Defaults: audience `ambit-ca`, agents running as `ambit-system/ambit-agent`, accepted
    /// reviews cached for 60 s, and the limits of [`ReviewLimits::default`].
    pub fn new(client: Client) -> Self {
        Self {
            client,
            audience: DEFAULT_TOKEN_AUDIENCE.into(),
            agent_service_account: DEFAULT_AGENT_SERVICE_ACCOUNT
                .parse()
                .expect("the default service account parses"),
            review_cache_ttl: DEFAULT_REVIEW_CACHE_TTL,
            limits: ReviewLimits::default(),
        }
    }
}

impl fmt::Debug for KubeAuthOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeAuthOptions")
            .field("audience", &self.audience)
            .field("agent_service_account", &self.agent_service_account)
            .field("review_cache_ttl", &self.review_cache_ttl)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Why a request was refused in Kubernetes mode. Each maps to one gRPC code ([`Self::code`]);
/// the messages name the problem and never quote a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KubeAuthError {
    /// The pod cache has not completed its first list: nothing can be checked yet.
    #[error(
        "the CA has not yet listed the cluster's pods{}; retry shortly",
        .0.as_deref().map(|e| format!(" (its last attempt failed: {e})")).unwrap_or_default()
    )]
    NotSynced(Option<String>),
    /// The TokenReview could not be made (API server unreachable, slow, or refusing the CA).
    #[error("cannot review the token with the API server: {0}")]
    ReviewFailed(String),
    /// The API server says the token is not valid (expired, revoked, bound pod deleted, or
    /// issued for another audience).
    #[error(
        "the token was rejected by the API server's TokenReview for audience {audience}: {reason}"
    )]
    TokenRejected {
        /// The audience asked for.
        audience: String,
        /// The API server's reason.
        reason: String,
    },
    /// This client address has caused too many token reviews: refused without one.
    #[error(
        "too many token reviews for client {peer}: a client address may cause {burst} at once, \
         then one every {period:?}; retry in {}s",
        secs_up(*.retry_after)
    )]
    PeerRateLimited {
        /// The client's address.
        peer: IpAddr,
        /// The burst allowed.
        burst: u32,
        /// The period of one more review.
        period: Duration,
        /// When the next review may be made for it.
        retry_after: Duration,
    },
    /// All clients together have caused as many token reviews as the CA makes.
    #[error(
        "the CA is at its limit of token reviews for all clients together; retry in {}s",
        secs_up(*.0)
    )]
    RateLimited(Duration),
    /// The review succeeded but not for the CA's audience.
    #[error(
        "the token is not valid for audience {expected} (the TokenReview returned audiences \
         {returned:?}): agents must send a projected ServiceAccount token with audience {expected}"
    )]
    WrongAudience {
        /// The CA's audience.
        expected: String,
        /// What the review returned.
        returned: Vec<String>,
    },
    /// A valid token of a user that is no ServiceAccount (a person, a node's kubelet).
    #[error(
        "{user} is not a ServiceAccount: only ServiceAccount tokens get certificates (the node \
         agents' for their node's pods, a workload's for its own identity)"
    )]
    NotServiceAccount {
        /// Who the token authenticates.
        user: String,
    },
    /// The token says nothing of a pod or node.
    #[error(
        "the token of {user} is not bound to a pod, so it proves neither a node nor a running \
         workload: use a projected ServiceAccount token (serviceAccountToken volume source)"
    )]
    NotBound {
        /// Who the token authenticates.
        user: String,
    },
    /// A workload's token asked for an identity other than its own.
    #[error(
        "the token of {user} proves only the identity {own}; it may not get a certificate for \
         {identity}"
    )]
    NotOwnIdentity {
        /// Who the token authenticates.
        user: String,
        /// The identity asked for.
        identity: String,
        /// The identity the token proves.
        own: String,
    },
    /// A workload's token whose pod no longer runs as its account.
    #[error("the pod {pod} the token of {user} is bound to {why}")]
    BoundPodMismatch {
        /// Who the token authenticates.
        user: String,
        /// `<namespace>/<name>`.
        pod: String,
        /// What is wrong with it ("has terminated", "runs as ...").
        why: String,
    },
    /// The token's pod is not (yet) in the pod cache: worth retrying.
    #[error("the pod {pod} the token is bound to is not in the CA's pod cache yet; retry shortly")]
    BoundPodUnknown {
        /// `<namespace>/<name>`.
        pod: String,
    },
    /// The token's pod is not on any node.
    #[error("the pod {pod} the token is bound to is not scheduled on a node")]
    BoundPodUnscheduled {
        /// `<namespace>/<name>`.
        pod: String,
    },
    /// Nothing on the caller's node runs as the identity asked for.
    #[error(
        "node {node} may not get a certificate for {identity}: no pod with service account \
         {namespace}/{service_account} is scheduled on node {node}"
    )]
    NotPlaced {
        /// The caller's node.
        node: String,
        /// The identity asked for.
        identity: String,
        /// Its namespace.
        namespace: String,
        /// Its service account.
        service_account: String,
    },
}

impl KubeAuthError {
    /// The gRPC code this refusal is sent with: `UNAVAILABLE` when retrying may help,
    /// `RESOURCE_EXHAUSTED` for a client address past its rate limit, `UNAUTHENTICATED` for a
    /// token the API server does not accept for the CA, `PERMISSION_DENIED` for a valid token
    /// that may not have the identity.
    pub fn code(&self) -> Code {
        match self {
            Self::NotSynced(_)
            | Self::ReviewFailed(_)
            | Self::BoundPodUnknown { .. }
            | Self::RateLimited(_) => Code::Unavailable,
            Self::PeerRateLimited { .. } => Code::ResourceExhausted,
            Self::TokenRejected { .. } | Self::WrongAudience { .. } => Code::Unauthenticated,
            Self::NotServiceAccount { .. }
            | Self::NotBound { .. }
            | Self::NotOwnIdentity { .. }
            | Self::BoundPodMismatch { .. }
            | Self::BoundPodUnscheduled { .. }
            | Self::NotPlaced { .. } => Code::PermissionDenied,
        }
    }

    /// The metric label of this refusal (`ambit_ca_certificates_refused_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotSynced(_) => "not_synced",
            Self::ReviewFailed(_) => "review_failed",
            Self::TokenRejected { .. } => "token_rejected",
            Self::PeerRateLimited { .. } => "peer_rate_limited",
            Self::RateLimited(_) => "rate_limited",
            Self::WrongAudience { .. } => "wrong_audience",
            Self::NotServiceAccount { .. } => "not_service_account",
            Self::NotBound { .. } => "not_bound",
            Self::NotOwnIdentity { .. } => "not_own_identity",
            Self::BoundPodMismatch { .. } => "bound_pod_mismatch",
            Self::BoundPodUnknown { .. } => "bound_pod_unknown",
            Self::BoundPodUnscheduled { .. } => "bound_pod_unscheduled",
            Self::NotPlaced { .. } => "not_placed",
        }
    }

    /// Whether this is the API server's lasting verdict on the token itself (asking again soon
    /// would get the same answer): such refusals are cached.
    fn is_verdict(&self) -> bool {
        matches!(
            self,
            Self::TokenRejected { .. }
                | Self::WrongAudience { .. }
                | Self::NotServiceAccount { .. }
                | Self::NotBound { .. }
        )
    }
}

/// Whole seconds, rounded up, at least one: what a client is told to wait.
fn secs_up(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

impl From<KubeAuthError> for Status {
    fn from(e: KubeAuthError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

/// A caller as its token review describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Caller {
    /// A node agent.
    Agent {
        /// The node, when the API server said (Kubernetes ≥ 1.30).
        node: Option<String>,
        /// The bound pod's name and UID.
        pod: Option<(String, String)>,
    },
    /// Another ServiceAccount: its own identity only, while its pod runs.
    Workload {
        /// The account.
        account: ServiceAccountRef,
        /// The bound pod's name and UID (in the account's namespace).
        pod: (String, String),
    },
}

/// The pod fields the placement check reads; everything else is skipped while parsing, so
/// the cache costs memory in proportion to the number of pods, not to their specs.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct PlacedPod {
    /// Name, namespace, UID and resource version only.
    #[serde(default, deserialize_with = "slim_meta")]
    pub metadata: ObjectMeta,
    /// `spec`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub spec: PlacedPodSpec,
    /// `status`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub status: PlacedPodStatus,
}

/// The fields of a pod's `spec` the CA reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlacedPodSpec {
    /// `serviceAccountName`.
    pub service_account_name: Option<String>,
    /// `serviceAccount`, the deprecated alias older objects may carry alone.
    pub service_account: Option<String>,
    /// `nodeName`.
    pub node_name: Option<String>,
}

/// The field of a pod's `status` the CA reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct PlacedPodStatus {
    /// `phase`.
    pub phase: Option<String>,
}

crate::discovery::kube::kube_resource!(
    PlacedPod,
    "v1",
    "",
    "v1",
    "Pod",
    "pods",
    NamespaceResourceScope
);

impl PlacedPod {
    /// The service account the pod runs as (`default` when the object names none, as the API
    /// server's admission fills in).
    pub fn service_account(&self) -> &str {
        pod_service_account(
            self.spec.service_account_name.as_deref(),
            self.spec.service_account.as_deref(),
        )
    }

    /// The node the pod is scheduled on.
    pub fn node(&self) -> Option<&str> {
        self.spec.node_name.as_deref().filter(|n| !n.is_empty())
    }

    /// Whether the pod's containers have all ended for good.
    pub fn terminated(&self) -> bool {
        matches!(self.status.phase.as_deref(), Some("Succeeded" | "Failed"))
    }
}

/// Keeps name, namespace, UID and resource version of `metadata`; labels, annotations and
/// managed fields are skipped unparsed.
fn slim_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Slim {
        name: Option<String>,
        namespace: Option<String>,
        uid: Option<String>,
        resource_version: Option<String>,
    }
    Ok(Option::<Slim>::deserialize(d)?
        .map(|s| ObjectMeta {
            name: s.name,
            namespace: s.namespace,
            uid: s.uid,
            resource_version: s.resource_version,
            ..ObjectMeta::default()
        })
        .unwrap_or_default())
}

/// Where the pod cache is in its first list.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PodSync {
    /// Listing.
    Starting,
    /// The list failed with this error; retrying.
    Failing(String),
    /// Listed: the cache follows the cluster from now on (a later re-list keeps the old
    /// content until it completes).
    Synced,
}

/// The pod cache and whether it has completed its first list.
#[derive(Clone)]
struct PodCache {
    store: Store<PlacedPod>,
    synced: watch::Receiver<PodSync>,
}

/// Kubernetes-mode authentication and placement, shared by the CA's request handlers.
pub(crate) struct KubeAuthority {
    reviews: Api<TokenReview>,
    audience: String,
    agent: ServiceAccountRef,
    /// Accepted reviews, by token hash.
    accepted: ExpiringCache<[u8; 32], Caller>,
    /// Refused reviews (the API server's verdicts only), by token hash.
    refused: ExpiringCache<[u8; 32], KubeAuthError>,
    limiter: ReviewLimiter,
    pods: PodCache,
    metrics: Arc<CaMetrics>,
}

impl fmt::Debug for KubeAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeAuthority")
            .field("audience", &self.audience)
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

impl KubeAuthority {
    /// Starts the pod watch (in a task, returned: abort it to stop) and returns the authority,
    /// which answers `UNAVAILABLE` until the first list is complete.
    pub(crate) fn start(
        options: KubeAuthOptions,
        metrics: Arc<CaMetrics>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let writer = Writer::default();
        let store = writer.as_reader();
        let (synced_tx, synced) = watch::channel(PodSync::Starting);
        let task = tokio::spawn(watch_pods(
            Api::all(options.client.clone()),
            writer,
            synced_tx,
        ));
        let authority = Self {
            reviews: Api::all(options.client),
            audience: options.audience,
            agent: options.agent_service_account,
            accepted: ExpiringCache::new(
                options.limits.accepted_capacity,
                options.review_cache_ttl,
            ),
            refused: ExpiringCache::new(
                options.limits.refused_capacity,
                options.limits.refused_ttl,
            ),
            limiter: ReviewLimiter::new(&options.limits),
            pods: PodCache { store, synced },
            metrics,
        };
        (authority, task)
    }

    /// `Ok` once the pod cache has been listed.
    pub(crate) fn ready(&self) -> Result<(), KubeAuthError> {
        match &*self.pods.synced.borrow() {
            PodSync::Synced => Ok(()),
            PodSync::Starting => Err(KubeAuthError::NotSynced(None)),
            PodSync::Failing(e) => Err(KubeAuthError::NotSynced(Some(e.clone()))),
        }
    }

    /// Who holds `token`, sent from `peer` (whose budget of reviews a cache miss spends): a
    /// node agent on its node, or a workload as its own account.
    pub(crate) async fn authenticate(
        &self,
        token: &str,
        peer: IpAddr,
    ) -> Result<Principal, KubeAuthError> {
        let key = token_key(token);
        let caller = match self.accepted.get(&key) {
            Some(caller) => caller,
            None => {
                if let Some(refusal) = self.refused.get(&key) {
                    return Err(refusal);
                }
                self.limiter
                    .check(peer)
                    .map_err(|throttled| match throttled {
                        Throttled::Peer(retry_after) => KubeAuthError::PeerRateLimited {
                            peer,
                            burst: self.limiter.per_peer().burst_size().get(),
                            period: self.limiter.per_peer().replenish_interval(),
                            retry_after,
                        },
                        Throttled::Overall(retry_after) => KubeAuthError::RateLimited(retry_after),
                    })?;
                match self.review(token).await {
                    Ok(caller) => {
                        self.accepted.insert(key, caller.clone());
                        caller
                    }
                    Err(refusal) => {
                        if refusal.is_verdict() {
                            self.refused.insert(key, refusal.clone());
                        }
                        return Err(refusal);
                    }
                }
            }
        };
        match caller {
            Caller::Agent { node, pod } => self.node_of(node, pod).map(Principal::Node),
            Caller::Workload {
                account,
                pod: (name, uid),
            } => Ok(Principal::Workload { account, name, uid }),
        }
    }

    /// Asks the API server who `token` is; `Ok` only for a ServiceAccount's token for our
    /// audience, bound to a pod (or, for an agent, to a node).
    async fn review(&self, token: &str) -> Result<Caller, KubeAuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                audiences: Some(vec![self.audience.clone()]),
                token: token.to_string(),
            },
            ..TokenReview::default()
        };
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(
            REVIEW_TIMEOUT,
            self.reviews.create(&PostParams::default(), &review),
        )
        .await;
        let answer = answer
            .map_err(|_| {
                KubeAuthError::ReviewFailed(format!(
                    "the API server did not answer within {}s",
                    REVIEW_TIMEOUT.as_secs()
                ))
            })
            .and_then(|answer| {
                answer.map_err(|e| {
                    KubeAuthError::ReviewFailed(match &e {
                        kube::Error::Api(status) if status.code == 403 => format!(
                            "the API server forbids the CA to create TokenReviews (check its \
                             RBAC: create tokenreviews.authentication.k8s.io): {}",
                            status.message
                        ),
                        kube::Error::Api(status) => {
                            format!("{} {}: {}", status.code, status.reason, status.message)
                        }
                        _ => error_chain(&e),
                    })
                })
            });
        let judged = answer.and_then(|answer| self.judge(answer.status.unwrap_or_default()));
        let outcome = match &judged {
            Ok(_) => ReviewOutcome::Accepted,
            Err(KubeAuthError::ReviewFailed(_)) => ReviewOutcome::Failed,
            Err(_) => ReviewOutcome::Refused,
        };
        self.metrics.token_review(outcome, started.elapsed());
        judged
    }

    /// Applies the CA's rules to a review's outcome.
    fn judge(&self, status: TokenReviewStatus) -> Result<Caller, KubeAuthError> {
        if status.authenticated != Some(true) {
            return Err(KubeAuthError::TokenRejected {
                audience: self.audience.clone(),
                reason: status
                    .error
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| "not authenticated".into()),
            });
        }
        // An API server unaware of audiences returns none: the token may be for anyone.
        let returned = status.audiences.unwrap_or_default();
        if !returned.contains(&self.audience) {
            return Err(KubeAuthError::WrongAudience {
                expected: self.audience.clone(),
                returned,
            });
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some(account) = ServiceAccountRef::from_username(&username) else {
            return Err(KubeAuthError::NotServiceAccount {
                user: if username.is_empty() {
                    "(no user name)".into()
                } else {
                    username
                },
            });
        };
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| {
            extra
                .get(key)
                .and_then(|values| values.first())
                .filter(|v| !v.is_empty())
                .cloned()
        };
        let pod = first(EXTRA_POD_NAME).zip(first(EXTRA_POD_UID));
        if account == self.agent {
            let node = first(EXTRA_NODE_NAME);
            if node.is_none() && pod.is_none() {
                return Err(KubeAuthError::NotBound { user: username });
            }
            return Ok(Caller::Agent { node, pod });
        }
        // A workload proves its identity only through the pod it runs in.
        match pod {
            Some(pod) => Ok(Caller::Workload { account, pod }),
            None => Err(KubeAuthError::NotBound { user: username }),
        }
    }

    /// An agent's node: the token's own claim, else its bound pod's `spec.nodeName`.
    fn node_of(
        &self,
        node: Option<String>,
        pod: Option<(String, String)>,
    ) -> Result<String, KubeAuthError> {
        if let Some(node) = node {
            return Ok(node);
        }
        let (name, uid) = pod.expect("judge() accepts no agent without node or pod");
        let namespace = &self.agent.namespace;
        let pod = format!("{namespace}/{name}");
        // Same name, another UID: the bound pod was replaced; its token would fail review
        // soon, and meanwhile proves nothing about the new pod's node.
        let found = self.bound_pod(namespace, &name, &uid);
        let found = found.ok_or_else(|| KubeAuthError::BoundPodUnknown { pod: pod.clone() })?;
        found
            .node()
            .map(str::to_string)
            .ok_or(KubeAuthError::BoundPodUnscheduled { pod })
    }

    /// The cached pod `namespace/name`, if it still has `uid`.
    fn bound_pod(&self, namespace: &str, name: &str, uid: &str) -> Option<Arc<PlacedPod>> {
        self.pods
            .store
            .get(&ObjectRef::new(name).within(namespace))
            .filter(|p| p.metadata.uid.as_deref() == Some(uid))
    }

    /// `Ok` if `principal` may get `identity`: a node, if a live pod of `identity`'s namespace
    /// and service account is scheduled on it; a workload, if `identity` is its own and the pod
    /// its token is bound to still runs as it. Callers have authenticated, which needs the pods
    /// listed ([`Self::ready`]).
    pub(crate) fn authorize(
        &self,
        principal: &Principal,
        identity: &SpiffeId,
    ) -> Result<(), KubeAuthError> {
        match principal {
            Principal::Node(node) => self.authorize_node(node, identity),
            Principal::Workload { account, name, uid } => {
                let user = account.username();
                if identity.namespace != account.namespace
                    || identity.service_account != account.name
                {
                    return Err(KubeAuthError::NotOwnIdentity {
                        user,
                        identity: identity.to_string(),
                        own: SpiffeId::new(
                            &identity.trust_domain,
                            &account.namespace,
                            &account.name,
                        )
                        .to_string(),
                    });
                }
                let pod = format!("{}/{name}", account.namespace);
                let found = self
                    .bound_pod(&account.namespace, name, uid)
                    .ok_or_else(|| KubeAuthError::BoundPodUnknown { pod: pod.clone() })?;
                let why = if found.terminated() {
                    Some("has terminated".to_string())
                } else if found.service_account() != account.name {
                    Some(format!(
                        "runs as service account {}, not {}",
                        found.service_account(),
                        account.name
                    ))
                } else {
                    None
                };
                match why {
                    Some(why) => Err(KubeAuthError::BoundPodMismatch { user, pod, why }),
                    None => Ok(()),
                }
            }
        }
    }

    /// `Ok` if a live pod of `identity`'s namespace and service account is scheduled on `node`.
    fn authorize_node(&self, node: &str, identity: &SpiffeId) -> Result<(), KubeAuthError> {
        let placed = self.pods.store.find(|p| {
            p.node() == Some(node)
                && p.metadata.namespace.as_deref() == Some(identity.namespace.as_str())
                && p.service_account() == identity.service_account
                && !p.terminated()
        });
        match placed {
            Some(_) => Ok(()),
            None => Err(KubeAuthError::NotPlaced {
                node: node.to_string(),
                identity: identity.to_string(),
                namespace: identity.namespace.clone(),
                service_account: identity.service_account.clone(),
            }),
        }
    }
}

/// The cache key of a token: its SHA-256 (through rustls' ring provider, already linked), so
/// that the cache never holds a usable credential.
fn token_key(token: &str) -> [u8; 32] {
    let hash = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .expect("a TLS 1.3 suite")
        .common
        .hash_provider
        .hash(token.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(&hash.as_ref()[..32]);
    key
}

/// Keeps `writer` in step with the cluster's pods, forever; reports the first completed list
/// (and, before it, the last error) on `synced`.
///
/// The watcher is restarted (so it lists again) when a watch cannot resume because its
/// resource version expired and the server said so with an HTTP 410 rather than a watch event:
/// kube-runtime's watcher would retry that version forever.
async fn watch_pods(
    api: Api<PlacedPod>,
    mut writer: Writer<PlacedPod>,
    synced: watch::Sender<PodSync>,
) {
    let mut watch = ResilientWatch::new(api, watcher::Config::default(), BACKOFF_MIN, BACKOFF_MAX);
    let mut failing = false;
    loop {
        match watch.next().await {
            Ok(event) => {
                writer.apply_watcher_event(&event);
                if let watcher::Event::InitDone = event {
                    if *synced.borrow() != PodSync::Synced {
                        info!(pods = writer.as_reader().len(), "pod cache synced");
                    } else if failing {
                        info!("pod watch recovered");
                    }
                    failing = false;
                    synced.send_replace(PodSync::Synced);
                }
            }
            Err(error) => {
                let message = match &error {
                    watcher::Error::InitialListFailed(e)
                    | watcher::Error::WatchStartFailed(e)
                    | watcher::Error::WatchFailed(e) => error_chain(e),
                    other => other.to_string(),
                };
                // Log a failing watch once per outage (each retry would repeat it).
                if !failing {
                    warn!("pod watch failed, retrying: {message}");
                    failing = true;
                }
                synced.send_if_modified(|state| match state {
                    PodSync::Synced => false,
                    _ => {
                        *state = PodSync::Failing(message.clone());
                        true
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    #[test]
    fn service_accounts_parse() {
        let sa: ServiceAccountRef = "ambit-system/ambit-agent".parse().unwrap();
        assert_eq!(
            sa.username(),
            "system:serviceaccount:ambit-system:ambit-agent"
        );
        assert_eq!(sa.to_string(), "ambit-system/ambit-agent");
        for bad in [
            "ambit-agent",
            "/x",
            "x/",
            "a/b/c",
            "system:serviceaccount:a:b",
        ] {
            assert!(bad.parse::<ServiceAccountRef>().is_err(), "{bad} accepted");
        }
        assert_eq!(
            ServiceAccountRef::from_username("system:serviceaccount:shop:waypoint"),
            Some("shop/waypoint".parse().unwrap())
        );
        for not_one in [
            "system:serviceaccount:shop",
            "system:serviceaccount::x",
            "system:serviceaccount:a:b:c",
            "system:node:n1",
            "admin",
        ] {
            assert_eq!(ServiceAccountRef::from_username(not_one), None, "{not_one}");
        }
    }

    #[test]
    fn pods_keep_only_what_placement_needs() {
        let pod: PlacedPod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-0", "namespace": "shop", "uid": "u1",
                         "resourceVersion": "7", "labels": {"app": "web"},
                         "annotations": {"big": "x"}, "managedFields": [{}]},
            "spec": {"serviceAccountName": "web", "nodeName": "node-a",
                     "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1"}
        }))
        .unwrap();
        assert_eq!(pod.service_account(), "web");
        assert_eq!(pod.node(), Some("node-a"));
        assert!(!pod.terminated());
        assert_eq!(pod.metadata.uid.as_deref(), Some("u1"));
        assert!(pod.metadata.labels.is_none() && pod.metadata.annotations.is_none());

        let bare: PlacedPod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"}, "spec": null, "status": {"phase": "Succeeded"}
        }))
        .unwrap();
        assert_eq!(bare.service_account(), "default");
        assert_eq!(bare.node(), None);
        assert!(bare.terminated());
    }

    #[test]
    fn token_keys_are_sha256() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(
            token_key("abc")[..4],
            [0xba, 0x78, 0x16, 0xbf],
            "not SHA-256"
        );
        assert_ne!(token_key("a"), token_key("b"));
    }

    fn authority() -> KubeAuthority {
        // Never contacted: judge() and the error mapping only.
        let client =
            Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap())).unwrap();
        let metrics = CaMetrics::new(&crate::telemetry::Metrics::new()).unwrap();
        let (authority, task) =
            KubeAuthority::start(KubeAuthOptions::new(client), Arc::new(metrics));
        task.abort();
        authority
    }

    fn status(
        authenticated: bool,
        audiences: &[&str],
        user: &str,
        extra: &[(&str, &str)],
    ) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            error: None,
            user: Some(UserInfo {
                username: Some(user.into()),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..UserInfo::default()
            }),
        }
    }

    #[tokio::test]
    async fn reviews_are_judged_by_audience_user_and_binding() {
        let ca = authority();
        let agent = "system:serviceaccount:ambit-system:ambit-agent";
        let caller = ca
            .judge(status(
                true,
                &["ambit-ca"],
                agent,
                &[(EXTRA_NODE_NAME, "n1")],
            ))
            .unwrap();
        assert_eq!(
            caller,
            Caller::Agent {
                node: Some("n1".into()),
                pod: None
            }
        );
        let caller = ca
            .judge(status(
                true,
                &["ambit-ca"],
                agent,
                &[(EXTRA_POD_NAME, "agent-x"), (EXTRA_POD_UID, "u")],
            ))
            .unwrap();
        assert_eq!(
            caller,
            Caller::Agent {
                node: None,
                pod: Some(("agent-x".into(), "u".into()))
            }
        );
        // Another account's token bound to its pod: a workload, whatever node it names.
        let caller = ca
            .judge(status(
                true,
                &["ambit-ca"],
                "system:serviceaccount:shop:waypoint",
                &[
                    (EXTRA_POD_NAME, "waypoint-0"),
                    (EXTRA_POD_UID, "u0"),
                    (EXTRA_NODE_NAME, "n1"),
                ],
            ))
            .unwrap();
        assert_eq!(
            caller,
            Caller::Workload {
                account: "shop/waypoint".parse().unwrap(),
                pod: ("waypoint-0".into(), "u0".into())
            }
        );

        let refusals = [
            (status(false, &[], agent, &[]), Code::Unauthenticated),
            // An audience-unaware API server: no audience returned.
            (
                status(true, &[], agent, &[(EXTRA_NODE_NAME, "n1")]),
                Code::Unauthenticated,
            ),
            (
                status(true, &["other"], agent, &[(EXTRA_NODE_NAME, "n1")]),
                Code::Unauthenticated,
            ),
            (
                status(
                    true,
                    &["ambit-ca"],
                    "system:serviceaccount:shop:web",
                    &[(EXTRA_NODE_NAME, "n1")],
                ),
                Code::PermissionDenied,
            ),
            // Not a ServiceAccount: a person, a node's kubelet.
            (
                status(true, &["ambit-ca"], "kubernetes-admin", &[]),
                Code::PermissionDenied,
            ),
            (
                status(
                    true,
                    &["ambit-ca"],
                    "system:node:n1",
                    &[(EXTRA_NODE_NAME, "n1")],
                ),
                Code::PermissionDenied,
            ),
            // Bound to nothing (a legacy Secret token).
            (
                status(true, &["ambit-ca"], agent, &[]),
                Code::PermissionDenied,
            ),
            // A pod name without its UID binds nothing.
            (
                status(true, &["ambit-ca"], agent, &[(EXTRA_POD_NAME, "agent-x")]),
                Code::PermissionDenied,
            ),
        ];
        for (status, code) in refusals {
            let e = ca.judge(status.clone()).unwrap_err();
            assert_eq!(e.code(), code, "{status:?}: {e}");
        }
        assert_eq!(
            ca.ready().unwrap_err().code(),
            Code::Unavailable,
            "not synced"
        );
    }
}
