//! `Guarantee::AtMostOnce` on RabbitMQ stays bounded: the consumer still acks (on
//! receipt, before the handler), rather than consuming with `no-ack`, so `basic.qos`
//! keeps what the broker pushes to a member within `prefetch` while handlers are busy.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{cleanup_groups, unique, url};
use switchyard_conformance::support::wait_until;
use switchyard_core::{
    Broker, CancellationToken, Consumer, Delivery, Guarantee, HandlerError, Message, Publisher,
    SubscribeOptions,
};
use switchyard_rabbitmq::RabbitBroker;
use tokio::sync::Semaphore;

const MESSAGES: usize = 100;
const PREFETCH: usize = 16;
const CONCURRENCY: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_keeps_prefetch_while_handlers_are_busy() {
    let broker = Arc::new(RabbitBroker::connect(&url()).await.unwrap());
    let (topic, group) = (unique("amo-bound"), "g".to_string());
    let started = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let handler = {
        let (started, gate) = (started.clone(), gate.clone());
        move |_: Delivery| {
            let (started, gate) = (started.clone(), gate.clone());
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                // Held until the test has looked at the queues.
                gate.acquire().await.unwrap().forget();
                Ok::<_, HandlerError>(())
            }
        }
    };
    let shutdown = CancellationToken::new();
    let options = SubscribeOptions::new(&topic, &group).prefetch(PREFETCH);
    let running = Consumer::handler(options, handler)
        .guarantee(Guarantee::AtMostOnce)
        .concurrency(CONCURRENCY)
        .start(broker.clone(), shutdown.clone())
        .await
        .unwrap();
    let batch: Vec<Message> = (0..MESSAGES)
        .map(|i| Message::new(format!("m{i}")).with_key(format!("k{i}")))
        .collect();
    broker.publish_batch(&topic, batch).await.unwrap();
    wait_until("the handlers to start", Duration::from_secs(30), || {
        started.load(Ordering::SeqCst) == CONCURRENCY
    })
    .await;
    // Give the broker time to push whatever it would; waiting only makes the check
    // stricter.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waiting = broker.lag(&topic, &group).await.unwrap() as usize;
    assert_eq!(started.load(Ordering::SeqCst), CONCURRENCY);
    // Past the harness's capture: how far the member ran ahead of its handlers.
    use std::io::Write;
    let _ = writeln!(
        std::io::stdout(),
        "at-most-once backend=rabbitmq out_of_queue={} bound={} prefetch={PREFETCH} concurrency={CONCURRENCY}",
        MESSAGES - waiting,
        CONCURRENCY + PREFETCH
    );
    assert!(
        waiting >= MESSAGES - CONCURRENCY - PREFETCH,
        "{} of {MESSAGES} messages left the queues with {CONCURRENCY} handlers busy: more \
         than the {CONCURRENCY} acked on receipt plus a prefetch of {PREFETCH}",
        MESSAGES - waiting
    );

    gate.add_permits(MESSAGES);
    wait_until(
        "every message to be handled",
        Duration::from_secs(60),
        || started.load(Ordering::SeqCst) == MESSAGES,
    )
    .await;
    shutdown.cancel();
    let report = running.join().await.unwrap();
    broker.close().await.unwrap();
    cleanup_groups(&topic, &["g"], common::PARTITIONS).await;
    assert_eq!(report.acked, MESSAGES as u64, "{report:?}");
}
