//! The memory backend's fault-injection mode, as an application would use it in tests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_core::{
    CancellationToken, Consumer, Delivery, Error, HandlerError, Message, Publisher,
    SubscribeOptions, Subscriber,
};
use switchyard_memory::MemoryBroker;

#[tokio::test]
async fn failed_publishes_are_transient_and_publish_nothing() {
    let broker = MemoryBroker::new();
    let mut sub = broker
        .subscribe(SubscribeOptions::new("t", "g"))
        .await
        .unwrap();
    broker.faults().fail_next_publishes(2);
    for _ in 0..2 {
        let err = broker
            .publish("t", Message::new("lost?"))
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err}");
    }
    broker.publish("t", Message::new("kept")).await.unwrap();
    let d = sub.recv().await.unwrap().unwrap();
    assert_eq!(
        d.payload(),
        b"kept",
        "the failed publishes must not have stored anything"
    );
    d.ack().await.unwrap();
    assert_eq!(broker.topic_stats("t").unwrap().0, 1);
}

#[tokio::test]
async fn delayed_acks_take_effect_late_and_nothing_is_redelivered_meanwhile() {
    let broker = MemoryBroker::new();
    let mut sub = broker
        .subscribe(SubscribeOptions::new("t", "g"))
        .await
        .unwrap();
    broker
        .publish("t", Message::new("slow ack").with_key("k"))
        .await
        .unwrap();
    broker
        .publish("t", Message::new("same key").with_key("k"))
        .await
        .unwrap();
    broker.faults().delay_acks(Duration::from_millis(200));
    let d = sub.recv().await.unwrap().unwrap();
    let started = Instant::now();
    let ack = tokio::spawn(async move { d.ack().await });
    // Until the ack lands, the key's next message is held back.
    let early = tokio::time::timeout(Duration::from_millis(100), sub.recv()).await;
    assert!(
        early.is_err(),
        "the same-key successor arrived before the delayed ack landed"
    );
    ack.await.unwrap().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(200));
    broker.faults().delay_acks(Duration::ZERO);
    let next = sub.recv().await.unwrap().unwrap();
    assert_eq!(next.payload(), b"same key");
    next.ack().await.unwrap();
}

#[tokio::test]
async fn dropped_consumers_hand_their_work_to_the_group() {
    let broker = MemoryBroker::new();
    let mut doomed = broker
        .subscribe(SubscribeOptions::new("t", "g").prefetch(5))
        .await
        .unwrap();
    for i in 0..5 {
        broker
            .publish("t", Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    let mut held = Vec::new();
    while held.len() < 5 {
        held.push(doomed.recv().await.unwrap().unwrap());
    }
    assert_eq!(broker.faults().drop_consumers("t"), 1);
    assert!(
        doomed.recv().await.is_none(),
        "a dropped consumer's stream ends"
    );
    let err = held[0].ack().await.unwrap_err();
    assert!(matches!(err, Error::SubscriptionClosed { .. }), "{err}");
    let mut survivor = broker
        .subscribe(SubscribeOptions::new("t", "g"))
        .await
        .unwrap();
    for _ in 0..5 {
        let d = survivor.recv().await.unwrap().unwrap();
        assert_eq!(d.delivery_count(), 2);
        d.ack().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_loses_nothing_when_a_consumer_dies_mid_stream() {
    let broker = Arc::new(MemoryBroker::new());
    let handled = Arc::new(AtomicUsize::new(0));
    let distinct: Arc<std::sync::Mutex<std::collections::HashSet<String>>> = Arc::default();
    let handler = {
        let (handled, distinct) = (handled.clone(), distinct.clone());
        move |d: Delivery| {
            let (handled, distinct) = (handled.clone(), distinct.clone());
            async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                handled.fetch_add(1, Ordering::SeqCst);
                distinct.lock().unwrap().insert(d.id().to_string());
                Ok::<_, HandlerError>(())
            }
        }
    };
    let token = CancellationToken::new();
    let first = Consumer::handler(SubscribeOptions::new("t", "g"), handler.clone())
        .start(broker.clone(), token.clone())
        .await
        .unwrap();
    for i in 0..500 {
        broker
            .publish("t", Message::new(format!("{i}")))
            .await
            .unwrap();
    }
    while handled.load(Ordering::SeqCst) < 50 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    broker.faults().drop_consumers("t");
    // The dead consumer's runtime notices its stream ended and stops by itself.
    let report = first.join().await.unwrap();
    assert!(report.acked < 500);
    let second = Consumer::handler(SubscribeOptions::new("t", "g"), handler)
        .start(broker.clone(), token.clone())
        .await
        .unwrap();
    while distinct.lock().unwrap().len() < 500 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    token.cancel();
    second.join().await.unwrap();
    assert_eq!(distinct.lock().unwrap().len(), 500, "every message handled");
    // Handled twice at most for the deliveries in the dead consumer's hands.
    assert!(handled.load(Ordering::SeqCst) <= 500 + 16 + 256);
}
