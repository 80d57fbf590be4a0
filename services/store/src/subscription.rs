//! Subscriptions: catch up from a position (or a stream from a version), then
//! stay live, for any [`EventLog`].
//!
//! One live tail per log reads the global log gap-safely when the log signals
//! an append and fans the new events out over a bounded broadcast channel.
//! Each subscriber catches up with its own reads, then follows the broadcast.
//! A subscriber never waits while it holds a place in the broadcast: when its
//! own buffer is full (its reader is slow or paused), or when the broadcast
//! overwrote events it had not taken yet, it is told so (`FellBehind`), lets
//! go of the broadcast, waits for its reader, and catches up again from its
//! own position with reads. It never stalls writers, the tail or other
//! subscribers, and never loses or repeats an event.
//!
//! # Memory
//!
//! Bytes are [`RecordedEvent::size`] (canonical data and metadata; the
//! in-memory form of an event is larger by a factor that depends on the shape
//! of its JSON). With the defaults, whatever a client does:
//!
//! - **Per subscriber**: at most [`SubscriptionOptions::subscriber_buffer_bytes`]
//!   (4 MiB) of events queued for its reader, and at most
//!   [`SubscriptionOptions::subscriber_buffer`] (256) messages. While it
//!   waits for its reader it holds no live batch; catching up, it holds the
//!   rest of one read page, at most
//!   [`MAX_PAGE_BYTES`](crate::model::MAX_PAGE_BYTES) (4 MiB, the adapters'
//!   page bound). So 8 MiB per subscriber at worst, 4 MiB for one that waits
//!   while live. An event larger than the buffer bound is queued alone.
//! - **Shared ring**: at most [`SubscriptionOptions::live_capacity`] (64)
//!   batches of at most [`LIVE_BATCH_BYTES`] (1 MiB) each, or of one larger
//!   event: 64 MiB at worst, whatever the number of subscribers. A batch is
//!   freed as soon as every live subscriber has taken it, and live
//!   subscribers take batches without waiting for their readers, so the ring
//!   is normally nearly empty. The tail holds one read page (4 MiB) while it
//!   publishes it.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::{
    backoff::Backoff,
    error::{Error, Result},
    log::EventLog,
    model::{AllRead, EventFilter, MAX_EVENT_BYTES, RecordedEvent, StreamRead, check_bigint, validate_stream_id},
    supervise::supervise,
};

/// Most bytes of events in one batch of the live broadcast (a batch holds at
/// least one event, so one larger event makes a batch of its own).
pub const LIVE_BATCH_BYTES: usize = MAX_EVENT_BYTES;

/// Default of [`SubscriptionOptions::subscriber_buffer_bytes`].
pub const DEFAULT_SUBSCRIBER_BUFFER_BYTES: usize = 4 * 1024 * 1024;

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

impl Target {
    /// Check the target; every violation is reported, not only the first.
    /// Positions and versions must fit a PostgreSQL `bigint`.
    pub fn validate(&self) -> Result<()> {
        let mut violations = Vec::new();
        match self {
            Self::All { after, filter } => {
                if let Some(position) = after {
                    check_bigint("from_position", *position, &mut violations);
                }
                filter.validate("filter", &mut violations);
            }
            Self::Stream { stream_id, after_version } => {
                validate_stream_id("stream_id", stream_id, &mut violations);
                if let Some(version) = after_version {
                    check_bigint("from_version", *version, &mut violations);
                }
            }
        }
        if violations.is_empty() { Ok(()) } else { Err(Error::InvalidArgument(violations)) }
    }
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
    /// Batches the live broadcast holds for slow subscribers; each is at
    /// most [`LIVE_BATCH_BYTES`] (or one larger event), which bounds the
    /// ring's bytes.
    pub live_capacity: usize,
    /// Messages buffered per subscriber before its reader must take some.
    pub subscriber_buffer: usize,
    /// Bytes of events ([`RecordedEvent::size`]) buffered per subscriber
    /// before its reader must take some; one event larger than this is
    /// buffered alone.
    pub subscriber_buffer_bytes: usize,
    /// How often the tail looks even without a wake-up.
    pub poll_interval: Duration,
}

impl Default for SubscriptionOptions {
    fn default() -> Self {
        Self {
            page_size: 500,
            live_capacity: 64,
            subscriber_buffer: 256,
            subscriber_buffer_bytes: DEFAULT_SUBSCRIBER_BUFFER_BYTES,
            poll_interval: Duration::from_millis(500),
        }
    }
}

/// An event of the live broadcast with its size, computed once by the tail
/// (it costs a serialization) rather than once per subscriber.
#[derive(Debug)]
struct LiveEvent {
    event: RecordedEvent,
    size: usize,
}

type LiveBatch = Arc<Vec<LiveEvent>>;

/// What a subscriber's channel carries.
type Item = Result<SubscriptionMessage>;

/// Subscriptions over one log: owns the live tail, which runs under the
/// common supervisor until the subscriptions are dropped.
pub struct Subscriptions {
    log: Arc<dyn EventLog>,
    live: broadcast::Sender<LiveBatch>,
    head: watch::Receiver<u64>,
    options: SubscriptionOptions,
    buffered: Arc<AtomicUsize>,
    _tail: DropGuard,
}

impl std::fmt::Debug for Subscriptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriptions").field("head", &*self.head.borrow()).finish_non_exhaustive()
    }
}

impl Subscriptions {
    /// Start the live tail of `log` (on the Tokio runtime), supervised: a
    /// failed read ends a run of the tail and the next one starts after the
    /// backoff, where the last one stopped.
    pub fn new(log: Arc<dyn EventLog>, options: SubscriptionOptions) -> Self {
        let (live, _) = broadcast::channel(options.live_capacity.max(1));
        let (head_tx, head) = watch::channel(0);
        let tail = LiveTail {
            log: log.clone(),
            live: live.clone(),
            head: Arc::new(head_tx),
            started: Arc::new(AtomicBool::new(false)),
            options: options.clone(),
        };
        let stop = CancellationToken::new();
        let backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        tokio::spawn(supervise("live tail", stop.clone(), backoff, move |token| tail.clone().run(token)));
        Self { log, live, head, options, buffered: Arc::new(AtomicUsize::new(0)), _tail: stop.drop_guard() }
    }

    /// The position up to which the live tail has read.
    pub fn live_position(&self) -> u64 {
        *self.head.borrow()
    }

    /// Bytes of events ([`RecordedEvent::size`]) queued in the buffers of the
    /// running subscriptions and not taken by their readers yet, as of each
    /// subscription's last send (an upper bound: a reader may have taken more
    /// since). Each subscription counts for at most
    /// [`SubscriptionOptions::subscriber_buffer_bytes`].
    pub fn buffered_bytes(&self) -> usize {
        self.buffered.load(Ordering::Relaxed)
    }

    /// Start a subscription. It runs until the receiver is dropped; an error
    /// ends it. An invalid target is answered with its error as the only item.
    pub fn subscribe(&self, target: Target, checkpoint_interval: u64) -> mpsc::Receiver<Result<SubscriptionMessage>> {
        let (tx, rx) = mpsc::channel(self.options.subscriber_buffer.max(1));
        if let Err(e) = target.validate() {
            // A new channel has room for one message; dropping the sender
            // then ends the stream after it.
            let _ = tx.try_send(Err(e));
            return rx;
        }
        let mut subscriber = Subscriber {
            log: self.log.clone(),
            live: self.live.clone(),
            head: self.head.clone(),
            page_size: self.options.page_size.max(1),
            checkpoint_interval: checkpoint_interval.max(1),
            buffer: Buffer {
                tx,
                charges: VecDeque::new(),
                bytes: 0,
                budget: self.options.subscriber_buffer_bytes.max(1),
                gauge: self.buffered.clone(),
            },
        };
        tokio::spawn(async move {
            let _counted = Counted::new();
            if let Err(e) = subscriber.run(&target).await {
                let _ = subscriber.buffer.send(0, Err(e)).await;
            }
        });
        rx
    }
}

/// The one reader that follows the end of the log and fans new events out
/// to the live subscribers. A run ends with the first failed read (the
/// supervisor starts the next one, which goes on from the same position).
#[derive(Clone)]
struct LiveTail {
    log: Arc<dyn EventLog>,
    live: broadcast::Sender<LiveBatch>,
    head: Arc<watch::Sender<u64>>,
    /// Whether a run has taken its start position (the log's end when the
    /// subscriptions were made): later runs go on from `head`.
    started: Arc<AtomicBool>,
    options: SubscriptionOptions,
}

impl LiveTail {
    async fn run(self, token: CancellationToken) -> Result<()> {
        let mut wake = self.log.appended();
        let mut position = if self.started.load(Ordering::Acquire) {
            *self.head.borrow()
        } else {
            let position = self.log.last_position().await?;
            self.head.send_replace(position);
            self.started.store(true, Ordering::Release);
            position
        };
        loop {
            wake.borrow_and_update();
            let read =
                AllRead { after: position, max_count: self.options.page_size.max(1), filter: EventFilter::default() };
            let slice = self.log.read_all(read).await?;
            if slice.next_position > position {
                position = slice.next_position;
                // The head moves before the batch is published: a subscriber
                // that reads the head after subscribing either receives the
                // batch or catches up past it. For the same reason a batch
                // nobody listens to now can be skipped (sizing it costs a
                // serialization per event).
                self.head.send_replace(position);
                if self.live.receiver_count() > 0 {
                    publish(&self.live, slice.events);
                }
            }
            if !slice.end_of_log {
                if slice.next_position == position {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                continue;
            }
            tokio::select! {
                changed = wake.changed() => if changed.is_err() { return Ok(()) },
                () = tokio::time::sleep(self.options.poll_interval) => {}
                () = token.cancelled() => return Ok(()),
            }
        }
    }
}

/// Send `events` in batches of at most [`LIVE_BATCH_BYTES`] (or one larger
/// event), so that the ring's capacity in batches bounds its bytes.
fn publish(live: &broadcast::Sender<LiveBatch>, events: Vec<RecordedEvent>) {
    let mut batch = Vec::new();
    let mut bytes = 0usize;
    for event in events {
        let size = event.size();
        if !batch.is_empty() && bytes.saturating_add(size) > LIVE_BATCH_BYTES {
            let _ = live.send(Arc::new(std::mem::take(&mut batch)));
            bytes = 0;
        }
        bytes = bytes.saturating_add(size);
        batch.push(LiveEvent { event, size });
    }
    if !batch.is_empty() {
        let _ = live.send(Arc::new(batch));
    }
}

/// The sending side of one subscriber's channel, bounded in bytes as well as
/// in messages.
///
/// The channel counts messages; the bytes are counted here, without help from
/// the receiver (whose type callers use directly). This is the channel's only
/// sender and it holds no send permit between its own calls, so
/// `max_capacity - capacity` is exactly the number of messages the reader has
/// not taken yet: the older entries of `charges` are the ones it took.
struct Buffer {
    tx: mpsc::Sender<Item>,
    /// What each message not known to be taken counts, oldest first.
    charges: VecDeque<usize>,
    /// Sum of `charges`; never above `budget`.
    bytes: usize,
    /// At least 1.
    budget: usize,
    /// The sum of `bytes` over every subscriber.
    gauge: Arc<AtomicUsize>,
}

impl Drop for Buffer {
    fn drop(&mut self) {
        self.gauge.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl Buffer {
    /// What an event of `size` bytes counts: at least 1, so that a buffer of
    /// empty events is bounded too, and at most the budget, so that one
    /// event larger than the budget still fits an empty buffer.
    fn charge(&self, size: usize) -> usize {
        size.max(1).min(self.budget)
    }

    /// Forget the messages the reader has taken.
    fn reconcile(&mut self) {
        let queued = self.tx.max_capacity().saturating_sub(self.tx.capacity());
        while self.charges.len() > queued {
            let Some(charge) = self.charges.pop_front() else { break };
            self.bytes = self.bytes.saturating_sub(charge);
            self.gauge.fetch_sub(charge, Ordering::Relaxed);
        }
    }

    fn record(&mut self, charge: usize) {
        self.charges.push_back(charge);
        self.bytes = self.bytes.saturating_add(charge);
        self.gauge.fetch_add(charge, Ordering::Relaxed);
    }

    /// Queue the message `item` makes if there is room for `charge` more
    /// bytes and one more message now; `item` is only called then.
    fn try_send(&mut self, charge: usize, item: impl FnOnce() -> Item) -> Result<(), Stop> {
        self.reconcile();
        if self.bytes.saturating_add(charge) > self.budget {
            return Err(Stop::Blocked(charge));
        }
        match self.tx.try_reserve() {
            Ok(permit) => permit.send(item()),
            Err(mpsc::error::TrySendError::Full(())) => return Err(Stop::Blocked(charge)),
            Err(mpsc::error::TrySendError::Closed(())) => return Err(Stop::Gone),
        }
        self.record(charge);
        Ok(())
    }

    /// Queue `item`, waiting for the reader to make room.
    async fn send(&mut self, charge: usize, item: Item) -> Result<(), Gone> {
        self.wait_for_space(charge).await?;
        // Immediate: only the reader acted since, and it only makes room.
        let permit = self.tx.reserve().await.map_err(|_| Gone)?;
        permit.send(item);
        self.record(charge);
        Ok(())
    }

    /// Wait until `charge` more bytes and one more message fit.
    async fn wait_for_space(&mut self, charge: usize) -> Result<(), Gone> {
        self.reconcile();
        let free = self.tx.capacity();
        // How many of the oldest messages the reader must take first.
        let mut excess = self.bytes.saturating_add(charge).saturating_sub(self.budget);
        let mut to_take = 0usize;
        for queued in &self.charges {
            if excess == 0 {
                break;
            }
            excess = excess.saturating_sub(*queued);
            to_take = to_take.saturating_add(1);
        }
        if to_take == 0 && free > 0 {
            return Ok(());
        }
        // Slots free up only as the reader takes messages: once `free +
        // to_take` slots are free, it has taken the `to_take` oldest ones.
        // The permits go straight back (dropped) and the slots are counted
        // again.
        let wanted = free.saturating_add(to_take).clamp(1, self.tx.max_capacity());
        drop(self.tx.reserve_many(wanted).await.map_err(|_| Gone)?);
        self.reconcile();
        Ok(())
    }
}

struct Subscriber {
    log: Arc<dyn EventLog>,
    live: broadcast::Sender<LiveBatch>,
    head: watch::Receiver<u64>,
    page_size: usize,
    checkpoint_interval: u64,
    buffer: Buffer,
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

/// One running subscription in `eventfold_store_subscribers`, until it
/// is dropped (however its task ends).
struct Counted;

impl Counted {
    fn new() -> Self {
        metrics::gauge!("eventfold_store_subscribers").increment(1.0);
        Self
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        metrics::gauge!("eventfold_store_subscribers").decrement(1.0);
    }
}

/// The receiver went away: stop quietly.
struct Gone;

/// Why a subscriber stopped delivering.
enum Stop {
    /// The receiver went away.
    Gone,
    /// No room for a message of this charge without waiting, and the
    /// subscriber must not wait where it is.
    Blocked(usize),
    /// The log failed: the subscription ends with this error.
    Log(Error),
}

impl From<Gone> for Stop {
    fn from(_: Gone) -> Self {
        Self::Gone
    }
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Self::Log(e)
    }
}

impl Subscriber {
    /// Queue `item`: waiting for room if `wait`, else refusing with
    /// [`Stop::Blocked`].
    async fn offer(&mut self, wait: bool, charge: usize, item: Item) -> Result<(), Stop> {
        if wait { Ok(self.buffer.send(charge, item).await?) } else { self.buffer.try_send(charge, || item) }
    }

    async fn run(&mut self, target: &Target) -> Result<()> {
        let mut cursor = Cursor { position: 0, version: None, since_checkpoint: 0 };
        match target {
            Target::All { after: Some(p), .. } => cursor.position = *p,
            Target::All { after: None, .. } => cursor.position = self.log.last_position().await?,
            Target::Stream { after_version, .. } => cursor.version = *after_version,
        }
        loop {
            // History first, without a place in the broadcast: a reader that
            // does not read holds up this task and its own page only.
            match self.catch_up(target, &mut cursor, None).await {
                Ok(()) | Err(Stop::Blocked(_)) => {}
                Err(Stop::Gone) => return Ok(()),
                Err(Stop::Log(e)) => return Err(e),
            }
            let (stop, was_live) = self.join_and_follow(target, &mut cursor).await;
            // The broadcast receiver is dropped by now: waiting here holds
            // nothing of the ring.
            match stop {
                Stop::Gone => return Ok(()),
                Stop::Log(e) => return Err(e),
                Stop::Blocked(charge) => {
                    if was_live {
                        metrics::counter!("eventfold_store_subscribers_fell_behind_total").increment(1);
                    }
                    if self.buffer.wait_for_space(charge).await.is_err() {
                        return Ok(());
                    }
                    if was_live
                        && self.buffer.send(0, Ok(SubscriptionMessage::FellBehind(cursor.position))).await.is_err()
                    {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Join the broadcast, deliver what remains of the history and follow
    /// the broadcast until something stops it; whether `CaughtUp` was sent.
    async fn join_and_follow(&mut self, target: &Target, cursor: &mut Cursor) -> (Stop, bool) {
        let mut live = self.live.subscribe();
        let live_head = *self.head.borrow();
        if let Err(stop) = self.catch_up(target, cursor, Some(live_head)).await {
            return (stop, false);
        }
        cursor.position = cursor.position.max(live_head);
        let caught_up = SubscriptionMessage::CaughtUp(cursor.position);
        if let Err(stop) = self.buffer.try_send(0, || Ok(caught_up)) {
            return (stop, false);
        }
        cursor.since_checkpoint = 0;
        loop {
            // A reader that went away ends the subscription now, not at the
            // next event (which may be long coming on a quiet log).
            let received = tokio::select! {
                received = live.recv() => received,
                () = self.buffer.tx.closed() => return (Stop::Gone, true),
            };
            match received {
                Ok(batch) => {
                    if let Err(stop) = self.deliver(target, cursor, &batch) {
                        return (stop, true);
                    }
                }
                // Catch up from the cursor like a full buffer does.
                Err(broadcast::error::RecvError::Lagged(_)) => return (Stop::Blocked(0), true),
                Err(broadcast::error::RecvError::Closed) => {
                    return (Stop::Log(Error::Unavailable("the live tail stopped".to_owned())), true);
                }
            }
        }
    }

    /// Deliver history: with `live_head` `None`, waiting for room, until the
    /// end of the log (or stream); with `Some`, while holding a place in the
    /// broadcast, so without waiting, until the cursor has passed it.
    async fn catch_up(&mut self, target: &Target, cursor: &mut Cursor, live_head: Option<u64>) -> Result<(), Stop> {
        let wait = live_head.is_none();
        match target {
            Target::All { filter, .. } => loop {
                let read = AllRead { after: cursor.position, max_count: self.page_size, filter: filter.clone() };
                let slice = self.log.read_all(read).await?;
                let considered = slice.next_position.saturating_sub(cursor.position);
                for event in slice.events {
                    let position = event.global_position;
                    let charge = self.buffer.charge(event.size());
                    if let Err(stop) = self.offer(wait, charge, Ok(SubscriptionMessage::Event(event))).await {
                        // The read is gap-safe up to this event: everything
                        // before it was delivered or filtered out.
                        let before = position.saturating_sub(1).max(cursor.position);
                        cursor.since_checkpoint =
                            cursor.since_checkpoint.saturating_add(before.saturating_sub(cursor.position));
                        cursor.position = before;
                        return Err(stop);
                    }
                }
                cursor.position = slice.next_position.max(cursor.position);
                self.count(cursor, considered, wait).await?;
                if slice.end_of_log && live_head.is_none_or(|head| cursor.position >= head) {
                    return Ok(());
                }
                if considered == 0 {
                    // A missing position not resolved yet: look again shortly.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            },
            // After the last version a bigint holds, nothing can follow; a
            // deleted stream still ends the subscription, as a read would.
            Target::Stream { stream_id, .. } if cursor.version.is_some_and(|v| v >= crate::model::MAX_BIGINT) => {
                match self.log.stream_info(stream_id).await {
                    Ok(_) | Err(Error::StreamNotFound(_)) => Ok(()),
                    Err(e) => Err(e)?,
                }
            }
            Target::Stream { stream_id, .. } => loop {
                let mut read = StreamRead::forwards(stream_id.clone(), self.page_size);
                read.from_version = cursor.version.map(|v| v.saturating_add(1));
                let slice = match self.log.read_stream(read).await {
                    // A stream that does not exist yet is followed until it does.
                    Err(Error::StreamNotFound(_)) => return Ok(()),
                    other => other?,
                };
                for event in slice.events {
                    let version = event.version;
                    let charge = self.buffer.charge(event.size());
                    self.offer(wait, charge, Ok(SubscriptionMessage::Event(event))).await?;
                    cursor.version = Some(version);
                }
                if slice.end_of_stream {
                    return Ok(());
                }
            },
        }
    }

    /// Deliver a live batch without waiting (the batch and the place in the
    /// broadcast are shared with every subscriber); on [`Stop::Blocked`] the
    /// cursor stays before the event that did not fit.
    fn deliver(&mut self, target: &Target, cursor: &mut Cursor, batch: &[LiveEvent]) -> Result<(), Stop> {
        for live in batch {
            let event = &live.event;
            if event.global_position <= cursor.position {
                continue;
            }
            let wanted = match target {
                Target::All { filter, .. } => filter.matches(&event.stream_id, &event.event_type),
                Target::Stream { stream_id, .. } => {
                    let next = cursor.version.map_or(0, |v| v.saturating_add(1));
                    &event.stream_id == stream_id && event.version >= next
                }
            };
            if wanted {
                let charge = self.buffer.charge(live.size);
                self.buffer.try_send(charge, || Ok(SubscriptionMessage::Event(event.clone())))?;
                if matches!(target, Target::Stream { .. }) {
                    cursor.version = Some(event.version);
                }
            }
            cursor.position = event.global_position;
            cursor.since_checkpoint = cursor.since_checkpoint.saturating_add(1);
            if cursor.since_checkpoint >= self.checkpoint_interval {
                let checkpoint = SubscriptionMessage::Checkpoint(cursor.position);
                self.buffer.try_send(0, || Ok(checkpoint))?;
                cursor.since_checkpoint = 0;
            }
        }
        Ok(())
    }

    async fn count(&mut self, cursor: &mut Cursor, considered: u64, wait: bool) -> Result<(), Stop> {
        cursor.since_checkpoint = cursor.since_checkpoint.saturating_add(considered);
        if cursor.since_checkpoint >= self.checkpoint_interval {
            self.offer(wait, 0, Ok(SubscriptionMessage::Checkpoint(cursor.position))).await?;
            cursor.since_checkpoint = 0;
        }
        Ok(())
    }
}
