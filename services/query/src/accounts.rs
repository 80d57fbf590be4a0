//! The account read model: balances (`read.accounts`) and each account's
//! transactions.

use std::time::SystemTime;

use eventfold_store::from_bigint;

use crate::{Amount, Query, Result, column, one_page};

/// The projection of accounts and their transactions.
pub(crate) const ACCOUNTS: &str = "account_views";

/// An account and its balance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AccountRecord {
    pub(crate) account_id: String,
    pub(crate) owner_id: String,
    pub(crate) balance: Amount,
    /// `open` or `closed`.
    pub(crate) status: String,
    pub(crate) opened_at: SystemTime,
    pub(crate) updated_at: SystemTime,
    pub(crate) stream_version: u64,
    pub(crate) last_position: u64,
}

/// One movement of an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TransactionRecord {
    pub(crate) stream_version: u64,
    /// `deposit`, `withdrawal`, `transfer_sent`, `transfer_received` or
    /// `transfer_refunded`.
    pub(crate) kind: String,
    pub(crate) transaction_id: String,
    pub(crate) counterparty_account_id: Option<String>,
    pub(crate) amount: Amount,
    pub(crate) balance: Amount,
    pub(crate) reason: Option<String>,
    pub(crate) occurred_at: SystemTime,
    pub(crate) global_position: u64,
}

impl Query {
    /// The account `account_id`.
    pub(crate) async fn account(&self, account_id: &str) -> Result<Option<AccountRecord>> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "SELECT account_id, owner_id, currency, balance_minor, status, opened_at, updated_at, \
                        stream_version, last_position FROM read.accounts WHERE account_id = $1",
                &[&account_id],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(AccountRecord {
            account_id: column(&row, 0)?,
            owner_id: column(&row, 1)?,
            balance: Amount { minor: column(&row, 3)?, currency: column(&row, 2)? },
            status: column(&row, 4)?,
            opened_at: column(&row, 5)?,
            updated_at: column(&row, 6)?,
            stream_version: from_bigint(column(&row, 7)?),
            last_position: from_bigint(column(&row, 8)?),
        }))
    }

    /// One page of at most `size` transactions of `account_id`, newest
    /// first, before stream version `before`; and whether more follow.
    /// None when the account does not exist.
    pub(crate) async fn transactions(
        &self,
        account_id: &str,
        size: i64,
        before: Option<i64>,
    ) -> Result<Option<(Vec<TransactionRecord>, bool)>> {
        let conn = self.conn().await?;
        let currency =
            conn.query_opt("SELECT currency FROM read.accounts WHERE account_id = $1", &[&account_id]).await?;
        let Some(currency) = currency else { return Ok(None) };
        let currency: String = column(&currency, 0)?;
        let rows = conn
            .query(
                "SELECT stream_version, kind, transaction_id, counterparty_account_id, amount_minor, balance_minor, \
                        reason, occurred_at, global_position FROM read.account_transactions \
                  WHERE account_id = $1 AND stream_version < $2 ORDER BY stream_version DESC LIMIT $3",
                &[&account_id, &before.unwrap_or(i64::MAX), &size.saturating_add(1)],
            )
            .await?;
        let transactions = rows
            .iter()
            .map(|row| {
                Ok(TransactionRecord {
                    stream_version: from_bigint(column(row, 0)?),
                    kind: column(row, 1)?,
                    transaction_id: column(row, 2)?,
                    counterparty_account_id: column(row, 3)?,
                    amount: Amount { minor: column(row, 4)?, currency: currency.clone() },
                    balance: Amount { minor: column(row, 5)?, currency: currency.clone() },
                    reason: column(row, 6)?,
                    occurred_at: column(row, 7)?,
                    global_position: from_bigint(column(row, 8)?),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(one_page(transactions, size)))
    }
}
