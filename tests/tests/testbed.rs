//! Tests of the cluster-in-a-box test bed itself (no agent needed).

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ambit_tests::{Cluster, ClusterSpec, MeshFile, Netns, Pod, ensure_or_dump, testbed, util};
use anyhow::{Context, Result, anyhow};

const T: Duration = Duration::from_secs(15);

fn testpod() -> PathBuf {
    ambit_tests::testpod_path!()
}

/// Asserts that nothing of bed `id` remains anywhere.
fn assert_bed_gone(id: &str) -> Result<()> {
    let res = testbed::bed_resources(id)?;
    anyhow::ensure!(res.is_empty(), "bed {id} left resources: {res:?}");
    // Explicit listings too, independent of the library's own lookup.
    let listing = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.contains(id))
                    .collect()
            })
            .unwrap_or_default()
    };
    let netns = listing(Path::new("/run/netns"));
    let cgroups = listing(&util::cgroup2_mount()?);
    let bpf = listing(Path::new("/sys/fs/bpf"));
    anyhow::ensure!(
        netns.is_empty() && cgroups.is_empty() && bpf.is_empty(),
        "leftovers of {id}: netns {netns:?} cgroups {cgroups:?} bpffs {bpf:?}"
    );
    let ns_list = util::ip("netns list")?;
    anyhow::ensure!(
        !ns_list.contains(id),
        "ip netns list still shows {id}:\n{ns_list}"
    );
    Ok(())
}

/// The root namespace must never hold an interface of the bed.
fn assert_root_ns_untouched(id: &str) -> Result<()> {
    let links = util::ip("-o link")?;
    anyhow::ensure!(
        !links.contains(&format!("a{id}")),
        "root namespace has a bed interface:\n{links}"
    );
    Ok(())
}

fn start_server(pod: &Pod, port: u16) -> Result<ambit_tests::PodProcess> {
    let mut s = pod.spawn(testpod(), ["serve", "--port", &port.to_string()])?;
    let ev = s.read_json_until(T, |v| v["event"] == "listening")?;
    anyhow::ensure!(ev["name"] == pod.name(), "unexpected listening event {ev}");
    Ok(s)
}

/// Runs `testpod client` in `from` against `to` and checks every reported connection.
fn check_client(cluster: &Cluster, from: &Pod, to: &Pod, dst: SocketAddr) -> Result<()> {
    let src_ip: IpAddr = if dst.is_ipv4() {
        from.ip4().into()
    } else {
        from.ip6().into()
    };
    let bytes = 200_000u64;
    let mut c = from.spawn(
        testpod(),
        [
            "client",
            "--connect",
            &dst.to_string(),
            "--bytes",
            &bytes.to_string(),
            "--count",
            "3",
            "--timeout-ms",
            "10000",
        ],
    )?;
    let (status, lines) = c.wait_json(Duration::from_secs(40))?;
    ensure_or_dump!(
        cluster,
        status.success() && lines.len() == 3,
        "client {} -> {dst} failed ({status}): {lines:#?}\nstderr: {}",
        from.name(),
        c.stderr()
    );
    for l in &lines {
        ensure_or_dump!(
            cluster,
            l["ok"] == true && l["sent"] == bytes && l["received"] == bytes,
            "bad connection report {l}"
        );
        ensure_or_dump!(
            cluster,
            l["peer"] == dst.to_string(),
            "client saw peer {} instead of {dst}",
            l["peer"]
        );
        // HELLO <name> <peer seen by accept> <local>
        let greeting = l["greeting"].as_str().unwrap_or_default();
        let f: Vec<&str> = greeting.split(' ').collect();
        ensure_or_dump!(
            cluster,
            f.len() == 4 && f[0] == "HELLO",
            "bad greeting {greeting:?}"
        );
        let seen: SocketAddr = f[2].parse().context("greeting peer")?;
        let local: SocketAddr = f[3].parse().context("greeting local")?;
        ensure_or_dump!(
            cluster,
            f[1] == to.name() && seen.ip() == src_ip && local == dst,
            "greeting {greeting:?}: expected server {} to see {src_ip} on {dst}",
            to.name()
        );
        ensure_or_dump!(
            cluster,
            l["local"] == seen.to_string(),
            "client local {} differs from server-seen peer {seen}",
            l["local"]
        );
    }
    Ok(())
}

#[test]
fn pods_reach_each_other_over_v4_and_v6() -> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 2,
    })?;
    assert_root_ns_untouched(cluster.id())?;
    let client = cluster.pod(0, 0);
    let remote = cluster.pod(1, 0);
    let local = cluster.pod(0, 1);
    let _s1 = start_server(remote, 8080)?;
    let _s2 = start_server(local, 8080)?;
    for to in [remote, local] {
        check_client(&cluster, client, to, to.addr4(8080))?;
        check_client(&cluster, client, to, to.addr6(8080))?;
    }
    // And the way back, node 1 to node 0.
    let _s3 = start_server(client, 9090)?;
    check_client(&cluster, cluster.pod(1, 1), client, client.addr4(9090))?;
    check_client(&cluster, cluster.pod(1, 1), client, client.addr6(9090))?;

    // Netns::enter_thread: a thread inside node 1's namespace reaches its pod; the pod sees
    // the node's gateway address.
    let node = cluster.node(1);
    let target = remote.addr4(8080);
    let greeting = Netns::enter_thread(node.netns_path(), || -> Result<String> {
        let s = TcpStream::connect_timeout(&target, T)?;
        s.set_read_timeout(Some(T))?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        Ok(line)
    })??;
    let seen = greeting.split(' ').nth(2).unwrap_or_default();
    ensure_or_dump!(
        cluster,
        seen.starts_with(&format!("{}:", node.gateway_ip())),
        "node-namespace connection greeted as {greeting:?}"
    );
    assert_root_ns_untouched(cluster.id())?;
    Ok(())
}

#[test]
fn pod_processes_live_in_their_cgroup_and_netns() -> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        pods_per_node: 1,
    })?;
    let pod = cluster.pod(0, 0);
    let mut p = pod.spawn(
        "sh",
        ["-c", "cat /proc/self/cgroup; readlink /proc/self/ns/net"],
    )?;
    let (status, lines) = p.wait_output(T)?;
    anyhow::ensure!(status.success(), "sh failed: {}", p.stderr());
    let rel = pod
        .cgroup()
        .strip_prefix(util::cgroup2_mount()?)?
        .display()
        .to_string();
    anyhow::ensure!(
        lines.iter().any(|l| l == &format!("0::/{rel}")),
        "not in cgroup {rel}: {lines:?}"
    );
    let want_ns = std::fs::metadata(pod.netns_path())?;
    let ns_line = lines.last().cloned().unwrap_or_default();
    use std::os::unix::fs::MetadataExt;
    anyhow::ensure!(
        ns_line == format!("net:[{}]", want_ns.ino()),
        "not in netns {}: {ns_line}",
        pod.netns_name()
    );
    // stdin/stdout round trip and kill on drop.
    let mut cat = pod.spawn("cat", Vec::<&str>::new())?;
    cat.write_line("ping")?;
    anyhow::ensure!(cat.read_line(T)? == "ping");
    let pid = cat.pid() as i32;
    drop(cat);
    anyhow::ensure!(!util::process_alive(pid, None), "cat survived its drop");
    Ok(())
}

#[test]
fn mesh_file_reflects_pods_and_services() -> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 1,
    })?;
    let p = cluster.pod(1, 0);
    p.set_labels(&[("app", "web")]);
    p.set_namespace("shop");
    p.set_service_account("web");
    cluster.set_enrolled(cluster.pod(0, 0), false);
    cluster.add_service(
        "web",
        "shop",
        &["10.96.0.10"],
        &[("app", "web")],
        &[(80, 8080)],
    );
    cluster.set_redirect_exclusions(&[22], &["192.0.2.0/24"]);
    cluster.write_mesh()?;
    let text = std::fs::read_to_string(cluster.mesh_path())?;
    let m: MeshFile = serde_yaml_ng::from_str(&text)?;
    anyhow::ensure!(m == cluster.mesh(), "file differs from model:\n{text}");
    let w = m
        .workloads
        .iter()
        .find(|w| w.name == "p1-0")
        .ok_or(anyhow!("no p1-0"))?;
    anyhow::ensure!(
        w.namespace == "shop"
            && w.service_account == "web"
            && w.node == "n1"
            && w.ips == ["10.10.1.2", "fd00:10:1::2"]
            && w.enrolled
            && w.netns.path.as_deref() == Some(p.netns_path().to_str().unwrap()),
        "bad workload {w:?}"
    );
    anyhow::ensure!(
        !m.workloads[0].enrolled && m.workloads[0].ips == ["10.10.0.2", "fd00:10::2"],
        "bad workload {:?}",
        m.workloads[0]
    );
    for key in [
        "serviceAccount:",
        "targetPort: 8080",
        "excludeOutboundCidrs:",
        "path: /run/netns/",
    ] {
        anyhow::ensure!(text.contains(key), "{key} missing from\n{text}");
    }
    cluster.write_raw_mesh("workloads: [")?;
    anyhow::ensure!(std::fs::read_to_string(cluster.mesh_path())? == "workloads: [");
    // No agent here: diagnostics still work and say so.
    let d = cluster.diagnostics();
    anyhow::ensure!(d.contains("agent not started") && d.contains("p1-0"), "{d}");
    anyhow::ensure!(
        cluster
            .check(false, "boom")
            .unwrap_err()
            .to_string()
            .contains("ip -n")
    );
    anyhow::ensure!(
        cluster
            .node(0)
            .wait_ready(Duration::from_millis(10))
            .is_err()
    );
    Ok(())
}

#[test]
fn drop_removes_everything() -> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 2,
    })?;
    let id = cluster.id().to_string();
    let run_dir = cluster.run_dir().to_path_buf();
    // A stray process still running at teardown, and an agent-like pin directory.
    let mut stray = cluster.pod(1, 1).spawn("sleep", ["1000"])?;
    std::fs::create_dir(cluster.node(0).bpffs())?;
    anyhow::ensure!(!testbed::bed_resources(&id)?.bpffs.is_empty());
    drop(cluster);
    assert_bed_gone(&id)?;
    anyhow::ensure!(!run_dir.exists(), "run dir {} kept", run_dir.display());
    anyhow::ensure!(
        stray.try_status()?.is_some(),
        "stray process survived the teardown"
    );
    assert_root_ns_untouched(&id)?;
    Ok(())
}

#[test]
fn panic_tears_down_and_keeps_logs() -> Result<()> {
    let mut seen: Option<(String, PathBuf)> = None;
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let cluster = Cluster::start(ClusterSpec {
            nodes: 1,
            pods_per_node: 1,
        })
        .expect("start");
        seen = Some((cluster.id().to_string(), cluster.run_dir().to_path_buf()));
        panic!("deliberate panic with a live cluster");
    }));
    anyhow::ensure!(r.is_err());
    let (id, run_dir) = seen.ok_or(anyhow!("cluster never started"))?;
    assert_bed_gone(&id)?;
    anyhow::ensure!(
        run_dir.join("mesh").join("mesh.yaml").exists(),
        "logs not kept after panic"
    );
    std::fs::remove_dir_all(&run_dir)?;
    Ok(())
}

#[test]
fn sweeper_removes_beds_of_dead_owners_only() -> Result<()> {
    let live = Cluster::start(ClusterSpec {
        nodes: 1,
        pods_per_node: 1,
    })?;
    let stale = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 1,
    })?;
    let id = stale.id().to_string();
    let run_dir = stale.run_dir().to_path_buf();
    std::fs::create_dir(stale.node(1).bpffs())?;
    // A process left running in the stale bed, as after a SIGKILLed test run.
    let mut orphan = stale.pod(0, 0).spawn("sleep", ["1000"])?;
    std::mem::forget(stale);
    // Mark the owner dead: a PID that has exited and been reaped.
    let mut dead = std::process::Command::new("true").spawn()?;
    dead.wait()?;
    testbed::write_owner(&id, dead.id() as i32, None)?;

    // A Cluster::start in a concurrently running test may sweep it first; either way it goes.
    let swept = testbed::sweep_stale()?;
    anyhow::ensure!(!swept.iter().any(|s| s == live.id()), "live bed swept");
    assert_bed_gone(&id)?;
    anyhow::ensure!(orphan.try_status()?.is_some(), "orphan survived the sweep");
    let live_res = testbed::bed_resources(live.id())?;
    anyhow::ensure!(
        live_res.netns.len() == 3 && live_res.cgroup.is_some() && live_res.owner_file.is_some(),
        "live bed damaged: {live_res:?}"
    );
    anyhow::ensure!(!run_dir.exists(), "run dir of the swept bed remains");
    Ok(())
}

#[test]
fn agent_harness_against_a_stand_in_agent() -> Result<()> {
    let mut cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 1,
    })?;
    cluster.set_ambit_bin(env!("CARGO_BIN_EXE_fake-ambit"));
    cluster.disable_ca();
    let id = cluster.id().to_string();
    cluster.pod(1, 0).set_enrolled(false);
    cluster.write_mesh()?;
    cluster.start_agents()?;
    let cg_mount = util::cgroup2_mount()?;
    for node in cluster.nodes() {
        let pid = node.agent_pid().ok_or(anyhow!("no agent pid"))?;
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
        let want = format!(
            "0::/{}",
            node.agent_cgroup().strip_prefix(&cg_mount)?.display()
        );
        ensure_or_dump!(cluster, cg.lines().any(|l| l == want), "agent cgroup {cg}");
        use std::os::unix::fs::MetadataExt;
        let ns = std::fs::read_link(format!("/proc/{pid}/ns/net"))?;
        let want_ns = format!("net:[{}]", std::fs::metadata(node.netns_path())?.ino());
        ensure_or_dump!(
            cluster,
            ns.to_string_lossy() == want_ns,
            "agent netns {ns:?}"
        );
        ensure_or_dump!(cluster, node.bpffs().is_dir(), "no bpffs dir");
        let d = node.config_dump()?;
        ensure_or_dump!(cluster, d["config"]["lastError"].is_null(), "dump {d}");
        let line = node.agent_command_line().join(" ");
        ensure_or_dump!(
            cluster,
            line.contains(&format!("--node {} ", node.name()))
                && line.contains("--log-format json"),
            "command line {line}"
        );
    }
    let d1 = cluster.node(1).config_dump()?;
    anyhow::ensure!(d1["enrolled"] == serde_json::json!([]), "{d1}");
    let g = cluster.node(1).config_generation()?;

    // A reload raises the generation.
    cluster.set_enrolled(cluster.pod(1, 0), true);
    cluster.write_mesh()?;
    // Both agents must have applied it before the bad file below replaces it, or a
    // reload coalescing the two writes leaves node 0 one generation behind.
    for node in 0..2 {
        cluster.wait_config_generation(node, g + 1, T)?;
    }
    let d1 = cluster.node(1).config_dump()?;
    anyhow::ensure!(
        d1["enrolled"] == serde_json::json!(["default/p1-0"]),
        "{d1}"
    );

    // A bad file is rejected and reported, the generation stays.
    cluster.write_raw_mesh("workloads: [{nme: typo}]\n")?;
    let deadline = std::time::Instant::now() + T;
    loop {
        let d = cluster.node(0).config_dump()?;
        if d["config"]["lastError"].is_string() {
            anyhow::ensure!(d["config"]["generation"] == g + 1, "{d}");
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "bad file not reported: {d}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::ensure!(cluster.node(0).admin_get("/nope").is_err());
    anyhow::ensure!(
        cluster
            .node(0)
            .agent_log_json()
            .iter()
            .any(|l| l["message"] == "config rejected")
    );

    // Stop keeps the pins; a restart becomes ready again; kill simulates a crash.
    let n0 = cluster.node(0);
    anyhow::ensure!(n0.stop_agent()?.is_some() && !n0.agent_running());
    anyhow::ensure!(n0.bpffs().is_dir(), "stop removed the pins");
    anyhow::ensure!(n0.wait_ready(Duration::from_millis(200)).is_err());
    cluster.write_mesh()?;
    n0.start_agent()?;
    n0.wait_ready(T)?;
    anyhow::ensure!(cluster.node(1).kill_agent().is_some());
    anyhow::ensure!(cluster.node(1).agent_exit_status().is_some());
    let d = cluster.diagnostics();
    anyhow::ensure!(
        d.contains("running (pid") && d.contains("agent exited") && d.contains("\"generation\""),
        "{d}"
    );
    drop(cluster);
    assert_bed_gone(&id)?;
    Ok(())
}
