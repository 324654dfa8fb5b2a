//! The node agent's client of the CA: gRPC `CreateCertificate` over TLS, authenticated by the
//! node's bootstrap token (standalone) or the agent's projected ServiceAccount token
//! (Kubernetes), re-read from its file whenever it changes.
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
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
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

use super::{
    SpiffeId, WorkloadCertificate,
    ca_api::{self, DEFAULT_CA_PORT, IstioCertificateRequest, IstioCertificateServiceClient},
    pem::{self, PemFileError, read_certificates},
};

/// How long one call to the CA may take, connection included, unless configured otherwise.
pub const DEFAULT_CA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to the CA (TCP and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The credential sent to the CA as `authorization: Bearer <token>`: a fixed string, or a file
/// read again for every request. `Debug` never prints the token, and no error quotes it.
///
/// In Kubernetes the file is a projected ServiceAccount token, which kubelet replaces (by an
/// atomic symlink swap) well before it expires, about every hour: an agent that read it once
/// would be refused by the CA after that. Reading a file of a kilobyte costs nothing next to a
/// call to the CA (a few per identity and day), and unlike checking its modification time it
/// cannot miss a rewrite.
#[derive(Clone)]
pub struct BearerToken(TokenSource);

#[derive(Clone)]
enum TokenSource {
    Fixed(Arc<str>),
    File(Arc<TokenFile>),
}

/// A token file and the last good token read from it.
struct TokenFile {
    path: PathBuf,
    last: Mutex<Arc<str>>,
}

impl BearerToken {
    /// A fixed token (surrounding whitespace is dropped).
    pub fn new(token: &str) -> Self {
        Self(TokenSource::Fixed(Arc::from(token.trim())))
    }

    /// The token in the file at `path` (the whole file, trimmed), e.g. a projected
    /// ServiceAccount token or a mounted Secret. Read now, so that a missing or unusable file
    /// is reported at start, and again for every request.
    pub fn from_file(path: &Path) -> Result<Self, CaError> {
        let token = read_token_file(path)?;
        Ok(Self(TokenSource::File(Arc::new(TokenFile {
            path: path.to_path_buf(),
            last: Mutex::new(token),
        }))))
    }

    /// The token to send now: for a file, its current content. A file that has become
    /// unreadable or unusable leaves the last good token in use (the CA says if it has
    /// expired), and is reported in the log.
    pub fn current(&self) -> Arc<str> {
        let file = match &self.0 {
            TokenSource::Fixed(token) => return Arc::clone(token),
            TokenSource::File(file) => file,
        };
        let mut last = file.last.lock().unwrap_or_else(|e| e.into_inner());
        match read_token_file(&file.path) {
            Ok(token) => {
                if token != *last {
                    tracing::info!(path = %file.path.display(), "the CA token file changed: sending the new token");
                    *last = token;
                }
            }
            Err(e) => tracing::warn!("{e}; sending the token read before"),
        }
        Arc::clone(&last)
    }
}

/// Reads and checks a token file; errors name the file, never the content.
fn read_token_file(path: &Path) -> Result<Arc<str>, CaError> {
    let err = |why: String| CaError::Config(format!("token file {}: {why}", path.display()));
    let token = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read it: {e}")))?;
    let token = token.trim();
    check_token(token).map_err(err)?;
    Ok(Arc::from(token))
}

/// Whether `token` can be sent as an HTTP/2 header value.
fn check_token(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("the token is empty".into());
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token is not printable ASCII without spaces".into());
    }
    Ok(())
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            TokenSource::Fixed(_) => f.write_str("BearerToken(<redacted>)"),
            TokenSource::File(file) => {
                write!(f, "BearerToken(<redacted>, from {})", file.path.display())
            }
        }
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
    /// This node's credential: a bootstrap token (standalone) or its projected ServiceAccount
    /// token (Kubernetes).
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
    TrustBundle(#[from] PemFileError),
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
    token: BearerToken,
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
        Self::with_source(config, None)
    }

    /// A client whose connections come from the local address `source` (tests: the CA tells
    /// clients apart by address).
    #[cfg(test)]
    pub(crate) fn bound_to(config: CaClientConfig, source: std::net::IpAddr) -> Self {
        Self::with_source(config, Some(source)).expect("a valid client configuration")
    }

    fn with_source(
        config: CaClientConfig,
        source: Option<std::net::IpAddr>,
    ) -> Result<Self, CaError> {
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
        // Checked now so that a bad token is reported at start, not at the first fetch.
        authorization(&config.token.current())?;

        let endpoint = Endpoint::from(uri)
            .timeout(config.timeout)
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let connector = TlsConnect {
            host,
            port,
            server_name,
            roots_file: config.roots_file.clone(),
            source,
        };
        Ok(Self {
            channel: endpoint.connect_with_connector_lazy(connector),
            token: config.token,
            roots_file: config.roots_file,
        })
    }

    /// The underlying channel, to send requests the client would not (`crate::testing`).
    #[cfg(any(test, feature = "testing"))]
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
            metadata: Some(ca_api::impersonation_metadata(&identity.to_string())),
        });
        let token = self.token.current();
        request
            .metadata_mut()
            .insert("authorization", authorization(&token)?);
        let response = IstioCertificateServiceClient::new(self.channel.clone())
            .create_certificate(request)
            .await?;
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
            .map(|text| {
                pem::parse_certificate(text.as_bytes())
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

/// The `authorization` metadata for `token`.
fn authorization(token: &str) -> Result<MetadataValue<Ascii>, CaError> {
    check_token(token).map_err(|why| CaError::Config(format!("the CA token: {why}")))?;
    let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
        .parse()
        .map_err(|_| CaError::Config("the CA token is not printable ASCII".into()))?;
    // Keeps the token out of HPACK's dynamic table (and out of debug output).
    value.set_sensitive(true);
    Ok(value)
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
    let not_before = SystemTime::from(leaf.validity().not_before.to_datetime());
    let not_after = SystemTime::from(leaf.validity().not_after.to_datetime());
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
    /// The local address to connect from [default: the kernel's choice].
    source: Option<std::net::IpAddr>,
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
            let tcp = match this.source {
                None => TcpStream::connect((this.host.as_str(), this.port)).await?,
                Some(source) => {
                    let target = tokio::net::lookup_host((this.host.as_str(), this.port))
                        .await?
                        .find(|a| a.is_ipv4() == source.is_ipv4())
                        .ok_or_else(|| {
                            format!("{} has no address of {source}'s family", this.host)
                        })?;
                    let socket = if source.is_ipv4() {
                        tokio::net::TcpSocket::new_v4()?
                    } else {
                        tokio::net::TcpSocket::new_v6()?
                    };
                    socket.bind((source, 0).into())?;
                    socket.connect(target).await?
                }
            };
            tcp.set_nodelay(true)?;
            let stream = TlsConnector::from(Arc::new(tls))
                .connect(this.server_name.clone(), tcp)
                .await?;
            Ok(TokioIo::new(stream))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_is_read_again_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "first-token-aaaa\n").unwrap();
        let token = BearerToken::from_file(&file).unwrap();
        assert_eq!(&*token.current(), "first-token-aaaa");

        // Rewritten in place with a token of the same length, at once.
        std::fs::write(&file, "other-token-bbbb").unwrap();
        assert_eq!(&*token.current(), "other-token-bbbb");

        // kubelet's atomic writer: `token` -> `..data/token`, `..data` -> a timestamped
        // directory, swapped by renaming a new symlink over `..data`.
        let mounted = dir.path().join("mount");
        std::fs::create_dir_all(mounted.join("v1")).unwrap();
        std::fs::write(mounted.join("v1/token"), "projected-v1").unwrap();
        std::os::unix::fs::symlink("v1", mounted.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/token", mounted.join("token")).unwrap();
        let projected = BearerToken::from_file(&mounted.join("token")).unwrap();
        assert_eq!(&*projected.current(), "projected-v1");
        std::fs::create_dir_all(mounted.join("v2")).unwrap();
        std::fs::write(mounted.join("v2/token"), "projected-v2").unwrap();
        std::os::unix::fs::symlink("v2", mounted.join("..data_tmp")).unwrap();
        std::fs::rename(mounted.join("..data_tmp"), mounted.join("..data")).unwrap();
        std::fs::remove_dir_all(mounted.join("v1")).unwrap();
        assert_eq!(&*projected.current(), "projected-v2");

        // Gone or broken for a moment: the last good token is still sent.
        std::fs::remove_file(&file).unwrap();
        assert_eq!(&*token.current(), "other-token-bbbb");
        std::fs::write(&file, "").unwrap();
        assert_eq!(&*token.current(), "other-token-bbbb");
        std::fs::write(&file, "third-token-cccc").unwrap();
        assert_eq!(&*token.current(), "third-token-cccc");

        // A fixed token stays what it is.
        assert_eq!(&*BearerToken::new("  fixed \n").current(), "fixed");
    }

    #[test]
    fn tokens_never_show_in_debug_output_or_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "secret-token-value").unwrap();
        let token = BearerToken::from_file(&file).unwrap();
        let debug = format!("{token:?} {:?}", BearerToken::new("secret-token-value"));
        assert!(!debug.contains("secret"), "{debug}");
        assert!(
            debug.contains("<redacted>") && debug.contains("token"),
            "{debug}"
        );

        for bad in ["secret with spaces", "secret\u{e9}t", ""] {
            std::fs::write(&file, bad).unwrap();
            let err = BearerToken::from_file(&file).unwrap_err().to_string();
            assert!(err.contains(&file.display().to_string()), "{err}");
            assert!(!err.contains("secret"), "{err}");
        }
        let err = BearerToken::from_file(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing") && err.contains("cannot read"),
            "{err}"
        );
    }
}
