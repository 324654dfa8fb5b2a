//! The routing decision, without I/O: which destination a request goes to (the first route one
//! of whose matches holds, then a weighted pick among its destinations) and which endpoint of
//! that destination's subset serves it (round robin).
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
    routes::{HttpMatch, HttpRoute, RouteDestination, ServiceRoutes, Subset},
};

/// What the routes look at in a request.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    /// The path, without the query string.
    pub path: &'a str,
    /// The request headers.
    pub headers: &'a HeaderMap,
}

/// Where a request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision<'a> {
    /// The route taken (`None`: the service has no routes, the request goes to it as dialled).
    pub route: Option<&'a HttpRoute>,
    /// The destination picked.
    pub destination: Cow<'a, RouteDestination>,
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
            destination: Cow::Owned(RouteDestination {
                service: WaypointRef {
                    namespace: service.namespace.clone(),
                    name: service.name.clone(),
                },
                port: None,
                subset: None,
                weight: 100,
            }),
        });
    };
    let route = routes.http.iter().find(|route| {
        route.matches.is_empty() || route.matches.iter().any(|m| matches(m, request))
    })?;
    Some(Decision {
        route: Some(route),
        destination: Cow::Borrowed(weighted(&route.destinations, pick)?),
    })
}

/// Whether every condition of `m` holds.
fn matches(m: &HttpMatch, request: RequestView<'_>) -> bool {
    if let Some(uri) = &m.uri
        && !uri.matches(request.path)
    {
        return false;
    }
    m.headers.iter().all(|header| {
        let Some(value) = request.headers.get(header.name.as_str()) else {
            return false;
        };
        match (&header.value, value.to_str()) {
            (None, _) => true,
            (Some(expected), Ok(value)) => expected.matches(value),
            // A value that is not visible ASCII matches nothing but presence.
            (Some(_), Err(_)) => false,
        }
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
    use crate::state::routes::{FullRegex, HeaderMatch, StringMatch};

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
            }),
            weight,
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
                    }],
                    destinations: vec![to("v2", 100)],
                    resilience: Default::default(),
                },
                HttpRoute {
                    name: None,
                    matches: vec![],
                    destinations: vec![to("v1", 90), to("v2", 10)],
                    resilience: Default::default(),
                },
            ],
        }
    }

    fn subset_of(decision: Option<Decision<'_>>) -> Option<String> {
        decision.map(|d| d.destination.subset.as_ref().unwrap().name.clone())
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
                }],
                destinations: vec![to("v2", 1)],
                resilience: Default::default(),
            }],
        };
        let none = HeaderMap::new();
        let hits = |routes: &ServiceRoutes, path: &str| {
            let request = RequestView {
                path,
                headers: &none,
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
                }],
                destinations: vec![to("v2", 1)],
                resilience: Default::default(),
            }],
        };
        let hits = |routes: &ServiceRoutes, h: &HeaderMap| {
            let request = RequestView {
                path: "/",
                headers: h,
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
        };
        let got = decide(None, &service(), request, |_| 0).unwrap();
        assert_eq!(got.route, None);
        assert_eq!(got.destination.service.name, "reviews");
        assert_eq!(got.destination.subset, None);
        let only_jason = ServiceRoutes {
            source: "x".into(),
            http: vec![canary().http[0].clone()],
        };
        assert_eq!(decide(Some(&only_jason), &service(), request, |_| 0), None);
    }

    fn endpoint(name: &str, version: &str) -> Arc<Workload> {
        Arc::new(Workload {
            name: name.into(),
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
}
