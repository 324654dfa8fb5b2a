//! The node agent's client of the CA: gRPC `CreateCertificate` over TLS, authenticated by the
//! node's bootstrap token.
//!
//! The CA's certificate is verified against the trust bundle file (the one file that also
//! holds the roots workloads trust), re-read at each new connection so that adding a root
//! (rotation) needs no restart. Workload keys are generated here, in memory, one per
//! certificate; they never touch the disk and are never logged.
use std::{
    fmt,
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{
        CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, pem::PemObject as _,
    },
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};
use tonic::{
    Code, Request,
    codegen::{Service, http::Uri},
    metadata::{Ascii, MetadataValue},
    transport::{Channel, Endpoint},
};
use x509_parser::{
    extensions::GeneralName,
    prelude::{FromDer as _, X509Certificate},
};

use super::{SpiffeId, WorkloadCertificate};
use crate::ca::{
    DEFAULT_CA_PORT,
    proto::{self, IstioCertificateRequest},
    root::{RootError, asn1_to_system_time, read_certificates},
};

/// How long one call to the CA may take, connection included, unless configured otherwise.
pub const DEFAULT_CA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to the CA (TCP and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A bearer token: a secret that `Debug` does not print.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(String);

impl BearerToken {
    /// Wraps `token` (surrounding whitespace is dropped).
    pub fn new(token: &str) -> Self {
        Self(token.trim().to_string())
    }

    /// Reads the token from `path` (the whole file, trimmed), e.g. a mounted Secret.
    pub fn from_file(path: &Path) -> Result<Self, CaError> {
        let token = std::fs::read_to_string(path).map_err(|e| {
            CaError::Config(format!(
                "cannot read the token file {}: {e}",
                path.display()
            ))
        })?;
        Ok(Self::new(&token))
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// Where the CA is and how to trust and authenticate to it.
#[derive(Debug, Clone)]
pub struct CaClientConfig {
    /// `https://host:port` or `host:port` (port 15012 if omitted).
    pub address: String,
    /// The name the CA's certificate must carry [default: the host of `address`].
    pub server_name: Option<String>,
    /// The trust bundle (PEM roots, several during a rotation): verifies the CA, and is what
    /// workloads trust.
    pub roots_file: PathBuf,
    /// This node's bootstrap token.
    pub token: BearerToken,
    /// Longest time one call may take.
    pub timeout: Duration,
}

/// Why the CA did not deliver a usable certificate.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The client configuration is unusable (address, server name, token).
    #[error("CA client configuration: {0}")]
    Config(String),
    /// The trust bundle could not be read.
    #[error("trust bundle: {0}")]
    TrustBundle(#[from] RootError),
    /// The CA could not be reached, or did not answer in time: worth retrying.
    #[error("CA unreachable: {0}")]
    Unavailable(String),
    /// The CA answered with an error (authentication, authorisation, bad request...).
    #[error("CA refused ({code:?}): {message}")]
    Refused {
        /// The gRPC status code.
        code: Code,
        /// The CA's message.
        message: String,
    },
    /// The CA's answer is not a valid certificate for the request.
    #[error("invalid certificate from the CA: {0}")]
    InvalidResponse(String),
    /// The key or the CSR could not be generated.
    #[error("cannot generate the key or CSR: {0}")]
    Key(#[from] rcgen::Error),
}

impl From<tonic::Status> for CaError {
    fn from(status: tonic::Status) -> Self {
        match status.code() {
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::Unknown => Self::Unavailable(status.message().to_string()),
            code => Self::Refused {
                code,
                message: status.message().to_string(),
            },
        }
    }
}

/// A client of the CA; cheap to clone (one multiplexed connection, re-established on demand).
#[derive(Clone)]
pub struct CaClient {
    channel: Channel,
    authorization: MetadataValue<Ascii>,
    roots_file: PathBuf,
}

impl fmt::Debug for CaClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaClient")
            .field("roots_file", &self.roots_file)
            .finish_non_exhaustive()
    }
}

impl CaClient {
    /// A client for `config`. Connects lazily: the CA need not be up yet.
    pub fn new(config: CaClientConfig) -> Result<Self, CaError> {
        let address = config.address.trim();
        let authority = address
            .strip_prefix("https://")
            .unwrap_or(address)
            .trim_end_matches('/');
        if authority.contains("://") {
            return Err(CaError::Config(format!(
                "CA address {address:?}: only https:// is supported"
            )));
        }
        let uri: Uri = format!("https://{authority}")
            .parse()
            .map_err(|e| CaError::Config(format!("CA address {address:?}: {e}")))?;
        let host = uri
            .host()
            .ok_or_else(|| CaError::Config(format!("CA address {address:?} has no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(DEFAULT_CA_PORT);
        let name = config.server_name.clone().unwrap_or_else(|| host.clone());
        let server_name = ServerName::try_from(name.clone())
            .map_err(|_| CaError::Config(format!("invalid CA server name {name:?}")))?;
        if config.token.0.is_empty() {
            return Err(CaError::Config("the bootstrap token is empty".into()));
        }
        let mut authorization: MetadataValue<Ascii> = format!("Bearer {}", config.token.0)
            .parse()
            .map_err(|_| CaError::Config("the bootstrap token is not printable ASCII".into()))?;
        // Keeps the token out of HPACK's dynamic table (and out of debug output).
        authorization.set_sensitive(true);

        let endpoint = Endpoint::from(uri)
            .timeout(config.timeout)
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let connector = TlsConnect {
            host,
            port,
            server_name,
            roots_file: config.roots_file.clone(),
        };
        Ok(Self {
            channel: endpoint.connect_with_connector_lazy(connector),
            authorization,
            roots_file: config.roots_file,
        })
    }

    /// The underlying channel, to send requests the client would not (tests).
    #[cfg(test)]
    pub(crate) fn channel_for_tests(&self) -> Channel {
        self.channel.clone()
    }

    /// The trust bundle file.
    pub fn roots_file(&self) -> &Path {
        &self.roots_file
    }

    /// Asks the CA to sign `csr_pem` for `identity`, valid for `ttl`; returns the PEM chain,
    /// leaf first, as the CA sent it.
    pub async fn create_certificate(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        ttl: Duration,
    ) -> Result<Vec<String>, CaError> {
        let mut request = Request::new(IstioCertificateRequest {
            csr: csr_pem.to_string(),
            validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(proto::impersonation_metadata(&identity.to_string())),
        });
        request
            .metadata_mut()
            .insert("authorization", self.authorization.clone());
        let response = proto::create_certificate(self.channel.clone(), request).await?;
        Ok(response.into_inner().cert_chain)
    }

    /// Gets a certificate for `identity`: generates an ECDSA P-256 key in memory, sends a CSR
    /// with the identity as URI SAN, and checks what comes back (the identity, our key, a
    /// chain to a root of the trust bundle, a current validity).
    pub async fn fetch(
        &self,
        identity: &SpiffeId,
        ttl: Duration,
    ) -> Result<WorkloadCertificate, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
        let csr = params.serialize_request(&key)?.pem()?;

        let pems = self.create_certificate(&csr, identity, ttl).await?;
        // Read after the call: a bundle updated meanwhile is the one to check against.
        let roots = read_certificates(&self.roots_file)?;
        let certs = pems
            .iter()
            .map(|pem| {
                CertificateDer::from_pem_slice(pem.as_bytes())
                    .map_err(|e| CaError::InvalidResponse(format!("not a PEM certificate: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (not_before, not_after) = check_leaf(&certs, &roots, identity, &key)?;
        // Istio's convention: the root comes last. Peers get it from their own bundle, so the
        // chain presented in handshakes is the leaf and any intermediates.
        let chain = if certs.len() > 1 {
            certs[..certs.len() - 1].to_vec()
        } else {
            certs
        };
        Ok(WorkloadCertificate {
            id: identity.clone(),
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            roots,
            not_before,
            not_after,
        })
    }
}

/// Checks the leaf of `certs` and returns its validity.
fn check_leaf(
    certs: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
    identity: &SpiffeId,
    key: &KeyPair,
) -> Result<(SystemTime, SystemTime), CaError> {
    let invalid = |m: String| CaError::InvalidResponse(m);
    let leaf_der = certs
        .first()
        .ok_or_else(|| invalid("empty certificate chain".into()))?;
    let (_, leaf) = X509Certificate::from_der(leaf_der)
        .map_err(|e| invalid(format!("leaf is not X.509: {e}")))?;
    let expected = identity.to_string();
    let sans: Vec<String> = match leaf.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .map(|name| match name {
                GeneralName::URI(uri) => uri.to_string(),
                other => format!("{other:?}"),
            })
            .collect(),
        _ => Vec::new(),
    };
    if sans != [expected.as_str()] {
        return Err(invalid(format!(
            "the leaf's subject alternative names are {sans:?}, not just {expected}"
        )));
    }
    if leaf.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(invalid("the leaf does not certify the key we sent".into()));
    }
    let not_before = asn1_to_system_time(leaf.validity().not_before.timestamp());
    let not_after = asn1_to_system_time(leaf.validity().not_after.timestamp());
    let now = SystemTime::now();
    if not_after <= now || not_before > now + Duration::from_secs(300) {
        return Err(invalid("the leaf is not currently valid".into()));
    }
    verify_to_bundle(&leaf, certs, roots)?;
    Ok((not_before, not_after))
}

/// Walks from `leaf` through the chain's intermediates up to a root of the bundle, checking
/// each signature: a CA whose root is missing from the bundle would hand out certificates no
/// peer accepts, which is better reported here, once, than on every connection.
fn verify_to_bundle(
    leaf: &X509Certificate<'_>,
    certs: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
) -> Result<(), CaError> {
    fn parse<'a>(der: &'a CertificateDer<'static>) -> Option<X509Certificate<'a>> {
        X509Certificate::from_der(der).ok().map(|(_, c)| c)
    }
    let roots: Vec<X509Certificate<'_>> = roots.iter().filter_map(parse).collect();
    let intermediates: Vec<X509Certificate<'_>> = certs.iter().skip(1).filter_map(parse).collect();
    let issued_by = |child: &X509Certificate<'_>, parent: &X509Certificate<'_>| {
        child.issuer().as_raw() == parent.subject().as_raw()
            && child.verify_signature(Some(parent.public_key())).is_ok()
    };
    let mut current = leaf;
    // Bounded: a chain longer than this is not one Ambit's CA produces.
    for _ in 0..4 {
        if roots.iter().any(|root| issued_by(current, root)) {
            return Ok(());
        }
        match intermediates
            .iter()
            .find(|i| i.as_raw() != current.as_raw() && issued_by(current, i))
        {
            Some(parent) => current = parent,
            None => break,
        }
    }
    Err(CaError::InvalidResponse(
        "the certificate does not chain to a root of the trust bundle (was the CA's root added \
         to the bundle?)"
            .into(),
    ))
}

/// Opens TLS connections to the CA for tonic, verifying it against the trust bundle as read at
/// connection time.
#[derive(Clone)]
struct TlsConnect {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    roots_file: PathBuf,
}

impl Service<Uri> for TlsConnect {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let roots = read_certificates(&this.roots_file)?;
            let mut store = RootCertStore::empty();
            let (added, _) = store.add_parsable_certificates(roots);
            if added == 0 {
                return Err(
                    format!("{}: no usable root certificate", this.roots_file.display()).into(),
                );
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut tls = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_root_certificates(store)
                .with_no_client_auth();
            tls.alpn_protocols = vec![b"h2".to_vec()];
            let tcp = TcpStream::connect((this.host.as_str(), this.port)).await?;
            tcp.set_nodelay(true)?;
            let stream = TlsConnector::from(Arc::new(tls))
                .connect(this.server_name.clone(), tcp)
                .await?;
            Ok(TokioIo::new(stream))
        })
    }
}
