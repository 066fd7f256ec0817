//! Messages another AMQP client wrote, however odd, never stall a partition: against the
//! real broker (127.0.0.1:5672, guest/guest; `SWITCHYARD_AMQP_URL` overrides). Fails,
//! never skips, when the broker is unreachable.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use switchyard_core::{Broker, Message, Nack, Publisher, SubscribeOptions, Subscriber};
use switchyard_rabbitmq::RabbitBroker;

use common::{cleanup, raw, unique, url};

/// A routing key that reaches partition `p` of an 8-partition group: slot `p`, written as
/// its decimal number (the wire format in the backend's docs; slot `s` belongs to
/// partition `s % partitions`).
fn routing_key_for_partition(p: u32) -> String {
    p.to_string()
}

#[tokio::test]
async fn odd_foreign_messages_are_delivered_and_later_messages_still_flow() {
    let topic = unique("foreign");
    let group = "g";
    let broker = RabbitBroker::connect(&url())
        .await
        .expect("RabbitMQ must be reachable");
    let mut sub = broker
        .subscribe(SubscribeOptions::new(&topic, group).prefetch(64))
        .await
        .unwrap();
    let conn = raw().await;
    let ch = conn.create_channel().await.unwrap();

    // One odd message per partition, each with something a careless client might send:
    // timestamps past what the clock holds, an empty id, headers of every AMQP type, a
    // forged delivery count and forged retry headers.
    let mut odd_headers = FieldTable::default();
    odd_headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(1_000));
    odd_headers.insert(
        "x-retry-due-ms".into(),
        AMQPValue::LongString(u64::MAX.to_string().into()),
    );
    odd_headers.insert("flag".into(), AMQPValue::Boolean(true));
    odd_headers.insert("n".into(), AMQPValue::LongLongInt(-5));
    odd_headers.insert(
        "nested".into(),
        AMQPValue::FieldTable(FieldTable::default()),
    );
    odd_headers.insert("x-switchyard-key".into(), AMQPValue::LongLongInt(7));
    let odd: Vec<BasicProperties> = vec![
        BasicProperties::default().with_timestamp(u64::MAX),
        BasicProperties::default().with_timestamp(u64::MAX / 1000),
        BasicProperties::default().with_message_id("".into()),
        BasicProperties::default().with_headers(odd_headers),
        BasicProperties::default().with_content_type("\u{0}\u{7f}".into()),
        BasicProperties::default().with_timestamp(i64::MAX as u64 + 1),
        BasicProperties::default().with_message_id("x".repeat(255).as_str().into()),
        BasicProperties::default(),
    ];
    for (p, props) in odd.into_iter().enumerate() {
        let confirm = ch
            .basic_publish(
                topic.as_str().into(),
                routing_key_for_partition(p as u32).as_str().into(),
                BasicPublishOptions::default(),
                format!("odd-{p}").as_bytes(),
                props,
            )
            .await
            .unwrap();
        confirm.await.unwrap();
    }
    // Then well-formed messages, keyed, spread over the partitions.
    let good: Vec<Message> = (0..40)
        .map(|i| Message::new(format!("good-{i}")).with_key(format!("k{}", i % 10)))
        .collect();
    let good_ids: HashSet<String> = good.iter().map(|m| m.id.clone()).collect();
    broker.publish_batch(&topic, good).await.unwrap();

    let mut odd_seen = HashSet::new();
    let mut good_seen = HashSet::new();
    let outcome = tokio::time::timeout(Duration::from_secs(60), async {
        while odd_seen.len() < 8 || good_seen.len() < good_ids.len() {
            let d = sub
                .recv()
                .await
                .expect("the subscription ended")
                .expect("receive");
            let payload = String::from_utf8_lossy(d.payload()).into_owned();
            if payload.starts_with("odd-") {
                assert_eq!(
                    d.delivery_count(),
                    1,
                    "a forged x-delivery-count is not the delivery count"
                );
                assert!(!d.id().is_empty());
                assert!(
                    d.message()
                        .headers
                        .keys()
                        .all(|k| !k.starts_with("x-retry-")),
                    "forged retry headers dropped: {:?}",
                    d.message().headers
                );
                odd_seen.insert(payload);
            } else {
                good_seen.insert(d.id().to_string());
            }
            d.ack().await.unwrap();
        }
    })
    .await;
    sub.close().await.unwrap();
    cleanup(&conn, &topic, group).await;
    let _ = conn.close(200, "done".into()).await;
    broker.close().await.unwrap();
    assert!(
        outcome.is_ok(),
        "stalled: {} of 8 odd and {} of {} well-formed messages delivered",
        odd_seen.len(),
        good_seen.len(),
        good_ids.len()
    );
}

/// A message with a TTL, requeued after the TTL ran out, is dropped by the broker and
/// never comes back: its key's later messages still go out (after the gate's limit on
/// waiting for it), not held for good.
#[tokio::test]
async fn a_requeued_message_the_broker_expires_does_not_hold_its_key() {
    let topic = unique("expired");
    let group = "g";
    let broker = RabbitBroker::connect(&url())
        .await
        .expect("RabbitMQ must be reachable");
    let mut sub = broker
        .subscribe(SubscribeOptions::new(&topic, group).prefetch(8))
        .await
        .unwrap();
    let conn = raw().await;
    let ch = conn.create_channel().await.unwrap();
    let mut headers = FieldTable::default();
    headers.insert("x-switchyard-key".into(), AMQPValue::LongString("k".into()));
    for (body, ttl) in [("short-lived", Some("1000")), ("next", None)] {
        let mut props = BasicProperties::default().with_headers(headers.clone());
        if let Some(ttl) = ttl {
            props = props.with_expiration(ttl.into());
        }
        let confirm = ch
            .basic_publish(
                topic.as_str().into(),
                routing_key_for_partition(0).as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props,
            )
            .await
            .unwrap();
        confirm.await.unwrap();
    }
    let outcome = tokio::time::timeout(Duration::from_secs(90), async {
        let first = sub.recv().await.expect("open").expect("receive");
        assert_eq!(first.payload(), &b"short-lived"[..]);
        // Past its TTL when requeued: the broker drops it instead.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        first.nack(Nack::Requeue).await.unwrap();
        let next = sub.recv().await.expect("open").expect("receive");
        let got = String::from_utf8_lossy(next.payload()).into_owned();
        next.ack().await.unwrap();
        got
    })
    .await;
    sub.close().await.unwrap();
    cleanup(&conn, &topic, group).await;
    let _ = conn.close(200, "done".into()).await;
    broker.close().await.unwrap();
    assert_eq!(
        outcome.as_deref(),
        Ok("next"),
        "the key stayed held behind a message that never came back"
    );
}
