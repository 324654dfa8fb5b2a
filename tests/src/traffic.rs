//! Traffic helpers the end-to-end tests share: `testpod` servers and clients in pods, the
//! clients' per-connection reports, the agents' access logs and metrics.
//!
//! How a test tells whether a connection went through the agent: a redirected connect lands on
//! the agent's loopback listener, so the client's own address (`getsockname`) is on loopback,
//! while `getpeername` still shows the address it dialled; and a connection delivered by the
//! destination pod's agent reaches the application from the pod's own address.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use serde_json::Value;

use crate::{Cluster, Node, Pod, PodProcess, ensure_or_dump, mesh::Policies, testpod_bin};

/// How long a helper waits for a process or a log line.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Starts `testpod serve` in `pod` on `ports` and waits until it listens.
pub fn serve(pod: &Pod, ports: &[u16]) -> Result<PodProcess> {
    let mut args = vec!["serve".to_string()];
    for p in ports {
        args.extend(["--port".to_string(), p.to_string()]);
    }
    let mut server = pod.spawn(testpod_bin()?, &args)?;
    server
        .read_json_until(TIMEOUT, |v| v["event"] == "listening")
        .with_context(|| format!("server in {} did not start", pod.name()))?;
    Ok(server)
}

/// One connection as `testpod client` reported it.
#[derive(Debug)]
pub struct Conn {
    /// The raw JSON report.
    pub report: Value,
}

impl Conn {
    /// Connected, greeted, and got every byte back.
    pub fn ok(&self) -> bool {
        self.report["ok"] == true
    }

    /// What `getpeername` returned.
    pub fn peer(&self) -> String {
        self.report["peer"].as_str().unwrap_or_default().to_string()
    }

    /// The client socket's own address (`getsockname`).
    pub fn local_ip(&self) -> Option<IpAddr> {
        self.report["local"]
            .as_str()?
            .parse::<SocketAddr>()
            .ok()
            .map(|a| a.ip())
    }

    /// Where the kernel's socket table says the client socket is connected (no hook rewrites
    /// it, unlike `getpeername`).
    pub fn kernel_peer(&self) -> Option<SocketAddr> {
        self.report["kernel_peer"].as_str()?.parse().ok()
    }

    /// Went through the source pod's agent: the kernel connected the client socket to the
    /// agent's outbound listener on loopback.
    pub fn redirected(&self) -> bool {
        redirected(&self.report)
    }

    /// Field `i` of the server's greeting `HELLO <name> <peer seen> <local>`.
    pub fn greeting_field(&self, i: usize) -> String {
        let greeting = self.report["greeting"].as_str().unwrap_or_default();
        greeting.split(' ').nth(i).unwrap_or_default().to_string()
    }

    /// The pod that answered.
    pub fn served_by(&self) -> String {
        self.greeting_field(1)
    }

    /// The client address as the application saw it.
    pub fn seen_peer_ip(&self) -> Option<IpAddr> {
        self.greeting_field(2)
            .parse::<SocketAddr>()
            .ok()
            .map(|a| a.ip())
    }
}

/// Whether a `testpod client` report is of a connection the kernel sent to the agent's outbound
/// listener (`127.0.0.1:15001` or `[::1]:15001` in its socket table).
pub fn redirected(report: &Value) -> bool {
    report["kernel_peer"]
        .as_str()
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .is_some_and(|a| a.ip().to_canonical().is_loopback() && a.port() == 15001)
}

/// Starts `testpod client` in `from` with `extra` flags (a later `--timeout-ms` overrides the
/// 5 s default), without waiting: its stdout has one report per connection.
pub fn spawn_client(
    from: &Pod,
    dst: SocketAddr,
    bytes: u64,
    count: u32,
    extra: &[&str],
) -> Result<PodProcess> {
    let mut args = vec![
        "client".to_string(),
        "--connect".into(),
        dst.to_string(),
        "--bytes".into(),
        bytes.to_string(),
        "--count".into(),
        count.to_string(),
        "--timeout-ms".into(),
        "5000".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    from.spawn(testpod_bin()?, &args)
}

/// Runs `testpod client` in `from` with `extra` flags; returns every connection's report (it
/// does not require success: callers assert what they expect).
pub fn client_with(
    from: &Pod,
    dst: SocketAddr,
    bytes: u64,
    count: u32,
    extra: &[&str],
) -> Result<Vec<Conn>> {
    let mut c = spawn_client(from, dst, bytes, count, extra)?;
    let (_, lines) = c.wait_json(Duration::from_secs(60))?;
    Ok(lines.into_iter().map(|report| Conn { report }).collect())
}

/// Bytes of a [`long_transfer`].
pub const LONG_TRANSFER_BYTES: u64 = 24 << 20;
/// Pace of a [`long_transfer`], bytes per second: about 12 s whatever the machine's speed.
pub const LONG_TRANSFER_RATE: u64 = 2 << 20;
/// How soon a connection must be cut once every agent runs with a change that no longer allows
/// it (the hardening issue's bound: within a second of the deny). The agent takes
/// milliseconds; a [`long_transfer`] would run for seconds more. Measured from when the agents
/// report the change applied ([`cut_by_change`]), not from when the test made it: the file
/// watch's settling and the Kubernetes watch come before and are not the cut's work.
pub const CUT_WITHIN: Duration = Duration::from_secs(1);

/// Starts one paced `testpod client` connection from `from` to `dst` that lasts about 12 s, so
/// that a change applied while it runs lands mid-transfer; its report comes when it ends.
pub fn long_transfer(from: &Pod, dst: SocketAddr) -> Result<PodProcess> {
    let rate = LONG_TRANSFER_RATE.to_string();
    spawn_client(
        from,
        dst,
        LONG_TRANSFER_BYTES,
        1,
        &["--rate", &rate, "--timeout-ms", "120000"],
    )
}

/// Checks that the [`long_transfer`] whose `report` came `after` a change (applied by the
/// agents, or the agent's end) was cut by it: established (greeted, bytes echoed), then ended
/// short, within [`CUT_WITHIN`].
pub fn ensure_cut(cluster: &Cluster, report: &Value, after: Duration) -> Result<()> {
    let received = report["received"].as_u64().unwrap_or(0);
    ensure_or_dump!(
        cluster,
        report["greeting"].is_string() && received > 0,
        "the transfer was not established before the change (refused, not cut): {report}"
    );
    ensure_or_dump!(
        cluster,
        report["ok"] == false && received < LONG_TRANSFER_BYTES,
        "the connection the change no longer allows ran on: {report}"
    );
    eprintln!("connection cut {after:?} after the change");
    ensure_or_dump!(
        cluster,
        after < CUT_WITHIN,
        "the connection ended {after:?} after the change (bound {CUT_WITHIN:?}): not cut by it"
    );
    Ok(())
}

/// Publishes `policies` and waits until every agent runs with them.
pub fn apply_policies(cluster: &Cluster, policies: Policies) -> Result<()> {
    let generations: Vec<u64> = cluster
        .nodes()
        .iter()
        .map(Node::config_generation)
        .collect::<Result<_>>()?;
    cluster.set_policies(policies);
    cluster.write_mesh()?;
    for (i, generation) in generations.into_iter().enumerate() {
        cluster.wait_config_generation(i, generation + 1, TIMEOUT)?;
    }
    Ok(())
}

/// Waits until `server` (a `testpod serve`) accepted `n` more connections: they are authorized
/// and relaying.
pub fn accepted(server: &mut PodProcess, n: usize) -> Result<()> {
    for _ in 0..n {
        server.read_json_until(TIMEOUT, |v| v["event"] == "accepted")?;
    }
    Ok(())
}

/// Writes `policies` while `victim` (a [`long_transfer`]) runs: [`cut_by_change`].
pub fn cut_by(
    cluster: &Cluster,
    policies: Policies,
    victim: &mut PodProcess,
) -> Result<(Duration, Value)> {
    cut_by_change(cluster, victim, || {
        cluster.set_policies(policies);
        cluster.write_mesh().map(drop)
    })
}

/// Makes a configuration `change` while `victim` (a [`long_transfer`]) runs, and waits until
/// every agent runs with it (its config generation moved on) and the victim reported. Returns
/// how long after the agents applied the change the victim's connection ended (zero if it
/// ended before they were seen to: the agents are polled every 10 ms) and its report; an error
/// if it ended before the change was made.
pub fn cut_by_change(
    cluster: &Cluster,
    victim: &mut PodProcess,
    change: impl FnOnce() -> Result<()>,
) -> Result<(Duration, Value)> {
    let generations: Vec<u64> = cluster
        .nodes()
        .iter()
        .map(Node::config_generation)
        .collect::<Result<_>>()?;
    std::thread::scope(|scope| {
        let ended = scope.spawn(|| {
            let report = victim.read_json(Duration::from_secs(60));
            (Instant::now(), report)
        });
        let changed = Instant::now();
        change()?;
        let deadline = changed + TIMEOUT;
        let mut pending: Vec<(&Node, u64)> = cluster.nodes().iter().zip(generations).collect();
        while !pending.is_empty() {
            let mut still = Vec::new();
            for (node, before) in pending {
                if node.config_generation()? <= before {
                    still.push((node, before));
                }
            }
            pending = still;
            ensure_or_dump!(
                cluster,
                Instant::now() < deadline || pending.is_empty(),
                "agents still without the change after {TIMEOUT:?}: {:?}",
                pending.iter().map(|(n, _)| n.name()).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let applied = Instant::now();
        let (ended_at, report) = ended
            .join()
            .map_err(|_| anyhow!("reading the victim's report panicked"))?;
        let report = report?;
        ensure_or_dump!(
            cluster,
            ended_at >= changed,
            "the connection ended before the change was made: it was not cut by it: {report}"
        );
        eprintln!(
            "the change was applied by every agent {:?} after it was made; the connection ended \
             {:?} after it was made",
            applied.saturating_duration_since(changed),
            ended_at.saturating_duration_since(changed)
        );
        Ok((ended_at.saturating_duration_since(applied), report))
    })
}

/// [`client_with`] without extra flags.
pub fn client(from: &Pod, dst: SocketAddr, bytes: u64, count: u32) -> Result<Vec<Conn>> {
    client_with(from, dst, bytes, count, &[])
}

/// Runs `count` client connections and insists every one succeeded, byte-exact.
pub fn connect_ok_n(
    cluster: &Cluster,
    from: &Pod,
    dst: SocketAddr,
    bytes: u64,
    count: u32,
    extra: &[&str],
) -> Result<Vec<Conn>> {
    let conns = client_with(from, dst, bytes, count, extra)?;
    let bad: Vec<&Value> = conns
        .iter()
        .filter(|c| !c.ok() || c.report["sent"] != bytes || c.report["received"] != bytes)
        .map(|c| &c.report)
        .collect();
    ensure_or_dump!(
        cluster,
        conns.len() == count as usize && bad.is_empty(),
        "{} -> {dst}: {} of {count} connections reported, failed or not byte-exact: {bad:?}",
        from.name(),
        conns.len()
    );
    Ok(conns)
}

/// Whether one `testpod client` connection from `from` reaches the server at `dst` and gets
/// its bytes back (3 s timeout).
pub fn reaches(from: &Pod, dst: SocketAddr) -> Result<bool> {
    let mut c = from.spawn(
        testpod_bin()?,
        [
            "client",
            "--connect",
            &dst.to_string(),
            "--bytes",
            "1000",
            "--timeout-ms",
            "3000",
        ],
    )?;
    let (_, lines) = c.wait_json(Duration::from_secs(30))?;
    Ok(lines.first().is_some_and(|l| l["ok"] == true))
}

/// One connection that must succeed, byte-exact.
pub fn connect_ok(cluster: &Cluster, from: &Pod, dst: SocketAddr, bytes: u64) -> Result<Conn> {
    let mut conns = connect_ok_n(cluster, from, dst, bytes, 1, &[])?;
    Ok(conns.remove(0))
}

/// The agent's access-log records.
pub fn access_logs(node: &Node) -> Vec<Value> {
    node.agent_log_json()
        .into_iter()
        .filter(|l| l["target"] == "access")
        .collect()
}

/// The access-log records of `direction` to `dst`.
pub fn access_logs_to(node: &Node, direction: &str, dst: SocketAddr) -> Vec<Value> {
    access_logs(node)
        .into_iter()
        .filter(|l| l["direction"] == direction && l["dst"] == dst.to_string())
        .collect()
}

/// Waits until `node` logged at least `at_least` connections of `direction` to `dst` (lines are
/// written when connections end, a moment after the client saw the end); returns them.
pub fn wait_access_log(
    cluster: &Cluster,
    node: &Node,
    direction: &str,
    dst: SocketAddr,
    at_least: usize,
) -> Result<Vec<Value>> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let found = access_logs_to(node, direction, dst);
        if found.len() >= at_least {
            return Ok(found);
        }
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "agent {} logged {} {direction} connections to {dst}, expected {at_least}",
            node.name(),
            found.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of one series of the agent's `/metrics`, named exactly as exposed (with its
/// labels, e.g. `ambit_connections_denied_total{reason="plaintext_strict"}`); `None` when the
/// series does not exist (yet).
pub fn metric(node: &Node, series: &str) -> Result<Option<f64>> {
    let r = node.http_get(crate::METRICS_PORT, "/metrics", Duration::from_secs(5))?;
    ensure!(
        r.status == 200,
        "GET /metrics on {}: HTTP {}",
        node.name(),
        r.status
    );
    Ok(r.body.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    }))
}

/// The sum of the samples of `family` (e.g. `istio_tcp_received_bytes_total`) on `node`'s
/// `/metrics` whose labels include every pair of `labels`; 0 when none does.
pub fn metric_sum(node: &Node, family: &str, labels: &[(&str, &str)]) -> Result<f64> {
    let r = node.http_get(crate::METRICS_PORT, "/metrics", Duration::from_secs(5))?;
    ensure!(
        r.status == 200,
        "GET /metrics on {}: HTTP {}",
        node.name(),
        r.status
    );
    let mut sum = 0.0;
    for line in r.body.lines() {
        let Some(rest) = line.strip_prefix(family) else {
            continue;
        };
        let (series_labels, value) = match rest.strip_prefix('{') {
            Some(rest) => match rest.rsplit_once("} ") {
                Some((inside, value)) => (parse_labels(inside), value),
                None => continue,
            },
            None => match rest.strip_prefix(' ') {
                Some(value) => (Vec::new(), value),
                None => continue,
            },
        };
        let wanted = labels
            .iter()
            .all(|(k, v)| series_labels.iter().any(|(sk, sv)| sk == k && sv == v));
        if wanted && let Ok(value) = value.trim().parse::<f64>() {
            sum += value;
        }
    }
    Ok(sum)
}

/// `k="v",k2="v2"` (the inside of a series' braces) as pairs, quotes and escapes undone.
fn parse_labels(inside: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut rest = inside;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(if escaped == 'n' { '\n' } else { escaped });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        pairs.push((key.trim_start_matches(',').trim().to_string(), value));
        rest = &after[end..];
    }
    pairs
}

/// The local ports of `pod`'s established TCP connections to port 15008: its outbound HBONE
/// connections (the agent dials them from inside the pod's namespace).
pub fn hbone_client_ports(pod: &Pod) -> Result<Vec<u16>> {
    let dport = format!(":{}", crate::HBONE_PORT);
    let out = crate::util::run(
        "ip",
        [
            "netns",
            "exec",
            pod.netns_name(),
            "ss",
            "-Htn",
            "state",
            "established",
            "dport",
            "=",
            dport.as_str(),
        ],
    )?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let local = l.split_whitespace().nth(2)?;
            local.rsplit_once(':')?.1.parse().ok()
        })
        .collect())
}

/// Like [`metric`], for a series that must exist.
pub fn metric_value(node: &Node, series: &str) -> Result<f64> {
    metric(node, series)?.ok_or_else(|| anyhow!("no {series} in the metrics of {}", node.name()))
}
