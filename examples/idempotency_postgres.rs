//! Needs PostgreSQL (default `postgres://postgres@127.0.0.1:5432/test`): idempotent
//! consumers with the durable store, so a message id runs once per group even when the
//! duplicate arrives after a restart.
//!
//! Run: `cargo run --features postgres --example idempotency_postgres [-- --postgres URL --url memory://]`
//! (any broker `--url`; the store's table, `switchyard_idempotency`, is created if missing).
//!
//! A producer that retries a publish sends the same message (same id) twice. The
//! `IdempotencyLayer` marks an id done in PostgreSQL once the handler succeeded and skips
//! it afterwards; the marks outlive the consumer, unlike an in-memory store's. The last
//! line is the summary; the exit status is 0 only when every charge ran exactly once.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard::middleware::{IdempotencyLayer, PostgresStore};
use switchyard::{
    handler_fn, CancellationToken, Consumer, Delivery, HandlerError, Message, SubscribeOptions,
};
use tower::ServiceBuilder;

fn arg(name: &str, default: &str) -> String {
    let value = std::env::args().skip_while(|a| a != name).nth(1);
    value.unwrap_or_else(|| default.to_string())
}

#[tokio::main]
async fn main() -> switchyard::Result<ExitCode> {
    let postgres = arg("--postgres", "postgres://postgres@127.0.0.1:5432/test");
    let broker = switchyard::connect(&arg("--url", "memory://")).await?;
    // Names of their own per run (a Kafka group spans topics), so leftovers and other
    // runs never mix in.
    let run = switchyard::new_id()[24..].to_string();
    let topic = format!("charges-{run}");
    let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let book = runs.clone();
    let charge = move |d: Delivery| {
        *book.lock().unwrap().entry(d.id().to_string()).or_default() += 1;
        async { Ok::<_, HandlerError>(()) } // the card would be charged here
    };
    // One key: the customer's charges run in order, so when `last` ran, all before it had.
    let order = |text: &str| Message::new(text.to_string()).with_key("customer-9");
    let (a, b, c) = (
        order("charge order 1"),
        order("charge order 2"),
        order("charge order 3"),
    );

    // Two lives of the consumer, each with its own connection to the store: the second
    // stands for the service after a restart, which still knows what the first did.
    let batches = [
        vec![a.clone(), a.clone(), b.clone()],
        vec![a.clone(), c.clone()],
    ];
    for batch in batches {
        let store = PostgresStore::connect(&postgres, None).await?;
        let service = ServiceBuilder::new()
            .layer(IdempotencyLayer::new(Arc::new(store)))
            .service(handler_fn(charge.clone()));
        let shutdown = CancellationToken::new();
        let consumer = Consumer::new(
            SubscribeOptions::new(&topic, format!("billing-{run}")),
            service,
        );
        let running = consumer.start(broker.clone(), shutdown.clone()).await?;
        let last = batch.last().map(|m| m.id.clone()).unwrap_or_default();
        broker.publish_batch(&topic, batch).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !runs.lock().unwrap().contains_key(&last) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        shutdown.cancel();
        running.join().await?;
    }
    broker.close().await?;

    let runs = runs.lock().unwrap();
    let count = |m: &Message| runs.get(&m.id).copied().unwrap_or(0);
    let ok = [&a, &b, &c].iter().all(|m| count(m) == 1) && runs.len() == 3;
    println!(
        "summary published=5 distinct=3 runs_order1={} runs_order2={} runs_order3={} exactly_once={ok}",
        count(&a),
        count(&b),
        count(&c)
    );
    Ok(ExitCode::from(u8::from(!ok)))
}
