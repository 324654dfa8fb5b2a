//! The cluster in a box: [`Cluster`], its [`Node`]s and [`Pod`]s.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::mesh::{self, MeshFile};
use crate::process::{PodProcess, place_in};
use crate::testbed;
use crate::util::{self, HttpResponse, Netns};

/// Admin port of the agent (inside the node namespace, on 127.0.0.1).
pub const ADMIN_PORT: u16 = 15000;
/// Readiness port of the agent.
pub const READINESS_PORT: u16 = 15021;
/// The agent's Prometheus metrics port (`/metrics`).
pub const METRICS_PORT: u16 = 15020;
/// The HBONE port every meshed pod accepts tunnels on (its agent's listener in the pod).
pub const HBONE_PORT: u16 = 15008;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Shape of a cluster: `nodes` nodes with `pods_per_node` pods each (at most 99 of each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterSpec {
    /// Number of nodes.
    pub nodes: usize,
    /// Number of pods on every node.
    pub pods_per_node: usize,
}

impl Default for ClusterSpec {
    /// Two nodes with two pods each.
    fn default() -> Self {
        Self {
            nodes: 2,
            pods_per_node: 2,
        }
    }
}

/// A running agent process.
#[derive(Debug)]
struct AgentProc {
    child: Child,
    status: Option<ExitStatus>,
}

impl AgentProc {
    fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Signals the agent by PID, only while it is not reaped (so the PID is still ours).
    fn signal(&mut self, sig: libc::c_int) {
        if self.try_status().is_none() {
            util::signal(self.child.id() as i32, sig);
        }
    }

    fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self) -> Option<ExitStatus> {
        self.signal(libc::SIGKILL);
        if self.status.is_none() {
            self.status = self.child.wait().ok();
        }
        self.status
    }
}

/// One node: a network namespace on the fabric bridge, a cgroup subtree, and (once started) an
/// `ambit agent` process.
///
/// Addresses: fabric `10.99.0.<i+1>/24` and `fd00:99::<i+1>/64`; gateway of its pods
/// `10.10.<i>.1` / `fd00:10:<i>::1` (on every pod veth); it routes other nodes' pod subnets
/// `10.10.<k>.0/24` / `fd00:10:<k>::/64` via their fabric addresses.
#[derive(Debug)]
pub struct Node {
    index: usize,
    name: String,
    netns_name: String,
    netns_path: PathBuf,
    fabric_if: String,
    cgroup: PathBuf,
    agent_cgroup: PathBuf,
    host_cgroup: PathBuf,
    run_dir: PathBuf,
    seq: AtomicUsize,
    bpffs: PathBuf,
    log_path: PathBuf,
    mesh_path: PathBuf,
    ambit: PathBuf,
    agent: Mutex<Option<AgentProc>>,
    /// The agent a [successor](Node::start_successor_agent) replaces, until it is stopped.
    predecessor: Mutex<Option<AgentProc>>,
    agent_env: Mutex<BTreeMap<String, String>>,
    agent_args: Mutex<Vec<String>>,
    ca_args: Mutex<Vec<String>>,
    kubeconfig: Mutex<Option<PathBuf>>,
    /// Set by [`Node::stall_agent_log`]: the next agent writes its log into a pipe.
    stall_log: AtomicBool,
    /// The unread end of that pipe, until [`Node::drain_agent_log`].
    stalled_log: Mutex<Option<std::io::PipeReader>>,
}

impl Node {
    /// Index `i` of the node.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Node name `n<i>` (the `--node` flag and the workloads' `node`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Network namespace name `ab-<id>-n<i>`.
    pub fn netns_name(&self) -> &str {
        &self.netns_name
    }

    /// Network namespace file `/run/netns/ab-<id>-n<i>`.
    pub fn netns_path(&self) -> &Path {
        &self.netns_path
    }

    /// Name of the node's interface on the fabric (`a<id>n<i>`).
    pub fn fabric_interface(&self) -> &str {
        &self.fabric_if
    }

    /// Fabric IPv4 address `10.99.0.<i+1>`.
    pub fn fabric_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 99, 0, self.index as u8 + 1)
    }

    /// Fabric IPv6 address `fd00:99::<i+1>`.
    pub fn fabric_ip6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, self.index as u16 + 1)
    }

    /// Pod gateway IPv4 address `10.10.<i>.1` (node side of every pod veth).
    pub fn gateway_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 10, self.index as u8, 1)
    }

    /// Pod gateway IPv6 address `fd00:10:<i>::1`.
    pub fn gateway_ip6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x10, self.index as u16, 0, 0, 0, 0, 1)
    }

    /// The node's cgroup `<cgroup2 mount>/ambit-<id>/n<i>` (the agent's `--cgroup`).
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The agent's cgroup `<...>/n<i>/agent`.
    pub fn agent_cgroup(&self) -> &Path {
        &self.agent_cgroup
    }

    /// The Unix socket the node's agent serves the CNI plugin on: `<run dir>/n<i>-cni/cni.sock`.
    pub fn cni_socket(&self) -> PathBuf {
        self.run_dir
            .join(format!("{}-cni", self.name))
            .join("cni.sock")
    }

    /// Spawns `program args...` as a host process of the node, as kubelet runs: in the node's
    /// network namespace, in the cgroup `<...>/n<i>/host` (no pod's). Same contract as
    /// [`Pod::spawn`].
    pub fn spawn<P, I, S>(&self, program: P, args: I) -> Result<PodProcess>
    where
        P: AsRef<OsStr>,
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let program = program.as_ref();
        let base = Path::new(program)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "proc".into());
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let stderr_path = self
            .run_dir
            .join(format!("{}-host-{}-{}.stderr", self.name, base, n));
        PodProcess::spawn(
            format!("{}:{}#{}", self.name, base, n),
            &self.host_cgroup,
            &self.netns_path,
            stderr_path,
            program,
            args,
            &[],
        )
    }

    /// The agent's pin directory `/sys/fs/bpf/ambit-<id>-n<i>` (the agent's `--bpffs`).
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// The agent's log file `<run dir>/agent-n<i>.log` (stdout and stderr, appended across
    /// restarts).
    pub fn agent_log_path(&self) -> &Path {
        &self.log_path
    }

    /// Sets an environment variable for the next agent start (e.g. `RUST_LOG`, default
    /// `info`, or `$AMBIT_TEST_RUST_LOG` if set).
    pub fn set_agent_env(&self, key: &str, value: &str) {
        lock(&self.agent_env).insert(key.into(), value.into());
    }

    /// Extra command-line arguments appended to the agent's flags on the next start.
    pub fn set_agent_args<I, S>(&self, args: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        *lock(&self.agent_args) = args.into_iter().map(Into::into).collect();
    }

    /// From the next start on, the agent takes its configuration from the Kubernetes API
    /// server of `kubeconfig` (`--kube --kubeconfig`) instead of the bed's mesh file; the
    /// node's cgroup (`--cgroup`) is where it finds kubelet's pod cgroups.
    pub fn use_kubernetes(&self, kubeconfig: impl Into<PathBuf>) {
        *lock(&self.kubeconfig) = Some(kubeconfig.into());
    }

    /// The CA flags (`--ca-address`, `--ca-roots`, `--ca-token-file`) of this node's agent, for
    /// another process of the node that gets certificates the same way (a waypoint); empty
    /// until the CA is initialised ([`Cluster::start_ca`]).
    pub fn ca_flags(&self) -> Vec<String> {
        lock(&self.ca_args).clone()
    }

    /// The full agent command line (program first) the next start would use.
    pub fn agent_command_line(&self) -> Vec<String> {
        let source = match &*lock(&self.kubeconfig) {
            Some(kubeconfig) => [
                "--kube".to_string(),
                "--kubeconfig".into(),
                kubeconfig.display().to_string(),
            ]
            .to_vec(),
            None => [
                "--mesh-file".to_string(),
                self.mesh_path.display().to_string(),
            ]
            .to_vec(),
        };
        let mut v = vec![
            self.ambit.display().to_string(),
            "agent".into(),
            "--node".into(),
            self.name.clone(),
        ];
        v.extend(source);
        v.extend([
            "--cgroup".into(),
            self.cgroup.display().to_string(),
            "--bpffs".into(),
            self.bpffs.display().to_string(),
            "--cni-socket".into(),
            self.cni_socket().display().to_string(),
            "--log-format".into(),
            "json".into(),
        ]);
        v.extend(lock(&self.ca_args).iter().cloned());
        v.extend(lock(&self.agent_args).iter().cloned());
        v
    }

    /// Starts `ambit agent` for this node: in the node's `agent` cgroup and network namespace,
    /// stdout and stderr appended to [`agent_log_path`](Self::agent_log_path). Errors if an
    /// agent of this node is still running. Does not wait for readiness.
    pub fn start_agent(&self) -> Result<()> {
        let mut slot = lock(&self.agent);
        if let Some(a) = slot.as_mut()
            && a.try_status().is_none()
        {
            bail!(
                "agent of {} already running (pid {})",
                self.name,
                a.child.id()
            );
        }
        *slot = Some(self.spawn_agent()?);
        Ok(())
    }

    /// From the next start, the agent's stdout and stderr are a pipe nobody reads, as a stalled
    /// container log pipe: once the kernel's pipe buffer (64 KiB) is full, every write to them
    /// blocks. [`Node::drain_agent_log`] copies it into the log file again.
    pub fn stall_agent_log(&self) {
        self.stall_log.store(true, Ordering::Relaxed);
    }

    /// Starts copying the stalled log pipe into [`agent_log_path`](Self::agent_log_path) (a
    /// thread that ends with the agent), so the log can be read and dumped again. Does nothing
    /// when the log is not stalled.
    pub fn drain_agent_log(&self) -> Result<()> {
        let Some(mut reader) = lock(&self.stalled_log).take() else {
            return Ok(());
        };
        let mut log = self.open_agent_log()?;
        std::thread::spawn(move || std::io::copy(&mut reader, &mut log));
        Ok(())
    }

    /// Starts a second agent beside the running one, as a DaemonSet rolling with a surge does:
    /// same command line, cgroup, pins and sockets. The running one becomes the predecessor
    /// ([`stop_predecessor`](Self::stop_predecessor)); the new one is the node's agent from
    /// now on (its log goes to the same file). Does not wait for readiness.
    pub fn start_successor_agent(&self) -> Result<()> {
        let mut predecessor = lock(&self.predecessor);
        if let Some(p) = predecessor.as_mut()
            && p.try_status().is_none()
        {
            bail!(
                "the predecessor agent of {} still runs (pid {})",
                self.name,
                p.child.id()
            );
        }
        let mut slot = lock(&self.agent);
        let running = slot.as_mut().is_some_and(|a| a.try_status().is_none());
        ensure!(running, "no agent of {} runs to be replaced", self.name);
        let successor = self.spawn_agent()?;
        *predecessor = slot.replace(successor);
        Ok(())
    }

    /// PID of the predecessor agent while it runs.
    pub fn predecessor_pid(&self) -> Option<u32> {
        let mut slot = lock(&self.predecessor);
        let a = slot.as_mut()?;
        a.try_status().is_none().then(|| a.child.id())
    }

    /// Stops the predecessor as the DaemonSet does once its successor is ready: SIGTERM, then
    /// waits up to `timeout` for it to exit (SIGKILL after). Returns its exit status, and
    /// whether it exited by itself within `timeout`.
    pub fn stop_predecessor(&self, timeout: Duration) -> Result<(ExitStatus, bool)> {
        let mut slot = lock(&self.predecessor);
        let a = slot
            .as_mut()
            .with_context(|| format!("no predecessor agent on {}", self.name))?;
        a.signal(libc::SIGTERM);
        if let Some(s) = a.wait_until(Instant::now() + timeout) {
            return Ok((s, true));
        }
        let s = a.kill().context("reaping the predecessor agent")?;
        Ok((s, false))
    }

    /// The agent's log file, opened for appending.
    fn open_agent_log(&self) -> Result<fs::File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("open {}", self.log_path.display()))
    }

    fn spawn_agent(&self) -> Result<AgentProc> {
        ensure!(
            self.ambit.exists(),
            "ambit binary {} not found (build it or set AMBIT_BIN)",
            self.ambit.display()
        );
        let line = self.agent_command_line();
        let mut cmd = Command::new(&line[0]);
        cmd.args(&line[1..])
            .env(
                "RUST_LOG",
                std::env::var("AMBIT_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(lock(&self.agent_env).iter())
            .stdin(Stdio::null());
        if self.stall_log.load(Ordering::Relaxed) {
            let (reader, writer) = std::io::pipe().context("a pipe for the agent's log")?;
            cmd.stdout(writer.try_clone()?).stderr(writer);
            *lock(&self.stalled_log) = Some(reader);
        } else {
            let log = self.open_agent_log()?;
            cmd.stdout(log.try_clone()?).stderr(log);
        }
        place_in(&mut cmd, &self.agent_cgroup, &self.netns_path)?;
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn agent of {}", self.name))?;
        Ok(AgentProc {
            child,
            status: None,
        })
    }

    /// Stops the agent: SIGTERM, wait up to 5 s, then SIGKILL; reaps it. Returns its exit
    /// status (also if it had already exited), or None if no agent was started. Pins in bpffs
    /// stay (fail closed). [`start_agent`](Self::start_agent) may be called again.
    pub fn stop_agent(&self) -> Result<Option<ExitStatus>> {
        let mut slot = lock(&self.agent);
        let Some(a) = slot.as_mut() else {
            return Ok(None);
        };
        a.signal(libc::SIGTERM);
        if let Some(s) = a.wait_until(Instant::now() + Duration::from_secs(5)) {
            return Ok(Some(s));
        }
        eprintln!(
            "[testbed] agent of {} ignored SIGTERM for 5 s; killing",
            self.name
        );
        Ok(a.kill())
    }

    /// Kills the agent with SIGKILL (a crash) and reaps it. Returns its exit status, or None if
    /// no agent was started.
    pub fn kill_agent(&self) -> Option<ExitStatus> {
        lock(&self.agent).as_mut().and_then(AgentProc::kill)
    }

    /// PID of the agent if one was started and has not been reaped.
    pub fn agent_pid(&self) -> Option<u32> {
        let mut slot = lock(&self.agent);
        let a = slot.as_mut()?;
        a.try_status().is_none().then(|| a.child.id())
    }

    /// Whether an agent is running.
    pub fn agent_running(&self) -> bool {
        self.agent_pid().is_some()
    }

    /// The agent's exit status if it was started and has exited (None while running or if
    /// never started).
    pub fn agent_exit_status(&self) -> Option<ExitStatus> {
        lock(&self.agent).as_mut().and_then(|a| a.try_status())
    }

    fn agent_state(&self) -> String {
        match lock(&self.agent).as_mut() {
            None => "not started".into(),
            Some(a) => match a.try_status() {
                None => format!("running (pid {})", a.child.id()),
                Some(s) => format!("exited: {s}"),
            },
        }
    }

    /// HTTP GET `http://127.0.0.1:<port><path>` from inside the node's network namespace.
    pub fn http_get(&self, port: u16, path: &str, timeout: Duration) -> Result<HttpResponse> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        Netns::enter_thread(&self.netns_path, || util::http_get(addr, path, timeout))?
    }

    /// HTTP GET `http://<addr><path>` (any address) from inside the node's network namespace.
    pub fn http_get_addr(
        &self,
        addr: SocketAddr,
        path: &str,
        timeout: Duration,
    ) -> Result<HttpResponse> {
        Netns::enter_thread(&self.netns_path, || util::http_get(addr, path, timeout))?
    }

    /// Polls `GET http://127.0.0.1:15021/healthz/ready` in the node namespace until it answers
    /// 200. Fails early, with the agent's log tail, if the agent exits (or was never started),
    /// and on timeout.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut slot = lock(&self.agent);
                match slot.as_mut() {
                    None => bail!("agent of {} was not started", self.name),
                    Some(a) => {
                        if let Some(s) = a.try_status() {
                            bail!(
                                "agent of {} exited ({s}) before becoming ready; log tail:\n{}",
                                self.name,
                                self.agent_log_tail(40)
                            );
                        }
                    }
                }
            }
            let last = match self.http_get(READINESS_PORT, "/healthz/ready", Duration::from_secs(1))
            {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) => format!("HTTP {}: {}", r.status, r.body.trim()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "agent of {} not ready within {timeout:?} (last: {last}); log tail:\n{}",
                    self.name,
                    self.agent_log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// GET `http://127.0.0.1:15000<path>` (admin) in the node namespace; the body of a 200,
    /// an error otherwise.
    pub fn admin_get(&self, path: &str) -> Result<String> {
        let r = self.http_get(ADMIN_PORT, path, Duration::from_secs(5))?;
        ensure!(
            r.status == 200,
            "admin GET {path} on {}: HTTP {}: {}",
            self.name,
            r.status,
            r.body.trim()
        );
        Ok(r.body)
    }

    /// `admin_get("/config_dump")` parsed as JSON: `{"config": {"generation": N, "lastError":
    /// null|"..."}, "maps": {...}, "enrolled": [...]}`.
    pub fn config_dump(&self) -> Result<serde_json::Value> {
        let body = self.admin_get("/config_dump")?;
        serde_json::from_str(&body).with_context(|| format!("config_dump is not JSON: {body}"))
    }

    /// `config.generation` of the config dump.
    pub fn config_generation(&self) -> Result<u64> {
        let d = self.config_dump()?;
        d["config"]["generation"]
            .as_u64()
            .ok_or_else(|| anyhow!("config_dump has no config.generation: {d}"))
    }

    /// Polls the config dump until the agent reports exactly `pods` pods enrolled.
    pub fn wait_enrolled(&self, pods: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.config_dump() {
                Ok(d) => match d["enrolled"].as_array() {
                    Some(list) if list.len() == pods => return Ok(()),
                    Some(list) => format!("{} enrolled: {list:?}", list.len()),
                    None => format!("config_dump has no `enrolled` list: {d}"),
                },
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "{}: {pods} pod(s) not enrolled within {timeout:?} (last: {last}); log \
                     tail:\n{}",
                    self.name,
                    self.agent_log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Polls the config dump until `config.generation >= generation`; returns the generation.
    pub fn wait_config_generation(&self, generation: u64, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.config_generation() {
                Ok(g) if g >= generation => return Ok(g),
                Ok(g) => format!("generation {g}"),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "{}: config generation did not reach {generation} within {timeout:?} \
                     (last: {last}); log tail:\n{}",
                    self.name,
                    self.agent_log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last `lines` lines of the agent's log.
    pub fn agent_log_tail(&self, lines: usize) -> String {
        util::tail_file(&self.log_path, lines)
    }

    /// The whole agent log.
    pub fn agent_log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The agent log's lines that parse as JSON objects (with `--log-format json`, every log
    /// and access-log line).
    pub fn agent_log_json(&self) -> Vec<serde_json::Value> {
        self.agent_log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.is_object())
            .collect()
    }
}

#[derive(Debug, Clone)]
struct PodMeta {
    namespace: String,
    service_account: String,
    labels: BTreeMap<String, String>,
    enrolled: bool,
    ready: bool,
    /// The mesh file leaves the namespace (and, until `cni_ips`, the addresses) to the CNI
    /// plugin.
    cni: bool,
    /// The mesh file lists the addresses of a `cni` pod (as the API server does once kubelet
    /// reports them).
    cni_ips: bool,
    /// The pod's own capture exclusions (`excludeOutboundPorts`, `excludeOutboundCidrs`,
    /// `excludeInboundPorts`), as written in the mesh file.
    exclusions: (Vec<i64>, Vec<String>, Vec<i64>),
}

/// One pod: a network namespace with `eth0` (veth to its node), a cgroup under its node, and
/// mesh metadata (namespace, service account, labels, enrolled, ready) that
/// [`Cluster::write_mesh`] publishes.
///
/// Addresses: `10.10.<i>.<j+2>/32` and `fd00:10:<i>::<j+2>/128` on eth0, gateway
/// `10.10.<i>.1` / `fd00:10:<i>::1` on-link.
#[derive(Debug)]
pub struct Pod {
    name: String,
    node: usize,
    index: usize,
    node_name: String,
    netns_name: String,
    netns_path: PathBuf,
    node_if: String,
    uid: String,
    cgroup: PathBuf,
    run_dir: PathBuf,
    meta: Mutex<PodMeta>,
    seq: AtomicU64,
}

impl Pod {
    /// Pod (and workload) name `p<i>-<j>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Index `i` of its node.
    pub fn node(&self) -> usize {
        self.node
    }

    /// Name `n<i>` of its node.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// Index `j` of the pod on its node.
    pub fn index(&self) -> usize {
        self.index
    }

    /// IPv4 address `10.10.<i>.<j+2>`.
    pub fn ip4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 10, self.node as u8, self.index as u8 + 2)
    }

    /// IPv6 address `fd00:10:<i>::<j+2>`.
    pub fn ip6(&self) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd00,
            0x10,
            self.node as u16,
            0,
            0,
            0,
            0,
            self.index as u16 + 2,
        )
    }

    /// Both addresses, IPv4 first.
    pub fn ips(&self) -> [IpAddr; 2] {
        [IpAddr::V4(self.ip4()), IpAddr::V6(self.ip6())]
    }

    /// `ip4():port`.
    pub fn addr4(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip4(), port))
    }

    /// `[ip6()]:port`.
    pub fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip6(), port))
    }

    /// Network namespace name `ab-<id>-n<i>p<j>`.
    pub fn netns_name(&self) -> &str {
        &self.netns_name
    }

    /// Network namespace file `/run/netns/ab-<id>-n<i>p<j>`.
    pub fn netns_path(&self) -> &Path {
        &self.netns_path
    }

    /// How many sk_lookup programs are attached to the pod's namespace now, as the kernel lists
    /// its links (`bpftool link show`).
    pub fn sk_lookup_links(&self) -> Result<usize> {
        use std::os::unix::fs::MetadataExt as _;
        let ino = fs::metadata(&self.netns_path)
            .with_context(|| format!("stat {}", self.netns_path.display()))?
            .ino();
        let out = util::run("bpftool", ["-j", "link", "show"])?;
        let links: Vec<serde_json::Value> =
            serde_json::from_str(&out).with_context(|| format!("bpftool link show: {out}"))?;
        Ok(links
            .iter()
            .filter(|l| l["attach_type"] == "sk_lookup" && l["netns_ino"] == ino)
            .count())
    }

    /// Name of the node-side end of the pod's veth, in the node namespace (`a<id>n<i>p<j>`).
    pub fn node_interface(&self) -> &str {
        &self.node_if
    }

    /// The pod's UID, a UUID unique to the bed (`00<id>-<i>-4000-8000-<j>`, `i` and `j` in
    /// hex, zero-padded).
    pub fn uid(&self) -> &str {
        &self.uid
    }

    /// The cgroup the pod's processes run in: its container's, below a pod cgroup named as
    /// kubelet names it, so that the agent's Kubernetes discovery finds it from the UID. Nodes
    /// with an even index use the systemd driver and containerd
    /// (`n<i>/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/cri-containerd-<ctr>.scope`),
    /// odd ones the cgroupfs driver (`n<i>/kubepods/besteffort/pod<uid>/<ctr>`).
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Kubernetes-style namespace (default `default`).
    pub fn namespace(&self) -> String {
        lock(&self.meta).namespace.clone()
    }

    /// Sets the namespace (publish with [`Cluster::write_mesh`]).
    pub fn set_namespace(&self, namespace: &str) {
        lock(&self.meta).namespace = namespace.into();
    }

    /// Service account (default `default`).
    pub fn service_account(&self) -> String {
        lock(&self.meta).service_account.clone()
    }

    /// Sets the service account (publish with [`Cluster::write_mesh`]).
    pub fn set_service_account(&self, sa: &str) {
        lock(&self.meta).service_account = sa.into();
    }

    /// Labels (default none).
    pub fn labels(&self) -> BTreeMap<String, String> {
        lock(&self.meta).labels.clone()
    }

    /// Sets one label (publish with [`Cluster::write_mesh`]).
    pub fn set_label(&self, key: &str, value: &str) {
        lock(&self.meta).labels.insert(key.into(), value.into());
    }

    /// Removes one label.
    pub fn remove_label(&self, key: &str) {
        lock(&self.meta).labels.remove(key);
    }

    /// Replaces all labels.
    pub fn set_labels(&self, labels: &[(&str, &str)]) {
        lock(&self.meta).labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// Whether the workload is enrolled in the mesh file (default true).
    pub fn enrolled(&self) -> bool {
        lock(&self.meta).enrolled
    }

    /// Sets the enrolled flag (publish with [`Cluster::write_mesh`]).
    pub fn set_enrolled(&self, enrolled: bool) {
        lock(&self.meta).enrolled = enrolled;
    }

    /// Whether the workload is ready (default true).
    pub fn ready(&self) -> bool {
        lock(&self.meta).ready
    }

    /// Sets the ready flag (publish with [`Cluster::write_mesh`]).
    pub fn set_ready(&self, ready: bool) {
        lock(&self.meta).ready = ready;
    }

    /// Leaves the pod's namespace and addresses to the CNI plugin in the mesh file
    /// (`netns: {cni: true}`, no `ips`), as for a pod whose sandbox is not created yet
    /// (publish with [`Cluster::write_mesh`]).
    pub fn set_cni_sandbox(&self, cni: bool) {
        let mut meta = lock(&self.meta);
        meta.cni = cni;
        meta.cni_ips = false;
    }

    /// Lists a CNI pod's addresses in the mesh file, as the API server does once its sandbox
    /// runs (publish with [`Cluster::write_mesh`]).
    pub fn publish_addresses(&self) {
        lock(&self.meta).cni_ips = true;
    }

    /// Sets the pod's own capture exclusions, as the workload's `excludeOutboundPorts`,
    /// `excludeOutboundCidrs` and `excludeInboundPorts` (publish with [`Cluster::write_mesh`]).
    /// Values are written as given, so a test can write a bad one.
    pub fn set_capture_exclusions(
        &self,
        outbound_ports: &[i64],
        outbound_cidrs: &[&str],
        inbound_ports: &[i64],
    ) {
        lock(&self.meta).exclusions = (
            outbound_ports.to_vec(),
            outbound_cidrs.iter().map(|c| c.to_string()).collect(),
            inbound_ports.to_vec(),
        );
    }

    /// The pod's workload entry as the mesh file will carry it.
    pub fn workload(&self) -> mesh::Workload {
        let m = lock(&self.meta).clone();
        let ips: Vec<String> = self.ips().iter().map(|i| i.to_string()).collect();
        let (ips, netns) = if m.cni {
            (
                if m.cni_ips { ips } else { Vec::new() },
                mesh::NetnsRef {
                    cni: true,
                    ..Default::default()
                },
            )
        } else {
            (
                ips,
                mesh::NetnsRef {
                    path: Some(self.netns_path.display().to_string()),
                    ..Default::default()
                },
            )
        };
        mesh::Workload {
            name: self.name.clone(),
            namespace: m.namespace,
            service_account: m.service_account,
            node: self.node_name.clone(),
            ips,
            labels: m.labels,
            enrolled: m.enrolled,
            ready: m.ready,
            netns,
            exclude_outbound_ports: m.exclusions.0,
            exclude_outbound_cidrs: m.exclusions.1,
            exclude_inbound_ports: m.exclusions.2,
        }
    }

    /// Spawns `program args...` inside the pod: moved into the pod's cgroup, then into its
    /// network namespace (both in a `pre_exec` hook). stdin/stdout are piped, stderr goes to
    /// `<run dir>/<pod>-<program>-<n>.stderr`; `POD_NAME` is set to the pod name.
    pub fn spawn<P, I, S>(&self, program: P, args: I) -> Result<PodProcess>
    where
        P: AsRef<OsStr>,
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.spawn_with_env(program, args, &[])
    }

    /// Like [`spawn`](Self::spawn) with extra environment variables.
    pub fn spawn_with_env<P, I, S>(
        &self,
        program: P,
        args: I,
        envs: &[(&str, &str)],
    ) -> Result<PodProcess>
    where
        P: AsRef<OsStr>,
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let program = program.as_ref();
        let base = Path::new(program)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "proc".into());
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let stderr_path = self
            .run_dir
            .join(format!("{}-{}-{}.stderr", self.name, base, n));
        let mut env: Vec<(String, String)> = vec![("POD_NAME".into(), self.name.clone())];
        env.extend(envs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        PodProcess::spawn(
            format!("{}:{}#{}", self.name, base, n),
            &self.cgroup,
            &self.netns_path,
            stderr_path,
            program,
            args,
            &env,
        )
    }
}

/// The UID of pod `j` of node `i` in bed `id` (a 6-digit hex id): a well-formed UUID.
fn pod_uid(id: &str, i: usize, j: usize) -> String {
    format!("{id:0>8}-{i:04x}-4000-8000-{j:012x}")
}

/// The container cgroup of a pod with `uid` on node `i`, relative to the node's cgroup, as
/// kubelet and the container runtime create it: the systemd driver with containerd on even
/// nodes, the cgroupfs driver on odd ones (so both layouts are discovered for real).
fn kubelet_container_cgroup(i: usize, uid: &str) -> PathBuf {
    let container = format!("{:0>64}", uid.replace('-', ""));
    if i.is_multiple_of(2) {
        let slice_uid = uid.replace('-', "_");
        PathBuf::from(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{slice_uid}.slice/cri-containerd-{container}.scope"
        ))
    } else {
        PathBuf::from(format!("kubepods/besteffort/pod{uid}/{container}"))
    }
}

/// The trust domain of every bed (mesh file and CA).
pub const TRUST_DOMAIN: &str = "cluster.local";

/// Where the bed's CA listens: an address of the fabric bridge, reachable from every node.
pub const CA_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 99, 0, 254)), 15012);

/// The bed's CA process and whether it was initialised.
#[derive(Debug, Default)]
struct CaState {
    disabled: bool,
    initialised: bool,
    /// Kubernetes mode: the kubeconfig `ambit ca serve --kube` uses.
    kubeconfig: Option<PathBuf>,
    process: Option<AgentProc>,
}

/// A cluster in a box. See the crate docs for the topology. Dropping it tears everything down.
#[derive(Debug)]
pub struct Cluster {
    id: String,
    spec: ClusterSpec,
    run_dir: PathBuf,
    cgroup_root: PathBuf,
    mesh_path: PathBuf,
    fabric_netns: String,
    bridge: String,
    ambit: PathBuf,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    services: Mutex<Vec<mesh::Service>>,
    /// Workloads of the mesh file that are not bed pods (containers a test runs otherwise).
    extra_workloads: Mutex<Vec<mesh::Workload>>,
    redirect: Mutex<mesh::Redirect>,
    policies: Mutex<mesh::Policies>,
    routing: Mutex<mesh::Routing>,
    gateway_routes: Mutex<mesh::GatewayRoutes>,
    rate_limit_policies: Mutex<Vec<serde_json::Value>>,
    ca: Mutex<CaState>,
    mesh_write: Mutex<u64>,
    torn_down: AtomicBool,
}

impl Cluster {
    /// Builds the bed: sweeps stale beds, reserves a run id, creates the cgroups, namespaces,
    /// veths, bridge, addresses and routes, and writes the initial mesh file (every pod
    /// enrolled). Does not start agents (see [`start_agents`](Self::start_agents)). On error
    /// everything created so far is removed.
    pub fn start(spec: ClusterSpec) -> Result<Cluster> {
        ensure!(nix::unistd::geteuid().is_root(), "the test bed needs root");
        ensure!(
            (1..=99).contains(&spec.nodes) && spec.pods_per_node <= 99,
            "unsupported cluster shape {spec:?}"
        );
        match testbed::sweep_stale() {
            Ok(swept) if !swept.is_empty() => eprintln!("[testbed] swept stale beds {swept:?}"),
            Ok(_) => {}
            Err(e) => eprintln!("[testbed] sweep failed: {e:#}"),
        }
        let id = testbed::reserve_id()?;
        // From here on, `cluster` exists so that an early return tears down what was built.
        let run_dir = testbed::run_dir(&id);
        let cgroup_root = match util::cgroup2_mount() {
            Ok(m) => m.join(testbed::cgroup_name(&id)),
            Err(e) => {
                let _ = fs::remove_file(testbed::owner_file(&id));
                return Err(e);
            }
        };
        let ambit = testbed::ambit_bin();
        // In a directory of its own: the agents watch the mesh file's directory, and would
        // otherwise wake for every line written to the logs beside it (their own included).
        let mesh_path = run_dir.join("mesh").join("mesh.yaml");
        let ns = |suffix: &str| format!("ab-{id}-{suffix}");
        let nodes = (0..spec.nodes)
            .map(|i| {
                let cgroup = cgroup_root.join(format!("n{i}"));
                Node {
                    index: i,
                    name: format!("n{i}"),
                    netns_name: ns(&format!("n{i}")),
                    netns_path: Path::new(util::NETNS_DIR).join(ns(&format!("n{i}"))),
                    fabric_if: format!("a{id}n{i}"),
                    agent_cgroup: cgroup.join("agent"),
                    host_cgroup: cgroup.join("host"),
                    run_dir: run_dir.clone(),
                    seq: AtomicUsize::new(0),
                    cgroup,
                    bpffs: Path::new(util::BPFFS).join(format!("ambit-{id}-n{i}")),
                    log_path: run_dir.join(format!("agent-n{i}.log")),
                    mesh_path: mesh_path.clone(),
                    ambit: ambit.clone(),
                    agent: Mutex::new(None),
                    predecessor: Mutex::new(None),
                    agent_env: Mutex::new(BTreeMap::new()),
                    agent_args: Mutex::new(Vec::new()),
                    ca_args: Mutex::new(Vec::new()),
                    kubeconfig: Mutex::new(None),
                    stall_log: AtomicBool::new(false),
                    stalled_log: Mutex::new(None),
                }
            })
            .collect();
        let pods = (0..spec.nodes)
            .flat_map(|i| (0..spec.pods_per_node).map(move |j| (i, j)))
            .map(|(i, j)| (i, j, pod_uid(&id, i, j)))
            .map(|(i, j, uid)| Pod {
                name: format!("p{i}-{j}"),
                node: i,
                index: j,
                node_name: format!("n{i}"),
                netns_name: ns(&format!("n{i}p{j}")),
                netns_path: Path::new(util::NETNS_DIR).join(ns(&format!("n{i}p{j}"))),
                node_if: format!("a{id}n{i}p{j}"),
                cgroup: cgroup_root
                    .join(format!("n{i}"))
                    .join(kubelet_container_cgroup(i, &uid)),
                uid,
                run_dir: run_dir.clone(),
                meta: Mutex::new(PodMeta {
                    namespace: "default".into(),
                    service_account: "default".into(),
                    labels: BTreeMap::new(),
                    enrolled: true,
                    ready: true,
                    cni: false,
                    cni_ips: false,
                    exclusions: Default::default(),
                }),
                seq: AtomicU64::new(0),
            })
            .collect();
        let cluster = Cluster {
            fabric_netns: ns("fab"),
            bridge: format!("a{id}br"),
            id,
            spec,
            run_dir,
            cgroup_root,
            mesh_path,
            ambit,
            nodes,
            pods,
            services: Mutex::new(Vec::new()),
            extra_workloads: Mutex::new(Vec::new()),
            redirect: Mutex::new(mesh::Redirect::default()),
            policies: Mutex::new(mesh::Policies::default()),
            routing: Mutex::new(mesh::Routing::default()),
            gateway_routes: Mutex::new(mesh::GatewayRoutes::default()),
            rate_limit_policies: Mutex::new(Vec::new()),
            ca: Mutex::new(CaState::default()),
            mesh_write: Mutex::new(0),
            torn_down: AtomicBool::new(false),
        };
        cluster
            .build()
            .with_context(|| format!("building test bed {}", cluster.id))?;
        Ok(cluster)
    }

    fn build(&self) -> Result<()> {
        fs::create_dir_all(&self.run_dir)?;
        if let Some(dir) = self.mesh_path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
        }
        // cgroups
        for n in &self.nodes {
            for cgroup in [&n.agent_cgroup, &n.host_cgroup] {
                fs::create_dir_all(cgroup)
                    .with_context(|| format!("mkdir {}", cgroup.display()))?;
            }
        }
        for p in &self.pods {
            fs::create_dir_all(&p.cgroup)
                .with_context(|| format!("mkdir {}", p.cgroup.display()))?;
        }
        // namespaces (serialized within the process: the first `ip netns add` on a machine
        // also sets up the /run/netns mount, which concurrent callers could race on)
        static NETNS_ADD: Mutex<()> = Mutex::new(());
        let fab = &self.fabric_netns;
        {
            let _g = lock(&NETNS_ADD);
            util::ip(&format!("netns add {fab}"))?;
            for n in &self.nodes {
                util::ip(&format!("netns add {}", n.netns_name))?;
            }
            for p in &self.pods {
                util::ip(&format!("netns add {}", p.netns_name))?;
            }
        }
        // fabric bridge
        let br = &self.bridge;
        util::ip(&format!("-n {fab} link set lo up"))?;
        util::ip(&format!(
            "-n {fab} link add {br} type bridge mcast_snooping 0"
        ))?;
        util::ip(&format!("-n {fab} link set {br} up"))?;
        util::ip(&format!("-n {fab} addr add {}/24 dev {br}", CA_ADDR.ip()))?;
        // nodes
        for n in &self.nodes {
            let (nns, nif) = (&n.netns_name, &n.fabric_if);
            let peer = format!("{nif}f");
            util::ip(&format!(
                "link add {nif} netns {nns} type veth peer name {peer} netns {fab}"
            ))?;
            util::ip(&format!("-n {fab} link set {peer} master {br} up"))?;
            util::ip(&format!("-n {nns} link set lo up"))?;
            Netns::enter_thread(&n.netns_path, || -> Result<()> {
                fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
                fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")?;
                Ok(())
            })?
            .with_context(|| format!("enable forwarding in {nns}"))?;
            util::ip(&format!("-n {nns} addr add {}/24 dev {nif}", n.fabric_ip()))?;
            util::ip(&format!(
                "-n {nns} addr add {}/64 dev {nif} nodad",
                n.fabric_ip6()
            ))?;
            util::ip(&format!("-n {nns} link set {nif} up"))?;
        }
        // pods
        for p in &self.pods {
            let n = &self.nodes[p.node];
            let (nns, pns, vif) = (&n.netns_name, &p.netns_name, &p.node_if);
            util::ip(&format!(
                "link add eth0 netns {pns} type veth peer name {vif} netns {nns}"
            ))?;
            // node side
            util::ip(&format!(
                "-n {nns} addr add {}/32 dev {vif}",
                n.gateway_ip()
            ))?;
            util::ip(&format!(
                "-n {nns} addr add {}/128 dev {vif} nodad",
                n.gateway_ip6()
            ))?;
            util::ip(&format!("-n {nns} link set {vif} up"))?;
            // pod side
            util::ip(&format!("-n {pns} link set lo up"))?;
            util::ip(&format!("-n {pns} addr add {}/32 dev eth0", p.ip4()))?;
            util::ip(&format!("-n {pns} addr add {}/128 dev eth0 nodad", p.ip6()))?;
            util::ip(&format!("-n {pns} link set eth0 up"))?;
            util::ip(&format!(
                "-n {pns} route add {} dev eth0 scope link",
                n.gateway_ip()
            ))?;
            util::ip(&format!(
                "-n {pns} route add default via {}",
                n.gateway_ip()
            ))?;
            util::ip(&format!(
                "-n {pns} -6 route add {} dev eth0",
                n.gateway_ip6()
            ))?;
            util::ip(&format!(
                "-n {pns} -6 route add default via {} dev eth0",
                n.gateway_ip6()
            ))?;
            // node routes to the pod
            util::ip(&format!("-n {nns} route add {}/32 dev {vif}", p.ip4()))?;
            util::ip(&format!("-n {nns} -6 route add {}/128 dev {vif}", p.ip6()))?;
        }
        // inter-node routes
        for n in &self.nodes {
            for k in self.nodes.iter().filter(|k| k.index != n.index) {
                let ki = k.index;
                util::ip(&format!(
                    "-n {} route add 10.10.{ki}.0/24 via {}",
                    n.netns_name,
                    k.fabric_ip()
                ))?;
                util::ip(&format!(
                    "-n {} -6 route add {}/64 via {}",
                    n.netns_name,
                    Ipv6Addr::new(0xfd00, 0x10, ki as u16, 0, 0, 0, 0, 0),
                    k.fabric_ip6()
                ))?;
            }
        }
        self.write_mesh()?;
        Ok(())
    }

    /// The run id (6 hex digits) carried by every name of this bed.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The shape this cluster was built with.
    pub fn spec(&self) -> ClusterSpec {
        self.spec
    }

    /// The run's temp dir (mesh file, agent logs, pods' stderr). Removed on drop unless the
    /// thread is panicking or `AMBIT_TEST_KEEP=1`.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// `<cgroup2 mount>/ambit-<id>`.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// Name of the fabric namespace `ab-<id>-fab` (holds the bridge).
    pub fn fabric_netns(&self) -> &str {
        &self.fabric_netns
    }

    /// The `ambit` binary the bed uses (`$AMBIT_BIN` or `<workspace>/target/debug/ambit`).
    pub fn ambit_bin(&self) -> &Path {
        &self.ambit
    }

    /// Uses another `ambit` binary for this cluster's agents and teardown (instead of
    /// `$AMBIT_BIN` or the workspace build), e.g. a stand-in. Call before starting agents.
    pub fn set_ambit_bin(&mut self, path: impl Into<PathBuf>) {
        self.ambit = path.into();
        for n in &mut self.nodes {
            n.ambit = self.ambit.clone();
        }
    }

    /// All nodes.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `i`. Panics if out of range.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// All pods, node by node.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The pods of node `i`.
    pub fn pods_on(&self, i: usize) -> &[Pod] {
        let n = self.spec.pods_per_node;
        &self.pods[i * n..(i + 1) * n]
    }

    /// Pod `j` of node `i` (named `p<i>-<j>`). Panics if out of range.
    pub fn pod(&self, node: usize, j: usize) -> &Pod {
        assert!(j < self.spec.pods_per_node, "no pod {j} on node {node}");
        &self.pods[node * self.spec.pods_per_node + j]
    }

    /// The pod with this name, if any.
    pub fn pod_by_name(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name)
    }

    /// The node a pod runs on.
    pub fn node_of(&self, pod: &Pod) -> &Node {
        &self.nodes[pod.node]
    }

    /// Starts every node's agent, then waits (up to 60 s each) until all are ready.
    pub fn start_agents(&self) -> Result<()> {
        self.start_ca()?;
        for n in &self.nodes {
            n.start_agent()?;
        }
        for n in &self.nodes {
            n.wait_ready(Duration::from_secs(60))?;
        }
        Ok(())
    }

    /// Stops every running agent (SIGTERM, then SIGKILL after 5 s).
    pub fn stop_agents(&self) -> Result<()> {
        for n in &self.nodes {
            n.stop_agent()?;
        }
        Ok(())
    }

    /// Adds (or replaces, by name and namespace) a service. `ports` are `(port, targetPort)`.
    /// Publish with [`write_mesh`](Self::write_mesh).
    pub fn add_service(
        &self,
        name: &str,
        namespace: &str,
        vips: &[&str],
        selector: &[(&str, &str)],
        ports: &[(u16, u16)],
    ) {
        let svc = mesh::Service {
            name: name.into(),
            namespace: namespace.into(),
            vips: vips.iter().map(|v| v.to_string()).collect(),
            selector: selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ports: ports
                .iter()
                .map(|&(port, target_port)| mesh::ServicePort { port, target_port })
                .collect(),
            waypoint: None,
        };
        let mut s = lock(&self.services);
        s.retain(|x| !(x.name == name && x.namespace == namespace));
        s.push(svc);
    }

    /// Removes a service; returns whether it existed. Publish with
    /// [`write_mesh`](Self::write_mesh).
    pub fn remove_service(&self, name: &str, namespace: &str) -> bool {
        let mut s = lock(&self.services);
        let before = s.len();
        s.retain(|x| !(x.name == name && x.namespace == namespace));
        s.len() != before
    }

    /// Gives `pod` the extra IPv4 address `ip`, on its `eth0` and routed to it by its node:
    /// an address no mesh object names, standing for something outside the mesh that answers
    /// (a service VIP the cluster itself would route, an endpoint outside the mesh). `ip` must
    /// be a free address of the pod's node's subnet `10.10.<i>.0/24`, which the other nodes
    /// route to that node, so it stays one of the bed's own addresses. Removed with the bed.
    pub fn add_pod_address(&self, pod: &Pod, ip: Ipv4Addr) -> Result<()> {
        let node = &self.nodes[pod.node];
        let [a, b, c, d] = ip.octets();
        ensure!(
            [a, b, c] == [10, 10, node.index as u8] && d > 1 && d < 255,
            "{ip} is not a host address of node {}'s pod subnet 10.10.{}.0/24",
            node.name,
            node.index
        );
        ensure!(
            self.pods.iter().all(|p| p.ip4() != ip),
            "{ip} is already a pod's address"
        );
        util::ip(&format!("-n {} addr add {ip}/32 dev eth0", pod.netns_name))?;
        util::ip(&format!(
            "-n {} route add {ip}/32 dev {}",
            node.netns_name, pod.node_if
        ))?;
        Ok(())
    }

    /// Sets the redirect exclusions (`excludeOutboundPorts`, `excludeOutboundCidrs`).
    /// Publish with [`write_mesh`](Self::write_mesh).
    pub fn set_redirect_exclusions(&self, ports: &[u16], cidrs: &[&str]) {
        *lock(&self.redirect) = mesh::Redirect {
            exclude_outbound_ports: ports.to_vec(),
            exclude_outbound_cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
        };
    }

    /// Sets a pod's enrolled flag (same as [`Pod::set_enrolled`]). Publish with
    /// [`write_mesh`](Self::write_mesh).
    pub fn set_enrolled(&self, pod: &Pod, enrolled: bool) {
        pod.set_enrolled(enrolled);
    }

    /// Replaces a pod's labels (same as [`Pod::set_labels`]). Publish with
    /// [`write_mesh`](Self::write_mesh).
    pub fn set_labels(&self, pod: &Pod, labels: &[(&str, &str)]) {
        pod.set_labels(labels);
    }

    /// The mesh the bed would write now: every pod as a workload, the services, the
    /// exclusions.
    pub fn mesh(&self) -> MeshFile {
        let policies = lock(&self.policies).clone();
        let routing = lock(&self.routing).clone();
        let gateway_routes = lock(&self.gateway_routes).clone();
        MeshFile {
            trust_domain: TRUST_DOMAIN.to_string(),
            redirect: lock(&self.redirect).clone(),
            workloads: self
                .pods
                .iter()
                .map(Pod::workload)
                .chain(lock(&self.extra_workloads).iter().cloned())
                .collect(),
            services: lock(&self.services).clone(),
            peer_authentications: policies.peer_authentications,
            authorization_policies: policies.authorization_policies,
            request_authentications: policies.request_authentications,
            virtual_services: routing.virtual_services,
            destination_rules: routing.destination_rules,
            http_routes: gateway_routes.http_routes,
            grpc_routes: gateway_routes.grpc_routes,
            rate_limit_policies: lock(&self.rate_limit_policies).clone(),
        }
    }

    /// Binds the service `name` of `namespace` to the waypoint service `waypoint` (same
    /// namespace); returns whether the service exists. Publish with
    /// [`write_mesh`](Self::write_mesh).
    pub fn set_service_waypoint(&self, name: &str, namespace: &str, waypoint: &str) -> bool {
        let mut services = lock(&self.services);
        let Some(service) = services
            .iter_mut()
            .find(|s| s.name == name && s.namespace == namespace)
        else {
            return false;
        };
        service.waypoint = Some(mesh::WaypointRef {
            name: waypoint.into(),
            namespace: namespace.into(),
        });
        true
    }

    /// Replaces the routing sections (`virtualServices`, `destinationRules`). Publish with
    /// [`write_mesh`](Self::write_mesh).
    pub fn set_routing(&self, routing: mesh::Routing) {
        *lock(&self.routing) = routing;
    }

    /// Replaces the Gateway API routing sections (`httpRoutes`, `grpcRoutes`). Publish with
    /// [`write_mesh`](Self::write_mesh).
    pub fn set_gateway_routes(&self, routes: mesh::GatewayRoutes) {
        *lock(&self.gateway_routes) = routes;
    }

    /// Replaces the `rateLimitPolicies` section. Publish with [`write_mesh`](Self::write_mesh).
    pub fn set_rate_limit_policies(&self, policies: Vec<serde_json::Value>) {
        *lock(&self.rate_limit_policies) = policies;
    }

    /// Adds a workload that is no bed pod to the mesh file (publish with
    /// [`write_mesh`](Self::write_mesh)).
    pub fn add_workload(&self, workload: mesh::Workload) {
        lock(&self.extra_workloads).push(workload);
    }

    /// Replaces the policy sections (`peerAuthentications`, `authorizationPolicies`,
    /// `requestAuthentications`).
    /// Publish with [`write_mesh`](Self::write_mesh).
    pub fn set_policies(&self, policies: mesh::Policies) {
        *lock(&self.policies) = policies;
    }

    /// The CA's directory (`ambit ca init` output: root key and certificate, trust bundle).
    pub fn ca_dir(&self) -> PathBuf {
        self.run_dir.join("ca")
    }

    /// Agents of this bed run without a CA (for stand-in agent binaries that have none).
    pub fn disable_ca(&self) {
        lock(&self.ca).disabled = true;
    }

    /// From its next start on, the CA runs in Kubernetes mode against the API server of
    /// `kubeconfig` (`ambit ca serve --kube`): agents' tokens are checked by TokenReview and
    /// placement against the API's pods instead of the tokens file and the mesh file. The
    /// agents' token files ([`ca_token`](Self::ca_token)) are what that API server must accept.
    pub fn use_kubernetes_ca(&self, kubeconfig: impl Into<PathBuf>) {
        lock(&self.ca).kubeconfig = Some(kubeconfig.into());
    }

    /// The token node `node`'s agent presents to the CA (initialises the CA if needed).
    pub fn ca_token(&self, node: &Node) -> Result<String> {
        self.init_ca()?;
        let file = self.run_dir.join(format!("ca-token-{}", node.name));
        fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))
    }

    /// Initialises the bed's CA once: its root, the per-node bootstrap tokens (token files and
    /// the tokens file), and the agents' CA flags.
    fn init_ca(&self) -> Result<()> {
        let mut ca = lock(&self.ca);
        if ca.initialised {
            return Ok(());
        }
        let dir = self.ca_dir();
        let tokens = self.run_dir.join("ca-tokens.yaml");
        let out = Command::new(&self.ambit)
            .args(["ca", "init", "--dir"])
            .arg(&dir)
            .args(["--trust-domain", TRUST_DOMAIN])
            .output()
            .with_context(|| format!("run {} ca init", self.ambit.display()))?;
        ensure!(
            out.status.success(),
            "ambit ca init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut yaml = String::from("nodes:\n");
        for n in &self.nodes {
            let mut secret = [0u8; 16];
            std::io::Read::read_exact(&mut fs::File::open("/dev/urandom")?, &mut secret)?;
            let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
            let token = format!("{}-{}-{secret}", self.id, n.name);
            let token_file = self.run_dir.join(format!("ca-token-{}", n.name));
            fs::write(&token_file, &token)?;
            let _ = writeln!(yaml, "  {}: {token}", n.name);
            *lock(&n.ca_args) = vec![
                "--ca-address".into(),
                format!("https://{CA_ADDR}"),
                "--ca-roots".into(),
                dir.join("roots.pem").display().to_string(),
                "--ca-token-file".into(),
                token_file.display().to_string(),
            ];
        }
        fs::write(&tokens, yaml)?;
        ca.initialised = true;
        Ok(())
    }

    /// Initialises the bed's CA once (root, per-node bootstrap tokens, the agents' CA flags)
    /// and starts `ambit ca serve` in the fabric namespace on [`CA_ADDR`], unless it runs.
    /// [`start_agents`](Self::start_agents) calls it.
    pub fn start_ca(&self) -> Result<()> {
        if lock(&self.ca).disabled {
            return Ok(());
        }
        self.init_ca()?;
        let mut ca = lock(&self.ca);
        if let Some(p) = ca.process.as_mut()
            && p.try_status().is_none()
        {
            return Ok(());
        }
        let dir = self.ca_dir();
        let tokens = self.run_dir.join("ca-tokens.yaml");
        let cgroup = self.cgroup_root.join("ca");
        fs::create_dir_all(&cgroup)?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.run_dir.join("ca.log"))?;
        let mut cmd = Command::new(&self.ambit);
        cmd.args(["--log-format", "json", "ca", "serve", "--dir"])
            .arg(&dir)
            .args(["--listen", &CA_ADDR.to_string()]);
        match &ca.kubeconfig {
            Some(kubeconfig) => cmd.arg("--kube").arg("--kubeconfig").arg(kubeconfig),
            None => cmd
                .arg("--mesh-file")
                .arg(&self.mesh_path)
                .arg("--tokens")
                .arg(&tokens),
        };
        cmd.args(["--server-name", &CA_ADDR.ip().to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        place_in(
            &mut cmd,
            &cgroup,
            &PathBuf::from(format!("/run/netns/{}", self.fabric_netns)),
        )?;
        let child = cmd.spawn().context("spawn ambit ca serve")?;
        let mut process = AgentProc {
            child,
            status: None,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let fabric = PathBuf::from(format!("/run/netns/{}", self.fabric_netns));
        loop {
            let up = Netns::enter_thread(&fabric, || {
                std::net::TcpStream::connect_timeout(&CA_ADDR, Duration::from_millis(200)).is_ok()
            })?;
            if up {
                break;
            }
            if let Some(status) = process.try_status() {
                bail!("ambit ca serve exited ({status}): {}", self.ca_log_tail(20));
            }
            ensure!(
                Instant::now() < deadline,
                "the CA did not listen on {CA_ADDR} within 30 s: {}",
                self.ca_log_tail(20)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        ca.process = Some(process);
        Ok(())
    }

    /// Stops the CA (SIGTERM, then SIGKILL after 5 s); [`start_ca`](Self::start_ca) restarts it.
    pub fn stop_ca(&self) {
        if let Some(mut p) = lock(&self.ca).process.take() {
            p.signal(libc::SIGTERM);
            if p.wait_until(Instant::now() + Duration::from_secs(5))
                .is_none()
            {
                p.kill();
            }
        }
    }

    /// The last `lines` lines of the CA's log.
    pub fn ca_log_tail(&self, lines: usize) -> String {
        util::tail_file(&self.run_dir.join("ca.log"), lines)
    }

    /// Path of the mesh file `<run dir>/mesh/mesh.yaml` (the agents' `--mesh-file`).
    pub fn mesh_path(&self) -> &Path {
        &self.mesh_path
    }

    /// Writes [`mesh`](Self::mesh) as YAML to the mesh file, atomically (temp file + rename).
    /// Returns the text written.
    pub fn write_mesh(&self) -> Result<String> {
        let text = self.mesh().to_yaml()?;
        self.write_raw_mesh(&text)?;
        Ok(text)
    }

    /// Writes arbitrary text to the mesh file, atomically (for bad-file tests).
    pub fn write_raw_mesh(&self, text: &str) -> Result<()> {
        let mut n = lock(&self.mesh_write);
        *n += 1;
        let tmp = self
            .mesh_path
            .with_file_name(format!(".mesh.yaml.tmp{}", *n));
        fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
        fs::rename(&tmp, &self.mesh_path)
            .with_context(|| format!("rename to {}", self.mesh_path.display()))?;
        Ok(())
    }

    /// Polls node `node`'s config dump until `config.generation >= generation`.
    pub fn wait_config_generation(
        &self,
        node: usize,
        generation: u64,
        timeout: Duration,
    ) -> Result<u64> {
        self.nodes[node].wait_config_generation(generation, timeout)
    }

    /// A human-readable report for failures: per node the agent state, its log tail (40
    /// lines), the config dump if reachable, `ip addr` and routes; per pod `ss -ltnp`.
    pub fn diagnostics(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "===== test bed {} diagnostics (run dir {}) =====",
            self.id,
            self.run_dir.display()
        );
        if !lock(&self.ca).disabled {
            let _ = writeln!(s, "----- CA log tail:\n{}", self.ca_log_tail(20));
        }
        for n in &self.nodes {
            let _ = writeln!(
                s,
                "----- node {} (netns {}): agent {}",
                n.name,
                n.netns_name,
                n.agent_state()
            );
            let _ = writeln!(
                s,
                "agent log tail ({}):\n{}",
                n.log_path.display(),
                n.agent_log_tail(40)
            );
            let dump = n
                .http_get(ADMIN_PORT, "/config_dump", Duration::from_secs(2))
                .map(|r| format!("HTTP {}: {}", r.status, r.body.trim()))
                .unwrap_or_else(|e| format!("unreachable: {e:#}"));
            let _ = writeln!(s, "config_dump: {dump}");
            // The pinned maps' contents, as the kernel holds them.
            for map in [
                "ENROLLED_NETNS",
                "ORIG_DST_TUPLE",
                "PENDING_CONNECTS",
                "POD_LISTENERS",
                "HBONE_LISTENERS",
                "NODE_ADDRS",
            ] {
                let pin = n.bpffs.join("maps").join(map);
                let out = Command::new("bpftool")
                    .args(["map", "dump", "pinned"])
                    .arg(&pin)
                    .output()
                    .map(|o| {
                        let text = String::from_utf8_lossy(&o.stdout);
                        let lines: Vec<&str> = text.lines().take(30).collect();
                        lines.join("\n")
                    })
                    .unwrap_or_else(|e| format!("bpftool: {e}"));
                let _ = writeln!(s, "map {map}:\n{out}");
            }
            for cmd in ["addr", "route", "-6 route"] {
                let out = util::ip(&format!("-n {} {cmd}", n.netns_name))
                    .unwrap_or_else(|e| format!("{e:#}"));
                let _ = writeln!(s, "ip -n {} {cmd}:\n{}", n.netns_name, out.trim_end());
            }
        }
        for p in &self.pods {
            let out = util::run(
                "ip",
                ["netns", "exec", p.netns_name.as_str(), "ss", "-ltnp"],
            )
            .unwrap_or_else(|e| format!("{e:#}"));
            let _ = writeln!(
                s,
                "----- pod {} ({}/{}, {} {}, enrolled {}) ss -ltnp:\n{}",
                p.name,
                p.namespace(),
                p.service_account(),
                p.ip4(),
                p.ip6(),
                p.enrolled(),
                out.trim_end()
            );
        }
        s
    }

    /// `Ok(())` if `cond`, else an error whose text is `msg` followed by the
    /// [`diagnostics`](Self::diagnostics).
    pub fn check(&self, cond: bool, msg: impl std::fmt::Display) -> Result<()> {
        if cond {
            Ok(())
        } else {
            Err(anyhow!("{msg}\n{}", self.diagnostics()))
        }
    }

    /// Polls `probe` every 100 ms until it returns `Ok(Ok(value))`, for at most `timeout`.
    /// `Ok(Err(seen))` means "not yet" and describes what was seen; on timeout the error says
    /// `what`, the last thing seen and the [`diagnostics`](Self::diagnostics). An `Err` from
    /// the probe ends the wait at once.
    pub fn wait_for<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut probe: impl FnMut() -> Result<std::result::Result<T, String>>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = match probe()? {
                Ok(value) => return Ok(value),
                Err(seen) => seen,
            };
            if Instant::now() >= deadline {
                bail!(
                    "{what}: not within {timeout:?}; last seen: {seen}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Passes `r` through, appending the [`diagnostics`](Self::diagnostics) to an error.
    pub fn with_diagnostics<T>(&self, r: Result<T>) -> Result<T> {
        r.map_err(|e| anyhow!("{e:#}\n{}", self.diagnostics()))
    }

    /// Tears the bed down (also done by `Drop`; idempotent, best effort): kills and reaps the
    /// agents, kills whatever else runs in the bed's cgroups, runs `ambit uninstall` on each
    /// node's bpffs dir (if the binary exists) and removes the dirs, deletes the namespaces
    /// (removing veths and bridge), removes the cgroups bottom-up and the owner file. Returns
    /// the failures (also printed to stderr). The run dir is handled by `Drop`.
    pub fn teardown(&self) -> Vec<String> {
        if self.torn_down.swap(true, Ordering::SeqCst) {
            return Vec::new();
        }
        // Agents: SIGTERM all, 2 s grace in total, then SIGKILL; always reap.
        let mut agents: Vec<AgentProc> = self
            .nodes
            .iter()
            .flat_map(|n| [lock(&n.agent).take(), lock(&n.predecessor).take()])
            .flatten()
            .collect();
        for a in &mut agents {
            a.signal(libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        for a in &mut agents {
            if a.wait_until(deadline).is_none() {
                a.kill();
            }
        }
        self.stop_ca();
        let errors = testbed::destroy_bed(&self.id, Some(&self.ambit));
        for e in &errors {
            eprintln!("[testbed {}] teardown: {e}", self.id);
        }
        errors
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
        let keep = std::thread::panicking()
            || std::env::var("AMBIT_TEST_KEEP").is_ok_and(|v| !v.is_empty() && v != "0");
        if keep {
            eprintln!(
                "[testbed {}] kept logs in {}",
                self.id,
                self.run_dir.display()
            );
        } else if let Err(e) = fs::remove_dir_all(&self.run_dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!(
                "[testbed {}] remove {}: {e}",
                self.id,
                self.run_dir.display()
            );
        }
    }
}

// A Cluster can be shared by threads (e.g. `std::thread::scope`).
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Cluster>();
};

/// Returns early from the enclosing function (whose error type is `anyhow::Error` or converts
/// from it) with an error that contains the formatted message and `cluster.diagnostics()`,
/// unless `cond` holds.
///
/// ```ignore
/// ensure_or_dump!(cluster, out["ok"] == true, "client failed: {out}");
/// ```
#[macro_export]
macro_rules! ensure_or_dump {
    ($cluster:expr, $cond:expr, $($arg:tt)+) => {
        if !$cond {
            return ::core::result::Result::Err(
                $crate::anyhow::anyhow!(
                    "{}\n{}",
                    ::std::format!($($arg)+),
                    $cluster.diagnostics()
                )
                .into(),
            );
        }
    };
}
