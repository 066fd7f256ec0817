//! Run: `scripts/bench middleware` (or `cargo bench --bench middleware -- [--messages N]`)
//!
//! N messages (default 1,000,000) of 256 bytes on the memory backend, through the full
//! middleware stack (dead letter → idempotency with the in-memory store → retry; the
//! success path) and, in the same run, through the bare handler. Prints
//! `pair=middleware-stack switchyard=<msgs/s> raw=<msgs/s> ratio=<stack/bare>`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use switchyard::memory::MemoryBroker;
use switchyard::middleware::{DeadLetterLayer, IdempotencyLayer, MemoryStore, RetryPolicy};
use switchyard::Bytes;
use tower::ServiceBuilder;

fn main() {
    let n = common::arg("--messages", 1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let payload = Bytes::from(vec![0xcd; common::PAYLOAD]);
    rt.block_on(async {
        let stack = |n: u64| {
            let (handler, handled) = common::bare_handler();
            let dlq_broker = Arc::new(MemoryBroker::new());
            let service = ServiceBuilder::new()
                .layer(DeadLetterLayer::new(dlq_broker))
                .layer(IdempotencyLayer::new(Arc::new(MemoryStore::new(
                    n as usize + 1,
                ))))
                .layer(
                    RetryPolicy::new(3)
                        .unwrap()
                        .backoff(Duration::from_millis(10), Duration::from_secs(1))
                        .unwrap()
                        .layer(),
                )
                .service(handler);
            (service, handled)
        };
        // Warm-up.
        let (s, h) = common::bare_handler();
        common::run_e2e(n / 10, payload.clone(), s, h).await;
        let (s, h) = stack(n / 10);
        common::run_e2e(n / 10, payload.clone(), s, h).await;

        let (s, h) = common::bare_handler();
        let bare = common::run_e2e(n, payload.clone(), s, h).await;
        let (s, h) = stack(n);
        let full = common::run_e2e(n, payload.clone(), s, h).await;
        println!(
            "note: both sides publish with publish_batch (1,024 per call, fresh ids) and consume \
             through the runtime (concurrency 1,024, prefetch 2,048); the stack is dead letter \
             -> idempotency (MemoryStore: a mark begun and completed per message id) -> retry"
        );
        println!(
            "pair=middleware-stack switchyard={full:.0} raw={bare:.0} ratio={:.3}",
            full / bare
        );
    });
}
