//! InventoryQueryService, AccountQueryService and UserQueryService.

use std::sync::Arc;

use eventfold_proto::query::{
    AccountStatus, AccountTransaction, AccountView, Activity, GetAccountRequest, GetAccountResponse,
    GetInventoryRequest, GetInventoryResponse, GetUserActivityRequest, GetUserActivityResponse, InventoryView,
    ListAccountTransactionsRequest, ListAccountTransactionsResponse, ListLowStockRequest, ListLowStockResponse,
    Reservation, TransactionKind, UserProfile, account_query_service_server::AccountQueryService,
    inventory_query_service_server::InventoryQueryService, user_query_service_server::UserQueryService,
};
use tokio_postgres::Row;
use tonic::{Request, Response, Status};

use eventfold_store::{bigint, from_bigint};

use crate::{Kind, Query, cached, cursor, db_status, has_more, money, not_found, page, page_len, require_id};

const INVENTORY: &str = "inventory_views";
const ACCOUNTS: &str = "account_views";
const USERS: &str = "user_activity";

const INVENTORY_COLUMNS: &str = "product_id, name, available, reserved, shipped, low_stock, low_stock_threshold, \
                                 updated_at, stream_version, last_position";

fn inventory(row: &Row) -> InventoryView {
    InventoryView {
        product_id: row.get(0),
        name: row.get(1),
        available: row.get(2),
        reserved: row.get(3),
        shipped: row.get(4),
        low_stock: row.get(5),
        low_stock_threshold: row.get(6),
        reservations: Vec::new(),
        update_time: Some(row.get::<_, std::time::SystemTime>(7).into()),
        stream_version: from_bigint(row.get(8)),
        last_position: from_bigint(row.get(9)),
    }
}

#[derive(Debug, Clone)]
pub(crate) struct InventoryQueries {
    query: Arc<Query>,
}

impl InventoryQueries {
    pub(crate) fn new(query: Arc<Query>) -> Self {
        Self { query }
    }
}

#[tonic::async_trait]
impl InventoryQueryService for InventoryQueries {
    async fn get_inventory(
        &self,
        request: Request<GetInventoryRequest>,
    ) -> Result<Response<GetInventoryResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        require_id("product_id", &r.product_id)?;
        let query = &self.query;
        let load = || async {
            let mut conn = query.conn().await?;
            // One snapshot for the product and its reservations.
            let tx = conn.build_transaction().read_only(true).start().await.map_err(db_status)?;
            let Some(row) = tx
                .query_opt(
                    &format!("SELECT {INVENTORY_COLUMNS} FROM read.inventory_views WHERE product_id = $1"),
                    &[&r.product_id],
                )
                .await
                .map_err(db_status)?
            else {
                return Ok(None);
            };
            let mut view = inventory(&row);
            view.reservations = tx
                .query(
                    "SELECT order_id, quantity, reserved_at FROM read.inventory_reservations \
                      WHERE product_id = $1 ORDER BY order_id",
                    &[&r.product_id],
                )
                .await
                .map_err(db_status)?
                .iter()
                .map(|row| Reservation {
                    order_id: row.get(0),
                    quantity: row.get(1),
                    reserve_time: Some(row.get::<_, std::time::SystemTime>(2).into()),
                })
                .collect();
            tx.commit().await.map_err(db_status)?;
            Ok(Some(view))
        };
        let view = cached(query, Kind::Inventory, &r.product_id, r.min_position, &metadata, |v| v.last_position, load)
            .await?
            .ok_or_else(|| not_found("product", "PRODUCT_NOT_FOUND", &r.product_id))?;
        Ok(Response::new(GetInventoryResponse { inventory: Some(view) }))
    }

    async fn list_low_stock(
        &self,
        request: Request<ListLowStockRequest>,
    ) -> Result<Response<ListLowStockResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        let size = page::size(r.page_size)?;
        let after: Option<String> = cursor("low_stock", &r.page_token)?;
        self.query.ready(INVENTORY, r.min_position, &metadata).await?;
        let conn = self.query.conn().await?;
        let after = after.unwrap_or_default();
        let rows = conn
            .query(
                &format!(
                    "SELECT {INVENTORY_COLUMNS} FROM read.inventory_views \
                      WHERE low_stock AND product_id > $1 ORDER BY product_id LIMIT $2"
                ),
                &[&after, &size.saturating_add(1)],
            )
            .await
            .map_err(db_status)?;
        let mut products: Vec<InventoryView> = rows.iter().map(inventory).collect();
        let more = has_more(products.len(), size);
        products.truncate(page_len(size));
        let next_page_token = match products.last() {
            Some(last) if more => page::token("low_stock", &last.product_id),
            _ => String::new(),
        };
        Ok(Response::new(ListLowStockResponse { products, next_page_token }))
    }
}

#[derive(Debug, Clone)]
pub(crate) struct AccountQueries {
    query: Arc<Query>,
}

impl AccountQueries {
    pub(crate) fn new(query: Arc<Query>) -> Self {
        Self { query }
    }
}

fn transaction_kind(kind: &str) -> TransactionKind {
    match kind {
        "deposit" => TransactionKind::Deposit,
        "withdrawal" => TransactionKind::Withdrawal,
        "transfer_sent" => TransactionKind::TransferSent,
        "transfer_received" => TransactionKind::TransferReceived,
        "transfer_refunded" => TransactionKind::TransferRefunded,
        _ => TransactionKind::Unspecified,
    }
}

#[tonic::async_trait]
impl AccountQueryService for AccountQueries {
    async fn get_account(&self, request: Request<GetAccountRequest>) -> Result<Response<GetAccountResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        require_id("account_id", &r.account_id)?;
        let query = &self.query;
        let load = || async {
            let conn = query.conn().await?;
            let row = conn
                .query_opt(
                    "SELECT account_id, owner_id, currency, balance_minor, status, opened_at, updated_at, \
                            stream_version, last_position FROM read.accounts WHERE account_id = $1",
                    &[&r.account_id],
                )
                .await
                .map_err(db_status)?;
            Ok(row.map(|row| {
                let currency: String = row.get(2);
                AccountView {
                    account_id: row.get(0),
                    owner_id: row.get(1),
                    balance: money(row.get(3), &currency),
                    status: match row.get::<_, &str>(4) {
                        "open" => AccountStatus::Open,
                        "closed" => AccountStatus::Closed,
                        _ => AccountStatus::Unspecified,
                    } as i32,
                    open_time: Some(row.get::<_, std::time::SystemTime>(5).into()),
                    update_time: Some(row.get::<_, std::time::SystemTime>(6).into()),
                    stream_version: from_bigint(row.get(7)),
                    last_position: from_bigint(row.get(8)),
                }
            }))
        };
        let account = cached(query, Kind::Account, &r.account_id, r.min_position, &metadata, |v| v.last_position, load)
            .await?
            .ok_or_else(|| not_found("account", "ACCOUNT_NOT_FOUND", &r.account_id))?;
        Ok(Response::new(GetAccountResponse { account: Some(account) }))
    }

    async fn list_account_transactions(
        &self,
        request: Request<ListAccountTransactionsRequest>,
    ) -> Result<Response<ListAccountTransactionsResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        require_id("account_id", &r.account_id)?;
        let size = page::size(r.page_size)?;
        let filters = format!("transactions|{}", r.account_id);
        let before: Option<i64> = cursor(&filters, &r.page_token)?;
        self.query.ready(ACCOUNTS, r.min_position, &metadata).await?;
        let conn = self.query.conn().await?;
        let currency: Option<String> = conn
            .query_opt("SELECT currency FROM read.accounts WHERE account_id = $1", &[&r.account_id])
            .await
            .map_err(db_status)?
            .map(|row| row.get(0));
        let Some(currency) = currency else { return Err(not_found("account", "ACCOUNT_NOT_FOUND", &r.account_id)) };
        let rows = conn
            .query(
                "SELECT stream_version, kind, transaction_id, counterparty_account_id, amount_minor, balance_minor, \
                        reason, occurred_at, global_position FROM read.account_transactions \
                  WHERE account_id = $1 AND stream_version < $2 ORDER BY stream_version DESC LIMIT $3",
                &[&r.account_id, &before.unwrap_or(i64::MAX), &size.saturating_add(1)],
            )
            .await
            .map_err(db_status)?;
        let mut transactions: Vec<AccountTransaction> = rows
            .iter()
            .map(|row| AccountTransaction {
                stream_version: from_bigint(row.get(0)),
                kind: transaction_kind(row.get(1)) as i32,
                transaction_id: row.get(2),
                counterparty_account_id: row.get::<_, Option<String>>(3).unwrap_or_default(),
                amount: money(row.get(4), &currency),
                balance: money(row.get(5), &currency),
                reason: row.get::<_, Option<String>>(6).unwrap_or_default(),
                time: Some(row.get::<_, std::time::SystemTime>(7).into()),
                global_position: from_bigint(row.get(8)),
            })
            .collect();
        let more = has_more(transactions.len(), size);
        transactions.truncate(page_len(size));
        let next_page_token = match transactions.last() {
            Some(last) if more => page::token(&filters, &bigint(last.stream_version)),
            _ => String::new(),
        };
        Ok(Response::new(ListAccountTransactionsResponse { transactions, next_page_token }))
    }
}

#[derive(Debug, Clone)]
pub(crate) struct UserQueries {
    query: Arc<Query>,
}

impl UserQueries {
    pub(crate) fn new(query: Arc<Query>) -> Self {
        Self { query }
    }
}

#[tonic::async_trait]
impl UserQueryService for UserQueries {
    async fn get_user_activity(
        &self,
        request: Request<GetUserActivityRequest>,
    ) -> Result<Response<GetUserActivityResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        require_id("user_id", &r.user_id)?;
        let size = page::size(r.page_size)?;
        let filters = format!("activity|{}", r.user_id);
        let before: Option<i64> = cursor(&filters, &r.page_token)?;
        self.query.ready(USERS, r.min_position, &metadata).await?;
        let mut conn = self.query.conn().await?;
        let tx = conn.build_transaction().read_only(true).start().await.map_err(db_status)?;
        let user = tx
            .query_opt(
                "SELECT user_id, email, display_name, registered_at, logins, actions, last_seen_at \
                   FROM read.users WHERE user_id = $1",
                &[&r.user_id],
            )
            .await
            .map_err(db_status)?
            .map(|row| UserProfile {
                user_id: row.get(0),
                email: row.get(1),
                display_name: row.get(2),
                register_time: Some(row.get::<_, std::time::SystemTime>(3).into()),
                logins: row.get(4),
                actions: row.get(5),
                last_seen_time: Some(row.get::<_, std::time::SystemTime>(6).into()),
            });
        let rows = tx
            .query(
                "SELECT global_position, kind, detail, occurred_at FROM read.user_activity \
                  WHERE user_id = $1 AND global_position < $2 ORDER BY global_position DESC LIMIT $3",
                &[&r.user_id, &before.unwrap_or(i64::MAX), &size.saturating_add(1)],
            )
            .await
            .map_err(db_status)?;
        tx.commit().await.map_err(db_status)?;
        let mut activities: Vec<Activity> = rows
            .iter()
            .map(|row| Activity {
                global_position: from_bigint(row.get(0)),
                kind: row.get(1),
                detail: row.get(2),
                time: Some(row.get::<_, std::time::SystemTime>(3).into()),
            })
            .collect();
        if user.is_none() && activities.is_empty() && before.is_none() {
            return Err(not_found("user", "USER_NOT_FOUND", &r.user_id));
        }
        let more = has_more(activities.len(), size);
        activities.truncate(page_len(size));
        let next_page_token = match activities.last() {
            Some(last) if more => page::token(&filters, &bigint(last.global_position)),
            _ => String::new(),
        };
        Ok(Response::new(GetUserActivityResponse { user, activities, next_page_token }))
    }
}
