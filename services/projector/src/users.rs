//! `user_activity`: per registered user its profile and counters, and per
//! user (registered or not) a timeline of what they did: registration,
//! logins, recorded actions, and the life of their orders (an order's
//! `customer_id` is the user id).
//!
//! The `users` row follows the user's own stream only: `logins` and
//! `actions` are those of the aggregate, `last_seen_at` / `last_position`
//! belong to its last user event. Order events only add timeline rows, also
//! for customers who never registered. Details: `registered` → the email,
//! `logged_in` → the login source, `action` → `"<action> <subject>"` (just
//! the action when the subject is empty), order kinds → the order id, and
//! for `order_cancelled` `"<order id>: <reason>"`.

use std::time::SystemTime;

use async_trait::async_trait;
use eventfold_domain::{DomainEvent, order::OrderEvent, user::UserEvent};
use eventfold_store::RecordedEvent;
use tokio_postgres::Transaction;

use crate::{ApplyError, Projection};

/// The user activity read model (`read.users`, `read.user_activity`, and
/// the helper `read.user_orders_v{version}`).
#[derive(Debug, Clone, Copy, Default)]
pub struct UserActivity;

fn inconsistent(message: impl Into<String>) -> ApplyError {
    ApplyError::Event(message.into())
}

#[async_trait]
impl Projection for UserActivity {
    fn name(&self) -> &'static str {
        "user_activity"
    }

    fn create_sql(&self, v: u32) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS read.users_v{v} (
                user_id       text COLLATE \"C\" PRIMARY KEY,
                email         text NOT NULL,
                display_name  text NOT NULL,
                registered_at timestamptz NOT NULL,
                logins        bigint NOT NULL,
                actions       bigint NOT NULL,
                last_seen_at  timestamptz NOT NULL,
                last_position bigint NOT NULL
            );
            CREATE TABLE IF NOT EXISTS read.user_activity_v{v} (
                user_id         text COLLATE \"C\" NOT NULL,
                global_position bigint NOT NULL,
                kind            text NOT NULL,
                detail          text NOT NULL,
                occurred_at     timestamptz NOT NULL,
                PRIMARY KEY (user_id, global_position)
            );
            CREATE TABLE IF NOT EXISTS read.user_orders_v{v} (
                order_id text COLLATE \"C\" PRIMARY KEY,
                user_id  text COLLATE \"C\" NOT NULL
            );
            CREATE INDEX IF NOT EXISTS user_orders_v{v}_user ON read.user_orders_v{v} (user_id);"
        )
    }

    fn tables(&self, v: u32) -> Vec<String> {
        vec![format!("read.users_v{v}"), format!("read.user_activity_v{v}"), format!("read.user_orders_v{v}")]
    }

    fn activate_sql(&self, v: u32) -> String {
        format!(
            "DROP VIEW IF EXISTS read.users;
             CREATE VIEW read.users AS SELECT * FROM read.users_v{v};
             DROP VIEW IF EXISTS read.user_activity;
             CREATE VIEW read.user_activity AS SELECT * FROM read.user_activity_v{v};"
        )
    }

    async fn apply(&self, tx: &Transaction<'_>, v: u32, event: &RecordedEvent) -> Result<(), ApplyError> {
        let result = if event.stream_id.starts_with("user-") && UserEvent::current_version(&event.event_type).is_some()
        {
            let decoded = UserEvent::from_data(&event.event_type, event.schema_version, event.data.clone())
                .map_err(|e| ApplyError::Event(e.to_string()))?;
            apply_user_event(tx, v, decoded, event).await
        } else if event.stream_id.starts_with("order-") && OrderEvent::current_version(&event.event_type).is_some() {
            let decoded = OrderEvent::from_data(&event.event_type, event.schema_version, event.data.clone())
                .map_err(|e| ApplyError::Event(e.to_string()))?;
            apply_order_event(tx, v, decoded, event).await
        } else {
            return Ok(());
        };
        result.map_err(|e| match e {
            ApplyError::Event(message) => ApplyError::Event(format!(
                "{} at position {} ({}): {message}",
                event.event_type, event.global_position, event.stream_id
            )),
            other => other,
        })
    }
}

async fn apply_user_event(
    tx: &Transaction<'_>,
    v: u32,
    event: UserEvent,
    recorded: &RecordedEvent,
) -> Result<(), ApplyError> {
    let users = format!("read.users_v{v}");
    let (at, position) = (recorded.created_at, recorded.global_position as i64);
    let (user_id, kind, detail) = match event {
        UserEvent::Registered(e) => {
            let inserted = tx
                .execute(
                    &format!(
                        "INSERT INTO {users} (user_id, email, display_name, registered_at, logins, actions, \
                                              last_seen_at, last_position) \
                         VALUES ($1, $2, $3, $4, 0, 0, $4, $5) ON CONFLICT (user_id) DO NOTHING"
                    ),
                    &[&e.user_id, e.email.expose(), &e.display_name, &at, &position],
                )
                .await?;
            if inserted != 1 {
                return Err(inconsistent(format!("user {} was registered before", e.user_id)));
            }
            (e.user_id, "registered", e.email.into_inner())
        }
        UserEvent::LoggedIn(e) => {
            seen(tx, &users, &e.user_id, "logins", at, position).await?;
            (e.user_id, "logged_in", e.source)
        }
        UserEvent::ActionRecorded(e) => {
            seen(tx, &users, &e.user_id, "actions", at, position).await?;
            let detail = if e.subject.is_empty() { e.action } else { format!("{} {}", e.action, e.subject) };
            (e.user_id, "action", detail)
        }
    };
    activity(tx, v, &user_id, kind, &detail, recorded).await
}

/// One more login or action (`counter`) of a registered user.
async fn seen(
    tx: &Transaction<'_>,
    users: &str,
    user_id: &str,
    counter: &str,
    at: SystemTime,
    position: i64,
) -> Result<(), ApplyError> {
    let changed = tx
        .execute(
            &format!(
                "UPDATE {users} SET {counter} = {counter} + 1, last_seen_at = $2, last_position = $3 \
                  WHERE user_id = $1"
            ),
            &[&user_id, &at, &position],
        )
        .await?;
    if changed == 1 { Ok(()) } else { Err(inconsistent(format!("user {user_id} is not in {users}"))) }
}

async fn apply_order_event(
    tx: &Transaction<'_>,
    v: u32,
    event: OrderEvent,
    recorded: &RecordedEvent,
) -> Result<(), ApplyError> {
    let orders = format!("read.user_orders_v{v}");
    let (order_id, kind, detail) = match event {
        OrderEvent::Created(e) => {
            let inserted = tx
                .execute(
                    &format!("INSERT INTO {orders} (order_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"),
                    &[&e.order_id, &e.customer_id],
                )
                .await?;
            if inserted != 1 {
                return Err(inconsistent(format!("order {} was created before", e.order_id)));
            }
            return activity(tx, v, &e.customer_id, "order_created", &e.order_id, recorded).await;
        }
        OrderEvent::Confirmed(e) => (e.order_id, "order_confirmed", None),
        OrderEvent::PaymentProcessed(e) => (e.order_id, "order_paid", None),
        OrderEvent::Shipped(e) => (e.order_id, "order_shipped", None),
        OrderEvent::Cancelled(e) => (e.order_id, "order_cancelled", Some(e.reason)),
    };
    let user_id: String = tx
        .query_opt(&format!("SELECT user_id FROM {orders} WHERE order_id = $1"), &[&order_id])
        .await?
        .ok_or_else(|| inconsistent(format!("order {order_id} is not in {orders}")))?
        .get(0);
    let detail = match detail {
        Some(reason) => format!("{order_id}: {reason}"),
        None => order_id,
    };
    activity(tx, v, &user_id, kind, &detail, recorded).await
}

async fn activity(
    tx: &Transaction<'_>,
    v: u32,
    user_id: &str,
    kind: &str,
    detail: &str,
    recorded: &RecordedEvent,
) -> Result<(), ApplyError> {
    let inserted = tx
        .execute(
            &format!(
                "INSERT INTO read.user_activity_v{v} (user_id, global_position, kind, detail, occurred_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (user_id, global_position) DO NOTHING"
            ),
            &[&user_id, &(recorded.global_position as i64), &kind, &detail, &recorded.created_at],
        )
        .await?;
    if inserted == 1 {
        Ok(())
    } else {
        Err(inconsistent(format!("user {user_id} has activity at position {} already", recorded.global_position)))
    }
}
