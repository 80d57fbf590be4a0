//! The sagas' intake: a projection (run by the projection engine, on the
//! store's log or on Kafka) whose "read model" is `saga.saga_instances`.
//! Every `OrderCreated` with a payment token starts an order fulfilment
//! saga, and every `TransferRequested` a money transfer saga, in the
//! engine's transaction, beside its checkpoint: a crash neither loses a
//! start nor starts a saga twice (one saga per order or transfer). Orders
//! placed without a payment token are not fulfilled automatically.

use std::time::SystemTime;

use async_trait::async_trait;
use eventfold_domain::{
    DomainEvent,
    account::{AccountEvent, TransferRequested},
    order::{OrderCreated, OrderEvent},
};
use eventfold_projector::{ApplyError, Projection};
use eventfold_store::RecordedEvent;
use tokio_postgres::Transaction;

use crate::{
    model::{SagaState, SagaType},
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

/// The saga an order starts, if it gives a payment token.
pub fn fulfilment_for(created: &OrderCreated, now: SystemTime) -> Option<SagaRecord> {
    let payment_token = created.payment_token.clone()?;
    let data = FulfilmentData {
        order_id: created.order_id.clone(),
        customer_id: created.customer_id.clone(),
        lines: created.items.iter().map(|i| Line { product_id: i.product_id.clone(), quantity: i.quantity }).collect(),
        total: created.total,
        payment_token,
        carrier: created.carrier.clone().unwrap_or_else(|| "DHL".to_owned()),
        authorization_id: None,
        tracking_number: None,
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

/// The saga a transfer request starts.
pub fn transfer_for(requested: &TransferRequested, now: SystemTime) -> Option<SagaRecord> {
    let data = TransferData {
        transfer_id: requested.transfer_id.clone(),
        from_account_id: requested.account_id.clone(),
        to_account_id: requested.to_account_id.clone(),
        amount: requested.amount,
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
    Ok(match event.event_type.as_str() {
        "OrderCreated" => {
            match OrderEvent::from_data_ref(&event.event_type, event.schema_version, &event.data).map_err(decode)? {
                OrderEvent::Created(created) => fulfilment_for(&created, SystemTime::now()),
                _ => None,
            }
        }
        "TransferRequested" => {
            match AccountEvent::from_data_ref(&event.event_type, event.schema_version, &event.data).map_err(decode)? {
                AccountEvent::TransferRequested(requested) => transfer_for(&requested, SystemTime::now()),
                _ => None,
            }
        }
        _ => None,
    })
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

    async fn apply(&self, tx: &Transaction<'_>, _version: u32, event: &RecordedEvent) -> Result<(), ApplyError> {
        let Some(record) = saga_for(event)? else {
            return Ok(());
        };
        let started = store::start(tx, &record).await.map_err(|e| match e {
            store::StoreError::Database(db) => ApplyError::Database(db),
            other => ApplyError::Event(other.to_string()),
        })?;
        if started {
            tx.execute("SELECT pg_notify($1, $2)", &[&SAGA_CHANNEL, &record.saga_id]).await?;
        }
        Ok(())
    }
}
