//! Hand-over against the real broker (`scripts/test` starts RabbitMQ; the test fails
//! when it does not answer). Internal, because it drives two members' claim and release
//! steps by hand to hit the moment that broke order.

use lapin::options::{BasicPublishOptions, ExchangeDeleteOptions, QueueDeleteOptions};
use parking_lot::Mutex;
use switchyard_core::{CancellationToken, Message};
use tokio::sync::Notify;

use super::*;
use crate::subscription::State;

fn url() -> String {
    std::env::var("SWITCHYARD_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

async fn member(config: &Arc<RabbitConfig>, topic: &str) -> Supervisor {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        wake: Notify::new(),
        supervisor: Notify::new(),
        stop: CancellationToken::new(),
        topic: topic.into(),
        group: "g".into(),
        prefetch: 1000,
    });
    let mut sup = Supervisor {
        shared,
        config: config.clone(),
        names: GroupNames::new(topic, "g"),
        conn: None,
        control: None,
        membership: None,
        first_look: 0,
        expires: None,
    };
    sup.connect()
        .await
        .expect("RabbitMQ on SWITCHYARD_AMQP_URL (scripts/test starts it)");
    sup
}

async fn publish(control: &Channel, queue: &str, range: std::ops::Range<usize>) {
    for i in range {
        let m = Message::new(i.to_string());
        control
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &m.payload,
                crate::codec::properties(&m).expect("encodable"),
            )
            .await
            .expect("publish");
    }
}

fn received(m: &Supervisor) -> usize {
    m.shared
        .state
        .lock()
        .parts
        .get(&0)
        .map_or(0, |p| p.gate.len())
}

/// A partition being released keeps receiving until its channel closes. A pump that
/// dropped the consumer at the first such delivery would send basic.cancel: RabbitMQ
/// would then let the next member consume while the old channel still held its unacked
/// messages, and that member would get later messages first (per-key order violations
/// while members join). The next owner must start with the oldest message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_owner_starts_with_the_messages_the_last_one_held() {
    let config = Arc::new(RabbitConfig::from_url(&url()).expect("valid URL"));
    for round in 0..3 {
        let topic = format!("sy-handover-{}", switchyard_core::new_id());
        let mut a = member(&config, &topic).await;
        let mut b = member(&config, &topic).await;
        let control = a.control.clone().expect("connected");
        assert!(a.claim(&control, 0).await.expect("claim"), "free partition");
        let queue = a.names.partition(0);
        publish(&control, &queue, 0..50).await;
        let start = Instant::now();
        while received(&a) < 50 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "A got {}",
                received(&a)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Rebalance takes the partition out of A's state, then releases it; more
        // messages arrive in between (other partitions are released first).
        let part = a
            .shared
            .state
            .lock()
            .parts
            .remove(&0)
            .expect("A owns partition 0");
        let control_b = b.control.clone().expect("connected");
        let claimer = tokio::spawn(async move {
            while !b.claim(&control_b, 0).await.expect("claim attempt") {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            b
        });
        for i in 50..100 {
            publish(&control, &queue, i..i + 1).await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        a.release(part).await;
        let b = tokio::time::timeout(Duration::from_secs(10), claimer)
            .await
            .expect("B claims the released partition")
            .expect("claimer task");
        let first = loop {
            let taken = b
                .shared
                .state
                .lock()
                .parts
                .get_mut(&0)
                .and_then(|p| p.gate.take(false));
            if let Some(entry) = taken {
                break entry;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        assert_eq!(
            String::from_utf8_lossy(&first.message.payload),
            "0",
            "round {round}: the next owner got a later message before the ones handed back"
        );
        // Tidy up this throwaway topic's queues and exchanges.
        for p in 0..config.partitions {
            let _ = control
                .queue_delete(
                    a.names.partition(p).as_str().into(),
                    QueueDeleteOptions::default(),
                )
                .await;
        }
        let _ = control
            .queue_delete(
                a.names.members().as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await;
        for exchange in [topic.clone(), a.names.return_exchange()] {
            let _ = control
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        for mut m in [a, b] {
            m.shutdown().await;
        }
    }
}
