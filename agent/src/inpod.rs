//! Enrolment: turns the mesh state into per-pod listeners and eBPF map entries on this node.
//!
//! For each enrolled workload of this node the agent enters the pod's network namespace, opens
//! its listeners there (127.0.0.1:15001 and [::1]:15001 outbound, 0.0.0.0:15006 and [::]:15006
//! inbound), registers the inbound listeners for sk_lookup, links sk_lookup to the namespace and
//! finally adds the namespace to the enrolment map, so redirection starts only once something
//! listens. Un-enrolment goes in the opposite order. Connections already accepted live in their
//! own tasks and are never cut by a reconcile.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use ambit_common::{INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use anyhow::Context as _;
use serde::Serialize;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    identity::SpiffeId,
    netns::Netns,
    proxy::{self, PodContext, ProxyContext},
    redirect::Redirector,
    state::{MeshState, Workload},
};

/// How often enrolment is retried for pods that could not be enrolled (namespace not there yet).
const RETRY_INTERVAL: Duration = Duration::from_secs(2);

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
}

struct EnrolledPod {
    workload: Arc<Workload>,
    identity: SpiffeId,
    netns: Arc<Netns>,
    accept_loops: Vec<JoinHandle<()>>,
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
    status: watch::Sender<EnrolmentStatus>,
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
            status,
        }
    }

    /// Applies every new state; retries failed pods periodically. Runs until the state
    /// channel closes.
    pub async fn run(mut self, mut state: watch::Receiver<Arc<MeshState>>) {
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
                () = retry => {}
            }
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
        });
    }

    /// Brings the node to `state`; returns the pods that could not be enrolled and why.
    fn reconcile(&mut self, state: &MeshState) -> BTreeMap<String, String> {
        if let Err(err) = self.redirector.set_exclusions(state.redirect()) {
            warn!(%err, "could not apply redirect exclusions");
        }
        let wanted: BTreeMap<String, Arc<Workload>> = state
            .workloads_on_node(&self.node)
            .filter(|w| w.enrolled)
            .map(|w| (w.uid(), w.clone()))
            .collect();
        // The node holds certificates for exactly the identities of its enrolled pods: fetched
        // as soon as one appears, dropped with the last pod that runs as it.
        if let Some(certs) = &self.proxy.certs {
            certs.set_wanted(wanted.values().map(|w| state.identity_of(w)).collect());
        }

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
                self.unenroll(&pod);
                info!(pod = %uid, "un-enrolled");
            }
        }

        let mut failed = BTreeMap::new();
        for (uid, workload) in wanted {
            if self.pods.contains_key(&uid) {
                continue;
            }
            let identity = state.identity_of(&workload);
            match self.enroll(workload, identity) {
                Ok(pod) => {
                    info!(pod = %uid, netns_cookie = pod.netns.cookie(), "enrolled");
                    self.pods.insert(uid, pod);
                }
                Err(err) => {
                    warn!(pod = %uid, err = format!("{err:#}"), "enrolment failed; will retry");
                    failed.insert(uid, format!("{err:#}"));
                }
            }
        }
        failed
    }

    fn enroll(&self, workload: Arc<Workload>, identity: SpiffeId) -> anyhow::Result<EnrolledPod> {
        let file = workload
            .netns
            .open()
            .with_context(|| format!("opening the network namespace of {}", workload.uid()))?;
        let netns = Arc::new(Netns::from_file(file).context("reading the namespace cookie")?);
        let listeners = netns.run(|| open_listeners(&workload.ips))??;
        let mark = self.proxy.mark;
        let dial_ns = netns.clone();
        let pool = proxy::hbone::Pool::new(
            move |key: &proxy::hbone::PoolKey| {
                let (netns, dst) = (dial_ns.clone(), key.destination());
                async move { proxy::connect_from(&netns, dst, None, mark).await }
            },
            proxy::hbone::PoolConfig::default(),
        );
        let pod = Arc::new(PodContext {
            workload: workload.clone(),
            identity,
            netns: netns.clone(),
            pool,
        });

        for ip in &workload.ips {
            let listener = if ip.is_ipv4() {
                &listeners.inbound4
            } else {
                listeners.inbound6.as_ref().expect("opened for v6 pods")
            };
            self.redirector.set_listener(*ip, listener)?;
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
        let hbone = proxy::hbone::HboneServer::new(
            proxy::inbound_hbone::PodInbound::new(pod.clone(), self.proxy.clone()),
            proxy::hbone::InboundSettings::new(workload.ips.clone()),
            self.proxy.limits.clone(),
        );
        for l in listeners.hbone {
            let (hbone, listener) = (hbone.clone(), to_tokio(l)?);
            accept_loops.push(tokio::spawn(async move { hbone.serve(listener).await }));
        }
        // Last: only now may the kernel send this pod's connects to the listeners above.
        self.redirector.enroll(netns.cookie())?;
        Ok(EnrolledPod {
            workload,
            identity: pod.identity.clone(),
            netns,
            accept_loops,
        })
    }

    fn unenroll(&self, pod: &EnrolledPod) {
        self.redirector.unenroll(pod.netns.cookie());
        self.redirector.detach_inbound(pod.netns.cookie());
        for ip in &pod.workload.ips {
            self.redirector.clear_listener(*ip);
        }
        // Dropping the pod aborts its accept loops, closing the listeners.
    }

    /// Removes kernel state an earlier agent left for pods that are no longer enrolled here.
    fn sweep_stale(&self) {
        let ours: BTreeSet<u64> = self.pods.values().map(|p| p.netns.cookie()).collect();
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
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
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
