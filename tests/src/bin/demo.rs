//! `cargo xtask demo`: a two-node cluster in a box with real agents, a few pods talking, and a
//! table of what happened to each connection. Everything is torn down at the end.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ambit_tests::{Cluster, ClusterSpec, Node, Pod, PodProcess};
use anyhow::{Context, Result};
use serde_json::Value;

const T: Duration = Duration::from_secs(20);

fn testpod() -> Result<PathBuf> {
    ambit_tests::testpod_bin()
}

fn serve(pod: &Pod) -> Result<PodProcess> {
    let mut server = pod.spawn(testpod()?, ["serve", "--port", "8080"])?;
    server.read_json_until(T, |v| v["event"] == "listening")?;
    Ok(server)
}

struct Row {
    from: String,
    dialled: SocketAddr,
    what: &'static str,
    /// Whether the mesh should let it through.
    expected: bool,
    report: Value,
}

fn connect(from: &Pod, dialled: SocketAddr, what: &'static str, expected: bool) -> Result<Row> {
    let mut client = from.spawn(
        testpod()?,
        [
            "client",
            "--connect",
            &dialled.to_string(),
            "--bytes",
            "65536",
            "--timeout-ms",
            "5000",
        ],
    )?;
    let (_, lines) = client.wait_json(T)?;
    Ok(Row {
        from: from.name().to_string(),
        dialled,
        what,
        expected,
        report: lines.into_iter().next().unwrap_or_default(),
    })
}

fn access_lines(node: &Node) -> Vec<Value> {
    node.agent_log_json()
        .into_iter()
        .filter(|l| l["target"] == "access")
        .collect()
}

fn main() -> Result<()> {
    println!("Ambit demo: a two-node cluster in a box (network namespaces, cgroups, real eBPF).");
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 2,
    })
    .context("building the cluster in a box (needs root, cgroup v2, bpffs)")?;
    let client = cluster.pod(0, 0);
    let web_a = cluster.pod(0, 1);
    let legacy = cluster.pod(1, 0);
    let web_b = cluster.pod(1, 1);
    cluster.set_labels(web_a, &[("app", "web")]);
    client.set_service_account("frontend");
    web_a.set_service_account("web");
    web_b.set_service_account("web");
    cluster.set_enrolled(legacy, false);
    cluster.set_labels(web_b, &[("app", "web"), ("plaintext", "ok")]);
    cluster.add_service(
        "web",
        "default",
        &["10.96.0.10"],
        &[("app", "web")],
        &[(80, 8080)],
    );
    cluster.write_mesh()?;
    cluster.start_agents()?;
    println!(
        "run {}: nodes n0, n1; pods {} and {} enrolled on n0, {} enrolled and {} NOT enrolled on n1;",
        cluster.id(),
        client.name(),
        web_a.name(),
        web_b.name(),
        legacy.name()
    );
    println!("service default/web = 10.96.0.10:80 -> app=web:8080");
    println!(
        "a CA issues SPIFFE certificates; pod-to-pod traffic rides HBONE mTLS tunnels; without a \
         PeerAuthentication enrolled pods also accept plaintext (PERMISSIVE, Istio's default)\n"
    );
    let _a = serve(web_a)?;
    let _b = serve(web_b)?;

    let vip: SocketAddr = "10.96.0.10:80".parse()?;
    let mut rows = vec![
        connect(client, web_a.addr4(8080), "same node", true)?,
        connect(client, web_b.addr4(8080), "across nodes", true)?,
        connect(client, web_b.addr6(8080), "across nodes, IPv6", true)?,
        connect(client, vip, "service VIP", true)?,
        connect(client, vip, "service VIP", true)?,
        connect(
            legacy,
            web_a.addr4(8080),
            "plaintext, no PeerAuthentication",
            true,
        )?,
    ];

    // The STRICT step: one mesh-wide policy, and web-b kept PERMISSIVE by a selector policy.
    println!(
        "then applying peerAuthentications: mesh-wide STRICT, PERMISSIVE for {} (label \
         plaintext=ok); the last two connections below run under them\n",
        web_b.name()
    );
    let generations: Vec<u64> = cluster
        .nodes()
        .iter()
        .map(Node::config_generation)
        .collect::<Result<_>>()?;
    cluster.set_policies(ambit_tests::mesh::Policies {
        peer_authentications: vec![
            serde_json::json!({"name": "default", "mode": "STRICT"}),
            serde_json::json!({
                "name": "web-b-permissive",
                "namespace": "default",
                "selector": {"matchLabels": {"plaintext": "ok"}},
                "mode": "PERMISSIVE",
            }),
        ],
        ..Default::default()
    });
    cluster.write_mesh()?;
    for (i, generation) in generations.into_iter().enumerate() {
        cluster.wait_config_generation(i, generation + 1, T)?;
    }
    rows.push(connect(
        legacy,
        web_a.addr4(8080),
        "plaintext to a STRICT pod",
        false,
    )?);
    rows.push(connect(
        legacy,
        web_b.addr4(8080),
        "plaintext to a PERMISSIVE pod",
        true,
    )?);
    // Let the agents write their access-log lines (emitted when connections end).
    std::thread::sleep(Duration::from_millis(500));

    println!(
        "{:<5} {:<22} {:<36} {:<6} {:<10} {:<9} {:>7} {:>7}",
        "from", "dialled", "what", "served", "outbound", "inbound", "sent", "recv"
    );
    for row in &rows {
        let r = &row.report;
        let local_on_loopback = r["local"]
            .as_str()
            .and_then(|l| l.parse::<SocketAddr>().ok())
            .is_some_and(|a| a.ip().is_loopback());
        let greeting = r["greeting"].as_str().unwrap_or_default();
        let fields: Vec<&str> = greeting.split(' ').collect();
        let served = fields.get(1).copied().unwrap_or("-");
        // The application sees its own address when the agent's inbound hop delivered it.
        let inbound_via_agent = match (fields.get(2), fields.get(3)) {
            (Some(peer), Some(local)) => {
                let ip = |s: &str| s.parse::<SocketAddr>().map(|a| a.ip()).ok();
                ip(peer).is_some() && ip(peer) == ip(local)
            }
            _ => false,
        };
        println!(
            "{:<5} {:<22} {:<36} {:<6} {:<10} {:<9} {:>7} {:>7}{}",
            row.from,
            row.dialled.to_string(),
            row.what,
            served,
            if local_on_loopback { "agent" } else { "direct" },
            if inbound_via_agent { "agent" } else { "direct" },
            r["sent"],
            r["received"],
            match (r["ok"] == true, row.expected) {
                (true, true) => String::new(),
                (false, false) => "  refused, as it should be".to_string(),
                (true, false) => "  UNEXPECTEDLY ALLOWED".to_string(),
                (false, true) => format!("  FAILED: {}", r["error"]),
            },
        );
    }

    println!("\nWhat the agents logged (one access-log line per proxied connection):");
    for node in cluster.nodes() {
        for line in access_lines(node) {
            println!(
                "  {} {:<17} {:<9} {} -> {} via {} ({}B out, {}B back) {}{}",
                node.name(),
                line["direction"].as_str().unwrap_or_default(),
                line["security"].as_str().unwrap_or_default(),
                line["src_principal"]
                    .as_str()
                    .or(line["src_workload"].as_str())
                    .unwrap_or("?"),
                line["dst"].as_str().unwrap_or_default(),
                line["upstream"].as_str().unwrap_or("-"),
                line["bytes_sent"],
                line["bytes_received"],
                line["outcome"].as_str().unwrap_or_default(),
                line["error"]
                    .as_str()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default(),
            );
        }
        let dump = node.config_dump()?;
        println!(
            "  {} eBPF: {} IPv4 + {} IPv6 connects redirected, {} inbound steered; live map entries: {}",
            node.name(),
            dump["ebpfStats"]["redirectedV4"],
            dump["ebpfStats"]["redirectedV6"],
            dump["ebpfStats"]["inboundSteered"],
            dump["maps"]
        );
    }
    let failed = rows
        .iter()
        .filter(|r| (r.report["ok"] == true) != r.expected)
        .count();
    println!("\nTearing down run {} ...", cluster.id());
    drop(cluster);
    anyhow::ensure!(
        failed == 0,
        "{failed} demo connections did not do what the mesh promises"
    );
    println!("done.");
    Ok(())
}
