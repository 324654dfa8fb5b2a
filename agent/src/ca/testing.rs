//! A real CA on loopback for tests: root, mesh file and tokens in a temporary directory, TLS
//! gRPC on 127.0.0.1, stoppable and restartable on the same port.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{CertificateParams, KeyPair, SanType};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{Request, Status};
use x509_parser::{
    extensions::GeneralName,
    prelude::{FromDer as _, X509Certificate},
};

use super::{AuthMode, CaServer, KubeAuthOptions, ServeOptions, root};
use crate::identity::{
    BearerToken, CaClient, CaClientConfig, SpiffeId,
    ca_api::{self, IstioCertificateRequest, IstioCertificateServiceClient},
    pem,
};

/// node-a's token.
pub(crate) const TOKEN_A: &str = "token-of-node-a-0123456789";
/// node-b's token.
pub(crate) const TOKEN_B: &str = "token-of-node-b-0123456789";
/// The trust domain of test CAs.
pub(crate) const TRUST_DOMAIN: &str = "cluster.local";

/// shop/web and shop/db on node-a, pay/pay on node-b.
pub(crate) const MESH: &str = "\
workloads:
  - name: web-0
    namespace: shop
    serviceAccount: web
    node: node-a
    ips: [\"10.10.0.2\"]
    netns: {pid: 4242}
  - name: db-0
    namespace: shop
    serviceAccount: db
    node: node-a
    ips: [\"10.10.0.3\"]
    netns: {pid: 4242}
  - name: pay-0
    namespace: pay
    serviceAccount: pay
    node: node-b
    ips: [\"10.10.0.4\"]
    netns: {pid: 4242}
";

/// `spiffe://cluster.local/ns/<ns>/sa/<sa>`.
pub(crate) fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TRUST_DOMAIN, ns, sa)
}

/// A PEM CSR of a new P-256 key asking for `sans` (URIs as `SanType::URI`).
pub(crate) fn csr_with(sans: Vec<SanType>) -> String {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.serialize_request(&key).unwrap().pem().unwrap()
}

/// A URI SAN.
pub(crate) fn uri(uri: &str) -> SanType {
    SanType::URI(uri.try_into().unwrap())
}

/// Sends `CreateCertificate` for `csr` with `token` over `client`'s connection, the
/// `ImpersonatedIdentity` metadata set to `impersonated` or, when `None`, absent (as Istio's
/// sidecars and ztunnel in dedicated mode send it): the raw gRPC answer.
pub(crate) async fn create_certificate(
    client: &CaClient,
    token: &str,
    csr: String,
    impersonated: Option<&str>,
) -> Result<Vec<String>, Status> {
    let mut request = Request::new(IstioCertificateRequest {
        csr,
        validity_duration: 600,
        metadata: impersonated.map(ca_api::impersonation_metadata),
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    IstioCertificateServiceClient::new(client.channel_for_tests())
        .create_certificate(request)
        .await
        .map(|response| response.into_inner().cert_chain)
}

/// The subject alternative names of the leaf (first) of a PEM chain, URIs as themselves.
pub(crate) fn leaf_sans(chain: &[String]) -> Vec<String> {
    let der = pem::parse_certificate(chain[0].as_bytes()).unwrap();
    let (_, leaf) = X509Certificate::from_der(&der).unwrap();
    leaf.subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .map(|name| match name {
                    GeneralName::URI(uri) => uri.to_string(),
                    other => other.to_string(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A running (or stopped) test CA.
pub(crate) struct TestCa {
    /// Holds every file; removed on drop.
    _dir: tempfile::TempDir,
    /// Where it listens (kept across restarts).
    pub(crate) addr: SocketAddr,
    options: ServeOptions,
    running: Option<(oneshot::Sender<()>, JoinHandle<anyhow::Result<()>>)>,
}

impl TestCa {
    /// A new root (trusting also the roots of `also_trust`), started with [`MESH`], tokens for
    /// node-a and node-b, and leaves of at most an hour.
    pub(crate) async fn start_trusting(also_trust: Vec<PathBuf>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let mut init = root::InitOptions::new(TRUST_DOMAIN);
        init.also_trust = also_trust;
        root::init_with(&ca_dir, &init).unwrap();
        std::fs::write(dir.path().join("mesh.yaml"), MESH).unwrap();
        std::fs::write(
            dir.path().join("tokens.yaml"),
            format!("nodes:\n  node-a: {TOKEN_A}\n  node-b: {TOKEN_B}\n"),
        )
        .unwrap();
        let auth = AuthMode::Files {
            mesh_file: dir.path().join("mesh.yaml"),
            tokens_file: dir.path().join("tokens.yaml"),
        };
        Self::start_with(dir, auth).await
    }

    /// A CA in Kubernetes mode with a new root, authenticating and placing through `kube`.
    pub(crate) async fn start_kube(kube: KubeAuthOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        root::init_with(
            &dir.path().join("ca"),
            &root::InitOptions::new(TRUST_DOMAIN),
        )
        .unwrap();
        Self::start_with(dir, AuthMode::Kube(Box::new(kube))).await
    }

    /// Serves the root in `dir/ca` with `auth`.
    async fn start_with(dir: tempfile::TempDir, auth: AuthMode) -> Self {
        let options = ServeOptions {
            dir: dir.path().join("ca"),
            listen: "127.0.0.1:0".parse().unwrap(),
            auth,
            max_ttl: Duration::from_secs(3600),
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
        };
        let mut ca = Self {
            _dir: dir,
            addr: options.listen,
            options,
            running: None,
        };
        ca.resume().await;
        ca
    }

    /// See [`Self::start_trusting`].
    pub(crate) async fn start() -> Self {
        Self::start_trusting(Vec::new()).await
    }

    /// The CA's trust bundle.
    pub(crate) fn roots_file(&self) -> PathBuf {
        self.options.dir.join(root::TRUST_BUNDLE_FILE)
    }

    /// The mesh file the CA watches (standalone mode).
    pub(crate) fn mesh_file(&self) -> &Path {
        match &self.options.auth {
            AuthMode::Files { mesh_file, .. } => mesh_file,
            AuthMode::Kube(_) => panic!("a CA in Kubernetes mode has no mesh file"),
        }
    }

    /// A client configuration for this CA with `token`, trusting `roots_file`.
    pub(crate) fn client_config_with(&self, token: &str, roots_file: PathBuf) -> CaClientConfig {
        CaClientConfig {
            address: format!("https://{}", self.addr),
            server_name: None,
            roots_file,
            token: BearerToken::new(token),
            timeout: Duration::from_secs(5),
        }
    }

    /// A client configuration for this CA with `token`, trusting the CA's bundle.
    pub(crate) fn client_config(&self, token: &str) -> CaClientConfig {
        self.client_config_with(token, self.roots_file())
    }

    /// Stops serving: the port is closed until [`Self::resume`].
    pub(crate) async fn stop(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            let _ = stop.send(());
            task.await.unwrap().unwrap();
        }
    }

    /// Serves again, on the same address.
    pub(crate) async fn resume(&mut self) {
        assert!(self.running.is_none());
        let mut options = self.options.clone();
        options.listen = self.addr;
        // The previous listener closes asynchronously (its task is aborted): retry briefly.
        let mut attempts = 0;
        let server = loop {
            match CaServer::start(options.clone()).await {
                Ok(server) => break server,
                Err(e) if attempts < 50 => {
                    attempts += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot restart the CA: {e:#}"),
            }
        };
        self.addr = server.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run_until(async move {
            let _ = stopped.await;
        }));
        self.running = Some((stop, task));
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        if let Some((stop, _)) = self.running.take() {
            let _ = stop.send(());
        }
    }
}
