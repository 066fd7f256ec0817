//! Helpers the RabbitMQ test binaries share: the broker URL, unique names, a raw lapin
//! connection, and removal of what a group declared.
#![allow(dead_code)] // each test binary uses its own share of these

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};

/// Partitions of a group declared with the default settings.
pub(crate) const PARTITIONS: u32 = 8;

/// The broker under test (`SWITCHYARD_AMQP_URL`, else the local guest account).
pub(crate) fn url() -> String {
    std::env::var("SWITCHYARD_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// A name no other run uses.
pub(crate) fn unique(label: &str) -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("syr-{label}-{}", &id[20..])
}

/// A plain lapin connection; fails the test when the broker is unreachable.
pub(crate) async fn raw() -> Connection {
    Connection::connect(&url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be reachable at SWITCHYARD_AMQP_URL (default 127.0.0.1:5672)")
}

/// Deletes a default group's partition and membership queues, and the topic's exchange.
pub(crate) async fn cleanup(conn: &Connection, topic: &str, group: &str) {
    let ch = conn.create_channel().await.unwrap();
    for q in (0..PARTITIONS)
        .map(|p| format!("{topic}:{group}.p{p}"))
        .chain([format!("{topic}:{group}.members")])
    {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = ch
        .exchange_delete(topic.into(), ExchangeDeleteOptions::default())
        .await;
    let _ = ch.close(200, "done".into()).await;
}
