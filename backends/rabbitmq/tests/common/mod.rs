//! Helpers the RabbitMQ test binaries share: the broker URL, unique names, a raw lapin
//! connection, and removal of what a group declared.
#![allow(dead_code)] // each test binary uses its own share of these

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};

/// Partitions of a group declared with the default settings.
pub(crate) const PARTITIONS: u32 = 8;

/// The broker under test (`SWITCHYARD_AMQP_URL`, else the local guest account).
pub(crate) fn url() -> String {
    std::env::var("SWITCHYARD_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// `url` with one more query parameter.
pub(crate) fn with_param(url: &str, param: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

/// `host:port` of the broker's AMQP URL.
pub(crate) fn amqp_address() -> String {
    let url = url();
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let rest = rest.split(['/', '?']).next().unwrap_or(rest);
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:5672")
    }
}

/// A name no other run uses.
pub(crate) fn unique(label: &str) -> String {
    switchyard_conformance::support::unique_name(&format!("syr-{label}"))
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

/// [`cleanup`] over a connection of its own, for tests that stop the broker: one that
/// does not answer within 10 s leaves the names behind (with a note) instead of failing
/// a test that already passed or failed on its own.
pub(crate) async fn cleanup_if_reachable(topic: &str, group: &str) {
    let url = url();
    let connect = Connection::connect(&url, ConnectionProperties::default());
    let Ok(Ok(conn)) = tokio::time::timeout(std::time::Duration::from_secs(10), connect).await
    else {
        eprintln!("cleanup: RabbitMQ did not answer; {topic} left behind");
        return;
    };
    cleanup(&conn, topic, group).await;
    let _ = conn.close(200, "cleanup".into()).await;
}

/// Deletes the queues of `groups` (with `partitions` partitions each) and the topic's
/// exchange, over a connection of its own.
pub(crate) async fn cleanup_groups(topic: &str, groups: &[&str], partitions: u32) {
    let conn = raw().await;
    for group in groups {
        let mut names: Vec<String> = (0..partitions)
            .map(|p| format!("{topic}:{group}.p{p}"))
            .collect();
        names.push(format!("{topic}:{group}.members"));
        for q in names {
            let ch = conn.create_channel().await.unwrap();
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    let ch = conn.create_channel().await.unwrap();
    let _ = ch
        .exchange_delete(topic.into(), ExchangeDeleteOptions::default())
        .await;
    let _ = conn.close(200, "cleanup".into()).await;
}

/// Deletes a group's delayed-redelivery objects: its hold queues and their exchanges,
/// and its return exchange.
pub(crate) async fn cleanup_delays(topic: &str, group: &str, delays_ms: &[u64]) {
    let conn = raw().await;
    for ms in delays_ms {
        let hold = format!("{topic}:{group}.delay.{ms}");
        let ch = conn.create_channel().await.unwrap();
        let _ = ch
            .queue_delete(hold.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = ch
            .exchange_delete(hold.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let ch = conn.create_channel().await.unwrap();
    let back = format!("{topic}:{group}.return");
    let _ = ch
        .exchange_delete(back.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    let _ = conn.close(200, "cleanup".into()).await;
}

/// Whether a queue (or, with `exchange`, an exchange) exists, by passive declaration.
pub(crate) async fn exists(conn: &Connection, name: &str, exchange: bool) -> bool {
    let ch = conn.create_channel().await.unwrap();
    let r = if exchange {
        ch.exchange_declare(
            name.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|_| ())
    } else {
        ch.queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|_| ())
    };
    r.is_ok()
}
