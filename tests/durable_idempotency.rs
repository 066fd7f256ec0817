//! The same message published three times runs the handler once, with the durable
//! PostgreSQL idempotency store, on every compiled-in backend (two competing members,
//! so duplicates can reach different members at once).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard::middleware::{IdempotencyLayer, PostgresStore};
use switchyard::{
    handler_fn, CancellationToken, Consumer, Delivery, HandlerError, Message, SubscribeOptions,
};
use tower::ServiceBuilder;

fn pg() -> String {
    std::env::var("SWITCHYARD_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into())
}

async fn duplicates_run_once(url: &str) {
    let broker = switchyard::connect(url)
        .await
        .unwrap_or_else(|e| panic!("{url} must be reachable: {e}"));
    let suffix = &switchyard::new_id().replace('-', "")[20..];
    let table = format!("sy_idem_{suffix}");
    let store = PostgresStore::connect(&pg(), Some(&table))
        .await
        .expect("PostgreSQL must be reachable");
    let layer = IdempotencyLayer::new(Arc::new(store));
    let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let handler = {
        let runs = runs.clone();
        move |d: Delivery| {
            let runs = runs.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                *runs.lock().unwrap().entry(d.id().to_string()).or_default() += 1;
                Ok::<_, HandlerError>(())
            }
        }
    };
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .service(handler_fn(handler));
    let topic = format!("durable-{suffix}");
    let token = CancellationToken::new();
    let running = Consumer::new(SubscribeOptions::new(&topic, "billing"), service)
        .members(2)
        .start(broker.clone(), token.clone())
        .await
        .unwrap();
    let twice = Message::new("charge order 42");
    let mut all = vec![
        twice.clone(),
        twice.clone(),
        Message::new("other 1"),
        twice.clone(),
        Message::new("other 2"),
    ];
    for m in all.drain(..) {
        broker.publish(&topic, m).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    while layer.skipped() < 2 || runs.lock().unwrap().len() < 3 {
        assert!(
            Instant::now() < deadline,
            "{url}: timed out; runs {:?}, skipped {}",
            runs.lock().unwrap(),
            layer.skipped()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    token.cancel();
    running.join().await.unwrap();
    broker.close().await.unwrap();
    let twice_runs = runs.lock().unwrap()[&twice.id];
    assert_eq!(
        twice_runs, 1,
        "{url}: the triplicated message ran {twice_runs} times"
    );
    assert_eq!(layer.skipped(), 2, "{url}");
    let (client, conn) = tokio_postgres_connect().await;
    tokio::spawn(conn);
    client
        .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await
        .unwrap();
}

async fn tokio_postgres_connect() -> (
    tokio_postgres::Client,
    tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
) {
    tokio_postgres::connect(&pg(), tokio_postgres::NoTls)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory() {
    duplicates_run_once("memory://durable-idempotency").await;
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka() {
    let url =
        std::env::var("SWITCHYARD_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".into());
    duplicates_run_once(&url).await;
}

#[cfg(feature = "rabbitmq")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq() {
    let url = std::env::var("SWITCHYARD_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    duplicates_run_once(&url).await;
}
