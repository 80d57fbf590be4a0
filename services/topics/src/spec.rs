//! A topic's configuration: what a client sends, checked field by field
//! before anything is created, and how it is shown (never with its
//! secrets).

use std::{
    collections::BTreeMap,
    path::{Component, Path, PathBuf},
};

use eventfold_store::{FieldViolation, Tables};
use serde::{Deserialize, Serialize};

/// Longest topic name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Longest connection, in bytes.
pub const MAX_CONNECTION_LEN: usize = 4096;
/// Most options, and the longest key or value of one, in bytes.
pub const MAX_OPTIONS: usize = 16;
pub const MAX_OPTION_LEN: usize = 256;
/// The schema of a `postgres` topic's tables when none is given.
pub const DEFAULT_SCHEMA: &str = "topics";

/// Where a topic's events are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Adapter {
    Memory,
    Fs,
    Postgres,
    Blob,
}

impl Adapter {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Fs => "fs",
            Self::Postgres => "postgres",
            Self::Blob => "blob",
        }
    }
}

/// A checked topic configuration, as the catalog keeps it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicSpec {
    pub name: String,
    pub adapter: Adapter,
    /// May hold a password, a key or a token: never shown, never logged.
    pub connection: String,
    pub schema: String,
    pub table: String,
    pub options: BTreeMap<String, String>,
    /// Microseconds since the Unix epoch.
    pub created_at: i64,
}

impl std::fmt::Debug for TopicSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicSpec")
            .field("name", &self.name)
            .field("adapter", &self.adapter)
            .field("location", &self.location())
            .finish_non_exhaustive()
    }
}

/// What a client asks for.
#[derive(Debug, Clone, Default)]
pub struct RequestedTopic {
    pub name: String,
    pub adapter: String,
    pub connection: String,
    pub schema: String,
    pub table: String,
    pub options: BTreeMap<String, String>,
}

/// Whether `name` is a topic name: 1 to 64 bytes of `[a-z0-9._-]`,
/// starting with a letter or a digit.
pub fn is_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
}

/// Check a topic name as the field `field`.
pub fn check_name(field: &str, name: &str, violations: &mut Vec<FieldViolation>) {
    if !is_topic_name(name) {
        violations.push(FieldViolation::new(
            field,
            format!("must be 1 to {MAX_NAME_LEN} bytes of a-z, 0-9, '.', '_' and '-', starting with a letter or digit"),
        ));
    }
}

/// `path` without `.` and `..`, when it is absolute and has none of them.
fn plain_absolute(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    path.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_))).then(|| path.to_path_buf())
}

/// Check `requested` (every violation, not only the first); `fs_root` is
/// where `fs` topics may live (absolute).
pub fn check(requested: RequestedTopic, fs_root: &Path, now: i64) -> Result<TopicSpec, Vec<FieldViolation>> {
    let mut violations = Vec::new();
    check_name("topic.name", &requested.name, &mut violations);
    let adapter = match requested.adapter.as_str() {
        "memory" => Some(Adapter::Memory),
        "fs" => Some(Adapter::Fs),
        "postgres" => Some(Adapter::Postgres),
        "blob" => Some(Adapter::Blob),
        _ => {
            violations.push(FieldViolation::new("topic.adapter", "must be memory, fs, postgres or blob"));
            None
        }
    };
    if requested.connection.len() > MAX_CONNECTION_LEN || requested.connection.chars().any(char::is_control) {
        violations.push(FieldViolation::new(
            "topic.connection",
            format!("must be at most {MAX_CONNECTION_LEN} bytes, without control characters"),
        ));
    }
    if requested.options.len() > MAX_OPTIONS {
        violations.push(FieldViolation::new("topic.options", format!("at most {MAX_OPTIONS} entries")));
    }
    for (key, value) in &requested.options {
        if key.len() > MAX_OPTION_LEN
            || value.len() > MAX_OPTION_LEN
            || key.chars().chain(value.chars()).any(char::is_control)
        {
            violations.push(FieldViolation::new(
                "topic.options",
                format!("keys and values are at most {MAX_OPTION_LEN} bytes, without control characters"),
            ));
        }
    }
    let Some(adapter) = adapter else { return Err(violations) };
    let known: &[&str] = match adapter {
        Adapter::Fs => &["createDirIfNotExist", "fsync"],
        Adapter::Blob => &["container"],
        Adapter::Memory | Adapter::Postgres => &[],
    };
    for key in requested.options.keys().filter(|k| !known.contains(&k.as_str())) {
        let known = if known.is_empty() { "none".to_owned() } else { known.join(", ") };
        violations.push(FieldViolation::new(
            format!("topic.options[{}]", key.chars().take(64).collect::<String>()),
            format!("is not an option of the {} adapter (known: {known})", adapter.as_str()),
        ));
    }
    let mut spec = TopicSpec {
        name: requested.name.clone(),
        adapter,
        connection: requested.connection,
        schema: requested.schema,
        table: requested.table,
        options: requested.options,
        created_at: now,
    };
    match adapter {
        Adapter::Memory => {
            for (field, value) in [("connection", &spec.connection), ("schema", &spec.schema), ("table", &spec.table)] {
                if !value.is_empty() {
                    violations.push(FieldViolation::new(format!("topic.{field}"), "must be empty for a memory topic"));
                }
            }
        }
        Adapter::Fs => {
            for (field, value) in [("schema", &spec.schema), ("table", &spec.table)] {
                if !value.is_empty() {
                    violations.push(FieldViolation::new(format!("topic.{field}"), "must be empty for an fs topic"));
                }
            }
            let dir = if spec.connection.is_empty() {
                Some(fs_root.join(&spec.name))
            } else {
                plain_absolute(Path::new(&spec.connection))
            };
            match dir {
                None => violations.push(FieldViolation::new(
                    "topic.connection",
                    "must be an absolute directory without '.' or '..' components",
                )),
                Some(dir) if !dir.starts_with(fs_root) || dir == fs_root => violations.push(FieldViolation::new(
                    "topic.connection",
                    "must lie under the server's topics directory ([topics] fs_root)",
                )),
                Some(dir) => spec.connection = dir.to_string_lossy().into_owned(),
            }
            if let Some(fsync) = spec.options.get("fsync")
                && fsync.parse::<eventfold_store::Fsync>().is_err()
            {
                violations.push(FieldViolation::new("topic.options[fsync]", "must be always, never or batch(MS)"));
            }
            match spec.options.get("createDirIfNotExist").map(String::as_str) {
                None | Some("true" | "false") => {}
                Some(_) => {
                    violations.push(FieldViolation::new("topic.options[createDirIfNotExist]", "must be true or false"));
                }
            }
        }
        Adapter::Postgres => {
            if spec.schema.is_empty() {
                DEFAULT_SCHEMA.clone_into(&mut spec.schema);
            }
            if spec.table.is_empty() {
                spec.table = spec.name.replace(['-', '.'], "_");
            }
            if spec.schema == "topic_catalog" {
                violations.push(FieldViolation::new("topic.schema", "is reserved"));
            }
            if let Err(eventfold_store::Error::InvalidArgument(found)) = Tables::topic(&spec.schema, &spec.table) {
                violations.extend(
                    found.into_iter().map(|v| FieldViolation::new(format!("topic.{}", v.field), v.description)),
                );
            }
            if spec.table.starts_with(|c: char| c.is_ascii_digit()) {
                violations.push(FieldViolation::new("topic.table", "must not start with a digit"));
            }
            match spec.connection.parse::<tokio_postgres::Config>() {
                Ok(config) if !config.get_hosts().is_empty() => {}
                _ => violations.push(FieldViolation::new(
                    "topic.connection",
                    "must be a PostgreSQL URL, e.g. postgresql://user:password@host:5432/database",
                )),
            }
        }
        Adapter::Blob => {
            if !spec.schema.is_empty() {
                violations.push(FieldViolation::new("topic.schema", "must be empty for a blob topic"));
            }
            if spec.table.is_empty() {
                spec.table.clone_from(&spec.name);
            }
            if !is_topic_name(&spec.table) {
                violations.push(FieldViolation::new(
                    "topic.table",
                    "the prefix of a blob topic is 1 to 64 bytes of a-z, 0-9, '.', '_' and '-'",
                ));
            }
            let container = spec.options.get("container").map(String::as_str).unwrap_or_default();
            let valid_container = (3..=63).contains(&container.len())
                && container.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !container.starts_with('-')
                && !container.ends_with('-')
                && !container.contains("--");
            if !valid_container {
                violations.push(FieldViolation::new(
                    "topic.options[container]",
                    "a blob topic needs its container: 3 to 63 bytes of a-z, 0-9 and single '-' inside",
                ));
            }
            if spec.connection.is_empty() {
                violations.push(FieldViolation::new(
                    "topic.connection",
                    "a blob topic needs an Azure Storage connection string",
                ));
            }
        }
    }
    if violations.is_empty() { Ok(spec) } else { Err(violations) }
}

impl TopicSpec {
    /// When an `fs` topic forces its writes to disk (`options.fsync`,
    /// default `always`).
    pub fn fsync(&self) -> eventfold_store::Fsync {
        self.options.get("fsync").and_then(|f| f.parse().ok()).unwrap_or_default()
    }

    /// Whether the directory of an `fs` topic is created when missing.
    pub fn creates_dir(&self) -> bool {
        self.options.get("createDirIfNotExist").is_none_or(|v| v == "true")
    }

    /// Where the topic's events are, without secrets: the directory, the
    /// server, database, schema and table, or the account, container and
    /// prefix.
    pub fn location(&self) -> String {
        match self.adapter {
            Adapter::Memory => "memory".to_owned(),
            Adapter::Fs => self.connection.clone(),
            Adapter::Postgres => {
                let (hosts, database) = match self.connection.parse::<tokio_postgres::Config>() {
                    Ok(config) => {
                        let hosts: Vec<String> = config
                            .get_hosts()
                            .iter()
                            .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
                            .map(|(host, port)| match host {
                                tokio_postgres::config::Host::Tcp(h) => format!("{h}:{port}"),
                                tokio_postgres::config::Host::Unix(p) => p.to_string_lossy().into_owned(),
                            })
                            .collect();
                        (hosts.join(","), config.get_dbname().unwrap_or_default().to_owned())
                    }
                    Err(_) => (String::new(), String::new()),
                };
                format!("postgresql://{hosts}/{database} {}.{}", self.schema, self.table)
            }
            Adapter::Blob => {
                let account = self
                    .connection
                    .split(';')
                    .filter_map(|part| part.split_once('='))
                    .find(|(k, _)| k.trim().eq_ignore_ascii_case("AccountName"))
                    .map(|(_, v)| v.trim().to_owned())
                    .unwrap_or_default();
                let container = self.options.get("container").map(String::as_str).unwrap_or_default();
                format!("{account}/{container}/{}", self.table)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(name: &str, adapter: &str, connection: &str) -> RequestedTopic {
        RequestedTopic {
            name: name.into(),
            adapter: adapter.into(),
            connection: connection.into(),
            ..RequestedTopic::default()
        }
    }

    fn fields(result: Result<TopicSpec, Vec<FieldViolation>>) -> Vec<String> {
        result.expect_err("refused").into_iter().map(|v| v.field).collect()
    }

    #[test]
    fn good_configurations_are_completed() {
        let root = Path::new("/srv/topics");
        let fs = check(topic("users", "fs", ""), root, 0).expect("fs");
        assert_eq!(fs.connection, "/srv/topics/users");
        assert!(fs.creates_dir());
        let pg = check(topic("order-events", "postgres", "postgres://u:secret@db:5433/shop"), root, 0).expect("pg");
        assert_eq!((pg.schema.as_str(), pg.table.as_str()), ("topics", "order_events"));
        assert_eq!(pg.location(), "postgresql://db:5433/shop topics.order_events");
        assert!(!format!("{pg:?}").contains("secret"), "Debug never shows the connection");
        let mut blob = topic("audit", "blob", "AccountName=acct;AccountKey=c2VjcmV0");
        blob.options.insert("container".into(), "events".into());
        let blob = check(blob, root, 0).expect("blob");
        assert_eq!(blob.location(), "acct/events/audit");
        assert_eq!(check(topic("m", "memory", ""), root, 0).expect("memory").location(), "memory");
    }

    #[test]
    fn bad_configurations_name_their_field() {
        let root = Path::new("/srv/topics");
        assert_eq!(fields(check(topic("Bad Name", "memory", ""), root, 0)), ["topic.name"]);
        assert_eq!(fields(check(topic("t", "kafka", ""), root, 0)), ["topic.adapter"]);
        assert_eq!(fields(check(topic("t", "fs", "relative/dir"), root, 0)), ["topic.connection"]);
        assert_eq!(fields(check(topic("t", "fs", "/srv/topics/../etc"), root, 0)), ["topic.connection"]);
        assert_eq!(fields(check(topic("t", "fs", "/etc/eventfold"), root, 0)), ["topic.connection"]);
        assert_eq!(fields(check(topic("t", "postgres", "not a url"), root, 0)), ["topic.connection"]);
        let mut bad_schema = topic("t", "postgres", "postgres://db/x");
        bad_schema.schema = "Shop; DROP".into();
        assert_eq!(fields(check(bad_schema, root, 0)), ["topic.schema"]);
        let mut bad_table = topic("t", "postgres", "postgres://db/x");
        bad_table.table = "a-b".into();
        assert_eq!(fields(check(bad_table, root, 0)), ["topic.table"]);
        assert_eq!(
            fields(check(topic("t", "blob", "AccountName=a;AccountKey=b"), root, 0)),
            ["topic.options[container]"]
        );
        let mut fsync = topic("t", "fs", "");
        fsync.options.insert("fsync".into(), "sometimes".into());
        assert_eq!(fields(check(fsync, root, 0)), ["topic.options[fsync]"]);
        let mut unknown = topic("t", "memory", "");
        unknown.options.insert("color".into(), "blue".into());
        assert_eq!(fields(check(unknown, root, 0)), ["topic.options[color]"]);
        assert_eq!(fields(check(topic("t", "memory", "x"), root, 0)), ["topic.connection"]);
    }
}
