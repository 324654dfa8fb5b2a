//! `cargo xtask demo`: a two-node cluster in a box with real agents, a few pods talking, and a
//! table of what happened to each connection. Everything is torn down at the end.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ambit_tests::mesh::Routing;
use ambit_tests::waypoint::{self, Answers};
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
        pods_per_node: 4,
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
    let l7 = L7::configure(&cluster)?;
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
        let outbound_via_agent = ambit_tests::traffic::redirected(r);
        let greeting = r["greeting"].as_str().unwrap_or_default();
        let fields: Vec<&str> = greeting.split(' ').collect();
        let served = fields.get(1).copied().unwrap_or("-");
        // The application sees the client's address either way; through the agent's inbound
        // hop it comes from another socket (port) than the client's own.
        let inbound_via_agent = match (fields.get(2), r["local"].as_str()) {
            (Some(peer), Some(local)) => {
                let addr = |s: &str| s.parse::<SocketAddr>().ok();
                addr(peer).is_some() && addr(peer) != addr(local)
            }
            _ => false,
        };
        println!(
            "{:<5} {:<22} {:<36} {:<6} {:<10} {:<9} {:>7} {:>7}{}",
            row.from,
            row.dialled.to_string(),
            row.what,
            served,
            if outbound_via_agent {
                "agent"
            } else {
                "direct"
            },
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
    let mut failed = rows
        .iter()
        .filter(|r| (r.report["ok"] == true) != r.expected)
        .count();
    failed += cluster.with_diagnostics(l7.show(&cluster, client))?;
    println!("\nTearing down run {} ...", cluster.id());
    drop(cluster);
    anyhow::ensure!(
        failed == 0,
        "{failed} demo connections did not do what the mesh promises"
    );
    println!("done.");
    Ok(())
}

/// The L7 half: the service `reviews` (v1 in p1-2, v2 in p1-3) bound to a waypoint in p0-2, with
/// the seed's canary VirtualService and DestinationRule.
struct L7 {
    waypoint: usize,
    v1: usize,
    v2: usize,
}

/// `reviews`' VIP and port.
const REVIEWS: &str = "10.96.0.30:9080";

impl L7 {
    /// Puts the pods, services and routes in the mesh file (written by the caller).
    fn configure(cluster: &Cluster) -> Result<Self> {
        let (waypoint, v1, v2) = (cluster.pod(0, 2), cluster.pod(1, 2), cluster.pod(1, 3));
        let namespace = waypoint.namespace();
        cluster.set_labels(waypoint, &[("app", "waypoint")]);
        waypoint.set_service_account("waypoint");
        // Not captured, as Istio's waypoints: its tunnels to the endpoints leave as they are.
        cluster.set_enrolled(waypoint, false);
        cluster.set_labels(v1, &[("app", "reviews"), ("version", "v1")]);
        cluster.set_labels(v2, &[("app", "reviews"), ("version", "v2")]);
        v1.set_service_account("reviews");
        v2.set_service_account("reviews");
        cluster.add_service(
            "reviews",
            &namespace,
            &["10.96.0.30"],
            &[("app", "reviews")],
            &[(9080, 8080)],
        );
        cluster.add_service(
            "waypoint",
            &namespace,
            &["10.96.0.31"],
            &[("app", "waypoint")],
            &[(15008, 15008)],
        );
        anyhow::ensure!(
            cluster.set_service_waypoint("reviews", &namespace, "waypoint"),
            "no service reviews"
        );
        cluster.set_routing(Routing {
            virtual_services: vec![waypoint::seed_canary()],
            destination_rules: vec![waypoint::seed_subsets()],
        });
        Ok(Self {
            waypoint: 2,
            v1: 2,
            v2: 3,
        })
    }

    /// Starts the servers and the waypoint, sends the canary's traffic from `client` and prints
    /// what answered; returns how many checks failed.
    fn show(&self, cluster: &Cluster, client: &Pod) -> Result<usize> {
        let (waypoint, v1, v2) = (
            cluster.pod(0, self.waypoint),
            cluster.pod(1, self.v1),
            cluster.pod(1, self.v2),
        );
        println!(
            "\nThe L7 half: service reviews = {REVIEWS} -> {} (version v1) and {} (version v2), bound \
             to the waypoint `ambit waypoint` in {} (node n0, not enrolled); the seed's canary: \
             header end-user: jason to v2, everyone else 90/10 between v1 and v2",
            v1.name(),
            v2.name(),
            waypoint.name()
        );
        let mut servers = Vec::new();
        for (pod, name) in [(v1, "v1"), (v2, "v2")] {
            let mut server = pod.spawn(testpod()?, ["http", "--port", "8080", "--name", name])?;
            server.read_json_until(T, |v| v["event"] == "listening")?;
            servers.push(server);
        }
        waypoint::route_ca_to_pods_of(cluster, cluster.node(0))?;
        let _waypoint = waypoint::start_waypoint(cluster, waypoint)?;
        let jason = waypoint::curl(client, REVIEWS, "/reviews", 20, &["end-user: jason"])?;
        let others = waypoint::curl(client, REVIEWS, "/reviews", 200, &[])?;
        let line = |what: &str, a: &Answers| {
            let ok = a.codes.iter().filter(|c| *c == "200").count();
            println!(
                "  {what:<36} {:>3} requests: v1 {:>3}, v2 {:>3} ({ok} answered 200)",
                a.codes.len(),
                a.count("v1 HTTP/1.1"),
                a.count("v2 HTTP/1.1")
            );
        };
        println!(
            "  curl from {} over one keep-alive connection:",
            client.name()
        );
        line("with end-user: jason", &jason);
        line("without (90/10)", &others);
        let metrics = waypoint::waypoint_metrics(cluster.node(0), waypoint)?;
        println!("  the waypoint's istio_requests_total (reporter waypoint), by destination:");
        for (pod, version) in [(v1, "v1"), (v2, "v2")] {
            let n = waypoint::sum_series(
                &metrics,
                "istio_requests_total",
                &[
                    ("reporter", "waypoint"),
                    ("source_workload", client.name()),
                    ("destination_workload", pod.name()),
                    ("destination_version", version),
                    ("response_code", "200"),
                ],
            );
            println!("    {} -> {} ({version}): {n}", client.name(), pod.name());
        }
        let mut failed = 0;
        if jason.count("v2 HTTP/1.1") != 20 {
            println!("  FAILED: end-user: jason must always reach v2");
            failed += 1;
        }
        let (to_v1, to_v2) = (others.count("v1 HTTP/1.1"), others.count("v2 HTTP/1.1"));
        // v2's share of 200 requests at 10% has mean 20 and sigma 4.2: 60 is 9 sigma away.
        if to_v1 + to_v2 != 200 || to_v2 > 60 {
            println!("  FAILED: the split must send about 10% to v2, and answer every request");
            failed += 1;
        }
        Ok(failed)
    }
}
