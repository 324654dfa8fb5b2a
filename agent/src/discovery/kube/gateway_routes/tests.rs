//! Gateway API routes: their conversion per resource (verdicts, order, last accepted version),
//! and the source and the status writer against the fake API server.
use std::time::Duration;

use k8s_openapi::{
    api::core::v1::{Service as KubeService, ServicePort, ServiceSpec},
    apimachinery::pkg::apis::meta::v1::Time,
};
use serde_json::json;

use super::*;
use crate::{
    discovery::kube::{
        StatusWriter,
        routes::VirtualServiceResource,
        tests::{Harness, WAIT, labels},
        waypoint_controller::CONTROLLER_NAME,
    },
    state::ServicePort as ModelPort,
    testing::fake_apiserver::FakeApiServer,
};

fn meta(name: &str, created: i64) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some("shop".into()),
        generation: Some(1),
        creation_timestamp: Some(Time(
            jiff::Timestamp::from_second(1_700_000_000 + created).unwrap(),
        )),
        ..ObjectMeta::default()
    }
}

fn http(name: &str, created: i64, spec: Value) -> Arc<HttpRouteResource> {
    Arc::new(HttpRouteResource {
        metadata: meta(name, created),
        spec,
        status: None,
    })
}

/// The seed's canary as an HTTPRoute: `end-user: jason` to v2, else 90/10.
fn seed() -> Value {
    json!({
        "parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "port": 9080}],
        "rules": [
            {"matches": [{"headers": [{"name": "end-user", "value": "jason"}]}],
             "backendRefs": [{"name": "reviews-v2", "port": 9080}]},
            {"backendRefs": [
                {"name": "reviews-v1", "port": 9080, "weight": 90},
                {"name": "reviews-v2", "port": 9080, "weight": 10},
            ]},
        ],
    })
}

fn model_service(name: &str, vip: &str) -> Service {
    Service {
        name: name.into(),
        namespace: "shop".into(),
        vips: vec![vip.parse().unwrap()],
        selector: [("app".to_string(), name.to_string())].into(),
        endpoint_addresses: Vec::new(),
        ports: vec![ModelPort {
            port: 9080,
            target_port: 9080,
        }],
        waypoint: None,
    }
}

fn services() -> Vec<Service> {
    vec![
        model_service("reviews", "10.96.0.30"),
        model_service("reviews-v1", "10.96.0.31"),
        model_service("reviews-v2", "10.96.0.32"),
    ]
}

fn key(name: &str) -> RouteKey {
    RouteKey {
        kind: RouteKind::HttpRoute,
        namespace: "shop".into(),
        name: name.into(),
    }
}

#[test]
fn the_seed_converts_and_each_service_parent_gets_a_verdict() {
    let converted = convert_gateway_routes(
        &[http("canary", 0, seed())],
        &[],
        &services(),
        &HashMap::new(),
    );
    let routes = &converted.by_service["shop/reviews"];
    assert_eq!(routes.source, "HTTPRoute shop/canary");
    assert_eq!(routes.http.len(), 2);
    let verdicts = &converted.verdicts[&key("canary")];
    assert_eq!(verdicts.len(), 1);
    assert_eq!(verdicts[0].parent_ref["name"], "reviews");
    assert!(verdicts[0].accepted.status);
    assert_eq!(verdicts[0].accepted.reason, "Accepted");
    assert!(verdicts[0].resolved_refs.status);
    assert_eq!(converted.in_force.len(), 1);

    // A route of Gateways only is not Ambit's: no verdict, no routes.
    let mut ingress = seed();
    ingress["parentRefs"] = json!([{"name": "public-gateway"}]);
    let converted = convert_gateway_routes(
        &[http("ingress", 0, ingress)],
        &[],
        &services(),
        &HashMap::new(),
    );
    assert!(converted.verdicts.is_empty() && converted.by_service.is_empty());
}

#[test]
fn rejections_carry_the_gateway_api_reason_and_keep_the_last_accepted_version() {
    let good = convert_gateway_routes(
        &[http("canary", 0, seed())],
        &[],
        &services(),
        &HashMap::new(),
    );
    let mut persistent = seed();
    persistent["rules"][1]["sessionPersistence"] = json!({"sessionName": "s"});
    let mut cors = seed();
    cors["rules"][1]["filters"] = json!([{"type": "CORS", "cors": {"allowOrigins": ["*"]}}]);
    let mut missing_parent = seed();
    missing_parent["parentRefs"][0]["name"] = json!("ratings");
    for (spec, reason, message) in [
        (
            persistent,
            "UnsupportedValue",
            "spec.rules[1].sessionPersistence: not supported",
        ),
        (
            cors,
            "UnsupportedValue",
            "spec.rules[1].filters[0].type: CORS filters are not supported",
        ),
        (
            missing_parent,
            "NoMatchingParent",
            "spec.parentRefs[0].name: shop/ratings is not a service of the mesh",
        ),
    ] {
        let resources = [http("canary", 0, spec)];
        // Judged alone (the status writer).
        let alone = convert_gateway_routes(&resources, &[], &services(), &HashMap::new());
        let verdict = &alone.verdicts[&key("canary")][0];
        assert!(!verdict.accepted.status);
        assert_eq!(verdict.accepted.reason, reason);
        assert!(verdict.accepted.message.starts_with(message), "{verdict:?}");
        assert!(alone.by_service.is_empty());
        // With its last accepted version (a source), that one stays in force; a parent that
        // does not exist is no rejection of the whole route, only of that parent.
        let kept = convert_gateway_routes(&resources, &[], &services(), &good.in_force);
        if reason != "NoMatchingParent" {
            assert_eq!(kept.by_service, good.by_service);
            assert_eq!(kept.in_force, good.in_force);
        }
    }
}

#[test]
fn unresolved_backends_answer_500_and_say_so_in_resolved_refs() {
    let mut spec = seed();
    spec["rules"][1]["backendRefs"][0]["name"] = json!("reviews-v9");
    spec["rules"][0]["backendRefs"][0]["kind"] = json!("ServiceImport");
    spec["rules"][0]["backendRefs"][0]["group"] = json!("multicluster.x-k8s.io");
    let converted = convert_gateway_routes(
        &[http("canary", 0, spec)],
        &[],
        &services(),
        &HashMap::new(),
    );
    let verdict = &converted.verdicts[&key("canary")][0];
    assert!(verdict.accepted.status, "{verdict:?}");
    assert!(!verdict.resolved_refs.status);
    assert_eq!(verdict.resolved_refs.reason, "InvalidKind");
    assert!(
        verdict
            .resolved_refs
            .message
            .contains("spec.rules[1].backendRefs[0].name: shop/reviews-v9 is not a service"),
        "{verdict:?}"
    );
    let routes = &converted.by_service["shop/reviews"];
    for route in &routes.http {
        assert!(route.destinations.is_empty());
        assert_eq!(route.filters.direct_response.as_ref().unwrap().status, 500);
    }
}

#[test]
fn routes_of_one_service_merge_oldest_first() {
    let mut older = seed();
    older["rules"] = json!([{"matches": [{"path": {"value": "/api"}}],
                             "backendRefs": [{"name": "reviews-v1", "port": 9080}]}]);
    let mut newer = seed();
    newer["rules"] = json!([{"matches": [{"path": {"value": "/api"}}],
                             "backendRefs": [{"name": "reviews-v2", "port": 9080}]}]);
    let converted = convert_gateway_routes(
        &[http("b-newer", 5, newer), http("a-older", 1, older)],
        &[],
        &services(),
        &HashMap::new(),
    );
    let routes = &converted.by_service["shop/reviews"];
    assert_eq!(
        routes.source,
        "HTTPRoute shop/a-older, HTTPRoute shop/b-newer"
    );
    assert_eq!(routes.http[0].destinations[0].service.name, "reviews-v1");
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

/// Waits for Ambit's `status.parents[]` entry of HTTPRoute `shop/canary` to satisfy `f`.
async fn wait_parent(server: &FakeApiServer, f: impl Fn(&Value) -> bool) -> Value {
    tokio::time::timeout(WAIT, async {
        loop {
            let parent = server
                .get::<HttpRouteResource>("shop", "canary")
                .and_then(|r| r.status)
                .and_then(|s| {
                    s["parents"]
                        .as_array()?
                        .iter()
                        .find(|p| p["controllerName"] == CONTROLLER_NAME)
                        .cloned()
                });
            if let Some(parent) = parent.filter(|p| f(p)) {
                return parent;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "timed out waiting for the route's status: {:?}",
            server.get::<HttpRouteResource>("shop", "canary")
        )
    })
}

fn condition<'v>(parent: &'v Value, type_: &str) -> &'v Value {
    parent["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap()
}

#[tokio::test]
async fn an_http_route_from_the_api_takes_effect_with_gateway_api_status() {
    let server = FakeApiServer::start().await.unwrap();
    server.register_with_status::<HttpRouteResource>();
    server.register_with_status::<GrpcRouteResource>();
    server.register_with_status::<VirtualServiceResource>();
    for (name, vip) in [
        ("reviews", "10.96.0.30"),
        ("reviews-v1", "10.96.0.31"),
        ("reviews-v2", "10.96.0.32"),
    ] {
        server.apply(&kube_service(name, vip));
    }
    // Another controller's entry for a Gateway parent of the same route: kept as it is.
    let foreign = json!({
        "parentRef": {"name": "public"},
        "controllerName": "example.com/gateway",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                        "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    });
    let mut spec = seed();
    spec["parentRefs"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "public"}));
    server.apply(&HttpRouteResource {
        metadata: ObjectMeta {
            name: Some("canary".into()),
            namespace: Some("shop".into()),
            ..ObjectMeta::default()
        },
        spec,
        status: Some(json!({"parents": [foreign.clone()]})),
    });
    // A VirtualService of the same service: the Gateway API routes win.
    server.apply(&VirtualServiceResource {
        metadata: ObjectMeta {
            name: Some("old".into()),
            namespace: Some("shop".into()),
            ..ObjectMeta::default()
        },
        spec: json!({"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews-v1"}}]}]}),
        status: None,
    });
    let writer = StatusWriter::new(server.client(), "ambit-system")
        .reporting_instance("test")
        .retry_interval(Duration::from_millis(50));
    let status = tokio::spawn(super::super::route_status::RouteStatusWriter::new(writer).run());
    let mut harness = Harness::with_server(server.clone()).await;

    let state = harness
        .wait_state("the HTTPRoute's routes", |s| {
            s.routes()
                .for_service("shop/reviews")
                .is_some_and(|r| r.source == "HTTPRoute shop/canary")
        })
        .await;
    let routes = state.routes().for_service("shop/reviews").unwrap();
    assert_eq!(routes.http.len(), 2);
    assert_eq!(routes.http[1].destinations[0].weight, 90);
    let accepted = wait_parent(&server, |p| condition(p, "Accepted")["status"] == "True").await;
    assert_eq!(accepted["parentRef"]["kind"], "Service");
    assert_eq!(accepted["parentRef"]["port"], 9080);
    assert_eq!(condition(&accepted, "Accepted")["reason"], "Accepted");
    assert_eq!(condition(&accepted, "ResolvedRefs")["status"], "True");
    let stored = server.get::<HttpRouteResource>("shop", "canary").unwrap();
    let parents = stored.status.unwrap()["parents"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(parents.len(), 2, "{parents:?}");
    assert!(parents.contains(&foreign));

    // An unsupported field: Accepted=False, UnsupportedValue, naming it; the routes in force
    // stay the previous version's.
    let before = state.routes().clone();
    server.modify::<HttpRouteResource>("shop", "canary", |r| {
        r.spec["rules"][1]["sessionPersistence"] = json!({"sessionName": "s"});
        r.spec["rules"][1]["backendRefs"][0]["weight"] = json!(50);
    });
    let rejected = wait_parent(&server, |p| condition(p, "Accepted")["status"] == "False").await;
    let accepted = condition(&rejected, "Accepted");
    assert_eq!(accepted["reason"], "UnsupportedValue");
    assert!(
        accepted["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.rules[1].sessionPersistence: not supported"),
        "{accepted}"
    );
    assert_eq!(*harness.state.borrow().routes(), before);

    // A backend that does not exist: accepted, ResolvedRefs=False BackendNotFound, and the rule
    // answers 500.
    server.modify::<HttpRouteResource>("shop", "canary", |r| {
        r.spec["rules"][1]
            .as_object_mut()
            .unwrap()
            .remove("sessionPersistence");
        r.spec["rules"][1]["backendRefs"][0]["name"] = json!("reviews-v9");
    });
    let unresolved = wait_parent(&server, |p| {
        condition(p, "Accepted")["status"] == "True"
            && condition(p, "ResolvedRefs")["status"] == "False"
    })
    .await;
    assert_eq!(
        condition(&unresolved, "ResolvedRefs")["reason"],
        "BackendNotFound"
    );
    harness
        .wait_state("the 500 rule", |s| {
            s.routes().for_service("shop/reviews").is_some_and(|r| {
                r.http[1]
                    .filters
                    .direct_response
                    .as_ref()
                    .is_some_and(|d| d.status == 500)
            })
        })
        .await;

    // Deleted: the VirtualService routes the service again.
    server.delete::<HttpRouteResource>("shop", "canary");
    harness
        .wait_state("the VirtualService's routes", |s| {
            s.routes()
                .for_service("shop/reviews")
                .is_some_and(|r| r.source == "VirtualService shop/old")
        })
        .await;
    assert!(!status.is_finished());
    status.abort();
}
