//! A publisher that never has to wait must not keep the consumers it wakes from running.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use switchyard_core::{Message, Publisher, SubscribeOptions, Subscriber};
use switchyard_memory::MemoryBroker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_publisher_lets_its_consumer_run_meanwhile() {
    let broker = Arc::new(MemoryBroker::new());
    let mut sub = broker
        .subscribe(SubscribeOptions::new("t", "g").prefetch(4096))
        .await
        .unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let counted = received.clone();
    let consumer = tokio::spawn(async move {
        let mut buf = Vec::new();
        while counted.load(Ordering::SeqCst) < 100 * 256 {
            buf.clear();
            let n = sub.recv_many(&mut buf, 1024).await.unwrap();
            for d in buf.drain(..) {
                d.ack().await.unwrap();
            }
            counted.fetch_add(n as u64, Ordering::SeqCst);
        }
    });
    // Publishing from a spawned task: the consumer is woken from the same worker.
    let publisher = {
        let broker = broker.clone();
        let received = received.clone();
        tokio::spawn(async move {
            for _ in 0..100 {
                let batch = (0..256).map(|_| Message::new("x")).collect();
                broker.publish_batch("t", batch).await.unwrap();
            }
            received.load(Ordering::SeqCst)
        })
    };
    let seen_while_publishing = publisher.await.unwrap();
    consumer.await.unwrap();
    assert!(
        seen_while_publishing > 0,
        "the consumer received nothing until the publisher stopped"
    );
}
