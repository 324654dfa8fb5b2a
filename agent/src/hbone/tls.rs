//! rustls configurations for HBONE, built from a [`WorkloadCertificate`].
//!
//! Both sides speak TLS 1.3 only with ALPN `h2`, use the ring provider explicitly (never the
//! process-wide default, which another crate could install), and authenticate each other by
//! SPIFFE IDs in URI SANs, not by DNS names:
//!
//! - the client ([`client_config`]) verifies the server's chain against the trust bundle with no
//!   hostname check, then requires one of the server certificate's SPIFFE IDs to be in the set
//!   of identities allowed for that destination. It sends no SNI.
//! - the server ([`server_config`]) requires a client certificate chaining to the trust bundle
//!   whose identity ([`peer_identity`]) is in the server's own trust domain.
//!
//! A peer's identity is the first URI SAN of its leaf certificate that parses as a SPIFFE ID of
//! the Kubernetes form; the server's trust-domain check and [`peer_identity`] use that same one,
//! so what authorization sees is what was checked.
use std::{
    io,
    sync::{Arc, OnceLock},
};

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
    client::{
        Resumption,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        NoServerSessionStorage, ParsedCertificate, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use tracing::warn;

use crate::identity::{SpiffeId, WorkloadCertificate};

/// The only application protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// TLS 1.3 only: HBONE has no TLS 1.2 peers to accommodate, and 1.3 encrypts the certificates.
static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// The crypto provider for all HBONE TLS: ring's, chosen explicitly.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// The trust bundle holds no usable root certificate.
    #[error("the trust bundle holds no usable root certificate")]
    NoRoots,
    /// The client was given no identity to accept from the server.
    #[error("no server identity is allowed")]
    NoAllowedIdentities,
    /// rustls rejected the certificate chain, the key or the protocol settings.
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built from the trust bundle.
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Why a peer's certificate was refused on identity grounds (its chain was fine).
///
/// Carried inside the handshake error; [`identity_error`] gets it back out so callers can tell
/// "wrong identity" from other handshake failures (metrics, access logs).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdentityError {
    /// The leaf certificate could not be parsed as X.509.
    #[error("the peer certificate cannot be parsed")]
    BadCertificate,
    /// The leaf certificate has no URI SAN of the form `spiffe://<td>/ns/<ns>/sa/<sa>`.
    #[error("the peer certificate carries no SPIFFE ID")]
    NoSpiffeId,
    /// The server is not one of the identities the client expects at that destination.
    #[error(
        "the server presented {}, expected one of {}",
        list(presented),
        list(allowed)
    )]
    NotAllowed {
        /// What the client would have accepted.
        allowed: Vec<SpiffeId>,
        /// What the server's certificate carries.
        presented: Vec<SpiffeId>,
    },
    /// The client's identity is from another trust domain than the server's.
    #[error("the client {presented} is not in trust domain {expected}")]
    ForeignTrustDomain {
        /// The server's trust domain.
        expected: String,
        /// The client's identity.
        presented: SpiffeId,
    },
}

fn list(ids: &[SpiffeId]) -> String {
    let names: Vec<String> = ids.iter().map(ToString::to_string).collect();
    format!("[{}]", names.join(", "))
}

impl From<PeerIdentityError> for rustls::Error {
    fn from(err: PeerIdentityError) -> Self {
        // `Other` keeps our typed error inside rustls's so `identity_error` can recover it.
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
    }
}

/// The identity check that failed a TLS handshake, if that is why `err` (from a tokio-rustls
/// connect or accept) happened.
pub fn identity_error(err: &io::Error) -> Option<PeerIdentityError> {
    let rustls_err = err.get_ref()?.downcast_ref::<rustls::Error>()?;
    match rustls_err {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
            other.0.downcast_ref::<PeerIdentityError>().cloned()
        }
        _ => None,
    }
}

/// The rustls error behind a failed TLS handshake, if any (e.g. an unknown issuer, an expired
/// certificate, or an alert the peer sent).
pub fn handshake_error(err: &io::Error) -> Option<&rustls::Error> {
    err.get_ref()?.downcast_ref::<rustls::Error>()
}

/// All SPIFFE IDs in a certificate's URI SANs, in certificate order. URI SANs of other shapes
/// are skipped.
pub fn spiffe_ids(cert: &CertificateDer<'_>) -> Result<Vec<SpiffeId>, PeerIdentityError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, parsed) =
        X509Certificate::from_der(cert.as_ref()).map_err(|_| PeerIdentityError::BadCertificate)?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|_| PeerIdentityError::BadCertificate)?;
    let Some(san) = san else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => uri.parse::<SpiffeId>().ok(),
            _ => None,
        })
        .collect())
}

/// The identity a certificate proves: its first SPIFFE ID.
pub fn certificate_identity(cert: &CertificateDer<'_>) -> Result<SpiffeId, PeerIdentityError> {
    spiffe_ids(cert)?
        .into_iter()
        .next()
        .ok_or(PeerIdentityError::NoSpiffeId)
}

/// The verified identity of the peer of a finished handshake (either side); `None` before the
/// handshake or if the peer sent no certificate (which both configurations here refuse).
///
/// Pass `tls_stream.get_ref().1` of a tokio-rustls stream.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    certificate_identity(leaf).ok()
}

/// The trust bundle as a root store. Unusable roots are skipped with a warning rather than
/// failing everything: during a root rotation one bad bundle entry must not cut the mesh.
fn root_store(roots: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, TlsConfigError> {
    let mut store = RootCertStore::empty();
    let (_, invalid) = store.add_parsable_certificates(roots.iter().cloned());
    if invalid > 0 {
        warn!(
            invalid,
            "skipping unusable root certificates in the trust bundle"
        );
    }
    if store.is_empty() {
        return Err(TlsConfigError::NoRoots);
    }
    Ok(Arc::new(store))
}

/// The client configuration for tunnels from `source`'s workload to a server that must prove
/// one of the `allowed` identities.
pub fn client_config(
    source: &WorkloadCertificate,
    allowed: &[SpiffeId],
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    if allowed.is_empty() {
        return Err(TlsConfigError::NoAllowedIdentities);
    }
    let provider = provider();
    let verifier = ServerIdentityVerifier {
        roots: root_store(&source.roots)?,
        allowed: allowed.to_vec(),
        provider: provider.clone(),
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(TLS13_ONLY)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(source.chain.clone(), source.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Identities are in the certificate, not in names: SNI would only leak the destination.
    config.enable_sni = false;
    // A resumed session skips certificate verification; with rotating certificates and trust
    // bundles every connection should prove its identity afresh (ztunnel does the same).
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The server config of the certificate a listener presents, built once per certificate: a
/// handshake reuses it until the certificate manager hands out a renewed one.
#[derive(Default)]
pub struct ServerConfigCache {
    cached: std::sync::Mutex<Option<(Arc<WorkloadCertificate>, Arc<ServerConfig>)>>,
}

impl ServerConfigCache {
    /// The config for `cert`: the cached one if it was built for this very certificate.
    pub fn get(&self, cert: Arc<WorkloadCertificate>) -> Result<Arc<ServerConfig>, TlsConfigError> {
        let mut cached = self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((for_cert, config)) = cached.as_ref()
            && Arc::ptr_eq(for_cert, &cert)
        {
            return Ok(config.clone());
        }
        let config = server_config(&cert)?;
        *cached = Some((cert, config.clone()));
        Ok(config)
    }
}

/// The server configuration for a pod's HBONE listener: presents `pod`'s certificate and
/// accepts clients of `pod`'s trust domain whose chain leads to its trust bundle.
pub fn server_config(pod: &WorkloadCertificate) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let provider = provider();
    let chain =
        WebPkiClientVerifier::builder_with_provider(root_store(&pod.roots)?, provider.clone())
            .build()?;
    let verifier = TrustDomainVerifier {
        chain,
        trust_domain: pod.id.trust_domain.clone(),
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(TLS13_ONLY)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(pod.chain.clone(), pod.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption (see `client_config`): no session cache, no tickets.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Client side: webpki chain verification against the trust bundle, then the SPIFFE ID check.
/// There is deliberately no hostname check: the destination is named by its identity.
#[derive(Debug)]
struct ServerIdentityVerifier {
    roots: Arc<RootCertStore>,
    allowed: Vec<SpiffeId>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ServerIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let presented = spiffe_ids(end_entity)?;
        if presented.is_empty() {
            return Err(PeerIdentityError::NoSpiffeId.into());
        }
        // Any of the certificate's IDs may match any allowed one (ztunnel's rule); matching is
        // exact, with no prefix or trust-domain wildcards.
        if presented.iter().any(|id| self.allowed.contains(id)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(PeerIdentityError::NotAllowed {
                allowed: self.allowed.clone(),
                presented,
            }
            .into())
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Server side: rustls's webpki client verifier for the chain, then the trust-domain check.
#[derive(Debug)]
struct TrustDomainVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for TrustDomainVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Clients have exactly one certificate to offer; naming our roots would only add bytes
        // (ztunnel sends none either).
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.chain
            .verify_client_cert(end_entity, intermediates, now)?;
        let presented = certificate_identity(end_entity)?;
        if presented.trust_domain != self.trust_domain {
            return Err(PeerIdentityError::ForeignTrustDomain {
                expected: self.trust_domain.clone(),
                presented,
            }
            .into());
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}
