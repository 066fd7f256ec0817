//! Competing consumers: three workers in one group share a topic's messages, and each
//! customer's messages (one key) are still handled one at a time, in publish order.
//!
//! Run: `cargo run --example competing_consumers [-- --url memory://]` (any `--url`:
//! `kafka://127.0.0.1:9092` with `--features kafka`, `amqp://guest:guest@127.0.0.1:5672/%2f`
//! with `--features rabbitmq`).
//!
//! Each worker is a member of the group `shipping` running 8 handlers at once
//! (`Consumer::members(3)` makes three members with one handler; here each worker has its
//! own, to count its share). Handlers take a few milliseconds, so different customers
//! overlap while one customer's events queue behind each other. The last line is the summary; the exit status is 0 only when
//! every event was handled, no customer's events ran out of order or two at a time.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard::{App, CancellationToken, Consumer, HandlerError, Json, Message, SubscribeOptions};

const CUSTOMERS: u64 = 6;
const PER_CUSTOMER: u64 = 10;
const WORKERS: usize = 3;

#[derive(serde::Serialize, serde::Deserialize)]
struct Shipment {
    customer: String,
    /// 0, 1, 2, … per customer, in publish order.
    seq: u64,
}

/// What every worker saw: the next expected seq and whether one runs, per customer.
#[derive(Default)]
struct Book {
    next: HashMap<String, u64>,
    running: HashMap<String, bool>,
    handled_by: [u64; WORKERS],
    violations: u64,
}

#[tokio::main]
async fn main() -> switchyard::Result<ExitCode> {
    let url = std::env::args().skip_while(|a| a != "--url").nth(1);
    let broker = switchyard::connect(url.as_deref().unwrap_or("memory://")).await?;
    // Names of their own per run (a Kafka group spans topics), so leftovers and other
    // runs never mix in; ephemeral groups, so their broker state goes when the run ends.
    let run = switchyard::new_id()[24..].to_string();
    let topic = format!("shipments-{run}");
    let book: Arc<Mutex<Book>> = Arc::default();

    let shutdown = CancellationToken::new();
    let mut app = App::new(broker.clone());
    for worker in 0..WORKERS {
        let book = book.clone();
        let ship = move |Json(s): Json<Shipment>| {
            let book = book.clone();
            async move {
                {
                    let mut b = book.lock().unwrap();
                    let started_twice = b.running.insert(s.customer.clone(), true) == Some(true);
                    let in_order = b.next.get(&s.customer).copied().unwrap_or(0) == s.seq;
                    b.violations += u64::from(started_twice || !in_order);
                }
                // The work: long enough for the customers' events to overlap.
                tokio::time::sleep(Duration::from_millis(2 + s.seq % 3)).await;
                let mut b = book.lock().unwrap();
                b.running.insert(s.customer.clone(), false);
                b.next.insert(s.customer, s.seq + 1);
                b.handled_by[worker] += 1;
                Ok::<_, HandlerError>(())
            }
        };
        // Same topic, same group: the members compete for its messages.
        let options = SubscribeOptions::new(&topic, format!("shipping-{run}")).ephemeral(true);
        app = app.consumer(Consumer::handler(options, ship).concurrency(8));
    }
    let running = app.start(shutdown.clone()).await?;

    // Interleave the customers, as independent orders arrive.
    let messages = (0..PER_CUSTOMER).flat_map(|seq| {
        (0..CUSTOMERS).map(move |c| {
            let customer = format!("customer-{c}");
            Message::json(&Shipment {
                customer: customer.clone(),
                seq,
            })
            .map(|m| m.with_key(customer))
        })
    });
    let messages = messages.collect::<switchyard::Result<Vec<_>>>()?;
    broker.publish_batch(&topic, messages).await?;

    let total = CUSTOMERS * PER_CUSTOMER;
    let handled = || book.lock().unwrap().handled_by.iter().sum::<u64>();
    let deadline = Instant::now() + Duration::from_secs(60);
    while handled() < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    running.join().await?;
    broker.close().await?;

    let b = book.lock().unwrap();
    let handled: u64 = b.handled_by.iter().sum();
    let all_done = b.next.len() as u64 == CUSTOMERS && b.next.values().all(|&n| n == PER_CUSTOMER);
    let ok = handled == total && all_done && b.violations == 0;
    println!(
        "summary events={total} handled={handled} per_worker={:?} order_violations={}",
        b.handled_by, b.violations
    );
    Ok(ExitCode::from(u8::from(!ok)))
}
