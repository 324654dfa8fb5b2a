//! Routing resources: their conversion (the mesh file's rules, per resource), and the source
//! and the status writer against the fake API server.
use std::{collections::HashMap, sync::Arc, time::Duration};

use k8s_openapi::{
    api::core::v1::{Service as KubeService, ServicePort, ServiceSpec},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use serde_json::{Value, json};

use super::*;
use crate::{
    discovery::kube::{
        StatusWriter,
        security::PolicyCondition,
        tests::{Harness, WAIT, labels},
    },
    state::{ServicePort as ModelPort, WaypointRef, routes::StringMatch},
    testing::fake_apiserver::FakeApiServer,
};

fn meta(name: &str, created: i64) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some("shop".into()),
        creation_timestamp: Some(Time(
            jiff::Timestamp::from_second(1_700_000_000 + created).unwrap(),
        )),
        ..ObjectMeta::default()
    }
}

fn vs(name: &str, created: i64, spec: Value) -> Arc<VirtualServiceResource> {
    Arc::new(VirtualServiceResource {
        metadata: meta(name, created),
        spec,
        status: None,
    })
}

fn dr(name: &str, created: i64, spec: Value) -> Arc<DestinationRuleResource> {
    Arc::new(DestinationRuleResource {
        metadata: meta(name, created),
        spec,
        status: None,
    })
}

/// The seed's canary, as the spec of a `networking.ambit.dev/v1` VirtualService.
fn seed_vs() -> Value {
    json!({
        "hosts": ["reviews"],
        "http": [
            {"match": [{"headers": {"end-user": {"exact": "jason"}}}],
             "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
            {"route": [
                {"destination": {"host": "reviews", "subset": "v1"}, "weight": 90},
                {"destination": {"host": "reviews", "subset": "v2"}, "weight": 10},
            ]},
        ],
    })
}

fn seed_dr() -> Value {
    json!({
        "host": "reviews",
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ],
    })
}

fn reviews() -> Vec<Service> {
    vec![Service {
        name: "reviews".into(),
        namespace: "shop".into(),
        vips: vec!["10.96.0.30".parse().unwrap()],
        selector: [("app".to_string(), "reviews".to_string())].into(),
        endpoint_addresses: Vec::new(),
        ports: vec![ModelPort {
            port: 9080,
            target_port: 9080,
        }],
        waypoint: None,
    }]
}

fn key(kind: RouteKind, name: &str) -> RouteKey {
    RouteKey {
        kind,
        namespace: "shop".into(),
        name: name.into(),
    }
}

#[test]
fn the_seed_canary_converts_as_from_the_mesh_file() {
    let converted = convert_routes(
        &[vs("canary", 0, seed_vs())],
        &[dr("reviews", 0, seed_dr())],
        &reviews(),
        &HashMap::new(),
    );
    let routes = converted.table.for_service("shop/reviews").unwrap();
    assert_eq!(routes.source, "VirtualService shop/canary");
    assert_eq!(
        routes.http[0].matches[0].headers[0].value,
        Some(StringMatch::Exact("jason".into()))
    );
    let split: Vec<(&str, u32)> = routes.http[1]
        .destinations
        .iter()
        .map(|d| (d.subset.as_ref().unwrap().name.as_str(), d.weight))
        .collect();
    assert_eq!(split, [("v1", 90), ("v2", 10)]);
    assert_eq!(
        routes.http[1].destinations[0].service,
        WaypointRef {
            namespace: "shop".into(),
            name: "reviews".into()
        }
    );
    for kind in [RouteKind::VirtualService, RouteKind::DestinationRule] {
        let name = if kind == RouteKind::VirtualService {
            "canary"
        } else {
            "reviews"
        };
        assert!(converted.verdicts[&key(kind, name)].accepted());
    }
    assert_eq!(converted.in_force.len(), 2);
}

#[test]
fn rejections_name_the_field_and_keep_the_last_accepted_version() {
    let mut cors = seed_vs();
    cors["http"][1]["corsPolicy"] = json!({"allowOrigins": [{"exact": "x"}]});
    let mut bad_subset = seed_vs();
    bad_subset["http"][1]["route"][0]["destination"]["subset"] = json!("v3");
    let mut bad_regex = seed_vs();
    bad_regex["http"][0]["match"][0]["headers"]["end-user"] = json!({"regex": "("});
    let cases = [
        (
            cors,
            Verdict::UnsupportedField,
            "spec.http[1].corsPolicy: unknown field `corsPolicy`",
        ),
        (
            bad_subset,
            Verdict::Invalid,
            "spec.http[1].route[0].destination.subset: subset \"v3\"",
        ),
        (
            bad_regex,
            Verdict::Invalid,
            "spec.http[0].match[0].headers.end-user.regex:",
        ),
    ];
    let good = convert_routes(
        &[vs("canary", 0, seed_vs())],
        &[dr("reviews", 0, seed_dr())],
        &reviews(),
        &HashMap::new(),
    );
    for (spec, verdict, message) in cases {
        let resources = [vs("canary", 0, spec)];
        let rules = [dr("reviews", 0, seed_dr())];
        // Judged alone (the status writer), it is rejected and routes nothing.
        let alone = convert_routes(&resources, &rules, &reviews(), &HashMap::new());
        let acceptance = &alone.verdicts[&key(RouteKind::VirtualService, "canary")];
        assert_eq!(acceptance.verdict, verdict, "{acceptance:?}");
        assert!(acceptance.message.starts_with(message), "{acceptance:?}");
        assert!(alone.table.for_service("shop/reviews").is_none());
        // With its last accepted version (a source), that one stays in force.
        let kept = convert_routes(&resources, &rules, &reviews(), &good.in_force);
        assert_eq!(
            kept.verdicts[&key(RouteKind::VirtualService, "canary")],
            *acceptance
        );
        assert_eq!(kept.table, good.table);
        assert_eq!(kept.in_force, good.in_force);
    }
}

/// The seed's circuit breaker (only `apiVersion` changed, the spec as the API server keeps
/// it) converts as from the mesh file; a bad value and an unimplemented field are rejected
/// by name, keeping the last accepted version.
#[test]
fn the_seed_circuit_breaker_converts_and_bad_pool_fields_are_rejected_by_name() {
    let breaker = json!({
        "host": "reviews",
        "trafficPolicy": {
            "connectionPool": {
                "tcp": {"maxConnections": 100},
                "http": {"http1MaxPendingRequests": 10, "maxRequestsPerConnection": 2}
            },
            "outlierDetection": {
                "consecutiveErrors": 5,
                "interval": "30s",
                "baseEjectionTime": "30s",
                "maxEjectionPercent": 50
            }
        }
    });
    let good = convert_routes(
        &[],
        &[dr("reviews-circuit-breaker", 0, breaker.clone())],
        &reviews(),
        &HashMap::new(),
    );
    assert!(good.verdicts[&key(RouteKind::DestinationRule, "reviews-circuit-breaker")].accepted());
    let policy = &good.table.upstream["shop/reviews"];
    let pool = policy.connection_pool.as_ref().unwrap();
    assert_eq!(
        (
            pool.max_connections,
            pool.max_pending_requests,
            pool.max_requests_per_connection
        ),
        (100, 10, 2)
    );
    let outlier = policy.outlier_detection.as_ref().unwrap();
    assert_eq!(
        (outlier.consecutive_5xx, outlier.consecutive_gateway_errors),
        (0, 5)
    );

    let mut negative = breaker.clone();
    negative["trafficPolicy"]["connectionPool"]["http"]["http1MaxPendingRequests"] = json!(-1);
    let mut keepalive = breaker.clone();
    keepalive["trafficPolicy"]["connectionPool"]["tcp"]["tcpKeepalive"] = json!({"time": "1s"});
    let cases = [
        (
            negative,
            Verdict::Invalid,
            "spec.trafficPolicy.connectionPool.http.http1MaxPendingRequests: must be >= 0",
        ),
        (
            keepalive,
            Verdict::UnsupportedField,
            "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive: unknown field `tcpKeepalive`",
        ),
    ];
    for (spec, verdict, message) in cases {
        let rules = [dr("reviews-circuit-breaker", 0, spec)];
        let kept = convert_routes(&[], &rules, &reviews(), &good.in_force);
        let acceptance =
            &kept.verdicts[&key(RouteKind::DestinationRule, "reviews-circuit-breaker")];
        assert_eq!(acceptance.verdict, verdict, "{acceptance:?}");
        assert!(acceptance.message.starts_with(message), "{acceptance:?}");
        assert_eq!(kept.table, good.table);
    }
}

#[test]
fn the_oldest_resource_of_a_host_wins() {
    let converted = convert_routes(
        &[vs("newer", 5, seed_vs()), vs("older", 1, seed_vs())],
        &[dr("second", 5, seed_dr()), dr("first", 1, seed_dr())],
        &reviews(),
        &HashMap::new(),
    );
    assert_eq!(
        converted.table.for_service("shop/reviews").unwrap().source,
        "VirtualService shop/older"
    );
    let newer = &converted.verdicts[&key(RouteKind::VirtualService, "newer")];
    assert_eq!(newer.verdict, Verdict::Invalid);
    assert!(
        newer.message.starts_with(
            "spec.hosts[0]: service shop/reviews is already routed by VirtualService shop/older"
        ),
        "{newer:?}"
    );
    let second = &converted.verdicts[&key(RouteKind::DestinationRule, "second")];
    assert!(
        second
            .message
            .starts_with("spec.host: service shop/reviews already has DestinationRule shop/first"),
        "{second:?}"
    );
    // A host that is not a service.
    let mut ratings = seed_vs();
    ratings["hosts"] = json!(["ratings"]);
    let converted = convert_routes(
        &[vs("r", 0, ratings)],
        &[dr("reviews", 0, seed_dr())],
        &reviews(),
        &HashMap::new(),
    );
    let r = &converted.verdicts[&key(RouteKind::VirtualService, "r")];
    assert!(
        r.message
            .starts_with("spec.hosts[0]: \"ratings\" is not a service"),
        "{r:?}"
    );
}

fn kube_service(name: &str, vip: &str) -> KubeService {
    KubeService {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("shop".into()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(vip.into()),
            cluster_ips: Some(vec![vip.into()]),
            selector: labels(&[("app", name)]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 9080,
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

fn api_vs(spec: Value) -> VirtualServiceResource {
    VirtualServiceResource {
        metadata: ObjectMeta {
            name: Some("canary".into()),
            namespace: Some("shop".into()),
            ..ObjectMeta::default()
        },
        spec,
        status: None,
    }
}

fn api_dr() -> DestinationRuleResource {
    DestinationRuleResource {
        metadata: ObjectMeta {
            name: Some("reviews".into()),
            namespace: Some("shop".into()),
            ..ObjectMeta::default()
        },
        spec: seed_dr(),
        status: None,
    }
}

/// Waits for the `Accepted` condition of VirtualService `shop/canary` to satisfy `f`.
async fn wait_condition(
    server: &FakeApiServer,
    f: impl Fn(&PolicyCondition) -> bool,
) -> PolicyCondition {
    tokio::time::timeout(WAIT, async {
        loop {
            let condition = server
                .get::<VirtualServiceResource>("shop", "canary")
                .and_then(|r| r.status)
                .and_then(|s| s.accepted().cloned());
            if let Some(condition) = condition.filter(|c| f(c)) {
                return condition;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "timed out waiting for the condition: {:?}",
            server.get::<VirtualServiceResource>("shop", "canary")
        )
    })
}

#[tokio::test]
async fn a_virtual_service_from_the_api_takes_effect_and_a_rejected_edit_keeps_it() {
    let server = FakeApiServer::start().await.unwrap();
    server.register_with_status::<VirtualServiceResource>();
    server.register_with_status::<DestinationRuleResource>();
    server.apply(&kube_service("reviews", "10.96.0.30"));
    server.apply(&api_dr());
    server.apply(&api_vs(seed_vs()));
    let writer = StatusWriter::new(server.client(), "ambit-system")
        .reporting_instance("test")
        .retry_interval(Duration::from_millis(50));
    let status = tokio::spawn(super::super::route_status::RouteStatusWriter::new(writer).run());
    let mut harness = Harness::with_server(server.clone()).await;

    let state = harness
        .wait_state("the canary's routes", |s| {
            s.routes().for_service("shop/reviews").is_some()
        })
        .await;
    let routes = state.routes().for_service("shop/reviews").unwrap();
    assert_eq!(routes.source, "VirtualService shop/canary");
    assert_eq!(routes.http.len(), 2);
    let accepted = wait_condition(&server, |c| c.status == "True").await;
    assert_eq!(accepted.reason, "Accepted");

    // An edit with a field the waypoint does not implement: rejected with a condition naming
    // it, and the routes in force stay the previous version's.
    let before = state.routes().clone();
    server.modify::<VirtualServiceResource>("shop", "canary", |vs| {
        vs.spec["http"][1]["corsPolicy"] = json!({"allowOrigins": [{"exact": "x"}]});
        vs.spec["http"][1]["route"][0]["weight"] = json!(50);
        vs.spec["http"][1]["route"][1]["weight"] = json!(50);
    });
    let rejected = wait_condition(&server, |c| c.status == "False").await;
    assert_eq!(rejected.reason, "UnsupportedField");
    assert!(
        rejected
            .message
            .starts_with("spec.http[1].corsPolicy: unknown field `corsPolicy`"),
        "{rejected:?}"
    );
    assert_eq!(rejected.observed_generation, Some(2));
    assert_eq!(*harness.state.borrow().routes(), before);

    // Fixed: the new version takes effect.
    server.modify::<VirtualServiceResource>("shop", "canary", |vs| {
        vs.spec["http"][1]
            .as_object_mut()
            .unwrap()
            .remove("corsPolicy");
    });
    let state = harness
        .wait_state("the 50/50 split", |s| {
            s.routes()
                .for_service("shop/reviews")
                .is_some_and(|r| r.http[1].destinations[0].weight == 50)
        })
        .await;
    assert_ne!(*state.routes(), before);
    wait_condition(&server, |c| c.status == "True").await;

    // Deleted: the service is routed to itself again.
    server.delete::<VirtualServiceResource>("shop", "canary");
    harness
        .wait_state("no routes", |s| {
            s.routes().for_service("shop/reviews").is_none()
        })
        .await;
    assert!(!status.is_finished());
    status.abort();
}
