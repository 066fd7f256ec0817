//! Retry and dead letters: a flaky failure is retried in process; a poison message goes to
//! the dead-letter topic, is listed there, and is replayed once its cause is fixed.
//!
//! Run: `cargo run --example retry_and_dlq [-- --url memory://]` (any `--url`:
//! `kafka://127.0.0.1:9092` with `--features kafka`, `amqp://guest:guest@127.0.0.1:5672/%2f`
//! with `--features rabbitmq`).
//!
//! The stack is dead letter (outermost: it sees the final outcome) → retry → handler.
//! Order 5 times out once and is retried; order 3's card is refused, a permanent failure
//! dead-lettered at once, until the card is updated and a replay brings it back. The exit
//! status is 0 only when all that happened and the dead-letter topic ends empty.

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard::middleware::{
    DeadLetterAdmin, DeadLetterLayer, ReplayTo, RetryLayer, RetryPolicy, Selection,
};
use switchyard::{handler_fn, CancellationToken, Consumer, HandlerError, Json, PublisherExt};
use tower::ServiceBuilder;

const ORDERS: usize = 8;

#[derive(Default)]
struct Payments {
    charged: HashSet<usize>,
    gateway_failed: bool, // order 5's first attempt failed
    card_updated: bool,   // order 3's card works again
}

/// The payment: order 3's card is refused until it is updated (permanent), order 5's
/// first attempt times out (transient).
fn charge(payments: &Mutex<Payments>, order: usize) -> Result<(), HandlerError> {
    let io = std::io::Error::other::<&str>;
    let mut p = payments.lock().unwrap();
    if order == 3 && !p.card_updated {
        return Err(HandlerError::permanent(io("card 4242 expired")));
    }
    if order == 5 && !std::mem::replace(&mut p.gateway_failed, true) {
        return Err(HandlerError::transient(io("gateway timeout")));
    }
    p.charged.insert(order);
    Ok(())
}

#[tokio::main]
async fn main() -> switchyard::Result<ExitCode> {
    let url = std::env::args().skip_while(|a| a != "--url").nth(1);
    let broker = switchyard::connect(url.as_deref().unwrap_or("memory://")).await?;
    // Names of their own per run, so leftovers never mix in; ephemeral groups leave none.
    let run = switchyard::new_id()[24..].to_string();
    let (topic, dlq) = (format!("payments-{run}"), format!("payments-{run}.dlq"));
    // Replay to the topic: every backend can (only RabbitMQ can address the failed group).
    let dead_letters = DeadLetterAdmin::new(broker.clone())
        .group(format!("dlq-reader-{run}"))
        .idle(Duration::from_millis(300))
        .to(ReplayTo::Topic);
    dead_letters.prepare(&dlq).await?; // the reading group exists before the first letter

    let payments: Arc<Mutex<Payments>> = Arc::default();
    let p = payments.clone();
    let handler = handler_fn(move |Json(order)| std::future::ready(charge(&p, order)));
    let retry =
        RetryPolicy::new(3)?.backoff(Duration::from_millis(1), Duration::from_millis(20))?;
    let service = ServiceBuilder::new()
        .layer(DeadLetterLayer::new(broker.clone()))
        .layer(RetryLayer::new(retry))
        .service(handler);
    let options = switchyard::SubscribeOptions::new(&topic, format!("payment-{run}"));
    let shutdown = CancellationToken::new();
    let consumer = Consumer::new(options.ephemeral(true), service);
    let running = consumer.start(broker.clone(), shutdown.clone()).await?;
    for order in 0..ORDERS {
        broker.publish_json(&topic, None, &order).await?;
    }

    // `list` waits `idle` for each further letter; the first may still be on its way.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut letters = Vec::new();
    while letters.is_empty() && Instant::now() < deadline {
        letters = dead_letters.list(&dlq).await?;
    }
    let mut listed = Vec::new(); // each letter's order and error, as an operator sees them
    for r in &letters {
        listed.push((r.original().decode_json::<usize>()?, r.error.clone()));
    }

    payments.lock().unwrap().card_updated = true; // the cause is fixed: replay
    let replayed = dead_letters.replay(&dlq, &Selection::All).await?;
    while payments.lock().unwrap().charged.len() < ORDERS && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let left = dead_letters.list(&dlq).await?.len();
    shutdown.cancel();
    running.join().await?;
    broker.close().await?;

    let p = payments.lock().unwrap();
    // Order 5 failed once and was charged without a dead letter: the retry layer did it.
    let retried = p.gateway_failed && p.charged.contains(&5);
    let all = (0..ORDERS).all(|o| p.charged.contains(&o));
    let replayed = replayed.replayed.len();
    let ok = retried && matches!(listed[..], [(3, _)]) && replayed == 1 && all && left == 0;
    println!("summary orders={ORDERS} retried_in_process={retried} dead_lettered={listed:?} replayed={replayed} all_charged={all} dlq_left={left}");
    Ok(ExitCode::from(u8::from(!ok)))
}
