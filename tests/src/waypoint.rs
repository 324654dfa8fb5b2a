//! The waypoint's test bed: a routed service `reviews` bound to a waypoint pod running `ambit
//! waypoint`, and helpers to start it, read its metrics and send it HTTP (the end-to-end tests
//! `tests/tests/waypoint*.rs` share them).
//!
//! Layout (two nodes, so the waypoint's tunnels to the servers cross the fabric): node 0 holds
//! the client `p0-0` (enrolled) and the waypoint `p0-1` (not enrolled, as Istio's waypoints are
//! not captured: its own tunnels to the endpoints' 15008 must leave as they are); node 1 holds
//! the servers, endpoints of `reviews`.
use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use serde_json::{Value, json};

use crate::{Cluster, Node, Pod, PodProcess, mesh::Routing, util};

/// The VIP of the routed service `reviews` (port 9080 to the servers' 8080).
pub const REVIEWS_VIP: &str = "10.96.0.30";
/// The VIP of the waypoint's own service.
pub const WAYPOINT_VIP: &str = "10.96.0.31";

/// An endpoint of `reviews`: its pod, labels beyond `app: reviews`, and service account.
pub type Endpoint<'a> = (&'a Pod, &'a [(&'a str, &'a str)], &'a str);

/// Gives the bed its roles and starts the agents: `client` (label `app: client`), `waypoint`
/// (not enrolled, service account `waypoint`, service `waypoint`), each of `servers` an
/// endpoint of `reviews` with its labels (beyond `app: reviews`) and service account, `reviews`
/// bound to the waypoint, and `routing`.
pub fn prepare(
    cluster: &Cluster,
    client: &Pod,
    waypoint: &Pod,
    servers: &[Endpoint<'_>],
    routing: Routing,
) -> Result<()> {
    let namespace = client.namespace();
    cluster.set_labels(client, &[("app", "client")]);
    prepare_waypoint(cluster, waypoint);
    for (pod, labels, account) in servers {
        let mut all = vec![("app", "reviews")];
        all.extend_from_slice(labels);
        cluster.set_labels(pod, &all);
        pod.set_service_account(account);
    }
    cluster.add_service(
        "reviews",
        &namespace,
        &[REVIEWS_VIP],
        &[("app", "reviews")],
        &[(9080, 8080)],
    );
    ensure!(
        cluster.set_service_waypoint("reviews", &namespace, "waypoint"),
        "no service reviews"
    );
    cluster.set_routing(routing);
    cluster.write_mesh()?;
    cluster.start_agents()?;
    route_ca_to_pods_of(cluster, cluster.node(0))?;
    Ok(())
}

/// Makes `pod` the waypoint: label `app: waypoint`, service account `waypoint`, not enrolled,
/// and the service `waypoint` (port 15008, VIP [`WAYPOINT_VIP`]) that selects it, in the pod's
/// namespace.
pub fn prepare_waypoint(cluster: &Cluster, pod: &Pod) {
    add_waypoint_replica(cluster, pod);
    cluster.add_service(
        "waypoint",
        &pod.namespace(),
        &[WAYPOINT_VIP],
        &[("app", "waypoint")],
        &[(15008, 15008)],
    );
}

/// Makes `pod` one more replica of the waypoint [`prepare_waypoint`] made: the same label,
/// service account and enrolment (publish with [`Cluster::write_mesh`]).
pub fn add_waypoint_replica(cluster: &Cluster, pod: &Pod) {
    cluster.set_labels(pod, &[("app", "waypoint")]);
    pod.set_service_account("waypoint");
    cluster.set_enrolled(pod, false);
}

/// The waypoint's access log (`--log-format json`) as `process` wrote it: one record per
/// request.
pub fn access_log(process: &PodProcess) -> Vec<Value> {
    process
        .stderr()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["target"] == "access")
        .collect()
}

/// How long a test waits for a waypoint's access-log line to be written (by its log thread).
pub const LOG_WAIT: Duration = Duration::from_secs(5);

/// The waypoint's access log once `enough` holds of it, or as it stands after `timeout`: the
/// waypoint writes its log from a thread of its own, a moment after a response has left, so a
/// test that reads it right after its request may not see the request's line yet.
pub fn access_log_when(
    process: &PodProcess,
    timeout: Duration,
    enough: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let log = access_log(process);
        if enough(&log) || Instant::now() >= deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The Istio examples of the document Ambit was created from, verbatim (Istio apiVersions
/// included): what users bring.
pub const SEED_EXAMPLES: &str = include_str!("../fixtures/istio-seed-examples.yaml");

/// [`SEED_EXAMPLES`] by name, each with only its `apiVersion` changed from Istio's group to
/// Ambit's (`networking.istio.io/v1beta1` -> `networking.ambit.dev/v1`,
/// `security.istio.io/v1beta1` -> `security.ambit.dev/v1`).
pub fn seed_examples() -> Result<HashMap<String, Value>> {
    let mut objects = HashMap::new();
    for document in serde_yaml_ng::Deserializer::from_str(SEED_EXAMPLES) {
        let mut object: Value = serde::Deserialize::deserialize(document)?;
        let istio = object["apiVersion"].as_str().unwrap_or_default();
        let (group, version) = istio
            .split_once('/')
            .ok_or_else(|| anyhow::anyhow!("apiVersion {istio:?}"))?;
        let group = group
            .strip_suffix(".istio.io")
            .ok_or_else(|| anyhow::anyhow!("not an Istio apiVersion: {istio:?}"))?;
        ensure!(version == "v1beta1", "{istio:?}: the seed's are v1beta1");
        object["apiVersion"] = format!("{group}.ambit.dev/v1").into();
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        objects.insert(name.to_string(), object);
    }
    Ok(objects)
}

/// The seed's canary VirtualService for the service `reviews` ([`seed_examples`]: only
/// `apiVersion` changed, and no namespace: the bed's pods live in `default`): `end-user: jason`
/// to subset v2, everyone else 90/10 between v1 and v2.
pub fn seed_canary() -> Value {
    seed_examples().expect("the seed's examples parse")["reviews-canary"].clone()
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

/// Gives the fabric (where the CA and a test's Prometheus listen) the way back to the pods of
/// `node`, as a cluster routes pods to its CA's Service: a waypoint is a pod that asks the CA
/// for its own certificate, and a Prometheus scrapes it. The route goes with the fabric
/// namespace.
pub fn route_ca_to_pods_of(cluster: &Cluster, node: &Node) -> Result<()> {
    util::ip(&format!(
        "-n {} route replace 10.10.{}.0/24 via {}",
        cluster.fabric_netns(),
        node.index(),
        node.fabric_ip()
    ))
    .map(drop)
}

/// Starts `testpod http` on 8080 in `pod`, answering as `name`, with `extra` flags, and waits
/// until it listens.
pub fn start_server(pod: &Pod, name: &str, extra: &[&str]) -> Result<PodProcess> {
    let mut args = vec!["http", "--port", "8080", "--name", name];
    args.extend_from_slice(extra);
    let mut server = pod.spawn(crate::testpod_bin()?, &args)?;
    let listening = server.read_json(Duration::from_secs(30))?;
    ensure!(listening["event"] == "listening", "{name}: {listening}");
    Ok(server)
}

/// Starts `ambit waypoint` in `pod` and waits until it serves its metrics (it has its
/// certificate and listens on 15008 by then).
pub fn start_waypoint(cluster: &Cluster, pod: &Pod) -> Result<PodProcess> {
    start_waypoint_with(cluster, pod, &[])
}

/// [`start_waypoint`] with `extra` flags.
pub fn start_waypoint_with(cluster: &Cluster, pod: &Pod, extra: &[&str]) -> Result<PodProcess> {
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
    wait_serving(cluster, pod, &mut process)?;
    Ok(process)
}

/// Waits until the waypoint `process` running in `pod` serves its metrics (it has its
/// certificate and listens on 15008 by then), at most 60 s.
pub fn wait_serving(cluster: &Cluster, pod: &Pod, process: &mut PodProcess) -> Result<()> {
    let node = cluster.node_of(pod);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = process.try_status()? {
            bail!("ambit waypoint exited: {status}; log: {}", process.stderr());
        }
        if waypoint_metrics(node, pod).is_ok() {
            return Ok(());
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

/// The sum of `istio_requests_total` series carrying every one of `labels`.
pub fn requests_total(metrics: &str, labels: &[(&str, &str)]) -> f64 {
    sum_series(metrics, "istio_requests_total", labels)
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

/// Waits (30 s at most) until `node`'s agent has admitted a tunnel from `principal` over mTLS,
/// as its `istio_tcp_connections_opened_total{reporter="destination"}` counts it when the
/// tunnel opens. (Its access-log line is written only when the tunnel ends, and the waypoint
/// keeps its tunnels pooled.)
pub fn wait_tunnel_from(node: &Node, principal: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = node
            .http_get(crate::METRICS_PORT, "/metrics", Duration::from_secs(5))?
            .body;
        let opened = sum_series(
            &metrics,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("source_principal", principal),
                ("connection_security_policy", "mutual_tls"),
            ],
        );
        if opened >= 1.0 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{}'s agent counted no tunnel from {principal} in 30 s",
            node.name()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until every agent reports a rejected mesh file (its `lastError` set) and returns the
/// first agent's error.
pub fn wait_rejected(cluster: &Cluster) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let errors: Vec<Option<String>> = cluster
            .nodes()
            .iter()
            .map(|n| {
                n.config_dump()
                    .ok()
                    .and_then(|d| d["config"]["lastError"].as_str().map(str::to_string))
            })
            .collect();
        if errors.iter().all(Option::is_some) {
            return Ok(errors[0].clone().unwrap_or_default());
        }
        if Instant::now() > deadline {
            bail!("the agents did not reject the mesh file: {errors:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until the waypoint counts `count` reloads with `result` (`ok` or `failed`).
pub fn wait_reloads(node: &Node, waypoint: &Pod, result: &str, count: u64) -> Result<()> {
    let want = format!("ambit_config_reloads_total{{result=\"{result}\"}} {count}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if waypoint_metrics(node, waypoint)?.lines().any(|l| l == want) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the waypoint did not count {want} in 30 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One HTTP/1.1 exchange seen by curl: the status, the response headers (names lower case)
/// and the body.
#[derive(Debug, Default, Clone)]
pub struct Exchange {
    /// The status code.
    pub status: u16,
    /// The response headers, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl Exchange {
    /// The first value of the response header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Runs curl in `from` once: `curl -sS -i --http1.1 <args> http://<REVIEWS_VIP>:9080<path>`,
/// bounded to 10 s, without following redirects.
pub fn curl_once(from: &Pod, path: &str, args: &[&str]) -> Result<Exchange> {
    let url = format!("http://{REVIEWS_VIP}:9080{path}");
    let mut all = vec!["-sS", "-i", "--http1.1", "--max-time", "10"];
    all.extend_from_slice(args);
    all.push(&url);
    let mut process = from.spawn("curl", &all)?;
    let (status, lines) = process.wait_output(Duration::from_secs(30))?;
    if !status.success() {
        bail!("curl {all:?}: {status}; stderr: {}", process.stderr());
    }
    let mut exchange = Exchange::default();
    let mut lines = lines
        .into_iter()
        .map(|l| l.trim_end_matches('\r').to_string());
    let status_line = lines.next().unwrap_or_default();
    exchange.status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("curl: no status line in {status_line:?}"))?;
    for line in lines.by_ref() {
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            exchange
                .headers
                .push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    exchange.body = lines.collect::<Vec<_>>().join("\n");
    Ok(exchange)
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

    /// How many answers had status `code`.
    pub fn count_code(&self, code: &str) -> usize {
        self.codes.iter().filter(|c| *c == code).count()
    }

    /// Checks a weighted split between the test servers `v1` and `v2` over HTTP/1.1: each of
    /// the `requests` answers is a 200 from one of them, and v2's count lies in `v2_bound` (the
    /// caller's binomial bound for its weight). Prints the split and returns it (v1's count,
    /// v2's); an error says what was seen.
    pub fn check_split(
        &self,
        requests: usize,
        v2_bound: RangeInclusive<usize>,
    ) -> Result<(usize, usize)> {
        let (to_v1, to_v2) = (self.count("v1 HTTP/1.1"), self.count("v2 HTTP/1.1"));
        eprintln!("split over {requests} requests: v1 {to_v1}, v2 {to_v2}");
        let not_ok: Vec<&String> = self.codes.iter().filter(|c| *c != "200").take(5).collect();
        ensure!(
            to_v1 + to_v2 == requests && self.count_code("200") == requests,
            "every request must be answered 200 by v1 or v2: v1 {to_v1}, v2 {to_v2}, \
             other codes {not_ok:?}"
        );
        ensure!(
            v2_bound.contains(&to_v2),
            "v2 got {to_v2} of {requests}, outside its bound {v2_bound:?}"
        );
        Ok((to_v1, to_v2))
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
    let args: Vec<String> = headers
        .iter()
        .flat_map(|h| ["-H".to_string(), h.to_string()])
        .collect();
    curl_args(from, authority, path, count, &args)
}

/// [`curl`] with more curl arguments (headers as `-H`, a body as `--data-binary`...).
pub fn curl_args(
    from: &Pod,
    authority: &str,
    path: &str,
    count: usize,
    extra: &[String],
) -> Result<Answers> {
    let mut process = spawn_curl(from, authority, path, count, extra)?;
    curl_answers(&mut process, count)
}

/// Starts [`curl_args`]'s curl run without waiting for it; [`curl_answers`] collects it.
pub fn spawn_curl(
    from: &Pod,
    authority: &str,
    path: &str,
    count: usize,
    extra: &[String],
) -> Result<PodProcess> {
    let url = format!("http://{authority}{path}/[1-{count}]");
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
    from.spawn("curl", &args)
}

/// Waits for a [`spawn_curl`] run of `count` requests (at most 3 minutes) and returns its
/// answers; fails unless curl succeeded with `count` answers.
pub fn curl_answers(process: &mut PodProcess, count: usize) -> Result<Answers> {
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
