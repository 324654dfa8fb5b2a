//! End-to-end: agents in Kubernetes mode (`ambit agent --kube`), fed by an API server instead of
//! the mesh file.
//!
//! No real API server can run here, so the agents talk to the in-process fake one
//! (`ambit::testing::fake_apiserver`: list and watch, chunked events, bookmarks), listening on the
//! fabric bridge of the test bed like a control plane node. Everything else is real: the agents
//! find each pod's network namespace from its UID through the kubelet-style cgroups the bed
//! creates (systemd driver on node 0, cgroupfs on node 1), load and attach their eBPF programs,
//! and carry real connections, in HBONE tunnels once a namespace label enrols the pods. The
//! bed's CA runs in Kubernetes mode against the same server: agents authenticate with their
//! tokens (TokenReview) and get identities of the pods the API places on their node.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ambit::discovery::kube::routes::{DestinationRuleResource, VirtualServiceResource};
use ambit::discovery::kube::security::{
    AuthorizationPolicyResource, PeerAuthenticationResource, PolicyStatus,
};
use ambit::identity::{BearerToken, CaClient, CaClientConfig, CaError, SpiffeId};
use ambit::testing::fake_apiserver::FakeApiServer;
use ambit_tests::traffic::{
    TIMEOUT, access_logs_to, connect_ok, cut_by_change, ensure_cut, long_transfer, metric_sum,
    metric_value, reaches, serve, wait_access_log,
};
use ambit_tests::{
    Cluster, ClusterSpec, Netns, Node, Pod, PodProcess, READINESS_PORT, ensure_or_dump,
};
use anyhow::{Context, Result, anyhow, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, Pod as KubePod, PodCondition, PodIP, PodSpec, PodStatus,
    Service as KubeService, ServiceAccount, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

/// The enrolment label, on namespaces and pods.
const MODE: &str = "ambit.dev/mode";
/// Where the fake API server listens: the fabric bridge address the bed's CA uses too.
const API_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 99, 0, 254)), 6443);

/// The fake API server, running on a runtime whose threads live in the bed's fabric namespace,
/// so its sockets (listener, and the one re-bound after an outage) are there too.
struct ApiServer {
    runtime: tokio::runtime::Runtime,
    server: FakeApiServer,
    kubeconfig: PathBuf,
}

impl ApiServer {
    fn start(cluster: &Cluster) -> Result<Self> {
        let netns = PathBuf::from(format!("/run/netns/{}", cluster.fabric_netns()));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .on_thread_start(move || {
                // A thread outside the fabric namespace would bind where 10.99.0.254 does not
                // exist (the bind fails): loud, never traffic in the wrong place.
                let ns = File::open(&netns).expect("open the fabric netns");
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            })
            .build()?;
        // Spawned, not block_on'd: block_on would run the bind on this (root namespace) thread.
        let server = runtime
            .block_on(runtime.spawn(FakeApiServer::start_on(API_ADDR)))?
            .context("starting the fake API server on the fabric bridge")?;
        let kubeconfig = cluster.run_dir().join("kubeconfig");
        std::fs::write(&kubeconfig, server.kubeconfig())?;
        Ok(Self {
            runtime,
            server,
            kubeconfig,
        })
    }

    /// Answers TokenReviews as the API server would for the agents' projected tokens: each
    /// node's token is the `ambit-system/ambit-agent` ServiceAccount's, bound to a pod on that
    /// node, for the audience `ambit-ca`. Returns the count of reviews answered.
    fn review_agent_tokens(&self, cluster: &Cluster) -> Result<Arc<AtomicU64>> {
        self.review_tokens(cluster, &[])
    }

    /// [`Self::review_agent_tokens`], and the projected tokens of bed pods (`(token, pod)`):
    /// each the token of the pod's ServiceAccount in its namespace, bound to the pod (name and
    /// UID) on its node, for the audience `ambit-ca`.
    fn review_tokens(&self, cluster: &Cluster, pods: &[(&str, &Pod)]) -> Result<Arc<AtomicU64>> {
        let mut users: HashMap<String, Value> = HashMap::new();
        for node in cluster.nodes() {
            users.insert(
                cluster.ca_token(node)?,
                json!({
                    "username": "system:serviceaccount:ambit-system:ambit-agent",
                    "groups": ["system:serviceaccounts", "system:serviceaccounts:ambit-system"],
                    "extra": {
                        "authentication.kubernetes.io/node-name": [node.name()],
                        "authentication.kubernetes.io/pod-name": [format!("ambit-agent-{}", node.name())],
                    },
                }),
            );
        }
        for (token, pod) in pods {
            let namespace = pod.namespace();
            users.insert(
                token.to_string(),
                json!({
                    "username": format!("system:serviceaccount:{namespace}:{}", pod.service_account()),
                    "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{namespace}")],
                    "extra": {
                        "authentication.kubernetes.io/node-name": [pod.node_name()],
                        "authentication.kubernetes.io/pod-name": [pod.name()],
                        "authentication.kubernetes.io/pod-uid": [pod.uid()],
                    },
                }),
            );
        }
        let count = Arc::new(AtomicU64::new(0));
        let reviews = count.clone();
        self.server
            .set_handler(Arc::new(move |method, path, _query, body| {
                if method.as_str() != "POST"
                    || path != "/apis/authentication.k8s.io/v1/tokenreviews"
                {
                    return None;
                }
                reviews.fetch_add(1, Ordering::SeqCst);
                let review: Value = serde_json::from_slice(body).ok()?;
                let audiences = &review["spec"]["audiences"];
                let user = review["spec"]["token"]
                    .as_str()
                    .and_then(|token| users.get(token));
                let status = match user {
                    Some(user) if *audiences == json!(["ambit-ca"]) => json!({
                        "authenticated": true,
                        "audiences": ["ambit-ca"],
                        "user": user,
                    }),
                    _ => json!({"authenticated": false, "error": "invalid bearer token"}),
                };
                Some((
                    201,
                    json!({
                        "apiVersion": "authentication.k8s.io/v1",
                        "kind": "TokenReview",
                        "spec": review["spec"],
                        "status": status,
                    }),
                ))
            }));
        Ok(count)
    }

    fn come_up(&self) -> Result<()> {
        let server = self.server.clone();
        self.runtime
            .block_on(self.runtime.spawn(async move { server.come_up().await }))?
            .context("bringing the fake API server back")
    }
}

fn namespace(name: &str, mode: Option<&str>) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: mode.map(|m| BTreeMap::from([(MODE.to_string(), m.to_string())])),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    }
}

/// The Pod object kubelet would report for the bed's `pod` (running, ready, both addresses).
fn pod_object(pod: &Pod, labels: &[(&str, &str)]) -> KubePod {
    KubePod {
        metadata: ObjectMeta {
            name: Some(pod.name().into()),
            namespace: Some(pod.namespace()),
            uid: Some(pod.uid().into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(pod.node_name().into()),
            service_account_name: Some(pod.service_account()),
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(pod.ip4().to_string()),
            pod_ips: Some(
                pod.ips()
                    .iter()
                    .map(|ip| PodIP { ip: ip.to_string() })
                    .collect(),
            ),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        }),
    }
}

/// Publishes namespace `shop` (with the enrolment label `mode`) and `pods` in it, each with its
/// labels, then starts every agent in Kubernetes mode. Each pod gets a process that lives as
/// long as the returned handles, as kubelet's sandbox ("pause") container does: the agent finds
/// a pod's network namespace through the processes of its cgroup.
fn start_shop(
    cluster: &Cluster,
    api: &ApiServer,
    mode: Option<&str>,
    pods: &[(&Pod, &[(&str, &str)])],
) -> Result<Vec<PodProcess>> {
    let pods: Vec<_> = pods
        .iter()
        .map(|&(pod, labels)| (pod, "shop", labels))
        .collect();
    start_namespaces(cluster, api, &[("shop", mode)], &pods)
}

/// A pod of the bed, the namespace it is published in, and its labels.
type PodIn<'a> = (&'a Pod, &'a str, &'a [(&'a str, &'a str)]);

/// [`start_shop`] for several namespaces, each with its enrolment label, and pods in any of
/// them.
fn start_namespaces(
    cluster: &Cluster,
    api: &ApiServer,
    namespaces: &[(&str, Option<&str>)],
    pods: &[PodIn<'_>],
) -> Result<Vec<PodProcess>> {
    let objects: Vec<(&Pod, KubePod)> = pods
        .iter()
        .map(|&(pod, namespace, labels)| {
            pod.set_namespace(namespace);
            (pod, pod_object(pod, labels))
        })
        .collect();
    start_objects(cluster, api, namespaces, &objects)
}

/// [`start_namespaces`] with each pod's object as given (its namespace must be the bed pod's).
fn start_objects(
    cluster: &Cluster,
    api: &ApiServer,
    namespaces: &[(&str, Option<&str>)],
    pods: &[(&Pod, KubePod)],
) -> Result<Vec<PodProcess>> {
    for (name, mode) in namespaces {
        api.server.apply(&namespace(name, *mode));
    }
    let mut sandboxes = Vec::new();
    for (pod, object) in pods {
        api.server.apply(object);
        sandboxes.push(pod.spawn("sleep", ["3600"])?);
    }
    for node in cluster.nodes() {
        node.use_kubernetes(&api.kubeconfig);
    }
    cluster.start_agents()?;
    Ok(sandboxes)
}

/// Waits until `node`'s agent has enrolled exactly `want` (`namespace/name`, sorted).
fn wait_enrolled(cluster: &Cluster, node: &Node, want: &[&str], why: &str) -> Result<()> {
    let what = format!("{why}: {} should enroll exactly {want:?}", node.name());
    cluster.wait_for(TIMEOUT, &what, || {
        let dump = node.config_dump()?;
        let mut enrolled: Vec<String> = dump["enrolled"]
            .as_array()
            .ok_or_else(|| {
                anyhow!(
                    "config_dump of {} has no enrolled list: {dump}",
                    node.name()
                )
            })?
            .iter()
            .filter_map(|pod| pod["uid"].as_str().map(String::from))
            .collect();
        enrolled.sort();
        Ok(if enrolled == want {
            Ok(())
        } else {
            Err(format!("enrolled {enrolled:?}"))
        })
    })
}

/// `GET /healthz/ready` on `node`: status and body.
fn readiness(node: &Node) -> Result<(u16, String)> {
    let r = node.http_get(READINESS_PORT, "/healthz/ready", Duration::from_secs(5))?;
    Ok((r.status, r.body))
}

/// Label enrolment end to end: a namespace label enrols its pods (their traffic goes into
/// mutual-TLS tunnels), a pod label opts one out, removing the namespace label un-enrols them,
/// all without restarting a pod; an API server outage leaves the last state serving and is
/// reported, and a change made meanwhile is applied when it returns.
#[test]
fn namespace_label_enrols_pods_end_to_end() -> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 1,
    })?;
    let api = ApiServer::start(&cluster)?;
    let reviews = api.review_agent_tokens(&cluster)?;
    cluster.use_kubernetes_ca(&api.kubeconfig);
    let (client, server) = (cluster.pod(0, 0), cluster.pod(1, 0));
    let _sandboxes = start_shop(
        &cluster,
        &api,
        None,
        &[
            (client, &[("app", "client")]),
            (server, &[("app", "server")]),
        ],
    )?;
    let _srv = serve(server, &[8080])?;
    let dst = server.addr4(8080);

    eprintln!("[kubernetes] phase: not labelled");
    // Not labelled: nothing enrolled, traffic untouched.
    for node in cluster.nodes() {
        wait_enrolled(&cluster, node, &[], "namespace not labelled")?;
    }
    let conn = connect_ok(&cluster, client, dst, 10_000)?;
    ensure_or_dump!(
        cluster,
        !conn.redirected(),
        "a pod of an unlabelled namespace was redirected: {:?}",
        conn.report
    );

    eprintln!("[kubernetes] phase: namespace labelled");
    // Labelled: both pods enrolled, the connection goes through the agents in mutual TLS.
    api.server.apply(&namespace("shop", Some("ambient")));
    wait_enrolled(
        &cluster,
        cluster.node(0),
        &["shop/p0-0"],
        "namespace labelled",
    )?;
    wait_enrolled(
        &cluster,
        cluster.node(1),
        &["shop/p1-0"],
        "namespace labelled",
    )?;
    cluster.node(1).wait_ready(TIMEOUT)?;
    let conn = connect_ok(&cluster, client, dst, 10_000)?;
    ensure_or_dump!(
        cluster,
        conn.redirected(),
        "not redirected once enrolled: {:?}",
        conn.report
    );
    let line = wait_access_log(&cluster, cluster.node(1), "inbound", dst, 1)?.remove(0);
    ensure_or_dump!(
        cluster,
        line["security"] == "mtls"
            && line["src_principal"] == "spiffe://cluster.local/ns/shop/sa/default",
        "inbound connection not in mutual TLS from the client's identity: {line}"
    );

    eprintln!("[kubernetes] phase: pod opt-out");
    // The server pod opts out by label: un-enrolled in place; the client still is, and
    // reaches it directly once its own agent has heard (its enrolled list does not change, so
    // wait for the client's agent to take the new state).
    let client_generation = cluster.node(0).config_generation()?;
    api.server
        .apply(&pod_object(server, &[("app", "server"), (MODE, "none")]));
    wait_enrolled(&cluster, cluster.node(1), &[], "pod opted out")?;
    cluster
        .node(0)
        .wait_config_generation(client_generation + 1, TIMEOUT)?;
    wait_enrolled(&cluster, cluster.node(0), &["shop/p0-0"], "pod opted out")?;
    let inbound_before = wait_access_log(&cluster, cluster.node(1), "inbound", dst, 1)?.len();
    let conn = connect_ok(&cluster, client, dst, 10_000)?;
    ensure_or_dump!(
        cluster,
        conn.redirected() && conn.seen_peer_ip() == Some(IpAddr::V4(client.ip4())),
        "an enrolled client should reach an opted-out pod in plaintext from its own address: {:?}",
        conn.report
    );
    api.server.apply(&pod_object(server, &[("app", "server")]));
    wait_enrolled(&cluster, cluster.node(1), &["shop/p1-0"], "opt-out removed")?;
    cluster.node(1).wait_ready(TIMEOUT)?;

    eprintln!("[kubernetes] phase: API server down");
    // The API server goes away: the agents keep the last state, say so, and keep carrying
    // traffic in tunnels.
    api.server.go_down();
    let node = cluster.node(0);
    cluster.wait_for(
        Duration::from_secs(60),
        "API server down: readiness should say so (still 200) and ambit_config_source_up be 0",
        || {
            let (status, body) = readiness(node)?;
            let up = metric_value(node, "ambit_config_source_up")?;
            Ok(
                if status == 200 && body.contains("unreachable") && up == 0.0 {
                    Ok(())
                } else {
                    Err(format!(
                        "readiness {status} {body:?}, ambit_config_source_up {up}"
                    ))
                },
            )
        },
    )?;
    let conn = connect_ok(&cluster, client, dst, 10_000)?;
    ensure_or_dump!(
        cluster,
        conn.redirected(),
        "the last state should keep serving while the API server is down: {:?}",
        conn.report
    );
    let inbound = wait_access_log(
        &cluster,
        cluster.node(1),
        "inbound",
        dst,
        inbound_before + 1,
    )?;
    ensure_or_dump!(
        cluster,
        inbound.last().is_some_and(|l| l["security"] == "mtls"),
        "not tunnelled while the API server was down: {:?}",
        inbound.last()
    );

    eprintln!("[kubernetes] phase: label removed while down; API server back");
    // Meanwhile the label is removed; once the server is back, both pods leave the mesh.
    api.server.apply(&namespace("shop", None));
    api.come_up()?;
    for node in cluster.nodes() {
        wait_enrolled(
            &cluster,
            node,
            &[],
            "namespace label removed during the outage",
        )?;
    }
    cluster.wait_for(
        Duration::from_secs(60),
        "ambit_config_source_up should be 1 again once the API server is back",
        || {
            let up = metric_value(node, "ambit_config_source_up")?;
            Ok(if up == 1.0 {
                Ok(())
            } else {
                Err(format!("{up}"))
            })
        },
    )?;
    let conn = connect_ok(&cluster, client, dst, 10_000)?;
    ensure_or_dump!(
        cluster,
        !conn.redirected(),
        "still redirected after un-enrolment: {:?}",
        conn.report
    );
    let reviewed = reviews.load(Ordering::SeqCst);
    ensure_or_dump!(
        cluster,
        reviewed >= 2,
        "the CA should have authenticated both agents by TokenReview; {reviewed} reviews"
    );
    Ok(())
}

/// An `AuthorizationPolicy` of `namespace` with `spec`.
fn authorization_policy(namespace: &str, name: &str, spec: Value) -> AuthorizationPolicyResource {
    AuthorizationPolicyResource {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..ObjectMeta::default()
        },
        spec,
        status: None,
    }
}

/// Waits until connections from `from` to `dst` are `allowed` (policies take effect when the
/// destination's agent has the new state: a moment after the API server has it).
fn wait_reach(
    cluster: &Cluster,
    from: &Pod,
    dst: SocketAddr,
    allowed: bool,
    why: &str,
) -> Result<()> {
    let want = if allowed { "allowed" } else { "refused" };
    let what = format!("{why}: {} -> {dst} should be {want}", from.name());
    cluster.wait_for(TIMEOUT, &what, || {
        Ok(if reaches(from, dst)? == allowed {
            Ok(())
        } else {
            Err(format!(
                "{} connection",
                if allowed { "refused" } else { "allowed" }
            ))
        })
    })
}

/// The Events of `reason` the API server holds regarding the object named `name`.
fn events_about(api: &ApiServer, reason: &str, name: &str) -> Vec<Event> {
    api.server
        .list::<Event>()
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        })
        .collect()
}

/// The `Accepted` condition the CA's status writer put on a policy: (status, reason, message).
fn wait_accepted(
    cluster: &Cluster,
    api: &ApiServer,
    namespace: &str,
    name: &str,
    want_status: &str,
) -> Result<(String, String, String)> {
    wait_accepted_of::<AuthorizationPolicyResource>(cluster, api, namespace, name, want_status)
}

/// Ambit's resources that carry the `Accepted` condition (the policies and the routing
/// resources share `PolicyStatus`).
trait WithAccepted:
    k8s_openapi::Resource<Scope = k8s_openapi::NamespaceResourceScope>
    + k8s_openapi::Metadata<Ty = ObjectMeta>
    + serde::de::DeserializeOwned
    + 'static
{
    fn status(&self) -> Option<&PolicyStatus>;
}

macro_rules! with_accepted {
    ($($type:ty),*) => {$(
        impl WithAccepted for $type {
            fn status(&self) -> Option<&PolicyStatus> {
                self.status.as_ref()
            }
        }
    )*};
}
with_accepted!(
    AuthorizationPolicyResource,
    VirtualServiceResource,
    DestinationRuleResource
);

/// [`wait_accepted`] for any resource `K` with the `Accepted` condition.
fn wait_accepted_of<K>(
    cluster: &Cluster,
    api: &ApiServer,
    namespace: &str,
    name: &str,
    want_status: &str,
) -> Result<(String, String, String)>
where
    K: WithAccepted,
{
    let kind = K::KIND;
    let what = format!("{kind} {namespace}/{name}: Accepted condition should be {want_status}");
    cluster.wait_for(TIMEOUT, &what, || {
        let policy = api
            .server
            .get::<K>(namespace, name)
            .ok_or_else(|| anyhow!("{kind} {namespace}/{name} is gone"))?;
        let generation = k8s_openapi::Metadata::metadata(&policy).generation;
        let condition = policy.status().and_then(|s| s.accepted()).cloned();
        Ok(match condition {
            Some(c) if c.status == want_status && c.observed_generation == generation => {
                Ok((c.status, c.reason, c.message))
            }
            other => Err(format!("{other:?} (generation {generation:?})")),
        })
    })
}

/// Ambit's policy resources end to end: the agents enforce AuthorizationPolicies read from the
/// API server, and the CA (as the cluster's status writer) reports on each: a policy with an
/// L7 field is rejected with a condition and an Event naming the field, and being an ALLOW it
/// fails closed until fixed.
#[test]
fn authorization_policies_from_the_api_are_enforced_and_reported() -> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 1,
    })?;
    let api = ApiServer::start(&cluster)?;
    api.review_agent_tokens(&cluster)?;
    // Installed CRDs, with their status subresource as deploy/crds declares it.
    api.server
        .register_with_status::<AuthorizationPolicyResource>();
    api.server
        .register_with_status::<PeerAuthenticationResource>();
    cluster.use_kubernetes_ca(&api.kubeconfig);
    let (client, server) = (cluster.pod(0, 0), cluster.pod(1, 0));
    client.set_service_account("frontend");
    server.set_service_account("backend");
    let _sandboxes = start_shop(
        &cluster,
        &api,
        Some("ambient"),
        &[
            (client, &[("app", "frontend")]),
            (server, &[("app", "backend")]),
        ],
    )?;
    wait_enrolled(
        &cluster,
        cluster.node(1),
        &["shop/p1-0"],
        "namespace labelled",
    )?;
    let _srv = serve(server, &[8080])?;
    let dst = server.addr4(8080);
    wait_reach(&cluster, client, dst, true, "no policy yet")?;

    eprintln!("[kubernetes] phase: default deny, which also cuts an open transfer");
    // Its own server, so its first `accepted` is the transfer's: relaying when the deny lands.
    let mut transfer_server = serve(server, &[9090])?;
    let mut transfer = long_transfer(client, server.addr4(9090))?;
    transfer_server.read_json_until(TIMEOUT, |v| v["event"] == "accepted")?;
    let (after, report) = cut_by_change(&cluster, &mut transfer, || {
        api.server
            .apply(&authorization_policy("shop", "default-deny", json!({})));
        Ok(())
    })?;
    ensure_cut(&cluster, &report, after)?;
    let closed = metric_sum(
        cluster.node(1),
        "ambit_connections_closed_by_policy_total",
        &[],
    )?;
    ensure_or_dump!(
        cluster,
        closed == 1.0,
        "the server's agent counted {closed} connections closed by the policy change, not 1"
    );
    wait_reach(&cluster, client, dst, false, "default-deny applied")?;
    wait_accepted(&cluster, &api, "shop", "default-deny", "True")?;

    eprintln!("[kubernetes] phase: allow frontend to backend");
    let allow = |to: Value| {
        authorization_policy(
            "shop",
            "backend-from-frontend",
            json!({
                "selector": {"matchLabels": {"app": "backend"}},
                "action": "ALLOW",
                "rules": [{
                    "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/frontend"]}}],
                    "to": [{"operation": to}],
                }],
            }),
        )
    };
    api.server.apply(&allow(json!({"ports": ["8080"]})));
    wait_reach(&cluster, client, dst, true, "frontend allowed")?;
    wait_accepted(&cluster, &api, "shop", "backend-from-frontend", "True")?;

    eprintln!("[kubernetes] phase: L7 field rejected, fails closed");
    api.server
        .apply(&allow(json!({"ports": ["8080"], "methods": ["GET"]})));
    wait_reach(&cluster, client, dst, false, "ALLOW with an L7 field")?;
    let (_, reason, message) =
        wait_accepted(&cluster, &api, "shop", "backend-from-frontend", "False")?;
    ensure_or_dump!(
        cluster,
        reason == "UnsupportedField" && message.contains("spec.rules[0].to[0].operation.methods"),
        "rejected policy's condition: reason {reason}, message {message:?}"
    );
    let events = events_about(&api, "UnsupportedField", "backend-from-frontend");
    ensure_or_dump!(
        cluster,
        events.len() == 1,
        "expected one UnsupportedField Event for the policy, got {events:?}"
    );

    eprintln!("[kubernetes] phase: fixed");
    api.server.apply(&allow(json!({"ports": ["8080"]})));
    wait_reach(&cluster, client, dst, true, "policy fixed")?;
    wait_accepted(&cluster, &api, "shop", "backend-from-frontend", "True")?;
    Ok(())
}

/// The seed's object `name` as Ambit's typed resource `K`, which must be the object's
/// `apiVersion` and `kind`.
fn seed_object<K>(objects: &HashMap<String, Value>, name: &str) -> Result<K>
where
    K: k8s_openapi::Resource + serde::de::DeserializeOwned,
{
    let object = objects
        .get(name)
        .with_context(|| format!("no {name} in the seed"))?;
    ensure!(
        object["apiVersion"] == K::API_VERSION && object["kind"] == K::KIND,
        "{name} is {} {}, not {} {}",
        object["apiVersion"],
        object["kind"],
        K::API_VERSION,
        K::KIND
    );
    serde_json::from_value(object.clone()).with_context(|| format!("{name} as {}", K::KIND))
}

/// A Service of `default` selecting `app`, port `http` `port` to `target`, bound to the
/// waypoint `waypoint` if given.
fn default_service(
    name: &str,
    vip: &str,
    app: &str,
    (port, target): (i32, i32),
    waypoint: Option<&str>,
) -> KubeService {
    KubeService {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            labels: waypoint
                .map(|w| BTreeMap::from([("ambit.dev/use-waypoint".to_string(), w.to_string())])),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(vip.into()),
            cluster_ips: Some(vec![vip.into()]),
            selector: Some(BTreeMap::from([("app".to_string(), app.to_string())])),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port,
                target_port: Some(IntOrString::Int(target)),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The seed's split: 300 requests without `end-user: jason`, 10% to v2. Binomial(300, 0.1):
/// mean 30, sd 5.2; v2 gets 5 or fewer with probability 7.3e-9 and 76 or more with 2.4e-14, so
/// [6, 75] (2% to 25%) never flakes; a split ignoring the weights (50%) lands in it with
/// probability 7e-19, and one ignoring the subsets (round robin) as well, all-v1 never.
const SEED_SPLIT_REQUESTS: usize = 300;
const SEED_SPLIT_V2: std::ops::RangeInclusive<usize> = 6..=75;

/// The promise of the project: the seed document's Istio examples (canary VirtualService,
/// circuit-breaking DestinationRule, the zero-trust AuthorizationPolicies), applied to the API
/// server with only their `apiVersion` changed, do in Kubernetes mode what Istio ambient does.
///
/// - The canary, through a waypoint run with `--kube`: the VirtualService names subsets v1 and
///   v2 that the seed's DestinationRule does not define, so it is rejected naming the field
///   (Istio would accept it and answer 503 at run time); once a second DestinationRule defines
///   the two subsets (merged with the seed's, as Istio merges the rules of one host; the seed
///   itself is unchanged), `end-user: jason` always reaches v2, everyone else splits 90/10,
///   and the seed rule's `maxRequestsPerConnection: 2` shows in the upstream connections the
///   waypoint opens.
/// - `deny-all` denies every workload of `default`; `allow-frontend-to-backend` is a selector
///   policy, the node agents', with an L7 field (`methods`): rejected naming it and enforced
///   fail-closed (frontend denied too), as in Istio ambient's ztunnel. Ported as
///   docs/l7-policy.md says (selector replaced by `targetRefs` to the Service, and the
///   waypoint's identity allowed at L4 past `deny-all`), the waypoint lets frontend GET and
///   POST, and denies its DELETE and another ServiceAccount's GET with 403.
#[test]
fn the_seed_istio_examples_work_after_changing_only_api_version() -> Result<()> {
    use ambit_tests::waypoint::{
        self as wp, REVIEWS_VIP, WAYPOINT_VIP, route_ca_to_pods_of, start_server, sum_series,
        wait_serving, waypoint_metrics,
    };
    const BACKEND_VIP: &str = "10.96.0.32";

    let seed = wp::seed_examples()?;
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 3,
    })?;
    let (frontend, waypoint, other) = (cluster.pod(0, 0), cluster.pod(0, 1), cluster.pod(0, 2));
    let (v1, v2, backend) = (cluster.pod(1, 0), cluster.pod(1, 1), cluster.pod(1, 2));
    frontend.set_service_account("frontend");
    waypoint.set_service_account("waypoint");
    other.set_service_account("reviewer");
    backend.set_service_account("backend");
    let api = ApiServer::start(&cluster)?;
    let waypoint_token = format!("{}-projected-token-of-default-waypoint", cluster.id());
    api.review_tokens(&cluster, &[(waypoint_token.as_str(), waypoint)])?;
    api.server
        .register_with_status::<AuthorizationPolicyResource>();
    api.server
        .register_with_status::<PeerAuthenticationResource>();
    api.server.register_with_status::<VirtualServiceResource>();
    api.server.register_with_status::<DestinationRuleResource>();
    cluster.use_kubernetes_ca(&api.kubeconfig);
    api.server.apply(&default_service(
        "reviews",
        REVIEWS_VIP,
        "reviews",
        (9080, 8080),
        Some("waypoint"),
    ));
    api.server.apply(&default_service(
        "waypoint",
        WAYPOINT_VIP,
        "waypoint",
        (15008, 15008),
        None,
    ));
    // Each pod's sandbox, the waypoint's too (its pod runs the waypoint below).
    let _sandboxes = start_namespaces(
        &cluster,
        &api,
        &[("default", Some("ambient"))],
        &[
            (frontend, "default", &[("app", "frontend")]),
            (waypoint, "default", &[("app", "waypoint"), (MODE, "none")]),
            (other, "default", &[("app", "reviewer")]),
            (v1, "default", &[("app", "reviews"), ("version", "v1")]),
            (v2, "default", &[("app", "reviews"), ("version", "v2")]),
            (backend, "default", &[("app", "backend")]),
        ],
    )?;
    let _v1 = start_server(v1, "v1", &[])?;
    let _v2 = start_server(v2, "v2", &[])?;

    // The waypoint, as its Deployment runs it (kubernetes::run_deployment): `--kube`, its
    // projected token for the CA.
    route_ca_to_pods_of(&cluster, cluster.node(0))?;
    let token_file = cluster.run_dir().join("waypoint-token");
    std::fs::write(&token_file, &waypoint_token)?;
    let mut args: Vec<String> = [
        "waypoint",
        "--kube",
        "--kubeconfig",
        &api.kubeconfig.display().to_string(),
        "--name",
        waypoint.name(),
        "--namespace",
        "default",
        "--log-format",
        "json",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let mut ca_flags = cluster.node(0).ca_flags().into_iter();
    while let Some(flag) = ca_flags.next() {
        let value = ca_flags.next().context("a CA flag without value")?;
        let value = if flag == "--ca-token-file" {
            token_file.display().to_string()
        } else {
            value
        };
        args.extend([flag, value]);
    }
    let mut process = waypoint.spawn(cluster.ambit_bin(), &args)?;
    cluster.with_diagnostics(wait_serving(&cluster, waypoint, &mut process))?;
    for node in cluster.nodes() {
        node.wait_ready(TIMEOUT)?;
    }

    eprintln!("[kubernetes] phase: the seed's canary and circuit breaker, as they are");
    let breaker: DestinationRuleResource = seed_object(&seed, "reviews-circuit-breaker")?;
    let canary: VirtualServiceResource = seed_object(&seed, "reviews-canary")?;
    api.server.apply(&breaker);
    api.server.apply(&canary);
    wait_accepted_of::<DestinationRuleResource>(
        &cluster,
        &api,
        "default",
        "reviews-circuit-breaker",
        "True",
    )?;
    let (_, reason, message) = wait_accepted_of::<VirtualServiceResource>(
        &cluster,
        &api,
        "default",
        "reviews-canary",
        "False",
    )?;
    ensure_or_dump!(
        cluster,
        reason == "Invalid"
            && message.contains("spec.http[0].route[0].destination.subset")
            && message
                .contains("\"v2\" is not defined by a DestinationRule of service default/reviews"),
        "the canary without subsets: reason {reason}, message {message:?}"
    );

    eprintln!("[kubernetes] phase: a second DestinationRule defines subsets v1 and v2");
    // Nothing in the seed changes: the subsets its VirtualService names come from a rule of
    // their own, as Istio users often keep them, merged with the circuit breaker's as Istio
    // merges the rules of one host (its traffic policy stays, the subsets are added).
    let subsets: DestinationRuleResource = serde_json::from_value(json!({
        "apiVersion": "networking.ambit.dev/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "reviews-versions", "namespace": "default"},
        "spec": {
            "host": "reviews",
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}},
            ],
        },
    }))?;
    api.server.apply(&subsets);
    let (_, _, message) = wait_accepted_of::<DestinationRuleResource>(
        &cluster,
        &api,
        "default",
        "reviews-versions",
        "True",
    )?;
    ensure_or_dump!(
        cluster,
        message.contains("2 subset(s) of service default/reviews")
            && message
                .contains("merged with the older DestinationRule default/reviews-circuit-breaker"),
        "the subsets' DestinationRule's acceptance: {message:?}"
    );
    wait_accepted_of::<VirtualServiceResource>(
        &cluster,
        &api,
        "default",
        "reviews-canary",
        "True",
    )?;
    let reviews = format!("{REVIEWS_VIP}:9080");
    let jason_to_v2 = |count: usize| -> Result<std::result::Result<(), String>> {
        let answers = wp::curl(frontend, &reviews, "/reviews", count, &["end-user: jason"])?;
        Ok(if answers.count("v2 HTTP/1.1") == count {
            Ok(())
        } else {
            Err(format!("{:?}", answers.bodies))
        })
    };
    // The waypoint has the route once 20 requests in a row reach v2 (by chance: 1 in 10^6).
    cluster.wait_for(TIMEOUT, "the waypoint routes jason to v2", || {
        jason_to_v2(20)
    })?;
    let opened = |m: &str| sum_series(m, "ambit_waypoint_upstream_connections_total", &[]);
    let opened_before = opened(&waypoint_metrics(cluster.node(0), waypoint)?);
    cluster
        .with_diagnostics(jason_to_v2(100))?
        .map_err(|bodies| anyhow!("end-user: jason must always reach v2: {bodies}"))?;
    let split = cluster.with_diagnostics(wp::curl(
        frontend,
        &reviews,
        "/reviews",
        SEED_SPLIT_REQUESTS,
        &[],
    ))?;
    cluster.with_diagnostics(split.check_split(SEED_SPLIT_REQUESTS, SEED_SPLIT_V2))?;
    // maxRequestsPerConnection: 2: each upstream connection carried at most two of the 400
    // requests (without it, the pool reuses a handful of connections for all of them).
    let metrics = waypoint_metrics(cluster.node(0), waypoint)?;
    let opened_during = opened(&metrics) - opened_before;
    let requests = (100 + SEED_SPLIT_REQUESTS) as f64;
    eprintln!("{requests} requests opened {opened_during} upstream connections");
    ensure_or_dump!(
        cluster,
        opened_during >= requests / 2.0,
        "{requests} requests opened {opened_during} upstream connections: \
         maxRequestsPerConnection 2 not applied\n{metrics}"
    );

    eprintln!("[kubernetes] phase: the seed's AuthorizationPolicies, as they are");
    let _tcp_backend = serve(backend, &[9090])?;
    let _tcp_v1 = serve(v1, &[9090])?;
    let (to_backend, to_v1) = (backend.addr4(9090), v1.addr4(9090));
    wait_reach(&cluster, frontend, to_backend, true, "no policy yet")?;
    wait_reach(&cluster, other, to_v1, true, "no policy yet")?;
    let deny_all: AuthorizationPolicyResource = seed_object(&seed, "deny-all")?;
    let allow: AuthorizationPolicyResource = seed_object(&seed, "allow-frontend-to-backend")?;
    api.server.apply(&deny_all);
    api.server.apply(&allow);
    wait_accepted(&cluster, &api, "default", "deny-all", "True")?;
    let (_, reason, message) = wait_accepted(
        &cluster,
        &api,
        "default",
        "allow-frontend-to-backend",
        "False",
    )?;
    ensure_or_dump!(
        cluster,
        reason == "UnsupportedField" && message.contains("spec.rules[0].to[0].operation.methods"),
        "the selector policy with methods: reason {reason}, message {message:?}"
    );
    // deny-all: nothing reaches a workload of `default`; the rejected ALLOW fails closed, so
    // not even frontend reaches backend.
    wait_reach(&cluster, other, to_v1, false, "deny-all")?;
    wait_reach(
        &cluster,
        frontend,
        to_backend,
        false,
        "methods at L4 fail closed",
    )?;
    ensure_or_dump!(
        cluster,
        !reaches(other, to_backend)?,
        "another account reached backend under deny-all"
    );

    eprintln!("[kubernetes] phase: allow-frontend-to-backend at the waypoint (docs/l7-policy.md)");
    api.server.apply(&default_service(
        "backend",
        BACKEND_VIP,
        "backend",
        (80, 8080),
        Some("waypoint"),
    ));
    let _http_backend = start_server(backend, "backend", &[])?;
    let mut at_waypoint = allow.clone();
    let spec = at_waypoint
        .spec
        .as_object_mut()
        .context("the seed's spec is an object")?;
    spec.remove("selector");
    spec.insert(
        "targetRefs".into(),
        json!([{"kind": "Service", "group": "", "name": "backend"}]),
    );
    api.server.apply(&at_waypoint);
    // The endpoints see the waypoint's identity: allowed at L4 past deny-all, as Istio's
    // ambient documentation says.
    api.server.apply(&authorization_policy(
        "default",
        "allow-waypoint-to-backend",
        json!({
            "selector": {"matchLabels": {"app": "backend"}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/waypoint"]}}]}],
        }),
    ));
    wait_accepted(
        &cluster,
        &api,
        "default",
        "allow-frontend-to-backend",
        "True",
    )?;
    wait_accepted(
        &cluster,
        &api,
        "default",
        "allow-waypoint-to-backend",
        "True",
    )?;
    let backend_addr = format!("{BACKEND_VIP}:80");
    let ask = |from: &Pod, method: &str| -> Result<wp::Answers> {
        wp::curl_args(
            from,
            &backend_addr,
            "/seed",
            1,
            &["-X".to_string(), method.to_string()],
        )
    };
    cluster.wait_for(
        TIMEOUT,
        "frontend's GET to backend through the waypoint",
        || {
            // Until the agents and the waypoint have the new Service, the tunnel may be reset.
            Ok(match ask(frontend, "GET") {
                Ok(answers) if answers.count_code("200") == 1 => Ok(()),
                Ok(answers) => Err(format!("{:?} {:?}", answers.codes, answers.bodies)),
                Err(e) => Err(format!("{e:#}")),
            })
        },
    )?;
    for (from, method, want) in [
        (frontend, "GET", "200"),
        (frontend, "POST", "200"),
        (frontend, "DELETE", "403"),
        (other, "GET", "403"),
    ] {
        let answers = cluster.with_diagnostics(ask(from, method))?;
        let body_ok = if want == "200" {
            answers.count("backend HTTP/1.1") == 1
        } else {
            answers.count("RBAC: access denied") == 1
        };
        ensure_or_dump!(
            cluster,
            answers.count_code(want) == 1 && body_ok,
            "{} ({}) {method} backend: want {want}, got {:?} {:?}",
            from.name(),
            from.service_account(),
            answers.codes,
            answers.bodies
        );
    }
    // Counted as Istio's waypoint counts them, by the source's identity.
    let metrics = waypoint_metrics(cluster.node(0), waypoint)?;
    for account in ["frontend", "reviewer"] {
        let principal = format!("spiffe://cluster.local/ns/default/sa/{account}");
        let denied = wp::requests_total(
            &metrics,
            &[
                ("reporter", "waypoint"),
                ("response_code", "403"),
                ("source_principal", &principal),
            ],
        );
        ensure_or_dump!(
            cluster,
            denied == 1.0,
            "istio_requests_total counts {denied} denied requests of {account}, not 1:\n{metrics}"
        );
    }
    drop(process);
    Ok(())
}

/// A `PeerAuthentication` of `namespace` with `spec`.
fn peer_authentication(namespace: &str, name: &str, spec: Value) -> PeerAuthenticationResource {
    PeerAuthenticationResource {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..ObjectMeta::default()
        },
        spec,
        status: None,
    }
}

/// A Service of `shop` without selector: `vip`, port `http` 80 to 8080.
fn selectorless_service(name: &str, vip: Ipv4Addr) -> KubeService {
    KubeService {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("shop".into()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(vip.to_string()),
            cluster_ips: Some(vec![vip.to_string()]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(IntOrString::Int(8080)),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// A hand-made EndpointSlice of the `shop` Service `service`: `address`, port `http` 8080.
fn hand_made_slice(service: &str, address: Ipv4Addr) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{service}-manual")),
            namespace: Some("shop".into()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_string(),
                service.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(vec![Endpoint {
            addresses: vec![address.to_string()],
            ..Endpoint::default()
        }]),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..EndpointPort::default()
        }]),
    }
}

/// The defaults users rely on, through the API server: without any PeerAuthentication enrolled
/// pods accept plaintext from a pod outside the mesh (PERMISSIVE, Istio's default) and a
/// mesh-wide STRICT in the root namespace refuses it; a Service without selector reaches the
/// pod its hand-made EndpointSlice names (in HBONE: it gets through STRICT), and one without
/// any endpoint goes to the address dialled, here an address a pod outside the mesh answers on.
#[test]
fn permissive_by_default_and_services_without_selector() -> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 2,
    })?;
    let api = ApiServer::start(&cluster)?;
    api.review_agent_tokens(&cluster)?;
    api.server
        .register_with_status::<AuthorizationPolicyResource>();
    api.server
        .register_with_status::<PeerAuthenticationResource>();
    cluster.use_kubernetes_ca(&api.kubeconfig);
    let (client, outsider) = (cluster.pod(0, 0), cluster.pod(0, 1));
    let (server, external) = (cluster.pod(1, 0), cluster.pod(1, 1));
    // What the cluster would route the VIP of a service Ambit knows no endpoint of to.
    let unknown_vip = Ipv4Addr::new(10, 10, 1, 200);
    cluster.add_pod_address(external, unknown_vip)?;
    let _sandboxes = start_namespaces(
        &cluster,
        &api,
        &[("shop", Some("ambient")), ("outside", None)],
        &[
            (client, "shop", &[("app", "client")]),
            (server, "shop", &[("app", "server")]),
            (outsider, "outside", &[("app", "outsider")]),
            (external, "outside", &[("app", "external")]),
        ],
    )?;
    wait_enrolled(&cluster, cluster.node(0), &["shop/p0-0"], "shop enrolled")?;
    wait_enrolled(&cluster, cluster.node(1), &["shop/p1-0"], "shop enrolled")?;
    cluster.node(1).wait_ready(TIMEOUT)?;
    let _srv = serve(server, &[8080])?;
    let _ext = serve(external, &[8080])?;
    let dst = server.addr4(8080);

    eprintln!("[kubernetes] phase: no PeerAuthentication");
    wait_reach(&cluster, client, dst, true, "meshed client")?;
    let conn = connect_ok(&cluster, outsider, dst, 10_000)?;
    ensure_or_dump!(
        cluster,
        !conn.redirected() && conn.served_by() == server.name(),
        "plaintext from outside the mesh should reach an enrolled pod by default: {:?}",
        conn.report
    );
    let line = wait_access_log(&cluster, cluster.node(1), "inbound_plaintext", dst, 1)?.remove(0);
    ensure_or_dump!(
        cluster,
        line["security"] == "plaintext" && line["outcome"] == "ok",
        "the server's agent should have let the plaintext connection through: {line}"
    );

    eprintln!("[kubernetes] phase: mesh-wide STRICT");
    api.server.apply(&peer_authentication(
        "ambit-system",
        "default",
        json!({"mtls": {"mode": "STRICT"}}),
    ));
    wait_reach(&cluster, outsider, dst, false, "mesh-wide STRICT")?;
    wait_reach(&cluster, client, dst, true, "mutual TLS under STRICT")?;

    eprintln!("[kubernetes] phase: a Service without selector, a hand-made EndpointSlice");
    let db_vip = Ipv4Addr::new(10, 96, 0, 50);
    let db = SocketAddr::new(db_vip.into(), 80);
    api.server.apply(&selectorless_service("db", db_vip));
    api.server.apply(&hand_made_slice("db", server.ip4()));
    wait_reach(&cluster, client, db, true, "the slice's endpoint")?;
    let logged = access_logs_to(cluster.node(0), "outbound", db).len();
    let conn = connect_ok(&cluster, client, db, 10_000)?;
    ensure_or_dump!(
        cluster,
        conn.redirected() && conn.served_by() == server.name(),
        "the VIP should reach the pod the slice names: {:?}",
        conn.report
    );
    let line = wait_access_log(&cluster, cluster.node(0), "outbound", db, logged + 1)?
        .pop()
        .unwrap_or_default();
    ensure_or_dump!(
        cluster,
        line["security"] == "mtls"
            && line["dst_service"] == "shop/db"
            && line["upstream"] == dst.to_string(),
        "the slice's endpoint is an enrolled pod: expected mutual TLS to {dst}: {line}"
    );

    eprintln!("[kubernetes] phase: a Service without selector or endpoints");
    let legacy = SocketAddr::new(unknown_vip.into(), 8080);
    let mut service = selectorless_service("legacy", unknown_vip);
    service.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 8080;
    // The client's agent must know the service first: before, the VIP is an unknown address
    // and passes through whatever the code under test does (the access log says which).
    let generation = cluster.node(0).config_generation()?;
    api.server.apply(&service);
    cluster
        .node(0)
        .wait_config_generation(generation + 1, TIMEOUT)?;
    let conn = connect_ok(&cluster, client, legacy, 10_000)?;
    ensure_or_dump!(
        cluster,
        conn.redirected()
            && conn.served_by() == external.name()
            && conn.seen_peer_ip() == Some(IpAddr::V4(client.ip4())),
        "with no endpoint known, the VIP should be dialled from the client pod: {:?}",
        conn.report
    );
    let line = wait_access_log(&cluster, cluster.node(0), "outbound", legacy, 1)?
        .pop()
        .unwrap_or_default();
    ensure_or_dump!(
        cluster,
        line["security"] == "plaintext"
            && line["dst_service"] == "shop/legacy"
            && line["upstream"] == legacy.to_string(),
        "expected a plain connection to the address dialled: {line}"
    );
    Ok(())
}

/// The Pod object of `pod` while kubelet creates its sandbox: scheduled, Pending, no address.
fn pending_pod_object(pod: &Pod, labels: &[(&str, &str)]) -> KubePod {
    let mut object = pod_object(pod, labels);
    object.status = Some(PodStatus {
        phase: Some("Pending".into()),
        ..PodStatus::default()
    });
    object
}

/// New pods in Kubernetes: the CNI plugin's ADD for a Pending pod of an enrolled namespace
/// meshes its sandbox before it runs (its first connection already goes through the agents in
/// mutual TLS); once kubelet reports it Running with its address, it stays enrolled as it was;
/// the ADD of a pod of an unlabelled namespace succeeds and leaves it alone.
#[test]
fn cni_add_meshes_a_pending_pod_of_an_enrolled_namespace_before_it_runs() -> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 2,
    })?;
    let api = ApiServer::start(&cluster)?;
    api.review_agent_tokens(&cluster)?;
    cluster.use_kubernetes_ca(&api.kubeconfig);
    let (new, plain, server) = (cluster.pod(0, 0), cluster.pod(0, 1), cluster.pod(1, 0));
    let _sandboxes = start_shop(
        &cluster,
        &api,
        Some("ambient"),
        &[(server, &[("app", "server")])],
    )?;
    let _srv = serve(server, &[8080])?;
    new.set_namespace("shop");
    api.server
        .apply(&pending_pod_object(new, &[("app", "new")]));
    plain.set_namespace("plain");
    api.server.apply(&namespace("plain", None));
    api.server.apply(&pending_pod_object(plain, &[]));
    let node = cluster.node(0);

    let add = ambit_tests::cni::Sandbox::of(new, "sandbox-new").call(node, "ADD")?;
    ensure_or_dump!(cluster, add.success, "ADD of a pending pod failed: {add:?}");
    wait_enrolled(&cluster, node, &["shop/p0-0"], "after ADD")?;
    let conn = connect_ok(&cluster, new, server.addr4(8080), 10_000)?;
    ensure_or_dump!(
        cluster,
        conn.redirected(),
        "the first connection of the new pod was not captured: {:?}",
        conn.report
    );
    let line =
        wait_access_log(&cluster, cluster.node(1), "inbound", server.addr4(8080), 1)?.remove(0);
    ensure_or_dump!(
        cluster,
        line["security"] == "mtls"
            && line["src_principal"] == "spiffe://cluster.local/ns/shop/sa/default",
        "the new pod's first connection was not in mutual TLS with its identity: {line}"
    );

    let add = ambit_tests::cni::Sandbox::of(plain, "sandbox-plain").call(node, "ADD")?;
    ensure_or_dump!(
        cluster,
        add.success,
        "ADD of an unenrolled pod failed: {add:?}"
    );

    // kubelet reports the sandbox running: same namespace, same enrolment, nothing redone.
    let _pause = new.spawn("sleep", ["3600"])?;
    api.server.apply(&pod_object(new, &[("app", "new")]));
    std::thread::sleep(Duration::from_secs(1));
    wait_enrolled(&cluster, node, &["shop/p0-0"], "once Running")?;
    let reenrolled = node
        .agent_log()
        .lines()
        .filter(|l| l.contains("un-enrolled") && l.contains("shop/p0-0"))
        .count();
    ensure_or_dump!(
        cluster,
        reenrolled == 0,
        "the pod was re-enrolled when it started running"
    );
    let conn = connect_ok(&cluster, new, server.addr4(8080), 10_000)?;
    ensure_or_dump!(cluster, conn.redirected(), "not captured once Running");
    Ok(())
}

/// A pod that cannot be meshed in Kubernetes: its sandbox holds a port of the proxy, so the
/// agent closes it, the CNI ADD fails naming why, and the agent writes a Warning Event
/// regarding the pod (what `kubectl describe pod` shows).
#[test]
fn a_pod_that_cannot_be_meshed_is_closed_with_an_event() -> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        pods_per_node: 1,
    })?;
    let api = ApiServer::start(&cluster)?;
    api.review_agent_tokens(&cluster)?;
    cluster.use_kubernetes_ca(&api.kubeconfig);
    let blocked = cluster.pod(0, 0);
    let _sandboxes = start_shop(&cluster, &api, Some("ambient"), &[])?;
    blocked.set_namespace("shop");
    api.server
        .apply(&pending_pod_object(blocked, &[("app", "blocked")]));
    let _squatter = serve(blocked, &[15006])?;

    let add =
        ambit_tests::cni::Sandbox::of(blocked, "sandbox-blocked").call(cluster.node(0), "ADD")?;
    ensure_or_dump!(
        cluster,
        add.error_code() == Some(100),
        "ADD of a pod whose 15006 is taken did not fail: {add:?}"
    );
    cluster.wait_for(
        TIMEOUT,
        "the agent's Event regarding the closed pod",
        || {
            let events = events_about(&api, "MeshEnrolmentFailed", blocked.name());
            Ok(match events.as_slice() {
                [event]
                    if event.type_.as_deref() == Some("Warning")
                        && event.note.as_deref().is_some_and(|n| n.contains("15006")) =>
                {
                    Ok(())
                }
                _ => Err(format!("events: {events:?}")),
            })
        },
    )?;
    Ok(())
}

/// The object of the bed's `pod` published as `name`, a pod `controller` (kind, name) created
/// (`generateName` set, the owner reference marked `controller`), as the API server shows a
/// Deployment's or StatefulSet's pods.
fn controlled_pod_object(
    pod: &Pod,
    name: &str,
    generate_name: &str,
    controller: (&str, &str),
    labels: &[(&str, &str)],
) -> KubePod {
    let mut object = pod_object(pod, labels);
    object.metadata.name = Some(name.into());
    object.metadata.generate_name = Some(generate_name.into());
    object.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "apps/v1".into(),
        kind: controller.0.into(),
        name: controller.1.into(),
        uid: format!("{}-uid", controller.1),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }]);
    object
}

/// The labels Kiali's graph groups TCP traffic by (kiali/kiali
/// `graph/telemetry/istio/istio.go`, "TCP Byte traffic").
const KIALI_TCP_GROUP_BY: &str = "app,source_cluster,source_workload_namespace,source_workload,\
     source_canonical_service,source_canonical_revision,destination_cluster,\
     destination_service_namespace,destination_service,destination_service_name,\
     destination_workload_namespace,destination_workload,destination_canonical_service,\
     destination_canonical_revision,response_flags";

/// The query Kiali's graph issues for the TCP edges of `namespace` from `metric`: incoming as
/// the destinations report them (`reporter="destination"`), or outgoing as the sources do,
/// over its default 60 s window, rounded as Kiali rounds every graph query.
fn kiali_tcp_query(metric: &str, incoming: bool, namespace: &str) -> String {
    let selector = if incoming {
        format!("reporter=\"destination\",destination_workload_namespace=\"{namespace}\"")
    } else {
        format!("reporter=\"source\",source_workload_namespace=\"{namespace}\"")
    };
    format!("round(sum(rate({metric}{{{selector}}} [60s])) by ({KIALI_TCP_GROUP_BY}) > 0,0.001)")
}

/// Kiali's TCP graph from a real Prometheus scraping the agents: two pods of one Deployment
/// talking to two pods of one StatefulSet are one edge, `client` → `db`, named after the
/// controllers (from the pods' owner references, as istiod names them for ztunnel), and the
/// edge carries the bytes of connections that are still open.
#[test]
fn kiali_draws_one_tcp_edge_per_controller_pair_with_open_connections() -> Result<()> {
    use ambit_tests::prometheus::{Prometheus, by_labels};

    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 2,
    })?;
    let api = ApiServer::start(&cluster)?;
    api.review_agent_tokens(&cluster)?;
    cluster.use_kubernetes_ca(&api.kubeconfig);
    let (client_a, db_0) = (cluster.pod(0, 0), cluster.pod(0, 1));
    let (client_b, db_1) = (cluster.pod(1, 0), cluster.pod(1, 1));
    // A Deployment `client` (ReplicaSet client-7c9d8f6b5) and a StatefulSet `db`.
    let client_labels: &[(&str, &str)] =
        &[("app", "shop-client"), ("pod-template-hash", "7c9d8f6b5")];
    let db_labels: &[(&str, &str)] = &[("app", "db"), ("version", "v3")];
    let deployment = ("ReplicaSet", "client-7c9d8f6b5");
    let stateful_set = ("StatefulSet", "db");
    for pod in [client_a, client_b, db_0, db_1] {
        pod.set_namespace("shop");
    }
    let objects = [
        (
            client_a,
            controlled_pod_object(
                client_a,
                "client-7c9d8f6b5-x2x4q",
                "client-7c9d8f6b5-",
                deployment,
                client_labels,
            ),
        ),
        (
            client_b,
            controlled_pod_object(
                client_b,
                "client-7c9d8f6b5-9kz7m",
                "client-7c9d8f6b5-",
                deployment,
                client_labels,
            ),
        ),
        (
            db_0,
            controlled_pod_object(db_0, "db-0", "db-", stateful_set, db_labels),
        ),
        (
            db_1,
            controlled_pod_object(db_1, "db-1", "db-", stateful_set, db_labels),
        ),
    ];
    let vip = Ipv4Addr::new(10, 96, 0, 50);
    let mut db = selectorless_service("db", vip);
    if let Some(spec) = db.spec.as_mut() {
        spec.selector = Some(BTreeMap::from([("app".to_string(), "db".to_string())]));
    }
    api.server.apply(&db);
    let _sandboxes = start_objects(&cluster, &api, &[("shop", Some("ambient"))], &objects)?;
    wait_enrolled(
        &cluster,
        cluster.node(0),
        &["shop/client-7c9d8f6b5-x2x4q", "shop/db-0"],
        "shop enrolled",
    )?;
    wait_enrolled(
        &cluster,
        cluster.node(1),
        &["shop/client-7c9d8f6b5-9kz7m", "shop/db-1"],
        "shop enrolled",
    )?;
    for node in cluster.nodes() {
        node.wait_ready(TIMEOUT)?;
    }
    let _servers = [serve(db_0, &[8080])?, serve(db_1, &[8080])?];

    let targets: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| format!("{}:15020", n.fabric_ip()))
        .collect();
    let mut prom = Prometheus::start(&cluster, &targets)?;
    let wait_query = |what: &str, check: &dyn Fn() -> Result<std::result::Result<(), String>>| {
        cluster.wait_for(Duration::from_secs(60), what, check)
    };
    wait_query("prometheus scrapes both agents", &|| {
        let up = by_labels(&prom.query("up{job=\"ambit\"}")?, &["instance"]);
        let all_up = targets
            .iter()
            .all(|t| up.get(&vec![t.clone()]) == Some(&1.0));
        Ok(if all_up {
            Ok(())
        } else {
            Err(format!("up = {up:?}"))
        })
    })?;

    // One held connection from each client pod to the service; each carries a first line
    // now and a second one later, and stays open throughout.
    let service = SocketAddr::from((vip, 80));
    let mut held = Vec::new();
    let mut greetings = 0u64;
    for client in [client_a, client_b] {
        let mut hold = client.spawn(
            ambit_tests::testpod_bin()?,
            ["hold", "--connect", &service.to_string()],
        )?;
        let connected = hold.read_json(TIMEOUT)?;
        let greeting = connected["greeting"]
            .as_str()
            .ok_or_else(|| anyhow!("{} did not connect: {connected}", client.name()))?;
        greetings += greeting.len() as u64 + 1;
        held.push(hold);
    }
    let echo = |held: &mut Vec<PodProcess>, line: &str| -> Result<u64> {
        for hold in held.iter_mut() {
            hold.write_line(line)?;
            let answer = hold.read_json(TIMEOUT)?;
            ensure_or_dump!(
                cluster,
                answer["echo"] == line,
                "no echo through the held connection: {answer}"
            );
        }
        Ok(held.len() as u64 * (line.len() as u64 + 1))
    };
    let first = echo(&mut held, &"a".repeat(1000))?;

    // The raw counters, summed over Kiali's labels: one row per controller pair and reporter.
    let pair = [
        "reporter",
        "source_workload",
        "source_workload_namespace",
        "source_canonical_service",
        "destination_workload",
        "destination_workload_namespace",
        "destination_canonical_service",
        "destination_canonical_revision",
        "destination_service",
        "destination_service_name",
    ];
    let sum_by = format!("sum by ({}) ", pair.join(","));
    let (prom_ref, sum_by, pair) = (&prom, &sum_by, &pair);
    let expect_bytes = move |request: u64, response: u64| {
        move || -> Result<std::result::Result<(), String>> {
            let mut wrong = Vec::new();
            for (metric, want) in [
                ("istio_tcp_received_bytes_total", request),
                ("istio_tcp_sent_bytes_total", response),
            ] {
                let got = by_labels(&prom_ref.query(&format!("{sum_by}({metric})"))?, pair);
                let expected: BTreeMap<Vec<String>, f64> = ["source", "destination"]
                    .iter()
                    .map(|reporter| {
                        let row = [
                            reporter,
                            "client",
                            "shop",
                            "shop-client",
                            "db",
                            "shop",
                            "db",
                            "v3",
                            "db.shop.svc.cluster.local",
                            "db",
                        ];
                        (row.iter().map(|s| s.to_string()).collect(), want as f64)
                    })
                    .collect();
                if got != expected {
                    wrong.push(format!("{metric}: got {got:?}, expected {expected:?}"));
                }
            }
            Ok(if wrong.is_empty() {
                Ok(())
            } else {
                Err(wrong.join("; "))
            })
        }
    };
    // Both connections are open: their bytes are in Prometheus all the same, one row per
    // reporter for the two pods of each side.
    wait_query(
        "the open connections' first bytes scraped",
        &expect_bytes(first, greetings + first),
    )?;

    // More bytes on the same open connections: Kiali's rates see them.
    let second = echo(&mut held, &"b".repeat(3000))?;
    wait_query(
        "the open connections' second bytes scraped",
        &expect_bytes(first + second, greetings + first + second),
    )?;
    for hold in &mut held {
        ensure_or_dump!(
            cluster,
            hold.try_status()?.is_none(),
            "a held connection ended early: {}",
            hold.stderr()
        );
    }
    let closed = prom.query("istio_tcp_connections_closed_total")?;
    ensure_or_dump!(
        cluster,
        closed.is_empty(),
        "connections reported closed while they are open: {closed:?}"
    );
    for metric in [
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
    ] {
        for incoming in [true, false] {
            let query = kiali_tcp_query(metric, incoming, "shop");
            let edges = prom.query(&query)?;
            let expected = BTreeMap::from([
                ("source_cluster", "Kubernetes"),
                ("source_workload_namespace", "shop"),
                ("source_workload", "client"),
                ("source_canonical_service", "shop-client"),
                ("source_canonical_revision", "latest"),
                ("destination_cluster", "Kubernetes"),
                ("destination_service_namespace", "shop"),
                ("destination_service", "db.shop.svc.cluster.local"),
                ("destination_service_name", "db"),
                ("destination_workload_namespace", "shop"),
                ("destination_workload", "db"),
                ("destination_canonical_service", "db"),
                ("destination_canonical_revision", "v3"),
                ("response_flags", "-"),
            ]);
            let expected: BTreeMap<String, String> = expected
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            ensure_or_dump!(
                cluster,
                edges.len() == 1 && edges[0].0 == expected && edges[0].1 > 0.0,
                "Kiali's query\n  {query}\nshould draw one edge client -> db with traffic, \
                 got {edges:?}"
            );
        }
    }

    for hold in &mut held {
        hold.close_stdin();
    }
    let status = prom.tool.stop(libc::SIGTERM, Duration::from_secs(10))?;
    ensure!(
        status.success(),
        "prometheus did not exit cleanly ({status}): {}",
        prom.tool.log_tail()
    );
    Ok(())
}

/// What kubelet would run for `deployment`'s pod template, as the bed's `pod`: the pod object
/// (the template's labels and service account, scheduled on the pod's node) published, the
/// files the container mounts written where it can read them (each ConfigMap's keys; the
/// projected token, `token`), its arguments pointed at them, its `fieldRef` environment
/// resolved, and `ambit` started in the pod. The CA's Service name resolves to the bed's CA,
/// and the API server is the fake one's kubeconfig (in-cluster credentials cannot be given to
/// a process here).
fn run_deployment(
    cluster: &Cluster,
    api: &ApiServer,
    deployment: &Deployment,
    pod: &Pod,
    token: &str,
) -> Result<(KubePod, PodProcess)> {
    let template = &deployment.spec.template;
    let spec = template.spec.as_ref().context("no pod spec")?;
    let labels: Vec<(String, String)> = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
        .into_iter()
        .collect();
    let labels: Vec<(&str, &str)> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    ensure!(
        spec.service_account_name.as_deref() == Some(pod.service_account().as_str()),
        "the pod template runs as {:?}, not {}",
        spec.service_account_name,
        pod.service_account()
    );
    let object = pod_object(pod, &labels);
    api.server.apply(&object);

    let container = &spec.containers[0];
    let files = cluster.run_dir().join(format!("{}-mounts", pod.name()));
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .with_context(|| format!("no volume {}", mount.name))?;
        let dir = files.join(&mount.name);
        std::fs::create_dir_all(&dir)?;
        if let Some(config_map) = &volume.config_map {
            let object: ConfigMap = api
                .server
                .get(&pod.namespace(), &config_map.name)
                .with_context(|| format!("no ConfigMap {}", config_map.name))?;
            for (key, value) in object.data.unwrap_or_default() {
                std::fs::write(dir.join(key), value)?;
            }
        } else if let Some(projected) = &volume.projected {
            for source in projected.sources.iter().flatten() {
                let projection = source
                    .service_account_token
                    .as_ref()
                    .context("only ServiceAccount tokens are projected here")?;
                ensure!(
                    projection.audience.as_deref() == Some("ambit-ca"),
                    "a token projected for {:?}",
                    projection.audience
                );
                std::fs::write(dir.join(&projection.path), token)?;
            }
        } else {
            bail!(
                "volume {} is neither a ConfigMap nor a projection",
                volume.name
            );
        }
        mounts.push((mount.mount_path.clone(), dir));
    }
    let ca_service = format!("https://ambit-ca.{}.svc:15012", "ambit-system");
    let mut args: Vec<String> = Vec::new();
    for arg in container.args.iter().flatten() {
        let mut arg = arg.replace(
            &ca_service,
            &format!("https://{}", ambit_tests::cluster::CA_ADDR),
        );
        for (path, dir) in &mounts {
            if let Some((flag, value)) = arg.split_once('=')
                && let Some(rest) = value.strip_prefix(path.as_str())
            {
                arg = format!("{flag}={}{rest}", dir.display());
            }
        }
        args.push(arg);
    }
    args.extend([
        "--kubeconfig".to_string(),
        api.kubeconfig.display().to_string(),
        "--log-format".into(),
        "json".into(),
    ]);
    let mut env: Vec<(String, String)> = Vec::new();
    for var in container.env.iter().flatten() {
        let path = var
            .value_from
            .as_ref()
            .and_then(|from| from.field_ref.as_ref())
            .map(|field| field.field_path.as_str());
        let value = match path {
            Some("metadata.name") => pod.name().to_string(),
            Some("metadata.namespace") => pod.namespace(),
            Some("spec.nodeName") => pod.node_name().to_string(),
            other => bail!("{}: cannot resolve {other:?}", var.name),
        };
        env.push((var.name.clone(), value));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let process = pod.spawn_with_env(cluster.ambit_bin(), &args, &env)?;
    Ok((object, process))
}

/// A waypoint in Kubernetes end to end: `ambit waypoint generate`'s Gateway becomes, through the
/// CA's waypoint controller, a Deployment whose pod (run as kubelet would) gets its own
/// certificate from the CA with its projected ServiceAccount token, becomes ready, and carries
/// the bound service's requests from an enrolled client to the endpoint on another node, where
/// the endpoint's agent sees the waypoint's identity. Another ServiceAccount's token cannot get
/// the waypoint's identity, and the CA counts both answers on its metrics.
#[test]
fn a_waypoint_deployed_from_a_gateway_gets_its_certificate_and_serves() -> Result<()> {
    use ambit::discovery::kube::gateway::GatewayResource;
    use ambit_tests::waypoint::{
        REVIEWS_VIP, curl_once, requests_total, route_ca_to_pods_of, start_server, wait_serving,
        waypoint_metrics,
    };

    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 2,
    })?;
    let (client, waypoint, server) = (cluster.pod(0, 0), cluster.pod(0, 1), cluster.pod(1, 0));
    for pod in [client, waypoint, server] {
        pod.set_namespace("shop");
    }
    // The Gateway `waypoint` gets the ServiceAccount `waypoint` (checked below).
    waypoint.set_service_account("waypoint");
    let api = ApiServer::start(&cluster)?;
    let waypoint_token = format!("{}-projected-token-of-shop-waypoint", cluster.id());
    let client_token = format!("{}-projected-token-of-shop-default", cluster.id());
    api.review_tokens(
        &cluster,
        &[
            (waypoint_token.as_str(), waypoint),
            (client_token.as_str(), client),
        ],
    )?;
    // What the CA's waypoint controller reads and writes.
    api.server.register_with_status::<GatewayResource>();
    api.server.register::<Deployment>();
    api.server.register::<ServiceAccount>();
    api.server.register::<ConfigMap>();
    api.server.register::<ClusterRoleBinding>();
    cluster.use_kubernetes_ca(&api.kubeconfig);

    // `reviews` (9080 -> 8080 of app=reviews) bound to the waypoint.
    let vip: Ipv4Addr = REVIEWS_VIP.parse()?;
    let mut reviews = selectorless_service("reviews", vip);
    reviews.metadata.labels = Some(BTreeMap::from([(
        "ambit.dev/use-waypoint".to_string(),
        "waypoint".to_string(),
    )]));
    if let Some(spec) = reviews.spec.as_mut() {
        spec.selector = Some(BTreeMap::from([("app".to_string(), "reviews".to_string())]));
        spec.ports.as_mut().unwrap()[0].port = 9080;
    }
    api.server.apply(&reviews);
    let mut sandboxes = start_namespaces(
        &cluster,
        &api,
        &[("shop", Some("ambient"))],
        &[
            (client, "shop", &[("app", "client")]),
            (server, "shop", &[("app", "reviews")]),
        ],
    )?;
    let _server = start_server(server, "reviews-v1", &[])?;

    eprintln!("[kubernetes] phase: Gateway applied");
    let generated = std::process::Command::new(cluster.ambit_bin())
        .args(["waypoint", "generate", "--namespace", "shop"])
        .output()?;
    ensure!(generated.status.success(), "ambit waypoint generate failed");
    let gateway: GatewayResource = serde_yaml_ng::from_slice(&generated.stdout)?;
    api.server.apply(&gateway);
    cluster.wait_for(
        Duration::from_secs(60),
        "the waypoint controller programs the Gateway",
        || {
            let gateway: Option<GatewayResource> = api.server.get("shop", "waypoint");
            let status = serde_json::to_value(gateway.map(|g| g.status))?;
            let programmed = status["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Programmed" && c["status"] == "True");
            Ok(if programmed {
                Ok(())
            } else {
                Err(format!("status {status}"))
            })
        },
    )?;
    let deployment: Deployment = api
        .server
        .get("shop", "waypoint")
        .context("no Deployment shop/waypoint")?;
    let probe = deployment.spec.template.spec.as_ref().unwrap().containers[0]
        .readiness_probe
        .clone()
        .context("the waypoint has no readiness probe")?;
    ensure!(
        probe.tcp_socket.map(|t| t.port) == Some(IntOrString::Int(15008)),
        "the waypoint is ready once it listens on 15008"
    );

    eprintln!("[kubernetes] phase: the Deployment's pod runs");
    route_ca_to_pods_of(&cluster, cluster.node(0))?;
    let (_, mut process) = run_deployment(&cluster, &api, &deployment, waypoint, &waypoint_token)?;
    sandboxes.push(waypoint.spawn("sleep", ["3600"])?);
    // It serves only once the CA signed its certificate (within its 60 s).
    wait_serving(&cluster, waypoint, &mut process)?;
    let started = process.stderr();
    ensure_or_dump!(
        cluster,
        started.contains("waypoint started")
            && started.contains("spiffe://cluster.local/ns/shop/sa/waypoint"),
        "the waypoint did not start as its own identity: {started}"
    );
    // Its pod listens where the readiness probe looks.
    let hbone = waypoint.addr4(15008);
    ensure_or_dump!(
        cluster,
        Netns::enter_thread(cluster.node(0).netns_path(), || {
            std::net::TcpStream::connect_timeout(&hbone, Duration::from_secs(5)).is_ok()
        })?,
        "the readiness probe (TCP {hbone}) would fail"
    );

    eprintln!("[kubernetes] phase: requests through the waypoint");
    for node in cluster.nodes() {
        node.wait_ready(TIMEOUT)?;
    }
    let answer = cluster.wait_for(TIMEOUT, "a request through the waypoint", || {
        Ok(match curl_once(client, "/hello", &[]) {
            Ok(exchange) if exchange.status == 200 => Ok(exchange),
            Ok(exchange) => Err(format!("HTTP {}: {}", exchange.status, exchange.body)),
            Err(e) => Err(format!("{e:#}")),
        })
    })?;
    ensure_or_dump!(
        cluster,
        answer.body.contains("reviews-v1"),
        "not the endpoint's answer: {answer:?}"
    );
    let metrics = waypoint_metrics(cluster.node(0), waypoint)?;
    let through = requests_total(
        &metrics,
        &[
            ("reporter", "waypoint"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/shop/sa/default",
            ),
            ("destination_service_name", "reviews"),
            ("response_code", "200"),
        ],
    );
    ensure_or_dump!(
        cluster,
        through >= 1.0,
        "the waypoint counted no request from the client: {metrics}"
    );
    // The endpoint's agent admitted a tunnel from the waypoint's identity, over mTLS.
    ambit_tests::waypoint::wait_tunnel_from(
        cluster.node(1),
        "spiffe://cluster.local/ns/shop/sa/waypoint",
    )?;

    eprintln!("[kubernetes] phase: another account's token asks for the waypoint's identity");
    let roots = cluster
        .run_dir()
        .join(format!("{}-mounts/ca-roots/roots.pem", waypoint.name()));
    let config = CaClientConfig {
        address: format!("https://{}", ambit_tests::cluster::CA_ADDR),
        server_name: None,
        roots_file: roots,
        token: BearerToken::new(&client_token),
        timeout: Duration::from_secs(10),
    };
    let asked = SpiffeId::new("cluster.local", "shop", "waypoint");
    let refused = api.runtime.block_on(api.runtime.spawn(async move {
        let client = CaClient::new(config)?;
        anyhow::Ok(client.fetch(&asked, Duration::from_secs(600)).await)
    }))??;
    match refused {
        Err(CaError::Refused { code, message }) => ensure_or_dump!(
            cluster,
            format!("{code:?}") == "PermissionDenied"
                && message.contains(
                    "the token of system:serviceaccount:shop:default proves only the identity \
                     spiffe://cluster.local/ns/shop/sa/default"
                ),
            "refused, but not as expected: {code:?} {message}"
        ),
        other => bail!("the client's token got the waypoint's identity: {other:?}"),
    }

    // The CA says what it did, and that it can sign, on its monitoring port.
    let ca_http = SocketAddr::new(ambit_tests::cluster::CA_ADDR.ip(), 15014);
    let ready = cluster
        .node(0)
        .http_get_addr(ca_http, "/ready", Duration::from_secs(5))?;
    ensure_or_dump!(
        cluster,
        ready.status == 200 && ready.body == "ready\n",
        "CA /ready: {} {}",
        ready.status,
        ready.body
    );
    let ca_metrics = cluster
        .node(0)
        .http_get_addr(ca_http, "/metrics", Duration::from_secs(5))?
        .body;
    let sample = |series: &str| {
        ca_metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
            .unwrap_or(-1.0)
    };
    ensure_or_dump!(
        cluster,
        sample("ambit_ca_certificates_signed_total{caller=\"workload\"}") >= 1.0
            && sample("ambit_ca_certificates_signed_total{caller=\"node\"}") >= 2.0
            && sample("ambit_ca_certificates_refused_total{reason=\"not_own_identity\"}") == 1.0
            && sample("ambit_ca_token_review_duration_seconds_count{outcome=\"accepted\"}") >= 3.0,
        "the CA's metrics do not show the waypoint's certificate, the agents', and the refusal:\n{ca_metrics}"
    );
    drop(process);
    Ok(())
}

/// Capture exclusions by annotation: a pod's `ambit.dev/exclude-outbound-ports` sends its
/// connects to that port directly (its other connects, and other pods', stay meshed); a bad
/// value leaves it no exclusions at all (fail closed) and the agent says so in an Event naming
/// the pod, the annotation and the value.
#[test]
fn capture_exclusion_annotations_apply_and_a_bad_one_is_reported_and_captures_all() -> Result<()> {
    const ANNOTATION: &str = "ambit.dev/exclude-outbound-ports";
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        pods_per_node: 3,
    })?;
    let api = ApiServer::start(&cluster)?;
    api.review_agent_tokens(&cluster)?;
    cluster.use_kubernetes_ca(&api.kubeconfig);
    let (client, other, server) = (cluster.pod(0, 0), cluster.pod(0, 1), cluster.pod(0, 2));
    let annotated = |value: &str| {
        let mut object = pod_object(client, &[("app", "client")]);
        object.metadata.annotations = Some(BTreeMap::from([(
            ANNOTATION.to_string(),
            value.to_string(),
        )]));
        object
    };
    for pod in [client, other, server] {
        pod.set_namespace("shop");
    }
    let _sandboxes = start_objects(
        &cluster,
        &api,
        &[("shop", Some("ambient"))],
        &[
            (client, annotated("9090")),
            (other, pod_object(other, &[("app", "other")])),
            (server, pod_object(server, &[("app", "server")])),
        ],
    )?;
    let node = cluster.node(0);
    let mut all = [client, other, server].map(|p| format!("shop/{}", p.name()));
    all.sort();
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    wait_enrolled(&cluster, node, &all, "the namespace is enrolled")?;
    let _s = serve(server, &[8080, 9090])?;
    let redirected = |from: &Pod, port: u16| -> Result<bool> {
        Ok(connect_ok(&cluster, from, server.addr4(port), 1000)?.redirected())
    };
    cluster.wait_for(TIMEOUT, "the client's port 9090 goes direct", || {
        Ok(if redirected(client, 9090)? {
            Err("still redirected".to_string())
        } else {
            Ok(())
        })
    })?;
    ensure_or_dump!(
        cluster,
        redirected(client, 8080)? && redirected(other, 9090)?,
        "only the annotated pod's port 9090 may go direct"
    );

    api.server.apply(&annotated("9090,http"));
    cluster.wait_for(
        TIMEOUT,
        "a bad annotation leaves the client captured whole",
        || {
            Ok(if redirected(client, 9090)? {
                Ok(())
            } else {
                Err("port 9090 still direct".to_string())
            })
        },
    )?;
    cluster.wait_for(
        TIMEOUT,
        "the agent's Event regarding the refused annotation",
        || {
            let events = events_about(&api, "CaptureExclusionsRefused", client.name());
            Ok(match events.as_slice() {
                [event]
                    if event.type_.as_deref() == Some("Warning")
                        && event
                            .note
                            .as_deref()
                            .is_some_and(|n| n.contains(ANNOTATION) && n.contains("\"http\"")) =>
                {
                    Ok(())
                }
                _ => Err(format!("events: {events:?}")),
            })
        },
    )?;
    ensure_or_dump!(
        cluster,
        node.agent_log().contains(ANNOTATION),
        "the agent's log does not name the refused annotation"
    );
    Ok(())
}
