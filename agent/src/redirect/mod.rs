//! Loading, attaching and pinning the eBPF programs, and the maps the agent drives.
//!
//! Everything the kernel needs to keep steering traffic is pinned under the agent's bpffs
//! directory, so redirection outlives the agent: after a crash, enrolled pods' connects still go
//! to the (now closed) loopback listener and are refused, and inbound plaintext is dropped,
//! instead of silently bypassing the mesh. The next agent re-uses the pinned maps and replaces
//! the pinned links with its own. Only [`uninstall`] removes the pins.
//!
//! The agent's own sockets are exempt from redirection by the agent's cgroup ([`own_cgroup`]),
//! which a pod cannot join, rather than by a socket mark, which any process with CAP_NET_RAW
//! can set.
mod link;
pub mod metrics;
mod object;
mod preflight;
pub mod splice;

use std::{
    collections::BTreeSet,
    fs,
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

use ambit_common::{
    HopKey, IpKey, OrigDst, POD_NET_COOKIE_BITS, PendingConnect, PodAddrs, PodPortKey, SockState,
    TupleKey, limits, maps, pod_addrs, pod_net_key, pod_state, programs, sock_flags, stats,
};
use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{HashMap, LpmTrie, MapData, PerCpuArray, SkStorage, SockHash, lpm_trie::Key},
    programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps, links::FdLink},
};
use ipnet::IpNet;
use tracing::{debug, info, warn};

pub use preflight::{
    Finding, MIN_KERNEL, Status, cgroup2_mount, mount_bpffs, node_findings, preflight,
};

use crate::netns::Netns;
use crate::state::{CaptureExclusions, RedirectSettings};

/// The compiled eBPF object, built by build.rs from ebpf/programs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ambit-ebpf"));

/// Where and how the programs are attached.
#[derive(Clone, Debug)]
pub struct RedirectConfig {
    /// cgroup v2 directory at which the socket programs attach (the node's pods live below it).
    pub cgroup: PathBuf,
    /// bpffs directory for pins.
    pub bpffs: PathBuf,
    /// Same-node connections spliced in the kernel at once, at most
    /// [`limits::MAX_SPLICED`]; a source pod may hold a quarter of them. 0 loads no splice.
    pub max_spliced: usize,
    /// The same-node fast path is on (`--same-node-fast-path`): only then is the splice
    /// loaded.
    pub fast_path: bool,
}

/// Whether the same-node splice can be used, and why not.
pub enum SpliceState {
    /// Loaded and its self-test passed.
    Ready(std::sync::Arc<splice::Splicer>),
    /// Not loaded: the fast path is off, or `--max-spliced-connections` is 0.
    NotWanted,
    /// Wanted, but the kernel refused the program or failed the self-test: the fast path
    /// relays, as with no splice wanted.
    Unavailable(String),
}

/// Link-based cgroup attachments always coexist with other programs (the kernel treats them as
/// multi-attach) and refuse explicit flags, so the plain mode is the one that shares the cgroup
/// with a CNI's own programs.
const ATTACH_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// The loaded programs and the agent's handles on their maps.
pub struct Redirector {
    config: RedirectConfig,
    ebpf: Mutex<Ebpf>,
    enrolled: Mutex<HashMap<MapData, u64, u32>>,
    sock_state: SkStorage<MapData, SockState>,
    orig_dst: HashMap<MapData, TupleKey, PendingConnect>,
    pending: Mutex<HashMap<MapData, u64, u64>>,
    listeners: Mutex<SockHash<MapData, IpKey>>,
    hbone_listeners: Mutex<SockHash<MapData, IpKey>>,
    node_addrs: Mutex<HashMap<MapData, IpKey, u8>>,
    excluded_ports: Mutex<HashMap<MapData, u16, u8>>,
    excluded_nets: Mutex<LpmTrie<MapData, [u8; 16], u8>>,
    pod_addrs: Mutex<HashMap<MapData, u64, PodAddrs>>,
    pod_exclusions: Mutex<PodExclusionMaps>,
    agent_hops: Mutex<HashMap<MapData, HopKey, u8>>,
    stats: PerCpuArray<MapData, u64>,
    splice: SpliceState,
}

/// The per-pod capture exclusion maps, locked together: a pod's entries in all three change
/// as one.
struct PodExclusionMaps {
    ports: HashMap<MapData, PodPortKey, u8>,
    nets: LpmTrie<MapData, [u8; 24], u8>,
    /// By (pod address, port); the value is the pod's netns cookie.
    inbound: HashMap<MapData, OrigDst, u64>,
}

impl PodExclusionMaps {
    /// Removes every entry of the pod of `netns_cookie`.
    fn clear(&mut self, netns_cookie: u64) {
        let ports: Vec<PodPortKey> = self
            .ports
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.netns_cookie == netns_cookie)
            .collect();
        for key in &ports {
            let _ = self.ports.remove(key);
        }
        let cookie = netns_cookie.to_ne_bytes();
        let nets: Vec<Key<[u8; 24]>> = self
            .nets
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data()[..8] == cookie)
            .collect();
        for key in &nets {
            let _ = self.nets.remove(key);
        }
        let inbound: Vec<OrigDst> = self
            .inbound
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, cookie)| *cookie == netns_cookie)
            .map(|(key, _)| key)
            .collect();
        for key in &inbound {
            let _ = self.inbound.remove(key);
        }
    }

    /// Adds the pod's entries (after [`Self::clear`]).
    fn insert(
        &mut self,
        netns_cookie: u64,
        ips: &[IpAddr],
        exclusions: &CaptureExclusions,
    ) -> anyhow::Result<()> {
        for &port in &exclusions.outbound_ports {
            let key = PodPortKey {
                netns_cookie,
                port,
                _pad: [0; 6],
            };
            self.ports
                .insert(key, 1, 0)
                .with_context(|| format!("excluding outbound port {port} in POD_EXCLUDED_PORTS"))?;
        }
        for net in &exclusions.outbound_cidrs {
            let key = net_key(net);
            let key = Key::new(
                POD_NET_COOKIE_BITS + key.prefix_len(),
                pod_net_key(netns_cookie, &key.data()),
            );
            self.nets.insert(&key, 1, 0).with_context(|| {
                format!("excluding outbound network {net} in POD_EXCLUDED_NETS")
            })?;
        }
        for ip in ips {
            for &port in &exclusions.inbound_ports {
                let key = OrigDst {
                    ip: ip_key(*ip),
                    port,
                    _pad: [0; 6],
                };
                self.inbound.insert(key, netns_cookie, 0).with_context(|| {
                    format!("excluding inbound port {port} of {ip} in POD_EXCLUDED_INBOUND")
                })?;
            }
        }
        Ok(())
    }

    /// Cookies of the pods with entries.
    fn cookies(&self) -> BTreeSet<u64> {
        let mut cookies: BTreeSet<u64> = self
            .ports
            .keys()
            .filter_map(Result::ok)
            .map(|k| k.netns_cookie)
            .collect();
        cookies.extend(self.nets.keys().filter_map(Result::ok).map(|k| {
            let d = k.data();
            u64::from_ne_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
        }));
        cookies.extend(self.inbound.iter().filter_map(Result::ok).map(|(_, c)| c));
        cookies
    }
}

/// Event counters kept by the eBPF programs, summed over CPUs since the programs were loaded.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RedirectStats {
    /// IPv4 connects rewritten to the agent.
    pub redirected_v4: u64,
    /// IPv6 connects rewritten to the agent.
    pub redirected_v6: u64,
    /// Connects left alone because of an exclusion.
    pub excluded: u64,
    /// Connects refused or left without a destination because a map or a socket's storage
    /// could not take an entry.
    pub map_full: u64,
    /// Inbound connections steered to a pod's listener.
    pub inbound_steered: u64,
    /// Inbound connections dropped because the pod's listener was gone (agent down, pod
    /// closed).
    pub inbound_no_listener: u64,
    /// Connects beyond a pod's share of handshakes in flight (closed by the agent).
    pub pod_quota: u64,
    /// Outbound connects refused because their pod is closed.
    pub closed_refused: u64,
    /// Inbound connections from the node's own addresses let through to the application.
    pub inbound_from_node: u64,
    /// Bytes the kernel forwarded between the sockets of spliced same-node connections.
    pub spliced_bytes: u64,
    /// Chunks of spliced connections dropped because the peer socket was gone.
    pub splice_no_target: u64,
    /// Chunks that reached a spliced socket without a pair (passed to the agent).
    pub splice_unpaired: u64,
    /// Redirected connects whose socket kept its own local address (bound by the application,
    /// or no pod address of its family).
    pub source_not_bound: u64,
    /// Inbound connections to a pod's excluded inbound port let through to the application.
    pub inbound_excluded: u64,
}

/// Takes the map `name` out of the loaded object, as the map type it must be.
fn map<T>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("eBPF object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// Pins `link` at `path`, replacing (and so detaching) whatever link was pinned there before.
///
/// The new link is attached before the old one goes, so there is no instant without it.
fn pin_replacing(link: FdLink, path: &Path) -> anyhow::Result<()> {
    // bpffs refuses names with dots (reserved), hence the suffix style.
    let mut staging = path.as_os_str().to_owned();
    staging.push("_new");
    let staging = PathBuf::from(staging);
    let _ = fs::remove_file(&staging);
    link.pin(&staging)
        .with_context(|| format!("pinning link at {}", staging.display()))?;
    fs::rename(&staging, path).with_context(|| format!("pinning link at {}", path.display()))?;
    Ok(())
}

impl Redirector {
    /// Loads the programs (re-using pinned maps from an earlier agent), attaches the socket
    /// programs to the configured cgroup and pins their links.
    pub fn load(config: RedirectConfig) -> anyhow::Result<Self> {
        preflight(&config)?;
        let maps_dir = config.bpffs.join("maps");
        for dir in [
            &maps_dir,
            &config.bpffs.join("links"),
            &config.bpffs.join("pods"),
        ] {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let agent_cgroup = own_cgroup(&config.cgroup)?;
        let mut ebpf = object::load(EBPF_OBJECT, &maps_dir).context("loading the eBPF object (maps pinned by an incompatible agent version can be removed with `ambit uninstall`)")?;
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_ebpf_logger(logger),
            Err(err) => warn!(%err, "eBPF log forwarding unavailable"),
        }
        // Before the programs are attached: the agent's own connects from inside pods'
        // namespaces must never be redirected back to itself.
        let mut exempt: HashMap<MapData, u64, u8> = map(&mut ebpf, maps::EXEMPT_CGROUPS)?;
        exempt_cgroup(&mut exempt, agent_cgroup.id)?;
        info!(cgroup = %agent_cgroup.path.display(), id = agent_cgroup.id, "the agent's cgroup is exempt from redirection");

        let cgroup = fs::File::open(&config.cgroup)
            .with_context(|| format!("opening cgroup {}", config.cgroup.display()))?;
        for name in programs::CGROUP {
            let program = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("eBPF object has no program {name}"))?;
            let link: FdLink = if name == programs::SOCK_OPS {
                let program: &mut SockOps = program.try_into()?;
                program
                    .load()
                    .with_context(|| format!("kernel refused program {name}"))?;
                let id = program
                    .attach(&cgroup, ATTACH_MODE)
                    .with_context(|| format!("attaching {name} to {}", config.cgroup.display()))?;
                program.take_link(id)?.try_into()?
            } else {
                let program: &mut CgroupSockAddr = program.try_into()?;
                program
                    .load()
                    .with_context(|| format!("kernel refused program {name}"))?;
                let id = program
                    .attach(&cgroup, ATTACH_MODE)
                    .with_context(|| format!("attaching {name} to {}", config.cgroup.display()))?;
                program.take_link(id)?.try_into()?
            };
            pin_replacing(link, &config.bpffs.join("links").join(name))?;
        }
        let sk_lookup: &mut SkLookup = ebpf
            .program_mut(programs::SK_LOOKUP)
            .ok_or_else(|| anyhow!("eBPF object has no program {}", programs::SK_LOOKUP))?
            .try_into()?;
        sk_lookup
            .load()
            .with_context(|| format!("kernel refused program {}", programs::SK_LOOKUP))?;
        let splice = if config.fast_path && config.max_spliced > 0 {
            match load_splice(&mut ebpf, config.max_spliced) {
                Ok(splicer) => {
                    info!("same-node splice loaded, self-test passed");
                    warn!(
                        "the same-node splice does not bound the kernel memory a fast sender can \
                         queue (docs/security.md): use --max-spliced-connections only where the \
                         node's pods are trusted"
                    );
                    SpliceState::Ready(splicer)
                }
                Err(err) => {
                    let why = format!("{err:#}");
                    warn!(err = %why, "the same-node splice is unavailable on this kernel: the agent relays same-node connections itself");
                    SpliceState::Unavailable(why)
                }
            }
        } else {
            SpliceState::NotWanted
        };
        info!(cgroup = %config.cgroup.display(), bpffs = %config.bpffs.display(), "eBPF programs attached");

        Ok(Self {
            enrolled: Mutex::new(map(&mut ebpf, maps::ENROLLED_NETNS)?),
            sock_state: map(&mut ebpf, maps::SOCK_STATE)?,
            orig_dst: map(&mut ebpf, maps::ORIG_DST_TUPLE)?,
            pending: Mutex::new(map(&mut ebpf, maps::PENDING_CONNECTS)?),
            listeners: Mutex::new(map(&mut ebpf, maps::POD_LISTENERS)?),
            hbone_listeners: Mutex::new(map(&mut ebpf, maps::HBONE_LISTENERS)?),
            node_addrs: Mutex::new(map(&mut ebpf, maps::NODE_ADDRS)?),
            excluded_ports: Mutex::new(map(&mut ebpf, maps::EXCLUDED_PORTS)?),
            excluded_nets: Mutex::new(map(&mut ebpf, maps::EXCLUDED_NETS)?),
            pod_addrs: Mutex::new(map(&mut ebpf, maps::POD_ADDRS)?),
            pod_exclusions: Mutex::new(PodExclusionMaps {
                ports: map(&mut ebpf, maps::POD_EXCLUDED_PORTS)?,
                nets: map(&mut ebpf, maps::POD_EXCLUDED_NETS)?,
                inbound: map(&mut ebpf, maps::POD_EXCLUDED_INBOUND)?,
            }),
            agent_hops: Mutex::new(map(&mut ebpf, maps::AGENT_HOPS)?),
            stats: map(&mut ebpf, maps::STATS)?,
            splice,
            ebpf: Mutex::new(ebpf),
            config,
        })
    }

    /// The configuration this redirector was loaded with.
    pub fn config(&self) -> &RedirectConfig {
        &self.config
    }

    /// The same-node splice, when it is loaded and passed its self-test.
    pub fn splicer(&self) -> Option<&std::sync::Arc<splice::Splicer>> {
        match &self.splice {
            SpliceState::Ready(splicer) => Some(splicer),
            _ => None,
        }
    }

    /// Whether the splice is loaded, not wanted, or unavailable and why.
    pub fn splice_state(&self) -> &SpliceState {
        &self.splice
    }

    fn pod_pin(&self, netns_cookie: u64) -> PathBuf {
        self.config
            .bpffs
            .join("pods")
            .join(netns_cookie.to_string())
    }

    /// Steers inbound TCP of a pod's namespace to its listeners: links sk_lookup there.
    pub fn attach_inbound(&self, netns: &Netns) -> anyhow::Result<()> {
        let mut ebpf = self.ebpf.lock().unwrap();
        let program: &mut SkLookup = ebpf
            .program_mut(programs::SK_LOOKUP)
            .expect("sk_lookup program loaded at start")
            .try_into()?;
        let id = program
            .attach(netns.file())
            .context("attaching sk_lookup to the pod's network namespace")?;
        let link: FdLink = program.take_link(id)?.into();
        pin_replacing(link, &self.pod_pin(netns.cookie()))
    }

    /// Stops steering a pod's inbound TCP: its sk_lookup link is detached before this returns,
    /// so the next connection to the pod reaches the pod's own listeners.
    pub fn detach_inbound(&self, netns_cookie: u64) {
        let pin = self.pod_pin(netns_cookie);
        if let Err(err) = link::detach_and_unpin(&pin) {
            warn!(pin = %pin.display(), %err, "could not detach sk_lookup link");
        }
    }

    /// Registers the listeners that receive a pod IP's steered inbound connections: the
    /// plaintext one (every port but 15008) and the HBONE one (15008).
    pub fn set_listeners(
        &self,
        ip: IpAddr,
        plaintext: &impl AsRawFd,
        hbone: &impl AsRawFd,
    ) -> anyhow::Result<()> {
        self.listeners
            .lock()
            .unwrap()
            .insert(ip_key(ip), plaintext.as_raw_fd(), 0)
            .with_context(|| format!("registering the inbound plaintext listener of {ip}"))?;
        self.hbone_listeners
            .lock()
            .unwrap()
            .insert(ip_key(ip), hbone.as_raw_fd(), 0)
            .with_context(|| format!("registering the inbound HBONE listener of {ip}"))
    }

    /// Forgets a pod IP's listeners (closing a listener removes it from its map as well).
    pub fn clear_listeners(&self, ip: IpAddr) {
        let _ = self.listeners.lock().unwrap().remove(&ip_key(ip));
        let _ = self.hbone_listeners.lock().unwrap().remove(&ip_key(ip));
    }

    /// Redirects outbound TCP from this namespace from now on, binding each redirected socket
    /// to the pod's first address of its family in `ips` (so it keeps the local address it
    /// would have without the mesh).
    pub fn enroll(&self, netns_cookie: u64, ips: &[IpAddr]) -> anyhow::Result<()> {
        let mut addrs = PodAddrs::default();
        if let Some(v4) = ips.iter().find_map(|ip| match ip.to_canonical() {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        }) {
            addrs.v4 = v4.octets();
            addrs.flags |= pod_addrs::V4;
        }
        if let Some(v6) = ips.iter().find_map(|ip| match ip.to_canonical() {
            IpAddr::V6(v6) => Some(v6),
            IpAddr::V4(_) => None,
        }) {
            addrs.v6 = v6.octets();
            addrs.flags |= pod_addrs::V6;
        }
        self.pod_addrs
            .lock()
            .unwrap()
            .insert(netns_cookie, addrs, 0)
            .context("adding the pod's addresses to POD_ADDRS")?;
        self.set_pod_state(netns_cookie, pod_state::MESHED)
    }

    /// Closes a pod that should be meshed but cannot be: its outbound connects (but to
    /// loopback) are refused from now on, and its inbound, with no listener registered, is
    /// dropped once sk_lookup is linked to its namespace.
    pub fn close(&self, netns_cookie: u64) -> anyhow::Result<()> {
        // A closed pod has no exclusions: nothing of it may pass.
        self.pod_exclusions.lock().unwrap().clear(netns_cookie);
        self.set_pod_state(netns_cookie, pod_state::CLOSED)
    }

    /// Replaces the capture exclusions of the pod of `netns_cookie` (addresses `ips`): its
    /// outbound connects to excluded ports and networks go direct, and inbound connections to
    /// its excluded ports reach its application. If an entry cannot be added (a map is full),
    /// the pod is left with none (all its traffic captured) and the error returned.
    pub fn set_pod_exclusions(
        &self,
        netns_cookie: u64,
        ips: &[IpAddr],
        exclusions: &CaptureExclusions,
    ) -> anyhow::Result<()> {
        let mut maps = self.pod_exclusions.lock().unwrap();
        // Cleared first: an entry of the old set that is not in the new one must not outlive
        // the change, and for a moment the pod is captured whole rather than half-excluded.
        maps.clear(netns_cookie);
        if exclusions.is_empty() {
            return Ok(());
        }
        let result = maps.insert(netns_cookie, ips, exclusions);
        if result.is_err() {
            maps.clear(netns_cookie);
        }
        result
    }

    fn set_pod_state(&self, netns_cookie: u64, state: u32) -> anyhow::Result<()> {
        self.enrolled
            .lock()
            .unwrap()
            .insert(netns_cookie, state, 0)
            .context("adding the pod's namespace to ENROLLED_NETNS")
    }

    /// Stops redirecting outbound TCP from this namespace (open connections are unaffected).
    pub fn unenroll(&self, netns_cookie: u64) {
        let _ = self.enrolled.lock().unwrap().remove(&netns_cookie);
        let _ = self.pending.lock().unwrap().remove(&netns_cookie);
        let _ = self.pod_addrs.lock().unwrap().remove(&netns_cookie);
        self.pod_exclusions.lock().unwrap().clear(netns_cookie);
    }

    /// The namespaces of closed pods (enrolment failed), by cookie.
    pub fn closed_cookies(&self) -> Vec<u64> {
        let enrolled = self.enrolled.lock().unwrap();
        enrolled
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, state)| *state == pod_state::CLOSED)
            .map(|(cookie, _)| cookie)
            .collect()
    }

    /// Replaces the set of node addresses whose connections reach pods directly (kubelet's
    /// probes). At most [`limits::MAX_NODE_ADDRS`]; the rest are reported and left out.
    pub fn set_node_addresses(&self, addresses: &BTreeSet<IpAddr>) {
        let mut map = self.node_addrs.lock().unwrap();
        let current: Vec<IpKey> = map.keys().filter_map(Result::ok).collect();
        for key in current
            .iter()
            .filter(|k| !addresses.contains(&from_ip_key(k)))
        {
            let _ = map.remove(key);
        }
        for ip in addresses {
            if let Err(err) = map.insert(ip_key(*ip), 1, 0) {
                warn!(%ip, %err, max = limits::MAX_NODE_ADDRS, "node address not exempt: NODE_ADDRS is full");
            }
        }
    }

    /// Lets the agent's connection from `from` (a client's address, a transparent socket
    /// inside the pod) to `app` (the pod's application) through sk_lookup, until the returned
    /// guard drops: made just before the connect, dropped once it completed.
    pub fn agent_hop(
        &self,
        app: std::net::SocketAddr,
        from: std::net::SocketAddr,
    ) -> anyhow::Result<AgentHop<'_>> {
        let key = HopKey {
            local: ip_key(app.ip()),
            remote: ip_key(from.ip()),
            local_port: app.port(),
            remote_port: from.port(),
            _pad: [0; 4],
        };
        self.agent_hops
            .lock()
            .unwrap()
            .insert(key, 1, 0)
            .context("registering the agent's hop in AGENT_HOPS (full?)")?;
        Ok(AgentHop {
            redirector: self,
            key,
        })
    }

    /// Drops every `AGENT_HOPS` entry: for an agent that starts with no predecessor running.
    /// The map is pinned, so the hops a crashed agent had in flight outlive it; each would let
    /// one exact 4-tuple past inbound steering to an application. Returns how many there were.
    pub fn forget_agent_hops(&self) -> usize {
        let mut hops = self.agent_hops.lock().unwrap();
        let stale: Vec<HopKey> = hops.keys().filter_map(Result::ok).collect();
        stale.iter().filter(|key| hops.remove(key).is_ok()).count()
    }

    /// Namespaces currently enrolled in the kernel maps (including ones an earlier agent left,
    /// and addresses left without an enrolment by an agent stopped in between).
    pub fn enrolled_cookies(&self) -> Vec<u64> {
        let mut cookies: BTreeSet<u64> = {
            let enrolled = self.enrolled.lock().unwrap();
            enrolled.keys().filter_map(Result::ok).collect()
        };
        cookies.extend(self.pod_addrs.lock().unwrap().keys().filter_map(Result::ok));
        cookies.extend(self.pod_exclusions.lock().unwrap().cookies());
        cookies.into_iter().collect()
    }

    /// Namespaces with a pinned sk_lookup link (including ones an earlier agent left).
    pub fn inbound_cookies(&self) -> Vec<u64> {
        let Ok(dir) = fs::read_dir(self.config.bpffs.join("pods")) else {
            return Vec::new();
        };
        dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    }

    /// The original destination of a redirected connection, from the storage of the socket
    /// the agent accepted on a pod's outbound listener (sock_ops put it there when the
    /// handshake completed). `None` if the client dialled the listener itself, or its pod was
    /// over its share of handshakes in flight.
    pub fn original_destination(&self, accepted: &impl AsRawFd) -> Option<std::net::SocketAddr> {
        let state = self.sock_state.get(&accepted.as_raw_fd(), 0).ok()?;
        (state.flags & sock_flags::ACCEPTED != 0)
            .then(|| std::net::SocketAddr::new(from_ip_key(&state.orig.ip), state.orig.port))
    }

    /// Applies the configured exclusions (replacing the previous set).
    pub fn set_exclusions(&self, settings: &RedirectSettings) -> anyhow::Result<()> {
        let mut ports = self.excluded_ports.lock().unwrap();
        let wanted: BTreeSet<u16> = settings.exclude_outbound_ports.iter().copied().collect();
        let current: Vec<u16> = ports.keys().filter_map(Result::ok).collect();
        for port in current.iter().filter(|p| !wanted.contains(p)) {
            let _ = ports.remove(port);
        }
        for port in &wanted {
            ports
                .insert(port, 1, 0)
                .with_context(|| format!("excluding port {port}"))?;
        }
        let mut nets = self.excluded_nets.lock().unwrap();
        let wanted: Vec<Key<[u8; 16]>> = settings
            .exclude_outbound_cidrs
            .iter()
            .map(net_key)
            .collect();
        let current: Vec<Key<[u8; 16]>> = nets.keys().filter_map(Result::ok).collect();
        for key in &current {
            if !wanted
                .iter()
                .any(|w| w.prefix_len() == key.prefix_len() && w.data() == key.data())
            {
                let _ = nets.remove(key);
            }
        }
        for (key, net) in wanted.iter().zip(&settings.exclude_outbound_cidrs) {
            nets.insert(key, 1, 0)
                .with_context(|| format!("excluding network {net}"))?;
        }
        Ok(())
    }

    /// Handshakes in flight per pod namespace (entries of `ORIG_DST_TUPLE` each holds).
    pub fn pending_connects(&self) -> Vec<(u64, u64)> {
        let pending = self.pending.lock().unwrap();
        pending.iter().filter_map(Result::ok).collect()
    }

    /// Entries in each pinned map that can be listed, for the admin endpoint and metrics
    /// (`SOCK_STATE` lives in the sockets and cannot be).
    pub fn map_occupancy(&self) -> Vec<(&'static str, usize)> {
        let exclusions = self.pod_exclusions.lock().unwrap();
        vec![
            (
                maps::ENROLLED_NETNS,
                self.enrolled.lock().unwrap().keys().count(),
            ),
            (maps::ORIG_DST_TUPLE, self.orig_dst.keys().count()),
            (
                maps::PENDING_CONNECTS,
                self.pending.lock().unwrap().keys().count(),
            ),
            (
                maps::POD_LISTENERS,
                self.listeners.lock().unwrap().keys().count(),
            ),
            (
                maps::HBONE_LISTENERS,
                self.hbone_listeners.lock().unwrap().keys().count(),
            ),
            (
                maps::NODE_ADDRS,
                self.node_addrs.lock().unwrap().keys().count(),
            ),
            (
                maps::EXCLUDED_PORTS,
                self.excluded_ports.lock().unwrap().keys().count(),
            ),
            (
                maps::EXCLUDED_NETS,
                self.excluded_nets.lock().unwrap().keys().count(),
            ),
            (
                maps::POD_ADDRS,
                self.pod_addrs.lock().unwrap().keys().count(),
            ),
            (
                maps::AGENT_HOPS,
                self.agent_hops.lock().unwrap().keys().count(),
            ),
            (maps::POD_EXCLUDED_PORTS, exclusions.ports.keys().count()),
            (maps::POD_EXCLUDED_NETS, exclusions.nets.keys().count()),
            (
                maps::POD_EXCLUDED_INBOUND,
                exclusions.inbound.keys().count(),
            ),
        ]
    }

    /// The eBPF programs' event counters.
    pub fn stats(&self) -> RedirectStats {
        let read = |index: u32| -> u64 {
            self.stats
                .get(&index, 0)
                .map(|values| values.iter().sum())
                .unwrap_or(0)
        };
        RedirectStats {
            redirected_v4: read(stats::REDIRECTED4),
            redirected_v6: read(stats::REDIRECTED6),
            excluded: read(stats::EXCLUDED),
            map_full: read(stats::MAP_FULL),
            inbound_steered: read(stats::INBOUND_STEERED),
            inbound_no_listener: read(stats::INBOUND_NO_LISTENER),
            pod_quota: read(stats::POD_QUOTA),
            closed_refused: read(stats::CLOSED_REFUSED),
            inbound_from_node: read(stats::INBOUND_FROM_NODE),
            spliced_bytes: read(stats::SPLICED_BYTES),
            splice_no_target: read(stats::SPLICE_NO_TARGET),
            splice_unpaired: read(stats::SPLICE_UNPAIRED),
            source_not_bound: read(stats::SOURCE_NOT_BOUND),
            inbound_excluded: read(stats::INBOUND_EXCLUDED),
        }
    }
}

/// An agent's hop to an application that sk_lookup lets through ([`Redirector::agent_hop`]);
/// removed on drop.
pub struct AgentHop<'a> {
    redirector: &'a Redirector,
    key: HopKey,
}

impl Drop for AgentHop<'_> {
    fn drop(&mut self) {
        let _ = self.redirector.agent_hops.lock().unwrap().remove(&self.key);
    }
}

/// Loads the splice program and checks, on a loopback pair, that this kernel splices.
fn load_splice(ebpf: &mut Ebpf, max: usize) -> anyhow::Result<std::sync::Arc<splice::Splicer>> {
    let splicer = std::sync::Arc::new(splice::Splicer::load(ebpf, max)?);
    splicer.self_test().context("self-test")?;
    Ok(splicer)
}

/// Whether this node can splice same-node connections, for `ambit check --pre`: the eBPF
/// object loaded with its maps pinned in a scratch directory beside `bpffs` (so an agent's pins
/// are never touched), the splice program loaded and self-tested as the agent
/// does, everything removed after. A kernel that cannot splice is no failure: only
/// `--max-spliced-connections` asks for splices, and the agent relays where it cannot.
pub fn splice_finding(bpffs: &Path) -> Finding {
    const CHECK: &str = "same-node splice";
    let fallback = "none needed: the agent relays same-node connections itself, by default and \
                    wherever the kernel cannot splice (Linux 6.4 or later splices)";
    // Next to the agent's directory, never in it.
    let Some(base) = bpffs.ancestors().skip(1).find(|p| p.exists()) else {
        return Finding::warn_with(
            CHECK,
            format!("no directory of {}", bpffs.display()),
            fallback,
        );
    };
    let scratch = base.join(format!("ambit-check-{}", std::process::id()));
    let result = (|| -> anyhow::Result<()> {
        fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
        let mut ebpf = object::load(EBPF_OBJECT, &scratch).context("loading the eBPF object")?;
        load_splice(&mut ebpf, 16).map(drop)
    })();
    if let Ok(entries) = fs::read_dir(&scratch) {
        for entry in entries.flatten() {
            let _ = fs::remove_file(entry.path());
        }
    }
    let _ = fs::remove_dir(&scratch);
    match result {
        Ok(()) => Finding::ok_with(
            CHECK,
            "the kernel splices: bytes queued before the splice and after it reached the peer, \
             none reached user space",
        ),
        Err(err) => Finding::ok_with(
            CHECK,
            format!(
                "the kernel cannot splice ({err:#}); nothing needs it: the agent relays \
                 same-node connections, by default and with --max-spliced-connections alike"
            ),
        ),
    }
}

/// A cgroup v2 directory and its id (what `bpf_get_current_cgroup_id` returns for its tasks).
#[derive(Clone, Debug)]
pub struct Cgroup {
    /// The directory.
    pub path: PathBuf,
    /// Its id: the directory's inode number on cgroup2.
    pub id: u64,
}

/// The cgroup this process runs in, found below `attach` (the cgroup the programs attach to,
/// which must contain the agent: sock_ops must see the agent's accepted sockets).
///
/// `/proc/self/cgroup` names it relative to the agent's cgroup namespace, which in a
/// container is not the host's; so the directory is confirmed by its `cgroup.procs` listing
/// this process, and looked for in the tree below `attach` when the direct path does not.
pub fn own_cgroup(attach: &Path) -> anyhow::Result<Cgroup> {
    use std::os::unix::fs::MetadataExt as _;
    let pid = std::process::id().to_string();
    let lists_us = |dir: &Path| {
        fs::read_to_string(dir.join("cgroup.procs"))
            .map(|procs| procs.lines().any(|line| line == pid))
            .unwrap_or(false)
    };
    let direct = fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                l.strip_prefix("0::")
                    .map(|p| p.trim_start_matches('/').to_owned())
            })
        })
        .and_then(|relative| {
            let mount = cgroup2_mount().ok()?;
            let dir = mount.join(relative);
            (dir.starts_with(attach) && lists_us(&dir)).then_some(dir)
        });
    let path = match direct {
        Some(dir) => dir,
        None => find_cgroup_listing(attach, &lists_us, 0)?.with_context(|| {
            format!(
                "the agent's own cgroup is not below --cgroup {} (no cgroup.procs there lists pid {pid}): the programs must see the agent's sockets; attach higher, or run the agent below it",
                attach.display()
            )
        })?,
    };
    let id = fs::metadata(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .ino();
    Ok(Cgroup { path, id })
}

fn find_cgroup_listing(
    dir: &Path,
    lists_us: &impl Fn(&Path) -> bool,
    depth: usize,
) -> anyhow::Result<Option<PathBuf>> {
    if lists_us(dir) {
        return Ok(Some(dir.to_path_buf()));
    }
    // kubelet's deepest layout is <root>/kubepods.slice/<qos>/<pod>/<container>.
    if depth >= 8 {
        return Ok(None);
    }
    let entries = fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir())
            && let Some(found) = find_cgroup_listing(&entry.path(), lists_us, depth + 1)?
        {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// Adds `id` to the exempt cgroups. The set is small and only ever names agents of this node;
/// ids of cgroups that are gone never come back (the kernel does not reuse them), so when it is
/// full the stale ones are dropped, keeping this agent's.
fn exempt_cgroup(exempt: &mut HashMap<MapData, u64, u8>, id: u64) -> anyhow::Result<()> {
    if exempt.insert(id, 1, 0).is_ok() {
        return Ok(());
    }
    let stale: Vec<u64> = exempt.keys().filter_map(Result::ok).collect();
    for old in stale {
        let _ = exempt.remove(&old);
    }
    exempt
        .insert(id, 1, 0)
        .context("adding the agent's cgroup to EXEMPT_CGROUPS")
}

/// The addresses of the network namespace this process runs in (the node's), but loopback.
pub fn node_addresses() -> anyhow::Result<BTreeSet<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().context("listing the node's addresses")?;
    Ok(addrs
        .filter_map(|ifa| {
            let addr = ifa.address?;
            let ip = match (addr.as_sockaddr_in(), addr.as_sockaddr_in6()) {
                (Some(v4), _) => IpAddr::V4(v4.ip()),
                (_, Some(v6)) => IpAddr::V6(v6.ip()),
                _ => return None,
            };
            (!ip.is_loopback()).then_some(ip)
        })
        .collect())
}

/// How often the node's addresses are re-read (an address added to the node later, such as a
/// new CNI gateway, reaches `NODE_ADDRS` within this).
const NODE_ADDRESS_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps `NODE_ADDRS` equal to the node's own addresses, so kubelet's probes reach the pods'
/// applications directly. Runs until the task is dropped.
pub async fn keep_node_addresses(redirector: std::sync::Arc<Redirector>) {
    let mut known = BTreeSet::new();
    loop {
        match node_addresses() {
            Ok(addresses) if addresses != known => {
                info!(
                    ?addresses,
                    "node addresses: their connections reach pods directly"
                );
                redirector.set_node_addresses(&addresses);
                known = addresses;
            }
            Ok(_) => {}
            Err(err) => warn!(
                err = format!("{err:#}"),
                "could not list the node's addresses"
            ),
        }
        tokio::time::sleep(NODE_ADDRESS_REFRESH).await;
    }
}

/// The map key of an address: IPv4 in its IPv4-mapped form.
pub fn ip_key(ip: IpAddr) -> IpKey {
    match ip {
        IpAddr::V4(v4) => IpKey::v4(v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpKey::v4(v4.octets()),
            None => IpKey { addr: v6.octets() },
        },
    }
}

/// The address of a map key: IPv4-mapped keys become IPv4.
pub fn from_ip_key(key: &IpKey) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(key.addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

fn net_key(net: &IpNet) -> Key<[u8; 16]> {
    match net {
        IpNet::V4(v4) => Key::new(
            96 + u32::from(v4.prefix_len()),
            ip_key(IpAddr::V4(v4.network())).addr,
        ),
        IpNet::V6(v6) => Key::new(u32::from(v6.prefix_len()), v6.network().octets()),
    }
}

/// Forwards the programs' aya-log records into the agent's tracing output.
fn spawn_ebpf_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    tokio::spawn(async move {
        // SAFETY: the logger owns its ring buffer's fd, which stays open and unreplaced for as
        // long as the AsyncFd (which owns the logger) lives.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        };
        let mut fd = match registered {
            Ok(fd) => fd,
            Err(err) => {
                warn!(err = %err, "eBPF log forwarding unavailable");
                return;
            }
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// Removes everything an agent pinned under `bpffs`: links (so programs detach from the cgroup
/// and from every pod namespace) and maps. Live connections already proxied are unaffected;
/// new connections from formerly enrolled pods go direct, unmeshed.
pub fn uninstall(bpffs: &Path) -> anyhow::Result<()> {
    if !bpffs.exists() {
        info!(bpffs = %bpffs.display(), "nothing to uninstall");
        return Ok(());
    }
    for sub in ["links", "pods", "maps"] {
        let dir = bpffs.join(sub);
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if sub == "maps" {
                fs::remove_file(&path)
            } else {
                link::detach_and_unpin(&path)
            }
            .with_context(|| format!("removing pin {}", path.display()))?;
            debug!(pin = %path.display(), "unpinned");
        }
        fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::remove_dir(bpffs).with_context(|| format!("removing {}", bpffs.display()))?;
    info!(bpffs = %bpffs.display(), "uninstalled: links detached, maps unpinned");
    Ok(())
}
