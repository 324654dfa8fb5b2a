//! Workload identity: SPIFFE IDs and the certificates that prove them.
//!
//! The types here are shared by the CA ([`crate::ca`]), the certificate manager (which fetches
//! and renews certificates for the identities of this node's pods) and the HBONE TLS
//! configuration ([`crate::hbone`]).
//!
//! - [`ca_api`]: the gRPC API of Istio's CA, which the CA serves and the client calls.
//! - [`pem`]: certificates to and from PEM, for the CA and the client alike.
//! - [`client`]: the node agent's client of the CA.
//! - [`manager`]: the certificates of this node's identities, fetched and renewed.
//!
//! The CA depends on this module, never the reverse.
pub mod ca_api;
pub mod client;
pub mod manager;
pub mod metrics;
pub mod pem;

use std::{fmt, str::FromStr, time::SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub use self::{
    client::{BearerToken, CaClient, CaClientConfig, CaError},
    manager::{CertificateManager, ManagerConfig, ManagerStats, WaitError},
};

/// A SPIFFE ID of the Kubernetes form `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// Trust domain, e.g. `cluster.local`.
    pub trust_domain: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Kubernetes service account.
    pub service_account: String,
}

/// Why a string is not a SPIFFE ID of the expected form.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid SPIFFE ID {input:?}: {reason}")]
pub struct SpiffeIdError {
    /// The rejected input.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl SpiffeId {
    /// The identity of a workload running as `service_account` in `namespace`.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| SpiffeIdError {
            input: input.to_string(),
            reason,
        };
        let rest = input
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("does not start with spiffe://"))?;
        let mut parts = rest.split('/');
        let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(err("path is not /ns/<namespace>/sa/<service-account>"));
        };
        if td.is_empty() || ns.is_empty() || sa.is_empty() {
            return Err(err("empty trust domain, namespace or service account"));
        }
        Ok(Self::new(td, ns, sa))
    }
}

/// A workload's certificate chain and private key, with the trust bundle to verify peers.
///
/// `Debug` prints everything but the key.
pub struct WorkloadCertificate {
    /// The identity the leaf certificate proves.
    pub id: SpiffeId,
    /// Leaf first, then intermediates (not the root).
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key (ECDSA P-256, PKCS#8). Never logged.
    pub key: PrivateKeyDer<'static>,
    /// Trusted roots; several during a root rotation.
    pub roots: Vec<CertificateDer<'static>>,
    /// Start of the leaf's validity.
    pub not_before: SystemTime,
    /// End of the leaf's validity.
    pub not_after: SystemTime,
}

impl fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("id", &self.id.to_string())
            .field(
                "chain",
                &format_args!("{} certificate(s)", self.chain.len()),
            )
            .field("key", &format_args!("<redacted>"))
            .field("roots", &format_args!("{} root(s)", self.roots.len()))
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_id_round_trips() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        assert_eq!(id, SpiffeId::new("cluster.local", "shop", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
    }

    #[test]
    fn debug_never_prints_the_key() {
        let secret = vec![0x42u8; 32];
        let cert = WorkloadCertificate {
            id: SpiffeId::new("td", "ns", "sa"),
            chain: vec![CertificateDer::from(vec![1u8, 2, 3])],
            key: PrivateKeyDer::Pkcs8(secret.clone().into()),
            roots: Vec::new(),
            not_before: SystemTime::UNIX_EPOCH,
            not_after: SystemTime::UNIX_EPOCH,
        };
        let debug = format!("{cert:?}");
        assert!(
            debug.contains("<redacted>") && debug.contains("spiffe://td/ns/ns/sa/sa"),
            "{debug}"
        );
        assert!(!debug.contains("66") && !debug.contains("0x42"), "{debug}");
    }

    #[test]
    fn spiffe_id_rejects_other_shapes() {
        for bad in [
            "https://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe:///ns/a/sa/b",
            "spiffe://td/ns//sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} accepted");
        }
    }
}
