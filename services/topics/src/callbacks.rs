//! Callbacks (webhooks): a topic's events, from an offset on, POSTed to a
//! URL in batches, each at least once and in offset order.
//!
//! Each callback has a task of its own in the process that registered it
//! (callbacks are transient: they are not stored and end with the process
//! or the topic). The task reads the topic from its cursor, POSTs a batch
//! (`{"topic", "callbackId", "events"}`) signed with `X-Eventfold-Signature:
//! sha256=<hex HMAC-SHA256 of the body>` under the callback's secret, and
//! moves its cursor past the batch only on a 2xx answer. A failure (an
//! answer other than 2xx, no answer within the timeout, no connection) is
//! retried after 100 ms, doubling up to 30 s; a callback that has failed
//! for longer than its `drop_after` is dropped and logged. The URL is never
//! logged (it may carry a token); the callback id is.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use eventfold_platform::runtime::{Backoff, CancellationToken};
use eventfold_store::{AllRead, FieldViolation, RecordedEvent};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::topics::Topic;

/// Longest callback URL, in bytes.
pub const MAX_URL_LEN: usize = 2048;
/// Most events per POST.
pub const MAX_BATCH: u32 = 1000;
pub const DEFAULT_BATCH: u32 = 100;
/// How long failures may last by default, and at most, before a callback
/// is dropped.
pub const DEFAULT_DROP_AFTER: Duration = Duration::from_secs(3600);
pub const MAX_DROP_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest wait for an answer to a POST.
pub const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// Most callbacks per topic (per process).
pub const MAX_PER_TOPIC: usize = 100;
/// The backoff between failed deliveries.
const RETRY: Backoff =
    Backoff { first: Duration::from_millis(100), max: Duration::from_secs(30), factor: 2, jitter: 0.2 };

/// A callback as registered, checked.
#[derive(Debug, Clone)]
pub struct CallbackRequest {
    pub url: String,
    pub max_batch: u32,
    pub drop_after: Duration,
    /// Deliver events from this offset on.
    pub from_offset: u64,
}

/// A callback's state, as ListCallbacks shows it.
#[derive(Debug, Clone)]
pub struct CallbackView {
    pub id: String,
    pub url: String,
    pub max_batch: u32,
    pub drop_after: Duration,
    /// Only in the answer to its registration.
    pub secret: Option<String>,
    pub cursor: u64,
    pub failures: u32,
    pub failing_since: Option<SystemTime>,
    pub created: SystemTime,
}

struct Callback {
    id: String,
    topic: String,
    url: String,
    max_batch: u32,
    drop_after: Duration,
    secret: String,
    cursor: AtomicU64,
    failures: AtomicU32,
    failing_since: Mutex<Option<SystemTime>>,
    created: SystemTime,
    stop: CancellationToken,
}

impl Callback {
    fn view(&self) -> CallbackView {
        CallbackView {
            id: self.id.clone(),
            url: self.url.clone(),
            max_batch: self.max_batch,
            drop_after: self.drop_after,
            secret: None,
            cursor: self.cursor.load(Ordering::Acquire),
            failures: self.failures.load(Ordering::Acquire),
            failing_since: *self.failing_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
            created: self.created,
        }
    }
}

/// Check a registration (every violation, not only the first).
pub fn check(
    url: &str,
    max_batch: i32,
    drop_after: Option<Duration>,
    from_offset: u64,
) -> Result<CallbackRequest, Vec<FieldViolation>> {
    let mut violations = Vec::new();
    let parsed = reqwest::Url::parse(url);
    match &parsed {
        _ if url.len() > MAX_URL_LEN => {
            violations.push(FieldViolation::new("callback.url", format!("at most {MAX_URL_LEN} bytes")));
        }
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
        _ => violations.push(FieldViolation::new("callback.url", "must be an absolute http or https URL")),
    }
    let max_batch = match max_batch {
        0 => DEFAULT_BATCH,
        n => match u32::try_from(n) {
            Ok(n) if n <= MAX_BATCH => n,
            _ => {
                violations.push(FieldViolation::new("callback.max_batch", format!("must be 1 to {MAX_BATCH}")));
                DEFAULT_BATCH
            }
        },
    };
    let drop_after = drop_after.unwrap_or(DEFAULT_DROP_AFTER);
    if drop_after.is_zero() || drop_after > MAX_DROP_AFTER {
        violations.push(FieldViolation::new("callback.drop_after", "must be more than 0 and at most 7 days"));
    }
    if from_offset > eventfold_store::MAX_BIGINT {
        violations.push(FieldViolation::new("from", format!("must be at most {}", eventfold_store::MAX_BIGINT)));
    }
    if violations.is_empty() {
        Ok(CallbackRequest { url: url.to_owned(), max_batch, drop_after, from_offset })
    } else {
        Err(violations)
    }
}

/// The callbacks of this process.
pub struct Callbacks {
    http: reqwest::Client,
    by_topic: Mutex<BTreeMap<String, BTreeMap<String, Arc<Callback>>>>,
}

impl Callbacks {
    pub fn new() -> Arc<Self> {
        eventfold_store::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(POST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Arc::new(Self { http, by_topic: Mutex::new(BTreeMap::new()) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeMap<String, Arc<Callback>>>> {
        self.by_topic.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Start delivering `topic`'s events to `request.url`; the new
    /// callback, with its secret; `None` when the topic has as many
    /// callbacks as it may.
    pub fn register(self: &Arc<Self>, topic: Arc<Topic>, request: CallbackRequest) -> Option<CallbackView> {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let secret = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        let callback = Arc::new(Callback {
            id: id.clone(),
            topic: topic.spec.name.clone(),
            url: request.url,
            max_batch: request.max_batch,
            drop_after: request.drop_after,
            secret: secret.clone(),
            cursor: AtomicU64::new(request.from_offset.saturating_sub(1)),
            failures: AtomicU32::new(0),
            failing_since: Mutex::new(None),
            created: SystemTime::now(),
            stop: topic.closed.child_token(),
        });
        {
            let mut all = self.lock();
            let of_topic = all.entry(callback.topic.clone()).or_default();
            if of_topic.len() >= MAX_PER_TOPIC {
                return None;
            }
            of_topic.insert(id, callback.clone());
        }
        tokio::spawn(deliver(self.clone(), topic, callback.clone()));
        Some(CallbackView { secret: Some(secret), ..callback.view() })
    }

    pub fn list(&self, topic: &str) -> Vec<CallbackView> {
        self.lock().get(topic).map(|c| c.values().map(|c| c.view()).collect()).unwrap_or_default()
    }

    /// Stop a callback; `false` when the topic has none of that id. Nothing
    /// is POSTed to it once this returns (a POST in flight is abandoned).
    pub fn delete(&self, topic: &str, id: &str) -> bool {
        let removed = self.lock().get_mut(topic).and_then(|c| c.remove(id));
        match removed {
            Some(callback) => {
                callback.stop.cancel();
                true
            }
            None => false,
        }
    }

    /// Stop every callback (the process stops).
    pub fn stop_all(&self) {
        let all = std::mem::take(&mut *self.lock());
        all.values().flat_map(BTreeMap::values).for_each(|c| c.stop.cancel());
    }

    /// Forget every callback of a deleted topic.
    pub fn forget_topic(&self, topic: &str) {
        if let Some(callbacks) = self.lock().remove(topic) {
            callbacks.values().for_each(|c| c.stop.cancel());
        }
    }

    fn drop_callback(&self, callback: &Callback) {
        if let Some(of_topic) = self.lock().get_mut(&callback.topic) {
            of_topic.remove(&callback.id);
        }
    }
}

/// The body of a POST: the batch as JSON.
fn body(topic: &str, callback_id: &str, events: &[RecordedEvent]) -> Vec<u8> {
    let events: Vec<serde_json::Value> = events.iter().map(crate::grpc::event_json).collect();
    serde_json::to_vec(&serde_json::json!({ "topic": topic, "callbackId": callback_id, "events": events }))
        .unwrap_or_default()
}

/// `sha256=<hex HMAC-SHA256 of body under secret>`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    // HMAC takes keys of any length: the error case does not occur.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else { return String::new() };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn deliver(callbacks: Arc<Callbacks>, topic: Arc<Topic>, callback: Arc<Callback>) {
    let mut retries = RETRY.start();
    let mut appended = topic.log.appended();
    loop {
        if callback.stop.is_cancelled() {
            return;
        }
        let after = callback.cursor.load(Ordering::Acquire);
        let read = AllRead { after, max_count: callback.max_batch as usize, filter: Default::default() };
        let slice = match topic.log.read_all(read).await {
            Ok(slice) => slice,
            Err(e) => {
                tracing::debug!(topic = %callback.topic, callback = %callback.id, error = %e, "callback: reading the topic failed");
                if wait(&callback.stop, retries.next_delay()).await {
                    return;
                }
                continue;
            }
        };
        if slice.events.is_empty() {
            if slice.next_position > after {
                callback.cursor.store(slice.next_position, Ordering::Release);
                continue;
            }
            // Nothing new: wait for an append (or look again in a while).
            tokio::select! {
                () = callback.stop.cancelled() => return,
                _ = appended.changed() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        let body = body(&callback.topic, &callback.id, &slice.events);
        let post = callbacks
            .http
            .post(&callback.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("x-eventfold-signature", signature(&callback.secret, &body))
            .body(body);
        let answer = tokio::select! {
            () = callback.stop.cancelled() => return,
            answer = post.send() => answer,
        };
        match answer {
            Ok(response) if response.status().is_success() => {
                let last = slice.events.last().map_or(slice.next_position, |e| e.global_position);
                callback.cursor.store(last.max(after), Ordering::Release);
                callback.failures.store(0, Ordering::Release);
                *callback.failing_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
                retries.reset();
            }
            failed => {
                let why = match failed {
                    Ok(response) => format!("HTTP {}", response.status().as_u16()),
                    Err(e) if e.is_timeout() => "no answer in time".to_owned(),
                    Err(_) => "no connection".to_owned(),
                };
                callback.failures.fetch_add(1, Ordering::AcqRel);
                let since = *callback
                    .failing_since
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get_or_insert_with(SystemTime::now);
                if since.elapsed().unwrap_or_default() > callback.drop_after {
                    tracing::warn!(
                        topic = %callback.topic,
                        callback = %callback.id,
                        failures = callback.failures.load(Ordering::Acquire),
                        last = %why,
                        "callback dropped: its deliveries failed for longer than its drop_after"
                    );
                    callbacks.drop_callback(&callback);
                    return;
                }
                tracing::debug!(topic = %callback.topic, callback = %callback.id, %why, "callback delivery failed; retrying");
                if wait(&callback.stop, retries.next_delay()).await {
                    return;
                }
            }
        }
    }
}

/// Sleep `delay`; `true` when `stop` was cancelled meanwhile.
async fn wait(stop: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(delay) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_are_checked() {
        assert!(check("https://hooks.example/x?token=1", 0, None, 5).is_ok());
        let fields = |r: Result<CallbackRequest, Vec<FieldViolation>>| -> Vec<String> {
            r.expect_err("refused").into_iter().map(|v| v.field).collect()
        };
        assert_eq!(fields(check("ftp://x/y", 0, None, 0)), ["callback.url"]);
        assert_eq!(fields(check("not a url", 0, None, 0)), ["callback.url"]);
        assert_eq!(fields(check("http://h/", 1001, None, 0)), ["callback.max_batch"]);
        assert_eq!(fields(check("http://h/", -1, None, 0)), ["callback.max_batch"]);
        assert_eq!(fields(check("http://h/", 0, Some(Duration::ZERO), 0)), ["callback.drop_after"]);
        assert_eq!(fields(check("http://h/", 0, None, u64::MAX)), ["from"]);
    }

    #[test]
    fn signatures_are_hmac_sha256_of_the_body() {
        // RFC 4231, test case 2.
        let mac = signature("Jefe", b"what do ya want for nothing?");
        assert_eq!(mac, "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }
}
