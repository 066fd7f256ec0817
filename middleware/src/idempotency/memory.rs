//! An in-process idempotency store: bounded, with expiry.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use switchyard_core::Result;

use super::{Begin, IdempotencyStore};

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    InFlight,
    Completed,
}

/// A key's 128-bit fingerprint: two SipHash runs with this store's random keys. Storing
/// it instead of the key string saves two allocations per message; a collision among a
/// million marks has odds around 10^-26.
type Fingerprint = u128;

/// The map is keyed by fingerprints, which are uniformly random already: hash them by
/// taking their low bits instead of running SipHash a third time.
#[derive(Default)]
struct TakeLow(u64);

impl Hasher for TakeLow {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }
}

struct Inner {
    marks: HashMap<Fingerprint, (State, Instant), BuildHasherDefault<TakeLow>>,
    /// Insertion order, for evicting the oldest marks when full.
    order: VecDeque<Fingerprint>,
}

/// Idempotency marks in this process's memory: fast, lost on restart, shared only by
/// consumers in the same process. At most `capacity` marks (default 1,000,000); when
/// full, the oldest marks go first.
pub struct MemoryStore {
    inner: Mutex<Inner>,
    capacity: usize,
    keys: (RandomState, RandomState),
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(1_000_000)
    }
}

impl MemoryStore {
    /// A store holding at most `capacity` marks.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                marks: HashMap::default(),
                order: VecDeque::new(),
            }),
            capacity: capacity.max(1),
            keys: (RandomState::new(), RandomState::new()),
        }
    }

    fn fingerprint(&self, key: &str) -> Fingerprint {
        let a = self.keys.0.hash_one(key);
        let b = self.keys.1.hash_one(key);
        (u128::from(a) << 64) | u128::from(b)
    }

    /// How many marks it holds (expired ones included until they are evicted).
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .marks
            .len()
    }

    /// Whether it holds no marks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn set(inner: &mut Inner, capacity: usize, key: Fingerprint, state: State, until: Instant) {
        if inner.marks.insert(key, (state, until)).is_none() {
            inner.order.push_back(key);
        }
        while inner.marks.len() > capacity {
            match inner.order.pop_front() {
                Some(old) => {
                    inner.marks.remove(&old);
                }
                None => break,
            }
        }
        // Keys removed by abandon leave stale entries in `order`; drop them now and then.
        if inner.order.len() > 2 * capacity.max(inner.marks.len()) {
            let marks = &inner.marks;
            inner.order.retain(|k| marks.contains_key(k));
        }
    }
}

#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn begin(&self, key: &str, lease: Duration) -> Result<Begin> {
        let now = Instant::now();
        let key = self.fingerprint(key);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match inner.marks.get(&key) {
            Some((State::Completed, until)) if *until > now => return Ok(Begin::Completed),
            Some((State::InFlight, until)) if *until > now => return Ok(Begin::InFlight),
            _ => {}
        }
        Self::set(&mut inner, self.capacity, key, State::InFlight, now + lease);
        Ok(Begin::Started)
    }

    async fn complete(&self, key: &str, retention: Duration) -> Result<()> {
        let key = self.fingerprint(key);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Self::set(
            &mut inner,
            self.capacity,
            key,
            State::Completed,
            Instant::now() + retention,
        );
        Ok(())
    }

    async fn abandon(&self, key: &str) -> Result<()> {
        let key = self.fingerprint(key);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(inner.marks.get(&key), Some((State::InFlight, _))) {
            inner.marks.remove(&key);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn marks_expire_and_evict() {
        let store = MemoryStore::new(2);
        let lease = Duration::from_secs(60);
        assert_eq!(store.begin("a", lease).await.unwrap(), Begin::Started);
        assert_eq!(store.begin("a", lease).await.unwrap(), Begin::InFlight);
        store.abandon("a").await.unwrap();
        assert_eq!(store.begin("a", lease).await.unwrap(), Begin::Started);
        store.complete("a", lease).await.unwrap();
        assert_eq!(store.begin("a", lease).await.unwrap(), Begin::Completed);
        assert_eq!(
            store.begin("b", Duration::ZERO).await.unwrap(),
            Begin::Started
        );
        assert_eq!(
            store.begin("b", lease).await.unwrap(),
            Begin::Started,
            "an expired lease is free"
        );
        assert_eq!(store.begin("c", lease).await.unwrap(), Begin::Started);
        assert_eq!(store.len(), 2, "capacity bounds the store");
        assert_eq!(
            store.begin("a", lease).await.unwrap(),
            Begin::Started,
            "oldest mark evicted"
        );
    }
}
