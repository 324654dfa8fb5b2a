//! The root of trust: creating or importing it (`ambit ca init`), loading it (or an
//! intermediate under an organisation's root, as Istio's plug-in `cacerts`), trust bundles.
//!
//! A CA directory holds one of two layouts:
//!
//! - **`ambit ca init`'s**: `root-key.pem`, `root-cert.pem` (a self-signed root, which signs
//!   the workloads' certificates itself), `roots.pem` (the trust bundle) and `ca.yaml` (the
//!   trust domain).
//! - **Istio's plug-in certificates** (the `cacerts` Secret istiod reads): `ca-cert.pem` and
//!   `ca-key.pem` (an intermediate CA and its key: they sign), `cert-chain.pem` (`ca-cert.pem`
//!   followed by any intermediates above it, up to the root; sent after every leaf) and
//!   `root-cert.pem` (the organisation's root or roots: the trust bundle). The trust domain is
//!   the `--trust-domain` flag's. Everything is checked before the CA serves: the key matches
//!   `ca-cert.pem`, which is a CA allowed to sign certificates, each certificate of the chain is
//!   issued by the next, the chain ends in a root of `root-cert.pem`, and none is expired or
//!   not yet valid; an error names the file and the problem. Leaves never outlive any
//!   certificate of the chain.
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
/// Istio's plug-in layout: the signing (intermediate) CA's certificate.
pub const PLUGIN_CERT_FILE: &str = "ca-cert.pem";
/// Istio's plug-in layout: the signing CA's private key (PKCS#8 PEM).
pub const PLUGIN_KEY_FILE: &str = "ca-key.pem";
/// Istio's plug-in layout: `ca-cert.pem` and the intermediates above it, up to the root.
pub const PLUGIN_CHAIN_FILE: &str = "cert-chain.pem";
/// Istio's plug-in layout: the root certificate(s), the trust bundle (the same name as
/// [`ROOT_CERT_FILE`], with the same meaning).
pub const PLUGIN_ROOT_FILE: &str = ROOT_CERT_FILE;
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
    /// The trust domain asked for is not the one the CA directory was made for.
    #[error(
        "{}: the CA was made for trust domain {found:?}, but --trust-domain is {asked:?}",
        path.display()
    )]
    TrustDomainMismatch {
        /// `ca.yaml`.
        path: PathBuf,
        /// What it says.
        found: String,
        /// What the flag says.
        asked: String,
    },
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

/// A loaded CA: the signing key, its certificate (a root, or an intermediate under one), the
/// chain up to the root, and the policy it signs under.
pub struct RootCa {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    /// What follows a leaf in every chain returned: the signing certificate's chain up to and
    /// including the root (a self-signed root: itself alone).
    chain_pem: Vec<String>,
    /// The trust bundle agents are given (`roots.pem`, or the plug-in `root-cert.pem`).
    trust_bundle_pem: String,
    /// The first end of validity in the chain: no leaf is signed past it.
    not_after: SystemTime,
    /// The end of the root's validity.
    root_not_after: SystemTime,
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
    let mut ca = ca;
    let mut bundle = vec![ca.cert_der.clone()];
    for extra in &options.also_trust {
        for cert in read_certificates(extra)? {
            if !bundle.contains(&cert) {
                bundle.push(cert);
            }
        }
    }
    ca.trust_bundle_pem = certificates_pem(&bundle);
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
    /// Loads the CA of `dir`, whichever its layout (see the module's doc): Istio's plug-in
    /// certificates when `ca-cert.pem` is there (signing for `trust_domain`, by default
    /// `cluster.local` as Istio's), else `ambit ca init`'s files (whose `ca.yaml` must name
    /// `trust_domain` if one is given).
    pub fn load_dir(dir: &Path, trust_domain: Option<&str>) -> Result<Self, RootError> {
        if dir.join(PLUGIN_CERT_FILE).symlink_metadata().is_ok() {
            let trust_domain = trust_domain.unwrap_or(crate::policy::DEFAULT_TRUST_DOMAIN);
            return Self::load_plugin(dir, trust_domain);
        }
        let ca = Self::load(dir)?;
        if let Some(asked) = trust_domain
            && asked != ca.trust_domain
        {
            return Err(RootError::TrustDomainMismatch {
                path: dir.join(CA_CONFIG_FILE),
                found: ca.trust_domain,
                asked: asked.to_string(),
            });
        }
        Ok(ca)
    }

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
        warn_if_readable(&key_path);
        let cert_path = dir.join(ROOT_CERT_FILE);
        let mut ca = Self::from_pem(
            &read_string(&key_path)?,
            &key_path,
            &read_string(&cert_path)?,
            &cert_path,
            &config.trust_domain,
        )?;
        ca.trust_bundle_pem = certificates_pem(&read_certificates(&dir.join(TRUST_BUNDLE_FILE))?);
        Ok(ca)
    }

    /// Loads Istio's plug-in certificates from `dir` (see the module's doc), signing for
    /// `trust_domain`.
    pub fn load_plugin(dir: &Path, trust_domain: &str) -> Result<Self, RootError> {
        check_trust_domain(trust_domain)?;
        let invalid = |file: &str, reason: String| RootError::Invalid {
            path: dir.join(file),
            reason,
        };
        let key_path = dir.join(PLUGIN_KEY_FILE);
        warn_if_readable(&key_path);
        let cert_path = dir.join(PLUGIN_CERT_FILE);
        let key = parse_key(&read_string(&key_path)?, &key_path)?;
        let cert_der = pem::parse_certificate(read_string(&cert_path)?.as_bytes())
            .map_err(|e| invalid(PLUGIN_CERT_FILE, format!("not a PEM certificate: {e}")))?;
        let chain = read_certificates(&dir.join(PLUGIN_CHAIN_FILE))?;
        let roots = read_certificates(&dir.join(PLUGIN_ROOT_FILE))?;

        let parse = |file: &str, der| parse_cert(der, &dir.join(file));
        let signing = parse(PLUGIN_CERT_FILE, &cert_der)?;
        check_signing_cert(&signing, &key, &cert_path, &key_path)?;
        check_validity(&signing, &cert_path)?;
        let roots_parsed = roots
            .iter()
            .map(|r| parse(PLUGIN_ROOT_FILE, r))
            .collect::<Result<Vec<_>, _>>()?;
        for root in &roots_parsed {
            if !root.is_ca() {
                return Err(invalid(
                    PLUGIN_ROOT_FILE,
                    format!("{} is not a CA certificate", subject(root)),
                ));
            }
        }

        if chain[0] != cert_der {
            return Err(invalid(
                PLUGIN_CHAIN_FILE,
                format!(
                    "its first certificate ({}) is not the one of {PLUGIN_CERT_FILE} ({}): \
                     {PLUGIN_CHAIN_FILE} is {PLUGIN_CERT_FILE} followed by the intermediates \
                     above it, up to the root",
                    subject(&parse(PLUGIN_CHAIN_FILE, &chain[0])?),
                    subject(&signing)
                ),
            ));
        }
        let parsed = chain
            .iter()
            .map(|c| parse(PLUGIN_CHAIN_FILE, c))
            .collect::<Result<Vec<_>, _>>()?;
        let chain_path = dir.join(PLUGIN_CHAIN_FILE);
        for (i, cert) in parsed.iter().enumerate() {
            check_validity(cert, &chain_path)?;
            if !cert.is_ca() {
                return Err(invalid(
                    PLUGIN_CHAIN_FILE,
                    format!(
                        "certificate {} ({}) is not a CA certificate",
                        i + 1,
                        subject(cert)
                    ),
                ));
            }
            if let Some(parent) = parsed.get(i + 1)
                && !issued_by(cert, parent)
            {
                return Err(invalid(
                    PLUGIN_CHAIN_FILE,
                    format!(
                        "certificate {} ({}) is not issued by certificate {} ({}): list the \
                         chain from {PLUGIN_CERT_FILE} up to the root",
                        i + 1,
                        subject(cert),
                        i + 2,
                        subject(parent)
                    ),
                ));
            }
        }
        // The chain ends in a root of the bundle: that root itself, or one that issued its
        // last certificate (then appended, so that every chain ends with its root).
        let last = parsed
            .last()
            .expect("read_certificates returns one at least");
        let mut chain_ders = chain.clone();
        let root_index = match roots.iter().position(|r| *r == chain[chain.len() - 1]) {
            Some(i) => i,
            None => {
                let i = roots_parsed
                    .iter()
                    .position(|root| issued_by(last, root))
                    .ok_or_else(|| {
                        invalid(
                            PLUGIN_CHAIN_FILE,
                            format!(
                                "does not lead to a root of {PLUGIN_ROOT_FILE}: its last \
                                 certificate ({}) is issued by {}, which {PLUGIN_ROOT_FILE} does \
                                 not hold (or whose signature does not verify)",
                                subject(last),
                                last.issuer()
                            ),
                        )
                    })?;
                chain_ders.push(roots[i].clone());
                i
            }
        };
        let root = &roots_parsed[root_index];
        check_validity(root, &dir.join(PLUGIN_ROOT_FILE))?;
        let not_after = parsed
            .iter()
            .chain(std::iter::once(root))
            .map(|c| SystemTime::from(c.validity().not_after.to_datetime()))
            .min()
            .expect("at least one certificate");
        let root_not_after = SystemTime::from(root.validity().not_after.to_datetime());

        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| {
            invalid(
                PLUGIN_CERT_FILE,
                format!("cannot sign with this certificate: {e}"),
            )
        })?;
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            issuer,
            cert_pem: pem::certificate_pem(&cert_der),
            chain_pem: chain_ders.iter().map(pem::certificate_pem).collect(),
            cert_der,
            trust_bundle_pem: certificates_pem(&roots),
            not_after,
            root_not_after,
            max_ttl: DEFAULT_MAX_TTL,
        })
    }

    /// Builds a CA from a self-signed root's PEM texts; the paths only name the sources in
    /// errors. Its trust bundle is the root alone.
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
        let key = parse_key(key_pem, key_path)?;
        let cert_der = pem::parse_certificate(cert_pem.as_bytes())
            .map_err(|e| invalid(cert_path, format!("not a PEM certificate: {e}")))?;
        let (_, cert) = X509Certificate::from_der(&cert_der)
            .map_err(|e| invalid(cert_path, format!("not an X.509 certificate: {e}")))?;
        check_signing_cert(&cert, &key, cert_path, key_path)?;
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
            chain_pem: vec![cert_pem.clone()],
            trust_bundle_pem: cert_pem.clone(),
            cert_pem,
            not_after,
            root_not_after: not_after,
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

    /// The signing certificate (DER): the root, or the plug-in intermediate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The signing certificate (PEM).
    pub fn certificate_pem(&self) -> &str {
        &self.cert_pem
    }

    /// What follows a leaf in every chain the CA returns (PEM): the signing certificate's
    /// chain, the root last.
    pub fn chain_pem(&self) -> &[String] {
        &self.chain_pem
    }

    /// The trust bundle (PEM) agents and waypoints verify peers with.
    pub fn trust_bundle_pem(&self) -> &str {
        &self.trust_bundle_pem
    }

    /// The first end of validity in the signing chain; no leaf outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The end of the root's validity.
    pub fn root_not_after(&self) -> SystemTime {
        self.root_not_after
    }

    pub(super) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }
}

/// Warns when a key file is readable by group or others.
fn warn_if_readable(key_path: &Path) {
    if let Ok(meta) = fs::metadata(key_path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %key_path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the CA's key is readable by group or others; it should be 0600 (or 0440 with the \
             group of the CA alone)"
        );
    }
}

/// A signing key from its PEM text (never quoted in errors); `path` names the file.
fn parse_key(key_pem: &str, path: &Path) -> Result<KeyPair, RootError> {
    KeyPair::from_pem(key_pem).map_err(|e| RootError::Invalid {
        path: path.to_path_buf(),
        reason: format!(
            "not a usable private key ({e}); a PKCS#8 PEM key (\"BEGIN PRIVATE KEY\") is \
             needed: convert with `openssl pkcs8 -topk8 -nocrypt`"
        ),
    })
}

/// Checks that `cert` may sign certificates and is `key`'s.
fn check_signing_cert(
    cert: &X509Certificate<'_>,
    key: &KeyPair,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), RootError> {
    let invalid = |reason: String| RootError::Invalid {
        path: cert_path.to_path_buf(),
        reason,
    };
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        _ => {
            return Err(invalid(format!(
                "{} is not a CA certificate (basicConstraints CA:true), so it may not sign \
                 workload certificates",
                subject(cert)
            )));
        }
    }
    if let Ok(Some(ku)) = cert.key_usage()
        && !ku.value.key_cert_sign()
    {
        return Err(invalid(format!(
            "{}: key usage lacks keyCertSign",
            subject(cert)
        )));
    }
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(invalid(format!(
            "does not match the private key of {} (the key certifies another public key)",
            key_path.display()
        )));
    }
    Ok(())
}

/// Checks that `cert` (of the file `path`) is valid now.
fn check_validity(cert: &X509Certificate<'_>, path: &Path) -> Result<(), RootError> {
    let now = SystemTime::now();
    let not_after = SystemTime::from(cert.validity().not_after.to_datetime());
    let not_before = SystemTime::from(cert.validity().not_before.to_datetime());
    let problem = if not_after <= now {
        Some(format!("expired at {}", timefmt::rfc3339(not_after)))
    } else if not_before > now {
        Some(format!(
            "is not valid before {}",
            timefmt::rfc3339(not_before)
        ))
    } else {
        None
    };
    match problem {
        Some(problem) => Err(RootError::Invalid {
            path: path.to_path_buf(),
            reason: format!("the certificate {} {problem}", subject(cert)),
        }),
        None => Ok(()),
    }
}

/// Parses the certificate `der` of the file `path`.
fn parse_cert<'a>(
    der: &'a CertificateDer<'static>,
    path: &Path,
) -> Result<X509Certificate<'a>, RootError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| RootError::Invalid {
            path: path.to_path_buf(),
            reason: format!("not an X.509 certificate: {e}"),
        })
}

/// Whether `parent` issued `child`: names chain, and the signature verifies.
fn issued_by(child: &X509Certificate<'_>, parent: &X509Certificate<'_>) -> bool {
    child.issuer().as_raw() == parent.subject().as_raw()
        && child.verify_signature(Some(parent.public_key())).is_ok()
}

/// A certificate's subject as messages quote it.
fn subject(cert: &X509Certificate<'_>) -> String {
    let name = cert.subject().to_string();
    if name.is_empty() {
        "(empty subject)".into()
    } else {
        format!("\"{name}\"")
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

    /// Istio's `cacerts`: an intermediate under an organisation's root signs, its chain follows
    /// every leaf (root last), the trust bundle is root-cert.pem, and nothing is expired.
    #[test]
    fn plugin_certificates_load_as_an_intermediate_under_the_root() {
        use crate::testing::ca::PluginCerts;
        let dir = tempfile::tempdir().unwrap();
        let certs = PluginCerts::new("example.org");
        certs.write(dir.path());
        let ca = RootCa::load_dir(dir.path(), Some("example.org")).unwrap();
        assert_eq!(ca.trust_domain(), "example.org");
        assert_eq!(ca.certificate_pem(), certs.ca_cert_pem);
        assert_eq!(
            ca.chain_pem(),
            [certs.ca_cert_pem.clone(), certs.root_cert_pem.clone()]
        );
        assert_eq!(ca.trust_bundle_pem(), certs.root_cert_pem);
        // The intermediate ends first (a year), the root later (ten).
        assert!(ca.not_after() < ca.root_not_after());
        // Istio's default trust domain when none is given.
        let ca = RootCa::load_dir(dir.path(), None).unwrap();
        assert_eq!(ca.trust_domain(), "cluster.local");

        // A cert-chain.pem without the root: the root of root-cert.pem that issued it is added.
        fs::write(dir.path().join(PLUGIN_CHAIN_FILE), &certs.ca_cert_pem).unwrap();
        let ca = RootCa::load_dir(dir.path(), None).unwrap();
        assert_eq!(
            ca.chain_pem(),
            [certs.ca_cert_pem.clone(), certs.root_cert_pem.clone()]
        );
    }

    /// Bad plug-in certificates are refused with the file and the problem named, and no key
    /// text in the message.
    #[test]
    fn bad_plugin_certificates_are_refused_naming_the_file() {
        use crate::testing::ca::PluginCerts;
        let certs = PluginCerts::new("example.org");
        let other = PluginCerts::new("elsewhere.org");
        let (_, leaf) = certs.intermediate(|p| p.is_ca = IsCa::ExplicitNoCa);
        let (expired_key, expired) = certs.intermediate(|p| {
            let now = SystemTime::now();
            p.not_before = (now - Duration::from_secs(7200)).into();
            p.not_after = (now - Duration::from_secs(3600)).into();
        });
        let (future_key, future) = certs.intermediate(|p| {
            p.not_before = (SystemTime::now() + Duration::from_secs(86400)).into();
        });
        let chain = |cert: &str| format!("{cert}{}", certs.root_cert_pem);
        type Change = Vec<(&'static str, String)>;
        let cases: Vec<(&str, Change, &str, &str)> = vec![
            (
                "a key that is not the certificate's",
                vec![(PLUGIN_KEY_FILE, other.ca_key_pem.clone())],
                PLUGIN_CERT_FILE,
                "does not match the private key of",
            ),
            (
                "a key that is no key",
                vec![(
                    PLUGIN_KEY_FILE,
                    "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----\n".into(),
                )],
                PLUGIN_KEY_FILE,
                "not a usable private key",
            ),
            (
                "a ca-cert.pem that is not a CA",
                vec![
                    (PLUGIN_CERT_FILE, leaf.clone()),
                    (PLUGIN_CHAIN_FILE, chain(&leaf)),
                ],
                PLUGIN_CERT_FILE,
                "is not a CA certificate",
            ),
            (
                "an expired intermediate",
                vec![
                    (PLUGIN_CERT_FILE, expired.clone()),
                    (PLUGIN_KEY_FILE, expired_key),
                    (PLUGIN_CHAIN_FILE, chain(&expired)),
                ],
                PLUGIN_CERT_FILE,
                "expired at",
            ),
            (
                "an intermediate not valid yet",
                vec![
                    (PLUGIN_CERT_FILE, future.clone()),
                    (PLUGIN_KEY_FILE, future_key),
                    (PLUGIN_CHAIN_FILE, chain(&future)),
                ],
                PLUGIN_CERT_FILE,
                "is not valid before",
            ),
            (
                "a chain that does not start with ca-cert.pem",
                vec![(PLUGIN_CHAIN_FILE, certs.root_cert_pem.clone())],
                PLUGIN_CHAIN_FILE,
                "is not the one of ca-cert.pem",
            ),
            (
                "a chain to another organisation's root",
                vec![
                    (PLUGIN_ROOT_FILE, other.root_cert_pem.clone()),
                    (PLUGIN_CHAIN_FILE, certs.ca_cert_pem.clone()),
                ],
                PLUGIN_CHAIN_FILE,
                "does not lead to a root of root-cert.pem",
            ),
            (
                "a chain whose links do not sign each other",
                vec![(
                    PLUGIN_CHAIN_FILE,
                    chain(&certs.ca_cert_pem).replace(&certs.root_cert_pem, &other.root_cert_pem),
                )],
                PLUGIN_CHAIN_FILE,
                "is not issued by certificate 2",
            ),
            (
                "no root-cert.pem content",
                vec![(PLUGIN_ROOT_FILE, "nothing here\n".into())],
                PLUGIN_ROOT_FILE,
                "holds no PEM certificate",
            ),
        ];
        for (what, changes, file, needle) in cases {
            let dir = tempfile::tempdir().unwrap();
            certs.write(dir.path());
            for (name, text) in &changes {
                fs::write(dir.path().join(name), text).unwrap();
            }
            let err = match RootCa::load_dir(dir.path(), None) {
                Ok(_) => panic!("{what}: accepted"),
                Err(e) => e.to_string(),
            };
            let path = dir.path().join(file).display().to_string();
            assert!(
                err.starts_with(&format!("{path}: ")) && err.contains(needle),
                "{what}: {err}"
            );
            // No PEM text quoted (a key's base64, like a certificate's, starts with MII).
            assert!(!err.contains("MII"), "{what}: {err}");
        }
    }

    #[test]
    fn a_trust_domain_flag_must_match_the_ca_it_loads() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), "example.org", None).unwrap();
        assert!(RootCa::load_dir(dir.path(), Some("example.org")).is_ok());
        let err = RootCa::load_dir(dir.path(), Some("cluster.local"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("ca.yaml: the CA was made for trust domain \"example.org\", but --trust-domain is \"cluster.local\""),
            "{err}"
        );
    }
}
