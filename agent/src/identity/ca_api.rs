//! The wire API of Istio's CA, `istio.v1.auth.IstioCertificateService/CreateCertificate`,
//! spoken by the agents' client ([`super::client`]) and served by `ambit ca` (`ca::server`).
//!
//! The messages, the client and the server trait are generated at build time (agent/build.rs,
//! with protox and tonic-prost-build: no `protoc` needed) from `agent/proto/ca.proto`, Istio's
//! file unchanged, so the field numbers and types are Istio's by construction; a test here
//! pins the encoding all the same. What is written here is what the .proto cannot say: the
//! metadata key ambient agents name the identity they ask for with, and the CA's port.
use prost_types::{Struct, Value, value::Kind};

/// The code generated from `agent/proto/ca.proto`. Its doc comments are Istio's .proto
/// comments, written for protoc rather than rustdoc.
#[allow(missing_docs, unused_qualifications, clippy::doc_lazy_continuation)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
}

pub use generated::{
    IstioCertificateRequest, IstioCertificateResponse,
    istio_certificate_service_client::IstioCertificateServiceClient,
    istio_certificate_service_server::{IstioCertificateService, IstioCertificateServiceServer},
};

/// The port Istio's CA listens on; Ambit's too by default.
pub const DEFAULT_CA_PORT: u16 = 15012;

/// The request metadata field naming the identity the caller asks a certificate for.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// Request metadata that asks for a certificate of `identity` (a SPIFFE ID).
pub fn impersonation_metadata(identity: &str) -> Struct {
    Struct {
        fields: [(
            IMPERSONATED_IDENTITY.to_string(),
            Value {
                kind: Some(Kind::StringValue(identity.to_string())),
            },
        )]
        .into(),
    }
}

/// The identity named by the request's `ImpersonatedIdentity` metadata: `None` when the field
/// is absent or the empty string (Istio's CA reads it so too: no impersonation), an error
/// naming the value's kind when it is not a string.
pub fn impersonated_identity(request: &IstioCertificateRequest) -> Result<Option<&str>, String> {
    let Some(value) = request
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
    else {
        return Ok(None);
    };
    match &value.kind {
        Some(Kind::StringValue(identity)) if identity.is_empty() => Ok(None),
        Some(Kind::StringValue(identity)) => Ok(Some(identity)),
        None | Some(Kind::NullValue(_)) => Ok(None),
        Some(other) => {
            let kind = match other {
                Kind::NumberValue(_) => "a number",
                Kind::BoolValue(_) => "a boolean",
                Kind::StructValue(_) => "a struct",
                Kind::ListValue(_) => "a list",
                Kind::StringValue(_) | Kind::NullValue(_) => unreachable!("matched above"),
            };
            Err(format!(
                "metadata {IMPERSONATED_IDENTITY} is {kind}, not a string (the SPIFFE ID to certify)"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use tonic::server::NamedService as _;

    use super::*;

    /// The method's HTTP/2 path is `/<package>.<service>/<method>`: the generated client sends
    /// it and the generated server routes it, from the service name pinned here.
    #[test]
    fn the_service_is_istios() {
        assert_eq!(
            <IstioCertificateServiceServer<Unreachable>>::NAME,
            "istio.v1.auth.IstioCertificateService"
        );
    }

    /// A service that is never called, to name the server type.
    struct Unreachable;

    #[tonic::async_trait]
    impl IstioCertificateService for Unreachable {
        async fn create_certificate(
            &self,
            _: tonic::Request<IstioCertificateRequest>,
        ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
            unreachable!("not called")
        }
    }

    #[test]
    fn request_encoding_matches_the_proto_field_numbers() {
        let request = IstioCertificateRequest {
            csr: "c".into(),
            validity_duration: 5,
            metadata: Some(impersonation_metadata("spiffe://td/ns/a/sa/b")),
        };
        let bytes = request.encode_to_vec();
        // Field 1 (LEN) "c", field 3 (VARINT) 5, then field 4 (LEN): the Struct.
        assert_eq!(&bytes[..5], &[0x0a, 1, b'c', 0x18, 5]);
        assert_eq!(bytes[5], 0x22);
        let decoded = IstioCertificateRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(
            impersonated_identity(&decoded),
            Ok(Some("spiffe://td/ns/a/sa/b"))
        );

        let response = IstioCertificateResponse {
            cert_chain: vec!["a".into(), "b".into()],
        };
        assert_eq!(response.encode_to_vec(), [0x0a, 1, b'a', 0x0a, 1, b'b']);
    }

    #[test]
    fn impersonated_identity_must_be_a_string_if_present() {
        let request = |kind: Kind| IstioCertificateRequest {
            metadata: Some(Struct {
                fields: [(
                    IMPERSONATED_IDENTITY.to_string(),
                    Value { kind: Some(kind) },
                )]
                .into(),
            }),
            ..Default::default()
        };
        let err = impersonated_identity(&request(Kind::NumberValue(1.0))).unwrap_err();
        assert!(
            err.contains("ImpersonatedIdentity is a number, not a string"),
            "{err}"
        );
        // Absent, empty or null: no impersonation, as Istio's CA reads it.
        assert_eq!(
            impersonated_identity(&IstioCertificateRequest::default()),
            Ok(None)
        );
        assert_eq!(
            impersonated_identity(&request(Kind::StringValue(String::new()))),
            Ok(None)
        );
        assert_eq!(
            impersonated_identity(&request(Kind::NullValue(0))),
            Ok(None)
        );
    }
}
