//! What a member holds stays bounded, and foreign messages cannot block a key: against
//! the real broker (127.0.0.1:5672, guest/guest; `SWITCHYARD_AMQP_URL` overrides).
//! Fails, never skips, when the broker is unreachable.

mod common;

use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use switchyard_core::{Message, Nack, Publisher, SubscribeOptions, Subscriber};
use switchyard_rabbitmq::headers;
use switchyard_rabbitmq::RabbitBroker;

use common::{cleanup, raw, unique, url, PARTITIONS};

/// Ready messages and consumers of each partition queue of the group.
async fn partition_stats(conn: &Connection, topic: &str, group: &str) -> Vec<(u32, u32)> {
    let ch = conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    for p in 0..PARTITIONS {
        let q = ch
            .queue_declare(
                format!("{topic}:{group}.p{p}").as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        out.push((q.message_count(), q.consumer_count()));
    }
    let _ = ch.close(200, "done".into()).await;
    out
}

async fn wait_all_consumed(conn: &Connection, topic: &str, group: &str) {
    let start = Instant::now();
    loop {
        let stats = partition_stats(conn, topic, group).await;
        if stats.iter().all(|(_, consumers)| *consumers == 1) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "partitions never all owned: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The routing key of `key`'s slot: FNV-1a 64 of the key modulo 1024, as a decimal number
/// (the wire format in the backend's docs).
fn routing_key(key: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % 1024).to_string()
}

/// A member of an 8-partition group with prefetch 12 must not take 12 messages on every
/// partition channel (96 in all) while handing out at most 12. What the broker has
/// delivered to it and not had settled (in its key gate or handed out) must stay within
/// its prefetch, also after its partitions changed hands and came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_holds_at_most_its_prefetch_over_all_its_partitions() {
    let topic = unique("bound");
    let group = "g";
    let conn = raw().await;
    // Run in a task so the queues are deleted even when an assertion fails.
    let outcome = tokio::spawn(holds_at_most_prefetch(topic.clone(), group)).await;
    cleanup(&conn, &topic, group).await;
    let _ = conn.close(200, "done".into()).await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn holds_at_most_prefetch(topic: String, group: &'static str) {
    let prefetch = 12;
    let conn = raw().await;
    let broker = RabbitBroker::connect(&url())
        .await
        .expect("RabbitMQ must be reachable");
    let options = SubscribeOptions::new(&topic, group).prefetch(prefetch);
    let mut first = broker.subscribe(options.clone()).await.unwrap();
    // A second member takes half the partitions, then leaves: the first one owns all
    // eight again, so its per-partition limits were recomputed twice.
    let second = broker.subscribe(options.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    wait_all_consumed(&conn, &topic, group).await;
    second.close().await.unwrap();
    wait_all_consumed(&conn, &topic, group).await;

    let total = 400u32;
    let messages: Vec<Message> = (0..total).map(|i| Message::new(format!("m{i}"))).collect();
    broker.publish_batch(&topic, messages).await.unwrap();

    // Ready counts only fall while nothing is settled, so `total - ready` read queue by
    // queue is at most what the member holds at the end of the read.
    let held = |stats: &[(u32, u32)]| total - stats.iter().map(|(ready, _)| ready).sum::<u32>();
    let start = Instant::now();
    let mut most = 0;
    while start.elapsed() < Duration::from_millis(1500) {
        let h = held(&partition_stats(&conn, &topic, group).await);
        most = most.max(h);
        assert!(
            h as usize <= prefetch,
            "the member holds {h} messages with prefetch {prefetch}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(most > 0, "the member received nothing");

    // Handing out all it may does not let it take more from the broker.
    let mut out = Vec::new();
    while out.len() < prefetch {
        let n = tokio::time::timeout(Duration::from_secs(10), first.recv_many(&mut out, prefetch))
            .await
            .expect("deliveries within 10 s")
            .unwrap();
        assert!(n > 0, "subscription closed");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let h = held(&partition_stats(&conn, &topic, group).await);
    assert!(
        h as usize <= prefetch,
        "{h} held with {} handed out",
        out.len()
    );
    for d in out {
        d.ack().await.unwrap();
    }
    first.close().await.unwrap();
    let _ = conn.close(200, "done".into()).await;
}

/// A keyed message from another AMQP client without a `message_id`, requeued once by
/// the handler, comes back and heads its key again, and the key's later messages
/// follow. With a new id on every delivery the member would not recognise the
/// redelivery and would hold the key until the channel died.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeued_foreign_message_without_an_id_comes_back_and_its_key_flows() {
    let topic = unique("noid");
    let group = "g";
    let key = "customer-7";
    let conn = raw().await;
    let broker = RabbitBroker::connect(&url())
        .await
        .expect("RabbitMQ must be reachable");
    let mut sub = broker
        .subscribe(SubscribeOptions::new(&topic, group))
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    for i in 0..3 {
        let mut headers = FieldTable::default();
        headers.insert(headers::KEY.into(), AMQPValue::LongString(key.into()));
        ch.basic_publish(
            topic.as_str().into(),
            routing_key(key).as_str().into(),
            BasicPublishOptions::default(),
            format!("f-{i}").as_bytes(),
            BasicProperties::default().with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }

    let mut seen = Vec::new();
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        while seen.len() < 4 {
            let d = sub.recv().await.expect("subscription open").unwrap();
            let payload = String::from_utf8_lossy(d.payload()).into_owned();
            seen.push((payload.clone(), d.delivery_count(), d.id().to_string()));
            if seen.len() == 1 {
                d.nack(Nack::Requeue).await.unwrap();
            } else {
                d.ack().await.unwrap();
            }
        }
    })
    .await;
    sub.close().await.unwrap();
    cleanup(&conn, &topic, group).await;
    let _ = conn.close(200, "done".into()).await;
    assert!(outcome.is_ok(), "the key stalled; got {seen:?}");
    let order: Vec<(&str, u32)> = seen.iter().map(|(p, a, _)| (p.as_str(), *a)).collect();
    assert_eq!(
        order,
        vec![("f-0", 1), ("f-0", 2), ("f-1", 1), ("f-2", 1)],
        "{seen:?}"
    );
    assert_eq!(seen[0].2, seen[1].2, "the redelivery keeps its id");
    assert_ne!(seen[1].2, seen[2].2, "distinct publishes have distinct ids");
}
