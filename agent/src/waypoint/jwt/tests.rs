use std::convert::Infallible;

use http_body_util::Full;
use hyper::service::service_fn;
use serde_json::json;

use super::*;
use ambit_test_jwt::TestIssuer;

const ISS: &str = "https://idp.example";

fn rule(keys: JwksSource) -> JwtRule {
    JwtRule {
        issuer: ISS.into(),
        audiences: Vec::new(),
        keys,
        from_headers: vec![("authorization".into(), "Bearer ".into())],
        from_params: vec!["access_token".into()],
        output_payload_to_header: None,
        output_claim_to_headers: Vec::new(),
        forward_original_token: false,
    }
}

fn inline(issuers: &[&TestIssuer]) -> JwksSource {
    JwksSource::Inline(Arc::new(
        parse_jwks(TestIssuer::jwks(issuers).as_bytes()).unwrap(),
    ))
}

fn request(token: Option<&str>) -> Request<()> {
    let mut builder = Request::get("/api");
    if let Some(token) = token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    builder.body(()).unwrap()
}

fn check(rule: &JwtRule, request: &mut Request<()>) -> Result<Option<RequestAuth>, JwtError> {
    authenticate(&[rule], &Jwks::default(), request)
}

#[test]
fn a_valid_token_gives_the_request_principal_and_is_removed() {
    let idp = TestIssuer::es256(ISS, "k1");
    let rule = rule(inline(&[&idp]));
    let mut req = request(Some(&idp.token("alice", json!({"groups": ["admin"]}))));
    let auth = check(&rule, &mut req).unwrap().unwrap();
    assert_eq!(auth.principal, "https://idp.example/alice");
    assert_eq!(auth.claims["groups"][0], "admin");
    assert!(
        !req.headers().contains_key("authorization"),
        "forwardOriginalToken: false"
    );

    let mut forwarding = rule.clone();
    forwarding.forward_original_token = true;
    forwarding.output_payload_to_header = Some("x-jwt-payload".into());
    forwarding.output_claim_to_headers = vec![("x-user".into(), "sub".into())];
    let mut req = request(Some(&idp.token("alice", json!({}))));
    check(&forwarding, &mut req).unwrap().unwrap();
    assert!(req.headers().contains_key("authorization"));
    assert_eq!(req.headers()["x-user"], "alice");
    let payload = req.headers()["x-jwt-payload"].to_str().unwrap().to_string();
    use base64::Engine as _;
    let decoded: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(decoded["sub"], "alice");

    // Without a token: no identity, and the output headers a client sent are removed.
    let mut spoofed = request(None);
    spoofed
        .headers_mut()
        .insert("x-user", HeaderValue::from_static("root"));
    assert_eq!(check(&forwarding, &mut spoofed).unwrap(), None);
    assert!(!spoofed.headers().contains_key("x-user"));
}

#[test]
fn the_token_is_found_in_a_query_parameter_and_eddsa_works() {
    let idp = TestIssuer::ed25519(ISS, "ed");
    let rule = rule(inline(&[&idp]));
    let mut req = Request::get(format!(
        "/api?x=1&access_token={}",
        idp.token("bob", json!({}))
    ))
    .body(())
    .unwrap();
    let auth = check(&rule, &mut req).unwrap().unwrap();
    assert_eq!(auth.principal, "https://idp.example/bob");
}

#[test]
fn expiry_and_not_before_allow_sixty_seconds_of_skew() {
    let idp = TestIssuer::es256(ISS, "k1");
    let rule = rule(inline(&[&idp]));
    let now = TestIssuer::now();
    let token = |claims| idp.token("alice", claims);
    let expired = token(json!({"exp": now - 120}));
    assert_eq!(
        check(&rule, &mut request(Some(&expired))),
        Err(JwtError::Expired)
    );
    let within_skew = token(json!({"exp": now - 30}));
    assert!(check(&rule, &mut request(Some(&within_skew))).is_ok());
    let early = token(json!({"nbf": now + 600}));
    assert_eq!(
        check(&rule, &mut request(Some(&early))),
        Err(JwtError::NotYetValid)
    );
    // A fraction of a second does not make a time unreadable (jsonwebtoken alone skipped such
    // an `exp`: the token never expired); what is not a number makes the token malformed.
    let fractional = token(json!({"exp": now as f64 - 120.5}));
    assert_eq!(
        check(&rule, &mut request(Some(&fractional))),
        Err(JwtError::Expired)
    );
    let early_fraction = token(json!({"nbf": now as f64 + 600.5}));
    assert_eq!(
        check(&rule, &mut request(Some(&early_fraction))),
        Err(JwtError::NotYetValid)
    );
    for unreadable in [json!({"exp": "never"}), json!({"nbf": -5})] {
        assert!(matches!(
            check(&rule, &mut request(Some(&token(unreadable)))),
            Err(JwtError::Malformed(_))
        ));
    }
}

#[test]
fn bad_tokens_are_refused_with_the_reason() {
    let idp = TestIssuer::es256(ISS, "k1");
    let impostor = TestIssuer::es256(ISS, "k1");
    let rule = rule(inline(&[&idp]));
    let forged = impostor.token("alice", json!({}));
    assert_eq!(
        check(&rule, &mut request(Some(&forged))),
        Err(JwtError::Signature)
    );
    let other = TestIssuer::es256("https://other", "k1").token("alice", json!({}));
    assert!(matches!(
        check(&rule, &mut request(Some(&other))),
        Err(JwtError::UnknownIssuer(_))
    ));
    assert!(matches!(
        check(&rule, &mut request(Some("not-a-jwt"))),
        Err(JwtError::Malformed(_))
    ));
    let mut with_audience = rule.clone();
    with_audience.audiences = vec!["backend".into()];
    let wrong_aud = idp.token("alice", json!({"aud": "frontend"}));
    assert_eq!(
        check(&with_audience, &mut request(Some(&wrong_aud))),
        Err(JwtError::Audience)
    );
    let right_aud = idp.token("alice", json!({"aud": ["x", "backend"]}));
    assert!(check(&with_audience, &mut request(Some(&right_aud))).is_ok());
    // As Envoy: a rule with audiences refuses a token without `aud`, and compares them without
    // an http(s) scheme and a trailing slash.
    let no_aud = idp.token("alice", json!({}));
    assert_eq!(
        check(&with_audience, &mut request(Some(&no_aud))),
        Err(JwtError::Audience)
    );
    let schemed = idp.token("alice", json!({"aud": "https://backend/"}));
    assert!(check(&with_audience, &mut request(Some(&schemed))).is_ok());
    with_audience.audiences = vec!["http://backend".into()];
    assert!(check(&with_audience, &mut request(Some(&right_aud))).is_ok());
    for unreadable in [json!({"aud": ["backend", 5]}), json!({"aud": 5})] {
        assert!(matches!(
            check(
                &with_audience,
                &mut request(Some(&idp.token("alice", unreadable)))
            ),
            Err(JwtError::Malformed(_))
        ));
    }
    let other_host = idp.token("alice", json!({"aud": "https://backend.evil/"}));
    assert_eq!(
        check(&with_audience, &mut request(Some(&other_host))),
        Err(JwtError::Audience)
    );
    // A symmetric token is never accepted, whatever key it names.
    let hs = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"iss": ISS, "sub": "alice"}),
        &jsonwebtoken::EncodingKey::from_secret(b"public"),
    )
    .unwrap();
    assert!(matches!(
        check(&rule, &mut request(Some(&hs))),
        Err(JwtError::Algorithm(_))
    ));
}

#[test]
fn a_verified_token_skips_only_its_signature_check_and_only_under_the_same_keys() {
    let idp = TestIssuer::es256(ISS, "k1");
    let rule = rule(inline(&[&idp]));
    let JwksSource::Inline(keys) = &rule.keys else {
        unreachable!("inline keys")
    };
    let jwks = Jwks::default();
    let check = |rule: &JwtRule, token: &str| {
        authenticate(&[rule], &jwks, &mut request(Some(token))).map(|a| a.map(|a| a.principal))
    };
    let token = idp.token("alice", json!({"exp": TestIssuer::now() + 600}));
    let alice = Ok(Some(format!("{ISS}/alice")));
    assert_eq!(check(&rule, &token), alice);
    assert!(jwks.verified.verified_by(&token, keys), "remembered");
    assert_eq!(check(&rule, &token), alice, "accepted again");

    // A forged token is never remembered; were it, the signature would not be checked again.
    let forged = TestIssuer::es256(ISS, "k1").token("alice", json!({}));
    assert_eq!(check(&rule, &forged), Err(JwtError::Signature));
    assert!(!jwks.verified.verified_by(&forged, keys));
    jwks.verified.remember(&forged, keys);
    assert_eq!(
        check(&rule, &forged),
        alice,
        "what memory skips is the signature"
    );

    // Nor is a token refused for its audience.
    let mut with_audience = rule.clone();
    with_audience.audiences = vec!["backend".into()];
    let elsewhere = idp.token("alice", json!({"aud": "frontend"}));
    assert_eq!(check(&with_audience, &elsewhere), Err(JwtError::Audience));
    assert!(!jwks.verified.verified_by(&elsewhere, keys));

    // Other keys verify again: these do not sign it. So do equal keys configured anew (a
    // refresh, a changed policy): the forged token remembered under the old set is refused.
    let rekeyed = self::rule(inline(&[&TestIssuer::es256(ISS, "k1")]));
    assert_eq!(check(&rekeyed, &token), Err(JwtError::Signature));
    let reconfigured = self::rule(inline(&[&idp]));
    assert_eq!(check(&reconfigured, &token), alice);
    assert_eq!(check(&reconfigured, &forged), Err(JwtError::Signature));

    // The claims are checked on every request: a token verified while it was valid is refused
    // once expired, and another rule with the same keys checks its own audience.
    let expired = idp.token("alice", json!({"exp": TestIssuer::now() - 120}));
    jwks.verified.remember(&expired, keys);
    assert_eq!(check(&rule, &expired), Err(JwtError::Expired));
    let early = idp.token("alice", json!({"nbf": TestIssuer::now() + 600}));
    jwks.verified.remember(&early, keys);
    assert_eq!(check(&rule, &early), Err(JwtError::NotYetValid));
    assert_eq!(check(&with_audience, &token), Err(JwtError::Audience));
}

#[test]
fn keys_are_chosen_by_kid_and_alg_as_envoy_chooses_them() {
    let idp = TestIssuer::es256(ISS, "k1");
    let token = idp.token("alice", json!({}));
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut jwk = idp.jwk();
        edit(&mut jwk);
        let keys = parse_jwks(json!({ "keys": [jwk] }).to_string().as_bytes()).unwrap();
        check(
            &rule(JwksSource::Inline(Arc::new(keys))),
            &mut request(Some(&token)),
        )
    };
    // A key without a `kid` is tried for a token that names one.
    let no_kid = with(&|jwk| {
        jwk.as_object_mut().unwrap().remove("kid");
    });
    assert!(no_kid.is_ok(), "{no_kid:?}");
    // A key published for another algorithm is not.
    assert_eq!(
        with(&|jwk| jwk["alg"] = json!("ES384")),
        Err(JwtError::Signature)
    );
    assert!(with(&|jwk| jwk["alg"] = json!("ES256")).is_ok());
    // Another `kid` is not.
    assert_eq!(
        with(&|jwk| jwk["kid"] = json!("k2")),
        Err(JwtError::Signature)
    );
}

#[test]
fn the_memory_of_verified_tokens_is_bounded() {
    let idp = TestIssuer::es256(ISS, "k1");
    let JwksSource::Inline(keys) = inline(&[&idp]) else {
        unreachable!("inline keys")
    };
    let remembered = VerifiedTokens::default();
    let first = idp.token("user-0", json!({}));
    remembered.remember(&first, &keys);
    let rest: Vec<String> = (1..=VERIFIED_TOKENS)
        .map(|n| idp.token(&format!("user-{n}"), json!({})))
        .collect();
    for token in &rest {
        remembered.remember(token, &keys);
    }
    assert!(
        !remembered.verified_by(&first, &keys),
        "the oldest is forgotten"
    );
    assert!(
        rest.iter().all(|t| remembered.verified_by(t, &keys)),
        "the last {VERIFIED_TOKENS} are remembered"
    );
    let long = idp.token(
        "bob",
        json!({"pad": "x".repeat(MAX_REMEMBERED_TOKEN_BYTES)}),
    );
    remembered.remember(&long, &keys);
    assert!(
        !remembered.verified_by(&long, &keys),
        "too long to remember"
    );
    // A key set replaced (its last user gone) is freed, not kept by the tokens it verified.
    let replaced = Arc::downgrade(&keys);
    drop(keys);
    assert!(
        replaced.upgrade().is_none(),
        "the key set outlived its users"
    );
}

#[test]
fn symmetric_or_garbage_jwks_are_rejected() {
    assert!(parse_jwks(br#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#).is_err());
    assert!(parse_jwks(br#"{"keys":[]}"#).is_err());
    assert!(parse_jwks(b"<html>").is_err());
}

/// Serves `body` with `status` on 127.0.0.1 for as long as the test runs.
async fn serve(status: u16, body: String) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        let mut response = http::Response::new(Full::new(Bytes::from(body)));
                        *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

use std::net::SocketAddr;

#[tokio::test]
async fn jwks_are_fetched_over_http_bounded_and_checked() {
    let idp = TestIssuer::es256(ISS, "k1");
    let jwks = Jwks::default();
    let good = serve(200, TestIssuer::jwks(&[&idp])).await;
    let keys = jwks
        .fetch(&format!("http://{good}/.well-known/jwks.json"))
        .await
        .unwrap();
    assert_eq!(keys.keys.len(), 1);
    let failing = serve(500, String::new()).await;
    let err = jwks
        .fetch(&format!("http://{failing}/jwks"))
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("500"), "{err:#}");
    let huge = serve(200, "x".repeat(MAX_JWKS_BYTES + 1)).await;
    assert!(jwks.fetch(&format!("http://{huge}/jwks")).await.is_err());
}

/// The fetcher refuses link-local and cloud metadata destinations (server-side request forgery)
/// before dialling them, even when a policy got past validation.
#[tokio::test]
async fn link_local_and_metadata_destinations_are_never_dialled() {
    let jwks = Jwks::default();
    for uri in [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]:8080/keys",
        "http://[::ffff:169.254.169.254]/keys",
        "http://100.100.100.200/keys",
        "https://[fd00:ec2::254]/keys",
    ] {
        let err = format!("{:#}", jwks.fetch(uri).await.unwrap_err());
        assert!(err.contains("not fetched"), "{uri}: {err}");
    }
}

/// Serves a JWKS at `/b-good` (every other path 404) on 127.0.0.2, and records the paths asked.
async fn serve_recording(jwks: String) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let log = asked.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (jwks, log) = (jwks.clone(), log.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    log.lock().unwrap().push(req.uri().path().to_string());
                    let found = req.uri().path() == "/b-good";
                    let jwks = jwks.clone();
                    async move {
                        let mut response = http::Response::new(Full::new(Bytes::from(if found {
                            jwks
                        } else {
                            String::new()
                        })));
                        if !found {
                            *response.status_mut() = http::StatusCode::NOT_FOUND;
                        }
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, asked)
}

/// A waypoint fetches the `jwksUri`s of its own services' RequestAuthentications only, and
/// concurrently: a URI that never answers does not hold back another one (its fetch is still
/// open, not timed out, when the other's keys arrive), and a token of its issuer is refused
/// (401) meanwhile.
#[tokio::test]
async fn only_this_waypoints_jwks_are_fetched_and_a_slow_one_holds_back_no_other() {
    // The slow server reads the request and never answers, until the client goes away.
    let slow = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow_addr = slow.local_addr().unwrap();
    let slow_closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let closed = slow_closed.clone();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt as _;
        while let Ok((mut stream, _)) = slow.accept().await {
            let closed = closed.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                closed.store(true, std::sync::atomic::Ordering::SeqCst);
            });
        }
    });
    let idp = TestIssuer::es256(ISS, "k1");
    let (good_addr, asked) = serve_recording(TestIssuer::jwks(&[&idp])).await;
    // Sorted, the slow URI comes first (127.0.0.1 before 127.0.0.2).
    let slow_uri = format!("http://{slow_addr}/a-slow");
    let good_uri = format!("http://{good_addr}/b-good");
    let other_uri = format!("http://{good_addr}/c-other");
    let mesh = format!(
        r#"
workloads:
- {{name: wp-a, namespace: shop, node: n0, ips: [10.10.0.2], labels: {{app: wp-a}}, enrolled: false, netns: {{pid: 1}}}}
- {{name: wp-b, namespace: shop, node: n0, ips: [10.10.0.3], labels: {{app: wp-b}}, enrolled: false, netns: {{pid: 1}}}}
- {{name: web-0, namespace: shop, node: n0, ips: [10.10.0.4], labels: {{app: web}}, netns: {{pid: 1}}}}
services:
- {{name: wp-a, namespace: shop, vips: [10.96.0.1], selector: {{app: wp-a}}, ports: [{{port: 15008}}]}}
- {{name: wp-b, namespace: shop, vips: [10.96.0.2], selector: {{app: wp-b}}, ports: [{{port: 15008}}]}}
- {{name: web, namespace: shop, vips: [10.96.0.10], selector: {{app: web}}, ports: [{{port: 80}}], waypoint: {{name: wp-a}}}}
- {{name: db, namespace: shop, vips: [10.96.0.11], selector: {{app: web}}, ports: [{{port: 80}}], waypoint: {{name: wp-b}}}}
requestAuthentications:
- {{name: slow, namespace: shop, targetRefs: [{{kind: Service, name: web}}], jwtRules: [{{issuer: "https://slow.example", jwksUri: "{slow_uri}"}}]}}
- {{name: good, namespace: shop, targetRefs: [{{kind: Service, name: web}}], jwtRules: [{{issuer: "{ISS}", jwksUri: "{good_uri}"}}]}}
- {{name: other, namespace: shop, targetRefs: [{{kind: Service, name: db}}], jwtRules: [{{issuer: "https://other.example", jwksUri: "{other_uri}"}}]}}
"#
    );
    let state =
        crate::discovery::parse_mesh(std::path::Path::new("mesh.yaml"), mesh.as_bytes()).unwrap();
    assert_eq!(
        crate::waypoint::jwks_uris_of(&state, "shop", "wp-a"),
        [slow_uri.clone(), good_uri.clone()]
    );
    assert_eq!(
        crate::waypoint::jwks_uris_of(&state, "shop", "wp-b"),
        [other_uri]
    );
    assert!(crate::waypoint::jwks_uris_of(&state, "other", "wp-a").is_empty());

    let good_rule = rule(JwksSource::Uri(good_uri.clone()));
    let jwks = Arc::new(Jwks::default());
    let token = idp.token("alice", json!({}));
    // Before the keys are there, a token of the issuer is refused.
    let mut req = request(Some(&token));
    assert_eq!(
        authenticate(&[&good_rule], &jwks, &mut req),
        Err(JwtError::NoKeys(good_uri.clone()))
    );
    let (_tx, rx) = watch::channel(Arc::new(state));
    let task = tokio::spawn(jwks.clone().refresh(rx, |state: &MeshState| {
        crate::waypoint::jwks_uris_of(state, "shop", "wp-a")
    }));
    let deadline = Instant::now() + Duration::from_secs(60);
    while jwks.keys(&good_uri).is_none() {
        assert!(Instant::now() < deadline, "{good_uri} was never fetched");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !slow_closed.load(std::sync::atomic::Ordering::SeqCst),
        "the good URI was fetched only after the slow one gave up"
    );
    let mut req = request(Some(&token));
    assert!(
        authenticate(&[&good_rule], &jwks, &mut req)
            .unwrap()
            .is_some()
    );
    assert!(jwks.keys(&slow_uri).is_none());
    assert_eq!(
        *asked.lock().unwrap(),
        ["/b-good"],
        "only this waypoint's URIs"
    );
    task.abort();
}
