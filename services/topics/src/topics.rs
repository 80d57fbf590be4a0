//! The topics of this process: each one's configuration and open log,
//! created, opened (on start, and on first use for a topic another process
//! created), and forgotten here.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use eventfold_platform::runtime::CancellationToken;
use eventfold_store::{
    BlobConfig, BlobEventLog, Database, DatabaseOptions, EventLog, FieldViolation, FsConfig, FsEventLog,
    MemoryEventLog, PostgresConfig, PostgresEventLog, SubscriptionOptions, Subscriptions, Tables,
};
use tokio::sync::Mutex;

use crate::{
    catalog::{Catalog, CatalogError},
    spec::{Adapter, RequestedTopic, TopicSpec},
};

/// How long opening a topic's storage may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(15);

/// What can go wrong with a topic.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("invalid topic")]
    Invalid(Vec<FieldViolation>),
    #[error("topic {0} already exists")]
    AlreadyExists(String),
    #[error("topic {0} not found")]
    NotFound(String),
    /// The storage a new topic names cannot be used (the reason holds no
    /// secret: no connection string, no password).
    #[error("the topic's storage cannot be reached: {0}")]
    Unreachable(String),
    /// A topic's storage failed after it was created.
    #[error("the topic's storage is unavailable: {0}")]
    Unavailable(String),
    #[error("at most {0} topics")]
    TooMany(usize),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// An open topic.
pub struct Topic {
    pub spec: TopicSpec,
    pub log: Arc<dyn EventLog>,
    pub subscriptions: Arc<Subscriptions>,
    /// Cancelled when the topic is deleted: its streams and callbacks end.
    pub closed: CancellationToken,
}

impl std::fmt::Debug for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topic").field("spec", &self.spec).finish_non_exhaustive()
    }
}

/// The topics of the platform, as this process has them open.
pub struct Topics {
    catalog: Arc<dyn Catalog>,
    fs_root: PathBuf,
    max_topics: usize,
    open: RwLock<BTreeMap<String, Arc<Topic>>>,
    /// One create or delete at a time in this process.
    changing: Mutex<()>,
}

impl Topics {
    /// The topics of `catalog`, each opened (one whose storage does not
    /// answer now is opened on first use); `fs` topics live under
    /// `fs_root`.
    pub async fn open(catalog: Arc<dyn Catalog>, fs_root: &Path, max_topics: usize) -> Result<Arc<Self>, TopicError> {
        let fs_root = std::path::absolute(fs_root)
            .map_err(|e| TopicError::Unavailable(format!("the topics directory: {}", e.kind())))?;
        let topics = Arc::new(Self {
            catalog,
            fs_root,
            max_topics,
            open: RwLock::new(BTreeMap::new()),
            changing: Mutex::new(()),
        });
        for spec in topics.catalog.load().await? {
            let name = spec.name.clone();
            match open_storage(&spec).await {
                Ok(topic) => {
                    topics.write().insert(name, Arc::new(topic));
                }
                Err(e) => tracing::warn!(topic = %name, error = %e, "a topic's storage did not open; retried on use"),
            }
        }
        Ok(topics)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Topic>>> {
        self.open.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Topic>>> {
        self.open.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Where `fs` topics live.
    pub fn fs_root(&self) -> &Path {
        &self.fs_root
    }

    /// What keeps the configurations.
    pub fn catalog(&self) -> &dyn Catalog {
        &*self.catalog
    }

    /// Check `requested`, open (creating) its storage, record it.
    pub async fn create(&self, requested: RequestedTopic) -> Result<Arc<Topic>, TopicError> {
        let now = eventfold_store::to_micros(std::time::SystemTime::now());
        let spec = crate::spec::check(requested, &self.fs_root, now).map_err(TopicError::Invalid)?;
        let _changing = self.changing.lock().await;
        if self.read().contains_key(&spec.name) || self.catalog.find(&spec.name).await?.is_some() {
            return Err(TopicError::AlreadyExists(spec.name));
        }
        if self.read().len() >= self.max_topics {
            return Err(TopicError::TooMany(self.max_topics));
        }
        let created_dir = spec.adapter == Adapter::Fs && !Path::new(&spec.connection).exists();
        let topic = match open_storage(&spec).await {
            Ok(topic) => topic,
            Err(e) => {
                if created_dir {
                    remove_new_dir(Path::new(&spec.connection));
                }
                return Err(e);
            }
        };
        let refused = match self.catalog.insert(&spec).await {
            Ok(true) => None,
            Ok(false) => Some(TopicError::AlreadyExists(spec.name.clone())),
            Err(e) => Some(e.into()),
        };
        if let Some(error) = refused {
            // Not recorded: nothing of it may stay (the log lets go of its
            // directory when dropped).
            drop(topic);
            if created_dir {
                remove_new_dir(Path::new(&spec.connection));
            }
            return Err(error);
        }
        let topic = Arc::new(topic);
        self.write().insert(spec.name.clone(), topic.clone());
        tracing::info!(topic = %spec.name, adapter = spec.adapter.as_str(), "topic created");
        Ok(topic)
    }

    /// An open topic: from this process, or from the catalog (another
    /// process created it, or its storage did not answer at start).
    pub async fn get(&self, name: &str) -> Result<Arc<Topic>, TopicError> {
        if let Some(topic) = self.read().get(name) {
            return Ok(topic.clone());
        }
        let _changing = self.changing.lock().await;
        if let Some(topic) = self.read().get(name) {
            return Ok(topic.clone());
        }
        let Some(spec) = self.catalog.find(name).await? else { return Err(TopicError::NotFound(name.to_owned())) };
        let topic = match open_storage(&spec).await {
            Ok(topic) => Arc::new(topic),
            Err(TopicError::Unreachable(reason)) => return Err(TopicError::Unavailable(reason)),
            Err(e) => return Err(e),
        };
        self.write().insert(name.to_owned(), topic.clone());
        Ok(topic)
    }

    /// Every topic of the catalog, open or not.
    pub async fn list(&self) -> Result<Vec<(TopicSpec, Option<Arc<Topic>>)>, TopicError> {
        let specs = self.catalog.load().await?;
        let open = self.read();
        Ok(specs
            .into_iter()
            .map(|spec| {
                let topic = open.get(&spec.name).cloned();
                (spec, topic)
            })
            .collect())
    }

    /// Forget a topic (its stored events stay where they are).
    pub async fn delete(&self, name: &str) -> Result<(), TopicError> {
        let _changing = self.changing.lock().await;
        let removed = self.catalog.remove(name).await?;
        let closed = self.write().remove(name);
        if !removed && closed.is_none() {
            return Err(TopicError::NotFound(name.to_owned()));
        }
        if let Some(topic) = closed {
            topic.closed.cancel();
        }
        tracing::info!(topic = %name, "topic deleted");
        Ok(())
    }
}

/// Remove a directory this process just created for a topic that was then
/// refused: only if it holds nothing but what the log put there.
fn remove_new_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::debug!(error = %e.kind(), "a refused topic's new directory was not removed");
    }
}

/// Open (creating where needed) the storage of `spec`.
async fn open_storage(spec: &TopicSpec) -> Result<Topic, TopicError> {
    let log: Arc<dyn EventLog> = match tokio::time::timeout(OPEN_TIMEOUT, open_log(spec)).await {
        Ok(log) => log?,
        Err(_) => return Err(TopicError::Unreachable(format!("no answer within {} s", OPEN_TIMEOUT.as_secs()))),
    };
    let subscriptions = Arc::new(Subscriptions::new(log.clone(), SubscriptionOptions::default()));
    Ok(Topic { spec: spec.clone(), log, subscriptions, closed: CancellationToken::new() })
}

fn store_error(error: eventfold_store::Error) -> TopicError {
    match error {
        eventfold_store::Error::InvalidArgument(violations) => TopicError::Invalid(
            violations.into_iter().map(|v| FieldViolation::new(format!("topic.{}", v.field), v.description)).collect(),
        ),
        // The store's messages name what failed, never a secret.
        other => TopicError::Unreachable(other.to_string()),
    }
}

async fn open_log(spec: &TopicSpec) -> Result<Arc<dyn EventLog>, TopicError> {
    match spec.adapter {
        Adapter::Memory => Ok(Arc::new(MemoryEventLog::new())),
        Adapter::Fs => {
            let dir = PathBuf::from(&spec.connection);
            if !dir.is_dir() && !spec.creates_dir() {
                return Err(TopicError::Unreachable(
                    "the directory does not exist (and createDirIfNotExist is false)".to_owned(),
                ));
            }
            let config = FsConfig { fsync: spec.fsync(), ..FsConfig::default() };
            let log = FsEventLog::open(dir, config).await.map_err(store_error)?;
            Ok(Arc::new(log))
        }
        Adapter::Postgres => {
            let tables = Tables::topic(&spec.schema, &spec.table).map_err(store_error)?;
            let options = DatabaseOptions { pool_size: 4, ..DatabaseOptions::default() };
            let database = Database::open(&spec.connection, &options).map_err(|_| {
                TopicError::Invalid(vec![FieldViolation::new("topic.connection", "not a PostgreSQL URL")])
            })?;
            let mut client = database.connect().await.map_err(|e| {
                tracing::debug!(error = %e, "a topic's PostgreSQL did not answer");
                TopicError::Unreachable("PostgreSQL did not accept a connection".to_owned())
            })?;
            tables.migrate(&mut client).await.map_err(store_error)?;
            let config = PostgresConfig { writers: 1, tables, ..PostgresConfig::default() };
            let log = PostgresEventLog::connect(database, config).await.map_err(store_error)?;
            Ok(Arc::new(log))
        }
        Adapter::Blob => {
            let container = spec.options.get("container").cloned().unwrap_or_default();
            let config = BlobConfig::new(spec.connection.clone(), container, spec.table.clone());
            let log = BlobEventLog::open(config).await.map_err(store_error)?;
            Ok(Arc::new(log))
        }
    }
}
