//! Kafka only: move a consumer group back to an offset or a time, so it re-reads from there
//! (after fixing a bug in a handler, say).
//!
//! Run: `cargo run --features kafka --example kafka_replay [-- --url kafka://127.0.0.1:9092]`
//! (a Kafka-compatible broker listening there; the default is the local one).
//!
//! A group `reports-…` reads ten events and stops; `KafkaBroker::replay` moves its
//! committed position, first to the offset of event 6, then to the time between events 4
//! and 5, and each time the group's next member starts there. Stop a group's members
//! before moving it: a running member would commit over the new position. The last line
//! is the summary; the exit status is 0 only when each read saw exactly the events it
//! should, in order.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use switchyard::kafka::{KafkaBroker, ReplayFrom};
use switchyard::{Broker, Message, Publisher, SubscribeOptions, Subscriber};

/// Reads `n` messages as a member of `group` (then waits briefly for extras), acks them,
/// and leaves the group; returns their payloads in order.
async fn read(
    broker: &KafkaBroker,
    topic: &str,
    group: &str,
    n: usize,
) -> switchyard::Result<Vec<String>> {
    let mut member = broker
        .subscribe(SubscribeOptions::new(topic, group))
        .await?;
    let mut payloads = Vec::new();
    let mut wait = Duration::from_secs(30);
    while let Ok(Some(delivery)) = tokio::time::timeout(wait, member.recv()).await {
        let delivery = delivery?;
        payloads.push(String::from_utf8_lossy(delivery.payload()).into_owned());
        delivery.ack().await?;
        if payloads.len() >= n {
            wait = Duration::from_millis(500);
        }
    }
    member.close().await?;
    Ok(payloads)
}

#[tokio::main]
async fn main() -> switchyard::Result<ExitCode> {
    let url = std::env::args().skip_while(|a| a != "--url").nth(1);
    let broker = KafkaBroker::connect(url.as_deref().unwrap_or("kafka://127.0.0.1:9092"))?;
    // Names of their own per run, so leftovers and other runs never mix in.
    let run = switchyard::new_id()[24..].to_string();
    let (topic, group) = (format!("ledger-{run}"), format!("reports-{run}"));
    let event = |i: usize| Message::new(format!("event-{i}")).with_key("account-1");

    // One key, so every event lands on one partition and offsets count them.
    let first = broker
        .publish_batch(&topic, (0..5).map(event).collect())
        .await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let between = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = broker
        .publish_batch(&topic, (5..10).map(event).collect())
        .await?;
    let all: Vec<String> = (0..10).map(|i| format!("event-{i}")).collect();

    let read_all = read(&broker, &topic, &group, 10).await?;

    // Back to event 6, by the partition and offset its publish returned.
    let (Some(partition), Some(offset)) = (second[1].partition, second[1].offset) else {
        return Err(switchyard::Error::config(
            "url",
            "the broker gave no offsets",
        ));
    };
    let to_offset = ReplayFrom::Offsets(vec![(partition, offset)]);
    broker.replay(&topic, &group, to_offset).await?;
    let from_offset = read(&broker, &topic, &group, 4).await?;

    // Back to the time between events 4 and 5.
    let to_time = ReplayFrom::Timestamp(between);
    broker.replay(&topic, &group, to_time).await?;
    let from_time = read(&broker, &topic, &group, 5).await?;
    broker.close().await?;

    let ok = read_all == all && from_offset == all[6..] && from_time == all[5..];
    println!(
        "summary published={} first_read={} from_offset_{offset}={} (first {:?}) from_time={} (first {:?}) as_expected={ok}",
        first.len() + second.len(),
        read_all.len(),
        from_offset.len(),
        from_offset.first(),
        from_time.len(),
        from_time.first(),
    );
    Ok(ExitCode::from(u8::from(!ok)))
}
