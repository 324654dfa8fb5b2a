//! End-to-end tests of the CNI plugin: `ambit-cni` called exactly as a container runtime calls
//! it, against real agents, for pods whose sandbox the plugin announces before their first
//! process runs.

use std::path::Path;
use std::time::Duration;

use ambit_common::INBOUND_PLAINTEXT_PORT;
use ambit_tests::cni::Sandbox;
use ambit_tests::mesh::{self, Policies};
use ambit_tests::traffic::{TIMEOUT, connect_ok, metric_value, reaches, serve, wait_access_log};
use ambit_tests::{Cluster, ClusterSpec, Node, Pod, ensure_or_dump, util};
use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

const T: Duration = TIMEOUT;
/// CNI error codes: try again later (the specification's), not meshed (the plugin's).
const TRY_AGAIN_LATER: u64 = 11;
const NOT_MESHED: u64 = 100;

fn strict_mesh() -> Policies {
    Policies {
        peer_authentications: vec![json!({"name": "strict", "mode": "STRICT"})],
        ..Default::default()
    }
}

/// `namespace/name` of a pod.
fn uid(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace(), pod.name())
}

fn enrolled(node: &Node, pod: &Pod) -> Result<bool> {
    let dump = node.config_dump()?;
    Ok(dump["enrolled"]
        .as_array()
        .is_some_and(|pods| pods.iter().any(|p| p["uid"] == uid(pod))))
}

/// A bed whose pod (0,0) is left to the CNI plugin, a meshed server on the other node and an
/// unmeshed outsider, everything STRICT.
fn bed() -> Result<Cluster> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 2,
    })?;
    cluster.set_policies(strict_mesh());
    cluster.pod(0, 0).set_cni_sandbox(true);
    cluster.set_enrolled(cluster.pod(1, 1), false);
    cluster.write_mesh()?;
    cluster.start_agents()?;
    Ok(cluster)
}

#[test]
fn add_meshes_the_sandbox_before_its_first_process_and_del_forgets_it() -> Result<()> {
    let cluster = bed()?;
    let (pod, server, outsider) = (cluster.pod(0, 0), cluster.pod(1, 0), cluster.pod(1, 1));
    let node = cluster.node(0);
    let _s = serve(server, &[8080])?;
    ensure_or_dump!(
        cluster,
        !enrolled(node, pod)?,
        "a pod without a sandbox is enrolled"
    );

    let sandbox = Sandbox::of(pod, "sandbox-1");
    let add = sandbox.call(node, "ADD")?;
    ensure_or_dump!(
        cluster,
        add.success
            && add.stdout["cniVersion"] == "1.0.0"
            && add.stdout["ips"] == sandbox.config(node)["prevResult"]["ips"],
        "ADD did not pass the previous result on: {add:?}"
    );
    // The pod's very first process is already captured and meshed.
    let conn = connect_ok(&cluster, pod, server.addr4(8080), 1000)?;
    ensure_or_dump!(
        cluster,
        conn.redirected() && conn.served_by() == server.name(),
        "the first connection after ADD was not meshed: {}",
        conn.report
    );
    let check = sandbox.call(node, "CHECK")?;
    ensure_or_dump!(
        cluster,
        check.success && check.stdout == Value::Null,
        "CHECK failed: {check:?}"
    );
    // Its inbound is the mesh's too once its addresses are known (kubelet reports them, the
    // API server publishes them): STRICT refuses plaintext, HBONE gets through.
    let generation = cluster.node(1).config_generation()?;
    pod.publish_addresses();
    cluster.write_mesh()?;
    cluster.node(1).wait_config_generation(generation + 1, T)?;
    let _app = serve(pod, &[8080])?;
    ensure_or_dump!(
        cluster,
        !reaches(outsider, pod.addr4(8080))?,
        "plaintext reached the STRICT pod"
    );
    connect_ok(&cluster, server, pod.addr4(8080), 1000)?;

    // With the agent stopped nothing can confirm the pod is meshed: CHECK fails with the
    // specification's error object, as ADD does.
    node.stop_agent()?;
    let check = sandbox.call(node, "CHECK")?;
    ensure_or_dump!(
        cluster,
        check.failed_with(
            TRY_AGAIN_LATER,
            "not reachable",
            &node.cni_socket().display().to_string()
        ),
        "CHECK without the agent did not fail with the specification's error object: {check:?}"
    );
    // A restarted agent still knows the sandbox.
    node.start_agent()?;
    node.wait_ready(T)?;
    ensure_or_dump!(
        cluster,
        enrolled(node, pod)?,
        "the restarted agent lost the sandbox"
    );
    let check = sandbox.call(node, "CHECK")?;
    ensure_or_dump!(
        cluster,
        check.success && check.stdout == Value::Null,
        "CHECK failed after the restart: {check:?}"
    );
    let conn = connect_ok(&cluster, pod, server.addr4(8080), 1000)?;
    ensure_or_dump!(cluster, conn.redirected(), "not captured after the restart");

    let del = sandbox.call(node, "DEL")?;
    ensure_or_dump!(
        cluster,
        del.success && del.stdout == Value::Null,
        "DEL failed: {del:?}"
    );
    ensure_or_dump!(
        cluster,
        !enrolled(node, pod)?,
        "the pod is still enrolled after DEL"
    );
    // The agent no longer meshes the deleted sandbox: CHECK says so.
    let check = sandbox.call(node, "CHECK")?;
    ensure_or_dump!(
        cluster,
        check.failed_with(NOT_MESHED, &uid(pod), "no sandbox"),
        "CHECK after DEL did not fail naming the pod: {check:?}"
    );
    // DEL is idempotent (the runtime may repeat it): the second succeeds too.
    let del = sandbox.call(node, "DEL")?;
    ensure_or_dump!(
        cluster,
        del.success && del.stdout == Value::Null,
        "a second DEL failed: {del:?}"
    );
    ensure_or_dump!(
        cluster,
        !enrolled(node, pod)?,
        "the pod is enrolled again after a second DEL"
    );
    Ok(())
}

#[test]
fn without_its_agent_a_node_starts_no_sandbox_and_deletes_every_one() -> Result<()> {
    let cluster = bed()?;
    let (pod, server) = (cluster.pod(0, 0), cluster.pod(1, 0));
    let node = cluster.node(0);
    let _s = serve(server, &[8080])?;
    node.stop_agent()?;

    let sandbox = Sandbox::of(pod, "sandbox-2");
    let add = sandbox.call(node, "ADD")?;
    ensure_or_dump!(
        cluster,
        add.failed_with(TRY_AGAIN_LATER, "not reachable", ""),
        "ADD without the agent did not fail with the specification's error object: {add:?}"
    );
    let del = sandbox.call(node, "DEL")?;
    ensure_or_dump!(
        cluster,
        del.success,
        "DEL without the agent failed: {del:?}"
    );

    // Restarting: the runtime's retry succeeds once the agent is back.
    node.start_agent()?;
    node.wait_ready(T)?;
    let add = sandbox.call(node, "ADD")?;
    ensure_or_dump!(
        cluster,
        add.success,
        "ADD after the restart failed: {add:?}"
    );
    let conn = connect_ok(&cluster, pod, server.addr4(8080), 1000)?;
    ensure_or_dump!(cluster, conn.redirected(), "not captured: {}", conn.report);
    Ok(())
}

#[test]
fn a_pod_the_agent_does_not_know_yet_is_waited_for() -> Result<()> {
    let cluster = bed()?;
    let (pod, server) = (cluster.pod(0, 0), cluster.pod(1, 0));
    let node = cluster.node(0);
    let _s = serve(server, &[8080])?;
    // The runtime creates the sandbox of a pod in namespace `late` before the agent hears of
    // it (as a watch can trail the kubelet); the mesh file names it a moment later.
    pod.set_namespace("late");
    let add = std::thread::scope(|scope| -> Result<_> {
        let sandbox = Sandbox::of(pod, "sandbox-3");
        let add = scope.spawn(move || sandbox.call(node, "ADD"));
        std::thread::sleep(Duration::from_secs(2));
        cluster.write_mesh()?;
        add.join().expect("ADD thread")
    })?;
    ensure_or_dump!(
        cluster,
        add.success,
        "ADD of a pod announced late failed: {add:?}"
    );
    ensure_or_dump!(cluster, enrolled(node, pod)?, "{} not enrolled", uid(pod));
    Ok(())
}

#[test]
fn a_sandbox_whose_first_process_holds_a_proxy_port_is_closed_not_open() -> Result<()> {
    let cluster = bed()?;
    let (pod, server, outsider) = (cluster.pod(0, 0), cluster.pod(1, 0), cluster.pod(1, 1));
    let node = cluster.node(0);
    let _s = serve(server, &[8080])?;
    let _app = serve(pod, &[8080])?;
    let _squatter = serve(pod, &[INBOUND_PLAINTEXT_PORT])?;

    let sandbox = Sandbox::of(pod, "sandbox-4");
    let add = sandbox.call(node, "ADD")?;
    ensure_or_dump!(
        cluster,
        add.failed_with(NOT_MESHED, &uid(pod), &INBOUND_PLAINTEXT_PORT.to_string()),
        "ADD of a pod whose port 15006 is taken did not fail naming the pod and the port: {add:?}"
    );
    let dump = node.config_dump()?;
    ensure_or_dump!(
        cluster,
        dump["closed"]
            .as_array()
            .is_some_and(|c| c.contains(&json!(uid(pod)))),
        "the pod is not closed: {}",
        dump["closed"]
    );
    for (from, dst) in [
        (outsider, pod.addr4(8080)),
        (server, pod.addr4(8080)),
        (pod, server.addr4(8080)),
    ] {
        ensure_or_dump!(
            cluster,
            !reaches(from, dst)?,
            "{} reached {dst} although the pod is closed",
            from.name()
        );
    }
    // CHECK of the closed sandbox fails as its ADD did, naming the pod and why.
    let check = sandbox.call(node, "CHECK")?;
    ensure_or_dump!(
        cluster,
        check.failed_with(NOT_MESHED, &uid(pod), &INBOUND_PLAINTEXT_PORT.to_string()),
        "CHECK of the closed sandbox did not fail naming the pod and the port: {check:?}"
    );
    // The runtime deletes the failed sandbox, maybe twice: both succeed.
    for round in ["first", "second"] {
        let del = sandbox.call(node, "DEL")?;
        ensure_or_dump!(
            cluster,
            del.success && del.stdout == Value::Null,
            "the {round} DEL of the closed sandbox failed: {del:?}"
        );
    }
    Ok(())
}

/// A minimal root filesystem for a container: the testpod binary and the shared libraries it
/// loads, at the paths `ldd` names.
fn testpod_rootfs(dir: &Path) -> Result<()> {
    let testpod = ambit_tests::testpod_path!();
    std::fs::create_dir_all(dir.join("bin"))?;
    std::fs::copy(&testpod, dir.join("bin/testpod"))?;
    let ldd = util::run("ldd", [testpod.display().to_string()])?;
    for lib in ldd.split_whitespace().filter(|w| w.starts_with('/')) {
        let to = dir.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().context("library directory")?)?;
        std::fs::copy(lib, &to).with_context(|| format!("copying {lib}"))?;
    }
    Ok(())
}

/// A real container runtime: Debian's podman, with its CNI network backend, runs a container
/// on the node through a network configuration whose `bridge` plugin is followed by
/// `ambit-cni`, chained there by the real installer (`ambit cni install`). The runtime calls
/// the plugin before the container's process starts, so that process's very first connection
/// is already captured and carried in mutual TLS. Everything podman makes (bridge, veth,
/// addresses) lives in the bed's node namespace; its state in the bed's run directory.
#[test]
fn podman_runs_a_container_whose_very_first_connection_is_meshed() -> Result<()> {
    ensure!(
        Path::new("/usr/bin/podman").exists()
            && Path::new("/usr/lib/cni/bridge").exists()
            && Path::new("/usr/sbin/runc").exists(),
        "podman, containernetworking-plugins and runc are needed (`cargo xtask setup`)"
    );
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        pods_per_node: 1,
    })?;
    cluster.set_policies(strict_mesh());
    let name = format!("ctr-{}", cluster.id());
    cluster.add_workload(mesh::Workload {
        name: name.clone(),
        namespace: "default".into(),
        service_account: "default".into(),
        node: "n0".into(),
        ips: Vec::new(),
        labels: Default::default(),
        enrolled: true,
        ready: true,
        netns: mesh::NetnsRef {
            cni: true,
            ..Default::default()
        },
        exclude_outbound_ports: Vec::new(),
        exclude_outbound_cidrs: Vec::new(),
        exclude_inbound_ports: Vec::new(),
    });
    cluster.write_mesh()?;
    cluster.start_agents()?;
    let (node, server) = (cluster.node(0), cluster.pod(0, 0));
    let _s = serve(server, &[8080])?;

    let dir = cluster.run_dir().join("podman");
    let (conf_dir, bin_dir, rootfs) = (dir.join("net.d"), dir.join("bin"), dir.join("rootfs"));
    std::fs::create_dir_all(&conf_dir)?;
    testpod_rootfs(&rootfs)?;
    let network = format!("ambit-{}", cluster.id());
    std::fs::write(
        conf_dir.join("10-bed.conflist"),
        serde_json::to_vec_pretty(&json!({
            "cniVersion": "1.0.0",
            "name": network,
            "plugins": [{
                "type": "bridge",
                "bridge": format!("ab{}pm", cluster.id()),
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "10.77.0.0/24"}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": dir.join("ipam"),
                },
            }],
        }))?,
    )?;
    let ambit = cluster.ambit_bin().display().to_string();
    util::run(
        &ambit,
        [
            "cni",
            "install",
            "--bin-dir",
            &bin_dir.display().to_string(),
            "--conf-dir",
            &conf_dir.display().to_string(),
            "--plugin",
            &ambit_tests::testbed::ambit_cni_bin().display().to_string(),
            "--agent-socket",
            &node.cni_socket().display().to_string(),
        ],
    )?;
    let chained: Value = serde_json::from_slice(&std::fs::read(conf_dir.join("10-bed.conflist"))?)?;
    ensure_or_dump!(
        cluster,
        chained["plugins"][1]["type"] == "ambit-cni",
        "the installer did not chain ambit-cni after bridge: {chained}"
    );
    std::fs::write(
        dir.join("containers.conf"),
        format!(
            "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"/usr/lib/cni\", \"{}\"]\nnetwork_config_dir = \"{}\"\n[engine]\ntmp_dir = \"{}\"\n",
            bin_dir.display(),
            conf_dir.display(),
            dir.join("tmp").display()
        ),
    )?;
    // The container's cgroups go below the node's, where the programs are attached.
    let cgroup_parent = Path::new("/").join(
        node.cgroup()
            .strip_prefix(util::cgroup2_mount()?)?
            .join("podman"),
    );
    let dst = server.addr4(8080).to_string();
    let mut podman = std::process::Command::new("nsenter");
    podman
        .env("CONTAINERS_CONF", dir.join("containers.conf"))
        .arg(format!("--net={}", node.netns_path().display()))
        .args(["podman", "--root"])
        .arg(dir.join("storage"))
        .arg("--runroot")
        .arg(dir.join("run"))
        .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
        .args(["run", "--rm", "--runtime", "runc", "--network", &network])
        .args(["--name", &name])
        .arg(format!("--cgroup-parent={}", cgroup_parent.display()))
        .args([
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=4096:4096",
        ])
        .arg("--rootfs")
        .arg(&rootfs)
        .args([
            "/bin/testpod",
            "client",
            "--connect",
            &dst,
            "--bytes",
            "1000",
        ]);
    let out = ambit_tests::testbed::output_with_timeout(&mut podman, Duration::from_secs(180))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = stdout
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    ensure_or_dump!(
        cluster,
        out.status.success() && report["ok"] == true && ambit_tests::traffic::redirected(&report),
        "the container's first connection was not captured: status {}, stdout {stdout}, stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = wait_access_log(&cluster, node, "outbound", server.addr4(8080), 1)?.remove(0);
    ensure_or_dump!(
        cluster,
        line["src_workload"] == format!("default/{name}") && line["security"] == "mtls",
        "the container's connection was not meshed with its identity: {line}"
    );
    for outcome in ["ADD", "DEL"] {
        let series = format!("ambit_cni_requests_total{{command=\"{outcome}\",outcome=\"ok\"}}");
        ensure_or_dump!(
            cluster,
            metric_value(node, &series)? >= 1.0,
            "podman's {outcome} was not answered ok ({series})"
        );
    }

    util::run(
        &ambit,
        [
            "cni",
            "uninstall",
            "--bin-dir",
            &bin_dir.display().to_string(),
            "--conf-dir",
            &conf_dir.display().to_string(),
        ],
    )?;
    let unchained: Value =
        serde_json::from_slice(&std::fs::read(conf_dir.join("10-bed.conflist"))?)?;
    ensure_or_dump!(
        cluster,
        unchained["plugins"].as_array().map(Vec::len) == Some(1)
            && !bin_dir.join("ambit-cni").exists(),
        "uninstall left ambit-cni behind: {unchained}"
    );
    Ok(())
}
