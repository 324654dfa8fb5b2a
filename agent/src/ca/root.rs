//! The root of trust: creating or importing it (`ambit ca init`), loading it, trust bundles.
use std::{
    fs::{self, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer as _, X509Certificate};

use super::DEFAULT_MAX_TTL;
use crate::{
    identity::pem::{self, PemFileError, certificates_pem, read_certificates},
    timefmt,
};

/// The root's private key (PKCS#8 PEM), written with mode 0600.
pub const ROOT_KEY_FILE: &str = "root-key.pem";
/// The root certificate (PEM).
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// The trust bundle: a concatenation of PEM root certificates, the one file agents need.
pub const TRUST_BUNDLE_FILE: &str = "roots.pem";
/// The CA's settings (`trustDomain`).
pub const CA_CONFIG_FILE: &str = "ca.yaml";
/// Default lifetime of a generated root: ten years.
pub const DEFAULT_ROOT_TTL: Duration = Duration::from_secs(3650 * 24 * 3600);
/// How far back certificates' `notBefore` is set, so that peers whose clocks lag a little
/// accept a fresh certificate.
pub const BACKDATE: Duration = Duration::from_secs(60);

/// Why a CA directory, key or certificate could not be created or used.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    /// `init` found CA files in the directory: a CA is never overwritten.
    #[error("{}: already exists; refusing to overwrite a CA (use another --dir, or remove the directory)", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// A file could not be read or written.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        error: io::Error,
    },
    /// A file's content is not what it should be.
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The trust domain is not a valid one.
    #[error("invalid trust domain {0:?}: use lowercase letters, digits, '.', '-' and '_'")]
    TrustDomain(String),
    /// Key generation or certificate signing failed.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

impl From<PemFileError> for RootError {
    fn from(e: PemFileError) -> Self {
        match e {
            PemFileError::Io { path, error } => Self::Io { path, error },
            PemFileError::Invalid { path, reason } => Self::Invalid { path, reason },
        }
    }
}

/// The content of `ca.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CaConfig {
    trust_domain: String,
}

/// What `ambit ca init` does.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// The trust domain of the identities the CA signs.
    pub trust_domain: String,
    /// Import this (key file, certificate file) instead of generating a root.
    pub existing: Option<(PathBuf, PathBuf)>,
    /// Lifetime of a generated root.
    pub root_ttl: Duration,
    /// PEM files whose certificates `roots.pem` also trusts (a previous root, for rotation).
    pub also_trust: Vec<PathBuf>,
}

impl InitOptions {
    /// A generated ten-year root for `trust_domain`, trusted alone.
    pub fn new(trust_domain: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_string(),
            existing: None,
            root_ttl: DEFAULT_ROOT_TTL,
            also_trust: Vec::new(),
        }
    }
}

/// A loaded root CA: the signing key, its certificate, and the policy it signs under.
pub struct RootCa {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    not_after: SystemTime,
    max_ttl: Duration,
}

impl std::fmt::Debug for RootCa {
    // The key stays out of debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootCa")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .field("max_ttl", &self.max_ttl)
            .finish_non_exhaustive()
    }
}

/// Creates a CA in `dir` for `trust_domain`: a new ten-year root, or the `existing` (key file,
/// certificate file) imported. See [`init_with`].
pub fn init(
    dir: &Path,
    trust_domain: &str,
    existing: Option<(&Path, &Path)>,
) -> Result<RootCa, RootError> {
    let mut options = InitOptions::new(trust_domain);
    options.existing = existing.map(|(k, c)| (k.to_path_buf(), c.to_path_buf()));
    init_with(dir, &options)
}

/// Creates a CA in `dir`: writes `root-key.pem` (created with mode 0600, so the key is never
/// readable by others, not even for an instant), `root-cert.pem`, `roots.pem` and `ca.yaml`.
///
/// Fails without touching anything if any of these files exists. A generated root is ECDSA
/// P-256, self-signed, `CA:true`, key usage keyCertSign + cRLSign, with the trust domain as
/// organisation and `spiffe://<trust domain>` as URI SAN. An imported root must be a CA
/// certificate matching its key (PKCS#8; ECDSA, Ed25519 or RSA).
pub fn init_with(dir: &Path, options: &InitOptions) -> Result<RootCa, RootError> {
    check_trust_domain(&options.trust_domain)?;
    let files = [
        ROOT_KEY_FILE,
        ROOT_CERT_FILE,
        TRUST_BUNDLE_FILE,
        CA_CONFIG_FILE,
    ]
    .map(|f| dir.join(f));
    for path in &files {
        if path.symlink_metadata().is_ok() {
            return Err(RootError::Exists { path: path.clone() });
        }
    }
    // Read everything before writing anything.
    let (key_pem, cert_pem) = match &options.existing {
        Some((key_path, cert_path)) => (read_string(key_path)?, read_string(cert_path)?),
        None => generate_root(&options.trust_domain, options.root_ttl)?,
    };
    let (key_source, cert_source) = match &options.existing {
        Some((k, c)) => (k.clone(), c.clone()),
        None => (files[0].clone(), files[1].clone()),
    };
    let ca = RootCa::from_pem(
        &key_pem,
        &key_source,
        &cert_pem,
        &cert_source,
        &options.trust_domain,
    )?;
    let mut bundle = vec![ca.cert_der.clone()];
    for extra in &options.also_trust {
        for cert in read_certificates(extra)? {
            if !bundle.contains(&cert) {
                bundle.push(cert);
            }
        }
    }
    let config = serde_yaml_ng::to_string(&CaConfig {
        trust_domain: options.trust_domain.clone(),
    })
    .expect("a string field serialises");

    fs::create_dir_all(dir).map_err(|error| RootError::Io {
        path: dir.to_path_buf(),
        error,
    })?;
    let contents = [
        (key_pem.as_str(), 0o600),
        (ca.cert_pem.as_str(), 0o644),
        (&certificates_pem(&bundle), 0o644),
        (config.as_str(), 0o644),
    ];
    for (i, (content, mode)) in contents.iter().enumerate() {
        if let Err(e) = write_new(&files[i], content, *mode) {
            // Leave no half-made CA behind (it would block the next attempt).
            for written in &files[..i] {
                let _ = fs::remove_file(written);
            }
            return Err(e);
        }
    }
    Ok(ca)
}

/// Appends the certificates of the PEM file `extra` to the trust bundle `bundle` (skipping
/// those already in it); returns how many were added. The bundle is replaced atomically.
pub fn add_trusted_roots(bundle: &Path, extra: &Path) -> Result<usize, RootError> {
    let mut certs = read_certificates(bundle)?;
    let mut added = 0;
    for cert in read_certificates(extra)? {
        if !certs.contains(&cert) {
            certs.push(cert);
            added += 1;
        }
    }
    if added > 0 {
        let tmp = bundle.with_extension("pem.tmp");
        let _ = fs::remove_file(&tmp);
        write_new(&tmp, &certificates_pem(&certs), 0o644)?;
        fs::rename(&tmp, bundle).map_err(|error| RootError::Io {
            path: bundle.to_path_buf(),
            error,
        })?;
    }
    Ok(added)
}

impl RootCa {
    /// Loads the CA of `dir` (written by [`init`]). Signs leaves of at most
    /// [`DEFAULT_MAX_TTL`] until [`Self::with_max_ttl`] says otherwise.
    pub fn load(dir: &Path) -> Result<Self, RootError> {
        let config_path = dir.join(CA_CONFIG_FILE);
        let config: CaConfig =
            serde_yaml_ng::from_str(&read_string(&config_path)?).map_err(|e| {
                RootError::Invalid {
                    path: config_path.clone(),
                    reason: e.to_string(),
                }
            })?;
        check_trust_domain(&config.trust_domain)?;
        let key_path = dir.join(ROOT_KEY_FILE);
        if let Ok(meta) = fs::metadata(&key_path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                path = %key_path.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "the root key is readable by group or others; it should be 0600"
            );
        }
        let cert_path = dir.join(ROOT_CERT_FILE);
        Self::from_pem(
            &read_string(&key_path)?,
            &key_path,
            &read_string(&cert_path)?,
            &cert_path,
            &config.trust_domain,
        )
    }

    /// Builds a CA from PEM texts; the paths only name the sources in errors.
    fn from_pem(
        key_pem: &str,
        key_path: &Path,
        cert_pem: &str,
        cert_path: &Path,
        trust_domain: &str,
    ) -> Result<Self, RootError> {
        let invalid = |path: &Path, reason: String| RootError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let key = KeyPair::from_pem(key_pem).map_err(|e| {
            invalid(
                key_path,
                format!(
                    "not a usable private key ({e}); a PKCS#8 PEM key (\"BEGIN PRIVATE KEY\") is \
                     needed: convert with `openssl pkcs8 -topk8 -nocrypt`"
                ),
            )
        })?;
        let cert_der = pem::parse_certificate(cert_pem.as_bytes())
            .map_err(|e| invalid(cert_path, format!("not a PEM certificate: {e}")))?;
        let (_, cert) = X509Certificate::from_der(&cert_der)
            .map_err(|e| invalid(cert_path, format!("not an X.509 certificate: {e}")))?;
        match cert.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            _ => {
                return Err(invalid(
                    cert_path,
                    "not a CA certificate (basicConstraints CA:true)".into(),
                ));
            }
        }
        if let Ok(Some(ku)) = cert.key_usage()
            && !ku.value.key_cert_sign()
        {
            return Err(invalid(cert_path, "key usage lacks keyCertSign".into()));
        }
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(invalid(
                cert_path,
                format!("does not match the private key of {}", key_path.display()),
            ));
        }
        let not_after = SystemTime::from(cert.validity().not_after.to_datetime());
        if not_after <= SystemTime::now() {
            return Err(invalid(
                cert_path,
                "the root certificate has expired".into(),
            ));
        }
        let cert_pem = pem::certificate_pem(&cert_der);
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| invalid(cert_path, format!("cannot sign with this certificate: {e}")))?;
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            issuer,
            cert_der,
            cert_pem,
            not_after,
            max_ttl: DEFAULT_MAX_TTL,
        })
    }

    /// Sets the longest lifetime [`Self::sign`](super::sign) grants (and the lifetime of
    /// requests that name none).
    pub fn with_max_ttl(mut self, max_ttl: Duration) -> Self {
        self.max_ttl = max_ttl;
        self
    }

    /// The longest lifetime a leaf gets.
    pub fn max_ttl(&self) -> Duration {
        self.max_ttl
    }

    /// The only trust domain this CA signs identities of.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificate (DER).
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The root certificate (PEM), last in every chain.
    pub fn certificate_pem(&self) -> &str {
        &self.cert_pem
    }

    /// End of the root's validity; no leaf outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    pub(super) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }
}

/// A new self-signed root for `trust_domain`, valid for `ttl`: (key PEM, certificate PEM). The
/// shape is [`init_with`]'s; test CAs (`crate::testing::ca`) make their roots here too.
pub(crate) fn generate_root(
    trust_domain: &str,
    ttl: Duration,
) -> Result<(String, String), RootError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    // A distinct subject per root: during a rotation two roots coexist, and chain builders
    // (and people reading logs) then tell them apart by name, not only by key.
    let tag: String = super::random_bytes::<4>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("Ambit root CA {} {tag}", &timefmt::rfc3339(now)[..10]),
    );
    params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{trust_domain}")
            .try_into()
            .map_err(|_| RootError::TrustDomain(trust_domain.to_string()))?,
    )];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(super::random_serial());
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ttl).into();
    let cert = params.self_signed(&key)?;
    Ok((key.serialize_pem(), cert.pem()))
}

/// Trust domains as SPIFFE allows them (lowercase, so that comparisons are exact).
fn check_trust_domain(td: &str) -> Result<(), RootError> {
    let ok = !td.is_empty()
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(RootError::TrustDomain(td.to_string()))
    }
}

fn read_string(path: &Path) -> Result<String, RootError> {
    fs::read_to_string(path).map_err(|error| RootError::Io {
        path: path.to_path_buf(),
        error,
    })
}

/// Creates `path` (which must not exist) with `mode` from the start, then writes `content`.
fn write_new(path: &Path, content: &str, mode: u32) -> Result<(), RootError> {
    let io_err = |error| RootError::Io {
        path: path.to_path_buf(),
        error,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err)?;
    file.write_all(content.as_bytes()).map_err(io_err)?;
    file.sync_all().map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_a_0600_key_and_a_loadable_root() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let ca = init(&ca_dir, "example.org", None).unwrap();
        let mode = fs::metadata(ca_dir.join(ROOT_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(ca.trust_domain(), "example.org");

        let loaded = RootCa::load(&ca_dir).unwrap();
        assert_eq!(loaded.certificate(), ca.certificate());
        assert_eq!(loaded.trust_domain(), "example.org");
        assert_eq!(
            read_certificates(&ca_dir.join(TRUST_BUNDLE_FILE)).unwrap(),
            vec![ca.certificate().clone()]
        );

        let (_, cert) = X509Certificate::from_der(ca.certificate()).unwrap();
        assert!(cert.is_ca());
        assert!(cert.key_usage().unwrap().unwrap().value.key_cert_sign());
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert!(lifetime >= DEFAULT_ROOT_TTL.as_secs() as i64);
        // Self-signed.
        cert.verify_signature(None).unwrap();

        // A second init never overwrites the CA.
        assert!(matches!(
            init(&ca_dir, "example.org", None),
            Err(RootError::Exists { .. })
        ));
    }

    #[test]
    fn init_imports_a_given_root() {
        let dir = tempfile::tempdir().unwrap();
        let first = init(&dir.path().join("a"), "td", None).unwrap();
        let key = dir.path().join("a").join(ROOT_KEY_FILE);
        let cert = dir.path().join("a").join(ROOT_CERT_FILE);
        let imported = init(&dir.path().join("b"), "td", Some((&key, &cert))).unwrap();
        assert_eq!(imported.certificate(), first.certificate());
        let mode = fs::metadata(dir.path().join("b").join(ROOT_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // A key that does not match the certificate is refused, and nothing is left behind.
        let other = init(&dir.path().join("c"), "td", None).unwrap();
        drop(other);
        let other_key = dir.path().join("c").join(ROOT_KEY_FILE);
        let err = init(&dir.path().join("d"), "td", Some((&other_key, &cert))).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        assert!(!dir.path().join("d").join(ROOT_KEY_FILE).exists());
    }

    #[test]
    fn bad_trust_domains_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for td in ["", "Cluster.local", "a/b", "spiffe://x"] {
            assert!(
                matches!(init(dir.path(), td, None), Err(RootError::TrustDomain(_))),
                "{td:?}"
            );
        }
    }

    #[test]
    fn also_trust_and_add_trusted_roots_build_a_multi_root_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let old = init(&dir.path().join("old"), "td", None).unwrap();
        let mut options = InitOptions::new("td");
        options.also_trust = vec![dir.path().join("old").join(TRUST_BUNDLE_FILE)];
        let new = init_with(&dir.path().join("new"), &options).unwrap();
        let bundle = read_certificates(&dir.path().join("new").join(TRUST_BUNDLE_FILE)).unwrap();
        assert_eq!(
            bundle,
            vec![new.certificate().clone(), old.certificate().clone()]
        );

        // The old CA's bundle learns the new root; adding it twice changes nothing.
        let old_bundle = dir.path().join("old").join(TRUST_BUNDLE_FILE);
        let new_cert = dir.path().join("new").join(ROOT_CERT_FILE);
        assert_eq!(add_trusted_roots(&old_bundle, &new_cert).unwrap(), 1);
        assert_eq!(add_trusted_roots(&old_bundle, &new_cert).unwrap(), 0);
        assert_eq!(read_certificates(&old_bundle).unwrap().len(), 2);
    }
}
