//! Scheduled publish (MassTransit's scheduled messages, Watermill's delayed publish):
//! messages published now for later, delivered to every group of the topic once due.
//!
//! Run: `cargo run --example scheduled [-- --url memory:// --topic reminders]` (any
//! `--url`: `kafka://127.0.0.1:9092` with `--features kafka`,
//! `amqp://guest:guest@127.0.0.1:5672/%2f` with `--features rabbitmq`).
//!
//! 200 reminders, each due 0 to 2 s from now (half by `publish_at`, half by
//! `publish_after`), carry their due time in a header; one group takes them and checks
//! none came early. The last line is the summary; the exit status is 0 only when every
//! reminder arrived, none before its time.

use std::collections::HashSet;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use switchyard::{Message, SubscribeOptions};

const MESSAGES: u64 = 200;

fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn arg(name: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != name).nth(1)
}

#[tokio::main]
async fn main() -> switchyard::Result<ExitCode> {
    let broker = switchyard::connect(&arg("--url").unwrap_or_else(|| "memory://".into())).await?;
    // Names of their own per run, so leftovers never mix in; an ephemeral group, so its
    // broker state goes when the run ends.
    let run = switchyard::new_id()[24..].to_string();
    let topic = arg("--topic").unwrap_or_else(|| format!("reminders-{run}"));
    let options = SubscribeOptions::new(&topic, format!("notifier-{run}")).ephemeral(true);
    // Subscribe first: RabbitMQ delivers to the groups that exist when a message is due.
    let mut sub = broker.subscribe(options).await?;

    // Scheduled from a task of their own, so each arrival is timed as it happens.
    let reminders: Vec<(Message, Duration)> = (0..MESSAGES)
        .map(|i| {
            // Spread over 0..=2000 ms without a random source: a multiplicative hash.
            let delay = Duration::from_millis(i.wrapping_mul(2_654_435_761) % 2001);
            (
                Message::new(format!("reminder {i}")).with_key(format!("user-{}", i % 10)),
                delay,
            )
        })
        .collect();
    let mut pending: HashSet<String> = reminders.iter().map(|(m, _)| m.id.clone()).collect();
    let (scheduler, target) = (broker.clone(), topic.clone());
    let scheduling = tokio::spawn(async move {
        for (i, (reminder, delay)) in reminders.into_iter().enumerate() {
            let due = SystemTime::now() + delay;
            let reminder = reminder.with_header("due-unix-us", micros(due).to_string());
            if i % 2 == 0 {
                scheduler.publish_at(&target, reminder, due).await?;
            } else {
                scheduler.publish_after(&target, reminder, delay).await?;
            }
        }
        switchyard::Result::Ok(())
    });

    let (mut delivered, mut early, mut late_ms) = (0u64, 0u64, Vec::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !pending.is_empty() {
        let Ok(Some(d)) = tokio::time::timeout_at(deadline, sub.recv()).await else {
            break;
        };
        let d = d?;
        let now = micros(SystemTime::now());
        let due = d.message().headers.get("due-unix-us");
        let due: u64 = due.and_then(|v| v.parse().ok()).unwrap_or(u64::MAX);
        if pending.remove(d.id()) {
            delivered += 1;
            if now < due {
                early += 1;
            } else {
                late_ms.push((now - due) / 1000);
            }
        }
        d.ack().await?;
    }
    scheduling.await.expect("the scheduling task panicked")?;
    sub.close().await?;
    broker.close().await?;

    late_ms.sort_unstable();
    let p99 = late_ms
        .get((late_ms.len().saturating_sub(1) * 99) / 100)
        .copied()
        .unwrap_or(0);
    let missing = pending.len();
    println!(
        "summary messages={MESSAGES} delivered={delivered} early={early} missing={missing} p99_late_ms={p99}"
    );
    let ok = delivered == MESSAGES && early == 0 && missing == 0;
    Ok(ExitCode::from(u8::from(!ok)))
}
