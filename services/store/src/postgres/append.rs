//! One batch of appends (the group commit's unit), decided in Rust and
//! written in one transaction of two pipelined round trips:
//!
//! 1. `BEGIN`, then the batch's streams locked in id order (the missing
//!    ones made in the same statement), with the database's clock; the new
//!    request ids claimed; on a retry after a unique violation, the event
//!    ids stored before.
//! 2. Each append checked against its own expected version and the hash
//!    chain computed here from the locked heads, then one statement writes
//!    the events, moves the stream rows and stores the request ids'
//!    answers, and `COMMIT` follows in the same round trip.
//!
//! This replaces the `eventstore.append_batch` PL/pgSQL function, which is
//! kept in the database as the reference the property test compares with:
//! the same checks, answers and links, without its per-append loops and
//! statements on the server.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::SystemTime;

use serde_json::Value;
use tokio_postgres::{GenericClient, Statement, types::ToSql};
use uuid::Uuid;

use super::tables::Tables;
use crate::{
    error::Error,
    hash,
    model::{AppendOutcome, AppendRequest, ExpectedVersion, RequestKey, bigint, from_bigint, to_micros},
};

/// An append as a batch takes it: the request, the content digests of its
/// events, its request key.
pub(super) struct Appending<'a> {
    pub(super) request: &'a AppendRequest,
    pub(super) contents: &'a [[u8; 32]],
    pub(super) key: Option<&'a RequestKey>,
}

/// Locks the batch's streams (sorted ids, `$1`) in id order and makes the
/// missing ones; a stream neither locked nor made was made by a transaction
/// that committed after this statement's snapshot, and is locked by
/// [`RELOCK`]. The clock is read after the locks are held. The transaction
/// gets its id here (`pg_current_xact_id()`, which locking or making a row
/// would do anyway), before [`WRITE`] allocates positions: the gap-safe
/// tail relies on that order (see `xid.rs`).
const LOCK: &str = "WITH locked AS MATERIALIZED ( \
        SELECT t.stream_id, t.version, t.head_hash, t.deleted_at IS NOT NULL AS deleted \
          FROM eventstore.streams t WHERE t.stream_id = ANY ($1::text[]) ORDER BY t.stream_id FOR UPDATE), \
    made AS ( \
        INSERT INTO eventstore.streams (stream_id) \
        SELECT u.id FROM unnest($1::text[]) WITH ORDINALITY AS u (id, n) \
         WHERE NOT EXISTS (SELECT 1 FROM locked l WHERE l.stream_id = u.id) ORDER BY u.n \
        ON CONFLICT (stream_id) DO NOTHING RETURNING stream_id) \
    SELECT l.stream_id, l.version, l.head_hash, l.deleted, false AS made, clock_timestamp() AS now, \
           pg_current_xact_id()::text AS tx FROM locked l \
    UNION ALL \
    SELECT m.stream_id, -1::bigint, NULL::bytea, false, true, clock_timestamp(), pg_current_xact_id()::text FROM made m";

const RELOCK: &str = "SELECT t.stream_id, t.version, t.head_hash, t.deleted_at IS NOT NULL AS deleted, \
                             false AS made, clock_timestamp() AS now, pg_current_xact_id()::text AS tx \
                        FROM eventstore.streams t WHERE t.stream_id = ANY ($1::text[]) ORDER BY t.stream_id FOR UPDATE";

/// Claims the new request keys (a claim is made and answered, or removed,
/// in one transaction); the ones it does not return were claimed before.
const CLAIM: &str = "INSERT INTO eventstore.append_requests (scope, request_id, stream_id, fingerprint) \
                     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[]) \
                     ON CONFLICT (scope, request_id) DO NOTHING RETURNING scope, request_id";

/// The stored answers of keys claimed before: a statement of its own, whose
/// snapshot sees a claim that committed while [`CLAIM`] waited on it.
const SEEN: &str = "SELECT q.scope, q.request_id, q.result, q.fingerprint, q.stream_id \
                      FROM eventstore.append_requests q \
                      JOIN unnest($1::text[], $2::text[]) AS u (s, r) ON q.scope = u.s AND q.request_id = u.r";

/// Event ids stored before (only on a retry after a unique violation: on
/// the hot path the unique index refuses a duplicate on its own).
const STORED_IDS: &str = "SELECT event_id FROM eventstore.events WHERE event_id = ANY ($1::uuid[])";

/// Writes the events (positions from the column default, taken in array
/// order, so they ascend through the batch), moves the stream rows and
/// stores the answers of the request keys, with the stream and fingerprint
/// of the append answered (a key's claim holds its first occurrence's, which
/// may have been refused); returns the positions in order.
const WRITE: &str = "WITH written AS ( \
        INSERT INTO eventstore.events (stream_id, version, event_id, event_type, schema_version, data, metadata, \
                                       created_at, hash) \
        SELECT u.stream, u.ver, u.id, u.typ, u.sv, u.dat, u.meta, $9::timestamptz, u.hash \
          FROM unnest($1::text[], $2::bigint[], $3::uuid[], $4::text[], $5::integer[], $6::jsonb[], $7::jsonb[], \
                      $8::bytea[]) AS u (stream, ver, id, typ, sv, dat, meta, hash) \
        RETURNING global_position, stream_id, version), \
    spans AS ( \
        SELECT w.stream_id, min(w.global_position) AS lo, max(w.global_position) AS hi FROM written w \
         GROUP BY w.stream_id), \
    moved AS ( \
        UPDATE eventstore.streams t SET version = u.ver, head_hash = u.head, \
               first_position = coalesce(t.first_position, p.lo), last_position = p.hi, updated_at = $9::timestamptz \
          FROM unnest($10::text[], $11::bigint[], $12::bytea[]) AS u (id, ver, head) \
          JOIN spans p ON p.stream_id = u.id \
         WHERE t.stream_id = u.id), \
    answered AS ( \
        UPDATE eventstore.append_requests q SET result = jsonb_build_object( \
               'first_version', u.f, 'last_version', u.l, 'positions', \
               (SELECT jsonb_agg(w.global_position ORDER BY w.global_position) FROM written w \
                 WHERE w.stream_id = u.stream AND w.version BETWEEN u.f AND u.l)), \
               stream_id = u.stream, fingerprint = u.print \
          FROM unnest($13::text[], $14::text[], $15::text[], $16::bigint[], $17::bigint[], $18::bytea[]) \
               AS u (s, r, stream, f, l, print) \
         WHERE q.scope = u.s AND q.request_id = u.r) \
    SELECT coalesce(array_agg(w.global_position ORDER BY w.global_position), '{}') AS positions FROM written w";

/// Removes this batch's claims of appends that were refused.
const UNCLAIM: &str = "DELETE FROM eventstore.append_requests q \
                        USING unnest($1::text[], $2::text[]) AS u (s, r) \
                        WHERE q.scope = u.s AND q.request_id = u.r AND q.result IS NULL";

/// Removes stream rows this batch made only to lock them (nothing written).
const UNMAKE: &str = "DELETE FROM eventstore.streams t \
                       WHERE t.stream_id = ANY ($1::text[]) AND t.version = -1 AND t.parent_stream_id IS NULL";

/// The batch's statements, prepared on the connection it runs on. Only
/// prepared statements (and simple queries) are sent on a future's first
/// poll, which keeps the pipelined statements of a round trip in order: a
/// statement given as text would be parsed first and sent after the
/// `COMMIT` behind it.
pub(super) struct Statements {
    lock: Statement,
    relock: Statement,
    claim: Statement,
    seen: Statement,
    stored_ids: Statement,
    write: Statement,
    unclaim: Statement,
    unmake: Statement,
}

impl Statements {
    /// Prepared on `client` for `tables`, in one pipelined round trip.
    pub(super) async fn prepare(
        client: &(impl GenericClient + Sync),
        tables: &Tables,
    ) -> Result<Self, tokio_postgres::Error> {
        let [lock, relock, claim, seen, stored_ids, write, unclaim, unmake] =
            [LOCK, RELOCK, CLAIM, SEEN, STORED_IDS, WRITE, UNCLAIM, UNMAKE].map(|sql| tables.sql(sql));
        let (lock, relock, claim, seen, stored_ids, write, unclaim, unmake) = tokio::try_join!(
            client.prepare(&lock),
            client.prepare(&relock),
            client.prepare(&claim),
            client.prepare(&seen),
            client.prepare(&stored_ids),
            client.prepare(&write),
            client.prepare(&unclaim),
            client.prepare(&unmake),
        )?;
        Ok(Self { lock, relock, claim, seen, stored_ids, write, unclaim, unmake })
    }
}

/// How a batch ended before its appends were decided.
#[derive(Debug)]
pub(super) enum Failure {
    Database(tokio_postgres::Error),
    /// A stream of the batch could be neither locked nor made (made and
    /// removed again by others meanwhile, three times): try the batch again.
    Unlocked(String),
    /// What is stored cannot be right (a head link that is not 32 bytes).
    Corrupt(String),
}

impl Failure {
    pub(super) fn into_error(self) -> Error {
        match self {
            Self::Database(e) => crate::pg::db_error(e),
            Self::Unlocked(streams) => Error::Unavailable(format!(
                "the streams {streams} could not be locked (made and removed again meanwhile); retry"
            )),
            Self::Corrupt(what) => Error::Internal(what),
        }
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(error: tokio_postgres::Error) -> Self {
        Self::Database(error)
    }
}

/// A stream of the batch as locked, and as the batch moves it.
struct Head {
    version: i64,
    link: Option<[u8; 32]>,
    deleted: bool,
    made: bool,
    written: bool,
}

/// The answer of an append that is written or replays an answer.
#[derive(Clone)]
struct Answer {
    stream: Option<String>,
    first: i64,
    last: i64,
    /// Written by this batch: the slice of the batch's positions.
    span: Option<(usize, usize)>,
    /// Replayed: the stored positions.
    positions: Vec<i64>,
    duplicate: bool,
}

enum Decision {
    Answer(Answer),
    Refused(Error),
}

/// Runs `batch` on `client`. With `own_transaction`, the batch is its own
/// transaction (`BEGIN` … `COMMIT`, rolled back on a failure); without, it
/// runs inside the caller's transaction, under a savepoint that a failure
/// rolls back (the caller's transaction stays usable). Each append gets its
/// own answer; `Err` means nothing of the batch was stored.
pub(super) async fn run<C>(
    client: &C,
    statements: &Statements,
    batch: &[Appending<'_>],
    check_event_ids: bool,
    own_transaction: bool,
) -> Result<Vec<crate::error::Result<AppendOutcome>>, Failure>
where
    C: GenericClient + Sync,
{
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let scope = if own_transaction { Scope::OWN } else { Scope::SAVEPOINT };
    if let Some(savepoint) = scope.before {
        // Alone, not pipelined: outside a transaction block it fails, and
        // the statements behind it would run (and commit) one by one.
        client.batch_execute(savepoint).await?;
    }
    let result = decide_and_write(client, statements, batch, check_event_ids, &scope).await;
    if result.is_err() {
        // Ends the transaction (or savepoint) whatever state it is in: after
        // a failed statement, the pipelined COMMIT has already rolled it
        // back and this only warns. A connection that failed fails this too
        // and is replaced.
        let _ = client.batch_execute(scope.abort).await;
    }
    result
}

/// How a batch begins, ends and is abandoned: as its own transaction, or
/// as a savepoint in the caller's (refused outside a transaction block,
/// where the two round trips would commit apart).
struct Scope {
    /// Sent and answered before the batch.
    before: Option<&'static str>,
    /// Sent in the first round trip.
    begin: &'static str,
    commit: &'static str,
    abort: &'static str,
}

impl Scope {
    const OWN: Self = Self { before: None, begin: "BEGIN", commit: "COMMIT", abort: "ROLLBACK" };
    const SAVEPOINT: Self = Self {
        before: Some("SAVEPOINT eventfold_append"),
        begin: "",
        commit: "RELEASE SAVEPOINT eventfold_append",
        abort: "ROLLBACK TO SAVEPOINT eventfold_append; RELEASE SAVEPOINT eventfold_append",
    };
}

async fn decide_and_write<C>(
    client: &C,
    statements: &Statements,
    batch: &[Appending<'_>],
    check_event_ids: bool,
    scope: &Scope,
) -> Result<Vec<crate::error::Result<AppendOutcome>>, Failure>
where
    C: GenericClient + Sync,
{
    // The batch's streams, distinct and sorted byte-wise (the lock order,
    // and COLLATE "C" order).
    let stream_ids: Vec<&str> = {
        let mut ids: Vec<&str> = batch.iter().map(|a| a.request.stream_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    };
    // The new request keys, each once.
    let mut keys: Vec<(&str, &str, &str, &[u8])> = Vec::new();
    {
        let mut distinct = HashSet::new();
        for a in batch {
            if let Some(k) = a.key
                && distinct.insert((k.scope.as_str(), k.request_id.as_str()))
            {
                keys.push((&k.scope, &k.request_id, &a.request.stream_id, &k.fingerprint));
            }
        }
    }
    let key_scopes: Vec<&str> = keys.iter().map(|k| k.0).collect();
    let key_ids: Vec<&str> = keys.iter().map(|k| k.1).collect();
    let key_streams: Vec<&str> = keys.iter().map(|k| k.2).collect();
    let key_prints: Vec<&[u8]> = keys.iter().map(|k| k.3).collect();
    let event_ids: Vec<Uuid> = if check_event_ids {
        batch.iter().flat_map(|a| a.request.events.iter().map(|e| e.event_id)).collect()
    } else {
        Vec::new()
    };

    // Round trip 1: BEGIN, locks, claims (and the stored event ids).
    let begin = client.batch_execute(scope.begin);
    let lock = async { client.query(&statements.lock, &[&stream_ids]).await };
    let claim = async {
        if keys.is_empty() {
            Ok(Vec::new())
        } else {
            client.query(&statements.claim, &[&key_scopes, &key_ids, &key_streams, &key_prints]).await
        }
    };
    let stored = async {
        if check_event_ids { client.query(&statements.stored_ids, &[&event_ids]).await } else { Ok(Vec::new()) }
    };
    let (begin, lock, claim, stored) = tokio::join!(begin, lock, claim, stored);
    begin?;
    let mut locked = lock?;
    let claimed = claim?;
    let stored = stored?;

    let mut heads: BTreeMap<&str, Head> = BTreeMap::new();
    let mut now: Option<SystemTime> = None;
    for attempt in 0..3 {
        for row in locked.drain(..) {
            let id: &str = row.get("stream_id");
            let Ok(index) = stream_ids.binary_search(&id) else { continue };
            let id = stream_ids[index];
            let at: SystemTime = row.get("now");
            now = Some(now.map_or(at, |n| n.max(at)));
            let link = match row.get::<_, Option<Vec<u8>>>("head_hash") {
                None => None,
                Some(l) => Some(
                    <[u8; 32]>::try_from(l.as_slice())
                        .map_err(|_| Failure::Corrupt(format!("the head link of stream {id} is not 32 bytes")))?,
                ),
            };
            heads.insert(
                id,
                Head {
                    version: row.get("version"),
                    link,
                    deleted: row.get("deleted"),
                    made: row.get("made"),
                    written: false,
                },
            );
        }
        let missing: Vec<&str> = stream_ids.iter().copied().filter(|s| !heads.contains_key(s)).collect();
        if missing.is_empty() {
            break;
        }
        if attempt == 2 {
            return Err(Failure::Unlocked(missing.join(", ")));
        }
        // Made by a transaction that committed after the lock's snapshot:
        // lock it now; gone again: make it.
        locked = client.query(&statements.relock, &[&missing]).await?;
        if locked.len() < missing.len() {
            let found: HashSet<String> = locked.iter().map(|r| r.get::<_, String>("stream_id")).collect();
            let again: Vec<&str> = missing.into_iter().filter(|s| !found.contains(*s)).collect();
            locked.extend(client.query(&statements.lock, &[&again]).await?);
        }
    }
    // Every stream has a row here, so the clock was read (the batch is not empty).
    let now = now.ok_or_else(|| Failure::Corrupt("no stream of the batch was locked".to_owned()))?;
    let micros = to_micros(now);

    // The keys this batch claimed; the others were answered before.
    let claimed: HashSet<(String, String)> =
        claimed.iter().map(|r| (r.get::<_, String>("scope"), r.get::<_, String>("request_id"))).collect();
    let mut seen: HashMap<(String, String), Stored> = HashMap::new();
    if claimed.len() < keys.len() {
        let (scopes, ids): (Vec<&str>, Vec<&str>) =
            keys.iter().filter(|k| !claimed.contains(&(k.0.to_owned(), k.1.to_owned()))).map(|k| (k.0, k.1)).unzip();
        for row in client.query(&statements.seen, &[&scopes, &ids]).await? {
            seen.insert(
                (row.get("scope"), row.get("request_id")),
                (row.get("result"), row.get("fingerprint"), row.get("stream_id")),
            );
        }
    }
    let mut stored_ids: HashSet<Uuid> = stored.iter().map(|r| r.get::<_, Uuid>("event_id")).collect();

    // Decide each append in batch order, as the stream heads move.
    let events: usize = batch.iter().map(|a| a.request.events.len()).sum();
    let mut rows = EventRows::with_capacity(events);
    let mut decisions: Vec<Decision> = Vec::with_capacity(batch.len());
    // The first append of each request key that was answered (written, or
    // replaying a stored answer).
    let mut answered_keys: HashMap<(&str, &str), usize> = HashMap::new();
    for (i, a) in batch.iter().enumerate() {
        let request = a.request;
        let decision = 'decided: {
            if let Some(key) = a.key {
                let stored =
                    if seen.is_empty() { None } else { seen.get(&(key.scope.clone(), key.request_id.clone())) };
                if let Some((Some(result), print, stream)) = stored {
                    break 'decided if key.matches(print.as_deref()) {
                        Decision::Answer(stored_answer(result, stream))
                    } else {
                        Decision::Refused(reused(request))
                    };
                }
                // The same request earlier in this batch: the answer of the
                // occurrence that succeeded.
                if let Some(&j) = answered_keys.get(&(key.scope.as_str(), key.request_id.as_str())) {
                    let b = &batch[j];
                    break 'decided match &decisions[j] {
                        Decision::Answer(answer) if b.key.is_some_and(|k| k.fingerprint == key.fingerprint) => {
                            let mut answer = answer.clone();
                            answer.stream.get_or_insert_with(|| b.request.stream_id.clone());
                            answer.duplicate = true;
                            Decision::Answer(answer)
                        }
                        _ => Decision::Refused(reused(request)),
                    };
                }
            }

            let Some(head) = heads.get_mut(request.stream_id.as_str()) else {
                return Err(Failure::Unlocked(request.stream_id.clone()));
            };
            if head.deleted {
                break 'decided Decision::Refused(Error::StreamDeleted(request.stream_id.clone()));
            }
            if !admits(request.expected, head.version) {
                break 'decided Decision::Refused(Error::WrongExpectedVersion {
                    stream: request.stream_id.clone(),
                    expected: request.expected,
                    actual: u64::try_from(head.version).ok(),
                });
            }
            if check_event_ids && request.events.iter().any(|e| stored_ids.contains(&e.event_id)) {
                break 'decided Decision::Refused(Error::DuplicateEventId {
                    event_id: request.events.iter().map(|e| e.event_id.to_string()).collect::<Vec<_>>().join(", "),
                });
            }

            let first = head.version.saturating_add(1);
            let from = rows.len();
            let mut link = head.link.unwrap_or(hash::GENESIS);
            for (event, content) in request.events.iter().zip(a.contents) {
                head.version = head.version.saturating_add(1);
                link = hash::link(&link, from_bigint(head.version), micros, &request.stream_id, content);
                rows.push(&request.stream_id, head.version, event, link);
                if check_event_ids {
                    stored_ids.insert(event.event_id);
                }
            }
            head.link = Some(link);
            head.written = true;
            Decision::Answer(Answer {
                stream: None,
                first,
                last: head.version,
                span: Some((from, rows.len())),
                positions: Vec::new(),
                duplicate: false,
            })
        };
        if let (Some(key), Decision::Answer(_)) = (a.key, &decision) {
            answered_keys.entry((key.scope.as_str(), key.request_id.as_str())).or_insert(i);
        }
        decisions.push(decision);
    }
    let failed = decisions.iter().any(|d| matches!(d, Decision::Refused(_)));

    // Round trip 2: write, clean up after refusals, COMMIT.
    let written: Vec<(&str, &Head)> = heads.iter().filter(|(_, h)| h.written).map(|(id, h)| (*id, h)).collect();
    let s_ids: Vec<&str> = written.iter().map(|(id, _)| *id).collect();
    let s_versions: Vec<i64> = written.iter().map(|(_, h)| h.version).collect();
    let s_links: Vec<&[u8]> = written.iter().map(|(_, h)| h.link.as_ref().map_or(&[][..], |l| &l[..])).collect();
    let mut answered = Answered::default();
    for (a, d) in batch.iter().zip(&decisions) {
        if let (Some(key), Decision::Answer(answer @ Answer { span: Some(_), duplicate: false, .. })) = (a.key, d) {
            answered.scopes.push(&key.scope);
            answered.ids.push(&key.request_id);
            answered.streams.push(&a.request.stream_id);
            answered.firsts.push(answer.first);
            answered.lasts.push(answer.last);
            answered.prints.push(&key.fingerprint);
        }
    }
    let (unclaim_scopes, unclaim_ids): (Vec<&str>, Vec<&str>) = if failed {
        batch
            .iter()
            .zip(&decisions)
            .filter_map(|(a, d)| match (a.key, d) {
                (Some(k), Decision::Refused(_)) if claimed.contains(&(k.scope.clone(), k.request_id.clone())) => {
                    Some((k.scope.as_str(), k.request_id.as_str()))
                }
                _ => None,
            })
            .unzip()
    } else {
        (Vec::new(), Vec::new())
    };
    let unmade: Vec<&str> = heads.iter().filter(|(_, h)| h.made && !h.written).map(|(id, _)| *id).collect();

    let write = async {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let links: Vec<&[u8]> = rows.links.iter().map(|l| &l[..]).collect();
        let params: [&(dyn ToSql + Sync); 18] = [
            &rows.streams,
            &rows.versions,
            &rows.ids,
            &rows.types,
            &rows.schema,
            &rows.data,
            &rows.metadata,
            &links,
            &now,
            &s_ids,
            &s_versions,
            &s_links,
            &answered.scopes,
            &answered.ids,
            &answered.streams,
            &answered.firsts,
            &answered.lasts,
            &answered.prints,
        ];
        let row = client.query_one(&statements.write, &params).await?;
        Ok::<_, tokio_postgres::Error>(row.get::<_, Vec<i64>>("positions"))
    };
    let unclaim = async {
        if unclaim_ids.is_empty() {
            Ok(0)
        } else {
            client.execute(&statements.unclaim, &[&unclaim_scopes, &unclaim_ids]).await
        }
    };
    let unmake = async { if unmade.is_empty() { Ok(0) } else { client.execute(&statements.unmake, &[&unmade]).await } };
    let commit = client.batch_execute(scope.commit);
    let (write, unclaim, unmake, commit) = tokio::join!(write, unclaim, unmake, commit);
    // The first failure in pipeline order is the cause; the later ones
    // only report the aborted transaction.
    let positions = write?;
    unclaim?;
    unmake?;
    commit?;

    Ok(batch
        .iter()
        .zip(decisions)
        .map(|(a, d)| match d {
            Decision::Refused(e) => Err(e),
            Decision::Answer(answer) => {
                let positions = match answer.span {
                    // Cannot fail: the statement wrote every row or failed.
                    Some((from, to)) => positions
                        .get(from..to)
                        .ok_or_else(|| Error::Internal("the write answered fewer positions than events".to_owned()))?,
                    None => &answer.positions[..],
                };
                Ok(AppendOutcome {
                    stream_id: answer.stream.unwrap_or_else(|| a.request.stream_id.clone()),
                    first_version: from_bigint(answer.first),
                    last_version: from_bigint(answer.last),
                    positions: positions.iter().copied().map(from_bigint).collect(),
                    duplicate: answer.duplicate,
                })
            }
        })
        .collect())
}

/// Whether a stream at `version` (-1: no event) admits an append expecting
/// `expected`.
fn admits(expected: ExpectedVersion, version: i64) -> bool {
    match expected {
        ExpectedVersion::Any => true,
        ExpectedVersion::NoStream => version < 0,
        ExpectedVersion::StreamExists => version >= 0,
        // Validated to fit a bigint (`AppendRequest::validate`).
        ExpectedVersion::Exact(v) => bigint(v) == version,
    }
}

fn reused(request: &AppendRequest) -> Error {
    Error::RequestIdReused { request_id: request.request_id.clone().unwrap_or_default() }
}

/// The first answer of a request id, as stored: `{"first_version",
/// "last_version", "positions"}`.
fn stored_answer(result: &Value, stream: &str) -> Answer {
    let number = |field: &str| result.get(field).and_then(Value::as_i64).unwrap_or(0);
    Answer {
        stream: Some(stream.to_owned()),
        first: number("first_version"),
        last: number("last_version"),
        span: None,
        positions: result
            .get("positions")
            .and_then(Value::as_array)
            .map(|p| p.iter().filter_map(Value::as_i64).collect())
            .unwrap_or_default(),
        duplicate: true,
    }
}

/// A request key's stored answer, fingerprint and stream.
type Stored = (Option<Value>, Option<Vec<u8>>, String);

/// The request keys the batch answers, as the write statement's parallel
/// arrays.
#[derive(Default)]
struct Answered<'a> {
    scopes: Vec<&'a str>,
    ids: Vec<&'a str>,
    streams: Vec<&'a str>,
    firsts: Vec<i64>,
    lasts: Vec<i64>,
    prints: Vec<&'a [u8]>,
}

/// The batch's events as the write statement's parallel arrays.
struct EventRows<'a> {
    streams: Vec<&'a str>,
    versions: Vec<i64>,
    ids: Vec<Uuid>,
    types: Vec<&'a str>,
    schema: Vec<i32>,
    data: Vec<&'a Value>,
    metadata: Vec<Value>,
    links: Vec<[u8; 32]>,
}

impl<'a> EventRows<'a> {
    fn with_capacity(n: usize) -> Self {
        Self {
            streams: Vec::with_capacity(n),
            versions: Vec::with_capacity(n),
            ids: Vec::with_capacity(n),
            types: Vec::with_capacity(n),
            schema: Vec::with_capacity(n),
            data: Vec::with_capacity(n),
            metadata: Vec::with_capacity(n),
            links: Vec::with_capacity(n),
        }
    }

    fn len(&self) -> usize {
        self.versions.len()
    }

    fn is_empty(&self) -> bool {
        self.versions.is_empty()
    }

    fn push(&mut self, stream: &'a str, version: i64, event: &'a crate::model::NewEvent, link: [u8; 32]) {
        self.streams.push(stream);
        self.versions.push(version);
        self.ids.push(event.event_id);
        self.types.push(&event.event_type);
        // Validated to fit (`AppendRequest::validate`).
        self.schema.push(i32::try_from(event.schema_version).unwrap_or(i32::MAX));
        self.data.push(&event.data);
        self.metadata.push(event.metadata.to_json());
        self.links.push(link);
    }
}
