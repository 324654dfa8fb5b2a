//! End-to-end tests of workload identity on the wire: what a capture of the link between two
//! nodes shows, what a real Prometheus server scrapes, and how certificates behave over time
//! (renewal under traffic, the CA stopped, a root rotation).
//!
//! Real tools do the observing: `tcpdump` captures on a node's fabric interface, Debian's
//! `prometheus` scrapes the agents, `openssl` reads the certificate a pod's HBONE listener
//! presents and verifies it against one root or the other. Each runs inside the bed's network
//! namespaces and cgroups, held by a guard that stops it by PID (the bed's teardown also kills
//! whatever is left in its cgroups).
//!
//! HBONE connections are pooled per (source pod, destination pod): a stream of connections
//! between two pods rides one TLS connection, whose handshake happened once. To make renewed
//! and rotated certificates actually meet in handshakes, the "reconnecting" traffic below
//! destroys the source pod's pooled HBONE socket (`ss -K`) between batches of connections, so
//! each batch starts with a fresh TLS handshake using the certificates held at that moment.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ambit_common::INBOUND_HBONE_PORT as HBONE_PORT;
use ambit_tests::cluster::{CA_ADDR, TRUST_DOMAIN};
use ambit_tests::process::Tool;
use ambit_tests::prometheus::{Prometheus, Series, by_labels, expect};
use ambit_tests::traffic::{
    client, connect_ok_n, hbone_client_ports, metric_value, serve, spawn_client, wait_access_log,
};
use ambit_tests::util::{self, Netns};
use ambit_tests::{Cluster, ClusterSpec, Node, Pod, ensure_or_dump};
use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;

const T: Duration = Duration::from_secs(20);

/// Every bed pod runs as `default/default`.
fn default_identity() -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/default")
}

fn testpod() -> PathBuf {
    ambit_tests::testpod_path!()
}

fn cluster(nodes: usize, pods_per_node: usize) -> Result<Cluster> {
    Cluster::start(ClusterSpec {
        nodes,
        pods_per_node,
    })
}

fn fabric_netns(cluster: &Cluster) -> PathBuf {
    Path::new(util::NETNS_DIR).join(cluster.fabric_netns())
}

/// Runs a command inside a network namespace (by name) with `ip netns exec`; its stdout.
fn netns_run(netns_name: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["netns", "exec", netns_name];
    all.extend_from_slice(args);
    util::run("ip", all)
}

// ---------------------------------------------------------------------------------------------
// tcpdump

/// A running `tcpdump -i <node's fabric interface> -w - -U`, its pcap output going to a file.
struct Capture {
    tool: Tool,
    pcap: PathBuf,
}

fn start_capture(cluster: &Cluster, node: &Node, name: &str) -> Result<Capture> {
    let pcap = cluster.run_dir().join(format!("{name}.pcap"));
    let mut cmd = Command::new("tcpdump");
    // -Z root: Debian's tcpdump otherwise drops to its own user; -w - keeps the file ours.
    cmd.args([
        "-i",
        node.fabric_interface(),
        "-n",
        "-s",
        "0",
        // 64 MiB of kernel buffer: a busy machine must not drop the packets we look for.
        "-B",
        "65536",
        "-U",
        "--immediate-mode",
        "-Z",
        "root",
        "-w",
        "-",
    ])
    .stdout(File::create(&pcap)?);
    let mut tool = Tool::spawn(
        cluster,
        &format!("tcpdump {name}"),
        "capture",
        node.netns_path(),
        cmd,
        cluster.run_dir().join(format!("{name}.tcpdump.log")),
        true,
    )?;
    let deadline = Instant::now() + T;
    while !tool.log_text().contains("listening on") {
        if let Some(s) = tool.try_status() {
            bail!("tcpdump exited ({s}): {}", tool.log_tail());
        }
        ensure!(
            Instant::now() < deadline,
            "tcpdump did not start listening within {T:?}: {}",
            tool.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Capture { tool, pcap })
}

impl Capture {
    /// Stops tcpdump with SIGINT (it flushes and exits) and returns the pcap's bytes.
    fn finish(&mut self) -> Result<Vec<u8>> {
        // Let the last packets (FINs, the last TLS records) pass the interface.
        std::thread::sleep(Duration::from_millis(500));
        self.tool.stop(libc::SIGINT, Duration::from_secs(5))?;
        fs::read(&self.pcap).with_context(|| format!("read {}", self.pcap.display()))
    }

    /// The packets of the capture matching a pcap filter, one text line each
    /// (`tcpdump -r FILE -nn FILTER`).
    fn packets(&self, filter: &str) -> Result<Vec<String>> {
        let mut args = vec![
            "-r".to_string(),
            self.pcap.display().to_string(),
            "-nn".into(),
        ];
        args.extend(filter.split_whitespace().map(String::from));
        Ok(util::run("tcpdump", &args)?
            .lines()
            .map(String::from)
            .collect())
    }
}

/// The relative acknowledgement number tcpdump prints (`..., ack 205350, win ...`): how many
/// bytes the sender of the line has received on its connection (plus one for the SYN). Unlike
/// a sum of captured payloads, it holds when the capture dropped packets.
fn ack_number(line: &str) -> Option<u64> {
    let (_, rest) = line.split_once(", ack ")?;
    rest.split(',').next()?.trim().parse().ok()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// certificates in config_dump and metrics

/// `config_dump.certificates` of a node: `[{id, notBefore, notAfter, serial, lastError}]`.
fn certificates(node: &Node) -> Result<Vec<Value>> {
    let dump = node.config_dump()?;
    dump["certificates"].as_array().cloned().ok_or_else(|| {
        anyhow!(
            "config_dump of {} has no certificates array: {dump}",
            node.name()
        )
    })
}

/// The serial of the certificate `node` holds for `id`, if any.
fn serial_of(node: &Node, id: &str) -> Result<Option<String>> {
    Ok(certificates(node)?
        .iter()
        .find(|c| c["id"] == id)
        .and_then(|c| c["serial"].as_str().map(String::from)))
}

/// Waits until `node` holds a certificate for `id`; returns its serial.
fn wait_certificate(cluster: &Cluster, node: &Node, id: &str) -> Result<String> {
    let deadline = Instant::now() + T;
    loop {
        if let Some(serial) = serial_of(node, id)? {
            return Ok(serial);
        }
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "{} holds no certificate for {id} after {T:?}",
            node.name()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `node`'s certificate for `id` has a serial other than each of `not`; returns
/// it.
fn wait_new_serial(
    cluster: &Cluster,
    node: &Node,
    id: &str,
    not: &BTreeSet<String>,
    timeout: Duration,
) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(serial) = serial_of(node, id)?
            && !not.contains(&serial)
        {
            return Ok(serial);
        }
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "{}: no certificate for {id} other than {not:?} within {timeout:?}; now {:?}",
            node.name(),
            certificates(node)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for `n` renewals of `id`'s certificate on each node, counted from now.
fn wait_renewals(cluster: &Cluster, id: &str, n: usize, timeout: Duration) -> Result<()> {
    for node in cluster.nodes() {
        let mut seen: BTreeSet<String> = serial_of(node, id)?.into_iter().collect();
        for _ in 0..n {
            let s = wait_new_serial(cluster, node, id, &seen, timeout)?;
            seen.insert(s);
        }
    }
    Ok(())
}

/// Polls every node's certificates while traffic runs, recording each serial seen (in order)
/// per node and identity.
#[derive(Default)]
struct SerialLog {
    seen: Mutex<BTreeMap<(String, String), Vec<String>>>,
}

impl SerialLog {
    fn poll(&self, cluster: &Cluster) {
        for node in cluster.nodes() {
            let Ok(certs) = certificates(node) else {
                continue;
            };
            for c in certs {
                let (Some(id), Some(serial)) = (c["id"].as_str(), c["serial"].as_str()) else {
                    continue;
                };
                let mut seen = self.seen.lock().unwrap();
                let list = seen
                    .entry((node.name().to_string(), id.to_string()))
                    .or_default();
                if list.last().map(String::as_str) != Some(serial) {
                    list.push(serial.to_string());
                }
            }
        }
    }

    fn run_until(&self, cluster: &Cluster, stop: &AtomicBool) {
        while !stop.load(Ordering::SeqCst) {
            self.poll(cluster);
            std::thread::sleep(Duration::from_millis(150));
        }
        self.poll(cluster);
    }

    fn distinct(&self, node: &Node, id: &str) -> usize {
        let seen = self.seen.lock().unwrap();
        seen.get(&(node.name().to_string(), id.to_string()))
            .map_or(0, |v| v.iter().collect::<BTreeSet<_>>().len())
    }

    fn snapshot(&self) -> BTreeMap<(String, String), Vec<String>> {
        self.seen.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------------------------------------
// traffic that runs while certificates change

/// What a traffic generator saw.
#[derive(Debug, Default)]
struct Traffic {
    /// Connections that succeeded.
    ok: u64,
    /// Reports of connections that failed.
    failures: Vec<Value>,
    /// Local ports of the source pod's HBONE connections seen after each batch (a new port
    /// is a new TLS connection, hence a new handshake).
    hbone_ports: BTreeSet<u16>,
    /// Batches run.
    batches: u64,
    /// Errors of the generator itself (spawning, `ss`).
    errors: Vec<String>,
}

/// Short connections (`testpod churn`, one byte each) from `from` to `dst`, in slices of 2 s,
/// until `stop`: continuous traffic over one pooled HBONE connection.
fn churn_until(from: &Pod, dst: SocketAddr, stop: &AtomicBool) -> Traffic {
    let mut t = Traffic::default();
    while !stop.load(Ordering::SeqCst) {
        let r = (|| -> Result<Value> {
            let mut churn = from.spawn(
                testpod(),
                [
                    "churn",
                    "--connect",
                    &dst.to_string(),
                    "--count",
                    "1000000",
                    "--max-seconds",
                    "2",
                ],
            )?;
            let (_, lines) = churn.wait_json(Duration::from_secs(30))?;
            lines
                .last()
                .cloned()
                .ok_or_else(|| anyhow!("churn printed no summary"))
        })();
        t.batches += 1;
        match r {
            Ok(summary) => {
                t.ok += summary["ok"].as_u64().unwrap_or(0);
                if summary["failed"].as_u64() != Some(0) {
                    t.failures.push(summary);
                }
            }
            Err(e) => t.errors.push(format!("{e:#}")),
        }
    }
    t
}

/// Batches of 5 connections from `from` to `dst` until `stop`; after each batch the source
/// pod's HBONE sockets are destroyed (`ss -K`), so that the next batch starts with a new TLS
/// handshake presenting the certificates of that moment. `from` must have no other outbound
/// mesh traffic meanwhile: its tunnels would be cut too.
fn reconnecting_until(from: &Pod, dst: SocketAddr, stop: &AtomicBool) -> Traffic {
    let mut t = Traffic::default();
    while !stop.load(Ordering::SeqCst) {
        t.batches += 1;
        match client(from, dst, 2000, 5) {
            Ok(conns) => {
                for c in conns {
                    if c.ok() && c.report["received"] == 2000 {
                        t.ok += 1;
                    } else {
                        t.failures.push(c.report);
                    }
                }
            }
            Err(e) => t.errors.push(format!("client: {e:#}")),
        }
        match hbone_client_ports(from) {
            Ok(ports) => t.hbone_ports.extend(ports),
            Err(e) => t.errors.push(format!("ss: {e:#}")),
        }
        if let Err(e) = netns_run(
            from.netns_name(),
            &[
                "ss",
                "-K",
                "-Htn",
                "state",
                "established",
                "dport",
                "=",
                &format!(":{HBONE_PORT}"),
            ],
        ) {
            t.errors.push(format!("ss -K: {e:#}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    t
}

/// Checks a generator's record: no failed connection, no generator error, at least
/// `min_ok` connections.
fn check_traffic(cluster: &Cluster, what: &str, t: &Traffic, min_ok: u64) -> Result<()> {
    eprintln!(
        "[identity] {what}: {} connections ok, {} failed, {} batches, {} HBONE connections seen",
        t.ok,
        t.failures.len(),
        t.batches,
        t.hbone_ports.len()
    );
    ensure_or_dump!(
        cluster,
        t.failures.is_empty() && t.errors.is_empty() && t.ok >= min_ok,
        "{what}: {} connections ok (expected at least {min_ok}) over {} batches; failures: \
         {:?}; generator errors: {:?}",
        t.ok,
        t.batches,
        t.failures,
        t.errors
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// openssl: the certificate a pod's HBONE listener presents

/// Connects to `pod`'s HBONE port from its node with `openssl s_client` and returns the leaf
/// certificate it presented (PEM, written to a file of the run dir). The handshake itself
/// fails afterwards (no client certificate); the server's certificate came before that.
fn presented_leaf(cluster: &Cluster, pod: &Pod, tag: &str) -> Result<PathBuf> {
    let node = cluster.node_of(pod);
    let out = Command::new("ip")
        .args(["netns", "exec", node.netns_name(), "timeout", "10"])
        .args(["openssl", "s_client", "-connect"])
        .arg(pod.addr4(HBONE_PORT).to_string())
        .args(["-alpn", "h2", "-showcerts"])
        .stdin(Stdio::null())
        .output()
        .context("run openssl s_client")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let begin = "-----BEGIN CERTIFICATE-----";
    let end = "-----END CERTIFICATE-----";
    let pem = stdout
        .find(begin)
        .and_then(|b| stdout[b..].find(end).map(|e| &stdout[b..b + e + end.len()]))
        .ok_or_else(|| {
            anyhow!(
                "openssl s_client to {} showed no certificate: {stdout}\n{}",
                pod.addr4(HBONE_PORT),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let path = cluster
        .run_dir()
        .join(format!("leaf-{}-{tag}.pem", pod.name()));
    fs::write(&path, format!("{pem}\n"))?;
    Ok(path)
}

/// Whether `openssl verify` accepts `leaf` with `root` as the only trust anchor.
fn verifies(root: &Path, leaf: &Path) -> Result<bool> {
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(root)
        .arg(leaf)
        .output()
        .context("run openssl verify")?;
    Ok(out.status.success())
}

/// The serial of a PEM certificate, lower-case hex without leading zeros.
fn pem_serial(cert: &Path) -> Result<String> {
    let out = util::run(
        "openssl",
        [
            "x509".as_ref(),
            "-noout".as_ref(),
            "-serial".as_ref(),
            "-in".as_ref(),
            cert.as_os_str(),
        ],
    )?;
    let hex = out
        .trim()
        .strip_prefix("serial=")
        .ok_or_else(|| anyhow!("unexpected openssl x509 -serial output {out:?}"))?;
    Ok(normalise_serial(hex))
}

fn normalise_serial(hex: &str) -> String {
    let s = hex.replace(':', "").to_ascii_lowercase();
    let s = s.trim_start_matches('0');
    if s.is_empty() { "0".into() } else { s.into() }
}

/// The leaf `pod` presents now, checked to be the certificate its node reports in
/// config_dump (retried if a renewal slips in between).
fn current_leaf(cluster: &Cluster, pod: &Pod, tag: &str) -> Result<PathBuf> {
    let node = cluster.node_of(pod);
    let id = default_identity();
    let mut last = String::new();
    for attempt in 0..5 {
        let before = serial_of(node, &id)?.map(|s| normalise_serial(&s));
        let leaf = presented_leaf(cluster, pod, &format!("{tag}-{attempt}"))?;
        let after = serial_of(node, &id)?.map(|s| normalise_serial(&s));
        let presented = pem_serial(&leaf)?;
        if before.as_deref() == Some(&presented) || after.as_deref() == Some(&presented) {
            return Ok(leaf);
        }
        last = format!("presented {presented}, config_dump {before:?} then {after:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
    Err(anyhow!(
        "{}'s HBONE listener presents a certificate its node does not report: {last}\n{}",
        pod.name(),
        cluster.diagnostics()
    ))
}

// ---------------------------------------------------------------------------------------------
// the tests

#[test]
fn pod_to_pod_traffic_crosses_the_wire_only_as_tls() -> Result<()> {
    const MARKER: &str = "AMBIT-PLAINTEXT-MARKER-7f3a9c-";
    const BYTES: u64 = 200_000;
    let cluster = cluster(2, 2)?;
    let (src, dst) = (cluster.pod(0, 0), cluster.pod(1, 0));
    let (plain_src, plain_dst) = (cluster.pod(0, 1), cluster.pod(1, 1));
    cluster.set_enrolled(plain_src, false);
    cluster.set_enrolled(plain_dst, false);
    cluster.write_mesh()?;
    cluster.start_agents()?;
    let _s1 = serve(dst, &[8080])?;
    let _s2 = serve(plain_dst, &[8080])?;
    let node0 = cluster.node(0);
    let pattern = ["--pattern", MARKER];

    // Between enrolled pods: HBONE.
    let mut capture = start_capture(&cluster, node0, "meshed")?;
    let conns = connect_ok_n(&cluster, src, dst.addr4(8080), BYTES, 1, &pattern)?;
    let pcap = capture.finish()?;
    ensure_or_dump!(
        cluster,
        conns[0].redirected(),
        "the meshed connection was not redirected: {}",
        conns[0].report
    );
    // What the destination's port 15008 acknowledged having received over the fabric.
    let hbone = capture.packets(&format!(
        "tcp and src host {} and src port {HBONE_PORT}",
        dst.ip4()
    ))?;
    let hbone_bytes = hbone
        .iter()
        .filter_map(|l| ack_number(l))
        .max()
        .unwrap_or(0);
    let app = capture.packets("tcp port 8080")?;
    ensure_or_dump!(
        cluster,
        hbone_bytes > BYTES,
        "expected the {BYTES} bytes to cross {} as TCP to {}:15008; its {} packets back \
         acknowledge {hbone_bytes} bytes ({}; {})",
        node0.fabric_interface(),
        dst.ip4(),
        hbone.len(),
        capture.pcap.display(),
        capture.tool.log_tail()
    );
    ensure_or_dump!(
        cluster,
        app.is_empty(),
        "packets to or from the application port 8080 crossed the link: {:?}",
        &app[..app.len().min(5)]
    );
    ensure_or_dump!(
        cluster,
        !contains(&pcap, MARKER.as_bytes()),
        "the capture {} ({} bytes) holds the application's bytes in clear",
        capture.pcap.display(),
        pcap.len()
    );
    let spiffe = default_identity();
    for (node, direction) in [(node0, "outbound"), (cluster.node(1), "inbound")] {
        let line = wait_access_log(&cluster, node, direction, dst.addr4(8080), 1)?.remove(0);
        ensure_or_dump!(
            cluster,
            line["security"] == "mtls"
                && line["src_principal"] == spiffe.as_str()
                && line["dst_principal"] == spiffe.as_str()
                && line["bytes_sent"].as_u64() >= Some(BYTES),
            "{} {direction} access log does not show an mTLS connection between the two \
             identities: {line}",
            node.name()
        );
    }

    // Control: the same payload between two un-enrolled pods is visible on the same link, so
    // the checks above can fail.
    let mut capture = start_capture(&cluster, node0, "plain")?;
    let conns = connect_ok_n(
        &cluster,
        plain_src,
        plain_dst.addr4(8080),
        BYTES,
        1,
        &pattern,
    )?;
    let pcap = capture.finish()?;
    ensure_or_dump!(
        cluster,
        !conns[0].redirected(),
        "the un-enrolled pods' connection was redirected: {}",
        conns[0].report
    );
    let app = capture.packets(&format!(
        "tcp and dst host {} and dst port 8080",
        plain_dst.ip4()
    ))?;
    ensure_or_dump!(
        cluster,
        contains(&pcap, MARKER.as_bytes()) && !app.is_empty(),
        "control: the plaintext connection's marker ({}) or its packets to port 8080 ({}) are \
         missing from the capture {}: the capture does not see the link",
        contains(&pcap, MARKER.as_bytes()),
        app.len(),
        capture.pcap.display()
    );
    Ok(())
}

#[test]
fn a_real_prometheus_scrapes_per_workload_counters() -> Result<()> {
    let cluster = cluster(2, 2)?;
    cluster.start_agents()?;
    let (p00, p10, p11) = (cluster.pod(0, 0), cluster.pod(1, 0), cluster.pod(1, 1));
    let _s1 = serve(p10, &[8080])?;
    let _s2 = serve(p00, &[8080])?;
    let targets: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| format!("{}:15020", n.fabric_ip()))
        .collect();
    let mut prom = Prometheus::start(&cluster, &targets)?;

    // Both agents are scraped.
    let deadline = Instant::now() + T;
    loop {
        let up = by_labels(&prom.query("up{job=\"ambit\"}")?, &["instance"]);
        let expected: Series = targets.iter().map(|t| (vec![t.clone()], 1.0)).collect();
        if up == expected {
            break;
        }
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "prometheus does not scrape both agents: up = {up:?}; log: {}",
            prom.tool.log_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    connect_ok_n(&cluster, p00, p10.addr4(8080), 1000, 3, &[])?;
    connect_ok_n(&cluster, p11, p00.addr4(8080), 1000, 2, &[])?;
    let spiffe = default_identity();
    let pair_labels = [
        "source_workload",
        "destination_workload",
        "connection_security_policy",
    ];
    let checks: Vec<(String, Vec<&str>, Series)> = vec![
        (
            "sum by (source_workload, destination_workload, connection_security_policy) \
             (istio_tcp_connections_opened_total{reporter=\"destination\"})"
                .into(),
            pair_labels.to_vec(),
            expect(&[
                (&["p0-0", "p1-0", "mutual_tls"], 3.0),
                (&["p1-1", "p0-0", "mutual_tls"], 2.0),
            ]),
        ),
        (
            "sum by (source_workload, destination_workload, connection_security_policy) \
             (istio_tcp_connections_opened_total{reporter=\"source\"})"
                .into(),
            pair_labels.to_vec(),
            expect(&[
                (&["p0-0", "p1-0", "mutual_tls"], 3.0),
                (&["p1-1", "p0-0", "mutual_tls"], 2.0),
            ]),
        ),
        (
            "sum by (source_workload, destination_workload, source_principal, \
             destination_principal) (istio_tcp_connections_closed_total{reporter=\"destination\"})"
                .into(),
            vec![
                "source_workload",
                "destination_workload",
                "source_principal",
                "destination_principal",
            ],
            expect(&[
                (&["p0-0", "p1-0", &spiffe, &spiffe], 3.0),
                (&["p1-1", "p0-0", &spiffe, &spiffe], 2.0),
            ]),
        ),
        (
            "sum by (source_workload, destination_workload) \
             (istio_tcp_received_bytes_total{reporter=\"destination\"})"
                .into(),
            vec!["source_workload", "destination_workload"],
            expect(&[(&["p0-0", "p1-0"], 3000.0), (&["p1-1", "p0-0"], 2000.0)]),
        ),
    ];
    // Counters reach Prometheus at its next scrapes (every second); the closed counter once
    // the connections' ends are accounted.
    let deadline = Instant::now() + T;
    loop {
        let mut wrong = Vec::new();
        for (q, labels, want) in &checks {
            let got = by_labels(&prom.query(q)?, labels);
            if got != *want {
                wrong.push(format!("{q}\n  got {got:?}\n  expected {want:?}"));
            }
        }
        if wrong.is_empty() {
            break;
        }
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "prometheus did not return the expected counters within {T:?}:\n{}",
            wrong.join("\n")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Two more scrapes: the counts stay exact (nothing counted twice or late).
    std::thread::sleep(Duration::from_millis(2500));
    for (q, labels, want) in &checks {
        let got = by_labels(&prom.query(q)?, labels);
        ensure_or_dump!(
            cluster,
            got == *want,
            "{q}\n  got {got:?}\n  expected {want:?} (after two more scrapes)"
        );
    }
    let status = prom.tool.stop(libc::SIGTERM, Duration::from_secs(10))?;
    ensure!(
        status.success(),
        "prometheus did not exit cleanly ({status}): {}",
        prom.tool.log_tail()
    );
    Ok(())
}

/// Starts the agents of every node with `--cert-ttl ttl`.
fn start_agents_with_ttl(cluster: &Cluster, ttl: &str) -> Result<()> {
    for n in cluster.nodes() {
        n.set_agent_args(["--cert-ttl", ttl]);
    }
    cluster.start_agents()
}

#[test]
fn certificates_renew_under_continuous_traffic_without_failures() -> Result<()> {
    let cluster = cluster(2, 2)?;
    start_agents_with_ttl(&cluster, "6s")?;
    let id = default_identity();
    let _s1 = serve(cluster.pod(1, 0), &[8080])?;
    let _s2 = serve(cluster.pod(0, 1), &[8080])?;
    let first: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| wait_certificate(&cluster, n, &id))
        .collect::<Result<_>>()?;

    let serials = SerialLog::default();
    let stop = AtomicBool::new(false);
    let (churn, batches) = std::thread::scope(|s| {
        let watcher = s.spawn(|| serials.run_until(&cluster, &stop));
        let churn =
            s.spawn(|| churn_until(cluster.pod(0, 0), cluster.pod(1, 0).addr4(8080), &stop));
        let batches =
            s.spawn(|| reconnecting_until(cluster.pod(1, 1), cluster.pod(0, 1).addr4(8080), &stop));
        std::thread::sleep(Duration::from_secs(15));
        stop.store(true, Ordering::SeqCst);
        let _ = watcher.join();
        (churn.join(), batches.join())
    });
    let churn = churn.map_err(|_| anyhow!("churn thread panicked"))?;
    let batches = batches.map_err(|_| anyhow!("batch thread panicked"))?;
    check_traffic(&cluster, "churn p0-0 -> p1-0", &churn, 100)?;
    check_traffic(&cluster, "reconnecting batches p1-1 -> p0-1", &batches, 20)?;
    ensure_or_dump!(
        cluster,
        batches.hbone_ports.len() >= 3,
        "expected a fresh HBONE connection per batch, saw source ports {:?} over {} batches",
        batches.hbone_ports,
        batches.batches
    );
    for (node, first) in cluster.nodes().iter().zip(&first) {
        let n = serials.distinct(node, &id);
        ensure_or_dump!(
            cluster,
            n >= 3,
            "{}: the certificate (first serial {first}) was renewed {} times in 15 s with a 6 s \
             lifetime, expected at least 2: {:?}",
            node.name(),
            n.saturating_sub(1),
            serials.snapshot()
        );
    }
    // The renewals were successes, not retries.
    for node in cluster.nodes() {
        let errors = metric_value(node, "ambit_ca_errors_total")?;
        ensure_or_dump!(
            cluster,
            errors == 0.0,
            "{}: {errors} CA errors during renewals",
            node.name()
        );
    }
    Ok(())
}

#[test]
fn with_the_ca_stopped_existing_certificates_keep_working() -> Result<()> {
    let cluster = cluster(2, 2)?;
    // Renewal after ~10 s, expiry after 20 s: the CA is down when renewal comes due.
    start_agents_with_ttl(&cluster, "20s")?;
    let id = default_identity();
    let _s = serve(cluster.pod(0, 1), &[8080])?;
    let dst = cluster.pod(0, 1).addr4(8080);
    let client_pod = cluster.pod(1, 1);
    for n in cluster.nodes() {
        wait_certificate(&cluster, n, &id)?;
    }
    connect_ok_n(&cluster, client_pod, dst, 1000, 1, &[])?;
    let errors_before: Vec<f64> = cluster
        .nodes()
        .iter()
        .map(|n| metric_value(n, "ambit_ca_errors_total"))
        .collect::<Result<_>>()?;

    cluster.stop_ca();
    // The certificates held now are those that must carry the traffic while the CA is down.
    let held: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| wait_certificate(&cluster, n, &id))
        .collect::<Result<_>>()?;

    // Renewal comes due and fails: reported in config_dump and counted.
    let deadline = Instant::now() + Duration::from_secs(25);
    for (i, node) in cluster.nodes().iter().enumerate() {
        loop {
            let cert = certificates(node)?
                .into_iter()
                .find(|c| c["id"] == id.as_str())
                .unwrap_or_default();
            let errors = metric_value(node, "ambit_ca_errors_total")?;
            if cert["lastError"].is_string() && errors > errors_before[i] {
                break;
            }
            ensure_or_dump!(
                cluster,
                Instant::now() < deadline,
                "{}: with the CA stopped, no failed renewal is reported (certificate {cert}, \
                 ambit_ca_errors_total {errors})",
                node.name()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // The kept certificates carry traffic, in fresh handshakes, for the next 5 s.
    let stop = AtomicBool::new(false);
    let traffic = std::thread::scope(|s| {
        let t = s.spawn(|| reconnecting_until(client_pod, dst, &stop));
        std::thread::sleep(Duration::from_secs(5));
        stop.store(true, Ordering::SeqCst);
        t.join()
    })
    .map_err(|_| anyhow!("traffic thread panicked"))?;
    check_traffic(&cluster, "with the CA stopped", &traffic, 10)?;
    ensure_or_dump!(
        cluster,
        traffic.hbone_ports.len() >= 2,
        "expected fresh HBONE connections while the CA was down, saw source ports {:?}",
        traffic.hbone_ports
    );
    for (node, held) in cluster.nodes().iter().zip(&held) {
        let now = serial_of(node, &id)?;
        ensure_or_dump!(
            cluster,
            now.as_deref() == Some(held.as_str()),
            "{}: the certificate held when the CA stopped ({held}) should still be in use, \
             config_dump shows {now:?}",
            node.name()
        );
    }

    // The CA is back: new certificates arrive without help (after the current backoff).
    cluster.start_ca()?;
    for (node, held) in cluster.nodes().iter().zip(&held) {
        wait_new_serial(
            &cluster,
            node,
            &id,
            &BTreeSet::from([held.clone()]),
            Duration::from_secs(40),
        )?;
        let cert = certificates(node)?
            .into_iter()
            .find(|c| c["id"] == id.as_str())
            .unwrap_or_default();
        ensure_or_dump!(
            cluster,
            cert["lastError"].is_null(),
            "{}: lastError not cleared by the successful renewal: {cert}",
            node.name()
        );
    }
    connect_ok_n(&cluster, client_pod, dst, 1000, 3, &[])?;
    Ok(())
}

/// A client may reach a pod the moment it is enrolled, before the CA has answered for it: the
/// pod's agent holds the first connections until the certificate comes (bounded), rather than
/// resetting them. The CA is stopped while the server's pod is enrolled, so the wait is certain,
/// and started again a second later.
#[test]
fn the_first_connections_to_a_pod_just_enrolled_wait_for_its_certificate() -> Result<()> {
    let cluster = cluster(2, 1)?;
    let client_pod = cluster.pod(0, 0);
    let server_pod = cluster.pod(1, 0);
    cluster.set_enrolled(server_pod, false);
    cluster.write_mesh()?;
    cluster.start_agents()?;
    let id = default_identity();
    wait_certificate(&cluster, cluster.node(0), &id)?;
    let _s = serve(server_pod, &[8080])?;
    let dst = server_pod.addr4(8080);

    // n1 has no pod of the identity yet, so no certificate: it fetches one on enrolment.
    cluster.stop_ca();
    let generation = cluster.node(1).config_generation()?;
    cluster.set_enrolled(server_pod, true);
    cluster.write_mesh()?;
    cluster.wait_config_generation(1, generation + 1, T)?;
    cluster.with_diagnostics(cluster.node(1).wait_enrolled(1, T))?;
    ensure_or_dump!(
        cluster,
        serial_of(cluster.node(1), &id)?.is_none(),
        "n1 holds a certificate although the CA is stopped"
    );
    // Four at once, as a load generator opens them.
    let clients = (0..4)
        .map(|_| spawn_client(client_pod, dst, 1000, 1, &["--timeout-ms", "8000"]))
        .collect::<Result<Vec<_>>>()?;
    std::thread::sleep(Duration::from_secs(1));
    cluster.start_ca()?;
    let mut reports = Vec::new();
    for mut c in clients {
        let (_, lines) = c.wait_json(T)?;
        reports.extend(lines);
    }
    let failed: Vec<&Value> = reports.iter().filter(|r| r["ok"] != true).collect();
    ensure_or_dump!(
        cluster,
        reports.len() == 4 && failed.is_empty(),
        "{} of 4 connections reported; failed: {failed:?}",
        reports.len()
    );
    // Carried by HBONE: the server's agent logged each inbound.
    wait_access_log(&cluster, cluster.node(1), "inbound", dst, 4)?;
    Ok(())
}

#[test]
fn a_root_rotation_passes_without_failed_connections() -> Result<()> {
    let cluster = cluster(2, 2)?;
    start_agents_with_ttl(&cluster, "6s")?;
    let id = default_identity();
    let _s1 = serve(cluster.pod(1, 0), &[8080])?;
    let _s2 = serve(cluster.pod(0, 1), &[8080])?;
    let _s3 = serve(cluster.pod(1, 1), &[8080])?;
    for n in cluster.nodes() {
        wait_certificate(&cluster, n, &id)?;
    }
    let old_dir = cluster.ca_dir();
    let new_dir = cluster.run_dir().join("ca-new");
    let bundle = old_dir.join("roots.pem"); // what the agents' --ca-roots names
    let old_root = old_dir.join("root-cert.pem");
    let new_root = new_dir.join("root-cert.pem");
    let probe_pods = [cluster.pod(0, 1), cluster.pod(1, 0)];

    // Step 1: the new root; NEW/roots.pem trusts both. Before the rotation every leaf comes
    // from the old root, which the new root alone does not accept: the openssl checks tell
    // the two apart (and the same check after the rotation must come out the other way).
    let init = Command::new(cluster.ambit_bin())
        .args(["ca", "init", "--dir"])
        .arg(&new_dir)
        .args(["--trust-domain", TRUST_DOMAIN, "--also-trust"])
        .arg(&bundle)
        .output()
        .context("run ambit ca init")?;
    ensure!(
        init.status.success(),
        "ambit ca init (new root) failed: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    for pod in probe_pods {
        let leaf = current_leaf(&cluster, pod, "before")?;
        ensure_or_dump!(
            cluster,
            verifies(&old_root, &leaf)? && !verifies(&new_root, &leaf)?,
            "before the rotation {}'s leaf should verify against the old root only",
            pod.name()
        );
    }

    let serials = SerialLog::default();
    let stop = AtomicBool::new(false);
    let mut new_ca: Option<Tool> = None;
    let (phases, churn, batches_a, batches_b) = std::thread::scope(|s| {
        let watcher = s.spawn(|| serials.run_until(&cluster, &stop));
        let churn =
            s.spawn(|| churn_until(cluster.pod(0, 0), cluster.pod(1, 0).addr4(8080), &stop));
        let batches_a =
            s.spawn(|| reconnecting_until(cluster.pod(1, 1), cluster.pod(0, 1).addr4(8080), &stop));
        let batches_b =
            s.spawn(|| reconnecting_until(cluster.pod(0, 1), cluster.pod(1, 1).addr4(8080), &stop));
        let phases = (|| -> Result<()> {
            // Some traffic under the old root first.
            std::thread::sleep(Duration::from_secs(2));

            // Step 2: the agents' bundle trusts both roots (replaced atomically). Certificates
            // fetched from now on carry it; wait for two renewals per node so that every
            // certificate in use was fetched after the change.
            let tmp = old_dir.join("roots.pem.rotating");
            fs::copy(new_dir.join("roots.pem"), &tmp)?;
            fs::rename(&tmp, &bundle)?;
            let roots = fs::read_to_string(&bundle)?
                .matches("BEGIN CERTIFICATE")
                .count();
            ensure!(
                roots == 2,
                "the rotation bundle holds {roots} roots, expected 2"
            );
            wait_renewals(&cluster, &id, 2, T)?;

            // Step 3: serve from the new root, on the same address with the same tokens.
            cluster.stop_ca();
            new_ca = Some(start_ca_from(&cluster, &new_dir)?);
            // Two renewals per node from the new CA.
            wait_renewals(&cluster, &id, 2, Duration::from_secs(40))?;
            for pod in probe_pods {
                let leaf = current_leaf(&cluster, pod, "after")?;
                ensure_or_dump!(
                    cluster,
                    verifies(&new_root, &leaf)? && !verifies(&old_root, &leaf)?,
                    "after the rotation {}'s leaf should verify against the new root only",
                    pod.name()
                );
            }

            // Step 4: every certificate in use is the new root's: drop the old root.
            let tmp = old_dir.join("roots.pem.rotating");
            fs::copy(&new_root, &tmp)?;
            fs::rename(&tmp, &bundle)?;
            wait_renewals(&cluster, &id, 2, T)?;
            // Traffic over fresh handshakes under the new root alone.
            std::thread::sleep(Duration::from_secs(2));
            Ok(())
        })();
        stop.store(true, Ordering::SeqCst);
        let _ = watcher.join();
        (phases, churn.join(), batches_a.join(), batches_b.join())
    });
    let mut new_ca = new_ca;
    cluster.with_diagnostics(phases)?;
    let churn = churn.map_err(|_| anyhow!("churn thread panicked"))?;
    let batches_a = batches_a.map_err(|_| anyhow!("batch thread panicked"))?;
    let batches_b = batches_b.map_err(|_| anyhow!("batch thread panicked"))?;
    check_traffic(&cluster, "churn p0-0 -> p1-0", &churn, 100)?;
    check_traffic(
        &cluster,
        "reconnecting batches p1-1 -> p0-1",
        &batches_a,
        20,
    )?;
    check_traffic(
        &cluster,
        "reconnecting batches p0-1 -> p1-1",
        &batches_b,
        20,
    )?;
    for b in [&batches_a, &batches_b] {
        ensure_or_dump!(
            cluster,
            b.hbone_ports.len() >= 6,
            "expected fresh HBONE connections throughout the rotation, saw source ports {:?} \
             over {} batches",
            b.hbone_ports,
            b.batches
        );
    }
    for node in cluster.nodes() {
        ensure_or_dump!(
            cluster,
            serials.distinct(node, &id) >= 7,
            "{}: expected at least 6 renewals during the rotation: {:?}",
            node.name(),
            serials.snapshot()
        );
    }
    if let Some(ca) = new_ca.as_mut() {
        ca.stop(libc::SIGTERM, Duration::from_secs(5))?;
    }
    Ok(())
}

/// Starts `ambit ca serve --dir <dir>` in the fabric namespace on the bed's CA address, with
/// the bed's tokens and mesh file (the bed's own CA must be stopped); waits until it listens.
fn start_ca_from(cluster: &Cluster, dir: &Path) -> Result<Tool> {
    let tokens = cluster.run_dir().join("ca-tokens.yaml");
    ensure!(
        tokens.exists(),
        "the bed's CA tokens file {} is missing",
        tokens.display()
    );
    let netns = fabric_netns(cluster);
    let deadline = Instant::now() + T;
    loop {
        let mut cmd = Command::new(cluster.ambit_bin());
        cmd.args(["--log-format", "json", "ca", "serve", "--dir"])
            .arg(dir)
            .args(["--listen", &CA_ADDR.to_string(), "--mesh-file"])
            .arg(cluster.mesh_path())
            .arg("--tokens")
            .arg(&tokens)
            .args(["--server-name", &CA_ADDR.ip().to_string()]);
        let mut ca = Tool::spawn(
            cluster,
            "ambit ca serve (new root)",
            "ca-new",
            &netns,
            cmd,
            cluster.run_dir().join("ca-new.log"),
            false,
        )?;
        loop {
            let up = Netns::enter_thread(&netns, || {
                std::net::TcpStream::connect_timeout(&CA_ADDR, Duration::from_millis(200)).is_ok()
            })?;
            if up {
                return Ok(ca);
            }
            if ca.try_status().is_some() {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the new CA did not listen on {CA_ADDR}: {}",
                ca.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Exited (e.g. the address was not free yet): try again until the deadline.
        ensure!(
            Instant::now() < deadline,
            "the new CA keeps exiting: {}",
            ca.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The PEM certificates `pod`'s HBONE listener presents (`openssl s_client -showcerts`), in
/// order, each as its base64 body (no framing, no line breaks) for comparison.
fn presented_chain(cluster: &Cluster, pod: &Pod) -> Result<Vec<String>> {
    let node = cluster.node_of(pod);
    let out = Command::new("ip")
        .args(["netns", "exec", node.netns_name(), "timeout", "10"])
        .args(["openssl", "s_client", "-connect"])
        .arg(pod.addr4(HBONE_PORT).to_string())
        .args(["-alpn", "h2", "-showcerts"])
        .stdin(Stdio::null())
        .output()
        .context("run openssl s_client")?;
    Ok(pem_bodies(&String::from_utf8_lossy(&out.stdout)))
}

/// The base64 bodies of the PEM certificates of `text`, in order.
fn pem_bodies(text: &str) -> Vec<String> {
    let begin = "-----BEGIN CERTIFICATE-----";
    let end = "-----END CERTIFICATE-----";
    text.split(begin)
        .skip(1)
        .filter_map(|part| part.split(end).next())
        .map(|body| body.split_whitespace().collect())
        .collect()
}

/// Istio's plug-in certificates on the test bed: the CA's directory holds `cacerts`' four files
/// (an intermediate under an organisation's root) and the agents trust that root alone. Pods
/// talk in mutual TLS with certificates of the intermediate: a pod's HBONE listener presents
/// its leaf and the intermediate, which `openssl verify` accepts with the organisation's root
/// as the only anchor (and not without the intermediate).
#[test]
fn an_intermediate_under_the_organisations_root_signs_the_mesh() -> Result<()> {
    use ambit::testing::ca::PluginCerts;

    let cluster = cluster(2, 1)?;
    // The bed's CA directory, with Istio's plug-in files in place of its own root; the
    // agents' bundle (--ca-roots, roots.pem) is the organisation's root.
    cluster.ca_token(cluster.node(0))?;
    let certs = PluginCerts::new("Example Org");
    let dir = cluster.ca_dir();
    certs.write(&dir);
    fs::write(dir.join("roots.pem"), &certs.root_cert_pem)?;
    cluster.start_agents()?;
    let (client, server) = (cluster.pod(0, 0), cluster.pod(1, 0));
    let _server = serve(server, &[8080])?;
    let id = default_identity();
    for node in cluster.nodes() {
        wait_certificate(&cluster, node, &id)?;
    }
    let dst = server.addr4(8080);
    connect_ok_n(&cluster, client, dst, 10_000, 3, &[])?;
    let line = wait_access_log(&cluster, cluster.node(1), "inbound", dst, 1)?.remove(0);
    ensure_or_dump!(
        cluster,
        line["security"] == "mtls" && line["src_principal"] == id.as_str(),
        "not in mutual TLS from the client's identity: {line}"
    );

    let chain = presented_chain(&cluster, server)?;
    let intermediate = pem_bodies(&certs.ca_cert_pem);
    ensure_or_dump!(
        cluster,
        chain.len() == 2 && chain[1] == intermediate[0],
        "the HBONE listener should present its leaf and the intermediate, got {} certificate(s)",
        chain.len()
    );
    let pem = |body: &str| {
        let lines: Vec<String> = body
            .as_bytes()
            .chunks(64)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            lines.join("\n")
        )
    };
    let leaf = cluster.run_dir().join("plugin-leaf.pem");
    fs::write(&leaf, pem(&chain[0]))?;
    let root = cluster.run_dir().join("plugin-root.pem");
    fs::write(&root, &certs.root_cert_pem)?;
    let untrusted = cluster.run_dir().join("plugin-intermediate.pem");
    fs::write(&untrusted, &certs.ca_cert_pem)?;
    let with_intermediate = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&root)
        .arg("-untrusted")
        .arg(&untrusted)
        .arg(&leaf)
        .output()
        .context("run openssl verify")?;
    ensure_or_dump!(
        cluster,
        with_intermediate.status.success() && !verifies(&root, &leaf)?,
        "the leaf should verify to the organisation's root through the intermediate only: {}",
        String::from_utf8_lossy(&with_intermediate.stderr)
    );
    Ok(())
}
