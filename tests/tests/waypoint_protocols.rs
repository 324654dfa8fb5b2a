//! End-to-end tests of what passes through the waypoint besides plain HTTP requests, and of
//! what it reports: gRPC (unary, server streaming, statuses in headers and in trailers) with a
//! real tonic client and server, HTTP/2 multiplexed with h2load, a WebSocket upgrade with a
//! real WebSocket client and server, opaque TCP (server-first and client-first), the HTTP/1.1
//! header-read timeout; and a real Prometheus (Debian's) scraping the waypoint, whose PromQL
//! returns the per-route counts, Kiali's edges and a latency quantile.
//!
//! Topology (as tests/tests/waypoint.rs):
//!
//! ```text
//! n0: client p0-0 (enrolled) ──agent n0──HBONE──► waypoint p0-1 (not enrolled, `ambit waypoint`)
//!                                                   │ HBONE, the waypoint's identity
//! n1: v1 p1-0, v2 p1-1 (enrolled; HTTP, gRPC,     ◄─┘ agent n1 authorizes the waypoint
//!     WebSocket and TCP echo servers)
//! ```

use std::time::{Duration, Instant};

use ambit_tests::mesh::{Policies, Routing};
use ambit_tests::prometheus::{Prometheus, Series, by_labels, expect};
use ambit_tests::waypoint::{
    LOG_WAIT, REVIEWS_VIP, access_log_when, curl_once, h2load, prepare_waypoint,
    route_ca_to_pods_of, start_waypoint_with, wait_reloads, waypoint_metrics,
};
use ambit_tests::{Cluster, ClusterSpec, Pod, PodProcess, ensure_or_dump};
use anyhow::Result;
use serde_json::{Value, json};

/// The VIP of `greeter`: gRPC 50051.
const GREETER_VIP: &str = "10.96.0.32";
const T: Duration = Duration::from_secs(30);

/// The bed: the client, the waypoint and the two servers' pods, with every server running.
struct Bed {
    cluster: Cluster,
    _servers: Vec<PodProcess>,
}

impl Bed {
    fn client(&self) -> &Pod {
        self.cluster.pod(0, 0)
    }

    fn waypoint(&self) -> &Pod {
        self.cluster.pod(0, 1)
    }
}

/// Builds the bed: `reviews` (HTTP, WebSocket, TCP) and `greeter` (gRPC) on the pods of node 1
/// (`version: v1`, `v2`), both bound to the waypoint; `reviews` routed by the seed's header
/// match (`end-user: jason` to v2, everything else to v1).
fn bed() -> Result<Bed> {
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
    cluster.set_labels(client, &[("app", "client")]);
    prepare_waypoint(&cluster, waypoint);
    cluster.set_labels(v1, &[("app", "reviews"), ("version", "v1")]);
    cluster.set_labels(v2, &[("app", "reviews"), ("version", "v2")]);
    cluster.add_service(
        "reviews",
        &namespace,
        &[REVIEWS_VIP],
        &[("app", "reviews")],
        &[(9080, 8080), (8081, 8081), (9000, 9000)],
    );
    cluster.add_service(
        "greeter",
        &namespace,
        &[GREETER_VIP],
        &[("app", "reviews")],
        &[(50051, 50051)],
    );
    for service in ["reviews", "greeter"] {
        ensure_or_dump!(
            cluster,
            cluster.set_service_waypoint(service, &namespace, "waypoint"),
            "no service {service}"
        );
    }
    cluster.set_routing(Routing {
        virtual_services: vec![json!({
            "apiVersion": "networking.ambit.dev/v1",
            "kind": "VirtualService",
            "metadata": {"name": "reviews-route"},
            "spec": {
                "hosts": ["reviews"],
                "http": [
                    {"name": "jason",
                     "match": [{"headers": {"end-user": {"exact": "jason"}}}],
                     "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
                    {"name": "default",
                     "route": [{"destination": {"host": "reviews", "subset": "v1"}}]}
                ]
            }
        })],
        destination_rules: vec![json!({
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
        })],
    });
    cluster.write_mesh()?;
    cluster.start_agents()?;
    route_ca_to_pods_of(&cluster, cluster.node(0))?;

    let testpod = ambit_tests::testpod_path!();
    let mut servers = Vec::new();
    for (pod, name) in [(v1, "v1"), (v2, "v2")] {
        for args in [
            vec!["http", "--port", "8080", "--name", name],
            vec!["grpc-serve", "--port", "50051", "--name", name],
            vec!["ws-serve", "--port", "8081", "--name", name],
            vec!["serve", "--port", "9000", "--name", name],
        ] {
            let mut server = pod.spawn(&testpod, &args)?;
            let listening = server.read_json(T)?;
            ensure_or_dump!(
                cluster,
                listening["event"] == "listening",
                "{name} {args:?}: {listening}"
            );
            servers.push(server);
        }
    }
    Ok(Bed {
        cluster,
        _servers: servers,
    })
}

/// Runs `testpod grpc-call` in `from` against greeter; its JSON lines.
fn grpc_call(bed: &Bed, args: &[&str]) -> Result<Vec<Value>> {
    let addr = format!("http://{GREETER_VIP}:50051");
    let mut all = vec!["grpc-call", "--addr", addr.as_str()];
    all.extend_from_slice(args);
    let mut process = bed.client().spawn(ambit_tests::testpod_path!(), &all)?;
    let (status, lines) = process.wait_json(Duration::from_secs(120))?;
    ensure_or_dump!(
        bed.cluster,
        status.success(),
        "grpc-call {args:?}: {status}: {lines:?}; stderr: {}",
        process.stderr()
    );
    Ok(lines)
}

/// The sum of the series of `family` carrying every one of `labels`, in exposition `text`.
fn metric_sum(text: &str, family: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Polls `prom` until every query of `checks` returns its expected series, for at most `T`
/// (samples reach Prometheus at its next scrapes, every second).
fn wait_queries(
    bed: &Bed,
    prom: &Prometheus,
    checks: &[(String, Vec<&str>, Series)],
) -> Result<()> {
    let deadline = Instant::now() + T;
    loop {
        let mut wrong = Vec::new();
        for (q, labels, want) in checks {
            let got = by_labels(&prom.query(q)?, labels);
            if got != *want {
                wrong.push(format!("{q}\n  got {got:?}\n  expected {want:?}"));
            }
        }
        if wrong.is_empty() {
            return Ok(());
        }
        ensure_or_dump!(
            bed.cluster,
            Instant::now() < deadline,
            "prometheus did not return the expected series within {T:?}:\n{}\nlog: {}",
            wrong.join("\n"),
            prom.tool.log_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn grpc_and_http2_pass_the_waypoint_and_prometheus_reads_its_istio_metrics() -> Result<()> {
    let bed = bed()?;
    let cluster = &bed.cluster;
    let (client, waypoint) = (bed.client(), bed.waypoint());
    // Successful requests go unlogged (the metrics still count them); failed ones are logged.
    let waypoint_process = cluster.with_diagnostics(start_waypoint_with(
        cluster,
        waypoint,
        &["--access-log-sampling", "0"],
    ))?;
    let target = waypoint.addr4(15020).to_string();
    let prom = Prometheus::start(cluster, std::slice::from_ref(&target))?;

    // HTTP/2 multiplexed (h2load: 10 streams at a time on one connection), by route: 200
    // requests take the default route (v1), 50 with `end-user: jason` the header route (v2).
    let url = format!("http://{REVIEWS_VIP}:9080/reviews/load");
    for (count, headers) in [(200, vec![]), (50, vec!["end-user: jason"])] {
        let load = cluster.with_diagnostics(h2load(client, &url, count, &headers))?;
        ensure_or_dump!(
            cluster,
            load.iter().any(|l| l.contains(&format!(
                "{count} succeeded, 0 failed, 0 errored"
            ))) && load.iter().any(|l| l.starts_with("status codes: ")
                && l.contains(&format!("{count} 2xx"))),
            "h2load {headers:?}: {load:?}"
        );
    }

    // gRPC with a real client: 20 unary calls and a stream of 50 replies on one channel, all
    // OK (`grpc-status: 0` in the trailers); 3 calls answered NOT_FOUND (5) in the headers
    // (trailers-only); a stream of 5 replies ended by ABORTED (10) in the trailers.
    let ok = grpc_call(&bed, &["--calls", "20", "--stream", "50"])?;
    let unary_ok = ok
        .iter()
        .filter(|l| l["rpc"] == "say" && l["code"] == 0 && l["text"] == "hello")
        .count();
    let stream = ok.iter().find(|l| l["rpc"] == "count");
    ensure_or_dump!(
        cluster,
        unary_ok == 20
            && stream.is_some_and(|s| s["code"] == 0 && s["replies"] == 50)
            && ok
                .iter()
                .filter(|l| l["rpc"] == "say")
                .any(|l| l["served_by"] == "v2")
            && ok
                .iter()
                .filter(|l| l["rpc"] == "say")
                .any(|l| l["served_by"] == "v1"),
        "gRPC through the waypoint (round robin over v1 and v2): {ok:?}"
    );
    let failed = grpc_call(&bed, &["--calls", "3", "--text", "fail"])?;
    ensure_or_dump!(
        cluster,
        failed.iter().filter(|l| l["code"] == 5).count() == 3,
        "NOT_FOUND must reach the client: {failed:?}"
    );
    let aborted = grpc_call(&bed, &["--calls", "0", "--stream", "5", "--text", "abort"])?;
    ensure_or_dump!(
        cluster,
        aborted
            .iter()
            .any(|l| l["rpc"] == "count" && l["code"] == 10 && l["replies"] == 5),
        "a stream's replies and then its trailer status ABORTED must reach the client: \
         {aborted:?}"
    );

    // The waypoint's own exposition: gRPC by status, with the bodies' sizes.
    let metrics = waypoint_metrics(cluster.node(0), waypoint)?;
    let grpc = |status: &str| {
        metric_sum(
            &metrics,
            "istio_requests_total",
            &[
                ("reporter", "waypoint"),
                ("request_protocol", "grpc"),
                ("grpc_response_status", status),
                ("response_code", "200"),
                ("destination_service_name", "greeter"),
            ],
        )
    };
    ensure_or_dump!(
        cluster,
        (grpc("0"), grpc("5"), grpc("10")) == (21.0, 3.0, 1.0),
        "istio_requests_total by grpc_response_status: 0 {}, 5 {}, 10 {}; expected 21, 3, 1:\n{}",
        grpc("0"),
        grpc("5"),
        grpc("10"),
        metrics
            .lines()
            .filter(|l| l.starts_with("istio_requests_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Body sizes, in gRPC's framing (5 bytes a message) of the protobuf messages:
    // `Hello{text: "hello"}` is 7 bytes, with `count: 50` 9; `Reply{text: "hello", served_by:
    // "v1"}` is 11, with `index: n > 0` 13. The OK requests' bodies: 20 x 12 + 14 = 254 bytes;
    // their responses: 20 x 16 + (16 + 49 x 18) = 1,218.
    let ok_sum = |family: &str| {
        metric_sum(
            &metrics,
            family,
            &[("request_protocol", "grpc"), ("grpc_response_status", "0")],
        )
    };
    ensure_or_dump!(
        cluster,
        ok_sum("istio_request_bytes_sum") == 254.0
            && ok_sum("istio_response_bytes_sum") == 1218.0
            && ok_sum("istio_request_duration_milliseconds_count") == 21.0,
        "gRPC OK: request bytes {} (expected 254), response bytes {} (expected 1218), \
         durations {} (expected 21)",
        ok_sum("istio_request_bytes_sum"),
        ok_sum("istio_response_bytes_sum"),
        ok_sum("istio_request_duration_milliseconds_count")
    );

    // Prometheus: the per-route counts, Kiali's edges (its graph's query), the gRPC statuses,
    // and a histogram that counted every request.
    let client_workload = client.name();
    let service = |name: &str| format!("{name}.{}.svc.cluster.local", client.namespace());
    let checks: Vec<(String, Vec<&str>, Series)> = vec![
        (
            "sum by (destination_service, destination_version) \
             (istio_requests_total{reporter=\"waypoint\", destination_service_name=\"reviews\"})"
                .into(),
            vec!["destination_service", "destination_version"],
            expect(&[
                (&[&service("reviews"), "v1"], 200.0),
                (&[&service("reviews"), "v2"], 50.0),
            ]),
        ),
        (
            "sum by (source_workload, destination_service_name, response_code) \
             (istio_requests_total{reporter=\"waypoint\"})"
                .into(),
            vec![
                "source_workload",
                "destination_service_name",
                "response_code",
            ],
            expect(&[
                (&[client_workload, "reviews", "200"], 250.0),
                (&[client_workload, "greeter", "200"], 25.0),
            ]),
        ),
        (
            "sum by (grpc_response_status) \
             (istio_requests_total{reporter=\"waypoint\", request_protocol=\"grpc\"})"
                .into(),
            vec!["grpc_response_status"],
            expect(&[(&["0"], 21.0), (&["5"], 3.0), (&["10"], 1.0)]),
        ),
        (
            "sum by (destination_service_name) \
             (istio_request_duration_milliseconds_count{reporter=\"waypoint\"})"
                .into(),
            vec!["destination_service_name"],
            expect(&[(&["reviews"], 250.0), (&["greeter"], 25.0)]),
        ),
    ];
    wait_queries(&bed, &prom, &checks)?;
    // A latency quantile from the duration histogram: a number within its buckets (Istio's,
    // up to an hour); not a speed assertion.
    let p99 = prom.query(
        "histogram_quantile(0.99, sum by (le) \
         (istio_request_duration_milliseconds_bucket{reporter=\"waypoint\"}))",
    )?;
    ensure_or_dump!(
        cluster,
        p99.len() == 1 && p99[0].1.is_finite() && p99[0].1 > 0.0 && p99[0].1 <= 3_600_000.0,
        "histogram_quantile over istio_request_duration_milliseconds: {p99:?}"
    );
    eprintln!("waypoint p99 request duration: {:.1} ms", p99[0].1);

    // With --access-log-sampling 0 the access log holds the four gRPC calls that failed (3
    // NOT_FOUND, 1 ABORTED), with their status, and none of the 271 requests that succeeded,
    // although the metrics above counted every one.
    let logged = access_log_when(&waypoint_process, LOG_WAIT, |log| log.len() >= 4);
    let statuses: Vec<&str> = logged
        .iter()
        .filter_map(|l| l["grpc_status"].as_str())
        .collect();
    ensure_or_dump!(
        cluster,
        logged.len() == 4
            && statuses.iter().filter(|s| **s == "5").count() == 3
            && statuses.iter().filter(|s| **s == "10").count() == 1,
        "with --access-log-sampling 0 only the 4 failed gRPC calls are logged: {logged:?}"
    );
    Ok(())
}

#[test]
fn websocket_tcp_and_a_silent_client_through_the_waypoint() -> Result<()> {
    let bed = bed()?;
    let cluster = &bed.cluster;
    let (client, waypoint) = (bed.client(), bed.waypoint());
    let mut waypoint_process = cluster.with_diagnostics(start_waypoint_with(
        cluster,
        waypoint,
        &[
            "--header-read-timeout",
            "2s",
            "--protocol-detection-timeout",
            "3s",
            "--max-relay-buffer-mib",
            "8",
        ],
    ))?;
    let testpod = ambit_tests::testpod_path!();

    // A WebSocket upgrade, routed like any request (default route: v1), then 20 echoes.
    let url = format!("ws://{REVIEWS_VIP}:8081/chat");
    let mut ws = client.spawn(
        &testpod,
        ["ws-echo", "--url", url.as_str(), "--messages", "20"],
    )?;
    let (status, lines) = ws.wait_json(Duration::from_secs(90))?;
    ensure_or_dump!(
        cluster,
        status.success()
            && lines
                .first()
                .is_some_and(|l| l["ok"] == true && l["status"] == 101 && l["served_by"] == "v1"),
        "ws-echo: {status}: {lines:?}; stderr: {}",
        ws.stderr()
    );
    let metrics = waypoint_metrics(cluster.node(0), waypoint)?;
    let upgraded = metric_sum(
        &metrics,
        "istio_requests_total",
        &[
            ("response_code", "101"),
            ("response_flags", "-"),
            ("destination_version", "v1"),
        ],
    );
    ensure_or_dump!(
        cluster,
        upgraded == 1.0,
        "the upgrade must be counted once, 101 from v1 without flags: {upgraded}\n{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("istio_requests_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The waypoint's own limits are exported as the agent's are: the relay-buffer budget its
    // upgraded and opaque connections read from, as --max-relay-buffer-mib set it (8 MiB, a
    // quarter per client; 64 MiB by default).
    let budget = |limit| {
        metric_sum(
            &metrics,
            "ambit_relay_buffer_limit_bytes",
            &[("limit", limit)],
        )
    };
    ensure_or_dump!(
        cluster,
        budget("total") == f64::from(8 << 20) && budget("per_source") == f64::from(2 << 20),
        "the waypoint's relay-buffer budget: total {}, per source {}",
        budget("total"),
        budget("per_source")
    );

    // Opaque TCP, server first: the echo server greets before the client sends, so the
    // waypoint sees silence, takes the tunnel for TCP when its detection timeout expires, and
    // forwards it to an endpoint of reviews (round robin: both, over two connections).
    let addr = format!("{REVIEWS_VIP}:9000");
    let mut tcp = client.spawn(
        &testpod,
        [
            "client",
            "--connect",
            addr.as_str(),
            "--count",
            "2",
            "--bytes",
            "100000",
            "--timeout-ms",
            "60000",
        ],
    )?;
    let (status, lines) = tcp.wait_json(Duration::from_secs(150))?;
    let greeted: Vec<String> = lines
        .iter()
        .filter(|l| l["ok"] == true && l["received"] == 100_000)
        .filter_map(|l| l["greeting"].as_str())
        .filter_map(|g| g.split_whitespace().nth(1).map(str::to_string))
        .collect();
    ensure_or_dump!(
        cluster,
        status.success() && greeted.contains(&"v1".into()) && greeted.contains(&"v2".into()),
        "TCP echo through the waypoint, one connection to each endpoint: {lines:?}"
    );

    // Opaque TCP, client first: bytes that cannot start an HTTP request (Redis's RESP) are
    // forwarded at once, and echoed.
    let script_resp = format!(
        "exec 3<>/dev/tcp/{REVIEWS_VIP}/9000 && printf '*1\\r\\n$4\\r\\nPING\\r\\n' >&3 && \
         read -t 30 -r greeting <&3 && read -t 30 -r echoed <&3 && \
         echo \"$greeting\" && echo \"$echoed\""
    );
    let mut resp = client.spawn("bash", ["-c", script_resp.as_str()])?;
    let (status, lines) = resp.wait_output(Duration::from_secs(60))?;
    ensure_or_dump!(
        cluster,
        status.success()
            && lines.first().is_some_and(|l| l.starts_with("HELLO "))
            && lines.get(1).is_some_and(|l| l.starts_with("*1")),
        "client-first TCP through the waypoint: {status}: {lines:?}; stderr: {}",
        resp.stderr()
    );

    // The waypoint logged the three connections as opaque TCP, with their bytes (written when
    // a connection ends, a moment after its client saw the end).
    let deadline = Instant::now() + T;
    loop {
        let tcp_lines: Vec<Value> = waypoint_process
            .stderr()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["target"] == "access" && l["protocol"] == "tcp")
            .collect();
        let echoed = tcp_lines
            .iter()
            .filter(|l| l["bytes_received"] == 100_000 && l["bytes_sent"].as_u64() > Some(100_000))
            .count();
        if tcp_lines.len() == 3 && echoed == 2 {
            break;
        }
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "the waypoint must log 3 opaque TCP connections, 2 of 100,000 bytes each way \
             (plus the greeting): {tcp_lines:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // A client that starts a request and stalls is closed by the header-read timeout (2 s
    // here): the connection ends, well before the 60 s this waits.
    let script = format!(
        "exec 3<>/dev/tcp/{REVIEWS_VIP}/9080 && printf 'GET /stalled HTTP/1.1\\r\\n' >&3 && \
         cat <&3 >/dev/null; echo closed"
    );
    let mut stalled = client.spawn("timeout", ["60", "bash", "-c", script.as_str()])?;
    let (status, lines) = stalled.wait_output(Duration::from_secs(90))?;
    ensure_or_dump!(
        cluster,
        status.success() && lines.iter().any(|l| l == "closed"),
        "a stalled request must be closed by the header-read timeout: {status}: {lines:?}"
    );
    // Opaque TCP is authorized too, with Istio's TCP semantics: a DENY of `DELETE` on port
    // 9000 cannot look at a method in bytes that are not HTTP, so it ignores that field and
    // denies every TCP connection to 9000 (a client must not dodge a DENY by not speaking
    // HTTP), while HTTP on 9080 still passes.
    let namespace = client.namespace();
    cluster.set_policies(Policies {
        authorization_policies: vec![json!({
            "name": "deny-delete-9000",
            "namespace": namespace,
            "targetRefs": [{"kind": "Service", "group": "", "name": "reviews"}],
            "action": "DENY",
            "rules": [{"to": [{"operation": {"methods": ["DELETE"], "ports": ["9000"]}}]}]
        })],
        ..Default::default()
    });
    cluster.write_mesh()?;
    wait_reloads(cluster.node(0), waypoint, "ok", 1)?;
    let mut denied = client.spawn("bash", ["-c", script_resp.as_str()])?;
    let (status, lines) = denied.wait_output(Duration::from_secs(60))?;
    ensure_or_dump!(
        cluster,
        !status.success() && !lines.iter().any(|l| l.starts_with("*1")),
        "a denied TCP connection must not be forwarded: {status}: {lines:?}"
    );
    let http = cluster.with_diagnostics(curl_once(client, "/after-deny", &[]))?;
    ensure_or_dump!(
        cluster,
        http.status == 200,
        "HTTP on 9080 must still pass: {http:?}"
    );
    let reason = format!("rbac_access_denied_matched_policy[{namespace}.deny-delete-9000]");
    let deadline = Instant::now() + T;
    while !waypoint_process
        .stderr()
        .lines()
        .any(|l| l.contains("\"protocol\":\"tcp\"") && l.contains(&reason))
    {
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "the waypoint must log the denied TCP connection with its policy"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure_or_dump!(
        cluster,
        waypoint_process.try_status()?.is_none(),
        "the waypoint exited: {}",
        waypoint_process.stderr()
    );
    Ok(())
}
