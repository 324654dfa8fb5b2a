//! PEM, the text form of certificates and certificate requests in files (trust bundles, the
//! CA's root) and on the CA's wire (CSRs, chains): the one PEM codec of the crate, both ways,
//! built on the `pem` crate (which rcgen uses for its own PEM output too).
//!
//! Readers take the sections of the kind they want and skip the others (a key beside a
//! certificate, text around sections), as OpenSSL and rustls do; a malformed section (bad
//! base64, BEGIN and END that disagree) is an error. Writers use LF line ends and 64-character
//! lines (RFC 7468).
use std::{
    fs, io,
    path::{Path, PathBuf},
};

use pem::{EncodeConfig, LineEnding, Pem};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};

/// The label of a certificate section.
const CERTIFICATE: &str = "CERTIFICATE";
/// The label of a PKCS#10 certificate request section.
const CERTIFICATE_REQUEST: &str = "CERTIFICATE REQUEST";

/// Why a PEM text did not give what was asked of it.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    /// A section is malformed (framing, base64).
    #[error("{0}")]
    Malformed(#[from] pem::PemError),
    /// No section of the wanted kind.
    #[error("no {0} section")]
    Missing(&'static str),
}

/// Why a PEM file could not be read. Messages start with the file's path.
#[derive(Debug, thiserror::Error)]
pub enum PemFileError {
    /// The file could not be read.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        error: io::Error,
    },
    /// The content is not what it should be.
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The contents of every section labelled `label`, in order.
fn sections(text: &[u8], label: &'static str) -> Result<Vec<Vec<u8>>, PemError> {
    Ok(pem::parse_many(text)?
        .into_iter()
        .filter(|section| section.tag() == label)
        .map(Pem::into_contents)
        .collect())
}

/// The first section labelled `label`.
fn first_section(text: &[u8], label: &'static str) -> Result<Vec<u8>, PemError> {
    sections(text, label)?
        .into_iter()
        .next()
        .ok_or(PemError::Missing(label))
}

/// Every certificate of `text` (possibly none).
pub fn parse_certificates(text: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    Ok(sections(text, CERTIFICATE)?
        .into_iter()
        .map(CertificateDer::from)
        .collect())
}

/// The first certificate of `text`.
pub fn parse_certificate(text: &[u8]) -> Result<CertificateDer<'static>, PemError> {
    first_section(text, CERTIFICATE).map(CertificateDer::from)
}

/// The first certificate request (PKCS#10) of `text`.
pub fn parse_certificate_request(
    text: &[u8],
) -> Result<CertificateSigningRequestDer<'static>, PemError> {
    first_section(text, CERTIFICATE_REQUEST).map(CertificateSigningRequestDer::from)
}

/// Reads every certificate of a PEM file (a trust bundle or a chain); a file without one is an
/// error.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemFileError> {
    let content = fs::read(path).map_err(|error| PemFileError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    let invalid = |reason: String| PemFileError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let certs = parse_certificates(&content)
        .map_err(|e| invalid(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(invalid("holds no PEM certificate".into()));
    }
    Ok(certs)
}

/// PEM-encodes one certificate.
pub fn certificate_pem(cert: &CertificateDer<'_>) -> String {
    pem::encode_config(
        &Pem::new(CERTIFICATE, cert.as_ref()),
        EncodeConfig::new().set_line_ending(LineEnding::LF),
    )
}

/// PEM-encodes certificates one after the other (a trust bundle, a chain).
pub fn certificates_pem(certs: &[CertificateDer<'_>]) -> String {
    certs.iter().map(certificate_pem).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_round_trip_through_pem() {
        let a = CertificateDer::from(b"first certificate".to_vec());
        let b = CertificateDer::from(vec![0xffu8; 100]);
        let text = certificates_pem(&[a.clone(), b.clone()]);
        // Base64 of RFC 4648 (the `+` and `/` alphabet, `=` padding), lines of 64, LF.
        assert!(
            text.starts_with(
                "-----BEGIN CERTIFICATE-----\nZmlyc3QgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
            ),
            "{text}"
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[4].len(), 64, "{text}");
        assert!(
            lines[4].starts_with("////") && lines[6].ends_with("/w=="),
            "{text}"
        );
        assert!(!text.contains('\r'));
        assert_eq!(parse_certificates(text.as_bytes()).unwrap(), [a.clone(), b]);
        assert_eq!(parse_certificate(text.as_bytes()).unwrap(), a);
    }

    #[test]
    fn readers_take_their_sections_and_skip_the_rest() {
        let cert = CertificateDer::from(b"cert".to_vec());
        let text = format!(
            "subject=CN = root\n-----BEGIN PRIVATE KEY-----\na2V5\n-----END PRIVATE KEY-----\n\
             {}-----BEGIN CERTIFICATE REQUEST-----\nY3Ny\n-----END CERTIFICATE REQUEST-----\n",
            certificate_pem(&cert)
        );
        assert_eq!(parse_certificates(text.as_bytes()).unwrap(), [cert]);
        assert_eq!(
            parse_certificate_request(text.as_bytes()).unwrap().as_ref(),
            b"csr"
        );

        let err =
            parse_certificate_request(certificate_pem(&CertificateDer::from(vec![1])).as_bytes())
                .unwrap_err();
        assert_eq!(err.to_string(), "no CERTIFICATE REQUEST section");
        assert!(parse_certificates(b"no PEM here").unwrap().is_empty());
        for bad in [
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
            "-----BEGIN CERTIFICATE-----\nY2VydA==\n-----END PRIVATE KEY-----\n",
        ] {
            assert!(parse_certificates(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn read_certificates_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("roots.pem");
        let err = read_certificates(&path).unwrap_err().to_string();
        assert!(err.starts_with(&path.display().to_string()), "{err}");
        fs::write(&path, "nothing").unwrap();
        let err = read_certificates(&path).unwrap_err().to_string();
        assert!(
            err.ends_with("roots.pem: holds no PEM certificate"),
            "{err}"
        );
    }
}
