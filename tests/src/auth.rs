//! Credentials for tests of authenticated servers: an HS256 secret the
//! server is configured with, and tokens signed with it.

use jsonwebtoken::{Algorithm, EncodingKey, Header};

/// The HS256 secret of test servers (`[auth.jwt] hs256_secret`).
pub const HS256_SECRET: &str = "eventfold-tests-hs256-secret-32-bytes-long";

/// A token for `subject` with `roles`, valid for an hour.
pub fn token(subject: &str, roles: &[&str]) -> String {
    token_with(&serde_json::json!({ "sub": subject, "roles": roles, "exp": now() + 3600 }))
}

/// A token with exactly `claims`, signed with [`HS256_SECRET`].
pub fn token_with(claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(HS256_SECRET.as_bytes()))
        .expect("a token")
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs()
}

/// `authorization: Bearer …` metadata value of `token`.
pub fn bearer(token: &str) -> tonic::metadata::MetadataValue<tonic::metadata::Ascii> {
    format!("Bearer {token}").parse().expect("a header value")
}
