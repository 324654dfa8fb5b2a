//! End-to-end test of the waypoint's tracing: a real `ambit waypoint` exporting over OTLP/gRPC
//! to a real receiver on the test bed (the collector's `TraceService`, `ambit_tests::otlp`),
//! curl as the application client sending its own trace context, and `testpod http` logging the
//! headers that reach it.
//!
//! ```text
//! n0: client p0-0 ──agent n0 (L4, no span)──HBONE──► waypoint p0-1: server span, client span per try
//!                                                      │ HBONE, traceparent = the try's span  ──OTLP──► receiver (fabric)
//! n1: reviews p1-0 ◄───────────────────────────────────┘
//! ```
//!
//! One trace must span client -> waypoint -> server: the waypoint's server span is the child of
//! the client's span, its client span the child of its server span, and the server receives a
//! `traceparent` naming that client span. Unsampled requests export nothing but still carry a
//! context; without a collector the headers pass untouched.

use std::time::Duration;

use ambit_tests::mesh::Routing;
use ambit_tests::otlp::{OtlpReceiver, ReceivedSpan};
use ambit_tests::waypoint::{self, curl_once, start_server, start_waypoint_with};
use ambit_tests::{Cluster, ClusterSpec, ensure_or_dump};
use anyhow::{Context, Result};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);
/// The client's trace of the sampled request, and its span (the waypoint's parent).
const SAMPLED_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
/// The trace of the request whose context says "not sampled".
const UNSAMPLED_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
/// The B3 (64-bit) trace of the retried request, and the client's span.
const B3_TRACE: &str = "a3ce929d0e0e4736";
const B3_SPAN: &str = "b7ad6b7169203331";

/// `reviews` with Istio's retry on 5xx (two more tries): a try the server fails shows as a
/// client span of its own.
fn retrying_route() -> Value {
    json!({
        "apiVersion": "networking.ambit.dev/v1",
        "kind": "VirtualService",
        "metadata": {"name": "reviews"},
        "spec": {
            "hosts": ["reviews"],
            "http": [{
                "retries": {"attempts": 2, "retryOn": "5xx"},
                "route": [{"destination": {"host": "reviews"}}]
            }]
        }
    })
}

/// The `traceparent` a request logged by `testpod http --log-requests` carried: trace id,
/// parent id, flags.
fn traceparent(request: &Value) -> Result<(String, String, String)> {
    let value = request["headers"]["traceparent"]
        .as_str()
        .with_context(|| format!("no traceparent reached the server: {request}"))?;
    let parts: Vec<&str> = value.split('-').collect();
    anyhow::ensure!(parts.len() == 4, "malformed traceparent {value:?}");
    Ok((parts[1].into(), parts[2].into(), parts[3].into()))
}

fn describe(spans: &[ReceivedSpan]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "{} kind {} trace {} span {} parent {} {:?}",
                s.span.name,
                s.span.kind,
                s.trace_id(),
                s.span_id(),
                s.parent_span_id(),
                s.span
                    .attributes
                    .iter()
                    .map(|kv| kv.key.as_str())
                    .collect::<Vec<_>>()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn waypoint_tracing_links_client_waypoint_and_server_spans() -> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 2,
    })?;
    let (client, waypoint_pod, reviews) = (cluster.pod(0, 0), cluster.pod(0, 1), cluster.pod(1, 0));
    let namespace = client.namespace();
    waypoint::prepare(
        &cluster,
        client,
        waypoint_pod,
        &[(reviews, &[], "reviews")],
        Routing {
            virtual_services: vec![retrying_route()],
            destination_rules: vec![],
        },
    )?;
    let receiver = OtlpReceiver::start(&cluster)?;
    let mut server = start_server(reviews, "reviews", &["--log-requests"])?;
    // Sampling 0%: only a caller's own sampling decision makes a trace.
    let endpoint = receiver.endpoint();
    let waypoint_process = cluster.with_diagnostics(start_waypoint_with(
        &cluster,
        waypoint_pod,
        &[
            "--tracing-otlp-endpoint",
            &endpoint,
            "--tracing-sampling",
            "0",
        ],
    ))?;
    let client_principal = format!(
        "spiffe://cluster.local/ns/{namespace}/sa/{}",
        client.service_account()
    );
    let reviews_principal = format!("spiffe://cluster.local/ns/{namespace}/sa/reviews");
    let cluster_name = format!("outbound|9080||reviews.{namespace}.svc.cluster.local");
    let seen = |server: &mut ambit_tests::PodProcess, path: &str| {
        server.read_json_until(T, |v| v["event"] == "request" && v["path"] == path)
    };

    // 1. Not sampled: a context saying so, and none at all. Nothing is exported, but the
    // server still gets a traceparent, in the caller's trace when there was one, naming the
    // waypoint's (unrecorded) span.
    let unsampled = format!("traceparent: 00-{UNSAMPLED_TRACE}-{CLIENT_SPAN}-00");
    let answer = curl_once(client, "/unsampled", &["-H", &unsampled])?;
    ensure_or_dump!(
        cluster,
        answer.status == 200,
        "unsampled request: {answer:?}"
    );
    let logged = cluster.with_diagnostics(seen(&mut server, "/unsampled"))?;
    let (trace, parent, flags) = traceparent(&logged)?;
    ensure_or_dump!(
        cluster,
        trace == UNSAMPLED_TRACE && parent != CLIENT_SPAN && flags == "00",
        "an unsampled request must reach the server in its trace, unsampled, with the \
         waypoint's span as parent: {logged}"
    );
    let answer = curl_once(client, "/no-context", &[])?;
    ensure_or_dump!(
        cluster,
        answer.status == 200,
        "request without context: {answer:?}"
    );
    let logged = cluster.with_diagnostics(seen(&mut server, "/no-context"))?;
    let (_, _, flags) = traceparent(&logged)?;
    ensure_or_dump!(
        cluster,
        flags == "00",
        "at 0% a request without context starts an unsampled trace: {logged}"
    );

    // 2. Sampled by the client (W3C): one trace across client -> waypoint -> server.
    let sampled = format!("traceparent: 00-{SAMPLED_TRACE}-{CLIENT_SPAN}-01");
    let answer = curl_once(
        client,
        "/sampled",
        &["-H", &sampled, "-H", "tracestate: vendor=client"],
    )?;
    ensure_or_dump!(cluster, answer.status == 200, "sampled request: {answer:?}");
    let logged = cluster.with_diagnostics(seen(&mut server, "/sampled"))?;
    let trace = cluster.with_diagnostics(receiver.wait_trace(SAMPLED_TRACE, 2, T))?;
    let servers: Vec<&ReceivedSpan> = trace.iter().filter(|s| s.is_server()).collect();
    let clients: Vec<&ReceivedSpan> = trace.iter().filter(|s| s.is_client()).collect();
    ensure_or_dump!(
        cluster,
        trace.len() == 2 && servers.len() == 1 && clients.len() == 1,
        "one server span and one client span expected:\n{}",
        describe(&trace)
    );
    let (server_span, client_span) = (servers[0], clients[0]);
    ensure_or_dump!(
        cluster,
        server_span.parent_span_id() == CLIENT_SPAN,
        "the waypoint's server span must be the child of the client's span {CLIENT_SPAN}:\n{}",
        describe(&trace)
    );
    ensure_or_dump!(
        cluster,
        client_span.parent_span_id() == server_span.span_id(),
        "the client span must be the child of the server span:\n{}",
        describe(&trace)
    );
    let (trace_id, parent, flags) = traceparent(&logged)?;
    ensure_or_dump!(
        cluster,
        trace_id == SAMPLED_TRACE && parent == client_span.span_id() && flags == "01",
        "the server must receive a traceparent naming the waypoint's client span {}: {logged}",
        client_span.span_id()
    );
    ensure_or_dump!(
        cluster,
        logged["headers"]["tracestate"] == "vendor=client",
        "tracestate must be propagated: {logged}"
    );
    for (span, key, want) in [
        (server_span, "http.status_code", "200"),
        (server_span, "response_flags", "-"),
        (server_span, "component", "proxy"),
        (server_span, "upstream_cluster", cluster_name.as_str()),
        (server_span, "source.principal", client_principal.as_str()),
        (
            server_span,
            "destination.principal",
            reviews_principal.as_str(),
        ),
        (server_span, "peer.address", &client.ip4().to_string()),
        (server_span, "istio.canonical_service", "waypoint"),
        (client_span, "http.status_code", "200"),
        (client_span, "upstream_cluster", cluster_name.as_str()),
        (
            client_span,
            "destination.principal",
            reviews_principal.as_str(),
        ),
        (
            client_span,
            "upstream_address",
            &reviews.addr4(8080).to_string(),
        ),
    ] {
        ensure_or_dump!(
            cluster,
            span.attribute(key).as_deref() == Some(want),
            "{} span: {key} = {:?}, want {want:?}",
            span.span.name,
            span.attribute(key)
        );
    }
    ensure_or_dump!(
        cluster,
        server_span.service == format!("waypoint.{namespace}"),
        "service.name {:?}",
        server_span.service
    );
    // Exports leave in order: the unsampled requests, made before, exported nothing.
    let all = receiver.spans();
    ensure_or_dump!(
        cluster,
        all.iter().all(|s| s.trace_id() == SAMPLED_TRACE),
        "only the sampled trace may be exported:\n{}",
        describe(&all)
    );

    // 3. Sampled by a B3 (multi-header, 64-bit) context, and retried once: one server span,
    // a client span per try, each try's request naming its own span in both W3C and B3.
    let answer = curl_once(
        client,
        "/retried",
        &[
            "-H",
            &format!("x-b3-traceid: {B3_TRACE}"),
            "-H",
            &format!("x-b3-spanid: {B3_SPAN}"),
            "-H",
            "x-b3-sampled: 1",
            "-H",
            "x-fail-first: 1",
        ],
    )?;
    ensure_or_dump!(cluster, answer.status == 200, "retried request: {answer:?}");
    let first = cluster.with_diagnostics(seen(&mut server, "/retried"))?;
    let second = cluster.with_diagnostics(seen(&mut server, "/retried"))?;
    let b3_trace = format!("{B3_TRACE:0>32}");
    let trace = cluster.with_diagnostics(receiver.wait_trace(&b3_trace, 3, T))?;
    let server_span = trace.iter().find(|s| s.is_server());
    let mut tries: Vec<&ReceivedSpan> = trace.iter().filter(|s| s.is_client()).collect();
    tries.sort_by_key(|s| s.span.start_time_unix_nano);
    ensure_or_dump!(
        cluster,
        trace.len() == 3 && tries.len() == 2 && server_span.is_some(),
        "one server span and two client spans expected:\n{}",
        describe(&trace)
    );
    let server_span = server_span.expect("checked");
    ensure_or_dump!(
        cluster,
        server_span.parent_span_id() == B3_SPAN
            && tries
                .iter()
                .all(|t| t.parent_span_id() == server_span.span_id()),
        "B3 parent, then server span, then the tries:\n{}",
        describe(&trace)
    );
    ensure_or_dump!(
        cluster,
        tries[0].attribute("http.status_code").as_deref() == Some("503")
            && tries[0].attribute("error").as_deref() == Some("true")
            && tries[1].attribute("http.status_code").as_deref() == Some("200")
            && tries[1].attribute("retry.count").as_deref() == Some("1")
            && server_span.attribute("http.status_code").as_deref() == Some("200"),
        "the failed try, then the retry that answered:\n{}",
        describe(&trace)
    );
    for (logged, span) in [(&first, tries[0]), (&second, tries[1])] {
        let (trace_id, parent, _) = traceparent(logged)?;
        ensure_or_dump!(
            cluster,
            trace_id == b3_trace
                && parent == span.span_id()
                && logged["headers"]["x-b3-spanid"] == span.span_id()
                && logged["headers"]["x-b3-parentspanid"] == server_span.span_id(),
            "each try must reach the server naming its own span ({}), W3C and B3: {logged}",
            span.span_id()
        );
    }
    drop(waypoint_process);

    // 4. Without a collector, tracing is off: the client's trace headers reach the server as
    // they were sent (a tracing waypoint rewrites both).
    let _plain = cluster.with_diagnostics(start_waypoint_with(&cluster, waypoint_pod, &[]))?;
    let answer = curl_once(
        client,
        "/off",
        &["-H", &sampled, "-H", &format!("b3: {B3_TRACE}-{B3_SPAN}-1")],
    )?;
    ensure_or_dump!(
        cluster,
        answer.status == 200,
        "request, tracing off: {answer:?}"
    );
    let logged = cluster.with_diagnostics(seen(&mut server, "/off"))?;
    let want_b3 = format!("{B3_TRACE}-{B3_SPAN}-1");
    ensure_or_dump!(
        cluster,
        logged["headers"]["traceparent"] == format!("00-{SAMPLED_TRACE}-{CLIENT_SPAN}-01")
            && logged["headers"]["b3"] == want_b3.as_str(),
        "with tracing off the trace headers must pass unchanged: {logged}"
    );
    Ok(())
}
