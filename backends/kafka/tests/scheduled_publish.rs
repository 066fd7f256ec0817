//! Scheduled publish on Kafka (the delay topic and its scheduler), against a real
//! broker: tansu on 127.0.0.1:9092, or `SWITCHYARD_KAFKA_URL`. These tests fail, never
//! skip, when the broker is unreachable.

use std::time::{Duration, SystemTime};

use switchyard_core::{Broker, Message, SubscribeOptions, Subscriber};
use switchyard_kafka::KafkaBroker;

mod common;
use common::{name, recv_n, url};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_message_waits_in_the_delay_topic_for_the_next_scheduler() {
    let topic = name("sched");
    let group = name("g");
    let sent = Message::new(vec![0xffu8, 0x00, 0x7f])
        .with_key("kéy-7")
        .with_header("ünï", "välue ✓");
    let delay = Duration::from_secs(2);
    let due = SystemTime::now() + delay;

    // One client schedules and goes away before the message is due: its scheduler stops
    // with it, and the message stays in the delay topic.
    let first = KafkaBroker::connect(&url("")).unwrap();
    first
        .publish_after(&topic, sent.clone(), delay)
        .await
        .unwrap();
    first.close().await.unwrap();

    // A later client's scheduler (started without scheduling anything) republishes it
    // once due, to a consumer that was not there when it was scheduled.
    let second = KafkaBroker::connect(&url("")).unwrap();
    let mut sub = second
        .subscribe(SubscribeOptions::new(&topic, &group))
        .await
        .unwrap();
    second.start_scheduler(&topic).unwrap();
    let d = recv_n(&mut sub, 1).await.remove(0);
    assert!(SystemTime::now() >= due, "delivered before it was due");
    let got = d.message();
    assert_eq!(
        (&got.id, &got.key, &got.headers, &got.payload),
        (&sent.id, &sent.key, &sent.headers, &sent.payload)
    );
    d.ack().await.unwrap();
    sub.close().await.unwrap();
    second.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_message_the_scheduler_can_never_publish_holds_up_nothing() {
    let topic = name("sched-big");
    let group = name("g");
    // Scheduled by a client allowing larger messages than the scheduler's: due first,
    // then two small ones of one key (one partition, so they arrive in order).
    let first = KafkaBroker::connect(&url("")).unwrap();
    let now = SystemTime::now();
    let big = Message::new(vec![7u8; 4096]).with_key("k");
    let small = Message::new("small").with_key("k");
    let last = Message::new("last").with_key("k");
    for (m, after) in [(&big, 1000), (&small, 1500), (&last, 2500)] {
        let when = now + Duration::from_millis(after);
        first.publish_at(&topic, m.clone(), when).await.unwrap();
    }
    first.close().await.unwrap();

    let second = KafkaBroker::connect(&url("max_message_size=1024")).unwrap();
    let mut sub = second
        .subscribe(SubscribeOptions::new(&topic, &group))
        .await
        .unwrap();
    second.start_scheduler(&topic).unwrap();
    // Every batch with the big one in it would fail and go out again, the small ones
    // with it: everything up to `last` arrives exactly once, and the big one never.
    let mut got = Vec::new();
    while got.last() != Some(&last.id) {
        let d = recv_n(&mut sub, 1).await.remove(0);
        got.push(d.id().to_string());
        d.ack().await.unwrap();
    }
    assert_eq!(got, [small.id.clone(), last.id.clone()]);
    sub.close().await.unwrap();
    second.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_whose_delay_topic_would_not_fit_is_refused_at_once() {
    let broker = KafkaBroker::connect(&url("")).unwrap();
    let long = "t".repeat(190);
    let err = broker
        .publish_after(&long, Message::new("x"), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("delay topic"), "{err}");
}
