//! Certificate authorities for tests, one type of each:
//!
//! - [`TestCa`]: a CA held in memory (a root, an intermediate under one, or a root loaded from
//!   `ambit ca init`'s files) that issues workload certificates on the spot. Its roots are made
//!   by `ca::root`'s generator and its leaves by `ca::sign::workload_leaf`, the recipe the real
//!   CA signs with, so a test certificate differs from a mesh certificate only in who holds the
//!   key.
//! - [`TestCaServer`]: the real `ambit ca serve` (`ca::CaServer`) on loopback, its root and mesh
//!   file and tokens in a temporary directory, stoppable and restartable on the same port; its
//!   root is a [`TestCa`] too ([`TestCaServer::ca`]).
//!
//! And the helpers tests of the CA API share: tokens, a mesh file, CSRs, raw `CreateCertificate`
//! calls, the SANs of a returned leaf.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{Request, Status};
use x509_parser::{
    extensions::GeneralName,
    prelude::{FromDer as _, X509Certificate},
};

use crate::{
    ca::{
        AuthMode, CaServer, DEFAULT_MAX_TTL, KubeAuthOptions, ServeOptions,
        root::{self, DEFAULT_ROOT_TTL},
        sign::workload_leaf,
    },
    identity::{
        BearerToken, CaClient, CaClientConfig, SpiffeId, WorkloadCertificate,
        ca_api::{self, IstioCertificateRequest, IstioCertificateServiceClient},
        pem,
    },
};

/// A certificate authority held in memory: a root, or an intermediate under one. Not for
/// production use: the key lives in memory and is never protected.
pub struct TestCa {
    key: KeyPair,
    /// This CA's own certificate, the issuer of its leaves.
    cert_pem: String,
    /// This CA's certificate and the intermediates above it, excluding the root: what a
    /// leaf's chain carries after the leaf.
    intermediates: Vec<CertificateDer<'static>>,
    root: CertificateDer<'static>,
}

/// How long the leaves of a [`TestCa`] live: the mesh's default.
const LEAF_TTL: Duration = DEFAULT_MAX_TTL;

impl TestCa {
    /// A new root CA of trust domain `name` (its subject organization), shaped like the roots
    /// `ambit ca init` makes.
    pub fn new(name: &str) -> Self {
        let (key_pem, cert_pem) =
            root::generate_root(name, DEFAULT_ROOT_TTL).expect("generating a test root");
        Self::from_pem(&key_pem, &cert_pem).expect("loading a generated root")
    }

    /// The CA of an existing root: its PEM key (PKCS#8) and certificate, e.g. the files of
    /// `ambit ca init`, so a test can issue certificates the mesh trusts for any identity.
    pub fn from_pem(key_pem: &str, cert_pem: &str) -> Result<Self, rcgen::Error> {
        let key = KeyPair::from_pem(key_pem)?;
        // Fails early on a certificate the issuer could not use.
        Issuer::from_ca_cert_pem(cert_pem, &key)?;
        let root = pem::parse_certificate(cert_pem.as_bytes())
            .map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
        Ok(Self {
            key,
            cert_pem: cert_pem.to_string(),
            intermediates: Vec::new(),
            root,
        })
    }

    fn issuer(&self) -> Issuer<'_, &KeyPair> {
        Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).expect("checked when made")
    }

    /// An intermediate CA signed by this one: its leaves chain through it. (The mesh's CA
    /// signs from its root; intermediates exist here to test chains a foreign CA may send.)
    pub fn intermediate(&self, name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = p256();
        let cert = params
            .signed_by(&key, &self.issuer())
            .expect("signing a test intermediate");
        let mut intermediates = vec![cert.der().clone()];
        intermediates.extend(self.intermediates.iter().cloned());
        Self {
            key,
            cert_pem: cert.pem(),
            intermediates,
            root: self.root.clone(),
        }
    }

    /// The root certificate.
    pub fn root(&self) -> CertificateDer<'static> {
        self.root.clone()
    }

    /// A workload certificate for `id` that trusts this CA's root.
    pub fn issue(&self, id: &SpiffeId) -> WorkloadCertificate {
        self.issue_trusting(id, vec![self.root()])
    }

    /// A workload certificate for `id` issued here but trusting `roots` (e.g. another CA's, to
    /// build a client the server does not trust). Any trust domain: the policy that refuses
    /// foreign ones is the real CA's, and tests need the certificates it would refuse.
    pub fn issue_trusting(
        &self,
        id: &SpiffeId,
        roots: Vec<CertificateDer<'static>>,
    ) -> WorkloadCertificate {
        let key = p256();
        let leaf = workload_leaf(&key, id, SystemTime::now() + LEAF_TTL, &self.issuer())
            .expect("signing a test leaf");
        let (_, parsed) = X509Certificate::from_der(leaf.der()).expect("parsing a test leaf");
        let validity = parsed.validity();
        let (not_before, not_after) = (
            SystemTime::from(validity.not_before.to_datetime()),
            SystemTime::from(validity.not_after.to_datetime()),
        );
        let mut chain = vec![leaf.der().clone()];
        chain.extend(self.intermediates.iter().cloned());
        WorkloadCertificate {
            id: id.clone(),
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            roots,
            not_before,
            not_after,
        }
    }
}

/// Istio's plug-in certificates (the `cacerts` Secret): an organisation's root and an
/// intermediate CA under it, as the PEM texts a CA directory holds (see `ca::root`).
pub struct PluginCerts {
    /// The organisation's root key (kept by the organisation, not given to the CA).
    pub root_key_pem: String,
    /// The organisation's root: `root-cert.pem`.
    pub root_cert_pem: String,
    /// The intermediate's key: `ca-key.pem`.
    pub ca_key_pem: String,
    /// The intermediate: `ca-cert.pem`.
    pub ca_cert_pem: String,
}

impl PluginCerts {
    /// A new root named `org` and an intermediate CA under it, valid for a year.
    pub fn new(org: &str) -> Self {
        let (root_key_pem, root_cert_pem) =
            root::generate_root(org, DEFAULT_ROOT_TTL).expect("generating a test root");
        let mut certs = Self {
            root_key_pem,
            root_cert_pem,
            ca_key_pem: String::new(),
            ca_cert_pem: String::new(),
        };
        (certs.ca_key_pem, certs.ca_cert_pem) = certs.intermediate(|_| {});
        certs
    }

    /// Another certificate signed by the root, shaped as an intermediate CA and then changed by
    /// `configure` (to make it a leaf, expired...): (key PEM, certificate PEM).
    pub fn intermediate(&self, configure: impl FnOnce(&mut CertificateParams)) -> (String, String) {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Example Org");
        params
            .distinguished_name
            .push(DnType::CommonName, "Example Org mesh intermediate");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + Duration::from_secs(365 * 24 * 3600)).into();
        configure(&mut params);
        let key = p256();
        let root_key = KeyPair::from_pem(&self.root_key_pem).expect("the root key");
        let issuer = Issuer::from_ca_cert_pem(&self.root_cert_pem, &root_key).expect("the root");
        let cert = params
            .signed_by(&key, &issuer)
            .expect("signing a test intermediate");
        (key.serialize_pem(), cert.pem())
    }

    /// Writes the four files of Istio's `cacerts` into `dir` (created): `ca-cert.pem`,
    /// `ca-key.pem`, `cert-chain.pem` (the intermediate, then the root) and `root-cert.pem`.
    pub fn write(&self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        let write = |file: &str, text: &str| std::fs::write(dir.join(file), text).unwrap();
        write(root::PLUGIN_CERT_FILE, &self.ca_cert_pem);
        write(root::PLUGIN_KEY_FILE, &self.ca_key_pem);
        write(
            root::PLUGIN_CHAIN_FILE,
            &format!("{}{}", self.ca_cert_pem, self.root_cert_pem),
        );
        write(root::PLUGIN_ROOT_FILE, &self.root_cert_pem);
    }
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("generating a P-256 key")
}

/// node-a's token.
pub const TOKEN_A: &str = "token-of-node-a-0123456789";
/// node-b's token.
pub const TOKEN_B: &str = "token-of-node-b-0123456789";
/// The trust domain of test CAs.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// shop/web and shop/db on node-a, pay/pay on node-b.
pub const MESH: &str = "\
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
pub fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TRUST_DOMAIN, ns, sa)
}

/// A PEM CSR of a new P-256 key asking for `sans` (URIs as `SanType::URI`).
pub fn csr_with(sans: Vec<SanType>) -> String {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.serialize_request(&key).unwrap().pem().unwrap()
}

/// A URI SAN.
pub fn uri(uri: &str) -> SanType {
    SanType::URI(uri.try_into().unwrap())
}

/// Sends `CreateCertificate` for `csr` with `token` over `client`'s connection, the
/// `ImpersonatedIdentity` metadata set to `impersonated` or, when `None`, absent (as Istio's
/// sidecars and ztunnel in dedicated mode send it): the raw gRPC answer.
pub async fn create_certificate(
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
pub fn leaf_sans(chain: &[String]) -> Vec<String> {
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

/// The real CA service, running (or stopped) on loopback.
pub struct TestCaServer {
    /// Its root, to issue leaves the CA's clients trust without a CSR round trip.
    ca: TestCa,
    /// Holds every file; removed on drop.
    _dir: tempfile::TempDir,
    /// Where it listens (kept across restarts).
    pub addr: SocketAddr,
    /// Where it serves `/ready` and `/metrics` (a new port at each start).
    pub monitoring: Option<SocketAddr>,
    options: ServeOptions,
    running: Option<(oneshot::Sender<()>, JoinHandle<anyhow::Result<()>>)>,
}

impl TestCaServer {
    /// A new root (trusting also the roots of `also_trust`), started with [`MESH`], tokens for
    /// node-a and node-b, and leaves of at most an hour.
    pub async fn start_trusting(also_trust: Vec<PathBuf>) -> Self {
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
    pub async fn start_kube(kube: KubeAuthOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        root::init_with(
            &dir.path().join("ca"),
            &root::InitOptions::new(TRUST_DOMAIN),
        )
        .unwrap();
        Self::start_with(dir, AuthMode::Kube(Box::new(kube))).await
    }

    /// A CA in standalone mode (the usual mesh file and tokens) signing with Istio's plug-in
    /// certificates `certs`: an intermediate under an organisation's root.
    pub async fn start_plugin(certs: &PluginCerts) -> Self {
        let dir = tempfile::tempdir().unwrap();
        certs.write(&dir.path().join("ca"));
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
        let ca = TestCa::from_pem(&certs.ca_key_pem, &certs.ca_cert_pem)
            .expect("the plug-in intermediate");
        Self::serve(dir, auth, ca).await
    }

    /// Serves the root in `dir/ca` with `auth`.
    async fn start_with(dir: tempfile::TempDir, auth: AuthMode) -> Self {
        let read = |file| std::fs::read_to_string(dir.path().join("ca").join(file)).unwrap();
        let root = TestCa::from_pem(&read(root::ROOT_KEY_FILE), &read(root::ROOT_CERT_FILE))
            .expect("the root `ambit ca init` wrote");
        Self::serve(dir, auth, root).await
    }

    /// Serves the CA directory `dir/ca` with `auth`; `ca` is its signer, in memory.
    async fn serve(dir: tempfile::TempDir, auth: AuthMode, ca: TestCa) -> Self {
        let options = ServeOptions {
            dir: dir.path().join("ca"),
            listen: "127.0.0.1:0".parse().unwrap(),
            auth,
            max_ttl: Duration::from_secs(3600),
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            trust_domain: None,
            monitoring: Some("127.0.0.1:0".parse().unwrap()),
        };
        let mut ca = Self {
            ca,
            _dir: dir,
            addr: options.listen,
            monitoring: None,
            options,
            running: None,
        };
        ca.resume().await;
        ca
    }

    /// See [`Self::start_trusting`].
    pub async fn start() -> Self {
        Self::start_trusting(Vec::new()).await
    }

    /// The CA's root, in memory.
    pub fn ca(&self) -> &TestCa {
        &self.ca
    }

    /// The CA's trust bundle (`roots.pem`, or the plug-in `root-cert.pem`).
    pub fn roots_file(&self) -> PathBuf {
        let bundle = self.options.dir.join(root::TRUST_BUNDLE_FILE);
        if bundle.exists() {
            bundle
        } else {
            self.options.dir.join(root::PLUGIN_ROOT_FILE)
        }
    }

    /// The mesh file the CA watches (standalone mode).
    pub fn mesh_file(&self) -> &Path {
        match &self.options.auth {
            AuthMode::Files { mesh_file, .. } => mesh_file,
            AuthMode::Kube(_) => panic!("a CA in Kubernetes mode has no mesh file"),
        }
    }

    /// A client configuration for this CA with `token`, trusting `roots_file`.
    pub fn client_config_with(&self, token: &str, roots_file: PathBuf) -> CaClientConfig {
        CaClientConfig {
            address: format!("https://{}", self.addr),
            server_name: None,
            roots_file,
            token: BearerToken::new(token),
            timeout: Duration::from_secs(5),
        }
    }

    /// A client configuration for this CA with `token`, trusting the CA's bundle.
    pub fn client_config(&self, token: &str) -> CaClientConfig {
        self.client_config_with(token, self.roots_file())
    }

    /// Stops serving: the port is closed until [`Self::resume`].
    pub async fn stop(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            let _ = stop.send(());
            task.await.unwrap().unwrap();
        }
    }

    /// Serves again, on the same address.
    pub async fn resume(&mut self) {
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
        self.monitoring = server.monitoring_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run_until(async move {
            let _ = stopped.await;
        }));
        self.running = Some((stop, task));
    }
}

impl Drop for TestCaServer {
    fn drop(&mut self) {
        if let Some((stop, _)) = self.running.take() {
            let _ = stop.send(());
        }
    }
}
