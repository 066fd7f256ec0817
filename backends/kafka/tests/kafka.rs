//! Kafka-specific behaviour, against a real broker: tansu on 127.0.0.1:9092 (started by
//! the project's test command), or `SWITCHYARD_KAFKA_URL`. These tests fail, never skip,
//! when the broker is unreachable.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use switchyard_conformance::support::Tally;
use switchyard_core::{
    Broker, Consumer, Delivery, Error, Message, Publisher, SubscribeOptions, Subscriber,
};
use switchyard_kafka::{KafkaBroker, ReplayFrom};
use tokio_util::sync::CancellationToken;

mod common;
use common::{name, recv_n, url};

/// How long any wait in these tests may take before the test fails (a hang guard, not
/// a timing assertion).
const LONG: Duration = Duration::from_secs(90);

fn broker(settings: &str) -> KafkaBroker {
    KafkaBroker::connect(&url(settings)).expect("connect")
}

async fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    switchyard_conformance::support::wait_until(what, LONG, cond).await;
}

type Running = (
    tokio::task::JoinHandle<switchyard_core::Result<switchyard_core::ConsumerReport>>,
    CancellationToken,
);

fn start_member(broker: &Arc<KafkaBroker>, topic: &str, group: &str, seen: &Tally) -> Running {
    let handler = seen.handler();
    let token = CancellationToken::new();
    let consumer =
        Consumer::handler(SubscribeOptions::new(topic, group).prefetch(64), handler).concurrency(8);
    (
        tokio::spawn(consumer.run(broker.clone(), token.clone())),
        token,
    )
}

async fn stop_member((task, token): Running) {
    token.cancel();
    tokio::time::timeout(LONG, task)
        .await
        .expect("member stops")
        .expect("member task")
        .expect("member result");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_members_joining_and_leaving_mid_stream_lose_nothing() {
    let broker = Arc::new(broker(""));
    let (topic, group) = (name("churn"), name("g"));
    broker.ensure_topic(&topic).await.unwrap();
    let seen = Tally::default();
    let sent: Arc<Mutex<HashSet<String>>> = Arc::default();
    let publishing = Arc::new(AtomicBool::new(true));
    // A steady stream while members come and go.
    let publisher = {
        let (broker, topic, sent, publishing) = (
            broker.clone(),
            topic.clone(),
            sent.clone(),
            publishing.clone(),
        );
        tokio::spawn(async move {
            let mut i = 0;
            while publishing.load(Ordering::SeqCst) {
                let batch: Vec<Message> = (0..50)
                    .map(|j| Message::new(format!("m{i}-{j}")).with_key(format!("k{}", j % 10)))
                    .collect();
                sent.lock()
                    .unwrap()
                    .extend(batch.iter().map(|m| m.id.clone()));
                broker.publish_batch(&topic, batch).await.unwrap();
                i += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let a = start_member(&broker, &topic, &group, &seen);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let b = start_member(&broker, &topic, &group, &seen);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c = start_member(&broker, &topic, &group, &seen);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_member(a).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_member(b).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    publishing.store(false, Ordering::SeqCst);
    publisher.await.unwrap();
    let all = sent.lock().unwrap().clone();
    assert!(all.len() >= 500, "only {} published", all.len());
    wait_until("the last member to handle every message", || {
        seen.missing(&all) == 0
    })
    .await;
    stop_member(c).await;
    assert_eq!(seen.missing(&all), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn member_dropped_without_shutdown_leaves_its_messages_to_the_others() {
    let broker = broker("");
    let (topic, group) = (name("dropped"), name("g"));
    let mut first = broker
        .subscribe(SubscribeOptions::new(&topic, &group).prefetch(1000))
        .await
        .unwrap();
    let sent: Vec<Message> = (0..200).map(|i| Message::new(format!("d{i}"))).collect();
    broker.publish_batch(&topic, sent.clone()).await.unwrap();
    let got = recv_n(&mut first, 200).await;
    // Half are acked; the other half are still "being handled" when the member dies.
    let mut acked = HashSet::new();
    for d in got.iter().step_by(2) {
        d.ack().await.unwrap();
        acked.insert(d.id().to_string());
    }
    let unsettled: Vec<Delivery> = got.into_iter().filter(|d| !d.is_settled()).collect();
    drop(first); // no close: the member just goes away
    let mut second = broker
        .subscribe(SubscribeOptions::new(&topic, &group).prefetch(1000))
        .await
        .unwrap();
    let want: HashSet<String> = unsettled.iter().map(|d| d.id().to_string()).collect();
    let mut redelivered = HashSet::new();
    let mut buf = Vec::new();
    while !want.is_subset(&redelivered) {
        let n = tokio::time::timeout(LONG, second.recv_many(&mut buf, 1000))
            .await
            .expect("redelivery before the guard")
            .unwrap();
        assert!(n > 0);
        for d in buf.drain(..) {
            redelivered.insert(d.id().to_string());
            d.ack().await.unwrap();
        }
    }
    // Settling a dead member's delivery later does not pretend to succeed.
    let late = unsettled[0].ack().await;
    assert!(
        matches!(late, Err(Error::SubscriptionClosed { .. })),
        "{late:?}"
    );
    second.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn out_of_order_completion_never_commits_past_a_gap() {
    let broker = broker("partitions=1&commit_interval_ms=50");
    let (topic, group) = (name("gap"), name("g"));
    let mut sub = broker
        .subscribe(SubscribeOptions::new(&topic, &group))
        .await
        .unwrap();
    let sent: Vec<Message> = (0..10).map(|i| Message::new(format!("g{i}"))).collect();
    broker.publish_batch(&topic, sent.clone()).await.unwrap();
    let got = recv_n(&mut sub, 10).await;
    // Finish everything except offset 3, last first.
    for d in got.iter().rev() {
        if d.origin().offset != Some(3) {
            d.ack().await.unwrap();
        }
    }
    // Periodic commits run meanwhile; closing commits once more.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let gap = got
        .iter()
        .find(|d| d.origin().offset == Some(3))
        .unwrap()
        .id()
        .to_string();
    drop(got);
    sub.close().await.unwrap();
    let mut again = broker
        .subscribe(SubscribeOptions::new(&topic, &group))
        .await
        .unwrap();
    let redelivered = recv_n(&mut again, 7).await;
    let offsets: Vec<i64> = redelivered
        .iter()
        .map(|d| d.origin().offset.unwrap())
        .collect();
    assert_eq!(
        offsets,
        (3..10).collect::<Vec<_>>(),
        "the commit stopped at the unfinished offset 3"
    );
    assert_eq!(redelivered[0].id(), gap);
    for d in &redelivered {
        d.ack().await.unwrap();
    }
    again.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_key_always_lands_on_the_same_partition_in_order() {
    let topic = name("keys");
    let first = broker("");
    let mut partitions: HashMap<String, (i32, i64)> = HashMap::new();
    let mut spread = HashSet::new();
    // Two separate clients, several batches: the mapping is a property of the key.
    for round in 0..2 {
        let client = if round == 0 {
            first.clone()
        } else {
            broker("")
        };
        for batch in 0..3 {
            let msgs: Vec<Message> = (0..40)
                .map(|i| {
                    Message::new(format!("{round}-{batch}-{i}")).with_key(format!("key-{}", i % 20))
                })
                .collect();
            let receipts = client.publish_batch(&topic, msgs.clone()).await.unwrap();
            for (m, r) in msgs.iter().zip(receipts) {
                let key = m.key.clone().unwrap();
                let (p, o) = (r.partition.unwrap(), r.offset.unwrap());
                spread.insert(p);
                if let Some((prev_p, prev_o)) = partitions.insert(key.clone(), (p, o)) {
                    assert_eq!(prev_p, p, "{key} moved partition");
                    assert!(
                        o > prev_o,
                        "{key} went back in its partition: {o} after {prev_o}"
                    );
                }
            }
        }
    }
    assert!(spread.len() > 1, "20 keys all landed on one partition");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_a_group_from_an_offset_and_a_time() {
    let broker = broker("partitions=1");
    let (topic, group) = (name("replay"), name("g"));
    let mut sub = broker
        .subscribe(SubscribeOptions::new(&topic, &group))
        .await
        .unwrap();
    let first: Vec<Message> = (0..10).map(|i| Message::new(format!("r{i}"))).collect();
    broker.publish_batch(&topic, first.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let middle = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second: Vec<Message> = (10..20).map(|i| Message::new(format!("r{i}"))).collect();
    broker.publish_batch(&topic, second.clone()).await.unwrap();
    for d in recv_n(&mut sub, 20).await {
        d.ack().await.unwrap();
    }
    sub.close().await.unwrap();

    broker
        .replay(&topic, &group, ReplayFrom::Offset(15))
        .await
        .unwrap();
    let mut sub = broker
        .subscribe(SubscribeOptions::new(&topic, &group))
        .await
        .unwrap();
    let got = recv_n(&mut sub, 5).await;
    let offsets: Vec<i64> = got.iter().map(|d| d.origin().offset.unwrap()).collect();
    assert_eq!(offsets, vec![15, 16, 17, 18, 19]);
    for d in got {
        d.ack().await.unwrap();
    }
    sub.close().await.unwrap();

    broker
        .replay(&topic, &group, ReplayFrom::Timestamp(middle))
        .await
        .unwrap();
    let mut sub = broker
        .subscribe(SubscribeOptions::new(&topic, &group))
        .await
        .unwrap();
    let got = recv_n(&mut sub, 10).await;
    let ids: Vec<&str> = got.iter().map(|d| d.id()).collect();
    let want: Vec<&str> = second.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(
        ids, want,
        "replay from a time starts at the first later message"
    );
    for d in got {
        d.ack().await.unwrap();
    }
    sub.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn producer_to_an_unreachable_broker_fails_within_its_timeout_naming_the_address() {
    // Port 1 on loopback: nothing listens, connections are refused at once.
    let broker = KafkaBroker::connect("kafka://127.0.0.1:1?publish_timeout_ms=2000").unwrap();
    let result = tokio::time::timeout(LONG, broker.publish(&name("nowhere"), Message::new("x")))
        .await
        .expect("the publish gives up on its own, well before the guard");
    let err = result.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversize_message_is_a_typed_error_and_does_not_poison_its_batch() {
    let broker = broker("max_message_size=10000");
    assert_eq!(broker.capabilities().max_message_size, Some(10_000));
    let (topic, group) = (name("big"), name("g"));
    let mut sub = broker
        .subscribe(SubscribeOptions::new(&topic, &group))
        .await
        .unwrap();
    let before = Message::new("before");
    let big = Message::new(vec![7u8; 20_000]);
    let after = Message::new("after");
    let err = broker
        .publish_batch(&topic, vec![before.clone(), big.clone(), after.clone()])
        .await
        .unwrap_err();
    match err {
        Error::MessageTooLarge {
            id, size, limit, ..
        } => {
            assert_eq!((id, size, limit), (big.id.clone(), 20_000, 10_000));
        }
        other => panic!("expected MessageTooLarge, got {other}"),
    }
    let got = recv_n(&mut sub, 2).await;
    let ids: HashSet<&str> = got.iter().map(|d| d.id()).collect();
    assert_eq!(ids, HashSet::from([before.id.as_str(), after.id.as_str()]));
    for d in got {
        d.ack().await.unwrap();
    }
    // And the producer keeps working.
    broker.publish(&topic, Message::new("later")).await.unwrap();
    recv_n(&mut sub, 1).await[0].ack().await.unwrap();
    sub.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn foreign_records_without_switchyard_headers_are_consumed() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let broker = broker("");
    let (topic, group) = (name("foreign"), name("g"));
    let mut sub = broker
        .subscribe(SubscribeOptions::new(&topic, &group))
        .await
        .unwrap();
    let servers = broker.config().bootstrap_servers.clone();
    let raw: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &servers)
        .create()
        .unwrap();
    let (partition, offset) = raw
        .send(
            FutureRecord::to(&topic).key("k").payload("plain record"),
            Duration::from_secs(30),
        )
        .await
        .map(|d| (d.partition, d.offset))
        .unwrap();
    let d = recv_n(&mut sub, 1).await.remove(0);
    assert_eq!(d.payload(), b"plain record");
    assert_eq!(d.key(), Some("k"));
    assert_eq!(d.id(), format!("kafka:{topic}:{partition}:{offset}"));
    d.ack().await.unwrap();
    sub.close().await.unwrap();
}

#[tokio::test]
async fn url_settings_are_checked() {
    let err = switchyard_kafka::connect("kafka://127.0.0.1:9092?bogus=1")
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&err, Error::Config { setting, .. } if setting == "bogus"),
        "{err}"
    );
    let err = KafkaBroker::connect(&url("create_topics=false"))
        .unwrap()
        .publish(&name("absent"), Message::new("x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Config { setting, .. } if setting == "create_topics"),
        "{err}"
    );
}
