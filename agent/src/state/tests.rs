use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::Arc,
};

use super::*;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn workload(namespace: &str, name: &str, ips: &[&str], l: &[(&str, &str)]) -> Workload {
    Workload {
        name: name.into(),
        controller: None,
        namespace: namespace.into(),
        service_account: "default".into(),
        node: "node-a".into(),
        ips: ips.iter().map(|s| ip(s)).collect(),
        labels: labels(l),
        enrolled: true,
        ready: true,
        netns: NetnsRef::Path(PathBuf::from(format!("/run/netns/{name}"))),
        capture_exclusions: Default::default(),
    }
}

fn service(namespace: &str, name: &str, vips: &[&str], selector: &[(&str, &str)]) -> Service {
    Service {
        name: name.into(),
        namespace: namespace.into(),
        vips: vips.iter().map(|s| ip(s)).collect(),
        selector: labels(selector),
        endpoint_addresses: Vec::new(),
        ports: vec![ServicePort {
            port: 80,
            target_port: 8080,
        }],
        waypoint: None,
    }
}

fn shop() -> MeshState {
    MeshState::new(
        RedirectSettings::default(),
        vec![
            workload(
                "shop",
                "web-0",
                &["10.10.0.2"],
                &[("app", "web"), ("tier", "front")],
            ),
            workload("shop", "web-1", &["10.10.0.3"], &[("app", "web")]),
            workload("shop", "api-0", &["10.10.0.4"], &[("app", "api")]),
            // Same labels, other namespace: never an endpoint of shop's services.
            workload("other", "web-0", &["10.20.0.2"], &[("app", "web")]),
        ],
        vec![
            service("shop", "web", &["10.96.0.10"], &[("app", "web")]),
            service(
                "shop",
                "front",
                &["10.96.0.11"],
                &[("app", "web"), ("tier", "front")],
            ),
        ],
    )
}

/// Resolves `dst` `n` times and counts the chosen workloads by uid.
fn spread(state: &MeshState, dst: &str, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        match state.resolve(addr(dst)) {
            Resolved::Workload { workload, .. } => *counts.entry(workload.uid()).or_default() += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    counts
}

#[test]
fn uid_is_namespace_slash_name() {
    assert_eq!(workload("shop", "web-0", &[], &[]).uid(), "shop/web-0");
}

#[test]
fn selector_needs_every_pair_and_the_same_namespace() {
    let state = shop();
    let endpoints = |vip: &str| -> Vec<String> {
        let service = state.service_by_vip(ip(vip)).unwrap();
        state.endpoints(service).iter().map(|w| w.uid()).collect()
    };
    assert_eq!(endpoints("10.96.0.10"), ["shop/web-0", "shop/web-1"]);
    assert_eq!(endpoints("10.96.0.11"), ["shop/web-0"]);

    let svc = service("shop", "all", &[], &[]);
    assert!(
        !svc.selects(&workload("shop", "x", &[], &[("a", "b")])),
        "empty selector"
    );
}

#[test]
fn endpoints_are_indexed_by_namespace_and_every_selector_pair() {
    // Same labels in two namespaces, selectors of one and two pairs, a workload matching only
    // the rarer pair, an unready one: each service gets exactly its own ready matches, in the
    // workloads' order.
    let mut unready = workload("b", "web-9", &["10.0.2.9"], &[("app", "web")]);
    unready.ready = false;
    let state = MeshState::new(
        RedirectSettings::default(),
        vec![
            workload("b", "web-1", &["10.0.2.1"], &[("app", "web"), ("v", "1")]),
            workload("a", "web-1", &["10.0.1.1"], &[("app", "web"), ("v", "1")]),
            workload("a", "web-2", &["10.0.1.2"], &[("app", "web"), ("v", "2")]),
            workload("a", "other", &["10.0.1.3"], &[("app", "other"), ("v", "1")]),
            unready,
            workload("b", "web-0", &["10.0.2.0"], &[("app", "web")]),
        ],
        vec![
            service("a", "web", &["10.96.1.1"], &[("app", "web")]),
            service("b", "web", &["10.96.2.1"], &[("app", "web")]),
            service("a", "v1", &["10.96.1.2"], &[("app", "web"), ("v", "1")]),
            service("b", "v1", &["10.96.2.2"], &[("v", "1"), ("app", "web")]),
            service("c", "web", &["10.96.3.1"], &[("app", "web")]),
            service("a", "none", &["10.96.1.3"], &[("app", "web"), ("v", "3")]),
        ],
    );
    let endpoints = |vip: &str| -> Vec<String> {
        let service = state.service_by_vip(ip(vip)).unwrap();
        state.endpoints(service).iter().map(|w| w.uid()).collect()
    };
    assert_eq!(endpoints("10.96.1.1"), ["a/web-1", "a/web-2"]);
    assert_eq!(endpoints("10.96.2.1"), ["b/web-1", "b/web-0"]);
    assert_eq!(endpoints("10.96.1.2"), ["a/web-1"]);
    assert_eq!(endpoints("10.96.2.2"), ["b/web-1"]);
    assert!(endpoints("10.96.3.1").is_empty());
    assert!(endpoints("10.96.1.3").is_empty());

    // And the same as checking every selector against every workload, on a denser mesh.
    let value = |i: usize, m: usize| (i % m).to_string();
    let workloads: Vec<Workload> = (0..60)
        .map(|i| {
            let mut w = workload(
                &format!("ns{}", i % 3),
                &format!("w{i}"),
                &[&format!("10.1.0.{i}")],
                &[("a", &value(i, 2)), ("b", &value(i, 5))],
            );
            w.ready = i % 7 != 0;
            w
        })
        .collect();
    let services: Vec<Service> = (0..30)
        .map(|i| {
            let (a, b) = (value(i, 2), value(i, 5));
            let selector: &[(&str, &str)] = match i % 3 {
                0 => &[("a", &a)],
                1 => &[("a", &a), ("b", &b)],
                _ => &[("b", &b), ("missing", "x")],
            };
            service(&format!("ns{}", i % 4), &format!("s{i}"), &[], selector)
        })
        .collect();
    let state = MeshState::new(RedirectSettings::default(), workloads, services);
    for service in state.services() {
        let expected: Vec<String> = state
            .workloads()
            .iter()
            .filter(|w| w.ready && service.selects(w))
            .map(|w| w.uid())
            .collect();
        let got: Vec<String> = state.endpoints(service).iter().map(|w| w.uid()).collect();
        assert_eq!(got, expected, "{}", service.uid());
    }
}

#[test]
fn round_robin_spreads_evenly() {
    let state = shop();
    let counts = spread(&state, "10.96.0.10:80", 10);
    assert_eq!(counts["shop/web-0"], 5);
    assert_eq!(counts["shop/web-1"], 5);
}

#[test]
fn vip_resolves_to_endpoint_ip_and_target_port() {
    let state = shop();
    match state.resolve(addr("10.96.0.11:80")) {
        Resolved::Workload {
            workload,
            addr: a,
            service,
        } => {
            assert_eq!(workload.uid(), "shop/web-0");
            assert_eq!(a, addr("10.10.0.2:8080"));
            assert_eq!(service.unwrap().uid(), "shop/front");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn not_ready_endpoints_are_skipped() {
    let mut not_ready = workload("shop", "web-1", &["10.10.0.3"], &[("app", "web")]);
    not_ready.ready = false;
    let state = MeshState::new(
        RedirectSettings::default(),
        vec![
            workload("shop", "web-0", &["10.10.0.2"], &[("app", "web")]),
            not_ready,
        ],
        vec![service("shop", "web", &["10.96.0.10"], &[("app", "web")])],
    );
    assert_eq!(spread(&state, "10.96.0.10:80", 4)["shop/web-0"], 4);
    // Still reachable directly by its IP: readiness only gates service traffic.
    assert!(matches!(
        state.resolve(addr("10.10.0.3:8080")),
        Resolved::Workload { service: None, .. }
    ));
}

#[test]
fn no_endpoints() {
    let state = MeshState::new(
        RedirectSettings::default(),
        vec![workload("shop", "api-0", &["10.10.0.4"], &[("app", "api")])],
        vec![service("shop", "web", &["10.96.0.10"], &[("app", "web")])],
    );
    match state.resolve(addr("10.96.0.10:80")) {
        Resolved::NoEndpoints { service } => assert_eq!(service.uid(), "shop/web"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn unknown_service_port() {
    let state = shop();
    match state.resolve(addr("10.96.0.10:8080")) {
        Resolved::UnknownServicePort { service, port } => {
            assert_eq!(service.uid(), "shop/web");
            assert_eq!(port, 8080);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn workload_ip_resolves_as_dialled() {
    let state = shop();
    match state.resolve(addr("10.10.0.4:9000")) {
        Resolved::Workload {
            workload,
            addr: a,
            service,
        } => {
            assert_eq!(workload.uid(), "shop/api-0");
            assert_eq!(a, addr("10.10.0.4:9000"));
            assert!(service.is_none());
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn unknown_destination_passes_through() {
    let state = shop();
    assert!(matches!(
        state.resolve(addr("192.0.2.1:443")),
        Resolved::Passthrough(a) if a == addr("192.0.2.1:443")
    ));
    assert!(matches!(
        MeshState::empty().resolve(addr("[2001:db8::1]:443")),
        Resolved::Passthrough(_)
    ));
}

#[test]
fn ipv6_prefers_same_family_endpoint_address() {
    let state = MeshState::new(
        RedirectSettings::default(),
        vec![
            workload(
                "shop",
                "web-0",
                &["10.10.0.2", "fd00::2"],
                &[("app", "web")],
            ),
            workload(
                "shop",
                "web-1",
                &["fd00::3", "10.10.0.3"],
                &[("app", "web")],
            ),
        ],
        vec![service(
            "shop",
            "web",
            &["10.96.0.10", "fd00:96::10"],
            &[("app", "web")],
        )],
    );
    let mut seen = Vec::new();
    for dst in [
        "[fd00:96::10]:80",
        "[fd00:96::10]:80",
        "10.96.0.10:80",
        "10.96.0.10:80",
    ] {
        let Resolved::Workload { addr: a, .. } = state.resolve(addr(dst)) else {
            panic!("{dst} did not resolve to a workload");
        };
        assert_eq!(a.is_ipv6(), addr(dst).is_ipv6(), "{dst} -> {a}");
        assert_eq!(a.port(), 8080);
        seen.push(a);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 4, "both endpoints in both families: {seen:?}");

    assert_eq!(
        state.workload_by_ip(ip("fd00::3")).map(|w| w.uid()),
        Some("shop/web-1".into())
    );
    match state.resolve(addr("[fd00::2]:22")) {
        Resolved::Workload { workload, .. } => assert_eq!(workload.uid(), "shop/web-0"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn single_stack_endpoints_serve_a_vip_of_the_other_family() {
    let state = MeshState::new(
        RedirectSettings::default(),
        vec![workload("shop", "web-0", &["10.10.0.2"], &[("app", "web")])],
        vec![service("shop", "web", &["fd00:96::10"], &[("app", "web")])],
    );
    assert!(matches!(
        state.resolve(addr("[fd00:96::10]:80")),
        Resolved::Workload { addr: a, .. } if a == addr("10.10.0.2:8080")
    ));
}

#[test]
fn indexes() {
    let state = shop();
    assert_eq!(state.workloads().len(), 4);
    assert_eq!(state.services().len(), 2);
    assert_eq!(
        state.service_by_vip(ip("10.96.0.11")).map(|s| s.uid()),
        Some("shop/front".into())
    );
    assert!(state.service_by_vip(ip("10.10.0.2")).is_none());
    assert_eq!(
        state.workload_by_ip(ip("10.20.0.2")).map(|w| w.uid()),
        Some("other/web-0".into())
    );
    assert_eq!(state.workloads_on_node("node-a").count(), 4);
    assert_eq!(state.workloads_on_node("node-b").count(), 0);
    assert_eq!(state.redirect(), &RedirectSettings::default());
}

#[test]
fn dump_lists_endpoints() {
    let json = serde_json::to_value(shop()).unwrap();
    assert_eq!(
        json["services"][0]["endpoints"],
        serde_json::json!(["shop/web-0", "shop/web-1"])
    );
    assert_eq!(json["services"][0]["ports"][0]["targetPort"], 8080);
    assert_eq!(json["workloads"][0]["netns"]["path"], "/run/netns/web-0");
}

fn own_netns_inode() -> u64 {
    std::fs::metadata("/proc/self/ns/net").unwrap().ino()
}

#[test]
fn netns_by_path_and_pid() {
    let by_path = NetnsRef::Path("/proc/self/ns/net".into()).open().unwrap();
    assert_eq!(by_path.metadata().unwrap().ino(), own_netns_inode());
    let by_pid = NetnsRef::Pid(std::process::id()).open().unwrap();
    assert_eq!(by_pid.metadata().unwrap().ino(), own_netns_inode());

    let err = NetnsRef::Path("/nonexistent/netns".into())
        .open()
        .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/netns"), "{err}");
}

#[test]
fn netns_by_cgroup_skips_exited_and_host_processes_and_searches_children() {
    let dir = tempfile::tempdir().unwrap();
    // A pid above any pid_max: a process that has exited.
    let gone = 4_194_305 + 1000;
    std::fs::write(dir.path().join("cgroup.procs"), "").unwrap();
    // A runtime helper in the host's namespace (here: this test process) must not be taken
    // for the pod.
    let helper = dir.path().join("crio-conmon-a");
    std::fs::create_dir(&helper).unwrap();
    std::fs::write(
        helper.join("cgroup.procs"),
        format!(
            "{}
",
            std::process::id()
        ),
    )
    .unwrap();
    let err = NetnsRef::Cgroup(dir.path().into()).open().unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("cgroup {} has no process", dir.path().display())),
        "{err}"
    );

    // A process in a namespace of its own (needs privileges: skipped without them).
    let Ok(mut pod) = std::process::Command::new("unshare")
        .args(["--net", "sleep", "10"])
        .spawn()
    else {
        return;
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    let unshared = std::fs::read_link(format!("/proc/{}/ns/net", pod.id()));
    if pod.try_wait().ok().flatten().is_some() || unshared.is_err() {
        eprintln!("unshare --net unavailable here: skipping the positive case");
        return;
    }
    let child = dir.path().join("crio-b");
    std::fs::create_dir(&child).unwrap();
    std::fs::write(
        child.join("cgroup.procs"),
        format!("{gone}\n{}\n", pod.id()),
    )
    .unwrap();
    let file = NetnsRef::Cgroup(dir.path().into()).open();
    let _ = pod.kill();
    let _ = pod.wait();
    let file = file.unwrap();
    assert_ne!(file.metadata().unwrap().ino(), own_netns_inode());
}

#[test]
fn shared_state_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Arc<MeshState>>();
}

/// `shop/web` bound to the waypoint `infra/wp` (whose pods are `wp_pods`), plus the waypoint's
/// service and `web`'s own endpoint.
fn with_waypoint(wp_pods: Vec<Workload>, waypoint_exists: bool) -> MeshState {
    let mut web = service("shop", "web", &["10.96.0.10"], &[("app", "web")]);
    web.waypoint = Some(WaypointRef {
        namespace: "infra".into(),
        name: "wp".into(),
    });
    let mut services = vec![web];
    if waypoint_exists {
        services.push(service("infra", "wp", &["10.96.9.9"], &[("gateway", "wp")]));
    }
    let mut workloads = vec![workload("shop", "web-0", &["10.10.0.2"], &[("app", "web")])];
    workloads.extend(wp_pods);
    MeshState::new(RedirectSettings::default(), workloads, services)
}

fn wp_pod(name: &str, ips: &[&str]) -> Workload {
    let mut pod = workload("infra", name, ips, &[("gateway", "wp")]);
    pod.service_account = "wp".into();
    pod
}

#[test]
fn a_service_with_a_waypoint_resolves_to_a_waypoint_pod() {
    let state = with_waypoint(
        vec![
            wp_pod("wp-0", &["10.30.0.1", "fd00:30::1"]),
            wp_pod("wp-1", &["10.30.0.2"]),
        ],
        true,
    );
    let mut seen = Vec::new();
    for _ in 0..4 {
        match state.resolve(addr("10.96.0.10:80")) {
            Resolved::Waypoint {
                workload,
                ip,
                service,
            } => {
                assert_eq!(service.uid(), "shop/web");
                assert_eq!(workload.namespace, "infra");
                assert_eq!(workload.address_like(ip), Some(ip));
                seen.push(ip);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen, [ip("10.30.0.1"), ip("10.30.0.2")], "round robin");
    // An unknown port is refused before the waypoint is considered.
    assert!(matches!(
        state.resolve(addr("10.96.0.10:81")),
        Resolved::UnknownServicePort { .. }
    ));
    // The endpoint itself stays reachable by its own address (only services are bound), and
    // the waypoint's own VIP goes to its pods directly.
    assert!(matches!(
        state.resolve(addr("10.10.0.2:8080")),
        Resolved::Workload { service: None, .. }
    ));
    assert!(matches!(
        state.resolve(addr("10.96.9.9:80")),
        Resolved::Workload { service: Some(s), .. } if s.uid() == "infra/wp"
    ));
    let dump = serde_json::to_value(&state).unwrap();
    assert_eq!(
        dump["services"][0]["waypoint"],
        serde_json::json!({"namespace": "infra", "name": "wp"})
    );
    assert!(dump["services"][1].get("waypoint").is_none());
}

#[test]
fn a_service_without_endpoints_still_goes_to_its_waypoint() {
    let mut state = with_waypoint(vec![wp_pod("wp-0", &["10.30.0.1"])], true);
    let mut web = (*state.services()[0]).clone();
    web.selector = labels(&[("app", "nothing")]);
    let wp = (*state.services()[1]).clone();
    let workloads = state.workloads().iter().map(|w| (**w).clone()).collect();
    state = MeshState::new(RedirectSettings::default(), workloads, vec![web, wp]);
    assert!(matches!(
        state.resolve(addr("10.96.0.10:80")),
        Resolved::Waypoint { ip: i, .. } if i == ip("10.30.0.1")
    ));
}

#[test]
fn a_missing_or_unready_waypoint_fails_closed() {
    // web-0 is a ready endpoint every time: the waypoint must not be bypassed to reach it.
    let missing = with_waypoint(vec![wp_pod("wp-0", &["10.30.0.1"])], false);
    match missing.resolve(addr("10.96.0.10:80")) {
        Resolved::NoWaypoint {
            service,
            waypoint,
            exists,
        } => {
            assert_eq!(service.uid(), "shop/web");
            assert_eq!(waypoint.to_string(), "infra/wp");
            assert!(!exists);
        }
        other => panic!("unexpected {other:?}"),
    }
    let mut unready = wp_pod("wp-0", &["10.30.0.1"]);
    unready.ready = false;
    for pods in [vec![], vec![unready]] {
        let state = with_waypoint(pods, true);
        assert!(matches!(
            state.resolve(addr("10.96.0.10:80")),
            Resolved::NoWaypoint { exists: true, .. }
        ));
    }
}

/// `shop/db`, a service without selector (VIPs 10.96.0.30 and fd00:96::30) listing
/// `endpoints` as `(address, port overrides)`.
fn listing(endpoints: &[(&str, &[(u16, u16)])]) -> Service {
    let mut db = service("shop", "db", &["10.96.0.30", "fd00:96::30"], &[]);
    db.endpoint_addresses = endpoints
        .iter()
        .map(|(address, ports)| EndpointAddress {
            ip: ip(address),
            ports: ports.iter().copied().collect(),
        })
        .collect();
    db
}

#[test]
fn a_service_without_selector_reaches_its_listed_endpoints() {
    // A listed address is the workload owning it, whatever its namespace or readiness (the
    // list is the readiness), or an address outside the mesh.
    let mut other = workload("ops", "api-0", &["10.20.0.5"], &[]);
    other.ready = false;
    let state = MeshState::new(
        RedirectSettings::default(),
        vec![
            workload("shop", "web-0", &["10.10.0.2"], &[("app", "web")]),
            other,
        ],
        vec![listing(&[
            ("10.10.0.2", &[]),
            ("192.0.2.7", &[(80, 9443)]),
            ("10.20.0.5", &[]),
            ("fd00::7", &[]),
        ])],
    );
    let mut seen = Vec::new();
    for _ in 0..6 {
        match state.resolve(addr("10.96.0.30:80")) {
            Resolved::Workload {
                workload,
                addr: a,
                service,
            } => {
                assert_eq!(service.unwrap().uid(), "shop/db");
                seen.push(format!("{} {a}", workload.uid()));
            }
            Resolved::OutsideMesh { addr: a, service } => {
                assert_eq!(service.uid(), "shop/db");
                seen.push(format!("outside {a}"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    seen.sort();
    seen.dedup();
    // The IPv4 VIP goes to the IPv4 endpoints, each on its own port for 80 if it has one.
    assert_eq!(
        seen,
        [
            "ops/api-0 10.20.0.5:8080",
            "outside 192.0.2.7:9443",
            "shop/web-0 10.10.0.2:8080"
        ]
    );
    assert!(matches!(
        state.resolve(addr("[fd00:96::30]:80")),
        Resolved::OutsideMesh { addr: a, .. } if a == addr("[fd00::7]:8080")
    ));
    assert!(matches!(
        state.resolve(addr("10.96.0.30:81")),
        Resolved::UnknownServicePort { .. }
    ));
    let service = state.service_by_vip(ip("10.96.0.30")).unwrap();
    let workloads: Vec<String> = state.endpoints(service).iter().map(|w| w.uid()).collect();
    assert_eq!(workloads, ["shop/web-0", "ops/api-0"]);
    let dump = serde_json::to_value(&state).unwrap();
    assert_eq!(
        dump["services"][0]["endpoints"],
        serde_json::json!(["shop/web-0", "192.0.2.7", "ops/api-0", "fd00::7"])
    );
    assert_eq!(
        dump["services"][0]["endpointAddresses"][1],
        serde_json::json!({"ip": "192.0.2.7", "ports": {"80": 9443}})
    );
}

#[test]
fn a_service_without_selector_or_endpoints_goes_to_the_address_dialled() {
    let state = MeshState::new(
        RedirectSettings::default(),
        vec![workload("shop", "web-0", &["10.10.0.2"], &[("app", "web")])],
        vec![
            listing(&[]),
            // A selector matching nothing is not the same: refused, as ztunnel refuses a
            // service it knows without a healthy endpoint.
            service("shop", "web", &["10.96.0.10"], &[("app", "none")]),
        ],
    );
    for dst in ["10.96.0.30:80", "[fd00:96::30]:80"] {
        match state.resolve(addr(dst)) {
            Resolved::OutsideMesh { addr: a, service } => {
                assert_eq!(a, addr(dst));
                assert_eq!(service.uid(), "shop/db");
            }
            other => panic!("{dst}: unexpected {other:?}"),
        }
    }
    assert!(matches!(
        state.resolve(addr("10.96.0.10:80")),
        Resolved::NoEndpoints { .. }
    ));
    // An unknown port is still refused: the service is known.
    assert!(matches!(
        state.resolve(addr("10.96.0.30:81")),
        Resolved::UnknownServicePort { .. }
    ));
}

#[test]
fn a_service_without_selector_never_skips_its_waypoint() {
    let mut db = listing(&[("192.0.2.7", &[])]);
    db.waypoint = Some(WaypointRef {
        namespace: "infra".into(),
        name: "wp".into(),
    });
    let mut empty = db.clone();
    empty.endpoint_addresses.clear();
    // Bound and the waypoint has a ready pod: the waypoint, listed endpoints or not.
    for svc in [db.clone(), empty.clone()] {
        let state = MeshState::new(
            RedirectSettings::default(),
            vec![wp_pod("wp-0", &["10.30.0.1"])],
            vec![
                svc,
                service("infra", "wp", &["10.96.9.9"], &[("gateway", "wp")]),
            ],
        );
        assert!(matches!(
            state.resolve(addr("10.96.0.30:80")),
            Resolved::Waypoint { ip: i, .. } if i == ip("10.30.0.1")
        ));
    }
    // Bound to a missing waypoint, or to one whose service lists only addresses outside the
    // mesh (no pod to tunnel to): refused, never passed through.
    let outside_waypoint = {
        let mut wp = listing(&[("192.0.2.9", &[])]);
        wp.namespace = "infra".into();
        wp.name = "wp".into();
        wp.vips = vec![ip("10.96.9.9")];
        wp
    };
    for (svc, waypoint) in [
        (empty.clone(), None),
        (db.clone(), None),
        (empty, Some(outside_waypoint.clone())),
        (db, Some(outside_waypoint)),
    ] {
        let exists = waypoint.is_some();
        let mut services = vec![svc];
        services.extend(waypoint);
        let state = MeshState::new(RedirectSettings::default(), vec![], services);
        match state.resolve(addr("10.96.0.30:80")) {
            Resolved::NoWaypoint { exists: e, .. } => assert_eq!(e, exists),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn unusable_endpoint_addresses() {
    for (address, why) in [
        ("127.0.0.1", Some("is a loopback address")),
        ("::1", Some("is a loopback address")),
        ("::ffff:127.0.0.1", Some("is a loopback address")),
        ("0.0.0.0", Some("is the unspecified address")),
        ("::", Some("is the unspecified address")),
        ("224.0.0.1", Some("is a multicast address")),
        ("ff02::1", Some("is a multicast address")),
        ("169.254.169.254", Some("is a link-local address")),
        ("fe80::1", Some("is a link-local address")),
        ("10.0.0.1", None),
        ("192.0.2.7", None),
        ("fd00::7", None),
    ] {
        assert_eq!(EndpointAddress::unusable(ip(address)), why, "{address}");
    }
}

#[test]
fn workload_name_is_the_controller_and_canonical_service_falls_back_to_it() {
    let pod = workload("shop", "reviews-v1-5d9f-x2x4q", &["10.0.0.9"], &[]);
    // A pod of its own: its name, for both.
    assert_eq!(pod.workload_name(), "reviews-v1-5d9f-x2x4q");
    assert_eq!(pod.canonical_service(), "reviews-v1-5d9f-x2x4q");
    // A Deployment's pod: the Deployment, for both (Istio's canonical service falls back to
    // the workload name, not the pod's).
    let deployed = Workload {
        controller: Some("reviews-v1".into()),
        ..pod.clone()
    };
    assert_eq!(deployed.workload_name(), "reviews-v1");
    assert_eq!(deployed.canonical_service(), "reviews-v1");
    assert_eq!(deployed.canonical_revision(), "latest");
    // Istio's override label, then the canonical labels.
    let overridden = Workload {
        labels: labels(&[
            ("service.istio.io/workload-name", "reviews"),
            ("app", "bookinfo-reviews"),
        ]),
        ..deployed.clone()
    };
    assert_eq!(overridden.workload_name(), "reviews");
    assert_eq!(overridden.canonical_service(), "bookinfo-reviews");
    // An empty override is no override.
    let empty = Workload {
        labels: labels(&[("service.istio.io/workload-name", "")]),
        ..deployed
    };
    assert_eq!(empty.workload_name(), "reviews-v1");
}

/// One namespace's routes cannot make every agent and waypoint compile a huge expression: a
/// long one or one whose program is too large is refused with a reason; a usual one compiles.
#[test]
fn route_expressions_are_bounded_in_length_and_program_size() {
    use routes::{FullRegex, MAX_REGEX_LEN};
    assert!(
        FullRegex::new("/api/v[0-9]+/.*")
            .unwrap()
            .is_match("/api/v2/books")
    );
    let long = "a".repeat(MAX_REGEX_LEN + 1);
    let err = FullRegex::new(&long).unwrap_err().to_string();
    assert!(err.contains("more than the 1024 allowed"), "{err}");
    // Short, but a large program: counted repetitions of a Unicode class.
    let err = FullRegex::new(r"\w{100}\w{100}\w{100}").unwrap_err();
    assert!(matches!(err, regex::Error::CompiledTooBig(_)), "{err}");
}
