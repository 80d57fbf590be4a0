//! Forgetting request ids (AIP-155) once their retention is over, in small
//! batches so that no long transaction holds up appends.

use std::time::Duration;

use super::tables::Tables;
use crate::{
    error::Result,
    pg::{Database, db_error},
};

/// Forgets the request ids answered more than `age` ago, in batches of
/// 1,000 so that no long transaction holds up appends; how many it forgot.
pub(super) async fn forget_requests(database: &Database, tables: &Tables, age: Duration) -> Result<u64> {
    let age_secs = age.as_secs_f64();
    let mut forgotten = 0u64;
    loop {
        let client = database.get().await?;
        let n = client
            .execute(
                &*tables.sql(
                    "DELETE FROM eventstore.append_requests WHERE ctid = ANY (ARRAY( \
                       SELECT ctid FROM eventstore.append_requests \
                       WHERE created_at < clock_timestamp() - make_interval(secs => $1) LIMIT 1000))",
                ),
                &[&age_secs],
            )
            .await
            .map_err(db_error)?;
        forgotten = forgotten.saturating_add(n);
        if n < 1000 {
            return Ok(forgotten);
        }
    }
}

/// Runs [`forget_requests`] with `retention` about every `retention / 100`
/// (at least every minute, at most every hour).
pub(super) async fn prune_requests(database: Database, tables: Tables, retention: Duration) {
    let every =
        retention.checked_div(100).unwrap_or_default().clamp(Duration::from_secs(60), Duration::from_secs(3600));
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = forget_requests(&database, &tables, retention).await {
            tracing::debug!(error = %e, "request ids not pruned; trying again later");
        }
    }
}
