//! End-to-end tests of the waypoint's upstream side: connection pooling, the circuit breaker
//! (DestinationRule `connectionPool`) and outlier detection (`outlierDetection`), configured in
//! the mesh file, through a real `ambit waypoint` between real agents, curl as the clients and
//! `testpod http` servers that are slow or broken on demand and report the connection each
//! request came on and how many were in flight.
//!
//! Topology (two nodes; the waypoint's tunnels to the servers cross the fabric):
//!
//! ```text
//! n0: client p0-0 ──agent n0──HBONE──► waypoint p0-1 (`ambit waypoint`, not enrolled)
//!                                        │ HBONE, the waypoint's identity
//! n1: reviews p1-0, reviews p1-1 ◄───────┘
//! ```
//!
//! No assertion is on time: every wait is bounded (curl's 10 s per request).

use std::time::{Duration, Instant};

use ambit_tests::mesh::Routing;
use ambit_tests::waypoint::{
    Endpoint, Exchange, REVIEWS_VIP, curl, curl_once, prepare, requests_total, start_server,
    start_waypoint, start_waypoint_with, sum_series, wait_reloads, waypoint_metrics,
};
use ambit_tests::{Cluster, ClusterSpec, PodProcess, ensure_or_dump};
use anyhow::Result;
use serde_json::{Value, json};

/// Concurrent clients of the circuit breaker test.
const CLIENTS: usize = 20;

fn destination_rule(traffic_policy: Value) -> Value {
    json!({
        "apiVersion": "networking.ambit.dev/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "reviews-circuit-breaker"},
        "spec": {"host": "reviews", "trafficPolicy": traffic_policy}
    })
}

/// Reads `server`'s request lines until none comes for 2 s (or 30 s passed).
fn drain_requests(server: &mut PodProcess) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        match server.read_json(Duration::from_secs(2)) {
            Ok(line) if line["event"] == "request" => seen.push(line),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    seen
}

/// The bed: a client, a waypoint and the reviews service (VIP :9080 -> 8080) over the pods
/// `reviews` of node 1, bound to the waypoint, with `rule` as its DestinationRule.
fn bed(reviews: usize, rule: Value) -> Result<Cluster> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: reviews.max(2),
    })?;
    let servers: Vec<Endpoint<'_>> = (0..reviews)
        .map(|i| (cluster.pod(1, i), &[][..], "reviews"))
        .collect();
    prepare(
        &cluster,
        cluster.pod(0, 0),
        cluster.pod(0, 1),
        &servers,
        Routing {
            virtual_services: vec![],
            destination_rules: vec![rule],
        },
    )?;
    Ok(cluster)
}

#[test]
fn waypoint_pools_connections_and_its_circuit_breaker_answers_503_uo() -> Result<()> {
    let cluster = bed(
        1,
        destination_rule(json!({
            "connectionPool": {
                "tcp": {"maxConnections": 1},
                "http": {"http1MaxPendingRequests": 1}
            }
        })),
    )?;
    let (client, waypoint, reviews) = (cluster.pod(0, 0), cluster.pod(0, 1), cluster.pod(1, 0));
    let node0 = cluster.node(0);
    let reviews_host = format!("reviews.{}.svc.cluster.local", client.namespace());
    let mut server = start_server(reviews, "reviews", &["--log-requests"])?;
    let waypoint_process = cluster.with_diagnostics(start_waypoint(&cluster, waypoint))?;

    // 1. Pooling: requests of separate client connections (one curl each) reach the server on
    // one upstream connection, reused (HTTP/1.1 keep-alive through the tunnel).
    for i in 0..5 {
        let answer = cluster.with_diagnostics(curl_once(client, &format!("/seq/{i}"), &[]))?;
        ensure_or_dump!(cluster, answer.status == 200, "request {i}: {answer:?}");
    }
    let seen = drain_requests(&mut server);
    let connections: std::collections::BTreeSet<String> =
        seen.iter().map(|l| l["connection"].to_string()).collect();
    ensure_or_dump!(
        cluster,
        seen.len() == 5 && connections.len() == 1,
        "5 requests must reach the server on one reused connection: {} requests on {:?}",
        seen.len(),
        connections
    );

    // 2. The circuit breaker: 20 clients at once, each request held 1.5 s by the server. One
    // connection serves one request at a time, one more waits; the others are answered 503
    // with Envoy's overflow body at once. None hangs (curl's --max-time 10 bounds each).
    let answers: Vec<Result<Exchange>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|i| {
                scope.spawn(move || {
                    curl_once(client, &format!("/burst/{i}"), &["-H", "x-delay-ms: 1500"])
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")))
            })
            .collect()
    });
    let mut ok = 0;
    let mut overflowed = 0;
    let mut other = Vec::new();
    for answer in &answers {
        match answer {
            Ok(a) if a.status == 200 => ok += 1,
            Ok(a) if a.status == 503 && a.body.contains("reset reason: overflow") => {
                overflowed += 1
            }
            Ok(a) => other.push(format!("{} {}", a.status, a.body)),
            Err(e) => other.push(format!("{e:#}")),
        }
    }
    ensure_or_dump!(
        cluster,
        other.is_empty() && ok >= 2 && overflowed >= 1 && ok + overflowed == CLIENTS,
        "20 concurrent clients must get 200s and 503 overflows, nothing else: {ok} ok, \
         {overflowed} overflowed, others {other:?}\n{}",
        waypoint_process
            .stderr()
            .lines()
            .rev()
            .take(10)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let burst = drain_requests(&mut server);
    let max_in_flight = burst
        .iter()
        .filter_map(|l| l["max_in_flight"].as_u64())
        .max()
        .unwrap_or(0);
    ensure_or_dump!(
        cluster,
        burst.len() == ok && max_in_flight == 1,
        "the server must see only the admitted requests, one at a time: {} seen for {ok} \
         answered 200, at most {max_in_flight} in flight",
        burst.len()
    );
    let metrics = waypoint_metrics(node0, waypoint)?;
    let uo = requests_total(
        &metrics,
        &[
            ("reporter", "waypoint"),
            ("response_code", "503"),
            ("response_flags", "UO"),
        ],
    );
    let pool_overflows = sum_series(
        &metrics,
        "ambit_waypoint_upstream_overflow_total",
        &[
            ("destination_service", &reviews_host),
            ("limit", "max_pending_requests"),
        ],
    );
    let opened = sum_series(
        &metrics,
        "ambit_waypoint_upstream_connections_total",
        &[("destination_service", &reviews_host)],
    );
    ensure_or_dump!(
        cluster,
        uo == overflowed as f64 && pool_overflows == overflowed as f64 && opened == 1.0,
        "{overflowed} overflows must count in istio_requests_total (UO: {uo}) and the pool's \
         counter ({pool_overflows}); one connection opened in all ({opened}):\n{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("ambit_waypoint_upstream"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // 3. maxRequestsPerConnection: 2 (hot reload): sequential requests use each connection
    // for two requests at most.
    cluster.set_routing(Routing {
        virtual_services: vec![],
        destination_rules: vec![destination_rule(json!({
            "connectionPool": {"http": {"maxRequestsPerConnection": 2}}
        }))],
    });
    cluster.write_mesh()?;
    wait_reloads(node0, waypoint, "ok", 1)?;
    let answers =
        cluster.with_diagnostics(curl(client, &format!("{REVIEWS_VIP}:9080"), "/cap", 6, &[]))?;
    ensure_or_dump!(
        cluster,
        answers.count_code("200") == 6,
        "6 requests: {:?}",
        answers.codes
    );
    let capped = drain_requests(&mut server);
    let mut per_connection = std::collections::BTreeMap::<String, usize>::new();
    for line in &capped {
        *per_connection
            .entry(line["connection"].to_string())
            .or_default() += 1;
    }
    ensure_or_dump!(
        cluster,
        capped.len() == 6 && per_connection.values().all(|&n| n <= 2) && per_connection.len() >= 3,
        "each connection must carry 2 requests at most: {per_connection:?}"
    );
    // Connections are closed by ending their tunnels in both directions, never by a reset:
    // the endpoint's agent reports no tunnel cancelled under it.
    let cancelled: Vec<String> = cluster
        .node(1)
        .agent_log()
        .lines()
        .filter(|l| l.contains("stream no longer needed"))
        .map(str::to_string)
        .collect();
    ensure_or_dump!(
        cluster,
        cancelled.is_empty(),
        "the endpoint's agent saw tunnels reset: {:?}",
        cancelled.iter().take(3).collect::<Vec<_>>()
    );
    Ok(())
}

#[test]
fn waypoint_ejects_a_failing_endpoint_and_takes_it_back() -> Result<()> {
    // Istio's seed-style rule; 500s count as 5xx (not gateway errors), ejection of 6 s.
    let cluster = bed(
        2,
        destination_rule(json!({
            "loadBalancer": {"simple": "ROUND_ROBIN"},
            "outlierDetection": {
                "consecutive5xxErrors": 3,
                "interval": "1s",
                "baseEjectionTime": "6s",
                "maxEjectionPercent": 50
            }
        })),
    )?;
    let (client, waypoint) = (cluster.pod(0, 0), cluster.pod(0, 1));
    let node0 = cluster.node(0);
    let reviews_host = format!("reviews.{}.svc.cluster.local", client.namespace());
    let _good = start_server(cluster.pod(1, 0), "good", &[])?;
    let _broken = start_server(cluster.pod(1, 1), "broken", &["--fail-status", "500"])?;
    let _waypoint_process = cluster.with_diagnostics(start_waypoint(&cluster, waypoint))?;
    let authority = format!("{REVIEWS_VIP}:9080");

    // Round robin alternates until the broken endpoint's third 500 ejects it: 3 of the
    // first 6 answers are 500 (whatever the time they take), then only the good one answers.
    let first = cluster.with_diagnostics(curl(client, &authority, "/a", 6, &[]))?;
    ensure_or_dump!(
        cluster,
        first.count_code("500") == 3 && first.count("good HTTP/1.1") == 3,
        "the broken endpoint must fail 3 times before its ejection: {:?} {:?}",
        first.codes,
        first.bodies
    );
    let during = cluster.with_diagnostics(curl(client, &authority, "/b", 10, &[]))?;
    ensure_or_dump!(
        cluster,
        during.count("good HTTP/1.1") == 10,
        "while ejected, the broken endpoint must receive nothing: {:?}",
        during.bodies
    );
    let metrics = waypoint_metrics(node0, waypoint)?;
    let ejections = sum_series(
        &metrics,
        "ambit_waypoint_outlier_ejections_total",
        &[
            ("destination_service", &reviews_host),
            ("reason", "consecutive_5xx"),
        ],
    );
    let ejected = sum_series(
        &metrics,
        "ambit_waypoint_outlier_ejected_endpoints",
        &[("destination_service", &reviews_host)],
    );
    ensure_or_dump!(
        cluster,
        ejections == 1.0 && ejected == 1.0,
        "one ejection must be counted and one endpoint ejected: {ejections}, {ejected}"
    );

    // After its ejection time it comes back: requests (one each 500 ms, 60 at most) reach it
    // again.
    let mut returned = false;
    for i in 0..60 {
        let answer = cluster.with_diagnostics(curl_once(client, &format!("/c/{i}"), &[]))?;
        if answer.status == 500 && answer.body.starts_with("broken") {
            returned = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    ensure_or_dump!(
        cluster,
        returned,
        "the ejected endpoint must come back after its ejection time"
    );
    Ok(())
}

/// Review M4: a request whose stream sees no byte in either direction for the stream idle
/// timeout (here 2 s; the endpoint holds its answer 9 s) is ended (408, flag `SI`, as Envoy),
/// and the cluster's one pooled connection it held is freed: the request that waited for it is
/// served, and so is the next one.
#[test]
fn waypoint_stream_idle_timeout_frees_the_pooled_connection() -> Result<()> {
    let cluster = bed(
        1,
        destination_rule(json!({
            "connectionPool": {
                "tcp": {"maxConnections": 1},
                "http": {"http1MaxPendingRequests": 1}
            }
        })),
    )?;
    let (client, waypoint, reviews) = (cluster.pod(0, 0), cluster.pod(0, 1), cluster.pod(1, 0));
    let _server = start_server(reviews, "reviews", &[])?;
    let _waypoint = cluster.with_diagnostics(start_waypoint_with(
        &cluster,
        waypoint,
        &["--stream-idle-timeout", "2s"],
    ))?;
    let (stalled, waiting) = std::thread::scope(|scope| {
        let stalled = scope.spawn(|| curl_once(client, "/stalled", &["-H", "x-delay-ms: 9000"]));
        // Sent once the first holds the connection (any time before its 2 s are up will do;
        // later, it finds the connection free anyway).
        std::thread::sleep(Duration::from_millis(500));
        let waiting = scope.spawn(|| curl_once(client, "/waiting", &[]));
        (
            stalled
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("panicked"))),
            waiting
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("panicked"))),
        )
    });
    let stalled = cluster.with_diagnostics(stalled)?;
    ensure_or_dump!(
        cluster,
        stalled.status == 408 && stalled.body.contains("stream timeout"),
        "the silent stream is ended by the stream idle timeout: {stalled:?}"
    );
    let waiting = cluster.with_diagnostics(waiting)?;
    ensure_or_dump!(
        cluster,
        waiting.status == 200,
        "the request waiting for the one connection is served once it is freed: {waiting:?}"
    );
    let next = cluster.with_diagnostics(curl_once(client, "/next", &[]))?;
    ensure_or_dump!(cluster, next.status == 200, "and the next one: {next:?}");
    let metrics = waypoint_metrics(cluster.node(0), waypoint)?;
    let si = requests_total(
        &metrics,
        &[("response_code", "408"), ("response_flags", "SI")],
    );
    ensure_or_dump!(cluster, si == 1.0, "one request with flag SI, not {si}");
    Ok(())
}
