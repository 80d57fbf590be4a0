//! The database schema of eventfold as numbered `NNNN_name.up.sql` /
//! `NNNN_name.down.sql` files beside this crate, embedded in the binary and
//! applied with migrio (changelog table `_migrio_changelog`, advisory lock,
//! one transaction per migration).

use std::collections::BTreeMap;

use tokio_postgres::Client;

/// Every migration file, embedded. `embedded_list_matches_directory` keeps
/// this list equal to the directory's contents.
pub const FILES: &[(&str, &str)] = &[
    ("0001_event_store.up.sql", include_str!("../0001_event_store.up.sql")),
    ("0001_event_store.down.sql", include_str!("../0001_event_store.down.sql")),
    ("0002_projections.up.sql", include_str!("../0002_projections.up.sql")),
    ("0002_projections.down.sql", include_str!("../0002_projections.down.sql")),
    ("0003_projection_control.up.sql", include_str!("../0003_projection_control.up.sql")),
    ("0003_projection_control.down.sql", include_str!("../0003_projection_control.down.sql")),
    ("0004_bus.up.sql", include_str!("../0004_bus.up.sql")),
    ("0004_bus.down.sql", include_str!("../0004_bus.down.sql")),
    ("0005_consumer_events.up.sql", include_str!("../0005_consumer_events.up.sql")),
    ("0005_consumer_events.down.sql", include_str!("../0005_consumer_events.down.sql")),
    ("0006_sagas.up.sql", include_str!("../0006_sagas.up.sql")),
    ("0006_sagas.down.sql", include_str!("../0006_sagas.down.sql")),
    ("0007_hardening.up.sql", include_str!("../0007_hardening.up.sql")),
    ("0007_hardening.down.sql", include_str!("../0007_hardening.down.sql")),
    ("0008_api_keys.up.sql", include_str!("../0008_api_keys.up.sql")),
    ("0008_api_keys.down.sql", include_str!("../0008_api_keys.down.sql")),
    ("0009_topics.up.sql", include_str!("../0009_topics.up.sql")),
    ("0009_topics.down.sql", include_str!("../0009_topics.down.sql")),
];

/// Errors of migrating.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("migration failed: {0}")]
    Migration(#[from] migrio::MigrationError),
    #[error("database error: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("cannot stage embedded migrations: {0}")]
    Io(#[from] std::io::Error),
    #[error("unknown target version {0}")]
    UnknownVersion(i64),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One known migration and whether the database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationStatus {
    pub version: i64,
    pub name: String,
    pub applied: bool,
}

fn staged() -> Result<(tempfile::TempDir, migrio::Migration)> {
    let dir = tempfile::tempdir()?;
    for (name, sql) in FILES {
        std::fs::write(dir.path().join(name), sql)?;
    }
    let migration = migrio::Migration::new(dir.path())?;
    Ok((dir, migration))
}

/// The migrations known to this binary, in order.
pub fn known() -> Vec<(i64, String)> {
    let mut out = BTreeMap::new();
    for (file, _) in FILES {
        let (version, rest) = file.split_once('_').expect("file names are NNNN_name");
        let name = rest.trim_end_matches(".up.sql").trim_end_matches(".down.sql");
        out.insert(version.parse::<i64>().expect("numbered file"), name.to_owned());
    }
    out.into_iter().collect()
}

/// Apply every pending migration.
pub async fn up(client: &mut Client) -> Result<()> {
    let (_dir, migration) = staged()?;
    migration.run(client).await?;
    Ok(())
}

/// Revert applied migrations above `target` (0 reverts everything); `None`
/// reverts the latest applied one.
pub async fn down(client: &mut Client, target: Option<i64>) -> Result<()> {
    let applied: Vec<i64> = status(client).await?.into_iter().filter(|m| m.applied).map(|m| m.version).collect();
    let target = match target {
        Some(0) => 0,
        Some(v) if known().iter().any(|(k, _)| *k == v) => v,
        Some(v) => return Err(Error::UnknownVersion(v)),
        None => match applied.as_slice() {
            [] => return Ok(()),
            [.., before, _] => *before,
            [_] => 0,
        },
    };
    let (_dir, migration) = staged()?;
    migration.undo(client, target).await?;
    Ok(())
}

/// Which known migrations the database has.
pub async fn status(client: &Client) -> Result<Vec<MigrationStatus>> {
    let exists: bool =
        client.query_one("SELECT to_regclass('public._migrio_changelog') IS NOT NULL", &[]).await?.get(0);
    let applied: Vec<i64> = if exists {
        client.query("SELECT version FROM public._migrio_changelog", &[]).await?.iter().map(|row| row.get(0)).collect()
    } else {
        Vec::new()
    };
    Ok(known()
        .into_iter()
        .map(|(version, name)| MigrationStatus { applied: applied.contains(&version), version, name })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_list_matches_directory() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        on_disk.sort();
        let mut embedded: Vec<String> = FILES.iter().map(|(n, _)| (*n).to_owned()).collect();
        embedded.sort();
        assert_eq!(on_disk, embedded, "add new migration files to FILES");
        for (version, _) in known() {
            for suffix in ["up", "down"] {
                assert!(
                    embedded
                        .iter()
                        .any(|n| n.starts_with(&format!("{version:04}_")) && n.ends_with(&format!(".{suffix}.sql"))),
                    "migration {version} lacks its {suffix} file"
                );
            }
        }
    }
}
