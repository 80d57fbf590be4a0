//! Where each projection's active version stands, kept current by
//! LISTENing to the projectors' commit notifications (and a periodic read,
//! should a notification be lost): read-your-writes waits on it without
//! touching the database.

use std::{collections::HashMap, sync::Arc, time::Duration};

use eventfold_projector::COMMIT_CHANNEL;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, Client, NoTls};

/// The active version of a projection and its checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Active {
    pub version: u32,
    pub position: u64,
}

type Snapshot = Arc<HashMap<String, Active>>;

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct Positions {
    current: watch::Receiver<Snapshot>,
}

impl Positions {
    /// Follows the projections of the database at `config` until the
    /// returned value and its clones are dropped.
    pub fn spawn(config: tokio_postgres::Config, poll: Duration) -> Self {
        let (tx, rx) = watch::channel(Snapshot::default());
        tokio::spawn(follow(config, poll, tx));
        Self { current: rx }
    }

    /// The active version of `projection` and its position, if any.
    pub fn get(&self, projection: &str) -> Option<Active> {
        self.current.borrow().get(projection).copied()
    }

    /// Changes whenever any projection moves.
    pub fn changes(&self) -> watch::Receiver<Snapshot> {
        self.current.clone()
    }

    /// Waits until the active version of `projection` has reached
    /// `min_position`, at most `timeout`; otherwise returns where it is.
    pub async fn wait(&self, projection: &str, min_position: u64, timeout: Duration) -> Result<Active, Active> {
        let mut changes = self.current.clone();
        let reached = |s: &Snapshot| s.get(projection).is_some_and(|a| a.position >= min_position);
        match tokio::time::timeout(timeout, changes.wait_for(reached)).await {
            Ok(Ok(snapshot)) => Ok(snapshot[projection]),
            _ => Err(self.get(projection).unwrap_or_default()),
        }
    }
}

async fn follow(config: tokio_postgres::Config, poll: Duration, tx: watch::Sender<Snapshot>) {
    let mut backoff = Duration::from_millis(100);
    while !tx.is_closed() {
        match listen(&config, poll, &tx).await {
            Ok(()) => return,
            Err(error) => tracing::warn!(%error, "projection positions: connection lost; reconnecting"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn read(client: &Client) -> Result<Snapshot, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT a.name, a.version, c.position FROM projections.active a \
               JOIN projections.checkpoints c ON c.name = a.name AND c.version = a.version",
            &[],
        )
        .await?;
    Ok(Arc::new(
        rows.iter()
            .map(|r| {
                let active = Active { version: r.get::<_, i32>(1) as u32, position: r.get::<_, i64>(2) as u64 };
                (r.get::<_, String>(0), active)
            })
            .collect(),
    ))
}

/// Ok when nobody follows any more.
async fn listen(config: &tokio_postgres::Config, poll: Duration, tx: &watch::Sender<Snapshot>) -> Result<(), String> {
    let (client, mut connection) = tokio::time::timeout(Duration::from_secs(5), config.connect(NoTls))
        .await
        .map_err(|_| "no connection within 5 s".to_owned())?
        .map_err(|e| e.to_string())?;
    let (notify_tx, mut notified) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(_)) => {
                    let _ = notify_tx.send(());
                }
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    });
    let result = async {
        client.batch_execute(&format!("LISTEN {COMMIT_CHANNEL}")).await.map_err(|e| e.to_string())?;
        loop {
            let snapshot = read(&client).await.map_err(|e| e.to_string())?;
            tx.send_if_modified(|current| {
                let changed = **current != *snapshot;
                if changed {
                    *current = snapshot;
                }
                changed
            });
            tokio::select! {
                woken = notified.recv() => {
                    if woken.is_none() {
                        return Err("the listening connection closed".to_owned());
                    }
                    // One read answers every notification queued so far.
                    while notified.try_recv().is_ok() {}
                }
                () = tokio::time::sleep(poll) => {}
                () = tx.closed() => return Ok(()),
            }
        }
    }
    .await;
    drop(client);
    driver.abort();
    result
}
