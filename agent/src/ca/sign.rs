//! Turning a CSR into a workload certificate chain.
//!
//! The CSR contributes its public key (and the proof, by its signature, that the caller holds
//! the matching private key), and the subject alternative names it asks for, which the server
//! reads to learn (or check) the identity asked for. Subject, key usages and other extensions
//! are ignored. What the leaf certifies is decided by the CA alone: the identity it was asked
//! for, after authentication and authorisation, as its only SAN.
use std::{
    fmt,
    time::{Duration, SystemTime},
};

use rcgen::{
    Certificate, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SignatureAlgorithm, SigningKey,
};
use x509_parser::{
    extensions::{GeneralName, ParsedExtension},
    oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY},
    prelude::{FromDer as _, X509CertificationRequest},
};

use super::root::{BACKDATE, RootCa};
use crate::identity::{SpiffeId, pem};

/// Why a CSR was not signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The CSR is not a PEM PKCS#10 request.
    #[error("malformed CSR: {0}")]
    MalformedCsr(String),
    /// The CSR's signature does not verify with its own public key.
    #[error("the CSR's signature does not verify")]
    BadCsrSignature,
    /// The CSR's key is not an ECDSA P-256 key.
    #[error("unsupported CSR key: {0}; only ECDSA P-256 keys are accepted")]
    UnsupportedKey(String),
    /// The identity belongs to another trust domain.
    #[error("identity {identity} is outside this CA's trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// The identity asked for.
        identity: SpiffeId,
        /// The CA's trust domain.
        trust_domain: String,
    },
    /// The root has expired (or expires within the backdating margin).
    #[error("the root certificate has expired")]
    RootExpired,
    /// Building or signing the certificate failed.
    #[error("cannot sign the certificate: {0}")]
    Signing(#[from] rcgen::Error),
}

/// A P-256 public key taken from a CSR, in the form rcgen signs.
struct CsrPublicKey(Vec<u8>);

impl PublicKeyData for CsrPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// Longest rendering of a requested name in messages: a CSR is the client's to fill.
const NAME_SHOWN_MAX: usize = 200;

/// A subject alternative name a CSR asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestedName {
    /// A URI (a SPIFFE ID, for a workload).
    Uri(String),
    /// Any other kind (DNS name, IP address, e-mail...), as x509-parser renders it.
    Other(String),
}

impl fmt::Display for RequestedName {
    /// `URI:<uri>` or e.g. `DNSName(<name>)`, cut to 200 characters.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uri(uri) => write!(f, "URI:{}", shown(uri)),
            Self::Other(other) => write!(f, "{}", shown(other)),
        }
    }
}

/// `text` as quoted in messages and logs: cut to 200 characters (a client's text may be
/// megabytes long).
pub(crate) fn shown(text: &str) -> std::borrow::Cow<'_, str> {
    cut(text, NAME_SHOWN_MAX)
}

/// `text` cut to `max` characters, marked by `...` when cut.
pub(crate) fn cut(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}...", &text[..cut]).into(),
        None => text.into(),
    }
}

/// A parsed, verified CSR: its public key and the names it asks for.
pub struct Csr {
    key: CsrPublicKey,
    names: Vec<RequestedName>,
}

impl fmt::Debug for Csr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Csr")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl Csr {
    /// Parses a PEM PKCS#10 request and verifies its signature. Only ECDSA P-256 keys are
    /// accepted.
    pub fn parse(csr_pem: &str) -> Result<Self, SignError> {
        let der = pem::parse_certificate_request(csr_pem.as_bytes())
            .map_err(|e| SignError::MalformedCsr(format!("not a PEM certificate request: {e}")))?;
        let (_, csr) = X509CertificationRequest::from_der(der.as_ref())
            .map_err(|e| SignError::MalformedCsr(e.to_string()))?;
        let key = csr_public_key(&csr)?;
        let mut names = Vec::new();
        for extension in csr.requested_extensions().into_iter().flatten() {
            match extension {
                ParsedExtension::SubjectAlternativeName(san) => {
                    names.extend(san.general_names.iter().map(|name| match name {
                        GeneralName::URI(uri) => RequestedName::Uri(uri.to_string()),
                        other => RequestedName::Other(other.to_string()),
                    }));
                }
                ParsedExtension::ParseError { error } => {
                    return Err(SignError::MalformedCsr(format!(
                        "an extension it requests cannot be parsed: {error}"
                    )));
                }
                _ => {}
            }
        }
        Ok(Self { key, names })
    }

    /// The subject alternative names the CSR asks for, in its order.
    pub fn names(&self) -> &[RequestedName] {
        &self.names
    }
}

/// Checks a parsed CSR's key and signature and returns the key (an uncompressed P-256 point).
fn csr_public_key(csr: &X509CertificationRequest<'_>) -> Result<CsrPublicKey, SignError> {
    let spki = &csr.certification_request_info.subject_pki;
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return Err(SignError::UnsupportedKey(format!(
            "key algorithm {}",
            spki.algorithm.algorithm
        )));
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if curve.as_ref() != Some(&OID_EC_P256) {
        let curve = curve.map_or_else(|| "unnamed".to_string(), |c| c.to_string());
        return Err(SignError::UnsupportedKey(format!("elliptic curve {curve}")));
    }
    let point = spki.subject_public_key.data.as_ref();
    if point.len() != 65 || point[0] != 0x04 {
        return Err(SignError::UnsupportedKey(
            "P-256 point not in uncompressed form".into(),
        ));
    }
    // Only after the key type check: the verification would otherwise fail with a less clear
    // message for keys it does not know.
    csr.verify_signature()
        .map_err(|_| SignError::BadCsrSignature)?;
    Ok(CsrPublicKey(point.to_vec()))
}

/// The one recipe of a workload certificate: `public_key` certified as `identity` by `issuer`,
/// valid from [`BACKDATE`] ago until `not_after`.
///
/// The leaf has an empty subject, the identity as its only (critical) SAN, key usage
/// digitalSignature + keyEncipherment, extended key usage serverAuth + clientAuth, `CA:false`,
/// a random serial and the issuer's key identifier. Policy (trust domain, lifetime caps) is the
/// caller's: [`RootCa::sign_csr`] applies it; test CAs (`crate::testing::ca`) call this directly
/// so their leaves are the mesh's, byte for byte in shape.
pub fn workload_leaf(
    public_key: &impl PublicKeyData,
    identity: &SpiffeId,
    not_after: SystemTime,
    issuer: &Issuer<'_, impl SigningKey>,
) -> Result<Certificate, SignError> {
    let mut params = CertificateParams::default();
    // The identity lives in the SAN; as in Istio, the subject stays empty (which makes the
    // SAN critical, as RFC 5280 requires).
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names =
        vec![SanType::URI(identity.to_string().try_into().map_err(
            |_| SignError::MalformedCsr(format!("identity {identity} is not ASCII")),
        )?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.serial_number = Some(super::random_serial());
    params.not_before = (SystemTime::now() - BACKDATE).into();
    params.not_after = not_after.into();
    params.use_authority_key_identifier_extension = true;
    Ok(params.signed_by(public_key, issuer)?)
}

impl RootCa {
    /// Signs `csr_pem` as a leaf for `identity`, valid from one minute ago until `ttl` from now
    /// (`ttl` capped by [`RootCa::max_ttl`], zero meaning the maximum, and never past the
    /// signing chain's own expiry). Returns the chain as PEM: the leaf first, then the signing
    /// certificate's chain (for a plug-in intermediate: the intermediate, any above it), the
    /// root last. The leaf is [`workload_leaf`]'s.
    pub fn sign(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        ttl: Duration,
    ) -> Result<Vec<String>, SignError> {
        self.sign_csr(&Csr::parse(csr_pem)?, identity, ttl)
    }

    /// [`Self::sign`] for a CSR already parsed.
    pub fn sign_csr(
        &self,
        csr: &Csr,
        identity: &SpiffeId,
        ttl: Duration,
    ) -> Result<Vec<String>, SignError> {
        if identity.trust_domain != self.trust_domain() {
            return Err(SignError::ForeignTrustDomain {
                identity: identity.clone(),
                trust_domain: self.trust_domain().to_string(),
            });
        }
        let public_key = &csr.key;
        let now = SystemTime::now();
        let ttl = if ttl.is_zero() {
            self.max_ttl()
        } else {
            ttl.min(self.max_ttl())
        };
        let not_after = (now + ttl).min(self.not_after());
        if not_after <= now {
            return Err(SignError::RootExpired);
        }

        let leaf = workload_leaf(public_key, identity, not_after, self.issuer())?;
        Ok(std::iter::once(leaf.pem())
            .chain(self.chain_pem().iter().cloned())
            .collect())
    }

    /// Issues the CA's own TLS serving certificate for `names` (DNS names or IP addresses),
    /// valid for `ttl`, with a fresh in-memory key. Returns (chain PEM, key).
    pub(super) fn issue_server_certificate(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<(Vec<String>, KeyPair), SignError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Ambit CA");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(super::random_serial());
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + ttl).min(self.not_after()).into();
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, self.issuer())?;
        let chain = std::iter::once(cert.pem())
            .chain(self.chain_pem().iter().cloned())
            .collect();
        Ok((chain, key))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rustls::pki_types::CertificateDer;
    use x509_parser::{
        extensions::GeneralName,
        prelude::{FromDer as _, X509Certificate},
    };

    use super::*;
    use crate::ca::root;

    fn csr_for(alg: &'static SignatureAlgorithm, sans: Vec<String>) -> String {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut params = CertificateParams::new(sans).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "please make me admin");
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn der(text: &str) -> CertificateDer<'static> {
        pem::parse_certificate(text.as_bytes()).unwrap()
    }

    fn new_ca(dir: &Path) -> RootCa {
        root::init(dir, "cluster.local", None).unwrap()
    }

    #[test]
    fn leaf_has_only_the_identity_san_and_the_requested_validity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca(dir.path());
        let id = SpiffeId::new("cluster.local", "shop", "web");
        // The CSR asks for other names, a subject and CA powers: all ignored.
        let csr = csr_for(
            &rcgen::PKCS_ECDSA_P256_SHA256,
            vec!["evil.example".into(), "10.0.0.1".into()],
        );
        let before = SystemTime::now();
        let chain = ca.sign(&csr, &id, Duration::from_secs(3600)).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1], ca.certificate_pem());

        let leaf_der = der(&chain[0]);
        let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical);
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("spiffe://cluster.local/ns/shop/sa/web")]
        );
        assert_eq!(leaf.subject().iter().count(), 0);
        assert!(!leaf.is_ca());
        let ku = leaf.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth && !eku.any);

        let not_before = leaf.validity().not_before.timestamp();
        let not_after = leaf.validity().not_after.timestamp();
        let start = before
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(
            (start - 62..=start - 58).contains(&not_before),
            "backdated by a minute"
        );
        assert!(
            (start + 3598..=start + 3602).contains(&not_after),
            "valid for the ttl"
        );

        let (_, root) = X509Certificate::from_der(ca.certificate()).unwrap();
        leaf.verify_signature(Some(root.public_key())).unwrap();
    }

    #[test]
    fn ttl_is_capped_by_the_max_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca(dir.path()).with_max_ttl(Duration::from_secs(600));
        let id = SpiffeId::new("cluster.local", "a", "b");
        let csr = csr_for(&rcgen::PKCS_ECDSA_P256_SHA256, vec![]);
        for asked in [Duration::from_secs(86400), Duration::ZERO] {
            let chain = ca.sign(&csr, &id, asked).unwrap();
            let leaf_der = der(&chain[0]);
            let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
            let left = leaf.validity().not_after.timestamp() - now;
            assert!((595..=600).contains(&left), "{left}");
        }
    }

    #[test]
    fn non_p256_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca(dir.path());
        let id = SpiffeId::new("cluster.local", "a", "b");
        for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
            let err = ca
                .sign(&csr_for(alg, vec![]), &id, Duration::from_secs(60))
                .unwrap_err();
            assert!(matches!(err, SignError::UnsupportedKey(_)), "{err}");
            assert!(err.to_string().contains("only ECDSA P-256"), "{err}");
        }
        let err = ca
            .sign("not a csr", &id, Duration::from_secs(60))
            .unwrap_err();
        assert!(matches!(err, SignError::MalformedCsr(_)), "{err}");
    }

    #[test]
    fn a_csr_tells_the_names_it_asks_for() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI("spiffe://cluster.local/ns/a/sa/b".try_into().unwrap()),
            SanType::DnsName("b.a.svc".try_into().unwrap()),
            SanType::IpAddress("10.0.0.1".parse().unwrap()),
        ];
        let csr = Csr::parse(&params.serialize_request(&key).unwrap().pem().unwrap()).unwrap();
        let shown: Vec<String> = csr.names().iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "URI:spiffe://cluster.local/ns/a/sa/b",
                "DNSName(b.a.svc)",
                "IPAddress(0a:00:00:01)"
            ]
        );
        assert_eq!(
            csr.names()[0],
            RequestedName::Uri("spiffe://cluster.local/ns/a/sa/b".into())
        );
        let none = Csr::parse(&csr_for(&rcgen::PKCS_ECDSA_P256_SHA256, vec![])).unwrap();
        assert!(none.names().is_empty());
        // A name longer than any message should quote is cut.
        let long = RequestedName::Uri("x".repeat(1000));
        assert_eq!(long.to_string().len(), "URI:".len() + 200 + "...".len());
    }

    #[test]
    fn foreign_trust_domains_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca(dir.path());
        let csr = csr_for(&rcgen::PKCS_ECDSA_P256_SHA256, vec![]);
        let err = ca
            .sign(
                &csr,
                &SpiffeId::new("other.org", "a", "b"),
                Duration::from_secs(60),
            )
            .unwrap_err();
        assert!(matches!(err, SignError::ForeignTrustDomain { .. }), "{err}");
    }
}
