//! The waypoint (`ambit waypoint`) on the test bed: starting it in a pod and reading its
//! metrics, shared by the waypoint end-to-end tests.

use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};

use crate::{Cluster, Node, Pod, PodProcess};

/// The waypoint's `/metrics`, fetched from its node's namespace.
pub fn waypoint_metrics(node: &Node, waypoint: &Pod) -> Result<String> {
    let r = node.http_get_addr(waypoint.addr4(15020), "/metrics", Duration::from_secs(5))?;
    ensure!(r.status == 200, "waypoint /metrics: HTTP {}", r.status);
    Ok(r.body)
}

/// The sum of `istio_requests_total` series carrying every one of `labels`.
pub fn requests_total(metrics: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Starts `ambit waypoint` in `pod` (its workload in the bed's mesh file) and waits until it serves its metrics (it has its
/// certificate and listens on 15008 by then).
pub fn start_waypoint(cluster: &Cluster, pod: &Pod) -> Result<PodProcess> {
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

/// Waits until the waypoint's `ambit_config_reloads_total{result}` reaches `count`.
pub fn wait_reloads(node: &Node, waypoint: &Pod, result: &str, count: u64) -> Result<()> {
    let line = format!("ambit_config_reloads_total{{result=\"{result}\"}} {count}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if waypoint_metrics(node, waypoint)?.lines().any(|l| l == line) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the waypoint did not count {line}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
