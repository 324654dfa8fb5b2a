//! End-to-end test of the waypoint's local rate limiting (`RateLimitPolicy` in the mesh file):
//! a real `ambit waypoint` between real agents, two client pods of different identities (their
//! service accounts), curl as the clients and a `testpod http` server.
//!
//! Topology (two nodes; the waypoint's tunnels to the server cross the fabric):
//!
//! ```text
//! n0: client-a p0-0, client-b p0-2 ──agent n0──HBONE──► waypoint p0-1 (`ambit waypoint`)
//!                                                        │ HBONE, the waypoint's identity
//! n1: reviews p1-0 ◄─────────────────────────────────────┘
//! ```
//!
//! The buckets refill once an hour, so the counts do not depend on how fast the bed runs; no
//! assertion is on time.

use ambit_tests::mesh::Routing;
use ambit_tests::waypoint::{
    self, REVIEWS_VIP, curl, curl_once, requests_total, start_server, start_waypoint,
    waypoint_metrics,
};
use ambit_tests::{Cluster, ClusterSpec, ensure_or_dump};
use anyhow::Result;
use serde_json::{Value, json};

/// Each client identity's bucket (the service's policy), and the burst sent.
const PER_IDENTITY: usize = 10;
const BURST: usize = 30;
/// Everyone's bucket of the route `shared` (its own policy).
const SHARED: usize = 5;

fn policy(name: &str, target: Value, buckets: Value) -> Value {
    let mut spec = json!({"targetRefs": [target]});
    if let (Some(spec), Some(buckets)) = (spec.as_object_mut(), buckets.as_object()) {
        for (k, v) in buckets {
            spec.insert(k.clone(), v.clone());
        }
    }
    json!({
        "apiVersion": "networking.ambit.dev/v1",
        "kind": "RateLimitPolicy",
        "metadata": {"name": name},
        "spec": spec
    })
}

fn bucket(max_tokens: usize) -> Value {
    json!({"maxTokens": max_tokens, "tokensPerFill": 1, "fillInterval": "1h"})
}

#[test]
fn waypoint_rate_limits_per_identity_and_per_route_with_429_rl() -> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 3,
    })?;
    let (client_a, waypoint, client_b) = (cluster.pod(0, 0), cluster.pod(0, 1), cluster.pod(0, 2));
    let reviews = cluster.pod(1, 0);
    client_a.set_service_account("client-a");
    client_b.set_service_account("client-b");
    cluster.set_labels(client_b, &[("app", "client")]);
    cluster.set_rate_limit_policies(vec![
        policy(
            "reviews-per-client",
            json!({"kind": "Service", "group": "", "name": "reviews"}),
            json!({
                "perIdentity": bucket(PER_IDENTITY),
                "enableXRatelimitHeaders": "DRAFT_VERSION_03"
            }),
        ),
        policy(
            "reviews-shared-route",
            json!({"kind": "Service", "name": "reviews", "sectionName": "shared"}),
            json!({"tokenBucket": bucket(SHARED)}),
        ),
    ]);
    let routes = json!({
        "apiVersion": "networking.ambit.dev/v1",
        "kind": "VirtualService",
        "metadata": {"name": "reviews"},
        "spec": {
            "hosts": ["reviews"],
            "http": [
                {
                    "name": "shared",
                    "match": [{"uri": {"prefix": "/shared"}}],
                    "route": [{"destination": {"host": "reviews"}}]
                },
                {"name": "default", "route": [{"destination": {"host": "reviews"}}]}
            ]
        }
    });
    waypoint::prepare(
        &cluster,
        client_a,
        waypoint,
        &[(reviews, &[], "reviews")],
        Routing {
            virtual_services: vec![routes],
            destination_rules: vec![],
        },
    )?;
    let _server = start_server(reviews, "reviews", &[])?;
    let _waypoint = cluster.with_diagnostics(start_waypoint(&cluster, waypoint))?;
    let authority = format!("{REVIEWS_VIP}:9080");

    // 1. A burst of client-a above its bucket: exactly the bucket's worth passes, the rest is
    // refused with 429 (none hangs or fails otherwise).
    let a = cluster.with_diagnostics(curl(client_a, &authority, "/reviews", BURST, &[]))?;
    ensure_or_dump!(
        cluster,
        a.count_code("200") == PER_IDENTITY && a.count_code("429") == BURST - PER_IDENTITY,
        "client-a's burst of {BURST}: want {PER_IDENTITY} x 200 and the rest 429, got {:?}",
        a.codes
    );
    let refused = cluster.with_diagnostics(curl_once(client_a, "/reviews/again", &[]))?;
    ensure_or_dump!(
        cluster,
        refused.status == 429
            && refused.body.trim() == "local_rate_limited"
            && refused.header("x-ratelimit-limit") == Some("10")
            && refused.header("x-ratelimit-remaining") == Some("0")
            && refused
                .header("x-ratelimit-reset")
                .and_then(|r| r.parse::<u64>().ok())
                .is_some_and(|r| r > 0),
        "a refused request is Envoy's 429 with the x-ratelimit headers: {refused:?}"
    );

    // 2. Another identity is unaffected: client-b has a full bucket of its own.
    let first = cluster.with_diagnostics(curl_once(client_b, "/reviews/first", &[]))?;
    ensure_or_dump!(
        cluster,
        first.status == 200
            && first.header("x-ratelimit-limit") == Some("10")
            && first.header("x-ratelimit-remaining") == Some("9"),
        "client-b's first request passes with its own bucket's headers: {first:?}"
    );
    let b = cluster.with_diagnostics(curl(client_b, &authority, "/reviews", BURST, &[]))?;
    ensure_or_dump!(
        cluster,
        b.count_code("200") == PER_IDENTITY - 1 && b.count_code("429") == BURST - PER_IDENTITY + 1,
        "client-b's burst gets the rest of its own bucket: {:?}",
        b.codes
    );

    // 3. The route `shared` has its own policy, which replaces the service's for its requests:
    // client-a, out of tokens for the service, still gets through there, and the route's one
    // bucket is shared by both identities.
    let a_shared = cluster.with_diagnostics(curl(client_a, &authority, "/shared", 3, &[]))?;
    let b_shared = cluster.with_diagnostics(curl(client_b, &authority, "/shared", 5, &[]))?;
    ensure_or_dump!(
        cluster,
        a_shared.count_code("200") == 3
            && b_shared.count_code("200") == SHARED - 3
            && b_shared.count_code("429") == 5 - (SHARED - 3),
        "the route's bucket of {SHARED} is shared: client-a {:?}, client-b {:?}",
        a_shared.codes,
        b_shared.codes
    );
    // The route's policy does not turn the x-ratelimit headers on (Envoy's default): a shared
    // bucket's level is not shown to its callers.
    let hidden = cluster.with_diagnostics(curl_once(client_a, "/shared/hidden", &[]))?;
    ensure_or_dump!(
        cluster,
        hidden.status == 429
            && hidden.body.trim() == "local_rate_limited"
            && hidden.header("x-ratelimit-remaining").is_none()
            && hidden.header("x-ratelimit-limit").is_none()
            && hidden.header("x-ratelimit-reset").is_none(),
        "without enableXRatelimitHeaders, no x-ratelimit header: {hidden:?}"
    );

    // 4. Every refusal is counted with Envoy's flag RL.
    let limited = (BURST - PER_IDENTITY) + 1 + (BURST - PER_IDENTITY + 1) + (5 - (SHARED - 3)) + 1;
    let metrics = waypoint_metrics(cluster.node(0), waypoint)?;
    let counted = requests_total(
        &metrics,
        &[("response_code", "429"), ("response_flags", "RL")],
    );
    ensure_or_dump!(
        cluster,
        counted == limited as f64,
        "istio_requests_total{{response_code=429,response_flags=RL}} = {counted}, want {limited}"
    );
    Ok(())
}
