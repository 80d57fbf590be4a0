//! Where each projection's active version stands, kept current by
//! LISTENing to the projectors' commit notifications (and a periodic read,
//! should a notification be lost): read-your-writes waits on it without
//! touching the database.

use std::{collections::HashMap, sync::Arc, time::Duration};

use eventfold_projector::COMMIT_CHANNEL;
use eventfold_store::{Backoff, Database};
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, Client};

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
    /// Follows the projections of `database` (on a connection of its own)
    /// until the returned value and its clones are dropped.
    pub fn spawn(database: Database, poll: Duration) -> Self {
        let (tx, rx) = watch::channel(Snapshot::default());
        tokio::spawn(follow(database, poll, tx));
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

/// Listens until nobody follows any more, reconnecting after the waits of
/// the default [`Backoff`] (started over once a connection has served).
async fn follow(database: Database, poll: Duration, tx: watch::Sender<Snapshot>) {
    let backoff = Backoff::default();
    let mut retries = backoff.start();
    while !tx.is_closed() {
        let started = tokio::time::Instant::now();
        match listen(&database, poll, &tx).await {
            Ok(()) => return,
            Err(error) => tracing::warn!(%error, "projection positions: connection lost; reconnecting"),
        }
        if started.elapsed() > backoff.max {
            retries.reset();
        }
        tokio::select! {
            () = retries.wait() => {}
            () = tx.closed() => return,
        }
    }
}

/// A notification of the commit channel.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Notice {
    /// `name:version:position`: a batch committed.
    Committed { name: String, version: u32, position: u64 },
    /// Anything else: a version activated, stopped, reset.
    Changed,
}

impl Notice {
    fn parse(payload: &str) -> Notice {
        let mut parts = payload.rsplitn(3, ':');
        let (Some(position), Some(version), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
            return Notice::Changed;
        };
        match (version.parse(), position.parse()) {
            (Ok(version), Ok(position)) => Notice::Committed { name: name.to_owned(), version, position },
            _ => Notice::Changed,
        }
    }
}

/// Moves the positions the notices name; false when the snapshot must be
/// read again instead (a change, or a projection not known yet).
fn apply(tx: &watch::Sender<Snapshot>, notices: &[Notice]) -> bool {
    let mut complete = true;
    tx.send_if_modified(|current| {
        let mut next: Option<HashMap<String, Active>> = None;
        for notice in notices {
            match notice {
                Notice::Changed => complete = false,
                Notice::Committed { name, version, position } => {
                    let known = next.as_ref().unwrap_or(current).get(name).copied();
                    match known {
                        Some(active) if active.version == *version => {
                            if *position > active.position {
                                let map = next.get_or_insert_with(|| (**current).clone());
                                map.insert(name.clone(), Active { version: *version, position: *position });
                            }
                        }
                        // A version being rebuilt beside the active one.
                        Some(_) => {}
                        None => complete = false,
                    }
                }
            }
        }
        match next {
            Some(map) => {
                *current = Arc::new(map);
                true
            }
            None => false,
        }
    });
    complete
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
                let version = u32::try_from(r.get::<_, i32>(1)).unwrap_or(0);
                let active = Active { version, position: eventfold_store::from_bigint(r.get(2)) };
                (r.get::<_, String>(0), active)
            })
            .collect(),
    ))
}

/// Ok when nobody follows any more.
async fn listen(database: &Database, poll: Duration, tx: &watch::Sender<Snapshot>) -> Result<(), String> {
    let (client, mut connection) = database.open_connection().await.map_err(|e| e.to_string())?;
    let (notify_tx, mut notified) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = notify_tx.send(Notice::parse(n.payload()));
                }
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    });
    let result = async {
        client.batch_execute(&format!("LISTEN {COMMIT_CHANNEL}")).await.map_err(|e| e.to_string())?;
        // A read at least every `poll`, whatever the notifications say.
        let mut every = tokio::time::interval(poll);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut must_read = true;
        loop {
            if must_read {
                let snapshot = read(&client).await.map_err(|e| e.to_string())?;
                tx.send_if_modified(|current| {
                    let changed = **current != *snapshot;
                    if changed {
                        *current = snapshot;
                    }
                    changed
                });
            }
            tokio::select! {
                woken = notified.recv() => {
                    let Some(first) = woken else {
                        return Err("the listening connection closed".to_owned());
                    };
                    // A commit of an active version moves its position
                    // without a read; anything else is read again.
                    let mut notices = vec![first];
                    while let Ok(more) = notified.try_recv() {
                        notices.push(more);
                    }
                    must_read = !apply(tx, &notices);
                }
                _ = every.tick() => must_read = true,
                () = tx.closed() => return Ok(()),
            }
        }
    }
    .await;
    drop(client);
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_of_the_active_version_move_it_and_other_notices_ask_for_a_read() {
        assert_eq!(
            Notice::parse("order_views:2:41"),
            Notice::Committed { name: "order_views".into(), version: 2, position: 41 }
        );
        assert_eq!(Notice::parse("order_views:2:activated"), Notice::Changed);
        assert_eq!(Notice::parse("order_views"), Notice::Changed);

        let start: HashMap<String, Active> = [("order_views".to_owned(), Active { version: 2, position: 10 })].into();
        let (tx, rx) = watch::channel(Arc::new(start));
        let commit = |v, p| Notice::Committed { name: "order_views".into(), version: v, position: p };
        assert!(apply(&tx, &[commit(2, 15), commit(2, 12)]));
        assert_eq!(rx.borrow()["order_views"], Active { version: 2, position: 15 }, "the highest, never back");
        assert!(apply(&tx, &[commit(3, 99)]), "a version being rebuilt is ignored");
        assert_eq!(rx.borrow()["order_views"].position, 15);
        assert!(!apply(&tx, &[commit(2, 16), Notice::Changed]), "a change asks for a read");
        assert!(!apply(&tx, &[Notice::Committed { name: "new".into(), version: 1, position: 1 }]));
    }
}
