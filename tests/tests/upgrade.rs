//! End-to-end tests of replacing a node's agent (a DaemonSet rolling with a surge): the new
//! agent starts beside the old one, takes over the pods' listeners, and the old one serves
//! its open connections to their end; nothing is cut, nothing refused. A crash still fails
//! closed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ambit_tests::traffic::{Conn, accepted, client, client_with, connect_ok, serve, spawn_client};
use ambit_tests::{Cluster, ClusterSpec, Node, Pod, PodProcess, ensure_or_dump};
use anyhow::{Context, Result};

/// Bytes of each transfer that runs across the replacement, paced at [`RATE`]: about 24 s,
/// longer than a replacement takes here.
const LONG_BYTES: u64 = 48 << 20;
const RATE: u64 = 2 << 20;
/// The predecessor's grace period: above the transfers' length, so they end by themselves.
const GRACE: &str = "120s";
/// Bound on the stream of new connections, whatever happens.
const STREAM_LIMIT: Duration = Duration::from_secs(240);

fn long_transfer(from: &Pod, dst: SocketAddr) -> Result<PodProcess> {
    spawn_client(
        from,
        dst,
        LONG_BYTES,
        1,
        &["--rate", &RATE.to_string(), "--timeout-ms", "240000"],
    )
}

/// New connections from `from` to `dst`, a few at a time, until `stop` (and one round after).
fn stream(from: &Pod, dst: SocketAddr, stop: &AtomicBool) -> Result<Vec<Conn>> {
    let started = Instant::now();
    let mut conns = Vec::new();
    loop {
        let last = stop.load(Ordering::SeqCst) || started.elapsed() > STREAM_LIMIT;
        conns.extend(client_with(from, dst, 4096, 5, &[])?);
        if last {
            return Ok(conns);
        }
    }
}

/// Waits until the agent log of `node` has a line with `message`.
fn wait_log(cluster: &Cluster, node: &Node, message: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let found = node
            .agent_log_json()
            .iter()
            .any(|l| l["message"].as_str().is_some_and(|m| m.contains(message)));
        if found {
            return Ok(());
        }
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "{}: no log line {message:?} within {timeout:?}",
            node.name()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn count(node: &Node, field: &str) -> Result<u64> {
    let dump = node.config_dump()?;
    dump["maps"][field]
        .as_u64()
        .with_context(|| format!("no maps.{field} in config_dump: {dump}"))
}

/// A transfer that ran across the replacement ended complete and byte-exact.
fn ensure_whole(cluster: &Cluster, what: &str, transfer: &mut PodProcess) -> Result<()> {
    let (_, lines) = transfer.wait_json(Duration::from_secs(240))?;
    let report = lines.first().cloned().unwrap_or_default();
    ensure_or_dump!(
        cluster,
        report["ok"] == true && report["sent"] == LONG_BYTES && report["received"] == LONG_BYTES,
        "{what}: the transfer across the agent replacement was cut or not byte-exact: {report}"
    );
    Ok(())
}

#[test]
fn an_agent_replacement_cuts_no_connection_and_refuses_none_and_a_crash_still_fails_closed()
-> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 2,
    })?;
    let node = cluster.node(0);
    node.set_agent_args(["--termination-grace-period", GRACE]);
    cluster.write_mesh()?;
    cluster.start_agents()?;
    // Node 0's agent is replaced: a client and a server there, a peer on node 1.
    let (client_pod, server_pod, peer) = (cluster.pod(0, 0), cluster.pod(0, 1), cluster.pod(1, 0));
    let mut server = serve(server_pod, &[8080])?;
    let mut peer_server = serve(peer, &[8080])?;
    let (same_node, across, inbound) = (
        (client_pod, server_pod.addr4(8080)),
        (client_pod, peer.addr4(8080)),
        (peer, server_pod.addr4(8080)),
    );
    let flows = [
        ("same node", same_node),
        ("outbound across nodes", across),
        ("inbound across nodes", inbound),
    ];
    for (_, (from, dst)) in flows {
        connect_ok(&cluster, from, dst, 1000)?;
    }
    let enrolled_before = count(node, "ENROLLED_NETNS")?;
    let listeners_before = count(node, "POD_LISTENERS")?;

    let mut transfers = Vec::new();
    for (what, (from, dst)) in flows {
        transfers.push((what, long_transfer(from, dst)?));
    }
    accepted(&mut server, 2)?;
    accepted(&mut peer_server, 1)?;

    let stop = AtomicBool::new(false);
    let streams = std::thread::scope(|s| -> Result<Vec<(&str, Vec<Conn>)>> {
        let handles: Vec<_> = flows
            .iter()
            .map(|(what, (from, dst))| {
                let stop = &stop;
                (*what, s.spawn(move || stream(from, *dst, stop)))
            })
            .collect();
        let replaced = (|| -> Result<()> {
            // Some connections of each stream before the replacement starts.
            std::thread::sleep(Duration::from_secs(2));
            node.start_successor_agent()?;
            wait_log(&cluster, node, "took over", Duration::from_secs(90))?;
            node.wait_ready(Duration::from_secs(60))?;
            for (what, transfer) in &mut transfers {
                ensure_or_dump!(
                    cluster,
                    transfer.try_status()?.is_none(),
                    "{what}: the long transfer ended before the old agent was stopped: the \
                     machine is too slow for this test to cover a replacement"
                );
            }
            // The DaemonSet deletes the old pod once the new one is ready: it drains, then
            // exits by itself as its last connection ends.
            let (status, by_itself) = node.stop_predecessor(Duration::from_secs(200))?;
            ensure_or_dump!(
                cluster,
                by_itself && status.success(),
                "the old agent did not drain and exit by itself ({status}, by itself: {by_itself})"
            );
            // New connections a while after the old agent is gone.
            std::thread::sleep(Duration::from_secs(2));
            Ok(())
        })();
        stop.store(true, Ordering::SeqCst);
        let streams = handles
            .into_iter()
            .map(|(what, h)| Ok((what, h.join().expect("stream thread")?)))
            .collect::<Result<Vec<_>>>();
        replaced?;
        streams
    })?;

    for (what, transfer) in &mut transfers {
        ensure_whole(&cluster, what, transfer)?;
    }
    for (what, conns) in &streams {
        let bad: Vec<_> = conns
            .iter()
            .filter(|c| !c.ok() || c.report["received"] != 4096)
            .map(|c| &c.report)
            .collect();
        eprintln!(
            "{what}: {} new connections across the replacement",
            conns.len()
        );
        ensure_or_dump!(
            cluster,
            bad.is_empty(),
            "{what}: {} of {} new connections across the agent replacement failed: {bad:?}",
            bad.len(),
            conns.len()
        );
    }
    // The old agent's exit left the successor's state in place.
    ensure_or_dump!(
        cluster,
        count(node, "ENROLLED_NETNS")? == enrolled_before
            && count(node, "POD_LISTENERS")? == listeners_before,
        "the successor's enrolment changed when the old agent exited: {}",
        node.config_dump()?
    );
    for pod in [client_pod, server_pod] {
        ensure_or_dump!(
            cluster,
            pod.sk_lookup_links()? == 1,
            "{}: one sk_lookup link expected",
            pod.name()
        );
    }
    for (_, (from, dst)) in flows {
        let conn = connect_ok(&cluster, from, dst, 1000)?;
        ensure_or_dump!(
            cluster,
            conn.redirected(),
            "not redirected after the replacement"
        );
    }

    // A crash with no successor: the pins stay and the pods fail closed, as before.
    node.kill_agent();
    for (what, (from, dst)) in [("outbound", same_node), ("inbound", inbound)] {
        let conns = client(from, dst, 1000, 1)?;
        ensure_or_dump!(
            cluster,
            conns.len() == 1 && !conns[0].ok() && conns[0].greeting_field(1).is_empty(),
            "{what}: with the agent crashed, the connection must fail, got {:?}",
            conns.first().map(|c| &c.report)
        );
    }
    ensure_or_dump!(
        cluster,
        server.try_status()?.is_none() && peer_server.try_status()?.is_none(),
        "a server did not live through the replacement"
    );
    Ok(())
}

/// A successor that cannot get its pods' certificates (the CA unreachable) does not take over,
/// and one that dies before taking over leaves the running agent in charge: it resumes
/// enrolment, registers its listeners again, and serves every flow, open and new.
#[test]
fn a_successor_that_dies_before_taking_over_leaves_the_running_agent_serving() -> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 2,
    })?;
    let node = cluster.node(0);
    cluster.write_mesh()?;
    cluster.start_agents()?;
    let (client_pod, server_pod, peer) = (cluster.pod(0, 0), cluster.pod(0, 1), cluster.pod(1, 0));
    let mut server = serve(server_pod, &[8080])?;
    let _peer_server = serve(peer, &[8080])?;
    let flows = [
        ("same node", (client_pod, server_pod.addr4(8080))),
        ("outbound across nodes", (client_pod, peer.addr4(8080))),
        ("inbound across nodes", (peer, server_pod.addr4(8080))),
    ];
    let all_flows_work = |when: &str| -> Result<()> {
        for (what, (from, dst)) in flows {
            let conns = client(from, dst, 4096, 3)?;
            ensure_or_dump!(
                cluster,
                conns.len() == 3 && conns.iter().all(|c| c.ok()),
                "{what}, {when}: {:?}",
                conns.iter().map(|c| &c.report).collect::<Vec<_>>()
            );
        }
        Ok(())
    };
    all_flows_work("before the upgrade")?;
    let mut transfer = long_transfer(client_pod, server_pod.addr4(8080))?;
    accepted(&mut server, 1)?;

    // The CA goes away, then a successor starts: it freezes the running agent's enrolment and
    // waits for certificates it cannot get.
    cluster.stop_ca();
    node.start_successor_agent()?;
    wait_log(
        &cluster,
        node,
        "a successor agent is starting: enrolment frozen",
        Duration::from_secs(60),
    )?;
    std::thread::sleep(Duration::from_secs(2));
    all_flows_work("while a successor without certificates waits")?;

    // It dies before taking over.
    let successor = node.agent_pid().context("the successor's pid")?;
    // SAFETY: kill(2) on a process this test started.
    let killed = unsafe { libc::kill(successor as i32, libc::SIGKILL) };
    ensure_or_dump!(cluster, killed == 0, "kill {successor}: {killed}");
    wait_log(
        &cluster,
        node,
        "the successor agent did not take over: enrolment resumed",
        Duration::from_secs(60),
    )?;
    all_flows_work("after the successor died")?;
    ensure_or_dump!(
        cluster,
        node.predecessor_pid().is_some(),
        "the running agent exited when its successor died"
    );
    cluster.start_ca()?;
    ensure_whole(&cluster, "same node", &mut transfer)?;
    Ok(())
}
