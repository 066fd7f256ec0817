//! Run: `cargo run --release --example orders [-- --orders 10000 --url memory:// --topic orders]`
//!
//! The seed's order pipeline. An order service publishes `OrderCreated` events (JSON,
//! key = customer id, a per-customer sequence number in the payload) to one topic;
//! payment, email and inventory consume it as three groups (publish-subscribe), and
//! inventory runs three competing members. Every handler checks what it sees; the last
//! line is the summary, and the exit status is 0 only when no order is missing and no
//! customer's events were seen out of order.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use switchyard::{App, CancellationToken, Consumer, HandlerError, Json, Message, SubscribeOptions};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderCreated {
    /// Which run published it, so leftovers of an earlier run on a durable broker are ignored.
    run: String,
    order_id: u64,
    customer: String,
    /// 0, 1, 2, … per customer, in publish order.
    customer_seq: u64,
    amount_cents: u64,
}

struct Args {
    orders: u64,
    url: String,
    topic: String,
    customers: u64,
    timeout: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        orders: 10_000,
        url: "memory://".into(),
        topic: "orders".into(),
        customers: 100,
        timeout: Duration::from_secs(300),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match flag.as_str() {
            "--orders" => args.orders = value("--orders")?.parse().map_err(|e| format!("--orders: {e}"))?,
            "--url" => args.url = value("--url")?,
            "--topic" => args.topic = value("--topic")?,
            "--customers" => {
                args.customers = value("--customers")?.parse().map_err(|e| format!("--customers: {e}"))?;
                if args.customers == 0 {
                    return Err("--customers must be at least 1".into());
                }
            }
            "--timeout-secs" => {
                args.timeout = Duration::from_secs(
                    value("--timeout-secs")?.parse().map_err(|e| format!("--timeout-secs: {e}"))?,
                )
            }
            "-h" | "--help" => {
                return Err("usage: orders [--orders N] [--url URL] [--topic NAME] [--customers N] [--timeout-secs S]".into())
            }
            other => return Err(format!("unknown flag {other}; try --help")),
        }
    }
    Ok(args)
}

/// What one group saw.
#[derive(Default)]
struct Seen {
    runs: HashMap<u64, u32>,
    last_seq: HashMap<String, u64>,
    violations: u64,
}

impl Seen {
    fn record(&mut self, order: &OrderCreated) {
        let runs = self.runs.entry(order.order_id).or_default();
        *runs += 1;
        if *runs > 1 {
            return; // a redelivered duplicate: counted, not an ordering problem
        }
        let expected = self.last_seq.get(&order.customer).map_or(0, |s| s + 1);
        if order.customer_seq != expected {
            self.violations += 1;
        }
        let last = self.last_seq.entry(order.customer.clone()).or_insert(0);
        *last = (*last).max(order.customer_seq);
    }
}

type Tracker = Arc<Mutex<Seen>>;

/// A group's handler: ignore other runs' events, record ours.
fn handler(
    run: String,
    seen: Tracker,
) -> impl Fn(Json<OrderCreated>) -> futures::future::Ready<Result<(), HandlerError>>
       + Clone
       + Send
       + Sync
       + 'static {
    move |Json(order): Json<OrderCreated>| {
        if order.run == run {
            seen.lock().unwrap().record(&order);
        }
        futures::future::ready(Ok(()))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("orders: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> switchyard::Result<bool> {
    let broker = switchyard::connect(&args.url).await?;
    let run_id = switchyard::new_id();
    let groups = ["payment", "email", "inventory"];
    let trackers: Vec<Tracker> = groups.iter().map(|_| Tracker::default()).collect();

    // Subscribe every group before publishing, so brokers without replay keep every event.
    let shutdown = CancellationToken::new();
    let mut app = App::new(broker.clone());
    for (group, seen) in groups.iter().zip(&trackers) {
        let options = SubscribeOptions::new(&args.topic, *group).prefetch(512);
        let members = if *group == "inventory" { 3 } else { 1 };
        app = app.consumer(
            Consumer::handler(options, handler(run_id.clone(), seen.clone()))
                .concurrency(64)
                .members(members),
        );
    }
    let running = app.start(shutdown.clone()).await?;

    // The order service.
    let started = Instant::now();
    let mut next_seq: HashMap<String, u64> = HashMap::new();
    let mut batch = Vec::with_capacity(500);
    for order_id in 0..args.orders {
        let customer = format!("customer-{}", order_id % args.customers);
        let seq = next_seq.entry(customer.clone()).or_default();
        let event = OrderCreated {
            run: run_id.clone(),
            order_id,
            customer: customer.clone(),
            customer_seq: *seq,
            amount_cents: 1_000 + order_id % 9_000,
        };
        *seq += 1;
        batch.push(Message::json(&event)?.with_key(customer));
        if batch.len() == 500 {
            broker
                .publish_batch(&args.topic, std::mem::take(&mut batch))
                .await?;
        }
    }
    if !batch.is_empty() {
        broker.publish_batch(&args.topic, batch).await?;
    }
    let published = started.elapsed();
    eprintln!(
        "published {} orders to {:?} in {published:.2?}",
        args.orders, args.topic
    );

    // Wait until every group handled every order (or give up and report what is missing).
    let complete = |t: &Tracker| t.lock().unwrap().runs.len() as u64 >= args.orders;
    while !trackers.iter().all(complete) && started.elapsed() < args.timeout {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let handled = started.elapsed();
    shutdown.cancel();
    let reports = running.join().await?;
    for r in &reports {
        eprintln!(
            "group {:<9} acked={} nacked={} panics={} abandoned={}",
            r.group, r.acked, r.nacked, r.panics, r.abandoned
        );
    }
    let rate = args.orders as f64 * 3.0 / handled.as_secs_f64();
    eprintln!("all groups done in {handled:.2?} ({rate:.0} handled events/s across 3 groups)");
    broker.close().await?;

    let seen: Vec<_> = trackers.iter().map(|t| t.lock().unwrap()).collect();
    let count = |s: &Seen| s.runs.len() as u64;
    let duplicates: u64 = seen
        .iter()
        .flat_map(|s| s.runs.values())
        .map(|&n| u64::from(n) - 1)
        .sum();
    let violations: u64 = seen.iter().map(|s| s.violations).sum();
    let missing = (0..args.orders)
        .filter(|id| seen.iter().any(|s| !s.runs.contains_key(id)))
        .count();
    println!(
        "summary orders={} payment={} email={} inventory={} duplicates={duplicates} order_violations={violations} missing={missing} dlq=0",
        args.orders,
        count(&seen[0]),
        count(&seen[1]),
        count(&seen[2]),
    );
    Ok(missing == 0 && violations == 0)
}
