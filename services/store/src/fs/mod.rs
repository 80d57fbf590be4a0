//! The file-system adapter: an append-only log under one directory, for a
//! durable `eventfold dev` without PostgreSQL and for topics stored in
//! local files.
//!
//! # On disk
//!
//! - `LOCK`: held (an advisory `flock`) by the one process that has the
//!   directory open; a second process is refused.
//! - `segments/NNNNNNNNNNNNNNNNNNNN.log`: the log, in segments of about
//!   [`FsConfig::segment_bytes`], each a sequence of frames (length,
//!   CRC32C, a JSON record; see `frame.rs` and `record.rs`).
//! - `index`: the in-memory index as of the last open, close or segment
//!   roll, and what of the segments it covers (see `index.rs`).
//!
//! # Durability
//!
//! One writer thread takes appends in batches (group commit): one write and,
//! with [`Fsync::Always`] (the default), one `fsync` per batch before any
//! append of it is answered or becomes visible to readers. With
//! [`Fsync::Batch`] an append is answered once written (it survives a crash
//! of the process) and made durable within the interval (a crash of the
//! machine may lose that interval); with [`Fsync::Never`] the operating
//! system decides.
//!
//! On open the index (in memory: where each event lies, each stream's
//! versions and head, event ids, request ids, snapshots; payloads stay on
//! disk) is read from the `index` file and the segments after what it
//! covers are replayed; when the file is missing, damaged or stale (the
//! segments it names do not hold the bytes it covered), every segment is
//! replayed instead. A torn tail of
//! the last segment (a frame cut short or failing its checksum, or an
//! append whose events are not all there) is cut off: it was never
//! answered, since nothing is answered before its whole batch is written
//! and synced. Damage anywhere else is refused rather than repaired.

pub(crate) mod batch;
pub(crate) mod frame;
pub(crate) mod index;
pub(crate) mod reads;
pub(crate) mod record;
pub(crate) mod state;
mod writer;

use std::{
    fs::{File, OpenOptions},
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use async_trait::async_trait;
use tokio::sync::{oneshot, watch};

use self::{
    record::{EventRecord, Record},
    state::{Loc, State},
    writer::{Command, Writer},
};
use crate::{
    error::{Error, Result},
    log::EventLog,
    memory::DEFAULT_REQUEST_RETENTION,
    model::{
        AllRead, AllSlice, AppendOutcome, AppendRequest, ListStreams, RecordedEvent, RequestKey, Snapshot,
        SnapshotQuery, StreamInfo, StreamPage, StreamRead, StreamSlice, check_stream_id, check_version,
    },
};

/// When appended frames are forced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fsync {
    /// Before any append of a batch is answered (group commit).
    #[default]
    Always,
    /// At most this long after a write; appends are answered once written.
    Batch(Duration),
    /// Never explicitly; the operating system writes back when it likes.
    Never,
}

impl FromStr for Fsync {
    type Err = String;

    /// `always`, `never`, or `batch(MS)` / `batch(MSms)` with 1 to 60000 ms.
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        match text {
            "always" => return Ok(Self::Always),
            "never" => return Ok(Self::Never),
            _ => {}
        }
        let ms = text
            .strip_prefix("batch(")
            .and_then(|rest| rest.strip_suffix(')'))
            .map(|ms| ms.trim().trim_end_matches("ms"))
            .and_then(|ms| ms.parse::<u64>().ok())
            .filter(|ms| (1..=60_000).contains(ms));
        ms.map(|ms| Self::Batch(Duration::from_millis(ms)))
            .ok_or_else(|| "must be always, never or batch(MS) with MS from 1 to 60000".to_owned())
    }
}

/// Settings of a file-system log.
#[derive(Debug, Clone)]
pub struct FsConfig {
    pub fsync: Fsync,
    /// A new segment starts once the current one holds this many bytes.
    pub segment_bytes: u64,
    /// How long request ids are remembered (AIP-155 retries).
    pub request_retention: Duration,
}

impl Default for FsConfig {
    fn default() -> Self {
        Self { fsync: Fsync::Always, segment_bytes: 64 * 1024 * 1024, request_retention: DEFAULT_REQUEST_RETENTION }
    }
}

/// What opening the log found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    pub segments: u32,
    /// Events in the log after recovery.
    pub events: u64,
    /// Bytes of a torn tail that were cut off.
    pub truncated_bytes: u64,
    /// Events of an unfinished append that were cut off with it.
    pub dropped_events: u64,
    /// Whether the index file was used (else it was missing or stale and
    /// the index was rebuilt from every segment).
    pub index_loaded: bool,
}

/// What the writer and the readers share.
pub(crate) struct Shared {
    state: RwLock<State>,
    appended: watch::Sender<u64>,
    /// Set when a write could not be completed or undone: the log refuses
    /// writes until it is reopened.
    failed: AtomicBool,
    config: FsConfig,
    dir: PathBuf,
    /// Held for as long as the log is open.
    _lock: File,
}

impl Shared {
    // A panic while holding the lock cannot leave a half-applied change:
    // the index is changed only by `apply_*`, whose checks come first.
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// An event log in a directory of the local file system.
pub struct FsEventLog {
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
    recovery: Recovery,
}

impl std::fmt::Debug for FsEventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsEventLog").field("recovery", &self.recovery).finish_non_exhaustive()
    }
}

fn segment_path(dir: &Path, segment: u32) -> PathBuf {
    dir.join("segments").join(format!("{segment:020}.log"))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn load_event(file: &File, loc: Loc) -> Result<EventRecord> {
    match load(file, loc)? {
        Record::Event(event) => Ok(*event),
        _ => Err(Error::Internal("the index points at a record that is not an event".into())),
    }
}

fn load(file: &File, loc: Loc) -> Result<Record> {
    let payload =
        frame::read(file, loc.offset, loc.len).map_err(|e| Error::Internal(format!("reading the event log: {e}")))?;
    serde_json::from_slice(&payload).map_err(|e| Error::Internal(format!("decoding the event log: {e}")))
}

fn io_error(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::Unavailable(format!("{what}: {e}"))
}

impl FsEventLog {
    /// Open (or create) the log in `dir`, recovering from a crash.
    ///
    /// # Errors
    ///
    /// `Unavailable` when another process has the directory open or it
    /// cannot be read or written; `Internal` when a segment is damaged
    /// before its end.
    pub async fn open(dir: impl Into<PathBuf>, config: FsConfig) -> Result<Self> {
        let dir = dir.into();
        tokio::task::spawn_blocking(move || Self::open_blocking(dir, config))
            .await
            .map_err(|e| Error::Internal(format!("opening the event log: {e}")))?
    }

    fn open_blocking(dir: PathBuf, config: FsConfig) -> Result<Self> {
        let segments_dir = dir.join("segments");
        std::fs::create_dir_all(&segments_dir).map_err(io_error("creating the data directory"))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .map_err(io_error("opening the lock file"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::Unavailable(
                    "the data directory is in use by another process (its LOCK file is held)".into(),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_error("locking the data directory")(e)),
        }

        let mut numbers = Vec::new();
        for entry in std::fs::read_dir(&segments_dir).map_err(io_error("listing the segments"))? {
            let name = entry.map_err(io_error("listing the segments"))?.file_name();
            let name = name.to_string_lossy();
            if let Some(n) = name.strip_suffix(".log").filter(|n| n.len() == 20).and_then(|n| n.parse::<u32>().ok()) {
                numbers.push(n);
            }
        }
        numbers.sort_unstable();
        if numbers.iter().zip(1u32..).any(|(n, expected)| *n != expected) {
            return Err(Error::Internal("segments of the event log are missing".into()));
        }
        if numbers.is_empty() {
            OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(segment_path(&dir, 1))
                .map_err(io_error("creating the first segment"))?;
            sync_dir(&segments_dir).map_err(io_error("creating the first segment"))?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                // Best effort: the directory itself may be new.
                drop(sync_dir(parent));
            }
            numbers.push(1);
        }

        let mut recovery = Recovery::default();
        let last = numbers.last().copied().unwrap_or(1);
        let (mut state, (from_segment, from_offset)) = match index::load(&dir, |n| segment_path(&dir, n), last) {
            Some((state, cover)) => {
                recovery.index_loaded = true;
                (state, (cover.segment, cover.end))
            }
            None => {
                if dir.join("index").exists() {
                    tracing::warn!("the event log's index file is stale or damaged: rebuilding it from the segments");
                }
                (State::default(), (1, 0))
            }
        };
        let now = state::now();
        let mut tail_len = 0;
        for &segment in &numbers {
            let path = segment_path(&dir, segment);
            let file = OpenOptions::new().read(true).write(true).open(&path).map_err(io_error("opening a segment"))?;
            if segment < from_segment {
                // Covered by the index.
                state.segments.push(Arc::new(File::open(&path).map_err(io_error("opening a segment"))?));
                continue;
            }
            let start = if segment == from_segment { from_offset } else { 0 };
            let mut replay = state::Replay::default();
            let scanned = frame::scan(&file, start, |offset, len, payload| {
                let loc = Loc { segment, offset, len };
                let record: Record = serde_json::from_slice(payload)
                    .map_err(|e| Error::Internal(format!("segment {segment}: a record cannot be decoded: {e}")))?;
                replay.push(&mut state, record, loc, config.request_retention, now)
            })?
            .map_err(io_error("reading a segment"))?;
            let group = replay.unfinished();
            let mut keep = scanned.valid_end;
            if let Some((_, first)) = group.first() {
                keep = first.offset;
                recovery.dropped_events = group.len() as u64;
            }
            if keep < scanned.file_len {
                if segment != last {
                    return Err(Error::Internal(format!(
                        "segment {segment} is damaged at byte {keep}, before the end of the log; \
                         it is not repaired automatically (restore the directory from a backup)"
                    )));
                }
                file.set_len(keep).map_err(io_error("cutting off a torn tail"))?;
                file.sync_all().map_err(io_error("cutting off a torn tail"))?;
                recovery.truncated_bytes = scanned.file_len.saturating_sub(keep);
            }
            if segment == last {
                tail_len = keep;
            }
            state.segments.push(Arc::new(File::open(&path).map_err(io_error("opening a segment"))?));
        }
        recovery.segments = last;
        recovery.events = state.head();
        if recovery.truncated_bytes > 0 {
            tracing::warn!(
                bytes = recovery.truncated_bytes,
                events = recovery.dropped_events,
                "the event log's last segment ended in a torn write (a crash before its batch was acknowledged); cut it off"
            );
        }
        tracing::info!(
            segments = recovery.segments,
            events = recovery.events,
            index_loaded = recovery.index_loaded,
            "file-system event log opened"
        );
        // The next open starts from here, whatever happens meanwhile.
        if let Some(last_file) = state.segments.last() {
            let written = index::cover(last_file, last, tail_len).and_then(|cover| index::write(&dir, &state, cover));
            if let Err(e) = written {
                tracing::warn!(error = %e.kind(), "the event log's index file was not written; the next open rebuilds it");
            }
        }

        let file = OpenOptions::new()
            .append(true)
            .open(segment_path(&dir, last))
            .map_err(io_error("opening the last segment"))?;
        let head = state.head();
        let shared = Arc::new(Shared {
            state: RwLock::new(state),
            appended: watch::channel(head).0,
            failed: AtomicBool::new(false),
            config,
            dir,
            _lock: lock,
        });
        let writer = Writer { shared: Arc::clone(&shared), file, segment: last, len: tail_len, dirty_since: None };
        let (commands, receiver) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("eventfold-fs-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(|e| Error::Internal(format!("starting the log's writer: {e}")))?;
        Ok(Self { commands: Mutex::new(Some(commands)), shared, writer: Mutex::new(Some(handle)), recovery })
    }

    /// What opening the log found.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// Stop the writer once it has written what it was given, and let go of
    /// the directory (another process may open it once every read in
    /// flight has finished).
    pub fn close(&self) {
        drop(self.commands.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take());
        let handle = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            tracing::error!("the file-system log's writer panicked");
        }
    }

    async fn send<T>(&self, command: impl FnOnce(oneshot::Sender<Result<T>>) -> Command) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        let sent = match &*self.commands.lock().unwrap_or_else(std::sync::PoisonError::into_inner) {
            Some(commands) => commands.send(command(reply)).is_ok(),
            None => false,
        };
        if !sent {
            return Err(Error::Unavailable("the event log is closed".into()));
        }
        answer.await.map_err(|_| Error::Unavailable("the event log's writer stopped".into()))?
    }

    /// Load the events at `locs` off the async threads.
    async fn load_events<T: Send + 'static>(
        &self,
        locs: Vec<(Arc<File>, Loc)>,
        take: impl FnOnce(Box<dyn Iterator<Item = Result<RecordedEvent>> + Send>) -> T + Send + 'static,
    ) -> Result<T> {
        tokio::task::spawn_blocking(move || {
            let events = locs.into_iter().map(|(file, loc)| load_event(&file, loc).map(EventRecord::into_event));
            take(Box::new(events))
        })
        .await
        .map_err(|e| Error::Internal(format!("reading the event log: {e}")))
    }
}

impl Drop for FsEventLog {
    fn drop(&mut self) {
        self.close();
    }
}

/// The segment of each location.
fn with_files(state: &State, locs: &[Loc]) -> Result<Vec<(Arc<File>, Loc)>> {
    locs.iter().map(|loc| Ok((state.segment(loc.segment)?, *loc))).collect()
}

#[async_trait]
impl EventLog for FsEventLog {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome> {
        request.validate()?;
        self.send(|reply| Command::Append { request, reply }).await
    }

    async fn read_stream(&self, read: StreamRead) -> Result<StreamSlice> {
        read.validate()?;
        let (plan, files) = {
            let state = self.shared.read();
            let plan = reads::plan_stream(&state, &read)?;
            let files = with_files(&state, &plan.locs)?;
            (plan, files)
        };
        let read_for_cut = read.clone();
        let (events, cut) = self.load_events(files, move |loaded| reads::cut_stream(&read_for_cut, loaded)).await??;
        Ok(StreamSlice { events, stream_version: plan.stream_version, end_of_stream: !cut && !plan.more })
    }

    async fn read_all(&self, read: AllRead) -> Result<AllSlice> {
        read.validate()?;
        let (plan, files) = {
            let state = self.shared.read();
            let plan = reads::plan_all(&state, &read);
            let locs: Vec<Loc> = plan.picks.iter().map(|(_, loc)| *loc).collect();
            let files = with_files(&state, &locs)?;
            (plan, files)
        };
        let positions: Vec<u64> = plan.picks.iter().map(|(p, _)| *p).collect();
        let end = (plan.scanned_to, plan.head);
        self.load_events(files, move |loaded| reads::cut_all(&read, end, positions.into_iter().zip(loaded))).await?
    }

    async fn last_position(&self) -> Result<u64> {
        Ok(self.shared.read().head())
    }

    async fn stream_info(&self, stream_id: &str) -> Result<StreamInfo> {
        check_stream_id("stream_id", stream_id)?;
        Ok(self.shared.read().live_stream(stream_id)?.info.clone())
    }

    async fn list_streams(&self, query: ListStreams) -> Result<StreamPage> {
        query.validate()?;
        Ok(reads::list_streams(&self.shared.read(), &query))
    }

    async fn delete_stream(&self, stream_id: &str, expected_version: Option<u64>) -> Result<StreamInfo> {
        check_stream_id("stream_id", stream_id)?;
        check_version("expected_version", expected_version)?;
        let stream = stream_id.to_owned();
        self.send(|reply| Command::Delete { stream, expected: expected_version, reply }).await
    }

    async fn branch_stream(&self, source: &str, at_version: u64, branch: &str) -> Result<StreamInfo> {
        check_stream_id("source_stream_id", source)?;
        check_stream_id("branch_stream_id", branch)?;
        check_version("at_version", Some(at_version))?;
        let (source, branch) = (source.to_owned(), branch.to_owned());
        self.send(|reply| Command::Branch { source, at_version, branch, reply }).await
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<Snapshot> {
        snapshot.validate()?;
        self.send(|reply| Command::Snapshot { snapshot, reply }).await
    }

    async fn load_snapshot(&self, query: SnapshotQuery) -> Result<Option<Snapshot>> {
        query.validate()?;
        let found = {
            let state = self.shared.read();
            match reads::plan_snapshot(&state, &query)? {
                Some(loc) => Some((state.segment(loc.segment)?, loc)),
                None => None,
            }
        };
        let Some((file, loc)) = found else { return Ok(None) };
        let record = tokio::task::spawn_blocking(move || load(&file, loc))
            .await
            .map_err(|e| Error::Internal(format!("reading the event log: {e}")))??;
        reads::snapshot_of(record).map(Some)
    }

    async fn find_request(&self, key: &RequestKey) -> Result<Option<AppendOutcome>> {
        self.shared.read().answered(key, state::now(), self.shared.config.request_retention)
    }

    fn appended(&self) -> watch::Receiver<u64> {
        self.shared.appended.subscribe()
    }

    async fn check_health(&self) -> Result<()> {
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(Error::Unavailable("the event log's storage failed a write; restart the process".into()));
        }
        Ok(())
    }
}
