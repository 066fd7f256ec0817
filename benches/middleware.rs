//! Run: `scripts/bench middleware` (or `cargo bench --bench middleware -- [--messages N]`)
//!
//! N messages (default 1,000,000) of 256 bytes on the memory backend, through the full
//! middleware stack (dead letter → idempotency with the in-memory store → retry; the
//! success path) and, in the same run, through the bare handler: a warm-up round, then
//! three rounds of each in turn. Prints the medians as
//! `pair=middleware-stack switchyard=<msgs/s> raw=<msgs/s> ratio=<stack/bare>`.
//!
//! Then, as diagnostics: the same stack with a store that remembers nothing (what the
//! layers cost without the store's work, so the two figures split the gap between the
//! layers and the store), each layer alone around the bare handler, the store alone in
//! a loop (filling a large store, and in small ones that stay in cache), and the
//! stack's cost per message over the bare handler in ns.

mod common;

use std::sync::Arc;
use std::time::Duration;

use switchyard::memory::MemoryBroker;
use switchyard::middleware::{
    Begin, DeadLetterLayer, IdempotencyLayer, IdempotencyStore, MarkKey, MemoryStore, RetryLayer,
    RetryPolicy,
};
use switchyard::Bytes;
use tower::{Layer, ServiceBuilder};

fn main() {
    let n = common::arg("--messages", 1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let payload = Bytes::from(vec![0xcd; common::PAYLOAD]);
    rt.block_on(async {
        let retry = || {
            RetryLayer::new(
                RetryPolicy::new(3)
                    .unwrap()
                    .backoff(Duration::from_millis(10), Duration::from_secs(1))
                    .unwrap(),
            )
        };
        let dead_letter = || DeadLetterLayer::new(Arc::new(MemoryBroker::new()));
        let stack = |store: Arc<dyn IdempotencyStore>| {
            let (handler, handled) = common::bare_handler();
            let service = ServiceBuilder::new()
                .layer(dead_letter())
                .layer(IdempotencyLayer::new(store))
                .layer(retry())
                .service(handler);
            (service, handled)
        };
        let store = || Arc::new(MemoryStore::new(n as usize + 1));
        // Rounds of every run in turn; the first round only warms up (whichever run
        // goes first in a process pays for memory the later ones reuse), and each
        // figure is the median of the others.
        let mut runs: [Vec<f64>; 6] = Default::default();
        for round in 0..=ROUNDS {
            let mut rates = Vec::with_capacity(runs.len());
            let (s, h) = common::bare_handler();
            rates.push(common::run_e2e(n, payload.clone(), s, h).await);
            let (s, h) = stack(store());
            rates.push(common::run_e2e(n, payload.clone(), s, h).await);
            let (s, h) = stack(Arc::new(Forgetful));
            rates.push(common::run_e2e(n, payload.clone(), s, h).await);
            let (s, h) = common::bare_handler();
            let s = dead_letter().layer(s);
            rates.push(common::run_e2e(n, payload.clone(), s, h).await);
            let (s, h) = common::bare_handler();
            let s = IdempotencyLayer::new(Arc::new(Forgetful)).layer(s);
            rates.push(common::run_e2e(n, payload.clone(), s, h).await);
            let (s, h) = common::bare_handler();
            let s = retry().layer(s);
            rates.push(common::run_e2e(n, payload.clone(), s, h).await);
            if round > 0 {
                for (run, rate) in runs.iter_mut().zip(rates) {
                    run.push(rate);
                }
            }
        }
        let [bare, full, layers, dead_letter, idempotency, retry] = runs.map(common::median);
        println!(
            "note: medians of {ROUNDS} rounds after a warm-up round; both sides publish with \
             publish_batch (1,024 per call, fresh ids) and consume through the runtime \
             (concurrency 1,024, prefetch 2,048); the stack is dead letter -> idempotency \
             (MemoryStore: a mark begun and completed per message id) -> retry"
        );
        println!(
            "note: the same layers with a store that remembers nothing: {layers:.0} msgs/s, \
             ratio {:.3}; the rest of the gap is the store's",
            layers / bare
        );
        println!(
            "note: each layer alone around the bare handler (ratio to bare): dead letter \
             {:.3}, idempotency with a store that remembers nothing {:.3}, retry {:.3}",
            dead_letter / bare,
            idempotency / bare,
            retry / bare
        );
        println!("note: {}", store_alone(n).await);
        println!("note: {}", primitives());
        println!(
            "note: per message, the stack costs {:.0} ns over the bare handler, {:.0} ns \
             of it the layers and {:.0} ns the store",
            1e9 / full - 1e9 / bare,
            1e9 / layers - 1e9 / bare,
            1e9 / full - 1e9 / layers
        );
        println!(
            "pair=middleware-stack switchyard={full:.0} raw={bare:.0} ratio={:.3}",
            full / bare
        );
    });
}

/// What the operations every shared store or layer needs cost here, one thread: a
/// lock taken and released (a store shared by consumers, twice per message), a
/// reference count taken and dropped (each layer that acts after the handler keeps
/// the delivery), and a read of the store's coarse clock.
fn primitives() -> String {
    const N: u32 = 10_000_000;
    let per_op = |start: std::time::Instant| start.elapsed().as_nanos() as f64 / f64::from(N);
    let lock = std::sync::Mutex::new(0u64);
    let start = std::time::Instant::now();
    for _ in 0..N {
        *std::hint::black_box(&lock).lock().unwrap() += 1;
    }
    let locked = per_op(start);
    let shared = Arc::new(0u64);
    let start = std::time::Instant::now();
    for _ in 0..N {
        drop(std::hint::black_box(Arc::clone(std::hint::black_box(
            &shared,
        ))));
    }
    let counted = per_op(start);
    let start = std::time::Instant::now();
    for _ in 0..N {
        std::hint::black_box(coarsetime::Instant::now_without_cache_update());
    }
    let clock = per_op(start);
    format!(
        "one thread, per operation: mutex lock + unlock {locked:.1} ns, Arc clone + drop \
         {counted:.1} ns, coarse clock read {clock:.1} ns"
    )
}

/// Measured rounds of the bare, stack and diagnostic runs.
const ROUNDS: usize = 3;

/// The memory store on its own, one thread: begin and complete for `n` fresh ids, as
/// the layer calls them, and the same for a thousand ids over and over in fresh stores.
/// The small store stays in the core's cache, so the two figures split the store's own
/// work from what a map of `n` marks costs in cache misses.
async fn store_alone(n: u64) -> String {
    let ids: Vec<String> = (0..n).map(|_| switchyard::new_id()).collect();
    let large = per_mark(&ids, 1).await;
    let small = per_mark(&ids[..ids.len().min(1_000)], ids.len() / 1_000).await;
    format!(
        "MemoryStore alone, one thread, per begin + complete of a fresh UUIDv7 id: \
         {large:.0} ns filling a store to {n} marks, {small:.0} ns in stores of 1,000 \
         marks (the store's own work; the rest is the large map's cache misses)"
    )
}

/// Nanoseconds per begin + complete over `ids`, each of `stores` times in a fresh store.
async fn per_mark(ids: &[String], stores: usize) -> f64 {
    let (lease, retention) = (Duration::from_secs(300), Duration::from_secs(3600));
    let mut elapsed = Duration::ZERO;
    for _ in 0..stores.max(1) {
        let store = MemoryStore::new(ids.len() + 1);
        let start = std::time::Instant::now();
        for id in ids {
            let key = MarkKey::new("bench", id);
            let Ok(Begin::Started) = store.begin(key, lease).await else {
                panic!("a fresh id starts");
            };
            store.complete(key, retention).await.unwrap();
        }
        elapsed += start.elapsed();
    }
    elapsed.as_nanos() as f64 / (ids.len() * stores.max(1)) as f64
}

/// An idempotency store that starts every message and remembers nothing: the
/// diagnostic run's store, never a real one.
struct Forgetful;

#[async_trait::async_trait]
impl IdempotencyStore for Forgetful {
    async fn begin(&self, _: MarkKey<'_>, _: Duration) -> switchyard::Result<Begin> {
        Ok(Begin::Started)
    }
    async fn complete(&self, _: MarkKey<'_>, _: Duration) -> switchyard::Result<()> {
        Ok(())
    }
    async fn release(&self, _: MarkKey<'_>) -> switchyard::Result<()> {
        Ok(())
    }
}
