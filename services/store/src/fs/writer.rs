//! The one writer of a file-system log: a thread that takes commands in
//! batches, checks each against the committed index and what the batch
//! already staged, writes the batch's frames with one write, makes them
//! durable with one `fsync` (group commit), and only then applies them to
//! the index and answers. A reader never sees an event that a crash could
//! still take away.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    sync::{Arc, atomic::Ordering, mpsc},
    time::Instant,
};

use tokio::sync::oneshot;

use super::{
    Fsync, Shared,
    batch::{EventRef, Prepared, Staged, encode_into, prepare_append},
    index, load_event,
    record::{Hash, Namespace, Record, SnapshotRecord},
    segment_path,
    state::{Loc, now},
    sync_dir,
};
use crate::{
    error::{Error, Result},
    model::{AppendOutcome, AppendRequest, ExpectedVersion, Snapshot, StreamInfo, from_micros},
};

/// Most commands taken into one batch.
const MAX_BATCH: usize = 1024;

pub(super) enum Command {
    Append { request: AppendRequest, reply: oneshot::Sender<Result<AppendOutcome>> },
    Delete { stream: String, expected: Option<u64>, reply: oneshot::Sender<Result<StreamInfo>> },
    Branch { source: String, at_version: u64, branch: String, reply: oneshot::Sender<Result<StreamInfo>> },
    Snapshot { snapshot: Snapshot, reply: oneshot::Sender<Result<Snapshot>> },
}

pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
    /// The last segment, opened for appending.
    pub(super) file: File,
    pub(super) segment: u32,
    pub(super) len: u64,
    /// Since when written frames wait for an `fsync` (`Fsync::Batch`).
    pub(super) dirty_since: Option<Instant>,
}

fn storage_failed() -> Error {
    Error::Unavailable("the event log could not write to its storage".into())
}

impl Writer {
    pub(super) fn run(mut self, commands: mpsc::Receiver<Command>) {
        while let Some(first) = self.next(&commands) {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match commands.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
            self.process(batch);
        }
        self.sync_if_dirty();
        self.write_index();
    }

    /// Write the index file, covering what the segments hold now (not after
    /// a failure: the index would cover what may not be durable).
    fn write_index(&self) {
        if self.failed() {
            return;
        }
        let state = self.shared.read();
        let written = state
            .segment(self.segment)
            .map_err(|e| io::Error::other(e.to_string()))
            .and_then(|file| index::cover(&file, self.segment, self.len))
            .and_then(|cover| index::write(&self.shared.dir, &state, cover));
        if let Err(e) = written {
            tracing::warn!(error = %e.kind(), "the event log's index file was not written; the next open rebuilds it");
        }
    }

    /// The next command; with `Fsync::Batch`, written frames are made
    /// durable when their time is up even while no command comes.
    fn next(&mut self, commands: &mpsc::Receiver<Command>) -> Option<Command> {
        loop {
            match (self.dirty_since, self.shared.config.fsync) {
                (Some(since), Fsync::Batch(every)) => {
                    match commands.recv_timeout(every.saturating_sub(since.elapsed())) {
                        Ok(command) => return Some(command),
                        Err(mpsc::RecvTimeoutError::Timeout) => self.sync_if_dirty(),
                        Err(mpsc::RecvTimeoutError::Disconnected) => return None,
                    }
                }
                _ => return commands.recv().ok(),
            }
        }
    }

    fn failed(&self) -> bool {
        self.shared.failed.load(Ordering::Acquire)
    }

    fn fail(&self, what: &str, error: &io::Error) {
        tracing::error!(error = %error, "the file-system event log {what} failed; it refuses writes until it is reopened");
        self.shared.failed.store(true, Ordering::Release);
    }

    fn process(&mut self, batch: Vec<Command>) {
        let mut staged = Staged::default();
        if !self.failed() {
            self.roll_if_full();
        }
        for command in batch {
            if self.failed() {
                refuse(command);
                continue;
            }
            match command {
                Command::Append { request, reply } => {
                    let prepared = {
                        let state = self.shared.read();
                        prepare_append(
                            &state,
                            &mut staged,
                            request,
                            (self.segment, self.len),
                            self.shared.config.request_retention,
                        )
                    };
                    match prepared {
                        Ok(Prepared::Answered(outcome)) => drop(reply.send(Ok(outcome))),
                        Ok(Prepared::Staged(outcome)) => staged.replies.push((reply, outcome)),
                        Err(e) => drop(reply.send(Err(e))),
                    }
                }
                other => {
                    self.commit(std::mem::take(&mut staged));
                    if self.failed() {
                        refuse(other);
                    } else {
                        self.single(other);
                    }
                }
            }
        }
        self.commit(staged);
    }

    /// Write, make durable, apply and answer what the batch staged.
    fn commit(&mut self, staged: Staged) {
        if staged.frames.is_empty() {
            return;
        }
        if let Err(e) = self.write(&staged.frames) {
            for (reply, _) in staged.replies {
                drop(reply.send(Err(storage_failed())));
            }
            tracing::debug!(error = %e, "a batch of the file-system log was not written");
            return;
        }
        let applied = {
            let now = now();
            let retention = self.shared.config.request_retention;
            let mut state = self.shared.write();
            let mut applied = Ok(());
            for append in &staged.appends {
                applied = applied.and_then(|()| state.apply_append(append, retention, now));
            }
            state.forget_requests(now, retention);
            applied.map(|()| state.head())
        };
        match applied {
            Ok(head) => {
                self.shared.appended.send_replace(head);
                for (reply, outcome) in staged.replies {
                    drop(reply.send(Ok(outcome)));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "the file-system log's index refused a written batch");
                self.shared.failed.store(true, Ordering::Release);
                for (reply, _) in staged.replies {
                    drop(reply.send(Err(storage_failed())));
                }
            }
        }
    }

    /// Append `bytes` to the segment and make them as durable as the
    /// configuration asks; on failure the segment is cut back to where it
    /// was (or the log refuses further writes when even that fails).
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let written = if cfg!(feature = "failpoints") {
            // Two writes in test builds, so that a crash test can stop the
            // process with a batch on disk but for its last byte (inside
            // its last frame, whatever the batch holds).
            let (head, tail) = bytes.split_at(bytes.len().saturating_sub(1));
            self.file.write_all(head).and_then(|()| {
                crate::failpoint!("fs::mid_write");
                self.file.write_all(tail)
            })
        } else {
            self.file.write_all(bytes)
        };
        if let Err(e) = written {
            if let Err(undo) = self.file.set_len(self.len) {
                self.fail("cutting back a failed write", &undo);
            }
            return Err(e);
        }
        crate::failpoint!("fs::after_write");
        match self.shared.config.fsync {
            Fsync::Always => {
                if let Err(e) = self.file.sync_data() {
                    // Whether the frames reached the disk is unknown: no
                    // further write may build on them.
                    self.fail("fsync", &e);
                    return Err(e);
                }
            }
            Fsync::Batch(every) => {
                let since = *self.dirty_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= every {
                    self.sync_if_dirty();
                }
            }
            Fsync::Never => {}
        }
        self.len = self.len.saturating_add(bytes.len() as u64);
        Ok(())
    }

    fn sync_if_dirty(&mut self) {
        if self.dirty_since.take().is_some()
            && let Err(e) = self.file.sync_data()
        {
            self.fail("fsync", &e);
        }
    }

    /// Start a new segment when the current one is full.
    fn roll_if_full(&mut self) {
        if self.len < self.shared.config.segment_bytes {
            return;
        }
        self.sync_if_dirty();
        let Some(next) = self.segment.checked_add(1) else { return };
        let path = segment_path(&self.shared.dir, next);
        let opened = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .and_then(|file| sync_dir(&self.shared.dir.join("segments")).map(|()| file))
            .and_then(|file| File::open(&path).map(|reader| (file, reader)));
        match opened {
            Ok((file, reader)) => {
                self.shared.write().segments.push(Arc::new(reader));
                self.file = file;
                self.segment = next;
                self.len = 0;
                self.write_index();
            }
            Err(e) => self.fail("starting a new segment", &e),
        }
    }

    /// A command other than an append, alone in its commit.
    fn single(&mut self, command: Command) {
        match command {
            Command::Append { reply, .. } => drop(reply.send(Err(Error::Internal("misrouted append".into())))),
            Command::Delete { stream, expected, reply } => drop(reply.send(self.delete(stream, expected))),
            Command::Branch { source, at_version, branch, reply } => {
                drop(reply.send(self.branch(source, at_version, branch)));
            }
            Command::Snapshot { snapshot, reply } => drop(reply.send(self.snapshot(snapshot))),
        }
    }

    /// Write one record, make it durable and apply it.
    fn commit_one(&mut self, record: &Record) -> Result<()> {
        let mut frame = Vec::new();
        let offset = self.len;
        let len = match record {
            Record::Snapshot(snapshot) => encode_into(&mut frame, &EventRef::Snapshot(snapshot))?,
            other => encode_into(&mut frame, other)?,
        };
        self.write(&frame).map_err(|_| storage_failed())?;
        self.shared.write().apply_other(record, Loc { segment: self.segment, offset, len })
    }

    fn delete(&mut self, stream: String, expected: Option<u64>) -> Result<StreamInfo> {
        {
            let state = self.shared.read();
            let current = state.live_stream(&stream)?.info.version;
            if let Some(expected) = expected
                && current != Some(expected)
            {
                return Err(Error::WrongExpectedVersion {
                    stream,
                    expected: ExpectedVersion::Exact(expected),
                    actual: current,
                });
            }
        }
        self.commit_one(&Record::Delete { stream: stream.clone(), at: now() })?;
        let state = self.shared.read();
        state.streams.get(&stream).map(|s| s.info.clone()).ok_or(Error::StreamNotFound(stream))
    }

    /// The hash-chain link of the stream's event at `version`.
    fn link_at(&self, stream: &str, version: u64) -> Result<Option<[u8; 32]>> {
        let found = {
            let state = self.shared.read();
            match state.position_of(stream, version).and_then(|p| state.entry(p).copied()) {
                Some(entry) => Some((state.segment(entry.loc.segment)?, entry.loc)),
                None => None,
            }
        };
        match found {
            Some((file, loc)) => Ok(Some(load_event(&file, loc)?.hash.0)),
            None => Ok(None),
        }
    }

    fn branch(&mut self, source: String, at_version: u64, branch: String) -> Result<StreamInfo> {
        {
            let state = self.shared.read();
            let version = state.live_stream(&source)?.info.version;
            if version.is_none_or(|v| at_version > v) {
                return Err(Error::invalid(
                    "at_version",
                    format!("stream {source} has no version {at_version} (current: {version:?})"),
                ));
            }
            if state.streams.contains_key(&branch) {
                return Err(Error::StreamAlreadyExists(branch));
            }
        }
        let head = self.link_at(&source, at_version)?.map(Hash);
        self.commit_one(&Record::Branch { stream: branch.clone(), source, at_version, head, at: now() })?;
        Ok(self.shared.read().live_stream(&branch)?.info.clone())
    }

    fn snapshot(&mut self, mut snapshot: Snapshot) -> Result<Snapshot> {
        let version = self.shared.read().live_stream(&snapshot.stream_id)?.info.version;
        let head = match version {
            Some(v) if snapshot.version <= v => self.link_at(&snapshot.stream_id, snapshot.version)?,
            _ => None,
        };
        let Some(head) = head else {
            return Err(Error::invalid(
                "version",
                format!("stream {} has no version {}", snapshot.stream_id, snapshot.version),
            ));
        };
        let at = now();
        let record = Record::Snapshot(SnapshotRecord {
            stream: snapshot.stream_id.clone(),
            namespace: Namespace::from(snapshot.namespace),
            version: snapshot.version,
            schema_version: snapshot.schema_version,
            state: std::mem::take(&mut snapshot.state),
            at,
            head: Hash(head),
        });
        self.commit_one(&record)?;
        if let Record::Snapshot(saved) = record {
            snapshot.state = saved.state;
        }
        snapshot.head_hash = head;
        snapshot.created_at = from_micros(at);
        Ok(snapshot)
    }
}

fn refuse(command: Command) {
    match command {
        Command::Append { reply, .. } => drop(reply.send(Err(storage_failed()))),
        Command::Delete { reply, .. } | Command::Branch { reply, .. } => drop(reply.send(Err(storage_failed()))),
        Command::Snapshot { reply, .. } => drop(reply.send(Err(storage_failed()))),
    }
}
