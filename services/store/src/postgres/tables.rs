//! Where the PostgreSQL adapter's tables are: the platform's event store
//! (schema `eventstore`, what `eventfold migrate up` creates), or a topic's
//! own schema and events table beside which its streams, snapshots and
//! request ids get tables of their own (`<table>__streams`, …), created by
//! [`Tables::migrate`] from the same migrations, renamed.
//!
//! The SQL of the adapter and of the migrations names the platform's
//! objects (`eventstore.events`, `eventstore.append_batch`, …); a topic's
//! [`Tables`] rewrites each name, and refuses SQL that names an object it
//! does not know (so a new one cannot be shared by accident).

use std::borrow::Cow;

use crate::error::{Error, FieldViolation, Result};

/// The objects of the event store, as the platform's SQL names them after
/// `eventstore.`.
const OBJECTS: &[&str] = &["events", "streams", "snapshots", "append_requests", "append_batch", "global_position_seq"];
/// Objects named without their schema in the migrations (indexes and
/// constraints).
const BARE: &[&str] = &["snapshots_pkey", "append_requests_pkey", "streams_parent", "append_requests_created_at"];
/// The migrations that create the event store, in order.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../../../migrations/0001_event_store.up.sql")),
    (7, include_str!("../../../../migrations/0007_hardening.up.sql")),
];
/// Longest schema name (PostgreSQL's identifier limit).
pub const MAX_SCHEMA_LEN: usize = 63;
/// Longest events table name: room for the longest derived name
/// (`<table>__append_requests_created_at`) within 63 bytes.
pub const MAX_TABLE_LEN: usize = 32;

/// The names of one event store's tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables {
    /// `None`: the platform's (`eventstore`).
    topic: Option<(String, String)>,
}

impl Default for Tables {
    fn default() -> Self {
        Self::platform()
    }
}

/// Whether `name` is a plain identifier: `[a-z_][a-z0-9_]*`, at most `max`
/// bytes (nothing to quote, nothing to inject).
pub fn is_plain_identifier(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl Tables {
    /// The platform's event store (`eventstore`).
    pub fn platform() -> Self {
        Self { topic: None }
    }

    /// A topic's: events in `schema.table`, the rest beside it.
    ///
    /// # Errors
    ///
    /// `InvalidArgument` (fields `schema`, `table`) unless both are plain
    /// identifiers, or when `schema` is the platform's.
    pub fn topic(schema: &str, table: &str) -> Result<Self> {
        let mut violations = Vec::new();
        if !is_plain_identifier(schema, MAX_SCHEMA_LEN) {
            violations.push(FieldViolation::new(
                "schema",
                format!("must be a plain identifier ([a-z_][a-z0-9_]*, at most {MAX_SCHEMA_LEN} bytes)"),
            ));
        } else if schema == "eventstore" || schema.starts_with("pg_") || schema == "information_schema" {
            violations.push(FieldViolation::new("schema", "is reserved"));
        }
        if !is_plain_identifier(table, MAX_TABLE_LEN) {
            violations.push(FieldViolation::new(
                "table",
                format!("must be a plain identifier ([a-z_][a-z0-9_]*, at most {MAX_TABLE_LEN} bytes)"),
            ));
        }
        if !violations.is_empty() {
            return Err(Error::InvalidArgument(violations));
        }
        Ok(Self { topic: Some((schema.to_owned(), table.to_owned())) })
    }

    /// `sql` with the platform's names replaced by these tables' names.
    pub fn sql<'a>(&self, sql: &'a str) -> Cow<'a, str> {
        let Some((schema, table)) = &self.topic else { return Cow::Borrowed(sql) };
        let mut out = String::with_capacity(sql.len().saturating_add(64));
        let mut rest = sql;
        while let Some(at) = find_word(rest, "eventstore") {
            out.push_str(&rest[..at]);
            let after = &rest[at.saturating_add("eventstore".len())..];
            if let Some(qualified) = after.strip_prefix('.') {
                let len = qualified.bytes().take_while(|b| b.is_ascii_alphanumeric() || *b == b'_').count();
                let object = &qualified[..len];
                out.push_str(schema);
                out.push('.');
                out.push_str(&self.object(table, object));
                rest = &qualified[len..];
            } else if let Some(channel) = after.strip_prefix("_appended") {
                out.push_str(&self.channel());
                rest = channel;
            } else {
                // The schema itself (`CREATE SCHEMA … eventstore`).
                out.push_str(schema);
                rest = after;
            }
        }
        out.push_str(rest);
        let mut renamed = out;
        for bare in BARE {
            renamed = replace_word(&renamed, bare, &format!("{table}__{bare}"));
        }
        Cow::Owned(renamed)
    }

    fn object(&self, table: &str, object: &str) -> String {
        match object {
            "events" => table.to_owned(),
            known if OBJECTS.contains(&known) => format!("{table}__{known}"),
            // An object this list does not know: a name that cannot exist,
            // so that the statement fails instead of sharing it.
            unknown => format!("{table}__unknown_{unknown}"),
        }
    }

    /// The channel of the appends' notifications.
    pub fn channel(&self) -> String {
        match &self.topic {
            None => "eventstore_appended".to_owned(),
            Some((schema, table)) => {
                use sha2::{Digest, Sha256};
                let digest = Sha256::digest(format!("{schema}.{table}").as_bytes());
                let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
                format!("eventfold_topic_{hex}")
            }
        }
    }

    /// Create (or bring up to date) a topic's tables on `client`: the event
    /// store's migrations, renamed, each once (recorded in
    /// `<schema>.<table>__migrations`), under an advisory lock. Nothing to
    /// do for the platform's tables (`eventfold migrate up` owns them).
    ///
    /// # Errors
    ///
    /// `Unavailable` when PostgreSQL refuses (the message is PostgreSQL's
    /// code, not its text).
    pub async fn migrate(&self, client: &mut tokio_postgres::Client) -> Result<()> {
        let Some((schema, table)) = &self.topic else { return Ok(()) };
        let failed = |e: tokio_postgres::Error| {
            let code = e.code().map_or("connection", |c| c.code()).to_owned();
            tracing::warn!(code, "creating a topic's tables failed");
            Error::Unavailable(format!("creating the topic's tables failed (SQLSTATE {code})"))
        };
        let lock = i64::from_be_bytes(
            self.channel().as_bytes()[self.channel().len().saturating_sub(8)..].try_into().unwrap_or([0; 8]),
        );
        let transaction = client.transaction().await.map_err(failed)?;
        transaction.execute("SELECT pg_advisory_xact_lock($1)", &[&lock]).await.map_err(failed)?;
        transaction
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {schema}; \
                 CREATE TABLE IF NOT EXISTS {schema}.{table}__migrations \
                 (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            ))
            .await
            .map_err(failed)?;
        for (version, sql) in MIGRATIONS {
            let applied = transaction
                .query_opt(&format!("SELECT 1 FROM {schema}.{table}__migrations WHERE version = $1"), &[version])
                .await
                .map_err(failed)?;
            if applied.is_some() {
                continue;
            }
            transaction.batch_execute(&self.sql(sql)).await.map_err(failed)?;
            transaction
                .execute(&format!("INSERT INTO {schema}.{table}__migrations (version) VALUES ($1)"), &[version])
                .await
                .map_err(failed)?;
        }
        transaction.commit().await.map_err(failed)
    }
}

/// The first occurrence of `word` in `text` that is a whole identifier.
fn find_word(text: &str, word: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut from = 0;
    while let Some(found) = text[from..].find(word) {
        let at = from.saturating_add(found);
        let end = at.saturating_add(word.len());
        let before_ok = at == 0 || !is_ident(bytes[at.saturating_sub(1)]);
        // `eventstore_appended` is a word of its own, matched on purpose.
        let after_ok = bytes.get(end).is_none_or(|b| !is_ident(*b) || text[end..].starts_with("_appended"));
        if before_ok && after_ok {
            return Some(at);
        }
        from = end;
    }
    None
}

/// `text` with every whole identifier `word` replaced by `with`.
fn replace_word(text: &str, word: &str, with: &str) -> String {
    let bytes = text.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    let mut from = 0;
    while let Some(found) = text[from..].find(word) {
        let at = from.saturating_add(found);
        let end = at.saturating_add(word.len());
        let whole = (at == 0 || !is_ident(bytes[at.saturating_sub(1)])) && bytes.get(end).is_none_or(|b| !is_ident(*b));
        if whole {
            out.push_str(&text[last..at]);
            out.push_str(with);
            last = end;
        }
        from = end;
    }
    out.push_str(&text[last..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topics_sql_names_only_its_own_objects() {
        let tables = Tables::topic("shop", "orders").expect("plain names");
        assert_eq!(
            tables.sql("SELECT 1 FROM eventstore.events e JOIN eventstore.streams s ON true"),
            "SELECT 1 FROM shop.orders e JOIN shop.orders__streams s ON true"
        );
        assert_eq!(
            tables.sql("SELECT pg_notify('eventstore_appended', $1)"),
            format!("SELECT pg_notify('{}', $1)", tables.channel())
        );
        for (_, migration) in MIGRATIONS {
            let renamed = tables.sql(migration);
            assert!(!renamed.contains("eventstore"), "every platform name is rewritten");
            assert!(!renamed.contains("__unknown_"), "every object is known");
            for bare in BARE.iter().filter(|b| find_word(migration, b).is_some()) {
                assert!(renamed.contains(&format!("orders__{bare}")), "{bare} is renamed");
                assert!(find_word(&renamed, bare).is_none(), "{bare} is not left as it was");
            }
        }
        assert_eq!(Tables::platform().sql("eventstore.events"), "eventstore.events");
        assert!(
            Tables::topic("shop", "orders").expect("ok").channel()
                != Tables::topic("shop", "other").expect("ok").channel()
        );
    }

    #[test]
    fn names_that_are_not_plain_identifiers_are_refused() {
        for (schema, table) in [
            ("Shop", "t"),
            ("s", "t; DROP TABLE x"),
            ("", "t"),
            ("s", ""),
            ("1s", "t"),
            ("eventstore", "t"),
            ("s", &"t".repeat(33)),
        ] {
            assert!(Tables::topic(schema, table).is_err(), "{schema:?}.{table:?}");
        }
    }
}
