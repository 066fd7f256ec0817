//! `Nack::Reject` on RabbitMQ: `basic.reject` without requeue. With
//! `dead_letter_exchange=` the broker routes the message to that exchange (a queue bound
//! to it receives it); without, the broker drops it. Either way it is never handed out
//! to the group again.

mod common;

use std::time::{Duration, Instant};

use common::{cleanup, raw, unique, url};
use lapin::options::{
    BasicGetOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use switchyard_core::{Broker, Message, Nack, Publisher, SubscribeOptions, Subscriber};
use switchyard_rabbitmq::RabbitBroker;

/// Subscribes `group`, publishes `rejected` then `probe` with one key (so one partition
/// queue, where a requeued message would be handed out before `probe`), rejects the
/// first delivery, and returns what the group was handed next.
async fn reject_then_next(broker: &RabbitBroker, topic: &str, group: &str) -> String {
    let mut sub = broker
        .subscribe(SubscribeOptions::new(topic, group))
        .await
        .unwrap();
    broker
        .publish(topic, Message::new("rejected").with_key("k"))
        .await
        .unwrap();
    let first = sub.recv().await.unwrap().expect("a delivery");
    assert_eq!(first.payload(), b"rejected");
    first.nack(Nack::Reject).await.unwrap();
    broker
        .publish(topic, Message::new("probe").with_key("k"))
        .await
        .unwrap();
    let next = sub.recv().await.unwrap().expect("a delivery");
    let payload = String::from_utf8_lossy(next.payload()).into_owned();
    next.ack().await.unwrap();
    sub.close().await.unwrap();
    payload
}

#[tokio::test]
async fn without_a_dead_letter_exchange_a_rejected_message_is_dropped() {
    let broker = RabbitBroker::connect(&url()).await.unwrap();
    assert!(!broker.capabilities().native_dead_letter);
    let (topic, group) = (unique("reject"), "g".to_string());
    let next = reject_then_next(&broker, &topic, &group).await;
    let lag = broker.lag(&topic, &group).await.unwrap();
    broker.close().await.unwrap();
    cleanup(&raw().await, &topic, &group).await;
    assert_eq!(next, "probe", "a rejected message is not redelivered");
    assert_eq!(
        lag, 0,
        "nothing of the rejected message is left in the group"
    );
}

#[tokio::test]
async fn with_a_dead_letter_exchange_a_rejected_message_reaches_it() {
    let dlx = unique("dlx");
    let broker = RabbitBroker::connect(&format!("{}?dead_letter_exchange={dlx}", url()))
        .await
        .unwrap();
    assert!(broker.capabilities().native_dead_letter);
    let (topic, group) = (unique("reject-dlx"), "g".to_string());
    // The group's first subscribe declares the exchange; bind a queue to it before any
    // message is rejected (the exchange drops what no queue is bound for).
    broker
        .subscribe(SubscribeOptions::new(&topic, &group))
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    let conn = raw().await;
    let ch = conn.create_channel().await.unwrap();
    let dead = unique("dead");
    ch.queue_declare(
        dead.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        dead.as_str().into(),
        dlx.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("the dead-letter exchange exists once a group was declared with it");

    let next = reject_then_next(&broker, &topic, &group).await;
    // Dead-lettering happens inside the broker, after the reject: wait for it, bounded.
    let deadline = Instant::now() + Duration::from_secs(10);
    let dead_lettered = loop {
        let got = ch
            .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap();
        if let Some(m) = got {
            break Some(m.delivery.data.clone());
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let lag = broker.lag(&topic, &group).await.unwrap();
    broker.close().await.unwrap();
    let _ = ch
        .queue_delete(dead.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .exchange_delete(dlx.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    cleanup(&conn, &topic, &group).await;
    assert_eq!(next, "probe", "a rejected message is not redelivered");
    assert_eq!(lag, 0);
    assert_eq!(
        dead_lettered.as_deref(),
        Some(&b"rejected"[..]),
        "the rejected message reaches the queue bound to dead_letter_exchange"
    );
}
