//! End-to-end tests of the operators' commands (`ambit config`, `ambit stat`, `ambit check`) against a running agent: they
//! run on the node, as a person would, and read the agent's admin endpoint.

use std::time::Duration;

use ambit_tests::mesh::Policies;
use ambit_tests::traffic::reaches;
use ambit_tests::{
    ADMIN_PORT, Cluster, ClusterSpec, METRICS_PORT, Node, READINESS_PORT, ensure_or_dump,
};
use anyhow::{Result, bail};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

/// Runs `ambit config <args>` on `node` against its agent; its stdout.
fn ambit_config(cluster: &Cluster, node: &Node, args: &[&str]) -> Result<String> {
    let admin = format!("127.0.0.1:{ADMIN_PORT}");
    let mut all = vec!["config", "--admin", admin.as_str()];
    all.extend(args);
    let mut process = node.spawn(cluster.ambit_bin(), &all)?;
    let (status, lines) = process.wait_output(T)?;
    if !status.success() {
        bail!(
            "ambit {} {status}; stderr: {}",
            all.join(" "),
            process.stderr()
        );
    }
    Ok(lines.join("\n"))
}

#[test]
fn operator_commands_show_what_the_agent_holds_carried_and_needs() -> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        pods_per_node: 2,
    })?;
    let (client, web) = (cluster.pod(0, 0), cluster.pod(0, 1));
    let namespace = web.namespace();
    cluster.set_labels(web, &[("app", "web")]);
    web.set_service_account("web");
    cluster.add_service(
        "web",
        &namespace,
        &["10.96.0.10"],
        &[("app", "web")],
        &[(80, 8080)],
    );
    cluster.set_policies(Policies {
        peer_authentications: vec![json!({"name": "default", "mode": "STRICT"})],
        authorization_policies: vec![json!({
            "name": "web-from-client",
            "namespace": namespace,
            "selector": {"matchLabels": {"app": "web"}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": [
                format!("cluster.local/ns/{namespace}/sa/{}", client.service_account())
            ]}}]}],
        })],
        ..Default::default()
    });
    cluster.write_mesh()?;
    cluster.start_agents()?;
    let node = cluster.node(0);

    let workloads = cluster.with_diagnostics(ambit_config(&cluster, node, &["workloads"]))?;
    let web_row = workloads.lines().find(|l| l.contains(web.name()));
    ensure_or_dump!(
        cluster,
        workloads.starts_with("NAMESPACE")
            && web_row.is_some_and(|row| row.contains(&web.ip4().to_string())
                && row.contains(&format!("spiffe://cluster.local/ns/{namespace}/sa/web"))
                && row.contains("yes")),
        "the workloads table must list {} with its address and identity:\n{workloads}",
        web.name()
    );

    let services = ambit_config(&cluster, node, &["services"])?;
    let row = services.lines().find(|l| l.contains("10.96.0.10"));
    let endpoint = format!("{namespace}/{}", web.name());
    ensure_or_dump!(
        cluster,
        row.is_some_and(|row| row.contains("80->8080") && row.contains(&endpoint)),
        "the services table must show web's port and its endpoint {endpoint}:\n{services}"
    );

    let policies = ambit_config(&cluster, node, &["policies", "-o", "json"])?;
    let policies: Value = serde_json::from_str(&policies)?;
    ensure_or_dump!(
        cluster,
        policies["peerAuthentications"][0]["name"] == "default"
            && policies["authorizationPolicies"][0]["name"] == "web-from-client",
        "policies as JSON: {policies:#}"
    );
    let table = ambit_config(&cluster, node, &["policies", "-n", &namespace])?;
    ensure_or_dump!(
        cluster,
        table.contains("web-from-client")
            && table.contains(&format!("{namespace}: app=web"))
            && !table.contains("STRICT"),
        "a namespace filter keeps the namespace's policies only (the mesh-wide one has none):\n\
         {table}"
    );

    // Each enrolled pod's identity holds a certificate once the agent is ready.
    let certificates = ambit_config(&cluster, node, &["certificates", "-o", "yaml"])?;
    let certificates: Vec<Value> = serde_yaml_ng::from_str(&certificates)?;
    let web_id = format!("spiffe://cluster.local/ns/{namespace}/sa/web");
    ensure_or_dump!(
        cluster,
        certificates
            .iter()
            .any(|c| c["id"] == web_id.as_str() && c["notAfter"].is_string()),
        "certificates: {certificates:?}"
    );

    // `ambit stat`: connections made during its interval show as rates, in mutual TLS.
    let server = web.spawn(ambit_tests::testpod_path!(), ["serve", "--port", "8080"])?;
    let mut server = server;
    server.read_json_until(T, |v| v["event"] == "listening")?;
    let metrics = format!("127.0.0.1:{METRICS_PORT}");
    let mut stat = node.spawn(
        cluster.ambit_bin(),
        [
            "stat",
            "--metrics",
            metrics.as_str(),
            "--interval",
            "4s",
            "-o",
            "json",
        ],
    )?;
    // The first scrape happens at once; the connections fall inside the interval.
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..5 {
        ensure_or_dump!(
            cluster,
            reaches(client, web.addr4(8080))?,
            "{} must reach {}",
            client.name(),
            web.name()
        );
    }
    let (status, lines) = stat.wait_output(T)?;
    ensure_or_dump!(
        cluster,
        status.success(),
        "ambit stat {status}: {}",
        stat.stderr()
    );
    let stats: Vec<Value> = serde_json::from_str(&lines.join("\n"))?;
    let row = |workload: &str| {
        stats
            .iter()
            .find(|s| s["namespace"] == namespace.as_str() && s["workload"] == workload)
    };
    ensure_or_dump!(
        cluster,
        row(web.name()).is_some_and(|w| w["inboundConnectionsPerSecond"]
            .as_f64()
            .is_some_and(|r| r > 0.0)
            && w["inboundMtlsShare"] == 1.0)
            && row(client.name()).is_some_and(|c| c["outboundConnectionsPerSecond"]
                .as_f64()
                .is_some_and(|r| r > 0.0)),
        "ambit stat must show the connections made during its interval, all in mTLS: {stats:#?}"
    );

    // `ambit check` on the node: the agent is ready, its configuration and certificates fine.
    let readiness = format!("127.0.0.1:{READINESS_PORT}");
    let mut check = node.spawn(
        cluster.ambit_bin(),
        [
            "check",
            "--admin",
            &format!("127.0.0.1:{ADMIN_PORT}"),
            "--readiness",
            &readiness,
        ],
    )?;
    let (status, lines) = check.wait_output(T)?;
    ensure_or_dump!(
        cluster,
        status.success()
            && ["agent ready", "configuration", "enrolment", "certificates"]
                .iter()
                .all(|c| lines
                    .iter()
                    .any(|l| l.starts_with(&format!("[ok]   {c}: ")))),
        "ambit check on a healthy node: {status}\n{}\n{}",
        lines.join("\n"),
        check.stderr()
    );
    // `ambit check --pre`: this node can run an agent, and a wrong cgroup fails, naming it. The
    // splice check leaves no scratch pins behind.
    let cgroup = node.cgroup().display().to_string();
    let bpffs = node.bpffs().display().to_string();
    let mut pre = node.spawn(
        cluster.ambit_bin(),
        ["check", "--pre", "--cgroup", &cgroup, "--bpffs", &bpffs],
    )?;
    let (status, lines) = pre.wait_output(T)?;
    ensure_or_dump!(
        cluster,
        status.success()
            && [
                "capabilities",
                "kernel version",
                "kernel BTF",
                "cgroup v2",
                "bpf filesystem",
                // The agent's splice self-test, run by the check (this kernel splices).
                "same-node splice: the kernel splices"
            ]
            .iter()
            .all(|c| lines.iter().any(|l| l.starts_with(&format!("[ok]   {c}")))),
        "ambit check --pre on the bed's node: {status}\n{}",
        lines.join("\n")
    );
    let scratch: Vec<_> = std::fs::read_dir(node.bpffs().parent().unwrap_or(node.bpffs()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("ambit-check-"))
        .map(|e| e.path())
        .collect();
    ensure_or_dump!(
        cluster,
        scratch.is_empty(),
        "ambit check --pre left scratch pins behind: {scratch:?}"
    );
    let mut wrong_cgroup = node.spawn(
        cluster.ambit_bin(),
        ["check", "--pre", "--cgroup", "/tmp", "--bpffs", &bpffs],
    )?;
    let (status, lines) = wrong_cgroup.wait_output(T)?;
    ensure_or_dump!(
        cluster,
        !status.success()
            && lines
                .iter()
                .any(|l| l.starts_with("[FAIL] cgroup v2: --cgroup /tmp is not a cgroup v2")),
        "ambit check --pre with a wrong cgroup must fail naming it: {status}\n{}",
        lines.join("\n")
    );

    // A wrong address is an error that says what was tried, not an empty table.
    let mut wrong = node.spawn(
        cluster.ambit_bin(),
        ["config", "workloads", "--admin", "127.0.0.1:1"],
    )?;
    let (status, _) = wrong.wait_output(T)?;
    let stderr = wrong.stderr();
    ensure_or_dump!(
        cluster,
        !status.success() && stderr.contains("127.0.0.1:1"),
        "ambit config against nothing must fail naming the address: {status}, {stderr}"
    );
    Ok(())
}

/// `ambit config workloads --node N` from outside the node, as a person with a kubeconfig runs
/// it: the binary finds the agent pod on node N through the API server (the in-process fake)
/// and reads the real agent's admin endpoint through the pod port-forward, which the fake
/// connects to the agent's loopback admin port inside the node's network namespace (where a
/// kubelet would, the agent being host-network). The table is the one `--admin` prints on the
/// node; without --node the error lists the nodes that run an agent.
#[test]
fn config_node_reads_the_real_agent_through_the_api_servers_port_forward() -> Result<()> {
    use ambit::cli::cluster::{AGENT_SELECTOR, NAMESPACE};
    use ambit::testing::fake_apiserver::{Dial, FakeApiServer};
    use k8s_openapi::api::core::v1::Pod;

    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        pods_per_node: 1,
    })?;
    cluster.write_mesh()?;
    cluster.start_agents()?;
    let node = cluster.node(0);
    let on_node = ambit_config(&cluster, node, &["workloads"])?;

    let runtime = tokio::runtime::Runtime::new()?;
    let server = runtime.block_on(FakeApiServer::start())?;
    let (key, value) = AGENT_SELECTOR.split_once('=').unwrap();
    let pod = format!("ambit-agent-{}", node.name());
    let agent: Pod = serde_json::from_value(json!({
        "metadata": {"name": pod, "namespace": NAMESPACE, "labels": {key: value}},
        "spec": {"nodeName": node.name(), "containers": []},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    }))?;
    server.apply(&agent);
    let netns = node.netns_path().to_path_buf();
    let dial: Dial = std::sync::Arc::new(move || {
        let netns = netns.clone();
        Box::pin(async move {
            let stream = tokio::task::spawn_blocking(move || {
                ambit_tests::util::Netns::enter_thread(&netns, || {
                    std::net::TcpStream::connect(("127.0.0.1", ADMIN_PORT))
                })
                .map_err(std::io::Error::other)?
            })
            .await
            .map_err(std::io::Error::other)??;
            stream.set_nonblocking(true)?;
            tokio::net::TcpStream::from_std(stream)
        })
    });
    server.forward_port_with(NAMESPACE, &pod, ADMIN_PORT, dial);
    // In the bed's run directory, removed with it.
    let kubeconfig = cluster.run_dir().join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig())?;
    let kubeconfig = kubeconfig.to_str().unwrap();

    let output = std::process::Command::new(cluster.ambit_bin())
        .args(["config", "workloads", "--node", node.name()])
        .args(["--kubeconfig", kubeconfig])
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure_or_dump!(
        cluster,
        output.status.success() && stdout.trim_end() == on_node.trim_end(),
        "through the port-forward, the same table as on the node: {}\n{stdout}\nstderr: {}\n\
         on the node:\n{on_node}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );

    let output = std::process::Command::new(cluster.ambit_bin())
        .args(["config", "workloads", "--kubeconfig", kubeconfig])
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure_or_dump!(
        cluster,
        !output.status.success()
            && stderr.contains(&format!(
                "pass --node; nodes running an agent: {}",
                node.name()
            )),
        "without --node: {}, {stderr}",
        output.status
    );
    Ok(())
}
