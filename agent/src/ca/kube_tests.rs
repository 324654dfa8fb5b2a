//! `ambit ca serve --kube` end to end: a real CA (TLS gRPC on loopback) against the in-process
//! fake API server, which lists and watches pods itself and answers TokenReviews through a
//! handler that behaves like a real API server's (audience intersection, bound-pod extras).
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::Method;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use tonic::Code;

use super::{
    KubeAuthOptions,
    guard::quota,
    kube::{EXTRA_NODE_NAME, EXTRA_POD_NAME, EXTRA_POD_UID},
};
use crate::{
    identity::{BearerToken, CaClient, CaClientConfig, CaError, SpiffeId, ca_api},
    telemetry::metrics::exposition::{Samples, parse, value},
    testing::{
        ca::{TestCaServer, create_certificate, csr_with, id, leaf_sans, uri},
        fake_apiserver::FakeApiServer,
    },
};

const AGENT_USER: &str = "system:serviceaccount:ambit-system:ambit-agent";
const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// What the fake API server knows of a token.
#[derive(Clone)]
struct TokenInfo {
    user: String,
    audiences: Vec<String>,
    extra: Vec<(&'static str, String)>,
}

/// The API server side of the test: tokens it issued, the reviews it answered, and switches to
/// make it misbehave.
#[derive(Default)]
struct Cluster {
    tokens: Mutex<HashMap<String, TokenInfo>>,
    /// `spec.audiences` of every TokenReview received.
    reviewed_audiences: Mutex<Vec<Value>>,
    reviews: AtomicUsize,
    /// Answer pod lists with 500 (the CA's pod cache cannot sync; not 503, which kube's client
    /// retries for minutes before reporting).
    fail_pod_lists: AtomicBool,
    /// Answer TokenReviews with 403 (the CA lacks RBAC).
    forbid_reviews: AtomicBool,
}

impl Cluster {
    /// A token of the agent bound to its pod on `node`, with the node in the claims (as
    /// Kubernetes ≥ 1.30 issues them).
    fn agent_token(&self, token: &str, node: &str) -> String {
        self.issue(
            token,
            AGENT_USER,
            &["ambit-ca"],
            vec![
                (EXTRA_POD_NAME, format!("ambit-agent-{node}")),
                (EXTRA_POD_UID, format!("uid-agent-{node}")),
                (EXTRA_NODE_NAME, node.to_string()),
            ],
        )
    }

    fn issue(
        &self,
        token: &str,
        user: &str,
        audiences: &[&str],
        extra: Vec<(&'static str, String)>,
    ) -> String {
        self.tokens.lock().unwrap().insert(
            token.to_string(),
            TokenInfo {
                user: user.to_string(),
                audiences: audiences.iter().map(|a| a.to_string()).collect(),
                extra,
            },
        );
        token.to_string()
    }

    fn revoke(&self, token: &str) {
        self.tokens.lock().unwrap().remove(token);
    }

    /// Answers as kube-apiserver does: a TokenReview is authenticated only if the token is
    /// known and, when the review names audiences, one of them is the token's; the answer's
    /// audiences are that intersection.
    fn review(&self, body: &[u8]) -> (u16, Value) {
        self.reviews.fetch_add(1, Ordering::SeqCst);
        if self.forbid_reviews.load(Ordering::SeqCst) {
            return (
                403,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "reason": "Forbidden", "code": 403,
                       "message": "tokenreviews.authentication.k8s.io is forbidden: User \
                                   \"system:serviceaccount:ambit-system:ambit-ca\" cannot create \
                                   resource \"tokenreviews\""}),
            );
        }
        let request: Value = serde_json::from_slice(body).expect("a TokenReview body");
        assert_eq!(request["kind"], "TokenReview");
        let spec = request["spec"].clone();
        self.reviewed_audiences
            .lock()
            .unwrap()
            .push(spec["audiences"].clone());
        let asked: Vec<String> = spec["audiences"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        let token = spec["token"].as_str().unwrap_or_default();
        let known = self.tokens.lock().unwrap().get(token).cloned();
        let status = match known {
            None => json!({"authenticated": false, "error": "[invalid bearer token, \
                           square/go-jose: error in cryptographic primitive]"}),
            Some(info) => {
                let common: Vec<&String> = if asked.is_empty() {
                    info.audiences.iter().collect()
                } else {
                    asked
                        .iter()
                        .filter(|a| info.audiences.contains(a))
                        .collect()
                };
                if common.is_empty() {
                    json!({"authenticated": false, "error": format!(
                        "[invalid bearer token, token audiences {:?} is invalid for the target \
                         audiences {:?}]", info.audiences, asked)})
                } else {
                    let extra: serde_json::Map<String, Value> = info
                        .extra
                        .iter()
                        .map(|(k, v)| (k.to_string(), json!([v])))
                        .collect();
                    json!({"authenticated": true, "audiences": common,
                           "user": {"username": info.user, "uid": "sa-uid",
                                    "groups": ["system:serviceaccounts", "system:authenticated"],
                                    "extra": extra}})
                }
            }
        };
        (
            201,
            json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                   "metadata": {"creationTimestamp": null},
                   "spec": spec, "status": status}),
        )
    }
}

/// A fake API server answering TokenReviews from `cluster`, and a CA in Kubernetes mode on it.
async fn start(cluster: &Arc<Cluster>) -> (FakeApiServer, TestCaServer) {
    start_with(cluster, |options| options).await
}

async fn start_with(
    cluster: &Arc<Cluster>,
    configure: impl FnOnce(KubeAuthOptions) -> KubeAuthOptions,
) -> (FakeApiServer, TestCaServer) {
    let api = FakeApiServer::start().await.unwrap();
    let handler_cluster = Arc::clone(cluster);
    api.set_handler(Arc::new(move |method, path, _query, body| {
        if *method == Method::POST && path == TOKEN_REVIEWS {
            return Some(handler_cluster.review(body));
        }
        if *method == Method::GET
            && path == "/api/v1/pods"
            && handler_cluster.fail_pod_lists.load(Ordering::SeqCst)
        {
            return Some((
                500,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "reason": "InternalError", "code": 500,
                       "message": "etcd is having a bad day"}),
            ));
        }
        None
    }));
    let ca = TestCaServer::start_kube(configure(KubeAuthOptions::new(api.client()))).await;
    (api, ca)
}

fn pod(namespace: &str, name: &str, sa: &str, node: &str, phase: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}")},
        "spec": {"serviceAccountName": sa, "nodeName": node,
                 "containers": [{"name": "app", "image": "app:1"}]},
        "status": {"phase": phase}
    }))
    .unwrap()
}

fn client(ca: &TestCaServer, token: &str) -> CaClient {
    CaClient::new(ca.client_config(token)).unwrap()
}

fn refused(result: Result<impl std::fmt::Debug, CaError>) -> (Code, String) {
    match result {
        Err(CaError::Refused { code, message }) => (code, message),
        Err(CaError::Unavailable(message)) => (Code::Unavailable, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Fetches `identity` until the answer is no longer `retry_while` (the CA's cache follows the
/// API server within milliseconds, but asynchronously); returns the last outcome.
async fn fetch_until(
    client: &CaClient,
    identity: &SpiffeId,
    retry_while: impl Fn(&Result<(), (Code, String)>) -> bool,
) -> Result<(), (Code, String)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let outcome = match client.fetch(identity, Duration::from_secs(60)).await {
            Ok(_) => Ok(()),
            Err(e) => Err(refused(Err::<(), _>(e))),
        };
        if !retry_while(&outcome) || tokio::time::Instant::now() >= deadline {
            return outcome;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn is_unavailable(outcome: &Result<(), (Code, String)>) -> bool {
    matches!(outcome, Err((Code::Unavailable, _)))
}

/// The usual cluster: shop/web on node-a, pay/pay on node-b.
fn apply_workloads(api: &FakeApiServer) {
    api.apply(&pod("shop", "web-0", "web", "node-a", "Running"));
    api.apply(&pod("pay", "pay-0", "pay", "node-b", "Running"));
}

#[tokio::test]
async fn signs_only_identities_of_pods_on_the_callers_node() {
    let cluster = Arc::new(Cluster::default());
    let (api, ca) = start(&cluster).await;
    apply_workloads(&api);
    let a = client(
        &ca,
        &cluster.agent_token("token-of-agent-on-node-a", "node-a"),
    );
    let b = client(
        &ca,
        &cluster.agent_token("token-of-agent-on-node-b", "node-b"),
    );

    let web = id("shop", "web");
    fetch_until(&a, &web, is_unavailable)
        .await
        .expect("node-a runs shop/web");
    b.fetch(&id("pay", "pay"), Duration::from_secs(60))
        .await
        .expect("node-b runs pay/pay");

    // pay/pay runs on node-b only; node-b runs no shop/web.
    let (code, message) = refused(a.fetch(&id("pay", "pay"), Duration::from_secs(60)).await);
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert!(
        message.contains("no pod with service account pay/pay is scheduled on node node-a"),
        "{message}"
    );
    let (code, _) = refused(b.fetch(&web, Duration::from_secs(60)).await);
    assert_eq!(code, Code::PermissionDenied);
    // The right namespace with another service account is another identity.
    let (code, _) = refused(a.fetch(&id("shop", "db"), Duration::from_secs(60)).await);
    assert_eq!(code, Code::PermissionDenied);
    // Another trust domain, even for a pod of the node.
    let (code, message) = refused(
        a.fetch(
            &SpiffeId::new("evil.org", "shop", "web"),
            Duration::from_secs(60),
        )
        .await,
    );
    assert_eq!(code, Code::PermissionDenied);
    assert!(message.contains("trust domain cluster.local"), "{message}");

    // The CA asked the API server about its own audience, every time.
    let audiences = cluster.reviewed_audiences.lock().unwrap().clone();
    assert!(!audiences.is_empty());
    assert!(
        audiences.iter().all(|a| *a == json!(["ambit-ca"])),
        "{audiences:?}"
    );
}

#[tokio::test]
async fn refuses_other_callers_with_a_clear_status() {
    let cluster = Arc::new(Cluster::default());
    let (api, ca) = start(&cluster).await;
    apply_workloads(&api);
    let web = id("shop", "web");
    // Wait for the pod cache with a good token first, so that no refusal below is UNAVAILABLE.
    let agent = client(
        &ca,
        &cluster.agent_token("token-of-agent-on-node-a", "node-a"),
    );
    fetch_until(&agent, &web, is_unavailable).await.unwrap();

    // A workload's own token, valid for the CA's audience and bound to a pod on node-a: its
    // own identity only, never another of its node's.
    let token = cluster.issue(
        "token-of-the-web-workload",
        "system:serviceaccount:shop:web",
        &["ambit-ca"],
        vec![
            (EXTRA_POD_NAME, "web-0".into()),
            (EXTRA_POD_UID, "uid-web-0".into()),
            (EXTRA_NODE_NAME, "node-a".into()),
        ],
    );
    let (code, message) = refused(
        client(&ca, &token)
            .fetch(&id("shop", "db"), Duration::from_secs(60))
            .await,
    );
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert!(
        message.contains("the token of system:serviceaccount:shop:web proves only the identity"),
        "{message}"
    );

    // A token of a user that is no ServiceAccount (a person's, for the CA's audience).
    let token = cluster.issue(
        "token-of-a-person",
        "jane@example.org",
        &["ambit-ca"],
        vec![(EXTRA_NODE_NAME, "node-a".into())],
    );
    let (code, message) = refused(
        client(&ca, &token)
            .fetch(&web, Duration::from_secs(60))
            .await,
    );
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert!(
        message.contains("jane@example.org is not a ServiceAccount"),
        "{message}"
    );

    // The agent's token for the API server's audience, not the CA's (the default token).
    let token = cluster.issue(
        "agent-token-for-the-api-server",
        AGENT_USER,
        &["https://kubernetes.default.svc.cluster.local"],
        vec![(EXTRA_NODE_NAME, "node-a".into())],
    );
    let (code, message) = refused(
        client(&ca, &token)
            .fetch(&web, Duration::from_secs(60))
            .await,
    );
    assert_eq!(code, Code::Unauthenticated, "{message}");
    assert!(
        message.contains("audience ambit-ca") && message.contains("is invalid for the target"),
        "{message}"
    );

    // A token the API server does not know (expired, forged).
    let (code, message) = refused(
        client(&ca, "not-a-token-the-cluster-issued")
            .fetch(&web, Duration::from_secs(60))
            .await,
    );
    assert_eq!(code, Code::Unauthenticated, "{message}");
    assert!(
        message.contains("rejected by the API server's TokenReview"),
        "{message}"
    );

    // A legacy (Secret) token of the agent: bound to no pod, so it proves no node.
    let token = cluster.issue("legacy-agent-token", AGENT_USER, &["ambit-ca"], Vec::new());
    let (code, message) = refused(
        client(&ca, &token)
            .fetch(&web, Duration::from_secs(60))
            .await,
    );
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert!(message.contains("not bound to a pod"), "{message}");

    // No token at all.
    let request = tonic::Request::new(ca_api::IstioCertificateRequest {
        csr: String::new(),
        validity_duration: 60,
        metadata: Some(ca_api::impersonation_metadata(&web.to_string())),
    });
    let status = ca_api::IstioCertificateServiceClient::new(agent.channel_for_tests())
        .create_certificate(request)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("projected ServiceAccount token"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn follows_pods_that_go_or_finish() {
    let cluster = Arc::new(Cluster::default());
    let (api, ca) = start(&cluster).await;
    apply_workloads(&api);
    let a = client(
        &ca,
        &cluster.agent_token("token-of-agent-on-node-a", "node-a"),
    );
    let b = client(
        &ca,
        &cluster.agent_token("token-of-agent-on-node-b", "node-b"),
    );
    let web = id("shop", "web");
    fetch_until(&a, &web, is_unavailable).await.unwrap();
    let (code, _) = refused(b.fetch(&web, Duration::from_secs(60)).await);
    assert_eq!(code, Code::PermissionDenied);

    // web-0 is replaced by web-1 on node-b (pods do not move: a new one is scheduled).
    api.delete::<Pod>("shop", "web-0");
    api.apply(&pod("shop", "web-1", "web", "node-b", "Running"));
    let outcome = fetch_until(&a, &web, |o| o.is_ok()).await;
    let (code, message) = outcome.expect_err("node-a kept getting shop/web after web-0 went");
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert!(message.contains("scheduled on node node-a"), "{message}");
    fetch_until(&b, &web, |o| o.is_err())
        .await
        .expect("node-b gets shop/web once web-1 is there");

    // web-1 completes (a Job's pod, say): still on node-b, but nothing runs as shop/web.
    api.modify::<Pod>("shop", "web-1", |p| {
        p.status.as_mut().unwrap().phase = Some("Succeeded".into());
    })
    .unwrap();
    let (code, _) = fetch_until(&b, &web, |o| o.is_ok())
        .await
        .expect_err("a finished pod keeps its identity");
    assert_eq!(code, Code::PermissionDenied);
}

#[tokio::test]
async fn unavailable_until_the_pods_are_listed() {
    let cluster = Arc::new(Cluster::default());
    cluster.fail_pod_lists.store(true, Ordering::SeqCst);
    let (api, ca) = start(&cluster).await;
    apply_workloads(&api);
    let a = client(
        &ca,
        &cluster.agent_token("token-of-agent-on-node-a", "node-a"),
    );
    let web = id("shop", "web");
    // Long enough for the watcher to have failed and retried at least once.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (code, message) = refused(a.fetch(&web, Duration::from_secs(60)).await);
    assert_eq!(code, Code::Unavailable, "{message}");
    assert!(
        message.contains("not yet listed the cluster's pods") && message.contains("etcd"),
        "{message}"
    );
    // Even a caller the CA would refuse is told to come back, not denied.
    let (code, _) = refused(a.fetch(&id("pay", "pay"), Duration::from_secs(60)).await);
    assert_eq!(code, Code::Unavailable);
    assert_eq!(
        cluster.reviews.load(Ordering::SeqCst),
        0,
        "no TokenReview is spent before the cache can decide"
    );
    // Its readiness probe says so: a Service sends no caller to it yet.
    let not_ready = ready(&ca)
        .await
        .expect_err("ready before the pods are listed");
    assert!(
        not_ready.contains("HTTP 503") && not_ready.contains("not yet listed the cluster's pods"),
        "{not_ready}"
    );

    cluster.fail_pod_lists.store(false, Ordering::SeqCst);
    fetch_until(&a, &web, is_unavailable)
        .await
        .expect("signed once the pods are listed");
    assert_eq!(ready(&ca).await.unwrap(), "ready\n");
}

/// `GET /ready` on the CA's monitoring port: the body of a 200, else the error (with the
/// status and body).
async fn ready(ca: &TestCaServer) -> Result<String, String> {
    let addr = ca
        .monitoring
        .expect("the test CA serves its monitoring port");
    crate::cli::fetch::get(addr, "/ready")
        .await
        .map(|body| String::from_utf8_lossy(&body).into_owned())
        .map_err(|e| format!("{e:#}"))
}

/// The CA's metrics, parsed.
async fn ca_metrics(ca: &TestCaServer) -> Samples {
    let addr = ca
        .monitoring
        .expect("the test CA serves its monitoring port");
    let body = crate::cli::fetch::get(addr, "/metrics").await.unwrap();
    parse(&String::from_utf8_lossy(&body))
}

/// The waypoint of namespace shop: its pod on node-a, running as shop/waypoint, and its
/// projected token (bound to the pod, node-a in the claims, as Kubernetes ≥ 1.30 issues them).
fn waypoint_token(cluster: &Cluster, api: &FakeApiServer, token: &str) -> String {
    api.apply(&pod("shop", "waypoint-0", "waypoint", "node-a", "Running"));
    cluster.issue(
        token,
        "system:serviceaccount:shop:waypoint",
        &["ambit-ca"],
        vec![
            (EXTRA_POD_NAME, "waypoint-0".into()),
            (EXTRA_POD_UID, "uid-waypoint-0".into()),
            (EXTRA_NODE_NAME, "node-a".into()),
        ],
    )
}

/// A workload's own token (a waypoint deployed by the waypoint controller) gets its own
/// identity and nothing else: not another account's of its namespace, not a neighbour's on
/// its node; and another account's token never gets the waypoint's. Every answer is counted.
#[tokio::test]
async fn a_workload_token_gets_its_own_identity_and_no_other() {
    let cluster = Arc::new(Cluster::default());
    let (api, ca) = start(&cluster).await;
    apply_workloads(&api);
    let token = waypoint_token(&cluster, &api, "token-of-the-shop-waypoint");
    let waypoint = client(&ca, &token);
    let own = id("shop", "waypoint");
    fetch_until(&waypoint, &own, is_unavailable)
        .await
        .expect("the waypoint's own identity");
    // Without metadata, its CSR's SAN: the same rule.
    let chain = create_certificate(
        &waypoint,
        &token,
        csr_with(vec![uri("spiffe://cluster.local/ns/shop/sa/waypoint")]),
        None,
    )
    .await
    .expect("its own identity, named by the CSR");
    assert_eq!(
        leaf_sans(&chain),
        ["spiffe://cluster.local/ns/shop/sa/waypoint"]
    );

    // shop/web runs on the waypoint's node, in its namespace: still not the waypoint's.
    for other in [
        id("shop", "web"),
        id("pay", "pay"),
        id("ambit-system", "ambit-agent"),
    ] {
        let (code, message) = refused(waypoint.fetch(&other, Duration::from_secs(60)).await);
        assert_eq!(code, Code::PermissionDenied, "{other}: {message}");
        assert!(
            message.contains(
                "the token of system:serviceaccount:shop:waypoint proves only the identity \
                 spiffe://cluster.local/ns/shop/sa/waypoint"
            ) && message.contains(&other.to_string()),
            "{message}"
        );
    }
    let status = create_certificate(
        &waypoint,
        &token,
        csr_with(vec![uri("spiffe://cluster.local/ns/shop/sa/web")]),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // shop/web's own token, bound to its pod on the same node: not the waypoint's identity.
    let web_token = cluster.issue(
        "token-of-the-web-workload",
        "system:serviceaccount:shop:web",
        &["ambit-ca"],
        vec![
            (EXTRA_POD_NAME, "web-0".into()),
            (EXTRA_POD_UID, "uid-web-0".into()),
            (EXTRA_NODE_NAME, "node-a".into()),
        ],
    );
    let web = client(&ca, &web_token);
    let (code, message) = refused(web.fetch(&own, Duration::from_secs(60)).await);
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert!(message.contains("proves only the identity spiffe://cluster.local/ns/shop/sa/web"));
    web.fetch(&id("shop", "web"), Duration::from_secs(60))
        .await
        .expect("a workload's own identity, as Istio's CA signs it");
    // A token of the waypoint's account bound to no pod (a legacy Secret token) proves nothing.
    let unbound = cluster.issue(
        "legacy-secret-token-of-the-waypoint",
        "system:serviceaccount:shop:waypoint",
        &["ambit-ca"],
        Vec::new(),
    );
    let (code, message) = refused(
        client(&ca, &unbound)
            .fetch(&own, Duration::from_secs(60))
            .await,
    );
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert!(message.contains("not bound to a pod"), "{message}");

    let samples = ca_metrics(&ca).await;
    let count = |name: &str, labels: &[(&str, &str)]| value(&samples, name, labels).unwrap_or(-1.0);
    assert_eq!(
        count(
            "ambit_ca_certificates_signed_total",
            &[("caller", "workload")]
        ),
        3.0
    );
    assert_eq!(
        count(
            "ambit_ca_certificates_refused_total",
            &[("reason", "not_own_identity")]
        ),
        5.0
    );
    assert_eq!(
        count(
            "ambit_ca_certificates_refused_total",
            &[("reason", "not_bound")]
        ),
        1.0
    );
    assert_eq!(
        count(
            "ambit_ca_token_review_duration_seconds_count",
            &[("outcome", "accepted")]
        ),
        2.0,
        "the waypoint's and web's tokens, each reviewed once"
    );
    assert_eq!(
        count(
            "ambit_ca_token_review_duration_seconds_count",
            &[("outcome", "refused")]
        ),
        1.0
    );
}

/// A workload's token proves its identity only while the pod it is bound to runs as it: a
/// finished pod, or one replaced by another of the same name, gets nothing.
#[tokio::test]
async fn a_workload_token_is_good_only_while_its_pod_runs() {
    let cluster = Arc::new(Cluster::default());
    let (api, ca) = start(&cluster).await;
    apply_workloads(&api);
    let token = waypoint_token(&cluster, &api, "token-of-the-shop-waypoint");
    let waypoint = client(&ca, &token);
    let own = id("shop", "waypoint");
    fetch_until(&waypoint, &own, is_unavailable).await.unwrap();

    api.apply(&pod(
        "shop",
        "waypoint-0",
        "waypoint",
        "node-a",
        "Succeeded",
    ));
    let (code, message) = fetch_until(&waypoint, &own, |o| o.is_ok())
        .await
        .expect_err("a finished pod's token keeps its identity");
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert!(
        message.contains("the pod shop/waypoint-0 the token of system:serviceaccount:shop:waypoint is bound to has terminated"),
        "{message}"
    );

    // Deleted, and a new pod of the same name: the old token's UID is not the new pod's.
    api.delete::<Pod>("shop", "waypoint-0");
    let mut replacement = pod("shop", "waypoint-0", "waypoint", "node-a", "Running");
    replacement.metadata.uid = Some("uid-of-the-next-waypoint-0".into());
    api.apply(&replacement);
    let (code, message) = fetch_until(&waypoint, &own, |o| {
        matches!(o, Err((Code::PermissionDenied, _)))
    })
    .await
    .expect_err("a replaced pod's token keeps its identity");
    assert_eq!(code, Code::Unavailable, "{message}");
    assert!(
        message.contains("shop/waypoint-0") && message.contains("not in the CA's pod cache"),
        "{message}"
    );
}

#[tokio::test]
async fn finds_the_node_through_the_bound_pod_on_older_clusters() {
    let cluster = Arc::new(Cluster::default());
    let (api, ca) = start(&cluster).await;
    apply_workloads(&api);
    api.apply(&pod(
        "ambit-system",
        "ambit-agent-x1",
        "ambit-agent",
        "node-a",
        "Running",
    ));
    // Kubernetes < 1.30: the pod, no node.
    let token = cluster.issue(
        "agent-token-without-node-claim",
        AGENT_USER,
        &["ambit-ca"],
        vec![
            (EXTRA_POD_NAME, "ambit-agent-x1".into()),
            (EXTRA_POD_UID, "uid-ambit-agent-x1".into()),
        ],
    );
    let a = client(&ca, &token);
    fetch_until(&a, &id("shop", "web"), is_unavailable)
        .await
        .expect("the bound pod is on node-a, which runs shop/web");
    let (code, message) = refused(a.fetch(&id("pay", "pay"), Duration::from_secs(60)).await);
    assert_eq!(code, Code::PermissionDenied);
    assert!(message.contains("on node node-a"), "{message}");

    // A token bound to an earlier pod of the same name: proves nothing about the new one.
    let stale = cluster.issue(
        "agent-token-of-a-replaced-pod",
        AGENT_USER,
        &["ambit-ca"],
        vec![
            (EXTRA_POD_NAME, "ambit-agent-x1".into()),
            (EXTRA_POD_UID, "uid-of-an-older-pod".into()),
        ],
    );
    let (code, message) = refused(
        client(&ca, &stale)
            .fetch(&id("shop", "web"), Duration::from_secs(60))
            .await,
    );
    assert_eq!(code, Code::Unavailable, "{message}");
    assert!(
        message.contains("ambit-system/ambit-agent-x1")
            && message.contains("not in the CA's pod cache"),
        "{message}"
    );
}

fn reviews(cluster: &Cluster) -> usize {
    cluster.reviews.load(Ordering::SeqCst)
}

/// A client of `ca` with `token` whose connections come from `source` (on loopback).
fn client_from(ca: &TestCaServer, token: &str, source: &str) -> CaClient {
    CaClient::bound_to(ca.client_config(token), source.parse().unwrap())
}

#[tokio::test]
async fn accepted_reviews_are_cached_briefly() {
    let cluster = Arc::new(Cluster::default());
    let (api, ca) = start_with(&cluster, |mut o| {
        o.review_cache_ttl = Duration::from_secs(2);
        o
    })
    .await;
    apply_workloads(&api);
    let token = cluster.agent_token("token-of-agent-on-node-a", "node-a");
    let a = client(&ca, &token);
    let web = id("shop", "web");
    fetch_until(&a, &web, is_unavailable).await.unwrap();
    assert_eq!(reviews(&cluster), 1);
    for _ in 0..3 {
        a.fetch(&web, Duration::from_secs(60)).await.unwrap();
    }
    assert_eq!(reviews(&cluster), 1, "served from the cache");

    // Revoked (its pod deleted, say): accepted until the cached review expires, then refused.
    cluster.revoke(&token);
    a.fetch(&web, Duration::from_secs(60)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (code, _) = refused(a.fetch(&web, Duration::from_secs(60)).await);
    assert_eq!(code, Code::Unauthenticated);
}

#[tokio::test]
async fn a_bad_token_costs_one_review_within_the_cache_lifetime() {
    let cluster = Arc::new(Cluster::default());
    let (api, ca) = start_with(&cluster, |mut o| {
        // Longer than the test: every repeat below is within the lifetime.
        o.limits.refused_ttl = Duration::from_secs(3600);
        o
    })
    .await;
    apply_workloads(&api);
    let agent = client(
        &ca,
        &cluster.agent_token("token-of-agent-on-node-a", "node-a"),
    );
    let web = id("shop", "web");
    fetch_until(&agent, &web, is_unavailable).await.unwrap();
    assert_eq!(reviews(&cluster), 1);

    // A token the API server does not know, sent again and again (over new connections too):
    // one review, and every answer is the API server's verdict.
    for _ in 0..10 {
        let (code, message) = refused(
            client(&ca, "not-a-token-the-cluster-issued")
                .fetch(&web, Duration::from_secs(60))
                .await,
        );
        assert_eq!(code, Code::Unauthenticated, "{message}");
        assert!(
            message.contains("rejected by the API server's TokenReview")
                && message.contains("invalid bearer token"),
            "{message}"
        );
    }
    assert_eq!(reviews(&cluster), 2);

    // A valid token that proves no pod (a workload's, bound to a node only): the verdict is
    // kept too.
    let workload = cluster.issue(
        "token-of-the-web-workload",
        "system:serviceaccount:shop:web",
        &["ambit-ca"],
        vec![(EXTRA_NODE_NAME, "node-a".into())],
    );
    for _ in 0..5 {
        let (code, message) = refused(
            client(&ca, &workload)
                .fetch(&web, Duration::from_secs(60))
                .await,
        );
        assert_eq!(code, Code::PermissionDenied, "{message}");
        assert!(message.contains("not bound to a pod"), "{message}");
    }
    assert_eq!(reviews(&cluster), 3);

    // A review the API server could not make is no verdict: not cached.
    cluster.forbid_reviews.store(true, Ordering::SeqCst);
    for _ in 0..2 {
        let (code, _) = refused(
            client(&ca, "another-unknown-token")
                .fetch(&web, Duration::from_secs(60))
                .await,
        );
        assert_eq!(code, Code::Unavailable);
    }
    assert_eq!(reviews(&cluster), 5);
    cluster.forbid_reviews.store(false, Ordering::SeqCst);

    // The agent is served from its own cached review meanwhile.
    agent.fetch(&web, Duration::from_secs(60)).await.unwrap();
    assert_eq!(reviews(&cluster), 5);
}

#[tokio::test]
async fn a_refused_review_is_asked_again_once_expired() {
    let cluster = Arc::new(Cluster::default());
    let (api, ca) = start_with(&cluster, |mut o| {
        o.limits.refused_ttl = Duration::from_secs(1);
        o
    })
    .await;
    apply_workloads(&api);
    let token = "a-token-the-api-server-learns-of-later";
    let a = client(&ca, token);
    let web = id("shop", "web");
    let (code, _) = fetch_until(&a, &web, is_unavailable)
        .await
        .expect_err("an unknown token");
    assert_eq!(code, Code::Unauthenticated);
    let before = reviews(&cluster);

    // The API server now accepts it; the CA keeps its verdict for the refused TTL ...
    cluster.agent_token(token, "node-a");
    let (code, _) = refused(a.fetch(&web, Duration::from_secs(60)).await);
    assert_eq!(code, Code::Unauthenticated);
    assert_eq!(reviews(&cluster), before, "answered from the cache");
    // ... and asks again after it.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    a.fetch(&web, Duration::from_secs(60))
        .await
        .expect("reviewed again, and accepted");
    assert_eq!(reviews(&cluster), before + 1);
}

#[tokio::test]
async fn the_cache_of_refused_reviews_is_bounded() {
    let cluster = Arc::new(Cluster::default());
    let (api, ca) = start_with(&cluster, |mut o| {
        o.limits.refused_ttl = Duration::from_secs(3600);
        o.limits.refused_capacity = 2.try_into().unwrap();
        o
    })
    .await;
    apply_workloads(&api);
    let agent = client(
        &ca,
        &cluster.agent_token("token-of-agent-on-node-a", "node-a"),
    );
    let web = id("shop", "web");
    fetch_until(&agent, &web, is_unavailable).await.unwrap();
    let start = reviews(&cluster);
    let bad = |n: u32| {
        let c = client(&ca, &format!("garbage-token-number-{n}"));
        let web = web.clone();
        async move {
            let (code, _) = refused(c.fetch(&web, Duration::from_secs(60)).await);
            assert_eq!(code, Code::Unauthenticated);
        }
    };
    for n in 1..=3 {
        bad(n).await;
    }
    assert_eq!(reviews(&cluster), start + 3);
    // The cache holds two: the last one is there, the first one is gone.
    bad(3).await;
    assert_eq!(reviews(&cluster), start + 3, "token 3 is cached");
    bad(1).await;
    assert_eq!(reviews(&cluster), start + 4, "token 1 was evicted");
    bad(3).await;
    assert_eq!(reviews(&cluster), start + 4, "token 3 is still cached");
}

#[tokio::test]
async fn a_flood_from_one_address_is_rate_limited_while_others_are_served() {
    let cluster = Arc::new(Cluster::default());
    let (api, ca) = start_with(&cluster, |mut o| {
        // Three reviews per address, and no refill within the test.
        o.limits.per_peer = quota(3, Duration::from_secs(3600));
        o
    })
    .await;
    apply_workloads(&api);
    let web = id("shop", "web");
    let good = cluster.agent_token("token-of-agent-on-node-a", "node-a");
    let agent = client_from(&ca, &good, "127.0.0.1");
    fetch_until(&agent, &web, is_unavailable).await.unwrap();
    assert_eq!(reviews(&cluster), 1, "127.0.0.1 has spent one review");

    // 127.0.0.2 floods with a fresh garbage token each time (which no cache can answer).
    let csr = || csr_with(vec![uri(&web.to_string())]);
    let mut limited = 0;
    for n in 0..20 {
        let token = format!("garbage-token-of-the-flood-{n}");
        let flooder = client_from(&ca, &token, "127.0.0.2");
        let status = create_certificate(&flooder, &token, csr(), None)
            .await
            .unwrap_err();
        if n < 3 {
            assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        } else {
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            assert!(
                status
                    .message()
                    .contains("too many token reviews for client 127.0.0.2")
                    && status.message().contains("retry in"),
                "{}",
                status.message()
            );
            limited += 1;
        }
    }
    assert_eq!(limited, 17);
    assert_eq!(
        reviews(&cluster),
        4,
        "the limited requests cost the API server nothing"
    );
    // A token already judged is still answered from the cache, limit or not.
    let token = "garbage-token-of-the-flood-0";
    let status = create_certificate(&client_from(&ca, token, "127.0.0.2"), token, csr(), None)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // Another address is served: the agent of node-b with a token never reviewed before ...
    let b = cluster.agent_token("token-of-agent-on-node-b", "node-b");
    let pay = "spiffe://cluster.local/ns/pay/sa/pay";
    let chain = create_certificate(
        &client_from(&ca, &b, "127.0.0.1"),
        &b,
        csr_with(vec![uri(pay)]),
        None,
    )
    .await
    .expect("another address has its own budget");
    assert_eq!(leaf_sans(&chain), [pay]);
    assert_eq!(reviews(&cluster), 5);
    // ... and node-a's agent from its cached review, while the flooding address cannot get a
    // review even for a good token.
    agent.fetch(&web, Duration::from_secs(60)).await.unwrap();
    let other = cluster.agent_token("another-token-of-an-agent-on-node-a", "node-a");
    let status = create_certificate(&client_from(&ca, &other, "127.0.0.2"), &other, csr(), None)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reviews(&cluster), 5);
}

#[tokio::test]
async fn without_metadata_signs_the_csrs_san_for_pods_on_the_callers_node() {
    let cluster = Arc::new(Cluster::default());
    let (api, ca) = start(&cluster).await;
    apply_workloads(&api);
    let token = cluster.agent_token("token-of-agent-on-node-a", "node-a");
    let a = client(&ca, &token);
    fetch_until(&a, &id("shop", "web"), is_unavailable)
        .await
        .unwrap();

    let web = "spiffe://cluster.local/ns/shop/sa/web";
    let chain = create_certificate(&a, &token, csr_with(vec![uri(web)]), None)
        .await
        .expect("node-a runs shop/web");
    assert_eq!(leaf_sans(&chain), [web]);

    let pay = "spiffe://cluster.local/ns/pay/sa/pay";
    let status = create_certificate(&a, &token, csr_with(vec![uri(pay)]), None)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status
            .message()
            .contains("no pod with service account pay/pay is scheduled on node node-a"),
        "{}",
        status.message()
    );
    let status = create_certificate(&a, &token, csr_with(vec![]), None)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("no subject alternative name"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn a_ca_without_rbac_for_tokenreviews_says_so() {
    let cluster = Arc::new(Cluster::default());
    let (api, ca) = start(&cluster).await;
    apply_workloads(&api);
    let a = client(
        &ca,
        &cluster.agent_token("token-of-agent-on-node-a", "node-a"),
    );
    // Wait for the pod cache: refusals before are about it.
    fetch_until(&a, &id("shop", "web"), is_unavailable)
        .await
        .unwrap();
    cluster.forbid_reviews.store(true, Ordering::SeqCst);
    let other = client(
        &ca,
        &cluster.agent_token("token-of-agent-on-node-b", "node-b"),
    );
    let (code, message) = refused(
        other
            .fetch(&id("pay", "pay"), Duration::from_secs(60))
            .await,
    );
    assert_eq!(code, Code::Unavailable, "{message}");
    assert!(message.contains("create tokenreviews"), "{message}");
}

#[tokio::test]
async fn the_agent_sends_its_rotated_token() {
    let cluster = Arc::new(Cluster::default());
    let (api, ca) = start(&cluster).await;
    apply_workloads(&api);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    // The token the agent started with has expired.
    std::fs::write(&file, "an-expired-projected-token\n").unwrap();
    let config = CaClientConfig {
        token: BearerToken::from_file(&file).unwrap(),
        ..ca.client_config("unused")
    };
    let a = CaClient::new(config).unwrap();
    let web = id("shop", "web");
    let (code, _) = fetch_until(&a, &web, is_unavailable)
        .await
        .expect_err("an unknown token");
    assert_eq!(code, Code::Unauthenticated);

    // kubelet writes the new token (a rename over the old file, as its atomic writer does).
    let fresh = cluster.agent_token("the-fresh-projected-token", "node-a");
    let next = dir.path().join("token.new");
    std::fs::write(&next, &fresh).unwrap();
    std::fs::rename(&next, &file).unwrap();
    a.fetch(&web, Duration::from_secs(60))
        .await
        .expect("the same client sends the new token");
}
