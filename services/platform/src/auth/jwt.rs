//! JWT bearer tokens: HS256 with a shared secret, RS256 and ES256 with the
//! public keys of a JWKS (a file, or a URL fetched again when a token names
//! a `kid` it does not have, at most every `jwks_refresh_secs`).
//!
//! Checked: the signature with a key of the token's own algorithm (an
//! HS256 token is checked only against the configured secret, so a public
//! key can never serve as an HMAC secret; `alg: none` does not parse),
//! `exp` (required) and `nbf` with the configured leeway, `iss` and `aud`
//! when configured, and a `sub`. The roles come from the configured claim,
//! an array of strings.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm},
};
use serde_json::Value;

use super::{JwtConfig, Principal};

/// The longest token accepted (checked before any parsing).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// The shortest HS256 secret accepted (RFC 7518 §3.2: at least the hash size).
pub const MIN_HS256_SECRET_BYTES: usize = 32;
/// The longest subject, and role, accepted; the most roles.
pub const MAX_SUBJECT_BYTES: usize = 256;
pub const MAX_ROLE_BYTES: usize = 64;
pub const MAX_ROLES: usize = 64;
/// The largest JWKS document read from a URL.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// How long a JWKS fetch may take.
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a token was refused. The text is what the caller is told: it names
/// the check, never the key, the secret or the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's algorithm is not accepted")]
    Algorithm,
    #[error("the token is signed with a key this server does not know")]
    UnknownKey,
    #[error("the token's signature is not valid")]
    Signature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token's issuer is not accepted")]
    Issuer,
    #[error("the token's audience is not accepted")]
    Audience,
    #[error("the token has no valid subject (sub)")]
    Subject,
    #[error("the token's roles claim is not a list of role names")]
    Roles,
    #[error("the keys tokens are signed with cannot be fetched now")]
    KeysUnavailable,
}

impl Refusal {
    /// The `ErrorInfo` reason of the refusal.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Malformed => "TOKEN_MALFORMED",
            Refusal::Algorithm => "TOKEN_ALGORITHM",
            Refusal::UnknownKey => "TOKEN_UNKNOWN_KEY",
            Refusal::Signature => "TOKEN_SIGNATURE",
            Refusal::Expired => "TOKEN_EXPIRED",
            Refusal::NotYetValid => "TOKEN_NOT_YET_VALID",
            Refusal::Issuer => "TOKEN_ISSUER",
            Refusal::Audience => "TOKEN_AUDIENCE",
            Refusal::Subject => "TOKEN_SUBJECT",
            Refusal::Roles => "TOKEN_ROLES",
            Refusal::KeysUnavailable => "TOKEN_KEYS_UNAVAILABLE",
        }
    }
}

/// A configuration that cannot check tokens.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("auth.jwt.hs256_secret must be at least {MIN_HS256_SECRET_BYTES} bytes")]
    ShortSecret,
    #[error("auth.jwt.jwks_file {0}: {1}")]
    JwksFile(PathBuf, String),
    #[error("auth.jwt.jwks_url must be an http:// or https:// URL")]
    JwksUrl,
    #[error("auth.jwt: give hs256_secret, jwks_file or jwks_url")]
    NoKeys,
}

/// The public keys of a JWKS that tokens may be signed with.
#[derive(Default)]
struct PublicKeys {
    /// By `kid`.
    by_kid: HashMap<String, (Algorithm, DecodingKey)>,
    /// Keys without a `kid` (a token without one is checked against the
    /// only key of its algorithm).
    unnamed: Vec<(Algorithm, DecodingKey)>,
}

impl PublicKeys {
    /// The RS256 and ES256 (P-256) keys of `set`; other keys are skipped.
    fn of(set: &JwkSet) -> PublicKeys {
        let mut keys = PublicKeys::default();
        for jwk in &set.keys {
            let algorithm = match (&jwk.algorithm, jwk.common.key_algorithm) {
                (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
                (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
                    if ec.curve == EllipticCurve::P256 =>
                {
                    Algorithm::ES256
                }
                _ => continue,
            };
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            match &jwk.common.key_id {
                Some(kid) => {
                    keys.by_kid.insert(kid.clone(), (algorithm, key));
                }
                None => keys.unnamed.push((algorithm, key)),
            }
        }
        keys
    }

    /// The key a token of `algorithm` with `kid` is checked with: `Err`
    /// when the `kid` names a key of another algorithm.
    fn find(&self, algorithm: Algorithm, kid: Option<&str>) -> Result<Option<DecodingKey>, Refusal> {
        match kid {
            Some(kid) => match self.by_kid.get(kid) {
                Some((own, key)) if *own == algorithm => Ok(Some(key.clone())),
                Some(_) => Err(Refusal::Algorithm),
                None => Ok(None),
            },
            None => {
                let mut of_algorithm = self.unnamed.iter().chain(self.by_kid.values()).filter(|(a, _)| *a == algorithm);
                match (of_algorithm.next(), of_algorithm.next()) {
                    (Some((_, key)), None) => Ok(Some(key.clone())),
                    _ => Ok(None),
                }
            }
        }
    }
}

/// Where the JWKS comes from.
enum JwksSource {
    File(PathBuf),
    Url(String, reqwest::Client),
}

/// Checks JWT bearer tokens (see the module comment).
pub struct JwtVerifier {
    hs256: Option<DecodingKey>,
    keys: RwLock<Arc<PublicKeys>>,
    source: Option<JwksSource>,
    /// When the JWKS was last fetched (a fetch is also the lock that keeps
    /// concurrent refreshes to one).
    fetched: tokio::sync::Mutex<Option<Instant>>,
    refresh_every: Duration,
    issuer: Option<String>,
    audience: Option<String>,
    roles_claim: String,
    leeway: u64,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("hs256", &self.hs256.is_some())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// The verifier of `config`, `None` when it configures no keys. A JWKS
    /// file is read now; a URL on the first token that needs it.
    pub fn new(config: &JwtConfig) -> Result<Option<JwtVerifier>, SetupError> {
        let hs256 = match &config.hs256_secret {
            Some(secret) if secret.expose().len() < MIN_HS256_SECRET_BYTES => return Err(SetupError::ShortSecret),
            Some(secret) => Some(DecodingKey::from_secret(secret.expose().as_bytes())),
            None => None,
        };
        let (source, keys) = match (&config.jwks_file, &config.jwks_url) {
            (Some(path), _) => {
                let keys = read_jwks_file(path)?;
                (Some(JwksSource::File(path.clone())), keys)
            }
            (None, Some(url)) => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(SetupError::JwksUrl);
                }
                let client = {
                    eventfold_store::install_crypto_provider();
                    reqwest::Client::builder().timeout(JWKS_TIMEOUT).build().map_err(|_| SetupError::JwksUrl)?
                };
                (Some(JwksSource::Url(url.clone(), client)), PublicKeys::default())
            }
            (None, None) => (None, PublicKeys::default()),
        };
        if hs256.is_none() && source.is_none() {
            return Ok(None);
        }
        Ok(Some(JwtVerifier {
            hs256,
            keys: RwLock::new(Arc::new(keys)),
            source,
            fetched: tokio::sync::Mutex::new(None),
            refresh_every: Duration::from_secs(config.jwks_refresh_secs.max(1)),
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            roles_claim: config.roles_claim.clone(),
            leeway: config.leeway_secs,
        }))
    }

    /// The principal of `token`, or why it is refused.
    pub async fn verify(&self, token: &str) -> Result<Principal, Refusal> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(Refusal::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| Refusal::Malformed)?;
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.clone().ok_or(Refusal::Algorithm)?,
            Algorithm::RS256 | Algorithm::ES256 => self.public_key(header.alg, header.kid.as_deref()).await?,
            _ => return Err(Refusal::Algorithm),
        };
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // A configured issuer or audience must be present, not only right
        // when present.
        let mut required = vec!["exp", "sub"];
        if self.issuer.is_some() {
            required.push("iss");
        }
        if self.audience.is_some() {
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        match &self.issuer {
            Some(issuer) => validation.set_issuer(&[issuer]),
            None => validation.iss = None,
        }
        match &self.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &key, &validation)
            .map_err(|e| refusal_of(e.kind()))?;
        let claims = data.claims;
        let subject = match claims.get("sub") {
            Some(Value::String(sub)) if valid_name(sub, MAX_SUBJECT_BYTES) => sub.clone(),
            _ => return Err(Refusal::Subject),
        };
        let roles = match claims.get(&self.roles_claim) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(values)) if values.len() <= MAX_ROLES => values
                .iter()
                .map(|v| v.as_str().filter(|r| valid_name(r, MAX_ROLE_BYTES)).map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or(Refusal::Roles)?,
            Some(_) => return Err(Refusal::Roles),
        };
        Ok(Principal { subject, roles })
    }

    /// The public key of a token of `algorithm` with `kid`: from the keys
    /// held, else from a fresh JWKS (at most every `refresh_every`).
    async fn public_key(&self, algorithm: Algorithm, kid: Option<&str>) -> Result<DecodingKey, Refusal> {
        if let Some(key) = self.held().find(algorithm, kid)? {
            return Ok(key);
        }
        let Some(source) = &self.source else {
            return Err(Refusal::Algorithm);
        };
        let mut fetched = self.fetched.lock().await;
        // Another call may have refreshed while this one waited.
        if let Some(key) = self.held().find(algorithm, kid)? {
            return Ok(key);
        }
        if fetched.is_some_and(|at| at.elapsed() < self.refresh_every) {
            return Err(Refusal::UnknownKey);
        }
        let keys = match source {
            JwksSource::File(path) => read_jwks_file(path).map_err(|e| {
                tracing::warn!(error = %e, "cannot read the JWKS file again");
                Refusal::KeysUnavailable
            }),
            JwksSource::Url(url, client) => fetch_jwks(client, url).await,
        };
        *fetched = Some(Instant::now());
        let keys = keys?;
        *self.keys.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(keys);
        self.held().find(algorithm, kid)?.ok_or(Refusal::UnknownKey)
    }

    fn held(&self) -> Arc<PublicKeys> {
        self.keys.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// A subject or role: 1 to `max` bytes of visible ASCII.
fn valid_name(value: &str, max: usize) -> bool {
    !value.is_empty() && value.len() <= max && value.bytes().all(|b| b.is_ascii_graphic())
}

fn refusal_of(kind: &ErrorKind) -> Refusal {
    match kind {
        ErrorKind::ExpiredSignature => Refusal::Expired,
        ErrorKind::ImmatureSignature => Refusal::NotYetValid,
        ErrorKind::InvalidIssuer => Refusal::Issuer,
        ErrorKind::InvalidAudience => Refusal::Audience,
        ErrorKind::InvalidSignature => Refusal::Signature,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => Refusal::Algorithm,
        ErrorKind::MissingRequiredClaim(claim) if claim == "sub" => Refusal::Subject,
        ErrorKind::MissingRequiredClaim(claim) if claim == "iss" => Refusal::Issuer,
        ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => Refusal::Audience,
        _ => Refusal::Malformed,
    }
}

fn read_jwks_file(path: &PathBuf) -> Result<PublicKeys, SetupError> {
    let text = std::fs::read(path).map_err(|e| SetupError::JwksFile(path.clone(), e.kind().to_string()))?;
    let set: JwkSet = serde_json::from_slice(&text)
        .map_err(|_| SetupError::JwksFile(path.clone(), "not a JWKS document".to_owned()))?;
    Ok(PublicKeys::of(&set))
}

async fn fetch_jwks(client: &reqwest::Client, url: &str) -> Result<PublicKeys, Refusal> {
    let unavailable = |what: &str| {
        // The URL may carry credentials: it is not logged.
        tracing::warn!(problem = what, "cannot fetch the JWKS");
        Refusal::KeysUnavailable
    };
    let response = client.get(url).send().await.map_err(|_| unavailable("request failed"))?;
    if !response.status().is_success() {
        return Err(unavailable("answered with an error status"));
    }
    if response.content_length().is_some_and(|n| usize::try_from(n).map_or(true, |n| n > MAX_JWKS_BYTES)) {
        return Err(unavailable("document too large"));
    }
    let bytes = response.bytes().await.map_err(|_| unavailable("body failed"))?;
    if bytes.len() > MAX_JWKS_BYTES {
        return Err(unavailable("document too large"));
    }
    let set: JwkSet = serde_json::from_slice(&bytes).map_err(|_| unavailable("not a JWKS document"))?;
    Ok(PublicKeys::of(&set))
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;
    use crate::auth::Secret;

    const SECRET: &str = "an-hs256-secret-of-at-least-32-bytes!";

    fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    }

    fn claims() -> Value {
        json!({"sub": "alice", "exp": now() + 600, "roles": ["orders.write"], "iss": "idp", "aud": "eventfold"})
    }

    fn hs256(claims: &Value, secret: &str) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret.as_bytes()))
            .unwrap()
    }

    fn config() -> JwtConfig {
        JwtConfig { hs256_secret: Some(Secret::new(SECRET)), ..JwtConfig::default() }
    }

    fn verifier(config: &JwtConfig) -> JwtVerifier {
        JwtVerifier::new(config).unwrap().expect("keys are configured")
    }

    /// A P-256 key: its signing key and its public JWK.
    fn ec_key(kid: &str) -> (EncodingKey, Value) {
        let pair = rcgen::KeyPair::generate().unwrap();
        let point = pair.public_key_raw();
        assert_eq!((point.len(), point[0]), (65, 4), "an uncompressed P-256 point");
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let jwk = json!({"kty": "EC", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..]),
                         "kid": kid, "alg": "ES256", "use": "sig"});
        (EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(), jwk)
    }

    fn es256(claims: &Value, key: &EncodingKey, kid: Option<&str>) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, key).unwrap()
    }

    fn write_jwks(path: &std::path::Path, keys: &[&Value]) {
        std::fs::write(path, json!({ "keys": keys }).to_string()).unwrap();
    }

    #[tokio::test]
    async fn a_valid_hs256_token_gives_its_subject_and_roles() {
        let principal = verifier(&config()).verify(&hs256(&claims(), SECRET)).await.unwrap();
        assert_eq!(principal, Principal { subject: "alice".into(), roles: vec!["orders.write".into()] });
        // Another roles claim, configured.
        let other = JwtConfig { roles_claim: "groups".into(), ..config() };
        let mut with_groups = claims();
        with_groups["groups"] = json!(["admin"]);
        let principal = verifier(&other).verify(&hs256(&with_groups, SECRET)).await.unwrap();
        assert_eq!(principal.roles, ["admin"]);
    }

    #[tokio::test]
    async fn hs256_edge_cases_are_refused() {
        let v = verifier(&JwtConfig {
            issuer: Some("idp".into()),
            audience: Some("eventfold".into()),
            leeway_secs: 5,
            ..config()
        });
        let with = |patch: Value| {
            let mut c = claims();
            for (k, value) in patch.as_object().unwrap() {
                if value.is_null() {
                    c.as_object_mut().unwrap().remove(k);
                } else {
                    c[k] = value.clone();
                }
            }
            hs256(&c, SECRET)
        };
        assert!(v.verify(&with(json!({}))).await.is_ok());
        let cases = [
            (with(json!({"exp": now() - 60})), Refusal::Expired),
            (with(json!({"nbf": now() + 60})), Refusal::NotYetValid),
            (with(json!({"iss": "evil"})), Refusal::Issuer),
            (with(json!({"aud": "another-service"})), Refusal::Audience),
            (with(json!({"iss": null})), Refusal::Issuer),
            (with(json!({"aud": null})), Refusal::Audience),
            (with(json!({"exp": null})), Refusal::Malformed),
            (with(json!({"sub": null})), Refusal::Subject),
            (with(json!({"sub": ""})), Refusal::Subject),
            (with(json!({"roles": "admin"})), Refusal::Roles),
            (with(json!({"roles": [1]})), Refusal::Roles),
            (hs256(&claims(), "another-secret-of-at-least-32-bytes!!"), Refusal::Signature),
            ("not.a.token".to_owned(), Refusal::Malformed),
            ("x".repeat(MAX_TOKEN_BYTES + 1), Refusal::Malformed),
        ];
        for (token, refusal) in cases {
            assert_eq!(v.verify(&token).await, Err(refusal), "{token}");
        }
        // Within the leeway, an expired token still passes.
        assert!(v.verify(&with(json!({"exp": now() - 2}))).await.is_ok());
    }

    #[tokio::test]
    async fn alg_none_is_refused() {
        let b64 = |text: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text);
        let token = format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(&claims().to_string()));
        assert_eq!(verifier(&config()).verify(&token).await, Err(Refusal::Malformed));
        let token = format!("{}.{}.", b64(r#"{"alg":"None","typ":"JWT"}"#), b64(&claims().to_string()));
        assert_eq!(verifier(&config()).verify(&token).await, Err(Refusal::Malformed));
    }

    #[tokio::test]
    async fn es256_from_a_jwks_file_and_no_algorithm_confusion() {
        let dir = tempfile::tempdir().unwrap();
        let jwks = dir.path().join("jwks.json");
        let (key, jwk) = ec_key("k1");
        write_jwks(&jwks, &[&jwk]);
        let config = JwtConfig { jwks_file: Some(jwks.clone()), jwks_refresh_secs: 3600, ..config() };
        let v = verifier(&config);
        assert_eq!(v.verify(&es256(&claims(), &key, Some("k1"))).await.unwrap().subject, "alice");
        // No kid: the only ES256 key.
        assert!(v.verify(&es256(&claims(), &key, None)).await.is_ok());
        // Signed by another key under the same kid: a bad signature.
        let (other, _) = ec_key("k1");
        assert_eq!(v.verify(&es256(&claims(), &other, Some("k1"))).await, Err(Refusal::Signature));
        // HS256 "signed" with the public key as the HMAC secret: only the
        // configured secret checks HS256 tokens.
        let public = jwk.to_string();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        let forged = jsonwebtoken::encode(&header, &claims(), &EncodingKey::from_secret(public.as_bytes())).unwrap();
        assert_eq!(v.verify(&forged).await, Err(Refusal::Signature));
        // A token claiming RS256 for the ES256 key's kid.
        let b64 = |text: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text);
        let header = b64(r#"{"alg":"RS256","kid":"k1","typ":"JWT"}"#);
        let forged = format!("{header}.{}.{}", b64(&claims().to_string()), b64("sig"));
        assert_eq!(v.verify(&forged).await, Err(Refusal::Algorithm));
        // Without an HS256 secret, HS256 is not accepted at all.
        let only_jwks = verifier(&JwtConfig { hs256_secret: None, ..config.clone() });
        assert_eq!(only_jwks.verify(&hs256(&claims(), SECRET)).await, Err(Refusal::Algorithm));
    }

    #[tokio::test]
    async fn an_unknown_kid_reloads_the_jwks_at_most_once_per_interval() {
        let dir = tempfile::tempdir().unwrap();
        let jwks = dir.path().join("jwks.json");
        let (old, old_jwk) = ec_key("old");
        write_jwks(&jwks, &[&old_jwk]);
        let v = verifier(&JwtConfig { jwks_file: Some(jwks.clone()), jwks_refresh_secs: 3600, ..config() });
        assert!(v.verify(&es256(&claims(), &old, Some("old"))).await.is_ok());
        // The key rotates: the new kid is unknown, the file is read again.
        let (new, new_jwk) = ec_key("new");
        write_jwks(&jwks, &[&old_jwk, &new_jwk]);
        assert_eq!(v.verify(&es256(&claims(), &new, Some("new"))).await.unwrap().subject, "alice");
        // Another unknown kid within the interval: refused without a reload.
        let (newer, newer_jwk) = ec_key("newer");
        write_jwks(&jwks, &[&old_jwk, &new_jwk, &newer_jwk]);
        assert_eq!(v.verify(&es256(&claims(), &newer, Some("newer"))).await, Err(Refusal::UnknownKey));
    }

    #[test]
    fn a_short_secret_or_a_bad_jwks_is_a_setup_error() {
        let short = JwtConfig { hs256_secret: Some(Secret::new("short")), ..JwtConfig::default() };
        assert!(matches!(JwtVerifier::new(&short), Err(SetupError::ShortSecret)));
        let missing = JwtConfig { jwks_file: Some("/nonexistent/jwks.json".into()), ..JwtConfig::default() };
        assert!(matches!(JwtVerifier::new(&missing), Err(SetupError::JwksFile(..))));
        let url = JwtConfig { jwks_url: Some("file:///etc/passwd".into()), ..JwtConfig::default() };
        assert!(matches!(JwtVerifier::new(&url), Err(SetupError::JwksUrl)));
        assert!(JwtVerifier::new(&JwtConfig::default()).unwrap().is_none());
    }
}
