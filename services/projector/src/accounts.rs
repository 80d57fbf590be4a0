//! `account_views`: per account its owner, balance and status, and its
//! history of money movements with the balance after each.
//!
//! Balances are the `balance` fields of the events; each movement is also
//! checked against the balance before it (before ± amount = after), so a
//! missed or doubled event shows as an error, not as a wrong balance.
//! `amount_minor` is the (positive) amount of the event; `kind` says in
//! which direction it moved.

use async_trait::async_trait;
use eventfold_domain::{DomainEvent, Money, account::AccountEvent};
use eventfold_store::RecordedEvent;
use tokio_postgres::Transaction;

use crate::{ApplyError, Projection};

/// The account read model (`read.accounts`, `read.account_transactions`).
#[derive(Debug, Clone, Copy, Default)]
pub struct AccountViews;

fn inconsistent(message: impl Into<String>) -> ApplyError {
    ApplyError::Event(message.into())
}

#[async_trait]
impl Projection for AccountViews {
    fn name(&self) -> &'static str {
        "account_views"
    }

    fn create_sql(&self, v: u32) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS read.accounts_v{v} (
                account_id     text COLLATE \"C\" PRIMARY KEY,
                owner_id       text COLLATE \"C\" NOT NULL,
                currency       text NOT NULL,
                balance_minor  bigint NOT NULL,
                status         text NOT NULL CHECK (status IN ('open', 'closed')),
                opened_at      timestamptz NOT NULL,
                updated_at     timestamptz NOT NULL,
                stream_version bigint NOT NULL,
                last_position  bigint NOT NULL
            );
            CREATE INDEX IF NOT EXISTS accounts_v{v}_owner ON read.accounts_v{v} (owner_id);
            CREATE TABLE IF NOT EXISTS read.account_transactions_v{v} (
                account_id              text COLLATE \"C\" NOT NULL,
                stream_version          bigint NOT NULL,
                kind                    text NOT NULL CHECK (kind IN ('deposit', 'withdrawal', 'transfer_sent', \
                                                                       'transfer_received', 'transfer_refunded')),
                transaction_id          text COLLATE \"C\" NOT NULL,
                counterparty_account_id text COLLATE \"C\",
                amount_minor            bigint NOT NULL,
                balance_minor           bigint NOT NULL,
                reason                  text,
                occurred_at             timestamptz NOT NULL,
                global_position         bigint NOT NULL,
                PRIMARY KEY (account_id, stream_version)
            );"
        )
    }

    fn tables(&self, v: u32) -> Vec<String> {
        vec![format!("read.accounts_v{v}"), format!("read.account_transactions_v{v}")]
    }

    fn activate_sql(&self, v: u32) -> String {
        format!(
            "DROP VIEW IF EXISTS read.accounts;
             CREATE VIEW read.accounts AS SELECT * FROM read.accounts_v{v};
             DROP VIEW IF EXISTS read.account_transactions;
             CREATE VIEW read.account_transactions AS SELECT * FROM read.account_transactions_v{v};"
        )
    }

    async fn apply(&self, tx: &Transaction<'_>, v: u32, event: &RecordedEvent) -> Result<(), ApplyError> {
        if !event.stream_id.starts_with("account-") || AccountEvent::current_version(&event.event_type).is_none() {
            return Ok(());
        }
        let decoded = AccountEvent::from_data(&event.event_type, event.schema_version, event.data.clone())
            .map_err(|e| ApplyError::Event(e.to_string()))?;
        apply_account_event(tx, v, decoded, event).await.map_err(|e| match e {
            ApplyError::Event(message) => ApplyError::Event(format!(
                "{} at position {} ({}): {message}",
                event.event_type, event.global_position, event.stream_id
            )),
            other => other,
        })
    }
}

/// One row of `account_transactions`, and the account change it makes.
struct Movement<'a> {
    account_id: &'a str,
    kind: &'static str,
    transaction_id: &'a str,
    counterparty: Option<String>,
    amount: Money,
    balance: Money,
    reason: Option<&'a str>,
    /// Whether the amount adds to the balance (or takes from it).
    credit: bool,
}

async fn apply_account_event(
    tx: &Transaction<'_>,
    v: u32,
    event: AccountEvent,
    recorded: &RecordedEvent,
) -> Result<(), ApplyError> {
    let accounts = format!("read.accounts_v{v}");
    let (at, version, position) = (recorded.created_at, recorded.version as i64, recorded.global_position as i64);
    let movement = match &event {
        AccountEvent::Opened(e) => {
            let inserted = tx
                .execute(
                    &format!(
                        "INSERT INTO {accounts} (account_id, owner_id, currency, balance_minor, status, opened_at, \
                                                 updated_at, stream_version, last_position) \
                         VALUES ($1, $2, $3, 0, 'open', $4, $4, $5, $6) ON CONFLICT (account_id) DO NOTHING"
                    ),
                    &[&e.account_id, &e.owner_id, &e.currency.as_str(), &at, &version, &position],
                )
                .await?;
            return if inserted == 1 {
                Ok(())
            } else {
                Err(inconsistent(format!("account {} was opened before", e.account_id)))
            };
        }
        AccountEvent::Closed(e) => {
            let closed = tx
                .execute(
                    &format!(
                        "UPDATE {accounts} SET status = 'closed', updated_at = $2, stream_version = $3, \
                                               last_position = $4 \
                          WHERE account_id = $1 AND status = 'open' AND balance_minor = 0"
                    ),
                    &[&e.account_id, &at, &version, &position],
                )
                .await?;
            return if closed == 1 {
                Ok(())
            } else {
                Err(inconsistent(format!(
                    "account {} is not an open account with balance 0 in {accounts}: {}",
                    e.account_id,
                    describe(tx, &accounts, &e.account_id).await?
                )))
            };
        }
        AccountEvent::TransferRequested(e) => {
            // No money moves (the transfer saga moves it later): only the
            // row's version and position keep step with the stream.
            tx.execute(
                &format!(
                    "UPDATE {accounts} SET updated_at = $2, stream_version = $3, last_position = $4 \
                      WHERE account_id = $1"
                ),
                &[&e.account_id, &at, &version, &position],
            )
            .await?;
            return Ok(());
        }
        AccountEvent::Deposited(e) => Movement {
            account_id: &e.account_id,
            kind: "deposit",
            transaction_id: &e.transaction_id,
            counterparty: None,
            amount: e.amount,
            balance: e.balance,
            reason: None,
            credit: true,
        },
        AccountEvent::Withdrawn(e) => Movement {
            account_id: &e.account_id,
            kind: "withdrawal",
            transaction_id: &e.transaction_id,
            counterparty: None,
            amount: e.amount,
            balance: e.balance,
            reason: None,
            credit: false,
        },
        AccountEvent::TransferSent(e) => Movement {
            account_id: &e.account_id,
            kind: "transfer_sent",
            transaction_id: &e.transfer_id,
            counterparty: Some(e.to_account_id.clone()),
            amount: e.amount,
            balance: e.balance,
            reason: None,
            credit: false,
        },
        AccountEvent::TransferReceived(e) => Movement {
            account_id: &e.account_id,
            kind: "transfer_received",
            transaction_id: &e.transfer_id,
            counterparty: Some(e.from_account_id.clone()),
            amount: e.amount,
            balance: e.balance,
            reason: None,
            credit: true,
        },
        AccountEvent::TransferRefunded(e) => {
            // The refund goes back to where the transfer was sent from: its
            // counterparty is the account the transfer was sent to.
            let sent = tx
                .query_opt(
                    &format!(
                        "SELECT counterparty_account_id, amount_minor FROM read.account_transactions_v{v} \
                          WHERE account_id = $1 AND transaction_id = $2 AND kind = 'transfer_sent'"
                    ),
                    &[&e.account_id, &e.transfer_id],
                )
                .await?
                .ok_or_else(|| {
                    inconsistent(format!("account {} sent no transfer {} to refund", e.account_id, e.transfer_id))
                })?;
            if sent.get::<_, i64>(1) != e.amount.minor {
                return Err(inconsistent(format!(
                    "refund of {} for transfer {} of {}",
                    e.amount.minor,
                    e.transfer_id,
                    sent.get::<_, i64>(1)
                )));
            }
            Movement {
                account_id: &e.account_id,
                kind: "transfer_refunded",
                transaction_id: &e.transfer_id,
                counterparty: sent.get(0),
                amount: e.amount,
                balance: e.balance,
                reason: Some(&e.reason),
                credit: true,
            }
        }
    };
    let m = movement;
    if m.amount.currency != m.balance.currency {
        return Err(inconsistent(format!("amount in {}, balance in {}", m.amount.currency, m.balance.currency)));
    }
    let before = if m.credit {
        m.balance.minor.checked_sub(m.amount.minor)
    } else {
        m.balance.minor.checked_add(m.amount.minor)
    }
    .ok_or_else(|| inconsistent("the balance before the movement is out of range"))?;
    let changed = tx
        .execute(
            &format!(
                "UPDATE {accounts} SET balance_minor = $2, updated_at = $3, stream_version = $4, last_position = $5 \
                  WHERE account_id = $1 AND status = 'open' AND currency = $6 AND balance_minor = $7"
            ),
            &[&m.account_id, &m.balance.minor, &at, &version, &position, &m.balance.currency.as_str(), &before],
        )
        .await?;
    if changed != 1 {
        return Err(inconsistent(format!(
            "expected account {} open in {} with balance {before} before the {} of {}, found {}",
            m.account_id,
            m.balance.currency,
            m.kind,
            m.amount.minor,
            describe(tx, &accounts, m.account_id).await?
        )));
    }
    let inserted = tx
        .execute(
            &format!(
                "INSERT INTO read.account_transactions_v{v} (account_id, stream_version, kind, transaction_id, \
                                counterparty_account_id, amount_minor, balance_minor, reason, occurred_at, \
                                global_position) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (account_id, stream_version) DO NOTHING"
            ),
            &[
                &m.account_id,
                &version,
                &m.kind,
                &m.transaction_id,
                &m.counterparty,
                &m.amount.minor,
                &m.balance.minor,
                &m.reason,
                &at,
                &position,
            ],
        )
        .await?;
    if inserted == 1 {
        Ok(())
    } else {
        Err(inconsistent(format!("account {} has a movement at version {version} already", m.account_id)))
    }
}

/// The account as the table has it, for error messages.
async fn describe(tx: &Transaction<'_>, accounts: &str, account_id: &str) -> Result<String, ApplyError> {
    let row = tx
        .query_opt(
            &format!("SELECT status, currency, balance_minor FROM {accounts} WHERE account_id = $1"),
            &[&account_id],
        )
        .await?;
    Ok(match row {
        None => "no such account".to_owned(),
        Some(r) => {
            format!(
                "{} account in {} with balance {}",
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, i64>(2)
            )
        }
    })
}
