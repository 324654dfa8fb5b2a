//! The CA end to end: real TLS and gRPC over loopback.
use std::{sync::Arc, time::Duration};

use rcgen::{CertificateParams, KeyPair};
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, UnixTime},
    server::WebPkiClientVerifier,
};
use tonic::{Code, Request};
use x509_parser::{
    extensions::GeneralName,
    prelude::{FromDer as _, X509Certificate},
};

use crate::{
    identity::{
        CaClient, CaError, SpiffeId, WorkloadCertificate,
        ca_api::{self, IstioCertificateRequest, IstioCertificateServiceClient},
        pem::read_certificates,
    },
    testing::ca::{
        PluginCerts, TOKEN_A, TOKEN_B, TestCaServer, create_certificate, csr_with, id, leaf_sans,
        uri,
    },
};

fn refused(result: Result<impl std::fmt::Debug, CaError>) -> (Code, String) {
    match result {
        Err(CaError::Refused { code, message }) => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn csr(alg: &'static rcgen::SignatureAlgorithm) -> String {
    let key = KeyPair::generate_for(alg).unwrap();
    CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
}

/// The test CA (`crate::testing::ca::TestCa`) issues through the CA's own leaf recipe: a test
/// leaf differs from one the CA service signs only in its key, serial and lifetime.
#[tokio::test]
async fn test_leaves_are_shaped_like_the_cas_own() {
    let ca = TestCaServer::start().await;
    let client = CaClient::new(ca.client_config(TOKEN_A)).unwrap();
    let web = id("shop", "web");
    let served = client.fetch(&web, Duration::from_secs(600)).await.unwrap();
    let issued = ca.ca().issue(&web);

    /// Issuer, subject and every extension but the key's own identifier, as text.
    fn shape(der: &CertificateDer<'_>) -> Vec<String> {
        let (_, leaf) = X509Certificate::from_der(der).unwrap();
        let mut shape = vec![
            format!("issuer {}", leaf.issuer()),
            format!("subject {}", leaf.subject()),
        ];
        for ext in leaf.extensions() {
            if ext.oid != x509_parser::oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER {
                shape.push(format!(
                    "{} critical={} {:?}",
                    ext.oid,
                    ext.critical,
                    ext.parsed_extension()
                ));
            }
        }
        shape
    }
    assert_eq!(shape(&issued.chain[0]), shape(&served.chain[0]));
    assert_eq!(issued.roots, served.roots, "one root, in memory and served");
}

#[tokio::test]
async fn signs_an_identity_placed_on_the_authenticated_node() {
    let ca = TestCaServer::start().await;
    let client = CaClient::new(ca.client_config(TOKEN_A)).unwrap();
    let web = id("shop", "web");
    let cert = client.fetch(&web, Duration::from_secs(600)).await.unwrap();
    assert_eq!(cert.id, web);
    assert_eq!(
        cert.chain.len(),
        1,
        "the root is not part of the presented chain"
    );
    assert_eq!(cert.roots.len(), 1);
    let lifetime = cert.not_after.duration_since(cert.not_before).unwrap();
    // 600 s asked, plus the minute of backdating.
    assert!((658..=661).contains(&lifetime.as_secs()), "{lifetime:?}");

    let (_, leaf) = X509Certificate::from_der(&cert.chain[0]).unwrap();
    let sans = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .clone();
    assert_eq!(
        sans,
        vec![GeneralName::URI("spiffe://cluster.local/ns/shop/sa/web")]
    );

    // node-b gets the identities of its own pods.
    let client_b = CaClient::new(ca.client_config(TOKEN_B)).unwrap();
    client_b
        .fetch(&id("pay", "pay"), Duration::from_secs(60))
        .await
        .unwrap();
}

#[tokio::test]
async fn refuses_a_wrong_or_missing_token() {
    let ca = TestCaServer::start().await;
    let client = CaClient::new(ca.client_config("not-a-token-of-any-node")).unwrap();
    let (code, message) = refused(
        client
            .fetch(&id("shop", "web"), Duration::from_secs(60))
            .await,
    );
    assert_eq!(code, Code::Unauthenticated);
    assert!(message.contains("unknown bootstrap token"), "{message}");

    // The same request without any credential.
    let client = CaClient::new(ca.client_config(TOKEN_A)).unwrap();
    let request = Request::new(IstioCertificateRequest {
        csr: csr(&rcgen::PKCS_ECDSA_P256_SHA256),
        validity_duration: 60,
        metadata: Some(ca_api::impersonation_metadata(
            "spiffe://cluster.local/ns/shop/sa/web",
        )),
    });
    let status = IstioCertificateServiceClient::new(client.channel_for_tests())
        .create_certificate(request)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("authorization: Bearer"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn refuses_identities_not_placed_on_the_node() {
    let ca = TestCaServer::start().await;
    let client = CaClient::new(ca.client_config(TOKEN_A)).unwrap();
    // pay/pay runs on node-b only.
    let (code, message) = refused(
        client
            .fetch(&id("pay", "pay"), Duration::from_secs(60))
            .await,
    );
    assert_eq!(code, Code::PermissionDenied);
    assert!(
        message.contains("node node-a") && message.contains("spiffe://cluster.local/ns/pay/sa/pay"),
        "{message}"
    );
    // Right namespace, wrong service account.
    let (code, _) = refused(
        client
            .fetch(&id("shop", "pay"), Duration::from_secs(60))
            .await,
    );
    assert_eq!(code, Code::PermissionDenied);
    // Another trust domain.
    let foreign = SpiffeId::new("evil.org", "shop", "web");
    let (code, message) = refused(client.fetch(&foreign, Duration::from_secs(60)).await);
    assert_eq!(code, Code::PermissionDenied);
    assert!(message.contains("trust domain cluster.local"), "{message}");
}

#[tokio::test]
async fn without_metadata_signs_the_csrs_spiffe_san_placed_on_the_node() {
    let ca = TestCaServer::start().await;
    let a = CaClient::new(ca.client_config(TOKEN_A)).unwrap();
    let web = "spiffe://cluster.local/ns/shop/sa/web";
    // As Istio's sidecars and ztunnel in dedicated mode ask: no ImpersonatedIdentity.
    let chain = create_certificate(&a, TOKEN_A, csr_with(vec![uri(web)]), None)
        .await
        .expect("node-a runs shop/web");
    assert_eq!(leaf_sans(&chain), [web]);
    assert_eq!(chain.len(), 2, "leaf and root");

    // pay/pay runs on node-b only: the same placement rule as with the metadata.
    let pay = "spiffe://cluster.local/ns/pay/sa/pay";
    let status = create_certificate(&a, TOKEN_A, csr_with(vec![uri(pay)]), None)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status
            .message()
            .contains("node node-a may not get a certificate for")
            && status.message().contains(pay),
        "{}",
        status.message()
    );
    let b = CaClient::new(ca.client_config(TOKEN_B)).unwrap();
    let chain = create_certificate(&b, TOKEN_B, csr_with(vec![uri(pay)]), None)
        .await
        .expect("node-b runs pay/pay");
    assert_eq!(leaf_sans(&chain), [pay]);
}

#[tokio::test]
async fn refuses_csr_names_that_do_not_say_one_identity() {
    let ca = TestCaServer::start().await;
    let a = CaClient::new(ca.client_config(TOKEN_A)).unwrap();
    let web = "spiffe://cluster.local/ns/shop/sa/web";
    let db = "spiffe://cluster.local/ns/shop/sa/db";
    let call = |csr: String, impersonated: Option<&'static str>| {
        let a = a.clone();
        async move {
            create_certificate(&a, TOKEN_A, csr, impersonated)
                .await
                .unwrap_err()
        }
    };
    let expect = |status: tonic::Status, code: Code, parts: &[&str]| {
        assert_eq!(status.code(), code, "{status:?}");
        for part in parts {
            assert!(
                status.message().contains(part),
                "{part:?} not in {}",
                status.message()
            );
        }
    };

    // Without metadata: no name, several names, a name that is no SPIFFE URI.
    expect(
        call(csr_with(vec![]), None).await,
        Code::InvalidArgument,
        &["no metadata ImpersonatedIdentity and the CSR has no subject alternative name"],
    );
    // Both identities run on node-a: refused all the same, one certificate is one identity.
    expect(
        call(csr_with(vec![uri(web), uri(db)]), None).await,
        Code::InvalidArgument,
        &[
            "the CSR has 2 subject alternative names",
            &format!("URI:{web}, URI:{db}"),
            "exactly one",
        ],
    );
    expect(
        call(
            csr_with(vec![rcgen::SanType::DnsName(
                "web.shop.svc".try_into().unwrap(),
            )]),
            None,
        )
        .await,
        Code::InvalidArgument,
        &["web.shop.svc", "is not a SPIFFE URI"],
    );
    expect(
        call(csr_with(vec![uri("https://web.shop.example/x")]), None).await,
        Code::InvalidArgument,
        &["https://web.shop.example/x", "not a SPIFFE ID"],
    );
    expect(
        call(csr_with(vec![uri("spiffe://cluster.local/web")]), None).await,
        Code::InvalidArgument,
        &[
            "spiffe://cluster.local/web",
            "/ns/<namespace>/sa/<service-account>",
        ],
    );
    let foreign = "spiffe://evil.org/ns/shop/sa/web";
    expect(
        call(csr_with(vec![uri(foreign)]), None).await,
        Code::PermissionDenied,
        &[foreign, "this CA signs only trust domain cluster.local"],
    );

    // With metadata, the CSR's names must agree with it (both identities run on node-a).
    expect(
        call(csr_with(vec![uri(db)]), Some(web)).await,
        Code::InvalidArgument,
        &[&format!(
            "the CSR asks for URI:{db} but metadata ImpersonatedIdentity is {web}"
        )],
    );
    expect(
        call(
            csr_with(vec![
                uri(web),
                rcgen::SanType::DnsName("web".try_into().unwrap()),
            ]),
            Some(web),
        )
        .await,
        Code::InvalidArgument,
        &["DNSName(web)", "exactly that identity"],
    );
    // A long name is cut in the message.
    let long = format!("spiffe://cluster.local/ns/shop/sa/{}", "x".repeat(5000));
    let status = call(csr_with(vec![uri(&long)]), Some(web)).await;
    assert!(status.message().len() < 1000, "{}", status.message().len());

    // Metadata and a CSR naming the same identity, or none: signed.
    for csr in [csr_with(vec![uri(web)]), csr_with(vec![])] {
        let chain = create_certificate(&a, TOKEN_A, csr, Some(web))
            .await
            .unwrap();
        assert_eq!(leaf_sans(&chain), [web]);
    }
}

#[tokio::test]
async fn refuses_a_csr_with_another_key_type() {
    let ca = TestCaServer::start().await;
    let client = CaClient::new(ca.client_config(TOKEN_A)).unwrap();
    for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
        let (code, message) = refused(
            client
                .create_certificate(&csr(alg), &id("shop", "web"), Duration::from_secs(60))
                .await,
        );
        assert_eq!(code, Code::InvalidArgument);
        assert!(message.contains("only ECDSA P-256"), "{message}");
    }
}

#[tokio::test]
async fn follows_the_mesh_file() {
    let ca = TestCaServer::start().await;
    let client = CaClient::new(ca.client_config(TOKEN_A)).unwrap();
    let pay = id("pay", "pay");
    refused(client.fetch(&pay, Duration::from_secs(60)).await);

    // pay-0 moves to node-a.
    let moved = crate::testing::ca::MESH.replace("    node: node-b\n", "    node: node-a\n");
    std::fs::write(ca.mesh_file(), moved).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match client.fetch(&pay, Duration::from_secs(60)).await {
            Ok(_) => break,
            Err(CaError::Refused {
                code: Code::PermissionDenied,
                ..
            }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the CA did not pick up the mesh change: {e}"),
        }
    }
}

fn verifier(
    roots: &[CertificateDer<'static>],
) -> Arc<dyn rustls::server::danger::ClientCertVerifier> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).unwrap();
    }
    WebPkiClientVerifier::builder_with_provider(
        Arc::new(store),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap()
}

fn verifies(
    verifier: &Arc<dyn rustls::server::danger::ClientCertVerifier>,
    cert: &WorkloadCertificate,
) -> bool {
    verifier
        .verify_client_cert(&cert.chain[0], &cert.chain[1..], UnixTime::now())
        .is_ok()
}

#[tokio::test]
async fn a_bundle_with_two_roots_verifies_leaves_of_both() {
    let old = TestCaServer::start().await;
    let new = TestCaServer::start_trusting(vec![old.roots_file()]).await;
    // Mid-rotation every agent has the new bundle: it reaches either CA with it.
    let bundle = new.roots_file();
    let from_old = CaClient::new(old.client_config_with(TOKEN_A, bundle.clone()))
        .unwrap()
        .fetch(&id("shop", "web"), Duration::from_secs(600))
        .await
        .unwrap();
    let from_new = CaClient::new(new.client_config_with(TOKEN_A, bundle))
        .unwrap()
        .fetch(&id("shop", "db"), Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!(from_new.roots.len(), 2);
    let issuer = |cert: &WorkloadCertificate| {
        let (_, leaf) = X509Certificate::from_der(&cert.chain[0]).unwrap();
        leaf.issuer().as_raw().to_vec()
    };
    let (_, new_root) = X509Certificate::from_der(&from_new.roots[0]).unwrap();
    assert_eq!(issuer(&from_new), new_root.subject().as_raw());
    assert_ne!(
        issuer(&from_old),
        issuer(&from_new),
        "each root has its own name"
    );

    let both = verifier(&from_new.roots);
    assert!(verifies(&both, &from_old), "the old root's leaf");
    assert!(verifies(&both, &from_new), "the new root's leaf");

    // The control: a bundle with the old root alone rejects the new root's leaf.
    let old_only = verifier(&read_certificates(&old.roots_file()).unwrap());
    assert!(verifies(&old_only, &from_old));
    assert!(!verifies(&old_only, &from_new));
}

#[tokio::test]
async fn follows_the_tokens_file() {
    let ca = TestCaServer::start().await;
    let web = id("shop", "web");
    let new_token = "a-fresh-token-for-node-a-42";
    let tokens = ca.mesh_file().with_file_name("tokens.yaml");
    std::fs::write(
        &tokens,
        format!("nodes:\n  node-a: {new_token}\n  node-b: {TOKEN_B}\n"),
    )
    .unwrap();
    let client = CaClient::new(ca.client_config(new_token)).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match client.fetch(&web, Duration::from_secs(60)).await {
            Ok(_) => break,
            Err(CaError::Refused {
                code: Code::Unauthenticated,
                ..
            }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the CA did not pick up the new token: {e}"),
        }
    }
    let old = CaClient::new(ca.client_config(TOKEN_A)).unwrap();
    let (code, _) = refused(old.fetch(&web, Duration::from_secs(60)).await);
    assert_eq!(code, Code::Unauthenticated);

    // A broken tokens file is ignored: the last good tokens stay in force.
    std::fs::write(&tokens, "nodes: [").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    client.fetch(&web, Duration::from_secs(60)).await.unwrap();
}

/// With Istio's plug-in certificates the CA signs from an intermediate under the
/// organisation's root: every chain it returns (and its own TLS chain) verifies to
/// `root-cert.pem` alone, through the intermediate, as peers verify them (webpki); a bundle
/// without that root verifies none. The readiness probe answers once it can sign, and the
/// chain's end is exported.
#[tokio::test]
async fn plugin_intermediate_chains_verify_to_the_organisations_root() {
    let certs = PluginCerts::new("example.org");
    let ca = TestCaServer::start_plugin(&certs).await;
    // The client connects over TLS trusting only the organisation's root: the CA's serving
    // chain goes through the intermediate too.
    let client = CaClient::new(ca.client_config(TOKEN_A)).unwrap();
    let web = id("shop", "web");
    let cert = client.fetch(&web, Duration::from_secs(600)).await.unwrap();
    let org_root = read_certificates(&ca.roots_file()).unwrap();
    assert_eq!(org_root.len(), 1);
    assert_eq!(cert.roots, org_root);
    // Presented in handshakes: the leaf and the intermediate (peers hold the root).
    assert_eq!(cert.chain.len(), 2);
    let intermediate =
        crate::identity::pem::parse_certificate(certs.ca_cert_pem.as_bytes()).unwrap();
    assert_eq!(cert.chain[1], intermediate);
    let (_, leaf) = X509Certificate::from_der(&cert.chain[0]).unwrap();
    let (_, issuer) = X509Certificate::from_der(&intermediate).unwrap();
    assert_eq!(leaf.issuer(), issuer.subject());
    assert!(
        verifies(&verifier(&org_root), &cert),
        "webpki: leaf -> intermediate -> root"
    );
    let other = PluginCerts::new("elsewhere.org");
    let other_root =
        vec![crate::identity::pem::parse_certificate(other.root_cert_pem.as_bytes()).unwrap()];
    assert!(!verifies(&verifier(&other_root), &cert));
    // Without the intermediate, the leaf does not reach the root.
    assert!(
        verifier(&org_root)
            .verify_client_cert(&cert.chain[0], &[], UnixTime::now())
            .is_err()
    );

    // The raw answer ends with the root, as Istio's CA sends it.
    let chain = create_certificate(&client, TOKEN_A, csr_with(vec![]), Some(&web.to_string()))
        .await
        .unwrap();
    assert_eq!(chain.len(), 3);
    assert_eq!(chain[1], certs.ca_cert_pem);
    assert_eq!(chain[2], certs.root_cert_pem);

    let monitoring = ca.monitoring.unwrap();
    let ready = crate::cli::fetch::get(monitoring, "/ready").await.unwrap();
    assert_eq!(&ready[..], b"ready\n");
    let metrics = crate::cli::fetch::get(monitoring, "/metrics")
        .await
        .unwrap();
    let samples = crate::telemetry::metrics::exposition::parse(&String::from_utf8_lossy(&metrics));
    let value = |name| crate::telemetry::metrics::exposition::value(&samples, name, &[]).unwrap();
    let chain_end = value("ambit_ca_chain_expiry_timestamp_seconds");
    let root_end = value("ambit_ca_root_expiry_timestamp_seconds");
    assert_eq!(chain_end, issuer.validity().not_after.timestamp() as f64);
    assert!(chain_end < root_end, "the intermediate ends first");
    assert_eq!(
        crate::telemetry::metrics::exposition::value(
            &samples,
            "ambit_ca_certificates_signed_total",
            &[("caller", "node")]
        ),
        Some(2.0)
    );
}
