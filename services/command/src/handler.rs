//! The innermost service of the bus: load the aggregate (latest snapshot
//! plus later events), decide, append with the expected version, snapshot
//! every N events.

use std::{
    collections::HashMap,
    future::Future,
    num::NonZeroU64,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use eventfold_domain::{
    Aggregate, DomainEvent,
    account::Account,
    inventory::Inventory,
    order::Order,
    payment::{AuthorizePayment, Payment, PaymentCommand},
    shipment::Shipment,
    user::User,
};
use eventfold_store::{
    AppendOutcome, AppendRequest, EventLog, EventMetadata, ExpectedVersion, NewEvent, RequestKey, Snapshot,
    SnapshotNamespace, SnapshotQuery, StreamRead,
};

use crate::{
    envelope::{Command, Envelope, Meta, Reply, Write, stream},
    error::{Error, Result},
};

/// `events` as the event store takes them, each with `metadata`.
pub fn new_events<E: DomainEvent>(events: &[E], metadata: &EventMetadata) -> Vec<NewEvent> {
    events
        .iter()
        .map(|e| {
            let mut event = NewEvent::new(e.event_type(), e.to_data());
            event.schema_version = e.schema_version();
            event.metadata = metadata.clone();
            event
        })
        .collect()
}

/// When aggregates are snapshotted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotPolicy {
    /// A snapshot every this many events (0: never).
    pub every: u64,
    /// Per aggregate category (`order`, `inventory`, …), overriding `every`.
    pub per_category: HashMap<String, u64>,
}

impl Default for SnapshotPolicy {
    fn default() -> Self {
        Self { every: 100, per_category: HashMap::new() }
    }
}

impl SnapshotPolicy {
    fn every(&self, category: &str) -> u64 {
        self.per_category.get(category).copied().unwrap_or(self.every)
    }
}

/// An aggregate as loaded.
#[derive(Debug)]
pub struct Loaded<A> {
    pub state: A,
    /// Version of the last event folded in; `None`: no event yet.
    pub version: Option<u64>,
    /// A snapshot of an older schema was found and ignored: write a new one.
    pub stale_snapshot: bool,
}

/// Executes commands against the event log.
#[derive(Clone)]
pub struct Handler {
    log: Arc<dyn EventLog>,
    snapshots: Arc<SnapshotPolicy>,
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handler").field("snapshots", &self.snapshots).finish_non_exhaustive()
    }
}

fn not_found_is_empty<T>(result: eventfold_store::Result<T>) -> Result<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(eventfold_store::Error::StreamNotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl Handler {
    pub fn new(log: Arc<dyn EventLog>, snapshots: SnapshotPolicy) -> Self {
        Self { log, snapshots: Arc::new(snapshots) }
    }

    /// The aggregate in `stream_id`: its latest snapshot of the current
    /// schema version, then every later event.
    ///
    /// Only the command side's own snapshots are loaded (never a client's,
    /// see [`SnapshotNamespace`]), and one is used only while the stream's
    /// hash chain still has, at the snapshot's version, the link recorded
    /// with it; otherwise, or when it cannot be read, it is ignored (and
    /// replaced on the next write) and the aggregate folds from its events.
    pub async fn load<A: Aggregate>(&self, stream_id: &str) -> Result<Loaded<A>> {
        let query = SnapshotQuery {
            stream_id: stream_id.to_owned(),
            namespace: SnapshotNamespace::Aggregate,
            max_version: None,
            schema_version: None,
        };
        let snapshot = not_found_is_empty(self.log.load_snapshot(query).await)?.flatten();
        let (mut state, mut version, mut stale_snapshot) = match snapshot {
            Some(s) if s.schema_version == A::SNAPSHOT_VERSION => match serde_json::from_value::<A>(s.state) {
                Ok(state) => (state, Some((s.version, s.head_hash)), false),
                Err(e) => {
                    tracing::warn!(stream = stream_id, error = %e, "unreadable snapshot ignored");
                    (A::default(), None, true)
                }
            },
            Some(_) => (A::default(), None, true),
            None => (A::default(), None, false),
        };
        if let Some((at, head)) = version {
            // The snapshot's own event comes first: its link must match.
            let mut read = StreamRead::forwards(stream_id, 1);
            read.from_version = Some(at);
            let slice = not_found_is_empty(self.log.read_stream(read).await)?;
            let linked =
                slice.and_then(|s| s.events.into_iter().next()).is_some_and(|e| e.version == at && e.hash == head);
            if !linked {
                tracing::warn!(
                    stream = stream_id,
                    version = at,
                    "snapshot does not match the stream's hash chain: ignored"
                );
                (state, stale_snapshot) = (A::default(), true);
                version = None;
            }
        }
        let mut version = version.map(|(at, _)| at);
        loop {
            let mut read = StreamRead::forwards(stream_id, 1000);
            read.from_version = version.map(|v| v.saturating_add(1));
            let Some(slice) = not_found_is_empty(self.log.read_stream(read).await)? else { break };
            for stored in &slice.events {
                let event = A::Event::from_data(&stored.event_type, stored.schema_version, stored.data.clone())
                    .map_err(|e| Error::Corrupt(format!("{stream_id} version {}: {e}", stored.version)))?;
                state = state.evolve(&event);
                version = Some(stored.version);
            }
            if slice.end_of_stream || slice.events.is_empty() {
                break;
            }
        }
        Ok(Loaded { state, version, stale_snapshot })
    }

    /// Decide `command` on the aggregate in `stream_id` and append what it
    /// answers, expecting the version it was decided on.
    pub async fn execute<A: Aggregate>(
        &self,
        stream_id: &str,
        command: &A::Command,
        meta: &Meta,
        request: Option<RequestKey>,
    ) -> Result<Write> {
        if A::creates(command) {
            // Nothing to load for a new aggregate; if it exists after all,
            // the append says so and the full path below gives the answer.
            let loaded = Loaded { state: A::default(), version: None, stale_snapshot: false };
            match self.decide_and_append::<A>(stream_id, command, meta, request.clone(), loaded).await {
                Err(Error::Conflict { .. }) => {}
                other => return other,
            }
        }
        let loaded = self.load::<A>(stream_id).await?;
        self.decide_and_append::<A>(stream_id, command, meta, request, loaded).await
    }

    async fn decide_and_append<A: Aggregate>(
        &self,
        stream_id: &str,
        command: &A::Command,
        meta: &Meta,
        key: Option<RequestKey>,
        loaded: Loaded<A>,
    ) -> Result<Write> {
        let events = loaded.state.decide(command)?;
        if events.is_empty() {
            return Ok(Write {
                stream_id: stream_id.to_owned(),
                stream_version: loaded.version,
                global_position: 0,
                events: Vec::new(),
                duplicate: false,
            });
        }
        let metadata = EventMetadata {
            correlation_id: Some(meta.correlation_id.clone()),
            causation_id: meta.causation_id.clone().or_else(|| meta.request_id.clone()),
            user_id: meta.principal.clone(),
            // The trace this command runs in (W3C), so that whatever the
            // events cause joins it.
            custom: eventfold_platform::trace::current_traceparent()
                .map(|parent| [(eventfold_platform::trace::TRACEPARENT.to_owned(), parent)].into_iter().collect())
                .unwrap_or_default(),
        };
        let new_events = new_events(&events, &metadata);
        let expected = loaded.version.map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
        let mut request = AppendRequest::new(stream_id, expected, new_events);
        if let Some(key) = key {
            request.request_id = Some(key.request_id);
            request.request_scope = Some(key.scope);
            request.fingerprint = Some(key.fingerprint);
        }
        let outcome = self.log.append(request).await?;
        if outcome.duplicate {
            return first_answer(self.log.as_ref(), outcome).await;
        }
        let state = loaded.state.fold(&events);
        self.snapshot_if_due::<A>(stream_id, loaded.version, outcome.last_version, &state, loaded.stale_snapshot).await;
        Ok(Write {
            stream_id: stream_id.to_owned(),
            stream_version: Some(outcome.last_version),
            global_position: outcome.last_position(),
            events: events.iter().map(|e| (e.event_type().to_owned(), e.to_data())).collect(),
            duplicate: false,
        })
    }

    async fn snapshot_if_due<A: Aggregate>(
        &self,
        stream_id: &str,
        before: Option<u64>,
        after: u64,
        state: &A,
        stale: bool,
    ) {
        let Some(every) = NonZeroU64::new(self.snapshots.every(A::CATEGORY)) else {
            return;
        };
        let count = |version: Option<u64>| version.map_or(0, |v| v.saturating_add(1)) / every;
        if !stale && count(before) == count(Some(after)) {
            return;
        }
        let state = match serde_json::to_value(state) {
            Ok(state) => state,
            Err(e) => {
                tracing::warn!(stream = stream_id, error = %e, "snapshot not saved: the state does not serialize");
                return;
            }
        };
        let mut snapshot = Snapshot::new(stream_id, SnapshotNamespace::Aggregate, after, state);
        snapshot.schema_version = A::SNAPSHOT_VERSION;
        // A missing snapshot only costs a longer load later.
        if let Err(e) = self.log.save_snapshot(snapshot).await {
            tracing::warn!(stream = stream_id, error = %e, "snapshot not saved");
        }
    }

    /// Run one command.
    pub async fn handle(&self, envelope: Envelope) -> Result<Reply> {
        let key = envelope.request_key();
        let Envelope { command, meta } = envelope;
        let write = match command {
            Command::Order { order_id, command } => {
                self.execute::<Order>(&stream::<Order>(&order_id), &command, &meta, key).await?
            }
            Command::Inventory { product_id, command } => {
                self.execute::<Inventory>(&stream::<Inventory>(&product_id), &command, &meta, key).await?
            }
            Command::AuthorizePayment { payment_id, order_id, amount, provider_reference } => {
                // The order says whether it takes a payment, and up to what.
                let order_total = self.load::<Order>(&stream::<Order>(&order_id)).await?.state.payable_total()?;
                let command = PaymentCommand::Authorize(AuthorizePayment {
                    payment_id: payment_id.clone(),
                    order_id,
                    amount,
                    order_total,
                    provider_reference,
                });
                self.execute::<Payment>(&stream::<Payment>(&payment_id), &command, &meta, key).await?
            }
            Command::Payment { payment_id, command } => {
                self.execute::<Payment>(&stream::<Payment>(&payment_id), &command, &meta, key).await?
            }
            Command::Shipment { shipment_id, command } => {
                self.execute::<Shipment>(&stream::<Shipment>(&shipment_id), &command, &meta, key).await?
            }
            Command::Account { account_id, command } => {
                self.execute::<Account>(&stream::<Account>(&account_id), &command, &meta, key).await?
            }
            Command::User { user_id, command } => {
                self.execute::<User>(&stream::<User>(&user_id), &command, &meta, key).await?
            }
        };
        Ok(Reply::single(write))
    }
}

/// The write of a request seen before, rebuilt from what it appended then.
pub(crate) async fn first_answer(log: &dyn EventLog, outcome: AppendOutcome) -> Result<Write> {
    let count = outcome.positions.len();
    let mut read = StreamRead::forwards(&outcome.stream_id, count.max(1));
    read.from_version = Some(outcome.first_version);
    let slice = log.read_stream(read).await?;
    let events = slice
        .events
        .into_iter()
        .filter(|e| e.version <= outcome.last_version)
        .map(|e| (e.event_type, e.data))
        .collect();
    Ok(Write {
        global_position: outcome.last_position(),
        stream_version: Some(outcome.last_version),
        stream_id: outcome.stream_id,
        events,
        duplicate: true,
    })
}

impl tower::Service<Envelope> for Handler {
    type Response = Reply;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Reply>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, envelope: Envelope) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.handle(envelope).await })
    }
}
