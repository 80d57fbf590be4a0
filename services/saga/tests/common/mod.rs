//! Shared setup of the saga's integration tests.

#![allow(unreachable_pub)]

use std::time::{Duration, SystemTime};

use eventfold_saga::{SagaState, SagaType, store::SagaRecord};

/// A new saga of `saga_type` with id `id` (correlation `c-<id>`), never due:
/// no orchestrator runs in the tests that store it.
pub fn saga(id: &str, saga_type: SagaType) -> SagaRecord {
    let (state, _) = SagaState::start(saga_type);
    SagaRecord {
        saga_id: id.to_owned(),
        correlation_id: format!("c-{id}"),
        state,
        data: serde_json::json!({}),
        due_at: SystemTime::now() + Duration::from_secs(3600),
        deadline_at: None,
        version: 0,
    }
}
