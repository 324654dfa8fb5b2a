//! End-to-end tests that applications see the addresses they would see without the mesh.
//!
//! The client (`testpod client`) reports its socket's `getsockname()` (`local`), its
//! `getpeername()` (`peer`), and where the kernel's socket table says it is connected
//! (`kernel_peer`: the agent's `127.0.0.1:15001` when redirected, which no hook rewrites). The
//! server (`testpod serve`) greets each connection with the `getpeername()` of the socket it
//! accepted. Through the mesh, the client must see its pod's own address and the address it
//! dialled, and the server the client pod's address: same node (the fast path's splice) and
//! across nodes (HBONE), IPv4 and IPv6, and plaintext from outside the mesh to a PERMISSIVE pod.

use std::net::{IpAddr, SocketAddr};

use ambit_tests::traffic::{
    Conn, TIMEOUT, access_logs, access_logs_to, connect_ok, reaches, serve, wait_access_log,
};
use ambit_tests::{Cluster, ClusterSpec, Pod, ensure_or_dump, util};
use anyhow::Result;

fn cluster(nodes: usize, pods_per_node: usize) -> Result<Cluster> {
    Cluster::start(ClusterSpec {
        nodes,
        pods_per_node,
    })
}

/// `pod`'s address of the family of `dst`.
fn address_for(pod: &Pod, dst: SocketAddr) -> IpAddr {
    match dst {
        SocketAddr::V4(_) => IpAddr::V4(pod.ip4()),
        SocketAddr::V6(_) => IpAddr::V6(pod.ip6()),
    }
}

/// The client's own port, from its `getsockname()`.
fn local_port(conn: &Conn) -> Option<u16> {
    conn.report["local"]
        .as_str()?
        .parse::<SocketAddr>()
        .ok()
        .map(|a| a.port())
}

/// Connects from the meshed `client` to each `(server, dst, carried)` and checks what both ends
/// see: the client its pod's address (with the port the agent accepted it from) and the address
/// it dialled, the server the client pod's address. `carried` is the fast path's `splice` or
/// `relay` when the same-node fast path should have carried it.
fn both_ends_see_pod_addresses(
    cluster: &Cluster,
    client: &Pod,
    cases: &[(&Pod, SocketAddr, Option<&str>)],
) -> Result<()> {
    for &(server, dst, carried) in cases {
        let conn = connect_ok(cluster, client, dst, 10_000)?;
        let client_ip = address_for(client, dst);
        ensure_or_dump!(
            cluster,
            conn.redirected(),
            "{dst}: not redirected to the agent (kernel peer {:?}): {}",
            conn.kernel_peer(),
            conn.report
        );
        // What the client sees: its pod's address, the address it dialled.
        ensure_or_dump!(
            cluster,
            conn.local_ip() == Some(client_ip) && conn.peer() == dst.to_string(),
            "{dst}: the client saw getsockname {} and getpeername {}, expected {client_ip}:<port> \
             and {dst}",
            conn.report["local"],
            conn.peer()
        );
        // What the server sees: the client pod's address.
        ensure_or_dump!(
            cluster,
            conn.served_by() == server.name() && conn.seen_peer_ip() == Some(client_ip),
            "{dst}: {} saw the client as {}, expected {client_ip}",
            server.name(),
            conn.greeting_field(2)
        );
        // The port is the socket's real one: the agent accepted the connection from it.
        let node = cluster.node(client.node());
        let outbound = wait_access_log(cluster, node, "outbound", dst, 1)?;
        let from = SocketAddr::new(client_ip, local_port(&conn).unwrap_or(0));
        ensure_or_dump!(
            cluster,
            outbound.iter().any(|l| l["src"] == from.to_string()
                && carried.map_or(l["fast_path"].is_null(), |how| l["fast_path"] == how)),
            "{dst}: no outbound access-log line from {from} carried by {}: {outbound:?}",
            carried.unwrap_or("HBONE")
        );
    }
    Ok(())
}

#[test]
fn meshed_clients_and_servers_see_each_others_pod_addresses_same_node_and_across_nodes()
-> Result<()> {
    let cluster = cluster(2, 2)?;
    cluster.start_agents()?;
    let client = cluster.pod(0, 0);
    let same_node = cluster.pod(0, 1);
    let other_node = cluster.pod(1, 0);
    let _s1 = serve(same_node, &[8080])?;
    let _s2 = serve(other_node, &[8080])?;
    both_ends_see_pod_addresses(
        &cluster,
        client,
        &[
            (same_node, same_node.addr4(8080), Some("relay")),
            (same_node, same_node.addr6(8080), Some("relay")),
            (other_node, other_node.addr4(8080), None),
            (other_node, other_node.addr6(8080), None),
        ],
    )
}

#[test]
fn with_the_fast_path_off_same_node_hbone_keeps_the_addresses_too() -> Result<()> {
    let cluster = cluster(1, 2)?;
    cluster
        .node(0)
        .set_agent_args(["--same-node-fast-path", "false"]);
    cluster.start_agents()?;
    let (client, server) = (cluster.pod(0, 0), cluster.pod(0, 1));
    let _s = serve(server, &[8080])?;
    both_ends_see_pod_addresses(
        &cluster,
        client,
        &[
            (server, server.addr4(8080), None),
            (server, server.addr6(8080), None),
        ],
    )
}

#[test]
fn a_permissive_pod_sees_plaintext_clients_from_outside_the_mesh() -> Result<()> {
    let cluster = cluster(2, 2)?;
    let server = cluster.pod(0, 0);
    let same_node = cluster.pod(0, 1);
    let other_node = cluster.pod(1, 0);
    cluster.set_enrolled(same_node, false);
    cluster.set_enrolled(other_node, false);
    cluster.write_mesh()?;
    cluster.start_agents()?;
    let _s = serve(server, &[8080])?;

    for (client, dst) in [
        (same_node, server.addr4(8080)),
        (same_node, server.addr6(8080)),
        (other_node, server.addr4(8080)),
        (other_node, server.addr6(8080)),
    ] {
        // Two clients dial each address: this connection's line is the one after those before.
        let logged = access_logs_to(cluster.node(0), "inbound_plaintext", dst).len();
        let conn = connect_ok(&cluster, client, dst, 10_000)?;
        let client_ip = address_for(client, dst);
        ensure_or_dump!(
            cluster,
            !conn.redirected() && conn.local_ip() == Some(client_ip),
            "{dst}: an un-enrolled client's connection was touched: {}",
            conn.report
        );
        ensure_or_dump!(
            cluster,
            conn.seen_peer_ip() == Some(client_ip),
            "{dst}: the server saw {} instead of the plaintext client {client_ip}",
            conn.greeting_field(2)
        );
        // Through the server's agent (peer authentication and policy applied), from another
        // socket than the client's own.
        let inbound = wait_access_log(
            &cluster,
            cluster.node(0),
            "inbound_plaintext",
            dst,
            logged + 1,
        )?;
        let from = conn.report["local"].as_str().unwrap_or_default();
        ensure_or_dump!(
            cluster,
            inbound.iter().any(|l| l["src"] == from) && conn.greeting_field(2) != from,
            "{dst}: the connection from {from} did not go through the agent's inbound path: \
             {inbound:?}, greeting {}",
            conn.report["greeting"]
        );
    }
    Ok(())
}

#[test]
fn the_pod_routing_for_the_inbound_hop_touches_only_marked_packets() -> Result<()> {
    let cluster = cluster(1, 2)?;
    let server = cluster.pod(0, 0);
    let client = cluster.pod(0, 1);
    cluster.set_enrolled(client, false);
    cluster.write_mesh()?;
    cluster.start_agents()?;
    let ns = server.netns_name();

    // Enrolment installed one rule and one route per family, and the sysctl.
    for (family, default) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
        let rules = util::ip(&format!("{family} -n {ns} rule show"))?;
        let ours: Vec<&str> = rules.lines().filter(|l| l.contains("lookup 100")).collect();
        ensure_or_dump!(
            cluster,
            ours.len() == 1 && ours[0].contains("fwmark 0x539"),
            "{ns}: expected one `fwmark 0x539 lookup 100` rule ({family}): {rules}"
        );
        let table = util::ip(&format!("{family} -n {ns} route show table 100"))?;
        ensure_or_dump!(
            cluster,
            table.lines().count() == 1
                && table.contains("local")
                && table.contains("dev lo")
                && (table.contains("default") || table.contains(default)),
            "{ns}: table 100 should hold only `local default dev lo` ({family}): {table}"
        );
    }
    let sysctl = util::ip(&format!(
        "netns exec {ns} cat /proc/sys/net/ipv4/tcp_fwmark_accept"
    ))?;
    ensure_or_dump!(
        cluster,
        sysctl.trim() == "1",
        "{ns}: tcp_fwmark_accept is {sysctl}"
    );

    // Unmarked packets to a client still leave through the pod's interface; only the agent's
    // marked ones are delivered locally.
    for peer in client.ips() {
        let plain = util::ip(&format!("-n {ns} route get {peer}"))?;
        let marked = util::ip(&format!("-n {ns} route get {peer} mark 0x539"))?;
        ensure_or_dump!(
            cluster,
            !plain.starts_with("local") && !plain.contains("dev lo") && marked.starts_with("local"),
            "{ns}: route to {peer}: unmarked `{}`, marked `{}`",
            plain.trim(),
            marked.trim()
        );
    }

    // The pod's own connections are unchanged: to its own address (through its agent, which
    // hands it to the application) and out to the un-enrolled pod.
    let _s = serve(server, &[8080])?;
    let _c = serve(client, &[8080])?;
    for dst in [server.addr4(8080), client.addr4(8080), client.addr6(8080)] {
        let conn = connect_ok(&cluster, server, dst, 10_000)?;
        let own = address_for(server, dst);
        ensure_or_dump!(
            cluster,
            conn.local_ip() == Some(own) && conn.seen_peer_ip() == Some(own),
            "{dst}: the pod's own connection changed: {}",
            conn.report
        );
    }
    ensure_or_dump!(
        cluster,
        !access_logs(cluster.node(0)).is_empty(),
        "the pod's connections did not go through its agent"
    );

    // The application's accepted socket took the mark of the agent's SYN (over loopback), so
    // its answers take table 100.
    let mut held = client.spawn(
        ambit_tests::testpod_path!(),
        ["hold", "--connect", &server.addr4(8080).to_string()],
    )?;
    let connected = held.read_json(TIMEOUT)?;
    ensure_or_dump!(
        cluster,
        connected["event"] == "connected",
        "hold failed: {connected}"
    );
    let sockets = util::ip(&format!("netns exec {ns} ss -tenH state established"))?;
    let app_side: Vec<&str> = sockets
        .lines()
        .filter(|l| {
            l.split_whitespace().nth(2) == Some(&*server.addr4(8080).to_string())
                && l.contains(&client.ip4().to_string())
        })
        .collect();
    // Two sockets at the server's address hold a connection from the client: the agent's
    // (steered by sk_lookup, unmarked) and the application's (from the agent's hop, marked).
    let marked = app_side
        .iter()
        .filter(|l| l.contains("fwmark:0x539"))
        .count();
    ensure_or_dump!(
        cluster,
        app_side.len() == 2 && marked == 1,
        "expected the agent's and the application's socket of the held connection, only the \
         application's with fwmark 0x539: {sockets}"
    );
    drop(held);

    // The routing is what carries the hop: without the sysctl the application's socket does
    // not take the mark of the agent's SYN, its SYN-ACK leaves for the client's address
    // through the pod's interface, and the connection never completes.
    let plaintext = server.addr4(8080);
    ensure_or_dump!(
        cluster,
        reaches(client, plaintext)?,
        "{plaintext}: plaintext from the un-enrolled pod should reach the PERMISSIVE server"
    );
    util::ip(&format!(
        "netns exec {ns} sysctl -qw net.ipv4.tcp_fwmark_accept=0"
    ))?;
    ensure_or_dump!(
        cluster,
        !reaches(client, plaintext)?,
        "{plaintext}: reached without tcp_fwmark_accept: the mark is not what brings the \
         application's answers back"
    );
    Ok(())
}

/// A process in a pod with CAP_NET_RAW (a container's default) can set the hop's mark and
/// `IP_TRANSPARENT`: it must still not pose as another client toward its own agent. Its
/// forged connection to its own address (redirected to the agent's outbound listener) never
/// completes, as the agent's listeners answer by the main table, and the agent logs nothing
/// from the forged address. (Without the listeners' own mark, it completed.)
#[test]
fn a_pod_cannot_pose_as_another_client_toward_its_agent() -> Result<()> {
    let cluster = cluster(1, 2)?;
    let (pod, victim) = (cluster.pod(0, 0), cluster.pod(0, 1));
    cluster.set_enrolled(victim, false);
    cluster.write_mesh()?;
    cluster.start_agents()?;
    let _s = serve(pod, &[8080])?;
    let mark = format!("{:#x}", 0x539);
    for (dst, forged) in [
        (pod.addr4(8080), IpAddr::V4(victim.ip4())),
        (pod.addr6(8080), IpAddr::V6(victim.ip6())),
    ] {
        let mut forger = pod.spawn(
            ambit_tests::testpod_path!(),
            [
                "client",
                "--connect",
                &dst.to_string(),
                "--mark",
                &mark,
                "--transparent-from",
                &forged.to_string(),
                "--timeout-ms",
                "3000",
            ],
        )?;
        let (_, lines) = forger.wait_json(TIMEOUT)?;
        let report = lines.first().cloned().unwrap_or_default();
        ensure_or_dump!(
            cluster,
            report["ok"] == false && report["greeting"].is_null(),
            "{dst}: a connection posing as {forged} was accepted: {report}; stderr: {}",
            forger.stderr()
        );
        let forged_lines: Vec<_> = access_logs(cluster.node(0))
            .into_iter()
            .filter(|l| {
                l["src"]
                    .as_str()
                    .and_then(|s| s.parse::<SocketAddr>().ok())
                    .is_some_and(|s| s.ip() == forged)
            })
            .collect();
        ensure_or_dump!(
            cluster,
            forged_lines.is_empty(),
            "the agent took {forged} for a client: {forged_lines:?}"
        );
    }
    // The same pod's honest connection to itself still goes through.
    let conn = connect_ok(&cluster, pod, pod.addr4(8080), 1000)?;
    ensure_or_dump!(cluster, conn.report["ok"] == true, "{}", conn.report);
    Ok(())
}
