//! An in-process idempotency store: bounded, with expiry.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use switchyard_core::Result;

use super::{Begin, IdempotencyStore, MarkKey};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    InFlight,
    Completed,
}

#[derive(Clone, Copy)]
struct Mark {
    state: State,
    expires: Instant,
    /// Tells marks with one expiry apart in the expiry queues.
    seq: u64,
}

/// Keys by expiry, soonest first.
type Queue = BTreeMap<(Instant, u64), Arc<str>>;

#[derive(Default)]
struct Marks {
    /// `<group>/<id>` → mark (group names have no `/`, so keys do not collide). The
    /// queues share the key, so a mark costs one allocation.
    marks: HashMap<Arc<str>, Mark>,
    /// In-flight marks by lease expiry.
    leases: Queue,
    /// Completed marks by retention expiry.
    kept: Queue,
    next_seq: u64,
}

impl Marks {
    fn queue(&mut self, state: State) -> &mut Queue {
        match state {
            State::InFlight => &mut self.leases,
            State::Completed => &mut self.kept,
        }
    }

    /// Removes `key`'s mark, if any, from the map and its queue.
    fn remove(&mut self, key: &str) -> Option<Mark> {
        let mark = self.marks.remove(key)?;
        self.queue(mark.state).remove(&(mark.expires, mark.seq));
        Some(mark)
    }

    /// Files `key`'s mark: in place where it has one, else as a new one, making room
    /// first.
    fn file(&mut self, key: &str, state: State, expires: Instant, capacity: usize) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let mark = Mark {
            state,
            expires,
            seq,
        };
        if let Some(held) = self.marks.get_mut(key) {
            let old = std::mem::replace(held, mark);
            let shared = self.queue(old.state).remove(&(old.expires, old.seq));
            let shared = shared.unwrap_or_else(|| Arc::from(key));
            self.queue(state).insert((expires, seq), shared);
            return;
        }
        while self.marks.len() >= capacity && self.evict_one() {}
        let shared: Arc<str> = Arc::from(key);
        self.queue(state).insert((expires, seq), shared.clone());
        self.marks.insert(shared, mark);
    }

    /// Drops every mark expired at `now`.
    fn sweep(&mut self, now: Instant) {
        for state in [State::InFlight, State::Completed] {
            while let Some(entry) = self.queue(state).first_entry() {
                if entry.key().0 > now {
                    break;
                }
                let key = entry.remove();
                self.marks.remove(&key);
            }
        }
    }

    /// Forgets the completed mark that would expire first; with none, the soonest
    /// lease. Completed marks go first: forgetting one risks a late duplicate running
    /// again, forgetting a lease risks a duplicate running alongside the original.
    fn evict_one(&mut self) -> bool {
        let queue = if self.kept.is_empty() {
            &mut self.leases
        } else {
            &mut self.kept
        };
        match queue.pop_first() {
            Some((_, key)) => {
                self.marks.remove(&key);
                true
            }
            None => false,
        }
    }
}

/// Idempotency marks in this process's memory: lost on restart, not shared between
/// processes (use [`PostgresStore`](super::PostgresStore) for that).
///
/// Bounded: it holds at most `capacity` marks; when full, it forgets the completed mark
/// closest to expiry first, and in-flight leases only when no completed mark is left.
/// Marks expire (leases after their lease, completed marks after their retention) and
/// expired ones are dropped as calls come in, so an idle store keeps what it had.
pub struct MemoryStore {
    inner: Mutex<Marks>,
    capacity: usize,
}

impl Default for MemoryStore {
    /// A store of up to a million marks.
    fn default() -> Self {
        Self::new(1_000_000)
    }
}

impl MemoryStore {
    /// A store holding at most `capacity` marks (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::default(),
            capacity: capacity.max(1),
        }
    }

    /// How many marks it holds (expired ones included until a call drops them).
    pub fn len(&self) -> usize {
        self.inner.lock().marks.len()
    }

    /// Whether it holds no mark.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn joined(key: MarkKey<'_>) -> String {
    let mut joined = String::with_capacity(key.group.len() + 1 + key.id.len());
    joined.push_str(key.group);
    joined.push('/');
    joined.push_str(key.id);
    joined
}

/// `now + after`, or a century on when that overflows (a "forever" retention).
fn expiry(now: Instant, after: Duration) -> Instant {
    now.checked_add(after)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn begin(&self, key: MarkKey<'_>, lease: Duration) -> Result<Begin> {
        let key = joined(key);
        let now = Instant::now();
        let mut marks = self.inner.lock();
        marks.sweep(now);
        // Whatever is left after the sweep is unexpired.
        if let Some(mark) = marks.marks.get(key.as_str()) {
            return Ok(match mark.state {
                State::InFlight => Begin::InFlight,
                State::Completed => Begin::Completed,
            });
        }
        marks.file(&key, State::InFlight, expiry(now, lease), self.capacity);
        Ok(Begin::Started)
    }

    async fn complete(&self, key: MarkKey<'_>, retention: Duration) -> Result<()> {
        let key = joined(key);
        let now = Instant::now();
        let mut marks = self.inner.lock();
        marks.sweep(now);
        marks.file(
            &key,
            State::Completed,
            expiry(now, retention),
            self.capacity,
        );
        Ok(())
    }

    async fn release(&self, key: MarkKey<'_>) -> Result<()> {
        let key = joined(key);
        let mut marks = self.inner.lock();
        if marks.marks.get(key.as_str()).map(|m| m.state) == Some(State::InFlight) {
            marks.remove(&key);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(60);

    fn key(id: &str) -> MarkKey<'_> {
        MarkKey::new("g", id)
    }

    #[tokio::test]
    async fn begin_complete_release() {
        let store = MemoryStore::new(10);
        assert_eq!(store.begin(key("a"), LEASE).await.unwrap(), Begin::Started);
        assert_eq!(store.begin(key("a"), LEASE).await.unwrap(), Begin::InFlight);
        store.release(key("a")).await.unwrap();
        store.release(key("a")).await.unwrap();
        assert_eq!(store.begin(key("a"), LEASE).await.unwrap(), Begin::Started);
        store.complete(key("a"), LEASE).await.unwrap();
        store.complete(key("a"), LEASE).await.unwrap();
        assert_eq!(
            store.begin(key("a"), LEASE).await.unwrap(),
            Begin::Completed
        );
        store.release(key("a")).await.unwrap();
        assert_eq!(
            store.begin(key("a"), LEASE).await.unwrap(),
            Begin::Completed,
            "release leaves a completed mark"
        );
        assert_eq!(store.len(), 1);
    }

    #[tokio::test]
    async fn groups_keep_their_own_marks() {
        let store = MemoryStore::default();
        store.complete(MarkKey::new("a", "1"), LEASE).await.unwrap();
        assert_eq!(
            store.begin(MarkKey::new("b", "1"), LEASE).await.unwrap(),
            Begin::Started
        );
        assert_eq!(
            store.begin(MarkKey::new("a", "1"), LEASE).await.unwrap(),
            Begin::Completed
        );
    }

    #[tokio::test]
    async fn leases_and_retention_expire_and_expired_marks_are_dropped() {
        let store = MemoryStore::new(10);
        assert_eq!(
            store.begin(key("lease"), Duration::ZERO).await.unwrap(),
            Begin::Started
        );
        assert_eq!(
            store.begin(key("lease"), LEASE).await.unwrap(),
            Begin::Started,
            "an expired lease is free"
        );
        store
            .complete(key("done"), Duration::from_millis(20))
            .await
            .unwrap();
        assert_eq!(
            store.begin(key("done"), LEASE).await.unwrap(),
            Begin::Completed
        );
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(store.len(), 2);
        assert_eq!(
            store.begin(key("done"), LEASE).await.unwrap(),
            Begin::Started,
            "forgotten after its retention"
        );
        store.release(key("done")).await.unwrap();
        store.release(key("lease")).await.unwrap();
        assert!(store.is_empty());
    }

    #[tokio::test]
    async fn a_full_store_forgets_completed_marks_before_leases() {
        let store = MemoryStore::new(3);
        store.begin(key("running"), LEASE).await.unwrap();
        store.complete(key("old"), LEASE).await.unwrap();
        store.complete(key("new"), LEASE * 2).await.unwrap();
        assert_eq!(
            store.begin(key("fresh"), LEASE).await.unwrap(),
            Begin::Started
        );
        assert_eq!(store.len(), 3);
        assert_eq!(
            store.begin(key("running"), LEASE).await.unwrap(),
            Begin::InFlight
        );
        assert_eq!(
            store.begin(key("new"), LEASE).await.unwrap(),
            Begin::Completed
        );
        // Forgotten: the one that would have expired first.
        assert_eq!(store.len(), 3);
        store.release(key("fresh")).await.unwrap();
        assert_eq!(
            store.begin(key("old"), LEASE).await.unwrap(),
            Begin::Started
        );
    }

    #[tokio::test]
    async fn a_store_of_leases_only_stays_bounded() {
        let store = MemoryStore::new(100);
        for i in 0..1_000 {
            let id = i.to_string();
            assert_eq!(store.begin(key(&id), LEASE).await.unwrap(), Begin::Started);
        }
        assert_eq!(store.len(), 100);
        assert_eq!(
            store.begin(key("999"), LEASE).await.unwrap(),
            Begin::InFlight
        );
    }

    #[tokio::test]
    async fn a_forever_retention_does_not_overflow() {
        let store = MemoryStore::new(2);
        store.complete(key("a"), Duration::MAX).await.unwrap();
        assert_eq!(
            store.begin(key("a"), LEASE).await.unwrap(),
            Begin::Completed
        );
    }
}
