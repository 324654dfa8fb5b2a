//! Test support: a throwaway certificate authority issuing SPIFFE workload certificates shaped
//! like the mesh's (ECDSA P-256, URI SAN only, server and client auth), for unit tests here and
//! end-to-end tests elsewhere. Not for production use: keys live in memory, validity is fixed.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::identity::{SpiffeId, WorkloadCertificate};

/// A certificate authority: a self-signed root, or an intermediate under one.
pub struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    /// This CA's certificate and the intermediates above it, excluding the root: what a
    /// leaf's chain carries after the leaf.
    intermediates: Vec<CertificateDer<'static>>,
    root: CertificateDer<'static>,
    /// The CA certificate as PEM, when loaded from files rather than made here.
    loaded_pem: Option<String>,
}

fn ca_params(name: &str) -> CertificateParams {
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
    params
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("generating a P-256 key")
}

fn rustls_pki_root(cert_pem: &str) -> Option<CertificateDer<'static>> {
    crate::identity::pem::parse_certificate(cert_pem.as_bytes()).ok()
}

fn system_time(at: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(at).unwrap_or_default())
}

impl TestCa {
    /// A new root CA whose subject organization is `name`.
    pub fn new(name: &str) -> Self {
        let params = ca_params(name);
        let key = p256();
        let root = params
            .self_signed(&key)
            .expect("self-signing a test root")
            .der()
            .clone();
        Self {
            params,
            key,
            intermediates: Vec::new(),
            root,
            loaded_pem: None,
        }
    }

    /// The CA of an existing root: its PEM key (PKCS#8) and certificate, e.g. the files of
    /// `ambit ca init`, so a test can issue certificates the mesh trusts for any identity.
    pub fn from_pem(key_pem: &str, cert_pem: &str) -> Result<Self, rcgen::Error> {
        let key = KeyPair::from_pem(key_pem)?;
        // Fails early on a certificate the issuer could not use.
        Issuer::from_ca_cert_pem(cert_pem, &key)?;
        let root = rustls_pki_root(cert_pem).ok_or(rcgen::Error::CouldNotParseCertificate)?;
        Ok(Self {
            params: CertificateParams::default(),
            key,
            intermediates: Vec::new(),
            root,
            loaded_pem: Some(cert_pem.to_string()),
        })
    }

    fn issuer(&self) -> Issuer<'_, &KeyPair> {
        match &self.loaded_pem {
            Some(pem) => Issuer::from_ca_cert_pem(pem, &self.key).expect("checked when loaded"),
            None => Issuer::from_params(&self.params, &self.key),
        }
    }

    /// An intermediate CA signed by this one: its leaves chain through it.
    pub fn intermediate(&self, name: &str) -> Self {
        let params = ca_params(name);
        let key = p256();
        let cert = params
            .signed_by(&key, &self.issuer())
            .expect("signing a test intermediate")
            .der()
            .clone();
        let mut intermediates = vec![cert];
        intermediates.extend(self.intermediates.iter().cloned());
        Self {
            params,
            key,
            intermediates,
            root: self.root.clone(),
            loaded_pem: None,
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
    /// build a client the server does not trust).
    pub fn issue_trusting(
        &self,
        id: &SpiffeId,
        roots: Vec<CertificateDer<'static>>,
    ) -> WorkloadCertificate {
        let uri = id.to_string().try_into().expect("a SPIFFE ID is ASCII");
        let mut params = CertificateParams::default();
        // Mesh certificates carry their identity in the URI SAN only, with an empty subject.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = p256();
        let leaf = params
            .signed_by(&key, &self.issuer())
            .expect("signing a test leaf")
            .der()
            .clone();
        let mut chain = vec![leaf];
        chain.extend(self.intermediates.iter().cloned());
        WorkloadCertificate {
            id: id.clone(),
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            roots,
            not_before: system_time(params.not_before.unix_timestamp()),
            not_after: system_time(params.not_after.unix_timestamp()),
        }
    }
}
