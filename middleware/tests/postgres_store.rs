//! The PostgreSQL idempotency store against a real server (127.0.0.1:5432, database
//! `test`; `scripts/test` starts it when it is not answering). `SWITCHYARD_POSTGRES`
//! overrides the connection string. Fails, never skips, when the server is unreachable.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_core::{
    CancellationToken, Consumer, Delivery, HandlerError, Message, Publisher, SubscribeOptions,
};
use switchyard_memory::MemoryBroker;
use switchyard_middleware::{Begin, IdempotencyLayer, IdempotencyStore, PostgresStore};
use tower::ServiceBuilder;

fn config() -> String {
    std::env::var("SWITCHYARD_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".to_string())
}

fn table() -> String {
    format!(
        "sy_idem_{}",
        &switchyard_core::new_id().replace('-', "")[20..]
    )
}

/// Drops a test's table, so runs leave nothing behind.
async fn drop_table(table: &str) {
    let (client, conn) = tokio_postgres::connect(&config(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await
        .unwrap();
}

async fn store(table: &str) -> PostgresStore {
    PostgresStore::connect(&config(), Some(table))
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {} must be reachable: {e}", config()))
}

#[tokio::test]
async fn marks_survive_a_new_connection_and_leases_expire() {
    let t = table();
    let first = store(&t).await;
    let lease = Duration::from_secs(60);
    assert_eq!(first.begin("g/a", lease).await.unwrap(), Begin::Started);
    assert_eq!(first.begin("g/a", lease).await.unwrap(), Begin::InFlight);
    first.complete("g/a", lease).await.unwrap();
    assert_eq!(first.begin("g/b", lease).await.unwrap(), Begin::Started);
    first.abandon("g/b").await.unwrap();
    assert_eq!(
        first.begin("g/c", Duration::from_millis(1)).await.unwrap(),
        Begin::Started
    );
    drop(first);

    // A new process (a new connection) sees what the old one recorded.
    let second = store(&t).await;
    assert_eq!(second.begin("g/a", lease).await.unwrap(), Begin::Completed);
    assert_eq!(
        second.begin("g/b", lease).await.unwrap(),
        Begin::Started,
        "abandoned marks are free"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        second.begin("g/c", lease).await.unwrap(),
        Begin::Started,
        "an expired lease is free"
    );
}

#[tokio::test]
async fn racing_consumers_only_one_begins() {
    let t = table();
    let stores: Vec<Arc<PostgresStore>> =
        vec![Arc::new(store(&t).await), Arc::new(store(&t).await)];
    for round in 0..50 {
        let key = format!("g/race-{round}");
        let tasks: Vec<_> = (0..4)
            .map(|i| {
                let s = stores[i % 2].clone();
                let key = key.clone();
                tokio::spawn(async move { s.begin(&key, Duration::from_secs(60)).await.unwrap() })
            })
            .collect();
        let mut started = 0;
        for t in tasks {
            if t.await.unwrap() == Begin::Started {
                started += 1;
            }
        }
        assert_eq!(
            started, 1,
            "round {round}: {started} consumers began the same message"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_message_three_times_runs_the_handler_once() {
    let t = table();
    let layer = IdempotencyLayer::new(Arc::new(store(&t).await));
    let broker = Arc::new(MemoryBroker::new());
    let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let handler = {
        let runs = runs.clone();
        move |d: Delivery| {
            let runs = runs.clone();
            async move {
                *runs.lock().unwrap().entry(d.id().to_string()).or_default() += 1;
                Ok::<_, HandlerError>(())
            }
        }
    };
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .service(switchyard_core::handler_fn(handler));
    let shutdown = CancellationToken::new();
    let running = Consumer::new(SubscribeOptions::new("payments", "billing"), service)
        .members(2)
        .start(broker.clone(), shutdown.clone())
        .await
        .unwrap();
    let m = Message::new("charge order 7");
    for _ in 0..3 {
        broker.publish("payments", m.clone()).await.unwrap();
    }
    broker
        .publish("payments", Message::new("another"))
        .await
        .unwrap();
    while layer.skipped() < 2 || runs.lock().unwrap().len() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    let report = running.join().await.unwrap();
    assert_eq!(runs.lock().unwrap()[&m.id], 1);
    assert_eq!(layer.skipped(), 2);
    assert_eq!(report.acked, 4);
    drop_table(&t).await;
}
