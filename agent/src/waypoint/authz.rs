//! The waypoint's security step, before routing: JWT authentication
//! ([`super::jwt::authenticate`]), then authorization ([`crate::policy::l7`]), with the
//! policies attached to the service dialled or to the waypoint it is bound to.
//!
//! Answers as Envoy's: an invalid token 401 (`www-authenticate: Bearer`); a denied request
//! 403 with the body `RBAC: access denied`. Neither sets a response flag (Envoy has none for
//! them); the access log's `error` holds Envoy's response code details
//! (`rbac_access_denied_matched_policy[ns.name]`, `[none]` for a default deny, or
//! `jwt_authn_access_denied{<reason>}`).
use std::{net::SocketAddr, sync::Arc};

use http::{Request, StatusCode};
use tracing::info;

use super::{jwt::Jwks, metrics::RequestFlags, observe};
use crate::{
    identity::SpiffeId,
    policy::l7::{Attachment, RequestInfo},
    state::{MeshState, Service},
    telemetry::clip,
};

/// The body of a 403 from authorization (Envoy's).
pub const RBAC_DENIED_BODY: &str = "RBAC: access denied";
/// The body of a 401 from JWT authentication (Envoy's).
pub const JWT_DENIED_BODY: &str = "Jwt verification fails";

/// What the security step keeps between requests.
#[derive(Default)]
pub struct Authz {
    /// The keys fetched from `jwksUri`s.
    pub jwks: Arc<Jwks>,
}

/// Who sent a request and where: the tunnel's side of it.
pub struct Peer<'a> {
    /// The tunnel's verified identity.
    pub identity: &'a SpiffeId,
    /// The tunnel's source.
    pub source: SocketAddr,
    /// The VIP and port dialled.
    pub dialled: SocketAddr,
}

/// Authenticates and authorizes `request`; on refusal, the status, flags and the reason to log
/// (the shape of the proxy's other local replies).
pub fn authorize<B>(
    authz: &Authz,
    state: &MeshState,
    peer: &Peer<'_>,
    mut request: Request<B>,
) -> Result<Request<B>, (StatusCode, RequestFlags, String)> {
    let Some(service) = state.service_by_vip(peer.dialled.ip()) else {
        // Routing answers this one (no route): nothing here to attach policies to.
        return Ok(request);
    };
    let at = attachment(service);
    let policies = state.policies().waypoint();
    let rules = policies.jwt_rules(&at);
    let auth = super::jwt::authenticate(&rules, &authz.jwks, &mut request).map_err(|e| {
        (
            StatusCode::UNAUTHORIZED,
            RequestFlags::None,
            format!("jwt_authn_access_denied{{{e}}}"),
        )
    })?;
    let info = RequestInfo {
        src_ip: peer.source.ip(),
        src_identity: Some(peer.identity),
        dst_ip: peer.dialled.ip(),
        dst_port: peer.dialled.port(),
        method: request.method().as_str(),
        path: request.uri().path(),
        host: request
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                request
                    .headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or_default(),
        headers: request.headers(),
        auth: auth.as_ref(),
    };
    let decision = policies.authorize(&at, &info);
    if let Some((would_allow, reason)) = &decision.dry_run {
        // Cut as the request's own access line is (the client's values could make the line
        // longer than the log keeps).
        let (path, path_bytes) = observe::logged_path(info.path);
        info!(
            target: crate::telemetry::ACCESS_TARGET,
            reporter = "waypoint",
            src_principal = %peer.identity,
            dst = %peer.dialled,
            method = clip(info.method, observe::LOGGED_METHOD_MAX),
            path,
            path_bytes,
            dry_run_allowed = would_allow,
            dry_run_reason = clip(&reason.to_string(), observe::LOGGED_TEXT_MAX),
            "dry-run authorization policy"
        );
    }
    if decision.allowed {
        Ok(request)
    } else {
        Err((
            StatusCode::FORBIDDEN,
            RequestFlags::None,
            format!("{}: {}", decision.reason.details(), decision.reason),
        ))
    }
}

/// Authorizes an opaque TCP connection (not HTTP) by the same policies, with Istio's TCP
/// semantics ([`crate::policy::l7::WaypointPolicies::authorize_opaque`]); on refusal, the
/// reason to log. A connection to an address that is no longer a service VIP passes here
/// (forwarding then fails: nothing to attach policies to).
pub fn authorize_opaque(state: &MeshState, peer: &Peer<'_>) -> Result<(), String> {
    let Some(service) = state.service_by_vip(peer.dialled.ip()) else {
        return Ok(());
    };
    let at = attachment(service);
    let decision = state.policies().waypoint().authorize_opaque(
        &at,
        peer.source.ip(),
        peer.identity,
        peer.dialled,
    );
    if let Some((would_allow, reason)) = &decision.dry_run {
        info!(
            target: crate::telemetry::ACCESS_TARGET,
            reporter = "waypoint",
            src_principal = %peer.identity,
            dst = %peer.dialled,
            protocol = "tcp",
            dry_run_allowed = would_allow,
            dry_run_reason = clip(&reason.to_string(), observe::LOGGED_TEXT_MAX),
            "dry-run authorization policy"
        );
    }
    if decision.allowed {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            decision.reason.details(),
            decision.reason
        ))
    }
}

/// Why opaque TCP to `service` is refused, if it is: a service with a RateLimitPolicy or a
/// RequestAuthentication is HTTP-only at the waypoint. Those are enforced per request; bytes that
/// did not show as HTTP (a client silent past the detection timeout, then sending a request)
/// would pass around them, so they do not pass at all.
pub fn http_only(state: &MeshState, service: &Service) -> Option<String> {
    if state.routes().rate_limits.contains_key(&service.uid()) {
        return Some(format!(
            "service {} has a RateLimitPolicy: only HTTP is carried",
            service.uid()
        ));
    }
    let jwt = state.policies().waypoint().jwt_rules(&attachment(service));
    (!jwt.is_empty()).then(|| {
        format!(
            "service {} has a RequestAuthentication: only HTTP is carried",
            service.uid()
        )
    })
}

/// Where a request or connection to `service` is: the service and the waypoint it is bound to.
pub(super) fn attachment(service: &Service) -> Attachment<'_> {
    Attachment {
        service: (&service.namespace, &service.name),
        waypoint: service
            .waypoint
            .as_ref()
            .map(|w| (w.namespace.as_str(), w.name.as_str())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::parse_mesh;

    /// A service with a RateLimitPolicy or a RequestAuthentication takes HTTP only; another
    /// one takes opaque TCP too.
    #[test]
    fn services_with_per_request_policies_refuse_opaque_tcp() {
        let issuer = ambit_test_jwt::TestIssuer::es256("https://idp.example", "k1");
        let jwks = ambit_test_jwt::TestIssuer::jwks(&[&issuer]);
        let mesh = format!(
            r#"
workloads:
- {{name: web-0, namespace: shop, node: n0, ips: [10.10.0.4], labels: {{app: web}}, netns: {{pid: 1}}}}
services:
- {{name: web, namespace: shop, vips: [10.96.0.10], selector: {{app: web}}, ports: [{{port: 80}}]}}
- {{name: api, namespace: shop, vips: [10.96.0.11], selector: {{app: web}}, ports: [{{port: 80}}]}}
- {{name: db, namespace: shop, vips: [10.96.0.12], selector: {{app: web}}, ports: [{{port: 80}}]}}
rateLimitPolicies:
- apiVersion: networking.ambit.dev/v1
  kind: RateLimitPolicy
  metadata: {{name: limit, namespace: shop}}
  spec:
    targetRefs: [{{kind: Service, name: web}}]
    tokenBucket: {{maxTokens: 10, tokensPerFill: 1, fillInterval: 1s}}
requestAuthentications:
- name: jwt
  namespace: shop
  targetRefs: [{{kind: Service, name: api}}]
  jwtRules: [{{issuer: "https://idp.example", jwks: '{jwks}'}}]
"#
        );
        let state = parse_mesh(std::path::Path::new("mesh.yaml"), mesh.as_bytes()).unwrap();
        let service = |vip: &str| state.service_by_vip(vip.parse().unwrap()).unwrap();
        let web = http_only(&state, service("10.96.0.10")).expect("web is HTTP-only");
        assert!(web.contains("RateLimitPolicy"), "{web}");
        let api = http_only(&state, service("10.96.0.11")).expect("api is HTTP-only");
        assert!(api.contains("RequestAuthentication"), "{api}");
        assert_eq!(http_only(&state, service("10.96.0.12")), None);
    }
}
