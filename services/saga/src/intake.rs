//! The sagas' intake: a projection (run by the projection engine, on the
//! store's log or on Kafka) whose "read model" is `saga.saga_instances`.
//! Every `OrderCreated` with a payment token starts an order fulfilment
//! saga, and every `TransferRequested` a money transfer saga, in the
//! engine's transaction, beside its checkpoint: a crash neither loses a
//! start nor starts a saga twice (one saga per order or transfer). Orders
//! placed without a payment token are not fulfilled automatically.
//!
//! The embedded `eventfold dev` (in-memory log, no PostgreSQL) runs
//! [`run_in_memory`] instead: the same starts, into [`MemorySagas`].

use std::{sync::Arc, time::SystemTime};

use async_trait::async_trait;
use eventfold_domain::{
    DomainEvent,
    account::{AccountEvent, TransferRequested},
    order::{OrderCreated, OrderEvent},
};
use eventfold_platform::runtime::CancellationToken;
use eventfold_projector::{ApplyError, Projection};
use eventfold_store::{AllRead, EventFilter, EventLog, RecordedEvent};
use tokio_postgres::Transaction;

use crate::{
    error::{Error, Result},
    model::{SagaState, SagaType},
    repo::MemorySagas,
    steps::{FulfilmentData, Line, TransferData},
    store::{self, SagaRecord},
};

/// The channel told (at commit) that sagas were started.
pub const SAGA_CHANNEL: &str = "eventfold_sagas";

/// See the module documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct SagaIntake;

/// The fulfilment saga of an order: its id is the order's.
pub fn fulfilment_saga_id(order_id: &str) -> String {
    format!("fulfil-{order_id}")
}

/// One line per product, quantities summed: a product is reserved (and
/// released) with one command per order.
fn lines(created: &OrderCreated) -> Vec<Line> {
    let mut by_product: std::collections::BTreeMap<&str, u32> = std::collections::BTreeMap::new();
    for item in &created.items {
        let quantity = by_product.entry(item.product_id.as_str()).or_default();
        *quantity = quantity.saturating_add(item.quantity);
    }
    by_product.into_iter().map(|(product_id, quantity)| Line { product_id: product_id.to_owned(), quantity }).collect()
}

/// The saga an order starts, if it gives a payment token; its steps join
/// the trace of `traceparent` (the event's).
pub fn fulfilment_for(created: &OrderCreated, traceparent: Option<&str>, now: SystemTime) -> Option<SagaRecord> {
    let payment_token = created.payment_token.clone()?;
    let data = FulfilmentData {
        order_id: created.order_id.clone(),
        customer_id: created.customer_id.clone(),
        lines: lines(created),
        total: created.total,
        payment_token,
        carrier: created.carrier.clone().unwrap_or_else(|| "DHL".to_owned()),
        authorization_id: None,
        tracking_number: None,
        traceparent: traceparent.map(str::to_owned),
    };
    let (state, _) = SagaState::start(SagaType::OrderFulfilment);
    Some(SagaRecord {
        saga_id: fulfilment_saga_id(&created.order_id),
        correlation_id: created.order_id.clone(),
        state,
        data: serde_json::to_value(&data).ok()?,
        due_at: now,
        deadline_at: None,
        version: 0,
    })
}

/// The transfer saga of a transfer: its id is the transfer's.
pub fn transfer_saga_id(transfer_id: &str) -> String {
    format!("transfer-{transfer_id}")
}

/// The saga a transfer request starts; its steps join the trace of
/// `traceparent` (the event's).
pub fn transfer_for(requested: &TransferRequested, traceparent: Option<&str>, now: SystemTime) -> Option<SagaRecord> {
    let data = TransferData {
        transfer_id: requested.transfer_id.clone(),
        from_account_id: requested.account_id.clone(),
        to_account_id: requested.to_account_id.clone(),
        amount: requested.amount,
        traceparent: traceparent.map(str::to_owned),
    };
    let (state, _) = SagaState::start(SagaType::MoneyTransfer);
    Some(SagaRecord {
        saga_id: transfer_saga_id(&requested.transfer_id),
        correlation_id: requested.transfer_id.clone(),
        state,
        data: serde_json::to_value(&data).ok()?,
        due_at: now,
        deadline_at: None,
        version: 0,
    })
}

/// The saga `event` starts, if any.
fn saga_for(event: &RecordedEvent) -> Result<Option<SagaRecord>, ApplyError> {
    let decode = |e: eventfold_domain::DecodeError| ApplyError::Event(e.to_string());
    let traceparent = event.metadata.custom.get(eventfold_platform::trace::TRACEPARENT).map(String::as_str);
    Ok(match event.event_type.as_str() {
        "OrderCreated" => {
            match OrderEvent::from_data_ref(&event.event_type, event.schema_version, &event.data).map_err(decode)? {
                OrderEvent::Created(created) => fulfilment_for(&created, traceparent, SystemTime::now()),
                _ => None,
            }
        }
        "TransferRequested" => {
            match AccountEvent::from_data_ref(&event.event_type, event.schema_version, &event.data).map_err(decode)? {
                AccountEvent::TransferRequested(requested) => transfer_for(&requested, traceparent, SystemTime::now()),
                _ => None,
            }
        }
        _ => None,
    })
}

/// The events that start sagas, whatever their stream (`saga_for` looks at
/// the type alone).
fn starters() -> EventFilter {
    EventFilter { stream_prefixes: Vec::new(), event_types: vec!["OrderCreated".into(), "TransferRequested".into()] }
}

fn apply_error(error: Error) -> ApplyError {
    match error {
        Error::Database(db) => ApplyError::Database(db),
        other => ApplyError::Event(other.to_string()),
    }
}

#[async_trait]
impl Projection for SagaIntake {
    fn name(&self) -> &'static str {
        "saga_intake"
    }

    fn create_sql(&self, _version: u32) -> String {
        // The tables are the migrations' (saga schema).
        String::new()
    }

    fn tables(&self, _version: u32) -> Vec<String> {
        // Never emptied by a reset: sagas are not a rebuildable model.
        Vec::new()
    }

    fn activate_sql(&self, _version: u32) -> String {
        String::new()
    }

    fn event_filter(&self) -> EventFilter {
        // Whatever the stream: `saga_for` looks at the type alone.
        EventFilter {
            stream_prefixes: Vec::new(),
            event_types: vec!["OrderCreated".into(), "TransferRequested".into()],
        }
    }

    /// The sagas of the whole batch started by one statement, and their
    /// channel told once per saga started.
    async fn apply_batch(
        &self,
        tx: &Transaction<'_>,
        _version: u32,
        events: &[RecordedEvent],
    ) -> Result<bool, ApplyError> {
        let mut records = Vec::new();
        for event in events {
            records.extend(saga_for(event)?);
        }
        let started = store::start_many(tx, &records).await.map_err(apply_error)?;
        if !started.is_empty() {
            tx.execute("SELECT pg_notify($1, saga_id) FROM unnest($2::text[]) AS saga_id", &[&SAGA_CHANNEL, &started])
                .await?;
        }
        Ok(true)
    }

    async fn apply(&self, tx: &Transaction<'_>, _version: u32, event: &RecordedEvent) -> Result<(), ApplyError> {
        let Some(record) = saga_for(event)? else {
            return Ok(());
        };
        let started = store::start(tx, &record).await.map_err(apply_error)?;
        if started {
            tx.execute("SELECT pg_notify($1, $2)", &[&SAGA_CHANNEL, &record.saga_id]).await?;
        }
        Ok(())
    }
}

/// Starts the sagas of the events of `log` (from its beginning) in `sagas`
/// until `token` is cancelled (or the log is gone): the intake of the
/// embedded `eventfold dev`, whose log and sagas live and die with the
/// process. An event that cannot be read starts nothing and is logged. A
/// read that fails ends it with the error; run again (by its supervisor)
/// it reads the log from its beginning, and a saga already started is not
/// started twice.
pub async fn run_in_memory(log: Arc<dyn EventLog>, sagas: Arc<MemorySagas>, token: CancellationToken) -> Result<()> {
    let filter = starters();
    let mut appended = log.appended();
    let mut position = 0;
    while !token.is_cancelled() {
        // Seen before the read: an append after it wakes the wait below.
        appended.borrow_and_update();
        let read = AllRead { after: position, max_count: 500, filter: filter.clone() };
        let slice = log.read_all(read).await?;
        for event in &slice.events {
            match saga_for(event) {
                Ok(Some(record)) => {
                    sagas.start(&record);
                }
                Ok(None) => {}
                Err(error) => tracing::error!(
                    position = event.global_position,
                    stream = %event.stream_id,
                    %error,
                    "event starts no saga: it cannot be read"
                ),
            }
        }
        position = slice.next_position;
        if slice.end_of_log {
            tokio::select! {
                changed = appended.changed() => if changed.is_err() {
                    // The log is gone: nothing more can start a saga.
                    return Ok(());
                },
                () = token.cancelled() => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use eventfold_domain::{
        Money,
        order::{OrderCreated, OrderItem},
    };

    use super::*;

    #[test]
    fn an_order_with_a_payment_token_starts_a_saga_with_one_line_per_product() {
        let eur = "EUR".parse().unwrap();
        let item = |product: &str, quantity| OrderItem {
            product_id: product.into(),
            quantity,
            unit_price: Money::new(100, eur),
        };
        let mut created = OrderCreated {
            order_id: "o-1".into(),
            customer_id: "c".into(),
            currency: eur,
            items: vec![item("b", 1), item("a", 2), item("b", 3)],
            total: Money::new(600, eur),
            payment_token: Some("tok_visa".into()),
            carrier: None,
        };
        let record = fulfilment_for(&created, None, SystemTime::now()).unwrap();
        assert_eq!(record.saga_id, "fulfil-o-1");
        let data: FulfilmentData = serde_json::from_value(record.data).unwrap();
        assert_eq!(
            data.lines,
            [Line { product_id: "a".into(), quantity: 2 }, Line { product_id: "b".into(), quantity: 4 }]
        );
        assert_eq!(data.carrier, "DHL", "the default carrier");
        assert_eq!(data.payment_token.expose(), "tok_visa", "the saga keeps the token it authorizes with");
        assert!(!format!("{data:?}").contains("tok_visa"), "and never shows it: {data:?}");
        created.payment_token = None;
        assert!(fulfilment_for(&created, None, SystemTime::now()).is_none(), "no token, no saga");
    }
}
