//! Watches shared per watched id (an order, a saga): every client watching
//! the same id reads the same [`watch`] channel, which one follower task
//! (per service, for all ids at once) feeds. Clients count per id and per
//! peer address: an id is dropped with its last client, the follower stops
//! with the last id, and a peer holds at most a bounded number of watches
//! (a client that opens watches without end would otherwise hold memory and
//! reads without end). WatchOrder and WatchSaga both run on it.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use futures_util::Stream;
use tokio::sync::{Notify, watch};
use tonic::{Code, Status};

/// The ErrorInfo reason of a watch refused because its peer holds too many.
pub const TOO_MANY_WATCHERS: &str = "TOO_MANY_WATCHERS";

/// See the module documentation.
pub struct Watchers<V> {
    state: Mutex<State<V>>,
    /// Wakes the follower: an id came or went.
    wake: Notify,
    max_per_peer: usize,
}

struct State<V> {
    watched: HashMap<String, Watched<V>>,
    /// Open watches per client address (`None`: a transport without one).
    peers: HashMap<Option<IpAddr>, usize>,
    /// A follower task runs.
    following: bool,
}

struct Watched<V> {
    /// `None` until the follower has found the entity.
    tx: watch::Sender<Option<V>>,
    clients: usize,
}

impl<V> std::fmt::Debug for Watchers<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchers").field("max_per_peer", &self.max_per_peer).finish_non_exhaustive()
    }
}

impl<V> Watchers<V> {
    /// Watchers that allow `max_per_peer` open watches per client address.
    pub fn new(max_per_peer: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State { watched: HashMap::new(), peers: HashMap::new(), following: false }),
            wake: Notify::new(),
            max_per_peer,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<V>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A watch of `id` for a client at `peer`, and whether the caller must
    /// start the follower (none runs); RESOURCE_EXHAUSTED when `peer`
    /// already holds as many watches as allowed.
    pub fn subscribe(self: &Arc<Self>, id: &str, peer: Option<IpAddr>) -> Result<(Subscription<V>, bool), Status> {
        let mut state = self.lock();
        let open = state.peers.get(&peer).copied().unwrap_or(0);
        if open >= self.max_per_peer {
            return Err(crate::status::error_info(
                Code::ResourceExhausted,
                format!(
                    "at most {} watches may be open at once from one client address; close one first",
                    self.max_per_peer
                ),
                TOO_MANY_WATCHERS,
                &[("max_watchers_per_peer", self.max_per_peer.to_string())],
            ));
        }
        state.peers.insert(peer, open.saturating_add(1));
        let watched =
            state.watched.entry(id.to_owned()).or_insert_with(|| Watched { tx: watch::channel(None).0, clients: 0 });
        watched.clients = watched.clients.saturating_add(1);
        let rx = watched.tx.subscribe();
        let start = !state.following;
        state.following = true;
        drop(state);
        // A new id is read at once, not at the next change.
        self.wake.notify_one();
        Ok((Subscription { watchers: self.clone(), id: id.to_owned(), peer, rx }, start))
    }

    /// The ids watched now.
    pub fn ids(&self) -> Vec<String> {
        self.lock().watched.keys().cloned().collect()
    }

    /// Changes what the watchers of `id` see, if anyone watches it: `update`
    /// says whether it changed anything (only then are they woken).
    pub fn update(&self, id: &str, update: impl FnOnce(&mut Option<V>) -> bool) {
        if let Some(watched) = self.lock().watched.get(id) {
            watched.tx.send_if_modified(update);
        }
    }

    /// `look` at what the watchers of `id` have, if anyone watches it.
    pub fn peek<R>(&self, id: &str, look: impl FnOnce(&Option<V>) -> R) -> Option<R> {
        self.lock().watched.get(id).map(|watched| look(&watched.tx.borrow()))
    }

    /// Called by the follower: true (and the follower must end) when
    /// nothing is watched any more; the next watch starts a new one.
    pub fn stop_if_idle(&self) -> bool {
        let mut state = self.lock();
        if state.watched.is_empty() {
            state.following = false;
            true
        } else {
            false
        }
    }

    /// Until an id comes or goes (or came or went since the last call).
    pub async fn woken(&self) {
        self.wake.notified().await;
    }
}

/// One client's watch of one id; dropping it (the client went) lets go.
pub struct Subscription<V> {
    watchers: Arc<Watchers<V>>,
    id: String,
    peer: Option<IpAddr>,
    rx: watch::Receiver<Option<V>>,
}

impl<V> Drop for Subscription<V> {
    fn drop(&mut self) {
        let mut state = self.watchers.lock();
        if let Some(open) = state.peers.get_mut(&self.peer) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                state.peers.remove(&self.peer);
            }
        }
        if let Some(watched) = state.watched.get_mut(&self.id) {
            watched.clients = watched.clients.saturating_sub(1);
            if watched.clients == 0 {
                state.watched.remove(&self.id);
            }
        }
        drop(state);
        self.watchers.wake.notify_one();
    }
}

impl<V: Clone + Send + Sync + 'static> Subscription<V> {
    /// The values of its id as a stream: the current one (if any), then
    /// each new one (a client slower than the changes sees the latest);
    /// `item` maps a value to what is sent and says whether the stream ends
    /// after it.
    pub fn into_stream<T, F>(self, item: F) -> impl Stream<Item = Result<T, Status>> + Send + 'static
    where
        T: Send + 'static,
        F: Fn(V) -> (Result<T, Status>, bool) + Send + Sync + 'static,
    {
        let item = Arc::new(item);
        futures_util::stream::unfold((self, true, false), move |(mut subscription, mut first, done)| {
            let item = item.clone();
            async move {
                if done {
                    return None;
                }
                loop {
                    if !first && subscription.rx.changed().await.is_err() {
                        return None;
                    }
                    first = false;
                    let value = subscription.rx.borrow_and_update().clone();
                    if let Some(value) = value {
                        let (next, end) = item(value);
                        return Some((next, (subscription, false, end)));
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    #[tokio::test]
    async fn clients_share_an_id_peers_are_capped_and_the_last_client_lets_go() {
        let watchers = Watchers::<u32>::new(2);
        let peer = Some(IpAddr::from([10, 0, 0, 1]));
        let (a, start) = watchers.subscribe("x", peer).unwrap();
        assert!(start, "the first watch starts the follower");
        let (b, start) = watchers.subscribe("x", peer).unwrap();
        assert!(!start, "one follower for all");
        let refused = watchers.subscribe("y", peer).err().unwrap();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(watchers.subscribe("y", Some(IpAddr::from([10, 0, 0, 2]))).is_ok(), "another peer may");
        assert_eq!(watchers.ids().len(), 1, "the other peer's watch was dropped at once");

        watchers.update("x", |v| {
            *v = Some(7);
            true
        });
        let mut a = Box::pin(a.into_stream(|v| (Ok(v), false)));
        assert_eq!(a.next().await.unwrap().unwrap(), 7, "the current value first");
        drop(b);
        assert_eq!(watchers.ids(), ["x"], "still watched by a");
        drop(a);
        assert!(watchers.ids().is_empty());
        assert!(watchers.stop_if_idle());
        assert!(watchers.subscribe("z", peer).unwrap().1, "the cap counts open watches only; a new follower");
    }
}
