//! End-to-end tests of L7 security at the waypoint: Istio AuthorizationPolicies attached with
//! `targetRefs` and a RequestAuthentication whose JWKS a real HTTP server on the bed serves.
//! Real agents, CA, waypoint process, HBONE both ways, curl as the client.
//!
//! Topology (two nodes; the intruder's tunnels to the waypoint and the waypoint's to the
//! backend cross the fabric):
//!
//! ```text
//! n0: frontend p0-0 (sa frontend) ──agent n0──HBONE──► waypoint p0-1 (not enrolled)
//!     JWKS p0-2 (not enrolled, python http.server) ◄── HTTP GET jwks.json ─┤
//! n1: intruder p1-1 (sa intruder) ──agent n1──HBONE──────────────────────┤
//!     backend p1-0 (sa backend) ◄── agent n1 ◄──HBONE (waypoint's identity)┘
//! ```

use std::time::{Duration, Instant};

use ambit_test_jwt::TestIssuer;
use ambit_tests::mesh::Policies;
use ambit_tests::waypoint::{requests_total, start_waypoint, wait_reloads, waypoint_metrics};
use ambit_tests::{Cluster, ClusterSpec, Pod, ensure_or_dump, util};
use anyhow::{Result, bail};
use serde_json::{Value, json};

/// The VIP of the backend service (port 9080 to the server's 8080).
const BACKEND_VIP: &str = "10.96.0.40";
/// The VIP of a service bound to no waypoint.
const BILLING_VIP: &str = "10.96.0.42";
/// The VIP of the waypoint's own service.
const WAYPOINT_VIP: &str = "10.96.0.41";
const ISSUER: &str = "https://idp.ambit.test";
const T: Duration = Duration::from_secs(30);

/// One curl request from `from` to the backend: (status code, body).
fn request(from: &Pod, method: &str, path: &str, headers: &[String]) -> Result<(u16, String)> {
    let mut args: Vec<String> = vec![
        "-sS".into(),
        "--max-time".into(),
        "10".into(),
        "--http1.1".into(),
        "-X".into(),
        method.into(),
        "-w".into(),
        "\ncode=%{http_code}".into(),
    ];
    for h in headers {
        args.extend(["-H".to_string(), h.clone()]);
    }
    args.push(format!("http://{BACKEND_VIP}:9080{path}"));
    let mut process = from.spawn("curl", &args)?;
    let (status, lines) = process.wait_output(Duration::from_secs(60))?;
    let code = lines
        .iter()
        .find_map(|l| l.strip_prefix("code="))
        .and_then(|c| c.parse().ok());
    match code {
        Some(code) if status.success() => {
            let body = lines
                .iter()
                .filter(|l| !l.starts_with("code="))
                .cloned()
                .collect::<Vec<_>>()
                .join("\n");
            Ok((code, body))
        }
        _ => bail!(
            "curl {method} {path}: {status}, {lines:?}; stderr: {}",
            process.stderr()
        ),
    }
}

fn bearer(token: &str) -> Vec<String> {
    vec![format!("Authorization: Bearer {token}")]
}

/// The seed's `allow-frontend-to-backend`, with its `selector` replaced by a `targetRefs` to
/// the backend's service (how Istio ambient attaches it to the waypoint).
fn seed_policy(namespace: &str) -> Value {
    json!({
        "name": "allow-frontend-to-backend",
        "namespace": namespace,
        "targetRefs": [{"kind": "Service", "group": "", "name": "backend"}],
        "action": "ALLOW",
        "rules": [{
            "from": [{"source": {"principals": [format!("cluster.local/ns/{namespace}/sa/frontend")]}}],
            "to": [{"operation": {"methods": ["GET", "POST"]}}]
        }]
    })
}

/// Default deny at the waypoint: an ALLOW policy without rules attached to the waypoint
/// (Istio's allow-nothing).
fn allow_nothing(namespace: &str) -> Value {
    json!({
        "name": "allow-nothing",
        "namespace": namespace,
        "targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}],
        "action": "ALLOW"
    })
}

/// `/secure/*` needs a valid JWT whose `groups` claim holds `admin`.
fn secure_policy(namespace: &str) -> Value {
    json!({
        "name": "secure-needs-admin-jwt",
        "namespace": namespace,
        "targetRefs": [{"kind": "Service", "name": "backend"}],
        "action": "DENY",
        "rules": [
            {"from": [{"source": {"notRequestPrincipals": ["*"]}}],
             "to": [{"operation": {"paths": ["/secure/*"]}}]},
            {"to": [{"operation": {"paths": ["/secure/*"]}}],
             "when": [{"key": "request.auth.claims[groups]", "notValues": ["admin"]}]}
        ]
    })
}

fn request_authentication(namespace: &str, jwks_uri: &str) -> Value {
    json!({
        "name": "idp",
        "namespace": namespace,
        "targetRefs": [{"kind": "Service", "name": "backend"}],
        "jwtRules": [{"issuer": ISSUER, "jwksUri": jwks_uri}]
    })
}

/// Another tenant's RequestAuthentication, on a service no waypoint serves: its keys are none
/// of this waypoint's business, and it must not fetch them.
fn other_tenant(namespace: &str, jwks_uri: &str) -> Value {
    json!({
        "name": "other-tenant",
        "namespace": namespace,
        "targetRefs": [{"kind": "Service", "name": "billing"}],
        "jwtRules": [{"issuer": "https://other.ambit.test", "jwksUri": jwks_uri}]
    })
}

#[test]
fn waypoint_enforces_l7_policies_and_jwt_and_keeps_them_on_a_bad_update() -> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pods_per_node: 3,
    })?;
    let (frontend, waypoint, intruder, backend, jwks_pod) = (
        cluster.pod(0, 0),
        cluster.pod(0, 1),
        cluster.pod(1, 1),
        cluster.pod(1, 0),
        cluster.pod(0, 2),
    );
    let namespace = frontend.namespace();
    frontend.set_service_account("frontend");
    intruder.set_service_account("intruder");
    backend.set_service_account("backend");
    waypoint.set_service_account("waypoint");
    cluster.set_labels(waypoint, &[("app", "waypoint")]);
    cluster.set_labels(backend, &[("app", "backend")]);
    cluster.set_enrolled(waypoint, false);
    // The identity provider is outside the mesh, as a real one would be.
    cluster.set_enrolled(jwks_pod, false);
    cluster.add_service(
        "backend",
        &namespace,
        &[BACKEND_VIP],
        &[("app", "backend")],
        &[(9080, 8080)],
    );
    cluster.add_service(
        "billing",
        &namespace,
        &[BILLING_VIP],
        &[("app", "backend")],
        &[(9080, 8080)],
    );
    cluster.add_service(
        "waypoint",
        &namespace,
        &[WAYPOINT_VIP],
        &[("app", "waypoint")],
        &[(15008, 15008)],
    );
    ensure_or_dump!(
        cluster,
        cluster.set_service_waypoint("backend", &namespace, "waypoint"),
        "no service backend"
    );
    cluster.set_policies(Policies {
        authorization_policies: vec![allow_nothing(&namespace), seed_policy(&namespace)],
        ..Default::default()
    });
    cluster.write_mesh()?;
    cluster.start_agents()?;
    // The CA listens on the fabric; give it the way back to node 0's pods (where the waypoint
    // runs), as a cluster routes pods to its CA's Service. Removed with the fabric namespace.
    util::ip(&format!(
        "-n {} route add 10.10.0.0/24 via {}",
        cluster.fabric_netns(),
        cluster.node(0).fabric_ip()
    ))?;

    // The identity provider: its JWKS served over HTTP by a real server in its own pod.
    let idp = TestIssuer::es256(ISSUER, "idp-1");
    let impostor = TestIssuer::es256(ISSUER, "idp-1");
    let jwks_dir = cluster.run_dir().join("jwks");
    std::fs::create_dir_all(&jwks_dir)?;
    std::fs::write(jwks_dir.join("jwks.json"), TestIssuer::jwks(&[&idp]))?;
    let jwks_ip = jwks_pod.ip4().to_string();
    let jwks_server = jwks_pod.spawn(
        "python3",
        [
            "-m",
            "http.server",
            "8081",
            "--bind",
            jwks_ip.as_str(),
            "--directory",
            &jwks_dir.display().to_string(),
        ],
    )?;
    let jwks_uri = format!("http://{jwks_ip}:8081/jwks.json");
    let other_jwks_uri = format!("http://{jwks_ip}:8081/other-tenant.json");

    let testpod = ambit_tests::testpod_path!();
    let mut server = backend.spawn(&testpod, ["http", "--port", "8080", "--name", "backend"])?;
    let listening = server.read_json(T)?;
    ensure_or_dump!(cluster, listening["event"] == "listening", "{listening}");
    let waypoint_process = cluster.with_diagnostics(start_waypoint(&cluster, waypoint))?;
    let node0 = cluster.node(0);

    // 1. Default deny plus the seed's policy: frontend may GET and POST, nothing else, and
    // nobody else may do anything.
    let get = cluster.with_diagnostics(request(frontend, "GET", "/api/items", &[]))?;
    let post = cluster.with_diagnostics(request(frontend, "POST", "/api/items", &[]))?;
    ensure_or_dump!(
        cluster,
        get.0 == 200 && get.1.starts_with("backend") && post.0 == 200,
        "frontend GET and POST must pass: {get:?} {post:?}"
    );
    let delete = cluster.with_diagnostics(request(frontend, "DELETE", "/api/items", &[]))?;
    ensure_or_dump!(
        cluster,
        delete == (403, "RBAC: access denied".to_string()),
        "frontend DELETE must be denied as Envoy does: {delete:?}"
    );
    for method in ["GET", "POST"] {
        let other = cluster.with_diagnostics(request(intruder, method, "/api/items", &[]))?;
        ensure_or_dump!(
            cluster,
            other.0 == 403,
            "{method} from another identity must be denied: {other:?}"
        );
    }
    let metrics = waypoint_metrics(node0, waypoint)?;
    let intruder_principal = format!("spiffe://cluster.local/ns/{namespace}/sa/intruder");
    let denied = requests_total(
        &metrics,
        &[
            ("reporter", "waypoint"),
            ("response_code", "403"),
            ("source_principal", &intruder_principal),
            // Reported against the service addressed, as Envoy's per-service chain does.
            ("destination_service_name", "backend"),
            ("destination_workload", "unknown"),
        ],
    );
    ensure_or_dump!(
        cluster,
        denied == 2.0,
        "istio_requests_total must count the intruder's 2 denied requests: {denied}"
    );
    // Written by the waypoint's log thread a moment after the answer left.
    let says_why = |log: &[Value]| {
        log.iter().any(|l| {
            l.to_string()
                .contains("rbac_access_denied_matched_policy[none]")
        })
    };
    let log = ambit_tests::waypoint::access_log_when(
        &waypoint_process,
        ambit_tests::waypoint::LOG_WAIT,
        says_why,
    );
    ensure_or_dump!(
        cluster,
        says_why(&log),
        "the access log must say why a request was denied"
    );

    // 2. JWT on /secure/*: the RequestAuthentication's keys come from the JWKS server.
    let mut policies = vec![
        allow_nothing(&namespace),
        seed_policy(&namespace),
        secure_policy(&namespace),
    ];
    cluster.set_policies(Policies {
        authorization_policies: policies.clone(),
        request_authentications: vec![
            request_authentication(&namespace, &jwks_uri),
            other_tenant(&namespace, &other_jwks_uri),
        ],
        ..Default::default()
    });
    cluster.write_mesh()?;
    wait_reloads(node0, waypoint, "ok", 1)?;
    let deadline = Instant::now() + T;
    while !waypoint_process.stderr().contains("JWKS fetched") {
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "the waypoint did not fetch {jwks_uri}: {}",
            waypoint_process.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let admin = idp.token("alice", json!({"groups": ["dev", "admin"]}));
    let dev = idp.token("bob", json!({"groups": ["dev"]}));
    let expired = idp.token(
        "alice",
        json!({"groups": ["admin"], "exp": TestIssuer::now() - 600}),
    );
    let forged = impostor.token("alice", json!({"groups": ["admin"]}));
    let cases: [(&str, Vec<String>, u16); 6] = [
        ("no token", vec![], 403),
        ("bad signature", bearer(&forged), 401),
        ("expired", bearer(&expired), 401),
        ("valid, groups without admin", bearer(&dev), 403),
        ("valid, admin", bearer(&admin), 200),
        ("garbage", bearer("a.b.c"), 401),
    ];
    for (what, headers, expected) in &cases {
        let got = cluster.with_diagnostics(request(frontend, "GET", "/secure/report", headers))?;
        ensure_or_dump!(
            cluster,
            got.0 == *expected,
            "GET /secure/report with {what}: expected {expected}, got {got:?}"
        );
    }
    // A valid token does not open what the policies close: the intruder stays denied, and
    // outside /secure/* no token is needed.
    let other =
        cluster.with_diagnostics(request(intruder, "GET", "/secure/report", &bearer(&admin)))?;
    let open = cluster.with_diagnostics(request(frontend, "GET", "/api/items", &[]))?;
    ensure_or_dump!(
        cluster,
        other.0 == 403 && open.0 == 200,
        "intruder with a token: {other:?}; frontend without one outside /secure: {open:?}"
    );

    // 3. A bad update (an unsupported CUSTOM action) is rejected naming the field; the last
    // good policies stay in force (it would have allowed everything to the intruder).
    policies.push(json!({
        "name": "ext-authz",
        "namespace": namespace,
        "targetRefs": [{"kind": "Service", "name": "backend"}],
        "action": "CUSTOM",
        "rules": [{}]
    }));
    policies.retain(|p| p["name"] != "allow-nothing");
    policies.push(json!({
        "name": "allow-all",
        "namespace": namespace,
        "targetRefs": [{"kind": "Service", "name": "backend"}],
        "rules": [{}]
    }));
    cluster.set_policies(Policies {
        authorization_policies: policies,
        request_authentications: vec![
            request_authentication(&namespace, &jwks_uri),
            other_tenant(&namespace, &other_jwks_uri),
        ],
        ..Default::default()
    });
    cluster.write_mesh()?;
    wait_reloads(node0, waypoint, "failed", 1)?;
    let deadline = Instant::now() + T;
    loop {
        let dump = node0.config_dump()?;
        if let Some(error) = dump["config"]["lastError"].as_str() {
            ensure_or_dump!(
                cluster,
                error.contains("authorizationPolicies[2].action: CUSTOM"),
                "the rejection must name the field: {error}"
            );
            break;
        }
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "the agent did not report the rejected mesh file"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let still_denied = cluster.with_diagnostics(request(intruder, "GET", "/api/items", &[]))?;
    let still_secure = cluster.with_diagnostics(request(frontend, "GET", "/secure/report", &[]))?;
    let still_open = cluster.with_diagnostics(request(frontend, "GET", "/api/items", &[]))?;
    ensure_or_dump!(
        cluster,
        still_denied.0 == 403 && still_secure.0 == 403 && still_open.0 == 200,
        "after a rejected update the last good policies must hold: intruder {still_denied:?}, \
         /secure without a token {still_secure:?}, frontend {still_open:?}"
    );
    // 4. A bad RequestAuthentication (a symmetric key in its JWKS) is rejected naming the field,
    // and the last good one stays in force: tokens are still checked (a forged one 401), not
    // ignored.
    let mut bad_authentication = request_authentication(&namespace, &jwks_uri);
    bad_authentication["jwtRules"] = json!([{
        "issuer": ISSUER,
        "jwks": r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#
    }]);
    cluster.set_policies(Policies {
        authorization_policies: vec![
            allow_nothing(&namespace),
            seed_policy(&namespace),
            secure_policy(&namespace),
        ],
        request_authentications: vec![
            bad_authentication,
            other_tenant(&namespace, &other_jwks_uri),
        ],
        ..Default::default()
    });
    cluster.write_mesh()?;
    wait_reloads(node0, waypoint, "failed", 2)?;
    let deadline = Instant::now() + T;
    loop {
        let dump = node0.config_dump()?;
        let error = dump["config"]["lastError"].as_str().unwrap_or_default();
        if error.contains("requestAuthentications[0].jwtRules[0].jwks") {
            ensure_or_dump!(
                cluster,
                error.contains("symmetric (oct) keys are not accepted"),
                "the rejection must say why: {error}"
            );
            break;
        }
        ensure_or_dump!(
            cluster,
            Instant::now() < deadline,
            "the agent did not report the rejected RequestAuthentication: {error}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let forged_now =
        cluster.with_diagnostics(request(frontend, "GET", "/secure/report", &bearer(&forged)))?;
    let admin_now =
        cluster.with_diagnostics(request(frontend, "GET", "/secure/report", &bearer(&admin)))?;
    ensure_or_dump!(
        cluster,
        forged_now.0 == 401 && admin_now.0 == 200,
        "after a rejected RequestAuthentication the last good one must hold: forged token \
         {forged_now:?}, valid token {admin_now:?}"
    );

    // The waypoint fetched its own service's keys, never the other tenant's (the JWKS server
    // logs every request it gets).
    let served = jwks_server.stderr();
    ensure_or_dump!(
        cluster,
        served.contains("GET /jwks.json") && !served.contains("other-tenant"),
        "the waypoint must fetch only the jwksUris of its own services: {served}"
    );
    drop(server);
    Ok(())
}
