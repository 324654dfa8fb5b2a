//! The Kubernetes source against the fake API server: the scenarios of issue 4.
use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        core::v1::{
            Namespace, Pod, PodCondition, PodIP, PodSpec, PodStatus, Service as KubeService,
            ServicePort, ServiceSpec,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use tokio::{sync::watch, task::JoinHandle};

use super::{
    KubeSource, SOURCE_NAME,
    convert::{MODE_AMBIENT, MODE_LABEL, MODE_NONE},
    objects::SERVICE_NAME_LABEL,
    security::{AuthorizationPolicyResource, PeerAuthenticationResource},
};
use crate::{
    discovery::ConfigStatus,
    netns::NetnsRef,
    state::{MeshState, Resolved, Workload},
    testing::fake_apiserver::{FakeApiServer, GoneStyle},
};

pub(super) const NODE: &str = "node-a";
/// A failure guard, not a performance bound: every wait here normally ends in milliseconds.
pub(super) const WAIT: Duration = Duration::from_secs(20);

pub(super) fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

fn uid(name: &str) -> String {
    format!("uid-{name}")
}

pub(super) fn pod(namespace: &str, name: &str, node: &str, ip: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            uid: Some(uid(name)),
            labels: labels(&[("app", "web")]),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            service_account_name: Some("web".into()),
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.into()),
            pod_ips: Some(vec![PodIP { ip: ip.into() }]),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        }),
    }
}

pub(super) fn namespace(name: &str, mode: Option<&str>) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: mode.and_then(|m| labels(&[(MODE_LABEL, m)])),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    }
}

fn service(namespace: &str, name: &str, vip: &str, target: IntOrString) -> KubeService {
    KubeService {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(vip.into()),
            cluster_ips: Some(vec![vip.into()]),
            selector: labels(&[("app", "web")]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(target),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

fn endpoint_slice(namespace: &str, service: &str, port: i32) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{service}-abcde")),
            namespace: Some(namespace.into()),
            labels: labels(&[(SERVICE_NAME_LABEL, service)]),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(vec![Endpoint {
            addresses: vec!["10.0.0.2".into()],
            ..Endpoint::default()
        }]),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(port),
            protocol: Some("TCP".into()),
            ..EndpointPort::default()
        }]),
    }
}

/// The source under test, its channels and the node's fake cgroup tree.
pub(super) struct Harness {
    pub(super) server: FakeApiServer,
    pub(super) state: watch::Receiver<Arc<MeshState>>,
    pub(super) status: watch::Receiver<ConfigStatus>,
    task: JoinHandle<anyhow::Result<()>>,
    cgroups: tempfile::TempDir,
}

impl Harness {
    /// A server holding namespace `shop` (enrolled) with service `web`, and a source for
    /// `node-a` with short delays. The policy and routing CRDs are installed (with their status
    /// subresource).
    pub(super) async fn start() -> Self {
        let server = FakeApiServer::start().await.unwrap();
        server.register_with_status::<AuthorizationPolicyResource>();
        server.register_with_status::<PeerAuthenticationResource>();
        server.register_with_status::<super::routes::VirtualServiceResource>();
        server.register_with_status::<super::routes::DestinationRuleResource>();
        server.apply(&namespace("shop", Some(MODE_AMBIENT)));
        server.apply(&service(
            "shop",
            "web",
            "10.96.0.10",
            IntOrString::Int(8080),
        ));
        Self::with_server(server).await
    }

    pub(super) async fn with_server(server: FakeApiServer) -> Self {
        Self::with_source(server, |source| source).await
    }

    /// [`Self::with_server`], with `configure` applied to the source's settings.
    pub(super) async fn with_source(
        server: FakeApiServer,
        configure: impl FnOnce(KubeSource) -> KubeSource,
    ) -> Self {
        let cgroups = tempfile::tempdir().unwrap();
        let source = KubeSource::new(server.client(), NODE, cgroups.path())
            .debounce(Duration::from_millis(20))
            .backoff(Duration::from_millis(20), Duration::from_millis(200))
            .probe_interval(Duration::from_millis(100))
            .cgroup_retry(Duration::from_millis(100));
        let source = configure(source);
        let (state_tx, state) = watch::channel(Arc::new(MeshState::empty()));
        let (status_tx, status) = watch::channel(ConfigStatus::default());
        let task = tokio::spawn(source.run(state_tx, status_tx));
        Self {
            server,
            state,
            status,
            task,
            cgroups,
        }
    }

    /// Creates the cgroup kubelet (systemd driver, Burstable) would create for pod `name`.
    fn create_cgroup(&self, name: &str) -> PathBuf {
        let dir = self.cgroups.path().join(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            uid(name).replace('-', "_")
        ));
        std::fs::create_dir_all(dir.join("cri-containerd-0123.scope")).unwrap();
        dir
    }

    pub(super) async fn wait_state(
        &mut self,
        what: &str,
        f: impl Fn(&MeshState) -> bool,
    ) -> Arc<MeshState> {
        let waited = tokio::time::timeout(WAIT, self.state.wait_for(|s| f(s)))
            .await
            .map(|state| state.unwrap().clone());
        match waited {
            Ok(state) => state,
            Err(_) => panic!(
                "timed out waiting for {what}; state: {}; status: {:?}",
                serde_json::to_string(&**self.state.borrow()).unwrap(),
                *self.status.borrow()
            ),
        }
    }

    pub(super) async fn wait_status(
        &mut self,
        what: &str,
        f: impl Fn(&ConfigStatus) -> bool,
    ) -> ConfigStatus {
        let waited = tokio::time::timeout(WAIT, self.status.wait_for(|s| f(s)))
            .await
            .map(|status| status.unwrap().clone());
        match waited {
            Ok(status) => status,
            Err(_) => panic!(
                "timed out waiting for {what}; status: {:?}",
                *self.status.borrow()
            ),
        }
    }

    /// Waits for `shop/<name>` to satisfy `f` (`None`: absent).
    async fn wait_workload(
        &mut self,
        name: &str,
        f: impl Fn(Option<&Workload>) -> bool,
    ) -> Arc<MeshState> {
        self.wait_state(&format!("workload shop/{name}"), |s| {
            f(s.workloads()
                .iter()
                .find(|w| w.namespace == "shop" && w.name == name)
                .map(|w| &**w))
        })
        .await
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
        self.server.go_down();
    }
}

fn enrolled(w: Option<&Workload>) -> bool {
    w.is_some_and(|w| w.enrolled)
}

fn unenrolled(w: Option<&Workload>) -> bool {
    w.is_some_and(|w| !w.enrolled)
}

#[tokio::test]
async fn pod_added_becomes_an_enrolled_workload() {
    let mut h = Harness::start().await;
    let status = h
        .wait_status("the first state", |s| s.generation >= 1)
        .await;
    assert_eq!(status.source, SOURCE_NAME);
    assert_eq!(status.last_error, None);
    assert!(h.state.borrow().workloads().is_empty());

    let cgroup = h.create_cgroup("web-0");
    h.server.apply(&pod("shop", "web-0", NODE, "10.0.0.2"));
    h.server.apply(&pod("shop", "web-1", "node-b", "10.0.0.3"));
    let state = h
        .wait_state("both pods", |s| s.workloads().len() == 2)
        .await;
    let local = &state.workloads()[0];
    assert_eq!((local.name.as_str(), local.node.as_str()), ("web-0", NODE));
    assert!(local.enrolled && local.ready);
    assert_eq!(local.service_account, "web");
    assert_eq!(local.netns, NetnsRef::Cgroup(cgroup));
    let remote = &state.workloads()[1];
    assert!(remote.enrolled, "pods of other nodes are in the mesh too");
    assert_eq!(remote.netns, NetnsRef::Path(PathBuf::new()));
    let web = state
        .service_by_vip("10.96.0.10".parse().unwrap())
        .unwrap()
        .clone();
    assert_eq!(web.ports[0].target_port, 8080);
    assert_eq!(state.endpoints(&web).len(), 2);
    assert_eq!(h.status.borrow().last_error, None);
}

#[tokio::test]
async fn pod_moved_relabelled_and_deleted() {
    let mut h = Harness::start().await;
    h.create_cgroup("web-0");
    h.server.apply(&pod("shop", "web-0", NODE, "10.0.0.2"));
    h.wait_workload("web-0", enrolled).await;

    // Re-created on another node (a StatefulSet pod keeps its name).
    h.server.delete::<Pod>("shop", "web-0");
    let mut moved = pod("shop", "web-0", "node-b", "10.0.1.2");
    moved.metadata.uid = Some(uid("web-0-b"));
    h.server.apply(&moved);
    let state = h
        .wait_workload("web-0", |w| w.is_some_and(|w| w.node == "node-b"))
        .await;
    assert_eq!(state.workloads()[0].netns, NetnsRef::Path(PathBuf::new()));
    assert_eq!(
        state.workloads()[0].ips,
        vec!["10.0.1.2".parse::<std::net::IpAddr>().unwrap()]
    );

    // Opted out, then back in, without a restart.
    let set_mode = |mode: Option<&'static str>| {
        move |p: &mut Pod| {
            let labels = p.metadata.labels.get_or_insert_default();
            match mode {
                Some(mode) => labels.insert(MODE_LABEL.into(), mode.into()),
                None => labels.remove(MODE_LABEL),
            };
        }
    };
    h.server
        .modify("shop", "web-0", set_mode(Some(MODE_NONE)))
        .unwrap();
    h.wait_workload("web-0", unenrolled).await;
    h.server.modify("shop", "web-0", set_mode(None)).unwrap();
    h.wait_workload("web-0", enrolled).await;

    // Not ready: still a workload, no longer an endpoint.
    h.server
        .modify::<Pod>("shop", "web-0", |p| {
            p.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].status = "False".into();
        })
        .unwrap();
    let state = h
        .wait_workload("web-0", |w| w.is_some_and(|w| !w.ready))
        .await;
    let web = state.services()[0].clone();
    assert!(state.endpoints(&web).is_empty());

    h.server.delete::<Pod>("shop", "web-0");
    h.wait_workload("web-0", |w| w.is_none()).await;
}

#[tokio::test]
async fn namespace_label_toggles_all_its_pods() {
    let mut h = Harness::start().await;
    h.server.apply(&namespace("other", None));
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        h.server
            .apply(&pod("shop", name, "node-b", &format!("10.0.0.{}", i + 2)));
    }
    let mut opted_in = pod("other", "d", "node-b", "10.0.0.9");
    opted_in
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert(MODE_LABEL.into(), MODE_AMBIENT.into());
    h.server.apply(&opted_in);
    h.server.apply(&pod("other", "e", "node-b", "10.0.0.10"));
    let shop_all = |enrolled: bool| {
        move |s: &MeshState| {
            s.workloads().len() == 5
                && s.workloads()
                    .iter()
                    .filter(|w| w.namespace == "shop")
                    .all(|w| w.enrolled == enrolled)
        }
    };
    let state = h.wait_state("shop enrolled", shop_all(true)).await;
    let other: Vec<(&str, bool)> = state
        .workloads()
        .iter()
        .filter(|w| w.namespace == "other")
        .map(|w| (w.name.as_str(), w.enrolled))
        .collect();
    assert_eq!(other, vec![("d", true), ("e", false)]);

    h.server
        .modify::<Namespace>("", "shop", |ns| ns.metadata.labels = None)
        .unwrap();
    h.wait_state("shop un-enrolled", shop_all(false)).await;
    h.server
        .modify::<Namespace>("", "shop", |ns| {
            ns.metadata.labels = labels(&[(MODE_LABEL, MODE_AMBIENT)]);
        })
        .unwrap();
    let state = h.wait_state("shop enrolled again", shop_all(true)).await;
    // The pod-level label is independent of the namespace's.
    assert!(
        state
            .workloads()
            .iter()
            .any(|w| w.name == "d" && w.enrolled)
    );
}

#[tokio::test]
async fn watch_dropped_mid_stream_resumes() {
    let mut h = Harness::start().await;
    h.server.apply(&pod("shop", "web-0", "node-b", "10.0.0.2"));
    h.wait_workload("web-0", enrolled).await;
    let lists = h.server.list_count::<Pod>();
    let watches = h.server.watch_count::<Pod>();

    h.server.drop_watches();
    h.server.apply(&pod("shop", "web-1", "node-b", "10.0.0.3"));
    h.server.delete::<Pod>("shop", "web-0");
    h.wait_state("the changes made while the watch was cut", |s| {
        s.workloads().len() == 1 && s.workloads()[0].name == "web-1"
    })
    .await;
    assert!(
        h.server.watch_count::<Pod>() > watches,
        "the watch was re-opened"
    );
    assert_eq!(
        h.server.list_count::<Pod>(),
        lists,
        "resumed from its resource version, no re-list"
    );
    h.wait_status("no error", |s| s.last_error.is_none()).await;
}

/// The watch cannot resume (history expired while the client was away): a re-list must bring
/// the stores to the server's state, deletions missed meanwhile included.
async fn gone_relists(style: GoneStyle) {
    let server = FakeApiServer::start().await.unwrap();
    server.set_gone_style(style);
    server.apply(&namespace("shop", Some(MODE_AMBIENT)));
    server.apply(&pod("shop", "web-0", "node-b", "10.0.0.2"));
    server.apply(&pod("shop", "web-1", "node-b", "10.0.0.3"));
    let mut h = Harness::with_server(server).await;
    h.wait_state("two pods", |s| s.workloads().len() == 2).await;
    let lists = h.server.list_count::<Pod>();

    h.server.go_down();
    h.server.delete::<Pod>("shop", "web-0");
    h.server.apply(&pod("shop", "web-2", "node-b", "10.0.0.4"));
    h.server
        .modify::<Namespace>("", "shop", |ns| ns.metadata.labels = None)
        .unwrap();
    h.server.expire_history();
    h.server.come_up().await.unwrap();

    let state = h
        .wait_state("the re-listed state", |s| {
            let names: Vec<&str> = s.workloads().iter().map(|w| w.name.as_str()).collect();
            names == ["web-1", "web-2"] && s.workloads().iter().all(|w| !w.enrolled)
        })
        .await;
    assert!(
        h.server.list_count::<Pod>() > lists,
        "re-listed after 410 Gone"
    );
    assert_eq!(state.workloads().len(), 2);
    h.wait_status("no error", |s| s.last_error.is_none()).await;
}

#[tokio::test]
async fn gone_as_error_event_relists() {
    gone_relists(GoneStyle::ErrorEvent).await;
}

#[tokio::test]
async fn gone_as_http_410_relists() {
    gone_relists(GoneStyle::Http).await;
}

#[tokio::test]
async fn gone_on_an_open_watch_relists() {
    let mut h = Harness::start().await;
    h.server.apply(&pod("shop", "web-0", "node-b", "10.0.0.2"));
    h.wait_workload("web-0", enrolled).await;
    let lists = h.server.list_count::<Pod>();
    h.server.expire_history();
    h.server.send_gone();
    h.server.apply(&pod("shop", "web-1", "node-b", "10.0.0.3"));
    h.wait_state("both pods", |s| s.workloads().len() == 2)
        .await;
    tokio::time::timeout(WAIT, async {
        while h.server.list_count::<Pod>() == lists {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("a re-list after the 410 event");
}

#[tokio::test]
async fn bookmarks_keep_a_quiet_watch_resumable() {
    let server = FakeApiServer::start().await.unwrap();
    server.set_bookmark_interval(None);
    server.apply(&namespace("shop", Some(MODE_AMBIENT)));
    server.apply(&pod("shop", "web-0", "node-b", "10.0.0.2"));
    let mut h = Harness::with_server(server).await;
    h.wait_workload("web-0", enrolled).await;
    let lists = h.server.list_count::<Pod>();
    // Other types move the resource version on; the pod watch only learns of it by bookmark.
    for i in 0..3 {
        h.server.apply(&namespace(&format!("ns-{i}"), None));
    }
    h.server.bookmark();
    // Let the bookmark reach the watcher (delivery is immediate; this is only slack).
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.server.expire_history();
    h.server.drop_watches();
    h.server.apply(&pod("shop", "web-1", "node-b", "10.0.0.3"));
    h.wait_state("the new pod", |s| s.workloads().len() == 2)
        .await;
    assert_eq!(
        h.server.list_count::<Pod>(),
        lists,
        "resumed from the bookmark, no re-list"
    );
}

#[tokio::test]
async fn api_down_keeps_the_last_state_and_converges_after() {
    let mut h = Harness::start().await;
    h.server.apply(&pod("shop", "web-0", "node-b", "10.0.0.2"));
    let before = h.wait_workload("web-0", enrolled).await;
    let generation = h.status.borrow().generation;

    h.server.go_down();
    let status = h
        .wait_status("unreachable", |s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.starts_with("API server unreachable since "))
        })
        .await;
    assert_eq!(status.generation, generation);
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap()
            .contains("serving the last state"),
        "{status:?}"
    );
    h.server.modify::<Pod>("shop", "web-0", |p| {
        p.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(MODE_LABEL.into(), MODE_NONE.into());
    });
    // Down for a while: several retries fail, and the state stays the one published.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        Arc::ptr_eq(&h.state.borrow(), &before),
        "the last state stays in force"
    );
    assert!(h.status.borrow().last_error.is_some());

    h.server.come_up().await.unwrap();
    h.wait_workload("web-0", unenrolled).await;
    h.wait_status("recovered", |s| s.last_error.is_none()).await;
}

#[tokio::test]
async fn quiet_recovery_clears_the_error() {
    // Nothing changes while the server is down: the watches resume silently, and the probe
    // is what notices the server is back.
    let mut h = Harness::start().await;
    h.wait_status("the first state", |s| s.generation >= 1)
        .await;
    h.server.go_down();
    h.wait_status("unreachable", |s| s.last_error.is_some())
        .await;
    h.server.come_up().await.unwrap();
    let status = h.wait_status("recovered", |s| s.last_error.is_none()).await;
    assert_eq!(status.generation, 1);
}

#[tokio::test]
async fn no_state_before_everything_is_listed() {
    let server = FakeApiServer::start().await.unwrap();
    server.apply(&namespace("shop", Some(MODE_AMBIENT)));
    server.apply(&pod("shop", "web-0", "node-b", "10.0.0.2"));
    server.go_down();
    let mut h = Harness::with_server(server).await;
    let status = h
        .wait_status("unreachable", |s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("no state received yet"))
        })
        .await;
    assert_eq!(status.generation, 0);
    h.server.come_up().await.unwrap();
    let state = h.wait_workload("web-0", enrolled).await;
    assert_eq!(state.workloads().len(), 1);
    let status = h.wait_status("no error", |s| s.last_error.is_none()).await;
    assert_eq!(
        status.generation, 1,
        "one complete state, not one per resource type"
    );
}

#[tokio::test]
async fn cgroup_found_once_it_appears() {
    let mut h = Harness::start().await;
    h.server.apply(&pod("shop", "web-0", NODE, "10.0.0.2"));
    let state = h.wait_workload("web-0", enrolled).await;
    let guess = NetnsRef::Cgroup(
        h.cgroups
            .path()
            .join(format!("kubepods/pod{}", uid("web-0"))),
    );
    assert_eq!(state.workloads()[0].netns, guess);
    let dir = h.create_cgroup("web-0");
    h.wait_workload("web-0", |w| {
        w.is_some_and(|w| w.netns == NetnsRef::Cgroup(dir.clone()))
    })
    .await;
}

#[tokio::test]
async fn named_target_port_follows_endpoint_slices() {
    let mut h = Harness::start().await;
    h.server.apply(&service(
        "shop",
        "api",
        "10.96.0.11",
        IntOrString::String("http".into()),
    ));
    let has_api_port = |target: Option<u16>| {
        move |s: &MeshState| {
            s.services()
                .iter()
                .find(|svc| svc.name == "api")
                .is_some_and(|svc| svc.ports.first().map(|p| p.target_port) == target)
        }
    };
    // No slice yet: the port is left out, not guessed.
    h.wait_state("api without ports", has_api_port(None)).await;
    h.server.apply(&endpoint_slice("shop", "api", 8080));
    h.wait_state("api resolved to 8080", has_api_port(Some(8080)))
        .await;
    h.server
        .modify::<EndpointSlice>("shop", "api-abcde", |s| {
            s.ports.as_mut().unwrap()[0].port = Some(9090);
        })
        .unwrap();
    h.wait_state("api resolved to 9090", has_api_port(Some(9090)))
        .await;
}

/// The `kubernetes` Service of `default` as the API server keeps it: no selector, its one
/// port `https` 443 to 6443, its endpoints in a slice the API server writes itself.
fn kubernetes_service() -> KubeService {
    let mut svc = service("default", "kubernetes", "10.96.0.1", IntOrString::Int(6443));
    let spec = svc.spec.as_mut().unwrap();
    spec.selector = None;
    spec.ports.as_mut().unwrap()[0].name = Some("https".into());
    spec.ports.as_mut().unwrap()[0].port = 443;
    svc
}

/// The `kubernetes` slice, listing `addresses` (ready unless said otherwise).
fn kubernetes_slice(addresses: &[(&str, Option<bool>)]) -> EndpointSlice {
    let mut slice = endpoint_slice("default", "kubernetes", 6443);
    slice.metadata.name = Some("kubernetes".into());
    slice.ports.as_mut().unwrap()[0].name = Some("https".into());
    slice.endpoints = Some(
        addresses
            .iter()
            .map(|(address, ready)| Endpoint {
                addresses: vec![address.to_string()],
                conditions: Some(EndpointConditions {
                    ready: *ready,
                    ..EndpointConditions::default()
                }),
                ..Endpoint::default()
            })
            .collect(),
    );
    slice
}

/// Where the source's state sends a connection to `dst`, in words.
fn destination(state: &MeshState, dst: &str) -> String {
    match state.resolve(dst.parse().unwrap()) {
        Resolved::Workload { workload, addr, .. } => format!("{} {addr}", workload.uid()),
        Resolved::OutsideMesh { addr, .. } => format!("outside {addr}"),
        other => format!("{other:?}"),
    }
}

#[tokio::test]
async fn a_service_without_selector_follows_its_endpoint_slices() {
    let mut h = Harness::start().await;
    h.server.apply(&pod("shop", "web-0", "node-b", "10.0.0.2"));
    h.server.apply(&kubernetes_service());
    let vip = "10.96.0.1:443";
    // No slice yet: nothing is known, the VIP itself is dialled (the cluster's own service
    // routing may know better), never refused.
    let state = h
        .wait_state("the kubernetes service and the pod", |s| {
            s.services().len() == 2 && s.workloads().len() == 1
        })
        .await;
    assert_eq!(destination(&state, vip), format!("outside {vip}"));

    // The API server's own address (no pod's) and, for the test, a pod's.
    h.server.apply(&kubernetes_slice(&[
        ("192.0.2.10", None),
        ("10.0.0.2", Some(true)),
    ]));
    let state = h
        .wait_state("the slice's endpoints", |s| {
            s.service_by_vip("10.96.0.1".parse().unwrap())
                .is_some_and(|svc| svc.endpoint_addresses.len() == 2)
        })
        .await;
    let mut seen: Vec<String> = (0..4).map(|_| destination(&state, vip)).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen,
        ["outside 192.0.2.10:6443", "shop/web-0 10.0.0.2:6443"]
    );

    // The slice says one is not ready any more; then the slice goes.
    h.server.apply(&kubernetes_slice(&[
        ("192.0.2.10", Some(false)),
        ("10.0.0.2", Some(true)),
    ]));
    let state = h
        .wait_state("one endpoint left", |s| {
            s.service_by_vip("10.96.0.1".parse().unwrap())
                .is_some_and(|svc| svc.endpoint_addresses.len() == 1)
        })
        .await;
    assert_eq!(destination(&state, vip), "shop/web-0 10.0.0.2:6443");
    h.server.delete::<EndpointSlice>("default", "kubernetes");
    let state = h
        .wait_state("no endpoint left", |s| {
            s.service_by_vip("10.96.0.1".parse().unwrap())
                .is_some_and(|svc| svc.endpoint_addresses.is_empty())
        })
        .await;
    assert_eq!(destination(&state, vip), format!("outside {vip}"));
}

#[tokio::test]
async fn changes_the_mesh_does_not_use_publish_nothing() {
    let mut h = Harness::start().await;
    h.server.apply(&pod("shop", "web-0", "node-b", "10.0.0.2"));
    h.wait_workload("web-0", enrolled).await;
    let generation = h.status.borrow().generation;
    h.server.modify::<Pod>("shop", "web-0", |p| {
        p.metadata.annotations = labels(&[("touched", "yes")]);
        p.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].message =
            Some("still ready".into());
    });
    // Spacing only: lets the no-op change be processed on its own before the next one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.server.apply(&pod("shop", "web-1", "node-b", "10.0.0.3"));
    h.wait_state("the second pod", |s| s.workloads().len() == 2)
        .await;
    assert_eq!(h.status.borrow().generation, generation + 1);
}

#[tokio::test]
async fn https_clients_build_with_rustls_and_ring() {
    // A real API server is HTTPS: the client must build with the one crypto provider compiled
    // in (ring), and an unreachable server must be an error, not a panic.
    let config = kube::Config::new("https://127.0.0.1:9".parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    assert!(client.apiserver_version().await.is_err());
}
