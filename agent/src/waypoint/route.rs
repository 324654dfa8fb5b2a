//! The routing decision, without I/O: which route takes a request (the first one of whose
//! matches holds: path, method, headers present or absent, query parameters) and which
//! destination it goes to (a weighted pick among the route's destinations; none when the route
//! answers itself with a redirect or a direct response), and the endpoints of a destination's
//! subset. Which of those endpoints serves it is [`super::balance`]'s; what the route does to
//! the request and response, [`super::filters`]'.
//!
//! Everything here reads the state's route model ([`crate::state::routes`]) and the request's
//! head; the caller supplies the random number, so tests decide it.
use std::{
    borrow::Cow,
    collections::HashMap,
    sync::{Arc, Mutex},
};

use http::HeaderMap;

use crate::state::{
    Service, WaypointRef, Workload,
    routes::{
        HeaderMatch, HttpMatch, HttpRoute, RouteDestination, ServiceRoutes, StringMatch, Subset,
    },
};

/// What the routes look at in a request.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    /// The path, without the query string.
    pub path: &'a str,
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The method.
    pub method: &'a http::Method,
    /// The query string (after `?`), if any.
    pub query: Option<&'a str>,
    /// The service port the client dialled, if known.
    pub port: Option<u16>,
}

impl<'a> RequestView<'a> {
    /// The view of `request`.
    pub fn of<B>(request: &'a http::Request<B>) -> Self {
        Self {
            path: request.uri().path(),
            headers: request.headers(),
            method: request.method(),
            query: request.uri().query(),
            port: None,
        }
    }

    /// The same view, the client having dialled the service's `port`.
    pub fn at_port(self, port: u16) -> Self {
        Self {
            port: Some(port),
            ..self
        }
    }
}

/// Where a request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision<'a> {
    /// The route taken (`None`: the service has no routes, the request goes to it as dialled).
    pub route: Option<&'a HttpRoute>,
    /// The match entry of the route that held (`None`: the route has no `match`).
    pub matched: Option<&'a HttpMatch>,
    /// The destination picked; `None`: the route answers itself (redirect, direct response).
    pub destination: Option<Cow<'a, RouteDestination>>,
}

/// Decides the destination of `request` to `service`, whose routes are `routes` (`None`: no
/// route resource names it, so the request goes to the service itself). `pick(n)` must return
/// a number in `0..n`. `None`: routes exist and none matches (Envoy answers 404, `NR`).
pub fn decide<'a>(
    routes: Option<&'a ServiceRoutes>,
    service: &Service,
    request: RequestView<'_>,
    pick: impl FnOnce(u32) -> u32,
) -> Option<Decision<'a>> {
    let Some(routes) = routes else {
        return Some(Decision {
            route: None,
            matched: None,
            destination: Some(Cow::Owned(RouteDestination {
                service: WaypointRef {
                    namespace: service.namespace.clone(),
                    name: service.name.clone(),
                },
                port: None,
                subset: None,
                weight: 100,
                headers: Default::default(),
            })),
        });
    };
    let (route, matched) = routes.http.iter().find_map(|route| {
        if route.matches.is_empty() {
            return Some((route, None));
        }
        let held = route.matches.iter().find(|m| matches(m, request))?;
        Some((route, Some(held)))
    })?;
    if route.filters.redirect.is_some() || route.filters.direct_response.is_some() {
        return Some(Decision {
            route: Some(route),
            matched,
            destination: None,
        });
    }
    Some(Decision {
        route: Some(route),
        matched,
        destination: Some(Cow::Borrowed(weighted(&route.destinations, pick)?)),
    })
}

/// Whether every condition of `m` holds.
fn matches(m: &HttpMatch, request: RequestView<'_>) -> bool {
    if let Some(port) = m.port
        && request.port != Some(port)
    {
        return false;
    }
    if let Some(uri) = &m.uri
        && !uri_matches(uri, request.path, m.ignore_uri_case)
    {
        return false;
    }
    if let Some(method) = &m.method
        && !method.matches(request.method.as_str())
    {
        return false;
    }
    m.headers
        .iter()
        .all(|header| header_holds(header, request.headers))
        && !m
            .without_headers
            .iter()
            .any(|header| header_holds(header, request.headers))
        && m.query_params
            .iter()
            .all(|q| match (query_param(request.query, &q.name), &q.value) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(value), Some(expected)) => expected.matches(value),
            })
}

/// Whether the condition on one header holds.
fn header_holds(header: &HeaderMatch, headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header.name.as_str()) else {
        return false;
    };
    match (&header.value, value.to_str()) {
        (None, _) => true,
        (Some(expected), Ok(value)) => expected.matches(value),
        // A value that is not visible ASCII matches nothing but presence.
        (Some(_), Err(_)) => false,
    }
}

/// Whether the path matches `uri`, ignoring ASCII case for `exact` and `prefix` if asked
/// (Istio's `ignoreUriCase`, which does not apply to `regex`).
fn uri_matches(uri: &StringMatch, path: &str, ignore_case: bool) -> bool {
    match uri {
        StringMatch::Exact(exact) if ignore_case => path.eq_ignore_ascii_case(exact),
        StringMatch::Prefix(prefix) if ignore_case => path
            .as_bytes()
            .get(..prefix.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(prefix.as_bytes())),
        _ => uri.matches(path),
    }
}

/// The raw value of the first parameter `name` of `query` (`a=1&b`: `b` is present and empty).
pub fn query_param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })
}

/// The destination whose share of the total weight `pick` lands in.
fn weighted(
    destinations: &[RouteDestination],
    pick: impl FnOnce(u32) -> u32,
) -> Option<&RouteDestination> {
    let total: u32 = destinations.iter().map(|d| d.weight).sum();
    if total == 0 {
        return None;
    }
    let mut point = pick(total).min(total - 1);
    for destination in destinations {
        if point < destination.weight {
            return Some(destination);
        }
        point -= destination.weight;
    }
    None
}

/// The endpoints of a service that belong to `subset` (all of them without one).
pub fn subset_endpoints(
    endpoints: Vec<Arc<Workload>>,
    subset: Option<&Subset>,
) -> Vec<Arc<Workload>> {
    let Some(subset) = subset else {
        return endpoints;
    };
    endpoints
        .into_iter()
        .filter(|w| {
            subset
                .labels
                .iter()
                .all(|(key, value)| w.labels.get(key) == Some(value))
        })
        .collect()
}

/// Round robin per destination (service and subset). Its memory is one counter per
/// destination the routes name, so it is bounded by the configuration.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: Mutex<HashMap<String, usize>>,
}

impl RoundRobin {
    /// The next endpoint of `endpoints` for `destination`.
    pub fn pick<'e>(
        &self,
        destination: &RouteDestination,
        endpoints: &'e [Arc<Workload>],
    ) -> Option<&'e Arc<Workload>> {
        if endpoints.is_empty() {
            return None;
        }
        let key = format!(
            "{}/{}",
            destination.service,
            destination.subset.as_ref().map_or("", |s| s.name.as_str())
        );
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let counter = next.entry(key).or_default();
        let chosen = *counter % endpoints.len();
        *counter = counter.wrapping_add(1);
        Some(&endpoints[chosen])
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use http::HeaderValue;

    use super::*;
    use crate::state::routes::{FullRegex, QueryMatch};

    static GET: http::Method = http::Method::GET;

    fn service() -> Service {
        Service {
            name: "reviews".into(),
            namespace: "shop".into(),
            vips: vec![],
            selector: [("app".to_string(), "reviews".to_string())].into(),
            endpoint_addresses: vec![],
            ports: vec![],
            waypoint: None,
        }
    }

    fn to(subset: &str, weight: u32) -> RouteDestination {
        RouteDestination {
            service: WaypointRef {
                namespace: "shop".into(),
                name: "reviews".into(),
            },
            port: None,
            subset: Some(Subset {
                name: subset.into(),
                labels: [("version".to_string(), subset.to_string())].into(),
                load_balancer: None,
                upstream: Default::default(),
            }),
            weight,
            headers: Default::default(),
        }
    }

    /// The seed's example: `end-user: jason` to v2, else 90/10 between v1 and v2.
    fn canary() -> ServiceRoutes {
        ServiceRoutes {
            source: "VirtualService shop/reviews".into(),
            http: vec![
                HttpRoute {
                    name: None,
                    matches: vec![HttpMatch {
                        uri: None,
                        headers: vec![HeaderMatch {
                            name: "end-user".into(),
                            value: Some(StringMatch::Exact("jason".into())),
                        }],
                        ..HttpMatch::default()
                    }],
                    destinations: vec![to("v2", 100)],
                    filters: Default::default(),
                    resilience: Default::default(),
                },
                HttpRoute {
                    name: None,
                    matches: vec![],
                    destinations: vec![to("v1", 90), to("v2", 10)],
                    filters: Default::default(),
                    resilience: Default::default(),
                },
            ],
        }
    }

    fn subset_of(decision: Option<Decision<'_>>) -> Option<String> {
        decision.map(|d| d.destination.unwrap().subset.as_ref().unwrap().name.clone())
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_static(k),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn a_header_match_takes_its_route_whatever_the_pick() {
        let routes = canary();
        let jason = headers(&[("end-user", "jason")]);
        for pick in [0, 50, 99] {
            let request = RequestView {
                path: "/",
                headers: &jason,
                method: &GET,
                query: None,
                port: None,
            };
            let got = decide(Some(&routes), &service(), request, |_| pick);
            assert_eq!(subset_of(got).as_deref(), Some("v2"));
        }
        // Another user, or the header's value in another case, is not jason.
        for other in ["jasonx", "Jason", "mary"] {
            let h = headers(&[("end-user", other)]);
            let request = RequestView {
                path: "/",
                headers: &h,
                method: &GET,
                query: None,
                port: None,
            };
            assert_eq!(
                subset_of(decide(Some(&routes), &service(), request, |_| 0)).as_deref(),
                Some("v1"),
                "{other}"
            );
        }
    }

    #[test]
    fn weights_split_the_pick_range_in_order() {
        let routes = canary();
        let none = HeaderMap::new();
        let request = RequestView {
            path: "/",
            headers: &none,
            method: &GET,
            query: None,
            port: None,
        };
        let mut v2 = 0;
        for pick in 0..100 {
            let got = decide(Some(&routes), &service(), request, |n| {
                assert_eq!(n, 100);
                pick
            });
            if subset_of(got).as_deref() == Some("v2") {
                v2 += 1;
            }
        }
        assert_eq!(v2, 10);
        // A weight of 0 never gets a request (blue-green: 100/0).
        let all_v1 = ServiceRoutes {
            source: "x".into(),
            http: vec![HttpRoute {
                name: None,
                matches: vec![],
                destinations: vec![to("v1", 100), to("v2", 0)],
                filters: Default::default(),
                resilience: Default::default(),
            }],
        };
        for pick in 0..100 {
            let got = decide(Some(&all_v1), &service(), request, |_| pick);
            assert_eq!(subset_of(got).as_deref(), Some("v1"));
        }
    }

    #[test]
    fn uri_matches_exact_prefix_and_whole_string_regex() {
        let route = |uri: StringMatch| ServiceRoutes {
            source: "x".into(),
            http: vec![HttpRoute {
                name: None,
                matches: vec![HttpMatch {
                    uri: Some(uri),
                    headers: vec![],
                    ..HttpMatch::default()
                }],
                destinations: vec![to("v2", 1)],
                filters: Default::default(),
                resilience: Default::default(),
            }],
        };
        let none = HeaderMap::new();
        let hits = |routes: &ServiceRoutes, path: &str| {
            let request = RequestView {
                path,
                headers: &none,
                method: &GET,
                query: None,
                port: None,
            };
            decide(Some(routes), &service(), request, |_| 0).is_some()
        };
        let exact = route(StringMatch::Exact("/api".into()));
        assert!(hits(&exact, "/api"));
        assert!(!hits(&exact, "/api/v1"));
        let prefix = route(StringMatch::Prefix("/api".into()));
        assert!(hits(&prefix, "/api/v1"));
        assert!(!hits(&prefix, "/ap"));
        let regex = route(StringMatch::Regex(FullRegex::new("/api/v[0-9]+").unwrap()));
        assert!(hits(&regex, "/api/v12"));
        // The whole path must match, not a part of it.
        assert!(!hits(&regex, "/x/api/v1"));
        assert!(!hits(&regex, "/api/v1/more"));
    }

    #[test]
    fn header_presence_prefix_and_regex() {
        let route = |value: Option<StringMatch>| ServiceRoutes {
            source: "x".into(),
            http: vec![HttpRoute {
                name: None,
                matches: vec![HttpMatch {
                    uri: None,
                    headers: vec![HeaderMatch {
                        name: "x-canary".into(),
                        value,
                    }],
                    ..HttpMatch::default()
                }],
                destinations: vec![to("v2", 1)],
                filters: Default::default(),
                resilience: Default::default(),
            }],
        };
        let hits = |routes: &ServiceRoutes, h: &HeaderMap| {
            let request = RequestView {
                path: "/",
                headers: h,
                method: &GET,
                query: None,
                port: None,
            };
            decide(Some(routes), &service(), request, |_| 0).is_some()
        };
        let present = route(None);
        assert!(hits(&present, &headers(&[("x-canary", "")])));
        assert!(!hits(&present, &HeaderMap::new()));
        let prefix = route(Some(StringMatch::Prefix("yes".into())));
        assert!(hits(&prefix, &headers(&[("x-canary", "yes-please")])));
        assert!(!hits(&prefix, &headers(&[("x-canary", "no")])));
        let regex = route(Some(StringMatch::Regex(FullRegex::new("a|b").unwrap())));
        assert!(hits(&regex, &headers(&[("x-canary", "b")])));
        assert!(!hits(&regex, &headers(&[("x-canary", "ab")])));
    }

    #[test]
    fn no_routes_go_to_the_service_dialled_and_no_match_is_none() {
        let none = HeaderMap::new();
        let request = RequestView {
            path: "/",
            headers: &none,
            method: &GET,
            query: None,
            port: None,
        };
        let got = decide(None, &service(), request, |_| 0).unwrap();
        assert_eq!(got.route, None);
        assert_eq!(got.destination.as_ref().unwrap().service.name, "reviews");
        assert_eq!(got.destination.as_ref().unwrap().subset, None);
        let only_jason = ServiceRoutes {
            source: "x".into(),
            http: vec![canary().http[0].clone()],
        };
        assert_eq!(decide(Some(&only_jason), &service(), request, |_| 0), None);
    }

    fn endpoint(name: &str, version: &str) -> Arc<Workload> {
        Arc::new(Workload {
            name: name.into(),
            controller: None,
            namespace: "shop".into(),
            service_account: "reviews".into(),
            node: "n0".into(),
            ips: vec![],
            labels: BTreeMap::from([
                ("app".to_string(), "reviews".to_string()),
                ("version".to_string(), version.to_string()),
            ]),
            enrolled: true,
            ready: true,
            netns: crate::netns::NetnsRef::Cni,
            capture_exclusions: Default::default(),
        })
    }

    #[test]
    fn subsets_filter_by_label_and_round_robin_cycles_per_destination() {
        let all = vec![
            endpoint("v1-a", "v1"),
            endpoint("v2-a", "v2"),
            endpoint("v1-b", "v1"),
        ];
        let v1 = to("v1", 1);
        let v1_endpoints = subset_endpoints(all.clone(), v1.subset.as_ref());
        let names: Vec<&str> = v1_endpoints.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["v1-a", "v1-b"]);
        assert_eq!(subset_endpoints(all.clone(), None).len(), 3);

        let rr = RoundRobin::default();
        let picks: Vec<String> = (0..4)
            .map(|_| rr.pick(&v1, &v1_endpoints).unwrap().name.clone())
            .collect();
        assert_eq!(picks, ["v1-a", "v1-b", "v1-a", "v1-b"]);
        // Another destination has its own turn.
        let v2 = to("v2", 1);
        let v2_endpoints = subset_endpoints(all, v2.subset.as_ref());
        assert_eq!(rr.pick(&v2, &v2_endpoints).unwrap().name, "v2-a");
        assert!(rr.pick(&v2, &[]).is_none());
    }

    /// A route of one match entry to v2, and whether a request takes it.
    fn one_match(m: HttpMatch) -> ServiceRoutes {
        ServiceRoutes {
            source: "x".into(),
            http: vec![HttpRoute {
                name: None,
                matches: vec![m],
                destinations: vec![to("v2", 1)],
                filters: Default::default(),
                resilience: Default::default(),
            }],
        }
    }

    fn takes(
        routes: &ServiceRoutes,
        method: &http::Method,
        path: &str,
        query: Option<&str>,
        h: &HeaderMap,
    ) -> bool {
        let request = RequestView {
            path,
            headers: h,
            method,
            query,
            port: None,
        };
        decide(Some(routes), &service(), request, |_| 0).is_some()
    }

    #[test]
    fn a_match_with_a_port_holds_only_for_that_service_port() {
        let none = HeaderMap::new();
        let routes = one_match(HttpMatch {
            port: Some(9080),
            ..HttpMatch::default()
        });
        let at = |port: Option<u16>| {
            let request = RequestView {
                path: "/",
                headers: &none,
                method: &GET,
                query: None,
                port,
            };
            decide(Some(&routes), &service(), request, |_| 0).is_some()
        };
        assert!(at(Some(9080)));
        assert!(!at(Some(9090)));
        assert!(!at(None));
    }

    #[test]
    fn method_query_absence_and_case_insensitive_uri() {
        let none = HeaderMap::new();
        let post = one_match(HttpMatch {
            method: Some(StringMatch::Exact("POST".into())),
            ..HttpMatch::default()
        });
        assert!(takes(&post, &http::Method::POST, "/", None, &none));
        assert!(!takes(&post, &GET, "/", None, &none));
        let write = one_match(HttpMatch {
            method: Some(StringMatch::Regex(FullRegex::new("PUT|PATCH").unwrap())),
            ..HttpMatch::default()
        });
        assert!(takes(&write, &http::Method::PATCH, "/", None, &none));
        assert!(!takes(&write, &http::Method::POST, "/", None, &none));

        let query = one_match(HttpMatch {
            query_params: vec![
                QueryMatch {
                    name: "canary".into(),
                    value: Some(StringMatch::Exact("yes".into())),
                },
                QueryMatch {
                    name: "id".into(),
                    value: Some(StringMatch::Regex(FullRegex::new("[0-9]+").unwrap())),
                },
                QueryMatch {
                    name: "debug".into(),
                    value: None,
                },
            ],
            ..HttpMatch::default()
        });
        assert!(takes(
            &query,
            &GET,
            "/",
            Some("id=42&canary=yes&debug"),
            &none
        ));
        assert!(!takes(
            &query,
            &GET,
            "/",
            Some("id=42&canary=no&debug"),
            &none
        ));
        assert!(!takes(
            &query,
            &GET,
            "/",
            Some("id=4x&canary=yes&debug"),
            &none
        ));
        assert!(!takes(&query, &GET, "/", Some("id=42&canary=yes"), &none));
        assert!(!takes(&query, &GET, "/", None, &none));
        // The first value counts; names are exact.
        assert!(!takes(
            &query,
            &GET,
            "/",
            Some("canary=no&canary=yes&id=1&debug"),
            &none
        ));
        assert!(!takes(
            &query,
            &GET,
            "/",
            Some("Canary=yes&id=1&debug"),
            &none
        ));

        let absent = one_match(HttpMatch {
            without_headers: vec![
                HeaderMatch {
                    name: "x-opt-out".into(),
                    value: None,
                },
                HeaderMatch {
                    name: "end-user".into(),
                    value: Some(StringMatch::Prefix("bot-".into())),
                },
            ],
            ..HttpMatch::default()
        });
        assert!(takes(&absent, &GET, "/", None, &none));
        assert!(takes(
            &absent,
            &GET,
            "/",
            None,
            &headers(&[("end-user", "jason")])
        ));
        assert!(!takes(
            &absent,
            &GET,
            "/",
            None,
            &headers(&[("x-opt-out", "")])
        ));
        assert!(!takes(
            &absent,
            &GET,
            "/",
            None,
            &headers(&[("end-user", "bot-7")])
        ));

        let mut case = HttpMatch {
            uri: Some(StringMatch::Prefix("/Api".into())),
            ignore_uri_case: true,
            ..HttpMatch::default()
        };
        let insensitive = one_match(case.clone());
        assert!(takes(&insensitive, &GET, "/aPI/x", None, &none));
        assert!(!takes(&insensitive, &GET, "/ap", None, &none));
        case.ignore_uri_case = false;
        assert!(!takes(&one_match(case), &GET, "/aPI/x", None, &none));
        let exact = one_match(HttpMatch {
            uri: Some(StringMatch::Exact("/Login".into())),
            ignore_uri_case: true,
            ..HttpMatch::default()
        });
        assert!(takes(&exact, &GET, "/LOGIN", None, &none));
        // Not for regex, as Istio's.
        let regex = one_match(HttpMatch {
            uri: Some(StringMatch::Regex(FullRegex::new("/login").unwrap())),
            ignore_uri_case: true,
            ..HttpMatch::default()
        });
        assert!(!takes(&regex, &GET, "/LOGIN", None, &none));
    }

    #[test]
    fn grpc_methods_are_path_matches() {
        let none = HeaderMap::new();
        let post = http::Method::POST;
        let both = one_match(HttpMatch::grpc(Some("shop.Reviews"), Some("Get")).unwrap());
        assert!(takes(&both, &post, "/shop.Reviews/Get", None, &none));
        assert!(!takes(&both, &post, "/shop.Reviews/List", None, &none));
        let service = one_match(HttpMatch::grpc(Some("shop.Reviews"), None).unwrap());
        assert!(takes(&service, &post, "/shop.Reviews/List", None, &none));
        assert!(!takes(&service, &post, "/shop.ReviewsX/List", None, &none));
        let method = one_match(HttpMatch::grpc(None, Some("Get")).unwrap());
        assert!(takes(&method, &post, "/any.Service/Get", None, &none));
        assert!(!takes(&method, &post, "/any.Service/GetAll", None, &none));
        assert!(!takes(&method, &post, "/a/b/Get", None, &none));
        assert_eq!(HttpMatch::grpc(None, None).unwrap(), HttpMatch::default());
    }

    #[test]
    fn a_redirect_or_direct_response_route_has_no_destination_and_tells_its_match() {
        use crate::state::routes::{DirectResponse, RouteFilters};
        let none = HeaderMap::new();
        let entry = HttpMatch {
            uri: Some(StringMatch::Prefix("/old".into())),
            ..HttpMatch::default()
        };
        let routes = ServiceRoutes {
            source: "x".into(),
            http: vec![HttpRoute {
                name: None,
                matches: vec![
                    HttpMatch {
                        uri: Some(StringMatch::Exact("/never".into())),
                        ..HttpMatch::default()
                    },
                    entry.clone(),
                ],
                destinations: vec![],
                filters: RouteFilters {
                    direct_response: Some(DirectResponse {
                        status: 410,
                        body: None,
                    }),
                    ..RouteFilters::default()
                },
                resilience: Default::default(),
            }],
        };
        let request = RequestView {
            path: "/old/x",
            headers: &none,
            method: &GET,
            query: None,
            port: None,
        };
        let got = decide(Some(&routes), &service(), request, |_| 0).unwrap();
        assert_eq!(got.destination, None);
        assert_eq!(got.matched, Some(&entry));
    }
}
