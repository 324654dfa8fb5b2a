//! The waypoint test bed the waypoint end-to-end tests share (tests/tests/waypoint*.rs): the
//! waypoint pod and its service, `ambit waypoint` started in it, `testpod http` servers, curl
//! through the waypoint, and the waypoint's metrics.
//!
//! The waypoint pod is not enrolled, as Istio's waypoints are not captured: its own
//! connections to the endpoints' 15008 must leave as they are.

use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};

use crate::{Cluster, Node, Pod, PodProcess, ensure_or_dump, util};

/// The VIP of the waypoint's own service in the tests.
pub const WAYPOINT_VIP: &str = "10.96.0.31";

/// Makes `pod` the waypoint: label `app: waypoint`, service account `waypoint`, not enrolled,
/// and the service `waypoint` (port 15008) that selects it, in the pod's namespace.
pub fn prepare_waypoint(cluster: &Cluster, pod: &Pod) {
    cluster.set_labels(pod, &[("app", "waypoint")]);
    pod.set_service_account("waypoint");
    cluster.set_enrolled(pod, false);
    cluster.add_service(
        "waypoint",
        &pod.namespace(),
        &[WAYPOINT_VIP],
        &[("app", "waypoint")],
        &[(15008, 15008)],
    );
}

/// Gives the CA (on the fabric) the way back to node `node`'s pods, where the waypoint runs,
/// as a cluster routes pods to its CA's Service. Removed with the fabric namespace.
pub fn route_ca_to_pods_of(cluster: &Cluster, node: usize) -> Result<()> {
    util::ip(&format!(
        "-n {} route add 10.10.{node}.0/24 via {}",
        cluster.fabric_netns(),
        cluster.node(node).fabric_ip()
    ))?;
    Ok(())
}

/// Starts `testpod http --port 8080 --name <name> <extra>` in `pod` and waits until it
/// listens.
pub fn start_http_server(
    cluster: &Cluster,
    pod: &Pod,
    name: &str,
    extra: &[&str],
) -> Result<PodProcess> {
    let testpod = crate::testpod_bin()?;
    let mut args = vec!["http", "--port", "8080", "--name", name];
    args.extend_from_slice(extra);
    let mut server = pod.spawn(&testpod, &args)?;
    let listening = server.read_json(Duration::from_secs(30))?;
    ensure_or_dump!(
        cluster,
        listening["event"] == "listening",
        "{name}: {listening}"
    );
    Ok(server)
}

/// Starts `ambit waypoint` in `pod` and waits until it serves its metrics (it has its
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

/// The waypoint's `/metrics`, fetched from its node's namespace.
pub fn waypoint_metrics(node: &Node, waypoint: &Pod) -> Result<String> {
    let r = node.http_get_addr(waypoint.addr4(15020), "/metrics", Duration::from_secs(5))?;
    ensure!(r.status == 200, "waypoint /metrics: HTTP {}", r.status);
    Ok(r.body)
}

/// The sum of the samples of metric `name` whose series carry every one of `labels`.
pub fn metric_sum(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
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

/// The answers of one curl run: per request its body lines and status.
#[derive(Debug, Default)]
pub struct Answers {
    /// The bodies' lines, in order.
    pub bodies: Vec<String>,
    /// The status codes, in order.
    pub codes: Vec<String>,
}

impl Answers {
    /// How many bodies are `body`.
    pub fn count(&self, body: &str) -> usize {
        self.bodies.iter().filter(|b| *b == body).count()
    }

    /// How many answers had status `code`.
    pub fn count_code(&self, code: &str) -> usize {
        self.codes.iter().filter(|c| *c == code).count()
    }
}

/// Runs curl in `from` for `count` HTTP/1.1 requests to `<base>/[1-count]` over one keep-alive
/// connection (URL globbing reuses it), each bounded to 10 s and the whole run to 3 minutes.
/// (Not for HTTP/2: Debian's curl 7.88 fails every transfer after the first on a reused
/// prior-knowledge connection, with or without a proxy in the path; use nghttp.)
pub fn curl(from: &Pod, base: &str, count: usize, headers: &[&str]) -> Result<Answers> {
    let args: Vec<String> = headers
        .iter()
        .flat_map(|h| ["-H".to_string(), h.to_string()])
        .collect();
    curl_args(from, base, count, &args)
}

/// [`curl`] with more curl arguments (headers as `-H`, a body as `--data-binary`...).
pub fn curl_args(from: &Pod, base: &str, count: usize, extra: &[String]) -> Result<Answers> {
    let url = format!("{base}/[1-{count}]");
    let mut args: Vec<String> = vec![
        "-sS".into(),
        "--max-time".into(),
        "10".into(),
        "-w".into(),
        "\ncode=%{http_code}\n".into(),
        "--http1.1".into(),
    ];
    args.extend_from_slice(extra);
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
