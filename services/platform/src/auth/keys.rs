//! API keys in PostgreSQL (`auth.api_keys`, migration 0008): created with
//! a name and roles, listed, revoked, and verified for the authentication
//! layer ([`KeyVerifier`]); their gRPC face, `eventfold.admin.v1.ApiKeyService`,
//! is [`grpc`].
//!
//! OVERVIEW
//! - A key is [`KEY_PREFIX`] (`efk_`) and 32 bytes of the operating
//!   system's CSPRNG in unpadded base64url: 47 characters. Only its SHA-256
//!   is stored. 256 random bits cannot be guessed, so a fast hash is the
//!   right one (a slow password hash protects guessable secrets; here it
//!   would only slow every call down). Its first [`SHOWN_PREFIX_CHARS`]
//!   characters are stored too, shown in lists to tell keys apart.
//! - The principal of a key has the subject `apikey:ID` ([`SUBJECT_PREFIX`]
//!   and the key's UUID): unique and never reused, unlike names, which
//!   several keys may share (while one replaces another).
//! - Revocation is seen by every process within a second: a verified key
//!   is cached in-process for at most [`CACHE_TTL`] (500 ms), counted from
//!   before the query that read it, so no process answers from a read
//!   older than that; the revoking process forgets the key at once. The
//!   cache holds at most [`MAX_CACHED`] keys (full: expired entries go,
//!   then everything) and only keys that exist: unknown keys, which a
//!   client can invent without end, are never cached and cannot evict
//!   the real ones.
//! - A key's `last_use_time` is written at most once a minute per key and
//!   process (and per key across processes, by the statement's
//!   condition), on a task of its own: a call never waits for it.
//! - PostgreSQL away: verification fails with [`KeyError`] (the layer
//!   answers UNAVAILABLE), never with "unknown key".
//!
//! HOSTILE INPUT: a presented key that is not exactly the format above
//! (which bounds it to 47 bytes, far below [`MAX_PRESENTED_KEY_BYTES`]) is
//! refused before it is hashed or looked up. A name is 1 to
//! [`MAX_NAME_BYTES`] bytes with no control or invisible formatting
//! character and not only spaces; at most [`MAX_ROLES`] roles, each 1 to
//! [`MAX_ROLE_BYTES`] bytes of `a-z0-9._-`; an id 1 to [`MAX_ID_BYTES`]
//! bytes of visible ASCII (one that is no UUID is an id no key has:
//! NOT_FOUND). No key, hash or SQL text is put in an error or a log line.

pub mod grpc;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use eventfold_store::{
    Database, FieldViolation,
    model::{from_micros, to_micros},
    pg::db_error,
};
use futures_util::future::BoxFuture;
use sha2::{Digest, Sha256};
use tokio_postgres::Row;
use uuid::Uuid;

use super::{KeyError, KeyVerifier, Principal, Secret};

/// How every key starts: a key found in a log or a repository is
/// recognisable (secret scanners can match it).
pub const KEY_PREFIX: &str = "efk_";
/// Random bytes of a key.
const KEY_RANDOM_BYTES: usize = 32;
/// Length of a key: the prefix and its 32 random bytes in unpadded
/// base64url (43 characters).
pub const KEY_LEN: usize = KEY_PREFIX.len() + 43;
/// The longest presented key that is even looked at; every key of ours is
/// [`KEY_LEN`] bytes, so anything else is refused without hashing it.
pub const MAX_PRESENTED_KEY_BYTES: usize = 256;
/// Characters of a key kept in clear (`efk_` and 8 more: 48 of its 256
/// bits), shown in lists.
pub const SHOWN_PREFIX_CHARS: usize = 12;
/// The subject of a key's principal is this and the key's id.
pub const SUBJECT_PREFIX: &str = "apikey:";
/// How long a process trusts what it read of a key. It bounds how long a
/// revoked key is still accepted by another process.
pub const CACHE_TTL: Duration = Duration::from_millis(500);
/// Most keys cached by one process.
pub const MAX_CACHED: usize = 10_000;
/// A key's `last_use_time` is written at most this often.
pub const LAST_USE_INTERVAL: Duration = Duration::from_secs(60);
/// Longest key name.
pub const MAX_NAME_BYTES: usize = 128;
/// Most roles of one key.
pub const MAX_ROLES: usize = 32;
/// Longest role.
pub const MAX_ROLE_BYTES: usize = 64;
/// Longest id accepted (a UUID has 36 characters, 45 as a URN).
pub const MAX_ID_BYTES: usize = 64;

/// Errors of the API key store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid argument: {}", describe(.0))]
    Invalid(Vec<FieldViolation>),
    #[error("no API key has the id {id}")]
    NotFound { id: String },
    #[error(transparent)]
    Store(#[from] eventfold_store::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn describe(violations: &[FieldViolation]) -> String {
    violations.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; ")
}

impl From<tokio_postgres::Error> for Error {
    fn from(error: tokio_postgres::Error) -> Self {
        Error::Store(db_error(error))
    }
}

/// An API key as stored: everything but the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: Uuid,
    pub name: String,
    /// The key's first [`SHOWN_PREFIX_CHARS`] characters.
    pub prefix: String,
    pub roles: Vec<String>,
    pub create_time: SystemTime,
    pub last_use_time: Option<SystemTime>,
    pub revoke_time: Option<SystemTime>,
}

impl ApiKey {
    /// The subject of the key's principal: `apikey:ID`.
    pub fn subject(&self) -> String {
        subject(self.id)
    }
}

/// A key just created: the key itself is here and nowhere else.
#[derive(Debug)]
pub struct CreatedKey {
    pub api_key: ApiKey,
    pub key: Secret,
}

/// Where a page of [`ApiKeyStore::list`] starts: after this key (its
/// creation time and id).
pub type After = (SystemTime, Uuid);

/// What a process remembers of a key it read.
#[derive(Clone)]
struct Cached {
    id: Uuid,
    /// `None`: revoked.
    principal: Option<Principal>,
    /// When the query that read it started.
    read_at: Instant,
}

#[derive(Default)]
struct State {
    /// By the key's hash.
    keys: HashMap<[u8; 32], Cached>,
    /// When this process last had a key's `last_use_time` written.
    last_use: HashMap<Uuid, Instant>,
}

/// The API keys of a database. Cloning shares the cache.
#[derive(Clone)]
pub struct ApiKeyStore {
    database: Database,
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for ApiKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the cached hashes.
        f.debug_struct("ApiKeyStore").field("cached", &self.state().keys.len()).finish_non_exhaustive()
    }
}

impl ApiKeyStore {
    /// The keys of `database` (connected lazily).
    pub fn new(database: Database) -> Self {
        Self { database, state: Arc::default() }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is consistent after any panic (single inserts/removes).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates a key named `name` granting `roles` (a role named twice
    /// counts once).
    pub async fn create(&self, name: &str, roles: &[String]) -> Result<CreatedKey> {
        let roles = check_new(name, roles)?;
        let key = generate_key()?;
        let hash = key_hash(key.expose());
        let prefix: String = key.expose().chars().take(SHOWN_PREFIX_CHARS).collect();
        let id = Uuid::new_v4();
        let connection = self.database.get().await?;
        let row = connection
            .query_one(
                "INSERT INTO auth.api_keys (id, name, key_hash, prefix, roles) VALUES ($1, $2, $3, $4, $5) \
                 RETURNING create_time",
                &[&id, &name, &hash.as_slice(), &prefix, &roles],
            )
            .await?;
        let api_key = ApiKey {
            id,
            name: name.to_owned(),
            prefix,
            roles,
            create_time: row.try_get(0)?,
            last_use_time: None,
            revoke_time: None,
        };
        Ok(CreatedKey { api_key, key })
    }

    /// At most `limit` keys in creation order, after `after`; revoked
    /// ones included.
    pub async fn list(&self, after: Option<After>, limit: i64) -> Result<Vec<ApiKey>> {
        let (after_time, after_id) = after.unzip();
        let connection = self.database.get().await?;
        let rows = connection
            .query(
                "SELECT id, name, prefix, roles, create_time, last_use_time, revoke_time FROM auth.api_keys \
                 WHERE $1::timestamptz IS NULL OR (create_time, id) > ($1::timestamptz, $2::uuid) \
                 ORDER BY create_time, id LIMIT $3",
                &[&after_time, &after_id, &limit.max(0)],
            )
            .await?;
        rows.iter().map(api_key).collect()
    }

    /// Revokes the key `id` (a revoked key stays as it is) and answers it.
    pub async fn revoke(&self, id: &str) -> Result<ApiKey> {
        check_id(id)?;
        let not_found = || Error::NotFound { id: id.to_owned() };
        let uuid = Uuid::parse_str(id).map_err(|_| not_found())?;
        let connection = self.database.get().await?;
        let row = connection
            .query_opt(
                "UPDATE auth.api_keys SET revoke_time = COALESCE(revoke_time, clock_timestamp()) WHERE id = $1 \
                 RETURNING id, name, prefix, roles, create_time, last_use_time, revoke_time",
                &[&uuid],
            )
            .await?
            .ok_or_else(not_found)?;
        // This process refuses it at once; the others within CACHE_TTL.
        self.state().keys.retain(|_, cached| cached.id != uuid);
        api_key(&row)
    }

    /// Whether the key table answers (a health check).
    pub async fn check(&self) -> Result<()> {
        let connection = self.database.get().await?;
        connection.query_opt("SELECT 1 FROM auth.api_keys LIMIT 1", &[]).await?;
        Ok(())
    }

    /// The principal of `key`, `None` for a key that is malformed, unknown
    /// or revoked. See the module documentation.
    pub async fn principal(&self, key: &str) -> Result<Option<Principal>, KeyError> {
        if !well_formed(key) {
            return Ok(None);
        }
        let hash = key_hash(key);
        let now = Instant::now();
        let cached =
            self.state().keys.get(&hash).filter(|c| now.saturating_duration_since(c.read_at) < CACHE_TTL).cloned();
        let cached = match cached {
            Some(cached) => cached,
            None => match self.read(hash, now).await {
                Ok(Some(read)) => read,
                Ok(None) => return Ok(None),
                Err(e) => {
                    // The store's text: no key, hash or SQL in it.
                    tracing::warn!(error = %e, "cannot verify an API key: the key store is unavailable");
                    return Err(KeyError);
                }
            },
        };
        if cached.principal.is_some() {
            self.touch(cached.id);
        }
        Ok(cached.principal)
    }

    /// Reads the key of `hash` (the query starting `now`) and caches it.
    async fn read(&self, hash: [u8; 32], now: Instant) -> Result<Option<Cached>> {
        let connection = self.database.get().await?;
        let row = connection
            .query_opt(
                "SELECT id, roles, revoke_time IS NOT NULL FROM auth.api_keys WHERE key_hash = $1",
                &[&hash.as_slice()],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let (id, roles, revoked): (Uuid, Vec<String>, bool) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        let principal = (!revoked).then(|| Principal { subject: subject(id), roles });
        let cached = Cached { id, principal, read_at: now };
        let mut state = self.state();
        if state.keys.len() >= MAX_CACHED && !state.keys.contains_key(&hash) {
            let fresh = Instant::now();
            state.keys.retain(|_, c| fresh.saturating_duration_since(c.read_at) < CACHE_TTL);
            if state.keys.len() >= MAX_CACHED {
                state.keys.clear();
            }
        }
        state.keys.insert(hash, cached.clone());
        Ok(Some(cached))
    }

    /// Has `last_use_time` of key `id` written, on a task of its own, unless
    /// this process did so within [`LAST_USE_INTERVAL`].
    fn touch(&self, id: Uuid) {
        let now = Instant::now();
        {
            let mut state = self.state();
            if state.last_use.get(&id).is_some_and(|at| now.saturating_duration_since(*at) < LAST_USE_INTERVAL) {
                return;
            }
            if state.last_use.len() >= MAX_CACHED {
                state.last_use.retain(|_, at| now.saturating_duration_since(*at) < LAST_USE_INTERVAL);
                if state.last_use.len() >= MAX_CACHED {
                    state.last_use.clear();
                }
            }
            state.last_use.insert(id, now);
        }
        let database = self.database.clone();
        tokio::spawn(async move {
            let written = async {
                let connection = database.get().await?;
                connection
                    .execute(
                        "UPDATE auth.api_keys SET last_use_time = clock_timestamp() WHERE id = $1 \
                         AND (last_use_time IS NULL OR last_use_time < clock_timestamp() - interval '1 minute')",
                        &[&id],
                    )
                    .await?;
                Ok::<(), Error>(())
            };
            if let Err(e) = written.await {
                tracing::debug!(error = %e, key_id = %id, "cannot record the last use of an API key");
            }
        });
    }
}

impl KeyVerifier for ApiKeyStore {
    fn verify<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Principal>, KeyError>> {
        Box::pin(self.principal(key))
    }
}

/// A new key: [`KEY_PREFIX`] and 32 bytes of the operating system's CSPRNG
/// in unpadded base64url.
pub fn generate_key() -> Result<Secret> {
    let mut random = [0u8; KEY_RANDOM_BYTES];
    getrandom::fill(&mut random).map_err(|e| {
        Error::Store(eventfold_store::Error::Internal(format!("the operating system's random source failed: {e}")))
    })?;
    Ok(Secret::new(format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(random))))
}

/// What is stored of a key: its SHA-256.
pub fn key_hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Whether `key` has the format of our keys: refused before hashing
/// otherwise (which bounds what is hashed to [`KEY_LEN`] bytes).
pub fn well_formed(key: &str) -> bool {
    key.len() <= MAX_PRESENTED_KEY_BYTES
        && key.len() == KEY_LEN
        && key
            .strip_prefix(KEY_PREFIX)
            .is_some_and(|random| random.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
}

fn subject(id: Uuid) -> String {
    format!("{SUBJECT_PREFIX}{id}")
}

fn api_key(row: &Row) -> Result<ApiKey> {
    Ok(ApiKey {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        prefix: row.try_get(2)?,
        roles: row.try_get(3)?,
        create_time: row.try_get(4)?,
        last_use_time: row.try_get(5)?,
        revoke_time: row.try_get(6)?,
    })
}

/// Characters that change how text is shown without being seen
/// (zero-width, bidirectional overrides and isolates, the BOM).
fn invisible(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

/// The roles of a new key named `name`, each once, in the order given; or
/// the violations.
pub fn check_new(name: &str, roles: &[String]) -> Result<Vec<String>> {
    let mut violations = Vec::new();
    let name_problem = if name.is_empty() {
        Some("must not be empty".to_owned())
    } else if name.len() > MAX_NAME_BYTES {
        Some(format!("must be at most {MAX_NAME_BYTES} bytes"))
    } else if name.chars().any(|c| c.is_control() || invisible(c)) {
        Some("must be visible text (no control or invisible formatting characters)".to_owned())
    } else if name.trim().is_empty() {
        Some("must not be only spaces".to_owned())
    } else {
        None
    };
    if let Some(description) = name_problem {
        violations.push(FieldViolation::new("name", description));
    }
    if roles.is_empty() {
        violations.push(FieldViolation::new("roles", "must name at least one role"));
    } else if roles.len() > MAX_ROLES {
        violations.push(FieldViolation::new("roles", format!("must be at most {MAX_ROLES} roles")));
    } else {
        for (i, role) in roles.iter().enumerate() {
            let field = format!("roles[{i}]");
            if role.is_empty() || role.len() > MAX_ROLE_BYTES {
                violations.push(FieldViolation::new(field, format!("must be 1 to {MAX_ROLE_BYTES} bytes")));
            } else if !role.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)) {
                violations.push(FieldViolation::new(field, "must be made of a-z, 0-9, '.', '_' and '-'"));
            }
        }
    }
    if !violations.is_empty() {
        return Err(Error::Invalid(violations));
    }
    let mut unique: Vec<String> = Vec::with_capacity(roles.len());
    for role in roles {
        if !unique.contains(role) {
            unique.push(role.clone());
        }
    }
    Ok(unique)
}

/// `id` is 1 to [`MAX_ID_BYTES`] bytes of visible ASCII.
fn check_id(id: &str) -> Result<()> {
    let description = if id.is_empty() {
        "must not be empty".to_owned()
    } else if id.len() > MAX_ID_BYTES {
        format!("must be at most {MAX_ID_BYTES} bytes")
    } else if !id.bytes().all(|b| b.is_ascii_graphic()) {
        "must be visible ASCII (no spaces or control characters)".to_owned()
    } else {
        return Ok(());
    };
    Err(Error::Invalid(vec![FieldViolation::new("id", description)]))
}

/// The cursor of a page token: the last key's creation time in
/// microseconds and its id.
pub(crate) fn to_cursor((time, id): After) -> (i64, Uuid) {
    (to_micros(time), id)
}

/// The inverse of [`to_cursor`], for a cursor from a client's token: none
/// of ours is before 1970.
pub(crate) fn from_cursor((micros, id): (i64, Uuid)) -> Option<After> {
    (micros >= 0).then(|| (from_micros(micros), id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roles(names: &[&str]) -> Vec<String> {
        names.iter().map(|r| (*r).to_owned()).collect()
    }

    fn fields(error: Error) -> Vec<String> {
        match error {
            Error::Invalid(violations) => violations.into_iter().map(|v| v.field).collect(),
            other => panic!("not a validation error: {other}"),
        }
    }

    #[test]
    fn keys_are_well_formed_random_and_only_ours_are_looked_at() {
        let a = generate_key().unwrap();
        let b = generate_key().unwrap();
        assert_ne!(a.expose(), b.expose());
        for key in [&a, &b] {
            assert_eq!(key.expose().len(), KEY_LEN);
            assert_eq!(KEY_LEN, 47);
            assert!(well_formed(key.expose()), "{}", key.expose());
            assert!(!format!("{key:?}").contains(key.expose()));
        }
        let random = URL_SAFE_NO_PAD.decode(&a.expose()[KEY_PREFIX.len()..]).unwrap();
        assert_eq!(random.len(), 32);

        assert!(!well_formed(""));
        assert!(!well_formed(&format!("{}x", a.expose())));
        assert!(!well_formed(&a.expose()[..KEY_LEN - 1]));
        assert!(!well_formed(&a.expose().replacen("efk_", "efx_", 1)));
        assert!(!well_formed(&format!("efk_{}", "a".repeat(42) + "=")));
        assert!(!well_formed(&format!("efk_{}", "é".repeat(21) + "a")));
        assert!(!well_formed(&"a".repeat(MAX_PRESENTED_KEY_BYTES + 1)));
        assert_eq!(key_hash(a.expose()), key_hash(a.expose()));
        assert_ne!(key_hash(a.expose()), key_hash(b.expose()));
    }

    #[test]
    fn names_and_roles_are_bounded() {
        assert_eq!(
            check_new("ci", &roles(&["orders.write", "admin", "orders.write"])).unwrap(),
            ["orders.write", "admin"]
        );
        assert_eq!(check_new(&"n".repeat(MAX_NAME_BYTES), &roles(&["a_b-c.0"])).unwrap(), ["a_b-c.0"]);
        assert_eq!(fields(check_new("", &[]).unwrap_err()), ["name", "roles"]);
        assert_eq!(fields(check_new(&"n".repeat(MAX_NAME_BYTES + 1), &roles(&["a"])).unwrap_err()), ["name"]);
        assert_eq!(fields(check_new("a\u{7}b", &roles(&["a"])).unwrap_err()), ["name"]);
        assert_eq!(fields(check_new("evil\u{202E}txt", &roles(&["a"])).unwrap_err()), ["name"]);
        assert_eq!(fields(check_new("   ", &roles(&["a"])).unwrap_err()), ["name"]);
        let too_many: Vec<String> = (0..=MAX_ROLES).map(|i| format!("r{i}")).collect();
        assert_eq!(fields(check_new("ci", &too_many).unwrap_err()), ["roles"]);
        let bad = roles(&["ok", "", "Orders.Write", &"r".repeat(MAX_ROLE_BYTES + 1), "a b"]);
        assert_eq!(fields(check_new("ci", &bad).unwrap_err()), ["roles[1]", "roles[2]", "roles[3]", "roles[4]"]);
    }

    #[test]
    fn ids_are_bounded_before_they_are_parsed() {
        assert!(check_id("0190aa3e-0000-7000-8000-000000000000").is_ok());
        assert!(check_id("not-a-uuid").is_ok(), "an id no key has: NOT_FOUND, not a bad argument");
        for bad in ["", "a b", "a\u{0}", &"a".repeat(MAX_ID_BYTES + 1)] {
            assert!(matches!(check_id(bad), Err(Error::Invalid(_))), "{bad:?}");
        }
    }

    #[test]
    fn cursors_round_trip_and_refuse_times_before_1970() {
        let id = Uuid::new_v4();
        let time = from_micros(1_700_000_000_123_456);
        assert_eq!(from_cursor(to_cursor((time, id))), Some((time, id)));
        assert_eq!(from_cursor((-1, id)), None);
    }
}
