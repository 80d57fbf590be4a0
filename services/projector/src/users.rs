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

use std::{
    collections::{BTreeSet, HashMap},
    time::SystemTime,
};

use async_trait::async_trait;
use eventfold_domain::{DomainEvent, order::OrderEvent, user::UserEvent};
use eventfold_store::{EventFilter, RecordedEvent};
use tokio_postgres::Transaction;

use crate::{
    ApplyError, Projection,
    orders::{is_order_event, order_id},
};

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

    fn event_filter(&self) -> EventFilter {
        crate::reads(&[("user-", UserEvent::TYPES), ("order-", OrderEvent::TYPES)])
    }

    /// The batch folded in memory per user and order, from the rows it
    /// touches (read once), then one statement per table and kind of change.
    async fn apply_batch(&self, tx: &Transaction<'_>, v: u32, events: &[RecordedEvent]) -> Result<bool, ApplyError> {
        let mut decoded = Vec::new();
        for event in events {
            let e = if is_user_event(event) {
                Decoded::User(
                    UserEvent::from_data_ref(&event.event_type, event.schema_version, &event.data)
                        .map_err(|e| ApplyError::Event(e.to_string()))?,
                )
            } else if is_order_event(event) {
                Decoded::Order(
                    OrderEvent::from_data_ref(&event.event_type, event.schema_version, &event.data)
                        .map_err(|e| ApplyError::Event(e.to_string()))?,
                )
            } else {
                continue;
            };
            decoded.push((event, e));
        }
        if decoded.is_empty() {
            return Ok(true);
        }
        let mut fold = UserFold::load(tx, v, &decoded).await?;
        for (event, e) in decoded {
            fold.apply(event, e)?;
        }
        fold.write(tx, v).await?;
        Ok(true)
    }

    async fn apply(&self, tx: &Transaction<'_>, v: u32, event: &RecordedEvent) -> Result<(), ApplyError> {
        let result = if is_user_event(event) {
            let decoded = UserEvent::from_data(&event.event_type, event.schema_version, event.data.clone())
                .map_err(|e| ApplyError::Event(e.to_string()))?;
            apply_user_event(tx, v, decoded, event).await
        } else if is_order_event(event) {
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

fn is_user_event(event: &RecordedEvent) -> bool {
    event.stream_id.starts_with("user-") && UserEvent::current_version(&event.event_type).is_some()
}

/// An event [`UserActivity`] reads.
enum Decoded {
    User(UserEvent),
    Order(OrderEvent),
}

/// One `users` row, as folded in memory.
#[derive(Debug)]
struct UserRow {
    /// Read from the table (updated) rather than registered in this batch
    /// (inserted).
    stored: bool,
    email: String,
    display_name: String,
    registered_at: SystemTime,
    logins: i64,
    actions: i64,
    last_seen_at: SystemTime,
    last_position: i64,
}

/// [`UserActivity`]'s batch: the users and orders it touches and the
/// timeline rows it adds.
#[derive(Debug, Default)]
struct UserFold {
    users: HashMap<String, UserRow>,
    touched: BTreeSet<String>,
    /// order → user: stored ones the batch needs, and the batch's.
    order_users: HashMap<String, String>,
    new_orders: Vec<(String, String)>,
    /// (user, global position, kind, detail, occurred at)
    activity: Vec<(String, i64, &'static str, String, SystemTime)>,
}

impl UserFold {
    async fn load(tx: &Transaction<'_>, v: u32, decoded: &[(&RecordedEvent, Decoded)]) -> Result<Self, ApplyError> {
        let (mut users, mut orders): (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
        for (_, e) in decoded {
            match e {
                Decoded::User(UserEvent::Registered(e)) => users.push(&e.user_id),
                Decoded::User(UserEvent::LoggedIn(e)) => users.push(&e.user_id),
                Decoded::User(UserEvent::ActionRecorded(e)) => users.push(&e.user_id),
                Decoded::Order(e) => orders.push(order_id(e)),
            }
        }
        users.sort_unstable();
        users.dedup();
        orders.sort_unstable();
        orders.dedup();
        let mut fold = Self::default();
        if !users.is_empty() {
            let rows = tx
                .query(
                    &format!(
                        "SELECT user_id, email, display_name, registered_at, logins, actions, last_seen_at, \
                                last_position \
                           FROM read.users_v{v} WHERE user_id = ANY($1)"
                    ),
                    &[&users],
                )
                .await?;
            for r in rows {
                let user = UserRow {
                    stored: true,
                    email: r.get(1),
                    display_name: r.get(2),
                    registered_at: r.get(3),
                    logins: r.get(4),
                    actions: r.get(5),
                    last_seen_at: r.get(6),
                    last_position: r.get(7),
                };
                fold.users.insert(r.get(0), user);
            }
        }
        if !orders.is_empty() {
            let rows = tx
                .query(
                    &format!("SELECT order_id, user_id FROM read.user_orders_v{v} WHERE order_id = ANY($1)"),
                    &[&orders],
                )
                .await?;
            for r in rows {
                fold.order_users.insert(r.get(0), r.get(1));
            }
        }
        Ok(fold)
    }

    /// One event, with the checks of [`UserActivity::apply`].
    fn apply(&mut self, recorded: &RecordedEvent, event: Decoded) -> Result<(), ApplyError> {
        let (at, position) = (recorded.created_at, recorded.global_position as i64);
        let (user_id, kind, detail) = match event {
            Decoded::User(UserEvent::Registered(e)) => {
                if self.users.contains_key(&e.user_id) {
                    return Err(inconsistent(format!("user {} was registered before", e.user_id)));
                }
                let email = e.email.into_inner();
                let user = UserRow {
                    stored: false,
                    email: email.clone(),
                    display_name: e.display_name,
                    registered_at: at,
                    logins: 0,
                    actions: 0,
                    last_seen_at: at,
                    last_position: position,
                };
                self.users.insert(e.user_id.clone(), user);
                self.touched.insert(e.user_id.clone());
                (e.user_id, "registered", email)
            }
            Decoded::User(UserEvent::LoggedIn(e)) => {
                self.seen(&e.user_id, true, at, position)?;
                (e.user_id, "logged_in", e.source)
            }
            Decoded::User(UserEvent::ActionRecorded(e)) => {
                self.seen(&e.user_id, false, at, position)?;
                let detail = if e.subject.is_empty() { e.action } else { format!("{} {}", e.action, e.subject) };
                (e.user_id, "action", detail)
            }
            Decoded::Order(OrderEvent::Created(e)) => {
                if self.order_users.contains_key(&e.order_id) {
                    return Err(inconsistent(format!("order {} was created before", e.order_id)));
                }
                self.order_users.insert(e.order_id.clone(), e.customer_id.clone());
                self.new_orders.push((e.order_id.clone(), e.customer_id.clone()));
                (e.customer_id, "order_created", e.order_id)
            }
            Decoded::Order(e) => {
                let (order_id, kind, reason) = match e {
                    OrderEvent::Created(_) => unreachable!("handled above"),
                    OrderEvent::Confirmed(e) => (e.order_id, "order_confirmed", None),
                    OrderEvent::PaymentProcessed(e) => (e.order_id, "order_paid", None),
                    OrderEvent::Shipped(e) => (e.order_id, "order_shipped", None),
                    OrderEvent::Cancelled(e) => (e.order_id, "order_cancelled", Some(e.reason)),
                };
                let user_id = self
                    .order_users
                    .get(&order_id)
                    .cloned()
                    .ok_or_else(|| inconsistent(format!("order {order_id} is not in the user orders")))?;
                let detail = match reason {
                    Some(reason) => format!("{order_id}: {reason}"),
                    None => order_id,
                };
                (user_id, kind, detail)
            }
        };
        self.activity.push((user_id, position, kind, detail, at));
        Ok(())
    }

    /// One more login (or action) of a registered user.
    fn seen(&mut self, user_id: &str, login: bool, at: SystemTime, position: i64) -> Result<(), ApplyError> {
        let user =
            self.users.get_mut(user_id).ok_or_else(|| inconsistent(format!("user {user_id} is not in users")))?;
        let counter = if login { &mut user.logins } else { &mut user.actions };
        *counter =
            counter.checked_add(1).ok_or_else(|| inconsistent(format!("user {user_id}: counter out of range")))?;
        user.last_seen_at = at;
        user.last_position = position;
        self.touched.insert(user_id.to_owned());
        Ok(())
    }

    /// One `INSERT` of the registered users, one `UPDATE` of the stored
    /// ones, one `INSERT` of the new orders and one of the timeline rows
    /// (each must be new).
    async fn write(self, tx: &Transaction<'_>, v: u32) -> Result<(), ApplyError> {
        const COLUMNS: &str =
            "user_id, email, display_name, registered_at, logins, actions, last_seen_at, last_position";
        const UNNEST: &str = "unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::int8[], $6::int8[], \
                              $7::timestamptz[], $8::int8[])";
        for update in [false, true] {
            let rows: Vec<(&String, &UserRow)> = self
                .touched
                .iter()
                .filter_map(|id| self.users.get(id).map(|u| (id, u)))
                .filter(|(_, u)| u.stored == update)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let sql = if update {
                format!(
                    "UPDATE read.users_v{v} t SET logins = u.logins, actions = u.actions, \
                            last_seen_at = u.last_seen_at, last_position = u.last_position \
                       FROM {UNNEST} AS u({COLUMNS}) WHERE t.user_id = u.user_id"
                )
            } else {
                format!("INSERT INTO read.users_v{v} ({COLUMNS}) SELECT * FROM {UNNEST}")
            };
            let changed = tx
                .execute(
                    &sql,
                    &[
                        &rows.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
                        &rows.iter().map(|(_, u)| u.email.as_str()).collect::<Vec<_>>(),
                        &rows.iter().map(|(_, u)| u.display_name.as_str()).collect::<Vec<_>>(),
                        &rows.iter().map(|(_, u)| u.registered_at).collect::<Vec<_>>(),
                        &rows.iter().map(|(_, u)| u.logins).collect::<Vec<_>>(),
                        &rows.iter().map(|(_, u)| u.actions).collect::<Vec<_>>(),
                        &rows.iter().map(|(_, u)| u.last_seen_at).collect::<Vec<_>>(),
                        &rows.iter().map(|(_, u)| u.last_position).collect::<Vec<_>>(),
                    ],
                )
                .await?;
            if changed != rows.len() as u64 {
                return Err(inconsistent(format!("{changed} of {} users written", rows.len())));
            }
        }
        if !self.new_orders.is_empty() {
            let (orders, users): (Vec<&str>, Vec<&str>) =
                self.new_orders.iter().map(|(o, u)| (o.as_str(), u.as_str())).unzip();
            let inserted = tx
                .execute(
                    &format!(
                        "INSERT INTO read.user_orders_v{v} (order_id, user_id) \
                         SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING"
                    ),
                    &[&orders, &users],
                )
                .await?;
            if inserted != orders.len() as u64 {
                return Err(inconsistent("an order of the batch was created before"));
            }
        }
        if self.activity.is_empty() {
            return Ok(());
        }
        let a = &self.activity;
        let inserted = tx
            .execute(
                &format!(
                    "INSERT INTO read.user_activity_v{v} (user_id, global_position, kind, detail, occurred_at) \
                     SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::timestamptz[]) \
                     ON CONFLICT (user_id, global_position) DO NOTHING"
                ),
                &[
                    &a.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
                    &a.iter().map(|r| r.1).collect::<Vec<_>>(),
                    &a.iter().map(|r| r.2).collect::<Vec<_>>(),
                    &a.iter().map(|r| r.3.as_str()).collect::<Vec<_>>(),
                    &a.iter().map(|r| r.4).collect::<Vec<_>>(),
                ],
            )
            .await?;
        if inserted == a.len() as u64 {
            Ok(())
        } else {
            Err(inconsistent(format!("{} timeline rows are stored already", (a.len() as u64).saturating_sub(inserted))))
        }
    }
}
