//! `ambit config --node`, `ambit stat --node` and `ambit check --cluster` against the fake API
//! server: real kube clients, the real port-forward protocol, and a small HTTP server per agent
//! (and the CA) serving a recorded config dump and metrics where the kubelet would connect.
use std::{collections::BTreeMap, convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, service::service_fn};
use hyper_util::rt::TokioIo;
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{Node, Pod},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::{
    check,
    cluster::{self, KubeArgs, NAMESPACE},
    cluster_check,
    config::{self, Output, What},
    fetch,
};
use crate::{
    discovery::kube::{
        crd,
        security::{
            AuthorizationPolicyResource, PeerAuthenticationResource, RequestAuthenticationResource,
        },
    },
    redirect::{Finding, Status},
    testing::fake_apiserver::{FakeApiServer, Handler},
};

/// Serves `bodies` (path to body) over HTTP/1.1 on 127.0.0.1; 404 for anything else.
pub(crate) async fn http_server(bodies: BTreeMap<&'static str, String>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let bodies = Arc::new(bodies);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let bodies = bodies.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: hyper::Request<_>| {
                    let body = bodies.get(request.uri().path()).cloned();
                    async move {
                        Ok::<_, Infallible>(match body {
                            Some(body) => Response::new(Full::new(Bytes::from(body))),
                            None => {
                                let mut r = Response::new(Full::new(Bytes::from("not found")));
                                *r.status_mut() = hyper::StatusCode::NOT_FOUND;
                                r
                            }
                        })
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// The config dump of the agent on `node`: one workload, one certificate.
fn dump(node: &str, not_after: &str) -> Value {
    json!({
        "node": node,
        "config": {"generation": 1, "source": "kubernetes", "lastError": null},
        "workloads": [
            {"uid": format!("shop/web-{node}"), "namespace": "shop", "name": format!("web-{node}"),
             "node": node, "ips": ["10.0.0.2"], "identity": "spiffe://cluster.local/ns/shop/sa/web",
             "enrolled": true, "ready": true}
        ],
        "services": [],
        "peerAuthentications": [],
        "authorizationPolicies": [],
        "enrolled": [format!("shop/web-{node}")],
        "enrolmentFailures": {},
        "closed": [],
        "certificates": [
            {"id": "spiffe://cluster.local/ns/shop/sa/web", "notAfter": not_after,
             "serial": "ab12", "lastError": null}
        ]
    })
}

/// Metrics of the agent on `node`: one inbound connection of `shop/web`.
fn metrics() -> String {
    "# TYPE istio_tcp_connections_opened_total counter\n\
     istio_tcp_connections_opened_total{reporter=\"destination\",destination_workload=\"web\",\
     destination_workload_namespace=\"shop\",connection_security_policy=\"mutual_tls\"} 3\n"
        .to_string()
}

fn pod(name: &str, node: &str, app: &str, ready: bool) -> Pod {
    let container = |name: &str| {
        json!({"name": name, "image": "ambit", "imageID": "", "ready": ready, "restartCount": 0,
               "state": if ready { json!({"running": {}}) }
                        else { json!({"waiting": {"reason": "CrashLoopBackOff"}}) }})
    };
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": NAMESPACE,
                     "labels": {"app.kubernetes.io/name": app}},
        "spec": {"nodeName": node, "containers": []},
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
            "containerStatuses": [container("agent"), container("install-cni")]
        }
    }))
    .unwrap()
}

fn object<K: serde::de::DeserializeOwned>(value: Value) -> K {
    serde_json::from_value(value).unwrap()
}

/// The CRDs as the chart installs them (with their version label).
fn crds() -> Vec<CustomResourceDefinition> {
    crd::definitions()
        .into_iter()
        .map(|d| {
            let mut c = d.crd;
            c.metadata
                .labels
                .get_or_insert_default()
                .insert(crd::VERSION_LABEL.into(), env!("CARGO_PKG_VERSION").into());
            c
        })
        .collect()
}

/// A healthy two-node install: agents on node-a and node-b, the CA, the CRDs, one accepted
/// policy. Returns the server and a kubeconfig file naming it.
pub(crate) async fn cluster() -> (FakeApiServer, tempfile::NamedTempFile) {
    let server = FakeApiServer::start().await.unwrap();
    server.register::<Node>();
    server.register::<DaemonSet>();
    server.register::<Deployment>();
    server.register::<CustomResourceDefinition>();
    server.register_with_status::<AuthorizationPolicyResource>();
    server.register_with_status::<PeerAuthenticationResource>();
    server.register_with_status::<RequestAuthenticationResource>();
    for node in ["node-a", "node-b"] {
        server.apply(&object::<Node>(json!({"metadata": {"name": node}})));
        let name = format!("ambit-agent-{node}");
        server.apply(&pod(&name, node, "ambit-agent", true));
        let agent = http_server(BTreeMap::from([
            (
                "/config_dump",
                dump(node, "2099-01-01T00:00:00Z").to_string(),
            ),
            ("/metrics", metrics()),
        ]))
        .await;
        server.forward_port(NAMESPACE, &name, cluster::ADMIN_PORT, agent);
        server.forward_port(NAMESPACE, &name, cluster::METRICS_PORT, agent);
    }
    server.apply(&object::<DaemonSet>(json!({
        "metadata": {"name": "ambit-agent", "namespace": NAMESPACE}
    })));
    server.apply(&object::<Deployment>(json!({
        "metadata": {"name": "ambit-ca", "namespace": NAMESPACE},
        "status": {"conditions": [{"type": "Available", "status": "True"}]}
    })));
    server.apply(&pod("ambit-ca-0", "node-a", "ambit-ca", true));
    let ca = http_server(BTreeMap::from([("/ready", "ready\n".to_string())])).await;
    server.forward_port(NAMESPACE, "ambit-ca-0", cluster::CA_MONITORING_PORT, ca);
    for c in crds() {
        server.apply(&c);
    }
    server.apply(&object::<AuthorizationPolicyResource>(json!({
        "metadata": {"name": "allow-web", "namespace": "shop", "generation": 1},
        "spec": {},
        "status": {"conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                                   "message": "", "observedGeneration": 1}]}
    })));
    let kubeconfig = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(kubeconfig.path(), server.kubeconfig()).unwrap();
    (server, kubeconfig)
}

pub(crate) fn kube_args(kubeconfig: &tempfile::NamedTempFile) -> KubeArgs {
    KubeArgs {
        kubeconfig: Some(kubeconfig.path().to_path_buf()),
        context: None,
        ambit_namespace: NAMESPACE.into(),
    }
}

fn by_check<'a>(findings: &'a [Finding], check: &str) -> &'a Finding {
    findings
        .iter()
        .find(|f| f.check == check)
        .unwrap_or_else(|| panic!("no {check} finding in {findings:?}"))
}

#[tokio::test]
async fn config_node_reads_that_nodes_agent_through_the_port_forward() {
    let (_server, kubeconfig) = cluster().await;
    let args = kube_args(&kubeconfig);
    for node in ["node-a", "node-b"] {
        let endpoint = cluster::agent_endpoint(&args, Some(node), cluster::ADMIN_PORT)
            .await
            .unwrap();
        assert_eq!(
            endpoint.to_string(),
            format!("pod ambit-system/ambit-agent-{node} port 15000")
        );
        let body = fetch::get_from(&endpoint, "/config_dump").await.unwrap();
        let dump: Value = serde_json::from_slice(&body).unwrap();
        let table = config::render(&dump, What::Workloads, Output::Table, None).unwrap();
        assert!(table.contains(&format!("web-{node}")), "{table}");
    }
    let error = cluster::agent_endpoint(&args, None, cluster::ADMIN_PORT)
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        error,
        "which node's agent? pass --node; nodes running an agent: node-a, node-b"
    );
    let error = cluster::agent_endpoint(&args, Some("node-z"), cluster::ADMIN_PORT)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("no agent pod on node node-z; nodes running an agent: node-a, node-b"),
        "{error}"
    );
    let mut elsewhere = kube_args(&kubeconfig);
    elsewhere.ambit_namespace = "mesh".into();
    let error = cluster::agent_endpoint(&elsewhere, None, cluster::ADMIN_PORT)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("no agent pod (app.kubernetes.io/name=ambit-agent) in namespace mesh"),
        "{error}"
    );
}

#[tokio::test]
async fn the_cluster_check_of_a_healthy_install_is_all_ok() {
    let (server, _kubeconfig) = cluster().await;
    let findings = cluster_check::after_install(&server.client(), NAMESPACE).await;
    let out = check::render(&findings);
    assert!(findings.iter().all(|f| f.status == Status::Ok), "{out}");
    assert!(out.ends_with("6 ok, 0 warnings, 0 failed\n"), "{out}");
    assert!(
        out.contains("[ok]   agents: a ready agent on each of the 2 nodes"),
        "{out}"
    );
    assert!(
        out.contains("certificates: 2 valid on 2 nodes, the first expires 2099-01-01T00:00:00Z"),
        "{out}"
    );
    assert!(out.contains("[ok]   policies: 1 accepted"), "{out}");
}

#[tokio::test]
async fn an_agent_not_ready_names_its_node_and_the_fix() {
    let (server, _kubeconfig) = cluster().await;
    server.apply(&pod("ambit-agent-node-b", "node-b", "ambit-agent", false));
    server.apply(&object::<Node>(json!({"metadata": {"name": "node-c"}})));
    let findings = cluster_check::after_install(&server.client(), NAMESPACE).await;
    let agents = by_check(&findings, "agents");
    assert_eq!(agents.status, Status::Fail);
    assert_eq!(
        agents.detail,
        "1 of 3 nodes have a ready agent; not ready: node-b (pod ambit-agent-node-b: container \
         agent: CrashLoopBackOff, container install-cni: CrashLoopBackOff); node-c (no agent pod)"
    );
    assert!(
        agents
            .fix
            .as_deref()
            .unwrap()
            .contains("kubectl -n ambit-system describe pod")
    );
    let cni = by_check(&findings, "CNI plugin");
    assert_eq!(cni.status, Status::Fail);
    assert!(
        cni.detail.contains("node-b (pod ambit-agent-node-b)"),
        "{}",
        cni.detail
    );
    // The ready agent's certificates are still read.
    assert!(
        by_check(&findings, "certificates")
            .detail
            .starts_with("1 valid on 1 nodes")
    );
}

#[tokio::test]
async fn a_missing_crd_fails_and_one_at_another_version_warns() {
    let (server, _kubeconfig) = cluster().await;
    let mut older = crds().remove(1);
    let older_name = older.metadata.name.clone().unwrap();
    older
        .metadata
        .labels
        .get_or_insert_default()
        .insert(crd::VERSION_LABEL.into(), "0.0.9".into());
    server.apply(&older);
    let findings = cluster_check::after_install(&server.client(), NAMESPACE).await;
    let crds_finding = by_check(&findings, "CRDs");
    assert_eq!(crds_finding.status, Status::Warn);
    assert!(
        crds_finding
            .detail
            .ends_with(&format!("{older_name} at 0.0.9")),
        "{}",
        crds_finding.detail
    );
    let gone = crds()[0].metadata.name.clone().unwrap();
    server.delete::<CustomResourceDefinition>("", &gone);
    let findings = cluster_check::after_install(&server.client(), NAMESPACE).await;
    let crds_finding = by_check(&findings, "CRDs");
    assert_eq!(crds_finding.status, Status::Fail);
    assert_eq!(crds_finding.detail, format!("missing: {gone}"));
    assert!(
        crds_finding
            .fix
            .as_deref()
            .unwrap()
            .contains("deploy/crds/")
    );
}

#[tokio::test]
async fn a_rejected_policy_fails_with_its_reason_and_message() {
    let (server, _kubeconfig) = cluster().await;
    server.apply(&object::<PeerAuthenticationResource>(json!({
        "metadata": {"name": "strict", "namespace": "shop"},
        "spec": {}
    })));
    let findings = cluster_check::after_install(&server.client(), NAMESPACE).await;
    let policies = by_check(&findings, "policies");
    assert_eq!(policies.status, Status::Ok);
    assert_eq!(
        policies.detail,
        "1 accepted (1 not evaluated yet by the CA's status writer)"
    );
    // As the CA's status writer leaves it (the fake keeps the status of a new object).
    server.apply(&object::<AuthorizationPolicyResource>(json!({
        "metadata": {"name": "deny-post", "namespace": "shop"},
        "spec": {},
        "status": {"conditions": [{
            "type": "Accepted", "status": "False", "reason": "UnsupportedField",
            "message": "spec.rules[0].to[0].operation.methods: L7 field not enforced at L4",
            "observedGeneration": 1}]}
    })));
    let findings = cluster_check::after_install(&server.client(), NAMESPACE).await;
    let policies = by_check(&findings, "policies");
    assert_eq!(policies.status, Status::Fail);
    assert!(
        policies.detail.starts_with(
            "not accepted: AuthorizationPolicy shop/deny-post: UnsupportedField: \
             spec.rules[0].to[0].operation.methods: L7 field not enforced at L4"
        ),
        "{}",
        policies.detail
    );
}

#[tokio::test]
async fn an_unreachable_ca_and_a_missing_daemonset_fail() {
    let (server, _kubeconfig) = cluster().await;
    // The CA pod's monitoring port answers nothing.
    server.forward_port(
        NAMESPACE,
        "ambit-ca-0",
        cluster::CA_MONITORING_PORT,
        SocketAddr::from(([127, 0, 0, 1], 1)),
    );
    server.delete::<DaemonSet>(NAMESPACE, "ambit-agent");
    let findings = cluster_check::after_install(&server.client(), NAMESPACE).await;
    let ca = by_check(&findings, "CA");
    assert_eq!(ca.status, Status::Fail);
    assert!(
        ca.detail.contains("pod ambit-system/ambit-ca-0 port 15014"),
        "{}",
        ca.detail
    );
    let agents = by_check(&findings, "agents");
    assert_eq!(
        agents.detail,
        "DaemonSet ambit-system/ambit-agent not found"
    );
}

#[tokio::test]
async fn pre_install_checks_the_version_and_names_each_denied_verb() {
    let (server, _kubeconfig) = cluster().await;
    let handler: Handler = Arc::new(|method, path, _query, body| {
        if method != http::Method::POST
            || path != "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
        {
            return None;
        }
        let mut review: Value = serde_json::from_slice(body).ok()?;
        let resource = review["spec"]["resourceAttributes"]["resource"].clone();
        let allowed = resource != "clusterroles" && resource != "customresourcedefinitions";
        review["status"] = json!({"allowed": allowed});
        Some((201, review))
    });
    server.set_handler(handler);
    let findings = cluster_check::pre_install(&server.client(), NAMESPACE).await;
    let version = by_check(&findings, "Kubernetes version");
    assert_eq!(version.status, Status::Ok, "{version:?}");
    assert!(
        version
            .detail
            .starts_with("v1.37.0-ambit-fake (supported: 1.30 to 1.37)")
    );
    let rbac = by_check(&findings, "RBAC to install");
    assert_eq!(rbac.status, Status::Fail);
    assert_eq!(
        rbac.detail,
        "denied: create clusterroles.rbac.authorization.k8s.io, create \
         customresourcedefinitions.apiextensions.k8s.io"
    );
}
