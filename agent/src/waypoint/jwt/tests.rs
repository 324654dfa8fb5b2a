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
