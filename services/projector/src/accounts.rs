//! `account_views`: per account its owner, balance and status, and its
//! history of money movements with the balance after each.
//!
//! Balances are the `balance` fields of the events; each movement is also
//! checked against the balance before it (before ± amount = after), so a
//! missed or doubled event shows as an error, not as a wrong balance.
//! `amount_minor` is the (positive) amount of the event; `kind` says in
//! which direction it moved.

use std::{
    collections::{BTreeSet, HashMap},
    time::SystemTime,
};

use async_trait::async_trait;
use eventfold_domain::{
    DomainEvent, Money,
    account::{AccountEvent, TransferRefunded},
};
use eventfold_store::{EventFilter, RecordedEvent};
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

    fn event_filter(&self) -> EventFilter {
        crate::reads_of::<AccountEvent>("account-")
    }

    /// The batch folded in memory per account, from the rows it touches
    /// (read once), then one statement per table and kind of change.
    async fn apply_batch(&self, tx: &Transaction<'_>, v: u32, events: &[RecordedEvent]) -> Result<bool, ApplyError> {
        let mut decoded = Vec::new();
        for event in events.iter().filter(|e| is_account_event(e)) {
            let e = AccountEvent::from_data_ref(&event.event_type, event.schema_version, &event.data)
                .map_err(|e| ApplyError::Event(e.to_string()))?;
            decoded.push((event, e));
        }
        if decoded.is_empty() {
            return Ok(true);
        }
        let mut fold = AccountFold::load(tx, v, &decoded).await?;
        for (event, e) in decoded {
            fold.apply(event, e)?;
        }
        fold.write(tx, v).await?;
        Ok(true)
    }

    async fn apply(&self, tx: &Transaction<'_>, v: u32, event: &RecordedEvent) -> Result<(), ApplyError> {
        if !is_account_event(event) {
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

fn is_account_event(event: &RecordedEvent) -> bool {
    event.stream_id.starts_with("account-") && AccountEvent::current_version(&event.event_type).is_some()
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

impl<'a> Movement<'a> {
    /// The movement of a deposit, a withdrawal, or a transfer sent or
    /// received; `None` for the other events (a refund needs the transfer
    /// it undoes: [`Movement::refund`]).
    fn of(event: &'a AccountEvent) -> Option<Self> {
        Some(match event {
            AccountEvent::Deposited(e) => Self {
                account_id: &e.account_id,
                kind: "deposit",
                transaction_id: &e.transaction_id,
                counterparty: None,
                amount: e.amount,
                balance: e.balance,
                reason: None,
                credit: true,
            },
            AccountEvent::Withdrawn(e) => Self {
                account_id: &e.account_id,
                kind: "withdrawal",
                transaction_id: &e.transaction_id,
                counterparty: None,
                amount: e.amount,
                balance: e.balance,
                reason: None,
                credit: false,
            },
            AccountEvent::TransferSent(e) => Self {
                account_id: &e.account_id,
                kind: "transfer_sent",
                transaction_id: &e.transfer_id,
                counterparty: Some(e.to_account_id.clone()),
                amount: e.amount,
                balance: e.balance,
                reason: None,
                credit: false,
            },
            AccountEvent::TransferReceived(e) => Self {
                account_id: &e.account_id,
                kind: "transfer_received",
                transaction_id: &e.transfer_id,
                counterparty: Some(e.from_account_id.clone()),
                amount: e.amount,
                balance: e.balance,
                reason: None,
                credit: true,
            },
            _ => return None,
        })
    }

    /// The refund `e` of the transfer that sent `sent_minor` to
    /// `counterparty`: it goes back to where the transfer was sent from, and
    /// must give back what was sent.
    fn refund(e: &'a TransferRefunded, counterparty: Option<String>, sent_minor: i64) -> Result<Self, ApplyError> {
        if sent_minor != e.amount.minor {
            return Err(inconsistent(format!(
                "refund of {} for transfer {} of {sent_minor}",
                e.amount.minor, e.transfer_id
            )));
        }
        Ok(Self {
            account_id: &e.account_id,
            kind: "transfer_refunded",
            transaction_id: &e.transfer_id,
            counterparty,
            amount: e.amount,
            balance: e.balance,
            reason: Some(&e.reason),
            credit: true,
        })
    }

    /// The balance before the movement: amount and balance in one currency,
    /// the difference in range.
    fn balance_before(&self) -> Result<i64, ApplyError> {
        if self.amount.currency != self.balance.currency {
            return Err(inconsistent(format!(
                "amount in {}, balance in {}",
                self.amount.currency, self.balance.currency
            )));
        }
        if self.credit {
            self.balance.minor.checked_sub(self.amount.minor)
        } else {
            self.balance.minor.checked_add(self.amount.minor)
        }
        .ok_or_else(|| inconsistent("the balance before the movement is out of range"))
    }
}

async fn apply_account_event(
    tx: &Transaction<'_>,
    v: u32,
    event: AccountEvent,
    recorded: &RecordedEvent,
) -> Result<(), ApplyError> {
    let accounts = format!("read.accounts_v{v}");
    let (at, version, position) = (recorded.created_at, recorded.version as i64, recorded.global_position as i64);
    let m = match &event {
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
            Movement::refund(e, sent.get(0), sent.get(1))?
        }
        other => Movement::of(other).ok_or_else(|| inconsistent("the event moves no money"))?,
    };
    let before = m.balance_before()?;
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

/// One account row, as folded in memory.
#[derive(Debug)]
struct AccountRow {
    /// Read from the table (updated) rather than opened in this batch
    /// (inserted).
    stored: bool,
    owner_id: String,
    currency: String,
    balance_minor: i64,
    status: &'static str,
    opened_at: SystemTime,
    updated_at: SystemTime,
    stream_version: i64,
    last_position: i64,
}

/// One new row of `account_transactions`.
#[derive(Debug)]
struct TransactionRow {
    account_id: String,
    stream_version: i64,
    kind: &'static str,
    transaction_id: String,
    counterparty: Option<String>,
    amount_minor: i64,
    balance_minor: i64,
    reason: Option<String>,
    occurred_at: SystemTime,
    global_position: i64,
}

/// [`AccountViews`]' batch: the accounts it touches, the transfers its
/// refunds look up, and the movements it adds.
#[derive(Debug, Default)]
struct AccountFold {
    accounts: HashMap<String, AccountRow>,
    touched: BTreeSet<String>,
    /// (account, transfer) → (counterparty, amount) of `transfer_sent`
    /// movements: stored ones a refund of the batch needs, and the batch's.
    sent: HashMap<(String, String), (Option<String>, i64)>,
    movements: Vec<TransactionRow>,
}

impl AccountFold {
    async fn load(
        tx: &Transaction<'_>,
        v: u32,
        decoded: &[(&RecordedEvent, AccountEvent)],
    ) -> Result<Self, ApplyError> {
        let mut ids: Vec<&str> = Vec::new();
        let (mut refund_accounts, mut refund_transfers): (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
        for (_, e) in decoded {
            ids.push(account_of(e));
            if let AccountEvent::TransferRefunded(r) = e {
                refund_accounts.push(&r.account_id);
                refund_transfers.push(&r.transfer_id);
            }
        }
        ids.sort_unstable();
        ids.dedup();
        let mut fold = Self::default();
        let rows = tx
            .query(
                &format!(
                    "SELECT account_id, owner_id, currency, balance_minor, status, opened_at, updated_at, \
                            stream_version, last_position \
                       FROM read.accounts_v{v} WHERE account_id = ANY($1)"
                ),
                &[&ids],
            )
            .await?;
        for r in rows {
            let status = if r.get::<_, &str>(4) == "open" { "open" } else { "closed" };
            let account = AccountRow {
                stored: true,
                owner_id: r.get(1),
                currency: r.get(2),
                balance_minor: r.get(3),
                status,
                opened_at: r.get(5),
                updated_at: r.get(6),
                stream_version: r.get(7),
                last_position: r.get(8),
            };
            fold.accounts.insert(r.get(0), account);
        }
        if !refund_accounts.is_empty() {
            let rows = tx
                .query(
                    &format!(
                        "SELECT t.account_id, t.transaction_id, t.counterparty_account_id, t.amount_minor \
                           FROM read.account_transactions_v{v} t \
                           JOIN unnest($1::text[], $2::text[]) AS k(account_id, transaction_id) \
                             ON t.account_id = k.account_id AND t.transaction_id = k.transaction_id \
                          WHERE t.kind = 'transfer_sent'"
                    ),
                    &[&refund_accounts, &refund_transfers],
                )
                .await?;
            for r in rows {
                if fold.sent.insert((r.get(0), r.get(1)), (r.get(2), r.get(3))).is_some() {
                    // The event-by-event path refuses this too (one row expected).
                    return Err(inconsistent("a transfer was sent twice"));
                }
            }
        }
        Ok(fold)
    }

    /// One event, with the checks of [`apply_account_event`].
    fn apply(&mut self, recorded: &RecordedEvent, event: AccountEvent) -> Result<(), ApplyError> {
        let (at, version, position) = (recorded.created_at, recorded.version as i64, recorded.global_position as i64);
        let m = match &event {
            AccountEvent::Opened(e) => {
                if self.accounts.contains_key(&e.account_id) {
                    return Err(inconsistent(format!("account {} was opened before", e.account_id)));
                }
                let account = AccountRow {
                    stored: false,
                    owner_id: e.owner_id.clone(),
                    currency: e.currency.as_str().to_owned(),
                    balance_minor: 0,
                    status: "open",
                    opened_at: at,
                    updated_at: at,
                    stream_version: version,
                    last_position: position,
                };
                self.accounts.insert(e.account_id.clone(), account);
                self.touched.insert(e.account_id.clone());
                return Ok(());
            }
            AccountEvent::Closed(e) => {
                let account =
                    self.accounts.get_mut(&e.account_id).filter(|a| a.status == "open" && a.balance_minor == 0);
                let account = account.ok_or_else(|| {
                    inconsistent(format!("account {} is not an open account with balance 0", e.account_id))
                })?;
                account.status = "closed";
                account.updated_at = at;
                account.stream_version = version;
                account.last_position = position;
                self.touched.insert(e.account_id.clone());
                return Ok(());
            }
            AccountEvent::TransferRequested(e) => {
                if let Some(account) = self.accounts.get_mut(&e.account_id) {
                    account.updated_at = at;
                    account.stream_version = version;
                    account.last_position = position;
                    self.touched.insert(e.account_id.clone());
                }
                return Ok(());
            }
            AccountEvent::TransferRefunded(e) => {
                let (counterparty, sent_minor) =
                    self.sent.get(&(e.account_id.clone(), e.transfer_id.clone())).cloned().ok_or_else(|| {
                        inconsistent(format!("account {} sent no transfer {} to refund", e.account_id, e.transfer_id))
                    })?;
                Movement::refund(e, counterparty, sent_minor)?
            }
            other => Movement::of(other).ok_or_else(|| inconsistent("the event moves no money"))?,
        };
        let before = m.balance_before()?;
        let account = self
            .accounts
            .get_mut(m.account_id)
            .filter(|a| a.status == "open" && a.currency == m.balance.currency.as_str() && a.balance_minor == before)
            .ok_or_else(|| {
                inconsistent(format!(
                    "expected account {} open in {} with balance {before} before the {} of {}",
                    m.account_id, m.balance.currency, m.kind, m.amount.minor
                ))
            })?;
        account.balance_minor = m.balance.minor;
        account.updated_at = at;
        account.stream_version = version;
        account.last_position = position;
        self.touched.insert(m.account_id.to_owned());
        if m.kind == "transfer_sent" {
            let key = (m.account_id.to_owned(), m.transaction_id.to_owned());
            if self.sent.insert(key, (m.counterparty.clone(), m.amount.minor)).is_some() {
                return Err(inconsistent(format!("transfer {} was sent twice", m.transaction_id)));
            }
        }
        self.movements.push(TransactionRow {
            account_id: m.account_id.to_owned(),
            stream_version: version,
            kind: m.kind,
            transaction_id: m.transaction_id.to_owned(),
            counterparty: m.counterparty,
            amount_minor: m.amount.minor,
            balance_minor: m.balance.minor,
            reason: m.reason.map(str::to_owned),
            occurred_at: at,
            global_position: position,
        });
        Ok(())
    }

    /// One `INSERT` of the opened accounts, one `UPDATE` of the stored ones
    /// and one `INSERT` of the movements (each must be new).
    async fn write(self, tx: &Transaction<'_>, v: u32) -> Result<(), ApplyError> {
        const COLUMNS: &str = "account_id, owner_id, currency, balance_minor, status, opened_at, updated_at, \
                               stream_version, last_position";
        const UNNEST: &str = "unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], \
                              $6::timestamptz[], $7::timestamptz[], $8::int8[], $9::int8[])";
        let accounts = format!("read.accounts_v{v}");
        for update in [false, true] {
            let rows: Vec<(&String, &AccountRow)> = self
                .touched
                .iter()
                .filter_map(|id| self.accounts.get(id).map(|a| (id, a)))
                .filter(|(_, a)| a.stored == update)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let sql = if update {
                format!(
                    "UPDATE {accounts} t SET balance_minor = u.balance_minor, status = u.status, \
                            updated_at = u.updated_at, stream_version = u.stream_version, \
                            last_position = u.last_position \
                       FROM {UNNEST} AS u({COLUMNS}) WHERE t.account_id = u.account_id"
                )
            } else {
                format!("INSERT INTO {accounts} ({COLUMNS}) SELECT * FROM {UNNEST}")
            };
            let changed = tx
                .execute(
                    &sql,
                    &[
                        &rows.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
                        &rows.iter().map(|(_, a)| a.owner_id.as_str()).collect::<Vec<_>>(),
                        &rows.iter().map(|(_, a)| a.currency.as_str()).collect::<Vec<_>>(),
                        &rows.iter().map(|(_, a)| a.balance_minor).collect::<Vec<_>>(),
                        &rows.iter().map(|(_, a)| a.status).collect::<Vec<_>>(),
                        &rows.iter().map(|(_, a)| a.opened_at).collect::<Vec<_>>(),
                        &rows.iter().map(|(_, a)| a.updated_at).collect::<Vec<_>>(),
                        &rows.iter().map(|(_, a)| a.stream_version).collect::<Vec<_>>(),
                        &rows.iter().map(|(_, a)| a.last_position).collect::<Vec<_>>(),
                    ],
                )
                .await?;
            if changed != rows.len() as u64 {
                return Err(inconsistent(format!("{changed} of {} accounts written to {accounts}", rows.len())));
            }
        }
        if self.movements.is_empty() {
            return Ok(());
        }
        let m = &self.movements;
        let inserted = tx
            .execute(
                &format!(
                    "INSERT INTO read.account_transactions_v{v} (account_id, stream_version, kind, transaction_id, \
                                    counterparty_account_id, amount_minor, balance_minor, reason, occurred_at, \
                                    global_position) \
                     SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::int8[], \
                                          $7::int8[], $8::text[], $9::timestamptz[], $10::int8[]) \
                     ON CONFLICT (account_id, stream_version) DO NOTHING"
                ),
                &[
                    &m.iter().map(|t| t.account_id.as_str()).collect::<Vec<_>>(),
                    &m.iter().map(|t| t.stream_version).collect::<Vec<_>>(),
                    &m.iter().map(|t| t.kind).collect::<Vec<_>>(),
                    &m.iter().map(|t| t.transaction_id.as_str()).collect::<Vec<_>>(),
                    &m.iter().map(|t| t.counterparty.as_deref()).collect::<Vec<_>>(),
                    &m.iter().map(|t| t.amount_minor).collect::<Vec<_>>(),
                    &m.iter().map(|t| t.balance_minor).collect::<Vec<_>>(),
                    &m.iter().map(|t| t.reason.as_deref()).collect::<Vec<_>>(),
                    &m.iter().map(|t| t.occurred_at).collect::<Vec<_>>(),
                    &m.iter().map(|t| t.global_position).collect::<Vec<_>>(),
                ],
            )
            .await?;
        if inserted == m.len() as u64 {
            Ok(())
        } else {
            Err(inconsistent(format!("{} movements are stored already", (m.len() as u64).saturating_sub(inserted))))
        }
    }
}

/// The account an event is about.
fn account_of(event: &AccountEvent) -> &str {
    match event {
        AccountEvent::Opened(e) => &e.account_id,
        AccountEvent::Deposited(e) => &e.account_id,
        AccountEvent::Withdrawn(e) => &e.account_id,
        AccountEvent::TransferRequested(e) => &e.account_id,
        AccountEvent::TransferSent(e) => &e.account_id,
        AccountEvent::TransferReceived(e) => &e.account_id,
        AccountEvent::TransferRefunded(e) => &e.account_id,
        AccountEvent::Closed(e) => &e.account_id,
    }
}
