//! Enrolment: turns the mesh state into per-pod listeners and eBPF map entries on this node.
//!
//! For each enrolled workload of this node the agent enters the pod's network namespace, opens
//! its listeners there (`127.0.0.1:15001` and `[::1]:15001` outbound, `0.0.0.0:15006` and
//! `[::]:15006` inbound plaintext, `<pod IP>:15008` HBONE), registers the inbound listeners for
//! sk_lookup, links sk_lookup to the namespace and finally marks the namespace meshed in the
//! enrolment map, so redirection starts only once something listens. Un-enrolment goes in the opposite order.
//! Connections already accepted live in their own tasks and are never cut by a reconcile.
//!
//! A pod is meshed or closed, never open: when its namespace exists but its enrolment cannot
//! complete (an application already holds a proxy port, a map refuses an entry), the pod is
//! *closed*: sk_lookup is linked with no listener registered, so its inbound is dropped, and the
//! enrolment map marks it closed, so its outbound connects are refused. The reason is logged,
//! counted and shown in `config_dump`; enrolment is retried and a success opens the pod.
//!
//! New pods are enrolled before any of their containers start: the CNI plugin (`ambit-cni`,
//! through [`crate::cni`]) names each sandbox's namespace and addresses on ADD and waits for the
//! answer. Those sandboxes are kept (and saved beside the socket, so a restarted agent still
//! knows them) until DEL, and take precedence over what the configuration says of the pod's
//! namespace and addresses. A pod the configuration knows but that has neither addresses nor a
//! sandbox yet is simply not started: nothing of it runs.
//!
//! During an agent replacement ([`crate::handover`]) two agents serve the node for a moment, and
//! only one of them may write the node's kernel state: the successor's reconciler would
//! otherwise see its map entries replaced by the predecessor's (whose sockets are about to
//! close), and the predecessor's un-enrolments would remove what the successor set up. So the
//! predecessor's reconciler is [frozen](Control::Freeze) before the successor starts its own (it
//! keeps serving but writes nothing), and [retired](Control::Retire) once the successor's
//! listeners are in place: it closes its own listeners and forgets its pods *without* touching
//! a map or a pin, which now hold the successor's state.
pub mod metrics;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use ambit_cni::protocol::{Outcome, Reply, Request, Sandbox};
use ambit_common::{INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use anyhow::Context as _;
use serde::Serialize;
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tracing::{error, info, warn};

use crate::{
    identity::SpiffeId,
    netns::Netns,
    netns::NetnsRef,
    proxy::{self, PodContext, ProxyContext},
    redirect::Redirector,
    state::{CaptureExclusions, MeshState, Workload},
};

/// How often enrolment is retried for pods that could not be enrolled (namespace not there yet).
const RETRY_INTERVAL: Duration = Duration::from_secs(2);
/// How long an agent replacing another waits for its pods' certificates before it enrols them
/// anyway (below the predecessor's [`crate::handover::TAKEOVER_TIMEOUT`]).
const WARM_UP_LIMIT: Duration = Duration::from_secs(60);
/// Sandboxes the CNI plugin may have announced at once (a node runs ~110 pods).
const MAX_CNI_SANDBOXES: usize = 1024;
/// How long a retired agent keeps its listeners open after its successor registered its own:
/// long enough for handshakes already steered to them to complete and be accepted.
const RETIRE_GRACE: Duration = Duration::from_secs(2);

/// A pod sandbox the CNI plugin announced: its namespace file and the addresses the runtime's
/// network plugin gave it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct CniSandbox {
    container_id: String,
    netns: std::path::PathBuf,
    ips: Vec<IpAddr>,
}

/// What the admin endpoint shows of an enrolled pod.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrolledPodInfo {
    /// `namespace/name`.
    pub uid: String,
    /// The pod's network-namespace cookie.
    pub netns_cookie: u64,
    /// The pod's addresses.
    pub ips: Vec<IpAddr>,
}

/// What the admin endpoint shows of enrolment as a whole.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrolmentStatus {
    /// True once the first state has been applied.
    pub reconciled: bool,
    /// Pods enrolled now.
    pub enrolled: Vec<EnrolledPodInfo>,
    /// Pods that should be enrolled but are not, with the reason.
    pub failed: BTreeMap<String, String>,
    /// Of those, the pods that are closed: their namespace exists, and its traffic is blocked
    /// until enrolment succeeds.
    pub closed: BTreeSet<String>,
    /// Enrolled pods whose own capture exclusions were refused (a bad annotation) or could not
    /// be applied, with why: they have none, all their traffic is captured.
    pub exclusions_refused: BTreeMap<String, String>,
}

struct EnrolledPod {
    workload: Arc<Workload>,
    identity: SpiffeId,
    netns: Arc<Netns>,
    accept_loops: Vec<JoinHandle<()>>,
    /// The capture exclusions it asked for (as applied, unless `exclusions_refused`).
    exclusions: CaptureExclusions,
    /// Why it has none of them, if so.
    exclusions_refused: Option<String>,
    /// Its entry among the node's pods (the same-node fast path's destinations).
    _local: proxy::LocalPod,
}

impl Drop for EnrolledPod {
    fn drop(&mut self) {
        for task in &self.accept_loops {
            task.abort();
        }
    }
}

/// The enrolment reconciler of one node.
pub struct Enrolment {
    node: String,
    redirector: Arc<Redirector>,
    proxy: Arc<ProxyContext>,
    pods: BTreeMap<String, EnrolledPod>,
    /// Pods closed because their enrolment failed, with their namespace cookie.
    closed: BTreeMap<String, u64>,
    /// Sandboxes announced by the CNI plugin, by pod (`namespace/name`).
    sandboxes: BTreeMap<String, CniSandbox>,
    /// Where `sandboxes` are saved, if anywhere.
    sandbox_file: Option<std::path::PathBuf>,
    status: watch::Sender<EnrolmentStatus>,
    /// Turned true when the reconciler retires: the pods' HBONE connections send GOAWAY.
    draining: watch::Sender<bool>,
    /// A predecessor still serves the node: get the certificates before enrolling.
    warm_up: bool,
}

/// What the agent's [handover](crate::handover) asks of the reconciler.
#[derive(Debug)]
pub enum Control {
    /// A successor is starting: stop writing kernel state (no reconcile, no retry; CNI requests
    /// are answered "try again", they reach the successor's socket next time) and answer once
    /// no reconcile is in progress. Everything enrolled keeps being served.
    Freeze(oneshot::Sender<()>),
    /// The successor went away before taking over: reconcile again, as before.
    Resume,
    /// The successor took over: close this agent's listeners in every pod and forget the pods
    /// without touching the maps or pins (they hold the successor's state now), answer, and
    /// stop. Connections already accepted are served to their end in their own tasks.
    Retire(oneshot::Sender<()>),
}

/// Why a pod could not be enrolled.
#[derive(Debug, thiserror::Error)]
enum EnrolError {
    /// Its network namespace cannot be opened (not there yet, or gone): there is nothing to
    /// close, and nothing can reach or leave it unmeshed through us.
    #[error("{0:#}")]
    NoNamespace(anyhow::Error),
    /// Its namespace exists but its listeners or map entries could not be set up.
    #[error("{reason:#}")]
    Incomplete {
        netns: Arc<Netns>,
        reason: anyhow::Error,
    },
}

impl Enrolment {
    /// A reconciler for `node`; publish progress on `status`.
    pub fn new(
        node: String,
        redirector: Arc<Redirector>,
        proxy: Arc<ProxyContext>,
        status: watch::Sender<EnrolmentStatus>,
    ) -> Self {
        Self {
            node,
            redirector,
            proxy,
            pods: BTreeMap::new(),
            closed: BTreeMap::new(),
            sandboxes: BTreeMap::new(),
            sandbox_file: None,
            status,
            draining: watch::Sender::new(false),
            warm_up: false,
        }
    }

    /// Keeps the CNI plugin's sandboxes in `file`, starting from what it holds (those of a
    /// previous agent).
    pub fn with_sandbox_file(mut self, file: std::path::PathBuf) -> Self {
        match std::fs::read(&file) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(sandboxes) => self.sandboxes = sandboxes,
                Err(err) => {
                    warn!(file = %file.display(), %err, "ignoring unreadable CNI sandbox file")
                }
            },
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => warn!(file = %file.display(), %err, "cannot read the CNI sandbox file"),
        }
        self.sandbox_file = Some(file);
        self
    }

    /// This agent replaces one that still serves the node ([`crate::handover`]): its
    /// listeners take a share of the pods' new connections as soon as they are open (they join
    /// the predecessor's SO_REUSEPORT groups), so they open only once this agent holds the
    /// certificates to serve them, or after `WARM_UP_LIMIT`.
    pub fn after_predecessor(mut self) -> Self {
        self.warm_up = true;
        self
    }

    async fn warm_up(&self, state: &MeshState) {
        let Some(certs) = &self.proxy.certs else {
            return;
        };
        certs.set_wanted(
            state
                .workloads_on_node(&self.node)
                .filter(|w| w.enrolled)
                .map(|w| state.identity_of(w))
                .collect(),
        );
        let deadline = tokio::time::Instant::now() + WARM_UP_LIMIT;
        loop {
            let pending = certs.stats().pending;
            if pending == 0 {
                info!("certificates in hand: enrolling the pods beside the previous agent");
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                warn!(
                    pending,
                    "certificates still missing after {}s: enrolling the pods anyway",
                    WARM_UP_LIMIT.as_secs()
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn save_sandboxes(&self) {
        let Some(file) = &self.sandbox_file else {
            return;
        };
        let tmp = file.with_extension("tmp");
        let written = serde_json::to_vec(&self.sandboxes)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, file));
        if let Err(err) = written {
            warn!(file = %file.display(), %err, "cannot save the CNI sandboxes");
        }
    }

    /// Applies every new state and every CNI request; retries failed pods periodically. Runs
    /// until the state channel closes or the reconciler is [retired](Control::Retire).
    pub async fn run(
        mut self,
        mut state: watch::Receiver<Arc<MeshState>>,
        mut cni: mpsc::Receiver<crate::cni::CniCall>,
        mut control: mpsc::Receiver<Control>,
    ) {
        if self.warm_up {
            let current = state.borrow().clone();
            self.warm_up(&current).await;
        }
        let mut first = true;
        loop {
            let current = state.borrow_and_update().clone();
            let failed = self.reconcile(&current);
            if first {
                self.sweep_stale();
                first = false;
            }
            self.publish(failed.clone());
            let retry = async {
                if failed.is_empty() {
                    std::future::pending::<()>().await
                } else {
                    tokio::time::sleep(RETRY_INTERVAL).await
                }
            };
            tokio::select! {
                changed = state.changed() => if changed.is_err() { return },
                Some(call) = cni.recv() => {
                    // The newest state, not the one this turn started with: the CNI server asks
                    // again as soon as a state arrives, maybe before this loop has seen it.
                    let latest = state.borrow().clone();
                    let reply = self.answer(call.request, &latest);
                    let _ = call.reply.send(reply);
                }
                () = retry => {}
                Some(ctl) = control.recv() => match ctl {
                    Control::Freeze(ack) => {
                        info!("a successor agent is starting: enrolment frozen (serving, writing no kernel state)");
                        let _ = ack.send(());
                        if self.frozen(&mut cni, &mut control).await {
                            return;
                        }
                        // The successor's listeners may be registered in the maps now: open
                        // fresh ones and register them before the old ones close.
                        let stale = std::mem::take(&mut self.pods);
                        let current = state.borrow().clone();
                        let failed = self.reconcile(&current);
                        drop(stale);
                        self.publish(failed);
                        info!("the successor agent did not take over: enrolment resumed, this agent's listeners registered again");
                    }
                    Control::Resume => {}
                    Control::Retire(ack) => {
                        self.retire();
                        let _ = ack.send(());
                        return;
                    }
                },
            }
        }
    }

    /// Waits, writing nothing, until the handover resumes (false) or retires (true) this
    /// reconciler.
    async fn frozen(
        &mut self,
        cni: &mut mpsc::Receiver<crate::cni::CniCall>,
        control: &mut mpsc::Receiver<Control>,
    ) -> bool {
        loop {
            tokio::select! {
                ctl = control.recv() => match ctl {
                    Some(Control::Resume) => return false,
                    Some(Control::Freeze(ack)) => { let _ = ack.send(()); }
                    Some(Control::Retire(ack)) => {
                        self.retire();
                        let _ = ack.send(());
                        return true;
                    }
                    // The handover is gone with its agent: nothing will resume us.
                    None => return false,
                },
                Some(call) = cni.recv() => {
                    let _ = call.reply.send(Reply {
                        outcome: Outcome::Retry,
                        message: format!(
                            "the agent of {} is handing over to its successor; ask again",
                            self.node
                        ),
                    });
                }
            }
        }
    }

    /// Closes this agent's listeners in every pod (after [`RETIRE_GRACE`]) and forgets the pods,
    /// leaving every map
    /// entry, pin and enrolment mark to the successor that now owns them.
    fn retire(&mut self) {
        let pods = std::mem::take(&mut self.pods);
        let count = pods.len();
        // Dropping a pod aborts its accept loops, which closes its listeners; the kernel takes a
        // closed socket out of the sk_lookup maps only where it is still the one registered.
        // Not at once: sk_lookup hands a SYN to the very socket registered, so handshakes
        // steered here just before the successor registered its own complete on these
        // listeners, and are accepted and served, for RETIRE_GRACE.
        tokio::spawn(async move {
            tokio::time::sleep(RETIRE_GRACE).await;
            drop(pods);
        });
        self.closed.clear();
        // Peers' pooled HBONE connections to this agent carry their new tunnels elsewhere.
        self.draining.send_replace(true);
        info!(
            pods = count,
            "retired: listeners closed, the successor serves new connections; open ones are served to their end"
        );
    }

    /// Acts on a CNI request and says what came of it.
    fn answer(&mut self, request: Request, state: &MeshState) -> Reply {
        let reply = |outcome, message: String| Reply { outcome, message };
        let (sandbox, command) = match &request {
            Request::Add(s) => (s, "ADD"),
            Request::Del(s) => (s, "DEL"),
            Request::Check(s) => (s, "CHECK"),
        };
        let uid = sandbox.pod();
        if let Request::Del(_) = request {
            // Only the sandbox DEL names: a new one of the same pod may already be there.
            if self
                .sandboxes
                .get(&uid)
                .is_some_and(|s| s.container_id == sandbox.container_id)
            {
                self.sandboxes.remove(&uid);
                self.save_sandboxes();
                let failed = self.reconcile(state);
                self.publish(failed);
            }
            return reply(
                Outcome::Ok,
                format!("sandbox {} of {uid} forgotten", sandbox.container_id),
            );
        }
        let Some(workload) = state.workloads_on_node(&self.node).find(|w| w.uid() == uid) else {
            return reply(
                Outcome::Retry,
                format!(
                    "{command}: pod {uid} is not known to the agent of {} (yet)",
                    self.node
                ),
            );
        };
        if !workload.enrolled {
            return reply(Outcome::NotMeshed, format!("pod {uid} is not enrolled"));
        }
        if let Request::Add(sandbox) = &request {
            if let Err(why) = self.add_sandbox(&uid, sandbox) {
                return reply(Outcome::Failed, why);
            }
            let failed = self.reconcile(state);
            self.publish(failed);
        }
        let meshed = self.pods.get(&uid).is_some_and(|pod| {
            self.sandboxes
                .get(&uid)
                .is_some_and(|s| s.container_id == sandbox.container_id)
                && pod.workload.netns == NetnsRef::Path(sandbox.netns.clone().into())
        });
        if meshed {
            return reply(Outcome::Ok, format!("pod {uid} is meshed"));
        }
        let why = match self.sandboxes.get(&uid) {
            // CHECK of a sandbox already deleted (or never added): the agent meshes no sandbox
            // of the pod.
            None => format!(
                "the agent of {} has no sandbox of it (deleted, or never added)",
                self.node
            ),
            Some(known) if known.container_id != sandbox.container_id => format!(
                "its sandbox is {}, not {}",
                known.container_id, sandbox.container_id
            ),
            Some(_) => self
                .status
                .borrow()
                .failed
                .get(&uid)
                .cloned()
                .unwrap_or_else(|| "its sandbox is not the one enrolled".into()),
        };
        reply(Outcome::Failed, format!("pod {uid} is not meshed: {why}"))
    }

    fn add_sandbox(&mut self, uid: &str, sandbox: &Sandbox) -> Result<(), String> {
        if sandbox.netns.is_empty() {
            return Err("ADD without a network namespace (CNI_NETNS)".into());
        }
        if !self.sandboxes.contains_key(uid) && self.sandboxes.len() >= MAX_CNI_SANDBOXES {
            return Err(format!(
                "the agent already tracks {MAX_CNI_SANDBOXES} sandboxes on this node"
            ));
        }
        self.sandboxes.insert(
            uid.to_string(),
            CniSandbox {
                container_id: sandbox.container_id.clone(),
                netns: sandbox.netns.clone().into(),
                ips: sandbox.ips.clone(),
            },
        );
        self.save_sandboxes();
        Ok(())
    }

    /// The workload as enrolment sees it: with the namespace and addresses of the sandbox the
    /// CNI plugin announced, if any; `None` if it has not started (no sandbox, no addresses).
    fn effective(&self, workload: &Arc<Workload>) -> Option<Arc<Workload>> {
        match self.sandboxes.get(&workload.uid()) {
            Some(sandbox) => {
                let mut effective = (**workload).clone();
                effective.netns = NetnsRef::Path(sandbox.netns.clone());
                if !sandbox.ips.is_empty() {
                    effective.ips = sandbox.ips.clone();
                }
                Some(Arc::new(effective))
            }
            None if workload.ips.is_empty() || workload.netns == NetnsRef::Cni => None,
            None => Some(workload.clone()),
        }
    }

    fn publish(&self, failed: BTreeMap<String, String>) {
        let enrolled = self
            .pods
            .iter()
            .map(|(uid, pod)| EnrolledPodInfo {
                uid: uid.clone(),
                netns_cookie: pod.netns.cookie(),
                ips: pod.workload.ips.clone(),
            })
            .collect();
        self.status.send_replace(EnrolmentStatus {
            reconciled: true,
            enrolled,
            failed,
            closed: self.closed.keys().cloned().collect(),
            exclusions_refused: self
                .pods
                .iter()
                .filter_map(|(uid, pod)| Some((uid.clone(), pod.exclusions_refused.clone()?)))
                .collect(),
        });
    }

    /// Brings the node to `state`; returns the pods that could not be enrolled and why.
    fn reconcile(&mut self, state: &MeshState) -> BTreeMap<String, String> {
        if let Err(err) = self.redirector.set_exclusions(state.redirect()) {
            warn!(%err, "could not apply redirect exclusions");
        }
        // Sandboxes whose namespace is gone without a DEL (a runtime that crashed) are dropped.
        let before = self.sandboxes.len();
        self.sandboxes.retain(|_, s| s.netns.exists());
        if self.sandboxes.len() != before {
            self.save_sandboxes();
        }
        let enrolled: Vec<&Arc<Workload>> = state
            .workloads_on_node(&self.node)
            .filter(|w| w.enrolled)
            .collect();
        // The node holds certificates for exactly the identities of its enrolled pods, started
        // or about to: fetched as soon as one appears, dropped with the last pod that runs as it.
        if let Some(certs) = &self.proxy.certs {
            certs.set_wanted(enrolled.iter().map(|w| state.identity_of(w)).collect());
        }
        let wanted: BTreeMap<String, Arc<Workload>> = enrolled
            .into_iter()
            .filter_map(|w| self.effective(w))
            .map(|w| (w.uid(), w))
            .collect();

        // Pods that went, were un-enrolled, or changed address, namespace or identity.
        let stale: Vec<String> = self
            .pods
            .iter()
            .filter(|(uid, pod)| match wanted.get(*uid) {
                None => true,
                Some(w) => {
                    w.ips != pod.workload.ips
                        || w.netns != pod.workload.netns
                        || state.identity_of(w) != pod.identity
                        || current_cookie(w) != Some(pod.netns.cookie())
                }
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in stale {
            if let Some(pod) = self.pods.remove(&uid) {
                self.unenroll(pod.netns.cookie(), &pod.workload.ips);
                info!(pod = %uid, "un-enrolled");
            }
        }
        // Closed pods that are no longer wanted here are released (their namespace is likely
        // gone; if not, the pod is no longer ours to close).
        let released: Vec<(String, u64)> = self
            .closed
            .iter()
            .filter(|(uid, cookie)| {
                wanted
                    .get(*uid)
                    .is_none_or(|w| current_cookie(w) != Some(**cookie))
            })
            .map(|(uid, cookie)| (uid.clone(), *cookie))
            .collect();
        for (uid, cookie) in released {
            self.closed.remove(&uid);
            self.unenroll(cookie, &[]);
            info!(pod = %uid, netns_cookie = cookie, "closed pod released");
        }

        let mut failed = BTreeMap::new();
        for (uid, workload) in wanted {
            if let Some(pod) = self.pods.get_mut(&uid) {
                // Changed exclusions take effect for new connections at once.
                if pod.exclusions != workload.capture_exclusions {
                    let refused =
                        apply_exclusions(&self.redirector, &uid, pod.netns.cookie(), &workload);
                    pod.exclusions = workload.capture_exclusions.clone();
                    pod.exclusions_refused = refused;
                }
                continue;
            }
            let identity = state.identity_of(&workload);
            match self.enroll(workload, identity) {
                Ok(pod) => {
                    if self.closed.remove(&uid).is_some() {
                        info!(pod = %uid, "closed pod opened: enrolment completed");
                    }
                    info!(pod = %uid, netns_cookie = pod.netns.cookie(), "enrolled");
                    self.pods.insert(uid, pod);
                }
                Err(EnrolError::NoNamespace(err)) => {
                    warn!(pod = %uid, err = format!("{err:#}"), "enrolment failed; will retry");
                    failed.insert(uid, format!("{err:#}"));
                }
                Err(EnrolError::Incomplete { netns, reason }) => {
                    let reason = format!("{reason:#}");
                    match self.close(&netns) {
                        Ok(()) => {
                            if self.closed.insert(uid.clone(), netns.cookie()).is_none() {
                                warn!(pod = %uid, netns_cookie = netns.cookie(), err = %reason, "enrolment failed: pod closed (inbound dropped, outbound refused) until it succeeds; will retry");
                            }
                        }
                        Err(err) => {
                            error!(pod = %uid, err = %reason, close_err = format!("{err:#}"), "enrolment failed and the pod could not be closed")
                        }
                    }
                    failed.insert(uid, format!("closed: {reason}"));
                }
            }
        }
        failed
    }

    fn enroll(
        &self,
        workload: Arc<Workload>,
        identity: SpiffeId,
    ) -> Result<EnrolledPod, EnrolError> {
        let netns = workload
            .netns
            .open()
            .with_context(|| format!("opening the network namespace of {}", workload.uid()))
            .and_then(|file| Netns::from_file(file).context("reading the namespace cookie"))
            .map_err(EnrolError::NoNamespace)?;
        let netns = Arc::new(netns);
        // Listeners opened before a failure close when dropped, which also takes them out of
        // the sk_lookup maps.
        self.set_up(workload, identity, netns.clone())
            .map_err(|reason| EnrolError::Incomplete { netns, reason })
    }

    fn set_up(
        &self,
        workload: Arc<Workload>,
        identity: SpiffeId,
        netns: Arc<Netns>,
    ) -> anyhow::Result<EnrolledPod> {
        let listeners = netns.run(|| open_listeners(&workload.ips))??;
        // Before anything can reach the application through the agent: its answers to the
        // agent's transparent hop must come back over loopback.
        crate::netns::routing::install(&netns, &workload.ips)
            .context("installing the pod's policy routing for the inbound hop")?;
        let dial_ns = netns.clone();
        let pool = crate::hbone::Pool::new(
            move |key: &crate::hbone::PoolKey| {
                let (netns, dst) = (dial_ns.clone(), key.destination());
                async move { proxy::connect_from(&netns, dst, None).await }
            },
            self.proxy.pool.clone(),
        );
        let pod = Arc::new(PodContext {
            workload: workload.clone(),
            identity,
            netns: netns.clone(),
            pool,
        });

        for (ip, hbone) in workload.ips.iter().zip(&listeners.hbone) {
            let plaintext = if ip.is_ipv4() {
                &listeners.inbound4
            } else {
                listeners.inbound6.as_ref().expect("opened for v6 pods")
            };
            if let Err(err) = self.redirector.set_listeners(*ip, plaintext, hbone) {
                for ip in &workload.ips {
                    self.redirector.clear_listeners(*ip);
                }
                return Err(err);
            }
        }
        self.redirector.attach_inbound(&netns)?;
        let to_tokio =
            |l: std::net::TcpListener| TcpListener::from_std(l).context("registering listener");
        let mut accept_loops = Vec::new();
        for l in std::iter::once(listeners.inbound4).chain(listeners.inbound6) {
            let serve = proxy::inbound::serve(to_tokio(l)?, pod.clone(), self.proxy.clone());
            accept_loops.push(tokio::spawn(serve));
        }
        for l in std::iter::once(listeners.outbound4).chain(listeners.outbound6) {
            let serve = proxy::outbound::serve(to_tokio(l)?, pod.clone(), self.proxy.clone());
            accept_loops.push(tokio::spawn(serve));
        }
        let settings = crate::hbone::InboundSettings {
            drain: Some(self.draining.subscribe()),
            ..crate::hbone::InboundSettings::new(workload.ips.clone())
        };
        let hbone = crate::hbone::HboneServer::new(
            proxy::inbound_hbone::PodInbound::new(pod.clone(), self.proxy.clone()),
            settings,
            self.proxy.limits.clone(),
        );
        for l in listeners.hbone {
            let (hbone, listener) = (hbone.clone(), to_tokio(l)?);
            accept_loops.push(tokio::spawn(async move { hbone.serve(listener).await }));
        }
        // Before the pod is meshed: its first connects already see its exclusions.
        let exclusions_refused =
            apply_exclusions(&self.redirector, &workload.uid(), netns.cookie(), &workload);
        let enrolled = EnrolledPod {
            exclusions: workload.capture_exclusions.clone(),
            exclusions_refused,
            workload,
            identity: pod.identity.clone(),
            netns,
            accept_loops,
            _local: self.proxy.local_pods.register(&pod),
        };
        // Last: only now may the kernel send this pod's connects to the listeners above.
        self.redirector
            .enroll(enrolled.netns.cookie(), &enrolled.workload.ips)?;
        Ok(enrolled)
    }

    /// Blocks a pod's traffic: sk_lookup linked with no listener drops its inbound, and the
    /// closed mark refuses its outbound.
    fn close(&self, netns: &Netns) -> anyhow::Result<()> {
        self.redirector.close(netns.cookie())?;
        self.redirector.attach_inbound(netns)
    }

    fn unenroll(&self, netns_cookie: u64, ips: &[IpAddr]) {
        self.redirector.unenroll(netns_cookie);
        self.redirector.detach_inbound(netns_cookie);
        for ip in ips {
            self.redirector.clear_listeners(*ip);
        }
        // Dropping the pod aborts its accept loops, closing the listeners.
    }

    /// Removes kernel state an earlier agent left for pods that are no longer enrolled here.
    fn sweep_stale(&self) {
        let ours: BTreeSet<u64> = self
            .pods
            .values()
            .map(|p| p.netns.cookie())
            .chain(self.closed.values().copied())
            .collect();
        for cookie in self.redirector.enrolled_cookies() {
            if !ours.contains(&cookie) {
                info!(netns_cookie = cookie, "removing stale enrolment");
                self.redirector.unenroll(cookie);
            }
        }
        for cookie in self.redirector.inbound_cookies() {
            if !ours.contains(&cookie) {
                info!(netns_cookie = cookie, "removing stale sk_lookup link");
                self.redirector.detach_inbound(cookie);
            }
        }
    }
}

/// Applies a pod's own capture exclusions; returns why it has none, if it asked for some (or its
/// annotations were refused) and did not get them: its traffic is then captured whole, and the
/// reason logged here and published for the pod's Event.
fn apply_exclusions(
    redirector: &Redirector,
    uid: &str,
    netns_cookie: u64,
    workload: &Workload,
) -> Option<String> {
    let wanted = &workload.capture_exclusions;
    if let Some(why) = &wanted.refused {
        warn!(pod = %uid, reason = %why, "capture exclusions refused: none applied, all the pod's traffic is captured");
    }
    match redirector.set_pod_exclusions(netns_cookie, &workload.ips, wanted) {
        Ok(()) => {
            if !wanted.is_empty() {
                info!(
                    pod = %uid,
                    outbound_ports = ?wanted.outbound_ports,
                    outbound_cidrs = ?wanted.outbound_cidrs,
                    inbound_ports = ?wanted.inbound_ports,
                    "capture exclusions applied"
                );
            }
            wanted.refused.clone()
        }
        Err(err) => {
            let why = format!("could not apply the capture exclusions: {err:#}");
            warn!(pod = %uid, reason = %why, "capture exclusions not applied: all the pod's traffic is captured");
            Some(why)
        }
    }
}

fn current_cookie(workload: &Workload) -> Option<u64> {
    let file = workload.netns.open().ok()?;
    Netns::from_file(file).ok().map(|n| n.cookie())
}

struct PodListeners {
    outbound4: std::net::TcpListener,
    outbound6: Option<std::net::TcpListener>,
    inbound4: std::net::TcpListener,
    inbound6: Option<std::net::TcpListener>,
    /// `<pod IP>:15008` for each of the pod's addresses.
    hbone: Vec<std::net::TcpListener>,
}

fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    // The next agent opens its own listeners beside these before this one closes them
    // (crate::handover): same address, same owner (root), both with SO_REUSEPORT.
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    // Its accepted connections answer by the main table, never as the agent's hops do.
    socket.set_mark(crate::netns::routing::LISTENER_MARK)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    prefer_successor(&socket)?;
    Ok(socket.into())
}

/// Sends a listener group's new connections to its second listener, once there is one.
///
/// A SO_REUSEPORT group numbers its listeners in the order they called listen(2); the program
/// it runs for each new connection (one for the whole group, set by any member) returns the
/// index of the listener to take it, and an index beyond the group falls back to the usual hash.
/// So a lone agent takes every connection; when a successor joins (crate::handover), every new
/// connection goes to the successor's listener, none is queued on the predecessor's, and the
/// predecessor closing its listener resets nothing. The last listener moves into a closed one's
/// place, so the successor is alone again, as index 0, ready for its own successor.
fn prefer_successor(socket: &socket2::Socket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    // Classic BPF, one instruction: return 1.
    let mut program = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 1,
    }];
    let fprog = libc::sock_fprog {
        len: 1,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: `fprog` points at `program`, one valid instruction, both alive for the call; the
    // kernel copies the program and keeps no pointer into our memory; the length passed is the
    // size of the struct passed. No safe wrapper (socket2, nix) covers this option.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&raw const fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Opens a pod's listeners; must run inside the pod's namespace.
fn open_listeners(ips: &[IpAddr]) -> anyhow::Result<PodListeners> {
    let has_v6 = ips.iter().any(IpAddr::is_ipv6);
    let outbound4 = SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT));
    let inbound4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, INBOUND_PLAINTEXT_PORT));
    let outbound6 = SocketAddr::from((Ipv6Addr::LOCALHOST, OUTBOUND_PORT));
    let inbound6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, INBOUND_PLAINTEXT_PORT));
    Ok(PodListeners {
        outbound4: listen(outbound4).with_context(|| format!("listening on {outbound4}"))?,
        // IPv6 may be disabled in the pod; IPv4-only pods then simply have no IPv6 listener,
        // and their IPv6 connects are refused by the kernel rather than bypassing the agent.
        outbound6: listen(outbound6).ok(),
        inbound4: listen(inbound4).with_context(|| format!("listening on {inbound4}"))?,
        inbound6: if has_v6 {
            Some(listen(inbound6).with_context(|| format!("listening on {inbound6}"))?)
        } else {
            None
        },
        hbone: ips
            .iter()
            .map(|ip| {
                let addr = SocketAddr::new(*ip, INBOUND_HBONE_PORT);
                listen(addr).with_context(|| format!("listening on {addr}"))
            })
            .collect::<anyhow::Result<_>>()?,
    })
}
