//! Policy resources: their conversion (docs/crds.md's rules), and the source and the status
//! writer against the fake API server.
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::events::v1::Event,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::{
    StatusWriter,
    policies::convert_policies,
    security::{
        AuthorizationPolicyResource, DEFAULT_ROOT_NAMESPACE, PeerAuthenticationResource,
        PolicyCondition, RequestAuthenticationResource, Verdict, authorization_policy,
        peer_authentication,
    },
    tests::{Harness, WAIT, labels, namespace, pod},
};
use crate::{
    identity::SpiffeId,
    policy::{
        Action, PeerAuthMode, PolicySet, Scope,
        l7::{L7Rule, TargetRef},
    },
    state::{MeshState, Workload},
    testing::fake_apiserver::{FakeApiServer, GoneStyle},
};
use ambit_test_jwt::TestIssuer;

const ROOT: &str = DEFAULT_ROOT_NAMESPACE;

fn meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        ..ObjectMeta::default()
    }
}

fn authorization(namespace: &str, name: &str, spec: Value) -> AuthorizationPolicyResource {
    AuthorizationPolicyResource {
        metadata: meta(namespace, name),
        spec,
        status: None,
    }
}

fn request_authentication_resource(
    namespace: &str,
    name: &str,
    spec: Value,
) -> RequestAuthenticationResource {
    RequestAuthenticationResource {
        metadata: meta(namespace, name),
        spec,
        status: None,
    }
}

fn peer(namespace: &str, name: &str, spec: Value) -> PeerAuthenticationResource {
    PeerAuthenticationResource {
        metadata: meta(namespace, name),
        spec,
        status: None,
    }
}

fn workload(namespace: &str, name: &str, app: &str) -> Workload {
    Workload {
        name: name.into(),
        controller: None,
        namespace: namespace.into(),
        service_account: "web".into(),
        node: "node-b".into(),
        ips: vec!["10.0.0.2".parse().unwrap()],
        labels: labels(&[("app", app)]).unwrap(),
        enrolled: true,
        ready: true,
        netns: crate::netns::NetnsRef::Path(Default::default()),
        capture_exclusions: Default::default(),
    }
}

/// Whether `ns/sa` (or plaintext, `None`) from 10.9.0.1 may reach `dst` on `port` under
/// `policies`.
fn allows(policies: &PolicySet, src: Option<(&str, &str)>, dst: &Workload, port: u16) -> bool {
    let id = src.map(|(ns, sa)| SpiffeId::new("cluster.local", ns, sa));
    policies
        .authorize(&crate::policy::ConnectionInfo {
            src_ip: "10.9.0.1".parse().unwrap(),
            src_identity: id.as_ref(),
            dst_workload: dst.policy_target(),
            dst_ip: dst.ips[0],
            dst_port: port,
        })
        .allowed
}

/// The policy set of one AuthorizationPolicy resource.
fn set_of(resource: AuthorizationPolicyResource) -> PolicySet {
    convert_policies(&[Arc::new(resource)], &[], &[], ROOT, &HashMap::new()).set
}

/// `backend` (app=web) of shop accepts only shop/frontend on 8080.
fn backend_spec() -> Value {
    json!({
        "selector": {"matchLabels": {"app": "web"}},
        "action": "ALLOW",
        "rules": [{
            "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/frontend"]}}],
            "to": [{"operation": {"ports": ["8080"]}}],
        }],
    })
}

#[test]
fn accepted_allow_policy_is_enforced_as_written() {
    let converted = authorization_policy(&authorization("shop", "backend", backend_spec()), ROOT);
    assert_eq!(converted.acceptance.verdict, Verdict::Accepted);
    assert_eq!(
        converted.policy.scope,
        Scope::Workloads {
            namespace: Some("shop".into()),
            labels: labels(&[("app", "web")]).unwrap(),
        }
    );
    let set = set_of(authorization("shop", "backend", backend_spec()));
    let web = workload("shop", "web-0", "web");
    assert!(allows(&set, Some(("shop", "frontend")), &web, 8080));
    assert!(!allows(&set, Some(("shop", "frontend")), &web, 9090));
    assert!(!allows(&set, Some(("shop", "other")), &web, 8080));
    // Not selected: the policy does not apply.
    assert!(allows(
        &set,
        Some(("x", "y")),
        &workload("shop", "db-0", "db"),
        5432
    ));
}

#[test]
fn l7_allow_policy_fails_closed_naming_the_fields() {
    let mut spec = backend_spec();
    spec["rules"][0]["to"][0]["operation"]["methods"] = json!(["GET"]);
    spec["rules"][0]["from"][0]["source"]["requestPrincipals"] = json!(["*"]);
    spec["rules"][0]["when"] = json!([{"key": "request.headers[x-user]", "values": ["a"]}]);
    let converted = authorization_policy(&authorization("shop", "backend", spec), ROOT);
    assert_eq!(converted.acceptance.verdict, Verdict::UnsupportedField);
    let message = &converted.acceptance.message;
    for field in [
        "spec.rules[0].to[0].operation.methods: L7 field, not enforced at L4",
        "spec.rules[0].from[0].source.requestPrincipals: L7 field",
        "spec.rules[0].when[0].key: \"request.headers[x-user]\" is not an L4 attribute",
    ] {
        assert!(message.contains(field), "{message}");
    }
    // It still selects app=web and allows nothing.
    assert!(converted.policy.rules.is_empty());
    assert_eq!(converted.policy.action, Action::Allow);
    let set = PolicySet::new(vec![converted.policy], Vec::new());
    let web = workload("shop", "web-0", "web");
    assert!(!allows(&set, Some(("shop", "frontend")), &web, 8080));
    assert!(allows(
        &set,
        Some(("shop", "frontend")),
        &workload("shop", "db-0", "db"),
        8080
    ));

    // Empty L7 lists use nothing (Istio reads them as unset).
    let mut spec = backend_spec();
    spec["rules"][0]["to"][0]["operation"]["methods"] = json!([]);
    let converted = authorization_policy(&authorization("shop", "backend", spec), ROOT);
    assert_eq!(converted.acceptance.verdict, Verdict::Accepted);
}

/// A policy bound with `targetRefs` is the waypoints' (Istio ambient's split): validated with
/// its L7 fields, never enforced by the node agents; rejected, it fails closed at its targets.
#[test]
fn policies_bound_to_waypoints_go_to_the_waypoints_with_their_l7_fields() {
    let seed = json!({
        "targetRefs": [{"kind": "Service", "group": "", "name": "backend"}],
        "action": "ALLOW",
        "rules": [{
            "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/frontend"]}}],
            "to": [{"operation": {"methods": ["GET", "POST"]}}],
        }],
    });
    let both_bindings = json!({
        "selector": {"matchLabels": {"app": "web"}},
        "targetRefs": [{"kind": "Service", "name": "backend"}],
        "rules": [{}],
    });
    let bad_deny = json!({
        "targetRef": {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"},
        "action": "DENY",
        "rules": [{"to": [{"operation": {"methods": ["GET"], "bogus": 1}}]}],
    });
    let converted = convert_policies(
        &[
            Arc::new(authorization("shop", "seed", seed)),
            Arc::new(authorization("shop", "both", both_bindings)),
            Arc::new(authorization("shop", "bad-deny", bad_deny)),
        ],
        &[],
        &[],
        ROOT,
        &HashMap::new(),
    );
    assert!(
        converted.set.authorizations().is_empty(),
        "node agents got one"
    );
    let waypoint = converted.set.waypoint().authorizations();
    assert_eq!(waypoint.len(), 3);
    let by_name = |name: &str| waypoint.iter().find(|p| p.name == name).unwrap();
    let seed = by_name("seed");
    assert_eq!(
        seed.targets,
        vec![TargetRef::Service {
            namespace: "shop".into(),
            name: "backend".into()
        }]
    );
    assert_eq!((seed.action, seed.rules.len()), (Action::Allow, 1));
    let rejected: Vec<(String, &str)> = converted
        .rejected
        .iter()
        .map(|(uid, a)| (uid.to_string(), a.message.as_str()))
        .collect();
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    let message = |uid: &str| rejected.iter().find(|(u, _)| u == uid).map(|(_, m)| *m);
    assert!(
        message("AuthorizationPolicy shop/both").is_some_and(|m| m.starts_with("spec.selector: ")),
        "{rejected:?}"
    );
    assert!(
        message("AuthorizationPolicy shop/bad-deny").is_some_and(|m| m.contains("bogus")),
        "{rejected:?}"
    );
    // Fail closed at the targets: the ALLOW allows nothing, the DENY denies everything.
    let both = by_name("both");
    assert_eq!((both.action, both.rules.len()), (Action::Allow, 0));
    assert_eq!(both.targets.len(), 1);
    let deny = by_name("bad-deny");
    assert_eq!(
        (deny.action, deny.rules.clone()),
        (Action::Deny, vec![L7Rule::default()])
    );
    assert_eq!(
        deny.targets,
        vec![TargetRef::Waypoint {
            namespace: "shop".into(),
            name: "waypoint".into()
        }]
    );
}

/// RequestAuthentications convert as the mesh file's do; a rejected one names its field and
/// is not enforced.
#[test]
fn request_authentications_convert_and_a_rejected_one_names_its_field() {
    let issuer = TestIssuer::es256("https://issuer.example", "k1");
    let jwks = TestIssuer::jwks(&[&issuer]);
    let good = request_authentication_resource(
        "shop",
        "jwt",
        json!({
            "targetRefs": [{"kind": "Service", "name": "backend"}],
            "jwtRules": [{"issuer": issuer.issuer, "jwks": jwks}],
        }),
    );
    let bad = request_authentication_resource(
        "shop",
        "bad",
        json!({"targetRefs": [{"kind": "Service", "name": "backend"}], "jwtRules": [{"issuer": ""}]}),
    );
    let converted = convert_policies(
        &[],
        &[],
        &[Arc::new(good), Arc::new(bad)],
        ROOT,
        &HashMap::new(),
    );
    let authentications = converted.set.waypoint().authentications();
    assert_eq!(authentications.len(), 1);
    assert_eq!(authentications[0].name, "jwt");
    assert_eq!(converted.rejected.len(), 1);
    let (uid, acceptance) = &converted.rejected[0];
    assert_eq!(uid.to_string(), "RequestAuthentication shop/bad");
    assert_eq!(acceptance.verdict, Verdict::Invalid);
    assert!(
        acceptance.message.starts_with("spec.jwtRules[0].issuer: "),
        "{}",
        acceptance.message
    );
}

/// A rejected RequestAuthentication (a bad field, a bad inline `jwks`) keeps its last accepted
/// version in force, so its targets keep their JWT validation and claim-header stripping; the
/// rejection is reported. Without a last accepted version nothing of it is enforced.
#[test]
fn a_rejected_request_authentication_keeps_its_last_accepted_version() {
    let issuer = TestIssuer::es256("https://issuer.example", "k1");
    let jwks = TestIssuer::jwks(&[&issuer]);
    let backend = crate::policy::l7::Attachment {
        service: ("shop", "backend"),
        waypoint: Some(("shop", "waypoint")),
    };
    let good = request_authentication_resource(
        "shop",
        "jwt",
        json!({
            "targetRefs": [{"kind": "Service", "name": "backend"}],
            "jwtRules": [{"issuer": issuer.issuer, "jwks": jwks,
                          "outputClaimToHeaders": [{"header": "x-user", "claim": "sub"}]}],
        }),
    );
    let first = convert_policies(&[], &[], &[Arc::new(good)], ROOT, &HashMap::new());
    assert!(first.rejected.is_empty(), "{:?}", first.rejected);
    assert_eq!(first.set.waypoint().jwt_rules(&backend).len(), 1);
    assert_eq!(first.in_force.len(), 1);

    for (what, bad_rule) in [
        (
            "spec.jwtRules[0].jwks",
            json!({"issuer": issuer.issuer, "jwks": "{\"keys\": [{\"kty\": \"oct\", \"k\": \"eA\"}]}"}),
        ),
        (
            "spec.jwtRules[0]",
            json!({"issuer": issuer.issuer, "jwks": jwks, "bogus": true}),
        ),
    ] {
        let bad = request_authentication_resource(
            "shop",
            "jwt",
            json!({"targetRefs": [{"kind": "Service", "name": "backend"}], "jwtRules": [bad_rule]}),
        );
        let bad = Arc::new(bad);
        let kept = convert_policies(&[], &[], std::slice::from_ref(&bad), ROOT, &first.in_force);
        let rules = kept.set.waypoint().jwt_rules(&backend);
        assert_eq!(rules.len(), 1, "{what}: the last good version stays");
        assert_eq!(rules[0].output_claim_to_headers.len(), 1, "{what}");
        assert_eq!(kept.rejected.len(), 1, "{what}");
        let (key, acceptance) = &kept.rejected[0];
        assert_eq!(key.to_string(), "RequestAuthentication shop/jwt");
        assert!(
            acceptance.message.starts_with(what),
            "{what}: {}",
            acceptance.message
        );
        assert_eq!(kept.in_force, first.in_force, "{what}: carried on");
        // The status writer's verdict is the same.
        assert_eq!(
            super::security::request_authentication(&bad).acceptance,
            *acceptance
        );
        // Without a last good version, nothing of it is enforced.
        let alone = convert_policies(&[], &[], &[bad], ROOT, &HashMap::new());
        assert!(
            alone.set.waypoint().jwt_rules(&backend).is_empty(),
            "{what}"
        );
        assert!(alone.in_force.is_empty());
    }
}

/// A rejected waypoint AuthorizationPolicy whose targets cannot be read still applies: its
/// last accepted version if there is one, else its fail-closed form at every waypoint-bound
/// service of its namespace; the status says so.
#[test]
fn a_rejected_waypoint_policy_without_readable_targets_fails_closed() {
    let at = |ns: &'static str, name: &'static str, waypoint: bool| crate::policy::l7::Attachment {
        service: (ns, name),
        waypoint: waypoint.then_some((ns, "waypoint")),
    };
    let good = authorization(
        "shop",
        "allow-get",
        json!({
            "targetRefs": [{"kind": "Service", "name": "backend"}],
            "action": "ALLOW",
            "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}],
        }),
    );
    let first = convert_policies(&[Arc::new(good)], &[], &[], ROOT, &HashMap::new());
    assert!(first.rejected.is_empty(), "{:?}", first.rejected);
    for (action, targets) in [
        ("ALLOW", json!([{"kind": "ConfigMap", "name": "backend"}])),
        ("ALLOW", json!("backend")),
        ("DENY", json!([{"kind": "Service"}])),
    ] {
        let bad = Arc::new(authorization(
            "shop",
            "allow-get",
            json!({"targetRefs": targets, "action": action, "rules": [{}]}),
        ));
        // Its last accepted version stays in force.
        let kept = convert_policies(std::slice::from_ref(&bad), &[], &[], ROOT, &first.in_force);
        let policies = kept.set.waypoint().authorizations();
        assert_eq!(policies.len(), 1);
        assert_eq!(*policies[0], *first.set.waypoint().authorizations()[0]);
        assert_eq!(kept.in_force, first.in_force);
        let (key, acceptance) = &kept.rejected[0];
        assert_eq!(key.to_string(), "AuthorizationPolicy shop/allow-get");
        assert!(
            acceptance.message.contains("no target can be read")
                && acceptance.message.contains("namespace shop"),
            "{targets}: {}",
            acceptance.message
        );
        // Without one: fail closed at the waypoint-bound services of its namespace, and
        // nowhere else.
        let alone = convert_policies(&[bad], &[], &[], ROOT, &HashMap::new());
        let policy = &alone.set.waypoint().authorizations()[0];
        assert_eq!(
            (policy.action, policy.rules.is_empty()),
            if action == "DENY" {
                (Action::Deny, false)
            } else {
                (Action::Allow, true)
            },
            "{targets}"
        );
        assert!(policy.applies(&at("shop", "backend", true)), "{targets}");
        assert!(policy.applies(&at("shop", "other", true)), "{targets}");
        assert!(!policy.applies(&at("shop", "direct", false)), "{targets}");
        assert!(!policy.applies(&at("bank", "backend", true)), "{targets}");
        assert!(alone.in_force.is_empty());
    }
}

#[test]
fn rejected_deny_counts_rejected_conditions_as_matching() {
    let spec = json!({
        "action": "DENY",
        "rules": [{
            "from": [{"source": {"namespaces": ["sandbox"], "requestPrincipals": ["*"]}}],
            "to": [{"operation": {"ports": ["22"], "methods": ["GET"]}}],
            "when": [{"key": "request.auth.claims[iss]", "values": ["x"]}],
        }],
    });
    let converted = authorization_policy(&authorization("shop", "deny-ssh", spec), ROOT);
    assert_eq!(converted.acceptance.verdict, Verdict::UnsupportedField);
    assert_eq!(converted.policy.action, Action::Deny);
    let set = PolicySet::new(vec![converted.policy], Vec::new());
    let web = workload("shop", "web-0", "web");
    // What it names is denied whatever the L7 parts would have said...
    assert!(!allows(&set, Some(("sandbox", "a")), &web, 22));
    // ...and what its L4 parts exclude is not.
    assert!(allows(&set, Some(("sandbox", "a")), &web, 80));
    assert!(allows(&set, Some(("shop", "a")), &web, 22));

    // A source made only of an L7 field matches any peer.
    let spec = json!({
        "action": "DENY",
        "rules": [{
            "from": [{"source": {"remoteIpBlocks": ["1.2.3.4"]}}],
            "to": [{"operation": {"ports": ["22"]}}],
        }],
    });
    let set = set_of(authorization("shop", "deny-remote", spec));
    assert!(!allows(&set, Some(("shop", "a")), &web, 22));
    assert!(!allows(&set, None, &web, 22));
    assert!(allows(&set, Some(("shop", "a")), &web, 80));

    // An invalid value counts as matching too: the bad ipBlocks goes, the namespace stays.
    let spec = json!({
        "action": "DENY",
        "rules": [{"from": [{"source": {"namespaces": ["sandbox"], "ipBlocks": ["10.0.0.0/33"]}}]}],
    });
    let converted = authorization_policy(&authorization("shop", "bad-cidr", spec), ROOT);
    assert_eq!(converted.acceptance.verdict, Verdict::Invalid);
    assert_eq!(
        converted.acceptance.message,
        "spec.rules[0].from[0].source.ipBlocks[0]: invalid IP address or CIDR \"10.0.0.0/33\""
    );
    let set = PolicySet::new(vec![converted.policy], Vec::new());
    assert!(!allows(&set, Some(("sandbox", "a")), &web, 80));
    assert!(allows(&set, Some(("shop", "a")), &web, 80));

    // DENY without rules names nothing: rejected, and denies everything it selects.
    let converted = authorization_policy(
        &authorization("shop", "empty-deny", json!({"action": "DENY"})),
        ROOT,
    );
    assert_eq!(converted.acceptance.verdict, Verdict::Invalid);
    assert!(
        converted
            .acceptance
            .message
            .starts_with("spec.rules: a DENY policy without rules")
    );
    let set = PolicySet::new(vec![converted.policy], Vec::new());
    assert!(!allows(&set, Some(("shop", "a")), &web, 80));
}

#[test]
fn invalid_policies_name_the_field() {
    let cases = [
        (
            json!({"rules": [{"from": [{"source": {}}]}]}),
            "spec.rules[0].from[0].source: must set at least one field",
        ),
        (
            json!({"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}),
            "spec.rules[0].to[0].operation.ports[0]: \"http\" is not a port in 1..=65535",
        ),
        (
            json!({"selector": {"matchLabels": {}}}),
            "spec.selector.matchLabels: must not be empty",
        ),
        (
            json!({"action": "AUDIT"}),
            "spec.action: AUDIT is not supported",
        ),
        (
            json!({"rules": [{"from": [{"source": {"principals": ["spiffe://cluster.local/ns/a/sa/b"]}}]}]}),
            "spec.rules[0].from[0].source.principals[0]: \"spiffe://",
        ),
        // Not in the schema (a real API server prunes or refuses it).
        (
            json!({"rules": [{"to": [{"operation": {"port": ["80"]}}]}]}),
            "spec.rules[0].to[0].operation.port: unknown field `port`",
        ),
    ];
    let web = workload("shop", "web-0", "web");
    for (spec, expected) in cases {
        let converted = authorization_policy(&authorization("shop", "p", spec.clone()), ROOT);
        assert_eq!(converted.acceptance.verdict, Verdict::Invalid, "{spec}");
        assert!(
            converted.acceptance.message.starts_with(expected),
            "{spec}: {}",
            converted.acceptance.message
        );
        // Whatever is wrong, the rejected ALLOW opens nothing.
        let set = PolicySet::new(vec![converted.policy], Vec::new());
        assert!(!allows(&set, Some(("shop", "a")), &web, 80), "{spec}");
    }
}

#[test]
fn root_namespace_is_mesh_wide_and_dry_run_is_an_annotation() {
    let converted = authorization_policy(
        &authorization(ROOT, "deny-ssh", json!({"action": "DENY", "rules": [{}]})),
        ROOT,
    );
    assert_eq!(converted.policy.scope, Scope::Mesh);
    assert_eq!(converted.policy.to_string(), "deny-ssh");
    let mut selected = authorization(ROOT, "web-only", backend_spec());
    selected.metadata.annotations = labels(&[("istio.io/dry-run", "true")]);
    let converted = authorization_policy(&selected, ROOT);
    assert!(converted.policy.dry_run);
    assert_eq!(
        converted.policy.scope,
        Scope::Workloads {
            namespace: None,
            labels: labels(&[("app", "web")]).unwrap()
        }
    );
    // Another root namespace: ambit-system is an ordinary namespace.
    let converted = authorization_policy(&authorization(ROOT, "p", json!({})), "mesh-root");
    assert_eq!(converted.policy.scope, Scope::Namespace(ROOT.into()));
}

#[test]
fn peer_authentications() {
    let web = workload("shop", "web-0", "web");
    let convert = |resource| peer_authentication(&resource, ROOT);
    let permissive = convert(peer(
        "shop",
        "legacy",
        json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "PERMISSIVE"}}),
    ));
    assert_eq!(permissive.acceptance.verdict, Verdict::Accepted);
    assert_eq!(permissive.policy.mode, Some(PeerAuthMode::Permissive));
    let mesh = convert(peer(
        ROOT,
        "default",
        json!({"mtls": {"mode": "PERMISSIVE"}}),
    ));
    assert_eq!(mesh.policy.scope, Scope::Mesh);
    let unset = convert(peer("shop", "inherit", json!({})));
    assert_eq!(
        (unset.acceptance.verdict, unset.policy.mode),
        (Verdict::Accepted, None)
    );

    let per_port = convert(peer(
        "shop",
        "ports",
        json!({"mtls": {"mode": "PERMISSIVE"}, "portLevelMtls": {"8080": {"mode": "DISABLE"}}}),
    ));
    assert_eq!(per_port.acceptance.verdict, Verdict::UnsupportedField);
    assert!(
        per_port
            .acceptance
            .message
            .starts_with("spec.portLevelMtls: ")
    );
    assert_eq!(per_port.policy.mode, Some(PeerAuthMode::Strict));
    assert_eq!(per_port.policy.scope, Scope::Namespace("shop".into()));

    let disable = convert(peer("shop", "off", json!({"mtls": {"mode": "DISABLE"}})));
    assert_eq!(disable.acceptance.verdict, Verdict::Invalid);
    assert!(
        disable
            .acceptance
            .message
            .starts_with("spec.mtls.mode: DISABLE is not supported")
    );

    // A rejected policy wins at its level over an accepted one, whatever their ages.
    let mut older = peer(
        "shop",
        "a-permissive",
        json!({"mtls": {"mode": "PERMISSIVE"}}),
    );
    older.metadata.creation_timestamp = Some(Time("2026-01-01T00:00:00Z".parse().unwrap()));
    let mut newer = peer(
        "shop",
        "b-per-port",
        json!({"portLevelMtls": {"80": {"mode": "PERMISSIVE"}}}),
    );
    newer.metadata.creation_timestamp = Some(Time("2026-01-02T00:00:00Z".parse().unwrap()));
    let converted = convert_policies(
        &[],
        &[Arc::new(older.clone()), Arc::new(newer)],
        &[],
        ROOT,
        &HashMap::new(),
    );
    assert_eq!(
        converted.set.peer_auth_mode(web.policy_target()),
        PeerAuthMode::Strict
    );
    assert_eq!(converted.rejected.len(), 1);
    assert_eq!(
        converted.rejected[0].0.to_string(),
        "PeerAuthentication shop/b-per-port"
    );
    // Between accepted ones, the oldest wins (Istio's rule).
    let mut newest = peer("shop", "0-strict", json!({"mtls": {"mode": "STRICT"}}));
    newest.metadata.creation_timestamp = Some(Time("2026-01-03T00:00:00Z".parse().unwrap()));
    let converted = convert_policies(
        &[],
        &[Arc::new(newest), Arc::new(older)],
        &[],
        ROOT,
        &HashMap::new(),
    );
    assert_eq!(
        converted.set.peer_auth_mode(web.policy_target()),
        PeerAuthMode::Permissive
    );
}

#[test]
fn policies_are_ordered_oldest_first() {
    let at = |name: &str, time: &str| {
        let mut resource = authorization("shop", name, json!({}));
        resource.metadata.creation_timestamp = Some(Time(time.parse().unwrap()));
        Arc::new(resource)
    };
    let converted = convert_policies(
        &[
            at("c", "2026-01-02T00:00:00Z"),
            at("b", "2026-01-01T00:00:00Z"),
            at("a", "2026-01-02T00:00:00Z"),
        ],
        &[],
        &[],
        ROOT,
        &HashMap::new(),
    );
    let names: Vec<&str> = converted
        .set
        .authorizations()
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(names, ["b", "a", "c"]);
}

#[test]
fn resources_keep_only_what_is_used() {
    let resource: AuthorizationPolicyResource = serde_json::from_value(json!({
        "apiVersion": "security.ambit.dev/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {
            "name": "p", "namespace": "shop", "uid": "u", "resourceVersion": "7", "generation": 3,
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {"team": "a"},
            "annotations": {"istio.io/dry-run": "true", "kubectl.kubernetes.io/last-applied-configuration": "{...}"},
            "managedFields": [{"manager": "kubectl"}],
        },
        "spec": {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]},
        "status": {"observedGeneration": 2, "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
    }))
    .unwrap();
    assert_eq!(resource.metadata.generation, Some(3));
    assert_eq!(
        resource.metadata.annotations,
        labels(&[("istio.io/dry-run", "true")])
    );
    assert!(resource.metadata.labels.is_none() && resource.metadata.managed_fields.is_none());
    // The L7 field is kept, to be rejected.
    assert_eq!(
        resource.spec["rules"][0]["to"][0]["operation"]["methods"],
        json!(["GET"])
    );
    let status = resource.status.unwrap();
    assert_eq!(status.accepted().unwrap().status, "True");
}

// --- Against the fake API server ----------------------------------------------------------

/// Whether `src` may reach `shop/<dst>` on `port` in `state`.
fn state_allows(state: &MeshState, src: Option<(&str, &str)>, dst: &str, port: u16) -> bool {
    let workload = state
        .workloads()
        .iter()
        .find(|w| w.name == dst)
        .unwrap_or_else(|| panic!("no workload {dst}"));
    allows(state.policies(), src, workload, port)
}

fn run_status_writer(server: &FakeApiServer) -> JoinHandle<anyhow::Result<()>> {
    let writer = StatusWriter::new(server.client(), ROOT)
        .reporting_instance("test")
        .retry_interval(Duration::from_millis(50));
    tokio::spawn(writer.run())
}

/// Waits for `shop/<name>`'s `Accepted` condition to satisfy `f`.
async fn wait_condition(
    server: &FakeApiServer,
    name: &str,
    f: impl Fn(&PolicyCondition) -> bool,
) -> (Option<i64>, PolicyCondition) {
    let found = tokio::time::timeout(WAIT, async {
        loop {
            let status = server
                .get::<AuthorizationPolicyResource>("shop", name)
                .and_then(|r| r.status);
            if let Some(status) = status
                && let Some(condition) = status.accepted().filter(|c| f(c))
            {
                return (status.observed_generation, condition.clone());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| {
        panic!(
            "timed out waiting for the condition of {name}: {:?}",
            server.get::<AuthorizationPolicyResource>("shop", name)
        )
    })
}

fn events_about(server: &FakeApiServer, name: &str) -> Vec<Event> {
    server
        .list::<Event>()
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect()
}

/// Lets the status writer see its own write and anything else pending (it must do nothing).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn policy_added_is_enforced() {
    let mut h = Harness::start().await;
    h.server.apply(&pod("shop", "web-0", "node-b", "10.0.0.2"));
    let state = h.wait_state("the pod", |s| s.workloads().len() == 1).await;
    assert!(state_allows(&state, Some(("shop", "other")), "web-0", 8080));

    h.server
        .apply(&authorization("shop", "backend", backend_spec()));
    let state = h
        .wait_state("the policy", |s| s.policies().authorizations().len() == 1)
        .await;
    assert!(state_allows(
        &state,
        Some(("shop", "frontend")),
        "web-0",
        8080
    ));
    assert!(!state_allows(
        &state,
        Some(("shop", "other")),
        "web-0",
        8080
    ));
    assert!(!state_allows(
        &state,
        Some(("shop", "frontend")),
        "web-0",
        22
    ));

    h.server
        .delete::<AuthorizationPolicyResource>("shop", "backend");
    let state = h
        .wait_state("no policy", |s| s.policies().authorizations().is_empty())
        .await;
    assert!(state_allows(&state, Some(("shop", "other")), "web-0", 8080));
    assert_eq!(h.status.borrow().last_error, None);
}

#[tokio::test]
async fn l7_policy_fails_closed_until_fixed() {
    let mut h = Harness::start().await;
    let writer = run_status_writer(&h.server);
    h.server.apply(&pod("shop", "web-0", "node-b", "10.0.0.2"));
    let mut spec = backend_spec();
    spec["rules"][0]["to"][0]["operation"]["methods"] = json!(["GET"]);
    h.server.apply(&authorization("shop", "backend", spec));

    // The agent: the policy selects web-0 and allows nothing.
    let state = h
        .wait_state("the policy and the pod", |s| {
            s.policies().authorizations().len() == 1 && s.workloads().len() == 1
        })
        .await;
    assert!(!state_allows(
        &state,
        Some(("shop", "frontend")),
        "web-0",
        8080
    ));

    // The status writer: Accepted=False, the field named, one Event.
    let (observed, condition) = wait_condition(&h.server, "backend", |c| c.status == "False").await;
    assert_eq!(condition.reason, "UnsupportedField");
    assert_eq!(
        condition.message,
        "spec.rules[0].to[0].operation.methods: L7 field, not enforced at L4"
    );
    assert_eq!(
        (observed, condition.observed_generation),
        (Some(1), Some(1))
    );
    let first_transition = condition.last_transition_time.clone();
    assert!(first_transition.is_some());
    settle().await;
    let events = events_about(&h.server, "backend");
    assert_eq!(events.len(), 1, "{events:?}");
    let event = &events[0];
    assert_eq!(event.reason.as_deref(), Some("UnsupportedField"));
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert!(event.note.as_deref().unwrap().contains("operation.methods"));
    let regarding = event.regarding.as_ref().unwrap();
    assert_eq!(regarding.kind.as_deref(), Some("AuthorizationPolicy"));
    assert_eq!(regarding.namespace.as_deref(), Some("shop"));
    assert_eq!(
        event.reporting_controller.as_deref(),
        Some("ambit.dev/policy-status")
    );

    // Another L7 field: still False (transition time kept), new message, a second Event.
    h.server
        .modify::<AuthorizationPolicyResource>("shop", "backend", |p| {
            let operation = &mut p.spec["rules"][0]["to"][0]["operation"];
            operation.as_object_mut().unwrap().remove("methods");
            operation["paths"] = json!(["/admin"]);
        })
        .unwrap();
    let (observed, condition) =
        wait_condition(&h.server, "backend", |c| c.message.contains("paths")).await;
    assert_eq!(observed, Some(2));
    assert_eq!(condition.last_transition_time, first_transition);
    settle().await;
    assert_eq!(events_about(&h.server, "backend").len(), 2);

    // Fixed: enforced as written, Accepted=True.
    h.server
        .modify::<AuthorizationPolicyResource>("shop", "backend", |p| p.spec = backend_spec())
        .unwrap();
    let state = h
        .wait_state("the fixed policy", |s| {
            s.policies()
                .authorizations()
                .first()
                .is_some_and(|p| !p.rules.is_empty())
        })
        .await;
    assert!(state_allows(
        &state,
        Some(("shop", "frontend")),
        "web-0",
        8080
    ));
    assert!(!state_allows(
        &state,
        Some(("shop", "other")),
        "web-0",
        8080
    ));
    let (observed, condition) = wait_condition(&h.server, "backend", |c| c.status == "True").await;
    assert_eq!(condition.reason, "Accepted");
    assert_eq!(observed, Some(3));
    settle().await;
    let events = events_about(&h.server, "backend");
    assert_eq!(events.len(), 3);
    assert!(
        events.iter().any(
            |e| e.reason.as_deref() == Some("Accepted") && e.type_.as_deref() == Some("Normal")
        )
    );

    // An edit that keeps the verdict: observedGeneration follows, no Event.
    h.server
        .modify::<AuthorizationPolicyResource>("shop", "backend", |p| {
            p.spec["rules"][0]["to"][0]["operation"]["ports"] = json!(["8081"]);
        })
        .unwrap();
    wait_condition(&h.server, "backend", |c| c.observed_generation == Some(4)).await;
    settle().await;
    assert_eq!(events_about(&h.server, "backend").len(), 3);
    writer.abort();
}

/// After an outage long enough for its resource version to expire, a server that answers the
/// watch with HTTP 410 must not leave the writer retrying that version forever: it re-lists and
/// reports on what changed meanwhile.
#[tokio::test]
async fn status_writer_relists_after_an_http_410() {
    let server = FakeApiServer::start().await.unwrap();
    server.register_with_status::<AuthorizationPolicyResource>();
    server.register_with_status::<PeerAuthenticationResource>();
    server.set_gone_style(GoneStyle::Http);
    let writer = run_status_writer(&server);
    server.apply(&authorization("shop", "backend", backend_spec()));
    wait_condition(&server, "backend", |c| c.status == "True").await;

    server.go_down();
    server.apply(&authorization(
        "shop",
        "l7",
        json!({"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
    ));
    server.expire_history();
    server.come_up().await.unwrap();
    let (_, condition) = wait_condition(&server, "l7", |c| c.status == "False").await;
    assert_eq!(condition.reason, "UnsupportedField");
    writer.abort();
}

/// The CA runs two replicas, each with a writer: a change is still reported once.
#[tokio::test]
async fn two_writers_report_each_change_once() {
    let server = FakeApiServer::start().await.unwrap();
    server.register_with_status::<AuthorizationPolicyResource>();
    server.register_with_status::<PeerAuthenticationResource>();
    let writers = [run_status_writer(&server), run_status_writer(&server)];
    server.apply(&authorization(
        "shop",
        "l7",
        json!({"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
    ));
    wait_condition(&server, "l7", |c| c.status == "False").await;
    server
        .modify::<AuthorizationPolicyResource>("shop", "l7", |p| p.spec = backend_spec())
        .unwrap();
    wait_condition(&server, "l7", |c| c.status == "True").await;
    settle().await;
    let reasons: Vec<Option<String>> = events_about(&server, "l7")
        .into_iter()
        .map(|e| e.reason)
        .collect();
    assert_eq!(
        reasons,
        [
            Some("UnsupportedField".to_string()),
            Some("Accepted".to_string())
        ]
    );
    for writer in writers {
        writer.abort();
    }
}

#[tokio::test]
async fn status_writer_restarted_writes_nothing_new() {
    let server = FakeApiServer::start().await.unwrap();
    server.register_with_status::<AuthorizationPolicyResource>();
    server.register_with_status::<PeerAuthenticationResource>();
    let mut spec = backend_spec();
    spec["rules"][0]["to"][0]["operation"]["methods"] = json!(["GET"]);
    server.apply(&authorization("shop", "backend", spec));
    server.apply(&peer(
        "shop",
        "ports",
        json!({"portLevelMtls": {"80": {"mode": "PERMISSIVE"}}}),
    ));
    let writer = run_status_writer(&server);
    wait_condition(&server, "backend", |c| c.reason == "UnsupportedField").await;
    let peer_condition = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(condition) = server
                .get::<PeerAuthenticationResource>("shop", "ports")
                .and_then(|p| p.status?.accepted().cloned())
            {
                return condition;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(
        (
            peer_condition.status.as_str(),
            peer_condition.reason.as_str()
        ),
        ("False", "UnsupportedField")
    );
    settle().await;
    writer.abort();
    let version = server.resource_version();
    assert_eq!(server.list::<Event>().len(), 2);

    let writer = run_status_writer(&server);
    settle().await;
    assert_eq!(
        server.resource_version(),
        version,
        "nothing written after a restart"
    );
    assert_eq!(server.list::<Event>().len(), 2);
    writer.abort();
}

#[tokio::test]
async fn root_namespace_policies_are_mesh_wide() {
    let mut h = Harness::start().await;
    h.server.apply(&namespace("other", None));
    h.server.apply(&pod("shop", "web-0", "node-b", "10.0.0.2"));
    h.server.apply(&pod("other", "web-1", "node-b", "10.0.0.3"));
    let deny_ssh = json!({"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["22"]}}]}]});
    h.server
        .apply(&authorization(ROOT, "deny-ssh", deny_ssh.clone()));
    let state = h
        .wait_state("both pods and the policy", |s| {
            s.workloads().len() == 2 && s.policies().authorizations().len() == 1
        })
        .await;
    assert_eq!(state.policies().authorizations()[0].scope, Scope::Mesh);
    for pod in ["web-0", "web-1"] {
        assert!(!state_allows(&state, Some(("shop", "a")), pod, 22), "{pod}");
        assert!(state_allows(&state, Some(("shop", "a")), pod, 80), "{pod}");
    }
    // The same policy in an ordinary namespace covers that namespace only.
    h.server
        .delete::<AuthorizationPolicyResource>(ROOT, "deny-ssh");
    h.server.apply(&authorization("shop", "deny-ssh", deny_ssh));
    let state = h
        .wait_state("the namespaced policy", |s| {
            s.policies()
                .authorizations()
                .first()
                .is_some_and(|p| p.scope == Scope::Namespace("shop".into()))
        })
        .await;
    assert!(!state_allows(&state, Some(("shop", "a")), "web-0", 22));
    assert!(state_allows(&state, Some(("shop", "a")), "web-1", 22));
}

#[tokio::test]
async fn configured_root_namespace() {
    let server = FakeApiServer::start().await.unwrap();
    server.register_with_status::<AuthorizationPolicyResource>();
    server.register_with_status::<PeerAuthenticationResource>();
    server.apply(&namespace("shop", Some(super::convert::MODE_AMBIENT)));
    server.apply(&pod("shop", "web-0", "node-b", "10.0.0.2"));
    // PERMISSIVE is the default: only a mesh-wide STRICT shows the root namespace at work.
    server.apply(&peer(
        "mesh-root",
        "default",
        json!({"mtls": {"mode": "STRICT"}}),
    ));
    server.apply(&peer(
        ROOT,
        "default",
        json!({"mtls": {"mode": "PERMISSIVE"}}),
    ));
    let mut h = Harness::with_source(server, |s| s.root_namespace("mesh-root")).await;
    let state = h
        .wait_state("the pod and both policies", |s| {
            s.workloads().len() == 1 && s.policies().peer_authentications().len() == 2
        })
        .await;
    let web = state.workloads()[0].clone();
    assert_eq!(state.peer_auth_mode(&web), PeerAuthMode::Strict);
    let scopes: Vec<&Scope> = state
        .policies()
        .peer_authentications()
        .iter()
        .map(|p| &p.scope)
        .collect();
    assert!(scopes.contains(&&Scope::Mesh));
    assert!(scopes.contains(&&Scope::Namespace(ROOT.into())));
}

/// Istio's defaults and inheritance through the API: no PeerAuthentication is PERMISSIVE; one
/// in the root namespace makes the mesh STRICT; a namespace's UNSET inherits it, its own mode
/// overrides it.
#[tokio::test]
async fn permissive_by_default_and_strict_one_root_policy_away() {
    let mut h = Harness::start().await;
    h.server.apply(&pod("shop", "web-0", "node-b", "10.0.0.2"));
    let mode = |s: &MeshState| s.workloads().first().map(|w| s.peer_auth_mode(w));
    let with = |count: usize, want: PeerAuthMode| {
        move |s: &MeshState| {
            s.policies().peer_authentications().len() == count && mode(s) == Some(want)
        }
    };
    h.wait_state(
        "PERMISSIVE without any policy",
        with(0, PeerAuthMode::Permissive),
    )
    .await;
    h.server
        .apply(&peer(ROOT, "default", json!({"mtls": {"mode": "STRICT"}})));
    h.wait_state(
        "STRICT from the root namespace",
        with(1, PeerAuthMode::Strict),
    )
    .await;
    h.server
        .apply(&peer("shop", "default", json!({"mtls": {"mode": "UNSET"}})));
    h.wait_state(
        "UNSET inherits the mesh's STRICT",
        with(2, PeerAuthMode::Strict),
    )
    .await;
    h.server
        .modify::<PeerAuthenticationResource>("shop", "default", |p| {
            p.spec = json!({"mtls": {"mode": "PERMISSIVE"}});
        })
        .unwrap();
    h.wait_state(
        "the namespace's own mode wins",
        with(2, PeerAuthMode::Permissive),
    )
    .await;
    h.server
        .modify::<PeerAuthenticationResource>("shop", "default", |p| {
            p.spec = json!({});
        })
        .unwrap();
    h.wait_state("no mode is UNSET", with(2, PeerAuthMode::Strict))
        .await;
    h.server
        .delete::<PeerAuthenticationResource>(ROOT, "default");
    h.wait_state("PERMISSIVE again", with(1, PeerAuthMode::Permissive))
        .await;
}

#[tokio::test]
async fn rejected_peer_authentication_is_strict() {
    let mut h = Harness::start().await;
    h.server.apply(&pod("shop", "web-0", "node-b", "10.0.0.2"));
    h.server.apply(&peer(
        "shop",
        "legacy",
        json!({"mtls": {"mode": "PERMISSIVE"}}),
    ));
    let mode = |s: &MeshState| s.workloads().first().map(|w| s.peer_auth_mode(w));
    h.wait_state("PERMISSIVE", |s| mode(s) == Some(PeerAuthMode::Permissive))
        .await;
    h.server
        .modify::<PeerAuthenticationResource>("shop", "legacy", |p| {
            p.spec["portLevelMtls"] = json!({"5432": {"mode": "PERMISSIVE"}});
        })
        .unwrap();
    h.wait_state("STRICT", |s| mode(s) == Some(PeerAuthMode::Strict))
        .await;
}

#[tokio::test]
async fn crds_not_installed_still_publish_a_state() {
    // No policy type registered: the server answers 404 for them, as without the CRDs.
    let server = FakeApiServer::start().await.unwrap();
    server.apply(&namespace("shop", Some(super::convert::MODE_AMBIENT)));
    server.apply(&pod("shop", "web-0", "node-b", "10.0.0.2"));
    let mut h = Harness::with_server(server).await;
    let state = h
        .wait_state("the first state", |s| s.workloads().len() == 1)
        .await;
    assert!(state.policies().authorizations().is_empty());
    assert_eq!(h.status.borrow().last_error, None);

    // Installed later: picked up by the watchers' retries.
    h.server
        .register_with_status::<AuthorizationPolicyResource>();
    h.server.apply(&authorization(
        "shop",
        "deny-all",
        json!({"action": "DENY", "rules": [{}]}),
    ));
    let state = h
        .wait_state("the policy", |s| s.policies().authorizations().len() == 1)
        .await;
    assert!(!state_allows(&state, Some(("shop", "a")), "web-0", 80));
    h.wait_status("no error", |s| s.last_error.is_none()).await;
}

#[test]
fn condition_json_shape() {
    // What the writer patches must fit the CRD's status schema (metav1.Condition's names).
    let condition = PolicyCondition {
        type_: "Accepted".into(),
        status: "True".into(),
        reason: "Accepted".into(),
        message: "m".into(),
        observed_generation: Some(2),
        last_transition_time: Some("2026-01-01T00:00:00Z".into()),
    };
    let json = serde_json::to_value(&condition).unwrap();
    let keys: BTreeMap<String, Value> = serde_json::from_value(json).unwrap();
    assert_eq!(
        keys.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "lastTransitionTime",
            "message",
            "observedGeneration",
            "reason",
            "status",
            "type"
        ]
    );
}
