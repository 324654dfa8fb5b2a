//! End-to-end tests of the same-node fast path: connections between two enrolled pods of one
//! node are authorized as the inbound path would, then spliced in the kernel.
//!
//! How a test tells that the kernel carried the bytes: the agent's access log marks both sides
//! of the connection `fast_path: "splice"`, and the eBPF program that forwards them counts
//! every byte it forwards (`ambit_spliced_bytes_total`): bytes relayed by the agent's user
//! space never pass through it. The clients check every byte echoed back against what they sent.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ambit_tests::mesh::Policies;
use ambit_tests::traffic::{
    LONG_TRANSFER_BYTES, TIMEOUT, accepted, access_logs, access_logs_to, connect_ok, connect_ok_n,
    cut_by, ensure_cut, long_transfer, metric, metric_sum, metric_value, reaches, serve,
    wait_access_log,
};
use ambit_tests::{Cluster, ClusterSpec, Node, Pod, ensure_or_dump};
use anyhow::Result;
use serde_json::{Value, json};

/// Bytes of the large transfers: each is echoed back, so each direction carries them.
const LARGE: u64 = 64 << 20;

/// A bed whose agents splice same-node connections (the splice is opt-in: by default the
/// agent relays them), as many at once as the kernel maps hold.
fn cluster(nodes: usize, pods_per_node: usize) -> Result<Cluster> {
    cluster_carrying(nodes, pods_per_node, "splice")
}

/// A bed whose agents carry same-node connections as `carried` says: `splice` (in the kernel,
/// as many at once as its maps hold) or `relay` (the agent's default).
fn cluster_carrying(nodes: usize, pods_per_node: usize, carried: &str) -> Result<Cluster> {
    let cluster = Cluster::start(ClusterSpec {
        nodes,
        pods_per_node,
    })?;
    if carried == "splice" {
        let most = ambit_common::limits::MAX_SPLICED.to_string();
        for node in cluster.nodes() {
            node.set_agent_env("AMBIT_MAX_SPLICED_CONNECTIONS", &most);
        }
    }
    Ok(cluster)
}

/// Bytes the kernel forwarded between spliced sockets on `node`, as its program counted them.
fn spliced_bytes(node: &Node) -> Result<f64> {
    Ok(metric(node, "ambit_spliced_bytes_total")?.unwrap_or(0.0))
}

/// Programs of type `sk_skb` (the splice's verdict) the agent of `node` holds loaded, from its
/// descriptors' fdinfo (`prog_type` 14 is `BPF_PROG_TYPE_SK_SKB`).
fn sk_skb_programs(node: &Node) -> Result<usize> {
    let pid = node
        .agent_pid()
        .ok_or_else(|| anyhow::anyhow!("{}: no agent running", node.name()))?;
    let mut n = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let info = std::fs::read_to_string(entry?.path()).unwrap_or_default();
        if info.lines().any(|l| {
            l.strip_prefix("prog_type:")
                .is_some_and(|t| t.trim() == "14")
        }) {
            n += 1;
        }
    }
    Ok(n)
}

/// Checks that the agent of `node` loaded no splice: no `sk_skb` program, `ambit_splice_enabled`
/// 0, and `off` in its config dump; `when` says under which setting, for the error.
fn ensure_no_splice_loaded(cluster: &Cluster, node: &Node, when: &str) -> Result<()> {
    ensure_or_dump!(
        cluster,
        sk_skb_programs(node)? == 0
            && metric_value(node, "ambit_splice_enabled")? == 0.0
            && node.config_dump()?["splice"]["state"] == "off",
        "{when} the splice program must not be loaded: {}",
        node.config_dump()?["splice"]
    );
    Ok(())
}

/// Connections the fast path carried on `node`, by how (`splice` or `relay`).
fn fast_path(node: &Node, carried: &str) -> Result<f64> {
    let series = format!("ambit_fast_path_connections_total{{carried=\"{carried}\"}}");
    Ok(metric(node, &series)?.unwrap_or(0.0))
}

/// Checks that `node` logged the connection to `dst` on both sides as the fast path carried it
/// (`how`), with `sent` bytes from the client and at least as many back; returns the lines.
fn logged_both_sides(
    cluster: &Cluster,
    node: &Node,
    dst: SocketAddr,
    how: &str,
    sent: u64,
) -> Result<(Value, Value)> {
    let outbound = wait_access_log(cluster, node, "outbound", dst, 1)?.remove(0);
    let inbound = wait_access_log(cluster, node, "inbound", dst, 1)?.remove(0);
    for line in [&outbound, &inbound] {
        ensure_or_dump!(
            cluster,
            line["fast_path"] == how
                && line["outcome"] == "ok"
                && line["security"] == "mtls"
                && line["bytes_sent"] == sent
                && line["bytes_received"].as_u64() >= Some(sent),
            "expected a {how} line with {sent} bytes each way: {line}"
        );
    }
    Ok((outbound, inbound))
}

#[test]
fn same_node_connections_are_spliced_byte_exact_and_counted_while_they_flow() -> Result<()> {
    let cluster = cluster(2, 2)?;
    cluster.start_agents()?;
    let (client, server, remote) = (cluster.pod(0, 0), cluster.pod(0, 1), cluster.pod(1, 0));
    let node = cluster.node(0);
    let mut app = serve(server, &[8080])?;
    let _remote_app = serve(remote, &[8080])?;
    // The agent's runtime beats (the liveness probe a hung agent fails).
    let live = node.http_get(ambit_tests::READINESS_PORT, "/healthz/live", TIMEOUT)?;
    ensure_or_dump!(
        cluster,
        live.status == 200,
        "/healthz/live: {} {}",
        live.status,
        live.body
    );
    // The splice is loaded and passed its start-up self-test.
    let (enabled, programs) = (
        metric_value(node, "ambit_splice_enabled")?,
        sk_skb_programs(node)?,
    );
    ensure_or_dump!(
        cluster,
        enabled == 1.0 && node.config_dump()?["splice"]["state"] == "ready" && programs > 0,
        "the splice should be loaded and enabled: ambit_splice_enabled {enabled}, {programs} \
         sk_skb programs, {}",
        node.config_dump()?["splice"]
    );

    // 64 MiB each way over IPv4 and IPv6; the client checks every byte echoed back.
    for dst in [server.addr4(8080), server.addr6(8080)] {
        let kernel_before = spliced_bytes(node)?;
        let conn =
            connect_ok_n(&cluster, client, dst, LARGE, 1, &["--timeout-ms", "120000"])?.remove(0);
        let client_ip = match dst {
            SocketAddr::V4(_) => IpAddr::V4(client.ip4()),
            SocketAddr::V6(_) => IpAddr::V6(client.ip6()),
        };
        ensure_or_dump!(
            cluster,
            conn.redirected()
                && conn.peer() == dst.to_string()
                && conn.served_by() == server.name()
                && conn.local_ip() == Some(client_ip)
                && conn.seen_peer_ip() == Some(client_ip),
            "{dst}: expected a redirected connection reaching {} from the client's address \
             {client_ip}, as without the mesh: {}",
            server.name(),
            conn.report
        );
        let (outbound, inbound) = logged_both_sides(&cluster, node, dst, "splice", LARGE)?;
        ensure_or_dump!(
            cluster,
            outbound["src_principal"] == "spiffe://cluster.local/ns/default/sa/default"
                && inbound["src_principal"] == outbound["src_principal"]
                && inbound["dst_workload"] == format!("default/{}", server.name())
                && inbound["src"].as_str().is_some_and(
                    |src| src.contains(&client.ips()[usize::from(dst.is_ipv6())].to_string())
                ),
            "the inbound side must name the source pod, its address and identity: {inbound}"
        );
        // The bytes went through the kernel program, not through the agent's relay.
        let kernel = spliced_bytes(node)? - kernel_before;
        ensure_or_dump!(
            cluster,
            kernel >= (2 * LARGE) as f64,
            "the kernel forwarded {kernel} bytes of a {LARGE}-byte echo"
        );
    }
    ensure_or_dump!(
        cluster,
        fast_path(node, "splice")? == 2.0 && fast_path(node, "relay")? == 0.0,
        "both connections should have been spliced"
    );
    // Istio's series on both sides, as a same-node HBONE connection reports them: the bytes
    // from the client, reporter source and destination, mutual TLS.
    for reporter in ["source", "destination"] {
        let received = metric_sum(
            node,
            "istio_tcp_received_bytes_total",
            &[
                ("reporter", reporter),
                ("destination_workload", server.name()),
                ("connection_security_policy", "mutual_tls"),
            ],
        )?;
        ensure_or_dump!(
            cluster,
            received == (2 * LARGE) as f64,
            "istio_tcp_received_bytes_total (reporter {reporter}) is {received}, expected {}",
            2 * LARGE
        );
    }

    // A client that talks first: its first bytes wait in the agent's socket before the splice
    // takes over (sent the moment it is connected, before the server's greeting), the rest
    // follow over a quarter of a second; each must arrive once, in order.
    connect_ok_n(
        &cluster,
        client,
        server.addr4(8080),
        4 << 20,
        1,
        &["--send-first", "--rate", "16000000"],
    )?;
    ensure_or_dump!(
        cluster,
        fast_path(node, "splice")? == 3.0,
        "the talk-first connection was not spliced"
    );

    // Counted while it flows: a paced transfer of ~12 s shows in the metrics before it ends.
    let labels = [
        ("reporter", "destination"),
        ("destination_workload", server.name()),
    ];
    let before = metric_sum(node, "istio_tcp_received_bytes_total", &labels)?;
    let dst = server.addr4(8080);
    let mut paced = long_transfer(client, dst)?;
    accepted(&mut app, 4)?;
    let deadline = Instant::now() + TIMEOUT;
    let flowing = loop {
        let now = metric_sum(node, "istio_tcp_received_bytes_total", &labels)? - before;
        if now >= f64::from(1u32 << 20) {
            break now;
        }
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "the spliced transfer did not show in the metrics while it ran ({now} bytes)"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    ensure_or_dump!(
        cluster,
        paced.try_status()?.is_none() && flowing < LONG_TRANSFER_BYTES as f64,
        "the transfer was over before its bytes were counted ({flowing} bytes)"
    );
    let (_, reports) = paced.wait_json(Duration::from_secs(120))?;
    ensure_or_dump!(
        cluster,
        reports.first().is_some_and(|r| r["ok"] == true),
        "the paced transfer failed: {reports:?}"
    );

    // Across nodes nothing changes: HBONE between the agents.
    let splices = fast_path(node, "splice")?;
    let far = remote.addr4(8080);
    connect_ok(&cluster, client, far, 1 << 20)?;
    let outbound = wait_access_log(&cluster, node, "outbound", far, 1)?.remove(0);
    wait_access_log(&cluster, cluster.node(1), "inbound", far, 1)?;
    ensure_or_dump!(
        cluster,
        outbound["fast_path"].is_null()
            && outbound["security"] == "mtls"
            && access_logs_to(node, "inbound", far).is_empty()
            && fast_path(node, "splice")? == splices,
        "a connection to another node must take HBONE: {outbound}"
    );
    Ok(())
}

/// A DENY of `principal` on the pods labelled `app: server`.
fn deny(principal: &str) -> Policies {
    Policies {
        authorization_policies: vec![json!({
            "name": "deny-intruder",
            "namespace": "default",
            "selector": {"matchLabels": {"app": "server"}},
            "action": "DENY",
            "rules": [{"from": [{"source": {"principals": [principal]}}]}],
        })],
        ..Default::default()
    }
}

#[test]
fn policy_decides_at_accept_and_a_change_cuts_a_spliced_connection() -> Result<()> {
    policy_decides_at_accept_and_a_change_cuts("splice")
}

#[test]
fn policy_decides_at_accept_and_a_change_cuts_a_relayed_connection() -> Result<()> {
    policy_decides_at_accept_and_a_change_cuts("relay")
}

/// The fast path's authorization, with the bytes `carried` (`splice` or `relay`): at accept,
/// and again on a policy change, which cuts the connection it no longer allows.
fn policy_decides_at_accept_and_a_change_cuts(carried: &str) -> Result<()> {
    let cluster = cluster_carrying(1, 3, carried)?;
    let (frontend, intruder, server) = (cluster.pod(0, 0), cluster.pod(0, 1), cluster.pod(0, 2));
    frontend.set_service_account("frontend");
    intruder.set_service_account("intruder");
    cluster.set_labels(server, &[("app", "server")]);
    cluster.write_mesh()?;
    cluster.start_agents()?;
    let node = cluster.node(0);
    let mut app = serve(server, &[8080])?;
    let dst = server.addr4(8080);
    if carried == "relay" {
        ensure_no_splice_loaded(&cluster, node, "by default")?;
    }

    // Both carried; a DENY of the intruder cuts its transfer, the frontend's goes on.
    let mut victim = long_transfer(intruder, dst)?;
    let mut survivor = long_transfer(frontend, dst)?;
    accepted(&mut app, 2)?;
    let deadline = Instant::now() + TIMEOUT;
    while carried == "splice" && metric_value(node, "ambit_spliced_connections")? < 2.0 {
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "the two transfers were not both spliced"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (after, report) = cut_by(
        &cluster,
        deny("cluster.local/ns/default/sa/intruder"),
        &mut victim,
    )?;
    ensure_cut(&cluster, &report, after)?;
    ensure_or_dump!(
        cluster,
        survivor.try_status()?.is_none(),
        "the allowed transfer was over before the change: it proves nothing"
    );
    let (_, kept) = survivor.wait_json(Duration::from_secs(120))?;
    ensure_or_dump!(
        cluster,
        kept.first().is_some_and(|r| r["ok"] == true
            && r["sent"] == LONG_TRANSFER_BYTES
            && r["received"] == LONG_TRANSFER_BYTES),
        "the allowed transfer ({carried}) did not complete byte-exact: {kept:?}"
    );
    let inbound = wait_access_log(&cluster, node, "inbound", dst, 2)?;
    let cut: Vec<&Value> = inbound
        .iter()
        .filter(|l| {
            l["fast_path"] == carried
                && l["src_principal"] == "spiffe://cluster.local/ns/default/sa/intruder"
                && l["error"].as_str().is_some_and(|e| {
                    e.contains("closed after a policy change")
                        && e.contains("default/deny-intruder")
                })
        })
        .collect();
    ensure_or_dump!(
        cluster,
        cut.len() == 1
            && metric(
                node,
                "ambit_connections_closed_by_policy_total{reason=\"deny_policy\"}"
            )? == Some(1.0),
        "expected one inbound connection ({carried}) closed after the policy change, counted \
         once: {inbound:?}"
    );

    // At accept: the intruder is refused before anything reaches the application, and the
    // refusal is counted once (on the destination's side, as the HBONE server counts it).
    ensure_or_dump!(
        cluster,
        !reaches(intruder, dst)?,
        "a denied source reached the application through the fast path"
    );
    let refused = wait_access_log(&cluster, node, "inbound", dst, 3)?;
    let denied_line = refused.iter().any(|l| {
        l["outcome"] == "error"
            && l["error"]
                .as_str()
                .is_some_and(|e| e.contains("denied by DENY policy default/deny-intruder"))
    });
    let outbound_line = access_logs_to(node, "outbound", dst).iter().any(|l| {
        l["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("denied by the destination's authorization policy"))
    });
    ensure_or_dump!(
        cluster,
        denied_line
            && outbound_line
            && metric(
                node,
                "ambit_connections_denied_total{reason=\"deny_policy\"}"
            )? == Some(1.0),
        "the refusal at accept was not logged on both sides and counted once"
    );
    // The frontend still gets through.
    connect_ok(&cluster, frontend, dst, 1 << 20)?;
    Ok(())
}

#[test]
fn a_spliced_connection_ends_with_its_agent_and_nothing_bypasses_the_mesh() -> Result<()> {
    let cluster = cluster(1, 2)?;
    cluster.start_agents()?;
    let node = cluster.node(0);
    let (client, server) = (cluster.pod(0, 0), cluster.pod(0, 1));
    let mut app = serve(server, &[8080])?;
    let dst = server.addr4(8080);

    let mut victim = long_transfer(client, dst)?;
    accepted(&mut app, 1)?;
    // Spliced, and flowing both ways (counted every second): the client sends only once the
    // server's greeting reached it, which the kernel forwards from a worker after the splice,
    // so "spliced" alone does not mean "greeted".
    let labels = [
        ("reporter", "destination"),
        ("destination_workload", server.name()),
    ];
    let deadline = Instant::now() + TIMEOUT;
    while metric_value(node, "ambit_spliced_connections")? < 1.0
        || metric_sum(node, "istio_tcp_received_bytes_total", &labels)? == 0.0
        || metric_sum(node, "istio_tcp_sent_bytes_total", &labels)? == 0.0
    {
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "the transfer was not spliced and flowing"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A crash: the kernel closes the agent's sockets, which takes them out of the splice.
    let killed = Instant::now();
    node.kill_agent();
    let report = victim.read_json(Duration::from_secs(60))?;
    ensure_cut(&cluster, &report, killed.elapsed())?;
    let closed = app.read_json_until(TIMEOUT, |v| v["event"] == "closed")?;
    ensure_or_dump!(
        cluster,
        closed["bytes"].as_u64() < Some(LONG_TRANSFER_BYTES),
        "the application's side of the spliced connection ran on without the agent: {closed}"
    );
    // Nothing flows around the mesh while the agent is gone.
    ensure_or_dump!(
        cluster,
        !reaches(client, dst)?,
        "with the agent down, an enrolled pod reached another one"
    );

    node.start_agent()?;
    node.wait_ready(TIMEOUT)?;
    cluster.with_diagnostics(node.wait_enrolled(2, TIMEOUT))?;
    let before = access_logs(node).len();
    connect_ok(&cluster, client, dst, 1 << 20)?;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let lines = access_logs(node);
        if lines[before.min(lines.len())..]
            .iter()
            .any(|l| l["direction"] == "outbound" && l["fast_path"] == "splice")
        {
            break;
        }
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "the restarted agent did not splice the connection"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The outbound access-log lines from `pod` on `node`, by how the fast path carried them.
fn carried_from(node: &Node, pod: &Pod, how: &str) -> Vec<Value> {
    access_logs(node)
        .into_iter()
        .filter(|l| {
            l["direction"] == "outbound"
                && l["src_workload"] == format!("default/{}", pod.name())
                && l["fast_path"] == how
        })
        .collect()
}

#[test]
fn a_pod_over_its_splice_share_is_relayed_and_the_others_still_spliced() -> Result<()> {
    let cluster = cluster(1, 3)?;
    let node = cluster.node(0);
    // Eight slots on the node, two per source pod.
    node.set_agent_args(["--max-spliced-connections", "8"]);
    cluster.start_agents()?;
    let (hog, other, server) = (cluster.pod(0, 0), cluster.pod(0, 1), cluster.pod(0, 2));
    let _app = serve(server, &[8080])?;
    let dst = server.addr4(8080);
    let testpod = ambit_tests::testpod_path!();

    // The hog holds four connections, each checked byte-exact: two spliced, two relayed by
    // the agent, none refused.
    let mut burst = hog.spawn(
        &testpod,
        [
            "burst",
            "--connect",
            &dst.to_string(),
            "--count",
            "4",
            "--bytes",
            "100000",
            "--hold-seconds",
            "60",
        ],
    )?;
    let opened = burst.read_json_until(TIMEOUT, |v| v["event"] == "opened")?;
    ensure_or_dump!(
        cluster,
        opened["open"] == 4 && opened["failed"] == 0,
        "the hog's connections were not all opened and echoed: {opened}"
    );
    ensure_or_dump!(
        cluster,
        metric_value(node, "ambit_spliced_connections")? == 2.0
            && metric(node, "ambit_splice_declined_total{reason=\"pod_share\"}")? == Some(2.0)
            && fast_path(node, "relay")? == 2.0,
        "a pod must hold its share of splices and no more, the rest relayed"
    );
    // Another pod's connection is still spliced while the hog holds its share.
    connect_ok(&cluster, other, dst, 1 << 20)?;
    wait_access_log(&cluster, node, "outbound", dst, 1)?;
    let deadline = Instant::now() + TIMEOUT;
    while carried_from(node, other, "splice").is_empty() {
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "another pod's connection was not spliced while one pod held its share"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    burst.write_line("done")?;
    let closed = burst.read_json_until(Duration::from_secs(60), |v| v["event"] == "closed")?;
    ensure_or_dump!(
        cluster,
        closed["clean"] == 4 && closed["failed"] == 0,
        "the hog's connections did not all close cleanly: {closed}"
    );
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (spliced, relayed) = (
            carried_from(node, hog, "splice"),
            carried_from(node, hog, "relay"),
        );
        if spliced.len() + relayed.len() == 4 {
            ensure_or_dump!(
                cluster,
                spliced.len() == 2
                    && spliced
                        .iter()
                        .chain(&relayed)
                        .all(|l| l["outcome"] == "ok" && l["bytes_sent"] == 100_000),
                "expected two spliced and two relayed connections, all complete: \
                 {spliced:?} {relayed:?}"
            );
            break;
        }
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "the hog's four connections were not all logged"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure_or_dump!(
        cluster,
        metric_value(node, "ambit_spliced_connections")? == 0.0,
        "splice slots were not given back"
    );
    Ok(())
}

#[test]
fn with_the_fast_path_off_no_splice_is_loaded_and_same_node_traffic_takes_hbone() -> Result<()> {
    let cluster = cluster(1, 2)?;
    let node = cluster.node(0);
    node.set_agent_args(["--same-node-fast-path", "false"]);
    cluster.start_agents()?;
    let (client, server) = (cluster.pod(0, 0), cluster.pod(0, 1));
    let _app = serve(server, &[8080])?;
    ensure_no_splice_loaded(&cluster, node, "with --same-node-fast-path false")?;
    let dst = server.addr4(8080);
    connect_ok(&cluster, client, dst, 1 << 20)?;
    let outbound = wait_access_log(&cluster, node, "outbound", dst, 1)?.remove(0);
    let inbound = wait_access_log(&cluster, node, "inbound", dst, 1)?.remove(0);
    ensure_or_dump!(
        cluster,
        outbound["fast_path"].is_null()
            && inbound["fast_path"].is_null()
            && outbound["security"] == "mtls"
            && fast_path(node, "splice")? == 0.0
            && fast_path(node, "relay")? == 0.0,
        "same-node traffic must take HBONE with the fast path off: {outbound} {inbound}"
    );
    Ok(())
}

/// Connections one pod stalls in the test below: each holds a half-closed direction whose
/// reader never reads.
const STALLED: u32 = 300;

#[test]
fn a_pod_stalling_half_closed_connections_is_checked_with_backoff_and_others_still_flow()
-> Result<()> {
    let cluster = cluster(1, 3)?;
    cluster.start_agents()?;
    let node = cluster.node(0);
    let (hog, client, server) = (cluster.pod(0, 0), cluster.pod(0, 1), cluster.pod(0, 2));
    let _app = serve(server, &[8080])?;
    let testpod = ambit_tests::testpod_path!();

    // The hostile pod: connections to itself (spliced: its own address is an enrolled pod of
    // this node), each filled until nothing moves and half-closed; its listener never reads.
    let own = hog.addr4(9000).to_string();
    let count = STALLED.to_string();
    let mut stall = hog.spawn(
        &testpod,
        [
            "stall",
            "--addr",
            own.as_str(),
            "--count",
            count.as_str(),
            "--bytes",
            "1048576",
            "--small-buffers",
            "65536",
            "--hold-seconds",
            "300",
        ],
    )?;
    let stalled = stall.read_json_until(Duration::from_secs(120), |v| v["event"] == "stalled")?;
    ensure_or_dump!(
        cluster,
        stalled["open"] == STALLED && stalled["failed"] == 0,
        "the hostile pod's connections did not all open: {stalled}"
    );
    // Every one of them waits, in the agent, for a peer that never takes its bytes.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let draining = metric_value(node, "ambit_splice_draining_connections")?;
        if draining >= f64::from(STALLED) {
            break;
        }
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "only {draining} of {STALLED} stalled connections are draining ({} spliced)",
            metric_value(node, "ambit_spliced_connections")?
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Over a window, each stalled connection is checked about once a second: at most one
    // check per elapsed second (the longest wait), plus its remaining backoff steps (1 ms
    // doubling to 1 s: 11 waits) and a first check, whatever the machine's load (a busier
    // machine only checks less). Polling every millisecond would make it ~1000 a second.
    let before = metric_value(node, "ambit_splice_drain_checks_total")?;
    let window = Instant::now();
    // Meanwhile another pod's connections flow, byte-exact, through the splice.
    let splices = fast_path(node, "splice")?;
    for _ in 0..3 {
        connect_ok(&cluster, client, server.addr4(8080), 4 << 20)?;
    }
    ensure_or_dump!(
        cluster,
        fast_path(node, "splice")? >= splices + 3.0,
        "another pod's connections were not spliced while one pod stalled its own"
    );
    std::thread::sleep(Duration::from_secs(10).saturating_sub(window.elapsed()));
    let checks = metric_value(node, "ambit_splice_drain_checks_total")? - before;
    let seconds = window.elapsed().as_secs_f64().ceil();
    let bound = f64::from(STALLED) * (seconds + 12.0);
    eprintln!("{checks} drain checks in {seconds} s for {STALLED} stalled connections");
    ensure_or_dump!(
        cluster,
        checks <= bound,
        "{checks} drain checks in {seconds} s for {STALLED} stalled connections (at most \
         {bound} with the backoff)"
    );

    // Closing the hostile pod's sockets ends every one of them in the agent.
    stall.write_line("done")?;
    stall.read_json_until(Duration::from_secs(60), |v| v["event"] == "closed")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (draining, spliced) = (
            metric_value(node, "ambit_splice_draining_connections")?,
            metric_value(node, "ambit_spliced_connections")?,
        );
        if draining == 0.0 && spliced == 0.0 {
            break;
        }
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "{draining} draining and {spliced} spliced connections left after the pod closed them"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
