//! Process faults: a consumer process (`examples/fault_consumer.rs`) is SIGKILLed after
//! it handled part of a topic, then started again on the same group to finish. Every
//! published message must be handled at least once, and the duplicates are bounded by
//! what the killed process could have left unsettled:
//!
//! - RabbitMQ: what the broker had delivered and not seen acked, at most `prefetch`
//!   (each partition channel's `basic.qos` share; their sum is `prefetch` while it is at
//!   least the partition count).
//! - Kafka with `commit=sync`: what lies above the committed offsets. Every ack commits
//!   its partition's watermark (the oldest unfinished offset) before it returns, so per
//!   partition that is the messages at or above the oldest one that was unhandled at the
//!   kill or among the last `concurrency` handled (their acks may still have been
//!   committing).
//!
//! The memory backend lives inside one process, so a killed consumer takes the broker
//! with it: not applicable. Each run prints one line, past the test harness's capture:
//! `fault=consumer-sigkill backend=... published=N delivered=N lost=0 duplicated=D ...`.
//!
//! The consumer binary is built by `cargo build --example fault_consumer` with this
//! test's features and profile (a no-op when `cargo test` built it already). Brokers
//! come from `SWITCHYARD_KAFKA_URL` / `SWITCHYARD_AMQP_URL` (local defaults); the tests
//! fail, never skip, when one is unreachable.
#![cfg(any(feature = "kafka", feature = "rabbitmq"))]

use std::collections::HashSet;
use std::io::Write;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard::Message;

mod fault_process;
use fault_process::{wait_for, Position, Proc, Seen};
use switchyard_conformance::support::unique_name;

/// One kill-and-restart run.
struct Run {
    backend: &'static str,
    url: String,
    topic: String,
    group: String,
    messages: usize,
    /// Kill once this many distinct ids were handled.
    kill_after: usize,
    /// Arguments for the example beyond `--url --topic --group`.
    extra: Vec<String>,
}

/// What a run saw.
struct Outcome {
    published: usize,
    delivered: usize,
    lost: usize,
    duplicated: usize,
    /// Handled lines before the kill.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))] // Kafka's bound reads it
    before_kill: Vec<Position>,
    handled_at_kill: usize,
}

impl Run {
    async fn go(&self) -> Outcome {
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let mut args = vec![
            "--url".to_string(),
            self.url.clone(),
            "--topic".to_string(),
            self.topic.clone(),
            "--group".to_string(),
            self.group.clone(),
        ];
        args.extend(self.extra.iter().cloned());

        let first = Proc::spawn(&seen, &args);
        // Subscribed before publishing: RabbitMQ keeps messages only for existing groups.
        wait_for(
            &seen,
            Duration::from_secs(60),
            "the consumer to subscribe",
            |s| s.ready == 1,
        )
        .await;
        let broker = switchyard::connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("{} must be reachable: {e}", self.backend));
        let messages: Vec<Message> = (0..self.messages)
            .map(|i| Message::new(format!("m{i}")).with_key(format!("k{}", i % 16)))
            .collect();
        let published: HashSet<String> = messages.iter().map(|m| m.id.clone()).collect();
        for chunk in messages.chunks(100) {
            broker
                .publish_batch(&self.topic, chunk.to_vec())
                .await
                .expect("publish");
        }
        broker.close().await.unwrap();

        let kill_after = self.kill_after;
        wait_for(&seen, Duration::from_secs(60), "part to be handled", |s| {
            s.counts.len() >= kill_after
        })
        .await;
        first.sigkill();
        let (before_kill, handled_at_kill) = {
            let seen = seen.lock().unwrap();
            (seen.handled.clone(), seen.counts.len())
        };
        assert!(
            handled_at_kill < self.messages,
            "the kill came after every message was handled: lower the kill point"
        );

        let second = Proc::spawn(&seen, &args);
        wait_for(
            &seen,
            Duration::from_secs(90),
            "every message to be handled after the restart",
            |s| published.iter().all(|id| s.counts.contains_key(id)),
        )
        .await;
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
        let strangers: Vec<&String> = seen
            .counts
            .keys()
            .filter(|id| !published.contains(*id))
            .collect();
        assert!(strangers.is_empty(), "ids never published: {strangers:?}");
        Outcome {
            published: published.len(),
            delivered,
            lost: published.len() - delivered,
            duplicated: seen.counts.values().map(|n| n - 1).sum(),
            before_kill,
            handled_at_kill,
        }
    }
}

/// The machine-readable line, written past the harness's output capture.
fn report(backend: &str, o: &Outcome, bound: usize, extra: &str) {
    let _ = writeln!(
        std::io::stdout(),
        "fault=consumer-sigkill backend={backend} published={} delivered={} lost={} \
         duplicated={} bound={bound} handled_at_kill={} {extra}",
        o.published,
        o.delivered,
        o.lost,
        o.duplicated,
        o.handled_at_kill
    );
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_consumer_sigkilled_and_restarted_handles_everything() {
    const CONCURRENCY: usize = 4;
    let base = std::env::var("SWITCHYARD_KAFKA_URL")
        .unwrap_or_else(|_| "kafka://127.0.0.1:9092".to_string());
    let sep = if base.contains('?') { '&' } else { '?' };
    // The killed member must time out of the group before it settles on the new one.
    let url = format!("{base}{sep}commit=sync&session.timeout.ms=6000");
    let extra = ["--concurrency", &CONCURRENCY.to_string(), "--delay-ms", "2"].map(String::from);
    let run = Run {
        backend: "kafka",
        url,
        topic: unique_name("sy-sigkill"),
        group: "sigkill".to_string(),
        messages: 1500,
        kill_after: 500,
        extra: extra.to_vec(),
    };
    let o = run.go().await;

    use std::collections::BTreeMap;
    // Per partition, the oldest offset the kill could have left uncommitted: the oldest
    // unhandled one, or the oldest of the last CONCURRENCY handled (still committing).
    let handled: HashSet<(i32, i64)> = o.before_kill.iter().flatten().copied().collect();
    let mut oldest_open: BTreeMap<i32, i64> = BTreeMap::new();
    let mut top: BTreeMap<i32, i64> = BTreeMap::new();
    for &(p, off) in &handled {
        let t = top.entry(p).or_insert(off);
        *t = (*t).max(off);
    }
    for (&p, &t) in &top {
        if let Some(gap) = (0..t).find(|off| !handled.contains(&(p, *off))) {
            oldest_open.insert(p, gap);
        }
    }
    for h in o.before_kill.iter().rev().take(CONCURRENCY) {
        let (p, off) = h.expect("Kafka deliveries have positions");
        let e = oldest_open.entry(p).or_insert(off);
        *e = (*e).min(off);
    }
    let bound = handled
        .iter()
        .filter(|(p, off)| oldest_open.get(p).is_some_and(|open| off >= open))
        .count();
    report(
        "kafka",
        &o,
        bound,
        &format!("commit=sync concurrency={CONCURRENCY}"),
    );
    assert_eq!(o.lost, 0, "messages never handled");
    assert!(
        o.duplicated <= bound,
        "{} duplicates, more than the {bound} handled messages the kill could have left \
         uncommitted",
        o.duplicated
    );
}

#[cfg(feature = "rabbitmq")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_consumer_sigkilled_and_restarted_handles_everything() {
    // At least the partition count (8), so the channels' shares add up to it.
    const PREFETCH: usize = 16;
    let url = std::env::var("SWITCHYARD_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string());
    let extra = [
        "--concurrency",
        "4",
        "--prefetch",
        &PREFETCH.to_string(),
        "--delay-ms",
        "2",
    ]
    .map(String::from);
    let topic = unique_name("sy-sigkill");
    let group = "sigkill".to_string();
    let run = Run {
        backend: "rabbitmq",
        url,
        topic: topic.clone(),
        group: group.clone(),
        messages: 1500,
        kill_after: 500,
        extra: extra.to_vec(),
    };
    // In a task, so the queues are deleted even when the run fails.
    let outcome = tokio::spawn(async move { run.go().await }).await;
    rabbitmq_cleanup(&topic, &group);
    let o = match outcome {
        Ok(o) => o,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    report(
        "rabbitmq",
        &o,
        PREFETCH,
        &format!("prefetch={PREFETCH} concurrency=4"),
    );
    assert_eq!(o.lost, 0, "messages never handled");
    assert!(
        o.duplicated <= PREFETCH,
        "{} duplicates, more than the prefetch of {PREFETCH} the kill could have left unacked",
        o.duplicated
    );
}

/// Deletes a group's queues and the topic's exchange with `rabbitmqctl` (this crate has
/// no AMQP client of its own): the broker's file-handle budget is small.
#[cfg(feature = "rabbitmq")]
fn rabbitmq_cleanup(topic: &str, group: &str) {
    let queues = (0..8)
        .map(|p| format!("{topic}:{group}.p{p}"))
        .chain([format!("{topic}:{group}.members")]);
    let mut expr = String::new();
    for q in queues {
        expr.push_str(&format!(
            "catch rabbit_amqqueue:delete(element(2, rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, <<\"{q}\">>))), false, false, <<\"test\">>), "
        ));
    }
    expr.push_str(&format!(
        "catch rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"{topic}\">>), false, <<\"test\">>), ok."
    ));
    let out = Command::new("rabbitmqctl")
        .args(["eval", &expr])
        .output()
        .expect("rabbitmqctl must be runnable (the test deletes what it made with it)");
    assert!(
        out.status.success(),
        "cleanup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
