//! End-to-end tests of redirection: real agents, real eBPF, real namespaces and sockets.
//!
//! How a test tells whether a connection went through the agent: a redirected connect lands on
//! the agent's loopback listener, so the client's own address (`getsockname`) is on loopback,
//! while `getpeername` still shows the address it dialled; and a connection steered into the
//! destination pod's agent reaches the application from the pod's own address. The agents'
//! access logs confirm both hops.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ambit_tests::mesh::Policies;
use ambit_tests::traffic::{TIMEOUT, access_logs, client, connect_ok, serve, wait_access_log};
use ambit_tests::{Cluster, ClusterSpec, Node, PodProcess, ensure_or_dump, util};
use anyhow::{Context, Result};
use serde_json::json;

const T: Duration = TIMEOUT;

fn testpod() -> PathBuf {
    ambit_tests::testpod_path!()
}

fn cluster(nodes: usize, pods_per_node: usize) -> Result<Cluster> {
    Cluster::start(ClusterSpec {
        nodes,
        pods_per_node,
    })
}

/// A mesh-wide PERMISSIVE peer authentication: enrolled pods accept plaintext too. It is the
/// default without any policy; tests that need plaintext accepted say so anyway.
fn permissive_mesh() -> Policies {
    Policies {
        peer_authentications: vec![json!({"name": "permissive", "mode": "PERMISSIVE"})],
        ..Default::default()
    }
}

fn ebpf_stat(node: &Node, name: &str) -> Result<u64> {
    node.config_dump()?["ebpfStats"][name]
        .as_u64()
        .with_context(|| format!("no ebpfStats.{name} in config_dump"))
}

fn map_entries(node: &Node, map: &str) -> Result<u64> {
    node.config_dump()?["maps"][map]
        .as_u64()
        .with_context(|| format!("no maps.{map} in config_dump"))
}

#[test]
fn pod_to_pod_same_node_and_across_nodes_goes_through_both_agents() -> Result<()> {
    let cluster = cluster(2, 2)?;
    cluster.start_agents()?;
    let client_pod = cluster.pod(0, 0);
    let same_node = cluster.pod(0, 1);
    let other_node = cluster.pod(1, 0);
    let _s1 = serve(same_node, &[8080])?;
    let _s2 = serve(other_node, &[8080])?;

    for (to, dst) in [
        (same_node, same_node.addr4(8080)),
        (other_node, other_node.addr4(8080)),
        (other_node, other_node.addr6(8080)),
    ] {
        let conn = connect_ok(&cluster, client_pod, dst, 100_000)?;
        ensure_or_dump!(
            cluster,
            conn.redirected(),
            "{dst}: client socket not on loopback, so not redirected: {}",
            conn.report
        );
        ensure_or_dump!(
            cluster,
            conn.peer() == dst.to_string(),
            "getpeername shows {} instead of the dialled {dst}",
            conn.peer()
        );
        // Both ends see the addresses they would without the mesh: the client its own pod
        // address, the server the client pod's address of the family dialled.
        let client_ip = match dst {
            SocketAddr::V4(_) => IpAddr::V4(client_pod.ip4()),
            SocketAddr::V6(_) => IpAddr::V6(client_pod.ip6()),
        };
        ensure_or_dump!(
            cluster,
            conn.served_by() == to.name()
                && conn.local_ip() == Some(client_ip)
                && conn.seen_peer_ip() == Some(client_ip),
            "{dst}: expected {} to be reached with the client's address {client_ip} on both \
             ends: {}",
            to.name(),
            conn.report
        );
        let dst_node = cluster.node_of(to);
        wait_access_log(&cluster, cluster.node(0), "outbound", dst, 1)?;
        wait_access_log(&cluster, dst_node, "inbound", dst, 1)?;
    }
    let outbound = access_logs(cluster.node(0))
        .into_iter()
        .find(|l| l["direction"] == "outbound" && l["dst"] == same_node.addr4(8080).to_string())
        .context("outbound access log")?;
    ensure_or_dump!(
        cluster,
        outbound["src_workload"] == format!("default/{}", client_pod.name())
            && outbound["dst_workload"] == format!("default/{}", same_node.name())
            && outbound["bytes_sent"].as_u64() >= Some(100_000)
            && outbound["bytes_received"].as_u64() >= Some(100_000)
            && outbound["outcome"] == "ok",
        "access log record lacks workloads, bytes or outcome: {outbound}"
    );
    ensure_or_dump!(
        cluster,
        ebpf_stat(cluster.node(0), "redirectedV4")? >= 2
            && ebpf_stat(cluster.node(0), "redirectedV6")? >= 1,
        "eBPF redirect counters did not count the connects"
    );
    Ok(())
}

#[test]
fn unenrolled_pods_traffic_is_untouched() -> Result<()> {
    let cluster = cluster(1, 3)?;
    let plain_client = cluster.pod(0, 0);
    let plain_server = cluster.pod(0, 1);
    cluster.set_enrolled(plain_client, false);
    cluster.set_enrolled(plain_server, false);
    cluster.write_mesh()?;
    cluster.start_agents()?;
    let _s = serve(plain_server, &[8080])?;
    let dst = plain_server.addr4(8080);
    let conn = connect_ok(&cluster, plain_client, dst, 10_000)?;
    ensure_or_dump!(
        cluster,
        !conn.redirected()
            && conn.local_ip() == Some(plain_client.ip4().into())
            && conn.seen_peer_ip() == Some(plain_client.ip4().into()),
        "un-enrolled pods' connection was touched: {}",
        conn.report
    );
    let node = cluster.node(0);
    ensure_or_dump!(
        cluster,
        ebpf_stat(node, "redirectedV4")? == 0 && access_logs(node).is_empty(),
        "the agent saw traffic of un-enrolled pods"
    );

    // An enrolled client's connection to an un-enrolled server goes through the client's agent,
    // which connects from inside the client pod: the server still sees the client's address.
    let meshed_client = cluster.pod(0, 2);
    let conn = connect_ok(&cluster, meshed_client, dst, 10_000)?;
    ensure_or_dump!(
        cluster,
        conn.redirected() && conn.seen_peer_ip() == Some(meshed_client.ip4().into()),
        "expected a redirected connection arriving from the client pod's own address: {}",
        conn.report
    );
    Ok(())
}

#[test]
fn enrolling_and_unenrolling_a_running_pod_spares_open_connections() -> Result<()> {
    let cluster = cluster(1, 2)?;
    let client_pod = cluster.pod(0, 0);
    let server_pod = cluster.pod(0, 1);
    cluster.set_enrolled(client_pod, false);
    cluster.set_enrolled(server_pod, false);
    cluster.write_mesh()?;
    cluster.start_agents()?;
    let node = cluster.node(0);
    let _s = serve(server_pod, &[8080])?;
    let dst = server_pod.addr4(8080);

    let echo = |held: &mut PodProcess, what: &str| -> Result<()> {
        held.write_line(what)?;
        let reply = held.read_json(T)?;
        ensure_or_dump!(
            cluster,
            reply["echo"] == what,
            "held connection broke: sent {what:?}, got {reply}"
        );
        Ok(())
    };
    let hold = || -> Result<PodProcess> {
        let mut held = client_pod.spawn(testpod(), ["hold", "--connect", &dst.to_string()])?;
        let connected = held.read_json(T)?;
        ensure_or_dump!(
            cluster,
            connected["event"] == "connected",
            "hold failed: {connected}"
        );
        Ok(held)
    };

    let mut direct = hold()?;
    echo(&mut direct, "before enrolment")?;
    ensure_or_dump!(
        cluster,
        !connect_ok(&cluster, client_pod, dst, 1000)?.redirected(),
        "redirected before enrolment"
    );

    let generation = node.config_generation()?;
    cluster.set_enrolled(client_pod, true);
    cluster.set_enrolled(server_pod, true);
    cluster.write_mesh()?;
    cluster.wait_config_generation(0, generation + 1, T)?;
    cluster.with_diagnostics(node.wait_enrolled(2, T))?;
    echo(&mut direct, "after enrolment")?;
    let conn = connect_ok(&cluster, client_pod, dst, 1000)?;
    ensure_or_dump!(
        cluster,
        conn.redirected(),
        "the next connection after enrolment was not redirected: {}",
        conn.report
    );

    let mut meshed = hold()?;
    echo(&mut meshed, "meshed")?;
    cluster.set_enrolled(client_pod, false);
    cluster.set_enrolled(server_pod, false);
    cluster.write_mesh()?;
    cluster.wait_config_generation(0, generation + 2, T)?;
    cluster.with_diagnostics(node.wait_enrolled(0, T))?;
    // Un-enrolment detaches inbound steering before the agent reports it (a link released
    // lazily with its pin refused the next connections for as long as the kernel took).
    for pod in [client_pod, server_pod] {
        let links = pod.sk_lookup_links()?;
        ensure_or_dump!(
            cluster,
            links == 0,
            "{links} sk_lookup link(s) still attached to {} after un-enrolment",
            pod.netns_name()
        );
    }
    echo(&mut meshed, "after un-enrolment")?;
    echo(&mut direct, "still direct")?;
    let conn = connect_ok(&cluster, client_pod, dst, 1000)?;
    ensure_or_dump!(
        cluster,
        !conn.redirected() && conn.seen_peer_ip() == Some(client_pod.ip4().into()),
        "the next connection after un-enrolment still went through the agent: {}",
        conn.report
    );
    Ok(())
}

#[test]
fn service_vip_round_robins_over_endpoints_on_two_nodes() -> Result<()> {
    let cluster = cluster(2, 2)?;
    let web_a = cluster.pod(0, 1);
    let web_b = cluster.pod(1, 1);
    cluster.set_labels(web_a, &[("app", "web")]);
    cluster.set_labels(web_b, &[("app", "web")]);
    cluster.add_service(
        "web",
        "default",
        &["10.96.0.10"],
        &[("app", "web")],
        &[(80, 8080)],
    );
    cluster.write_mesh()?;
    cluster.start_agents()?;
    let _a = serve(web_a, &[8080])?;
    let _b = serve(web_b, &[8080])?;

    let vip: SocketAddr = "10.96.0.10:80".parse()?;
    let conns = client(cluster.pod(0, 0), vip, 1000, 10)?;
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    for conn in &conns {
        ensure_or_dump!(
            cluster,
            conn.ok() && conn.peer() == vip.to_string(),
            "connection to the VIP failed or getpeername did not show the VIP: {}",
            conn.report
        );
        *served.entry(conn.served_by()).or_default() += 1;
    }
    let expected: BTreeMap<String, usize> =
        [(web_a.name().to_string(), 5), (web_b.name().to_string(), 5)].into();
    ensure_or_dump!(
        cluster,
        served == expected,
        "10 connections to the VIP were served {served:?}, expected round robin {expected:?}"
    );
    // Lines are written as connections end, a moment after the clients saw the end: wait for
    // all ten.
    let logged = wait_access_log(&cluster, cluster.node(0), "outbound", vip, 10)?
        .into_iter()
        .filter(|l| l["dst_service"] == "default/web")
        .count();
    ensure_or_dump!(
        cluster,
        logged == 10,
        "{logged} outbound access-log lines name the service, expected 10"
    );
    Ok(())
}

#[test]
fn large_transfers_are_byte_exact_both_ways() -> Result<()> {
    let cluster = cluster(2, 1)?;
    cluster.start_agents()?;
    let server_pod = cluster.pod(1, 0);
    let _s = serve(server_pod, &[8080])?;
    // The echo server returns every byte, so each connection checks both directions.
    for bytes in [1 << 20, 16 << 20] {
        let conn = connect_ok(&cluster, cluster.pod(0, 0), server_pod.addr4(8080), bytes)?;
        ensure_or_dump!(
            cluster,
            conn.redirected(),
            "not redirected: {}",
            conn.report
        );
    }
    Ok(())
}

#[test]
fn maps_return_to_their_starting_size_after_10000_connections() -> Result<()> {
    let cluster = cluster(2, 1)?;
    cluster.start_agents()?;
    let server_pod = cluster.pod(1, 0);
    let _s = serve(server_pod, &[8080])?;
    let node = cluster.node(0);
    let tracked = ["ORIG_DST_TUPLE"];
    let baseline: Vec<u64> = tracked
        .iter()
        .map(|m| map_entries(node, m))
        .collect::<Result<_>>()?;
    let redirected_before = ebpf_stat(node, "redirectedV4")?;

    let mut churn = cluster.pod(0, 0).spawn(
        testpod(),
        [
            "churn",
            "--connect",
            &server_pod.addr4(8080).to_string(),
            "--count",
            "10000",
            "--max-seconds",
            "240",
        ],
    )?;
    let (_, lines) = churn.wait_json(Duration::from_secs(260))?;
    let summary = lines.last().cloned().unwrap_or_default();
    ensure_or_dump!(
        cluster,
        summary["ok"] == 10_000 && summary["failed"] == 0,
        "churn did not complete 10,000 connections: {summary}"
    );
    ensure_or_dump!(
        cluster,
        ebpf_stat(node, "redirectedV4")? - redirected_before == 10_000,
        "expected 10,000 redirected connects"
    );
    let deadline = Instant::now() + T;
    loop {
        let now: Vec<u64> = tracked
            .iter()
            .map(|m| map_entries(node, m))
            .collect::<Result<_>>()?;
        if now == baseline {
            return Ok(());
        }
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "maps {tracked:?} hold {now:?} entries after the churn, started at {baseline:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An IPv4 address as the eBPF maps key it: IPv4-mapped IPv6, network byte order.
fn hop_ip(ip: std::net::Ipv4Addr) -> Vec<u8> {
    ip.to_ipv6_mapped().octets().to_vec()
}

#[test]
fn a_stopped_agent_fails_closed_and_a_restarted_one_recovers() -> Result<()> {
    let cluster = cluster(1, 3)?;
    let outsider = cluster.pod(0, 2);
    cluster.set_enrolled(outsider, false);
    // Plaintext from the un-enrolled pod is only accepted under PERMISSIVE (the default).
    cluster.set_policies(permissive_mesh());
    cluster.write_mesh()?;
    cluster.start_agents()?;
    let node = cluster.node(0);
    let client_pod = cluster.pod(0, 0);
    let server_pod = cluster.pod(0, 1);
    let mut server = serve(server_pod, &[8080])?;
    let dst = server_pod.addr4(8080);
    connect_ok(&cluster, client_pod, dst, 1000)?;
    connect_ok(&cluster, outsider, dst, 1000)?;

    node.stop_agent()?;
    let outbound = client(client_pod, dst, 1000, 1)?;
    ensure_or_dump!(
        cluster,
        outbound.len() == 1 && !outbound[0].ok() && outbound[0].greeting_field(1).is_empty(),
        "with the agent stopped, an enrolled pod's connection must fail, got {:?}",
        outbound.first().map(|c| &c.report)
    );
    let inbound = client(outsider, dst, 1000, 1)?;
    ensure_or_dump!(
        cluster,
        inbound.len() == 1 && !inbound[0].ok() && inbound[0].greeting_field(1).is_empty(),
        "with the agent stopped, plaintext into an enrolled pod must not reach it, got {:?}",
        inbound.first().map(|c| &c.report)
    );

    // A hop the agent had in flight when it died stays in the pinned map: it would pass one
    // exact 4-tuple (here the outsider's port 40000 to the server) past inbound steering. The
    // next agent, with no predecessor to hand over from, drops it.
    let hop_key = [
        hop_ip(server_pod.ip4()),
        hop_ip(outsider.ip4()),
        8080u16.to_le_bytes().to_vec(),
        40000u16.to_le_bytes().to_vec(),
        vec![0; 4],
    ]
    .concat();
    let pin = node.bpffs().join("maps/AGENT_HOPS").display().to_string();
    let mut update = vec!["map", "update", "pinned", &pin, "key", "hex"];
    let hex: Vec<String> = hop_key.iter().map(|b| format!("{b:02x}")).collect();
    update.extend(hex.iter().map(String::as_str));
    update.extend(["value", "hex", "01"]);
    util::run("bpftool", update)?;

    node.start_agent()?;
    node.wait_ready(T)?;
    cluster.with_diagnostics(node.wait_enrolled(2, T))?;
    ensure_or_dump!(
        cluster,
        map_entries(node, "AGENT_HOPS")? == 0,
        "the dead agent's hop is still in AGENT_HOPS after the restart"
    );
    let conn = connect_ok(&cluster, client_pod, dst, 1000)?;
    ensure_or_dump!(cluster, conn.redirected(), "not redirected after restart");
    connect_ok(&cluster, outsider, dst, 1000)?;
    ensure_or_dump!(
        cluster,
        server.try_status()?.is_none(),
        "the server process did not live through the agent's restart"
    );
    Ok(())
}

#[test]
fn a_bad_mesh_file_is_rejected_and_the_last_good_state_stays() -> Result<()> {
    let cluster = cluster(1, 2)?;
    cluster.start_agents()?;
    let node = cluster.node(0);
    let server_pod = cluster.pod(0, 1);
    let _s = serve(server_pod, &[8080])?;
    let dst = server_pod.addr4(8080);
    let generation = node.config_generation()?;

    let good = cluster.write_mesh()?;
    let bad = good.replacen(&server_pod.ip4().to_string(), "10.10.0.300", 1);
    assert_ne!(good, bad, "the mesh file should mention the server's IP");
    cluster.write_raw_mesh(&bad)?;
    let deadline = Instant::now() + T;
    let error = loop {
        let dump = node.config_dump()?;
        if let Some(err) = dump["config"]["lastError"].as_str() {
            break err.to_string();
        }
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "the agent did not report the bad mesh file"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let path = cluster.mesh_path().display().to_string();
    ensure_or_dump!(
        cluster,
        error.contains(&path) && error.contains("ips[0]") && error.contains("10.10.0.300"),
        "the error must name the file, the field and the value: {error}"
    );
    ensure_or_dump!(
        cluster,
        node.config_generation()? == generation,
        "a bad file must not produce a new generation"
    );
    ensure_or_dump!(
        cluster,
        node.agent_log().contains("10.10.0.300"),
        "the agent's log does not report the bad file"
    );
    let conn = connect_ok(&cluster, cluster.pod(0, 0), dst, 1000)?;
    ensure_or_dump!(
        cluster,
        conn.redirected(),
        "the old state is no longer in force"
    );

    cluster.write_raw_mesh(&good)?;
    let deadline = Instant::now() + T;
    while !node.config_dump()?["config"]["lastError"].is_null() {
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "the error did not clear after the file was fixed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

#[test]
fn excluded_ports_and_networks_are_not_redirected() -> Result<()> {
    let cluster = cluster(2, 1)?;
    // An excluded connection reaches the server's agent in plaintext: accept it.
    cluster.set_policies(permissive_mesh());
    cluster.write_mesh()?;
    cluster.start_agents()?;
    let client_pod = cluster.pod(0, 0);
    let server_pod = cluster.pod(1, 0);
    let _s = serve(server_pod, &[8080, 9090])?;
    ensure_or_dump!(
        cluster,
        connect_ok(&cluster, client_pod, server_pod.addr4(9090), 100)?.redirected(),
        "port 9090 should be redirected before it is excluded"
    );

    let generation = cluster.node(0).config_generation()?;
    cluster.set_redirect_exclusions(&[9090], &[&format!("{}/32", server_pod.ip6())]);
    cluster.write_mesh()?;
    cluster.wait_config_generation(0, generation + 1, T)?;
    for (dst, redirected) in [
        (server_pod.addr4(9090), false),
        (server_pod.addr6(8080), false),
        (server_pod.addr4(8080), true),
    ] {
        let conn = connect_ok(&cluster, client_pod, dst, 100)?;
        ensure_or_dump!(
            cluster,
            conn.redirected() == redirected,
            "{dst}: redirected = {}, expected {redirected}",
            conn.redirected()
        );
    }
    ensure_or_dump!(
        cluster,
        ebpf_stat(cluster.node(0), "excluded")? == 2,
        "the eBPF exclusion counter should count the two excluded connects"
    );
    Ok(())
}

#[test]
fn the_agent_names_what_is_missing() -> Result<()> {
    let bin = std::env::var_os("AMBIT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/ambit"));
    let out = std::process::Command::new(&bin)
        .args([
            "agent",
            "--node",
            "n0",
            "--mesh-file",
            "/nonexistent",
            "--cgroup",
            "/tmp",
            "--bpffs",
            "/tmp/ambit-not-bpffs",
        ])
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        !out.status.success() && stderr.contains("--cgroup /tmp is not a cgroup v2 directory"),
        "expected a clear cgroup v2 error, got {}: {stderr}",
        out.status
    );
    Ok(())
}
