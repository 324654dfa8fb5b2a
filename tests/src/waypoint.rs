//! Running `ambit waypoint` on the test bed, and reading what it and an HTTP client saw: used by
//! the waypoint end-to-end tests, the demo and the benchmark alike.
//!
//! A waypoint is a process in a pod of the bed that is **not** enrolled (as Istio's waypoints are
//! not captured: its own tunnels to the endpoints' 15008 must leave as they are), whose workload
//! the mesh file names and whose service other services point at with `waypoint:`.

use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use serde_json::{Value, json};

use crate::{Cluster, Node, Pod, PodProcess, util};

/// How long `ambit waypoint` may take to get its certificate and listen.
const START: Duration = Duration::from_secs(60);

/// The seed's canary VirtualService for the service `reviews`, with only `apiVersion` changed
/// (and no namespace: the bed's pods live in `default`): `end-user: jason` to subset v2, everyone
/// else 90/10 between v1 and v2.
pub fn seed_canary() -> Value {
    json!({
        "apiVersion": "networking.ambit.dev/v1",
        "kind": "VirtualService",
        "metadata": {"name": "reviews-canary"},
        "spec": {
            "hosts": ["reviews"],
            "http": [
                {
                    "match": [{"headers": {"end-user": {"exact": "jason"}}}],
                    "route": [{"destination": {"host": "reviews", "subset": "v2"}}]
                },
                {"route": [
                    {"destination": {"host": "reviews", "subset": "v1"}, "weight": 90},
                    {"destination": {"host": "reviews", "subset": "v2"}, "weight": 10}
                ]}
            ]
        }
    })
}

/// The seed's DestinationRule for `reviews`: subsets v1 and v2 by the `version` label.
pub fn seed_subsets() -> Value {
    json!({
        "apiVersion": "networking.ambit.dev/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "reviews"},
        "spec": {
            "host": "reviews",
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}}
            ]
        }
    })
}

/// Gives the CA (it listens on the fabric) the way back to the pods of `node`, as a cluster
/// routes pods to its CA's Service: a waypoint is a pod that asks the CA for its own
/// certificate. The route goes with the fabric namespace.
pub fn route_ca_to_pods_of(cluster: &Cluster, node: &Node) -> Result<()> {
    util::ip(&format!(
        "-n {} route replace 10.10.{}.0/24 via {}",
        cluster.fabric_netns(),
        node.index(),
        node.fabric_ip()
    ))
    .map(drop)
}

/// Starts `ambit waypoint` in `pod` (its workload in the mesh file, its node's CA flags) and
/// waits until it serves its metrics: it holds its certificate and listens on 15008 by then.
/// The CA must be able to reach the pod ([`route_ca_to_pods_of`]).
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
    let deadline = Instant::now() + START;
    loop {
        if let Some(status) = process.try_status()? {
            bail!("ambit waypoint exited: {status}; log: {}", process.stderr());
        }
        if metrics(node, pod).is_ok() {
            return Ok(process);
        }
        if Instant::now() > deadline {
            bail!(
                "ambit waypoint not serving after {} s; log: {}",
                START.as_secs(),
                process.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The waypoint's `/metrics` (port 15020), fetched from its node's namespace.
pub fn metrics(node: &Node, waypoint: &Pod) -> Result<String> {
    let r = node.http_get_addr(waypoint.addr4(15020), "/metrics", Duration::from_secs(5))?;
    ensure!(r.status == 200, "waypoint /metrics: HTTP {}", r.status);
    Ok(r.body)
}

/// The sum of the `name` series (e.g. `istio_requests_total`) carrying every one of `labels`.
pub fn sum_series(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let prefix = format!("{name}{{");
    metrics
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The answers of one curl run: per request its body and status.
#[derive(Debug, Default)]
pub struct Answers {
    /// Response bodies, one line each (the test servers answer `<name> <HTTP version>`).
    pub bodies: Vec<String>,
    /// Status codes, as curl's `%{http_code}`.
    pub codes: Vec<String>,
}

impl Answers {
    /// How many bodies are exactly `body`.
    pub fn count(&self, body: &str) -> usize {
        self.bodies.iter().filter(|b| *b == body).count()
    }
}

/// Runs curl in `from` for `count` HTTP/1.1 requests to `http://<authority><path>/[1-count]` over
/// one keep-alive connection (URL globbing reuses it), each bounded to 10 s and the whole run to
/// 3 minutes. (Not for HTTP/2: Debian's curl 7.88 fails every transfer after the first on a
/// reused prior-knowledge connection, with or without a proxy in the path; use nghttp.)
pub fn curl(
    from: &Pod,
    authority: &str,
    path: &str,
    count: usize,
    headers: &[&str],
) -> Result<Answers> {
    let url = format!("http://{authority}{path}/[1-{count}]");
    let mut args: Vec<String> = vec![
        "-sS".into(),
        "--max-time".into(),
        "10".into(),
        "-w".into(),
        "\ncode=%{http_code}\n".into(),
        "--http1.1".into(),
    ];
    for h in headers {
        args.extend(["-H".to_string(), h.to_string()]);
    }
    args.push(url);
    let mut process = from.spawn("curl", &args)?;
    let (status, lines) = process.wait_output(Duration::from_secs(180))?;
    let mut answers = Answers::default();
    for line in lines.into_iter().filter(|l| !l.is_empty()) {
        if let Some(code) = line.strip_prefix("code=") {
            answers.codes.push(code.to_string());
        } else {
            answers.bodies.push(line);
        }
    }
    if !status.success() || answers.codes.len() != count {
        bail!(
            "curl {status}: {} answers of {count}; stderr: {}",
            answers.codes.len(),
            process.stderr()
        );
    }
    Ok(answers)
}
