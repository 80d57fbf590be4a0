//! Subscriptions: catch up from a position (or a stream from a version), then
//! stay live, for any [`EventLog`].
//!
//! One live tail per log reads the global log gap-safely when the log signals
//! an append and fans the new events out over a bounded broadcast channel.
//! Each subscriber catches up with its own reads, then follows the broadcast.
//! A subscriber that falls so far behind that the broadcast overwrote events
//! it had not taken yet is told so (`FellBehind`) and catches up again from
//! its own position with reads: it never stalls writers, the tail or other
//! subscribers, and never loses or repeats an event.

use std::{sync::Arc, time::Duration};

use tokio::sync::{broadcast, mpsc, watch};

use crate::{
    error::{Error, Result},
    log::EventLog,
    model::{AllRead, EventFilter, RecordedEvent, StreamRead},
};

/// Where a subscription starts and what it follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The global log, after `after` (0: from the beginning; `None`: from the
    /// current end), keeping what `filter` admits.
    All { after: Option<u64>, filter: EventFilter },
    /// One stream, after version `after_version` (`None`: from its first
    /// event).
    Stream { stream_id: String, after_version: Option<u64> },
}

/// What a subscriber receives.
// Events are nearly every message: boxing them would add an allocation per
// event to save a few bytes on the rare notices.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum SubscriptionMessage {
    Event(RecordedEvent),
    /// History delivered; live from this global position.
    CaughtUp(u64),
    /// Every event up to this global position has been considered.
    Checkpoint(u64),
    /// The subscriber fell behind the live log; catching up again after this
    /// global position.
    FellBehind(u64),
}

/// Tuning of subscriptions.
#[derive(Debug, Clone)]
pub struct SubscriptionOptions {
    /// Events per catch-up read.
    pub page_size: usize,
    /// Batches the live broadcast holds for slow subscribers.
    pub live_capacity: usize,
    /// Messages buffered per subscriber before it applies back-pressure to
    /// its own task.
    pub subscriber_buffer: usize,
    /// How often the tail looks even without a wake-up.
    pub poll_interval: Duration,
}

impl Default for SubscriptionOptions {
    fn default() -> Self {
        Self { page_size: 500, live_capacity: 1024, subscriber_buffer: 256, poll_interval: Duration::from_millis(500) }
    }
}

/// Subscriptions over one log: owns the live tail.
pub struct Subscriptions {
    log: Arc<dyn EventLog>,
    live: broadcast::Sender<Arc<Vec<RecordedEvent>>>,
    head: watch::Receiver<u64>,
    options: SubscriptionOptions,
    tail: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Subscriptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriptions").field("head", &*self.head.borrow()).finish_non_exhaustive()
    }
}

impl Drop for Subscriptions {
    fn drop(&mut self) {
        self.tail.abort();
    }
}

impl Subscriptions {
    /// Start the live tail of `log`.
    pub fn new(log: Arc<dyn EventLog>, options: SubscriptionOptions) -> Self {
        let (live, _) = broadcast::channel(options.live_capacity.max(1));
        let (head_tx, head) = watch::channel(0);
        let tail = tokio::spawn(run_tail(log.clone(), live.clone(), head_tx, options.clone()));
        Self { log, live, head, options, tail }
    }

    /// The position up to which the live tail has read.
    pub fn live_position(&self) -> u64 {
        *self.head.borrow()
    }

    /// Start a subscription. It runs until the receiver is dropped; an error
    /// ends it.
    pub fn subscribe(&self, target: Target, checkpoint_interval: u64) -> mpsc::Receiver<Result<SubscriptionMessage>> {
        let (tx, rx) = mpsc::channel(self.options.subscriber_buffer.max(1));
        let subscriber = Subscriber {
            log: self.log.clone(),
            live: self.live.clone(),
            head: self.head.clone(),
            page_size: self.options.page_size.max(1),
            checkpoint_interval: checkpoint_interval.max(1),
            tx,
        };
        tokio::spawn(async move {
            if let Err(e) = subscriber.run(target).await {
                let _ = subscriber.tx.send(Err(e)).await;
            }
        });
        rx
    }
}

async fn run_tail(
    log: Arc<dyn EventLog>,
    live: broadcast::Sender<Arc<Vec<RecordedEvent>>>,
    head: watch::Sender<u64>,
    options: SubscriptionOptions,
) {
    let mut wake = log.appended();
    let mut backoff = Duration::from_millis(50);
    let mut position = loop {
        match log.last_position().await {
            Ok(p) => break p,
            Err(e) => {
                tracing::warn!(error = %e, "live tail cannot start yet");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    };
    head.send_replace(position);
    loop {
        wake.borrow_and_update();
        let read = AllRead { after: position, max_count: options.page_size.max(1), filter: EventFilter::default() };
        match log.read_all(read).await {
            Ok(slice) => {
                backoff = Duration::from_millis(50);
                if slice.next_position > position {
                    position = slice.next_position;
                    // The head moves before the batch is published: a
                    // subscriber that reads the head after subscribing either
                    // receives the batch or catches up past it.
                    head.send_replace(position);
                    if !slice.events.is_empty() {
                        let _ = live.send(Arc::new(slice.events));
                    }
                }
                if !slice.end_of_log {
                    if slice.next_position == position {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    continue;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "live tail read failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        }
        tokio::select! {
            changed = wake.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(options.poll_interval) => {}
        }
    }
}

struct Subscriber {
    log: Arc<dyn EventLog>,
    live: broadcast::Sender<Arc<Vec<RecordedEvent>>>,
    head: watch::Receiver<u64>,
    page_size: usize,
    checkpoint_interval: u64,
    tx: mpsc::Sender<Result<SubscriptionMessage>>,
}

/// Where a subscriber is.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    /// Every event up to this global position has been considered.
    position: u64,
    /// Stream subscriptions: the last version delivered.
    version: Option<u64>,
    /// Events considered since the last checkpoint.
    since_checkpoint: u64,
}

/// The receiver went away: stop quietly.
struct Gone;

impl Subscriber {
    async fn send(&self, message: SubscriptionMessage) -> Result<(), Gone> {
        self.tx.send(Ok(message)).await.map_err(|_| Gone)
    }

    async fn run(&self, target: Target) -> Result<()> {
        let mut cursor = Cursor { position: 0, version: None, since_checkpoint: 0 };
        match &target {
            Target::All { after: Some(p), .. } => cursor.position = *p,
            Target::All { after: None, .. } => cursor.position = self.log.last_position().await?,
            Target::Stream { after_version, .. } => cursor.version = *after_version,
        }
        loop {
            let mut live = self.live.subscribe();
            let live_head = *self.head.borrow();
            match self.catch_up(&target, &mut cursor, live_head).await {
                Ok(()) => {}
                Err(CatchUpError::Gone) => return Ok(()),
                Err(CatchUpError::Log(e)) => return Err(e),
            }
            cursor.position = cursor.position.max(live_head);
            if self.send(SubscriptionMessage::CaughtUp(cursor.position)).await.is_err() {
                return Ok(());
            }
            cursor.since_checkpoint = 0;
            loop {
                match live.recv().await {
                    Ok(batch) => {
                        if self.deliver(&target, &mut cursor, &batch).await.is_err() {
                            return Ok(());
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if self.send(SubscriptionMessage::FellBehind(cursor.position)).await.is_err() {
                            return Ok(());
                        }
                        break;
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(Error::Unavailable("the live tail stopped".to_owned()));
                    }
                }
            }
        }
    }

    /// Deliver history until the cursor has passed `live_head`.
    async fn catch_up(&self, target: &Target, cursor: &mut Cursor, live_head: u64) -> Result<(), CatchUpError> {
        match target {
            Target::All { filter, .. } => loop {
                let read = AllRead { after: cursor.position, max_count: self.page_size, filter: filter.clone() };
                let slice = self.log.read_all(read).await?;
                let considered = slice.next_position.saturating_sub(cursor.position);
                for event in slice.events {
                    self.send(SubscriptionMessage::Event(event)).await?;
                }
                cursor.position = slice.next_position;
                self.count(cursor, considered).await?;
                if cursor.position >= live_head && slice.end_of_log {
                    return Ok(());
                }
                if considered == 0 {
                    // A missing position not resolved yet: look again shortly.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            },
            Target::Stream { stream_id, .. } => loop {
                let mut read = StreamRead::forwards(stream_id.clone(), self.page_size);
                read.from_version = cursor.version.map(|v| v + 1);
                let slice = match self.log.read_stream(read).await {
                    // A stream that does not exist yet is followed until it does.
                    Err(Error::StreamNotFound(_)) => return Ok(()),
                    other => other?,
                };
                for event in slice.events {
                    cursor.version = Some(event.version);
                    self.send(SubscriptionMessage::Event(event)).await?;
                }
                if slice.end_of_stream {
                    return Ok(());
                }
            },
        }
    }

    async fn deliver(&self, target: &Target, cursor: &mut Cursor, batch: &[RecordedEvent]) -> Result<(), Gone> {
        for event in batch {
            if event.global_position <= cursor.position {
                continue;
            }
            cursor.position = event.global_position;
            let wanted = match target {
                Target::All { filter, .. } => filter.matches(&event.stream_id, &event.event_type),
                Target::Stream { stream_id, .. } => {
                    let next = cursor.version.map_or(0, |v| v + 1);
                    let wanted = &event.stream_id == stream_id && event.version >= next;
                    if wanted {
                        cursor.version = Some(event.version);
                    }
                    wanted
                }
            };
            if wanted {
                self.send(SubscriptionMessage::Event(event.clone())).await?;
            }
            self.count(cursor, 1).await?;
        }
        Ok(())
    }

    async fn count(&self, cursor: &mut Cursor, considered: u64) -> Result<(), Gone> {
        cursor.since_checkpoint += considered;
        if cursor.since_checkpoint >= self.checkpoint_interval {
            cursor.since_checkpoint = 0;
            self.send(SubscriptionMessage::Checkpoint(cursor.position)).await?;
        }
        Ok(())
    }
}

enum CatchUpError {
    Gone,
    Log(Error),
}

impl From<Gone> for CatchUpError {
    fn from(_: Gone) -> Self {
        Self::Gone
    }
}

impl From<Error> for CatchUpError {
    fn from(e: Error) -> Self {
        Self::Log(e)
    }
}
