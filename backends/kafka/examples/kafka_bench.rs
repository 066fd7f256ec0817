//! Throughput of switchyard's Kafka backend against raw rdkafka on the same broker.
//!
//! `cargo run --release -p switchyard-kafka --example kafka_bench -- [--messages N] [--url kafka://…]`
//!
//! Produces N messages of 256 bytes through switchyard (`publish_batch`) and through a raw
//! `FutureProducer` with the same settings (acks=all, idempotence, linger.ms=5; the raw
//! records carry the same id header, so both write identical records), then consumes
//! each topic with a fresh group: switchyard through the consumer runtime (concurrent
//! handler, commit after processing), raw through a `StreamConsumer` with manual
//! commits (offsets stored per message, committed every second). Consumption is timed
//! from the first message to the last, so group-join time is left out of both. Prints
//!
//! `pair=kafka-produce switchyard=<msgs/s> raw=<msgs/s> ratio=<r>`
//! `pair=kafka-consume switchyard=<msgs/s> raw=<msgs/s> ratio=<r>`
//!
//! After the pairs (or alone, with `--rpc`), the request/reply pair `kafka-rpc`:
//! `--requests` round trips per round (default 5,000), `--in-flight` at once (default
//! 64), `--rounds` rounds (default 3), see `kafka_bench/rpc.rs`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use switchyard_core::{Consumer, Delivery, HandlerError, Message, Publisher, SubscribeOptions};
use switchyard_kafka::headers;
use switchyard_kafka::KafkaBroker;
use tokio_util::sync::CancellationToken;

#[path = "kafka_bench/rpc.rs"]
mod rpc;

const SIZE: usize = 256;

struct Args {
    messages: usize,
    url: String,
    rpc_only: bool,
    requests: usize,
    in_flight: usize,
    rounds: usize,
}

fn args() -> Args {
    let mut a = Args {
        messages: 200_000,
        url: std::env::var("SWITCHYARD_KAFKA_URL")
            .unwrap_or_else(|_| "kafka://127.0.0.1:9092".into()),
        rpc_only: false,
        requests: 5_000,
        in_flight: 64,
        rounds: 3,
    };
    let number = |v: Option<String>, flag: &str| -> usize {
        v.and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{flag} N"))
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--messages" => {
                a.messages = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--messages N")
            }
            "--url" => a.url = it.next().expect("--url kafka://host:port"),
            "--rpc" => a.rpc_only = true,
            "--requests" => a.requests = number(it.next(), "--requests"),
            "--in-flight" => a.in_flight = number(it.next(), "--in-flight").max(1),
            "--rounds" => a.rounds = number(it.next(), "--rounds").max(1),
            "--bench" => {} // passed by `cargo bench`-style runners
            other => panic!("unknown argument {other}; use --messages N, --url URL, --rpc, --requests N, --in-flight K, --rounds R"),
        }
    }
    a
}

fn messages(n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| {
            let mut payload = vec![b'x'; SIZE];
            payload[..8].copy_from_slice(&(i as u64).to_le_bytes());
            Message::new(payload)
        })
        .collect()
}

fn rate(n: usize, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64()
}

fn print(pair: &str, switchyard: f64, raw: f64) {
    println!(
        "pair={pair} switchyard={switchyard:.0} raw={raw:.0} ratio={:.3}",
        switchyard / raw
    );
}

async fn produce_switchyard(broker: &KafkaBroker, topic: &str, msgs: Vec<Message>) -> f64 {
    let n = msgs.len();
    let start = Instant::now();
    broker.publish_batch(topic, msgs).await.expect("publish");
    rate(n, start.elapsed())
}

async fn produce_raw(servers: &str, topic: &str, warm: &str, msgs: &[Message]) -> f64 {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("partitioner", "murmur2_random")
        .create()
        .expect("raw producer");
    // Connections and the idempotent producer id are set up outside the timing, as for
    // the switchyard producer.
    producer
        .send(
            FutureRecord::<str, str>::to(warm).payload("warm"),
            Duration::from_secs(30),
        )
        .await
        .expect("warm-up");
    let start = Instant::now();
    let mut pending = Vec::with_capacity(msgs.len());
    for m in msgs {
        let headers = OwnedHeaders::new().insert(Header {
            key: headers::ID,
            value: Some(m.id.as_bytes()),
        });
        let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic)
            .payload(&m.payload[..])
            .headers(headers);
        loop {
            match producer.send_result(record) {
                Ok(f) => break pending.push(f),
                Err((_, back)) => {
                    // Queue full: let deliveries drain.
                    record = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
    for f in pending {
        f.await.expect("delivery").expect("acknowledged");
    }
    rate(msgs.len(), start.elapsed())
}

async fn consume_switchyard(broker: Arc<KafkaBroker>, topic: &str, group: &str, n: usize) -> f64 {
    let count = Arc::new(AtomicUsize::new(0));
    let first: Arc<Mutex<Option<Instant>>> = Arc::default();
    let handler = {
        let (count, first) = (count.clone(), first.clone());
        move |_d: Delivery| {
            let (count, first) = (count.clone(), first.clone());
            async move {
                if count.fetch_add(1, Ordering::Relaxed) == 0 {
                    *first.lock().unwrap() = Some(Instant::now());
                }
                Ok::<_, HandlerError>(())
            }
        }
    };
    let token = CancellationToken::new();
    let consumer = Consumer::handler(SubscribeOptions::new(topic, group).prefetch(2048), handler)
        .concurrency(256);
    let task = tokio::spawn(consumer.run(broker, token.clone()));
    let mut last_report = Instant::now();
    while count.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
        if last_report.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "bench: switchyard consumed {} of {n}",
                count.load(Ordering::Relaxed)
            );
            last_report = Instant::now();
        }
    }
    let took = first.lock().unwrap().expect("first message").elapsed();
    token.cancel();
    task.await.expect("consumer task").expect("consumer");
    rate(n - 1, took)
}

async fn consume_raw(servers: &str, topic: &str, group: &str, n: usize) -> f64 {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("raw consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut first = None;
    let mut last_commit = Instant::now();
    for i in 0..n {
        let m = consumer.recv().await.expect("message");
        if i == 0 {
            first = Some(Instant::now());
        }
        consumer
            .store_offset_from_message(&m)
            .expect("store offset");
        if last_commit.elapsed() >= Duration::from_secs(1) {
            let _ = consumer.commit_consumer_state(CommitMode::Async);
            last_commit = Instant::now();
        }
    }
    let took = first.expect("first message").elapsed();
    let _ = consumer.commit_consumer_state(CommitMode::Sync);
    rate(n - 1, took)
}

#[tokio::main]
async fn main() {
    let args = args();
    let run = &uuid::Uuid::now_v7().simple().to_string()[20..];
    let rpc_pair = || rpc::pair(&args.url, run, args.requests, args.in_flight, args.rounds);
    if args.rpc_only {
        return rpc_pair().await;
    }
    let broker = Arc::new(KafkaBroker::connect(&args.url).expect("connect"));
    let servers = broker.config().bootstrap_servers.clone();
    let (sy_topic, raw_topic) = (format!("bench-sy-{run}"), format!("bench-raw-{run}"));
    // Topics exist before timing starts, with the same partitions for both.
    broker.ensure_topic(&sy_topic).await.expect("topic");
    broker.ensure_topic(&raw_topic).await.expect("topic");
    // Warm both producers' connections (and the idempotent producer id) outside the timing.
    let warm = format!("bench-warm-{run}");
    broker
        .publish(&warm, Message::new("warm"))
        .await
        .expect("warm-up");
    let n = args.messages;
    eprintln!("bench: {n} messages of {SIZE} bytes on {}", args.url);

    // The broker slows down as it fills, so each side produces half first and half
    // last (switchyard, raw, raw, switchyard) and the rates are combined.
    let (h1, h2) = (n / 2, n - n / 2);
    let sy_a = produce_switchyard(&broker, &sy_topic, messages(h1)).await;
    let raw_msgs = messages(n);
    let raw_a = produce_raw(&servers, &raw_topic, &warm, &raw_msgs[..h1]).await;
    let raw_b = produce_raw(&servers, &raw_topic, &warm, &raw_msgs[h1..]).await;
    let sy_b = produce_switchyard(&broker, &sy_topic, messages(h2)).await;
    let combined = |a: f64, b: f64| n as f64 / (h1 as f64 / a + h2 as f64 / b);
    let (sy_produce, raw_produce) = (combined(sy_a, sy_b), combined(raw_a, raw_b));
    print("kafka-produce", sy_produce, raw_produce);

    let sy_consume =
        consume_switchyard(broker.clone(), &sy_topic, &format!("bench-sy-g-{run}"), n).await;
    let raw_consume = consume_raw(&servers, &raw_topic, &format!("bench-raw-g-{run}"), n).await;
    print("kafka-consume", sy_consume, raw_consume);
    let _ = switchyard_core::Broker::close(&*broker).await;
    rpc_pair().await;
}
