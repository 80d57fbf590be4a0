//! Schema evolution checks, decided by apache-avro's own schema
//! compatibility check (`SchemaCompatibility::can_read`).
//!
//! A resolution that apache-avro calls only *partially* possible (e.g. a
//! reader enum without some of the writer's symbols, or a reader union
//! without some writer branches) counts as incompatible, as Confluent's
//! check does: some data written with the old schema could not be read.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    process::Command,
    str::FromStr,
};

use apache_avro::{
    Schema,
    schema_compatibility::{Compatibility, SchemaCompatibility},
};

use crate::{Error, generate::AVRO_DIR};

/// Confluent Schema Registry's compatibility levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CompatibilityLevel {
    None,
    Backward,
    BackwardTransitive,
    Forward,
    ForwardTransitive,
    Full,
    FullTransitive,
}

impl CompatibilityLevel {
    pub const ALL: [CompatibilityLevel; 7] = [
        Self::None,
        Self::Backward,
        Self::BackwardTransitive,
        Self::Forward,
        Self::ForwardTransitive,
        Self::Full,
        Self::FullTransitive,
    ];

    /// The name the registry uses, e.g. `BACKWARD_TRANSITIVE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "NONE",
            Self::Backward => "BACKWARD",
            Self::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Self::Forward => "FORWARD",
            Self::ForwardTransitive => "FORWARD_TRANSITIVE",
            Self::Full => "FULL",
            Self::FullTransitive => "FULL_TRANSITIVE",
        }
    }

    fn backward(self) -> bool {
        matches!(self, Self::Backward | Self::BackwardTransitive | Self::Full | Self::FullTransitive)
    }

    fn forward(self) -> bool {
        matches!(self, Self::Forward | Self::ForwardTransitive | Self::Full | Self::FullTransitive)
    }

    fn transitive(self) -> bool {
        matches!(self, Self::BackwardTransitive | Self::ForwardTransitive | Self::FullTransitive)
    }
}

impl fmt::Display for CompatibilityLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CompatibilityLevel {
    type Err = String;

    /// Case-insensitive, like the registry.
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|l| l.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("{s:?} is not a compatibility level"))
    }
}

/// Why a new schema may not follow an old one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Incompatibility {
    /// One of the two texts is not an Avro schema.
    #[error("the {which} schema is not valid Avro: {message}")]
    Invalid { which: &'static str, message: String },
    /// Data written with one schema cannot be read with the other.
    #[error("{message}")]
    Incompatible { message: String },
}

/// Parses an Avro schema, with the texts of the schemas it references (by
/// name) first; gives its full name (or its type for unnamed schemas).
pub fn validate_avro(text: &str, references: &[&str]) -> Result<String, Error> {
    let invalid = |e: apache_avro::Error| Error::InvalidSchema(e.to_string());
    let schema = if references.is_empty() {
        Schema::parse_str(text).map_err(invalid)?
    } else {
        Schema::parse_str_with_list(text, references.iter().copied()).map_err(invalid)?.0
    };
    Ok(match &schema {
        Schema::Record(r) => r.name.fullname(None),
        Schema::Enum(e) => e.name.fullname(None),
        Schema::Fixed(f) => f.name.fullname(None),
        other => format!("{:?}", apache_avro::schema::SchemaKind::from(other)).to_lowercase(),
    })
}

/// BACKWARD compatibility: can a reader with the `new` schema read data
/// written with the `old` one? (Removing a field, or adding one with a
/// default, is; adding a field without a default is not.)
pub fn check_compatibility(old: &str, new: &str) -> Result<(), Incompatibility> {
    let old = parse(old, "old")?;
    let new = parse(new, "new")?;
    can_read(&old, &new, "the new schema cannot read data written with the old one")
}

/// The registry's check of a `new` schema against the `previous` versions
/// of a subject (oldest first) at a compatibility level: BACKWARD — the new
/// schema reads data of the latest (all, if transitive); FORWARD — the
/// latest (all) read data of the new one; FULL — both; NONE — no check.
pub fn check_compatibility_level(
    level: CompatibilityLevel,
    previous: &[&str],
    new: &str,
) -> Result<(), Incompatibility> {
    let new = parse(new, "new")?;
    if level == CompatibilityLevel::None || previous.is_empty() {
        return Ok(());
    }
    let checked = if level.transitive() { previous.len() } else { 1 };
    let first = previous.len() - checked;
    for (index, text) in previous.iter().enumerate().skip(first) {
        let old = parse(text, "registered")?;
        let number = index + 1;
        if level.backward() {
            can_read(&old, &new, &format!("the new schema cannot read data written with schema #{number}"))?;
        }
        if level.forward() {
            can_read(&new, &old, &format!("schema #{number} cannot read data written with the new schema"))?;
        }
    }
    Ok(())
}

fn parse(text: &str, which: &'static str) -> Result<Schema, Incompatibility> {
    Schema::parse_str(text).map_err(|e| Incompatibility::Invalid { which, message: e.to_string() })
}

fn can_read(writer: &Schema, reader: &Schema, context: &str) -> Result<(), Incompatibility> {
    match SchemaCompatibility::can_read(writer, reader) {
        Ok(Compatibility::Full) => Ok(()),
        Ok(Compatibility::Partial) => {
            Err(Incompatibility::Incompatible { message: format!("{context}: only some of its values resolve") })
        }
        Err(e) => Err(Incompatibility::Incompatible { message: format!("{context}: {}", error_chain(&e)) }),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A schema file that changed in a way consumers would notice.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// The file is gone: data written with it could no longer be decoded by
    /// its (event type, version).
    #[error("{}: removed (schemas of written events must stay)", .path.display())]
    Removed { path: PathBuf },
    /// The new text is not BACKWARD compatible with the old one.
    #[error("{}: {reason}", .path.display())]
    Incompatible { path: PathBuf, reason: Incompatibility },
}

/// Compares two trees of schema files: every file of `old` must still be in
/// `new`, with a schema compatible at `level` with the old one (see
/// [`check_compatibility_level`]). Files only in `new` are fine. Problems
/// are sorted by path.
///
/// `eventfold schemas check` uses FULL: BACKWARD alone (the registry's
/// level) lets a field be removed, which breaks consumers still running the
/// old schema during a rolling deploy; FULL refuses that, and still lets a
/// field with a default be added or removed.
pub fn check_tree(level: CompatibilityLevel, old: &[(PathBuf, String)], new: &[(PathBuf, String)]) -> Vec<Problem> {
    let new: BTreeMap<&Path, &str> = new.iter().map(|(p, t)| (p.as_path(), t.as_str())).collect();
    let old: BTreeMap<&Path, &str> = old.iter().map(|(p, t)| (p.as_path(), t.as_str())).collect();
    let mut problems = Vec::new();
    for (path, old_text) in old {
        match new.get(path) {
            None => problems.push(Problem::Removed { path: path.to_owned() }),
            Some(new_text) if *new_text == old_text => {}
            Some(new_text) => {
                if let Err(reason) = check_compatibility_level(level, &[old_text], new_text) {
                    problems.push(Problem::Incompatible { path: path.to_owned(), reason });
                }
            }
        }
    }
    problems
}

/// [`check_tree`] at `level` of `schemas/avro` at the git revision `rev`
/// (e.g. `HEAD`) against the working tree of `repo_root`. Paths are relative
/// to the repository root. A revision without `schemas/avro` has nothing to
/// compare.
pub fn check_against_git(repo_root: &Path, rev: &str, level: CompatibilityLevel) -> Result<Vec<Problem>, Error> {
    let listing = git(repo_root, &["ls-tree", "-r", "-z", "--name-only", rev, "--", AVRO_DIR])?;
    let mut old = Vec::new();
    for path in listing.split('\0').filter(|p| p.ends_with(".avsc")) {
        let text = git(repo_root, &["show", &format!("{rev}:{path}")])?;
        old.push((PathBuf::from(path), text));
    }
    let new = read_tree(repo_root)?;
    Ok(check_tree(level, &old, &new))
}

/// Every `.avsc` under `schemas/avro` of a working tree, paths relative to
/// the repository root.
pub fn read_tree(repo_root: &Path) -> Result<Vec<(PathBuf, String)>, Error> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, String)>) -> Result<(), Error> {
        let io = |e: std::io::Error| Error::Io { path: dir.to_owned(), message: e.to_string() };
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.is_dir() {
                walk(root, &path, out)?;
            } else if path.extension().is_some_and(|e| e == "avsc") {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| Error::Io { path: path.clone(), message: e.to_string() })?;
                let relative = path.strip_prefix(root).unwrap_or(&path).to_owned();
                out.push((relative, text));
            }
        }
        Ok(())
    }
    let dir = repo_root.join(AVRO_DIR);
    let mut out = Vec::new();
    if dir.is_dir() {
        walk(repo_root, &dir, &mut out)?;
    }
    out.sort();
    Ok(out)
}

/// Writes the generated `files` (paths relative to the repository root)
/// under `repo_root` and removes every other `.avsc` of `schemas/avro`, so
/// that the tree is exactly the generation.
pub fn write_tree(repo_root: &Path, files: &[(PathBuf, String)]) -> Result<(), Error> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |e: std::io::Error| Error::Io { path: path.clone(), message: e.to_string() }
    };
    for (stale, _) in read_tree(repo_root)? {
        if !files.iter().any(|(path, _)| *path == stale) {
            let path = repo_root.join(&stale);
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
    }
    for (path, text) in files {
        let path = repo_root.join(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            std::fs::write(&path, text).map_err(io(&path))?;
        }
    }
    Ok(())
}

fn git(repo_root: &Path, args: &[&str]) -> Result<String, Error> {
    let output = Command::new("git")
        .arg("-C")
        .arg(repo_root)
        .args(args)
        .output()
        .map_err(|e| Error::Git(format!("cannot run git {}: {e}", args.join(" "))))?;
    if !output.status.success() {
        return Err(Error::Git(format!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    String::from_utf8(output.stdout).map_err(|_| Error::Git(format!("git {} printed non-UTF-8", args.join(" "))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_case_insensitively_and_print_like_the_registry() {
        for level in CompatibilityLevel::ALL {
            assert_eq!(level.as_str().parse::<CompatibilityLevel>(), Ok(level));
            assert_eq!(level.as_str().to_lowercase().parse::<CompatibilityLevel>(), Ok(level));
        }
        assert!("SIDEWAYS".parse::<CompatibilityLevel>().is_err());
    }
}
