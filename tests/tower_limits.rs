//! Standard tower layers in front of a handler, driven through the consumer runtime on
//! every backend compiled in:
//!
//! - `ConcurrencyLimit`: while the runtime waits for a permit it must keep driving the
//!   running handlers that hold the permits, and shutdown must not wait for one;
//! - `RateLimit` (behind a `Buffer`, since `RateLimit` is not `Clone`);
//! - `Timeout`: a timed-out handler is nacked and its delivery redelivered;
//! - `LoadShed` over a `ConcurrencyLimit`: shed deliveries are nacked and redelivered;
//! - a `poll_ready` error fails the one delivery it was waited for.
//!
//! Kafka and RabbitMQ are reached through `SWITCHYARD_KAFKA_URL` and
//! `SWITCHYARD_AMQP_URL` (the addresses `scripts/test` uses by default); these tests fail,
//! never skip, when their broker is unreachable. Every wait is bounded, so a hang fails.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use switchyard::{
    handler_fn, AnyBroker, BoxError, CancellationToken, Consumer, ConsumerReport, Delivery,
    FailureKind, HandlerError, Message, RunningConsumer, SubscribeOptions,
};
use switchyard_conformance::support::unique_name;
use tokio::time::{timeout, Instant};
use tower::{Service, ServiceBuilder};

/// Messages per layer.
const N: usize = 40;
/// The bound on every wait: generous, so only a hang (not a slow machine) fails it.
const LIMIT: Duration = Duration::from_secs(60);
/// Handlers the runtime may run at once; the layers allow fewer.
const CONCURRENCY: usize = 16;

/// What the handlers saw.
#[derive(Default)]
struct Seen {
    /// Ids whose handler succeeded.
    handled: Mutex<HashSet<String>>,
    /// Handler calls per id.
    calls: Mutex<HashMap<String, u32>>,
    /// When each handler call began.
    started: Mutex<Vec<Instant>>,
    running: AtomicUsize,
    max_running: AtomicUsize,
}

impl Seen {
    fn max_running(&self) -> usize {
        self.max_running.load(Ordering::SeqCst)
    }
}

/// Counts a running handler while alive (a timed-out handler is dropped, not finished).
struct Running(Arc<Seen>);

impl Running {
    fn enter(seen: &Arc<Seen>) -> Self {
        let now = seen.running.fetch_add(1, Ordering::SeqCst) + 1;
        seen.max_running.fetch_max(now, Ordering::SeqCst);
        Self(seen.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A handler that waits 10 ms and records what it saw. With `stuck_first`, the first
/// call for each message never finishes on its own (only a timeout ends it).
fn handler(
    seen: Arc<Seen>,
    stuck_first: bool,
) -> impl Fn(Delivery) -> futures::future::BoxFuture<'static, Result<(), HandlerError>> + Clone {
    move |d: Delivery| {
        let seen = seen.clone();
        Box::pin(async move {
            let call = {
                let mut calls = seen.calls.lock().unwrap();
                let n = calls.entry(d.id().to_string()).or_default();
                *n += 1;
                *n
            };
            seen.started.lock().unwrap().push(Instant::now());
            let _running = Running::enter(&seen);
            if stuck_first && call == 1 {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            seen.handled.lock().unwrap().insert(d.id().to_string());
            Ok(())
        })
    }
}

/// One scenario's topic, group and broker.
struct Scene {
    what: String,
    broker: AnyBroker,
    topic: String,
    group: String,
}

impl Scene {
    fn new(backend: &str, layer: &str, broker: &AnyBroker) -> Self {
        let topic = unique_name(&format!("sy-tower-{}", layer.to_lowercase()));
        Self {
            what: format!("{backend} {layer}"),
            broker: broker.clone(),
            group: format!("{topic}-g"),
            topic,
        }
    }

    /// Subscribes a consumer running `service`; when this returns the group exists.
    async fn start<S>(&self, service: S) -> (CancellationToken, RunningConsumer)
    where
        S: Service<Delivery, Response = (), Error = HandlerError> + Clone + Send + 'static,
        S::Future: Send + 'static,
    {
        let token = CancellationToken::new();
        let consumer = Consumer::new(SubscribeOptions::new(&self.topic, &self.group), service)
            .concurrency(CONCURRENCY)
            .redelivery_backoff(Duration::from_millis(1), Duration::from_millis(20));
        let running = timeout(LIMIT, consumer.start(self.broker.clone(), token.clone()))
            .await
            .unwrap_or_else(|_| panic!("{}: subscribing took over {LIMIT:?}", self.what))
            .unwrap_or_else(|e| panic!("{}: subscribe failed: {e}", self.what));
        (token, running)
    }

    /// Publishes `N` messages, each with its own key, and returns their ids.
    async fn publish(&self) -> HashSet<String> {
        let messages: Vec<Message> = (0..N)
            .map(|i| Message::new(format!("m{i}")).with_key(format!("k{i}")))
            .collect();
        let ids = messages.iter().map(|m| m.id.clone()).collect();
        timeout(LIMIT, self.broker.publish_batch(&self.topic, messages))
            .await
            .unwrap_or_else(|_| panic!("{}: publishing took over {LIMIT:?}", self.what))
            .unwrap_or_else(|e| panic!("{}: publish failed: {e}", self.what));
        ids
    }

    /// Waits until at least `want` of `ids` were handled.
    async fn wait_handled(&self, seen: &Seen, ids: &HashSet<String>, want: usize) {
        let deadline = Instant::now() + LIMIT;
        loop {
            let done = {
                let handled = seen.handled.lock().unwrap();
                ids.iter().filter(|id| handled.contains(*id)).count()
            };
            if done >= want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {done} of {} messages handled within {LIMIT:?} (wanted {want})",
                self.what,
                ids.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Shuts the consumer down; fails unless it stops in time and cleanly.
    async fn stop(&self, (token, running): (CancellationToken, RunningConsumer)) -> ConsumerReport {
        token.cancel();
        timeout(LIMIT, running.join())
            .await
            .unwrap_or_else(|_| panic!("{}: shutdown took over {LIMIT:?}", self.what))
            .unwrap_or_else(|e| panic!("{}: consumer failed: {e}", self.what))
    }
}

async fn concurrency_limit(backend: &str, broker: &AnyBroker) {
    let scene = Scene::new(backend, "ConcurrencyLimit", broker);
    let seen = Arc::new(Seen::default());
    // ConcurrencyLimit passes the handler's error through as it is: no map_err needed.
    let service = || {
        ServiceBuilder::new()
            .concurrency_limit(2)
            .service(handler_fn(handler(seen.clone(), false)))
    };
    let started = Instant::now();
    let first = scene.start(service()).await;
    let ids = scene.publish().await;
    // Stop part-way, with received deliveries waiting for a permit: shutdown must not
    // wait for one, and the deliveries not started go back to the broker.
    scene.wait_handled(&seen, &ids, N / 4).await;
    scene.stop(first).await;
    // A second consumer of the group gets the rest: nothing was lost.
    let second = scene.start(service()).await;
    scene.wait_handled(&seen, &ids, N).await;
    scene.stop(second).await;
    let max = seen.max_running();
    assert!(
        (1..=2).contains(&max),
        "{}: {max} handlers ran at once under a limit of 2",
        scene.what
    );
    println!(
        "{}: passed in {:.1?} (at most {max} at once)",
        scene.what,
        started.elapsed()
    );
}

async fn rate_limit(backend: &str, broker: &AnyBroker) {
    const PER: Duration = Duration::from_millis(100);
    let scene = Scene::new(backend, "RateLimit", broker);
    let seen = Arc::new(Seen::default());
    let service = ServiceBuilder::new()
        .map_err(HandlerError::from_boxed)
        .buffer(2)
        .rate_limit(10, PER)
        .service(handler_fn(handler(seen.clone(), false)));
    let started = Instant::now();
    let running = scene.start(service).await;
    let ids = scene.publish().await;
    scene.wait_handled(&seen, &ids, N).await;
    scene.stop(running).await;
    // 40 calls at 10 per 100 ms need four windows, whose starts are at least 100 ms
    // apart: the calls span 300 ms or more. Half of that leaves room for scheduling.
    let span = {
        let times = seen.started.lock().unwrap();
        *times.iter().max().unwrap() - *times.iter().min().unwrap()
    };
    assert!(
        span >= PER * 3 / 2,
        "{}: {N} calls spanned {span:?}, faster than 10 per {PER:?} allows",
        scene.what
    );
    println!(
        "{}: passed in {:.1?} (calls spanned {span:.1?})",
        scene.what,
        started.elapsed()
    );
}

async fn timeout_layer(backend: &str, broker: &AnyBroker) {
    let scene = Scene::new(backend, "Timeout", broker);
    let seen = Arc::new(Seen::default());
    let service = ServiceBuilder::new()
        .map_err(HandlerError::from_boxed)
        .timeout(Duration::from_millis(100))
        .service(handler_fn(handler(seen.clone(), true)));
    let started = Instant::now();
    let running = scene.start(service).await;
    let ids = scene.publish().await;
    scene.wait_handled(&seen, &ids, N).await;
    let report = scene.stop(running).await;
    let calls = seen.calls.lock().unwrap().clone();
    for id in &ids {
        let n = calls.get(id).copied().unwrap_or(0);
        assert!(
            n >= 2,
            "{}: message {id} handled after {n} call(s), but its first call cannot finish",
            scene.what
        );
    }
    assert!(
        report.nacked >= N as u64,
        "{}: {} nacks for {N} timed-out first calls",
        scene.what,
        report.nacked
    );
    println!(
        "{}: passed in {:.1?} ({} nacked)",
        scene.what,
        started.elapsed(),
        report.nacked
    );
}

async fn load_shed(backend: &str, broker: &AnyBroker) {
    let scene = Scene::new(backend, "LoadShed", broker);
    let seen = Arc::new(Seen::default());
    let shed = Arc::new(AtomicUsize::new(0));
    let count_shed = {
        let shed = shed.clone();
        move |e: BoxError| {
            if e.is::<tower::load_shed::error::Overloaded>() {
                shed.fetch_add(1, Ordering::SeqCst);
            }
            HandlerError::from_boxed(e)
        }
    };
    let service = ServiceBuilder::new()
        .map_err(count_shed)
        .load_shed()
        .concurrency_limit(2)
        .service(handler_fn(handler(seen.clone(), false)));
    let started = Instant::now();
    let running = scene.start(service).await;
    let ids = scene.publish().await;
    scene.wait_handled(&seen, &ids, N).await;
    let report = scene.stop(running).await;
    let shed = shed.load(Ordering::SeqCst) as u64;
    assert!(
        report.nacked >= shed,
        "{}: {shed} deliveries shed but only {} nacked",
        scene.what,
        report.nacked
    );
    let max = seen.max_running();
    assert!(
        max <= 2,
        "{}: {max} handlers ran at once under a limit of 2",
        scene.what
    );
    println!(
        "{}: passed in {:.1?} ({shed} shed and redelivered)",
        scene.what,
        started.elapsed()
    );
}

/// Every layer against one backend, concurrently (each on its own topic and group).
async fn every_layer(backend: &str, broker: AnyBroker) {
    tokio::join!(
        concurrency_limit(backend, &broker),
        rate_limit(backend, &broker),
        timeout_layer(backend, &broker),
        load_shed(backend, &broker),
    );
    timeout(LIMIT, broker.close())
        .await
        .expect("closing the broker took too long")
        .expect("close the broker");
}

/// A service whose first `poll_ready` fails; ready from then on.
#[derive(Clone)]
struct FailsReadyOnce<S> {
    inner: S,
    failed: Arc<AtomicBool>,
}

impl<S: Service<Delivery, Error = HandlerError>> Service<Delivery> for FailsReadyOnce<S> {
    type Response = S::Response;
    type Error = HandlerError;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        if !self.failed.swap(true, Ordering::SeqCst) {
            return Poll::Ready(Err(HandlerError::new(FailureKind::Transient, "not ready")));
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, d: Delivery) -> S::Future {
        self.inner.call(d)
    }
}

/// A readiness error fails the delivery it was waited for (nacked, then redelivered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_error_fails_that_delivery_on_memory() {
    let broker = switchyard::connect("memory://tower-ready-error")
        .await
        .unwrap();
    let scene = Scene::new("memory", "ReadyError", &broker);
    let seen = Arc::new(Seen::default());
    let service = FailsReadyOnce {
        inner: handler_fn(handler(seen.clone(), false)),
        failed: Arc::default(),
    };
    let running = scene.start(service).await;
    let ids = scene.publish().await;
    scene.wait_handled(&seen, &ids, N).await;
    let report = scene.stop(running).await;
    assert_eq!(report.nacked, 1, "{}: one delivery failed", scene.what);
    assert_eq!(
        report.acked, N as u64,
        "{}: every message acked",
        scene.what
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tower_layers_on_memory() {
    let broker = switchyard::connect("memory://tower-limits").await.unwrap();
    every_layer("memory", broker).await;
}

#[cfg(all(feature = "kafka", feature = "broker-tests"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tower_layers_on_kafka() {
    let url =
        std::env::var("SWITCHYARD_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".into());
    let broker = timeout(LIMIT, switchyard::connect(&url))
        .await
        .expect("connecting to Kafka took too long")
        .expect("Kafka must be reachable (scripts/test starts tansu)");
    every_layer("kafka", broker).await;
}

#[cfg(all(feature = "rabbitmq", feature = "broker-tests"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tower_layers_on_rabbitmq() {
    let url = std::env::var("SWITCHYARD_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let broker = timeout(LIMIT, switchyard::connect(&url))
        .await
        .expect("connecting to RabbitMQ took too long")
        .expect("RabbitMQ must be reachable (scripts/test starts it)");
    every_layer("rabbitmq", broker).await;
}
