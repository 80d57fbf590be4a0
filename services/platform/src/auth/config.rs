//! `[auth]`: whether calls must authenticate, and how tokens are checked.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[auth]` (`EVENTFOLD_AUTH__…`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Whether every call must authenticate. Unset: the process decides
    /// (`serve`: on; `eventfold dev`: off, said loudly in the log).
    pub enabled: Option<bool>,
    /// Whether server reflection is open (it lists the services and their
    /// messages; turn it off in production if that is too much).
    pub reflection: bool,
    /// JWT bearer tokens.
    pub jwt: JwtConfig,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self { enabled: None, reflection: true, jwt: JwtConfig::default() }
    }
}

/// `[auth.jwt]`: the keys tokens are signed with and the claims checked.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// The shared secret of HS256 tokens (at least 32 bytes).
    pub hs256_secret: Option<Secret>,
    /// A JWKS file with the public keys of RS256 and ES256 tokens.
    pub jwks_file: Option<PathBuf>,
    /// A JWKS URL with the public keys of RS256 and ES256 tokens, fetched
    /// on start and again when a token names an unknown `kid`.
    pub jwks_url: Option<String>,
    /// The `iss` every token must carry (unset: not checked).
    pub issuer: Option<String>,
    /// An `aud` every token must carry (unset: not checked).
    pub audience: Option<String>,
    /// The claim with the caller's roles: an array of strings.
    pub roles_claim: String,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// The JWKS is fetched again at most this often, in seconds.
    pub jwks_refresh_secs: u64,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            hs256_secret: None,
            jwks_file: None,
            jwks_url: None,
            issuer: None,
            audience: None,
            roles_claim: "roles".to_owned(),
            leeway_secs: 30,
            jwks_refresh_secs: 30,
        }
    }
}

/// A secret from the configuration: read like a string, never shown
/// (`Debug` and `--dump-config` print `<redacted>`).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the code that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_never_shown() {
        let config = JwtConfig { hs256_secret: Some(Secret::new("s3cret-s3cret")), ..JwtConfig::default() };
        assert!(!format!("{config:?}").contains("s3cret"));
        assert!(!serde_json::to_string(&config).unwrap().contains("s3cret"));
        assert_eq!(config.hs256_secret.unwrap().expose(), "s3cret-s3cret");
    }
}
