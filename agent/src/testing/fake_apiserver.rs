//! An in-process Kubernetes API server for tests: no cluster can run where Ambit is tested.
//!
//! It speaks the parts of the API that list-and-watch clients (kube-runtime's watcher,
//! client-go's reflector) use, over plain HTTP/1.1 on `127.0.0.1`:
//!
//! - `GET <collection>`: a list, with `metadata.resourceVersion`, `limit` and `continue`;
//! - `GET <collection>?watch=true&resourceVersion=N[&allowWatchBookmarks=true][&timeoutSeconds=T]`:
//!   a chunked stream of newline-separated watch events (`ADDED`, `MODIFIED`, `DELETED`,
//!   `BOOKMARK`, `ERROR`) replaying what happened after `N`, then following live changes;
//! - `GET <collection>/<name>` and `GET /version`;
//! - `POST <collection>`: creates an object (an Event, say);
//! - `PATCH <collection>/<name>/status` with a JSON merge patch, for types registered with
//!   [`FakeApiServer::register_with_status`]: only the `status` changes (a `MODIFIED` event);
//! - `DELETE <collection>/<name>` (at once: no finalizers, no garbage collection of dependents);
//! - `PATCH <collection>/<name>` as a server-side apply (`application/apply-patch+yaml`, JSON
//!   body) by a single field manager: the applied object replaces the stored one's content
//!   (created if absent), as it does when one manager owns every field;
//! - a Service written over HTTP without a cluster IP gets one (and keeps it), as the API
//!   server's allocator gives it;
//! - `GET /api/v1/namespaces/<ns>/pods/<name>/portforward?ports=P`: the WebSocket port-forward
//!   kube's client speaks, to the local address [`FakeApiServer::forward_port`] sets for the
//!   pod's port (`portforward`);
//! - equality-based `labelSelector`s and `fieldSelector`s;
//! - `410 Gone` when `N` is older than the retained history: an `ERROR` event carrying a
//!   `Status` with code 410 (what real API servers send), or an HTTP 410 answer
//!   ([`GoneStyle`]).
//!
//! Objects live in memory as JSON. Every change takes the next resource version from one
//! counter shared by all types, like etcd's revision. Tests drive it with scenario helpers:
//! [`FakeApiServer::apply`], [`FakeApiServer::modify`], [`FakeApiServer::delete`],
//! [`FakeApiServer::expire_history`], [`FakeApiServer::send_gone`],
//! [`FakeApiServer::drop_watches`], [`FakeApiServer::bookmark`], [`FakeApiServer::go_down`] /
//! [`FakeApiServer::come_up`].
//!
//! Available to this crate's tests, and to other crates' tests with the `testing` feature.
//! Like the API server, it sets `metadata.generation` (1 on creation, bumped when anything but
//! the metadata and status changes) and `metadata.creationTimestamp`; objects created or
//! patched over HTTP can be read with [`FakeApiServer::get`] and [`FakeApiServer::list`].
//!
//! Not implemented: other writes through HTTP (PUT, merge patches of the main
//! resource: objects change through the helpers; field ownership of server-side apply), set-based selectors, streaming lists
//! (`sendInitialEvents`), protobuf, authentication. Anything else can be answered by a
//! [`Handler`].
use std::{
    any::TypeId,
    collections::BTreeMap,
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use bytes::Bytes;
use futures::{SinkExt as _, channel::mpsc};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{body::Frame, service::service_fn};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
    events::v1::Event,
};
use kube::core::NamespaceResourceScope;
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Value, json};
mod portforward;

pub use portforward::Dial;

use tokio::{
    net::TcpListener,
    sync::{broadcast, watch},
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

/// Answers requests the fake does not serve itself (a TokenReview, say): given the method,
/// path, query and body, `Some((status, JSON body))` to answer, `None` to let the fake answer.
pub type Handler =
    Arc<dyn Fn(&Method, &str, Option<&str>, &[u8]) -> Option<(u16, Value)> + Send + Sync>;

/// How a watch from an expired resource version is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GoneStyle {
    /// HTTP 200, then one `ERROR` event whose object is a `Status` with code 410 (what the API
    /// server's watch cache answers).
    #[default]
    ErrorEvent,
    /// HTTP 410 with a `Status` body (what some servers and proxies answer).
    Http,
}

/// A watchable resource type.
#[derive(Debug, Clone)]
struct TypeInfo {
    api_version: String,
    kind: String,
    plural: String,
    namespaced: bool,
    /// `/api/v1` or `/apis/<group>/<version>`.
    prefix: String,
    type_id: TypeId,
    /// Whether `status` is a subresource: written only through `PATCH .../status`, kept
    /// when the object is applied.
    status_subresource: bool,
}

/// One change, as kept in the history and sent to watches.
#[derive(Debug, Clone)]
struct Change {
    type_index: usize,
    resource_version: u64,
    event: &'static str,
    object: Arc<Value>,
}

/// What the watches hear.
#[derive(Debug, Clone)]
enum Broadcast {
    Change(Change),
    Bookmark,
    Gone,
    Drop,
}

#[derive(Default)]
struct State {
    resource_version: u64,
    /// Watches from a version below this get 410 Gone.
    oldest_watchable: u64,
    types: Vec<TypeInfo>,
    /// Parallel to `types`: the objects by (namespace, name).
    objects: Vec<BTreeMap<(String, String), Arc<Value>>>,
    history: Vec<Change>,
    gone_style: GoneStyle,
    bookmark_interval: Option<Duration>,
    next_uid: u64,
    /// Cluster IPs given to Services written over HTTP without one.
    next_cluster_ip: u16,
    /// Parallel to `types`: lists and watches served.
    lists: Vec<u64>,
    watches: Vec<u64>,
    handler: Option<Handler>,
    /// Where port-forwards to pods go.
    port_forwards: portforward::Forwards,
}

impl State {
    fn type_index(&self, type_id: TypeId) -> Option<usize> {
        self.types.iter().position(|t| t.type_id == type_id)
    }
}

struct Inner {
    state: Mutex<State>,
    changes: broadcast::Sender<Broadcast>,
    power: watch::Sender<Power>,
    addr: SocketAddr,
}

/// Whether the server is up, and how many times it went down: a task started in one epoch
/// ends when the epoch changes, even if the server is already up again when it looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Power {
    up: bool,
    epoch: u64,
}

impl Inner {
    /// A handle that completes once the server goes down after now.
    fn life(&self) -> Life {
        let power = self.power.subscribe();
        let epoch = power.borrow().epoch;
        Life { power, epoch }
    }
}

struct Life {
    power: watch::Receiver<Power>,
    epoch: u64,
}

impl Life {
    /// Completes when the server is taken down (or its handle is gone).
    async fn ended(&mut self) {
        let epoch = self.epoch;
        // The guard wait_for returns is not Send: drop it here, not in the caller's select.
        let _ = self
            .power
            .wait_for(|p| !p.up || p.epoch != epoch)
            .await
            .map(|_| ());
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock has failed already; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The fake API server; clones are handles on the same server.
#[derive(Clone)]
pub struct FakeApiServer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("addr", &self.inner.addr)
            .finish_non_exhaustive()
    }
}

/// Capacity of the broadcast to watches; a watch that falls further behind is cut (its client
/// resumes from the history, as with a real server).
const BROADCAST_CAPACITY: usize = 4096;

impl FakeApiServer {
    /// Starts a server on an ephemeral port of 127.0.0.1 serving Pods, Namespaces, Services,
    /// EndpointSlices and `events.k8s.io/v1` Events (more types with [`Self::register`]), with
    /// bookmarks every second.
    pub async fn start() -> io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// [`Self::start`] on `addr`: for a client in another network namespace (an agent on the
    /// test bed), an address of the test bed's own that the client can reach. Port 0 picks one.
    pub async fn start_on(addr: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let (changes, _) = broadcast::channel(BROADCAST_CAPACITY);
        let server = Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    bookmark_interval: Some(Duration::from_secs(1)),
                    ..State::default()
                }),
                changes,
                power: watch::Sender::new(Power { up: true, epoch: 0 }),
                addr: listener.local_addr()?,
            }),
        };
        server.register::<Pod>();
        server.register::<Namespace>();
        server.register::<Service>();
        server.register::<EndpointSlice>();
        server.register::<Event>();
        tokio::spawn(accept_loop(server.inner.clone(), listener));
        Ok(server)
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The server's URL, `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// Port-forwards to `port` of the pod `namespace/pod` connect to `to` (where a kubelet
    /// would connect to the pod's port): an agent's admin endpoint, say. The pod must exist
    /// when the port-forward is asked for.
    pub fn forward_port(&self, namespace: &str, pod: &str, port: u16, to: SocketAddr) {
        self.inner.state().port_forwards.insert(
            (namespace.to_string(), pod.to_string(), port),
            portforward::Forward::Addr(to),
        );
    }

    /// Like [`Self::forward_port`], the connection opened by `dial` (in the network namespace
    /// of a test bed's node, say, where the agent's admin endpoint is on loopback).
    pub fn forward_port_with(&self, namespace: &str, pod: &str, port: u16, dial: Dial) {
        self.inner.state().port_forwards.insert(
            (namespace.to_string(), pod.to_string(), port),
            portforward::Forward::Dial(dial),
        );
    }

    /// A kube client for this server.
    pub fn client(&self) -> kube::Client {
        let uri = self.url().parse().expect("the server's URL is valid");
        kube::Client::try_from(kube::Config::new(uri)).expect("a plain-HTTP client builds")
    }

    /// A kubeconfig file's content pointing at this server (plain HTTP, no credentials), for a
    /// process started with `--kubeconfig` or `KUBECONFIG`.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fake\n  cluster:\n    server: {url}\n\
             users:\n\
             - name: fake\n  user: {{}}\n\
             contexts:\n\
             - name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\n",
            url = self.url()
        )
    }

    /// Serves the resource type `K` (a custom resource, say); a no-op if already served.
    pub fn register<K>(&self)
    where
        K: kube::Resource<DynamicType = ()> + 'static,
    {
        let mut state = self.inner.state();
        if state.type_index(TypeId::of::<K>()).is_some() {
            return;
        }
        let group = K::group(&());
        let version = K::version(&());
        state.types.push(TypeInfo {
            api_version: K::api_version(&()).into_owned(),
            kind: K::kind(&()).into_owned(),
            plural: K::plural(&()).into_owned(),
            namespaced: TypeId::of::<K::Scope>() == TypeId::of::<NamespaceResourceScope>(),
            prefix: if group.is_empty() {
                format!("/api/{version}")
            } else {
                format!("/apis/{group}/{version}")
            },
            type_id: TypeId::of::<K>(),
            status_subresource: false,
        });
        state.objects.push(BTreeMap::new());
        state.lists.push(0);
        state.watches.push(0);
    }

    /// Like [`Self::register`], with `status` as a subresource (as custom resources declaring
    /// `subresources: {status: {}}` have it): `PATCH .../status` is served, and
    /// [`Self::apply`] keeps the stored status, as an update of the main resource does.
    pub fn register_with_status<K>(&self)
    where
        K: kube::Resource<DynamicType = ()> + 'static,
    {
        self.register::<K>();
        let mut state = self.inner.state();
        let index = state
            .type_index(TypeId::of::<K>())
            .expect("registered above");
        state.types[index].status_subresource = true;
    }

    /// Creates or replaces `object` (an `ADDED` or `MODIFIED` event); returns its new resource
    /// version. A missing UID is filled in (a UUID made from a counter); a namespaced object
    /// without a namespace goes to `default`.
    pub fn apply<K>(&self, object: &K) -> u64
    where
        K: kube::Resource<DynamicType = ()> + Serialize + 'static,
    {
        self.register::<K>();
        let value = serde_json::to_value(object).expect("k8s objects serialize");
        let mut state = self.inner.state();
        let index = state
            .type_index(TypeId::of::<K>())
            .expect("registered above");
        let namespace = value["metadata"]["namespace"].as_str().map(str::to_string);
        match store(&self.inner, &mut state, index, namespace, value, false) {
            Ok((resource_version, _)) => resource_version,
            Err((_, message)) => panic!("fake API server: {message}"),
        }
    }

    /// Every `K` stored now (the Events a component created, say), in namespace and name
    /// order.
    pub fn list<K>(&self) -> Vec<K>
    where
        K: kube::Resource<DynamicType = ()> + DeserializeOwned + 'static,
    {
        let state = self.inner.state();
        let Some(index) = state.type_index(TypeId::of::<K>()) else {
            return Vec::new();
        };
        state.objects[index]
            .values()
            .map(|value| {
                serde_json::from_value((**value).clone()).expect("stored objects deserialize")
            })
            .collect()
    }

    /// Reads `K` `namespace/name` (`namespace` is ignored for cluster-scoped types), lets `f`
    /// change it and applies it; returns the new resource version, `None` if there is no such
    /// object.
    pub fn modify<K>(&self, namespace: &str, name: &str, f: impl FnOnce(&mut K)) -> Option<u64>
    where
        K: kube::Resource<DynamicType = ()> + Serialize + DeserializeOwned + 'static,
    {
        let mut object: K = self.get(namespace, name)?;
        f(&mut object);
        Some(self.apply(&object))
    }

    /// The current `K` `namespace/name`.
    pub fn get<K>(&self, namespace: &str, name: &str) -> Option<K>
    where
        K: kube::Resource<DynamicType = ()> + DeserializeOwned + 'static,
    {
        let state = self.inner.state();
        let index = state.type_index(TypeId::of::<K>())?;
        let namespace = if state.types[index].namespaced {
            namespace
        } else {
            ""
        };
        let value = state.objects[index].get(&(namespace.to_string(), name.to_string()))?;
        Some(serde_json::from_value((**value).clone()).expect("stored objects deserialize"))
    }

    /// Deletes `K` `namespace/name` (a `DELETED` event); returns the deletion's resource
    /// version, `None` if there was no such object.
    pub fn delete<K>(&self, namespace: &str, name: &str) -> Option<u64>
    where
        K: kube::Resource<DynamicType = ()> + 'static,
    {
        let mut state = self.inner.state();
        let index = state.type_index(TypeId::of::<K>())?;
        let namespace = if state.types[index].namespaced {
            namespace
        } else {
            ""
        };
        let key = (namespace.to_string(), name.to_string());
        let last = state.objects[index].get(&key)?.clone();
        Some(record(
            &self.inner,
            &mut state,
            index,
            key,
            "DELETED",
            (*last).clone(),
        ))
    }

    /// The latest resource version.
    pub fn resource_version(&self) -> u64 {
        self.inner.state().resource_version
    }

    /// Forgets the history up to now (etcd compaction): a watch from any older version gets
    /// 410 Gone, so its client must list again. Open watches are not affected.
    pub fn expire_history(&self) {
        let mut state = self.inner.state();
        state.history.clear();
        state.oldest_watchable = state.resource_version;
    }

    /// Ends every open watch with an `ERROR` event carrying 410 Gone (what the API server does
    /// to a watch that fell too far behind). Combine with [`Self::expire_history`] so that
    /// resuming fails too and clients re-list.
    pub fn send_gone(&self) {
        let _ = self.inner.changes.send(Broadcast::Gone);
    }

    /// Cuts every open watch in the middle of an event: half a JSON line, then the connection
    /// is dropped without the end of the chunked body.
    pub fn drop_watches(&self) {
        let _ = self.inner.changes.send(Broadcast::Drop);
    }

    /// Sends a `BOOKMARK` now on every open watch that allows them.
    pub fn bookmark(&self) {
        let _ = self.inner.changes.send(Broadcast::Bookmark);
    }

    /// How watches from an expired version are refused (default [`GoneStyle::ErrorEvent`]).
    pub fn set_gone_style(&self, style: GoneStyle) {
        self.inner.state().gone_style = style;
    }

    /// How often open watches that allow them get a `BOOKMARK` (default every second; `None`:
    /// only on [`Self::bookmark`]). Applies to watches opened afterwards.
    pub fn set_bookmark_interval(&self, interval: Option<Duration>) {
        self.inner.state().bookmark_interval = interval;
    }

    /// Answers the requests `handler` claims, before the fake's own routes.
    pub fn set_handler(&self, handler: Handler) {
        self.inner.state().handler = Some(handler);
    }

    /// Takes the server down: the port is closed (connections are refused) and every open
    /// connection, watches included, is cut. Objects can still be changed meanwhile.
    pub fn go_down(&self) {
        self.inner.power.send_modify(|p| {
            p.up = false;
            p.epoch += 1;
        });
    }

    /// Brings the server back on the same port, with everything that changed meanwhile.
    pub async fn come_up(&self) -> io::Result<()> {
        if self.is_up() {
            return Ok(());
        }
        // The old listener is dropped as soon as the accept loop sees the flag; retry briefly
        // in case it has not yet.
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.inner.addr).await {
                Ok(listener) => break listener,
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        };
        self.inner.power.send_modify(|p| p.up = true);
        tokio::spawn(accept_loop(self.inner.clone(), listener));
        Ok(())
    }

    /// Whether the server is up.
    pub fn is_up(&self) -> bool {
        self.inner.power.borrow().up
    }

    /// How many list requests for `K` were served.
    pub fn list_count<K: 'static>(&self) -> u64 {
        let state = self.inner.state();
        state
            .type_index(TypeId::of::<K>())
            .map_or(0, |i| state.lists[i])
    }

    /// How many watch requests for `K` were accepted.
    pub fn watch_count<K: 'static>(&self) -> u64 {
        let state = self.inner.state();
        state
            .type_index(TypeId::of::<K>())
            .map_or(0, |i| state.watches[i])
    }

    /// How many watches are open now.
    pub fn open_watches(&self) -> usize {
        self.inner.changes.receiver_count()
    }
}

/// Stores a change, appends it to the history and tells the watches, under the lock so that
/// every watch sees changes in resource-version order.
fn record(
    inner: &Inner,
    state: &mut State,
    index: usize,
    key: (String, String),
    event: &'static str,
    mut value: Value,
) -> u64 {
    state.resource_version += 1;
    let resource_version = state.resource_version;
    value["metadata"]["resourceVersion"] = json!(resource_version.to_string());
    let object = Arc::new(value);
    if event == "DELETED" {
        state.objects[index].remove(&key);
    } else {
        state.objects[index].insert(key, object.clone());
    }
    let change = Change {
        type_index: index,
        resource_version,
        event,
        object,
    };
    state.history.push(change.clone());
    // No receiver (no watch open) is fine.
    let _ = inner.changes.send(Broadcast::Change(change));
    resource_version
}

/// Why a write was refused: the HTTP status and the message.
type WriteError = (u16, String);

/// Stores `value` as an object of type `index` in `namespace` (for a namespaced type: the
/// object's own, else `default`), doing what the API server does on a write: kind and version
/// set, UID, generation and creation time filled in, status kept for a type whose status is a
/// subresource. With `create`, an existing object is a conflict. Returns the new resource
/// version and the stored object.
fn store(
    inner: &Inner,
    state: &mut State,
    index: usize,
    namespace: Option<String>,
    mut value: Value,
    create: bool,
) -> Result<(u64, Arc<Value>), WriteError> {
    let info = state.types[index].clone();
    if !value.is_object() || !value["metadata"].is_object() {
        return Err((400, "objects need metadata".into()));
    }
    value["apiVersion"] = json!(info.api_version);
    value["kind"] = json!(info.kind);
    let name = value["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if name.is_empty() {
        return Err((422, "objects need a name".into()));
    }
    let namespace = if info.namespaced {
        let namespace = namespace.unwrap_or_else(|| "default".to_string());
        value["metadata"]["namespace"] = json!(namespace);
        namespace
    } else {
        String::new()
    };
    let key = (namespace, name);
    let existing = state.objects[index].get(&key).cloned();
    if create && existing.is_some() {
        return Err((409, format!("{} \"{}\" already exists", info.plural, key.1)));
    }
    if value["metadata"]["uid"].as_str().is_none_or(str::is_empty) {
        let uid = match existing
            .as_ref()
            .and_then(|e| e["metadata"]["uid"].as_str())
        {
            Some(uid) => uid.to_string(),
            None => {
                state.next_uid += 1;
                format!("00000000-0000-4000-8000-{:012x}", state.next_uid)
            }
        };
        value["metadata"]["uid"] = json!(uid);
    }
    if value["metadata"]["creationTimestamp"].is_null() {
        value["metadata"]["creationTimestamp"] = match &existing {
            Some(existing) => existing["metadata"]["creationTimestamp"].clone(),
            None => json!(crate::timefmt::now_rfc3339()),
        };
    }
    if info.status_subresource
        && let Some(existing) = &existing
    {
        match existing.get("status") {
            Some(status) => value["status"] = status.clone(),
            None => {
                if let Some(object) = value.as_object_mut() {
                    object.remove("status");
                }
            }
        }
    }
    // What the generation counts: changes to anything but the metadata and status.
    let content = |v: &Value| {
        let mut v = v.clone();
        if let Some(object) = v.as_object_mut() {
            object.remove("metadata");
            object.remove("status");
        }
        v
    };
    let generation = match &existing {
        None => 1,
        Some(existing) => {
            let previous = existing["metadata"]["generation"].as_i64().unwrap_or(1);
            if content(existing) == content(&value) {
                previous
            } else {
                previous + 1
            }
        }
    };
    value["metadata"]["generation"] = json!(generation);
    let event = if existing.is_some() {
        "MODIFIED"
    } else {
        "ADDED"
    };
    let resource_version = record(inner, state, index, key.clone(), event, value);
    let stored = state.objects[index]
        .get(&key)
        .cloned()
        .expect("just stored");
    Ok((resource_version, stored))
}

/// A Service written over HTTP without a cluster IP gets one, as the API server's allocator
/// gives it (from 10.96.200.0 up; tests choose theirs below): the one it already has, else a
/// new one. Headless (`None`) and `ExternalName` Services get none.
fn allocate_cluster_ip(
    state: &mut State,
    index: usize,
    namespace: Option<&str>,
    value: &mut Value,
) {
    if state.types[index].type_id != TypeId::of::<Service>() {
        return;
    }
    let spec = &value["spec"];
    if spec["type"] == "ExternalName" || spec["clusterIP"].as_str().is_some_and(|ip| !ip.is_empty())
    {
        return;
    }
    let key = (
        namespace.unwrap_or("default").to_string(),
        value["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    );
    let ip = match state.objects[index]
        .get(&key)
        .and_then(|existing| existing["spec"]["clusterIP"].as_str().map(str::to_string))
    {
        Some(ip) => ip,
        None => {
            let n = state.next_cluster_ip;
            state.next_cluster_ip += 1;
            format!("10.96.{}.{}", 200 + n / 256, n % 256)
        }
    };
    if !value["spec"].is_object() {
        value["spec"] = json!({});
    }
    value["spec"]["clusterIP"] = json!(ip);
    value["spec"]["clusterIPs"] = json!([ip]);
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` removes, anything else
/// replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let Value::Object(target) = target else {
        unreachable!("made an object above");
    };
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    let mut life = inner.life();
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::debug!("fake API server: accept failed: {e}");
                    continue;
                }
            },
            () = life.ended() => return,
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let mut life = inner.life();
            let service = service_fn(move |request| {
                let inner = inner.clone();
                async move { Ok::<_, Infallible>(route(&inner, request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::select! {
                _ = connection => {}
                // Dropping the connection closes the socket: the server is down.
                () = life.ended() => {}
            }
        });
    }
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

fn json_response(status: u16, body: &Value) -> Response<Body> {
    let mut response = Response::new(full(body.to_string()));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn error_response(code: u16, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status_body(code, reason, message))
}

/// A request's target: a collection (optionally within a namespace) or one object.
struct Target {
    type_index: usize,
    namespace: Option<String>,
    name: Option<String>,
    /// `status` in `<collection>/<name>/status`.
    subresource: Option<String>,
}

fn parse_target(state: &State, path: &str) -> Option<Target> {
    state.types.iter().enumerate().find_map(|(index, info)| {
        let rest = path.strip_prefix(&info.prefix)?.strip_prefix('/')?;
        let segments: Vec<&str> = rest.split('/').collect();
        let (namespace, tail) = match segments.as_slice() {
            ["namespaces", namespace, tail @ ..] if info.namespaced && !tail.is_empty() => {
                (Some(namespace.to_string()), tail)
            }
            tail => (None, tail),
        };
        match tail {
            [plural] if *plural == info.plural => Some(Target {
                type_index: index,
                namespace,
                name: None,
                subresource: None,
            }),
            [plural, name, subresource @ ..]
                if *plural == info.plural
                    && (namespace.is_some() || !info.namespaced)
                    && subresource.len() <= 1 =>
            {
                Some(Target {
                    type_index: index,
                    namespace,
                    name: Some(name.to_string()),
                    subresource: subresource.first().map(|s| s.to_string()),
                })
            }
            _ => None,
        }
    })
}

/// The query parameters the fake understands.
#[derive(Default)]
struct Query {
    watch: bool,
    resource_version: Option<String>,
    bookmarks: bool,
    timeout: Option<Duration>,
    limit: Option<usize>,
    continue_token: Option<String>,
    labels: Vec<Requirement>,
    fields: Vec<Requirement>,
}

/// One term of an equality-based selector: `key=value`, `key!=value`, `key`, `!key`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

fn parse_selector(selector: &str) -> Result<Vec<Requirement>, String> {
    selector
        .split(',')
        .map(str::trim)
        .filter(|term| !term.is_empty())
        .map(|term| {
            if term.contains(" in ") || term.contains(" notin ") || term.contains('(') {
                return Err(format!(
                    "set-based selector {term:?} is not supported by the fake API server"
                ));
            }
            Ok(if let Some((key, value)) = term.split_once("!=") {
                Requirement::NotEquals(key.trim().into(), value.trim().into())
            } else if let Some((key, value)) =
                term.split_once("==").or_else(|| term.split_once('='))
            {
                Requirement::Equals(key.trim().into(), value.trim().into())
            } else if let Some(key) = term.strip_prefix('!') {
                Requirement::NotExists(key.trim().into())
            } else {
                Requirement::Exists(term.into())
            })
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes.get(i..i + 3) {
            Some([b'%', high, low]) => hex(*high).zip(hex(*low)).map(|(h, l)| (h * 16 + l) as u8),
            _ => None,
        };
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(query: Option<&str>) -> Result<Query, String> {
    let mut parsed = Query::default();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value);
        match key {
            "watch" => parsed.watch = value == "true" || value == "1",
            "resourceVersion" => parsed.resource_version = Some(value).filter(|v| !v.is_empty()),
            "allowWatchBookmarks" => parsed.bookmarks = value == "true",
            "timeoutSeconds" => {
                parsed.timeout = Some(Duration::from_secs(
                    value
                        .parse()
                        .map_err(|_| format!("bad timeoutSeconds {value:?}"))?,
                ))
            }
            "limit" => {
                parsed.limit = Some(value.parse().map_err(|_| format!("bad limit {value:?}"))?)
                    .filter(|&l| l > 0)
            }
            "continue" => parsed.continue_token = Some(value).filter(|v| !v.is_empty()),
            "labelSelector" => parsed.labels = parse_selector(&value)?,
            "fieldSelector" => parsed.fields = parse_selector(&value)?,
            // resourceVersionMatch, sendInitialEvents, pretty...: accepted and ignored.
            _ => {}
        }
    }
    Ok(parsed)
}

/// Whether `object` passes the query's selectors and namespace.
fn selected(object: &Value, namespace: Option<&str>, query: &Query) -> bool {
    let meta = &object["metadata"];
    if let Some(namespace) = namespace
        && meta["namespace"].as_str() != Some(namespace)
    {
        return false;
    }
    let label = |key: &str| meta["labels"][key].as_str();
    let field = |path: &str| {
        let value = path.split('.').fold(object, |v, segment| &v[segment]);
        match value {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        }
    };
    let labels_ok = query.labels.iter().all(|r| match r {
        Requirement::Equals(k, v) => label(k) == Some(v),
        Requirement::NotEquals(k, v) => label(k) != Some(v),
        Requirement::Exists(k) => label(k).is_some(),
        Requirement::NotExists(k) => label(k).is_none(),
    });
    // Fields that are absent compare as empty strings, as the API server does.
    let fields_ok = query.fields.iter().all(|r| match r {
        Requirement::Equals(k, v) => field(k).unwrap_or_default() == *v,
        Requirement::NotEquals(k, v) => field(k).unwrap_or_default() != *v,
        Requirement::Exists(_) | Requirement::NotExists(_) => false,
    });
    labels_ok && fields_ok
}

async fn route(inner: &Arc<Inner>, request: Request<hyper::body::Incoming>) -> Response<Body> {
    if request.method() == Method::GET
        && let Some((namespace, pod)) = portforward::target(request.uri().path())
    {
        return portforward::serve(inner, request, namespace, pod);
    }
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().map(str::to_string);
    let handler = inner.state().handler.clone();
    let body = if handler.is_some() || parts.method != Method::GET {
        match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => Bytes::new(),
        }
    } else {
        Bytes::new()
    };
    if let Some(handler) = handler
        && let Some((status, value)) = handler(&parts.method, &path, query.as_deref(), &body)
    {
        return json_response(status, &value);
    }
    if parts.method == Method::POST
        || parts.method == Method::PATCH
        || parts.method == Method::DELETE
    {
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        return write(inner, &parts.method, &path, &content_type, &body);
    }
    if parts.method != Method::GET {
        return error_response(
            405,
            "MethodNotAllowed",
            "the fake API server serves GET, POST to a collection, PATCH and DELETE",
        );
    }
    if path == "/version" {
        return json_response(
            200,
            &json!({
                "major": "1", "minor": "37", "gitVersion": "v1.37.0-ambit-fake", "gitCommit": "0",
                "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.25",
                "compiler": "gc", "platform": "linux/amd64",
            }),
        );
    }
    let query = match parse_query(query.as_deref()) {
        Ok(query) => query,
        Err(message) => return error_response(400, "BadRequest", &message),
    };
    let mut state = inner.state();
    let Some(target) = parse_target(&state, &path) else {
        return error_response(
            404,
            "NotFound",
            &format!("the server could not find the requested resource ({path})"),
        );
    };
    let info = state.types[target.type_index].clone();
    if target.subresource.is_some() {
        return error_response(
            404,
            "NotFound",
            &format!("the server could not find the requested resource ({path})"),
        );
    }
    match (&target.name, query.watch) {
        (Some(name), _) => {
            let key = (target.namespace.clone().unwrap_or_default(), name.clone());
            match state.objects[target.type_index].get(&key) {
                Some(object) => json_response(200, object),
                None => error_response(
                    404,
                    "NotFound",
                    &format!("{} \"{}\" not found", info.plural, name),
                ),
            }
        }
        (None, false) => {
            state.lists[target.type_index] += 1;
            list(
                &state,
                target.type_index,
                target.namespace.as_deref(),
                &query,
            )
        }
        (None, true) => {
            state.watches[target.type_index] += 1;
            start_watch(
                inner,
                &mut state,
                target.type_index,
                target.namespace,
                query,
            )
        }
    }
}

/// `POST <collection>` (create), `PATCH <collection>/<name>` (server-side apply) and
/// `PATCH <collection>/<name>/status` (a merge patch of the status of a type registered with a
/// status subresource).
fn write(
    inner: &Arc<Inner>,
    method: &Method,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> Response<Body> {
    let mut state = inner.state();
    let Some(target) = parse_target(&state, path) else {
        return error_response(
            404,
            "NotFound",
            &format!("the server could not find the requested resource ({path})"),
        );
    };
    let info = state.types[target.type_index].clone();
    // A DELETE may come without body (its options are not read).
    let body = if body.is_empty() { &b"{}"[..] } else { body };
    let body: Value = match serde_json::from_slice(body) {
        Ok(body) => body,
        Err(e) => return error_response(400, "BadRequest", &format!("invalid JSON body: {e}")),
    };
    let refused = |(code, message): WriteError| {
        let reason = match code {
            409 => "AlreadyExists",
            422 => "Invalid",
            _ => "BadRequest",
        };
        error_response(code, reason, &message)
    };
    match (method, &target.name, target.subresource.as_deref()) {
        (&Method::POST, None, None) => {
            if info.namespaced && target.namespace.is_none() {
                return error_response(
                    405,
                    "MethodNotAllowed",
                    "create namespaced objects in their namespace's collection",
                );
            }
            let mut body = body;
            allocate_cluster_ip(
                &mut state,
                target.type_index,
                target.namespace.as_deref(),
                &mut body,
            );
            match store(
                inner,
                &mut state,
                target.type_index,
                target.namespace,
                body,
                true,
            ) {
                Ok((_, stored)) => json_response(201, &stored),
                Err(e) => refused(e),
            }
        }
        (&Method::PATCH, Some(name), Some("status")) if info.status_subresource => {
            if !content_type.starts_with("application/merge-patch+json") {
                return error_response(
                    415,
                    "UnsupportedMediaType",
                    &format!("the fake API server only takes merge patches, not {content_type:?}"),
                );
            }
            let key = (target.namespace.clone().unwrap_or_default(), name.clone());
            let Some(existing) = state.objects[target.type_index].get(&key).cloned() else {
                return error_response(
                    404,
                    "NotFound",
                    &format!("{} \"{}\" not found", info.plural, name),
                );
            };
            // A patch naming a resource version applies only to that version, as on a real
            // server (optimistic concurrency).
            let wanted = body["metadata"]["resourceVersion"].as_str();
            if let Some(wanted) = wanted
                && existing["metadata"]["resourceVersion"].as_str() != Some(wanted)
            {
                return error_response(
                    409,
                    "Conflict",
                    &format!(
                        "Operation cannot be fulfilled on {} \"{}\": the object has been \
                         modified; please apply your changes to the latest version and try again",
                        info.plural, name
                    ),
                );
            }
            // Through the status subresource, only the status changes.
            let mut patched = (*existing).clone();
            merge_patch(&mut patched, &body);
            let mut updated = (*existing).clone();
            match patched.get("status") {
                Some(status) => updated["status"] = status.clone(),
                None => {
                    if let Some(object) = updated.as_object_mut() {
                        object.remove("status");
                    }
                }
            }
            record(
                inner,
                &mut state,
                target.type_index,
                key.clone(),
                "MODIFIED",
                updated,
            );
            let stored = state.objects[target.type_index]
                .get(&key)
                .cloned()
                .expect("just stored");
            json_response(200, &stored)
        }
        (&Method::DELETE, Some(name), None) => {
            let key = (target.namespace.clone().unwrap_or_default(), name.clone());
            let Some(existing) = state.objects[target.type_index].get(&key).cloned() else {
                return error_response(
                    404,
                    "NotFound",
                    &format!("{} \"{}\" not found", info.plural, name),
                );
            };
            record(
                inner,
                &mut state,
                target.type_index,
                key,
                "DELETED",
                (*existing).clone(),
            );
            json_response(200, &existing)
        }
        (&Method::PATCH, Some(name), None) => {
            // Server-side apply by one field manager: the applied object is the whole of what
            // the manager wants, so it replaces the object's content (metadata the server
            // sets, and the status of a type with a status subresource, are kept by `store`).
            if !content_type.starts_with("application/apply-patch") {
                return error_response(
                    415,
                    "UnsupportedMediaType",
                    &format!(
                        "the fake API server only takes server-side apply on objects, not \
                         {content_type:?}"
                    ),
                );
            }
            if body["metadata"]["name"].as_str() != Some(name.as_str()) {
                return error_response(
                    400,
                    "BadRequest",
                    "the applied object's name must be the one in the path",
                );
            }
            if info.namespaced && target.namespace.is_none() {
                return error_response(
                    405,
                    "MethodNotAllowed",
                    "apply namespaced objects in their namespace's collection",
                );
            }
            let mut body = body;
            allocate_cluster_ip(
                &mut state,
                target.type_index,
                target.namespace.as_deref(),
                &mut body,
            );
            match store(
                inner,
                &mut state,
                target.type_index,
                target.namespace,
                body,
                false,
            ) {
                Ok((_, stored)) => json_response(200, &stored),
                Err(e) => refused(e),
            }
        }
        _ => error_response(
            405,
            "MethodNotAllowed",
            &format!("{method} {path} is not served by the fake API server"),
        ),
    }
}

fn list(state: &State, index: usize, namespace: Option<&str>, query: &Query) -> Response<Body> {
    let info = &state.types[index];
    // A continue token is "<list's resource version>:<items already returned>". The pages
    // come from the current objects (not a snapshot): changes between pages are replayed by
    // the watch that follows from the list's version, so a client still converges.
    let (list_version, offset) = match &query.continue_token {
        None => (state.resource_version, 0),
        Some(token) => {
            let parsed = token
                .split_once(':')
                .and_then(|(v, o)| Some((v.parse::<u64>().ok()?, o.parse::<usize>().ok()?)));
            match parsed {
                Some((version, _)) if version < state.oldest_watchable => {
                    return error_response(
                        410,
                        "Expired",
                        "the provided continue parameter is too old",
                    );
                }
                Some(parsed) => parsed,
                None => return error_response(400, "BadRequest", "invalid continue token"),
            }
        }
    };
    let matching: Vec<&Arc<Value>> = state.objects[index]
        .values()
        .filter(|object| selected(object, namespace, query))
        .collect();
    let end = query
        .limit
        .map_or(matching.len(), |limit| (offset + limit).min(matching.len()));
    let items: Vec<&Value> = matching
        .get(offset..end)
        .unwrap_or_default()
        .iter()
        .map(|o| &***o)
        .collect();
    let mut metadata = json!({ "resourceVersion": list_version.to_string() });
    if end < matching.len() {
        metadata["continue"] = json!(format!("{list_version}:{end}"));
        metadata["remainingItemCount"] = json!(matching.len() - end);
    }
    json_response(
        200,
        &json!({
            "apiVersion": info.api_version,
            "kind": format!("{}List", info.kind),
            "metadata": metadata,
            "items": items,
        }),
    )
}

fn event_line(event: &str, object: &Value) -> Bytes {
    let mut line = json!({ "type": event, "object": object }).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn start_watch(
    inner: &Arc<Inner>,
    state: &mut State,
    index: usize,
    namespace: Option<String>,
    query: Query,
) -> Response<Body> {
    let info = state.types[index].clone();
    // Unset or "0": start from now, with the current objects as ADDED events (the API
    // server's "any version" watch). A number: replay what happened after it.
    let from = match query.resource_version.as_deref() {
        None | Some("0") => None,
        Some(version) => match version.parse::<u64>() {
            Ok(version) => Some(version),
            Err(_) => {
                return error_response(
                    400,
                    "BadRequest",
                    &format!("invalid resourceVersion {version:?}"),
                );
            }
        },
    };
    let mut backlog: Vec<Bytes> = Vec::new();
    match from {
        Some(version) if version < state.oldest_watchable => {
            let message = format!(
                "too old resource version: {version} ({})",
                state.oldest_watchable
            );
            match state.gone_style {
                GoneStyle::Http => return error_response(410, "Gone", &message),
                GoneStyle::ErrorEvent => {
                    let line = event_line("ERROR", &status_body(410, "Expired", &message));
                    return json_stream_response(futures::stream::iter([Ok(Frame::data(line))]));
                }
            }
        }
        Some(version) => backlog.extend(
            state
                .history
                .iter()
                .filter(|c| c.type_index == index && c.resource_version > version)
                .filter(|c| selected(&c.object, namespace.as_deref(), &query))
                .map(|c| event_line(c.event, &c.object)),
        ),
        None => backlog.extend(
            state.objects[index]
                .values()
                .filter(|o| selected(o, namespace.as_deref(), &query))
                .map(|o| event_line("ADDED", o)),
        ),
    }
    // Subscribed under the lock: nothing recorded after the backlog was read is missed.
    let changes = inner.changes.subscribe();
    let watch = Watch {
        index,
        info,
        namespace,
        seen: state.resource_version,
        bookmark_interval: state.bookmark_interval.filter(|_| query.bookmarks),
        query,
    };
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(watch.run(backlog, changes, inner.life(), tx));
    json_stream_response(rx)
}

fn json_stream_response<S>(stream: S) -> Response<Body>
where
    S: futures::Stream<Item = Result<Frame<Bytes>, BoxError>> + Send + Sync + 'static,
{
    let mut response = Response::new(StreamBody::new(stream).boxed());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// One open watch.
struct Watch {
    index: usize,
    info: TypeInfo,
    namespace: Option<String>,
    query: Query,
    /// The latest resource version this watch has gone past (any type's change counts): what a
    /// bookmark may claim without skipping anything.
    seen: u64,
    bookmark_interval: Option<Duration>,
}

type Frames = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

impl Watch {
    async fn run(
        mut self,
        backlog: Vec<Bytes>,
        mut changes: broadcast::Receiver<Broadcast>,
        mut life: Life,
        mut tx: Frames,
    ) {
        for line in backlog {
            if tx.send(Ok(Frame::data(line))).await.is_err() {
                return;
            }
        }
        let deadline = self.query.timeout.map(|t| tokio::time::Instant::now() + t);
        let mut bookmarks = self.bookmark_interval.map(|period| {
            let mut interval =
                tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval
        });
        loop {
            let line = tokio::select! {
                received = changes.recv() => match received {
                    Ok(Broadcast::Change(change)) => {
                        self.seen = change.resource_version;
                        if change.type_index != self.index
                            || !selected(&change.object, self.namespace.as_deref(), &self.query)
                        {
                            continue;
                        }
                        event_line(change.event, &change.object)
                    }
                    Ok(Broadcast::Bookmark) if self.bookmark_allowed() => self.bookmark_line(),
                    Ok(Broadcast::Bookmark) => continue,
                    Ok(Broadcast::Gone) => {
                        let message = format!("too old resource version: {}", self.seen);
                        let line = event_line("ERROR", &status_body(410, "Expired", &message));
                        let _ = tx.send(Ok(Frame::data(line))).await;
                        return;
                    }
                    // Cut off (or fell behind): abort mid-line.
                    Ok(Broadcast::Drop) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        return abort(tx).await;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = async { bookmarks.as_mut().expect("guarded").tick().await }, if bookmarks.is_some() => {
                    self.bookmark_line()
                }
                _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                    // The watch's timeoutSeconds: a clean end of the stream.
                    return;
                }
                () = life.ended() => return abort(tx).await,
            };
            if tx.send(Ok(Frame::data(line))).await.is_err() {
                return;
            }
        }
    }

    fn bookmark_allowed(&self) -> bool {
        self.query.bookmarks
    }

    fn bookmark_line(&self) -> Bytes {
        event_line(
            "BOOKMARK",
            &json!({
                "apiVersion": self.info.api_version,
                "kind": self.info.kind,
                "metadata": { "resourceVersion": self.seen.to_string() },
            }),
        )
    }
}

/// Half an event, then an error: hyper drops the connection without ending the chunked body.
async fn abort(mut tx: Frames) {
    let partial = Bytes::from_static(b"{\"type\":\"MODIFIED\",\"object\":{\"apiVersion\":");
    let _ = tx.send(Ok(Frame::data(partial))).await;
    let _ = tx.send(Err("watch cut by the test scenario".into())).await;
}

#[cfg(test)]
mod tests {
    use futures::{StreamExt as _, TryStreamExt as _};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::api::{Api, ListParams, WatchEvent, WatchParams};

    use super::*;

    fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        }
    }

    #[test]
    fn selectors_and_decoding() {
        assert_eq!(percent_decode("a%3Db%2Cc%21%3Dd"), "a=b,c!=d");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(
            parse_selector("a=b, c!=d,e==f,g,!h").unwrap(),
            vec![
                Requirement::Equals("a".into(), "b".into()),
                Requirement::NotEquals("c".into(), "d".into()),
                Requirement::Equals("e".into(), "f".into()),
                Requirement::Exists("g".into()),
                Requirement::NotExists("h".into()),
            ]
        );
        assert!(parse_selector("env in (a,b)").is_err());
    }

    #[tokio::test]
    async fn list_pages_get_and_selectors() {
        let server = FakeApiServer::start().await.unwrap();
        for i in 0..5 {
            let mode = if i % 2 == 0 { "ambient" } else { "none" };
            server.apply(&namespace(&format!("ns-{i}"), &[("ambit.dev/mode", mode)]));
        }
        let api: Api<Namespace> = Api::all(server.client());
        let page = api.list(&ListParams::default().limit(2)).await.unwrap();
        assert_eq!(page.items.len(), 2);
        assert_eq!(page.metadata.resource_version.as_deref(), Some("5"));
        let token = page.metadata.continue_.clone().unwrap();
        let rest = api
            .list(&ListParams::default().limit(10).continue_token(&token))
            .await
            .unwrap();
        assert_eq!(rest.items.len(), 3);
        assert!(rest.metadata.continue_.is_none());
        let ambient = api
            .list(&ListParams::default().labels("ambit.dev/mode=ambient"))
            .await
            .unwrap();
        assert_eq!(ambient.items.len(), 3);
        let named = api
            .list(&ListParams::default().fields("metadata.name=ns-1"))
            .await
            .unwrap();
        assert_eq!(named.items.len(), 1);
        assert_eq!(
            api.get("ns-3").await.unwrap().metadata.name.as_deref(),
            Some("ns-3")
        );
        let missing = api.get("nope").await.unwrap_err();
        assert!(matches!(missing, kube::Error::Api(s) if s.code == 404));
        assert_eq!(server.list_count::<Namespace>(), 4);
        let version = server.client().apiserver_version().await.unwrap();
        assert_eq!(version.minor, "37");
        // The same through a kubeconfig.
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&server.kubeconfig()).unwrap();
        let options = kube::config::KubeConfigOptions::default();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .unwrap();
        let api: Api<Namespace> = Api::all(kube::Client::try_from(config).unwrap());
        assert_eq!(
            api.list(&ListParams::default()).await.unwrap().items.len(),
            5
        );
    }

    #[tokio::test]
    async fn watch_replays_follows_bookmarks_and_expires() {
        let server = FakeApiServer::start().await.unwrap();
        server.set_bookmark_interval(None);
        let first = server.apply(&namespace("a", &[]));
        server.apply(&namespace("b", &[]));
        let api: Api<Namespace> = Api::all(server.client());
        let params = WatchParams::default().timeout(30);
        let mut events = api
            .watch(&params, &first.to_string())
            .await
            .unwrap()
            .boxed();
        let next = |e: WatchEvent<Namespace>| match e {
            WatchEvent::Added(o) => ("ADDED", o.metadata.name.unwrap()),
            WatchEvent::Modified(o) => ("MODIFIED", o.metadata.name.unwrap()),
            WatchEvent::Deleted(o) => ("DELETED", o.metadata.name.unwrap()),
            WatchEvent::Bookmark(b) => ("BOOKMARK", b.metadata.resource_version),
            WatchEvent::Error(s) => ("ERROR", s.code.to_string()),
        };
        // Replayed from history: only what came after `first`.
        assert_eq!(
            next(events.try_next().await.unwrap().unwrap()),
            ("ADDED", "b".into())
        );
        server.modify::<Namespace>("", "a", |ns| {
            ns.metadata.labels = Some([("x".to_string(), "y".to_string())].into());
        });
        assert_eq!(
            next(events.try_next().await.unwrap().unwrap()),
            ("MODIFIED", "a".into())
        );
        server.delete::<Namespace>("", "b");
        assert_eq!(
            next(events.try_next().await.unwrap().unwrap()),
            ("DELETED", "b".into())
        );
        server.bookmark();
        assert_eq!(
            next(events.try_next().await.unwrap().unwrap()),
            ("BOOKMARK", "4".into())
        );
        server.send_gone();
        assert_eq!(
            next(events.try_next().await.unwrap().unwrap()),
            ("ERROR", "410".into())
        );
        assert!(
            events.try_next().await.unwrap().is_none(),
            "the stream ends after the 410"
        );

        // Expired history: a 410 event, or an HTTP 410.
        server.expire_history();
        let mut events = api
            .watch(&params, &first.to_string())
            .await
            .unwrap()
            .boxed();
        assert_eq!(
            next(events.try_next().await.unwrap().unwrap()),
            ("ERROR", "410".into())
        );
        server.set_gone_style(GoneStyle::Http);
        let err = api.watch(&params, &first.to_string()).await.err().unwrap();
        assert!(
            matches!(err, kube::Error::Api(ref s) if s.code == 410),
            "{err:?}"
        );
        // Watching from the current version is fine.
        let now = server.resource_version().to_string();
        assert!(api.watch(&params, &now).await.is_ok());
    }

    #[tokio::test]
    async fn create_patch_status_and_generation() {
        use k8s_openapi::api::{core::v1::ObjectReference, events::v1::Event};
        use kube::api::{Patch, PatchParams, PostParams};

        let server = FakeApiServer::start().await.unwrap();
        server.set_bookmark_interval(None);
        // Namespaces stand in for a custom resource with a status subresource.
        server.register_with_status::<Namespace>();
        server.apply(&namespace("a", &[]));
        let created: Namespace = server.get("", "a").unwrap();
        assert_eq!(created.metadata.generation, Some(1));
        assert!(created.metadata.creation_timestamp.is_some());

        let api: Api<Namespace> = Api::all(server.client());
        let from = server.resource_version().to_string();
        let mut events = api
            .watch(&WatchParams::default().timeout(30), &from)
            .await
            .unwrap()
            .boxed();
        let patch = json!({"status": {"phase": "Terminating"}, "spec": {"finalizers": ["x"]}});
        let patched = api
            .patch_status("a", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
        let status = patched.status.unwrap();
        assert_eq!(status.phase.as_deref(), Some("Terminating"));
        assert!(
            patched.spec.is_none(),
            "only the status changes through /status"
        );
        assert_eq!(patched.metadata.generation, Some(1));
        match events.try_next().await.unwrap().unwrap() {
            WatchEvent::Modified(ns) => assert_eq!(
                ns.metadata.resource_version,
                patched.metadata.resource_version
            ),
            other => panic!("{other:?}"),
        }
        // Applying the object keeps the stored status; a spec change bumps the generation.
        let mut changed = namespace("a", &[]);
        changed.spec = Some(k8s_openapi::api::core::v1::NamespaceSpec {
            finalizers: Some(vec!["kubernetes".into()]),
        });
        server.apply(&changed);
        let stored: Namespace = server.get("", "a").unwrap();
        assert_eq!(stored.metadata.generation, Some(2));
        assert_eq!(stored.status.unwrap().phase.as_deref(), Some("Terminating"));
        assert_eq!(
            stored.metadata.creation_timestamp,
            created.metadata.creation_timestamp
        );
        // Not a status type, or not there.
        let pods: Api<Pod> = Api::namespaced(server.client(), "default");
        let err = pods
            .patch_status("p", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_err();
        assert!(
            matches!(err, kube::Error::Api(ref s) if s.code == 405),
            "{err:?}"
        );
        let err = api
            .patch_status("nope", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_err();
        assert!(
            matches!(err, kube::Error::Api(ref s) if s.code == 404),
            "{err:?}"
        );

        // POST creates; a second time is a conflict.
        let events_api: Api<Event> = Api::namespaced(server.client(), "shop");
        let event = Event {
            metadata: ObjectMeta {
                name: Some("a.1".into()),
                ..ObjectMeta::default()
            },
            reason: Some("Accepted".into()),
            regarding: Some(ObjectReference {
                name: Some("a".into()),
                ..ObjectReference::default()
            }),
            ..Event::default()
        };
        let created = events_api
            .create(&PostParams::default(), &event)
            .await
            .unwrap();
        assert_eq!(created.metadata.namespace.as_deref(), Some("shop"));
        assert!(created.metadata.uid.is_some());
        let err = events_api
            .create(&PostParams::default(), &event)
            .await
            .unwrap_err();
        assert!(
            matches!(err, kube::Error::Api(ref s) if s.code == 409),
            "{err:?}"
        );
        let stored = server.list::<Event>();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].reason.as_deref(), Some("Accepted"));
    }

    #[tokio::test]
    async fn dropped_watch_and_downtime() {
        let server = FakeApiServer::start().await.unwrap();
        server.apply(&namespace("a", &[]));
        let api: Api<Namespace> = Api::all(server.client());
        let mut events = api
            .watch(&WatchParams::default(), "1")
            .await
            .unwrap()
            .boxed();
        tokio::time::timeout(Duration::from_secs(5), async {
            while server.open_watches() == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
        server.drop_watches();
        // The half line never decodes into an event; the stream ends or errors.
        let rest: Vec<_> = events.by_ref().collect().await;
        assert!(rest.iter().all(|r| r.is_err()), "{rest:?}");

        server.go_down();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(api.list(&ListParams::default()).await.is_err());
        server.apply(&namespace("b", &[]));
        server.come_up().await.unwrap();
        assert_eq!(
            api.list(&ListParams::default()).await.unwrap().items.len(),
            2
        );
    }
}
