//! An in-process idempotency store: bounded, with expiry.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::time::Duration;

use async_trait::async_trait;
use coarsetime::Instant;
use parking_lot::Mutex;
use switchyard_core::Result;

use super::{Begin, IdempotencyStore, MarkKey};

/// A mark's key: a 128-bit keyed digest of its group and id (see [`Digester`]). Fixed
/// size, so the map holds it inline and a mark costs no allocation of its own.
type Digest = u128;

/// Nanoseconds since the store was made, on the coarse monotonic clock: good for 584
/// years.
type Nanos = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    InFlight,
    Completed,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Mark {
    expires: Nanos,
    state: State,
}

impl Mark {
    fn live(&self, now: Nanos) -> bool {
        self.expires > now
    }
}

/// Hashes a [`Digest`] for the map by taking its low 64 bits: they are already
/// uniformly random and keyed, so hashing them again would only cost time.
#[derive(Default)]
struct DigestBits(u64);

impl Hasher for DigestBits {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `Digest`s are hashed here (`write_u128`); any other input still spreads.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0 ^ u64::from_le_bytes(word)).rotate_left(29);
        }
    }

    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }
}

/// Turns a mark's group and id into its [`Digest`]: SipHash (std's `RandomState`, keyed
/// at random per store) of the key, and of the key followed by one more byte, gives two
/// independent 64-bit halves (one pass over the key: the second input only adds a
/// byte). Two different keys share a digest with probability about n² / 2¹²⁹ among n
/// marks (under 10⁻²⁶ for a million), and since the SipHash key is secret, nobody can
/// choose ids that collide on purpose.
struct Digester(RandomState);

impl Digester {
    fn digest(&self, key: MarkKey<'_>) -> Digest {
        let mut h = self.0.build_hasher();
        // `str`'s Hash ends each string with a marker, so group and id cannot run into
        // each other.
        key.hash(&mut h);
        let first = h.finish();
        h.write_u8(1);
        (u128::from(first) << 64) | u128::from(h.finish())
    }
}

#[derive(Default)]
struct Marks {
    marks: HashMap<Digest, Mark, BuildHasherDefault<DigestBits>>,
    /// Completed marks in the order they were completed, with the expiry each was filed
    /// with. An entry whose mark has since changed (completed again, or begun anew after
    /// expiring) is stale and skipped when it comes up.
    kept: VecDeque<(Nanos, Digest)>,
}

impl Marks {
    /// Whether the queue entry `(expires, key)` is still its mark's.
    fn current(&self, (expires, key): (Nanos, Digest)) -> bool {
        self.marks.get(&key)
            == Some(&Mark {
                expires,
                state: State::Completed,
            })
    }

    /// `key`'s mark where it has one that has not expired.
    fn get(&self, key: Digest, now: Nanos) -> Option<State> {
        self.marks
            .get(&key)
            .filter(|mark| mark.live(now))
            .map(|mark| mark.state)
    }

    /// Files `key`'s mark, in place where it has one, else as a new one, making room
    /// first.
    fn file(&mut self, key: Digest, mark: Mark, capacity: usize, now: Nanos) {
        // Only a full store looks the key up first: a new mark makes room, a refiled one
        // takes its own place.
        if self.marks.len() >= capacity && !self.marks.contains_key(&key) {
            while self.marks.len() >= capacity && self.evict_one(now) {}
        }
        let old = self.marks.insert(key, mark);
        // Filed again unchanged (completed twice within one tick of the clock), its
        // queue entry is still the current one; a second, equal entry would be taken
        // for current too and never dropped.
        if mark.state == State::Completed && old != Some(mark) {
            self.kept.push_back((mark.expires, key));
            // Stale entries only come from marks filed more than once; dropping them
            // once they outnumber the marks keeps the queue within twice the map.
            if self.kept.len() > 2 * self.marks.len() + 1024 {
                let kept = std::mem::take(&mut self.kept);
                self.kept = kept.into_iter().filter(|&e| self.current(e)).collect();
            }
        }
    }

    /// Drops the completed marks whose retention ended by `now`, oldest first. Retention
    /// is usually one setting, so completion order is expiry order; a mark kept longer
    /// than the ones after it holds them here until its own end, and reads treat them as
    /// gone meanwhile. Expired leases go when read, replaced or evicted.
    fn sweep(&mut self, now: Nanos) {
        while let Some(&(expires, key)) = self.kept.front() {
            if expires > now {
                break;
            }
            self.kept.pop_front();
            if self.current((expires, key)) {
                self.marks.remove(&key);
            }
        }
    }

    /// Forgets the oldest completed mark; with none, an expired lease if there is one,
    /// else any lease. Completed marks go first: forgetting one risks a late duplicate
    /// running again, forgetting a live lease risks a duplicate running alongside the
    /// original.
    fn evict_one(&mut self, now: Nanos) -> bool {
        while let Some(entry) = self.kept.pop_front() {
            if self.current(entry) {
                self.marks.remove(&entry.1);
                return true;
            }
        }
        // A look at a few leases, not all: a full map of live leases would make every
        // call scan it.
        let lease = self
            .marks
            .iter()
            .take(64)
            .find(|(_, mark)| !mark.live(now))
            .or_else(|| self.marks.iter().next())
            .map(|(key, _)| *key);
        lease.is_some_and(|key| self.marks.remove(&key).is_some())
    }
}

/// Idempotency marks in this process's memory: lost on restart, not shared between
/// processes (use [`PostgresStore`](super::PostgresStore) for that).
///
/// Bounded: it holds at most `capacity` marks; when full, it forgets the oldest
/// completed mark first, and an in-flight lease only when no completed mark is left.
/// Marks expire (leases after their lease, completed marks after their retention);
/// expired completed marks are dropped as calls come in, expired leases when read or
/// when room is needed, so an idle store keeps what it had.
pub struct MemoryStore {
    inner: Mutex<Marks>,
    digester: Digester,
    /// Where the store's clock (`Nanos`) starts.
    epoch: Instant,
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
            digester: Digester(RandomState::new()),
            epoch: Instant::now(),
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

    /// Now on the store's clock.
    fn now(&self) -> Nanos {
        Instant::now().duration_since(self.epoch).as_nanos()
    }
}

/// `now + after`; a "forever" retention (`Duration::MAX`) saturates to never.
fn expiry(now: Nanos, after: Duration) -> Nanos {
    now.saturating_add(Nanos::try_from(after.as_nanos()).unwrap_or(Nanos::MAX))
}

#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn begin(&self, key: MarkKey<'_>, lease: Duration) -> Result<Begin> {
        let key = self.digester.digest(key);
        let now = self.now();
        let mut marks = self.inner.lock();
        marks.sweep(now);
        match marks.get(key, now) {
            Some(State::InFlight) => Ok(Begin::InFlight),
            Some(State::Completed) => Ok(Begin::Completed),
            None => {
                let mark = Mark {
                    expires: expiry(now, lease),
                    state: State::InFlight,
                };
                marks.file(key, mark, self.capacity, now);
                Ok(Begin::Started)
            }
        }
    }

    async fn complete(&self, key: MarkKey<'_>, retention: Duration) -> Result<()> {
        let key = self.digester.digest(key);
        let now = self.now();
        let mut marks = self.inner.lock();
        marks.sweep(now);
        let mark = Mark {
            expires: expiry(now, retention),
            state: State::Completed,
        };
        marks.file(key, mark, self.capacity, now);
        Ok(())
    }

    async fn release(&self, key: MarkKey<'_>) -> Result<()> {
        let key = self.digester.digest(key);
        let mut marks = self.inner.lock();
        if marks.marks.get(&key).map(|m| m.state) == Some(State::InFlight) {
            marks.marks.remove(&key);
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
    async fn group_and_id_stay_apart_in_the_digest() {
        let store = MemoryStore::default();
        store
            .complete(MarkKey::new("ab", "c"), LEASE)
            .await
            .unwrap();
        for other in [
            MarkKey::new("a", "bc"),
            MarkKey::new("abc", ""),
            MarkKey::new("", "abc"),
        ] {
            assert_eq!(
                store.begin(other, LEASE).await.unwrap(),
                Begin::Started,
                "{other}"
            );
        }
        assert_eq!(
            store.begin(MarkKey::new("ab", "c"), LEASE).await.unwrap(),
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
    async fn a_stale_queue_entry_leaves_the_mark_filed_after_it() {
        let store = MemoryStore::new(10);
        store
            .complete(key("a"), Duration::from_millis(10))
            .await
            .unwrap();
        // Completed again for longer: the first queue entry is now stale.
        store.complete(key("a"), LEASE).await.unwrap();
        std::thread::sleep(Duration::from_millis(20));
        // This call sweeps the stale entry, which must not take the mark with it.
        assert_eq!(
            store.begin(key("a"), LEASE).await.unwrap(),
            Begin::Completed
        );
        assert_eq!(store.len(), 1);
    }

    #[tokio::test]
    async fn completing_one_mark_again_and_again_keeps_the_queue_bounded() {
        let store = MemoryStore::new(10);
        for _ in 0..10_000 {
            store.complete(key("a"), LEASE).await.unwrap();
        }
        assert!(store.inner.lock().kept.len() <= 2 + 1024);
        assert_eq!(
            store.begin(key("a"), LEASE).await.unwrap(),
            Begin::Completed
        );
    }

    #[test]
    fn a_mark_filed_again_unchanged_keeps_one_queue_entry() {
        let mut marks = Marks::default();
        let mark = Mark {
            expires: 5,
            state: State::Completed,
        };
        // Within one tick of the coarse clock, the same expiry every time.
        for _ in 0..10_000 {
            marks.file(7, mark, 10, 0);
        }
        assert_eq!(marks.kept.len(), 1);
        marks.sweep(5);
        assert!(marks.marks.is_empty());
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
