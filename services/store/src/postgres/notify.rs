//! Wake-ups across processes: the notifier sends `NOTIFY
//! eventstore_appended` after this process's commits, the listener turns
//! other processes' notifications into wake-ups of local subscriptions.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, Client, Statement};

#[cfg(doc)]
use super::writer::append_in;
use super::{tables::Tables, writer::connect_prepared};
use crate::{
    backoff::Backoff,
    error::Result,
    pg::{Database, db_error},
};

/// Tells other processes about this process's appends: one NOTIFY per
/// change of the committed head, at most one per `interval`.
pub(super) async fn notifier(
    database: Database,
    tables: Tables,
    interval: Duration,
    mut committed: watch::Receiver<u64>,
) {
    let mut connection: Option<(Client, Statement)> = None;
    while committed.changed().await.is_ok() {
        // Commits that land meanwhile share the next notification: at most
        // one NOTIFY (itself a transaction) per interval, whatever the rate.
        tokio::time::sleep(interval).await;
        let head = committed.borrow_and_update().to_string();
        if connection.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            let sql = tables.sql("SELECT pg_notify('eventstore_appended', $1)");
            connection = match connect_prepared(&database, &sql).await {
                // A NOTIFY transaction needs a commit record. Waiting for
                // its flush would cost the writers a WAL flush each time;
                // a wake-up hint lost in a crash costs a poll interval.
                Ok((client, statement)) => match client.batch_execute("SET synchronous_commit = off").await {
                    Ok(()) => Some((client, statement)),
                    Err(e) => {
                        tracing::debug!(error = %e, "notifier could not set up its connection");
                        continue;
                    }
                },
                Err(e) => {
                    tracing::debug!(error = %e, "notifier could not connect; other processes poll");
                    continue;
                }
            };
        }
        let Some((client, statement)) = connection.as_ref() else { continue };
        if let Err(e) = client.execute(statement, &[&head]).await {
            tracing::debug!(error = %e, "NOTIFY failed; other processes poll");
            connection = None;
        }
    }
}

/// Wakes the live readers of every process after a commit that appended
/// up to `position` through [`append_in`].
pub async fn notify_appended(client: &impl tokio_postgres::GenericClient, position: u64) -> Result<()> {
    client
        .execute("SELECT pg_notify('eventstore_appended', $1)", &[&position.to_string()])
        .await
        .map(drop)
        .map_err(db_error)
}

/// Keeps `LISTEN eventstore_appended` open and turns notifications (appends
/// of any process) into wake-ups; reconnects with the common backoff.
pub(super) async fn listener(database: Database, tables: Tables, appended: watch::Sender<u64>) {
    let mut retries = Backoff::new(Duration::from_millis(100), Duration::from_secs(5)).start();
    loop {
        match listen(&database, &tables, &appended).await {
            Ok(()) => retries.reset(),
            Err(e) => tracing::debug!(error = %e, "PostgreSQL listener disconnected"),
        }
        retries.wait().await;
    }
}

async fn listen(database: &Database, tables: &Tables, appended: &watch::Sender<u64>) -> Result<(), String> {
    let (client, mut connection) = database.open_connection().await.map_err(|e| e.to_string())?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.send(n.payload().parse::<u64>().unwrap_or(0));
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    client.batch_execute(&tables.sql("LISTEN eventstore_appended")).await.map_err(|e| e.to_string())?;
    // Anything appended while we were not listening: wake readers once.
    appended.send_modify(|_| {});
    while let Some(position) = rx.recv().await {
        appended.send_modify(|h| *h = (*h).max(position));
    }
    drop(client);
    driver.await.unwrap_or(Ok(())).map_err(|e| e.to_string())
}
