//! End-to-end tests of per-pod capture exclusions (a workload's `excludeOutboundPorts`,
//! `excludeOutboundCidrs`, `excludeInboundPorts` in the mesh file): real agents, real eBPF,
//! real namespaces and sockets.
//!
//! A connection left alone by an exclusion is told from a meshed one by the client socket's
//! kernel peer (`testpod client` reports it): the destination itself, where a redirected
//! connect's is the agent's listener on loopback. An excluded inbound port is told by a
//! plaintext client outside the mesh reaching a STRICT pod's application on it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ambit_tests::mesh::Policies;
use ambit_tests::traffic::{TIMEOUT, connect_ok, reaches, serve};
use ambit_tests::{Cluster, ClusterSpec, Node, Pod, ensure_or_dump};
use anyhow::{Context, Result};
use serde_json::json;

const T: Duration = TIMEOUT;

/// The per-pod exclusion maps.
const MAPS: [&str; 3] = [
    "POD_EXCLUDED_PORTS",
    "POD_EXCLUDED_NETS",
    "POD_EXCLUDED_INBOUND",
];

fn strict_mesh() -> Policies {
    Policies {
        peer_authentications: vec![json!({"name": "strict", "mode": "STRICT"})],
        ..Default::default()
    }
}

fn ebpf_stat(node: &Node, name: &str) -> Result<u64> {
    node.config_dump()?["ebpfStats"][name]
        .as_u64()
        .with_context(|| format!("no ebpfStats.{name} in config_dump"))
}

fn map_sizes(node: &Node) -> Result<Vec<u64>> {
    let dump = node.config_dump()?;
    MAPS.iter()
        .map(|m| {
            dump["maps"][m]
                .as_u64()
                .with_context(|| format!("no maps.{m} in config_dump"))
        })
        .collect()
}

/// Waits until `node`'s per-pod exclusion maps hold `want` entries (in [`MAPS`] order): the
/// reconcile after a new configuration generation applies them.
fn wait_maps(cluster: &Cluster, node: &Node, want: [u64; 3], why: &str) -> Result<()> {
    cluster.wait_for(T, why, || {
        let now = map_sizes(node)?;
        Ok(if now == want {
            Ok(())
        } else {
            Err(format!("{MAPS:?} hold {now:?}, want {want:?}"))
        })
    })
}

/// One connection from `from` to `dst` that must succeed; whether it was redirected must be
/// `meshed`, and its kernel peer is then the agent (meshed) or `dst` itself (excluded).
fn expect(cluster: &Cluster, from: &Pod, dst: SocketAddr, meshed: bool) -> Result<()> {
    let conn = connect_ok(cluster, from, dst, 1000)?;
    let direct = conn.kernel_peer() == Some(dst);
    ensure_or_dump!(
        cluster,
        conn.redirected() == meshed && direct != meshed,
        "{} -> {dst}: redirected = {}, kernel peer {:?}; expected {}: {}",
        from.name(),
        conn.redirected(),
        conn.kernel_peer(),
        if meshed { "meshed" } else { "direct" },
        conn.report
    );
    Ok(())
}

#[test]
fn per_pod_exclusions_bypass_only_their_pod_follow_changes_and_leave_nothing() -> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 2,
    })?;
    let (client, other) = (cluster.pod(0, 0), cluster.pod(0, 1));
    let (server, outsider) = (cluster.pod(1, 0), cluster.pod(1, 1));
    cluster.set_policies(strict_mesh());
    cluster.set_enrolled(outsider, false);
    cluster.write_mesh()?;
    cluster.start_agents()?;
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let baseline = [map_sizes(n0)?, map_sizes(n1)?];
    ensure_or_dump!(
        cluster,
        baseline.iter().all(|m| m == &[0, 0, 0]),
        "no pod has exclusions yet, the maps hold {baseline:?}"
    );
    let _s = serve(server, &[7070, 8080, 9090])?;

    // The client leaves port 9090 and the server's IPv6 address alone; the server lets 7070
    // and 9090 reach its application directly.
    client.set_capture_exclusions(&[9090], &[&format!("{}/128", server.ip6())], &[]);
    server.set_capture_exclusions(&[], &[], &[9090, 7070]);
    let generations = [n0.config_generation()?, n1.config_generation()?];
    cluster.write_mesh()?;
    cluster.wait_config_generation(0, generations[0] + 1, T)?;
    cluster.wait_config_generation(1, generations[1] + 1, T)?;
    wait_maps(&cluster, n0, [1, 1, 0], "the client's exclusions applied")?;
    // Two ports, each on the server's two addresses.
    wait_maps(&cluster, n1, [0, 0, 4], "the server's exclusions applied")?;

    let excluded_before = ebpf_stat(n0, "excluded")?;
    // Excluded by port, and by network (on a port it does not exclude): connected directly,
    // and the STRICT server takes them on its excluded inbound ports.
    expect(&cluster, client, server.addr4(9090), false)?;
    expect(&cluster, client, server.addr6(7070), false)?;
    // Anything else of the client is meshed, the excluded inbound port included.
    expect(&cluster, client, server.addr4(8080), true)?;
    expect(&cluster, client, server.addr4(7070), true)?;
    // Another pod without exclusions is meshed to the same destination.
    expect(&cluster, other, server.addr4(9090), true)?;
    ensure_or_dump!(
        cluster,
        ebpf_stat(n0, "excluded")? - excluded_before == 2,
        "the eBPF exclusion counter should count the client's two excluded connects"
    );

    // Inbound: plaintext from outside the mesh reaches the STRICT server's excluded port only.
    let inbound_before = ebpf_stat(n1, "inboundExcluded")?;
    let conn = connect_ok(&cluster, outsider, server.addr4(9090), 1000)?;
    ensure_or_dump!(
        cluster,
        conn.served_by() == server.name()
            && conn.seen_peer_ip() == Some(std::net::IpAddr::V4(outsider.ip4())),
        "the excluded port should be served by the application to the outsider's own address: {}",
        conn.report
    );
    ensure_or_dump!(
        cluster,
        !reaches(outsider, server.addr4(8080))?,
        "plaintext reached the STRICT server on a port it does not exclude"
    );
    ensure_or_dump!(
        cluster,
        ebpf_stat(n1, "inboundExcluded")? > inbound_before,
        "the eBPF counter of excluded inbound connections did not count"
    );

    // Changed while enrolled: new connections follow at once.
    client.set_capture_exclusions(&[], &[], &[]);
    server.set_capture_exclusions(&[], &[], &[8080]);
    cluster.write_mesh()?;
    wait_maps(&cluster, n0, [0, 0, 0], "the client's exclusions removed")?;
    wait_maps(&cluster, n1, [0, 0, 2], "the server's exclusions changed")?;
    expect(&cluster, client, server.addr4(9090), true)?;
    expect(&cluster, client, server.addr6(7070), true)?;
    ensure_or_dump!(
        cluster,
        !reaches(outsider, server.addr4(9090))?,
        "plaintext still reached the server's formerly excluded port"
    );
    ensure_or_dump!(
        cluster,
        reaches(outsider, server.addr4(8080))?,
        "plaintext did not reach the server's newly excluded port"
    );

    // A bad value: the whole file is refused, naming the pod, the field and the value, and the
    // last good state stays.
    let generation = n1.config_generation()?;
    server.set_capture_exclusions(&[], &[], &[8080, 15008]);
    cluster.write_mesh()?;
    let deadline = Instant::now() + T;
    let error = loop {
        if let Some(err) = n1.config_dump()?["config"]["lastError"].as_str() {
            break err.to_string();
        }
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "the agent did not report the bad exclusion"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let uid = format!("default/{}", server.name());
    ensure_or_dump!(
        cluster,
        error.contains("excludeInboundPorts[1]") && error.contains("15008") && error.contains(&uid),
        "the error must name the field, the value and the pod: {error}"
    );
    ensure_or_dump!(
        cluster,
        n1.config_generation()? == generation,
        "a bad file must not produce a new generation"
    );
    ensure_or_dump!(
        cluster,
        reaches(outsider, server.addr4(8080))?,
        "the last good exclusions are no longer in force"
    );

    // Un-enrolment removes the pod's entries: the maps are back at their baseline.
    server.set_capture_exclusions(&[], &[], &[8080]);
    cluster.set_enrolled(server, false);
    client.set_capture_exclusions(&[22], &[], &[]);
    cluster.write_mesh()?;
    wait_maps(
        &cluster,
        n0,
        [1, 0, 0],
        "the client's new exclusion applied",
    )?;
    wait_maps(
        &cluster,
        n1,
        [0, 0, 0],
        "the un-enrolled server's entries removed",
    )?;
    cluster.set_enrolled(client, false);
    cluster.write_mesh()?;
    wait_maps(
        &cluster,
        n0,
        [0, 0, 0],
        "the un-enrolled client's entries removed",
    )?;
    Ok(())
}
