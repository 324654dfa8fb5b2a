//! End-to-end tests of what a hostile pod, or a kubelet, can do to a node's datapath.
//!
//! Each test plays an attacker inside an enrolled pod (or a process on the node) against real
//! agents, real eBPF and real namespaces, and checks that the node's other pods are unaffected,
//! that nothing is left behind in the kernel, and that nothing unmeshed gets through.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ambit_tests::mesh::Policies;
use ambit_tests::traffic::{
    TIMEOUT, client, connect_ok, connect_ok_n, metric_value, reaches, redirected, serve,
};
use ambit_tests::{Cluster, ClusterSpec, Node, Pod, PodProcess, ensure_or_dump, util};
use anyhow::{Context, Result};
use serde_json::{Value, json};

const T: Duration = TIMEOUT;
/// Failing connects of each kind an attacker makes (the leak this guards against filled a
/// 65,536-entry map with 66,000).
const FLOOD: u32 = 100_000;
/// The share of handshakes in flight one pod may hold.
const PENDING_PER_POD: u64 = ambit_common::limits::PENDING_CONNECTS_PER_POD;

fn testpod() -> PathBuf {
    ambit_tests::testpod_path!()
}

fn cluster(nodes: usize, pods_per_node: usize) -> Result<Cluster> {
    Cluster::start(ClusterSpec {
        nodes,
        pods_per_node,
    })
}

/// A mesh-wide STRICT peer authentication.
fn strict_mesh() -> Policies {
    Policies {
        peer_authentications: vec![json!({"name": "strict", "mode": "STRICT"})],
        ..Default::default()
    }
}

fn dump(node: &Node) -> Result<Value> {
    node.config_dump()
}

fn ebpf_stat(node: &Node, name: &str) -> Result<u64> {
    dump(node)?["ebpfStats"][name]
        .as_u64()
        .with_context(|| format!("no ebpfStats.{name} in config_dump"))
}

fn tuple_entries(node: &Node) -> Result<u64> {
    dump(node)?["maps"]["ORIG_DST_TUPLE"]
        .as_u64()
        .context("no maps.ORIG_DST_TUPLE in config_dump")
}

fn pending_total(node: &Node) -> Result<u64> {
    Ok(dump(node)?["pendingConnects"]
        .as_object()
        .context("no pendingConnects in config_dump")?
        .values()
        .filter_map(Value::as_u64)
        .sum())
}

/// Runs `testpod args...` in `pod` to the end and returns its last JSON line.
fn run_testpod(pod: &Pod, args: &[&str], limit: Duration) -> Result<Value> {
    let mut p = pod.spawn(testpod(), args)?;
    let (_, lines) = p.wait_json(limit)?;
    lines
        .last()
        .cloned()
        .with_context(|| format!("testpod {args:?} in {} printed nothing", pod.name()))
}

/// Starts `testpod client` connections from `pod` to `dst` in the background.
fn background_clients(pod: &Pod, dst: SocketAddr, count: u32) -> Result<PodProcess> {
    pod.spawn(
        testpod(),
        [
            "client",
            "--connect",
            &dst.to_string(),
            "--bytes",
            "2000",
            "--count",
            &count.to_string(),
            "--timeout-ms",
            "10000",
        ],
    )
}

/// Waits for a background client run and checks every connection was ok and meshed.
fn expect_clients_ok(cluster: &Cluster, mut clients: PodProcess, what: &str) -> Result<()> {
    let (_, lines) = clients.wait_json(Duration::from_secs(120))?;
    let bad: Vec<&Value> = lines
        .iter()
        .filter(|l| l["ok"] != true || !redirected(l))
        .collect();
    ensure_or_dump!(
        cluster,
        !lines.is_empty() && bad.is_empty(),
        "{what}: {} of {} connections failed or were not redirected: {bad:?}",
        bad.len(),
        lines.len()
    );
    Ok(())
}

/// Polls `f` until it holds or `limit` passes; the last value seen is returned for the message.
fn eventually<V: std::fmt::Debug>(
    limit: Duration,
    mut f: impl FnMut() -> Result<(bool, V)>,
) -> Result<(bool, V)> {
    let deadline = Instant::now() + limit;
    loop {
        let (ok, seen) = f()?;
        if ok || Instant::now() >= deadline {
            return Ok((ok, seen));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn sysctl_in(pod: &Pod, setting: &str) -> Result<()> {
    util::run(
        "ip",
        [
            "netns",
            "exec",
            pod.netns_name(),
            "sysctl",
            "-q",
            "-w",
            setting,
        ],
    )
    .map(|_| ())
}

/// The neighbour's connections per round while a flood runs, and the bounds of its loop (far
/// beyond what a flood takes: hitting one fails the test).
const NEIGHBOUR_BATCH: u32 = 5;
const NEIGHBOUR_MAX_ROUNDS: u32 = 2_000;
const NEIGHBOUR_MAX_TIME: Duration = Duration::from_secs(300);

/// Connects from `from` to `dst` in rounds of [`NEIGHBOUR_BATCH`] until `stop`, insisting that
/// every connection succeeds byte-exact through the agent; counts the rounds in `rounds` and
/// returns the connections made.
fn keep_connecting(
    cluster: &Cluster,
    from: &Pod,
    dst: SocketAddr,
    stop: &AtomicBool,
    rounds: &AtomicU32,
) -> Result<u32> {
    let deadline = Instant::now() + NEIGHBOUR_MAX_TIME;
    let mut made = 0;
    while !stop.load(Ordering::Relaxed) {
        ensure_or_dump!(
            cluster,
            rounds.load(Ordering::Relaxed) < NEIGHBOUR_MAX_ROUNDS && Instant::now() < deadline,
            "the neighbour's loop reached its bounds ({NEIGHBOUR_MAX_ROUNDS} rounds, \
             {NEIGHBOUR_MAX_TIME:?}) before the flood ended"
        );
        let conns = connect_ok_n(
            cluster,
            from,
            dst,
            2000,
            NEIGHBOUR_BATCH,
            &["--timeout-ms", "10000"],
        )?;
        made += NEIGHBOUR_BATCH;
        let bare: Vec<&Value> = conns
            .iter()
            .filter(|c| !c.redirected())
            .map(|c| &c.report)
            .collect();
        ensure_or_dump!(
            cluster,
            bare.is_empty(),
            "the neighbour's connections were not carried by the agent: {bare:?}"
        );
        rounds.fetch_add(1, Ordering::Relaxed);
    }
    Ok(made)
}

/// Runs `flood` in `attacker` while `neighbour` keeps connecting to `dst` (from before the
/// flood starts until after it ends); returns the flood's report and the neighbour's
/// connections.
fn flood_while_neighbour_connects(
    cluster: &Cluster,
    attacker: &Pod,
    neighbour: &Pod,
    dst: SocketAddr,
    flood: &[&str],
) -> Result<(Value, u32)> {
    let stop = AtomicBool::new(false);
    let rounds = AtomicU32::new(0);
    std::thread::scope(|scope| {
        let traffic = scope.spawn(|| keep_connecting(cluster, neighbour, dst, &stop, &rounds));
        // The neighbour is connecting before the flood starts.
        let deadline = Instant::now() + Duration::from_secs(60);
        while rounds.load(Ordering::Relaxed) == 0
            && !traffic.is_finished()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let before = rounds.load(Ordering::Relaxed);
        let report = if before > 0 {
            run_testpod(attacker, flood, Duration::from_secs(180))
        } else {
            Err(anyhow::anyhow!(
                "the neighbour made no round of connections"
            ))
        };
        let during = rounds.load(Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
        let made = traffic.join().expect("neighbour thread panicked")?;
        let report = report?;
        eprintln!(
            "{flood:?}: {report}; the neighbour made {made} connections in {} rounds, {} of \
             them while the flood ran",
            rounds.load(Ordering::Relaxed),
            during - before
        );
        Ok((report, made))
    })
}

#[test]
fn failing_connects_leave_nothing_behind_and_the_nodes_other_pods_keep_connecting() -> Result<()> {
    let cluster = cluster(2, 2)?;
    cluster.start_agents()?;
    let (attacker, neighbour, server) = (cluster.pod(0, 0), cluster.pod(0, 1), cluster.pod(1, 0));
    let _s = serve(server, &[8080])?;
    let node = cluster.node(0);
    let dst = server.addr4(8080);
    let baseline = tuple_entries(node)?;
    let map_full = ebpf_stat(node, "mapFull")?;

    // Each kind fails after connect6/connect4 ran (it counts each connect it rewrites): the
    // rewritten connect of an IPV6_V6ONLY socket to `::ffff:127.0.0.1` fails with ENETUNREACH,
    // a source port whose 4-tuple to the agent is taken with EADDRNOTAVAIL, and a connect to
    // `[::1]` in a pod whose IPv6 is disabled (loopback has no `::1`) with EADDRNOTAVAIL. The
    // neighbour keeps connecting through the agent throughout each flood.
    for (kind, target, prepare, errno, counter) in [
        (
            "v6only-mapped",
            dst,
            None,
            libc::ENETUNREACH,
            "redirectedV6",
        ),
        (
            "addr-in-use",
            dst,
            None,
            libc::EADDRNOTAVAIL,
            "redirectedV4",
        ),
        (
            "plain",
            server.addr6(8080),
            Some("net.ipv6.conf.all.disable_ipv6=1"),
            libc::EADDRNOTAVAIL,
            "redirectedV6",
        ),
    ] {
        if let Some(setting) = prepare {
            sysctl_in(attacker, setting)?;
        }
        let hooked = ebpf_stat(node, counter)?;
        let (flood, neighbour_conns) = flood_while_neighbour_connects(
            &cluster,
            attacker,
            neighbour,
            dst,
            &[
                "flood",
                "--kind",
                kind,
                "--connect",
                &target.to_string(),
                "--count",
                &FLOOD.to_string(),
            ],
        )?;
        ensure_or_dump!(
            cluster,
            flood["attempted"] == FLOOD && flood["connected"] == 0,
            "{kind}: the flood did not make {FLOOD} failing connects: {flood}"
        );
        let errors = &flood["errors"];
        ensure_or_dump!(
            cluster,
            errors.as_object().map(|e| e.len()) == Some(1)
                && errors[format!("os error {errno}")] == FLOOD,
            "{kind}: the connects did not all fail with {}: {errors}",
            std::io::Error::from_raw_os_error(errno)
        );
        // The hook ran for each of them: it rewrote every one (and, for addr-in-use, the
        // held connection and the neighbour's IPv4 connections besides).
        let rewritten = ebpf_stat(node, counter)? - hooked;
        let (least, most) = match counter {
            "redirectedV4" => (
                u64::from(FLOOD) + 1,
                u64::from(FLOOD) + 1 + u64::from(neighbour_conns),
            ),
            _ => (u64::from(FLOOD), u64::from(FLOOD)),
        };
        ensure_or_dump!(
            cluster,
            (least..=most).contains(&rewritten),
            "{kind}: the connect hook rewrote {rewritten} connects ({counter}), expected \
             {least}..={most}: the flood's connects did not all go through it"
        );
        let (back, seen) = eventually(T, || {
            let seen = (tuple_entries(node)?, pending_total(node)?);
            Ok((seen == (baseline, 0), seen))
        })?;
        ensure_or_dump!(
            cluster,
            back,
            "{kind}: after the flood ORIG_DST_TUPLE holds {} entries (started at {baseline}) \
             and pods hold {} handshakes in flight",
            seen.0,
            seen.1
        );
    }
    ensure_or_dump!(
        cluster,
        ebpf_stat(node, "mapFull")? == map_full,
        "the floods made the datapath refuse connects for want of map space"
    );
    connect_ok(&cluster, neighbour, dst, 10_000)?;

    // The maps are pinned and outlive the agent: a restart must find them as clean.
    node.stop_agent()?;
    node.start_agent()?;
    node.wait_ready(T)?;
    connect_ok(&cluster, neighbour, dst, 10_000)?;
    ensure_or_dump!(
        cluster,
        tuple_entries(node)? == baseline,
        "ORIG_DST_TUPLE after the restart differs from its baseline"
    );
    Ok(())
}

/// A little-endian integer as bpftool shows a value without BTF: an array of hex bytes.
fn le_u64(bytes: &Value) -> u64 {
    bytes
        .as_array()
        .into_iter()
        .flatten()
        .rev()
        .filter_map(|b| u64::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
        .fold(0, |n, b| n << 8 | b)
}

/// `bpftool map dump` of a pinned map, as JSON.
fn bpftool_dump(pin: &Path) -> Result<Vec<Value>> {
    let out = util::run(
        "bpftool",
        ["-j", "map", "dump", "pinned", &pin.display().to_string()],
    )?;
    serde_json::from_str(&out).with_context(|| format!("bpftool output: {out}"))
}

#[test]
fn one_pod_holds_at_most_its_share_of_handshakes_in_flight() -> Result<()> {
    let cluster = cluster(1, 3)?;
    let (attacker, neighbour, outsider) = (cluster.pod(0, 0), cluster.pod(0, 1), cluster.pod(0, 2));
    // Outside the mesh: the attacker's connections end at its closed port 9 at once.
    cluster.set_enrolled(outsider, false);
    cluster.write_mesh()?;
    cluster.start_agents()?;
    let _s = serve(outsider, &[8080])?;
    let node = cluster.node(0);
    let pending_pin = node.bpffs().join("maps/PENDING_CONNECTS");
    let tuple_pin = node.bpffs().join("maps/ORIG_DST_TUPLE");
    let agent = node.agent_pid().context("agent pid")? as i32;

    // A stopped agent accepts nothing: once the attacker's outbound listener's backlog is full,
    // its further handshakes stay in flight, each holding an ORIG_DST_TUPLE entry.
    util::signal(agent, libc::SIGSTOP);
    let during = (|| -> Result<PodProcess> {
        let mut flood = attacker.spawn(
            testpod(),
            [
                "pending",
                "--connect",
                &outsider.addr4(9).to_string(),
                "--count",
                "6000",
                "--hold-seconds",
                "15",
            ],
        )?;
        flood.read_json_until(Duration::from_secs(60), |v| v["event"] == "opened")?;
        let counts = bpftool_dump(&pending_pin)?;
        let held: u64 = counts
            .iter()
            .map(|e| le_u64(&e["value"]))
            .max()
            .unwrap_or(0);
        let entries = bpftool_dump(&tuple_pin)?.len() as u64;
        ensure_or_dump!(
            cluster,
            held <= PENDING_PER_POD && held > PENDING_PER_POD / 2,
            "the attacker holds {held} handshakes in flight: more than its share \
             ({PENDING_PER_POD}), or the flood did not reach it ({counts:?})"
        );
        ensure_or_dump!(
            cluster,
            entries <= PENDING_PER_POD,
            "ORIG_DST_TUPLE holds {entries} entries, more than one pod's share"
        );
        // The neighbour connects while the attacker holds its share and the agent is stopped:
        // its handshake completes in the kernel and waits for the agent.
        let neighbours = background_clients(neighbour, outsider.addr4(8080), 1)?;
        std::thread::sleep(Duration::from_millis(500));
        Ok(neighbours)
    })();
    util::signal(agent, libc::SIGCONT);
    expect_clients_ok(
        &cluster,
        during?,
        "neighbour while the attacker held its share",
    )?;
    let (back, seen) = eventually(Duration::from_secs(60), || {
        let seen = (tuple_entries(node)?, pending_total(node)?);
        Ok((seen == (0, 0), seen))
    })?;
    ensure_or_dump!(
        cluster,
        back,
        "after the attacker closed its sockets: {} ORIG_DST_TUPLE entries, {} in flight",
        seen.0,
        seen.1
    );
    ensure_or_dump!(
        cluster,
        ebpf_stat(node, "podQuota")? > 0,
        "the connects beyond the attacker's share were not counted"
    );
    connect_ok(&cluster, neighbour, outsider.addr4(8080), 10_000)?;
    Ok(())
}

#[test]
fn a_process_that_forges_the_old_agent_mark_is_still_captured() -> Result<()> {
    let cluster = cluster(2, 1)?;
    cluster.start_agents()?;
    let (client_pod, server) = (cluster.pod(0, 0), cluster.pod(1, 0));
    let _s = serve(server, &[8080])?;
    for mark in ["0x539", "0x1", "0xffffffff"] {
        let report = run_testpod(
            client_pod,
            &[
                "client",
                "--connect",
                &server.addr4(8080).to_string(),
                "--mark",
                mark,
            ],
            Duration::from_secs(30),
        )?;
        ensure_or_dump!(
            cluster,
            report["ok"] == true && redirected(&report),
            "a socket marked {mark} was not captured by the agent: {report}"
        );
    }
    Ok(())
}

/// Whether anything accepted a connection in a `testpod serve` process (its `accepted` events).
fn accepted_any(server: &mut PodProcess) -> bool {
    std::iter::from_fn(|| server.read_json(Duration::from_millis(50)).ok())
        .any(|v| v["event"] == "accepted")
}

/// Starts `testpod serve --port P --bind IP` in `pod` for each address and port; the ones whose
/// bind fails (held by the agent) are left out.
fn squat(pod: &Pod, ports: &[u16]) -> Result<Vec<PodProcess>> {
    let mut squatters = Vec::new();
    for ip in pod.ips() {
        for port in ports {
            let mut p = pod.spawn(
                testpod(),
                [
                    "serve",
                    "--port",
                    &port.to_string(),
                    "--bind",
                    &ip.to_string(),
                ],
            )?;
            let first = p.read_json(T)?;
            if first["event"] == "listening" {
                squatters.push(p);
            } else {
                eprintln!("{}: {ip}:{port} not taken: {first}", pod.name());
            }
        }
    }
    Ok(squatters)
}

/// Root applications in `pod` joining the agent's SO_REUSEPORT groups, as an upgrade's
/// successor joins them: one on 15006 (every address) and one on 15008 per pod address, each
/// listening.
fn join_listener_groups(cluster: &Cluster, pod: &Pod) -> Result<Vec<PodProcess>> {
    let mut joiners = vec![pod.spawn(testpod(), ["serve", "--port", "15006", "--reuse-port"])?];
    for ip in pod.ips() {
        joiners.push(pod.spawn(
            testpod(),
            [
                "serve",
                "--port",
                "15008",
                "--bind",
                &ip.to_string(),
                "--reuse-port",
            ],
        )?);
    }
    for joiner in &mut joiners {
        let first = joiner.read_json(T)?;
        ensure_or_dump!(
            cluster,
            first["event"] == "listening",
            "a root application in {} could not join the agent's listener group: {first}",
            pod.name()
        );
    }
    Ok(joiners)
}

const PROXY_PORTS: [u16; 3] = [15001, 15006, 15008];

#[test]
fn an_application_on_a_proxy_port_is_never_reached_from_outside() -> Result<()> {
    let cluster = cluster(2, 1)?;
    cluster.set_policies(strict_mesh());
    let (target, outsider) = (cluster.pod(0, 0), cluster.pod(1, 0));
    cluster.set_enrolled(outsider, false);
    cluster.write_mesh()?;
    cluster.start_agents()?;
    let node = cluster.node(0);

    // With the agent up, the application gets what the agent does not hold: 15001 on its pod
    // addresses (the agent's outbound listener is on loopback).
    let mut squatters = squat(target, &PROXY_PORTS)?;
    ensure_or_dump!(
        cluster,
        squatters.len() == 2,
        "expected the application to hold <pod IP>:15001 (v4 and v6), got {} listeners",
        squatters.len()
    );
    for ip in target.ips() {
        for port in PROXY_PORTS {
            let dst = SocketAddr::new(ip, port);
            ensure_or_dump!(
                cluster,
                !reaches(outsider, dst)?,
                "plaintext from an unmeshed pod reached {dst} in a STRICT pod"
            );
        }
    }
    ensure_or_dump!(
        cluster,
        !squatters.iter_mut().any(accepted_any),
        "an application listening on a proxy port accepted a connection from outside"
    );
    drop(squatters);

    // A root application can join the agent's SO_REUSEPORT groups (an upgrade's successor
    // joins them so): inbound still reaches only the socket the agent registered.
    let mut joiners = join_listener_groups(&cluster, target)?;
    for ip in target.ips() {
        for port in [8080, 15006, 15008] {
            let dst = SocketAddr::new(ip, port);
            ensure_or_dump!(
                cluster,
                !reaches(outsider, dst)?,
                "plaintext from an unmeshed pod reached {dst} past the agent's listener group"
            );
        }
    }
    ensure_or_dump!(
        cluster,
        !joiners.iter_mut().any(accepted_any),
        "an application in the agent's listener group took a connection steered to the agent"
    );
    drop(joiners);

    // With the agent down, the application can take every proxy port; with no agent listener
    // behind them, connections from outside are dropped.
    node.stop_agent()?;
    let mut squatters = squat(target, &PROXY_PORTS)?;
    ensure_or_dump!(
        cluster,
        squatters.len() == 6,
        "expected the application to hold all three proxy ports on both addresses, got {}",
        squatters.len()
    );
    for ip in target.ips() {
        for port in PROXY_PORTS {
            let dst = SocketAddr::new(ip, port);
            ensure_or_dump!(
                cluster,
                !reaches(outsider, dst)?,
                "with the agent down, plaintext from an unmeshed pod reached {dst}"
            );
        }
    }
    ensure_or_dump!(
        cluster,
        !squatters.iter_mut().any(accepted_any),
        "with the agent down, an application on a proxy port accepted a connection from outside"
    );
    Ok(())
}

#[test]
fn a_pod_whose_proxy_ports_are_taken_is_closed_until_they_are_free() -> Result<()> {
    let cluster = cluster(2, 2)?;
    cluster.set_policies(strict_mesh());
    let (target, peer, outsider) = (cluster.pod(0, 0), cluster.pod(1, 0), cluster.pod(1, 1));
    cluster.set_enrolled(outsider, false);
    // The pod's first process takes the proxy's inbound ports before the agent enrols it.
    cluster.set_enrolled(target, false);
    cluster.write_mesh()?;
    cluster.start_agents()?;
    let _app = serve(target, &[8080])?;
    let _peer_app = serve(peer, &[8080])?;
    let squatters = squat(target, &[15006, 15008])?;
    ensure_or_dump!(cluster, squatters.len() == 4, "could not take the ports");
    let node = cluster.node(0);
    let generation = node.config_generation()?;
    cluster.set_enrolled(target, true);
    cluster.write_mesh()?;
    node.wait_config_generation(generation + 1, T)?;

    let uid = format!("{}/{}", target.namespace(), target.name());
    let (closed, seen) = eventually(T, || {
        let d = dump(node)?;
        Ok((
            d["closed"]
                .as_array()
                .is_some_and(|c| c.contains(&json!(uid))),
            d,
        ))
    })?;
    ensure_or_dump!(
        cluster,
        closed,
        "{uid} is not reported closed: closed={}, failures={}",
        seen["closed"],
        seen["enrolmentFailures"]
    );
    ensure_or_dump!(
        cluster,
        seen["enrolmentFailures"][&uid]
            .as_str()
            .is_some_and(|why| why.contains("15006") || why.contains("15008")),
        "the failure does not name the port taken: {}",
        seen["enrolmentFailures"]
    );
    ensure_or_dump!(
        cluster,
        metric_value(node, "ambit_closed_pods")? == 1.0,
        "ambit_closed_pods is not 1"
    );
    // The agent says so in its log, once, naming the pod and the port it could not take (its
    // listener on 15006 comes first).
    let closed_lines: Vec<Value> = node
        .agent_log_json()
        .into_iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("enrolment failed: pod closed"))
        })
        .collect();
    ensure_or_dump!(
        cluster,
        closed_lines.len() == 1
            && closed_lines[0]["level"] == "WARN"
            && closed_lines[0]["pod"] == uid.as_str()
            && closed_lines[0]["err"]
                .as_str()
                .is_some_and(|e| e.contains(":15006")),
        "the agent did not log once that {uid} is closed for want of port 15006: {closed_lines:?}"
    );
    // Closed: nothing in (not even from a meshed pod), nothing out.
    for (from, dst) in [
        (outsider, target.addr4(8080)),
        (outsider, target.addr6(8080)),
        (peer, target.addr4(8080)),
        (target, peer.addr4(8080)),
        (target, peer.addr6(8080)),
    ] {
        ensure_or_dump!(
            cluster,
            !reaches(from, dst)?,
            "{} reached {dst} although {uid} is closed",
            from.name()
        );
    }

    // Once the ports are free, the next retry opens the pod into the mesh.
    drop(squatters);
    let (opened, seen) = eventually(T, || {
        let d = dump(node)?;
        Ok((
            d["closed"].as_array().is_some_and(Vec::is_empty),
            d["closed"].clone(),
        ))
    })?;
    ensure_or_dump!(cluster, opened, "{uid} stayed closed: {seen}");
    ensure_or_dump!(
        cluster,
        node.agent_log_json().iter().any(|l| {
            l["message"] == "closed pod opened: enrolment completed" && l["pod"] == uid.as_str()
        }),
        "the agent did not log that {uid} was opened"
    );
    let conn = connect_ok(&cluster, target, peer.addr4(8080), 10_000)?;
    ensure_or_dump!(cluster, conn.redirected(), "not meshed: {}", conn.report);
    connect_ok(&cluster, peer, target.addr4(8080), 10_000)?;
    ensure_or_dump!(
        cluster,
        !reaches(outsider, target.addr4(8080))?,
        "plaintext reached the STRICT pod once it was opened"
    );
    Ok(())
}

#[test]
fn the_nodes_own_addresses_reach_pods_directly_like_kubelet_probes() -> Result<()> {
    let cluster = cluster(2, 2)?;
    let (strict, permissive, outsider) = (cluster.pod(0, 0), cluster.pod(0, 1), cluster.pod(1, 0));
    cluster.set_labels(permissive, &[("app", "lenient")]);
    cluster.set_policies(Policies {
        peer_authentications: vec![
            json!({"name": "strict", "mode": "STRICT"}),
            json!({
                "name": "lenient",
                "namespace": permissive.namespace(),
                "selector": {"matchLabels": {"app": "lenient"}},
                "mode": "PERMISSIVE",
            }),
        ],
        ..Default::default()
    });
    cluster.set_enrolled(outsider, false);
    cluster.write_mesh()?;
    cluster.start_agents()?;
    let _a = serve(strict, &[8080])?;
    let _b = serve(permissive, &[8080])?;
    let node = cluster.node(0);
    let from_node = metric_value(node, "ambit_inbound_from_node_total")?;

    // A probe from the node (its own network namespace, as kubelet) reaches either pod's
    // application directly: the application sees the node's address, not the agent's hop.
    for dst in [
        strict.addr4(8080),
        strict.addr6(8080),
        permissive.addr4(8080),
        permissive.addr6(8080),
    ] {
        let mut probe = node.spawn(
            testpod(),
            ["client", "--connect", &dst.to_string(), "--bytes", "100"],
        )?;
        let (_, lines) = probe.wait_json(Duration::from_secs(30))?;
        let report = lines.first().cloned().unwrap_or_default();
        let greeting = report["greeting"].as_str().unwrap_or("");
        let seen_peer: Option<SocketAddr> = greeting
            .split_whitespace()
            .nth(2)
            .and_then(|p| p.parse().ok());
        ensure_or_dump!(
            cluster,
            report["ok"] == true
                && seen_peer.is_some_and(
                    |p| Some(p.to_string()) == report["local"].as_str().map(String::from)
                ),
            "a probe from the node to {dst} did not reach the application directly: {report}"
        );
    }
    ensure_or_dump!(
        cluster,
        metric_value(node, "ambit_inbound_from_node_total")? >= from_node + 4.0,
        "the probes were not counted in ambit_inbound_from_node_total"
    );
    // Not from another node, nor from a pod on another node: STRICT still refuses plaintext.
    let other_node = cluster.node(1);
    let mut far = other_node.spawn(
        testpod(),
        [
            "client",
            "--connect",
            &strict.addr4(8080).to_string(),
            "--bytes",
            "100",
            "--timeout-ms",
            "3000",
        ],
    )?;
    let (_, lines) = far.wait_json(Duration::from_secs(30))?;
    ensure_or_dump!(
        cluster,
        lines.first().is_some_and(|l| l["ok"] != true),
        "another node's address reached the STRICT pod in plaintext: {lines:?}"
    );
    ensure_or_dump!(
        cluster,
        !reaches(outsider, strict.addr4(8080))?,
        "a pod on another node reached the STRICT pod in plaintext"
    );
    ensure_or_dump!(
        cluster,
        reaches(outsider, permissive.addr4(8080))?,
        "a pod on another node was refused by the PERMISSIVE pod"
    );
    // The exemption is the node's, not its pods': between pods of the node traffic stays
    // meshed.
    let conns = client(strict, permissive.addr4(8080), 100, 1)?;
    ensure_or_dump!(
        cluster,
        conns.first().is_some_and(|c| c.ok() && c.redirected()),
        "meshed traffic between the pods broke: {conns:?}"
    );

    // And the node cannot use its exemption to reach the proxy's own ports around the agent:
    // an application listening on them in either pod (<pod IP>:15001, which the agent holds
    // on loopback only; 15006 and 15008 by joining the agent's SO_REUSEPORT groups, as root)
    // gets nothing from the node. 15001 and 15006 go to the agent's plaintext listener, which
    // refuses the proxy's ports; 15008 to its HBONE listener, which wants TLS.
    let mut apps = Vec::new();
    for pod in [strict, permissive] {
        apps.extend(squat(pod, &[15001])?);
        apps.extend(join_listener_groups(&cluster, pod)?);
    }
    ensure_or_dump!(
        cluster,
        apps.len() == 2 * (2 + 1 + 2),
        "expected <pod IP>:15001 (v4 and v6), 15006 and <pod IP>:15008 (v4 and v6) in both \
         pods, got {} listeners",
        apps.len()
    );
    let from_node = ebpf_stat(node, "inboundFromNode")?;
    for pod in [strict, permissive] {
        for ip in pod.ips() {
            for port in PROXY_PORTS {
                let dst = SocketAddr::new(ip, port);
                let mut probe = node.spawn(
                    testpod(),
                    [
                        "client",
                        "--connect",
                        &dst.to_string(),
                        "--bytes",
                        "100",
                        "--timeout-ms",
                        "3000",
                    ],
                )?;
                let (_, lines) = probe.wait_json(Duration::from_secs(30))?;
                ensure_or_dump!(
                    cluster,
                    lines.first().is_some_and(|l| l["ok"] != true),
                    "the node reached {dst} (a proxy port of {}) past the agent: {lines:?}",
                    pod.name()
                );
            }
        }
    }
    ensure_or_dump!(
        cluster,
        !apps.iter_mut().any(accepted_any),
        "an application on a proxy port accepted a connection from the node"
    );
    ensure_or_dump!(
        cluster,
        ebpf_stat(node, "inboundFromNode")? == from_node,
        "sk_lookup let the node's connections to the proxy's ports through as probes"
    );
    Ok(())
}

/// Short connections through the agent, with the client's source ports wrapping many times.
const CHURN: u32 = 1_000_000;

#[test]
fn a_million_short_connections_with_wrapping_source_ports_lose_none() -> Result<()> {
    let cluster = cluster(1, 3)?;
    let (churner, churner2, outsider) = (cluster.pod(0, 0), cluster.pod(0, 1), cluster.pod(0, 2));
    // Outside the mesh: the agent's capture is what is tested, not the tunnel.
    cluster.set_enrolled(outsider, false);
    cluster.write_mesh()?;
    cluster.start_agents()?;
    // The server closes first, so TIME_WAIT stays with it and neither the clients' ports nor
    // the agent's upstream ports run out: the clients' ports wrap around their whole range
    // again and again, each reused by a new socket soon after its last one closed.
    let mut server = outsider.spawn(testpod(), ["serve", "--port", "8080", "--greeting-only"])?;
    server.read_json_until(T, |v| v["event"] == "listening")?;
    let node = cluster.node(0);
    let count = std::env::var("AMBIT_TEST_CHURN")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(CHURN);
    let per = count / 2;
    let start = Instant::now();
    let churns: Vec<PodProcess> = [churner, churner2]
        .into_iter()
        .map(|pod| {
            pod.spawn(
                testpod(),
                [
                    "churn",
                    "--connect",
                    &outsider.addr4(8080).to_string(),
                    "--count",
                    &per.to_string(),
                    "--max-seconds",
                    "1500",
                    "--greeting-only",
                ],
            )
        })
        .collect::<Result<_>>()?;
    let mut ok = 0;
    for mut churn in churns {
        let (_, lines) = churn.wait_json(Duration::from_secs(1600))?;
        let summary = lines.last().cloned().unwrap_or_default();
        ensure_or_dump!(
            cluster,
            summary["ok"] == per && summary["failed"] == 0,
            "churn lost connections: {summary}"
        );
        ok += per;
    }
    eprintln!("{ok} connections in {:?}", start.elapsed());
    let lost = node
        .agent_log()
        .lines()
        .filter(|l| l.contains("no original destination"))
        .count();
    ensure_or_dump!(
        cluster,
        lost == 0,
        "the agent lost {lost} connections to port reuse"
    );
    Ok(())
}
