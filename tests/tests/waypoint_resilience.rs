//! End-to-end tests of the waypoint's resilience features: retries, timeouts, mirrors and
//! fault injection, configured by a VirtualService of the mesh file, through a real `ambit
//! waypoint` between real agents, curl as the client and `testpod http` servers that fail,
//! stall or never answer on demand.
//!
//! Topology (two nodes; the waypoint's tunnels to the servers cross the fabric):
//!
//! ```text
//! n0: client p0-0 ──agent n0──HBONE──► waypoint p0-1 (`ambit waypoint`, not enrolled)
//!                                        │ HBONE, the waypoint's identity
//! n1: reviews p1-0, shadow p1-1, blackhole p1-2 (never answers) ◄─┘
//! ```
//!
//! No assertion is on time: timeouts are checked by their 504 and flag, and every wait is
//! bounded (curl's 10 s per request).

use std::time::{Duration, Instant};

use ambit_tests::mesh::Routing;
use ambit_tests::waypoint::{
    Answers, REVIEWS_VIP, curl, curl_args, prepare_waypoint, route_ca_to_pods_of, start_server,
    start_waypoint, sum_series, waypoint_metrics,
};
use ambit_tests::{Cluster, ClusterSpec, PodProcess, ensure_or_dump};
use anyhow::Result;
use serde_json::{Value, json};

const SHADOW_VIP: &str = "10.96.0.32";
const BLACKHOLE_VIP: &str = "10.96.0.33";

/// Fault shares and their bounds. Aborts: 25% of 1,000 requests is binomial with mean 250 and
/// sigma sqrt(1000 × 0.25 × 0.75) = 13.7; 5 sigma is 68, so a correct share falls outside
/// [182, 318] about once in 1.7 million runs (0% or 100% are far outside). Delays: 50% of 400,
/// mean 200, sigma 10, 5 sigma [150, 250].
const ABORT_REQUESTS: usize = 1000;
const ABORT_LOW: usize = 182;
const ABORT_HIGH: usize = 318;
const DELAY_REQUESTS: usize = 400;
const DELAY_LOW: usize = 150;
const DELAY_HIGH: usize = 250;

/// Requests mirrored; more than the waypoint's 64 copies in flight per mirror service, so the
/// black hole (whose copies stay in flight for the route's 60 s timeout) overflows the bound.
const MIRRORED: usize = 100;
const MIRRORS_IN_FLIGHT: usize = 64;

/// One `http[]` route of the reviews VirtualService for paths under `prefix`, with `extra`
/// fields (Istio's names).
fn route(prefix: &str, extra: Value) -> Value {
    let mut route = json!({
        "name": prefix.trim_matches('/'),
        "match": [{"uri": {"prefix": prefix}}],
        "route": [{"destination": {"host": "reviews"}}]
    });
    if let (Some(route), Some(extra)) = (route.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            route.insert(k.clone(), v.clone());
        }
    }
    route
}

fn virtual_service() -> Value {
    json!({
        "apiVersion": "networking.ambit.dev/v1",
        "kind": "VirtualService",
        "metadata": {"name": "reviews-resilience"},
        "spec": {
            "hosts": ["reviews"],
            "http": [
                // Istio's numeric retryOn: 503 is a retriable status code.
                route("/retry/", json!({"retries": {"attempts": 3, "retryOn": "503"}})),
                route("/retry-limit/", json!({"retries": {"attempts": 1, "retryOn": "5xx"}})),
                // No retries block: Istio's default policy, which does not retry a 503.
                route("/default/", json!({})),
                route("/per-try/", json!({
                    "retries": {"attempts": 1, "perTryTimeout": "300ms", "retryOn": "5xx"}
                })),
                route("/timeout/", json!({"timeout": "500ms"})),
                route("/mirror/", json!({
                    "timeout": "60s",
                    "mirrors": [
                        {"destination": {"host": "shadow"}},
                        {"destination": {"host": "blackhole"}, "percentage": {"value": 100}}
                    ]
                })),
                route("/abort/", json!({
                    "fault": {"abort": {"httpStatus": 503, "percentage": {"value": 25}}}
                })),
                route("/delay/", json!({
                    "fault": {"delay": {"fixedDelay": "10ms", "percentage": {"value": 50}}}
                })),
            ]
        }
    })
}

/// Reads `server`'s request lines for a while (until `want` of them satisfy `pred` or 30 s
/// passed); returns those that do.
fn requests_seen(
    server: &mut PodProcess,
    want: usize,
    pred: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while seen.len() < want && Instant::now() < deadline {
        match server.read_json(Duration::from_millis(500)) {
            Ok(line) if line["event"] == "request" && pred(&line) => seen.push(line),
            Ok(_) => {}
            Err(_) => {}
        }
    }
    seen
}

fn codes(answers: &Answers) -> Vec<&String> {
    answers.codes.iter().take(10).collect()
}

#[test]
fn waypoint_retries_times_out_mirrors_and_injects_faults() -> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 3,
    })?;
    let (client, waypoint) = (cluster.pod(0, 0), cluster.pod(0, 1));
    let (reviews, shadow, blackhole) = (cluster.pod(1, 0), cluster.pod(1, 1), cluster.pod(1, 2));
    let namespace = client.namespace();
    let host = |name: &str| format!("{name}.{namespace}.svc.cluster.local");
    cluster.set_labels(client, &[("app", "client")]);
    prepare_waypoint(&cluster, waypoint);
    for (pod, app) in [
        (reviews, "reviews"),
        (shadow, "shadow"),
        (blackhole, "blackhole"),
    ] {
        cluster.set_labels(pod, &[("app", app)]);
        pod.set_service_account(app);
    }
    for (name, vip) in [
        ("reviews", REVIEWS_VIP),
        ("shadow", SHADOW_VIP),
        ("blackhole", BLACKHOLE_VIP),
    ] {
        cluster.add_service(name, &namespace, &[vip], &[("app", name)], &[(9080, 8080)]);
    }
    ensure_or_dump!(
        cluster,
        cluster.set_service_waypoint("reviews", &namespace, "waypoint"),
        "no service reviews"
    );
    cluster.set_routing(Routing {
        virtual_services: vec![virtual_service()],
        destination_rules: vec![],
    });
    cluster.write_mesh()?;
    cluster.start_agents()?;
    route_ca_to_pods_of(&cluster, cluster.node(0))?;
    let mut reviews_server = start_server(reviews, "reviews", &["--log-requests"])?;
    let mut shadow_server = start_server(shadow, "shadow", &["--log-requests"])?;
    let mut blackhole_server = start_server(blackhole, "blackhole", &["--log-requests", "--hang"])?;
    let waypoint_process = cluster.with_diagnostics(start_waypoint(&cluster, waypoint))?;
    // The waypoint's access-log lines that carry an error, for failure messages.
    let waypoint_errors = || {
        waypoint_process
            .stderr()
            .lines()
            .filter(|l| l.contains("\"error\""))
            .take(10)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let node0 = cluster.node(0);
    let authority = format!("{REVIEWS_VIP}:9080");
    let path = |prefix: &str| format!("/{prefix}");
    let reviews_host = host("reviews");

    // 1. Retries turn injected 503s into 200s: each path fails twice, `attempts: 3` on
    // `retryOn: "503"` retries twice; the attempts reach the server as x-envoy-attempt-count
    // and the retries show in the metric, by the condition that caused them.
    let retried = cluster.with_diagnostics(curl(
        client,
        &authority,
        &path("retry"),
        20,
        &["x-fail-first: 2"],
    ))?;
    ensure_or_dump!(
        cluster,
        retried.count_code("200") == 20 && retried.count("reviews HTTP/1.1") == 20,
        "every request must succeed after its retries: {:?} {:?}",
        codes(&retried),
        retried.bodies.iter().take(5).collect::<Vec<_>>()
    );
    let third = requests_seen(&mut reviews_server, 1, |l| {
        l["path"] == "/retry/1" && l["attempt"] == "3"
    });
    ensure_or_dump!(
        cluster,
        third.len() == 1,
        "the server saw no third attempt of /retry/1 (x-envoy-attempt-count: 3)"
    );
    let metrics = waypoint_metrics(node0, waypoint)?;
    let retries = sum_series(
        &metrics,
        "ambit_waypoint_upstream_retries_total",
        &[
            ("destination_service", &reviews_host),
            ("reason", "retriable-status-codes"),
        ],
    );
    ensure_or_dump!(
        cluster,
        retries == 40.0,
        "20 requests retried twice each must count 40 retries, got {retries}:\n{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("ambit_waypoint_upstream_retr"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // A request body is replayed by the retries when it was kept (up to 64 KiB): a 1,000-byte
    // POST still succeeds, whole; a 100 KiB one is not retried once it streamed, and the
    // upstream's 503 goes back.
    // Pods share the host's filesystem: the bodies are files of the bed's run directory.
    let small = cluster.run_dir().join("body-small");
    let large = cluster.run_dir().join("body-large");
    std::fs::write(&small, vec![b'x'; 1000])?;
    std::fs::write(&large, vec![b'y'; 100 * 1024])?;
    let post = |file: &std::path::Path, fail: &str| {
        vec![
            "-H".to_string(),
            format!("x-fail-first: {fail}"),
            "--data-binary".to_string(),
            format!("@{}", file.display()),
        ]
    };
    let small_posts = cluster.with_diagnostics(curl_args(
        client,
        &authority,
        &path("retry/post"),
        5,
        &post(&small, "2"),
    ))?;
    let large_posts = cluster.with_diagnostics(curl_args(
        client,
        &authority,
        &path("retry/big"),
        5,
        &post(&large, "1"),
    ))?;
    ensure_or_dump!(
        cluster,
        small_posts.count("reviews HTTP/1.1 body=1000") == 5 && large_posts.count_code("503") == 5,
        "a kept body must be replayed whole and a body over 64 KiB not retried: {:?} {:?}; \
         {:?}\n{}",
        small_posts.bodies,
        codes(&small_posts),
        codes(&large_posts),
        waypoint_errors()
    );

    // 2. Retries are bounded by `attempts`: a path failing 5 times with 1 retry answers the
    // upstream's 503, flagged URX (retry limit exceeded).
    let limited = cluster.with_diagnostics(curl(
        client,
        &authority,
        &path("retry-limit"),
        10,
        &["x-fail-first: 5"],
    ))?;
    ensure_or_dump!(
        cluster,
        limited.count_code("503") == 10,
        "with 1 retry of 5 failures every request must fail: {:?}",
        codes(&limited)
    );
    // 3. Istio's default policy (no retries block) does not retry a 503.
    let default = cluster.with_diagnostics(curl(
        client,
        &authority,
        &path("default"),
        10,
        &["x-fail-first: 1"],
    ))?;
    ensure_or_dump!(
        cluster,
        default.count_code("503") == 10,
        "the default policy must pass a 503 on: {:?}",
        codes(&default)
    );
    let metrics = waypoint_metrics(node0, waypoint)?;
    let urx = sum_series(
        &metrics,
        "istio_requests_total",
        &[("response_code", "503"), ("response_flags", "URX")],
    );
    let plain_503 = sum_series(
        &metrics,
        "istio_requests_total",
        &[("response_code", "503"), ("response_flags", "-")],
    );
    let five_xx = sum_series(
        &metrics,
        "ambit_waypoint_upstream_retries_total",
        &[("reason", "5xx")],
    );
    ensure_or_dump!(
        cluster,
        urx == 10.0 && plain_503 == 15.0 && five_xx == 10.0,
        "503 URX {urx} (want 10), 503 without flag {plain_503} (want 15: the default route's \
         10 and the 5 large POSTs), 5xx retries {five_xx} (want 10); the 503 series:\n{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{") && l.contains("\"503\""))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // 4. Timeouts answer 504 UT: each try of a request stalled 2 s is cut at its 300 ms
    // per-try timeout and retried once; a request stalled 3 s is cut at the route's 500 ms.
    let per_try = cluster.with_diagnostics(curl(
        client,
        &authority,
        &path("per-try"),
        3,
        &["x-delay-ms: 2000"],
    ))?;
    let overall = cluster.with_diagnostics(curl(
        client,
        &authority,
        &path("timeout"),
        3,
        &["x-delay-ms: 3000"],
    ))?;
    ensure_or_dump!(
        cluster,
        per_try.count_code("504") == 3 && overall.count_code("504") == 3,
        "timeouts must answer 504: per-try {:?}, overall {:?}",
        codes(&per_try),
        codes(&overall)
    );
    let second_try = requests_seen(&mut reviews_server, 1, |l| {
        l["path"] == "/per-try/1" && l["attempt"] == "2"
    });
    ensure_or_dump!(
        cluster,
        second_try.len() == 1,
        "a per-try timeout must be retried: no second attempt of /per-try/1"
    );
    let metrics = waypoint_metrics(node0, waypoint)?;
    let ut = sum_series(
        &metrics,
        "istio_requests_total",
        &[("response_code", "504"), ("response_flags", "UT")],
    );
    ensure_or_dump!(cluster, ut == 6.0, "504 UT counted {ut}, want 6");

    // 5. Mirrors: every request also reaches the shadow, with Envoy's -shadow host; the client
    // sees only the primary; the black hole (accepts, never answers) fails no request, and its
    // copies in flight are bounded: past 64, copies are dropped and counted.
    let mirrored =
        cluster.with_diagnostics(curl(client, &authority, &path("mirror"), MIRRORED, &[]))?;
    ensure_or_dump!(
        cluster,
        mirrored.count_code("200") == MIRRORED && mirrored.count("reviews HTTP/1.1") == MIRRORED,
        "the client must see only the primary's answers: {:?} {:?}",
        codes(&mirrored),
        mirrored
            .bodies
            .iter()
            .filter(|b| *b != "reviews HTTP/1.1")
            .take(5)
            .collect::<Vec<_>>()
    );
    let shadow_host = format!("{REVIEWS_VIP}-shadow:9080");
    let copies = requests_seen(&mut shadow_server, MIRRORED, |l| {
        l["path"]
            .as_str()
            .is_some_and(|p| p.starts_with("/mirror/"))
    });
    ensure_or_dump!(
        cluster,
        copies.len() == MIRRORED && copies.iter().all(|l| l["host"] == shadow_host.as_str()),
        "the shadow must get a copy of each of the {MIRRORED} requests with host \
         {shadow_host}: got {}, e.g. {:?}",
        copies.len(),
        copies.first()
    );
    // Whether a copy is sent or dropped is decided before the primary's answer goes back, so
    // the drops are all counted once curl has its answers; the answers of the shadow's copies
    // are counted when they arrive.
    let mirror_count = |service: &str, result: &str| -> Result<usize> {
        let metrics = waypoint_metrics(node0, waypoint)?;
        Ok(sum_series(
            &metrics,
            "ambit_waypoint_mirror_requests_total",
            &[("destination_service", service), ("result", result)],
        ) as usize)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut answered = mirror_count(&host("shadow"), "answered")?;
    while answered < MIRRORED && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        answered = mirror_count(&host("shadow"), "answered")?;
    }
    let dropped = mirror_count(&host("blackhole"), "dropped_overflow")?;
    let failed = mirror_count(&host("blackhole"), "failed")?;
    let swallowed = requests_seen(
        &mut blackhole_server,
        MIRRORED.saturating_sub(dropped),
        |l| {
            l["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/mirror/"))
        },
    );
    ensure_or_dump!(
        cluster,
        answered == MIRRORED
            && failed == 0
            && swallowed.len() <= MIRRORS_IN_FLIGHT
            && swallowed.len() + dropped == MIRRORED,
        "shadow answered {answered} (want {MIRRORED}); the black hole got {} copies (at most \
         {MIRRORS_IN_FLIGHT}), {dropped} were dropped (want the rest of {MIRRORED}) and \
         {failed} failed (want 0)",
        swallowed.len()
    );

    // 6. Fault injection hits its shares within 5 sigma: aborts (503, FI) and delays (DI).
    let aborted = cluster.with_diagnostics(curl(
        client,
        &authority,
        &path("abort"),
        ABORT_REQUESTS,
        &[],
    ))?;
    let (fi, ok) = (aborted.count_code("503"), aborted.count_code("200"));
    eprintln!("aborts: {fi} of {ABORT_REQUESTS}");
    ensure_or_dump!(
        cluster,
        fi + ok == ABORT_REQUESTS && (ABORT_LOW..=ABORT_HIGH).contains(&fi),
        "25% aborts: {fi} 503s and {ok} 200s of {ABORT_REQUESTS}, outside [{ABORT_LOW}, \
         {ABORT_HIGH}]"
    );
    let delayed = cluster.with_diagnostics(curl(
        client,
        &authority,
        &path("delay"),
        DELAY_REQUESTS,
        &[],
    ))?;
    ensure_or_dump!(
        cluster,
        delayed.count_code("200") == DELAY_REQUESTS,
        "delayed requests must succeed: {:?}",
        codes(&delayed)
    );
    let metrics = waypoint_metrics(node0, waypoint)?;
    let flagged = |code: &str, flag: &str| {
        sum_series(
            &metrics,
            "istio_requests_total",
            &[("response_code", code), ("response_flags", flag)],
        ) as usize
    };
    let (fi_counted, di) = (flagged("503", "FI"), flagged("200", "DI"));
    eprintln!("delays: {di} of {DELAY_REQUESTS}");
    ensure_or_dump!(
        cluster,
        fi_counted == fi && (DELAY_LOW..=DELAY_HIGH).contains(&di),
        "FI counted {fi_counted} (the client saw {fi}); DI {di} of {DELAY_REQUESTS}, bound \
         [{DELAY_LOW}, {DELAY_HIGH}]"
    );
    Ok(())
}
