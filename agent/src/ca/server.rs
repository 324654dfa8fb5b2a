//! `ambit ca serve`: the signing API over TLS, and who may get which certificate.
//!
//! Standalone mode authenticates a node agent by a per-node bootstrap token (gRPC metadata
//! `authorization: Bearer <token>`, tokens in a YAML file `nodes: {<node>: <token>}`), and
//! authorises a request for identity `spiffe://<td>/ns/<ns>/sa/<sa>` only if the mesh file
//! places a workload of namespace `<ns>` running as `<sa>` on that node, and `<td>` is the CA's
//! trust domain. So a compromised node can obtain the identities of its own pods, never those
//! of pods elsewhere. Both files are re-read when they change; a bad new version is logged and
//! the last good one stays in force.
//!
//! Kubernetes mode (`--kube`) replaces both files by the API server: ServiceAccount tokens
//! reviewed with a `TokenReview`, and placement read from the pods (see [`super::kube`]).
//!
//! **The identity asked for.** Ambient agents (ztunnel, Ambit's) name it in the request's
//! `ImpersonatedIdentity` metadata; the CSR may then ask for no subject alternative name or for
//! exactly that identity, and a CSR asking for anything else is refused (Istio's CA ignores the
//! CSR's names; refusing a disagreement reports a confused client rather than hiding it).
//! Istio's sidecars and ztunnel in dedicated mode send no metadata: the identity is then the
//! CSR's subject alternative name, which must be exactly one SPIFFE URI. Either way it is
//! authorised the same way, by placement on the caller's node. (Istio's CA signs, without
//! metadata, the caller's own identity from its credential; Ambit's callers authenticate as
//! nodes, so the CSR says which of the node's identities is meant.)
//!
//! Refusals are gRPC errors (`Unauthenticated` for a missing or unknown token,
//! `PermissionDenied` naming node and identity for a placement mismatch, `InvalidArgument` for
//! a bad CSR or identity, `Unavailable` while Kubernetes mode cannot check yet,
//! `ResourceExhausted` for a client past its rate of token reviews) and are logged, at warning
//! level once per client address and minute with a count of those not logged since (see
//! [`super::guard`]); tokens and keys never are.
use std::{
    collections::BTreeMap,
    fmt, io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use serde::Deserialize;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tonic::{
    Request, Response, Status,
    codegen::tokio_stream::wrappers::ReceiverStream,
    metadata::MetadataMap,
    transport::server::{Connected, TcpConnectInfo},
};
use tracing::{debug, info, warn};

use super::{
    Principal, RootCa,
    guard::{RefusalLog, peer_key},
    kube::{KubeAuthError, KubeAuthOptions, KubeAuthority},
    metrics::{CaMetrics, CallerKind},
    sign::{Csr, RequestedName, SignError, cut, shown},
};
use crate::{
    discovery::{self, ConfigStatus},
    identity::{
        SpiffeId, SpiffeIdError,
        ca_api::{
            IMPERSONATED_IDENTITY, IstioCertificateRequest, IstioCertificateResponse,
            IstioCertificateService, IstioCertificateServiceServer, impersonated_identity,
        },
        pem,
    },
    limits::{LimitSettings, Limits, Path as LimitPath, http},
    state::MeshState,
    telemetry::Metrics,
};

/// Lifetime of the CA's own TLS certificate; it is re-issued (in memory) at half-life.
const SERVING_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the tokens file is checked for changes.
const TOKENS_POLL: Duration = Duration::from_secs(2);
/// Longest refusal message logged, in characters.
const LOGGED_MESSAGE_MAX: usize = 1000;
/// Shortest accepted token: a bootstrap credential must not be guessable.
const MIN_TOKEN_LEN: usize = 16;

/// How the CA authenticates agents and learns where workloads run.
#[derive(Debug, Clone)]
pub enum AuthMode {
    /// Standalone: per-node bootstrap tokens, and the mesh file's placement.
    Files {
        /// The mesh file, for workload placement.
        mesh_file: PathBuf,
        /// The per-node tokens file.
        tokens_file: PathBuf,
    },
    /// Kubernetes: ServiceAccount tokens reviewed by the API server, and the pods it lists
    /// (boxed: far larger than the other variant).
    Kube(Box<KubeAuthOptions>),
}

/// What `ambit ca serve` serves.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The CA directory (see [`super::root`]).
    pub dir: PathBuf,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Authentication and placement.
    pub auth: AuthMode,
    /// Longest leaf lifetime granted.
    pub max_ttl: Duration,
    /// Names (DNS or IP) of the CA's serving certificate.
    pub server_names: Vec<String>,
    /// The trust domain to sign for: required by a directory of Istio's plug-in files (which
    /// say none), and checked against `ca.yaml` in one of `ambit ca init`'s.
    pub trust_domain: Option<String>,
    /// Where to serve `GET /ready` and `GET /metrics` (plain HTTP); `None`: not served.
    pub monitoring: Option<SocketAddr>,
}

/// Why a tokens file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// The file could not be read.
    #[error("tokens file {}: cannot read: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        error: io::Error,
    },
    /// The file's content is not valid.
    #[error("tokens file {}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong (never quoting a token).
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    nodes: BTreeMap<String, String>,
}

/// The per-node bootstrap tokens: which node a bearer token authenticates.
#[derive(Clone, Default)]
pub struct NodeTokens {
    nodes: Vec<(String, String)>,
}

impl fmt::Debug for NodeTokens {
    // Node names only: tokens are secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeTokens")
            .field(
                "nodes",
                &self.nodes.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl NodeTokens {
    /// Parses a tokens file's content (`nodes: {<node>: <token>}`); `path` names it in errors.
    /// Tokens must be at least 16 characters and distinct.
    pub fn parse(path: &Path, content: &str) -> Result<Self, TokensError> {
        let invalid = |reason: String| TokensError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        // serde_yaml_ng's messages may quote the offending value: report only where it is.
        let file: TokensFile = serde_yaml_ng::from_str(content).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!(" at line {}, column {}", l.line(), l.column()))
                .unwrap_or_default();
            invalid(format!("not of the form `nodes: {{<node>: <token>}}`{at}"))
        })?;
        let mut nodes: Vec<(String, String)> = Vec::with_capacity(file.nodes.len());
        for (node, token) in file.nodes {
            let token = token.trim().to_string();
            if node.is_empty() {
                return Err(invalid("a node name is empty".into()));
            }
            if token.len() < MIN_TOKEN_LEN {
                return Err(invalid(format!(
                    "nodes.{node}: the token is shorter than {MIN_TOKEN_LEN} characters"
                )));
            }
            if let Some((other, _)) = nodes.iter().find(|(_, t)| *t == token) {
                return Err(invalid(format!("nodes {other} and {node} share a token")));
            }
            nodes.push((node, token));
        }
        Ok(Self { nodes })
    }

    /// Reads and parses the tokens file at `path`.
    pub fn load(path: &Path) -> Result<Self, TokensError> {
        let content = std::fs::read_to_string(path).map_err(|error| TokensError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::parse(path, &content)
    }

    /// The node `token` authenticates. Every token is compared in full, in constant time per
    /// byte, so that timing does not reveal how much of a guess was right.
    pub fn node_for(&self, token: &str) -> Option<&str> {
        let mut found = None;
        for (node, expected) in &self.nodes {
            if constant_time_eq(expected.as_bytes(), token.as_bytes()) {
                found = Some(node.as_str());
            }
        }
        found
    }

    /// How many nodes have a token.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no node has a token.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Who may get which certificate.
enum Policy {
    /// Standalone: the tokens file and the mesh file, as last loaded.
    Files {
        mesh: watch::Receiver<Arc<MeshState>>,
        tokens: watch::Receiver<Arc<NodeTokens>>,
    },
    /// Kubernetes: TokenReview and the pod cache (boxed: far larger than the other variant).
    Kube(Box<KubeAuthority>),
}

/// The signing policy: authentication, placement, then the root's signature.
struct Authority {
    ca: Arc<RootCa>,
    policy: Policy,
    refusals: RefusalLog,
    metrics: Arc<CaMetrics>,
    /// Whether the gRPC service is accepting (from `run_until`'s start to its shutdown).
    serving: AtomicBool,
}

/// A refused request: the status sent back, and the reason counted
/// (`ambit_ca_certificates_refused_total{reason}`, one of
/// [`super::metrics::REFUSAL_REASONS`]).
struct Refusal {
    status: Status,
    reason: &'static str,
}

impl Refusal {
    fn new(reason: &'static str, status: Status) -> Self {
        Self { status, reason }
    }

    /// A request whose credential is missing or unknown.
    fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new("unauthenticated", Status::unauthenticated(message))
    }

    /// A request that is malformed (CSR, identity).
    fn invalid(message: impl Into<String>) -> Self {
        Self::new("invalid_request", Status::invalid_argument(message))
    }
}

impl From<KubeAuthError> for Refusal {
    fn from(e: KubeAuthError) -> Self {
        Self::new(e.reason(), e.into())
    }
}

impl From<SignError> for Refusal {
    fn from(e: SignError) -> Self {
        match e {
            SignError::MalformedCsr(_)
            | SignError::BadCsrSignature
            | SignError::UnsupportedKey(_) => Self::invalid(e.to_string()),
            SignError::ForeignTrustDomain { .. } => Self::new(
                "foreign_trust_domain",
                Status::permission_denied(e.to_string()),
            ),
            SignError::RootExpired | SignError::Signing(_) => {
                Self::new("signing_failed", Status::internal(e.to_string()))
            }
        }
    }
}

/// The bearer token of `metadata`'s `authorization` entry; `what` names the token expected, for
/// the refusal.
fn bearer_token<'m>(metadata: &'m MetadataMap, what: &str) -> Result<&'m str, Refusal> {
    let value = metadata.get("authorization").ok_or_else(|| {
        Refusal::unauthenticated(format!(
            "missing credential: send metadata `authorization: Bearer <{what}>`"
        ))
    })?;
    let value = value
        .to_str()
        .map_err(|_| Refusal::unauthenticated("the authorization metadata is not ASCII"))?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(token.trim()),
        _ => Err(Refusal::unauthenticated(format!(
            "the authorization metadata is not `Bearer <{what}>`"
        ))),
    }
}

impl Authority {
    /// `Ok` when a request made now could be signed: the service accepts, the signing chain is
    /// valid, and (Kubernetes mode) the pods are listed; else what is missing. `GET /ready`.
    fn readiness(&self) -> Result<(), String> {
        if !self.serving.load(Ordering::SeqCst) {
            return Err("the signing service is not accepting connections".into());
        }
        if self.ca.not_after() <= SystemTime::now() {
            return Err(format!(
                "the signing chain expired at {}",
                crate::timefmt::rfc3339(self.ca.not_after())
            ));
        }
        if let Policy::Kube(kube) = &self.policy {
            kube.ready().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Who the caller at `peer` is.
    async fn authenticate(
        &self,
        metadata: &MetadataMap,
        peer: IpAddr,
    ) -> Result<Principal, Refusal> {
        match &self.policy {
            Policy::Files { tokens, .. } => {
                let token = bearer_token(metadata, "node token")?;
                let tokens = Arc::clone(&tokens.borrow());
                tokens
                    .node_for(token)
                    .map(|node| Principal::Node(node.to_string()))
                    .ok_or_else(|| Refusal::unauthenticated("unknown bootstrap token"))
            }
            Policy::Kube(kube) => {
                // Nothing can be checked before the pods are listed: say so before spending a
                // TokenReview.
                kube.ready()?;
                let token = bearer_token(metadata, "projected ServiceAccount token")?;
                Ok(kube.authenticate(token, peer).await?)
            }
        }
    }

    fn authorize(&self, principal: &Principal, identity: &SpiffeId) -> Result<(), Refusal> {
        if identity.trust_domain != self.ca.trust_domain() {
            return Err(Refusal::new(
                "foreign_trust_domain",
                Status::permission_denied(format!(
                    "{principal} may not get a certificate for {identity}: this CA signs only \
                     trust domain {}",
                    self.ca.trust_domain()
                )),
            ));
        }
        match &self.policy {
            Policy::Files { mesh, .. } => {
                let Principal::Node(node) = principal else {
                    unreachable!("standalone mode authenticates nodes only")
                };
                let mesh = Arc::clone(&mesh.borrow());
                let placed = mesh.workloads_on_node(node).any(|w| {
                    w.namespace == identity.namespace
                        && w.service_account == identity.service_account
                });
                if !placed {
                    return Err(Refusal::new(
                        "not_placed",
                        Status::permission_denied(format!(
                            "node {node} may not get a certificate for {identity}: the mesh \
                             file places no workload of namespace {} with service account {} on \
                             node {node}",
                            identity.namespace, identity.service_account
                        )),
                    ));
                }
                Ok(())
            }
            Policy::Kube(kube) => Ok(kube.authorize(principal, identity)?),
        }
    }

    async fn handle(
        &self,
        request: Request<IstioCertificateRequest>,
        peer: IpAddr,
        principal: &mut Option<Principal>,
        identity: &mut Option<SpiffeId>,
    ) -> Result<Vec<String>, Refusal> {
        let caller = self.authenticate(request.metadata(), peer).await?;
        let caller = principal.insert(caller);
        let request = request.into_inner();
        let csr = Csr::parse(&request.csr)?;
        let id = identity_asked(&request, &csr)
            .map_err(|status| Refusal::new("invalid_request", status))?;
        *identity = Some(id.clone());
        self.authorize(caller, &id)?;
        let ttl = Duration::from_secs(u64::try_from(request.validity_duration).unwrap_or(0));
        Ok(self.ca.sign_csr(&csr, &id, ttl)?)
    }
}

/// The identity a request asks for: its `ImpersonatedIdentity` metadata, with which the CSR's
/// subject alternative names, if any, must agree; without it, the CSR's one SPIFFE URI.
fn identity_asked(request: &IstioCertificateRequest, csr: &Csr) -> Result<SpiffeId, Status> {
    let names = csr.names();
    let listed = || {
        names
            .iter()
            .take(4)
            .map(ToString::to_string)
            .chain((names.len() > 4).then(|| format!("and {} more", names.len() - 4)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(asked) = impersonated_identity(request).map_err(Status::invalid_argument)? {
        let id: SpiffeId = asked.parse().map_err(|e: SpiffeIdError| {
            Status::invalid_argument(format!(
                "metadata {IMPERSONATED_IDENTITY} {} is not a SPIFFE ID of a workload: {}",
                shown(asked),
                e.reason
            ))
        })?;
        let agrees = match names {
            [] => true,
            [RequestedName::Uri(uri)] => uri.parse::<SpiffeId>().is_ok_and(|san| san == id),
            _ => false,
        };
        if !agrees {
            return Err(Status::invalid_argument(format!(
                "the CSR asks for {} but metadata {IMPERSONATED_IDENTITY} is {id}: the CSR may \
                 name no subject alternative name or exactly that identity",
                listed()
            )));
        }
        return Ok(id);
    }
    match names {
        [] => Err(Status::invalid_argument(format!(
            "no metadata {IMPERSONATED_IDENTITY} and the CSR has no subject alternative name: \
             send the SPIFFE ID to certify in either"
        ))),
        [name @ RequestedName::Uri(uri)] => uri.parse().map_err(|e: SpiffeIdError| {
            Status::invalid_argument(format!(
                "no metadata {IMPERSONATED_IDENTITY}, and the CSR's subject alternative name \
                 {name} is not a SPIFFE ID of a workload: {}",
                e.reason
            ))
        }),
        [other] => Err(Status::invalid_argument(format!(
            "no metadata {IMPERSONATED_IDENTITY}, and the CSR's subject alternative name {other} \
             is not a SPIFFE URI"
        ))),
        _ => Err(Status::invalid_argument(format!(
            "no metadata {IMPERSONATED_IDENTITY}, and the CSR has {} subject alternative names \
             ({}): without the metadata it must have exactly one, the SPIFFE ID to certify",
            names.len(),
            listed()
        ))),
    }
}

#[tonic::async_trait]
impl IstioCertificateService for Authority {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let remote = request.remote_addr();
        let peer = remote.map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let peer_ip = peer_key(remote.map(|a| a.ip()));
        let (mut principal, mut identity) = (None, None);
        let result = self
            .handle(request, peer_ip, &mut principal, &mut identity)
            .await;
        let caller = principal
            .as_ref()
            .map_or_else(|| "(unauthenticated)".to_string(), ToString::to_string);
        // Both may hold a client's text: cut, so that no request makes a line of megabytes.
        let identity =
            identity.map_or_else(|| "(none)".to_string(), |i| shown(&i.to_string()).into());
        match result {
            Ok(chain) => {
                self.metrics.signed(match principal {
                    Some(Principal::Workload { .. }) => CallerKind::Workload,
                    _ => CallerKind::Node,
                });
                info!(%peer, %caller, %identity, "certificate signed");
                Ok(Response::new(IstioCertificateResponse {
                    cert_chain: chain,
                }))
            }
            Err(Refusal { status, reason }) => {
                self.metrics.refused(reason);
                // A hostile client must not flood the log: one line per address and interval,
                // counting the refusals not logged since its previous one.
                let message = cut(status.message(), LOGGED_MESSAGE_MAX);
                match self.refusals.admit(peer_ip) {
                    Some(suppressed) => warn!(
                        %peer, %caller, %identity, code = ?status.code(), reason, suppressed,
                        "certificate refused: {message}"
                    ),
                    None => debug!(
                        %peer, %caller, %identity, code = ?status.code(), reason,
                        "certificate refused: {message}"
                    ),
                }
                Err(status)
            }
        }
    }
}

/// The CA's TLS serving certificate, re-issued in memory at half-life, so that a CA running for
/// months never serves an expired certificate.
struct ServingCert {
    ca: Arc<RootCa>,
    names: Vec<String>,
    provider: Arc<CryptoProvider>,
    current: Mutex<(Arc<CertifiedKey>, SystemTime)>,
}

impl fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCert")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl ServingCert {
    fn new(
        ca: Arc<RootCa>,
        names: Vec<String>,
        provider: Arc<CryptoProvider>,
    ) -> anyhow::Result<Self> {
        let issued = Self::issue(&ca, &names, &provider)?;
        Ok(Self {
            ca,
            names,
            provider,
            current: Mutex::new(issued),
        })
    }

    /// A new certificate and the time to replace it.
    fn issue(
        ca: &RootCa,
        names: &[String],
        provider: &CryptoProvider,
    ) -> anyhow::Result<(Arc<CertifiedKey>, SystemTime)> {
        let (chain, key) = ca
            .issue_server_certificate(names, SERVING_CERT_TTL)
            .context("cannot issue the CA's serving certificate (check --server-name)")?;
        // The leaf and any intermediates (a plug-in CA's): clients hold the root.
        let presented = chain
            .iter()
            .take(chain.len().saturating_sub(1).max(1))
            .map(|text| pem::parse_certificate(text.as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .context("the serving certificate is not PEM")?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let certified = CertifiedKey::from_der(presented, key, provider)
            .context("cannot load the serving key")?;
        Ok((
            Arc::new(certified),
            SystemTime::now() + SERVING_CERT_TTL / 2,
        ))
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if SystemTime::now() >= current.1 {
            match Self::issue(&self.ca, &self.names, &self.provider) {
                Ok(issued) => *current = issued,
                // The old certificate is still valid for another half-life.
                Err(e) => warn!("cannot renew the CA's serving certificate: {e:#}"),
            }
        }
        Some(Arc::clone(&current.0))
    }
}

/// An accepted TLS connection, with the addresses tonic hands to handlers.
struct TlsConn {
    stream: TlsStream<TcpStream>,
    info: TcpConnectInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Aborts a background task when dropped, so that no watcher outlives the server.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A started CA: root loaded, files watched, socket bound; [`Self::run_until`] serves.
pub struct CaServer {
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    authority: Arc<Authority>,
    /// The monitoring endpoint's listener (`--monitoring-addr`), if any.
    monitoring: Option<TcpListener>,
    registry: Arc<Metrics>,
    _watchers: Vec<AbortOnDrop>,
}

impl fmt::Debug for CaServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaServer")
            .field("listen", &self.listener.local_addr().ok())
            .field("ca", &self.authority.ca)
            .finish_non_exhaustive()
    }
}

impl CaServer {
    /// Loads the CA of `options.dir`; in standalone mode loads the tokens and the mesh file
    /// (each must load: the CA does not start on a configuration it cannot read) and starts
    /// watching both; in Kubernetes mode starts the pod watch (requests are answered
    /// `UNAVAILABLE` until it has listed); binds the listening socket.
    pub async fn start(options: ServeOptions) -> anyhow::Result<Self> {
        let dir = options.dir.clone();
        let trust_domain = options.trust_domain.clone();
        let ca =
            tokio::task::spawn_blocking(move || RootCa::load_dir(&dir, trust_domain.as_deref()))
                .await
                .context("CA load task failed")??
                .with_max_ttl(options.max_ttl);
        let ca = Arc::new(ca);
        let registry = Arc::new(Metrics::new());
        let metrics = Arc::new(CaMetrics::new(&registry).context("registering the CA's metrics")?);
        metrics.set_expiries(ca.not_after(), ca.root_not_after());

        let (policy, watchers) = match &options.auth {
            AuthMode::Files {
                mesh_file,
                tokens_file,
            } => files_policy(mesh_file, tokens_file).await?,
            AuthMode::Kube(kube) => {
                let (authority, pods_task) =
                    KubeAuthority::start((**kube).clone(), Arc::clone(&metrics));
                info!(
                    audience = %kube.audience,
                    agent_service_account = %kube.agent_service_account,
                    "authenticating callers by TokenReview: agents for their node's pods, other \
                     service accounts for their own identity"
                );
                (
                    Policy::Kube(Box::new(authority)),
                    vec![AbortOnDrop(pods_task)],
                )
            }
        };

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let resolver = ServingCert::new(
            Arc::clone(&ca),
            options.server_names.clone(),
            Arc::clone(&provider),
        )?;
        let mut tls = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
        tls.alpn_protocols = vec![b"h2".to_vec()];

        let listener = TcpListener::bind(options.listen)
            .await
            .with_context(|| format!("cannot listen on {}", options.listen))?;
        let monitoring = match options.monitoring {
            Some(addr) => Some(
                http::bind(addr)
                    .await
                    .context("the monitoring endpoint (--monitoring-addr)")?,
            ),
            None => None,
        };
        info!(
            listen = %listener.local_addr()?,
            monitoring = ?monitoring.as_ref().and_then(|l| l.local_addr().ok()),
            trust_domain = ca.trust_domain(),
            max_ttl = ?ca.max_ttl(),
            signs_until = %crate::timefmt::rfc3339(ca.not_after()),
            server_names = ?options.server_names,
            "CA serving"
        );
        Ok(Self {
            listener,
            tls: Arc::new(tls),
            authority: Arc::new(Authority {
                ca,
                policy,
                refusals: RefusalLog::default(),
                metrics,
                serving: AtomicBool::new(false),
            }),
            monitoring,
            registry,
            _watchers: watchers,
        })
    }

    /// The trust bundle (PEM) of the CA: what agents and waypoints must trust.
    pub fn trust_bundle_pem(&self) -> &str {
        self.authority.ca.trust_bundle_pem()
    }

    /// The monitoring endpoint's address, if it serves one (useful with port 0).
    pub fn monitoring_addr(&self) -> Option<SocketAddr> {
        self.monitoring.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The address the CA listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` completes, then stops accepting, lets calls in flight finish and
    /// closes every connection.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let monitoring = self.monitoring.map(|listener| {
            let (authority, registry) = (Arc::clone(&self.authority), self.registry);
            // Its own small budget: kubelet's probes and Prometheus, nothing else.
            let descriptors = crate::limits::nofile_limit().map_or(1024, |n| n.soft);
            let limits = Arc::new(Limits::new(LimitSettings::for_descriptors(descriptors)));
            AbortOnDrop(tokio::spawn(async move {
                let served = http::serve(listener, LimitPath::Metrics, limits, move |req| {
                    monitoring_route(&authority, &registry, req)
                })
                .await;
                if let Err(e) = served {
                    warn!("the monitoring endpoint stopped: {e:#}");
                }
            }))
        });
        let (conn_tx, conn_rx) = mpsc::channel::<Result<TlsConn, io::Error>>(16);
        let authority = Arc::clone(&self.authority);
        let shutdown = async move {
            shutdown.await;
            // Out of the Service's endpoints at once: no new caller should pick this replica.
            authority.serving.store(false, Ordering::SeqCst);
        };
        self.authority.serving.store(true, Ordering::SeqCst);
        let accept = AbortOnDrop(tokio::spawn(accept_loop(
            self.listener,
            TlsAcceptor::from(self.tls),
            conn_tx,
        )));
        let result = tonic::transport::Server::builder()
            .serve_with_incoming_shutdown(
                IstioCertificateServiceServer::from_arc(self.authority),
                ReceiverStream::new(conn_rx),
                shutdown,
            )
            .await
            .context("CA server failed");
        drop(accept);
        drop(monitoring);
        result
    }
}

/// The monitoring endpoint: `GET /ready` (200 `ready` once a request made now could be signed,
/// else 503 and why: kubelet's readiness probe) and `GET /metrics`.
fn monitoring_route(
    authority: &Authority,
    registry: &Metrics,
    req: &hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<http_body_util::Full<hyper::body::Bytes>> {
    if req.method() == hyper::Method::GET && req.uri().path() == "/ready" {
        return match authority.readiness() {
            Ok(()) => http::text(hyper::StatusCode::OK, "ready\n"),
            Err(why) => http::text(
                hyper::StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        };
    }
    http::metrics_route(registry, req)
        .unwrap_or_else(|| http::text(hyper::StatusCode::NOT_FOUND, "not found\n"))
}

/// Standalone mode's policy: loads both files (each must load: the CA does not start on a
/// configuration it cannot read) and starts watching them.
async fn files_policy(
    mesh_file: &Path,
    tokens_file: &Path,
) -> anyhow::Result<(Policy, Vec<AbortOnDrop>)> {
    let tokens = NodeTokens::load(tokens_file)?;
    if tokens.is_empty() {
        warn!(path = %tokens_file.display(), "the tokens file names no node: every request will be refused");
    }
    let (tokens_tx, tokens_rx) = watch::channel(Arc::new(tokens));
    let tokens_task = AbortOnDrop(tokio::spawn(watch_tokens(
        tokens_file.to_path_buf(),
        tokens_tx,
    )));

    let (state_tx, mut state_rx) = watch::channel(Arc::new(MeshState::empty()));
    let (status_tx, _) = watch::channel(ConfigStatus {
        generation: 0,
        source: mesh_file.display().to_string(),
        ..ConfigStatus::default()
    });
    let mut source = tokio::spawn(discovery::watch_mesh_file(
        mesh_file.to_path_buf(),
        state_tx,
        status_tx,
    ));
    tokio::select! {
        result = &mut source => {
            return Err(match result {
                Ok(Ok(())) => anyhow::anyhow!("the mesh file watcher ended before loading"),
                Ok(Err(e)) => e,
                Err(e) => anyhow::Error::from(e).context("mesh file watcher failed"),
            });
        }
        changed = state_rx.changed() => changed.context("mesh file watcher ended")?,
    }
    let mesh_task = tokio::spawn(async move {
        match source.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!("mesh file watcher stopped: {e:#}"),
            Err(e) if e.is_cancelled() => {}
            Err(e) => warn!("mesh file watcher failed: {e}"),
        }
    });
    // Dropping `mesh_task` must stop the watcher too: abort it through its own guard.
    let mesh_task = AbortOnDrop(mesh_task);
    Ok((
        Policy::Files {
            mesh: state_rx,
            tokens: tokens_rx,
        },
        vec![tokens_task, mesh_task],
    ))
}

/// Accepts TCP connections and hands them over once their TLS handshake is done; each
/// handshake runs in its own task so that a slow client delays nobody else.
async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    conns: mpsc::Sender<Result<TlsConn, io::Error>>,
) {
    let accepting = crate::limits::accept_loop(
        &listener,
        "CA",
        |_| {},
        |tcp, peer| {
            let info = TcpConnectInfo {
                local_addr: tcp.local_addr().ok(),
                remote_addr: Some(peer),
            };
            let acceptor = acceptor.clone();
            let conns = conns.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = conns.send(Ok(TlsConn { stream, info })).await;
                    }
                    Ok(Err(e)) => debug!(%peer, "CA TLS handshake failed: {e}"),
                    Err(_) => debug!(%peer, "CA TLS handshake timed out"),
                }
            });
        },
    );
    tokio::select! {
        _ = conns.closed() => {}
        _ = accepting => {}
    }
}

/// Re-reads the tokens file when its content changes; a bad version is logged and ignored.
async fn watch_tokens(path: PathBuf, tokens: watch::Sender<Arc<NodeTokens>>) {
    let mut last = tokio::fs::read(&path).await.ok();
    let mut poll = tokio::time::interval(TOKENS_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        poll.tick().await;
        let content = match tokio::fs::read(&path).await {
            Ok(content) => content,
            Err(error) => {
                if last.is_some() {
                    warn!(
                        "{}; keeping the last good tokens",
                        TokensError::Read {
                            path: path.clone(),
                            error
                        }
                    );
                    last = None;
                }
                continue;
            }
        };
        if last.as_ref() == Some(&content) {
            continue;
        }
        last = Some(content.clone());
        match std::str::from_utf8(&content)
            .map_err(|_| TokensError::Invalid {
                path: path.clone(),
                reason: "not UTF-8".into(),
            })
            .and_then(|text| NodeTokens::parse(&path, text))
        {
            Ok(new) => {
                info!(path = %path.display(), nodes = new.len(), "tokens file reloaded");
                tokens.send_replace(Arc::new(new));
            }
            Err(e) => warn!("{e}; keeping the last good tokens"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_and_authenticate_nodes() {
        let path = Path::new("tokens.yaml");
        let tokens = NodeTokens::parse(
            path,
            "nodes:\n  node-a: aaaaaaaaaaaaaaaaaaaa\n  node-b: bbbbbbbbbbbbbbbbbbbb\n",
        )
        .unwrap();
        assert_eq!(tokens.node_for("aaaaaaaaaaaaaaaaaaaa"), Some("node-a"));
        assert_eq!(tokens.node_for("bbbbbbbbbbbbbbbbbbbb"), Some("node-b"));
        assert_eq!(tokens.node_for("aaaaaaaaaaaaaaaaaaab"), None);
        assert_eq!(tokens.node_for(""), None);
        assert!(!format!("{tokens:?}").contains("aaaa"));
    }

    #[test]
    fn bad_tokens_files_are_refused_without_quoting_tokens() {
        let path = Path::new("tokens.yaml");
        for (content, expected) in [
            ("nodes:\n  node-a: short\n", "shorter than"),
            (
                "nodes:\n  node-a: samesamesamesamesame\n  node-b: samesamesamesamesame\n",
                "share a token",
            ),
            ("nodes: [secretsecretsecretsecret]\n", "not of the form"),
            ("other: 1\n", "not of the form"),
        ] {
            let err = NodeTokens::parse(path, content).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
            assert!(!err.contains("secret") && !err.contains("same"), "{err}");
        }
    }
}
