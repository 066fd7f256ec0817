//! Kafka's delivery guarantees, each tested for what it promises. The kill runs use the
//! process-fault consumer (`examples/fault_consumer.rs`): SIGKILLed after it handled
//! part of a topic, then started again on the same group to finish.
//!
//! - `Guarantee::AtMostOnce` (`--guarantee at-most-once`; it implies `commit=sync`, here
//!   under a `commit=periodic` URL): never a duplicate; what was being handled at the
//!   kill may be lost, at most `concurrency` messages.
//! - `Guarantee::AtLeastOnce` with `commit=periodic`: nothing lost; the duplicates are
//!   messages handled before the kill whose commit had not happened yet.
//! - `commit=sync`: duplicates at most the in-flight messages — `tests/process_faults.rs`
//!   measures it with the same consumer.
//! - `commit=auto` with an at-least-once consumer is refused, naming both.
//! - `delivery=at-most-once` is the producer's side (`acks=0`): receipts carry no offset
//!   and a record is never written twice.
//! - `Nack::Reject` commits past the message: a later member of the group never sees it.
//!
//! Each kill run prints `fault=consumer-sigkill backend=kafka ... guarantee=...` past the
//! test harness's capture. Fails, never skips, when Kafka (`SWITCHYARD_KAFKA_URL`) is
//! unreachable.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard::{
    CancellationToken, Consumer, Delivery, Error, Guarantee, HandlerError, Message, Nack,
    SubscribeOptions,
};

mod fault_process;
use fault_process::{wait_for, Proc, Seen};
use switchyard_conformance::support::unique_name;

const CONCURRENCY: usize = 4;

/// A consumer group for one test: the tests run side by side, and members of one
/// group on different topics would rebalance each other (slowly, on tansu).
fn own_group() -> String {
    unique_name("g")
}

fn base_url() -> String {
    std::env::var("SWITCHYARD_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".into())
}

/// The broker URL with `settings` appended.
fn url_with(settings: &str) -> String {
    let base = base_url();
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}{settings}")
}

/// What a kill-and-restart run saw.
struct Outcome {
    published: usize,
    lost: usize,
    duplicated: usize,
    handled_at_kill: usize,
}

/// Publishes `messages`, kills the consumer once `kill_after` were handled, restarts it,
/// and waits until the second process has handled everything it is going to: all of
/// them, or (`may_lose`) until a sentinel published after the restart went through.
async fn kill_run(
    url: &str,
    extra: &[&str],
    messages: usize,
    kill_after: usize,
    may_lose: bool,
) -> Outcome {
    let topic = unique_name("sy-guarantee");
    let group = own_group();
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let mut args: Vec<String> = ["--url", url, "--topic", &topic, "--group", &group]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
    args.extend(["--concurrency".into(), CONCURRENCY.to_string()]);

    let first = Proc::spawn(&seen, &args);
    wait_for(
        &seen,
        Duration::from_secs(60),
        "the consumer to subscribe",
        |s| s.ready == 1,
    )
    .await;
    let broker = switchyard::connect(url)
        .await
        .expect("Kafka must be reachable at SWITCHYARD_KAFKA_URL");
    let batch: Vec<Message> = (0..messages)
        .map(|i| Message::new(format!("m{i}")).with_key(format!("k{}", i % 16)))
        .collect();
    let published: HashSet<String> = batch.iter().map(|m| m.id.clone()).collect();
    broker.publish_batch(&topic, batch).await.expect("publish");

    wait_for(&seen, Duration::from_secs(60), "part to be handled", |s| {
        s.counts.len() >= kill_after
    })
    .await;
    first.sigkill();
    let handled_at_kill = seen.lock().unwrap().counts.len();
    assert!(
        handled_at_kill < messages,
        "the kill came after every message was handled: lower the kill point"
    );

    let second = Proc::spawn(&seen, &args);
    if may_lose {
        // Lost messages never show: one sentinel per key, published after the restart,
        // comes after everything the group still owes on its partition.
        let sentinels: Vec<Message> = (0..16)
            .map(|k| Message::new("sentinel").with_key(format!("k{k}")))
            .collect();
        let ids: Vec<String> = sentinels.iter().map(|m| m.id.clone()).collect();
        broker
            .publish_batch(&topic, sentinels)
            .await
            .expect("publish");
        wait_for(
            &seen,
            Duration::from_secs(90),
            "the sentinels after the restart",
            |s| ids.iter().all(|id| s.counts.contains_key(id)),
        )
        .await;
    } else {
        wait_for(
            &seen,
            Duration::from_secs(90),
            "every message after the restart",
            |s| published.iter().all(|id| s.counts.contains_key(id)),
        )
        .await;
    }
    broker.close().await.unwrap();
    // Redeliveries come first after a restart; a moment for a straggler to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::spawn_blocking(move || second.stop(Duration::from_secs(20)))
        .await
        .unwrap();

    let seen = seen.lock().unwrap();
    let delivered = published
        .iter()
        .filter(|id| seen.counts.contains_key(*id))
        .count();
    Outcome {
        published: published.len(),
        lost: published.len() - delivered,
        duplicated: published
            .iter()
            .filter_map(|id| seen.counts.get(id))
            .map(|n| n - 1)
            .sum(),
        handled_at_kill,
    }
}

/// The machine-readable line, written past the harness's output capture.
fn report(o: &Outcome, guarantee: &str, commit: &str) {
    let _ = writeln!(
        std::io::stdout(),
        "fault=consumer-sigkill backend=kafka guarantee={guarantee} commit={commit} \
         published={} lost={} duplicated={} handled_at_kill={} concurrency={CONCURRENCY}",
        o.published,
        o.lost,
        o.duplicated,
        o.handled_at_kill
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_never_duplicates_across_a_sigkill() {
    // commit=periodic in the URL: at-most-once implies synchronous commits regardless.
    let url = url_with("commit=periodic&session.timeout.ms=6000");
    let extra = ["--guarantee", "at-most-once", "--delay-ms", "5"];
    let o = kill_run(&url, &extra, 300, 100, true).await;
    report(&o, "at-most-once", "periodic (implied sync)");
    assert_eq!(o.duplicated, 0, "at-most-once handled a message twice");
    assert!(
        o.lost <= CONCURRENCY,
        "{} lost, more than the {CONCURRENCY} handlers the kill could interrupt",
        o.lost
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_periodic_never_loses_across_a_sigkill() {
    let url = url_with("commit=periodic&session.timeout.ms=6000");
    let o = kill_run(&url, &["--delay-ms", "5"], 300, 100, false).await;
    report(&o, "at-least-once", "periodic");
    assert_eq!(o.lost, 0, "at-least-once lost messages");
    assert!(
        o.duplicated <= o.handled_at_kill,
        "{} duplicates: only what was handled before the kill comes back",
        o.duplicated
    );
}

#[tokio::test]
async fn commit_auto_refuses_an_at_least_once_consumer() {
    let broker = switchyard::connect(&url_with("commit=auto"))
        .await
        .expect("Kafka must be reachable at SWITCHYARD_KAFKA_URL");
    let topic = unique_name("sy-auto");
    let group = own_group();
    let consumer = Consumer::handler(SubscribeOptions::new(&topic, &group), |_: Delivery| async {
        Ok::<_, HandlerError>(())
    });
    let err = match consumer
        .start(broker.clone(), CancellationToken::new())
        .await
    {
        Ok(_) => panic!("commit=auto took an at-least-once consumer"),
        Err(e) => e,
    };
    match &err {
        Error::Config { setting, message } => {
            assert_eq!(setting, "commit", "{err}");
            assert!(message.contains("Guarantee::AtMostOnce"), "{err}");
        }
        other => panic!("not a config error: {other}"),
    }
    // The same URL takes an at-most-once consumer (which commits as commit=sync).
    let shutdown = CancellationToken::new();
    let running = Consumer::handler(SubscribeOptions::new(&topic, &group), |_: Delivery| async {
        Ok::<_, HandlerError>(())
    })
    .guarantee(Guarantee::AtMostOnce)
    .start(broker.clone(), shutdown.clone())
    .await
    .expect("commit=auto takes an at-most-once consumer");
    shutdown.cancel();
    running.join().await.unwrap();
    broker.close().await.unwrap();
}

#[tokio::test]
async fn producer_at_most_once_has_no_offsets_and_writes_once() {
    let url = url_with("delivery=at-most-once");
    let broker = switchyard::connect(&url)
        .await
        .expect("Kafka must be reachable at SWITCHYARD_KAFKA_URL");
    let topic = unique_name("sy-acks0");
    let group = own_group();
    let mut sub = broker
        .subscribe(SubscribeOptions::new(&topic, &group))
        .await
        .unwrap();
    let batch: Vec<Message> = (0..20).map(|i| Message::new(format!("m{i}"))).collect();
    let receipts = broker.publish_batch(&topic, batch).await.unwrap();
    assert!(
        receipts.iter().all(|r| r.offset.is_none()),
        "acks=0: the broker never says where a record went"
    );
    let mut counts: HashMap<String, usize> = HashMap::new();
    while counts.len() < 20 {
        // acks=0 promises nothing about arrival: a quiet spell ends the wait.
        let Ok(next) = tokio::time::timeout(Duration::from_secs(10), sub.recv()).await else {
            break;
        };
        let d = next.expect("the subscription stays open").unwrap();
        *counts.entry(d.id().to_string()).or_default() += 1;
        d.ack().await.unwrap();
    }
    sub.close().await.unwrap();
    broker.close().await.unwrap();
    assert!(
        counts.values().all(|&n| n == 1),
        "written twice: {counts:?}"
    );
}

#[tokio::test]
async fn a_rejected_message_is_committed_past() {
    let broker = switchyard::connect(&base_url())
        .await
        .expect("Kafka must be reachable at SWITCHYARD_KAFKA_URL");
    let topic = unique_name("sy-reject");
    let group = own_group();
    let mut sub = broker
        .subscribe(SubscribeOptions::new(&topic, &group))
        .await
        .unwrap();
    broker
        .publish(&topic, Message::new("rejected").with_key("k"))
        .await
        .unwrap();
    let d = sub.recv().await.unwrap().unwrap();
    assert_eq!(d.payload(), b"rejected");
    d.nack(Nack::Reject).await.unwrap();
    // Closing commits what is done, the rejected record included.
    sub.close().await.unwrap();

    let mut later = broker
        .subscribe(SubscribeOptions::new(&topic, &group))
        .await
        .unwrap();
    broker
        .publish(&topic, Message::new("probe").with_key("k"))
        .await
        .unwrap();
    let next = later.recv().await.unwrap().unwrap();
    assert_eq!(
        next.payload(),
        b"probe",
        "a rejected record is never handed to the group again (and Kafka has no \
         broker-side dead letter: it is gone)"
    );
    next.ack().await.unwrap();
    later.close().await.unwrap();
    broker.close().await.unwrap();
}
