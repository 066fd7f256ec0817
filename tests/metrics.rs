//! The counters documented in `switchyard::observe` reach the application's recorder.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString,
    Unit,
};
use switchyard::{CancellationToken, Consumer, Delivery, HandlerError, Message, SubscribeOptions};

/// Counts per metric name and label set, e.g. `switchyard_handled_total{group=g,topic=t}`.
#[derive(Clone, Default)]
struct Counts(Arc<Mutex<HashMap<String, Arc<Cell>>>>);

#[derive(Default)]
struct Cell(AtomicU64);

impl CounterFn for Cell {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::SeqCst);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::SeqCst);
    }
}

impl GaugeFn for Cell {
    fn increment(&self, value: f64) {
        self.0.fetch_add(value as u64, Ordering::SeqCst);
    }
    fn decrement(&self, value: f64) {
        self.0.fetch_sub(value as u64, Ordering::SeqCst);
    }
    fn set(&self, value: f64) {
        self.0.store(value as u64, Ordering::SeqCst);
    }
}

impl Counts {
    fn cell(&self, key: &Key) -> Arc<Cell> {
        let mut labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        self.0.lock().unwrap().entry(name).or_default().clone()
    }
    fn get(&self, name: &str) -> u64 {
        self.0
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |c| c.0.load(Ordering::SeqCst))
    }
}

impl Recorder for Counts {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.cell(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.cell(key))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_handled_failed_and_in_flight_are_counted() {
    let counts = Counts::default();
    metrics::set_global_recorder(counts.clone()).unwrap();

    let broker = switchyard::connect("memory://metrics").await.unwrap();
    let handler = |d: Delivery| async move {
        if d.payload() == b"fail once" && d.delivery_count() == 1 {
            return Err(HandlerError::transient(std::io::Error::other(
                "first try fails",
            )));
        }
        Ok(())
    };
    let token = CancellationToken::new();
    let running = Consumer::handler(SubscribeOptions::new("m", "g"), handler)
        .redelivery_backoff(Duration::from_millis(1), Duration::from_millis(1))
        .start(broker.clone(), token.clone())
        .await
        .unwrap();
    for _ in 0..9 {
        broker.publish("m", Message::new("ok")).await.unwrap();
    }
    broker
        .publish("m", Message::new("fail once"))
        .await
        .unwrap();
    while counts.get("switchyard_handled_total{group=g,topic=m}") < 10 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    token.cancel();
    running.join().await.unwrap();
    assert_eq!(
        counts.get("switchyard_published_total{outcome=ok,topic=m}"),
        10
    );
    assert_eq!(counts.get("switchyard_handled_total{group=g,topic=m}"), 10);
    assert_eq!(counts.get("switchyard_failed_total{group=g,topic=m}"), 1);
    assert_eq!(
        counts.get("switchyard_in_flight{group=g,topic=m}"),
        0,
        "everything settled"
    );
}
