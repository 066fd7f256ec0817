//! Shared by the benchmarks: argument parsing, medians and the end-to-end run on the
//! memory backend.

// Each bench uses its part of this module.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Notify;

use switchyard::memory::{MemoryBroker, MemoryConfig};
use switchyard::{
    handler_fn, Bytes, CancellationToken, Consumer, Delivery, HandlerError, Message, Publisher,
    SubscribeOptions,
};

/// Payload size of every benchmark message.
pub(crate) const PAYLOAD: usize = 256;

/// `--name value` from the command line, or the default.
pub(crate) fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The middle value.
pub(crate) fn median(mut rates: Vec<f64>) -> f64 {
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

/// How many messages the handler saw, and a wake-up when it has seen `target`, so the
/// bench waits for the last message without spinning: a busy-waiting main thread would
/// take a core from the runtime's two workers.
pub(crate) struct Handled {
    count: AtomicU64,
    target: AtomicU64,
    reached: Notify,
}

impl Handled {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            count: AtomicU64::new(0),
            target: AtomicU64::new(u64::MAX),
            reached: Notify::new(),
        })
    }

    fn add_one(&self) {
        let seen = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        if seen == self.target.load(Ordering::Relaxed) {
            self.reached.notify_one();
        }
    }

    /// Messages seen so far.
    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Waits until `n` messages were seen (set before the first one arrives).
    async fn wait_for(&self, n: u64) {
        while self.count() < n {
            self.reached.notified().await;
        }
    }
}

/// The bare handler: checks the payload and counts.
pub(crate) fn bare_handler() -> (
    impl tower::Service<Delivery, Response = (), Error = HandlerError, Future: Send + 'static>
        + Clone
        + Send
        + 'static,
    Arc<Handled>,
) {
    let handled = Handled::new();
    let seen = handled.clone();
    let handler = move |d: Delivery| {
        let seen = seen.clone();
        async move {
            if d.payload().len() != PAYLOAD {
                return Err(HandlerError::permanent("wrong payload size"));
            }
            seen.add_one();
            Ok(())
        }
    };
    (handler_fn(handler), handled)
}

/// Publishes `n` messages in batches and consumes them with `service` (concurrency 1024);
/// returns messages per second from the first publish to the last handled message.
pub(crate) async fn run_e2e<S>(n: u64, payload: Bytes, service: S, handled: Arc<Handled>) -> f64
where
    S: tower::Service<Delivery, Response = (), Error = HandlerError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    // The default capacity (1,048,576 messages per topic): publishers and consumers run
    // at their own pace, and back-pressure only engages when a consumer falls that far behind.
    let broker = Arc::new(MemoryBroker::with_config(MemoryConfig::default()));
    handled.target.store(n, Ordering::Relaxed);
    let shutdown = CancellationToken::new();
    let options = SubscribeOptions::new("bench", "bench").prefetch(2048);
    let running = Consumer::new(options, service)
        .concurrency(1024)
        .start(broker.clone(), shutdown.clone())
        .await
        .unwrap();
    let start = Instant::now();
    let publisher = {
        let broker = broker.clone();
        tokio::spawn(async move {
            let mut sent = 0;
            while sent < n {
                let k = (n - sent).min(1024);
                let batch = (0..k).map(|_| Message::new(payload.clone())).collect();
                broker.publish_batch("bench", batch).await.unwrap();
                sent += k;
            }
        })
    };
    publisher.await.unwrap();
    handled.wait_for(n).await;
    let rate = n as f64 / start.elapsed().as_secs_f64();
    shutdown.cancel();
    let report = running.join().await.unwrap();
    assert_eq!(report.acked, n);
    rate
}
