//! End-to-end test of the Gateway API front end: an `HTTPRoute` and a `GRPCRoute` of the mesh
//! file (`httpRoutes`, `grpcRoutes`; GAMMA: their parents are Services) routing through a real
//! `ambit waypoint`, with curl and a tonic gRPC client (`testpod grpc-call`). The bed is
//! [`ambit_tests::waypoint`]'s: client `p0-0` and waypoint `p0-1` on node 0, the servers on
//! node 1; the versions are Services of their own (`reviews-v1`, `reviews-v2`, `greeter-v1`,
//! `greeter-v2`), as the Gateway API's backends are Services, not subsets.

use std::time::Duration;

use ambit_tests::mesh::{GatewayRoutes, Routing};
use ambit_tests::waypoint::{
    REVIEWS_VIP, curl, curl_once, prepare, start_server, start_waypoint, waypoint_metrics,
};
use ambit_tests::{Cluster, ClusterSpec, PodProcess, ensure_or_dump};
use anyhow::Result;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);
/// The weighted split's requests and bound: v2's count among 2,000 requests at 10% is binomial
/// with mean 200 and sigma 13.4; outside [133, 267] (5 sigma) about once in 1.7 million runs,
/// while ignoring the weights (~1,000) or the backends (0 or 2,000) is far outside.
const SPLIT_REQUESTS: usize = 2000;
const SPLIT_V2: std::ops::RangeInclusive<usize> = 133..=267;
const GREETER_VIP: &str = "10.96.0.32";

/// The seed's example as an HTTPRoute: `end-user: jason` to v2, everyone else 90/10.
fn http_route() -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "reviews"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "port": 9080}],
            "rules": [
                {"matches": [{"headers": [{"name": "end-user", "value": "jason"}]}],
                 "backendRefs": [{"name": "reviews-v2", "port": 9080}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                 "filters": [{"type": "URLRewrite",
                              "urlRewrite": {"path": {"type": "ReplacePrefixMatch",
                                                      "replacePrefixMatch": "/"}}},
                             {"type": "ResponseHeaderModifier",
                              "responseHeaderModifier": {"set": [{"name": "x-route", "value": "api"}]}}],
                 "backendRefs": [{"name": "reviews-v1", "port": 9080}]},
                {"backendRefs": [
                    {"name": "reviews-v1", "port": 9080, "weight": 90},
                    {"name": "reviews-v2", "port": 9080, "weight": 10}
                ]}
            ]
        }
    })
}

/// `Say` to v2, every other method (`Count`) to v1.
fn grpc_route() -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "GRPCRoute",
        "metadata": {"name": "greeter"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "greeter"}],
            "rules": [
                {"matches": [{"method": {"service": "ambit.test.Greeter", "method": "Say"}}],
                 "backendRefs": [{"name": "greeter-v2", "port": 50051}]},
                {"backendRefs": [{"name": "greeter-v1", "port": 50051}]}
            ]
        }
    })
}

/// The next request `server` logged whose path is `path`.
fn seen(server: &mut PodProcess, path: &str) -> Result<Value> {
    server.read_json_until(T, |v| v["event"] == "request" && v["path"] == path)
}

#[test]
fn gateway_api_routes_from_the_mesh_file_split_match_and_route_grpc_methods() -> Result<()> {
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
    // The versions as Services of their own (the routes' backends), and greeter (gRPC) bound to
    // the waypoint like reviews.
    for (name, vip, version, port) in [
        ("reviews-v1", "10.96.0.35", "v1", 9080),
        ("reviews-v2", "10.96.0.36", "v2", 9080),
        ("greeter-v1", "10.96.0.33", "v1", 50051),
        ("greeter-v2", "10.96.0.34", "v2", 50051),
    ] {
        let target = if port == 9080 { 8080 } else { 50051 };
        cluster.add_service(
            name,
            &namespace,
            &[vip],
            &[("app", "reviews"), ("version", version)],
            &[(port, target)],
        );
    }
    cluster.add_service(
        "greeter",
        &namespace,
        &[GREETER_VIP],
        &[("app", "reviews")],
        &[(50051, 50051)],
    );
    ensure_or_dump!(
        cluster,
        cluster.set_service_waypoint("greeter", &namespace, "waypoint"),
        "no service greeter"
    );
    cluster.set_gateway_routes(GatewayRoutes {
        http_routes: vec![http_route()],
        grpc_routes: vec![grpc_route()],
    });
    prepare(
        &cluster,
        client,
        waypoint,
        &[
            (v1, &[("version", "v1")], "reviews-v1"),
            (v2, &[("version", "v2")], "reviews-v2"),
        ],
        Routing::default(),
    )?;
    let mut v1_server = start_server(v1, "v1", &["--log-requests"])?;
    let _v2_server = start_server(v2, "v2", &[])?;
    let testpod = ambit_tests::testpod_path!();
    let mut grpc_servers = Vec::new();
    for (pod, name) in [(v1, "v1"), (v2, "v2")] {
        let mut server = pod.spawn(&testpod, ["grpc-serve", "--port", "50051", "--name", name])?;
        let listening = server.read_json(T)?;
        ensure_or_dump!(
            cluster,
            listening["event"] == "listening",
            "grpc-serve {name}: {listening}"
        );
        grpc_servers.push(server);
    }
    let _waypoint = cluster.with_diagnostics(start_waypoint(&cluster, waypoint))?;
    let authority = format!("{REVIEWS_VIP}:9080");

    // 1. The header match: `end-user: jason` always reaches v2.
    let jason = cluster.with_diagnostics(curl(
        client,
        &authority,
        "/reviews",
        200,
        &["end-user: jason"],
    ))?;
    ensure_or_dump!(
        cluster,
        jason.count("v2 HTTP/1.1") == 200 && jason.codes.iter().all(|c| c == "200"),
        "end-user: jason must always reach v2: {:?}",
        jason.bodies.iter().take(5).collect::<Vec<_>>()
    );

    // 2. The weighted split: 90/10 between the two backends over 2,000 requests, within 5
    // sigma.
    let split =
        cluster.with_diagnostics(curl(client, &authority, "/reviews", SPLIT_REQUESTS, &[]))?;
    cluster.with_diagnostics(split.check_split(SPLIT_REQUESTS, SPLIT_V2))?;

    // 3. PathPrefix /api, rewritten element-wise by ReplacePrefixMatch `/` (the server sees
    // /books, not //books), with the response header set; /apis is no /api path.
    let api = cluster.with_diagnostics(curl_once(client, "/api/books?id=3", &[]))?;
    ensure_or_dump!(
        cluster,
        api.status == 200 && api.body == "v1 HTTP/1.1" && api.header("x-route") == Some("api"),
        "the /api rule: {api:?}"
    );
    let rewritten = cluster.with_diagnostics(seen(&mut v1_server, "/books?id=3"))?;
    ensure_or_dump!(cluster, rewritten["path"] == "/books?id=3", "{rewritten}");
    let apis = cluster.with_diagnostics(curl_once(client, "/apis", &["-H", "end-user: jason"]))?;
    ensure_or_dump!(
        cluster,
        apis.body == "v2 HTTP/1.1" && apis.header("x-route").is_none(),
        "/apis must not match PathPrefix /api: {apis:?}"
    );

    // 4. The GRPCRoute: the unary Say to greeter-v2, the Count stream to greeter-v1.
    let addr = format!("http://{GREETER_VIP}:50051");
    let mut call = client.spawn(
        &testpod,
        [
            "grpc-call",
            "--addr",
            &addr,
            "--calls",
            "10",
            "--stream",
            "5",
        ],
    )?;
    let (status, lines) = call.wait_json(Duration::from_secs(120))?;
    ensure_or_dump!(
        cluster,
        status.success(),
        "grpc-call: {status}: {lines:?}; stderr: {}",
        call.stderr()
    );
    let says: Vec<&Value> = lines.iter().filter(|l| l["rpc"] == "say").collect();
    let count = lines.iter().find(|l| l["rpc"] == "count");
    ensure_or_dump!(
        cluster,
        says.len() == 10
            && says
                .iter()
                .all(|l| l["code"] == 0 && l["served_by"] == "v2"),
        "every Say must reach greeter-v2: {says:?}"
    );
    ensure_or_dump!(
        cluster,
        count.is_some_and(|c| c["code"] == 0
            && c["replies"] == 5
            && c["served_by"] == json!(["v1"])),
        "the Count stream must reach greeter-v1 only: {count:?}"
    );

    // The waypoint's metrics name the destinations the routes chose.
    let metrics = waypoint_metrics(cluster.node(0), waypoint)?;
    for service in ["reviews-v1", "reviews-v2", "greeter-v1", "greeter-v2"] {
        ensure_or_dump!(
            cluster,
            metrics
                .lines()
                .any(|l| l.starts_with("istio_requests_total{")
                    && l.contains(&format!("destination_service_name=\"{service}\""))),
            "istio_requests_total must have requests to {service}"
        );
    }
    Ok(())
}
