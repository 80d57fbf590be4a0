//! The Azure Blob Storage adapter (through `object_store`'s Azure client):
//! a log of commit blobs for topics kept in the cloud.
//!
//! # In the container
//!
//! Under the configured prefix, `commits/NNNNNNNNNNNNNNNNNNNN` for n = 1,
//! 2, 3, …: each one append (its events), a deletion, a branch or a
//! snapshot, in the frames of the file-system log (length, CRC32C, JSON
//! record). A commit blob is created with `If-None-Match: *` (object_store's
//! `PutMode::Create`), so of two writers that race for commit n, whether
//! in one process or in two, exactly one creates it: the other reads what
//! won, checks its append again (expected version, event ids, request id)
//! and tries commit n + 1. No offset is ever given twice.
//!
//! Every process keeps the index of the file-system log (where each event
//! lies, stream heads, ids), built by reading the commits in order; before
//! a read or a write it reads the commits that appeared since (one request
//! that answers 404 when there is none). Commits read are cached (up to
//! [`CACHE_BYTES`]). Live subscribers are woken when this process appends,
//! and within [`BlobConfig::poll_interval`] when another one does.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak},
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, azure::MicrosoftAzureBuilder, path::Path};
use tokio::sync::{Mutex, watch};

use crate::{
    error::{Error, Result},
    fs::{
        batch::{EventRef, Prepared, Staged, encode_into, prepare_append},
        frame, reads,
        record::{Hash, Namespace, Record, SnapshotRecord},
        state::{Loc, Replay, State, now},
    },
    log::EventLog,
    memory::DEFAULT_REQUEST_RETENTION,
    model::{
        AllRead, AllSlice, AppendOutcome, AppendRequest, ExpectedVersion, ListStreams, RecordedEvent, RequestKey,
        Snapshot, SnapshotQuery, StreamInfo, StreamPage, StreamRead, StreamSlice, check_stream_id, check_version,
        from_micros,
    },
};

/// Most bytes of commit blobs kept in memory.
pub const CACHE_BYTES: usize = 64 * 1024 * 1024;
/// Tries of one write that keeps losing the race for the next commit.
const MAX_ATTEMPTS: usize = 32;

/// Where a blob log lives.
#[derive(Clone)]
pub struct BlobConfig {
    /// An Azure Storage connection string: `AccountName=…;AccountKey=…`
    /// (or `SharedAccessSignature=…`), optionally `BlobEndpoint=…` (the
    /// emulator's, or a custom domain) and `DefaultEndpointsProtocol`;
    /// `UseDevelopmentStorage=true` for Azurite on its default port.
    pub connection: String,
    /// The container (it must exist).
    pub container: String,
    /// Where in the container the log's blobs go.
    pub prefix: String,
    /// How long request ids are remembered (AIP-155 retries).
    pub request_retention: Duration,
    /// How often live subscribers look for commits of other processes.
    pub poll_interval: Duration,
}

impl std::fmt::Debug for BlobConfig {
    // The connection string holds the account key: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobConfig")
            .field("container", &self.container)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl BlobConfig {
    pub fn new(connection: impl Into<String>, container: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            connection: connection.into(),
            container: container.into(),
            prefix: prefix.into(),
            request_retention: DEFAULT_REQUEST_RETENTION,
            poll_interval: Duration::from_millis(500),
        }
    }
}

/// The settings of an Azure Storage connection string.
fn parse_connection(connection: &str) -> Result<HashMap<String, String>> {
    let mut settings = HashMap::new();
    for part in connection.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = part.split_once('=') else {
            return Err(Error::invalid("connection", "must be an Azure Storage connection string (Key=Value;…)"));
        };
        settings.insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    Ok(settings)
}

/// The account name and key of Azurite (documented, not a secret).
const EMULATOR: (&str, &str) =
    ("devstoreaccount1", "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==");

fn build_store(config: &BlobConfig) -> Result<Arc<dyn ObjectStore>> {
    crate::pg::install_crypto_provider();
    let settings = parse_connection(&config.connection)?;
    let get = |key: &str| settings.get(key).cloned();
    let development = get("usedevelopmentstorage").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let account = get("accountname").or_else(|| development.then(|| EMULATOR.0.to_owned()));
    let Some(account) = account else {
        return Err(Error::invalid("connection", "the connection string has no AccountName"));
    };
    let mut builder = MicrosoftAzureBuilder::new().with_account(&account).with_container_name(&config.container);
    let endpoint = get("blobendpoint").or_else(|| development.then(|| format!("http://127.0.0.1:10000/{account}")));
    match (get("accountkey").or_else(|| development.then(|| EMULATOR.1.to_owned())), get("sharedaccesssignature")) {
        (Some(key), _) => builder = builder.with_access_key(key),
        (None, Some(sas)) => {
            let pairs = sas
                .trim_start_matches('?')
                .split('&')
                .filter_map(|pair| pair.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
                .collect::<Vec<_>>();
            builder = builder.with_sas_authorization(pairs);
        }
        (None, None) => {
            return Err(Error::invalid(
                "connection",
                "the connection string has no AccountKey nor SharedAccessSignature",
            ));
        }
    }
    if let Some(endpoint) = endpoint {
        builder = builder.with_allow_http(endpoint.starts_with("http://")).with_endpoint(endpoint);
    } else if let Some(suffix) = get("endpointsuffix") {
        let scheme = get("defaultendpointsprotocol").unwrap_or_else(|| "https".to_owned());
        builder = builder.with_endpoint(format!("{scheme}://{account}.blob.{suffix}"));
    }
    let retry =
        object_store::RetryConfig { max_retries: 3, retry_timeout: Duration::from_secs(30), ..Default::default() };
    let store = builder
        .with_retry(retry)
        .build()
        .map_err(|e| Error::invalid("connection", format!("not a usable Azure Storage connection: {}", kind(&e))))?;
    Ok(Arc::new(store))
}

/// What went wrong with the blob store, without its text (which may hold
/// URLs of the account).
fn kind(error: &object_store::Error) -> &'static str {
    match error {
        object_store::Error::NotFound { .. } => "not found",
        object_store::Error::AlreadyExists { .. } => "already exists",
        object_store::Error::Precondition { .. } => "precondition failed",
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => "access denied",
        _ => "request failed",
    }
}

fn unavailable(what: &str, error: &object_store::Error) -> Error {
    tracing::warn!(kind = kind(error), "blob event log: {what} failed");
    Error::Unavailable(format!("the blob store: {what} failed ({})", kind(error)))
}

struct Inner {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    state: RwLock<State>,
    /// The next commit to read or create; held while catching up or
    /// writing.
    next: Mutex<u64>,
    appended: watch::Sender<u64>,
    cache: std::sync::Mutex<Cache>,
    retention: Duration,
}

#[derive(Default)]
struct Cache {
    blobs: BTreeMap<u64, Bytes>,
    bytes: usize,
}

impl Cache {
    fn insert(&mut self, seq: u64, blob: Bytes) {
        self.bytes = self.bytes.saturating_add(blob.len());
        self.blobs.insert(seq, blob);
        // The oldest commits go first: readers mostly follow the head.
        while self.bytes > CACHE_BYTES {
            let Some((_, old)) = self.blobs.pop_first() else { break };
            self.bytes = self.bytes.saturating_sub(old.len());
        }
    }
}

impl Inner {
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn path(&self, seq: u64) -> Path {
        Path::from(format!("{}/commits/{seq:020}", self.prefix))
    }

    fn cached(&self, seq: u64) -> Option<Bytes> {
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner).blobs.get(&seq).cloned()
    }

    fn remember(&self, seq: u64, blob: Bytes) {
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(seq, blob);
    }

    /// Read and apply the commits created since `next`.
    async fn catch_up(&self, next: &mut u64) -> Result<()> {
        let before = self.read().head();
        loop {
            let blob = match self.store.get(&self.path(*next)).await {
                Ok(found) => found.bytes().await.map_err(|e| unavailable("reading a commit", &e))?,
                Err(object_store::Error::NotFound { .. }) => break,
                Err(e) => return Err(unavailable("reading a commit", &e)),
            };
            self.apply(*next, &blob)?;
            self.remember(*next, blob);
            *next = next.saturating_add(1);
        }
        let head = self.read().head();
        if head != before {
            self.appended.send_replace(head);
        }
        Ok(())
    }

    /// Apply commit `seq` to the index.
    fn apply(&self, seq: u64, blob: &[u8]) -> Result<()> {
        let segment = u32::try_from(seq).map_err(|_| Error::Internal("the log has too many commits".into()))?;
        let (frames, end) = frame::split(blob);
        if end != blob.len() as u64 {
            return Err(Error::Internal(format!("commit {seq} is damaged")));
        }
        let now = now();
        let mut state = self.write();
        let mut replay = Replay::default();
        for (offset, len, payload) in frames {
            let record: Record = serde_json::from_slice(payload)
                .map_err(|e| Error::Internal(format!("commit {seq}: a record cannot be decoded: {e}")))?;
            replay.push(&mut state, record, Loc { segment, offset, len }, self.retention, now)?;
        }
        if !replay.unfinished().is_empty() {
            return Err(Error::Internal(format!("commit {seq} holds part of an append")));
        }
        state.forget_requests(now, self.retention);
        Ok(())
    }

    /// Create commit `*next` with `blob`; `Ok(false)` when another writer
    /// created it first (then the index has caught up with it).
    async fn create(&self, next: &mut u64, blob: Vec<u8>) -> Result<bool> {
        let blob = Bytes::from(blob);
        let options = PutOptions { mode: PutMode::Create, ..PutOptions::default() };
        match self.store.put_opts(&self.path(*next), blob.clone().into(), options).await {
            Ok(_) => {
                self.apply(*next, &blob)?;
                self.remember(*next, blob);
                *next = next.saturating_add(1);
                self.appended.send_replace(self.read().head());
                Ok(true)
            }
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                self.catch_up(next).await?;
                Ok(false)
            }
            Err(e) => {
                // The blob may exist (an answer lost on the way back): the
                // caller checks after catching up.
                let failed = unavailable("creating a commit", &e);
                self.catch_up(next).await?;
                Err(failed)
            }
        }
    }

    /// The payload of the frame at `loc`.
    async fn load(&self, loc: Loc) -> Result<Record> {
        let seq = u64::from(loc.segment);
        let blob = match self.cached(seq) {
            Some(blob) => blob,
            None => {
                let blob = self
                    .store
                    .get(&self.path(seq))
                    .await
                    .map_err(|e| unavailable("reading a commit", &e))?
                    .bytes()
                    .await
                    .map_err(|e| unavailable("reading a commit", &e))?;
                self.remember(seq, blob.clone());
                blob
            }
        };
        let payload =
            frame::read_slice(&blob, loc.offset, loc.len).map_err(|e| Error::Internal(format!("commit {seq}: {e}")))?;
        serde_json::from_slice(payload).map_err(|e| Error::Internal(format!("commit {seq}: {e}")))
    }

    async fn load_events(&self, locs: &[Loc]) -> Vec<Result<RecordedEvent>> {
        let mut out = Vec::with_capacity(locs.len());
        for loc in locs {
            out.push(self.load(*loc).await.and_then(reads::event_of));
        }
        out
    }
}

/// An event log in an Azure Blob Storage container.
pub struct BlobEventLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for BlobEventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobEventLog").field("prefix", &self.inner.prefix).finish_non_exhaustive()
    }
}

impl BlobEventLog {
    /// Connect and read the log's commits.
    ///
    /// # Errors
    ///
    /// `InvalidArgument` (field `connection`) for a connection string that
    /// cannot be used; `Unavailable` when the container cannot be reached
    /// (or does not exist); `Internal` for a damaged commit.
    pub async fn open(config: BlobConfig) -> Result<Self> {
        let store = build_store(&config)?;
        let prefix = config.prefix.trim_matches('/').to_owned();
        // A listing fails when the container is missing or the credentials
        // are refused; a read of a missing blob would not tell.
        store
            .list_with_delimiter(Some(&Path::from(prefix.clone())))
            .await
            .map_err(|e| unavailable("listing the container", &e))?;
        let inner = Arc::new(Inner {
            store,
            prefix,
            state: RwLock::new(State::default()),
            next: Mutex::new(1),
            appended: watch::channel(0).0,
            cache: std::sync::Mutex::new(Cache::default()),
            retention: config.request_retention,
        });
        {
            let mut next = inner.next.lock().await;
            inner.catch_up(&mut next).await?;
        }
        tokio::spawn(poll(Arc::downgrade(&inner), config.poll_interval));
        Ok(Self { inner })
    }

    /// Catch up with commits of other writers.
    async fn refresh(&self) -> Result<()> {
        let mut next = self.inner.next.lock().await;
        self.inner.catch_up(&mut next).await
    }

    /// Write one record other than an event, after `check` (against the
    /// index as it is then) passes; retried when another writer wins.
    async fn commit_one(&self, check: impl Fn(&State) -> Result<Record>) -> Result<(Record, Loc)> {
        let mut next = self.inner.next.lock().await;
        self.inner.catch_up(&mut next).await?;
        for _ in 0..MAX_ATTEMPTS {
            let record = check(&self.inner.read())?;
            let mut blob = Vec::new();
            let len = match &record {
                Record::Snapshot(snapshot) => encode_into(&mut blob, &EventRef::Snapshot(snapshot))?,
                other => encode_into(&mut blob, other)?,
            };
            let segment = u32::try_from(*next).map_err(|_| Error::Internal("the log has too many commits".into()))?;
            let loc = Loc { segment, offset: 0, len };
            if self.inner.create(&mut next, blob).await? {
                return Ok((record, loc));
            }
        }
        Err(Error::Unavailable("other writers kept winning the race for the log's next commit".into()))
    }

    /// The link of `stream`'s event at `version`.
    async fn link_at(&self, stream: &str, version: u64) -> Result<Option<[u8; 32]>> {
        let loc = {
            let state = self.inner.read();
            state.position_of(stream, version).and_then(|p| state.entry(p).map(|e| e.loc))
        };
        match loc {
            Some(loc) => Ok(Some(reads::event_of(self.inner.load(loc).await?)?.hash)),
            None => Ok(None),
        }
    }
}

/// Wakes live subscribers of this log when other processes commit.
async fn poll(inner: Weak<Inner>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.appended.receiver_count() == 0 {
            continue;
        }
        let mut next = inner.next.lock().await;
        if let Err(e) = inner.catch_up(&mut next).await {
            tracing::debug!(error = %e, "blob event log: polling for commits failed");
        }
    }
}

#[async_trait]
impl EventLog for BlobEventLog {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome> {
        request.validate()?;
        let first_id = request.events.first().map(|e| e.event_id);
        let mut next = self.inner.next.lock().await;
        self.inner.catch_up(&mut next).await?;
        for _ in 0..MAX_ATTEMPTS {
            let mut staged = Staged::default();
            let segment = u32::try_from(*next).map_err(|_| Error::Internal("the log has too many commits".into()))?;
            let prepared =
                prepare_append(&self.inner.read(), &mut staged, request.clone(), (segment, 0), self.inner.retention)?;
            let outcome = match prepared {
                Prepared::Answered(outcome) => return Ok(outcome),
                Prepared::Staged(outcome) => outcome,
            };
            let created = self.inner.create(&mut next, staged.frames).await;
            // Whether it was this append that landed (a lost answer to a
            // create that succeeded reads as a lost race or an error).
            let landed = || {
                let state = self.inner.read();
                first_id.is_some_and(|id| state.event_ids.contains(&id))
                    && outcome.positions.iter().all(|p| state.entry(*p).is_some_and(|e| e.loc.segment == segment))
            };
            match created {
                Ok(true) => return Ok(outcome),
                Ok(false) if landed() => return Ok(outcome),
                Ok(false) => continue,
                Err(_) if landed() => return Ok(outcome),
                Err(e) => return Err(e),
            }
        }
        Err(Error::Unavailable("other writers kept winning the race for the log's next commit".into()))
    }

    async fn read_stream(&self, read: StreamRead) -> Result<StreamSlice> {
        read.validate()?;
        self.refresh().await?;
        let plan = reads::plan_stream(&self.inner.read(), &read)?;
        let loaded = self.inner.load_events(&plan.locs).await;
        let (events, cut) = reads::cut_stream(&read, loaded.into_iter())?;
        Ok(StreamSlice { events, stream_version: plan.stream_version, end_of_stream: !cut && !plan.more })
    }

    async fn read_all(&self, read: AllRead) -> Result<AllSlice> {
        read.validate()?;
        self.refresh().await?;
        let plan = reads::plan_all(&self.inner.read(), &read);
        let locs: Vec<Loc> = plan.picks.iter().map(|(_, loc)| *loc).collect();
        let loaded = self.inner.load_events(&locs).await;
        let positions = plan.picks.iter().map(|(p, _)| *p);
        reads::cut_all(&read, (plan.scanned_to, plan.head), positions.zip(loaded))
    }

    async fn last_position(&self) -> Result<u64> {
        self.refresh().await?;
        Ok(self.inner.read().head())
    }

    async fn stream_info(&self, stream_id: &str) -> Result<StreamInfo> {
        check_stream_id("stream_id", stream_id)?;
        self.refresh().await?;
        Ok(self.inner.read().live_stream(stream_id)?.info.clone())
    }

    async fn list_streams(&self, query: ListStreams) -> Result<StreamPage> {
        query.validate()?;
        self.refresh().await?;
        Ok(reads::list_streams(&self.inner.read(), &query))
    }

    async fn delete_stream(&self, stream_id: &str, expected_version: Option<u64>) -> Result<StreamInfo> {
        check_stream_id("stream_id", stream_id)?;
        check_version("expected_version", expected_version)?;
        self.commit_one(|state| {
            let current = state.live_stream(stream_id)?.info.version;
            if let Some(expected) = expected_version
                && current != Some(expected)
            {
                return Err(Error::WrongExpectedVersion {
                    stream: stream_id.to_owned(),
                    expected: ExpectedVersion::Exact(expected),
                    actual: current,
                });
            }
            Ok(Record::Delete { stream: stream_id.to_owned(), at: now() })
        })
        .await?;
        let state = self.inner.read();
        state.streams.get(stream_id).map(|s| s.info.clone()).ok_or_else(|| Error::StreamNotFound(stream_id.to_owned()))
    }

    async fn branch_stream(&self, source: &str, at_version: u64, branch: &str) -> Result<StreamInfo> {
        check_stream_id("source_stream_id", source)?;
        check_stream_id("branch_stream_id", branch)?;
        check_version("at_version", Some(at_version))?;
        self.refresh().await?;
        // The link is read before the commit; versions never change, so it
        // stays right whatever another writer commits meanwhile.
        let head = self.link_at(source, at_version).await?.map(Hash);
        self.commit_one(|state| {
            let version = state.live_stream(source)?.info.version;
            if version.is_none_or(|v| at_version > v) {
                return Err(Error::invalid(
                    "at_version",
                    format!("stream {source} has no version {at_version} (current: {version:?})"),
                ));
            }
            if state.streams.contains_key(branch) {
                return Err(Error::StreamAlreadyExists(branch.to_owned()));
            }
            Ok(Record::Branch { stream: branch.to_owned(), source: source.to_owned(), at_version, head, at: now() })
        })
        .await?;
        Ok(self.inner.read().live_stream(branch)?.info.clone())
    }

    async fn save_snapshot(&self, mut snapshot: Snapshot) -> Result<Snapshot> {
        snapshot.validate()?;
        self.refresh().await?;
        let version = self.inner.read().live_stream(&snapshot.stream_id)?.info.version;
        let head = match version {
            Some(v) if snapshot.version <= v => self.link_at(&snapshot.stream_id, snapshot.version).await?,
            _ => None,
        };
        let Some(head) = head else {
            return Err(Error::invalid(
                "version",
                format!("stream {} has no version {}", snapshot.stream_id, snapshot.version),
            ));
        };
        let at = now();
        let (record, _) = self
            .commit_one(|state| {
                state.live_stream(&snapshot.stream_id)?;
                Ok(Record::Snapshot(SnapshotRecord {
                    stream: snapshot.stream_id.clone(),
                    namespace: Namespace::from(snapshot.namespace),
                    version: snapshot.version,
                    schema_version: snapshot.schema_version,
                    state: snapshot.state.clone(),
                    at,
                    head: Hash(head),
                }))
            })
            .await?;
        if let Record::Snapshot(saved) = record {
            snapshot.state = saved.state;
        }
        snapshot.head_hash = head;
        snapshot.created_at = from_micros(at);
        Ok(snapshot)
    }

    async fn load_snapshot(&self, query: SnapshotQuery) -> Result<Option<Snapshot>> {
        query.validate()?;
        self.refresh().await?;
        let loc = reads::plan_snapshot(&self.inner.read(), &query)?;
        match loc {
            Some(loc) => reads::snapshot_of(self.inner.load(loc).await?).map(Some),
            None => Ok(None),
        }
    }

    async fn find_request(&self, key: &RequestKey) -> Result<Option<AppendOutcome>> {
        self.refresh().await?;
        self.inner.read().answered(key, now(), self.inner.retention)
    }

    fn appended(&self) -> watch::Receiver<u64> {
        self.inner.appended.subscribe()
    }

    async fn check_health(&self) -> Result<()> {
        self.inner
            .store
            .list_with_delimiter(Some(&Path::from(self.inner.prefix.clone())))
            .await
            .map(|_| ())
            .map_err(|e| unavailable("listing the container", &e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings_are_parsed_and_checked() {
        let settings =
            parse_connection("AccountName=acc; AccountKey=a2V5;BlobEndpoint=http://h:1/acc;").expect("parse");
        assert_eq!(settings.get("accountname").map(String::as_str), Some("acc"));
        assert_eq!(settings.get("blobendpoint").map(String::as_str), Some("http://h:1/acc"));
        assert!(parse_connection("no-equals-sign").is_err());
        let config = BlobConfig::new("AccountName=acc", "c", "p");
        let Err(refused) = build_store(&config) else { panic!("no key: refused") };
        assert!(refused.to_string().contains("AccountKey"), "{refused}");
        let debug = format!("{:?}", BlobConfig::new("AccountName=acc;AccountKey=c2VjcmV0", "c", "p"));
        assert!(!debug.contains("c2VjcmV0"), "the key is never printed: {debug}");
    }
}
