//! What only the file-system adapter has: everything survives a reopen, a
//! torn tail is cut off and nothing acknowledged is, damage before the end
//! is refused, segments roll over, and one directory has one owner.

mod common;

use std::{io::Write, path::Path};

use common::conformance::{append, event};
use eventfold_store::{
    AllRead, Error, EventLog, ExpectedVersion, FsConfig, FsEventLog, Fsync, ListStreams, RecordedEvent, Snapshot,
    SnapshotNamespace, SnapshotQuery, StreamRead,
};
use serde_json::json;

async fn open(dir: &Path) -> FsEventLog {
    FsEventLog::open(dir, FsConfig::default()).await.expect("open the log")
}

async fn all(log: &FsEventLog) -> Vec<RecordedEvent> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let slice =
            log.read_all(AllRead { after, max_count: 1000, filter: Default::default() }).await.expect("read all");
        out.extend(slice.events);
        after = slice.next_position;
        if slice.end_of_log {
            return out;
        }
    }
}

fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut paths: Vec<_> =
        std::fs::read_dir(dir.join("segments")).expect("segments").map(|e| e.expect("entry").path()).collect();
    paths.sort();
    paths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_survives_a_reopen() {
    let dir = tempfile::tempdir().expect("a directory");
    let (events, infos, first_answer, snapshot) = {
        let log = open(dir.path()).await;
        log.append(append("order-1", ExpectedVersion::NoStream, vec![event("Created", 0), event("Paid", 1)]))
            .await
            .expect("append");
        let mut request = append("order-2", ExpectedVersion::Any, vec![event("Created", 2)]);
        request.request_id = Some("req-1".into());
        let first_answer = log.append(request).await.expect("append with a request id");
        log.append(append("order-1", ExpectedVersion::Exact(1), vec![event("Shipped", 3)])).await.expect("append");
        log.branch_stream("order-1", 1, "order-1-what-if").await.expect("branch");
        log.append(append("order-1-what-if", ExpectedVersion::Exact(1), vec![event("Cancelled", 4)]))
            .await
            .expect("append to the branch");
        log.delete_stream("order-2", None).await.expect("delete");
        let snapshot = log
            .save_snapshot(Snapshot::new("order-1", SnapshotNamespace::Aggregate, 2, json!({"status": "shipped"})))
            .await
            .expect("snapshot");
        let infos = log
            .list_streams(ListStreams { limit: 10, show_deleted: true, ..ListStreams::default() })
            .await
            .expect("list");
        (all(&log).await, infos, first_answer, snapshot)
    };
    assert_eq!(events.len(), 5);

    let log = open(dir.path()).await;
    assert_eq!(log.recovery().events, 5);
    assert!(log.recovery().index_loaded, "the index written at close is used");
    assert_eq!(log.recovery().truncated_bytes, 0, "a clean close leaves no torn tail");
    assert_eq!(all(&log).await, events, "the same events at the same positions");
    let listed =
        log.list_streams(ListStreams { limit: 10, show_deleted: true, ..ListStreams::default() }).await.expect("list");
    assert_eq!(listed, infos, "streams, branches and deletions");
    assert!(matches!(log.read_stream(StreamRead::forwards("order-2", 10)).await, Err(Error::StreamDeleted(_))));
    let branch = log.read_stream(StreamRead::forwards("order-1-what-if", 10)).await.expect("read the branch");
    assert_eq!(
        branch.events.iter().map(|e| e.event_type.as_str()).collect::<Vec<_>>(),
        ["Created", "Paid", "Cancelled"]
    );
    let loaded = log
        .load_snapshot(SnapshotQuery {
            stream_id: "order-1".into(),
            namespace: SnapshotNamespace::Aggregate,
            max_version: None,
            schema_version: None,
        })
        .await
        .expect("load")
        .expect("the snapshot");
    assert_eq!(loaded, snapshot);
    for stream in ["order-1", "order-1-what-if"] {
        assert!(log.verify_stream(stream).await.expect("verify").is_valid(), "{stream}'s chain");
    }

    // The request id is remembered across the reopen: the same request
    // gets its first answer, a different one is refused.
    let mut again = append("order-2", ExpectedVersion::Any, vec![event("Created", 2)]);
    again.request_id = Some("req-1".into());
    let repeat = log.append(again).await.expect("the repeat");
    assert_eq!(repeat, eventfold_store::AppendOutcome { duplicate: true, ..first_answer });
    let mut other = append("order-2", ExpectedVersion::Any, vec![event("Other", 9)]);
    other.request_id = Some("req-1".into());
    assert!(matches!(log.append(other).await, Err(Error::RequestIdReused { .. })));
    // Event ids too: an event id stored before the reopen is refused.
    let mut reused = append("order-3", ExpectedVersion::Any, vec![event("Created", 5)]);
    reused.events[0].event_id = events[0].event_id;
    assert!(matches!(log.append(reused).await, Err(Error::DuplicateEventId { .. })));

    // Appends go on from where the log stopped.
    let next =
        log.append(append("order-1", ExpectedVersion::Exact(2), vec![event("Delivered", 6)])).await.expect("go on");
    assert_eq!((next.first_version, next.positions.clone()), (3, vec![6]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_cut_off_and_nothing_acknowledged_is() {
    for cut in [1usize, 7, 8, 20] {
        let dir = tempfile::tempdir().expect("a directory");
        let acknowledged = {
            let log = open(dir.path()).await;
            for n in 0..10 {
                log.append(append("s", ExpectedVersion::Any, vec![event("E", n)])).await.expect("append");
            }
            all(&log).await
        };
        // A write cut short by a crash: the first `cut` bytes of a frame.
        let segment = segments(dir.path()).pop().expect("a segment");
        let mut frame = Vec::new();
        frame.extend_from_slice(&100u32.to_le_bytes());
        frame.extend_from_slice(&0u32.to_le_bytes());
        frame.extend_from_slice(&[b'x'; 100]);
        let before = std::fs::metadata(&segment).expect("size").len();
        std::fs::OpenOptions::new().append(true).open(&segment).expect("open").write_all(&frame[..cut]).expect("tear");

        let log = open(dir.path()).await;
        assert_eq!(log.recovery().truncated_bytes, cut as u64, "cut {cut}");
        assert_eq!(std::fs::metadata(&segment).expect("size").len(), before, "the tail is gone from the file");
        assert_eq!(all(&log).await, acknowledged, "every acknowledged event is there (cut {cut})");
        let next = log.append(append("s", ExpectedVersion::Exact(9), vec![event("E", 10)])).await.expect("go on");
        assert_eq!(next.positions, [11]);
        assert!(log.verify_stream("s").await.expect("verify").is_valid());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_cut_between_its_events_is_dropped_whole() {
    let dir = tempfile::tempdir().expect("a directory");
    let segment_len_before_last;
    {
        let log = open(dir.path()).await;
        log.append(append("s", ExpectedVersion::Any, vec![event("E", 0)])).await.expect("append");
        segment_len_before_last = std::fs::metadata(segments(dir.path())[0].clone()).expect("size").len();
        log.append(append("s", ExpectedVersion::Any, (1..4).map(|n| event("E", n)).collect())).await.expect("append");
    }
    // Keep the first two of the last append's three frames: as if the
    // crash came between them.
    let segment = segments(dir.path()).pop().expect("a segment");
    let bytes = std::fs::read(&segment).expect("read");
    let mut offset = usize::try_from(segment_len_before_last).expect("small");
    for _ in 0..2 {
        let len = u32::from_le_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes")) as usize;
        offset += 8 + len;
    }
    std::fs::OpenOptions::new().write(true).open(&segment).expect("open").set_len(offset as u64).expect("cut");

    let log = open(dir.path()).await;
    assert_eq!(log.recovery().dropped_events, 2, "the two frames of the unfinished append");
    assert_eq!(
        std::fs::metadata(&segment).expect("size").len(),
        segment_len_before_last,
        "cut back to where the append began"
    );
    let events = all(&log).await;
    assert_eq!(events.len(), 1, "only the whole append remains");
    assert_eq!(log.stream_info("s").await.expect("info").version, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_roll_over_and_damage_before_the_end_is_refused() {
    let dir = tempfile::tempdir().expect("a directory");
    let config = FsConfig { segment_bytes: 4096, ..FsConfig::default() };
    let written = {
        let log = FsEventLog::open(dir.path(), config.clone()).await.expect("open");
        for n in 0..200 {
            log.append(append(&format!("s-{}", n % 7), ExpectedVersion::Any, vec![event("E", n)]))
                .await
                .expect("append");
        }
        all(&log).await
    };
    let paths = segments(dir.path());
    assert!(paths.len() > 3, "200 events in 4 KiB segments make several: {}", paths.len());
    {
        let log = FsEventLog::open(dir.path(), config.clone()).await.expect("reopen");
        assert_eq!(log.recovery().segments as usize, paths.len());
        assert_eq!(all(&log).await, written, "read back across segments");
        for n in 0..7 {
            assert!(log.verify_stream(&format!("s-{n}")).await.expect("verify").is_valid());
        }
    }

    // One flipped byte in the first segment. With the index, the segment is
    // not read on open: the damaged event's checksum fails when it is read,
    // and the read fails rather than answer something else.
    let mut bytes = std::fs::read(&paths[0]).expect("read");
    bytes[20] ^= 0x55;
    std::fs::write(&paths[0], &bytes).expect("damage");
    {
        let log = FsEventLog::open(dir.path(), config.clone()).await.expect("opened from the index");
        assert!(log.recovery().index_loaded);
        let read = log.read_all(AllRead { after: 0, max_count: 10, filter: Default::default() }).await;
        assert!(matches!(&read, Err(Error::Internal(m)) if m.contains("checksum")), "the damage is found: {read:?}");
    }
    // Without the index, every segment is scanned: not a torn tail, so not
    // cut off (that would drop acknowledged events): opening is refused.
    std::fs::remove_file(dir.path().join("index")).expect("remove the index");
    let refused = FsEventLog::open(dir.path(), config).await.expect_err("a damaged segment is refused");
    assert!(matches!(&refused, Error::Internal(m) if m.contains("segment 1 is damaged")), "a clear error: {refused}");
    assert_eq!(std::fs::read(&paths[0]).expect("read").len(), bytes.len(), "nothing was cut off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_directory_has_one_owner() {
    let dir = tempfile::tempdir().expect("a directory");
    let log = open(dir.path()).await;
    let second = FsEventLog::open(dir.path(), FsConfig::default()).await.expect_err("a second owner is refused");
    assert!(
        matches!(&second, Error::Unavailable(m) if m.contains("in use by another process")),
        "a clear error: {second}"
    );
    log.close();
    drop(log);
    open(dir.path()).await;
}

#[test]
fn fsync_policies_parse() {
    use std::time::Duration;
    assert_eq!("always".parse(), Ok(Fsync::Always));
    assert_eq!("never".parse(), Ok(Fsync::Never));
    assert_eq!("batch(10)".parse(), Ok(Fsync::Batch(Duration::from_millis(10))));
    assert_eq!("batch(250ms)".parse(), Ok(Fsync::Batch(Duration::from_millis(250))));
    for bad in ["", "sometimes", "batch()", "batch(0)", "batch(60001)", "batch(-1)", "batch(10"] {
        assert!(bad.parse::<Fsync>().is_err(), "{bad:?} is refused");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_fsync_answers_and_keeps_every_append() {
    let dir = tempfile::tempdir().expect("a directory");
    let config = FsConfig { fsync: Fsync::Batch(std::time::Duration::from_millis(5)), ..FsConfig::default() };
    let written = {
        let log = std::sync::Arc::new(FsEventLog::open(dir.path(), config.clone()).await.expect("open"));
        let tasks: Vec<_> = (0..8)
            .map(|w| {
                let log = std::sync::Arc::clone(&log);
                tokio::spawn(async move {
                    for n in 0..25 {
                        log.append(append(&format!("w-{w}"), ExpectedVersion::Any, vec![event("E", n)]))
                            .await
                            .expect("append");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("writer");
        }
        all(&log).await
    };
    assert_eq!(written.len(), 200);
    let log = FsEventLog::open(dir.path(), config).await.expect("reopen");
    assert_eq!(all(&log).await, written);
}

/// What a log answers, for comparing two opens of it.
async fn everything(log: &FsEventLog) -> (Vec<RecordedEvent>, eventfold_store::StreamPage, Option<Snapshot>) {
    let streams =
        log.list_streams(ListStreams { limit: 100, show_deleted: true, ..ListStreams::default() }).await.expect("list");
    let snapshot = log
        .load_snapshot(SnapshotQuery {
            stream_id: "s-0".into(),
            namespace: SnapshotNamespace::Client,
            max_version: None,
            schema_version: None,
        })
        .await
        .expect("load");
    (all(log).await, streams, snapshot)
}

async fn fill(log: &FsEventLog, from: u64, to: u64) {
    for n in from..to {
        let mut request = append(&format!("s-{}", n % 4), ExpectedVersion::Any, vec![event("E", n)]);
        request.request_id = Some(format!("req-{n}"));
        log.append(request).await.expect("append");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_file_is_used_when_it_matches_and_rebuilt_when_missing_stale_or_damaged() {
    let dir = tempfile::tempdir().expect("a directory");
    let index = dir.path().join("index");
    let expected = {
        let log = open(dir.path()).await;
        fill(&log, 0, 40).await;
        log.branch_stream("s-0", 2, "what-if").await.expect("branch");
        log.append(append("gone", ExpectedVersion::Any, vec![event("E", 99)])).await.expect("append");
        log.delete_stream("gone", None).await.expect("delete");
        log.save_snapshot(Snapshot::new("s-0", SnapshotNamespace::Client, 3, json!({"n": 3}))).await.expect("snapshot");
        everything(&log).await
    };
    let older_index = std::fs::read(&index).expect("the index written at close");

    // Loaded, and the same answers as from the segments.
    {
        let log = open(dir.path()).await;
        assert!(log.recovery().index_loaded);
        assert_eq!(everything(&log).await, expected);
    }
    // Missing: rebuilt from the segments, the same answers.
    std::fs::remove_file(&index).expect("remove the index");
    {
        let log = open(dir.path()).await;
        assert!(!log.recovery().index_loaded, "no index: rebuilt");
        assert_eq!(everything(&log).await, expected);
    }
    // Older than the segments (they only grew since): used, and the rest
    // replayed after it; a request id from after the old index is known.
    let grown = {
        let log = open(dir.path()).await;
        fill(&log, 40, 60).await;
        everything(&log).await
    };
    std::fs::write(&index, &older_index).expect("put the older index back");
    {
        let log = open(dir.path()).await;
        assert!(log.recovery().index_loaded, "an older index that still matches is used");
        assert_eq!(everything(&log).await, grown);
        let mut again = append("s-3", ExpectedVersion::Any, vec![event("E", 55)]);
        again.request_id = Some("req-55".into());
        assert!(log.append(again).await.expect("a repeat").duplicate, "request ids after the old index are known");
    }
    // Damaged: rebuilt.
    let mut damaged = std::fs::read(&index).expect("read");
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x20;
    std::fs::write(&index, &damaged).expect("damage the index");
    {
        let log = open(dir.path()).await;
        assert!(!log.recovery().index_loaded, "a damaged index: rebuilt");
        assert_eq!(everything(&log).await.0, grown.0);
    }
    // Another log's index (segments of other content, longer than what the
    // index covers, so that only the checksum tells): stale, rebuilt.
    let other = tempfile::tempdir().expect("a directory");
    {
        let log = open(other.path()).await;
        fill(&log, 100, 300).await;
    }
    std::fs::copy(&index, other.path().join("index")).expect("copy the index over");
    let log = open(other.path()).await;
    assert!(!log.recovery().index_loaded, "an index of other segments is stale");
    let events = all(&log).await;
    assert_eq!(events.len(), 200);
    assert_eq!(events[0].data["n"], 100, "the log's own events");
}
