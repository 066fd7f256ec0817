//! Throughput of the RabbitMQ backend against raw lapin doing the same broker work.
//!
//! `cargo run --release -p switchyard-rabbitmq --example bench -- [--messages N] [--url U]`
//!
//! Both sides publish N persistent 256-byte messages with publisher confirms, awaited in
//! windows of 1024 (switchyard: `publish_batch` of 1024), through the same topology (the
//! topic exchange and a group's 8 partition queues), then consume them with a prefetch
//! of 1000 per partition consumer (switchyard also caps its unsettled deliveries at 1000)
//! and one ack per message. Prints
//! `pair=rabbitmq-publish switchyard=<msgs/s> raw=<msgs/s> ratio=<r>` and the same for
//! `rabbitmq-consume`.

use std::time::Instant;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use switchyard_core::{Broker, Message, SubscribeOptions};

const WINDOW: usize = 1024;
const PREFETCH: usize = 1000;
const PARTITIONS: u32 = 8;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn unique(label: &str) -> String {
    format!("bench-{label}-{}", std::process::id())
}

/// The routing key switchyard sends an unkeyed message with: slot bits, round-robin.
fn routing_key(i: usize) -> String {
    let slot = i % 1024;
    (0..10)
        .rev()
        .map(|bit| if slot >> bit & 1 == 1 { "1" } else { "0" })
        .collect::<Vec<_>>()
        .join(".")
}

async fn declare_group(broker: &dyn Broker, topic: &str) {
    // Subscribing declares the exchange and the group's queues; closing leaves them.
    let sub = broker
        .subscribe(SubscribeOptions::new(topic, "g").prefetch(PREFETCH))
        .await
        .expect("subscribe");
    sub.close().await.expect("close");
}

async fn switchyard_publish(broker: &dyn Broker, topic: &str, n: usize) -> f64 {
    let payload = switchyard_core::Bytes::from(vec![b'x'; 256]);
    let start = Instant::now();
    let mut sent = 0;
    while sent < n {
        let batch: Vec<Message> = (sent..n.min(sent + WINDOW))
            .map(|_| Message::new(payload.clone()))
            .collect();
        sent += batch.len();
        broker.publish_batch(topic, batch).await.expect("publish");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn raw_publish(conn: &Connection, topic: &str, n: usize) -> f64 {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let payload = vec![b'x'; 256];
    let keys: Vec<String> = (0..1024).map(routing_key).collect();
    let start = Instant::now();
    let mut pending = Vec::with_capacity(WINDOW);
    for i in 0..n {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(switchyard_core::new_id().into());
        let confirm = ch
            .basic_publish(
                topic.into(),
                keys[i % 1024].as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &payload,
                props,
            )
            .await
            .unwrap();
        pending.push(confirm);
        if pending.len() == WINDOW || i + 1 == n {
            for c in pending.drain(..) {
                assert_eq!(c.await.unwrap(), Confirmation::Ack(None));
            }
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn switchyard_consume(broker: &dyn Broker, topic: &str, n: usize) -> f64 {
    let mut sub = broker
        .subscribe(SubscribeOptions::new(topic, "g").prefetch(PREFETCH))
        .await
        .unwrap();
    let start = Instant::now();
    let mut got = 0;
    let mut buf = Vec::with_capacity(PREFETCH);
    while got < n {
        let k = sub.recv_many(&mut buf, PREFETCH).await.unwrap();
        assert!(k > 0, "subscription ended");
        for d in buf.drain(..) {
            d.ack().await.unwrap();
        }
        got += k;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    sub.close().await.unwrap();
    rate
}

async fn raw_consume(conn: &Connection, topic: &str, n: usize) -> f64 {
    let ch = conn.create_channel().await.unwrap();
    // The same broker-side window as switchyard: PREFETCH per partition consumer.
    ch.basic_qos(PREFETCH as u16, BasicQosOptions { global: false })
        .await
        .unwrap();
    let mut consumers = Vec::new();
    for p in 0..PARTITIONS {
        consumers.push(
            ch.basic_consume(
                format!("{topic}:g.p{p}").as_str().into(),
                format!("raw-{p}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap(),
        );
    }
    let mut all = futures::stream::select_all(consumers);
    let start = Instant::now();
    let mut got = 0;
    while got < n {
        let d = all.next().await.unwrap().unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
        got += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let _ = ch.close(200, "done".into()).await;
    rate
}

async fn cleanup(conn: &Connection, topic: &str) {
    let ch = conn.create_channel().await.unwrap();
    for p in 0..PARTITIONS {
        let _ = ch
            .queue_delete(
                format!("{topic}:g.p{p}").as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await;
    }
    let _ = ch
        .queue_delete(
            format!("{topic}:g.members").as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await;
    let _ = ch
        .exchange_delete(topic.into(), ExchangeDeleteOptions::default())
        .await;
}

fn line(pair: &str, ours: f64, raw: f64) {
    println!(
        "pair={pair} switchyard={ours:.0} raw={raw:.0} ratio={:.2}",
        ours / raw
    );
}

#[tokio::main]
async fn main() {
    let n: usize = arg("--messages")
        .map(|s| s.parse().expect("--messages takes a number"))
        .unwrap_or(100_000);
    let url = arg("--url").unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let broker = switchyard_rabbitmq::connect(&format!("{url}?partitions={PARTITIONS}"))
        .await
        .expect("connect");
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("connect raw");
    let (ours, theirs) = (unique("sy"), unique("raw"));
    declare_group(&*broker, &ours).await;
    declare_group(&*broker, &theirs).await;

    // Alternate the order so neither side always runs on a warmer broker.
    let raw_pub = raw_publish(&conn, &theirs, n).await;
    let sy_pub = switchyard_publish(&*broker, &ours, n).await;
    line("rabbitmq-publish", sy_pub, raw_pub);
    let sy_con = switchyard_consume(&*broker, &ours, n).await;
    let raw_con = raw_consume(&conn, &theirs, n).await;
    line("rabbitmq-consume", sy_con, raw_con);

    broker.close().await.unwrap();
    cleanup(&conn, &ours).await;
    cleanup(&conn, &theirs).await;
    let _ = conn.close(200, "done".into()).await;
}
