//! Publish-subscribe: one topic, three services, each its own group, and every group
//! gets every event.
//!
//! Run: `cargo run --example pub_sub [-- --url memory://]` (any `--url`:
//! `kafka://127.0.0.1:9092` with `--features kafka`, `amqp://guest:guest@127.0.0.1:5672/%2f`
//! with `--features rabbitmq`).
//!
//! A group is a subscriber's name: billing, email and audit each subscribe with their
//! own, so each sees the whole stream; two members of one group would share it instead
//! (see the `competing_consumers` example). The last line is the summary; the exit status
//! is 0 only when each group handled every event exactly once.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard::{
    App, CancellationToken, Consumer, Delivery, HandlerError, PublisherExt, SubscribeOptions,
};

const EVENTS: usize = 20;
const GROUPS: [&str; 3] = ["billing", "email", "audit"];

#[derive(serde::Serialize, serde::Deserialize)]
struct UserSignedUp {
    user: u64,
}

/// Ids each group handled, with how many times.
type Seen = Arc<Mutex<HashMap<String, u32>>>;

#[tokio::main]
async fn main() -> switchyard::Result<ExitCode> {
    let url = std::env::args().skip_while(|a| a != "--url").nth(1);
    let broker = switchyard::connect(url.as_deref().unwrap_or("memory://")).await?;
    // Names of their own per run (a Kafka group spans topics), so leftovers and other
    // runs never mix in; ephemeral groups, so their broker state goes when the run ends.
    let run = switchyard::new_id()[24..].to_string();
    let topic = format!("signups-{run}");

    let shutdown = CancellationToken::new();
    let mut app = App::new(broker.clone());
    let seen: Vec<Seen> = GROUPS.iter().map(|_| Seen::default()).collect();
    for (group, seen) in GROUPS.iter().zip(&seen) {
        let seen = seen.clone();
        let handler = move |d: Delivery| {
            *seen.lock().unwrap().entry(d.id().to_string()).or_default() += 1;
            async { Ok::<_, HandlerError>(()) }
        };
        app = app.consumer(Consumer::handler(
            SubscribeOptions::new(&topic, format!("{group}-{run}")).ephemeral(true),
            handler,
        ));
    }
    // Every group subscribes before the first publish, so brokers without replay keep all.
    let running = app.start(shutdown.clone()).await?;

    let mut published = Vec::new();
    for user in 0..EVENTS as u64 {
        let receipt = broker
            .publish_json(&topic, None, &UserSignedUp { user })
            .await?;
        published.push(receipt.id);
    }

    let complete = || seen.iter().all(|s| s.lock().unwrap().len() >= EVENTS);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !complete() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Give a duplicate, if the broker sent one, the time to show up.
    tokio::time::sleep(Duration::from_millis(200)).await;
    shutdown.cancel();
    running.join().await?;
    broker.close().await?;

    let mut ok = true;
    let mut counts = Vec::new();
    for (group, seen) in GROUPS.iter().zip(&seen) {
        let seen = seen.lock().unwrap();
        // Each group saw exactly the published ids, each once.
        ok &= published.iter().all(|id| seen.get(id) == Some(&1)) && seen.len() == EVENTS;
        counts.push(format!("{group}={}", seen.len()));
    }
    println!(
        "summary published={EVENTS} {} every_group_got_every_event={ok}",
        counts.join(" ")
    );
    Ok(ExitCode::from(u8::from(!ok)))
}
