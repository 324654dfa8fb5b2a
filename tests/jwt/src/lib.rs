//! A JWT issuer for tests and benchmarks: fresh ES256 or EdDSA keys (rcgen, ring), their JWKS,
//! and tokens signed with them (jsonwebtoken), as an identity provider would issue.
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// One signing key and the issuer it signs for.
pub struct TestIssuer {
    /// `iss` of the tokens.
    pub issuer: String,
    kid: String,
    alg: Algorithm,
    private_pkcs8: Vec<u8>,
    jwk: Value,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl TestIssuer {
    /// An issuer signing with a new P-256 key (ES256), key id `kid`.
    pub fn es256(issuer: &str, kid: &str) -> Self {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .expect("generating a P-256 key");
        // Uncompressed point: 0x04, x, y.
        let point = key.public_key_raw();
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        });
        Self {
            issuer: issuer.into(),
            kid: kid.into(),
            alg: Algorithm::ES256,
            private_pkcs8: key.serialize_der(),
            jwk,
        }
    }

    /// An issuer signing with a new Ed25519 key (EdDSA), key id `kid`.
    pub fn ed25519(issuer: &str, kid: &str) -> Self {
        let key =
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("generating an Ed25519 key");
        let jwk = json!({
            "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": kid,
            "x": b64(key.public_key_raw()),
        });
        Self {
            issuer: issuer.into(),
            kid: kid.into(),
            alg: Algorithm::EdDSA,
            private_pkcs8: key.serialize_der(),
            jwk,
        }
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> Value {
        self.jwk.clone()
    }

    /// A JWKS of these issuers' keys, as a JSON string.
    pub fn jwks(issuers: &[&TestIssuer]) -> String {
        json!({"keys": issuers.iter().map(|i| i.jwk()).collect::<Vec<_>>()}).to_string()
    }

    /// The current time, in seconds since the epoch.
    pub fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default()
    }

    /// A token for `sub`, valid for an hour, with `extra` claims merged in (they may override
    /// `iss`, `sub`, `exp`...).
    pub fn token(&self, sub: &str, extra: Value) -> String {
        let now = Self::now();
        let mut claims = json!({"iss": self.issuer, "sub": sub, "iat": now, "exp": now + 3600});
        if let (Some(claims), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                claims.insert(k.clone(), v.clone());
            }
        }
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        let key = match self.alg {
            Algorithm::EdDSA => EncodingKey::from_ed_der(&self.private_pkcs8),
            _ => EncodingKey::from_ec_der(&self.private_pkcs8),
        };
        jsonwebtoken::encode(&header, &claims, &key).expect("signing a test token")
    }
}
