//! Run: `scripts/bench memory` (or `cargo bench --bench memory -- [--messages N]`)
//!
//! Moves N messages of 256 bytes (default 1,000,000) publish → consumer runtime →
//! handler → ack on the in-memory backend, and in the same run the same payloads
//! through a raw tokio mpsc channel (one producer task, one consumer): a full-size
//! warm-up round, then three rounds of both in turn; prints the medians as
//! `pair=memory-e2e switchyard=<msgs/s> raw=<msgs/s> ratio=<switchyard/raw>`.
//! It also reports the memory held with a 1M backlog and a slow handler.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard::memory::{MemoryBroker, MemoryConfig};
use switchyard::{
    Bytes, CancellationToken, Consumer, Delivery, HandlerError, Message, Publisher,
    SubscribeOptions,
};

mod common;

use common::PAYLOAD;

async fn raw(n: u64, payload: Bytes) -> f64 {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
    let start = Instant::now();
    let producer = tokio::spawn(async move {
        for _ in 0..n {
            tx.send(payload.clone()).await.unwrap();
        }
    });
    let consumer = tokio::spawn(async move {
        let mut bytes = 0u64;
        let mut count = 0u64;
        while let Some(p) = rx.recv().await {
            bytes += p.len() as u64;
            count += 1;
        }
        assert_eq!(bytes, count * PAYLOAD as u64);
        count
    });
    producer.await.unwrap();
    assert_eq!(consumer.await.unwrap(), n);
    n as f64 / start.elapsed().as_secs_f64()
}

async fn switchyard_e2e(n: u64, payload: Bytes) -> f64 {
    let (service, handled) = common::bare_handler();
    common::run_e2e(n, payload, service, handled).await
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A 1M backlog with a slow handler: the group's read position may run ahead of what
/// was acked by at most the prefetch window, whatever the backlog.
async fn bounded(backlog: u64, payload: Bytes) {
    let broker = Arc::new(MemoryBroker::with_config(
        MemoryConfig::default().capacity(backlog as usize),
    ));
    let before = rss_kib();
    let mut sent = 0;
    while sent < backlog {
        let k = (backlog - sent).min(4096);
        broker
            .publish_batch(
                "backlog",
                (0..k).map(|_| Message::new(payload.clone())).collect(),
            )
            .await
            .unwrap();
        sent += k;
    }
    let stored = rss_kib();
    let prefetch = 64;
    let shutdown = CancellationToken::new();
    let handled = Arc::new(AtomicU64::new(0));
    let slow = {
        let handled = handled.clone();
        move |_d: Delivery| {
            let handled = handled.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                handled.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(())
            }
        }
    };
    let running = Consumer::handler(
        SubscribeOptions::new("backlog", "slow").prefetch(prefetch),
        slow,
    )
    .concurrency(16)
    .start(broker.clone(), shutdown.clone())
    .await
    .unwrap();
    // Sample how far the group has read against how many the handler finished: the
    // difference is everything the runtime and the subscription hold beyond the log.
    let mut max_ahead = 0;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(25)).await;
        let done = handled.load(Ordering::SeqCst);
        let (_, groups) = broker.topic_stats("backlog").unwrap();
        max_ahead = max_ahead.max(groups[0].1.saturating_sub(done));
    }
    let during = rss_kib();
    shutdown.cancel();
    let report = running.join().await.unwrap();
    println!(
        "bounded backlog={backlog} rss_before_kib={before} rss_stored_kib={stored} rss_consuming_kib={during} handled={} max_read_ahead_of_handled={max_ahead} prefetch={prefetch}",
        report.acked
    );
    assert!(
        max_ahead <= prefetch as u64,
        "the runtime held {max_ahead} messages beyond the log, more than prefetch {prefetch}"
    );
}

/// Measured rounds of each side.
const ROUNDS: usize = 3;

fn main() {
    let n = common::arg("--messages", 1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let payload = Bytes::from(vec![0xab; PAYLOAD]);
    rt.block_on(async {
        // A warm-up round at full size, then rounds of both in turn, and the median of
        // each: the first full-size run in a process pays for touching the memory
        // that the topic's million messages take, which later runs reuse (measured:
        // 3.2-3.6M msg/s first, 5-6.6M after), so one run each measures that once-only
        // cost rather than the steady state.
        let (mut raw_rates, mut sy_rates) = (Vec::new(), Vec::new());
        for round in 0..=ROUNDS {
            let raw_rate = raw(n, payload.clone()).await;
            let sy_rate = switchyard_e2e(n, payload.clone()).await;
            if round > 0 {
                raw_rates.push(raw_rate);
                sy_rates.push(sy_rate);
            }
        }
        let shown = |rates: &[f64]| {
            let rates: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
            rates.join(" ")
        };
        println!(
            "note: medians of {ROUNDS} rounds after a full-size warm-up round; rounds \
             (msgs/s): switchyard {}; raw {}",
            shown(&sy_rates),
            shown(&raw_rates)
        );
        let (raw_rate, sy_rate) = (common::median(raw_rates), common::median(sy_rates));
        println!(
            "note: switchyard publishes with publish_batch (1,024 per call, each a Message::new \
             with a fresh UUIDv7 id) and consumes through the runtime (concurrency 1,024, \
             prefetch 2,048, each delivery acked); raw: one producer task, one consumer task, \
             tokio mpsc(1,024)"
        );
        println!(
            "pair=memory-e2e switchyard={sy_rate:.0} raw={raw_rate:.0} ratio={:.3}",
            sy_rate / raw_rate
        );
        if std::env::args().all(|a| a != "--no-backlog") {
            bounded(common::arg("--backlog", 1_000_000), payload).await;
        }
    });
}
