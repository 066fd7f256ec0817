//! Rebalances of a member that back-pressure has paused, against a real broker: tansu
//! on 127.0.0.1:9092, or `SWITCHYARD_KAFKA_URL`. These tests fail, never skip, when the
//! broker is unreachable.
//!
//! A member pauses fetching when its buffer of received, not yet handed out records is
//! full. `queued.max.messages.kbytes=16` bounds that buffer to 16 KiB, so a few dozen
//! 1 KiB records that nobody asks for keep the member paused.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_core::{
    Broker, Error, Message, Publisher, SubscribeOptions, Subscriber, Subscription,
};
use switchyard_kafka::KafkaBroker;
use tokio_util::sync::CancellationToken;

mod common;
use common::{name, recv_n, url};

/// How long any wait may take before the test fails (a hang guard, not a timing
/// assertion).
const LONG: Duration = Duration::from_secs(30);
/// Records per test: far more than the 16 KiB buffer holds.
const RECORDS: usize = 200;
const PARTITIONS: usize = 4;

/// A broker whose members pause after 16 KiB of buffered payload.
fn broker(settings: &str) -> Arc<KafkaBroker> {
    // RUST_LOG=switchyard_kafka=debug shows the members' rebalances when a test fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let settings = format!("partitions={PARTITIONS}&queued.max.messages.kbytes=16&{settings}");
    Arc::new(KafkaBroker::connect(&url(settings.trim_end_matches('&'))).expect("connect"))
}

/// Publishes [`RECORDS`] 1 KiB records; their ids. Keyed, because librdkafka's sticky
/// partitioner would put a batch of unkeyed records on one partition; 40 keys reach
/// every partition.
async fn publish(broker: &KafkaBroker, topic: &str) -> HashSet<String> {
    let batch: Vec<Message> = (0..RECORDS)
        .map(|i| Message::new(vec![b'x'; 1024]).with_key(format!("k{}", i % 40)))
        .collect();
    let ids = batch.iter().map(|m| m.id.clone()).collect();
    broker.publish_batch(topic, batch).await.expect("publish");
    ids
}

async fn subscribe(
    broker: &KafkaBroker,
    topic: &str,
    group: &str,
    prefetch: usize,
) -> Box<dyn Subscription> {
    tokio::time::timeout(
        LONG,
        broker.subscribe(SubscribeOptions::new(topic, group).prefetch(prefetch)),
    )
    .await
    .expect("joined before the guard")
    .expect("subscribe")
}

/// Ids whose ack succeeded, and how often each was delivered.
#[derive(Clone, Default)]
struct Seen {
    acked: Arc<Mutex<HashSet<String>>>,
    delivered: Arc<Mutex<HashMap<String, usize>>>,
}

impl Seen {
    fn delivered(&self, id: &str) {
        *self
            .delivered
            .lock()
            .unwrap()
            .entry(id.to_string())
            .or_default() += 1;
    }
    fn acked(&self, id: &str) {
        self.acked.lock().unwrap().insert(id.to_string());
    }
    fn missing(&self, ids: &HashSet<String>) -> Vec<String> {
        let acked = self.acked.lock().unwrap();
        ids.iter()
            .filter(|id| !acked.contains(*id))
            .cloned()
            .collect()
    }
    fn times_delivered(&self, id: &str) -> usize {
        self.delivered.lock().unwrap().get(id).copied().unwrap_or(0)
    }
}

/// A member that handles (acks) everything it receives until stopped, then closes.
struct Drain {
    task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

fn drain(mut sub: Box<dyn Subscription>, seen: Seen) -> Drain {
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        let mut buf = Vec::new();
        loop {
            tokio::select! {
                _ = token.cancelled() => break,
                got = sub.recv_many(&mut buf, 64) => {
                    assert!(got.expect("recv") > 0, "subscription ended early");
                    for d in buf.drain(..) {
                        seen.delivered(d.id());
                        // A delivery of a partition revoked meanwhile fails to ack; its
                        // partition's next owner delivers it again.
                        if d.ack().await.is_ok() {
                            seen.acked(d.id());
                        }
                    }
                }
            }
        }
        tokio::time::timeout(LONG, sub.close())
            .await
            .expect("closed before the guard")
            .expect("close");
    });
    Drain { task, stop }
}

async fn stop(member: Drain) {
    member.stop.cancel();
    tokio::time::timeout(LONG, member.task)
        .await
        .expect("member stops before the guard")
        .expect("member task");
}

/// Waits until every id was acked; fails naming what is missing and the group's lag.
async fn wait_all_acked(
    broker: &KafkaBroker,
    topic: &str,
    group: &str,
    seen: &Seen,
    ids: &HashSet<String>,
) {
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let missing = seen.missing(ids);
        if missing.is_empty() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            let lag = broker.lag(topic, group).await;
            panic!(
                "{} of {} messages were never handled (group lag {lag:?}), e.g. {:?}",
                missing.len(),
                ids.len(),
                &missing[..missing.len().min(5)]
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Everything settled is committed once the members closed: no record is left behind
/// on any partition.
async fn assert_no_lag(broker: &KafkaBroker, topic: &str, group: &str) {
    let lag = broker.lag(topic, group).await.expect("lag");
    assert_eq!(lag, 0, "messages left uncommitted on {topic} for {group}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paused_member_fetches_again_after_a_member_joins_and_leaves() {
    let broker = broker("");
    let (topic, group) = (name("paused"), name("g"));
    broker.ensure_topic(&topic).await.unwrap();
    let seen = Seen::default();
    let mut a = subscribe(&broker, &topic, &group, 4).await;
    let ids = publish(&broker, &topic).await;
    // A handles a few, then nobody asks it for more: its buffer fills and it pauses.
    for d in recv_n(&mut a, 4).await {
        seen.delivered(d.id());
        d.ack().await.unwrap();
        seen.acked(d.id());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // B joins while A is paused: the group rebalances and A keeps half the partitions.
    let b = drain(subscribe(&broker, &topic, &group, 64).await, seen.clone());
    let deadline = tokio::time::Instant::now() + LONG;
    while seen.acked.lock().unwrap().len() <= 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "B handled nothing before the guard"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // B leaves: A gets every partition back, B's included.
    stop(b).await;

    // Now A handles what it is given: every message must come, none stays on a partition.
    let a = drain(a, seen.clone());
    wait_all_acked(&broker, &topic, &group, &seen, &ids).await;
    stop(a).await;
    assert_no_lag(&broker, &topic, &group).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_in_flight_across_a_rebalance_of_a_paused_member_are_not_lost() {
    // A revocation waits at most 1 s for in-flight deliveries, then lets them go.
    let broker = broker("revoke_timeout_ms=1000");
    let (topic, group) = (name("inflight"), name("g"));
    broker.ensure_topic(&topic).await.unwrap();
    let seen = Seen::default();
    let mut a = subscribe(&broker, &topic, &group, 4).await;
    let ids = publish(&broker, &topic).await;
    // A holds a full prefetch window unsettled, so its buffer fills and it pauses.
    let held = recv_n(&mut a, 4).await;
    for d in &held {
        seen.delivered(d.id());
    }

    let b = drain(subscribe(&broker, &topic, &group, 64).await, seen.clone());
    let deadline = tokio::time::Instant::now() + LONG;
    while seen.acked.lock().unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "B handled nothing before the guard"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Give A's revocation time to give up on the held deliveries (a setup wait: the
    // assertions below hold either way).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut released = Vec::new();
    for d in &held {
        match d.ack().await {
            Ok(()) => seen.acked(d.id()),
            Err(Error::SubscriptionClosed { .. }) => released.push(d.id().to_string()),
            Err(e) => panic!("ack of a held delivery: {e}"),
        }
    }
    drop(held);

    let a = drain(a, seen.clone());
    stop(b).await;
    wait_all_acked(&broker, &topic, &group, &seen, &ids).await;
    for id in &released {
        assert!(
            seen.times_delivered(id) >= 2,
            "{id} was in flight when its partition was revoked, and was not delivered again"
        );
    }
    stop(a).await;
    assert_no_lag(&broker, &topic, &group).await;
}
