//! The wire API of Istio's CA, `istio.v1.auth.IstioCertificateService` (see `agent/proto/ca.proto`).
//!
//! The messages and the tonic glue are written by hand rather than generated at build time:
//! generation needs `protoc` (or a descriptor compiler) on every build machine for two messages
//! and one unary method. What is here mirrors what `tonic-prost-build` emits; the field numbers
//! and types must stay exactly those of `ca.proto` (a test pins the encoding).
use std::{
    convert::Infallible,
    future::Future,
    sync::Arc,
    task::{Context, Poll},
};

use prost_types::{Struct, Value, value::Kind};
use tonic::{
    Request, Response, Status,
    codegen::{Body, BoxFuture, GrpcMethod, Service, StdError, http},
};

/// The gRPC service name.
pub const SERVICE_NAME: &str = "istio.v1.auth.IstioCertificateService";
/// The gRPC method name.
pub const METHOD_NAME: &str = "CreateCertificate";
/// The HTTP/2 path of the method.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// The request metadata field naming the identity the caller asks a certificate for.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// A certificate signing request (`istio.v1.auth.IstioCertificateRequest`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded PKCS#10 certificate signing request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested lifetime in seconds; 0 or less asks for the CA's default.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    /// Options; `ImpersonatedIdentity` (a string) names the identity to certify.
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<Struct>,
}

/// The signed certificate (`istio.v1.auth.IstioCertificateResponse`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    /// PEM certificates: the leaf first, the root last.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

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

/// Calls `CreateCertificate` on `channel` (any tonic transport: a `Channel` in practice).
pub async fn create_certificate<T>(
    channel: T,
    request: Request<IstioCertificateRequest>,
) -> Result<Response<IstioCertificateResponse>, Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("CA connection not ready: {}", e.into())))?;
    let mut request = request;
    request
        .extensions_mut()
        .insert(GrpcMethod::new(SERVICE_NAME, METHOD_NAME));
    grpc.unary(
        request,
        http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE_PATH),
        tonic_prost::ProstCodec::default(),
    )
    .await
}

/// The server side of the API: what a CA implements.
pub trait CertificateService: Send + Sync + 'static {
    /// Handles one `CreateCertificate` call.
    fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> impl Future<Output = Result<Response<IstioCertificateResponse>, Status>> + Send;
}

/// Adapts a [`CertificateService`] to the tower service a tonic server runs; other paths get
/// `Unimplemented`.
#[derive(Debug)]
pub struct CertificateServer<S> {
    inner: Arc<S>,
}

impl<S> CertificateServer<S> {
    /// Serves `inner`.
    pub fn new(inner: Arc<S>) -> Self {
        Self { inner }
    }
}

impl<S> Clone for CertificateServer<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

/// The unary method as tonic's `Grpc::unary` wants it.
struct CreateCertificateMethod<S>(Arc<S>);

impl<S: CertificateService> Service<Request<IstioCertificateRequest>>
    for CreateCertificateMethod<S>
{
    type Response = Response<IstioCertificateResponse>;
    type Error = Status;
    type Future = BoxFuture<Self::Response, Status>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<IstioCertificateRequest>) -> Self::Future {
        let inner = Arc::clone(&self.0);
        Box::pin(async move { inner.create_certificate(request).await })
    }
}

impl<S, B> Service<http::Request<B>> for CertificateServer<S>
where
    S: CertificateService,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != CREATE_CERTIFICATE_PATH {
            let path = request.uri().path().to_string();
            return Box::pin(async move {
                Ok(Status::unimplemented(format!("no such method: {path}")).into_http())
            });
        }
        let method = CreateCertificateMethod(Arc::clone(&self.inner));
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(method, request).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

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
