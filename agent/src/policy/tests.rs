use super::*;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What a policy sees of a workload: its namespace and labels (the state model's workloads
/// lend the same through `Workload::policy_target`).
#[derive(Clone)]
struct Workload {
    namespace: String,
    labels: Labels,
}

impl Workload {
    fn policy_target(&self) -> Target<'_> {
        Target {
            namespace: &self.namespace,
            labels: &self.labels,
        }
    }
}

fn workload(namespace: &str, _name: &str, l: &[(&str, &str)]) -> Workload {
    Workload {
        namespace: namespace.into(),
        labels: labels(l),
    }
}

fn pat(text: &str) -> Pattern {
    Pattern::parse(text).unwrap()
}

fn net(text: &str) -> IpNet {
    text.parse().unwrap()
}

fn m<T>(values: Vec<T>, not_values: Vec<T>) -> Match<T> {
    Match::new(values, not_values)
}

fn pats(texts: &[&str]) -> Vec<Pattern> {
    texts.iter().map(|t| pat(t)).collect()
}

fn nets(texts: &[&str]) -> Vec<IpNet> {
    texts.iter().map(|t| net(t)).collect()
}

/// The destination of most tests: `shop/web-0`, labels `app=web`.
fn web() -> Workload {
    workload("shop", "web-0", &[("app", "web")])
}

/// A connection and what it needs to be borrowed as a [`ConnectionInfo`].
struct Conn {
    src_ip: IpAddr,
    id: Option<SpiffeId>,
    dst: Workload,
    dst_ip: IpAddr,
    dst_port: u16,
}

impl Conn {
    /// From `spiffe://cluster.local/ns/<ns>/sa/<sa>` at 10.20.0.5 to web-0 10.10.0.2:8080.
    fn mtls(ns: &str, sa: &str) -> Self {
        Self {
            src_ip: "10.20.0.5".parse().unwrap(),
            id: Some(SpiffeId::new("cluster.local", ns, sa)),
            dst: web(),
            dst_ip: "10.10.0.2".parse().unwrap(),
            dst_port: 8080,
        }
    }

    fn plaintext() -> Self {
        Self {
            id: None,
            ..Self::mtls("x", "x")
        }
    }

    fn with_src_ip(mut self, ip: &str) -> Self {
        self.src_ip = ip.parse().unwrap();
        self
    }

    fn with_dst(mut self, dst: Workload) -> Self {
        self.dst = dst;
        self
    }

    fn with_dst_ip(mut self, ip: &str) -> Self {
        self.dst_ip = ip.parse().unwrap();
        self
    }

    fn with_port(mut self, port: u16) -> Self {
        self.dst_port = port;
        self
    }

    fn info(&self) -> ConnectionInfo<'_> {
        ConnectionInfo {
            src_ip: self.src_ip,
            src_identity: self.id.as_ref(),
            dst_workload: self.dst.policy_target(),
            dst_ip: self.dst_ip,
            dst_port: self.dst_port,
        }
    }
}

fn policy(scope: Scope, name: &str, action: Action, rules: Vec<Rule>) -> AuthorizationPolicy {
    AuthorizationPolicy {
        name: name.into(),
        scope,
        action,
        dry_run: false,
        rules,
    }
}

fn in_shop() -> Scope {
    Scope::Namespace("shop".into())
}

fn from(source: Source) -> Rule {
    Rule {
        from: vec![source],
        ..Rule::default()
    }
}

fn to_ports(ports: Match<u16>) -> Rule {
    Rule {
        to: vec![Operation { ports }],
        ..Rule::default()
    }
}

fn when(condition: Condition) -> Rule {
    Rule {
        when: vec![condition],
        ..Rule::default()
    }
}

/// Whether `rule`, alone in an ALLOW policy on shop, admits `conn`.
fn rule_matches(rule: Rule, conn: &Conn) -> bool {
    let allow = policy(in_shop(), "p", Action::Allow, vec![rule]);
    allow.matches(&conn.info())
}

fn set(policies: Vec<AuthorizationPolicy>) -> PolicySet {
    PolicySet::new(policies, Vec::new())
}

#[test]
fn no_policy_allows_everything() {
    let policies = PolicySet::default();
    for conn in [Conn::mtls("shop", "a"), Conn::plaintext()] {
        let decision = policies.authorize(&conn.info());
        assert!(decision.allowed);
        assert_eq!(decision.reason, Reason::NoAllowPolicy);
        assert_eq!(decision.dry_run, None);
    }
}

#[test]
fn principals_and_wildcards() {
    let principals = |values: &[&str]| {
        from(Source {
            principals: m(pats(values), vec![]),
            ..Source::default()
        })
    };
    let conn = Conn::mtls("shop", "frontend");
    for hit in [
        "cluster.local/ns/shop/sa/frontend",
        "cluster.local/ns/shop/*",
        "*/sa/frontend",
        "*",
    ] {
        assert!(rule_matches(principals(&[hit]), &conn), "{hit}");
    }
    for miss in [
        "cluster.local/ns/shop/sa/front",
        "other.domain/ns/shop/sa/frontend",
        "cluster.local/ns/other/*",
        "*/sa/backend",
    ] {
        assert!(!rule_matches(principals(&[miss]), &conn), "{miss}");
    }
    // Any entry of the list.
    assert!(rule_matches(
        principals(&[
            "cluster.local/ns/x/sa/y",
            "cluster.local/ns/shop/sa/frontend"
        ]),
        &conn
    ));
}

#[test]
fn not_principals() {
    let not = |values: &[&str]| {
        from(Source {
            principals: m(vec![], pats(values)),
            ..Source::default()
        })
    };
    let conn = Conn::mtls("shop", "frontend");
    assert!(!rule_matches(
        not(&["cluster.local/ns/shop/sa/frontend"]),
        &conn
    ));
    assert!(!rule_matches(not(&["*"]), &conn));
    assert!(rule_matches(
        not(&["cluster.local/ns/shop/sa/other"]),
        &conn
    ));
    // Both lists: in the first, in none of the second.
    let both = from(Source {
        principals: m(pats(&["cluster.local/ns/shop/*"]), pats(&["*/sa/admin"])),
        ..Source::default()
    });
    assert!(rule_matches(both.clone(), &conn));
    assert!(!rule_matches(both, &Conn::mtls("shop", "admin")));
}

/// As in Istio: a plaintext source has no principal and no namespace. Positive identity lists
/// (even `*`) never match it; negative ones always do, so `notPrincipals: ["*"]` in a DENY
/// policy is the way to refuse plaintext by authorization.
#[test]
fn plaintext_source_has_no_identity() {
    let plain = Conn::plaintext();
    let source = |f: fn(&mut Source)| {
        let mut source = Source::default();
        f(&mut source);
        from(source)
    };
    assert!(!rule_matches(
        source(|s| s.principals = m(pats(&["*"]), vec![])),
        &plain
    ));
    assert!(!rule_matches(
        source(|s| s.namespaces = m(pats(&["*"]), vec![])),
        &plain
    ));
    assert!(!rule_matches(
        source(|s| s.service_accounts = m(vec![ServiceAccountRef::parse("x/x").unwrap()], vec![])),
        &plain
    ));
    assert!(rule_matches(
        source(|s| s.principals = m(vec![], pats(&["*"]))),
        &plain
    ));
    assert!(rule_matches(
        source(|s| s.namespaces = m(vec![], pats(&["shop"]))),
        &plain
    ));
    assert!(rule_matches(
        source(|s| s.service_accounts = m(vec![], vec![ServiceAccountRef::parse("x/x").unwrap()])),
        &plain
    ));
    assert!(!rule_matches(
        when(Condition::SourcePrincipal(m(pats(&["*"]), vec![]))),
        &plain
    ));
    assert!(!rule_matches(
        when(Condition::SourceNamespace(m(pats(&["*"]), vec![]))),
        &plain
    ));

    let require_mtls = policy(
        Scope::Mesh,
        "require-mtls",
        Action::Deny,
        vec![source(|s| s.principals = m(vec![], pats(&["*"])))],
    );
    let policies = set(vec![require_mtls]);
    let decision = policies.authorize(&plain.info());
    assert!(!decision.allowed);
    assert_eq!(
        decision.reason.to_string(),
        "denied by DENY policy require-mtls"
    );
    assert!(policies.authorize(&Conn::mtls("shop", "a").info()).allowed);
}

#[test]
fn namespaces() {
    let ns = |values: &[&str], not: &[&str]| {
        from(Source {
            namespaces: m(pats(values), pats(not)),
            ..Source::default()
        })
    };
    let conn = Conn::mtls("shop-eu", "a");
    assert!(rule_matches(ns(&["shop-eu"], &[]), &conn));
    assert!(rule_matches(ns(&["shop-*"], &[]), &conn));
    assert!(rule_matches(ns(&["*-eu"], &[]), &conn));
    assert!(!rule_matches(ns(&["shop"], &[]), &conn));
    assert!(!rule_matches(ns(&[], &["shop-eu"]), &conn));
    assert!(!rule_matches(ns(&[], &["shop-*"]), &conn));
    assert!(rule_matches(ns(&[], &["shop"]), &conn));
}

#[test]
fn service_accounts() {
    let sa = |values: &[&str], not: &[&str]| {
        let parse = |l: &[&str]| -> Vec<ServiceAccountRef> {
            l.iter()
                .map(|t| ServiceAccountRef::parse(t).unwrap())
                .collect()
        };
        from(Source {
            service_accounts: m(parse(values), parse(not)),
            ..Source::default()
        })
    };
    let conn = Conn::mtls("shop", "frontend");
    assert!(rule_matches(sa(&["shop/frontend"], &[]), &conn));
    assert!(!rule_matches(sa(&["shop/backend"], &[]), &conn));
    assert!(!rule_matches(sa(&["other/frontend"], &[]), &conn));
    assert!(!rule_matches(sa(&[], &["shop/frontend"]), &conn));
    assert!(rule_matches(sa(&[], &["shop/backend"]), &conn));
    // The trust domain plays no part (Istio's definition).
    let mut foreign = Conn::mtls("shop", "frontend");
    foreign.id = Some(SpiffeId::new("other.td", "shop", "frontend"));
    assert!(rule_matches(sa(&["shop/frontend"], &[]), &foreign));
}

#[test]
fn ip_blocks() {
    let ips = |values: &[&str], not: &[&str]| {
        from(Source {
            ip_blocks: m(nets(values), nets(not)),
            ..Source::default()
        })
    };
    let conn = Conn::mtls("shop", "a"); // from 10.20.0.5
    assert!(rule_matches(ips(&["10.20.0.0/16"], &[]), &conn));
    assert!(rule_matches(ips(&["10.20.0.5/32"], &[]), &conn));
    assert!(!rule_matches(ips(&["10.21.0.0/16"], &[]), &conn));
    assert!(!rule_matches(ips(&["fd00::/8"], &[]), &conn));
    assert!(!rule_matches(
        ips(&["10.0.0.0/8"], &["10.20.0.0/24"]),
        &conn
    ));
    assert!(rule_matches(ips(&["10.0.0.0/8"], &["10.30.0.0/24"]), &conn));
    assert!(rule_matches(ips(&[], &["10.30.0.0/24"]), &conn));
    assert!(!rule_matches(ips(&[], &["10.20.0.5/32"]), &conn));
    // A dual-stack listener reports an IPv4 client as IPv4-mapped: still an IPv4 source.
    let mapped = Conn::mtls("shop", "a").with_src_ip("::ffff:10.20.0.5");
    assert!(rule_matches(ips(&["10.20.0.0/16"], &[]), &mapped));
    let v6 = Conn::mtls("shop", "a").with_src_ip("fd00:20::5");
    assert!(rule_matches(ips(&["fd00:20::/64"], &[]), &v6));
    assert!(!rule_matches(ips(&["10.0.0.0/8"], &[]), &v6));
    // Identity plays no part: plaintext matches on its address.
    assert!(rule_matches(
        ips(&["10.20.0.0/16"], &[]),
        &Conn::plaintext()
    ));
}

#[test]
fn ports() {
    let conn = Conn::mtls("shop", "a"); // to port 8080
    assert!(rule_matches(to_ports(m(vec![80, 8080], vec![])), &conn));
    assert!(!rule_matches(to_ports(m(vec![80], vec![])), &conn));
    assert!(!rule_matches(to_ports(m(vec![], vec![8080])), &conn));
    assert!(rule_matches(to_ports(m(vec![], vec![9090])), &conn));
    // Any entry of `to`.
    let rule = Rule {
        to: vec![
            Operation {
                ports: m(vec![80], vec![]),
            },
            Operation {
                ports: m(vec![8080], vec![]),
            },
        ],
        ..Rule::default()
    };
    assert!(rule_matches(rule, &conn));
}

#[test]
fn conditions() {
    let conn = Conn::mtls("shop", "frontend"); // 10.20.0.5 -> 10.10.0.2:8080
    let cases = [
        (
            Condition::DestinationIp(m(nets(&["10.10.0.2/32"]), vec![])),
            true,
        ),
        (
            Condition::DestinationIp(m(nets(&["10.10.1.0/24"]), vec![])),
            false,
        ),
        (
            Condition::DestinationIp(m(vec![], nets(&["10.10.0.0/24"]))),
            false,
        ),
        (
            Condition::DestinationIp(m(vec![], nets(&["10.10.1.0/24"]))),
            true,
        ),
        (
            Condition::SourceIp(m(nets(&["10.20.0.0/16"]), vec![])),
            true,
        ),
        (
            Condition::SourceIp(m(vec![], nets(&["10.20.0.0/16"]))),
            false,
        ),
        (Condition::DestinationPort(m(vec![8080], vec![])), true),
        (Condition::DestinationPort(m(vec![], vec![8080])), false),
        (
            Condition::SourcePrincipal(m(pats(&["cluster.local/ns/shop/sa/frontend"]), vec![])),
            true,
        ),
        (
            Condition::SourcePrincipal(m(vec![], pats(&["*/sa/frontend"]))),
            false,
        ),
        (Condition::SourceNamespace(m(pats(&["shop"]), vec![])), true),
        (Condition::SourceNamespace(m(vec![], pats(&["sh*"]))), false),
        // values and notValues together: both must hold.
        (
            Condition::SourceIp(m(nets(&["10.0.0.0/8"]), nets(&["10.20.0.0/16"]))),
            false,
        ),
    ];
    for (condition, expected) in cases {
        assert_eq!(
            rule_matches(when(condition.clone()), &conn),
            expected,
            "{condition:?}"
        );
    }
    // The destination address is the one dialled (an IPv4-mapped one too).
    let other = Conn::mtls("shop", "frontend").with_dst_ip("::ffff:10.10.0.9");
    assert!(rule_matches(
        when(Condition::DestinationIp(m(nets(&["10.10.0.9/32"]), vec![]))),
        &other
    ));
}

#[test]
fn rule_structure() {
    let conn = Conn::mtls("shop", "frontend");
    let from_shop = Source {
        namespaces: m(pats(&["shop"]), vec![]),
        ..Source::default()
    };
    let from_ops = Source {
        namespaces: m(pats(&["ops"]), vec![]),
        ..Source::default()
    };
    let port = |p| Operation {
        ports: m(vec![p], vec![]),
    };
    let dst_port = |p| Condition::DestinationPort(m(vec![p], vec![]));

    // A rule with nothing in it matches everything, plaintext included.
    assert!(rule_matches(Rule::default(), &conn));
    assert!(rule_matches(Rule::default(), &Conn::plaintext()));
    // Within a rule: from AND to AND every when.
    let rule =
        |from: Vec<Source>, to: Vec<Operation>, when: Vec<Condition>| Rule { from, to, when };
    assert!(rule_matches(
        rule(
            vec![from_shop.clone()],
            vec![port(8080)],
            vec![dst_port(8080)]
        ),
        &conn
    ));
    assert!(!rule_matches(
        rule(vec![from_shop.clone()], vec![port(80)], vec![]),
        &conn
    ));
    assert!(!rule_matches(
        rule(vec![from_ops.clone()], vec![port(8080)], vec![]),
        &conn
    ));
    assert!(!rule_matches(
        rule(vec![], vec![], vec![dst_port(8080), dst_port(80)]),
        &conn
    ));
    // Within a list: any entry.
    assert!(rule_matches(
        rule(vec![from_ops.clone(), from_shop.clone()], vec![], vec![]),
        &conn
    ));
    // Within a source: every field.
    let both = Source {
        namespaces: m(pats(&["shop"]), vec![]),
        ip_blocks: m(nets(&["192.0.2.0/24"]), vec![]),
        ..Source::default()
    };
    assert!(!rule_matches(rule(vec![both], vec![], vec![]), &conn));
    // Within a policy: any rule; no rule at all matches nothing.
    let two = policy(
        in_shop(),
        "p",
        Action::Allow,
        vec![from(from_ops), from(from_shop)],
    );
    assert!(two.matches(&conn.info()));
    let none = policy(in_shop(), "p", Action::Allow, vec![]);
    assert!(!none.matches(&conn.info()));
}

#[test]
fn deny_beats_allow() {
    let allow = policy(in_shop(), "allow-all", Action::Allow, vec![Rule::default()]);
    let deny = policy(
        in_shop(),
        "block-legacy",
        Action::Deny,
        vec![from(Source {
            namespaces: m(pats(&["legacy"]), vec![]),
            ..Source::default()
        })],
    );
    let policies = set(vec![allow, deny]);
    let denied = policies.authorize(&Conn::mtls("legacy", "a").info());
    assert!(!denied.allowed);
    assert_eq!(
        denied.reason.to_string(),
        "denied by DENY policy shop/block-legacy"
    );
    assert_eq!(denied.reason.label(), "deny_policy");
    let allowed = policies.authorize(&Conn::mtls("shop", "a").info());
    assert!(allowed.allowed);
    assert_eq!(
        allowed.reason.to_string(),
        "allowed by ALLOW policy shop/allow-all"
    );
}

#[test]
fn allow_policies_make_only_selected_workloads_default_deny() {
    let allow_frontend = policy(
        Scope::new(Some("shop".into()), Some(labels(&[("app", "web")]))),
        "web-from-frontend",
        Action::Allow,
        vec![from(Source {
            principals: m(pats(&["cluster.local/ns/shop/sa/frontend"]), vec![]),
            ..Source::default()
        })],
    );
    let policies = set(vec![allow_frontend]);

    assert!(
        policies
            .authorize(&Conn::mtls("shop", "frontend").info())
            .allowed
    );
    let denied = policies.authorize(&Conn::mtls("shop", "intruder").info());
    assert!(!denied.allowed);
    assert_eq!(denied.reason, Reason::NoAllowMatch { selecting: 1 });
    assert_eq!(
        denied.reason.to_string(),
        "no ALLOW policy matched (default deny: 1 ALLOW policy selects this workload)"
    );
    assert_eq!(denied.reason.label(), "no_allow_match");
    assert!(!policies.authorize(&Conn::plaintext().info()).allowed);

    // Another workload of the namespace is not selected: still open.
    let db = Conn::mtls("shop", "intruder").with_dst(workload("shop", "db-0", &[("app", "db")]));
    let decision = policies.authorize(&db.info());
    assert!(decision.allowed);
    assert_eq!(decision.reason, Reason::NoAllowPolicy);

    // Two ALLOW policies: either admits.
    let second = policy(
        in_shop(),
        "port-9090",
        Action::Allow,
        vec![to_ports(m(vec![9090], vec![]))],
    );
    let policies = set(vec![policies.authorizations()[0].as_ref().clone(), second]);
    assert!(
        policies
            .authorize(&Conn::mtls("shop", "intruder").with_port(9090).info())
            .allowed
    );
    assert_eq!(
        policies
            .authorize(&Conn::mtls("shop", "intruder").info())
            .reason
            .to_string(),
        "no ALLOW policy matched (default deny: 2 ALLOW policies select this workload)"
    );
}

#[test]
fn allow_nothing() {
    let policies = set(vec![policy(
        in_shop(),
        "allow-nothing",
        Action::Allow,
        vec![],
    )]);
    assert!(!policies.authorize(&Conn::mtls("shop", "a").info()).allowed);
}

#[test]
fn scopes() {
    let deny_all = |scope| policy(scope, "deny", Action::Deny, vec![Rule::default()]);
    let shop_web = Conn::mtls("a", "b");
    let shop_db = Conn::mtls("a", "b").with_dst(workload("shop", "db-0", &[("app", "db")]));
    let ops_web = Conn::mtls("a", "b").with_dst(workload("ops", "web-0", &[("app", "web")]));
    let denied = |scope: Scope| {
        let policies = set(vec![deny_all(scope)]);
        [&shop_web, &shop_db, &ops_web].map(|c| !policies.authorize(&c.info()).allowed)
    };
    assert_eq!(denied(Scope::Mesh), [true, true, true]);
    assert_eq!(denied(in_shop()), [true, true, false]);
    assert_eq!(
        denied(Scope::new(
            Some("shop".into()),
            Some(labels(&[("app", "web")]))
        )),
        [true, false, false]
    );
    // A mesh-wide selector (Istio's root namespace) selects in every namespace.
    assert_eq!(
        denied(Scope::new(None, Some(labels(&[("app", "web")])))),
        [true, false, true]
    );
    // Every selector label must be carried.
    assert_eq!(
        denied(Scope::new(
            Some("shop".into()),
            Some(labels(&[("app", "web"), ("tier", "front")]))
        )),
        [false, false, false]
    );
    // An empty selector is no selector.
    assert_eq!(
        denied(Scope::new(Some("shop".into()), Some(Labels::new()))),
        [true, true, false]
    );
    // A mesh-wide policy is named without a namespace.
    let decision = set(vec![deny_all(Scope::Mesh)]).authorize(&shop_web.info());
    assert_eq!(decision.reason.to_string(), "denied by DENY policy deny");
}

#[test]
fn dry_run_reports_without_deciding() {
    let mut dry_deny = policy(
        in_shop(),
        "would-block",
        Action::Deny,
        vec![from(Source {
            namespaces: m(pats(&["legacy"]), vec![]),
            ..Source::default()
        })],
    );
    dry_deny.dry_run = true;
    let policies = set(vec![dry_deny]);

    let decision = policies.authorize(&Conn::mtls("legacy", "a").info());
    assert!(decision.allowed);
    assert_eq!(decision.reason, Reason::NoAllowPolicy);
    let dry = decision.dry_run.expect("dry-run policy selects web-0");
    assert!(!dry.allowed);
    assert_eq!(
        dry.reason.to_string(),
        "denied by DENY policy shop/would-block"
    );
    assert_eq!(dry.matched.len(), 1);
    assert_eq!(dry.matched[0].name, "would-block");

    // Not matching: reported as not matched, same outcome.
    let dry = policies
        .authorize(&Conn::mtls("shop", "a").info())
        .dry_run
        .unwrap();
    assert!(dry.allowed && dry.matched.is_empty());

    // Not selecting the destination: nothing to report.
    let ops = Conn::mtls("legacy", "a").with_dst(workload("ops", "x", &[]));
    assert_eq!(policies.authorize(&ops.info()).dry_run, None);

    // A dry-run ALLOW would make the workload default-deny; the enforced decision is unchanged.
    let mut dry_allow = policy(
        in_shop(),
        "only-frontend",
        Action::Allow,
        vec![from(Source {
            principals: m(pats(&["*/sa/frontend"]), vec![]),
            ..Source::default()
        })],
    );
    dry_allow.dry_run = true;
    let enforced_deny = policy(
        in_shop(),
        "no-9090",
        Action::Deny,
        vec![to_ports(m(vec![9090], vec![]))],
    );
    let policies = set(vec![dry_allow, enforced_deny]);
    let decision = policies.authorize(&Conn::mtls("shop", "other").info());
    assert!(decision.allowed);
    let dry = decision.dry_run.unwrap();
    assert!(!dry.allowed);
    assert_eq!(dry.reason, Reason::NoAllowMatch { selecting: 1 });
    let decision = policies.authorize(&Conn::mtls("shop", "frontend").info());
    let dry = decision.dry_run.unwrap();
    assert!(dry.allowed);
    assert_eq!(dry.matched[0].name, "only-frontend");
    // Enforced policies still decide, and count in the dry-run outcome.
    let decision = policies.authorize(&Conn::mtls("shop", "frontend").with_port(9090).info());
    assert!(!decision.allowed);
    assert!(!decision.dry_run.unwrap().allowed);
}

fn peer(scope: Scope, name: &str, mode: Option<PeerAuthMode>) -> PeerAuthentication {
    PeerAuthentication {
        name: name.into(),
        scope,
        mode,
    }
}

#[test]
fn peer_auth_precedence() {
    use PeerAuthMode::{Permissive, Strict};
    let web = web();
    let db = workload("shop", "db-0", &[("app", "db")]);
    let ops = workload("ops", "x", &[("app", "web")]);
    let web_selector = || Scope::new(Some("shop".into()), Some(labels(&[("app", "web")])));
    let modes = |policies: Vec<PeerAuthentication>| {
        let set = PolicySet::new(Vec::new(), policies);
        [&web, &db, &ops].map(|w| set.peer_auth_mode(w.policy_target()))
    };

    // No policy: PERMISSIVE, Istio's default; one mesh-wide policy makes everything STRICT.
    assert_eq!(modes(vec![]), [Permissive, Permissive, Permissive]);
    assert_eq!(
        modes(vec![peer(Scope::Mesh, "mesh", Some(Strict))]),
        [Strict, Strict, Strict]
    );
    assert_eq!(
        modes(vec![peer(Scope::Mesh, "mesh", Some(Permissive))]),
        [Permissive, Permissive, Permissive]
    );
    // Namespace beats mesh, workload beats namespace, whatever the order.
    assert_eq!(
        modes(vec![
            peer(web_selector(), "web", Some(Permissive)),
            peer(in_shop(), "shop", Some(Strict)),
            peer(Scope::Mesh, "mesh", Some(Permissive)),
        ]),
        [Permissive, Strict, Permissive]
    );
    assert_eq!(
        modes(vec![
            peer(Scope::Mesh, "mesh", Some(Permissive)),
            peer(in_shop(), "shop", Some(Strict)),
            peer(web_selector(), "web", Some(Strict)),
        ]),
        [Strict, Strict, Permissive]
    );
    // UNSET inherits from the next wider level: workload from namespace, namespace from mesh,
    // and an UNSET mesh-wide policy leaves the default.
    assert_eq!(
        modes(vec![
            peer(web_selector(), "web", None),
            peer(in_shop(), "shop", Some(Permissive)),
            peer(Scope::Mesh, "mesh", Some(Strict)),
        ]),
        [Permissive, Permissive, Strict]
    );
    assert_eq!(
        modes(vec![
            peer(web_selector(), "web", None),
            peer(in_shop(), "shop", None),
            peer(Scope::Mesh, "mesh", Some(Strict)),
        ]),
        [Strict, Strict, Strict]
    );
    assert_eq!(
        modes(vec![
            peer(in_shop(), "shop", None),
            peer(Scope::Mesh, "mesh", None)
        ]),
        [Permissive, Permissive, Permissive]
    );
    // Two workload policies selecting the same workload: the first wins.
    let web_version = Scope::new(
        Some("shop".into()),
        Some(labels(&[("app", "web"), ("v", "1")])),
    );
    let mut web_v1 = web.clone();
    web_v1.labels.insert("v".into(), "1".into());
    let set = PolicySet::new(
        Vec::new(),
        vec![
            peer(web_selector(), "web", Some(Permissive)),
            peer(web_version, "web-v1", Some(Strict)),
        ],
    );
    assert_eq!(set.peer_auth_mode(web_v1.policy_target()), Permissive);
}

#[test]
fn patterns() {
    assert_eq!(pat("*"), Pattern::Any);
    assert_eq!(pat("a*"), Pattern::Prefix("a".into()));
    assert_eq!(pat("*a"), Pattern::Suffix("a".into()));
    assert_eq!(pat("a"), Pattern::Exact("a".into()));
    for text in ["*", "a*", "*a", "a"] {
        assert_eq!(pat(text).to_string(), text);
    }
    assert!(!Pattern::Any.matches(""));
    for bad in ["", "a*b", "*a*", "**"] {
        assert!(Pattern::parse(bad).is_err(), "{bad:?} accepted");
    }
    assert_eq!(
        ServiceAccountRef::parse("shop/web").unwrap(),
        ServiceAccountRef {
            namespace: "shop".into(),
            name: "web".into()
        }
    );
    for bad in ["shop", "/web", "shop/", "shop/web/x", "shop/*"] {
        assert!(ServiceAccountRef::parse(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn serializes_for_the_config_dump() {
    let p = policy(
        Scope::new(Some("shop".into()), Some(labels(&[("app", "web")]))),
        "p",
        Action::Deny,
        vec![from(Source {
            principals: m(pats(&["cluster.local/ns/*"]), vec![]),
            ip_blocks: m(vec![], nets(&["10.0.0.0/8"])),
            ..Source::default()
        })],
    );
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["action"], "DENY");
    assert_eq!(json["scope"]["workloads"]["namespace"], "shop");
    assert_eq!(
        json["rules"][0]["from"][0]["principals"]["values"][0],
        "cluster.local/ns/*"
    );
    assert_eq!(
        json["rules"][0]["from"][0]["ipBlocks"]["notValues"][0],
        "10.0.0.0/8"
    );
}
