//! An in-process idempotency store: bounded, with expiry.

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use hashbrown::HashTable;
use switchyard_core::Result;

use super::{Begin, IdempotencyStore};

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    InFlight,
    Completed,
}

/// A key's 128-bit fingerprint: SipHash-1-3 with 128-bit output under this store's
/// random key. Storing it instead of the key string saves two allocations per message;
/// a collision among a million marks has odds around 10^-26. Two words rather than a
/// `u128`, whose 16-byte alignment would pad each ring entry from 24 bytes to 32.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Fingerprint([u64; 2]);

/// A mark's state and expiry in one word: the expiry in milliseconds since the store
/// was created, shifted left by one, and the low bit set once completed.
#[derive(Clone, Copy)]
struct Mark(u64);

impl Mark {
    fn new(state: State, until_ms: u64) -> Self {
        Mark((until_ms << 1) | u64::from(state == State::Completed))
    }

    fn state(self) -> State {
        if self.0 & 1 == 1 {
            State::Completed
        } else {
            State::InFlight
        }
    }

    fn until_ms(self) -> u64 {
        self.0 >> 1
    }
}

/// The marks: a ring of `(fingerprint, mark)` in insertion order (the oldest go first
/// when full) and a hash table of their positions in the ring.
///
/// Why not one map from fingerprint to mark: with a million marks, every fresh id
/// costs a lookup at a random place in the table, and the table is what decides the
/// price. Positions take 4 bytes where a map entry takes 24, so this table is a fifth
/// of the size (about 10 MB for a million marks) and mostly stays in the CPU's cache;
/// the ring is only touched at its ends, and where a mark was just added.
struct Marks {
    table: HashTable<u32>,
    ring: VecDeque<(Fingerprint, Mark)>,
    /// The position of `ring[0]`, counted since the store began (wrapping at 2^32;
    /// the ring never holds that many).
    head: u32,
}

/// Tables up to this many marks are allocated whole when the store is made, so they
/// never pause to grow: a million marks cost 2 MB of control bytes up front, the rest
/// is reserved address space until used.
const PRESIZE: usize = 1 << 20;

impl Marks {
    fn new(capacity: usize) -> Self {
        let presize = capacity.min(PRESIZE);
        Self {
            table: HashTable::with_capacity(presize),
            ring: VecDeque::with_capacity(presize),
            head: 0,
        }
    }

    fn len(&self) -> usize {
        self.ring.len()
    }

    /// Where `fingerprint` sits in the ring.
    fn find(&self, fingerprint: &Fingerprint) -> Option<usize> {
        let (ring, head) = (&self.ring, self.head);
        self.table
            .find(fingerprint.0[0], |&at| {
                ring[at.wrapping_sub(head) as usize].0 == *fingerprint
            })
            .map(|&at| at.wrapping_sub(head) as usize)
    }

    fn mark_mut(&mut self, fingerprint: &Fingerprint) -> Option<&mut Mark> {
        let i = self.find(fingerprint)?;
        Some(&mut self.ring[i].1)
    }

    /// Adds a mark for a fingerprint it does not hold, evicting the oldest beyond
    /// `capacity`.
    fn push(&mut self, fingerprint: Fingerprint, mark: Mark, capacity: usize) {
        let at = self.head.wrapping_add(self.ring.len() as u32);
        self.ring.push_back((fingerprint, mark));
        let (ring, head) = (&self.ring, self.head);
        // Fingerprints are uniformly random already: their first word is the hash.
        self.table.insert_unique(fingerprint.0[0], at, |&at| {
            ring[at.wrapping_sub(head) as usize].0 .0[0]
        });
        while self.ring.len() > capacity {
            let Some((oldest, _)) = self.ring.pop_front() else {
                break;
            };
            let at = self.head;
            self.head = self.head.wrapping_add(1);
            if let Ok(entry) = self.table.find_entry(oldest.0[0], |&held| held == at) {
                entry.remove();
            }
        }
    }
}

/// Idempotency marks in this process's memory: fast, lost on restart, shared only by
/// consumers in the same process. At most `capacity` marks (default 1,000,000); when
/// full, the oldest marks go first.
pub struct MemoryStore {
    inner: Mutex<Marks>,
    capacity: usize,
    key: (u64, u64),
    /// Tells stores apart in the per-thread fingerprint cache.
    id: u64,
    /// Expiries count milliseconds from here. A coarse clock (the kernel's tick, a few
    /// milliseconds): it costs a few nanoseconds where the precise one costs 25, twice
    /// per message, and leases and retention are far longer than its step.
    epoch: coarsetime::Instant,
}

/// The last fingerprint this thread computed: `complete` usually follows `begin` for
/// the same key on the same thread, and then skips the hash.
struct LastFingerprint {
    store: u64,
    len: usize,
    key: [u8; 96],
    fingerprint: Fingerprint,
}

thread_local! {
    static LAST: std::cell::RefCell<LastFingerprint> = const {
        std::cell::RefCell::new(LastFingerprint { store: 0, len: 0, key: [0; 96], fingerprint: Fingerprint([0; 2]) })
    };
}

static NEXT_STORE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(1_000_000)
    }
}

impl MemoryStore {
    /// A store holding at most `capacity` marks.
    pub fn new(capacity: usize) -> Self {
        // Ring positions are 32-bit.
        let capacity = capacity.clamp(1, u32::MAX as usize / 2);
        Self {
            inner: Mutex::new(Marks::new(capacity)),
            capacity,
            key: {
                // std's per-process random SipHash keys, hashed: 128 secret bits.
                let random = RandomState::new();
                (random.hash_one(0x5eed_u64), random.hash_one(0xfee1_u64))
            },
            id: NEXT_STORE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            epoch: coarsetime::Instant::now_without_cache_update(),
        }
    }

    fn fingerprint(&self, key: &str) -> Fingerprint {
        let key = key.as_bytes();
        LAST.with_borrow_mut(|last| {
            if last.store == self.id && last.len == key.len() && last.key[..last.len] == *key {
                return last.fingerprint;
            }
            let fingerprint = sip128::<1, 3>(self.key, key);
            if let Some(slot) = last.key.get_mut(..key.len()) {
                slot.copy_from_slice(key);
                last.store = self.id;
                last.len = key.len();
                last.fingerprint = fingerprint;
            }
            fingerprint
        })
    }

    /// Milliseconds since the store was created, now and after `later`.
    fn now_ms(&self, later: Duration) -> (u64, u64) {
        let now = coarsetime::Instant::now_without_cache_update()
            .duration_since(self.epoch)
            .as_millis()
            .min(u64::MAX >> 2);
        let later = u64::try_from(later.as_millis()).unwrap_or(u64::MAX);
        (now, now.saturating_add(later).min(u64::MAX >> 2))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Marks> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many marks it holds (expired ones included until they are evicted).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether it holds no marks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn begin(&self, key: &str, lease: Duration) -> Result<Begin> {
        self.try_begin(key, lease)
            .expect("the memory store never waits")
    }

    async fn complete(&self, key: &str, retention: Duration) -> Result<()> {
        self.try_complete(key, retention)
            .expect("the memory store never waits")
    }

    async fn abandon(&self, key: &str) -> Result<()> {
        self.try_abandon(key).expect("the memory store never waits")
    }

    fn try_begin(&self, key: &str, lease: Duration) -> Option<Result<Begin>> {
        let key = self.fingerprint(key);
        let (now, until) = self.now_ms(lease);
        let mut marks = self.lock();
        match marks.mark_mut(&key) {
            Some(mark) if mark.until_ms() > now => {
                return Some(Ok(match mark.state() {
                    State::Completed => Begin::Completed,
                    State::InFlight => Begin::InFlight,
                }))
            }
            // Expired or released: taken again, keeping its place in the ring.
            Some(mark) => *mark = Mark::new(State::InFlight, until),
            None => marks.push(key, Mark::new(State::InFlight, until), self.capacity),
        }
        Some(Ok(Begin::Started))
    }

    fn try_complete(&self, key: &str, retention: Duration) -> Option<Result<()>> {
        let key = self.fingerprint(key);
        let (_, until) = self.now_ms(retention);
        let mut marks = self.lock();
        let done = Mark::new(State::Completed, until);
        match marks.mark_mut(&key) {
            Some(mark) => *mark = done,
            // Evicted while in flight: remember it again.
            None => marks.push(key, done, self.capacity),
        }
        Some(Ok(()))
    }

    fn try_abandon(&self, key: &str) -> Option<Result<()>> {
        let key = self.fingerprint(key);
        let mut marks = self.lock();
        if let Some(mark) = marks.mark_mut(&key) {
            if mark.state() == State::InFlight {
                // Expired at once: the next begin takes it. It keeps its slot until
                // evicted, like any expired mark.
                *mark = Mark::new(State::InFlight, 0);
            }
        }
        Some(Ok(()))
    }
}

/// SipHash-C-D with a 128-bit output (the reference algorithm's 128-bit mode): one
/// pass over the input gives the whole fingerprint, where two 64-bit std hashes took
/// two. C = 1, D = 3 is the variant std's `HashMap` uses.
fn sip128<const C: usize, const D: usize>(key: (u64, u64), data: &[u8]) -> Fingerprint {
    struct State([u64; 4]);
    impl State {
        #[inline(always)]
        fn rounds(&mut self, n: usize) {
            let v = &mut self.0;
            for _ in 0..n {
                v[0] = v[0].wrapping_add(v[1]);
                v[1] = v[1].rotate_left(13) ^ v[0];
                v[0] = v[0].rotate_left(32);
                v[2] = v[2].wrapping_add(v[3]);
                v[3] = v[3].rotate_left(16) ^ v[2];
                v[0] = v[0].wrapping_add(v[3]);
                v[3] = v[3].rotate_left(21) ^ v[0];
                v[2] = v[2].wrapping_add(v[1]);
                v[1] = v[1].rotate_left(17) ^ v[2];
                v[2] = v[2].rotate_left(32);
            }
        }
        #[inline(always)]
        fn absorb<const C: usize>(&mut self, m: u64) {
            self.0[3] ^= m;
            self.rounds(C);
            self.0[0] ^= m;
        }
        fn out(&self) -> u64 {
            self.0[0] ^ self.0[1] ^ self.0[2] ^ self.0[3]
        }
    }
    let (k0, k1) = key;
    let mut s = State([
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d ^ 0xee,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ]);
    let mut words = data.chunks_exact(8);
    for word in &mut words {
        s.absorb::<C>(u64::from_le_bytes(word.try_into().expect("8 bytes")));
    }
    let mut last = [0u8; 8];
    let tail = words.remainder();
    last[..tail.len()].copy_from_slice(tail);
    let last = u64::from_le_bytes(last) | ((data.len() as u64) << 56);
    s.absorb::<C>(last);
    s.0[2] ^= 0xee;
    s.rounds(D);
    let low = s.out();
    s.0[1] ^= 0xdd;
    s.rounds(D);
    let high = s.out();
    Fingerprint([low, high])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sip128_matches_the_reference_vectors() {
        // SipHash-2-4-128 vectors from the reference implementation (vectors.h): key
        // 00..0f, messages 00, 00 01, 00 01 02, …; here lengths 0, 1, 7, 8 and 15.
        let key = (
            u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]),
            u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]),
        );
        let message: Vec<u8> = (0..64).collect();
        let expect = [
            (0, "a3817f04ba25a8e66df67214c7550293"),
            (1, "da87c1d86b99af44347659119b22fc45"),
            (7, "a1f1ebbed8dbc153c0b84aa61ff08239"),
            (8, "3b62a9ba6258f5610f83e264f31497b4"),
            (15, "5493e99933b0a8117e08ec0f97cfc3d9"),
            (16, "6ee2a4ca67b054bbfd3315bf85230577"),
        ];
        for (len, hex) in expect {
            let Fingerprint([low, high]) = sip128::<2, 4>(key, &message[..len]);
            let got: String = low
                .to_le_bytes()
                .iter()
                .chain(&high.to_le_bytes())
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(got, hex, "length {len}");
        }
    }

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

    #[tokio::test]
    async fn a_full_store_forgets_its_oldest_marks_first() {
        let store = MemoryStore::new(1000);
        let lease = Duration::from_secs(60);
        for i in 0..5000 {
            let key = format!("g/{i}");
            assert_eq!(store.begin(&key, lease).await.unwrap(), Begin::Started);
            store.complete(&key, lease).await.unwrap();
        }
        assert_eq!(store.len(), 1000);
        // The newest thousand are remembered; the first of them sat at ring position
        // 4000, so positions and the table agree after 4000 evictions.
        for i in 4000..5000 {
            let key = format!("g/{i}");
            assert_eq!(
                store.begin(&key, lease).await.unwrap(),
                Begin::Completed,
                "{key}"
            );
        }
        for i in [0, 1, 2000, 3999] {
            let key = format!("g/{i}");
            assert_eq!(
                store.begin(&key, lease).await.unwrap(),
                Begin::Started,
                "{key}"
            );
        }
        assert_eq!(
            store.len(),
            1000,
            "still bounded after the old keys came back"
        );
        // Those four took the place of the four oldest: 4000..4004.
        for i in 4000..4004 {
            let key = format!("g/{i}");
            assert_eq!(
                store.begin(&key, lease).await.unwrap(),
                Begin::Started,
                "{key}"
            );
        }
    }

    #[tokio::test]
    async fn an_abandoned_mark_is_free_at_once_and_a_completed_one_is_not_abandoned() {
        let store = MemoryStore::new(10);
        let lease = Duration::from_secs(60);
        assert_eq!(store.begin("g/a", lease).await.unwrap(), Begin::Started);
        store.abandon("g/a").await.unwrap();
        assert_eq!(store.begin("g/a", lease).await.unwrap(), Begin::Started);
        store.complete("g/a", lease).await.unwrap();
        store.abandon("g/a").await.unwrap();
        assert_eq!(store.begin("g/a", lease).await.unwrap(), Begin::Completed);
        assert_eq!(store.len(), 1, "one key, one mark");
    }

    #[tokio::test]
    async fn stores_do_not_share_marks_through_the_fingerprint_cache() {
        let (a, b) = (MemoryStore::new(10), MemoryStore::new(10));
        let lease = Duration::from_secs(60);
        assert_eq!(a.begin("g/k", lease).await.unwrap(), Begin::Started);
        assert_eq!(b.begin("g/k", lease).await.unwrap(), Begin::Started);
        a.complete("g/k", lease).await.unwrap();
        assert_eq!(b.begin("g/k", lease).await.unwrap(), Begin::InFlight);
        assert_eq!(a.begin("g/k", lease).await.unwrap(), Begin::Completed);
        let long = "x".repeat(200);
        assert_eq!(a.begin(&long, lease).await.unwrap(), Begin::Started);
        assert_eq!(a.begin(&long, lease).await.unwrap(), Begin::InFlight);
    }
}
