//! Retry and dead letters: a flaky failure is retried in process, a poison message goes to
//! the dead-letter topic, is listed there, and is replayed once the cause is fixed.
//!
//! Run: `cargo run --example retry_and_dlq [-- --url memory://]` (any `--url`:
//! `kafka://127.0.0.1:9092` with `--features kafka`, `amqp://guest:guest@127.0.0.1:5672/%2f`
//! with `--features rabbitmq`).
//!
//! The stack is dead letter (outermost: sees the final outcome) → retry → handler. Order
//! 5's first attempt times out and its retry succeeds; order 3's card is refused, a
//! permanent failure, so it is not retried but published to `<topic>.dlq` with the error
//! in its headers. `DeadLetterAdmin` lists it; after the card is updated, a replay sends it
//! back and it is charged. The last line is the summary; the exit status is 0 only when
//! all of that happened and the dead-letter topic is empty at the end.

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard::middleware::{
    DeadLetterAdmin, DeadLetterLayer, ReplayTo, RetryLayer, RetryPolicy, Selection,
};
use switchyard::{
    handler_fn, CancellationToken, Consumer, HandlerError, Json, PublisherExt, SubscribeOptions,
};
use tower::ServiceBuilder;

const ORDERS: u64 = 8;

#[derive(Default)]
struct Payments {
    charged: HashSet<u64>,
    /// Order 5's first attempt failed.
    gateway_failed: bool,
    /// Order 3's card works again.
    card_updated: bool,
}

async fn wait_for(what: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !what() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::main]
async fn main() -> switchyard::Result<ExitCode> {
    let url = std::env::args().skip_while(|a| a != "--url").nth(1);
    let broker = switchyard::connect(url.as_deref().unwrap_or("memory://")).await?;
    // Names of their own per run (a Kafka group spans topics), so leftovers and other
    // runs never mix in; ephemeral groups, so their broker state goes when the run ends.
    let run = switchyard::new_id()[24..].to_string();
    let topic = format!("payments-{run}");
    let dlq = format!("{topic}.dlq");
    // Replay to the topic: every backend can (only RabbitMQ can address the failed group).
    let dead_letters = DeadLetterAdmin::new(broker.clone())
        .group(format!("dlq-reader-{run}"))
        .idle(Duration::from_millis(300))
        .to(ReplayTo::Topic);
    dead_letters.prepare(&dlq).await?; // the reading group exists before the first letter

    let state: Arc<Mutex<Payments>> = Arc::default();
    let shared = state.clone();
    let io = std::io::Error::other::<&str>;
    let charge = move |Json(order): Json<u64>| {
        let state = shared.clone();
        async move {
            let mut s = state.lock().unwrap();
            if order == 3 && !s.card_updated {
                return Err(HandlerError::permanent(io("card 4242 expired")));
            }
            if order == 5 && !s.gateway_failed {
                s.gateway_failed = true;
                return Err(HandlerError::transient(io("gateway timeout")));
            }
            s.charged.insert(order);
            Ok(())
        }
    };
    let service = ServiceBuilder::new()
        .layer(DeadLetterLayer::new(broker.clone()))
        .layer(RetryLayer::new(RetryPolicy::new(3)?.backoff(
            Duration::from_millis(1),
            Duration::from_millis(20),
        )?))
        .service(handler_fn(charge));
    let shutdown = CancellationToken::new();
    let consumer = Consumer::new(
        SubscribeOptions::new(&topic, format!("payment-{run}")).ephemeral(true),
        service,
    );
    let running = consumer.start(broker.clone(), shutdown.clone()).await?;
    for order in 0..ORDERS {
        broker.publish_json(&topic, None, &order).await?;
    }
    wait_for(|| state.lock().unwrap().charged.len() as u64 == ORDERS - 1).await; // all but order 3

    let mut letters = Vec::new();
    for _ in 0..50 {
        letters = dead_letters.list(&dlq).await?; // waits `idle` for each further letter
        if !letters.is_empty() {
            break;
        }
    }
    let listed: Vec<u64> = letters
        .iter()
        .filter_map(|r| r.original().decode_json().ok())
        .collect();
    for r in &letters {
        eprintln!(
            "dead letter {} kind={:?} error={:?}",
            r.message.id, r.kind, r.error
        );
    }

    state.lock().unwrap().card_updated = true; // the cause is fixed: replay
    let replayed = dead_letters.replay(&dlq, &Selection::All).await?;
    wait_for(|| state.lock().unwrap().charged.contains(&3)).await;
    let left = dead_letters.list(&dlq).await?.len();
    shutdown.cancel();
    running.join().await?;
    broker.close().await?;

    let s = state.lock().unwrap();
    // Order 5 failed once and was charged without a dead letter: the retry layer did it.
    let retried = s.gateway_failed && s.charged.contains(&5);
    let all = (0..ORDERS).all(|o| s.charged.contains(&o));
    let ok = retried && listed == [3] && replayed.replayed.len() == 1 && all && left == 0;
    println!(
        "summary orders={ORDERS} retried_in_process={retried} dead_lettered={listed:?} replayed={} all_charged={all} dlq_left={left}",
        replayed.replayed.len()
    );
    Ok(ExitCode::from(u8::from(!ok)))
}
