//! JWT authentication at the waypoint (Istio's `RequestAuthentication`), and the JWKS fetched
//! from `jwksUri`s.
//!
//! Envoy's semantics, as Istio configures it: a request without a token passes (an
//! AuthorizationPolicy requiring `requestPrincipals` is what makes a token mandatory); a token
//! that is present and fails validation (unknown issuer, bad signature, expired, not yet valid,
//! wrong audience, keys unavailable) answers 401. Expiry and not-before allow 60 s of clock
//! skew, as Envoy. Only asymmetric algorithms are accepted (RS*, PS*, ES256/384, EdDSA): a
//! JWKS is public, so an HMAC key in it would let anyone sign.
//!
//! Keys of a `jwksUri` are fetched by the waypoint itself over HTTP(S) (hyper; rustls with the
//! system's roots for https), bounded in size ([`MAX_JWKS_BYTES`]) and time
//! ([`FETCH_TIMEOUT`]), refreshed every [`REFRESH`], retried every [`RETRY`] while failing; a
//! failed refresh keeps the last good keys. Until a URI's first fetch succeeds, tokens of its
//! issuer fail (401): never accepted unchecked.
//!
//! A token's signature is verified once per key set: `VerifiedTokens` keeps the last
//! [`VERIFIED_TOKENS`] tokens a key set verified (Envoy's JWT cache, `jwt_cache_size` 100), so a
//! client that sends the same token on every request costs one signature check, not one per
//! request. Every other check (expiry, not-before, issuer, audience) is made on every request,
//! against the clock and the rule in force; new keys (a refresh, a changed policy) verify again.
//!
//! The URIs are tenants' input, fetched from inside the mesh, so: a waypoint fetches only the
//! URIs of the policies of the services bound to it (`super::jwks_uris_of`); at most
//! [`MAX_IN_FLIGHT`] fetches run at once, so one tenant's slow URI holds one slot for
//! [`FETCH_TIMEOUT`] at most and never queues the others behind it; and the addresses a name resolves to are checked
//! before they are dialled ([`refused_jwks_address`]: link-local, cloud metadata), against
//! server-side request forgery.
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    num::NonZeroUsize,
    str::FromStr as _,
    sync::{Arc, Mutex, OnceLock, Weak},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::{HeaderValue, Request, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{DecodingKey, Validation, jwk::JwkSet};
use lru::LruCache;
use serde_json::Value;
use tokio::{net::TcpStream, sync::watch, task::JoinSet};
use tracing::{info, warn};

use crate::{
    discovery::file::{MAX_JWKS_BYTES, parse_jwks, refused_jwks_address},
    policy::l7::{JwksSource, JwtRule, RequestAuth},
    state::MeshState,
};

/// Clock skew allowed on `exp` and `nbf` (Envoy's default).
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// How long one JWKS fetch may take, resolution and connection included (Istio's default
/// `jwtRules[].timeout`).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How many JWKS fetches one waypoint runs at once, at most.
pub const MAX_IN_FLIGHT: usize = 4;
/// How often keys are fetched again after a success (Envoy's remote JWKS cache duration).
pub const REFRESH: Duration = Duration::from_secs(300);
/// How soon a failed fetch is retried.
pub const RETRY: Duration = Duration::from_secs(5);

/// How many verified tokens are remembered (Envoy's `jwt_cache_size` default).
pub const VERIFIED_TOKENS: usize = 100;
/// Longer tokens are verified on every request rather than remembered, so the cache holds at
/// most [`VERIFIED_TOKENS`] times this (800 KiB) whatever clients send.
pub const MAX_REMEMBERED_TOKEN_BYTES: usize = 8 * 1024;

/// Why a present token was refused (the 401's reason, Envoy's wording).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts, or unreadable JSON.
    #[error("Jwt is not in the form of Header.Payload.Signature: {0}")]
    Malformed(String),
    /// No rule of the policies in force names the token's issuer.
    #[error("Jwt issuer is not configured: {0:?}")]
    UnknownIssuer(String),
    /// The issuer's `jwksUri` has not been fetched successfully yet.
    #[error("Jwks remote fetch is failed: {0}")]
    NoKeys(String),
    /// A symmetric or unknown algorithm.
    #[error("Jwt algorithm is not supported: {0}")]
    Algorithm(String),
    /// No key verifies the signature.
    #[error("Jwt verification fails")]
    Signature,
    /// `exp` passed.
    #[error("Jwt is expired")]
    Expired,
    /// `nbf` not reached.
    #[error("Jwt not yet valid")]
    NotYetValid,
    /// `aud` names none of the rule's audiences.
    #[error("Audiences in Jwt are not allowed")]
    Audience,
}

/// The keys fetched from `jwksUri`s, shared by every request.
#[derive(Default)]
pub struct Jwks {
    fetched: Mutex<HashMap<String, Fetched>>,
    tls: OnceLock<Arc<rustls::ClientConfig>>,
    verified: VerifiedTokens,
}

/// The tokens whose signature was verified, each with the key set that verified it (the most
/// recently used [`VERIFIED_TOKENS`]). A token counts as verified only by that very key set
/// (`Weak::ptr_eq`): keys fetched again or configured anew, even equal ones, verify it again.
/// Only tokens that passed every check are remembered: a forged one never is. The key sets are
/// held weakly: a set replaced by a refresh is freed, not kept for the tokens it verified (a
/// tenant's JWKS may be large), and its address is not reused while a `Weak` points at it.
struct VerifiedTokens(Mutex<LruCache<String, Weak<JwkSet>>>);

impl Default for VerifiedTokens {
    fn default() -> Self {
        const ENTRIES: NonZeroUsize = NonZeroUsize::new(VERIFIED_TOKENS).unwrap();
        Self(Mutex::new(LruCache::new(ENTRIES)))
    }
}

impl VerifiedTokens {
    /// Whether `keys` verified `token`'s signature before.
    fn verified_by(&self, token: &str, keys: &Arc<JwkSet>) -> bool {
        // Never remembered: not worth hashing under the lock.
        if token.len() > MAX_REMEMBERED_TOKEN_BYTES {
            return false;
        }
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .is_some_and(|verifier| Weak::ptr_eq(verifier, &Arc::downgrade(keys)))
    }

    /// Remembers that `keys` verified `token` (unless it is longer than
    /// [`MAX_REMEMBERED_TOKEN_BYTES`]).
    fn remember(&self, token: &str, keys: &Arc<JwkSet>) {
        if token.len() <= MAX_REMEMBERED_TOKEN_BYTES {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .put(token.to_string(), Arc::downgrade(keys));
        }
    }
}

struct Fetched {
    keys: Option<Arc<JwkSet>>,
    /// When to fetch again.
    due: Instant,
}

impl Jwks {
    /// The last good keys of `uri`.
    pub fn keys(&self, uri: &str) -> Option<Arc<JwkSet>> {
        self.fetched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(uri)
            .and_then(|f| f.keys.clone())
    }

    /// Keeps the keys of the `jwksUri`s that apply at this waypoint fresh (`uris` of the state:
    /// `super::jwks_uris_of`, those of the RequestAuthentications of the services bound to
    /// it), until the state's sender is gone.
    ///
    /// Fetches run concurrently, at most [`MAX_IN_FLIGHT`] at a time, each bounded by
    /// [`FETCH_TIMEOUT`]: one slow URI holds one slot for at most that long and delays no
    /// other's fetch while a slot is free. A URI due again waits for a free slot, the ones due
    /// longest first.
    pub async fn refresh(
        self: Arc<Self>,
        mut state: watch::Receiver<Arc<MeshState>>,
        uris: impl Fn(&MeshState) -> Vec<String>,
    ) {
        let mut in_flight: JoinSet<(String, anyhow::Result<JwkSet>)> = JoinSet::new();
        let mut fetching: HashSet<String> = HashSet::new();
        loop {
            let uris = uris(&state.borrow_and_update());
            let now = Instant::now();
            let next = {
                let mut fetched = self.fetched.lock().unwrap_or_else(|e| e.into_inner());
                // Forget the URIs no policy here names any more: the cache is bounded by the
                // state.
                fetched.retain(|uri, _| uris.contains(uri));
                // Never fetched first (due now), then by how long they have been due.
                let mut due: Vec<(Option<Instant>, &String)> = uris
                    .iter()
                    .filter(|uri| !fetching.contains(*uri))
                    .map(|uri| (fetched.get(uri).map(|f| f.due), uri))
                    .filter(|(due, _)| due.is_none_or(|due| due <= now))
                    .collect();
                due.sort();
                for (_, uri) in due {
                    if in_flight.len() >= MAX_IN_FLIGHT {
                        break;
                    }
                    fetching.insert(uri.clone());
                    let (this, uri) = (self.clone(), uri.clone());
                    in_flight.spawn(async move {
                        let result = this.fetch(&uri).await;
                        (uri, result)
                    });
                }
                fetched
                    .iter()
                    .filter(|(uri, _)| !fetching.contains(*uri))
                    .map(|(_, f)| f.due)
                    .min()
            };
            let sleep = next
                .map(|due| due.saturating_duration_since(Instant::now()))
                .unwrap_or(REFRESH);
            tokio::select! {
                changed = state.changed() => if changed.is_err() { return },
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Ok((uri, result)) = done {
                        fetching.remove(&uri);
                        self.record(uri, result);
                    } else {
                        // A fetch task panicked or was cancelled: start over with what is known.
                        fetching.clear();
                        in_flight.abort_all();
                    }
                }
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// Keeps the outcome of a fetch of `uri`: new keys, or the last good ones and a retry soon.
    fn record(&self, uri: String, result: anyhow::Result<JwkSet>) {
        let mut fetched = self.fetched.lock().unwrap_or_else(|e| e.into_inner());
        let entry = fetched.entry(uri.clone()).or_insert(Fetched {
            keys: None,
            due: Instant::now(),
        });
        match result {
            Ok(keys) => {
                info!(jwks_uri = %uri, keys = keys.keys.len(), "JWKS fetched");
                entry.keys = Some(Arc::new(keys));
                entry.due = Instant::now() + REFRESH;
            }
            Err(err) => {
                warn!(
                    jwks_uri = %uri,
                    error = format!("{err:#}"),
                    kept_last_good = entry.keys.is_some(),
                    "JWKS fetch failed"
                );
                entry.due = Instant::now() + RETRY;
            }
        }
    }

    async fn fetch(&self, uri: &str) -> anyhow::Result<JwkSet> {
        tokio::time::timeout(FETCH_TIMEOUT, self.fetch_unbounded(uri))
            .await
            .with_context(|| format!("no answer within {FETCH_TIMEOUT:?}"))?
    }

    async fn fetch_unbounded(&self, uri: &str) -> anyhow::Result<JwkSet> {
        let parsed: Uri = uri.parse()?;
        let host = parsed.host().context("no host")?.to_string();
        let https = match parsed.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            other => bail!("scheme {other:?}: only http and https are fetched"),
        };
        let port = parsed.port_u16().unwrap_or(if https { 443 } else { 80 });
        let bare_host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let tcp = connect(&bare_host, port).await?;
        let path = parsed
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let authority = parsed.authority().context("no authority")?.to_string();
        let request = Request::get(path)
            .header(header::HOST, authority)
            .header(header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())?;
        let body = if https {
            let name = rustls::pki_types::ServerName::try_from(bare_host.clone())
                .with_context(|| format!("{bare_host:?} is not a TLS server name"))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls_config()?)
                .connect(name, tcp)
                .await
                .context("TLS handshake")?;
            get(TokioIo::new(tls), request).await?
        } else {
            get(TokioIo::new(tcp), request).await?
        };
        parse_jwks(&body).map_err(anyhow::Error::msg)
    }

    /// rustls with the system's roots, built on the first https fetch.
    fn tls_config(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        if let Some(config) = self.tls.get() {
            return Ok(config.clone());
        }
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if roots.is_empty() {
            bail!("no system root certificates to verify an https jwksUri");
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(self.tls.get_or_init(|| Arc::new(config)).clone())
    }
}

/// One HTTP/1.1 GET over `io`; the body of a 200, at most [`MAX_JWKS_BYTES`].
async fn get<IO>(io: IO, request: Request<Empty<Bytes>>) -> anyhow::Result<Bytes>
where
    IO: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    if response.status() != http::StatusCode::OK {
        bail!("HTTP {}", response.status());
    }
    let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the body (at most {MAX_JWKS_BYTES} bytes): {e}"))?;
    Ok(body.to_bytes())
}

/// A connection to `host:port` for a JWKS fetch: the name resolved once, every address it
/// resolves to checked ([`refused_jwks_address`]: link-local and cloud metadata addresses are
/// never dialled, whatever name leads there), then the first allowed address that answers. The
/// address checked is the one dialled (no second resolution a rebinding DNS could answer
/// differently); redirects are not followed (a 3xx is a failed fetch).
async fn connect(host: &str, port: u16) -> anyhow::Result<TcpStream> {
    let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("resolving {host}"))?
        .collect();
    let mut last = None;
    for addr in &resolved {
        if let Some(why) = refused_jwks_address(addr.ip()) {
            last = Some(anyhow::anyhow!(
                "{host} resolves to {}, {why}: not fetched",
                addr.ip()
            ));
            continue;
        }
        match TcpStream::connect(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(anyhow::Error::new(e).context(format!("connecting to {addr}"))),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("{host} resolves to no address")))
}

/// Where a token was found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    Header(String),
    Param(String),
}

/// Validates the token of `request` against `rules` (the RequestAuthentications in force
/// where it is): `Ok(None)` without a token, the request's identity with a valid one, the
/// reason with an invalid one. A valid token is removed unless its rule forwards it, and the
/// rule's output headers are set; the output headers of every rule are first removed from the
/// request, so that a client cannot send its own.
pub fn authenticate<B>(
    rules: &[&JwtRule],
    jwks: &Jwks,
    request: &mut Request<B>,
) -> Result<Option<RequestAuth>, JwtError> {
    if rules.is_empty() {
        return Ok(None);
    }
    for rule in rules {
        let outputs = rule
            .output_payload_to_header
            .iter()
            .chain(rule.output_claim_to_headers.iter().map(|(h, _)| h));
        for name in outputs {
            request.headers_mut().remove(name.as_str());
        }
    }
    let Some((location, token)) = find_token(rules, request) else {
        return Ok(None);
    };
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("not three parts".into()));
    };
    let header =
        jsonwebtoken::decode_header(&token).map_err(|e| JwtError::Malformed(e.to_string()))?;
    let unverified: Value = {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|e| JwtError::Malformed(format!("payload: {e}")))?;
        serde_json::from_slice(&bytes).map_err(|e| JwtError::Malformed(format!("payload: {e}")))?
    };
    let issuer = unverified
        .get("iss")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let rule = rules
        .iter()
        .find(|r| r.issuer == issuer && locations(r).contains(&location))
        .ok_or_else(|| JwtError::UnknownIssuer(issuer.to_string()))?;
    use jsonwebtoken::Algorithm::*;
    if !matches!(
        header.alg,
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 | ES256 | ES384 | EdDSA
    ) {
        return Err(JwtError::Algorithm(format!("{:?}", header.alg)));
    }
    let keys = match &rule.keys {
        JwksSource::Inline(keys) => keys.clone(),
        JwksSource::Uri(uri) => jwks
            .keys(uri)
            .ok_or_else(|| JwtError::NoKeys(uri.clone()))?,
    };
    let mut validation = Validation::new(header.alg);
    // `exp` and `nbf` are checked here ([`check_times`]): jsonwebtoken skips one it cannot
    // read as an integer, so a token with `"exp": 1700000000.5` would never expire.
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.required_spec_claims.clear();
    validation.set_issuer(&[&rule.issuer]);
    // Audiences are compared as Envoy does ([`audience_allowed`]), below.
    validation.validate_aud = false;
    // A key set that verified this very token before need not check its signature again; the
    // claims are the payload read above either way (what jsonwebtoken decodes is those bytes),
    // and are checked below on every request (the clock moved; the rule may be another with
    // the same keys).
    let remembered = jwks.verified.verified_by(&token, &keys);
    if !remembered {
        // Envoy's choice of keys (jwt_verify_lib's `verifyJwt`): a key with a `kid` only for a
        // token with none or the same, a key with an `alg` only for a token of that algorithm.
        let candidates = keys.keys.iter().filter(|k| {
            let kid_fits =
                header.kid.is_none() || k.common.key_id.is_none() || k.common.key_id == header.kid;
            let alg_fits = k.common.key_algorithm.is_none_or(|alg| {
                jsonwebtoken::Algorithm::from_str(&alg.to_string()).is_ok_and(|a| a == header.alg)
            });
            kid_fits && alg_fits
        });
        let mut verified = false;
        for key in candidates {
            let Ok(decoding) = DecodingKey::from_jwk(key) else {
                continue;
            };
            // The claims are not deserialized again: `unverified` holds them.
            match jsonwebtoken::decode::<serde::de::IgnoredAny>(&token, &decoding, &validation) {
                Ok(_) => {
                    verified = true;
                    break;
                }
                Err(e) => match refusal(&e, issuer) {
                    Some(refused) => return Err(refused),
                    // A key of another type or algorithm, or not the signer: try the next one.
                    None => continue,
                },
            }
        }
        if !verified {
            return Err(JwtError::Signature);
        }
    }
    let claims = unverified;
    check_times(&claims, jsonwebtoken::get_current_timestamp())?;
    if !audience_allowed(&rule.audiences, &token_audiences(&claims)?) {
        return Err(JwtError::Audience);
    }
    if !remembered {
        jwks.verified.remember(&token, &keys);
    }
    if !rule.forward_original_token {
        match &location {
            Location::Header(name) => {
                request.headers_mut().remove(name.as_str());
            }
            Location::Param(_) => {}
        }
    }
    if let Some(name) = &rule.output_payload_to_header
        && let Ok(value) = HeaderValue::from_str(payload)
        && let Ok(name) = http::HeaderName::from_bytes(name.as_bytes())
    {
        request.headers_mut().insert(name, value);
    }
    for (name, claim) in &rule.output_claim_to_headers {
        let text = match claims.get(claim) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Bool(b)) => b.to_string(),
            Some(Value::Number(n)) => n.to_string(),
            _ => continue,
        };
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&text),
        ) {
            request.headers_mut().insert(name, value);
        }
    }
    Ok(Some(RequestAuth::from_claims(claims)))
}

/// The refusal a decoding error means whichever key is tried (another issuer); `None` for
/// those that only say this key did not verify the token.
fn refusal(e: &jsonwebtoken::errors::Error, issuer: &str) -> Option<JwtError> {
    match e.kind() {
        jsonwebtoken::errors::ErrorKind::InvalidIssuer => {
            Some(JwtError::UnknownIssuer(issuer.to_string()))
        }
        _ => None,
    }
}

/// `exp` and `nbf` against `now` (seconds since the epoch), as Envoy: each optional, a
/// non-negative number (a fraction is dropped), [`CLOCK_SKEW`] allowed either way; anything
/// else in them makes the token malformed.
fn check_times(claims: &Value, now: u64) -> Result<(), JwtError> {
    let time = |claim: &str| -> Result<Option<u64>, JwtError> {
        match claims.get(claim) {
            None => Ok(None),
            Some(value) => match value.as_f64() {
                Some(seconds) if seconds >= 0.0 => Ok(Some(seconds as u64)),
                _ => Err(JwtError::Malformed(format!(
                    "{claim} is not a non-negative number: {value}"
                ))),
            },
        }
    };
    let skew = CLOCK_SKEW.as_secs();
    if let Some(exp) = time("exp")?
        && now > exp.saturating_add(skew)
    {
        return Err(JwtError::Expired);
    }
    if let Some(nbf) = time("nbf")?
        && now.saturating_add(skew) < nbf
    {
        return Err(JwtError::NotYetValid);
    }
    Ok(())
}

/// The token's `aud`: none, a string, or a list of strings (anything else makes the token
/// malformed, as Envoy).
fn token_audiences(claims: &Value) -> Result<Vec<&str>, JwtError> {
    let malformed = || JwtError::Malformed("aud is not a string or a list of strings".into());
    match claims.get("aud") {
        None => Ok(Vec::new()),
        Some(Value::String(one)) => Ok(vec![one]),
        Some(Value::Array(many)) => many
            .iter()
            .map(|aud| aud.as_str().ok_or_else(malformed))
            .collect(),
        Some(_) => Err(malformed()),
    }
}

/// Whether the token's audiences ([`token_audiences`]) name one of the rule's, as Envoy compares
/// them (`CheckAudience`): any when the rule lists none; none when the token has no `aud`; each
/// side without an `http://` or `https://` prefix and a trailing slash, so
/// `https://api.example.com/` and `api.example.com` are one audience.
fn audience_allowed(audiences: &[String], named: &[&str]) -> bool {
    if audiences.is_empty() {
        return true;
    }
    fn sanitized(audience: &str) -> &str {
        let without_scheme = ["http://", "https://"]
            .iter()
            .find_map(|scheme| audience.strip_prefix(scheme))
            .unwrap_or(audience);
        without_scheme.strip_suffix('/').unwrap_or(without_scheme)
    }
    named
        .iter()
        .any(|aud| audiences.iter().any(|a| sanitized(a) == sanitized(aud)))
}

fn locations(rule: &JwtRule) -> Vec<Location> {
    rule.from_headers
        .iter()
        .map(|(name, _)| Location::Header(name.clone()))
        .chain(rule.from_params.iter().cloned().map(Location::Param))
        .collect()
}

/// The first token found at one of the rules' locations: headers (value minus the prefix),
/// then query parameters.
fn find_token<B>(rules: &[&JwtRule], request: &Request<B>) -> Option<(Location, String)> {
    for rule in rules {
        for (name, prefix) in &rule.from_headers {
            if let Some(value) = request.headers().get(name.as_str())
                && let Ok(value) = value.to_str()
            {
                let token = if prefix.is_empty() {
                    Some(value)
                } else if value.len() >= prefix.len()
                    && value[..prefix.len()].eq_ignore_ascii_case(prefix)
                {
                    Some(&value[prefix.len()..])
                } else {
                    None
                };
                if let Some(token) = token.map(str::trim).filter(|t| !t.is_empty()) {
                    return Some((Location::Header(name.clone()), token.to_string()));
                }
            }
        }
    }
    let query = request.uri().query()?;
    for rule in rules {
        for param in &rule.from_params {
            let found = query
                .split('&')
                .filter_map(|pair| pair.split_once('='))
                .find(|(key, value)| key == param && !value.is_empty());
            if let Some((_, value)) = found {
                return Some((Location::Param(param.clone()), value.to_string()));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests;
