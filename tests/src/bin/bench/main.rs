//! `cargo xtask bench`: one cluster in a box, one run, every path measured side by side.
//!
//! Two nodes with two pods each. The client is `p0-0` (node n0); the servers are `p0-1` (same
//! node) and `p1-0` (across nodes, through the fabric bridge). Each server pod runs nginx (small
//! HTTP responses), an iperf3 server (bulk throughput) and `testpod serve` (connection churn).
//! The paths, chosen by toggling enrolment in the mesh file (the agents keep running):
//!
//! - **direct**: neither pod enrolled, no agent on the path;
//! - **passthrough**: the client enrolled, the server not: the client's agent captures the
//!   connection and connects to a destination outside the mesh in plaintext;
//! - **mesh, fast path off** (same node only): both enrolled, the client's agent restarted with
//!   `--same-node-fast-path=false`: HBONE through one agent, the path the fast path replaces;
//! - **mesh, spliced** (same node only): the client's agent restarted with
//!   `--max-spliced-connections 16384`: the fast path with its bytes spliced in the kernel
//!   instead of relayed by the agent (the default);
//! - **mesh**: both enrolled: whatever the agents do between two enrolled pods (the same-node
//!   fast path, HBONE mTLS across nodes; the access log tells which, and the report says so).
//!
//! For each path, same node and across nodes: h2load at a fixed rate and at saturation (latency
//! percentiles from h2load's per-request log), iperf3 with 1 and 8 streams, `testpod churn`
//! (sequential short connections), the agents' CPU time, and the whole machine's CPU per request
//! and per GB with the ceiling that cost sets on each path ([`cost`]); at the end the agents' peak
//! memory.
//!
//! Then the waypoint path ([`waypoint`]): client agent -> `ambit waypoint` -> server agent, beside
//! the L4 mesh and the direct path, with h2load and wrk at 1 and 64 connections, and the
//! waypoint's CPU and memory (`--no-waypoint` skips it).
//!
//! Then the memory soak, on freshly restarted agents with the client and both servers enrolled:
//! the agents' resident memory at rest, with 2,000 connections held open (`testpod burst`, same
//! node and across nodes), some seconds after they closed, and after a churn of short
//! connections: does what a burst costs come back? `--soak-only` runs just that;
//! `--soak-compare LABEL=PATH` runs it again with another agent binary, side by side.
//!
//! Writes a Markdown report (default `docs/benchmarks.md`) and prints the same tables. Every load
//! is bounded in count and time, stays inside the bed's namespaces, and nothing here asserts on
//! performance: a failed tool run is reported as such, and makes the exit status non-zero.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ambit_tests::util::{self, Netns};
use ambit_tests::{Cluster, ClusterSpec, Node, Pod, PodProcess};
use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use serde_json::Value;

mod cost;
mod waypoint;

const HTTP_PORT: u16 = 8080;
/// nginx's HTTP/2 (h2c, prior knowledge) listener, for the waypoint runs.
const HTTP2_PORT: u16 = 8081;
const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 9000;
/// The body nginx returns (small on purpose: this measures per-request overhead).
const BODY: &str = "ambit bench\n";
/// Time limit for configuration changes and server start-up.
const SETTLE: Duration = Duration::from_secs(20);

#[derive(Parser, Debug)]
#[command(
    name = "bench",
    about = "Ambit benchmark on a cluster in a box (run by `cargo xtask bench`)"
)]
struct Args {
    /// Where to write the Markdown report.
    #[arg(long, default_value = "docs/benchmarks.md")]
    out: PathBuf,
    /// The command recorded in the report as the one that produced it.
    #[arg(long, default_value = "cargo xtask bench")]
    command: String,
    /// HTTP clients of the fixed-rate runs.
    #[arg(long, default_value_t = 4)]
    rate_clients: u32,
    /// Requests per second of each fixed-rate client.
    #[arg(long, default_value_t = 250)]
    rps: u32,
    /// Length of each fixed-rate run, in seconds.
    #[arg(long, default_value_t = 10)]
    rate_seconds: u32,
    /// HTTP clients (connections) of the saturation runs.
    #[arg(long, default_value_t = 16)]
    saturation_clients: u32,
    /// Length of each saturation run, in seconds.
    #[arg(long, default_value_t = 10)]
    saturation_seconds: u32,
    /// Length of each iperf3 run, in seconds.
    #[arg(long, default_value_t = 5)]
    bulk_seconds: u32,
    /// Parallel streams of the multi-stream iperf3 run.
    #[arg(long, default_value_t = 8)]
    bulk_streams: u32,
    /// Connections of each connection-setup run.
    #[arg(long, default_value_t = 2000)]
    churn_count: u32,
    /// Time limit of each connection-setup run, in seconds.
    #[arg(long, default_value_t = 20)]
    churn_seconds: u32,
    /// Seconds of no traffic over which the agents' idle CPU time is measured.
    #[arg(long, default_value_t = 5)]
    idle_seconds: u32,
    /// Run only the memory soak (no throughput scenarios); the report then has only its section.
    #[arg(long)]
    soak_only: bool,
    /// Skip the memory soak (throughput scenarios only), e.g. to compare two builds quickly.
    #[arg(long, conflicts_with_all = ["soak_only", "soak_compare"])]
    no_soak: bool,
    /// Skip the waypoint path (client agent -> waypoint -> server agent).
    #[arg(long)]
    no_waypoint: bool,
    /// Run only the waypoint path (no L4 throughput scenarios, no soak); with `--perf`, the
    /// waypoint is profiled at 64 connections.
    #[arg(long, conflicts_with_all = ["no_waypoint", "soak_only", "compare", "soak_compare"])]
    waypoint_only: bool,
    /// Connections the soak holds open at once, per placement.
    #[arg(long, default_value_t = 2000)]
    soak_connections: u32,
    /// Bytes each held connection exchanges with the echo server before it is held.
    #[arg(long, default_value_t = 16 * 1024)]
    soak_bytes: u64,
    /// Seconds the soak holds its connections.
    #[arg(long, default_value_t = 30)]
    soak_hold_seconds: u32,
    /// Seconds the soak waits after the connections closed (and after the churn) before it
    /// reads the agents' memory.
    #[arg(long, default_value_t = 10)]
    soak_settle_seconds: u32,
    /// Short connections of the churn after each burst.
    #[arg(long, default_value_t = 20_000)]
    soak_churn: u32,
    /// Time limit of each churn, in seconds.
    #[arg(long, default_value_t = 60)]
    soak_churn_seconds: u32,
    /// Also soak another `ambit` binary, `LABEL=PATH` (e.g. a build of the previous revision),
    /// shown beside this build's figures.
    #[arg(long, value_name = "LABEL=PATH")]
    soak_compare: Option<String>,
    /// Also measure the mesh path with another `ambit` binary, `LABEL=PATH` (e.g. a build of
    /// the previous revision): in each placement its mesh scenario runs right after this
    /// build's, on the same bed (the agents are restarted with it and back), so both compare
    /// with the same direct baseline.
    #[arg(long, value_name = "LABEL=PATH")]
    compare: Option<String>,
    /// An extra flag for the agents of the `--compare` runs (repeatable, e.g.
    /// `--compare-agent-arg=--hbone-max-streams-per-connection=1`), to compare settings: PATH
    /// may then be this very build.
    #[arg(
        long,
        value_name = "ARG",
        requires = "compare",
        allow_hyphen_values = true
    )]
    compare_agent_arg: Vec<String>,
    /// Skip the passthrough path (e.g. to compare two builds' mesh path quickly).
    #[arg(long)]
    no_passthrough: bool,
    /// Profile the agents with `perf record` during the mesh path's saturation, 1-stream bulk
    /// and connection-setup runs, and write `perf report` summaries (text) into this directory
    /// (docs/perf/README.md says how to read them).
    #[arg(long, value_name = "DIR")]
    perf: Option<PathBuf>,
    /// Also run the bulk loads (iperf3) on the spliced path. Off by default: the kernel splice
    /// does not bound what it queues, and one spliced iperf3 stream has taken this machine's
    /// 24 GiB (docs/security.md).
    #[arg(long)]
    splice_bulk: bool,
}

/// What a bulk cell holds for a load the bench did not run (the spliced path without
/// `--splice-bulk`).
const NOT_RUN: &str = "not run";

// ---------------------------------------------------------------------------------------------
// paths and placements

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum MeshPath {
    Direct,
    Passthrough,
    Mesh,
    /// Both enrolled, the client's agent running with `--same-node-fast-path=false`: the HBONE
    /// path the fast path replaces (same node only; across nodes it is `Mesh`).
    MeshFastPathOff,
    /// Both enrolled, the client's agent running with `--max-spliced-connections 16384`: the
    /// fast path spliced in the kernel instead of relayed by the agent (same node only).
    MeshSpliced,
}

impl MeshPath {
    const ALL: [MeshPath; 5] = [
        MeshPath::Direct,
        MeshPath::Passthrough,
        MeshPath::MeshFastPathOff,
        MeshPath::MeshSpliced,
        MeshPath::Mesh,
    ];

    /// Paths that run only between pods of one node, on a client's agent restarted for them.
    fn same_node_only(self) -> bool {
        matches!(self, MeshPath::MeshFastPathOff | MeshPath::MeshSpliced)
    }

    /// The client's agent's environment for this path (every variable the paths set, so a
    /// restart returns to the defaults).
    fn agent_env(self) -> [(&'static str, &'static str); 2] {
        let fast_path = if self == MeshPath::MeshFastPathOff {
            "false"
        } else {
            "true"
        };
        let spliced = if self == MeshPath::MeshSpliced {
            "16384"
        } else {
            "0"
        };
        [
            ("AMBIT_SAME_NODE_FAST_PATH", fast_path),
            ("AMBIT_MAX_SPLICED_CONNECTIONS", spliced),
        ]
    }

    fn name(self) -> &'static str {
        match self {
            MeshPath::Direct => "direct",
            MeshPath::Passthrough => "passthrough",
            MeshPath::Mesh => "mesh",
            MeshPath::MeshFastPathOff => "mesh, fast path off",
            MeshPath::MeshSpliced => "mesh, spliced",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Placement {
    SameNode,
    AcrossNodes,
}

impl Placement {
    fn name(self) -> &'static str {
        match self {
            Placement::SameNode => "same node",
            Placement::AcrossNodes => "across nodes",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// tools

/// The absolute path of a tool: `$PATH`, then the sbin directories (nginx lives in /usr/sbin).
fn tool(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("`{name}` not found; `cargo xtask setup` installs it"))
}

/// The tools, and a scratch directory for their files (removed on drop).
struct Tools {
    h2load: PathBuf,
    nginx: PathBuf,
    iperf3: PathBuf,
    testpod: PathBuf,
    /// nginx's config and files, h2load's request logs. Not the bed's run dir: the agents watch
    /// the mesh file's directory and wake up on every event in it, which h2load's log writes
    /// would turn into agent CPU time on every path.
    scratch: PathBuf,
}

impl Drop for Tools {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.scratch);
    }
}

impl Tools {
    fn find() -> Result<Self> {
        let scratch = std::env::temp_dir().join(format!("ambit-bench-{}", std::process::id()));
        fs::create_dir_all(&scratch).with_context(|| format!("mkdir {}", scratch.display()))?;
        Ok(Self {
            h2load: tool("h2load")?,
            nginx: tool("nginx")?,
            iperf3: tool("iperf3")?,
            testpod: ambit_tests::testpod_bin()?,
            scratch,
        })
    }

    /// One line per tool with its version, for the report.
    fn versions(&self) -> Vec<String> {
        let first_line = |program: &Path, arg: &str| {
            Command::new(program)
                .arg(arg)
                .output()
                .ok()
                .map(|o| {
                    // nginx prints its version on stderr.
                    let text = if o.stdout.is_empty() {
                        o.stderr
                    } else {
                        o.stdout
                    };
                    String::from_utf8_lossy(&text)
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .trim()
                        .to_string()
                })
                .unwrap_or_else(|| "unknown".into())
        };
        vec![
            first_line(&self.h2load, "--version"),
            first_line(&self.nginx, "-v"),
            first_line(&self.iperf3, "--version"),
        ]
    }
}

// ---------------------------------------------------------------------------------------------
// servers

/// The server processes of one pod: nginx, iperf3 and the churn echo server.
struct Servers {
    nginx: PodProcess,
    _iperf3: PodProcess,
    _echo: PodProcess,
}

impl Drop for Servers {
    fn drop(&mut self) {
        // A fast shutdown by the master (our child) takes its worker with it; the PodProcess
        // drop then reaps it (or kills it if it is still there).
        let _ = self.nginx.signal(libc::SIGTERM);
        let _ = self.nginx.wait_timeout(Duration::from_secs(5));
    }
}

fn nginx_conf(dir: &Path, ip: IpAddr) -> String {
    let d = dir.display();
    format!(
        "# Written by the Ambit benchmark (tests/src/bin/bench/main.rs).
worker_processes 1;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen {ip}:{HTTP_PORT};
        location / {{
            default_type text/plain;
            return 200 {BODY:?};
        }}
    }}
    server {{
        listen {ip}:{HTTP2_PORT} http2;
        location / {{
            default_type text/plain;
            return 200 {BODY:?};
        }}
    }}
}}
"
    )
}

fn start_servers(pod: &Pod, tools: &Tools) -> Result<Servers> {
    let ip = IpAddr::V4(pod.ip4());
    // nginx: config, pid file, logs and temp dirs in the scratch dir.
    let dir = tools.scratch.join(format!("nginx-{}", pod.name()));
    fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let conf = dir.join("nginx.conf");
    fs::write(&conf, nginx_conf(&dir, ip)).with_context(|| format!("write {}", conf.display()))?;
    let prefix = format!("{}/", dir.display());
    let error_log = dir.join("error.log");
    let mut nginx = pod.spawn(
        &tools.nginx,
        [
            "-p",
            prefix.as_str(),
            "-c",
            &conf.display().to_string(),
            "-e",
            &error_log.display().to_string(),
            "-g",
            "daemon off;",
        ],
    )?;
    let addr = SocketAddr::new(ip, HTTP_PORT);
    let deadline = Instant::now() + SETTLE;
    loop {
        let probe = Netns::enter_thread(pod.netns_path(), || {
            util::http_get(addr, "/", Duration::from_secs(1))
        })?;
        match probe {
            Ok(r) if r.status == 200 && r.body == BODY => break,
            Ok(r) => bail!(
                "nginx in {} answered HTTP {}: {:?}",
                pod.name(),
                r.status,
                r.body
            ),
            Err(e) => {
                if nginx.try_status()?.is_some() || Instant::now() >= deadline {
                    bail!(
                        "nginx in {} not serving on {addr} ({}): {e:#}\nstderr: {}\nerror.log: {}",
                        pod.name(),
                        nginx.describe_status(),
                        nginx.stderr(),
                        util::tail_file(&error_log, 20)
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    let ip_s = ip.to_string();
    let port_s = IPERF_PORT.to_string();
    let mut iperf3 = pod.spawn(
        &tools.iperf3,
        [
            "-s",
            "-B",
            ip_s.as_str(),
            "-p",
            port_s.as_str(),
            "--forceflush",
        ],
    )?;
    let deadline = Instant::now() + SETTLE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = iperf3
            .read_line(left)
            .with_context(|| format!("iperf3 server in {}", pod.name()))?;
        if line.contains("listening") {
            break;
        }
    }
    let echo_port = ECHO_PORT.to_string();
    let mut echo = pod.spawn(
        &tools.testpod,
        [
            "serve",
            "--port",
            echo_port.as_str(),
            "--bind",
            ip_s.as_str(),
        ],
    )?;
    echo.read_json_until(SETTLE, |v| v["event"] == "listening")?;
    Ok(Servers {
        nginx,
        _iperf3: iperf3,
        _echo: echo,
    })
}

// ---------------------------------------------------------------------------------------------
// enrolment

/// `namespace/name` of the enrolled pods in a node's config dump.
fn enrolled_uids(node: &Node) -> Result<BTreeSet<String>> {
    let dump = node.config_dump()?;
    let list = dump["enrolled"].as_array().ok_or_else(|| {
        anyhow!(
            "config_dump of {} has no `enrolled` list: {dump}",
            node.name()
        )
    })?;
    Ok(list
        .iter()
        .filter_map(|e| e.as_str().or_else(|| e["uid"].as_str()))
        .map(str::to_string)
        .collect())
}

/// Restarts node `i`'s agent with the environment `path` needs, keeping the peak memory of the
/// agent it stops in `earlier_hwm`. Enrolment is waited for by the next [`set_enrolment`].
fn restart_agent(
    cluster: &Cluster,
    i: usize,
    path: MeshPath,
    earlier_hwm: &mut [Option<u64>],
) -> Result<()> {
    let node = cluster.node(i);
    if let Some(pid) = node.agent_pid() {
        earlier_hwm[i] = earlier_hwm[i].max(util::proc_status_kb(pid, "VmHWM"));
    }
    let env = path.agent_env();
    println!("restarting {}'s agent with {env:?}", node.name());
    for (key, value) in env {
        node.set_agent_env(key, value);
    }
    node.stop_agent()?;
    node.start_agent()?;
    node.wait_ready(SETTLE)?;
    Ok(())
}

/// Enrols exactly `enrolled` (every other pod un-enrolled) through the mesh file, and waits until
/// both agents have loaded it and enrolled exactly those pods. The agents keep running.
fn set_enrolment(cluster: &Cluster, enrolled: &[&Pod]) -> Result<()> {
    for p in cluster.pods() {
        p.set_enrolled(enrolled.iter().any(|e| e.name() == p.name()));
    }
    let text = cluster.mesh().to_yaml()?;
    let current = fs::read_to_string(cluster.mesh_path()).unwrap_or_default();
    if text != current {
        let generations = cluster
            .nodes()
            .iter()
            .map(Node::config_generation)
            .collect::<Result<Vec<_>>>()?;
        cluster.write_mesh()?;
        for (node, g) in cluster.nodes().iter().zip(generations) {
            node.wait_config_generation(g + 1, SETTLE)?;
        }
    }
    for node in cluster.nodes() {
        let want: BTreeSet<String> = cluster
            .pods_on(node.index())
            .iter()
            .filter(|p| p.enrolled())
            .map(|p| format!("{}/{}", p.namespace(), p.name()))
            .collect();
        let deadline = Instant::now() + SETTLE;
        loop {
            let have = enrolled_uids(node)?;
            if have == want {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "{}: enrolled {have:?}, expected {want:?}\n{}",
                    node.name(),
                    cluster.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// measurements

/// A command line as run, for the report (program by name, not path).
fn show(program: &str, args: &[String]) -> String {
    std::iter::once(program.to_string())
        .chain(args.iter().map(|a| {
            if a.contains(' ') || a.contains(';') {
                format!("'{a}'")
            } else {
                a.clone()
            }
        }))
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Clone, Debug)]
struct Http {
    /// Achieved rate: successful requests per second of the run.
    rate: f64,
    succeeded: u64,
    /// Requests that failed, errored or timed out.
    failed: u64,
    /// Latency percentiles in microseconds.
    p50: f64,
    p90: f64,
    p99: f64,
    /// The whole machine's CPU time while the tool ran (not while its log was read after).
    machine: Option<cost::Spent>,
}

/// A duration as h2load prints it (`10.00s`, `150.23ms`, `823us`), in seconds.
fn h2load_duration(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        (s, 1.0)
    };
    num.trim().parse::<f64>().ok().map(|v| v * scale)
}

/// What h2load's text output says.
struct H2loadSummary {
    /// Length of the run, in seconds.
    duration: f64,
    /// Requests per second as h2load computes it.
    rate: f64,
    /// The counters of the `requests:` line (`total`, `succeeded`, `failed`, ...).
    counters: Vec<(String, u64)>,
}

fn parse_h2load(text: &str) -> Result<H2loadSummary> {
    let finished = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("finished in "))
        .ok_or_else(|| anyhow!("no `finished in` line in h2load output:\n{text}"))?;
    let mut parts = finished.split(',').map(str::trim);
    let duration = parts
        .next()
        .and_then(h2load_duration)
        .ok_or_else(|| anyhow!("bad `finished in` line: {finished:?}"))?;
    let rate = parts
        .find(|p| p.ends_with("req/s"))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .ok_or_else(|| anyhow!("no req/s in `finished in` line: {finished:?}"))?;
    let requests = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("requests:"))
        .ok_or_else(|| anyhow!("no `requests:` line in h2load output:\n{text}"))?;
    let counters = requests
        .split(',')
        .filter_map(|c| {
            let mut w = c.split_whitespace();
            let n = w.next()?.parse::<u64>().ok()?;
            Some((w.next()?.to_string(), n))
        })
        .collect();
    Ok(H2loadSummary {
        duration,
        rate,
        counters,
    })
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

/// Response times (µs) of the successful requests in h2load's `--log-file` (tab-separated:
/// start time in µs since the epoch, status code or -1, µs until the end of the response).
fn h2load_latencies(log: &Path) -> Result<Vec<u64>> {
    let text = fs::read_to_string(log).with_context(|| format!("read {}", log.display()))?;
    let mut v: Vec<u64> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let _start = f.next()?;
            let status: i32 = f.next()?.trim().parse().ok()?;
            let micros: u64 = f.next()?.trim().parse().ok()?;
            (200..400).contains(&status).then_some(micros)
        })
        .collect();
    v.sort_unstable();
    Ok(v)
}

fn run_h2load(
    client: &Pod,
    tools: &Tools,
    args: &[String],
    log: &Path,
    seconds: u32,
) -> Result<Http> {
    let machine = cost::MachineCpu::now();
    let mut p = client.spawn(&tools.h2load, args)?;
    let (status, lines) = p.wait_output(Duration::from_secs(u64::from(seconds) + 30))?;
    let machine = machine.and_then(cost::MachineCpu::since);
    let text = lines.join("\n");
    let H2loadSummary {
        duration,
        rate,
        counters,
    } = parse_h2load(&text).with_context(|| {
        format!(
            "{} ({status}); stderr: {}",
            show("h2load", args),
            p.stderr().trim()
        )
    })?;
    let count = |k: &str| {
        counters
            .iter()
            .find(|(name, _)| name == k)
            .map_or(0, |(_, n)| *n)
    };
    let lat = h2load_latencies(log)?;
    if lat.is_empty() {
        bail!("h2load logged no successful request ({status}):\n{text}");
    }
    let succeeded = count("succeeded");
    let rate = if rate > 0.0 || duration <= 0.0 {
        rate
    } else {
        succeeded as f64 / duration
    };
    let _ = fs::remove_file(log);
    Ok(Http {
        rate,
        succeeded,
        failed: count("failed") + count("errored") + count("timeout"),
        p50: percentile(&lat, 50.0),
        p90: percentile(&lat, 90.0),
        p99: percentile(&lat, 99.0),
        machine,
    })
}

/// What one iperf3 run moved.
#[derive(Clone, Copy, Debug)]
struct Bulk {
    /// Receiver-side throughput, in Gbit/s.
    gbps: f64,
    /// Bytes the receiver got.
    bytes: u64,
    /// The whole machine's CPU time while iperf3 ran.
    machine: Option<cost::Spent>,
}

/// iperf3's receiver-side throughput and bytes.
fn run_iperf3(client: &Pod, tools: &Tools, args: &[String], seconds: u32) -> Result<Bulk> {
    let machine = cost::MachineCpu::now();
    let mut p = client.spawn(&tools.iperf3, args)?;
    let (status, lines) = p.wait_output(Duration::from_secs(u64::from(seconds) + 30))?;
    let machine = machine.and_then(cost::MachineCpu::since);
    let text = lines.join("\n");
    let v: Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "iperf3 output is not JSON ({status}): {text}\nstderr: {}",
            p.stderr()
        )
    })?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let end = &v["end"];
    let sum = if end["sum_received"].is_object() {
        &end["sum_received"]
    } else {
        &end["sum"]
    };
    let gbps = sum["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .ok_or_else(|| {
            anyhow!("no end.sum_received.bits_per_second in iperf3 output ({status})")
        })?;
    Ok(Bulk {
        gbps,
        bytes: sum["bytes"].as_u64().unwrap_or(0),
        machine,
    })
}

#[derive(Clone, Debug)]
struct Churn {
    per_second: f64,
    ok: u64,
    failed: u64,
    first_error: Option<String>,
}

fn run_churn(client: &Pod, tools: &Tools, args: &[String], seconds: u32) -> Result<Churn> {
    let mut p = client.spawn(&tools.testpod, args)?;
    let (status, lines) = p.wait_json(Duration::from_secs(u64::from(seconds) + 20))?;
    let r = lines
        .last()
        .ok_or_else(|| anyhow!("testpod churn printed nothing ({status})"))?;
    let ok = r["ok"].as_u64().unwrap_or(0);
    let failed = r["failed"].as_u64().unwrap_or(0);
    let ms = r["elapsed_ms"].as_u64().unwrap_or(0);
    if ok == 0 || ms == 0 {
        bail!("testpod churn: no connection succeeded: {r}");
    }
    Ok(Churn {
        per_second: ok as f64 * 1000.0 / ms as f64,
        ok,
        failed,
        first_error: r["first_error"].as_str().map(str::to_string),
    })
}

// ---------------------------------------------------------------------------------------------
// agents: CPU, memory, access log

/// utime + stime of a process, in seconds (all its threads).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2 (comm) is in parentheses and may contain spaces: split after it; the rest starts
    // at field 3, so utime (14) and stime (15) are at 11 and 12.
    let rest: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let ticks: u64 = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / cost::clock_ticks())
}

/// CPU seconds of every node's agent (NaN for one that is not running).
fn agents_cpu(cluster: &Cluster) -> Vec<f64> {
    cluster
        .nodes()
        .iter()
        .map(|n| n.agent_pid().and_then(cpu_seconds).unwrap_or(f64::NAN))
        .collect()
}

/// `n0 0.12 s, n1 0.03 s`.
fn per_agent(cpu: &[f64]) -> String {
    cpu.iter()
        .enumerate()
        .map(|(i, c)| format!("n{i} {c:.2} s"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The peak resident memory (VmHWM, kB) of every node's agent since the previous call, or since
/// it started: read, then reset to what it holds now (`5` in `/proc/<pid>/clear_refs`), so the
/// next call gives the next load's peak. Whoever keeps a peak over several loads folds every
/// call's result ([`fold_peaks`]): the kernel's own figure no longer spans them.
fn take_peaks(cluster: &Cluster) -> Vec<Option<u64>> {
    cluster
        .nodes()
        .iter()
        .map(|n| {
            let pid = n.agent_pid()?;
            let peak = util::proc_status_kb(pid, "VmHWM");
            if let Err(err) = fs::write(format!("/proc/{pid}/clear_refs"), "5") {
                println!("    (could not reset {}'s peak memory: {err})", n.name());
            }
            peak
        })
        .collect()
}

/// Raises each of `into` to the matching peak of `peaks`.
fn fold_peaks(into: &mut [Option<u64>], peaks: &[Option<u64>]) {
    for (h, p) in into.iter_mut().zip(peaks) {
        *h = (*h).max(*p);
    }
}

fn delta(after: &[f64], before: &[f64]) -> Vec<f64> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

fn log_len(node: &Node) -> u64 {
    fs::metadata(node.agent_log_path()).map_or(0, |m| m.len())
}

fn log_since(node: &Node, offset: u64) -> String {
    let mut s = String::new();
    if let Ok(mut f) = fs::File::open(node.agent_log_path())
        && f.seek(SeekFrom::Start(offset)).is_ok()
    {
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        s = String::from_utf8_lossy(&buf).into_owned();
    }
    s
}

/// What the agents' access logs say about the connections to one server during one scenario.
#[derive(Clone, Debug, Default)]
struct Access {
    outbound: usize,
    inbound: usize,
    /// Some line says the connection was carried by HBONE / mutual TLS.
    hbone: bool,
    /// Lines the same-node fast path marks as spliced in the kernel.
    spliced: usize,
    /// Lines the same-node fast path marks as relayed by the agent.
    relayed: usize,
}

/// Whether an access-log line says HBONE or mutual TLS anywhere (e.g. `"security":"mTLS"`, a
/// `connection_security_policy` of `mutual_tls`, an `hbone` direction or upstream port 15008).
fn says_hbone(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.iter().any(|(k, v)| {
            let key = k.to_ascii_lowercase();
            let s = v.as_str().map(str::to_ascii_lowercase).unwrap_or_default();
            (key.contains("security") || key.contains("tls") || key.contains("protocol"))
                && (s.contains("mtls") || s.contains("mutual") || s.contains("hbone"))
                || s == "hbone"
                || s.starts_with("inbound_hbone")
                || (key == "upstream" && s.ends_with(":15008"))
                || (key.contains("hbone") && v.as_bool() == Some(true))
                || (v.is_object() && says_hbone(v))
        }),
        _ => false,
    }
}

impl Access {
    /// How the agents carried the connections between two meshed pods, as the log says.
    fn carried(&self) -> &'static str {
        match (self.spliced, self.relayed) {
            (0, 0) if self.hbone => "HBONE mTLS between the agents",
            (0, 0) => "plaintext (both agents)",
            (_, 0) => "same-node fast path, spliced in the kernel",
            (0, _) => "same-node fast path, relayed by the agent",
            _ => "same-node fast path, spliced or relayed",
        }
    }
}

fn access_summary(cluster: &Cluster, offsets: &[u64], server: IpAddr) -> Access {
    let prefix = match server {
        IpAddr::V4(ip) => format!("{ip}:"),
        IpAddr::V6(ip) => format!("[{ip}]:"),
    };
    let mut a = Access::default();
    for (node, &off) in cluster.nodes().iter().zip(offsets) {
        for line in log_since(node, off).lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let fields = if v["fields"].is_object() {
                &v["fields"]
            } else {
                &v
            };
            if v["target"] != "access" && fields["target"] != "access" {
                continue;
            }
            let to_server = ["dst", "upstream", "destination"]
                .iter()
                .any(|k| fields[*k].as_str().is_some_and(|s| s.starts_with(&prefix)));
            if !to_server {
                continue;
            }
            if fields["direction"] == "outbound" {
                a.outbound += 1;
            } else {
                a.inbound += 1;
            }
            a.hbone |= says_hbone(&v);
            match fields["fast_path"].as_str() {
                Some("splice") => a.spliced += 1,
                Some("relay") => a.relayed += 1,
                _ => {}
            }
        }
    }
    a
}

// ---------------------------------------------------------------------------------------------
// one scenario

struct Scenario {
    path: MeshPath,
    placement: Placement,
    /// The agent binary, when not this build (`--compare`): its label.
    build: Option<String>,
    fixed: Result<Http, String>,
    saturation: Result<Http, String>,
    bulk1: Result<Bulk, String>,
    bulk_n: Result<Bulk, String>,
    churn: Result<Churn, String>,
    /// Agent CPU seconds per node during the fixed-rate run, the saturation run, the bulk runs,
    /// the scenario.
    cpu_fixed: Vec<f64>,
    cpu_saturation: Vec<f64>,
    cpu_bulk1: Vec<f64>,
    cpu_bulk_n: Vec<f64>,
    cpu_churn: Vec<f64>,
    cpu_total: Vec<f64>,
    /// Each agent's peak resident memory (kB) before the first load (since the previous
    /// scenario: enrolment, restarts), then during each load in the order above.
    peak_before: Vec<Option<u64>>,
    peak_fixed: Vec<Option<u64>>,
    peak_saturation: Vec<Option<u64>>,
    peak_bulk1: Vec<Option<u64>>,
    peak_bulk_n: Vec<Option<u64>>,
    peak_churn: Vec<Option<u64>>,
    access: Access,
}

impl Scenario {
    /// Every peak the scenario read, before and during its loads.
    fn peaks(&self) -> [&[Option<u64>]; 6] {
        [
            &self.peak_before,
            &self.peak_fixed,
            &self.peak_saturation,
            &self.peak_bulk1,
            &self.peak_bulk_n,
            &self.peak_churn,
        ]
    }

    /// Agent CPU seconds (both agents) per GB that iperf3 moved, `None` without a run.
    fn cpu_per_gb(bulk: &Result<Bulk, String>, cpu: &[f64]) -> Option<f64> {
        let bulk = bulk.as_ref().ok()?;
        (bulk.bytes > 0).then(|| cpu.iter().sum::<f64>() / (bulk.bytes as f64 / 1e9))
    }

    /// What the agents did on this path, from the access log.
    fn what(&self) -> &'static str {
        match self.path {
            MeshPath::Direct => "no agent",
            MeshPath::Passthrough => "client's agent, plaintext to the destination",
            MeshPath::Mesh | MeshPath::MeshFastPathOff | MeshPath::MeshSpliced => {
                self.access.carried()
            }
        }
    }

    /// A warning when the access log does not show the path this scenario meant to take.
    fn path_warning(&self) -> Option<String> {
        let Access {
            outbound, inbound, ..
        } = self.access;
        match self.path {
            MeshPath::Direct if outbound + inbound > 0 => Some(format!(
                "agents logged {} connections to the server on the direct path",
                outbound + inbound
            )),
            MeshPath::Passthrough if outbound == 0 || inbound > 0 => Some(format!(
                "expected outbound-only access-log lines, saw {outbound} outbound and {inbound} inbound"
            )),
            MeshPath::Mesh | MeshPath::MeshFastPathOff | MeshPath::MeshSpliced
                if outbound == 0 || inbound == 0 =>
            {
                Some(format!(
                    "expected outbound and inbound access-log lines, saw {outbound} outbound and {inbound} inbound"
                ))
            }
            MeshPath::MeshFastPathOff if self.access.spliced + self.access.relayed > 0 => {
                Some("the fast path carried connections with --same-node-fast-path=false".into())
            }
            MeshPath::Mesh
                if self.placement == Placement::SameNode
                    && (self.access.relayed == 0 || self.access.spliced > 0) =>
            {
                Some("the same-node fast path did not relay every connection".into())
            }
            MeshPath::MeshSpliced if self.access.spliced == 0 => {
                Some("the same-node fast path spliced no connection".into())
            }
            _ => None,
        }
    }
}

/// The command lines of one scenario (the report shows them with `$SERVER`).
struct Commands {
    fixed: Vec<String>,
    saturation: Vec<String>,
    bulk1: Vec<String>,
    bulk_n: Vec<String>,
    churn: Vec<String>,
}

fn commands(args: &Args, server: &str, log_dir: &Path, tag: &str) -> Commands {
    let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    let url = format!("http://{server}:{HTTP_PORT}/");
    let log = |kind: &str| format!("--log-file={}/h2load-{tag}-{kind}.log", log_dir.display());
    let iperf = |streams: u32| {
        s(&[
            "-c",
            server,
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            &args.bulk_seconds.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
            "--connect-timeout",
            "5000",
        ])
    };
    Commands {
        fixed: s(&[
            "--h1",
            "-t",
            "1",
            "-c",
            &args.rate_clients.to_string(),
            "--rps",
            &args.rps.to_string(),
            "-D",
            &format!("{}s", args.rate_seconds),
            "-N",
            "5s",
            &log("rate"),
            &url,
        ]),
        saturation: s(&[
            "--h1",
            "-t",
            "1",
            "-c",
            &args.saturation_clients.to_string(),
            "-D",
            &format!("{}s", args.saturation_seconds),
            "-N",
            "5s",
            &log("saturation"),
            &url,
        ]),
        bulk1: iperf(1),
        bulk_n: iperf(args.bulk_streams),
        churn: s(&[
            "churn",
            "--connect",
            &format!("{server}:{ECHO_PORT}"),
            "--count",
            &args.churn_count.to_string(),
            "--max-seconds",
            &args.churn_seconds.to_string(),
            "--timeout-ms",
            "2000",
        ]),
    }
}

fn log_file_of(args: &[String]) -> PathBuf {
    args.iter()
        .find_map(|a| a.strip_prefix("--log-file="))
        .map(PathBuf::from)
        .unwrap_or_default()
}

fn report<T>(what: &str, r: Result<T>, show: impl Fn(&T) -> String) -> Result<T, String> {
    match r {
        Ok(v) => {
            println!("    {what}: {}", show(&v));
            Ok(v)
        }
        Err(e) => {
            let e = format!("{e:#}");
            println!("    {what}: FAILED: {e}");
            Err(e)
        }
    }
}

fn show_http(h: &Http) -> String {
    format!(
        "{:.0} req/s, p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, {} failed",
        h.rate,
        h.p50 / 1000.0,
        h.p90 / 1000.0,
        h.p99 / 1000.0,
        h.failed
    )
}

/// `perf record` (and `perf stat`) of the agents, or of a waypoint, while one load runs
/// (`--perf`).
struct Profile {
    record: std::process::Child,
    stat: std::process::Child,
    data: PathBuf,
    stat_out: PathBuf,
    report: PathBuf,
    title: String,
    /// The processes profiled, for the report's first line ("both agents").
    who: String,
}

/// Starts profiling the agents if `--perf` asked for it, for a report named `name`.
fn start_profile(cluster: &Cluster, args: &Args, name: &str, title: &str) -> Option<Profile> {
    let agents: Vec<u32> = cluster.nodes().iter().filter_map(Node::agent_pid).collect();
    start_profile_of(&agents, "both agents", args, name, title)
}

/// Starts profiling the processes `pids` (`who` names them in the report) if `--perf` asked
/// for it, for a report named `name`.
fn start_profile_of(
    pids: &[u32],
    who: &str,
    args: &Args,
    name: &str,
    title: &str,
) -> Option<Profile> {
    let dir = args.perf.as_ref()?;
    let started = (|| -> Result<Profile> {
        let perf = tool("perf")?;
        fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let pids = pids
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let data = std::env::temp_dir().join(format!("ambit-bench-{name}.perf.data"));
        let stat_out = std::env::temp_dir().join(format!("ambit-bench-{name}.perf-stat.txt"));
        let quiet = || std::process::Stdio::null();
        let record = Command::new(&perf)
            .args([
                "record",
                "-F",
                "499",
                "--call-graph",
                "dwarf,16384",
                "-p",
                &pids,
            ])
            .arg("-o")
            .arg(&data)
            .stdout(quiet())
            .stderr(quiet())
            .spawn()
            .context("perf record")?;
        let stat = Command::new(&perf)
            .args([
                "stat",
                "-e",
                "task-clock,context-switches,cpu-migrations,page-faults,raw_syscalls:sys_enter",
                "-p",
                &pids,
            ])
            .arg("-o")
            .arg(&stat_out)
            .stdout(quiet())
            .stderr(quiet())
            .spawn()
            .context("perf stat")?;
        // perf attaches asynchronously; give it a moment before the load starts.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Profile {
            record,
            stat,
            data,
            stat_out,
            report: dir.join(format!("{name}.txt")),
            title: title.to_string(),
            who: who.to_string(),
        })
    })();
    match started {
        Ok(p) => Some(p),
        Err(e) => {
            println!("    perf: not started: {e:#}");
            None
        }
    }
}

/// Stops the profile and writes its report: `perf stat`'s counters, the flat profile by
/// symbol, and the callers of the hottest symbols.
fn finish_profile(profile: Option<Profile>) {
    let Some(mut p) = profile else {
        return;
    };
    let finished = (|| -> Result<()> {
        for child in [&mut p.record, &mut p.stat] {
            // Our own children, by PID: SIGINT makes perf write out what it has.
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            child.wait()?;
        }
        let perf = tool("perf")?;
        let data = p.data.display().to_string();
        let report = |extra: &[&str]| -> Result<String> {
            let out = Command::new(&perf)
                .args(["report", "-i", &data, "--stdio", "--no-children"])
                .args(extra)
                .output()
                .context("perf report")?;
            Ok(String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.trim().is_empty() && !l.starts_with("# ") && *l != "#")
                // perf pads every line with empty columns (`-`).
                .map(|l| l.trim_end_matches([' ', '-']))
                .collect::<Vec<_>>()
                .join("\n"))
        };
        let stat = fs::read_to_string(&p.stat_out).unwrap_or_default();
        let objects = report(&["-g", "none", "--sort", "dso", "--percent-limit", "0.5"])?;
        let flat = report(&[
            "-g",
            "none",
            "--sort",
            "dso,symbol",
            "--percent-limit",
            "0.4",
        ])?;
        // With what they call: where the agent's own code (and the libraries it drives) spends.
        let inclusive = report(&[
            "--children",
            "--sort",
            "symbol",
            "-g",
            "none",
            "--percent-limit",
            "1",
        ])?
        .lines()
        .filter(|l| {
            [
                "ambit::",
                "h2::",
                "rustls::",
                "tokio_rustls::",
                "hyper::",
                "tracing_subscriber::",
                "prometheus::",
            ]
            .iter()
            .any(|k| l.contains(k))
        })
        .take(50)
        .collect::<Vec<_>>()
        .join("\n");
        let callers = report(&[
            "-g",
            "caller,0.5,callee,function,percent",
            "--sort",
            "symbol",
            "--percent-limit",
            "2",
            "--max-stack",
            "24",
        ])?;
        let text = format!(
            "# {}\n\nWritten by `cargo xtask bench -- --perf DIR` (tests/src/bin/bench/main.rs): \
             `perf record -F 499 --call-graph dwarf` and `perf stat` of {} for the \
             length of the run, then `perf report --no-children`.\n\n\
             ## perf stat\n\n```\n{}\n```\n\n## By object (self time; the kernel's share is \
             system calls, TCP and scheduling)\n\n```\n{objects}\n```\n\n## Flat profile (self \
             time, by object and symbol; at least 0.4%)\n\n```\n{flat}\n```\n\n## Inclusive time \
             of the agent's functions and the libraries it drives (with their callees; the \
             first column includes the callees, the second is self time)\n\n```\n{inclusive}\n\
             ```\n\n## Callers of the \
             symbols with at least 2% (call chains from DWARF unwinding; deep stacks are \
             cut)\n\n```\n{callers}\n```\n",
            p.title,
            p.who,
            stat.lines()
                .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
                .collect::<Vec<_>>()
                .join("\n"),
        );
        fs::write(&p.report, text).with_context(|| format!("write {}", p.report.display()))?;
        println!("    perf: {}", p.report.display());
        Ok(())
    })();
    if let Err(e) = finished {
        println!("    perf: FAILED: {e:#}");
    }
    let _ = fs::remove_file(&p.data);
    let _ = fs::remove_file(&p.stat_out);
}

#[allow(clippy::too_many_arguments)]
fn run_scenario(
    cluster: &Cluster,
    args: &Args,
    tools: &Tools,
    path: MeshPath,
    placement: Placement,
    build: Option<&str>,
    client: &Pod,
    server: &Pod,
) -> Scenario {
    println!(
        "==> {} / {}{} ({} -> {})",
        placement.name(),
        path.name(),
        build.map(|b| format!(" ({b})")).unwrap_or_default(),
        client.name(),
        server.name()
    );
    let tag = format!("{}-{}", server.name(), path.name());
    // A profile name per placement and build, for `--perf`.
    let profile_name = |load: &str| {
        let placement = match placement {
            Placement::SameNode => "same-node",
            Placement::AcrossNodes => "across-nodes",
        };
        let build: String = build
            .unwrap_or("this-build")
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        format!("{placement}-{load}-{build}")
    };
    let profiled = path == MeshPath::Mesh;
    let title = |load: &str| {
        format!(
            "Agents at {load}, {} mesh path, {}",
            placement.name(),
            build.unwrap_or("this build")
        )
    };
    let ip = server.ip4().to_string();
    let cmds = commands(args, &ip, &tools.scratch, &tag);
    let offsets: Vec<u64> = cluster.nodes().iter().map(log_len).collect();
    let start_cpu = agents_cpu(cluster);
    let peak_before = take_peaks(cluster);

    let before = agents_cpu(cluster);
    let fixed = report(
        "fixed rate",
        run_h2load(
            client,
            tools,
            &cmds.fixed,
            &log_file_of(&cmds.fixed),
            args.rate_seconds,
        ),
        show_http,
    );
    let cpu_fixed = delta(&agents_cpu(cluster), &before);
    let peak_fixed = take_peaks(cluster);

    let profile = profiled
        .then(|| {
            start_profile(
                cluster,
                args,
                &profile_name("saturation"),
                &title(&format!(
                    "HTTP saturation ({} connections)",
                    args.saturation_clients
                )),
            )
        })
        .flatten();
    let before = agents_cpu(cluster);
    let saturation = report(
        "saturation",
        run_h2load(
            client,
            tools,
            &cmds.saturation,
            &log_file_of(&cmds.saturation),
            args.saturation_seconds,
        ),
        show_http,
    );
    let cpu_saturation = delta(&agents_cpu(cluster), &before);
    let peak_saturation = take_peaks(cluster);
    finish_profile(profile);

    let gbps = |b: &Bulk| format!("{:.2} Gbit/s", b.gbps);
    let profile = profiled
        .then(|| {
            start_profile(
                cluster,
                args,
                &profile_name("bulk1"),
                &title("bulk throughput (iperf3, 1 stream)"),
            )
        })
        .flatten();
    let bulk_runs = path != MeshPath::MeshSpliced || args.splice_bulk;
    let iperf3 = |what: &str, cmd: &[String]| {
        if bulk_runs {
            report(
                what,
                run_iperf3(client, tools, cmd, args.bulk_seconds),
                gbps,
            )
        } else {
            println!("    {what}: {NOT_RUN} (the splice does not bound its queue; --splice-bulk)");
            Err(NOT_RUN.to_string())
        }
    };
    let before = agents_cpu(cluster);
    let bulk1 = iperf3("bulk, 1 stream", &cmds.bulk1);
    let cpu_bulk1 = delta(&agents_cpu(cluster), &before);
    let peak_bulk1 = take_peaks(cluster);
    finish_profile(profile);
    let before = agents_cpu(cluster);
    let bulk_n = iperf3(
        &format!("bulk, {} streams", args.bulk_streams),
        &cmds.bulk_n,
    );
    let cpu_bulk_n = delta(&agents_cpu(cluster), &before);
    let peak_bulk_n = take_peaks(cluster);
    let profile = profiled
        .then(|| {
            start_profile(
                cluster,
                args,
                &profile_name("churn"),
                &title("connection setup (sequential short connections)"),
            )
        })
        .flatten();
    let before = agents_cpu(cluster);
    let churn = report(
        "connection setup",
        run_churn(client, tools, &cmds.churn, args.churn_seconds),
        |c| {
            format!(
                "{:.0} connections/s ({} ok, {} failed)",
                c.per_second, c.ok, c.failed
            )
        },
    );
    // Access-log lines are written when connections end: give the last ones a moment.
    std::thread::sleep(Duration::from_millis(500));
    let cpu_churn = delta(&agents_cpu(cluster), &before);
    let peak_churn = take_peaks(cluster);
    finish_profile(profile);
    let cpu_total = delta(&agents_cpu(cluster), &start_cpu);
    let access = access_summary(cluster, &offsets, IpAddr::V4(server.ip4()));
    let s = Scenario {
        path,
        placement,
        build: build.map(str::to_string),
        fixed,
        saturation,
        bulk1,
        bulk_n,
        churn,
        cpu_fixed,
        cpu_saturation,
        cpu_bulk1,
        cpu_bulk_n,
        cpu_churn,
        cpu_total,
        peak_before,
        peak_fixed,
        peak_saturation,
        peak_bulk1,
        peak_bulk_n,
        peak_churn,
        access,
    };
    println!(
        "    agents: {}; access log: {} outbound, {} inbound; agent CPU {}",
        s.what(),
        s.access.outbound,
        s.access.inbound,
        per_agent(&s.cpu_total)
    );
    if let Some(w) = s.path_warning() {
        println!("    WARNING: {w}");
    }
    s
}

// ---------------------------------------------------------------------------------------------
// soak: does the agents' memory come back after a burst?

/// The agents' resident memory at one moment of the soak.
#[derive(Clone, Debug)]
struct MemSample {
    phase: String,
    /// VmRSS of each node's agent, in kB.
    rss_kb: Vec<Option<u64>>,
}

/// One soak run with one agent binary.
struct Soak {
    /// What ran: "this build" or the comparison's label.
    label: String,
    samples: Vec<MemSample>,
    /// VmHWM of each agent at the end (the agents start fresh for the soak).
    hwm_kb: Vec<Option<u64>>,
    /// The access log showed both agents' sides of every server's connections, authenticated.
    hbone: bool,
    /// How the access log says the same-node connections were carried.
    same_node: &'static str,
    errors: Vec<String>,
}

fn agents_rss(cluster: &Cluster) -> Vec<Option<u64>> {
    cluster
        .nodes()
        .iter()
        .map(|n| n.agent_pid().and_then(|p| util::proc_status_kb(p, "VmRSS")))
        .collect()
}

fn show_kb(v: Option<u64>) -> String {
    v.map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

/// The soak's command lines (the report shows them with `$SERVER`).
fn soak_commands(args: &Args, server: &str) -> (Vec<String>, Vec<String>) {
    let target = format!("{server}:{ECHO_PORT}");
    let burst = [
        "burst",
        "--connect",
        &target,
        "--count",
        &args.soak_connections.to_string(),
        "--bytes",
        &args.soak_bytes.to_string(),
        "--hold-seconds",
        // An upper bound: the bench closes them through stdin after its own hold.
        &(args.soak_hold_seconds + 120).to_string(),
    ]
    .map(String::from)
    .to_vec();
    let churn = [
        "churn",
        "--connect",
        &target,
        "--count",
        &args.soak_churn.to_string(),
        "--max-seconds",
        &args.soak_churn_seconds.to_string(),
        "--timeout-ms",
        "2000",
    ]
    .map(String::from)
    .to_vec();
    (burst, churn)
}

/// Holds `soak_connections` connections from `client` to `server`'s echo server for
/// `soak_hold_seconds`, then closes them; returns an error description if any failed.
fn soak_burst(
    cluster: &Cluster,
    args: &Args,
    tools: &Tools,
    client: &Pod,
    burst: &[String],
    samples: &mut Vec<MemSample>,
    what: &str,
) -> Result<()> {
    let mut p = client.spawn(&tools.testpod, burst)?;
    // Opening is sequential: allow 50 ms per connection on a loaded machine, plus a margin.
    let open_limit = Duration::from_millis(50 * u64::from(args.soak_connections) + 60_000);
    let opened = p
        .read_json_until(open_limit, |v| v["event"] == "opened")
        .with_context(|| format!("testpod burst ({}); stderr: {}", what, p.stderr()))?;
    println!(
        "    {what}: {} open ({} failed) in {} ms",
        opened["open"], opened["failed"], opened["elapsed_ms"]
    );
    std::thread::sleep(Duration::from_secs(args.soak_hold_seconds.into()));
    samples.push(MemSample {
        phase: format!(
            "{what}: {} connections held for {} s",
            opened["open"], args.soak_hold_seconds
        ),
        rss_kb: agents_rss(cluster),
    });
    p.write_line("close")?;
    let close_limit = Duration::from_millis(50 * u64::from(args.soak_connections) + 60_000);
    let closed = p.read_json_until(close_limit, |v| v["event"] == "closed")?;
    let _ = p.wait_timeout(Duration::from_secs(10));
    if opened["failed"] != 0 || closed["clean"] != args.soak_connections {
        bail!(
            "testpod burst: {} of {} failed to open, {} closed cleanly; first error: {}",
            opened["failed"],
            args.soak_connections,
            closed["clean"],
            closed["first_error"]
        );
    }
    Ok(())
}

/// Restarts both agents (with `ambit`), enrols the client and both servers, and measures the
/// agents' resident memory at rest, with a burst of held connections, after they closed and
/// after a churn of short connections, same node and across nodes.
fn run_soak(
    cluster: &mut Cluster,
    args: &Args,
    tools: &Tools,
    label: &str,
    ambit: &Path,
) -> Result<Soak> {
    println!("==> memory soak: {label} ({})", ambit.display());
    cluster.stop_agents()?;
    cluster.set_ambit_bin(ambit);
    let cluster = &*cluster;
    for n in cluster.nodes() {
        n.start_agent()?;
    }
    for n in cluster.nodes() {
        n.wait_ready(Duration::from_secs(60))?;
    }
    let (client, same, across) = (cluster.pod(0, 0), cluster.pod(0, 1), cluster.pod(1, 0));
    set_enrolment(cluster, &[client, same, across])?;
    let offsets: Vec<u64> = cluster.nodes().iter().map(log_len).collect();
    let settle = Duration::from_secs(args.soak_settle_seconds.into());
    let mut errors = Vec::new();
    // Warm-up: the first tunnels, certificates and pooled connections exist before the
    // baseline is read, as they would on any node that has served traffic.
    for server in [same, across] {
        let (_, churn) = soak_commands(args, &server.ip4().to_string());
        let mut warm = churn.clone();
        warm[4] = "100".into();
        if let Err(e) = run_churn(client, tools, &warm, args.soak_churn_seconds) {
            errors.push(format!("{label}, warm-up to {}: {e:#}", server.name()));
        }
    }
    std::thread::sleep(settle);
    let mut samples = vec![MemSample {
        phase: "at rest, after a warm-up of 100 connections per server".into(),
        rss_kb: agents_rss(cluster),
    }];
    for (placement, server) in [
        (Placement::SameNode, same),
        (Placement::AcrossNodes, across),
    ] {
        let what = placement.name();
        let (burst, churn) = soak_commands(args, &server.ip4().to_string());
        if let Err(e) = soak_burst(cluster, args, tools, client, &burst, &mut samples, what) {
            println!("    {what}: burst FAILED: {e:#}");
            errors.push(format!("{label}, {what} burst: {e:#}"));
        }
        std::thread::sleep(settle);
        samples.push(MemSample {
            phase: format!("{what}: {} s after they closed", args.soak_settle_seconds),
            rss_kb: agents_rss(cluster),
        });
        match run_churn(client, tools, &churn, args.soak_churn_seconds) {
            Ok(c) => {
                println!(
                    "    {what}: churn {} ok, {} failed, {:.0}/s",
                    c.ok, c.failed, c.per_second
                );
                if c.failed > 0 {
                    errors.push(format!(
                        "{label}, {what} churn: {} of {} failed, the first with: {}",
                        c.failed,
                        c.ok + c.failed,
                        c.first_error.as_deref().unwrap_or("?")
                    ));
                }
                std::thread::sleep(settle);
                samples.push(MemSample {
                    phase: format!(
                        "{what}: {} s after a churn of short connections",
                        args.soak_settle_seconds
                    ),
                    rss_kb: agents_rss(cluster),
                });
            }
            Err(e) => errors.push(format!("{label}, {what} churn: {e:#}")),
        }
    }
    for sample in &samples {
        println!(
            "    {}: {}",
            sample.phase,
            sample
                .rss_kb
                .iter()
                .enumerate()
                .map(|(i, k)| format!("n{i} {}", show_kb(*k)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let hbone = [same, across].iter().all(|server| {
        let a = access_summary(cluster, &offsets, IpAddr::V4(server.ip4()));
        a.hbone && a.outbound > 0 && a.inbound > 0
    });
    if !hbone {
        errors.push(format!(
            "{label}: the access log does not show both agents' sides for both servers"
        ));
    }
    let same_node = access_summary(cluster, &offsets, IpAddr::V4(same.ip4())).carried();
    for n in cluster.nodes() {
        if !n.agent_running() {
            errors.push(format!(
                "{label}: agent of {} is not running at the end of the soak: {:?}",
                n.name(),
                n.agent_exit_status()
            ));
        }
    }
    Ok(Soak {
        label: label.into(),
        samples,
        hwm_kb: cluster
            .nodes()
            .iter()
            .map(|n| n.agent_pid().and_then(|p| util::proc_status_kb(p, "VmHWM")))
            .collect(),
        hbone,
        same_node,
        errors,
    })
}

/// The soak's section of the report.
fn soak_section(args: &Args, soaks: &[Soak], servers: &[(&str, String)]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "### Agent memory after a burst\n");
    let mut header = vec!["moment".to_string()];
    for s in soaks {
        for i in 0..s.hwm_kb.len() {
            header.push(format!("n{i} agent, {}", s.label));
        }
    }
    let phases = soaks.first().map_or(0, |s| s.samples.len());
    let mut rows: Vec<Vec<String>> = (0..phases)
        .map(|i| {
            let mut row = vec![soaks[0].samples[i].phase.clone()];
            for s in soaks {
                let sample = s.samples.get(i);
                for n in 0..s.hwm_kb.len() {
                    row.push(show_kb(sample.and_then(|x| x.rss_kb[n])));
                }
            }
            row
        })
        .collect();
    let mut peak = vec!["peak over the soak (VmHWM)".to_string()];
    for s in soaks {
        peak.extend(s.hwm_kb.iter().map(|k| show_kb(*k)));
    }
    rows.push(peak);
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    md.push_str(&table(&header, rows));
    let (burst, churn) = soak_commands(args, "$SERVER");
    let server_list = servers
        .iter()
        .map(|(p, ip)| format!("`{ip}` {p}"))
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(
        md,
        "\nResident memory (VmRSS from `/proc/<pid>/status`) of each node's agent, restarted \
         fresh for the soak, with the client and both servers enrolled ({}). n0's agent carries \
         the client's outbound side of every connection and, same node, the server's inbound \
         side too; n1's agent carries the inbound side across nodes. In order: a warm-up, then \
         per placement {} connections opened one after another, each exchanging {} bytes with \
         the echo server, all held {} s and closed; {} s later the reading again; then up to \
         {} sequential short connections (at most {} s), and {} s later the last reading. Run \
         in the client pod's network namespace; `$SERVER` is the server pod ({server_list}):\n\n\
         ```\ntestpod {}\ntestpod {}\n```\n",
        if soaks.iter().all(|s| s.hbone) {
            format!(
                "same node: {}; across nodes: HBONE mTLS between the agents, as the access log \
                 shows",
                soaks
                    .iter()
                    .map(|s| format!("{} ({})", s.same_node, s.label))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            "the access log did NOT show both agents' sides for every server: see the failed \
             measurements"
                .to_string()
        },
        args.soak_connections,
        args.soak_bytes,
        args.soak_hold_seconds,
        args.soak_settle_seconds,
        args.soak_churn,
        args.soak_churn_seconds,
        args.soak_settle_seconds,
        show("", &burst).trim(),
        show("", &churn).trim(),
    );
    if let Some(spec) = &args.soak_compare {
        let _ = writeln!(
            md,
            "The comparison columns ran the same soak on the same bed with another agent binary \
             (`--soak-compare {spec}`).\n"
        );
    }
    md
}

// ---------------------------------------------------------------------------------------------
// the report

struct Machine {
    cpus: usize,
    cpu_model: String,
    memory: String,
    kernel: String,
    date: String,
    revision: String,
    tools: Vec<String>,
    /// `/proc/loadavg`'s 1, 5 and 15 minute figures before the run.
    load_before: String,
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn machine(tools: &Tools) -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown".into(), |(_, m)| m.trim().to_string());
    let memory = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kb: u64 = m
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some(format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
        })
        .unwrap_or_else(|| "unknown".into());
    let trim = |s: String| s.trim().to_string();
    let revision = match util::run("git", ["rev-parse", "--short", "HEAD"]) {
        Ok(rev) => {
            let dirty = util::run("git", ["status", "--porcelain", "--untracked-files=no"])
                .is_ok_and(|s| !s.trim().is_empty());
            format!(
                "{}{}",
                rev.trim(),
                if dirty {
                    " with uncommitted changes"
                } else {
                    ""
                }
            )
        }
        Err(_) => "unknown".into(),
    };
    Machine {
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model,
        memory,
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(trim)
            .unwrap_or_else(|_| "unknown".into()),
        date: util::run("date", ["-u", "+%Y-%m-%d %H:%M UTC"])
            .map(trim)
            .unwrap_or_else(|_| "unknown".into()),
        revision,
        tools: tools.versions(),
        load_before: load_average(),
    }
}

fn ratio(value: f64, base: Option<f64>) -> String {
    match base {
        Some(b) if b > 0.0 && b.is_finite() && value.is_finite() => {
            format!(" ({:.2}x direct)", value / b)
        }
        _ => String::new(),
    }
}

/// `value` formatted, plus its ratio to the direct path's value of the same placement (none on
/// the direct row itself).
/// The direct path's scenario of `placement`: the baseline of every ratio.
fn direct_of(all: &[Scenario], placement: Placement) -> Option<&Scenario> {
    all.iter()
        .find(|d| d.path == MeshPath::Direct && d.placement == placement)
}

fn cell(
    s: &Scenario,
    all: &[Scenario],
    get: impl Fn(&Scenario) -> Option<f64>,
    fmt: impl Fn(f64) -> String,
) -> String {
    let Some(v) = get(s) else {
        return "failed".into();
    };
    if s.path == MeshPath::Direct {
        return fmt(v);
    }
    let base = direct_of(all, s.placement).and_then(&get);
    format!("{}{}", fmt(v), ratio(v, base))
}

/// A bulk throughput cell: the figure and its ratio, "not run", or "failed".
fn bulk_cell(
    s: &Scenario,
    all: &[Scenario],
    get: impl Fn(&Scenario) -> &Result<Bulk, String>,
) -> String {
    if matches!(get(s), Err(e) if e == NOT_RUN) {
        return NOT_RUN.into();
    }
    cell(
        s,
        all,
        |s| get(s).as_ref().ok().map(|b| b.gbps),
        |v| format!("{v:.2} Gbit/s"),
    )
}

/// "What each load cost the machine": the machine's CPU per request and per GB on every path,
/// the ceiling that cost sets ([`cost`]), and the cipher's.
fn machine_cost_section(
    all: &[Scenario],
    args: &Args,
    cipher: &Result<cost::CipherCost, String>,
) -> String {
    /// A run's cost per unit of work (CPU seconds per request or per GB), its rate (units per
    /// second) and what the machine spent.
    struct Unit {
        cost: f64,
        rate: f64,
        spent: cost::Spent,
    }
    type Load = fn(&Scenario) -> Option<Unit>;
    let per_request: Load = |s| {
        let h = s.saturation.as_ref().ok()?;
        let spent = h.machine?;
        (h.succeeded > 0).then(|| Unit {
            cost: spent.busy / h.succeeded as f64,
            rate: h.rate,
            spent,
        })
    };
    fn per_gb(b: &Bulk) -> Option<Unit> {
        let spent = b.machine?;
        (b.bytes > 0).then(|| Unit {
            cost: spent.busy / (b.bytes as f64 / 1e9),
            rate: b.gbps / 8.0,
            spent,
        })
    }
    let per_gb_1: Load = |s| s.bulk1.as_ref().ok().and_then(per_gb);
    let per_gb_n: Load = |s| s.bulk_n.as_ref().ok().and_then(per_gb);
    let direct = |s: &Scenario, load: Load| direct_of(all, s.placement).and_then(load);
    let cell = |s: &Scenario, load: Load, show: &dyn Fn(f64) -> String| match load(s) {
        None => "-".to_string(),
        Some(unit) if s.path == MeshPath::Direct => show(unit.cost),
        Some(unit) => match direct(s, load) {
            Some(base) if unit.cost > 0.0 && base.rate > 0.0 => format!(
                "{} (ceiling {:.2}x; measured {:.2}x)",
                show(unit.cost),
                unit.spent.cpus as f64 / unit.cost / base.rate,
                unit.rate / base.rate
            ),
            _ => show(unit.cost),
        },
    };
    let busy = |s: &Scenario, load: Load| {
        load(s)
            .and_then(|u| u.spent.busy_share())
            .map_or("-".into(), |b| format!("{:.0}%", b * 100.0))
    };
    let rows = all
        .iter()
        .map(|s| {
            vec![
                s.placement.name().to_string(),
                path_label(s),
                cell(s, per_request, &|v| format!("{:.1} µs", v * 1e6)),
                cell(s, per_gb_1, &|v| format!("{v:.2} s")),
                cell(s, per_gb_n, &|v| format!("{v:.2} s")),
                format!(
                    "{} / {} / {}",
                    busy(s, per_request),
                    busy(s, per_gb_1),
                    busy(s, per_gb_n)
                ),
            ]
        })
        .collect();
    let mut md = String::new();
    let _ = writeln!(md, "### What each load cost the machine\n");
    md.push_str(&table(
        &[
            "placement",
            "path",
            "saturation: CPU per request",
            "bulk, 1 connection: CPU per GB",
            &format!("bulk, {} connections: CPU per GB", args.bulk_streams),
            "CPUs busy: saturation / bulk 1 / bulk n",
        ],
        rows,
    ));
    let spent: Vec<cost::Spent> = all
        .iter()
        .flat_map(|s| [per_request(s), per_gb_1(s), per_gb_n(s)])
        .flatten()
        .map(|u| u.spent)
        .collect();
    let steal: f64 = spent.iter().map(|s| s.steal).sum();
    let cpus = spent.first().map_or(0, |s| s.cpus);
    let _ = writeln!(
        md,
        "\nThe whole machine's CPU time while each load generator ran (user, nice, system, irq \
         and softirq of `/proc/stat`'s `cpu` line: the load generator, the server, the agents, \
         the kernel's TCP work on their behalf, and whatever else ran), divided by the requests \
         answered or the gigabytes iperf3's receiver got; the last column is that time over the \
         run's wall time and the machine's {cpus} CPUs. The hypervisor stole {steal:.2} CPU \
         seconds over these runs. Every process of a path shares the same CPUs, so a path \
         cannot go faster than all of them spent at its cost per unit: the **ceiling** beside \
         each figure is that rate over the direct path's measured one, with the ratio the \
         throughput tables measured after it. Measured close to its ceiling (and the CPUs \
         close to busy), a path is bound by the work it does, and only less work per byte or \
         per request moves it; measured well under it, it also waits.{}\n",
        if args.perf.is_some() {
            " With `--perf`, the mesh path's saturation and one-connection runs include the \
             profiler's own CPU."
        } else {
            ""
        }
    );
    match cipher {
        Ok(c) => {
            let floor = c.seconds_per_gb();
            let mut line = format!(
                "The cipher alone: AES-256-GCM (the suite two agents negotiate; ring, rustls's \
                 provider here) over {} KiB records on one CPU of this machine, measured while \
                 the bed was idle: sealing {:.2} GB/s, opening {:.2} GB/s, so {floor:.2} CPU \
                 seconds per GB that one agent seals and the other opens.",
                16,
                c.seal / 1e9,
                c.open / 1e9
            );
            let across = direct_of(all, Placement::AcrossNodes);
            let most = |d: Unit| d.spent.cpus as f64 / (d.cost + floor) / d.rate;
            if let Some((one, many)) = across.and_then(|d| Some((per_gb_1(d)?, per_gb_n(d)?))) {
                let _ = write!(
                    line,
                    " A path doing the direct path's work and the cipher, and nothing more (no \
                     copy, system call or TCP leg of the agents'), could reach at most {:.2}x \
                     direct across nodes with 1 connection and {:.2}x with {} on this machine.",
                    most(one),
                    most(many),
                    args.bulk_streams
                );
            }
            let _ = writeln!(md, "{line}\n");
        }
        Err(e) => {
            let _ = writeln!(md, "The cipher's own cost could not be measured: {e}\n");
        }
    }
    md
}

fn path_label(s: &Scenario) -> String {
    let build = s
        .build
        .as_ref()
        .map(|b| format!(" **[{b}]**"))
        .unwrap_or_default();
    match s.path {
        MeshPath::Mesh | MeshPath::MeshFastPathOff | MeshPath::MeshSpliced => {
            format!("{}: {}{build}", s.path.name(), s.what())
        }
        p => format!("{}{build}", p.name()),
    }
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = format!("| {} |\n", header.join(" | "));
    let _ = writeln!(t, "|{}", header.iter().map(|_| "---|").collect::<String>());
    for r in rows {
        let _ = writeln!(t, "| {} |", r.join(" | "));
    }
    t
}

fn http_table(all: &[Scenario], get: fn(&Scenario) -> &Result<Http, String>) -> String {
    let ms = |v: f64| format!("{:.3} ms", v / 1000.0);
    let rows = all
        .iter()
        .map(|s| {
            let h = |f: fn(&Http) -> f64| move |s: &Scenario| get(s).as_ref().ok().map(f);
            vec![
                s.placement.name().to_string(),
                path_label(s),
                cell(s, all, h(|h| h.rate), |v| format!("{v:.0} req/s")),
                cell(s, all, h(|h| h.p50), ms),
                cell(s, all, h(|h| h.p90), ms),
                cell(s, all, h(|h| h.p99), ms),
                get(s).as_ref().map_or("-".into(), |h| {
                    format!("{} of {}", h.failed, h.failed + h.succeeded)
                }),
            ]
        })
        .collect();
    table(
        &[
            "placement",
            "path",
            "achieved rate",
            "p50",
            "p90",
            "p99",
            "failed",
        ],
        rows,
    )
}

struct Memory {
    node: String,
    hwm_kb: Option<u64>,
    rss_kb: Option<u64>,
}

fn tables(
    all: &[Scenario],
    args: &Args,
    idle: &[f64],
    cipher: &Result<cost::CipherCost, String>,
    memory: &[Memory],
    servers: &[(&str, String)],
) -> String {
    let mut md = String::new();
    let server_list = servers
        .iter()
        .map(|(p, ip)| format!("`{ip}` {p}"))
        .collect::<Vec<_>>()
        .join(", ");
    let cmd = |program: &str, args: &[String]| {
        let line = show(program, args);
        // The report shows placeholders for the per-run parts.
        let mut line = line;
        for (_, ip) in servers {
            line = line.replace(ip.as_str(), "$SERVER");
        }
        if let Some(start) = line.find("--log-file=") {
            let end = line[start..].find(' ').map_or(line.len(), |e| start + e);
            line.replace_range(start..end, "--log-file=$LOG");
        }
        line
    };
    let sample = commands(args, &servers[0].1, Path::new("/"), "x");
    let where_ = format!(
        "run in the client pod's network namespace; `$SERVER` is the server pod ({server_list})"
    );

    let _ = writeln!(md, "### Small HTTP requests at a fixed rate\n");
    md.push_str(&http_table(all, |s| &s.fixed));
    let _ = writeln!(
        md,
        "\n{} clients x {} requests/s for {} s, one request at a time per connection \
         (HTTP/1.1 keep-alive) against nginx; {where_}:\n\n```\n{}\n```\n",
        args.rate_clients,
        args.rps,
        args.rate_seconds,
        cmd("h2load", &sample.fixed)
    );

    let _ = writeln!(md, "### Small HTTP requests at saturation\n");
    md.push_str(&http_table(all, |s| &s.saturation));
    let _ = writeln!(
        md,
        "\n{} connections, each sending its next request as soon as the previous response \
         arrived, for {} s; {where_}:\n\n```\n{}\n```\n",
        args.saturation_clients,
        args.saturation_seconds,
        cmd("h2load", &sample.saturation)
    );

    let _ = writeln!(md, "### Bulk throughput\n");
    let rows = all
        .iter()
        .map(|s| {
            vec![
                s.placement.name().to_string(),
                path_label(s),
                bulk_cell(s, all, |s| &s.bulk1),
                bulk_cell(s, all, |s| &s.bulk_n),
            ]
        })
        .collect();
    md.push_str(&table(
        &[
            "placement",
            "path",
            "1 connection",
            &format!("{} connections", args.bulk_streams),
        ],
        rows,
    ));
    let _ = writeln!(
        md,
        "\niperf3, receiver-side throughput over {} s; {where_}:\n\n```\n{}\n{}\n```\n",
        args.bulk_seconds,
        cmd("iperf3", &sample.bulk1),
        cmd("iperf3", &sample.bulk_n)
    );
    if !args.splice_bulk {
        let _ = writeln!(
            md,
            "The spliced path's bulk loads are not run (`{NOT_RUN}`) unless `--splice-bulk` is \
             given: the kernel splice does not bound what it queues, and a single spliced \
             iperf3 stream has exhausted this machine's memory ([security.md](security.md)).\n"
        );
    }

    let _ = writeln!(md, "### Connection setup rate\n");
    let rows = all
        .iter()
        .map(|s| {
            vec![
                s.placement.name().to_string(),
                path_label(s),
                cell(
                    s,
                    all,
                    |s| s.churn.as_ref().ok().map(|c| c.per_second),
                    |v| format!("{v:.0} connections/s"),
                ),
                s.churn.as_ref().map_or("-".into(), |c| {
                    format!("{} of {}", c.failed, c.ok + c.failed)
                }),
            ]
        })
        .collect();
    md.push_str(&table(&["placement", "path", "rate", "failed"], rows));
    let _ = writeln!(
        md,
        "\nSequential short connections: connect, read the server's greeting line, send one byte, \
         half-close, read the echo to EOF (the test bed's `testpod`); at most {} connections or \
         {} s; {where_}:\n\n```\n{}\n```\n",
        args.churn_count,
        args.churn_seconds,
        cmd("testpod", &sample.churn)
    );

    let _ = writeln!(md, "### Agent CPU time\n");
    let rows = all
        .iter()
        .map(|s| {
            let per_k = s.saturation.as_ref().ok().and_then(|h| {
                (h.succeeded > 0)
                    .then(|| s.cpu_saturation.iter().sum::<f64>() * 1e6 / h.succeeded as f64)
            });
            // On the direct path no agent carries the bytes: nothing to divide.
            let per_gb = |v: Option<f64>| match v {
                Some(v) if s.path != MeshPath::Direct => format!("{v:.2} s"),
                _ => "-".into(),
            };
            let per_conn = s.churn.as_ref().ok().and_then(|c| {
                (c.ok > 0 && s.path != MeshPath::Direct)
                    .then(|| s.cpu_churn.iter().sum::<f64>() * 1e6 / c.ok as f64)
            });
            vec![
                s.placement.name().to_string(),
                path_label(s),
                format!("{:.2} s", s.cpu_fixed.iter().sum::<f64>()),
                per_k.map_or("-".into(), |v| format!("{v:.0} µs")),
                per_conn.map_or("-".into(), |v| format!("{v:.0} µs")),
                per_gb(Scenario::cpu_per_gb(&s.bulk1, &s.cpu_bulk1)),
                per_gb(Scenario::cpu_per_gb(&s.bulk_n, &s.cpu_bulk_n)),
                per_agent(&s.cpu_total),
            ]
        })
        .collect();
    let bulk_n_header = format!("bulk, {} connections: per GB", args.bulk_streams);
    md.push_str(&table(
        &[
            "placement",
            "path",
            "fixed-rate run (both agents)",
            "saturation: per request (both agents)",
            "connection setup: per connection (both agents)",
            "bulk, 1 connection: per GB (both agents)",
            &bulk_n_header,
            "whole scenario, per agent",
        ],
        rows,
    ));
    let _ = writeln!(
        md,
        "\nutime + stime of each agent process (all threads) from `/proc/<pid>/stat`, the \
         difference across a run. The fixed-rate run does the same work on every path \
         ({} requests), so its column compares directly; the saturation column divides by the \
         requests served, the connection-setup column by the connections made (the last \
         half second included, for the access-log lines written as they end), the bulk \
         columns by the gigabytes iperf3's receiver got. The whole \
         scenario includes the bulk and connection-setup runs, whose \
         amount of work depends on the path's speed. On the direct path no agent is on the \
         path: what it shows is background work. Idle, before any traffic, the agents used {} \
         in {} s. One clock tick is 0.01 s.\n",
        u64::from(args.rate_clients) * u64::from(args.rps) * u64::from(args.rate_seconds),
        per_agent(idle),
        args.idle_seconds
    );

    md.push_str(&machine_cost_section(all, args, cipher));

    let _ = writeln!(md, "### Agent peak memory\n");
    let kb = |v: Option<u64>| v.map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
    let rows = memory
        .iter()
        .map(|m| vec![m.node.clone(), kb(m.hwm_kb), kb(m.rss_kb)])
        .collect();
    md.push_str(&table(
        &[
            "agent",
            "peak resident (VmHWM)",
            "resident at the end (VmRSS)",
        ],
        rows,
    ));
    let _ = writeln!(
        md,
        "\nFrom `/proc/<pid>/status`. VmHWM is the peak over every \
         process of this build's agent on the node (all scenarios, every path), not per path: \
         n0's agent is restarted around the same-node-only scenarios{}.\n",
        match &args.compare {
            Some(spec) => format!(
                ", and with `--compare {spec}` every agent around each comparison run (the \
                 comparison binary's processes are not counted)"
            ),
            None => String::new(),
        }
    );

    // Per load: which one sets the peak above.
    let per_agent_mib = |peaks: &[Option<u64>]| {
        peaks
            .iter()
            .enumerate()
            .map(|(i, p)| format!("n{i} {}", kb(*p)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let rows = all
        .iter()
        .map(|s| {
            let mut row = vec![s.placement.name().to_string(), path_label(s)];
            row.extend(s.peaks().map(per_agent_mib));
            row
        })
        .collect();
    let bulk_n_header = format!("bulk, {} connections", args.bulk_streams);
    md.push_str(&table(
        &[
            "placement",
            "path",
            "before the loads",
            "fixed rate",
            "saturation",
            "bulk, 1 connection",
            &bulk_n_header,
            "connection setup",
        ],
        rows,
    ));
    let _ = writeln!(
        md,
        "\nThe same figure load by load: each agent's VmHWM read after the load and reset to \
         its resident size (`5` in `/proc/<pid>/clear_refs`) before the next, so each column is \
         the peak during that load alone. \"before the loads\" covers what came since the \
         previous scenario: enrolment, and an agent's start-up where the scenario restarted it.\n"
    );

    let _ = writeln!(md, "### What carried the traffic\n");
    let rows = all
        .iter()
        .map(|s| {
            vec![
                s.placement.name().to_string(),
                format!(
                    "{}{}",
                    s.path.name(),
                    s.build
                        .as_ref()
                        .map(|b| format!(" [{b}]"))
                        .unwrap_or_default()
                ),
                s.what().to_string(),
                format!(
                    "{} outbound, {} inbound",
                    s.access.outbound, s.access.inbound
                ),
                s.path_warning().unwrap_or_else(|| "as expected".into()),
            ]
        })
        .collect();
    md.push_str(&table(
        &[
            "placement",
            "path",
            "agents",
            "access-log lines for the server",
            "check",
        ],
        rows,
    ));
    md.push('\n');
    md
}

fn document(
    args: &Args,
    m: &Machine,
    load_after: &str,
    body: &str,
    errors: &[String],
    elapsed: Duration,
) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Benchmarks\n\n\
         Generated by `{}` ([tests/src/bin/bench/main.rs](../tests/src/bin/bench/)); do not edit by \
         hand, rerun the command. It needs root (it builds a cluster in a box) and took {} s. \
         Where the agents' time goes and what was tried to reduce it, with profiles: \
         [perf/README.md](perf/README.md).\n",
        args.command,
        elapsed.as_secs()
    );
    let _ = writeln!(md, "## Machine\n");
    let _ = writeln!(md, "- CPUs: {} ({})", m.cpus, m.cpu_model);
    let _ = writeln!(md, "- memory: {}", m.memory);
    let _ = writeln!(md, "- kernel: {}", m.kernel);
    let _ = writeln!(md, "- date: {}", m.date);
    let _ = writeln!(md, "- Ambit: git {}, release build", m.revision);
    let _ = writeln!(md, "- tools: {}", m.tools.join("; "));
    let _ = writeln!(
        md,
        "- load average (1, 5, 15 min): {} before the run, {load_after} after the last scenario \
         (other work on the machine competes with the benchmark)\n",
        m.load_before
    );
    let _ = writeln!(
        md,
        "## How to read these figures\n\n\
         These machines are small, shared and noisy: absolute figures move between runs by more \
         than the differences being measured, and the load generators, servers and agents share \
         the same {} CPUs. Only the ratios to the direct path *measured in the same run* mean \
         anything (\"0.82x direct\": 82% of the direct path's figure; for latency, above 1x is \
         slower), and even those deserve a second run before drawing conclusions. Nothing \
         asserts on these numbers.\n\n\
         One cluster in a box: two nodes (network namespaces joined by a bridge), two pods each. \
         The client is pod `p0-0` on node n0; the server is pod `p0-1` (**same node**: through \
         n0's namespace) or pod `p1-0` (**across nodes**: through both nodes and the fabric \
         bridge). The agents start once; between paths the mesh file changes which pods are \
         enrolled and the bench waits until both agents have applied it. Scenarios run in the \
         order of the tables' rows, so each path runs within minutes of its direct baseline:\n\n\
         - **direct**: neither pod enrolled: no mesh, no agent on the path;\n\
         - **passthrough**: the client enrolled, the server not: the client's agent captures the \
           connection (outbound listener) and connects, in plaintext, to a destination outside \
           the mesh;\n\
         - **mesh, fast path off** (same node only): both enrolled, the client's agent \
           restarted with `--same-node-fast-path=false`, so the two pods talk HBONE through it \
           as across nodes (the path the fast path replaces); it is restarted with the fast \
           path on afterwards;\n\
         - **mesh, spliced** (same node only): both enrolled, the client's agent restarted \
           with `--max-spliced-connections 16384`: the fast path's authorization and reports, \
           the bytes spliced in the kernel instead of relayed by the agent (opt-in: the default \
           relays);\n\
         - **mesh**: both enrolled: the path between two meshed pods, named by what the agents' \
           access logs show they did (the same-node fast path, spliced in the kernel or relayed \
           by the agent; HBONE mTLS across nodes).\n\n\
         Each server pod runs nginx (`worker_processes 1`, `access_log off`, a {}-byte static \
         body, listening on the pod IP:{HTTP_PORT}), an iperf3 server (port {IPERF_PORT}) and \
         the test bed's echo server (port {ECHO_PORT}).\n",
        m.cpus,
        BODY.len()
    );
    let _ = writeln!(md, "## Results\n");
    if let Some(spec) = &args.compare {
        let label = spec.split_once('=').map_or(spec.as_str(), |(l, _)| l);
        let _ = writeln!(
            md,
            "Rows marked **[{label}]** ran the mesh path with another agent binary \
             (`--compare {spec}`{}): in each placement, right after this build's mesh path, \
             both agents were restarted with it, the same loads ran, and the agents were \
             restarted with this build again. Their ratios are to the same direct path as this \
             build's.\n",
            args.compare_agent_arg
                .iter()
                .map(|a| format!(" `--compare-agent-arg={a}`"))
                .collect::<String>()
        );
    }
    md.push_str(body);
    if !errors.is_empty() {
        let _ = writeln!(md, "## Failed measurements\n");
        for e in errors {
            let _ = writeln!(md, "- {}", e.replace('\n', " "));
        }
        md.push('\n');
    }
    md
}

// ---------------------------------------------------------------------------------------------

fn main() -> Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let tools = Tools::find()?;
    let m = machine(&tools);
    println!(
        "Ambit benchmark: {} CPUs, kernel {}, {}",
        m.cpus, m.kernel, m.date
    );
    // Checked before the bed is built: a typo should not cost a whole run.
    let soak_compare = binary_spec("--soak-compare", &args.soak_compare)?;
    let compare = binary_spec("--compare", &args.compare)?;
    let mut cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 2,
    })
    .context("building the cluster in a box (needs root, cgroup v2, bpffs)")?;
    let this_build = cluster.ambit_bin().to_path_buf();

    // Nothing enrolled to begin with; the agents start once and stay up.
    for p in cluster.pods() {
        p.set_enrolled(false);
    }
    cluster.write_mesh()?;
    // The soak holds thousands of connections from one client pod; on the same node each takes
    // two of that source's slots on the agent, past the default per-source share. The bench
    // measures the data path, not the limits.
    for node in cluster.nodes() {
        node.set_agent_env("AMBIT_MAX_CONNECTIONS_PER_SOURCE", "6000");
    }
    let with_waypoint = !args.soak_only && !args.no_waypoint;
    if with_waypoint {
        waypoint::configure(&cluster)?;
        cluster.write_mesh()?;
    }
    cluster.start_agents()?;
    let (same, across) = (cluster.pod(0, 1), cluster.pod(1, 0));
    println!(
        "run {}: agents up (pids {:?}); servers in {} and {}",
        cluster.id(),
        cluster
            .nodes()
            .iter()
            .map(Node::agent_pid)
            .collect::<Vec<_>>(),
        same.name(),
        across.name()
    );
    let servers = [start_servers(same, &tools)?, start_servers(across, &tools)?];
    let server_ips = [
        ("same node", same.ip4().to_string()),
        ("across nodes", across.ip4().to_string()),
    ];
    let mut body = String::new();
    let mut errors = Vec::new();
    if !args.soak_only && !args.waypoint_only {
        let (b, e) = throughput(&mut cluster, &args, &tools, &server_ips, compare.as_ref())?;
        body.push_str(&b);
        errors.extend(e);
    }
    if with_waypoint {
        let (b, e) = waypoint::section(&cluster, &args, &tools)?;
        body.push_str(&b);
        errors.extend(e);
    }
    let load_after = load_average();

    if !args.no_soak && !args.waypoint_only {
        let mut soaks = vec![run_soak(
            &mut cluster,
            &args,
            &tools,
            "this build",
            &this_build,
        )?];
        if let Some((label, path)) = &soak_compare {
            soaks.push(run_soak(&mut cluster, &args, &tools, label, path)?);
        }
        cluster.set_ambit_bin(&this_build);
        for s in &soaks {
            errors.extend(s.errors.iter().cloned());
        }
        body.push_str(&soak_section(&args, &soaks, &server_ips));
    }

    for n in cluster.nodes() {
        if !n.agent_running() {
            errors.push(format!(
                "agent of {} is not running at the end: {:?}",
                n.name(),
                n.agent_exit_status()
            ));
        }
    }

    println!("\nTearing down run {} ...", cluster.id());
    drop(servers);
    drop(cluster);

    let doc = document(&args, &m, &load_after, &body, &errors, started.elapsed());
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    }
    fs::write(&args.out, &doc).with_context(|| format!("write {}", args.out.display()))?;
    println!("\n{body}");
    println!(
        "Report written to {} ({} s).",
        args.out.display(),
        started.elapsed().as_secs()
    );
    if !errors.is_empty() {
        bail!(
            "{} measurement(s) failed or took an unexpected path:\n- {}",
            errors.len(),
            errors.join("\n- ")
        );
    }
    Ok(())
}

/// VmHWM of every node's agent (kB), for the peak-memory table.
fn agents_hwm(cluster: &Cluster) -> Vec<Option<u64>> {
    cluster
        .nodes()
        .iter()
        .map(|n| n.agent_pid().and_then(|p| util::proc_status_kb(p, "VmHWM")))
        .collect()
}

/// Restarts every node's agent with `ambit` and waits until they are ready and have enrolled
/// the pods of the mesh file again.
fn restart_agents(cluster: &mut Cluster, ambit: &Path, extra_args: &[String]) -> Result<()> {
    cluster.stop_agents()?;
    cluster.set_ambit_bin(ambit);
    for n in cluster.nodes() {
        n.set_agent_args(extra_args.iter().cloned());
        n.start_agent()?;
    }
    for n in cluster.nodes() {
        n.wait_ready(Duration::from_secs(60))?;
    }
    let enrolled: Vec<&Pod> = cluster.pods().iter().filter(|p| p.enrolled()).collect();
    set_enrolment(cluster, &enrolled)
}

/// A `LABEL=PATH` argument (another `ambit` binary), checked before the bed is built.
fn binary_spec(flag: &str, spec: &Option<String>) -> Result<Option<(String, PathBuf)>> {
    let Some(spec) = spec else {
        return Ok(None);
    };
    let (label, path) = spec
        .split_once('=')
        .ok_or_else(|| anyhow!("{flag} {spec:?}: expected LABEL=PATH (an ambit binary)"))?;
    let path = fs::canonicalize(path)
        .with_context(|| format!("{flag} {spec:?}: no such file {path:?}"))?;
    Ok(Some((label.to_string(), path)))
}

/// The throughput scenarios, path by path, and their tables; the failed measurements.
fn throughput(
    cluster: &mut Cluster,
    args: &Args,
    tools: &Tools,
    server_ips: &[(&str, String)],
    compare: Option<&(String, PathBuf)>,
) -> Result<(String, Vec<String>)> {
    let this_build = cluster.ambit_bin().to_path_buf();
    let placements = [
        (Placement::SameNode, (0, 1)),
        (Placement::AcrossNodes, (1, 0)),
    ];
    // The agents' CPU time without any traffic: the baseline of the CPU table.
    let before = agents_cpu(cluster);
    std::thread::sleep(Duration::from_secs(args.idle_seconds.into()));
    let idle = delta(&agents_cpu(cluster), &before);
    println!(
        "agents idle for {} s: {}",
        args.idle_seconds,
        per_agent(&idle)
    );
    // The cipher's speed on one CPU, while the bed is idle.
    let cipher = report(
        "AES-256-GCM on one CPU",
        cost::measure_cipher(Duration::from_secs(2)),
        |c| {
            format!(
                "seal {:.2} GB/s, open {:.2} GB/s",
                c.seal / 1e9,
                c.open / 1e9
            )
        },
    );

    // Placement by placement, so that each path runs close in time to the direct path it is
    // compared with (the machine's background load drifts).
    let mut all = Vec::new();
    // This build's agents' peak memory, over every agent process of it: the fast-path-off
    // scenario restarts the client's agent, `--compare` restarts all of them.
    let mut hwm: Vec<Option<u64>> = vec![None; cluster.nodes().len()];
    for (placement, (node, index)) in placements {
        for path in MeshPath::ALL {
            if path == MeshPath::Passthrough && args.no_passthrough {
                continue;
            }
            if path.same_node_only() && placement != Placement::SameNode {
                continue;
            }
            let (client, server) = (cluster.pod(0, 0), cluster.pod(node, index));
            let enrolled: Vec<&Pod> = match path {
                MeshPath::Direct => vec![],
                MeshPath::Passthrough => vec![client],
                MeshPath::Mesh | MeshPath::MeshFastPathOff | MeshPath::MeshSpliced => {
                    vec![client, server]
                }
            };
            if path.same_node_only() {
                cluster.with_diagnostics(restart_agent(cluster, 0, path, &mut hwm))?;
            }
            cluster.with_diagnostics(set_enrolment(cluster, &enrolled))?;
            let scenario =
                run_scenario(cluster, args, tools, path, placement, None, client, server);
            for peaks in scenario.peaks() {
                fold_peaks(&mut hwm, peaks);
            }
            all.push(scenario);
            if path.same_node_only() {
                let back = MeshPath::Mesh;
                cluster.with_diagnostics(restart_agent(cluster, 0, back, &mut hwm))?;
            }
        }
        if let Some((label, ambit)) = compare {
            // The same mesh scenario with the other binary, then back to this build.
            fold_peaks(&mut hwm, &agents_hwm(cluster));
            println!("==> agents restarted with {label} ({})", ambit.display());
            let back = restart_agents(cluster, ambit, &args.compare_agent_arg);
            cluster.with_diagnostics(back)?;
            let (client, server) = (cluster.pod(0, 0), cluster.pod(node, index));
            all.push(run_scenario(
                cluster,
                args,
                tools,
                MeshPath::Mesh,
                placement,
                Some(label),
                client,
                server,
            ));
            println!("==> agents restarted with this build");
            let back = restart_agents(cluster, &this_build, &[]);
            cluster.with_diagnostics(back)?;
        }
    }
    fold_peaks(&mut hwm, &agents_hwm(cluster));
    let memory: Vec<Memory> = cluster
        .nodes()
        .iter()
        .zip(hwm)
        .map(|(n, earlier)| {
            let pid = n.agent_pid();
            let hwm = pid.and_then(|p| util::proc_status_kb(p, "VmHWM"));
            Memory {
                node: n.name().to_string(),
                hwm_kb: hwm.max(earlier),
                rss_kb: pid.and_then(|p| util::proc_status_kb(p, "VmRSS")),
            }
        })
        .collect();
    let body = tables(&all, args, &idle, &cipher, &memory, server_ips);

    let mut errors = Vec::new();
    for s in &all {
        let what = format!("{} / {}", s.placement.name(), s.path.name());
        // A load left out on purpose (NOT_RUN) is no failure.
        let mut add = |m: &str, r: Option<&String>| {
            if let Some(e) = r.filter(|e| *e != NOT_RUN) {
                errors.push(format!("{what}, {m}: {e}"));
            }
        };
        add("fixed rate", s.fixed.as_ref().err());
        add("saturation", s.saturation.as_ref().err());
        add("bulk, 1 stream", s.bulk1.as_ref().err());
        add("bulk, many streams", s.bulk_n.as_ref().err());
        add("connection setup", s.churn.as_ref().err());
        if let Some(w) = s.path_warning() {
            errors.push(format!("{what}, path check: {w}"));
        }
    }
    Ok((body, errors))
}
