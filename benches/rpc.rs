//! Run: `cargo bench --bench rpc -- [--requests N] [--in-flight K]`
//!
//! Round trips on the in-memory backend: `Broker::request` to a `reply_fn` responder and
//! back, K requests in flight (default 64), N in all (default 100,000). The in-memory
//! backend has no client of its own, so its raw side is the same round trip written by
//! hand on the same broker, as an application without request/reply would: a request
//! topic, a reply topic, a correlation header and a map of waiting requests. A warm-up
//! round, then three rounds of both in turn; prints the medians as
//! `pair=memory-rpc switchyard=<req/s> raw=<req/s> ratio=<switchyard/raw>`, then, as a
//! diagnostic, the floor of any round trip in process: a tokio mpsc channel to a
//! responder task that answers on a oneshot (`floor=channel req_per_s=<n>`).

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use switchyard::memory::MemoryBroker;
use switchyard::{
    reply_fn, Broker, Bytes, CancellationToken, Consumer, HandlerError, Message, Publisher,
    SubscribeOptions,
};
use tokio::sync::{mpsc, oneshot};

use common::PAYLOAD;

/// Requests per second over `n` round trips, `in_flight` at a time; each round trip
/// resolves to the length of the reply's payload, which must be the request's.
async fn drive<F, Fut>(n: usize, in_flight: usize, round_trip: F) -> f64
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = usize>,
{
    let start = Instant::now();
    let answered = futures::stream::iter(0..n)
        .map(round_trip)
        .buffer_unordered(in_flight)
        .filter(|len| futures::future::ready(*len == PAYLOAD))
        .count()
        .await;
    let rate = n as f64 / start.elapsed().as_secs_f64();
    assert_eq!(answered, n, "every reply carries its request's payload");
    rate
}

/// Requests per second through a channel and a oneshot per request.
async fn channel(n: usize, in_flight: usize, payload: Bytes) -> f64 {
    let (tx, mut rx) = mpsc::channel::<(Bytes, oneshot::Sender<Bytes>)>(1024);
    let responder = tokio::spawn(async move {
        while let Some((request, reply)) = rx.recv().await {
            let _ = reply.send(request);
        }
    });
    let rate = drive(n, in_flight, |_| {
        let (tx, payload) = (tx.clone(), payload.clone());
        async move {
            let (reply_tx, reply_rx) = oneshot::channel();
            tx.send((payload, reply_tx)).await.unwrap();
            reply_rx.await.unwrap().len()
        }
    })
    .await;
    drop(tx);
    responder.await.unwrap();
    rate
}

/// Requests per second through the same broker by hand: the responder publishes each
/// answer to a reply topic with the request's correlation header, and the requester's
/// reply consumer hands it to the waiting request.
async fn by_hand(n: usize, in_flight: usize, payload: Bytes) -> f64 {
    type Waiting = Mutex<HashMap<String, oneshot::Sender<Arc<Message>>>>;
    let broker = Arc::new(MemoryBroker::new());
    let waiting: Arc<Waiting> = Arc::default();
    let shutdown = CancellationToken::new();
    let responder = {
        let broker = broker.clone();
        move |request: Arc<Message>| {
            let broker = broker.clone();
            async move {
                let correlation = request.headers.get("correlation-id").cloned();
                let mut reply = Message::new(request.payload.clone());
                if let Some(correlation) = correlation {
                    reply = reply.with_header("correlation-id", correlation);
                }
                broker.publish("rpc-replies", reply).await?;
                Ok::<_, HandlerError>(())
            }
        }
    };
    let replies = {
        let waiting = waiting.clone();
        move |reply: Arc<Message>| {
            let waiting = waiting.clone();
            async move {
                let correlation = reply.headers.get("correlation-id");
                let sender = correlation.and_then(|c| waiting.lock().unwrap().remove(c));
                if let Some(sender) = sender {
                    let _ = sender.send(reply);
                }
                Ok::<_, HandlerError>(())
            }
        }
    };
    let running = [
        Consumer::handler(SubscribeOptions::queue("rpc"), responder)
            .concurrency(in_flight)
            .start(broker.clone(), shutdown.clone())
            .await
            .unwrap(),
        Consumer::handler(SubscribeOptions::queue("rpc-replies"), replies)
            .concurrency(in_flight)
            .start(broker.clone(), shutdown.clone())
            .await
            .unwrap(),
    ];
    let next = AtomicU64::new(0);
    let rate = drive(n, in_flight, |_| {
        let (broker, waiting, payload) = (broker.clone(), waiting.clone(), payload.clone());
        let correlation = next.fetch_add(1, Ordering::Relaxed).to_string();
        async move {
            let (tx, rx) = oneshot::channel();
            waiting.lock().unwrap().insert(correlation.clone(), tx);
            let request = Message::new(payload).with_header("correlation-id", correlation);
            broker.publish("rpc", request).await.unwrap();
            tokio::time::timeout(Duration::from_secs(60), rx)
                .await
                .unwrap()
                .unwrap()
                .payload
                .len()
        }
    })
    .await;
    shutdown.cancel();
    for running in running {
        running.join().await.unwrap();
    }
    broker.close().await.unwrap();
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
    let rate = drive(n, in_flight, |_| {
        let (broker, payload) = (broker.clone(), payload.clone());
        async move {
            let reply = broker.request("rpc", Message::new(payload), Duration::from_secs(60));
            reply.await.unwrap().payload.len()
        }
    })
    .await;
    shutdown.cancel();
    let report = running.join().await.unwrap();
    assert_eq!(report.acked, n as u64);
    broker.close().await.unwrap();
    rate
}

fn main() {
    let n = common::arg("--requests", 100_000) as usize;
    let in_flight = common::arg("--in-flight", 64) as usize;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let payload = Bytes::from(vec![7u8; PAYLOAD]);
    runtime.block_on(async {
        let (mut ours, mut theirs, mut floor) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..4 {
            let s = switchyard(n, in_flight, payload.clone()).await;
            let r = by_hand(n, in_flight, payload.clone()).await;
            let f = channel(n, in_flight, payload.clone()).await;
            // Round 0 only warms up.
            if round > 0 {
                ours.push(s);
                theirs.push(r);
                floor.push(f);
            }
        }
        let (s, r) = (common::median(ours), common::median(theirs));
        println!(
            "pair=memory-rpc switchyard={s:.0} raw={r:.0} ratio={:.3} requests={n} in_flight={in_flight}",
            s / r
        );
        println!("floor=channel req_per_s={:.0}", common::median(floor));
    });
}
