use std::{path::Path, time::Duration};

use crate::{
    discovery::parse_mesh,
    state::{
        MeshState,
        routes::{HttpRoute, ServiceRoutes, StringMatch},
    },
};

const MESH: &str = r#"
workloads:
- {name: reviews-0, namespace: shop, node: n0, ips: [10.10.0.3], labels: {app: reviews}, netns: {pid: 1}}
services:
- {name: reviews, namespace: shop, vips: [10.96.0.10], selector: {app: reviews}, ports: [{port: 9080}, {port: 9090}], waypoint: {name: waypoint}}
- {name: reviews-v1, namespace: shop, vips: [10.96.0.11], selector: {app: reviews, version: v1}, ports: [{port: 9080}]}
- {name: reviews-v2, namespace: shop, vips: [10.96.0.12], selector: {app: reviews, version: v2}, ports: [{port: 9080}]}
- {name: shadow, namespace: shop, vips: [10.96.0.13], selector: {app: shadow}, ports: [{port: 9080}]}
- {name: waypoint, namespace: shop, vips: [10.96.0.20], selector: {app: waypoint}, ports: [{port: 15008}]}
"#;

/// The seed's example as an HTTPRoute: `end-user: jason` to v2, else 90/10 v1/v2.
const SEED: &str = r#"
httpRoutes:
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {name: reviews, namespace: shop}
  spec:
    parentRefs:
    - {group: "", kind: Service, name: reviews, port: 9080}
    rules:
    - matches:
      - headers: [{name: End-User, value: jason}]
      backendRefs:
      - {name: reviews-v2, port: 9080}
    - backendRefs:
      - {name: reviews-v1, port: 9080, weight: 90}
      - {name: reviews-v2, port: 9080, weight: 10}
"#;

fn parse(yaml: &str) -> Result<MeshState, String> {
    parse_mesh(
        Path::new("/etc/mesh.yaml"),
        format!("{MESH}{yaml}").as_bytes(),
    )
    .map_err(|e| e.to_string())
}

fn routes(yaml: &str) -> ServiceRoutes {
    let state = parse(yaml).unwrap();
    state.routes().for_service("shop/reviews").unwrap().clone()
}

/// The error for the seed with `from` replaced by `to`.
fn error(from: &str, to: &str) -> String {
    assert!(SEED.contains(from), "{from}");
    parse(&SEED.replacen(from, to, 1)).unwrap_err()
}

fn uri(route: &HttpRoute) -> &StringMatch {
    route.matches[0].uri.as_ref().unwrap()
}

#[test]
fn the_seed_example_converts_to_a_header_match_and_a_weighted_split() {
    let routes = routes(SEED);
    assert_eq!(routes.source, "HTTPRoute shop/reviews");
    assert_eq!(routes.http.len(), 2);
    let jason = &routes.http[0];
    assert_eq!(
        jason.name.as_deref(),
        Some("HTTPRoute shop/reviews rules[0]")
    );
    let m = &jason.matches[0];
    // Header names are case-insensitive: kept lower case.
    assert_eq!(m.headers[0].name, "end-user");
    assert_eq!(m.headers[0].value, Some(StringMatch::Exact("jason".into())));
    // The parentRef's port narrows the route to it.
    assert_eq!(m.port, Some(9080));
    assert_eq!(jason.destinations[0].service.name, "reviews-v2");
    assert_eq!(jason.destinations[0].port, Some(9080));
    // A backendRef without weight weighs 1.
    assert_eq!(jason.destinations[0].weight, 1);
    let split: Vec<(&str, u32)> = routes.http[1]
        .destinations
        .iter()
        .map(|d| (d.service.name.as_str(), d.weight))
        .collect();
    assert_eq!(split, [("reviews-v1", 90), ("reviews-v2", 10)]);
    // A rule without matches matches every path (PathPrefix /).
    assert_eq!(uri(&routes.http[1]), &StringMatch::PathPrefix("/".into()));
    assert!(routes.http[1].matches[0].headers.is_empty());
}

#[test]
fn every_match_kind_converts() {
    let routes = routes(
        r#"
httpRoutes:
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {name: reviews, namespace: shop}
  spec:
    parentRefs: [{kind: Service, group: "", name: reviews}]
    rules:
    - name: all
      matches:
      - path: {type: RegularExpression, value: "/api/v[0-9]+/.*"}
        method: PUT
        headers:
        - {name: x-user, type: RegularExpression, value: "j.*"}
        - {name: X-User, value: ignored-as-a-duplicate}
        queryParams:
        - {name: debug, value: "1"}
        - {name: v, type: RegularExpression, value: "[0-9]"}
      - path: {type: Exact, value: /exact}
      backendRefs: [{name: reviews-v1, port: 9080}]
"#,
    );
    let regex = &routes
        .http
        .iter()
        .find(|r| r.matches[0].method.is_some())
        .unwrap()
        .matches[0];
    assert!(matches!(&regex.uri, Some(StringMatch::Regex(r)) if r.as_str() == "/api/v[0-9]+/.*"));
    assert_eq!(regex.method, Some(StringMatch::Exact("PUT".into())));
    assert_eq!(regex.headers.len(), 1, "the first of equal names only");
    assert!(matches!(&regex.headers[0].value, Some(StringMatch::Regex(r)) if r.as_str() == "j.*"));
    assert_eq!(regex.query_params[0].name, "debug");
    assert_eq!(
        regex.query_params[0].value,
        Some(StringMatch::Exact("1".into()))
    );
    assert!(matches!(
        &regex.query_params[1].value,
        Some(StringMatch::Regex(_))
    ));
    // No parentRef port: any port.
    assert_eq!(regex.port, None);
    // Each match is a route of its own, ranked: the exact path first.
    assert_eq!(uri(&routes.http[0]), &StringMatch::Exact("/exact".into()));
    assert_eq!(
        routes.http[0].name.as_deref(),
        Some("HTTPRoute shop/reviews all")
    );
}

#[test]
fn precedence_follows_the_gateway_api_across_rules_and_routes() {
    let routes = routes(
        r#"
httpRoutes:
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {name: a, namespace: shop}
  spec:
    parentRefs: [{kind: Service, group: "", name: reviews}]
    rules:
    - matches: [{path: {value: /}}]
      backendRefs: [{name: reviews-v1, port: 9080}]
    - matches: [{path: {value: /api}}]
      backendRefs: [{name: reviews-v1, port: 9080}]
    - matches: [{path: {value: /api}, headers: [{name: a, value: "1"}]}]
      backendRefs: [{name: reviews-v1, port: 9080}]
    - matches: [{path: {value: /api}, method: GET}]
      backendRefs: [{name: reviews-v1, port: 9080}]
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {name: b, namespace: shop}
  spec:
    parentRefs: [{kind: Service, group: "", name: reviews}]
    rules:
    - matches: [{path: {value: /api/books}}]
      backendRefs: [{name: reviews-v2, port: 9080}]
    - matches: [{path: {type: Exact, value: /api}}]
      backendRefs: [{name: reviews-v2, port: 9080}]
    - matches: [{path: {value: /api}, queryParams: [{name: q, value: "1"}]}]
      backendRefs: [{name: reviews-v2, port: 9080}]
    - matches: [{path: {value: /api}}]
      backendRefs: [{name: reviews-v2, port: 9080}]
"#,
    );
    assert_eq!(routes.source, "HTTPRoute shop/a, HTTPRoute shop/b");
    let order: Vec<&str> = routes
        .http
        .iter()
        .map(|r| r.name.as_deref().unwrap())
        .collect();
    assert_eq!(
        order,
        [
            // Exact path first.
            "HTTPRoute shop/b rules[1]",
            // The longest prefix.
            "HTTPRoute shop/b rules[0]",
            // Among /api: a method, then more headers, then more query parameters.
            "HTTPRoute shop/a rules[3]",
            "HTTPRoute shop/a rules[2]",
            "HTTPRoute shop/b rules[2]",
            // Ties: the older route (first in the file), then the rule order.
            "HTTPRoute shop/a rules[1]",
            "HTTPRoute shop/b rules[3]",
            "HTTPRoute shop/a rules[0]",
        ]
    );
}

#[test]
fn filters_timeouts_and_mirrors_convert() {
    let routes = routes(
        r#"
httpRoutes:
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {name: reviews, namespace: shop}
  spec:
    parentRefs: [{kind: Service, group: "", name: reviews, port: 9080}]
    rules:
    - matches: [{path: {value: /old}}]
      filters:
      - type: RequestRedirect
        requestRedirect: {scheme: https, hostname: shop.example, port: 8443, statusCode: 301, path: {type: ReplaceFullPath, replaceFullPath: /new}}
    - matches: [{path: {value: /api}}]
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier:
          set: [{name: X-Route, value: api}]
          add: [{name: x-added, value: "1"}]
          remove: [x-secret]
      - type: ResponseHeaderModifier
        responseHeaderModifier: {set: [{name: x-resp, value: "yes"}]}
      - type: URLRewrite
        urlRewrite: {hostname: reviews.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
      - type: RequestMirror
        requestMirror: {backendRef: {name: shadow, port: 9080}, percent: 25}
      - type: RequestMirror
        requestMirror: {backendRef: {name: shadow, port: 9080}, fraction: {numerator: 1, denominator: 3}}
      timeouts: {request: 10s, backendRequest: 2s}
      backendRefs:
      - name: reviews-v1
        port: 9080
        filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {set: [{name: x-dest, value: v1}]}
    - matches: [{path: {type: Exact, value: /full}}]
      filters:
      - type: URLRewrite
        urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /other}}
      timeouts: {request: 0s}
      backendRefs: [{name: reviews-v1, port: 9080}]
"#,
    );
    let by_name = |name: &str| {
        routes
            .http
            .iter()
            .find(|r| r.name.as_deref() == Some(&format!("HTTPRoute shop/reviews {name}")))
            .unwrap()
    };
    let old = by_name("rules[0]");
    let redirect = old.filters.redirect.as_ref().unwrap();
    assert_eq!(redirect.uri.as_deref(), Some("/new"));
    assert_eq!(redirect.authority.as_deref(), Some("shop.example"));
    assert_eq!(redirect.port, Some(8443));
    assert_eq!(redirect.scheme.as_deref(), Some("https"));
    assert_eq!(redirect.code, 301);
    assert!(old.destinations.is_empty());

    let api = by_name("rules[1]");
    assert_eq!(
        api.filters.headers.request.set,
        [("x-route".to_string(), "api".to_string())]
    );
    assert_eq!(
        api.filters.headers.request.add,
        [("x-added".to_string(), "1".to_string())]
    );
    assert_eq!(api.filters.headers.request.remove, ["x-secret"]);
    assert_eq!(
        api.filters.headers.response.set,
        [("x-resp".to_string(), "yes".to_string())]
    );
    let rewrite = api.filters.rewrite.as_ref().unwrap();
    assert_eq!(rewrite.uri.as_deref(), Some("/v2"));
    assert_eq!(rewrite.authority.as_deref(), Some("reviews.internal"));
    assert!(!rewrite.full_path);
    let mirrors: Vec<(&str, u32)> = api
        .resilience
        .mirrors
        .iter()
        .map(|m| (m.destination.service.name.as_str(), m.per_million))
        .collect();
    assert_eq!(mirrors, [("shadow", 250_000), ("shadow", 333_333)]);
    assert_eq!(api.resilience.timeout, Some(Duration::from_secs(10)));
    assert_eq!(
        api.resilience.retries.per_try_timeout,
        Some(Duration::from_secs(2))
    );
    assert_eq!(
        api.destinations[0].headers.request.set,
        [("x-dest".to_string(), "v1".to_string())]
    );

    let full = by_name("rules[2]");
    assert!(full.filters.rewrite.as_ref().unwrap().full_path);
    // `0s`: no timeout.
    assert_eq!(full.resilience.timeout, None);

    // A redirect's status defaults to the Gateway API's 302.
    let state = parse(&SEED.replace(
        "      backendRefs:\n      - {name: reviews-v2, port: 9080}\n",
        "      filters: [{type: RequestRedirect, requestRedirect: {hostname: elsewhere}}]\n",
    ))
    .unwrap();
    let routes = state.routes().for_service("shop/reviews").unwrap();
    assert_eq!(routes.http[0].filters.redirect.as_ref().unwrap().code, 302);
}

#[test]
fn a_rule_without_backends_answers_500() {
    let state = parse(
        &SEED
            .replace("weight: 90", "weight: 0")
            .replace("weight: 10", "weight: 0"),
    )
    .unwrap();
    let routes = state.routes().for_service("shop/reviews").unwrap();
    assert!(routes.http[1].destinations.is_empty());
    assert_eq!(
        routes.http[1]
            .filters
            .direct_response
            .as_ref()
            .unwrap()
            .status,
        500
    );
}

#[test]
fn grpc_routes_match_methods_and_go_before_http_routes() {
    let state = parse(&format!(
        "{SEED}{}",
        r#"
grpcRoutes:
- apiVersion: gateway.networking.k8s.io/v1
  kind: GRPCRoute
  metadata: {name: reviews, namespace: shop}
  spec:
    parentRefs: [{kind: Service, group: "", name: reviews}]
    rules:
    - matches:
      - method: {service: reviews.Reviews}
        headers: [{name: x-canary, value: "yes"}]
      - method: {service: reviews.Reviews, method: Get}
      - method: {type: RegularExpression, method: "List.*"}
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: {set: [{name: x-grpc, value: "1"}]}
      backendRefs: [{name: reviews-v2, port: 9080}]
"#
    ))
    .unwrap();
    let routes = state.routes().for_service("shop/reviews").unwrap();
    assert_eq!(
        routes.source,
        "HTTPRoute shop/reviews, GRPCRoute shop/reviews"
    );
    let grpc: Vec<&StringMatch> = routes.http[..3].iter().map(uri).collect();
    // More characters of service, then of method.
    assert_eq!(grpc[0], &StringMatch::Exact("/reviews.Reviews/Get".into()));
    assert_eq!(grpc[1], &StringMatch::Prefix("/reviews.Reviews/".into()));
    assert_eq!(routes.http[1].matches[0].headers[0].name, "x-canary");
    assert!(
        matches!(grpc[2], StringMatch::Regex(r) if r.is_match("/any.Service/ListAll") && !r.is_match("/a/Get"))
    );
    assert_eq!(
        routes.http[0].filters.headers.request.set,
        [("x-grpc".to_string(), "1".to_string())]
    );
    // Then the HTTP route's.
    assert_eq!(
        routes.http[3].name.as_deref(),
        Some("HTTPRoute shop/reviews rules[0]")
    );
}

#[test]
fn unsupported_fields_and_values_are_refused_by_name() {
    let cases = [
        // Experimental fields the standard types do not have: named, never ignored.
        (
            "    - backendRefs:\n",
            "    - sessionPersistence: {sessionName: s}\n      backendRefs:\n",
            "httpRoutes[0].spec.rules[1].sessionPersistence: not supported",
        ),
        (
            "    - backendRefs:\n",
            "    - retry: {attempts: 3}\n      backendRefs:\n",
            "httpRoutes[0].spec.rules[1].retry: not supported",
        ),
        (
            "{name: reviews-v1, port: 9080, weight: 90}",
            "{name: reviews-v1, port: 9080, weight: 90, typo: 1}",
            "httpRoutes[0].spec.rules[1].backendRefs[0].typo: not supported",
        ),
        (
            "    - backendRefs:\n",
            "    - filters: [{type: CORS, cors: {allowOrigins: [\"*\"]}}]\n      backendRefs:\n",
            "httpRoutes[0].spec.rules[1].filters[0].type: CORS filters are not supported",
        ),
        (
            "    - backendRefs:\n",
            "    - filters: [{type: ExtensionRef, extensionRef: {group: x, kind: Y, name: z}}]\n      backendRefs:\n",
            "httpRoutes[0].spec.rules[1].filters[0].type: ExtensionRef filters are not supported",
        ),
        (
            "value: jason}]",
            "value: jason, type: Prefix}]",
            "httpRoutes[0].spec.rules[0].matches[0].headers[0].type: unknown variant `Prefix`",
        ),
        (
            "value: jason}]",
            "value: \"(\", type: RegularExpression}]",
            "httpRoutes[0].spec.rules[0].matches[0].headers[0].value: invalid regular expression",
        ),
        (
            "    rules:\n",
            "    hostnames: [reviews.example]\n    rules:\n",
            "httpRoutes[0].spec.hostnames: a route whose parent is a Service",
        ),
        (
            "name: reviews, port: 9080}",
            "name: ratings, port: 9080}",
            "httpRoutes[0].spec.parentRefs[0].name: shop/ratings is not a service of the mesh",
        ),
        (
            "name: reviews, port: 9080}",
            "name: reviews, port: 80}",
            "httpRoutes[0].spec.parentRefs[0].port: service shop/reviews has no port 80",
        ),
        (
            "{group: \"\", kind: Service, name: reviews, port: 9080}",
            "{name: some-gateway}",
            "httpRoutes[0].spec.parentRefs: names no Service",
        ),
        (
            "{name: reviews-v1, port: 9080, weight: 90}",
            "{name: reviews-v3, port: 9080, weight: 90}",
            "httpRoutes[0].spec.rules[1].backendRefs[0].name: shop/reviews-v3 is not a service",
        ),
        (
            "{name: reviews-v1, port: 9080, weight: 90}",
            "{name: reviews-v1, weight: 90}",
            "httpRoutes[0].spec.rules[1].backendRefs[0].port: required for a Service backend",
        ),
        (
            "{name: reviews-v1, port: 9080, weight: 90}",
            "{name: reviews-v1, port: 9080, weight: 90, kind: ServiceImport, group: multicluster.x-k8s.io}",
            "httpRoutes[0].spec.rules[1].backendRefs[0].kind: ServiceImport",
        ),
        (
            "{name: reviews-v1, port: 9080, weight: 90}",
            "{name: reviews-v1, namespace: other, port: 9080, weight: 90}",
            "httpRoutes[0].spec.rules[1].backendRefs[0].namespace: \"other\": backends in another namespace need a ReferenceGrant",
        ),
        (
            "kind: HTTPRoute",
            "kind: GRPCRoute",
            "httpRoutes[0].kind: \"GRPCRoute\" is not \"HTTPRoute\"",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1",
            "apiVersion: gateway.networking.k8s.io/v1beta1",
            "httpRoutes[0].apiVersion",
        ),
        (
            "    - backendRefs:\n",
            "    - timeouts: {request: 1s, backendRequest: 2s}\n      backendRefs:\n",
            "httpRoutes[0].spec.rules[1].timeouts.backendRequest: must not be longer",
        ),
        (
            "    - backendRefs:\n",
            "    - timeouts: {request: soon}\n      backendRefs:\n",
            "httpRoutes[0].spec.rules[1].timeouts.request: \"soon\" is not a Gateway API duration",
        ),
        (
            "    - backendRefs:\n",
            "    - filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /x}}}]\n      matches: [{path: {type: Exact, value: /a}}]\n      backendRefs:\n",
            "httpRoutes[0].spec.rules[1].filters: URLRewrite's ReplacePrefixMatch needs",
        ),
        (
            "    - backendRefs:\n",
            "    - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: host, value: x}]}}]\n      backendRefs:\n",
            "httpRoutes[0].spec.rules[1].filters[0].requestHeaderModifier.set.host",
        ),
        (
            "    - backendRefs:\n",
            "    - filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /x}}}]\n      backendRefs:\n",
            "httpRoutes[0].spec.rules[1].filters[0].requestRedirect.path.type: ReplacePrefixMatch is not supported in a redirect",
        ),
        (
            "    - backendRefs:\n",
            "    - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 9080}, percent: 101}}]\n      backendRefs:\n",
            "httpRoutes[0].spec.rules[1].filters[0].requestMirror.percent: 101 is not in 0..=100",
        ),
    ];
    for (from, to, expected) in cases {
        let err = error(from, to);
        assert!(
            err.starts_with("mesh file /etc/mesh.yaml: ") && err.contains(expected),
            "{expected}\n{err}"
        );
    }
}

#[test]
fn a_service_is_routed_by_gateway_api_routes_or_a_virtual_service_not_both() {
    let vs = r#"
virtualServices:
- apiVersion: networking.ambit.dev/v1
  kind: VirtualService
  metadata: {name: reviews, namespace: shop}
  spec:
    hosts: [reviews]
    http: [{route: [{destination: {host: reviews-v1}}]}]
"#;
    let err = parse(&format!("{SEED}{vs}")).unwrap_err();
    assert!(
        err.contains("service shop/reviews is routed by HTTPRoute shop/reviews and by VirtualService shop/reviews"),
        "{err}"
    );
}

#[tokio::test]
async fn a_bad_http_route_edit_keeps_the_last_good_routes_and_a_good_one_reloads() {
    use std::sync::Arc;

    use tokio::sync::watch;

    use crate::discovery::{ConfigStatus, watch_mesh_file};

    // Generous: file events arrive within a second; a loaded machine is slower.
    const WAIT: Duration = Duration::from_secs(20);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, format!("{MESH}{SEED}")).unwrap();
    let (state_tx, state) = watch::channel(Arc::new(MeshState::empty()));
    let (status_tx, mut status) = watch::channel(ConfigStatus::default());
    let task = tokio::spawn(watch_mesh_file(path.clone(), state_tx, status_tx));
    let mut wait = async |what: &str, f: &dyn Fn(&ConfigStatus) -> bool| {
        tokio::time::timeout(WAIT, status.wait_for(|s| f(s)))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .unwrap()
            .clone()
    };
    wait("the first load", &|s| s.generation == 1).await;
    let first = state.borrow().clone();
    assert_eq!(
        first
            .routes()
            .for_service("shop/reviews")
            .unwrap()
            .http
            .len(),
        2
    );

    // An experimental field: refused by name, the routes in force unchanged.
    std::fs::write(
        &path,
        format!(
            "{MESH}{}",
            SEED.replace(
                "    - backendRefs:\n",
                "    - sessionPersistence: {sessionName: s}\n      backendRefs:\n"
            )
        ),
    )
    .unwrap();
    let rejected = wait("the error", &|s| s.last_error.is_some()).await;
    assert!(
        rejected
            .last_error
            .unwrap()
            .contains("httpRoutes[0].spec.rules[1].sessionPersistence: not supported"),
    );
    assert!(
        Arc::ptr_eq(&state.borrow(), &first),
        "a bad file must not be published"
    );

    // A good edit: the new weights are in force.
    std::fs::write(
        &path,
        format!(
            "{MESH}{}",
            SEED.replace("weight: 90", "weight: 50")
                .replace("weight: 10", "weight: 50")
        ),
    )
    .unwrap();
    wait("generation 2", &|s| {
        s.generation == 2 && s.last_error.is_none()
    })
    .await;
    let weights: Vec<u32> = state
        .borrow()
        .routes()
        .for_service("shop/reviews")
        .unwrap()
        .http[1]
        .destinations
        .iter()
        .map(|d| d.weight)
        .collect();
    assert_eq!(weights, [50, 50]);
    task.abort();
}
