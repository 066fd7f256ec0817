//! Scheduled publish on RabbitMQ (the cascade of TTL queues), against the real broker
//! (127.0.0.1:5672, guest/guest; `SWITCHYARD_AMQP_URL` overrides). These tests fail,
//! never skip, when the broker is unreachable.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::{cleanup_groups, exists, raw, unique, url, PARTITIONS};
use switchyard_core::{Broker, Message, SubscribeOptions, Subscriber};
use switchyard_rabbitmq::RabbitBroker;

/// Level `n` of `topic`'s cascade, as the backend names it.
fn level(topic: &str, n: u32) -> String {
    format!("{topic}:~schedule.delay.{}", 16u64 << n)
}

/// Deletes the cascade's queues and exchanges.
async fn cleanup_levels(topic: &str) {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let conn = raw().await;
    for n in 0..28 {
        let ch = conn.create_channel().await.unwrap();
        let name = level(topic, n);
        let _ = ch
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = ch
            .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "cleanup".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_message_waits_in_the_broker_while_its_consumers_restart() {
    let topic = unique("sched");
    let groups = ["a", "b"];
    // The groups exist, then their consumers go away.
    let first = RabbitBroker::connect(&url()).await.unwrap();
    for g in groups {
        let sub = first
            .subscribe(SubscribeOptions::new(&topic, g))
            .await
            .unwrap();
        sub.close().await.unwrap();
    }
    let delay = Duration::from_millis(1500);
    let sent = Message::new(vec![0xff, 0x00, 0x7f])
        .with_key("kéy-7")
        .with_header("ünï", "välue ✓");
    let before = Instant::now();
    let due = SystemTime::now() + delay;
    first
        .publish_after(&topic, sent.clone(), delay)
        .await
        .unwrap();
    // Published into the cascade, not to the groups: none has it yet (checked only while
    // the delay has not passed, so a slow machine cannot fail it).
    let depth = first.lag(&topic, "a").await.unwrap();
    if before.elapsed() < delay {
        assert_eq!(depth, 0, "the message reached the group before it was due");
    }
    first.close().await.unwrap();

    // Other consumers, in a client of their own, find it once due, in every group.
    let second = RabbitBroker::connect(&url()).await.unwrap();
    for g in groups {
        let mut sub = second
            .subscribe(SubscribeOptions::new(&topic, g))
            .await
            .unwrap();
        let d = tokio::time::timeout(Duration::from_secs(60), sub.recv())
            .await
            .expect("the scheduled message arrives")
            .unwrap()
            .unwrap();
        assert!(
            SystemTime::now() >= due,
            "group {g} got it before it was due"
        );
        let got = d.message();
        assert_eq!(
            (&got.id, &got.key, &got.headers, &got.payload),
            (&sent.id, &sent.key, &sent.headers, &sent.payload),
            "group {g} got it changed"
        );
        d.ack().await.unwrap();
        sub.close().await.unwrap();
    }
    second.close().await.unwrap();
    cleanup_groups(&topic, &groups, PARTITIONS).await;
    cleanup_levels(&topic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_distinct_delays_share_the_power_of_two_levels() {
    let topic = unique("sched-levels");
    let broker = RabbitBroker::connect(&url()).await.unwrap();
    let sub = broker
        .subscribe(SubscribeOptions::new(&topic, "g"))
        .await
        .unwrap();
    // 100 distinct delays up to 900 ms: under 64 units of 16 ms with the spare
    // milliseconds, so six levels (16 ms to 512 ms) spell them all.
    for i in 1..=100u64 {
        broker
            .publish_after(&topic, Message::new("x"), Duration::from_millis(i * 9))
            .await
            .unwrap();
    }
    let conn = raw().await;
    for n in 0..6 {
        assert!(exists(&conn, &level(&topic, n), false).await, "level {n}");
    }
    assert!(!exists(&conn, &level(&topic, 6), false).await, "level 6");
    // No queue per delay (none of these is a power of two).
    for ms in [9, 27, 45, 900] {
        let per_delay = format!("{topic}:~schedule.delay.{ms}");
        assert!(!exists(&conn, &per_delay, false).await, "{per_delay}");
    }
    let _ = conn.close(200, "done".into()).await;
    sub.close().await.unwrap();
    broker.close().await.unwrap();
    cleanup_groups(&topic, &["g"], PARTITIONS).await;
    cleanup_levels(&topic).await;
}
