//! End-to-end tests of the waypoint's matches, filters and load balancers: a real `ambit
//! waypoint` in its pod, real agents and CA, HBONE on both sides, curl and h2load as clients and
//! `testpod http` servers that say who answered and (with `--log-requests`) what reached them.
//! The bed is [`ambit_tests::waypoint`]'s: client `p0-0` and waypoint `p0-1` on node 0, the
//! endpoints of `reviews` on node 1.

use std::time::Duration;

use ambit_tests::mesh::Routing;
use ambit_tests::waypoint::{
    REVIEWS_VIP, curl_once, prepare, requests_total, start_server, start_waypoint, waypoint_metrics,
};
use ambit_tests::{Cluster, ClusterSpec, PodProcess, ensure_or_dump};
use anyhow::{Result, bail};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

fn destination_rule(spec: Value) -> Value {
    json!({
        "apiVersion": "networking.ambit.dev/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "reviews"},
        "spec": spec
    })
}

fn virtual_service(http: Value) -> Value {
    json!({
        "apiVersion": "networking.ambit.dev/v1",
        "kind": "VirtualService",
        "metadata": {"name": "reviews"},
        "spec": {"hosts": ["reviews"], "http": http}
    })
}

/// The next request `server` logged whose path is `path`.
fn seen(server: &mut PodProcess, path: &str) -> Result<Value> {
    server.read_json_until(T, |v| v["event"] == "request" && v["path"] == path)
}

#[test]
fn waypoint_matches_method_query_and_absence_and_applies_headers_redirect_and_rewrite() -> Result<()>
{
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
    let to = |subset: &str| json!([{"destination": {"host": "reviews", "subset": subset}}]);
    let routes = json!([
        {"name": "post", "match": [{"method": {"exact": "POST"}}], "route": to("v2")},
        {"name": "canary",
         "match": [{"queryParams": {"canary": {"exact": "yes"}},
                    "withoutHeaders": {"x-opt-out": {}}}],
         "route": to("v2")},
        {"name": "moved", "match": [{"uri": {"prefix": "/old"}}],
         "redirect": {"uri": "/new"}},
        {"name": "api", "match": [{"uri": {"prefix": "/API/V1"}, "ignoreUriCase": true}],
         "rewrite": {"uri": "/v2", "authority": "reviews.internal"},
         "route": to("v1")},
        {"name": "headers", "match": [{"uri": {"exact": "/hdr"}}],
         "headers": {
             "request": {"set": {"x-route": "hdr"}, "add": {"x-added": "1"},
                         "remove": ["x-secret"]},
             "response": {"set": {"x-resp": "yes"}, "remove": ["x-served-by"]}
         },
         "route": [{"destination": {"host": "reviews", "subset": "v1"},
                    "headers": {"request": {"set": {"x-dest": "v1"}}}}]},
        {"name": "teapot", "match": [{"uri": {"regex": "/tea(pot)?"}}],
         "directResponse": {"status": 418, "body": {"string": "short and stout"}}},
        {"route": to("v1")}
    ]);
    prepare(
        &cluster,
        client,
        waypoint,
        &[
            (v1, &[("version", "v1")], "reviews-v1"),
            (v2, &[("version", "v2")], "reviews-v2"),
        ],
        Routing {
            virtual_services: vec![virtual_service(routes)],
            destination_rules: vec![destination_rule(json!({
                "host": "reviews",
                "subsets": [
                    {"name": "v1", "labels": {"version": "v1"}},
                    {"name": "v2", "labels": {"version": "v2"}}
                ]
            }))],
        },
    )?;
    let mut v1_server = start_server(v1, "v1", &["--log-requests"])?;
    let _v2_server = start_server(v2, "v2", &[])?;
    let _waypoint = cluster.with_diagnostics(start_waypoint(&cluster, waypoint))?;
    let get = |path: &str, args: &[&str]| cluster.with_diagnostics(curl_once(client, path, args));

    // Method: POST to v2, GET to v1.
    let post = get("/x", &["-X", "POST", "-d", "body"])?;
    let plain = get("/x", &[])?;
    ensure_or_dump!(
        cluster,
        post.body == "v2 HTTP/1.1 body=4" && plain.body == "v1 HTTP/1.1",
        "POST (and its 4-byte body) must reach v2 and GET v1: {post:?} {plain:?}"
    );

    // Query parameter, unless the header withoutHeaders names is present.
    let canary = get("/x?a=1&canary=yes", &[])?;
    let other = get("/x?canary=no", &[])?;
    let opted_out = get("/x?canary=yes", &["-H", "x-opt-out: 1"])?;
    ensure_or_dump!(
        cluster,
        canary.body == "v2 HTTP/1.1"
            && other.body == "v1 HTTP/1.1"
            && opted_out.body == "v1 HTTP/1.1",
        "?canary=yes must reach v2 unless x-opt-out: {canary:?} {other:?} {opted_out:?}"
    );

    // Redirect: 301 (Istio's default) to the new path, the query kept, nothing forwarded.
    let moved = get("/old/page?a=1", &[])?;
    let location = format!("http://{REVIEWS_VIP}:9080/new?a=1");
    ensure_or_dump!(
        cluster,
        moved.status == 301 && moved.header("location") == Some(location.as_str()),
        "redirect: {moved:?}, expected 301 to {location}"
    );

    // Rewrite: the prefix (matched ignoring case) replaced, the rest and the query kept, the
    // authority replaced; the server sees the rewritten request.
    let api = get("/api/v1/books?id=3", &[])?;
    ensure_or_dump!(cluster, api.body == "v1 HTTP/1.1", "rewrite route: {api:?}");
    let rewritten = cluster.with_diagnostics(seen(&mut v1_server, "/v2/books?id=3"))?;
    ensure_or_dump!(
        cluster,
        rewritten["headers"]["host"] == "reviews.internal",
        "the rewritten request must carry the new authority: {rewritten}"
    );

    // Header operations: at the server the route's and the destination's, the removed one
    // gone; in the response the route's.
    let hdr = get("/hdr", &["-H", "x-secret: s3cr3t", "-H", "x-added: 0"])?;
    let at_server = cluster.with_diagnostics(seen(&mut v1_server, "/hdr"))?;
    let h = &at_server["headers"];
    ensure_or_dump!(
        cluster,
        h["x-route"] == "hdr"
            && h["x-dest"] == "v1"
            && h["x-added"] == "0, 1"
            && h.get("x-secret").is_none(),
        "request header operations at the server: {at_server}"
    );
    ensure_or_dump!(
        cluster,
        hdr.status == 200
            && hdr.body == "v1 HTTP/1.1"
            && hdr.header("x-resp") == Some("yes")
            && hdr.header("x-served-by").is_none(),
        "response header operations: {hdr:?}"
    );
    // Without the route, the server's own header comes back.
    ensure_or_dump!(
        cluster,
        plain.header("x-served-by") == Some("v1") && plain.header("x-resp").is_none(),
        "{plain:?}"
    );

    // Direct response.
    let teapot = get("/teapot", &[])?;
    ensure_or_dump!(
        cluster,
        teapot.status == 418 && teapot.body == "short and stout",
        "direct response: {teapot:?}"
    );

    // The waypoint counted the redirect and the direct response with their codes.
    let metrics = waypoint_metrics(cluster.node(0), waypoint)?;
    for code in ["301", "418"] {
        ensure_or_dump!(
            cluster,
            requests_total(
                &metrics,
                &[("reporter", "waypoint"), ("response_code", code)]
            ) == 1.0,
            "istio_requests_total with response_code {code} must be 1"
        );
    }
    Ok(())
}

/// Requests sent with h2load for the least-request share, 16 at a time on one connection.
const LEAST_REQUESTS: usize = 400;
/// The slow endpoint's delay: far longer than a fast answer even on a loaded machine.
const SLOW_DELAY_MS: &str = "1000";

#[test]
fn waypoint_consistent_hash_keeps_keys_and_least_request_avoids_a_slow_endpoint() -> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 4,
    })?;
    let (client, waypoint) = (cluster.pod(0, 0), cluster.pod(0, 1));
    let fast = [cluster.pod(1, 0), cluster.pod(1, 1), cluster.pod(1, 2)];
    let slow = cluster.pod(1, 3);
    let hash = |key: Value| json!({"loadBalancer": {"consistentHash": key}});
    let by = |header: &str, value: &str, subset: &str| {
        json!({"match": [{"headers": {header: {"exact": value}}}],
               "route": [{"destination": {"host": "reviews", "subset": subset}}]})
    };
    prepare(
        &cluster,
        client,
        waypoint,
        &[
            (fast[0], &[("tier", "fast")], "reviews"),
            (fast[1], &[("tier", "fast")], "reviews"),
            (fast[2], &[("tier", "fast")], "reviews"),
            (slow, &[("tier", "slow")], "reviews"),
        ],
        Routing {
            virtual_services: vec![virtual_service(json!([
                by("x-lb", "least", "all"),
                by("x-lb", "cookie", "cookie"),
                {"route": [{"destination": {"host": "reviews", "subset": "sticky"}}]}
            ]))],
            destination_rules: vec![destination_rule(json!({
                "host": "reviews",
                "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}},
                "subsets": [
                    {"name": "sticky", "labels": {"tier": "fast"},
                     "trafficPolicy": hash(json!({"httpHeaderName": "x-user"}))},
                    {"name": "cookie", "labels": {"tier": "fast"},
                     "trafficPolicy": hash(json!({"httpCookie": {"name": "ab-session", "path": "/", "ttl": "3600s"}}))},
                    {"name": "all", "labels": {"app": "reviews"},
                     "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}}}
                ]
            }))],
        },
    )?;
    let mut servers = Vec::new();
    for (i, pod) in fast.iter().enumerate() {
        servers.push(start_server(pod, &format!("fast{i}"), &[])?);
    }
    servers.push(start_server(slow, "slow", &["--delay-ms", SLOW_DELAY_MS])?);
    let _waypoint = cluster.with_diagnostics(start_waypoint(&cluster, waypoint))?;

    // Consistent hash by header: each of 20 keys stays on one endpoint over 10 requests, and
    // the keys spread (all 20 on one of 3 endpoints: 3^-19 by chance).
    let mut owners = std::collections::BTreeMap::new();
    for key in 0..20 {
        let header = format!("x-user: user-{key}");
        let mut answered = std::collections::BTreeSet::new();
        for _ in 0..10 {
            let got = cluster.with_diagnostics(curl_once(client, "/", &["-H", &header]))?;
            ensure_or_dump!(cluster, got.status == 200, "{header}: {got:?}");
            answered.insert(got.body);
        }
        ensure_or_dump!(
            cluster,
            answered.len() == 1,
            "{header} must stay on one endpoint: {answered:?}"
        );
        owners.insert(key, answered.into_iter().next().unwrap_or_default());
    }
    let used: std::collections::BTreeSet<&String> = owners.values().collect();
    eprintln!("20 keys over the fast endpoints: {owners:?}");
    ensure_or_dump!(
        cluster,
        used.len() >= 2 && used.iter().all(|b| b.starts_with("fast")),
        "the keys must spread over the sticky subset's endpoints: {used:?}"
    );

    // Consistent hash by a cookie with a ttl: created on the first answer, and the endpoint
    // that answered it answers every request carrying it.
    let first = cluster.with_diagnostics(curl_once(client, "/", &["-H", "x-lb: cookie"]))?;
    let Some(set_cookie) = first.header("set-cookie") else {
        bail!("no set-cookie for a cookie hash with a ttl: {first:?}");
    };
    ensure_or_dump!(
        cluster,
        set_cookie.starts_with("ab-session=") && set_cookie.contains("Max-Age=3600"),
        "set-cookie: {set_cookie}"
    );
    let cookie = format!(
        "cookie: {}",
        set_cookie.split(';').next().unwrap_or_default()
    );
    for _ in 0..10 {
        let again = cluster.with_diagnostics(curl_once(
            client,
            "/",
            &["-H", "x-lb: cookie", "-H", &cookie],
        ))?;
        ensure_or_dump!(
            cluster,
            again.body == first.body && again.header("set-cookie").is_none(),
            "with {cookie}: {again:?}, first answered by {}",
            first.body
        );
    }

    // Least request over the four endpoints, one of them slow: 400 requests, 16 in flight. A
    // fair share is 100; the slow endpoint keeps requests in flight 1 s each, so it loses most
    // draws. Bound: under half its fair share.
    let n = LEAST_REQUESTS.to_string();
    let url = format!("http://{REVIEWS_VIP}:9080/least");
    let mut h2load = client.spawn(
        "h2load",
        [
            "-n",
            n.as_str(),
            "-c",
            "1",
            "-m",
            "16",
            "-H",
            "x-lb: least",
            url.as_str(),
        ],
    )?;
    let (status, lines) = h2load.wait_output(Duration::from_secs(180))?;
    ensure_or_dump!(
        cluster,
        status.success()
            && lines
                .iter()
                .any(|l| l.contains(&format!("{LEAST_REQUESTS} succeeded, 0 failed"))),
        "h2load: {lines:?}; {}",
        h2load.stderr()
    );
    let metrics = waypoint_metrics(cluster.node(0), waypoint)?;
    let count = |pod: &ambit_tests::Pod| {
        requests_total(
            &metrics,
            &[
                ("reporter", "waypoint"),
                ("response_code", "200"),
                ("destination_workload", pod.name()),
            ],
        ) as usize
    };
    let to_slow = count(slow);
    eprintln!("least request: the slow endpoint got {to_slow} of {LEAST_REQUESTS}");
    ensure_or_dump!(
        cluster,
        to_slow < LEAST_REQUESTS / 8,
        "least request sent {to_slow} of {LEAST_REQUESTS} requests to the slow endpoint (a \
         fair share is {}, the bound half of it)",
        LEAST_REQUESTS / 4
    );
    drop(servers);
    Ok(())
}
