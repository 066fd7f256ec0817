//! Panicking handlers inside the middleware stack: the idempotency mark is released so
//! the redelivery runs (instead of waiting out the lease), and the dead-letter layer sees
//! the panic as a failure of kind `panic`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchyard_core::{
    handler_fn, CancellationToken, Consumer, Delivery, FailureKind, HandlerError, Message,
    Publisher, SubscribeOptions,
};
use switchyard_memory::MemoryBroker;
use switchyard_middleware::{
    DeadLetterAdmin, DeadLetterLayer, IdempotencyLayer, MemoryStore, RetryLayer, RetryPolicy,
};
use tower::ServiceBuilder;

async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    // Far below the 300 s idempotency lease: a mark left in flight would hold the
    // redelivery that long.
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_releases_the_idempotency_mark() {
    let broker = Arc::new(MemoryBroker::new());
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = runs.clone();
        move |d: Delivery| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                if d.delivery_count() == 1 {
                    panic!("first attempt blows up");
                }
                Ok::<_, HandlerError>(())
            }
        }
    };
    let service = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(Arc::new(MemoryStore::default())))
        .service(handler_fn(handler));
    let token = CancellationToken::new();
    let running = Consumer::new(SubscribeOptions::new("p", "g"), service)
        .redelivery_backoff(Duration::from_millis(1), Duration::from_millis(1))
        .start(broker.clone(), token.clone())
        .await
        .unwrap();
    broker.publish("p", Message::new("x")).await.unwrap();
    wait_for("the redelivery to run", || runs.load(Ordering::SeqCst) >= 2).await;
    token.cancel();
    let report = running.join().await.unwrap();
    assert_eq!(report.acked, 1);
    assert_eq!(report.nacked, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_dead_lettered_as_a_panic() {
    let broker = Arc::new(MemoryBroker::new());
    let letters = DeadLetterAdmin::new(broker.clone()).idle(Duration::from_millis(200));
    let service = ServiceBuilder::new()
        .layer(DeadLetterLayer::new(broker.clone()))
        .service(handler_fn(|_d: Delivery| async move {
            panic!("always");
            #[allow(unreachable_code)]
            Ok::<_, HandlerError>(())
        }));
    let token = CancellationToken::new();
    let running = Consumer::new(SubscribeOptions::new("q", "g"), service)
        .start(broker.clone(), token.clone())
        .await
        .unwrap();
    broker.publish("q", Message::new("boom")).await.unwrap();
    let mut found = Vec::new();
    for _ in 0..50 {
        found = letters.list("q.dlq").await.unwrap();
        if !found.is_empty() {
            break;
        }
    }
    token.cancel();
    let report = running.join().await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].kind, Some(FailureKind::Panic));
    assert!(found[0].error.contains("always"), "{}", found[0].error);
    assert_eq!(report.acked, 1, "acked once dead-lettered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_is_retried_in_process_like_a_transient_failure() {
    let broker = Arc::new(MemoryBroker::new());
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = runs.clone();
        move |_d: Delivery| {
            let runs = runs.clone();
            async move {
                if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("first run blows up");
                }
                Ok::<_, HandlerError>(())
            }
        }
    };
    let retry = RetryPolicy::new(3)
        .unwrap()
        .backoff(Duration::from_millis(1), Duration::from_millis(5))
        .unwrap();
    let service = ServiceBuilder::new()
        .layer(DeadLetterLayer::new(broker.clone()))
        .layer(RetryLayer::new(retry))
        .service(handler_fn(handler));
    let token = CancellationToken::new();
    let running = Consumer::new(SubscribeOptions::new("r", "g"), service)
        .start(broker.clone(), token.clone())
        .await
        .unwrap();
    broker.publish("r", Message::new("x")).await.unwrap();
    wait_for("the retry to run", || runs.load(Ordering::SeqCst) >= 2).await;
    token.cancel();
    let report = running.join().await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(report.acked, 1);
    assert_eq!(report.nacked, 0, "retried in process, never nacked");
    let letters = DeadLetterAdmin::new(broker.clone()).idle(Duration::from_millis(100));
    assert!(letters.list("r.dlq").await.unwrap().is_empty());
}
