//! Run: `cargo bench --bench rpc -- [--requests N] [--in-flight K]`
//!
//! Round trips on the in-memory backend: `Broker::request` to a `reply_fn` responder and
//! back, K requests in flight (default 64), N in all (default 100,000); and in the same
//! run the same round trips through a raw tokio mpsc channel to a responder task that
//! answers on a oneshot. A warm-up round, then three rounds of both in turn; prints the
//! medians as `pair=memory-rpc switchyard=<req/s> raw=<req/s> ratio=<switchyard/raw>`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use switchyard::memory::MemoryBroker;
use switchyard::{
    reply_fn, Broker, Bytes, CancellationToken, Consumer, HandlerError, Message, SubscribeOptions,
};
use tokio::sync::{mpsc, oneshot};

const PAYLOAD: usize = 256;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Requests per second through a channel and a oneshot per request.
async fn raw(n: usize, in_flight: usize, payload: Bytes) -> f64 {
    let (tx, mut rx) = mpsc::channel::<(Bytes, oneshot::Sender<Bytes>)>(1024);
    let responder = tokio::spawn(async move {
        while let Some((request, reply)) = rx.recv().await {
            let _ = reply.send(request);
        }
    });
    let start = Instant::now();
    let answered = futures::stream::iter(0..n)
        .map(|_| {
            let (tx, payload) = (tx.clone(), payload.clone());
            async move {
                let (reply_tx, reply_rx) = oneshot::channel();
                tx.send((payload, reply_tx)).await.unwrap();
                reply_rx.await.unwrap().len()
            }
        })
        .buffer_unordered(in_flight)
        .filter(|len| futures::future::ready(*len == PAYLOAD))
        .count()
        .await;
    let rate = n as f64 / start.elapsed().as_secs_f64();
    assert_eq!(answered, n);
    drop(tx);
    responder.await.unwrap();
    rate
}

/// Requests per second through `Broker::request` and a `reply_fn` responder.
async fn switchyard(n: usize, in_flight: usize, payload: Bytes) -> f64 {
    let broker = Arc::new(MemoryBroker::new());
    let echo = |b: Bytes| async move { Ok::<_, HandlerError>(b) };
    let shutdown = CancellationToken::new();
    let running = Consumer::new(
        SubscribeOptions::queue("rpc"),
        reply_fn(broker.clone(), echo),
    )
    .concurrency(in_flight)
    .start(broker.clone(), shutdown.clone())
    .await
    .unwrap();
    let start = Instant::now();
    let answered = futures::stream::iter(0..n)
        .map(|_| {
            let (broker, payload) = (broker.clone(), payload.clone());
            async move {
                let reply = broker.request("rpc", Message::new(payload), Duration::from_secs(60));
                reply.await.unwrap().payload.len()
            }
        })
        .buffer_unordered(in_flight)
        .filter(|len| futures::future::ready(*len == PAYLOAD))
        .count()
        .await;
    let rate = n as f64 / start.elapsed().as_secs_f64();
    assert_eq!(answered, n);
    shutdown.cancel();
    let report = running.join().await.unwrap();
    assert_eq!(report.acked, n as u64);
    broker.close().await.unwrap();
    rate
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let n = arg("--requests", 100_000);
    let in_flight = arg("--in-flight", 64);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let payload = Bytes::from(vec![7u8; PAYLOAD]);
    runtime.block_on(async {
        raw(n, in_flight, payload.clone()).await;
        switchyard(n, in_flight, payload.clone()).await;
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            ours.push(switchyard(n, in_flight, payload.clone()).await);
            theirs.push(raw(n, in_flight, payload.clone()).await);
        }
        let (s, r) = (median(ours), median(theirs));
        println!(
            "pair=memory-rpc switchyard={s:.0} raw={r:.0} ratio={:.3} requests={n} in_flight={in_flight}",
            s / r
        );
    });
}
