use http::{HeaderMap, HeaderValue};
use serde_json::json;

use super::*;

fn pat(text: &str) -> Pattern {
    Pattern::parse(text).unwrap()
}

fn pats(texts: &[&str]) -> Vec<Pattern> {
    texts.iter().map(|t| pat(t)).collect()
}

fn m<T>(values: Vec<T>, not_values: Vec<T>) -> Match<T> {
    Match::new(values, not_values)
}

fn strings(texts: &[&str]) -> Vec<String> {
    texts.iter().map(|t| t.to_string()).collect()
}

const AT: Attachment<'static> = Attachment {
    service: ("default", "backend"),
    waypoint: Some(("default", "waypoint")),
};

fn policy(name: &str, action: Action, rules: Vec<L7Rule>) -> WaypointPolicy {
    WaypointPolicy {
        name: name.into(),
        namespace: "default".into(),
        targets: vec![TargetRef::Service {
            namespace: "default".into(),
            name: "backend".into(),
        }],
        action,
        dry_run: false,
        rules,
    }
}

/// A request from `sa` in `default` (trust domain cluster.local) to 10.96.0.30:9080.
struct Req {
    id: SpiffeId,
    method: &'static str,
    path: &'static str,
    host: &'static str,
    headers: HeaderMap,
    auth: Option<RequestAuth>,
}

fn req(sa: &str, method: &'static str, path: &'static str) -> Req {
    Req {
        id: SpiffeId::new("cluster.local", "default", sa),
        method,
        path,
        host: "backend.default.svc.cluster.local",
        headers: HeaderMap::new(),
        auth: None,
    }
}

impl Req {
    fn info(&self) -> RequestInfo<'_> {
        RequestInfo {
            src_ip: "10.10.0.2".parse().unwrap(),
            src_identity: Some(&self.id),
            dst_ip: "10.96.0.30".parse().unwrap(),
            dst_port: 9080,
            method: self.method,
            path: self.path,
            host: self.host,
            headers: &self.headers,
            auth: self.auth.as_ref(),
        }
    }
}

fn allowed(set: &WaypointPolicies, r: &Req) -> bool {
    set.authorize(&AT, &r.info()).allowed
}

/// The seed's `allow-frontend-to-backend`, attached to the backend's service.
fn seed() -> WaypointPolicy {
    policy(
        "allow-frontend-to-backend",
        Action::Allow,
        vec![L7Rule {
            from: vec![L7Source {
                peer: Source {
                    principals: m(pats(&["cluster.local/ns/default/sa/frontend"]), vec![]),
                    ..Default::default()
                },
                ..Default::default()
            }],
            to: vec![L7Operation {
                methods: m(pats(&["GET", "POST"]), vec![]),
                ..Default::default()
            }],
            when: vec![],
        }],
    )
}

#[test]
fn no_policy_allows_and_the_seed_policy_allows_only_get_and_post_from_frontend() {
    let none = WaypointPolicies::default();
    assert!(allowed(&none, &req("other", "DELETE", "/")));
    let set = WaypointPolicies::new(vec![seed()], vec![]);
    assert!(allowed(&set, &req("frontend", "GET", "/api")));
    assert!(allowed(&set, &req("frontend", "POST", "/api")));
    assert!(!allowed(&set, &req("frontend", "DELETE", "/api")));
    assert!(
        !allowed(&set, &req("frontend", "get", "/api")),
        "methods are case-sensitive"
    );
    assert!(!allowed(&set, &req("other", "GET", "/api")));
    let decision = set.authorize(&AT, &req("other", "GET", "/").info());
    assert_eq!(decision.reason, L7Reason::NoAllowMatch { applying: 1 });
    assert_eq!(
        decision.reason.details(),
        "rbac_access_denied_matched_policy[none]"
    );
}

#[test]
fn a_policy_applies_only_where_its_target_is() {
    let mut on_other = seed();
    on_other.targets = vec![TargetRef::Service {
        namespace: "default".into(),
        name: "other".into(),
    }];
    let set = WaypointPolicies::new(vec![on_other], vec![]);
    assert!(allowed(&set, &req("nobody", "DELETE", "/")));
    // Attached to the waypoint: every service through it.
    let mut on_waypoint = seed();
    on_waypoint.targets = vec![TargetRef::Waypoint {
        namespace: "default".into(),
        name: "waypoint".into(),
    }];
    let set = WaypointPolicies::new(vec![on_waypoint], vec![]);
    assert!(!allowed(&set, &req("nobody", "GET", "/")));
    let elsewhere = Attachment {
        service: ("default", "backend"),
        waypoint: Some(("other", "waypoint")),
    };
    assert!(
        set.authorize(&elsewhere, &req("nobody", "GET", "/").info())
            .allowed
    );
}

#[test]
fn deny_comes_before_allow() {
    let deny_admin = policy(
        "deny-admin",
        Action::Deny,
        vec![L7Rule {
            to: vec![L7Operation {
                paths: m(pats(&["/admin/*"]), vec![]),
                ..Default::default()
            }],
            ..Default::default()
        }],
    );
    let set = WaypointPolicies::new(vec![seed(), deny_admin], vec![]);
    assert!(allowed(&set, &req("frontend", "GET", "/api")));
    let decision = set.authorize(&AT, &req("frontend", "GET", "/admin/users").info());
    assert!(!decision.allowed);
    assert_eq!(
        decision.reason.details(),
        "rbac_access_denied_matched_policy[default.deny-admin]"
    );
}

#[test]
fn istio_path_forms_and_not_paths() {
    let rule = |paths: Vec<Pattern>, not_paths: Vec<Pattern>| {
        WaypointPolicies::new(
            vec![policy(
                "p",
                Action::Allow,
                vec![L7Rule {
                    to: vec![L7Operation {
                        paths: m(paths, not_paths),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            )],
            vec![],
        )
    };
    let exact = rule(pats(&["/api"]), vec![]);
    assert!(allowed(&exact, &req("a", "GET", "/api")));
    assert!(!allowed(&exact, &req("a", "GET", "/api/")));
    let prefix = rule(pats(&["/static/*"]), vec![]);
    assert!(allowed(&prefix, &req("a", "GET", "/static/app.js")));
    assert!(!allowed(&prefix, &req("a", "GET", "/static")));
    let suffix = rule(pats(&["*.txt"]), vec![]);
    assert!(allowed(&suffix, &req("a", "GET", "/docs/readme.txt")));
    assert!(!allowed(&suffix, &req("a", "GET", "/docs/readme.md")));
    let any_but = rule(pats(&["*"]), pats(&["/private/*"]));
    assert!(allowed(&any_but, &req("a", "GET", "/")));
    assert!(!allowed(&any_but, &req("a", "GET", "/private/key")));
}

#[test]
fn not_fields_hosts_ports_and_methods() {
    let set = WaypointPolicies::new(
        vec![policy(
            "p",
            Action::Allow,
            vec![L7Rule {
                from: vec![L7Source {
                    peer: Source {
                        principals: not_principals_for_test(),
                        ..Default::default()
                    },
                    ..Default::default()
                }],
                to: vec![L7Operation {
                    hosts: m(pats(&["*.svc.cluster.local"]), vec![]),
                    methods: m(vec![], pats(&["DELETE"])),
                    ports: m(vec![9080], vec![]),
                    ..Default::default()
                }],
                when: vec![],
            }],
        )],
        vec![],
    );
    assert!(allowed(&set, &req("frontend", "GET", "/")));
    assert!(!allowed(&set, &req("frontend", "DELETE", "/")));
    assert!(
        !allowed(&set, &req("intruder", "GET", "/")),
        "notPrincipals"
    );
    let mut upper = req("frontend", "GET", "/");
    upper.host = "BACKEND.default.SVC.cluster.local";
    assert!(allowed(&set, &upper), "hosts are compared without case");
    let mut elsewhere = req("frontend", "GET", "/");
    elsewhere.host = "example.com";
    assert!(!allowed(&set, &elsewhere));
}

/// `principals` left empty, `notPrincipals` naming the intruder.
fn not_principals_for_test() -> Match<Pattern> {
    m(vec![], pats(&["cluster.local/ns/default/sa/intruder"]))
}

#[test]
fn request_principals_headers_and_claims() {
    let require_jwt = policy(
        "require-jwt",
        Action::Allow,
        vec![L7Rule {
            from: vec![L7Source {
                request_principals: m(pats(&["*"]), vec![]),
                ..Default::default()
            }],
            when: vec![
                L7Condition::Claim {
                    path: strings(&["groups"]),
                    values: m(pats(&["admin"]), vec![]),
                },
                L7Condition::Claim {
                    path: strings(&["nested", "team"]),
                    values: m(pats(&["pay*"]), vec![]),
                },
                L7Condition::RequestHeader {
                    name: "x-env".into(),
                    values: m(vec![], pats(&["prod"])),
                },
            ],
            ..Default::default()
        }],
    );
    let set = WaypointPolicies::new(vec![require_jwt], vec![]);
    let mut r = req("frontend", "GET", "/");
    assert!(!allowed(&set, &r), "no token: no request principal");
    r.auth = Some(RequestAuth::from_claims(json!({
        "iss": "https://issuer", "sub": "alice",
        "groups": ["dev", "admin"], "nested": {"team": "payments"}
    })));
    assert_eq!(r.auth.as_ref().unwrap().principal, "https://issuer/alice");
    assert!(allowed(&set, &r));
    r.headers.insert("x-env", HeaderValue::from_static("prod"));
    assert!(!allowed(&set, &r), "notValues on a header");
    r.headers.clear();
    r.auth = Some(RequestAuth::from_claims(json!({
        "iss": "https://issuer", "sub": "bob", "groups": "dev", "nested": {"team": "payments"}
    })));
    assert!(!allowed(&set, &r), "claim not in the list");
}

#[test]
fn dry_run_reports_and_never_enforces() {
    let mut deny_all = policy("deny-all", Action::Deny, vec![L7Rule::default()]);
    deny_all.dry_run = true;
    let set = WaypointPolicies::new(vec![deny_all], vec![]);
    let decision = set.authorize(&AT, &req("frontend", "GET", "/").info());
    assert!(decision.allowed);
    assert!(matches!(
        decision.dry_run,
        Some((false, L7Reason::DeniedBy(_)))
    ));
}

/// Opaque TCP at the waypoint, with Istio's semantics for TCP traffic: an ALLOW rule with an
/// HTTP-only field never matches it, a DENY rule ignores its HTTP-only fields (and so denies
/// on the rest), and L4-only rules judge it as a request.
#[test]
fn opaque_tcp_fails_allow_rules_with_http_fields_and_meets_deny_rules_without_them() {
    let opaque = |set: &WaypointPolicies, sa: &str| {
        let id = SpiffeId::new("cluster.local", "default", sa);
        let dst = "10.96.0.30:9080".parse().unwrap();
        set.authorize_opaque(&AT, "10.10.0.2".parse().unwrap(), &id, dst)
    };
    // The seed allows GET and POST from frontend: a connection that is not HTTP has no
    // method, so not even frontend's passes.
    let seed_only = WaypointPolicies::new(vec![seed()], vec![]);
    assert!(!opaque(&seed_only, "frontend").allowed);
    // An ALLOW on the principal alone lets frontend's TCP through, and no one else's.
    let mut l4_allow = seed();
    l4_allow.rules[0].to.clear();
    let set = WaypointPolicies::new(vec![l4_allow.clone()], vec![]);
    assert!(opaque(&set, "frontend").allowed);
    assert!(!opaque(&set, "other").allowed);
    // A DENY of `DELETE /admin/*` from other: its HTTP fields are ignored for TCP, so other's
    // connections are denied (a client cannot dodge it by not speaking HTTP) and frontend's
    // still pass; over HTTP the same DENY hits only what it names.
    let deny = policy(
        "deny-admin-delete",
        Action::Deny,
        vec![L7Rule {
            from: vec![L7Source {
                peer: Source {
                    principals: m(pats(&["cluster.local/ns/default/sa/other"]), vec![]),
                    ..Default::default()
                },
                ..Default::default()
            }],
            to: vec![L7Operation {
                methods: m(pats(&["DELETE"]), vec![]),
                paths: m(pats(&["/admin/*"]), vec![]),
                ..Default::default()
            }],
            when: vec![L7Condition::RequestHeader {
                name: "x-admin".into(),
                values: m(pats(&["*"]), vec![]),
            }],
        }],
    );
    let mut open_allow = l4_allow;
    open_allow.rules[0].from.clear();
    let set = WaypointPolicies::new(vec![open_allow, deny], vec![]);
    let decision = opaque(&set, "other");
    assert!(!decision.allowed);
    assert_eq!(
        decision.reason.details(),
        "rbac_access_denied_matched_policy[default.deny-admin-delete]"
    );
    assert!(opaque(&set, "frontend").allowed);
    assert!(allowed(&set, &req("other", "GET", "/admin/x")));
}
