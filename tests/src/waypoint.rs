//! Helpers of the waypoint end-to-end tests (tests/tests/waypoint*.rs): running `ambit
//! waypoint` in a pod of the bed, reading its metrics, and driving HTTP/2 load through it.

use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};

use crate::{Cluster, Node, Pod, PodProcess, util};

/// Makes `pod` a waypoint of the bed: labels `app: waypoint`, service account `waypoint`, not
/// enrolled (as Istio's waypoints are not captured: its tunnels to the endpoints must leave as
/// they are), and its own service `waypoint` on `vip`:15008. Services are bound to it with
/// [`Cluster::set_service_waypoint`]; publish with [`Cluster::write_mesh`].
pub fn make_waypoint(cluster: &Cluster, pod: &Pod, vip: &str) {
    cluster.set_labels(pod, &[("app", "waypoint")]);
    pod.set_service_account("waypoint");
    cluster.set_enrolled(pod, false);
    cluster.add_service(
        "waypoint",
        &pod.namespace(),
        &[vip],
        &[("app", "waypoint")],
        &[(15008, 15008)],
    );
}

/// Routes the fabric to node `node`'s pods, as a cluster routes pods to its CA's Service:
/// the CA (and a Prometheus) listen on the fabric, and a waypoint, not enrolled, talks to them
/// from its own address. Removed with the fabric namespace.
pub fn route_fabric_to_pods(cluster: &Cluster, node: usize) -> Result<()> {
    util::ip(&format!(
        "-n {} route add 10.10.{node}.0/24 via {}",
        cluster.fabric_netns(),
        cluster.node(node).fabric_ip()
    ))?;
    Ok(())
}

/// The waypoint's `/metrics`, fetched from its node's namespace.
pub fn waypoint_metrics(node: &Node, waypoint: &Pod) -> Result<String> {
    let r = node.http_get_addr(waypoint.addr4(15020), "/metrics", Duration::from_secs(5))?;
    ensure!(r.status == 200, "waypoint /metrics: HTTP {}", r.status);
    Ok(r.body)
}

/// Starts `ambit waypoint` in `pod` with `extra` flags and waits until it serves its metrics
/// (it has its certificate and listens on 15008 by then).
pub fn start_waypoint(cluster: &Cluster, pod: &Pod, extra: &[&str]) -> Result<PodProcess> {
    let node = cluster.node_of(pod);
    let mut args = vec![
        "waypoint".to_string(),
        "--mesh-file".into(),
        cluster.mesh_path().display().to_string(),
        "--name".into(),
        pod.name().to_string(),
        "--namespace".into(),
        pod.namespace(),
        "--log-format".into(),
        "json".into(),
    ];
    args.extend(node.ca_flags());
    args.extend(extra.iter().map(|a| a.to_string()));
    let mut process = pod.spawn(cluster.ambit_bin(), &args)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = process.try_status()? {
            bail!("ambit waypoint exited: {status}; log: {}", process.stderr());
        }
        if waypoint_metrics(node, pod).is_ok() {
            return Ok(process);
        }
        if Instant::now() > deadline {
            bail!(
                "ambit waypoint not serving after 60 s; log: {}",
                process.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs h2load in `from`: `count` HTTP/2 requests (prior knowledge) to `url` with `headers`
/// on one connection, 10 streams at a time, each bounded to 10 s and the run to 2 minutes;
/// returns its summary lines.
pub fn h2load(from: &Pod, url: &str, count: usize, headers: &[&str]) -> Result<Vec<String>> {
    let mut args: Vec<String> = ["-n", &count.to_string(), "-c", "1", "-m", "10", "-T", "10"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    for h in headers {
        args.extend(["-H".to_string(), h.to_string()]);
    }
    args.push(url.to_string());
    let mut process = from.spawn("h2load", &args)?;
    let (status, lines) = process.wait_output(Duration::from_secs(120))?;
    if !status.success() {
        bail!("h2load {status}: {lines:?}; stderr: {}", process.stderr());
    }
    Ok(lines)
}
