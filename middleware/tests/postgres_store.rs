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
use switchyard_middleware::{Begin, IdempotencyLayer, IdempotencyStore, MarkKey, PostgresStore};
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
    assert_eq!(
        first.begin(MarkKey::new("g", "a"), lease).await.unwrap(),
        Begin::Started
    );
    assert_eq!(
        first.begin(MarkKey::new("g", "a"), lease).await.unwrap(),
        Begin::InFlight
    );
    first.complete(MarkKey::new("g", "a"), lease).await.unwrap();
    assert_eq!(
        first.begin(MarkKey::new("g", "b"), lease).await.unwrap(),
        Begin::Started
    );
    first.release(MarkKey::new("g", "b")).await.unwrap();
    assert_eq!(
        first
            .begin(MarkKey::new("g", "c"), Duration::from_millis(1))
            .await
            .unwrap(),
        Begin::Started
    );
    drop(first);

    // A new process (a new connection) sees what the old one recorded.
    let second = store(&t).await;
    assert_eq!(
        second.begin(MarkKey::new("g", "a"), lease).await.unwrap(),
        Begin::Completed
    );
    assert_eq!(
        second.begin(MarkKey::new("g", "b"), lease).await.unwrap(),
        Begin::Started,
        "released marks are free"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        second.begin(MarkKey::new("g", "c"), lease).await.unwrap(),
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
        let id = format!("race-{round}");
        let tasks: Vec<_> = (0..4)
            .map(|i| {
                let s = stores[i % 2].clone();
                let id = id.clone();
                tokio::spawn(async move {
                    let key = MarkKey::new("g", &id);
                    s.begin(key, Duration::from_secs(60)).await.unwrap()
                })
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

/// Rows in `table`.
async fn rows(table: &str) -> i64 {
    let (client, conn) = tokio_postgres::connect(&config(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn expired_rows_are_swept_in_batches() {
    let t = table();
    let s = store(&t).await;
    let ids: Vec<String> = (0..250).map(|i| format!("gone-{i}")).collect();
    for id in &ids {
        s.complete(MarkKey::new("g", id), Duration::ZERO)
            .await
            .unwrap();
    }
    s.begin(MarkKey::new("g", "lapsed"), Duration::ZERO)
        .await
        .unwrap();
    s.complete(MarkKey::new("g", "kept"), Duration::from_secs(3600))
        .await
        .unwrap();
    s.begin(MarkKey::new("g", "running"), Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(rows(&t).await, 253);
    assert_eq!(s.sweep_batch(100).await.unwrap(), 100);
    assert_eq!(s.sweep_batch(100).await.unwrap(), 100);
    assert_eq!(s.sweep_batch(100).await.unwrap(), 51);
    assert_eq!(s.sweep_batch(100).await.unwrap(), 0);
    assert_eq!(rows(&t).await, 2, "unexpired marks stay");
    let key = MarkKey::new("g", "kept");
    assert_eq!(
        s.begin(key, Duration::from_secs(60)).await.unwrap(),
        Begin::Completed
    );
    drop(s);
    drop_table(&t).await;
}

#[tokio::test]
async fn the_background_sweep_empties_expired_rows() {
    let t = table();
    let s = store(&t).await.sweep_every(Duration::from_millis(50), 7);
    for i in 0..40 {
        let id = format!("gone-{i}");
        s.complete(MarkKey::new("g", &id), Duration::ZERO)
            .await
            .unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while rows(&t).await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "expired rows were not swept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(s);
    drop_table(&t).await;
}

#[tokio::test]
async fn a_ten_kilobyte_id_is_a_mark_like_any_other() {
    let t = table();
    let s = store(&t).await;
    let lease = Duration::from_secs(60);
    let long = incompressible_id(10 * 1024);
    let other = format!("{}j", &long[1..]);
    let key = MarkKey::new("g", &long);
    assert_eq!(s.begin(key, lease).await.unwrap(), Begin::Started);
    assert_eq!(s.begin(key, lease).await.unwrap(), Begin::InFlight);
    s.complete(key, lease).await.unwrap();
    assert_eq!(s.begin(key, lease).await.unwrap(), Begin::Completed);
    assert_eq!(
        s.begin(MarkKey::new("g", &other), lease).await.unwrap(),
        Begin::Started,
        "another long id is another mark"
    );
    assert_eq!(
        s.begin(MarkKey::new("h", &long), lease).await.unwrap(),
        Begin::Started,
        "the same id in another group is another mark"
    );
    drop(s);
    drop_table(&t).await;
}

/// Through the layer, as a consumer sees it: with the id stored whole, the index
/// refused it and every delivery failed.
#[tokio::test]
async fn a_ten_kilobyte_id_runs_the_handler_once() {
    let t = table();
    let layer = IdempotencyLayer::new(Arc::new(store(&t).await));
    let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut service = {
        let runs = runs.clone();
        tower::Layer::layer(
            &layer,
            tower::service_fn(move |_: Delivery| {
                runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { Ok::<_, HandlerError>(()) }
            }),
        )
    };
    let mut message = Message::new("x");
    message.id = incompressible_id(10 * 1024);
    let message = Arc::new(message);
    for _ in 0..2 {
        let origin = switchyard_core::Origin::new("t".into(), "g".into(), None, None);
        let d = Delivery::new(message.clone(), 1, origin, NoAck);
        tower::ServiceExt::ready(&mut service).await.unwrap();
        tower::Service::call(&mut service, d).await.unwrap();
    }
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(layer.skipped(), 1);
    drop_table(&t).await;
}

struct NoAck;

impl switchyard_core::backend::Acker for NoAck {
    fn ack(&self) -> futures::future::BoxFuture<'_, switchyard_core::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn nack(
        &self,
        _: switchyard_core::Nack,
    ) -> futures::future::BoxFuture<'_, switchyard_core::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// An id of `len` random hex digits: PostgreSQL compresses a long index entry, so a
/// repetitive id would fit where a real long one does not.
fn incompressible_id(len: usize) -> String {
    let mut id = String::with_capacity(len + 32);
    while id.len() < len {
        id.push_str(&switchyard_core::new_id().replace('-', ""));
    }
    id.truncate(len);
    id
}
