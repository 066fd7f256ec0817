//! `Consumer::guarantee` on the memory backend: at-most-once acks before the handler
//! runs, so a failing handler's message is gone; at-least-once acks after, so it comes
//! back.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use switchyard_core::{
    CancellationToken, Consumer, Delivery, FailureKind, Guarantee, HandlerError, Message,
    Publisher, SubscribeOptions, Subscriber,
};
use switchyard_memory::MemoryBroker;
use tokio::sync::mpsc;

/// What the handler saw: payload, attempt, and whether the delivery was already acked.
type Seen = (String, u32, bool);

/// Publishes `fail` (its handler fails on attempt 1) and then `after` with the same key,
/// so a redelivery of `fail` would come before `after`. Runs the consumer until `after`
/// was handled, and returns what the handler saw and the consumer's report.
async fn run(
    broker: Arc<MemoryBroker>,
    group: &str,
    guarantee: Guarantee,
) -> (Vec<Seen>, switchyard_core::ConsumerReport) {
    let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
    let (done_tx, mut done) = mpsc::unbounded_channel::<()>();
    let record = seen.clone();
    let handler = move |d: Delivery| {
        let record = record.clone();
        let done = done_tx.clone();
        async move {
            let payload = String::from_utf8_lossy(d.payload()).into_owned();
            record
                .lock()
                .push((payload.clone(), d.delivery_count(), d.is_settled()));
            if payload == "fail" && d.delivery_count() == 1 {
                return Err(HandlerError::new(FailureKind::Transient, "first try fails"));
            }
            if payload == "after" {
                let _ = done.send(());
            }
            Ok(())
        }
    };
    let shutdown = CancellationToken::new();
    let running = Consumer::handler(SubscribeOptions::new("orders", group), handler)
        .guarantee(guarantee)
        .concurrency(1)
        .redelivery_backoff(Duration::ZERO, Duration::ZERO)
        .start(broker.clone(), shutdown.clone())
        .await
        .unwrap();
    for payload in ["fail", "after"] {
        broker
            .publish("orders", Message::new(payload).with_key("k"))
            .await
            .unwrap();
    }
    done.recv().await.expect("`after` is handled");
    shutdown.cancel();
    let report = running.join().await.unwrap();
    let seen = seen.lock().clone();
    (seen, report)
}

/// The first delivery a new member of `group` gets once `probe` is published: a message
/// the group still owed would come first.
async fn next_for_group(broker: &MemoryBroker, group: &str) -> String {
    let mut sub = broker
        .subscribe(SubscribeOptions::new("orders", group))
        .await
        .unwrap();
    broker
        .publish("orders", Message::new("probe").with_key("k"))
        .await
        .unwrap();
    let mut buf = Vec::new();
    sub.recv_many(&mut buf, 1).await.unwrap();
    let first = String::from_utf8_lossy(buf[0].payload()).into_owned();
    buf[0].ack().await.unwrap();
    sub.close().await.unwrap();
    first
}

#[tokio::test]
async fn at_most_once_acks_before_the_handler_and_never_redelivers() {
    let broker = Arc::new(MemoryBroker::new());
    let (seen, report) = run(broker.clone(), "amo", Guarantee::AtMostOnce).await;
    assert_eq!(
        seen,
        vec![
            ("fail".to_string(), 1, true),
            ("after".to_string(), 1, true)
        ],
        "acked before the handler ran; the failed message is not handed out again"
    );
    assert_eq!((report.acked, report.nacked), (2, 0), "{report:?}");
    assert_eq!(
        next_for_group(&broker, "amo").await,
        "probe",
        "the group owes nothing: the failed message is lost"
    );
}

#[tokio::test]
async fn at_least_once_acks_after_the_handler_and_redelivers_a_failure() {
    let broker = Arc::new(MemoryBroker::new());
    let (seen, report) = run(broker.clone(), "alo", Guarantee::AtLeastOnce).await;
    assert_eq!(
        seen,
        vec![
            ("fail".to_string(), 1, false),
            ("fail".to_string(), 2, false),
            ("after".to_string(), 1, false)
        ],
        "unsettled while the handler runs; the failure comes back before the next same-key message"
    );
    assert_eq!((report.acked, report.nacked), (2, 1), "{report:?}");
    assert_eq!(next_for_group(&broker, "alo").await, "probe");
}

#[tokio::test]
async fn the_default_is_at_least_once() {
    let options = SubscribeOptions::new("orders", "g");
    assert_eq!(options.guarantee, Guarantee::AtLeastOnce);
    let consumer = Consumer::handler(options, |_: Delivery| async { Ok::<_, HandlerError>(()) });
    assert_eq!(consumer.options().guarantee, Guarantee::AtLeastOnce);
    let consumer = consumer.guarantee(Guarantee::AtMostOnce);
    assert_eq!(consumer.options().guarantee, Guarantee::AtMostOnce);
}

#[tokio::test]
async fn a_rejected_message_is_dropped() {
    let broker = MemoryBroker::new();
    let mut sub = broker
        .subscribe(SubscribeOptions::new("orders", "reject"))
        .await
        .unwrap();
    broker
        .publish("orders", Message::new("rejected").with_key("k"))
        .await
        .unwrap();
    let first = sub.recv().await.unwrap().unwrap();
    first.nack(switchyard_core::Nack::Reject).await.unwrap();
    sub.close().await.unwrap();
    assert_eq!(
        next_for_group(&broker, "reject").await,
        "probe",
        "a rejected message is not handed out again"
    );
}
