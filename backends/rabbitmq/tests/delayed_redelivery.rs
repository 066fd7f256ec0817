//! Delayed redelivery on RabbitMQ (hold queues and the group's return exchange), against
//! the real broker (127.0.0.1:5672, guest/guest; `SWITCHYARD_AMQP_URL` overrides). These
//! tests fail, never skip, when the broker is unreachable.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{cleanup_delays, cleanup_groups, exists, raw, unique, url};
use switchyard_core::{Broker, Error, Message, Publisher, SubscribeOptions, Subscriber};
use switchyard_rabbitmq::RabbitBroker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeliver_after_returns_to_the_group_only_after_the_delay_in_its_key_slot() {
    let broker = RabbitBroker::connect(&url()).await.unwrap();
    assert!(broker.capabilities().delayed_delivery);
    let topic = unique("delay");
    let (group, other) = ("g", "other");
    let mut sub = broker
        .subscribe(SubscribeOptions::new(&topic, group))
        .await
        .unwrap();
    let mut other_sub = broker
        .subscribe(SubscribeOptions::new(&topic, other))
        .await
        .unwrap();
    // 16 keyed messages and one unkeyed, with a binary payload and Unicode headers.
    let mut sent: Vec<Message> = (0..16)
        .map(|i| {
            Message::new(vec![0xff, 0x00, i as u8, 0xfe])
                .with_key(format!("kéy-{i}"))
                .with_header("ünï", format!("välue {i} ✓"))
                .with_header("empty", "")
        })
        .collect();
    sent.push(Message::new("no key").with_header("h", "v"));
    broker.publish_batch(&topic, sent.clone()).await.unwrap();
    let by_id: HashMap<String, Message> = sent.iter().map(|m| (m.id.clone(), m.clone())).collect();

    // The group takes each message, remembers its partition, and hands it back for later.
    let delay = Duration::from_millis(1500);
    let mut partition_of: HashMap<String, Option<i32>> = HashMap::new();
    let mut redelivered_at = None;
    for _ in 0..sent.len() {
        let d = sub.recv().await.unwrap().unwrap();
        partition_of.insert(d.id().to_string(), d.origin().partition);
        redelivered_at.get_or_insert_with(Instant::now);
        broker
            .redeliver_after(&topic, group, d.message().clone(), delay)
            .await
            .unwrap();
        d.ack().await.unwrap();
    }
    let first_redelivery = redelivered_at.unwrap();
    // The other group got the originals once, nothing more.
    for _ in 0..sent.len() {
        let d = other_sub.recv().await.unwrap().unwrap();
        d.ack().await.unwrap();
    }

    let mut back = 0;
    while back < sent.len() {
        let d = tokio::time::timeout(Duration::from_secs(60), sub.recv())
            .await
            .expect("the redelivered messages arrive")
            .unwrap()
            .unwrap();
        assert!(
            first_redelivery.elapsed() >= delay,
            "redelivered after {:?}, before the {delay:?} delay",
            first_redelivery.elapsed()
        );
        let original = &by_id[d.id()];
        let got = d.message();
        assert_eq!(got.key, original.key, "key of {}", d.id());
        assert_eq!(got.headers, original.headers, "headers of {}", d.id());
        assert_eq!(got.payload, original.payload, "payload of {}", d.id());
        assert_eq!(d.delivery_count(), 1);
        if original.key.is_some() {
            assert_eq!(
                d.origin().partition,
                partition_of[d.id()],
                "{} left its key's partition",
                d.id()
            );
        }
        d.ack().await.unwrap();
        back += 1;
    }
    // Nothing came back twice, and the other group's queues stay empty.
    assert!(
        tokio::time::timeout(Duration::from_secs(1), sub.recv())
            .await
            .is_err(),
        "a redelivered message came back twice"
    );
    assert_eq!(broker.lag(&topic, other).await.unwrap(), 0);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), other_sub.recv())
            .await
            .is_err(),
        "the other group received a redelivery meant for {group}"
    );

    sub.close().await.unwrap();
    other_sub.close().await.unwrap();
    broker.close().await.unwrap();
    cleanup_delays(&topic, group, &[1500]).await;
    cleanup_groups(&topic, &[group, other], 8).await;
    let conn = raw().await;
    for (name, exchange) in [
        (format!("{topic}:{group}.delay.1500"), false),
        (format!("{topic}:{group}.delay.1500"), true),
        (format!("{topic}:{group}.return"), true),
        (format!("{topic}:{group}.p0"), false),
        (topic.clone(), true),
    ] {
        assert!(
            !exists(&conn, &name, exchange).await,
            "{name} was left behind"
        );
    }
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test]
async fn redeliver_after_refuses_a_delay_beyond_the_ttl_limit_and_bad_names() {
    let broker = RabbitBroker::connect(&url()).await.unwrap();
    let err = broker
        .redeliver_after(
            "t",
            "g",
            Message::new("x"),
            Duration::from_secs(50 * 24 * 3600),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    let err = broker
        .redeliver_after("t", "no:colons", Message::new("x"), Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidName { .. }), "{err}");
    broker.close().await.unwrap();
}
