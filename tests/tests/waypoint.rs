//! End-to-end tests of the waypoint (`ambit waypoint`): a real waypoint process in its own pod,
//! real agents and CA, real HBONE on both sides, a real HTTP client (curl) and real HTTP
//! servers that say which version answered.
//!
//! Topology (two nodes, so the waypoint's tunnels to the servers cross the fabric):
//!
//! ```text
//! n0: client p0-0 (enrolled) ──agent n0──HBONE──► waypoint p0-1 (not enrolled, `ambit waypoint`)
//!                                                   │ HBONE, the waypoint's identity
//! n1: reviews v1 p1-0, reviews v2 p1-1 (enrolled) ◄─┘ agent n1 authorizes the waypoint
//! ```
//!
//! The waypoint pod is not enrolled, as Istio's waypoints are not captured: its own
//! connections to the endpoints' 15008 must leave as they are.

use std::time::{Duration, Instant};

use ambit_tests::mesh::Routing;
use ambit_tests::waypoint::{
    self, Answers, REVIEWS_VIP, h2load, requests_total, start_waypoint, wait_rejected,
    waypoint_metrics,
};
use ambit_tests::{Cluster, ClusterSpec, Pod, ensure_or_dump};
use anyhow::{Result, bail};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);
/// Requests of the weighted split, and its bound: v2's count among N requests at 10% is
/// binomial with mean 200 and sigma sqrt(2000 * 0.1 * 0.9) = 13.4; 5 sigma is 67, so a correct
/// split falls outside [133, 267] about once in 1.7 million runs, and a split that ignored the
/// weights (50%: ~1,000) or the subsets (all v1: 0) is far outside.
const SPLIT_REQUESTS: usize = 2000;
const SPLIT_V2: std::ops::RangeInclusive<usize> = 133..=267;

/// The seed's canary VirtualService ([`waypoint::seed_canary`]) with `extra` merged into its
/// first route.
fn canary(extra: Value) -> Value {
    let mut vs = waypoint::seed_canary();
    if let (Some(route), Some(extra)) = (vs["spec"]["http"][0].as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            route.insert(k.clone(), v.clone());
        }
    }
    vs
}

fn subsets() -> Value {
    waypoint::seed_subsets()
}

/// curl's HTTP/1.1 keep-alive run of `count` requests to the reviews VIP.
fn curl(from: &Pod, count: usize, headers: &[&str]) -> Result<Answers> {
    waypoint::curl(
        from,
        &format!("{REVIEWS_VIP}:9080"),
        "/reviews",
        count,
        headers,
    )
}

/// Runs nghttp in `from`: `count` HTTP/2 requests (prior knowledge, as a gRPC client speaks)
/// to the reviews VIP, multiplexed on one connection, bounded to 10 s of inactivity and 2
/// minutes in all; returns the bodies.
fn nghttp(from: &Pod, count: usize, headers: &[&str]) -> Result<Vec<String>> {
    let mut args: Vec<String> = vec!["-t".into(), "10".into()];
    for h in headers {
        args.extend(["-H".to_string(), h.to_string()]);
    }
    args.extend((1..=count).map(|i| format!("http://{REVIEWS_VIP}:9080/reviews/h2/{i}")));
    let mut process = from.spawn("nghttp", &args)?;
    let (status, lines) = process.wait_output(Duration::from_secs(120))?;
    if !status.success() {
        bail!("nghttp {status}; stderr: {}", process.stderr());
    }
    Ok(lines.into_iter().filter(|l| !l.is_empty()).collect())
}

#[test]
fn waypoint_routes_by_header_and_weight_and_keeps_its_routes_on_a_bad_update() -> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 2,
    })?;
    let (client, waypoint, v1, v2) = (
        cluster.pod(0, 0),
        cluster.pod(0, 1),
        cluster.pod(1, 0),
        cluster.pod(1, 1),
    );
    let namespace = client.namespace();
    // The waypoint is not captured, as Istio's waypoints: its tunnels to the endpoints leave as
    // they are.
    waypoint::prepare(
        &cluster,
        client,
        waypoint,
        &[
            (v1, &[("version", "v1")], "reviews-v1"),
            (v2, &[("version", "v2")], "reviews-v2"),
        ],
        Routing {
            virtual_services: vec![canary(json!({}))],
            destination_rules: vec![subsets()],
        },
    )?;

    let mut servers = Vec::new();
    for (pod, name) in [(v1, "v1"), (v2, "v2")] {
        servers.push(waypoint::start_server(pod, name, &[])?);
    }
    let _waypoint_process = cluster.with_diagnostics(start_waypoint(&cluster, waypoint))?;

    // 1. `end-user: jason` always reaches v2, over HTTP/1.1 keep-alive.
    let jason = cluster.with_diagnostics(curl(client, 200, &["end-user: jason"]))?;
    ensure_or_dump!(
        cluster,
        jason.count("v2 HTTP/1.1") == 200 && jason.codes.iter().all(|c| c == "200"),
        "end-user: jason must always reach v2: {:?} {:?}",
        jason.bodies.iter().take(5).collect::<Vec<_>>(),
        jason.codes.iter().take(5).collect::<Vec<_>>()
    );

    // 2. Without it, 90/10 between v1 and v2 over 2,000 requests, within 5 sigma.
    let split = cluster.with_diagnostics(curl(client, SPLIT_REQUESTS, &[]))?;
    let (to_v1, to_v2) = cluster.with_diagnostics(split.check_split(SPLIT_REQUESTS, SPLIT_V2))?;

    // 3. HTTP/2 with prior knowledge, multiplexed: routed the same, and it reaches the server
    // as HTTP/2.
    let h2 = cluster.with_diagnostics(nghttp(client, 100, &["end-user: jason"]))?;
    ensure_or_dump!(
        cluster,
        h2.len() == 100 && h2.iter().all(|b| b == "v2 HTTP/2.0"),
        "HTTP/2 with end-user: jason must reach v2 as HTTP/2: {} answers, {:?}",
        h2.len(),
        h2.iter()
            .filter(|b| *b != "v2 HTTP/2.0")
            .take(5)
            .collect::<Vec<_>>()
    );

    // 4. The waypoint counts every request, reporter waypoint, by destination, with the
    // client's verified identity: exactly what the clients saw.
    let node0 = cluster.node(0);
    let metrics = waypoint_metrics(node0, waypoint)?;
    let client_principal = format!(
        "spiffe://cluster.local/ns/{namespace}/sa/{}",
        client.service_account()
    );
    let to_destination = |metrics: &str, workload: &str, version: &str| {
        requests_total(
            metrics,
            &[
                ("reporter", "waypoint"),
                ("response_code", "200"),
                ("response_flags", "-"),
                ("destination_workload", workload),
                ("destination_version", version),
                ("destination_service", "reviews.default.svc.cluster.local"),
                ("source_workload", client.name()),
                ("source_principal", &client_principal),
                ("connection_security_policy", "mutual_tls"),
            ],
        ) as usize
    };
    let (counted_v1, counted_v2) = (
        to_destination(&metrics, v1.name(), "v1"),
        to_destination(&metrics, v2.name(), "v2"),
    );
    ensure_or_dump!(
        cluster,
        counted_v1 == to_v1 && counted_v2 == 200 + to_v2 + 100,
        "istio_requests_total: v1 {counted_v1}, v2 {counted_v2}; the clients saw v1 {to_v1}, \
         v2 {}:\n{}",
        200 + to_v2 + 100,
        metrics
            .lines()
            .filter(|l| l.starts_with("istio_requests_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // h2load: 200 requests, 10 streams at a time on one connection, all answered 2xx, and
    // split between v1 and v2 (counted by the waypoint).
    let load = cluster.with_diagnostics(h2load(
        client,
        &format!("http://{REVIEWS_VIP}:9080/reviews/load"),
        200,
        &[],
    ))?;
    ensure_or_dump!(
        cluster,
        load.iter()
            .any(|l| l.contains("200 succeeded, 0 failed, 0 errored"))
            && load.iter().any(|l| l.starts_with("status codes: 200 2xx")),
        "h2load: {load:?}"
    );
    let metrics = waypoint_metrics(node0, waypoint)?;
    let (load_v1, load_v2) = (
        to_destination(&metrics, v1.name(), "v1") - counted_v1,
        to_destination(&metrics, v2.name(), "v2") - counted_v2,
    );
    eprintln!("h2load split: v1 {load_v1}, v2 {load_v2}");
    ensure_or_dump!(
        cluster,
        load_v1 + load_v2 == 200 && load_v1 > load_v2,
        "h2load's 200 requests: v1 {load_v1}, v2 {load_v2} counted"
    );

    // 5. A VirtualService with a field Ambit does not implement is rejected, naming it; the
    // routes in force stay (this one would have sent jason to v1).
    let mut bad = canary(json!({"corsPolicy": {"allowOrigins": [{"exact": "x"}]}}));
    bad["spec"]["http"][0]["route"][0]["destination"]["subset"] = json!("v1");
    cluster.set_routing(Routing {
        virtual_services: vec![bad],
        destination_rules: vec![subsets()],
    });
    cluster.write_mesh()?;
    let error = wait_rejected(&cluster)?;
    ensure_or_dump!(
        cluster,
        error.contains("virtualServices[0].spec.http[0]") && error.contains("corsPolicy"),
        "the rejection must name the field: {error}"
    );
    let deadline = Instant::now() + T;
    loop {
        let rejected = waypoint_metrics(node0, waypoint)?
            .lines()
            .any(|l| l == "ambit_config_reloads_total{result=\"failed\"} 1");
        if rejected {
            break;
        }
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "the waypoint did not count the rejected mesh file"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let still = cluster.with_diagnostics(curl(client, 50, &["end-user: jason"]))?;
    ensure_or_dump!(
        cluster,
        still.count("v2 HTTP/1.1") == 50,
        "after a rejected update, jason must still reach v2: {:?}",
        still.bodies.iter().take(5).collect::<Vec<_>>()
    );

    // 6. A good update takes effect without a restart: blue-green cutover to v1 (100/0).
    let mut cutover = canary(json!({}));
    cutover["spec"]["http"][1]["route"][0]["weight"] = json!(100);
    cutover["spec"]["http"][1]["route"][1]["weight"] = json!(0);
    cluster.set_routing(Routing {
        virtual_services: vec![cutover],
        destination_rules: vec![subsets()],
    });
    cluster.write_mesh()?;
    let deadline = Instant::now() + T;
    loop {
        let accepted = waypoint_metrics(node0, waypoint)?
            .lines()
            .any(|l| l == "ambit_config_reloads_total{result=\"ok\"} 1");
        if accepted {
            break;
        }
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "the waypoint did not load the good update"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = cluster.with_diagnostics(curl(client, 100, &[]))?;
    ensure_or_dump!(
        cluster,
        after.count("v1 HTTP/1.1") == 100,
        "after the cutover every request must reach v1: {:?}",
        after
            .bodies
            .iter()
            .filter(|b| !b.starts_with("v1"))
            .take(5)
            .collect::<Vec<_>>()
    );

    // The servers saw the waypoint, not the client: the destination agent authorized the
    // waypoint's identity (its metrics count the tunnel by its principal).
    let waypoint_principal = format!("spiffe://cluster.local/ns/{namespace}/sa/waypoint");
    cluster.with_diagnostics(waypoint::wait_tunnel_from(
        cluster.node(1),
        &waypoint_principal,
    ))?;
    drop(servers);
    Ok(())
}

/// Paths of `log` (a waypoint's access log) that start with `prefix`, each with its response
/// code.
fn logged(log: &[Value], prefix: &str) -> Vec<(String, String)> {
    log.iter()
        .filter_map(|l| {
            let path = l["path"].as_str()?;
            path.starts_with(prefix).then(|| {
                (
                    path.to_string(),
                    l["response_code"].as_str().unwrap_or("").to_string(),
                )
            })
        })
        .collect()
}

/// Two replicas of a waypoint share its clients, and one that is stopped drains: the requests
/// it is serving finish, its keep-alive clients move to the other replica between requests,
/// new tunnels that still reach it are served, and it exits on its own once nothing is left.
#[test]
fn waypoint_replicas_share_clients_and_a_stopped_one_drains_without_failing_a_request() -> Result<()>
{
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 3,
    })?;
    let (client, replica_a, replica_b, server) = (
        cluster.pod(0, 0),
        cluster.pod(0, 1),
        cluster.pod(0, 2),
        cluster.pod(1, 0),
    );
    waypoint::add_waypoint_replica(&cluster, replica_b);
    waypoint::prepare(
        &cluster,
        client,
        replica_a,
        &[(server, &[("version", "v1")], "reviews-v1")],
        Routing::default(),
    )?;
    let _server = waypoint::start_server(server, "v1", &[])?;
    let mut process_a = cluster.with_diagnostics(start_waypoint(&cluster, replica_a))?;
    let process_b = cluster.with_diagnostics(start_waypoint(&cluster, replica_b))?;
    let authority = format!("{REVIEWS_VIP}:9080");
    let delayed = |ms: u64| vec!["-H".to_string(), format!("x-delay-ms: {ms}")];

    // 1. Connections are spread over both replicas (round robin by the client's agent).
    for i in 0..4 {
        let answer =
            cluster.with_diagnostics(waypoint::curl_once(client, &format!("/spread-{i}"), &[]))?;
        ensure_or_dump!(cluster, answer.status == 200, "spread {i}: {answer:?}");
    }
    // Each replica's lines are written by its log thread a moment after the answer left: wait
    // until the four are there, wherever they are.
    let spread = |process| logged(&waypoint::access_log(process), "/spread").len();
    let (spread_a, spread_b) =
        cluster.wait_for(waypoint::LOG_WAIT, "the four /spread access lines", || {
            let both = (spread(&process_a), spread(&process_b));
            Ok(if both.0 + both.1 >= 4 {
                Ok(both)
            } else {
                Err(format!("{} and {}", both.0, both.1))
            })
        })?;
    ensure_or_dump!(
        cluster,
        spread_a == 2 && spread_b == 2,
        "4 connections over 2 replicas: {spread_a} and {spread_b}"
    );

    // 2. In flight when replica A is stopped: four slow requests, each on its own connection
    // (two per replica), then two keep-alive runs of short requests (one per replica).
    let mut slow = Vec::new();
    for i in 0..4 {
        slow.push(waypoint::spawn_curl(
            client,
            &authority,
            &format!("/slow-{i}"),
            1,
            &delayed(3000),
        )?);
    }
    std::thread::sleep(Duration::from_millis(500));
    const RUN: usize = 150;
    let mut runs = Vec::new();
    for i in 0..2 {
        runs.push(waypoint::spawn_curl(
            client,
            &authority,
            &format!("/run-{i}"),
            RUN,
            &delayed(20),
        )?);
    }
    std::thread::sleep(Duration::from_millis(1000));
    process_a.signal(libc::SIGTERM)?;
    // Its clients' agents learn a moment later, as from an EndpointSlice: meanwhile new
    // connections may still reach it and must be served.
    std::thread::sleep(Duration::from_millis(1000));
    let generation = cluster.node(0).config_generation()?;
    replica_a.set_ready(false);
    cluster.write_mesh()?;
    cluster.node(0).wait_config_generation(generation + 1, T)?;

    // 3. New connections go to replica B only.
    for i in 0..4 {
        let answer =
            cluster.with_diagnostics(waypoint::curl_once(client, &format!("/after-{i}"), &[]))?;
        ensure_or_dump!(cluster, answer.status == 200, "after {i}: {answer:?}");
    }

    // 4. Nothing in flight failed.
    for (i, curl) in slow.iter_mut().enumerate() {
        let answers = cluster.with_diagnostics(waypoint::curl_answers(curl, 1))?;
        ensure_or_dump!(
            cluster,
            answers.codes == ["200"],
            "slow request {i}: {answers:?}"
        );
    }
    for (i, curl) in runs.iter_mut().enumerate() {
        let answers = cluster.with_diagnostics(waypoint::curl_answers(curl, RUN))?;
        ensure_or_dump!(
            cluster,
            answers.codes.iter().all(|c| c == "200"),
            "run {i}: codes {:?}",
            answers
                .codes
                .iter()
                .filter(|c| *c != "200")
                .collect::<Vec<_>>()
        );
    }

    // 5. Replica A exited on its own, drained, well before its drain timeout.
    let status = process_a.wait_timeout(Duration::from_secs(40))?;
    let stderr_a = process_a.stderr();
    ensure_or_dump!(
        cluster,
        status.success() && stderr_a.contains("drained: no connection left"),
        "replica A: {status}; log tail:\n{}",
        stderr_a
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
    // A has exited (its log is whole); B's lines of the runs may still be on their way.
    let log_a = waypoint::access_log(&process_a);
    let log_b = waypoint::access_log_when(&process_b, waypoint::LOG_WAIT, |log_b| {
        (0..2).any(|i| {
            let prefix = format!("/run-{i}");
            !logged(&log_a, &prefix).is_empty() && !logged(log_b, &prefix).is_empty()
        })
    });
    let slow_a = logged(&log_a, "/slow");
    ensure_or_dump!(
        cluster,
        slow_a.len() == 2 && slow_a.iter().all(|(_, code)| code == "200"),
        "replica A must have finished its two slow requests: {slow_a:?}"
    );
    let after_a = logged(&log_a, "/after");
    ensure_or_dump!(
        cluster,
        after_a.is_empty(),
        "new connections reached the stopped replica: {after_a:?}"
    );
    // The run that began on A went on at B between two requests.
    let moved = (0..2).any(|i| {
        let prefix = format!("/run-{i}");
        !logged(&log_a, &prefix).is_empty() && !logged(&log_b, &prefix).is_empty()
    });
    ensure_or_dump!(
        cluster,
        moved,
        "no keep-alive run moved from A to B: A served {:?}, B served {:?} run requests",
        (0..2)
            .map(|i| logged(&log_a, &format!("/run-{i}")).len())
            .collect::<Vec<_>>(),
        (0..2)
            .map(|i| logged(&log_b, &format!("/run-{i}")).len())
            .collect::<Vec<_>>()
    );
    Ok(())
}

/// A stopped waypoint still serves the connections that reach it before its clients' agents
/// learn of the stop (as from an EndpointSlice, a moment later), each answered with
/// `Connection: close`; a request that outlasts `--drain-timeout` is cut, and the waypoint
/// exits anyway.
#[test]
fn a_draining_waypoint_serves_late_clients_and_cuts_what_outlasts_its_drain_timeout() -> Result<()>
{
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        pods_per_node: 3,
    })?;
    let (client, waypoint_pod, server) = (cluster.pod(0, 0), cluster.pod(0, 1), cluster.pod(0, 2));
    waypoint::prepare(
        &cluster,
        client,
        waypoint_pod,
        &[(server, &[("version", "v1")], "reviews-v1")],
        Routing::default(),
    )?;
    let _server = waypoint::start_server(server, "v1", &[])?;
    let mut process = cluster.with_diagnostics(waypoint::start_waypoint_with(
        &cluster,
        waypoint_pod,
        &["--drain-timeout", "5s"],
    ))?;
    let authority = format!("{REVIEWS_VIP}:9080");
    // 9 s: past the drain timeout, within curl's own 10 s.
    let mut outlasting = waypoint::spawn_curl(
        client,
        &authority,
        "/outlasting",
        1,
        &["-H".to_string(), "x-delay-ms: 9000".to_string()],
    )?;
    std::thread::sleep(Duration::from_millis(500));
    process.signal(libc::SIGTERM)?;
    let deadline = Instant::now() + T;
    while !process
        .stderr()
        .contains("draining: requests in flight finish")
    {
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "the waypoint did not start draining on SIGTERM; log:\n{}",
            process.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A client that still has the waypoint as ready: served, and told to go elsewhere next.
    let late = cluster.with_diagnostics(waypoint::curl_once(client, "/late", &[]))?;
    ensure_or_dump!(
        cluster,
        late.status == 200 && late.header("connection") == Some("close"),
        "a request reaching the draining waypoint: {late:?}"
    );

    // The 9 s request outlasts the 5 s drain: cut, and the waypoint exits.
    let status = process.wait_timeout(Duration::from_secs(40))?;
    let log = process.stderr();
    ensure_or_dump!(
        cluster,
        status.success() && log.contains("drain timeout: cutting the connections left"),
        "the waypoint after its drain timeout: {status}; log tail:\n{}",
        log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    let cut = waypoint::curl_answers(&mut outlasting, 1);
    ensure_or_dump!(
        cluster,
        cut.is_err(),
        "the request that outlasted the drain timeout was not cut: {cut:?}"
    );
    Ok(())
}
