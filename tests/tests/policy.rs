//! End-to-end tests of zero-trust L4: who may talk to an enrolled pod, over which transport.
//!
//! Clients are real processes in pods going through real agents; the identity tests also drive
//! HBONE by hand (the agent's own client code, from inside a pod's namespace) to present
//! certificates no honest agent would: another identity, another root, another trust domain.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ambit::hbone::{
    Http2Config, TunnelRequest,
    client::{connect_tls, handshake},
    tls,
};
use ambit::identity::{SpiffeId, WorkloadCertificate};
use ambit::testing::ca::TestCa;
use ambit_tests::mesh::Policies;
use ambit_tests::traffic::{
    LONG_TRANSFER_BYTES, accepted, apply_policies as apply, cut_by, ensure_cut, long_transfer,
    metric, reaches, serve, wait_access_log,
};
use ambit_tests::{
    Cluster, ClusterSpec, METRICS_PORT, Netns, Node, Pod, PodProcess, ensure_or_dump,
};
use anyhow::{Context, Result};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

const T: Duration = Duration::from_secs(20);

fn expect(cluster: &Cluster, from: &Pod, dst: SocketAddr, allowed: bool, why: &str) -> Result<()> {
    let reached = reaches(from, dst)?;
    ensure_or_dump!(
        cluster,
        reached == allowed,
        "{why}: {} -> {dst} {}",
        from.name(),
        if allowed {
            "was refused but should be allowed"
        } else {
            "got through but should be refused"
        }
    );
    Ok(())
}

fn authz(policies: Vec<Value>) -> Policies {
    Policies {
        authorization_policies: policies,
        ..Default::default()
    }
}

/// The mesh-wide STRICT peer authentication (PERMISSIVE is the default), plus `more`.
fn strict_mesh(more: Vec<Value>) -> Policies {
    let mut peer_authentications = vec![json!({"name": "default", "mode": "STRICT"})];
    peer_authentications.extend(more);
    Policies {
        peer_authentications,
        ..Default::default()
    }
}

fn denied_count(node: &Node, reason: &str) -> Result<f64> {
    let series = format!("ambit_connections_denied_total{{reason=\"{reason}\"}}");
    Ok(metric(node, &series)?.unwrap_or(0.0))
}

#[test]
fn strict_refuses_plaintext_on_every_port_and_permissive_accepts_it() -> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        pods_per_node: 3,
    })?;
    let outsider = cluster.pod(0, 0);
    let server = cluster.pod(0, 1);
    let meshed = cluster.pod(0, 2);
    cluster.set_enrolled(outsider, false);
    cluster.set_labels(server, &[("app", "server")]);
    cluster.set_policies(strict_mesh(Vec::new()));
    cluster.write_mesh()?;
    cluster.start_agents()?;
    let _s = serve(server, &[8080, 9090])?;

    for port in [8080, 9090, 15006, 15008, 15001] {
        expect(
            &cluster,
            outsider,
            server.addr4(port),
            false,
            "a mesh-wide STRICT admits no plaintext",
        )?;
    }
    expect(
        &cluster,
        outsider,
        server.addr6(8080),
        false,
        "STRICT over IPv6",
    )?;
    ensure_or_dump!(
        cluster,
        denied_count(cluster.node(0), "plaintext_strict")? >= 3.0,
        "plaintext refusals are not counted"
    );
    expect(
        &cluster,
        meshed,
        server.addr4(8080),
        true,
        "an enrolled client reaches a STRICT pod through HBONE",
    )?;

    apply(
        &cluster,
        strict_mesh(vec![json!({
            "name": "server-permissive",
            "namespace": "default",
            "selector": {"matchLabels": {"app": "server"}},
            "mode": "PERMISSIVE",
        })]),
    )?;
    expect(
        &cluster,
        outsider,
        server.addr4(8080),
        true,
        "PERMISSIVE accepts plaintext",
    )?;
    expect(
        &cluster,
        outsider,
        server.addr4(9090),
        true,
        "PERMISSIVE on every port",
    )?;
    // The proxy's own ports are never forwarded to, whatever the mode: that would loop.
    expect(
        &cluster,
        outsider,
        server.addr4(15006),
        false,
        "the plaintext port itself",
    )?;
    Ok(())
}

/// Drives one HBONE tunnel by hand from inside `from`'s namespace to `to`'s 15008, presenting
/// `cert` and accepting only `server_id`; returns the application's greeting, or what failed.
fn hbone_by_hand(
    from: &Pod,
    to: SocketAddr,
    cert: &WorkloadCertificate,
    server_id: &SpiffeId,
) -> Result<std::result::Result<String, String>> {
    let endpoint = SocketAddr::new(to.ip(), 15008);
    let tcp = Netns::enter_thread(from.netns_path(), || {
        std::net::TcpStream::connect_timeout(&endpoint, Duration::from_secs(5))
    })??;
    tcp.set_nonblocking(true)?;
    let config = tls::client_config(cert, std::slice::from_ref(server_id))?;
    let source = SocketAddr::new(from.ip4().into(), 40000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(runtime.block_on(async move {
        let attempt = async {
            let tcp = tokio::net::TcpStream::from_std(tcp).map_err(|e| e.to_string())?;
            let tls = connect_tls(tcp, config, endpoint)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            let (client, connection) = handshake(tls, &Http2Config::default(), 10, endpoint)
                .await
                .map_err(|e| format!("HTTP/2: {e}"))?;
            tokio::spawn(connection);
            let mut stream = client
                .connect(&TunnelRequest::new(source, to))
                .await
                .map_err(|e| format!("CONNECT: {e}"))?;
            let mut greeting = Vec::new();
            let mut byte = [0u8; 1];
            while stream.read(&mut byte).await.map_err(|e| e.to_string())? == 1 {
                if byte[0] == b'\n' {
                    break;
                }
                greeting.push(byte[0]);
            }
            String::from_utf8(greeting).map_err(|e| e.to_string())
        };
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(result) => result,
            Err(_) => Err("timed out".into()),
        }
    }))
}

#[test]
fn forged_identities_and_foreign_trust_domains_are_refused() -> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 1,
    })?;
    let attacker_pod = cluster.pod(0, 0);
    let server = cluster.pod(1, 0);
    cluster.set_enrolled(attacker_pod, false);
    cluster.set_labels(server, &[("app", "server")]);
    cluster.set_policies(authz(vec![json!({
        "name": "frontend-only",
        "namespace": "default",
        "selector": {"matchLabels": {"app": "server"}},
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/frontend"]}}]}],
    })]));
    cluster.write_mesh()?;
    cluster.start_agents()?;
    let _s = serve(server, &[8080])?;
    let app = server.addr4(8080);
    let server_id = SpiffeId::new("cluster.local", "default", "default");

    // The mesh's own root, as if its key leaked to the test: it can mint any identity.
    let ca_dir = cluster.ca_dir();
    let mesh_root = TestCa::from_pem(
        &std::fs::read_to_string(ca_dir.join("root-key.pem"))?,
        &std::fs::read_to_string(ca_dir.join("root-cert.pem"))?,
    )
    .context("loading the bed's CA root")?;
    let frontend = SpiffeId::new("cluster.local", "default", "frontend");

    // Control: the allowed identity under the mesh's root gets through, so the refusals below
    // are the server's doing, not the hand-made client's.
    let allowed = hbone_by_hand(attacker_pod, app, &mesh_root.issue(&frontend), &server_id)?;
    ensure_or_dump!(
        cluster,
        allowed
            .as_ref()
            .is_ok_and(|g| g.starts_with(&format!("HELLO {}", server.name()))),
        "a tunnel with the allowed identity failed: {allowed:?}"
    );

    let cases: Vec<(&str, WorkloadCertificate, SpiffeId)> = vec![
        (
            "an identity the policy does not allow",
            mesh_root.issue(&SpiffeId::new("cluster.local", "default", "intruder")),
            server_id.clone(),
        ),
        (
            "a certificate from a root the mesh does not trust",
            TestCa::new("evil").issue_trusting(&frontend, vec![mesh_root.root()]),
            server_id.clone(),
        ),
        (
            "a foreign trust domain, even under the mesh's root",
            mesh_root.issue(&SpiffeId::new("evil.example", "default", "frontend")),
            server_id.clone(),
        ),
        (
            "a server that is not the identity the client expects",
            mesh_root.issue(&frontend),
            SpiffeId::new("cluster.local", "default", "payments"),
        ),
    ];
    for (what, cert, expected_server) in cases {
        let outcome = hbone_by_hand(attacker_pod, app, &cert, &expected_server)?;
        ensure_or_dump!(
            cluster,
            outcome.is_err(),
            "{what}: the tunnel reached the application ({outcome:?})"
        );
    }
    let node = cluster.node(1);
    ensure_or_dump!(
        cluster,
        denied_count(node, "no_allow_match")? >= 1.0
            && denied_count(node, "peer_identity")? + denied_count(node, "tls_handshake")? >= 2.0,
        "the server's agent did not count the refusals by reason"
    );
    Ok(())
}

#[test]
fn allow_and_deny_policies_hold_for_principals_namespaces_ports_and_cidrs() -> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 2,
    })?;
    let frontend = cluster.pod(0, 0);
    let other = cluster.pod(0, 1);
    let server = cluster.pod(1, 0);
    frontend.set_service_account("frontend");
    other.set_namespace("other");
    cluster.set_labels(server, &[("app", "server")]);
    cluster.write_mesh()?;
    cluster.start_agents()?;
    let _s = serve(server, &[8080, 9090])?;
    let (p8080, p9090) = (server.addr4(8080), server.addr4(9090));
    let on_server = |rule: Value, action: &str| {
        json!({
            "name": format!("server-{}", action.to_lowercase()),
            "namespace": "default",
            "selector": {"matchLabels": {"app": "server"}},
            "action": action,
            "rules": [rule],
        })
    };

    // No policy: everyone in the mesh may connect.
    expect(&cluster, frontend, p8080, true, "no policy")?;
    expect(&cluster, other, p8080, true, "no policy")?;

    apply(
        &cluster,
        authz(vec![on_server(
            json!({"from": [{"source": {"principals": ["cluster.local/ns/default/sa/frontend"]}}]}),
            "ALLOW",
        )]),
    )?;
    expect(
        &cluster,
        frontend,
        p8080,
        true,
        "ALLOW principals: the principal",
    )?;
    expect(
        &cluster,
        other,
        p8080,
        false,
        "ALLOW principals: anyone else",
    )?;

    apply(
        &cluster,
        authz(vec![on_server(
            json!({"from": [{"source": {"notNamespaces": ["default"]}}]}),
            "ALLOW",
        )]),
    )?;
    expect(
        &cluster,
        other,
        p8080,
        true,
        "ALLOW notNamespaces: another namespace",
    )?;
    expect(
        &cluster,
        frontend,
        p8080,
        false,
        "ALLOW notNamespaces: the excluded one",
    )?;

    apply(
        &cluster,
        authz(vec![on_server(
            json!({"to": [{"operation": {"ports": ["9090"]}}]}),
            "ALLOW",
        )]),
    )?;
    expect(&cluster, frontend, p9090, true, "ALLOW ports: the port")?;
    expect(
        &cluster,
        frontend,
        p8080,
        false,
        "ALLOW ports: another port",
    )?;

    apply(
        &cluster,
        authz(vec![on_server(
            json!({"from": [{"source": {"ipBlocks": [format!("{}/32", other.ip4())]}}]}),
            "ALLOW",
        )]),
    )?;
    expect(
        &cluster,
        other,
        p8080,
        true,
        "ALLOW ipBlocks: inside the block",
    )?;
    expect(
        &cluster,
        frontend,
        p8080,
        false,
        "ALLOW ipBlocks: outside the block",
    )?;

    // DENY beats ALLOW: an allow-everything policy and a deny of the frontend.
    apply(
        &cluster,
        authz(vec![
            on_server(json!({}), "ALLOW"),
            on_server(
                json!({"from": [{"source": {"namespaces": ["default"]}}],
                       "to": [{"operation": {"notPorts": ["9090"]}}]}),
                "DENY",
            ),
        ]),
    )?;
    expect(&cluster, frontend, p8080, false, "DENY beats ALLOW")?;
    expect(
        &cluster,
        frontend,
        p9090,
        true,
        "DENY notPorts: the excepted port",
    )?;
    expect(&cluster, other, p8080, true, "ALLOW where no DENY matches")?;

    // Dry run: logged, never enforced.
    let mut dry = on_server(
        json!({"from": [{"source": {"principals": ["cluster.local/ns/default/sa/frontend"]}}]}),
        "DENY",
    );
    dry["name"] = json!("server-dry-deny");
    dry["dryRun"] = json!(true);
    apply(&cluster, authz(vec![dry]))?;
    expect(
        &cluster,
        frontend,
        p8080,
        true,
        "a dry-run DENY is not enforced",
    )?;
    let deadline = Instant::now() + T;
    loop {
        let logged = cluster.node(1).agent_log_json().into_iter().any(|l| {
            l["message"] == "dry-run policy"
                && l["would_allow"] == false
                && l["matched"]
                    .as_str()
                    .is_some_and(|m| m.contains("server-dry-deny"))
        });
        if logged {
            break;
        }
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "the dry-run DENY that matched was not logged"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Checks the cut connection's report, the survivor's whole transfer, and the access-log line
/// and metric of the cut on the destination's node.
fn check_cut(
    cluster: &Cluster,
    (after, report): (Duration, Value),
    mut survivor: PodProcess,
    node: &Node,
    (direction, dst): (&str, SocketAddr),
    why: &str,
    reason: &str,
) -> Result<()> {
    ensure_cut(cluster, &report, after)?;
    ensure_or_dump!(
        cluster,
        survivor.try_status()?.is_none(),
        "the allowed transfer was over before the change: it proves nothing"
    );
    let (_, reports) = survivor.wait_json(Duration::from_secs(120))?;
    let kept = reports.first().cloned().unwrap_or_default();
    ensure_or_dump!(
        cluster,
        kept["ok"] == true
            && kept["sent"] == LONG_TRANSFER_BYTES
            && kept["received"] == LONG_TRANSFER_BYTES,
        "the allowed transfer did not complete byte-exact: {kept}"
    );
    let logged = wait_access_log(cluster, node, direction, dst, 1)?;
    let closed: Vec<&Value> = logged
        .iter()
        .filter(|l| {
            l["outcome"] == "error"
                && l["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("closed after a policy change") && e.contains(why))
        })
        .collect();
    ensure_or_dump!(
        cluster,
        closed.len() == 1,
        "expected one {direction} access-log line saying the connection was closed after a policy change ({why}): {logged:?}"
    );
    let series = format!("ambit_connections_closed_by_policy_total{{reason=\"{reason}\"}}");
    let counted = metric(node, &series)?;
    ensure_or_dump!(
        cluster,
        counted == Some(1.0),
        "{series} is {counted:?}, expected 1"
    );
    // Admitted, then closed: Istio's closed series keeps `-` as ztunnel's does (DENY is for
    // connections refused when they opened, and none was here).
    let scrape = node.http_get(METRICS_PORT, "/metrics", T)?.body;
    let closed: Vec<&str> = scrape
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_closed_total{"))
        .collect();
    ensure_or_dump!(
        cluster,
        !closed.is_empty() && closed.iter().all(|l| l.contains("response_flags=\"-\"")),
        "closed connections flagged other than `-`: {closed:?}"
    );
    Ok(())
}

#[test]
fn a_deny_cuts_an_open_tunnel_and_spares_the_allowed_one() -> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 2,
    })?;
    let frontend = cluster.pod(0, 0);
    let intruder = cluster.pod(0, 1);
    let server = cluster.pod(1, 0);
    frontend.set_service_account("frontend");
    intruder.set_service_account("intruder");
    cluster.set_labels(server, &[("app", "server")]);
    cluster.write_mesh()?;
    cluster.start_agents()?;
    let mut app = serve(server, &[8080])?;
    let dst = server.addr4(8080);

    let mut victim = long_transfer(intruder, dst)?;
    let survivor = long_transfer(frontend, dst)?;
    accepted(&mut app, 2)?;
    let cut = cut_by(
        &cluster,
        authz(vec![json!({
            "name": "deny-intruder",
            "namespace": "default",
            "selector": {"matchLabels": {"app": "server"}},
            "action": "DENY",
            "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/intruder"]}}]}],
        })]),
        &mut victim,
    )?;
    check_cut(
        &cluster,
        cut,
        survivor,
        cluster.node(1),
        ("inbound", dst),
        "denied by DENY policy default/deny-intruder",
        "deny_policy",
    )?;
    // And the intruder cannot come back.
    expect(
        &cluster,
        intruder,
        dst,
        false,
        "a new connection after the deny",
    )
}

#[test]
fn strict_cuts_open_plaintext_and_spares_tunnels() -> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 2,
    })?;
    let outsider = cluster.pod(0, 0);
    let frontend = cluster.pod(0, 1);
    let server = cluster.pod(1, 0);
    cluster.set_enrolled(outsider, false);
    cluster.set_labels(server, &[("app", "server")]);
    let server_mode = |mode: &str| Policies {
        peer_authentications: vec![json!({
            "name": "server",
            "namespace": "default",
            "selector": {"matchLabels": {"app": "server"}},
            "mode": mode,
        })],
        ..Default::default()
    };
    cluster.set_policies(server_mode("PERMISSIVE"));
    cluster.write_mesh()?;
    cluster.start_agents()?;
    let mut app = serve(server, &[8080])?;
    let dst = server.addr4(8080);

    let mut victim = long_transfer(outsider, dst)?;
    let survivor = long_transfer(frontend, dst)?;
    accepted(&mut app, 2)?;
    let cut = cut_by(&cluster, server_mode("STRICT"), &mut victim)?;
    check_cut(
        &cluster,
        cut,
        survivor,
        cluster.node(1),
        ("inbound_plaintext", dst),
        "STRICT peer authentication",
        "plaintext_strict",
    )
}
