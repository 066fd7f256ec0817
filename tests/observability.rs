//! Spans follow a message: the consumer's `handle` span continues the producer's trace.
//! Checked with a `tracing` layer that records spans and their fields.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard::{CancellationToken, Consumer, Delivery, HandlerError, Message, SubscribeOptions};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

/// Span id → (span name, fields).
type Spans = HashMap<u64, (String, HashMap<String, String>)>;

#[derive(Clone, Default)]
struct Recorder {
    spans: Arc<Mutex<Spans>>,
}

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_string(),
            format!("{value:?}").trim_matches('"').to_string(),
        );
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl<S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>> Layer<S>
    for Recorder
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        let mut fields = HashMap::new();
        attrs.record(&mut Fields(&mut fields));
        self.spans
            .lock()
            .unwrap()
            .insert(id.into_u64(), (attrs.metadata().name().to_string(), fields));
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        if let Some((_, fields)) = self.spans.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(&mut Fields(fields));
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn handle_span_continues_the_publish_span_trace() {
    let recorder = Recorder::default();
    let subscriber = tracing_subscriber::registry().with(recorder.clone());
    // Current-thread runtime: every task runs on this thread and sees this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);

    let broker = switchyard::connect("memory://observability").await.unwrap();
    let done = CancellationToken::new();
    let handler = {
        let done = done.clone();
        move |_d: Delivery| {
            let done = done.clone();
            async move {
                done.cancel();
                Ok::<_, HandlerError>(())
            }
        }
    };
    let token = CancellationToken::new();
    let running = Consumer::handler(SubscribeOptions::new("traced", "audit"), handler)
        .start(broker.clone(), token.clone())
        .await
        .unwrap();
    let receipt = broker
        .publish("traced", Message::new("order 7").with_key("c-1"))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), done.cancelled())
        .await
        .unwrap();
    token.cancel();
    running.join().await.unwrap();

    let spans = recorder.spans.lock().unwrap();
    let find = |name: &str| {
        spans
            .values()
            .find(|(n, f)| n == name && f.get("id") == Some(&receipt.id))
            .map(|(_, f)| f.clone())
            .unwrap_or_else(|| panic!("no {name} span for {}: {spans:?}", receipt.id))
    };
    let publish = find("publish");
    let handle = find("handle");
    assert_eq!(publish.get("outcome").map(String::as_str), Some("ok"));
    assert_eq!(handle.get("outcome").map(String::as_str), Some("acked"));
    assert_eq!(handle.get("topic").map(String::as_str), Some("traced"));
    assert_eq!(handle.get("group").map(String::as_str), Some("audit"));
    assert_eq!(handle.get("delivery_count").map(String::as_str), Some("1"));
    assert!(handle.contains_key("duration_us"), "{handle:?}");
    assert_eq!(
        handle.get("trace_id"),
        publish.get("trace_id"),
        "same trace"
    );
    assert_eq!(
        handle.get("parent_span_id"),
        publish.get("span_id"),
        "handle is the publish span's child"
    );
    assert_ne!(handle.get("span_id"), publish.get("span_id"));
}
