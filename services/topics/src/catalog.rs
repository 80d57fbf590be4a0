//! Where topic configurations are kept, so that every topic is reopened on
//! restart: the platform's PostgreSQL (`topic_catalog.topics`, migration 0009),
//! a JSON file beside the data of `eventfold dev` without PostgreSQL, or
//! memory (`eventfold dev --ephemeral`).

use std::{collections::BTreeMap, path::PathBuf};

use async_trait::async_trait;
use eventfold_store::Database;
use tokio::sync::Mutex;

use crate::spec::TopicSpec;

/// A catalog failure; its text goes to the log, not to clients.
#[derive(Debug, thiserror::Error)]
#[error("topic catalog: {0}")]
pub struct CatalogError(pub String);

/// The topic configurations of the platform.
#[async_trait]
pub trait Catalog: Send + Sync + 'static {
    /// Every topic, by name.
    async fn load(&self) -> Result<Vec<TopicSpec>, CatalogError>;
    /// One topic.
    async fn find(&self, name: &str) -> Result<Option<TopicSpec>, CatalogError>;
    /// Record `spec`; `false` when a topic of that name exists.
    async fn insert(&self, spec: &TopicSpec) -> Result<bool, CatalogError>;
    /// Forget a topic; `false` when there was none.
    async fn remove(&self, name: &str) -> Result<bool, CatalogError>;
    /// What it is, for the start-up line.
    fn describe(&self) -> String;
}

/// Topics in the platform's PostgreSQL.
pub struct PgCatalog {
    database: Database,
}

impl PgCatalog {
    pub fn new(database: Database) -> Self {
        Self { database }
    }
}

fn db(e: impl std::fmt::Display) -> CatalogError {
    CatalogError(e.to_string())
}

fn decode(spec: serde_json::Value) -> Result<TopicSpec, CatalogError> {
    serde_json::from_value(spec).map_err(|e| CatalogError(format!("a stored topic cannot be read: {e}")))
}

#[async_trait]
impl Catalog for PgCatalog {
    async fn load(&self) -> Result<Vec<TopicSpec>, CatalogError> {
        let client = self.database.get().await.map_err(db)?;
        let rows = client.query("SELECT spec FROM topic_catalog.topics ORDER BY name", &[]).await.map_err(db)?;
        rows.into_iter().map(|row| decode(row.get(0))).collect()
    }

    async fn find(&self, name: &str) -> Result<Option<TopicSpec>, CatalogError> {
        let client = self.database.get().await.map_err(db)?;
        let row =
            client.query_opt("SELECT spec FROM topic_catalog.topics WHERE name = $1", &[&name]).await.map_err(db)?;
        row.map(|row| decode(row.get(0))).transpose()
    }

    async fn insert(&self, spec: &TopicSpec) -> Result<bool, CatalogError> {
        let client = self.database.get().await.map_err(db)?;
        let json = serde_json::to_value(spec).map_err(db)?;
        let inserted = client
            .execute(
                "INSERT INTO topic_catalog.topics (name, adapter, spec) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
                &[&spec.name, &spec.adapter.as_str(), &json],
            )
            .await
            .map_err(db)?;
        Ok(inserted == 1)
    }

    async fn remove(&self, name: &str) -> Result<bool, CatalogError> {
        let client = self.database.get().await.map_err(db)?;
        let removed = client.execute("DELETE FROM topic_catalog.topics WHERE name = $1", &[&name]).await.map_err(db)?;
        Ok(removed == 1)
    }

    fn describe(&self) -> String {
        "PostgreSQL (topic_catalog.topics)".to_owned()
    }
}

/// Topics in a JSON file (readable by its owner only), rewritten whole and
/// atomically (a temporary file, fsync, rename, fsync of the directory).
pub struct FileCatalog {
    path: PathBuf,
    lock: Mutex<()>,
}

impl FileCatalog {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), lock: Mutex::new(()) }
    }

    async fn read(&self) -> Result<BTreeMap<String, TopicSpec>, CatalogError> {
        match tokio::fs::read(&self.path).await {
            Ok(bytes) => {
                let specs: Vec<TopicSpec> = serde_json::from_slice(&bytes)
                    .map_err(|e| CatalogError(format!("the topics file cannot be read: {e}")))?;
                Ok(specs.into_iter().map(|s| (s.name.clone(), s)).collect())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(CatalogError(format!("the topics file cannot be read: {}", e.kind()))),
        }
    }

    async fn write(&self, specs: &BTreeMap<String, TopicSpec>) -> Result<(), CatalogError> {
        let list: Vec<&TopicSpec> = specs.values().collect();
        let bytes = serde_json::to_vec_pretty(&list).map_err(db)?;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || write_atomically(&path, &bytes))
            .await
            .map_err(db)?
            .map_err(|e| CatalogError(format!("the topics file cannot be written: {}", e.kind())))
    }
}

fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or_else(|| std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[async_trait]
impl Catalog for FileCatalog {
    async fn load(&self) -> Result<Vec<TopicSpec>, CatalogError> {
        let _held = self.lock.lock().await;
        Ok(self.read().await?.into_values().collect())
    }

    async fn find(&self, name: &str) -> Result<Option<TopicSpec>, CatalogError> {
        let _held = self.lock.lock().await;
        Ok(self.read().await?.remove(name))
    }

    async fn insert(&self, spec: &TopicSpec) -> Result<bool, CatalogError> {
        let _held = self.lock.lock().await;
        let mut specs = self.read().await?;
        if specs.contains_key(&spec.name) {
            return Ok(false);
        }
        specs.insert(spec.name.clone(), spec.clone());
        self.write(&specs).await.map(|()| true)
    }

    async fn remove(&self, name: &str) -> Result<bool, CatalogError> {
        let _held = self.lock.lock().await;
        let mut specs = self.read().await?;
        if specs.remove(name).is_none() {
            return Ok(false);
        }
        self.write(&specs).await.map(|()| true)
    }

    fn describe(&self) -> String {
        format!("the file {}", self.path.display())
    }
}

/// Topics kept in memory only (forgotten on exit).
#[derive(Default)]
pub struct MemoryCatalog {
    specs: Mutex<BTreeMap<String, TopicSpec>>,
}

#[async_trait]
impl Catalog for MemoryCatalog {
    async fn load(&self) -> Result<Vec<TopicSpec>, CatalogError> {
        Ok(self.specs.lock().await.values().cloned().collect())
    }

    async fn find(&self, name: &str) -> Result<Option<TopicSpec>, CatalogError> {
        Ok(self.specs.lock().await.get(name).cloned())
    }

    async fn insert(&self, spec: &TopicSpec) -> Result<bool, CatalogError> {
        let mut specs = self.specs.lock().await;
        if specs.contains_key(&spec.name) {
            return Ok(false);
        }
        specs.insert(spec.name.clone(), spec.clone());
        Ok(true)
    }

    async fn remove(&self, name: &str) -> Result<bool, CatalogError> {
        Ok(self.specs.lock().await.remove(name).is_some())
    }

    fn describe(&self) -> String {
        "memory (forgotten on exit)".to_owned()
    }
}
