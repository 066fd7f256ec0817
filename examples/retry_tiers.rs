//! Retry tiers (Spring Kafka's `@RetryableTopic`): a failed message waits out a delay
//! outside its consumer, so the messages behind it are not held up.
//!
//! Run: `cargo run --example retry_tiers [-- --url memory://]` (any `--url`:
//! `kafka://127.0.0.1:9092` with `--features kafka`, `amqp://guest:guest@127.0.0.1:5672/%2f`
//! with `--features rabbitmq`).
//!
//! Tiers of 200 ms and 400 ms: a failure goes to the next tier (RabbitMQ delays it
//! itself; Kafka and memory use tier topics `<topic>.<group>.retry.<n>` with their own
//! consumers, which `RetryTiers::add_consumers` adds) and the original is acked. The
//! stock update for SKU 0 fails twice, so it comes back after 200 ms, then 400 ms; the
//! nine updates published after it, same key, are done meanwhile. The trade-off against
//! in-process retry: same-key order is given up. The last line is the summary; the exit
//! status is 0 only when every update was applied, SKU 0 last, after both delays.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard::middleware::{DeadLetterLayer, RetryTiers, RetryTiersLayer};
use switchyard::{
    handler_fn, App, CancellationToken, HandlerError, Json, Message, SubscribeOptions,
};
use tower::ServiceBuilder;

const UPDATES: u64 = 10;
const DELAYS: [Duration; 2] = [Duration::from_millis(200), Duration::from_millis(400)];

#[derive(Default)]
struct Stock {
    /// SKUs in the order their update was applied.
    applied: Vec<u64>,
    /// When SKU 0 first failed, how often it did, and how long it took to succeed.
    first_failure: Option<Instant>,
    failures: u32,
    waited: Duration,
}

#[tokio::main]
async fn main() -> switchyard::Result<ExitCode> {
    let url = std::env::args().skip_while(|a| a != "--url").nth(1);
    let broker = switchyard::connect(url.as_deref().unwrap_or("memory://")).await?;
    // Names of their own per run (a Kafka group spans topics), so leftovers and other
    // runs never mix in; ephemeral groups, so their broker state goes when the run ends.
    let run = switchyard::new_id()[24..].to_string();
    let topic = format!("stock-{run}");

    let stock: Arc<Mutex<Stock>> = Arc::default();
    let shared = stock.clone();
    let update = move |Json(sku): Json<u64>| {
        let stock = shared.clone();
        async move {
            let mut s = stock.lock().unwrap();
            if sku == 0 && s.failures < 2 {
                s.failures += 1;
                s.first_failure.get_or_insert_with(Instant::now);
                let error = std::io::Error::other("warehouse API unavailable");
                return Err(HandlerError::transient(error));
            }
            if let Some(t) = s.first_failure.filter(|_| sku == 0) {
                s.waited = t.elapsed();
            }
            s.applied.push(sku);
            Ok(())
        }
    };
    let tiers = RetryTiers::new(broker.clone(), DELAYS)?;
    // Dead letter outside the tiers: it gets what still fails after the last one.
    let service = ServiceBuilder::new()
        .layer(DeadLetterLayer::new(broker.clone()))
        .layer(RetryTiersLayer::new(tiers.clone()))
        .service(handler_fn(update));
    let options = SubscribeOptions::new(&topic, format!("inventory-{run}")).ephemeral(true);
    let shutdown = CancellationToken::new();
    let app = tiers.add_consumers(App::new(broker.clone()), options, service);
    let running = app.start(shutdown.clone()).await?;

    let updates: switchyard::Result<Vec<Message>> = (0..UPDATES)
        .map(|sku| Message::json(&sku).map(|m| m.with_key("warehouse-1")))
        .collect();
    broker.publish_batch(&topic, updates?).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while (stock.lock().unwrap().applied.len() as u64) < UPDATES && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    running.join().await?;
    broker.close().await?;

    let s = stock.lock().unwrap();
    let others_first = s.applied.len() as u64 == UPDATES && s.applied.last() == Some(&0);
    let ok = others_first && s.failures == 2 && s.waited >= DELAYS[0] + DELAYS[1];
    println!(
        "summary updates={UPDATES} applied={} sku0_failures={} sku0_applied_last={others_first} sku0_waited_ms={}",
        s.applied.len(),
        s.failures,
        s.waited.as_millis()
    );
    Ok(ExitCode::from(u8::from(!ok)))
}
