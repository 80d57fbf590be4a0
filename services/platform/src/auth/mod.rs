//! Authentication and authorization of every gRPC call, in one tower layer
//! ([`layer::AuthLayer`]) that every server runs, whatever it hosts:
//!
//! - who calls: a JWT bearer token ([`jwt`]) or an API key ([`keys`]),
//!   from the `authorization` or `x-api-key` header;
//! - what they may call: the RPC's `(eventfold.auth.v1.access)` option,
//!   read from the descriptor sets ([`policy`]);
//! - the authenticated subject replaces whatever `x-eventfold-principal`
//!   the client sent, so the command envelope and every event's `user_id`
//!   carry who was authenticated, never a claim of the client.
//!
//! Health checks (and reflection, unless turned off) stay open.

pub mod config;
pub mod dev;
pub mod jwt;
pub mod keys;
pub mod layer;
pub mod policy;

use futures_util::future::BoxFuture;

pub use config::{AuthConfig, JwtConfig, Secret};
pub use layer::{AuthLayer, Authenticator};

/// The header that carries the authenticated subject to the services. The
/// layer removes a client's own and sets it from the credentials.
pub const PRINCIPAL_HEADER: &str = "x-eventfold-principal";
/// The header of an API key (also `authorization: ApiKey …`).
pub const API_KEY_HEADER: &str = "x-api-key";
/// The role that may call every RPC.
pub const ADMIN_ROLE: &str = "admin";

/// Who is calling, as the credentials proved it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The JWT's `sub`, or the API key's subject.
    pub subject: String,
    /// The roles the credentials grant.
    pub roles: Vec<String>,
}

/// Looks API keys up (the PostgreSQL store in [`keys`]).
pub trait KeyVerifier: Send + Sync + 'static {
    /// The principal of an API key, `Ok(None)` when the key is unknown or revoked.
    fn verify<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Principal>, KeyError>>;
}

/// The API key store cannot answer now (the call is answered UNAVAILABLE,
/// never as an unknown key).
#[derive(Debug, thiserror::Error)]
#[error("the API key store is unavailable")]
pub struct KeyError;
