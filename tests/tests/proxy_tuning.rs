//! End-to-end: the node proxy's tuning options keep traffic byte-exact and observable.
//!
//! - `--hbone-max-streams-per-connection`: tunnels past a pooled HBONE connection's stream cap
//!   open more connections to the same peer, and every tunnel still carries its bytes exactly.
//! - `--access-log-sampling`: successful connections may go unlogged, failures and refusals
//!   never do, and metrics count every connection whatever the sampling.
//! - The log is written off the proxy's threads: an agent whose stderr nobody reads keeps
//!   proxying, and counts the lines it drops.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ambit_tests::mesh::Policies;
use ambit_tests::traffic::{
    TIMEOUT, access_logs_to, connect_ok_n, hbone_client_ports, metric_sum, reaches, serve,
    spawn_client, wait_access_log,
};
use ambit_tests::{Cluster, ClusterSpec, Node, ensure_or_dump, testpod_bin, testpod_path};
use anyhow::Result;
use serde_json::json;

/// Waits until `node`'s agent counts at least `at_least` closed connections reported by
/// `reporter` (`source`: outbound, `destination`: inbound).
fn wait_closed(cluster: &Cluster, node: &Node, reporter: &str, at_least: f64) -> Result<f64> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let closed = metric_sum(
            node,
            "istio_tcp_connections_closed_total",
            &[("reporter", reporter)],
        )?;
        if closed >= at_least {
            return Ok(closed);
        }
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "{}: {closed} connections closed (reporter {reporter}), expected {at_least}",
            node.name()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn tunnels_past_the_stream_cap_open_more_connections_and_stay_byte_exact() -> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 1,
    })?;
    for node in cluster.nodes() {
        node.set_agent_args(["--hbone-max-streams-per-connection", "1"]);
    }
    cluster.start_agents()?;
    let (client, server) = (cluster.pod(0, 0), cluster.pod(1, 0));
    let _app = serve(server, &[9000])?;
    let dst = server.addr4(9000);
    const HELD: u32 = 4;

    // Held open together, one stream each: each needs a connection of its own.
    let mut burst = client.spawn(
        testpod_bin()?,
        [
            "burst",
            "--connect",
            &dst.to_string(),
            "--count",
            &HELD.to_string(),
            "--bytes",
            "300000",
            "--hold-seconds",
            "120",
        ],
    )?;
    let opened = burst.read_json_until(TIMEOUT, |v| v["event"] == "opened")?;
    ensure_or_dump!(
        cluster,
        opened["open"] == HELD && opened["failed"] == 0,
        "burst through capped connections: {opened}"
    );
    let ports = hbone_client_ports(client)?;
    ensure_or_dump!(
        cluster,
        ports.len() >= HELD as usize,
        "{HELD} tunnels held with one stream per connection, but {} has {} HBONE connections: {ports:?}",
        client.name(),
        ports.len()
    );
    burst.write_line("close")?;
    let closed = burst.read_json_until(TIMEOUT, |v| v["event"] == "closed")?;
    ensure_or_dump!(
        cluster,
        closed["clean"] == HELD,
        "the held tunnels did not all end cleanly, byte-exact: {closed}"
    );

    // Three clients at once, two connections each: every transfer byte-exact while the pool
    // opens and reuses connections under them.
    const BYTES: u64 = 2_000_000;
    let clients = (0..3)
        .map(|_| spawn_client(client, dst, BYTES, 2, &[]))
        .collect::<Result<Vec<_>>>()?;
    for mut c in clients {
        let (_, reports) = c.wait_json(Duration::from_secs(120))?;
        ensure_or_dump!(
            cluster,
            reports.len() == 2
                && reports
                    .iter()
                    .all(|r| r["ok"] == true && r["sent"] == BYTES && r["received"] == BYTES),
            "concurrent transfers through capped connections not all byte-exact: {reports:?}"
        );
    }
    // The server's agent saw every tunnel arrive through its HBONE server.
    let logged = wait_access_log(
        &cluster,
        cluster.node(1),
        "inbound",
        dst,
        (HELD + 6) as usize,
    )?;
    ensure_or_dump!(
        cluster,
        logged
            .iter()
            .all(|l| l["outcome"] == "ok" && l["security"] == "mtls"),
        "inbound tunnels not all mutual TLS and ok: {logged:?}"
    );
    Ok(())
}

#[test]
fn sampled_out_connections_are_counted_and_failures_are_always_logged() -> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        pods_per_node: 2,
    })?;
    let (client, server) = (cluster.pod(0, 0), cluster.pod(0, 1));
    cluster.set_labels(server, &[("app", "server")]);
    // Port 9001 of the server is refused to everyone.
    cluster.set_policies(Policies {
        authorization_policies: vec![json!({
            "name": "no-9001",
            "namespace": "default",
            "selector": {"matchLabels": {"app": "server"}},
            "action": "DENY",
            "rules": [{"to": [{"operation": {"ports": ["9001"]}}]}],
        })],
        ..Default::default()
    });
    cluster.write_mesh()?;
    let node = cluster.node(0);
    node.set_agent_args(["--access-log-sampling", "0"]);
    cluster.start_agents()?;
    let _app = serve(server, &[9000, 9001])?;
    let (open, refused): (SocketAddr, SocketAddr) = (server.addr4(9000), server.addr4(9001));
    const COUNT: u32 = 5;

    connect_ok_n(&cluster, client, open, 100_000, COUNT, &[])?;
    // Every connection is counted, on both sides, although none is to be logged.
    wait_closed(&cluster, node, "source", f64::from(COUNT))?;
    wait_closed(&cluster, node, "destination", f64::from(COUNT))?;
    ensure_or_dump!(
        cluster,
        !reaches(client, refused)?,
        "port 9001 of the server was reached despite the DENY policy"
    );
    // The refusal is logged although nothing successful is: lines are written in order, so
    // once it is there any line of the earlier connections would be too.
    let denied = wait_access_log(&cluster, node, "inbound", refused, 1)?;
    ensure_or_dump!(
        cluster,
        denied.iter().all(|l| l["outcome"] == "error"),
        "the refused connection was not logged as an error: {denied:?}"
    );
    let logged: Vec<_> = ["outbound", "inbound"]
        .iter()
        .flat_map(|direction| access_logs_to(node, direction, open))
        .collect();
    ensure_or_dump!(
        cluster,
        logged.is_empty(),
        "successful connections were logged with --access-log-sampling 0: {logged:?}"
    );
    Ok(())
}

/// Connections of the stalled-log test: two access-log lines each (outbound and inbound, same
/// node, about 500 bytes each: 9 MB), well over what the log queue takes of access lines (3 MiB)
/// and the pipe's 64 KiB together.
const STALLED_LOG_CONNECTIONS: u32 = 9_000;

#[test]
fn an_agent_whose_log_nobody_reads_keeps_proxying_and_counts_what_it_drops() -> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        pods_per_node: 2,
    })?;
    let node = cluster.node(0);
    // Its stdout and stderr are a pipe nobody reads, as a stalled container log pipe; readiness
    // is read over HTTP, not from the log.
    node.stall_agent_log();
    cluster.start_agents()?;
    let (client, server) = (cluster.pod(0, 0), cluster.pod(0, 1));
    let _app = serve(server, &[9000])?;
    let dst = server.addr4(9000).to_string();

    let mut churn = client.spawn(
        testpod_path!(),
        [
            "churn",
            "--connect",
            &dst,
            "--count",
            &STALLED_LOG_CONNECTIONS.to_string(),
            "--max-seconds",
            "240",
            "--timeout-ms",
            "5000",
        ],
    )?;
    let (_, lines) = churn.wait_json(Duration::from_secs(300))?;
    let summary = lines.last().cloned().unwrap_or_default();
    let dropped = metric_sum(node, "ambit_log_lines_dropped_total", &[])?;
    // The log again, for the checks below and for any dump.
    node.drain_agent_log()?;
    ensure_or_dump!(
        cluster,
        summary["ok"] == STALLED_LOG_CONNECTIONS && summary["failed"] == 0,
        "with its log stalled, the agent did not carry {STALLED_LOG_CONNECTIONS} connections: \
         {summary}"
    );
    ensure_or_dump!(
        cluster,
        dropped > 0.0,
        "{} access-log lines went into a stalled log, yet ambit_log_lines_dropped_total is \
         {dropped}",
        2 * STALLED_LOG_CONNECTIONS
    );
    // What was queued before the pipe filled is not lost: the start-up lines arrive once the
    // pipe is read again.
    cluster.wait_for(
        TIMEOUT,
        "the agent's start-up lines out of the drained log pipe",
        || {
            Ok(if node.agent_log().contains("connection limits") {
                Ok(())
            } else {
                Err("no \"connection limits\" line yet".to_string())
            })
        },
    )?;
    Ok(())
}
