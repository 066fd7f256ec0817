//! Observability: trace context that travels in message headers, spans, and counters.
//!
//! - **Trace context.** Every published message carries a W3C `traceparent` header. A
//!   message published while a handler runs continues the handler's trace (a child
//!   span of the delivery's context); otherwise it starts a new trace. The consumer
//!   runtime reads the header, opens its `handle` span with the same `trace_id`, and
//!   makes it the current context while the handler runs. Span fields `trace_id`,
//!   `span_id` and `parent_span_id` let any `tracing` subscriber (or an OpenTelemetry
//!   bridge) stitch producer and consumer together across every backend.
//! - **Spans.** `publish` (topic, key, id, trace_id, span_id, outcome) and `handle`
//!   (topic, group, key, id, delivery_count, trace_id, span_id, parent_span_id, outcome,
//!   duration_us) at `INFO`; a disabled subscriber costs next to nothing.
//! - **Counters** through the [`metrics`](https://docs.rs/metrics) facade, so any
//!   recorder (Prometheus, StatsD, …) can be installed by the application:
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `switchyard_published_total` | counter | `topic`, `outcome` (`ok`/`error`) |
//! | `switchyard_handled_total` | counter | `topic`, `group` (acked after success) |
//! | `switchyard_failed_total` | counter | `topic`, `group` (nacked for redelivery) |
//! | `switchyard_panics_total` | counter | `topic`, `group` |
//! | `switchyard_in_flight` | gauge | `topic`, `group` |
//! | `switchyard_retried_total` | counter | `topic` (middleware: in-process retries) |
//! | `switchyard_dead_lettered_total` | counter | `topic` (middleware) |
//! | `switchyard_duplicates_skipped_total` | counter | `group` (middleware) |

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use parking_lot::RwLock;

use async_trait::async_trait;
use tracing::Instrument;

use crate::backend::stamp;
use crate::broker::{Broker, Capabilities, Publisher, SubscribeOptions, Subscriber, Subscription};
use crate::error::Result;
use crate::message::{Message, Receipt};

/// A W3C trace context: which trace a message belongs to and which span sent it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace id (non-zero).
    pub trace_id: u128,
    /// The id of the span that sent or handles the message (non-zero).
    pub span_id: u64,
    /// The sampled flag.
    pub sampled: bool,
}

tokio::task_local! {
    static CURRENT: TraceContext;
}

fn nonzero_random_u64() -> u64 {
    loop {
        let bytes = *uuid::Uuid::new_v4().as_bytes();
        let v = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        if v != 0 {
            return v;
        }
    }
}

impl TraceContext {
    /// A new trace.
    pub fn new_root() -> Self {
        let hi = u128::from(nonzero_random_u64());
        let lo = u128::from(nonzero_random_u64());
        Self {
            trace_id: (hi << 64) | lo,
            span_id: nonzero_random_u64(),
            sampled: true,
        }
    }

    /// A new span in the same trace.
    #[must_use]
    pub fn child(&self) -> Self {
        Self {
            span_id: nonzero_random_u64(),
            ..*self
        }
    }

    /// Parses a `traceparent` header value (`00-<32 hex>-<16 hex>-<2 hex>`).
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version.len() != 2
            || version == "ff"
            || trace.len() != 32
            || span.len() != 16
            || flags.len() != 2
        {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok().filter(|v| *v != 0)?;
        let span_id = u64::from_str_radix(span, 16).ok().filter(|v| *v != 0)?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The `traceparent` header value.
    pub fn to_header(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }

    /// The context of the handler running on this task, if any.
    pub fn current() -> Option<Self> {
        CURRENT.try_with(|c| *c).ok()
    }

    /// Runs `fut` with `self` as the current context (what the runtime does for handlers).
    pub async fn scope<F: std::future::Future>(self, fut: F) -> F::Output {
        CURRENT.scope(self, fut).await
    }

    /// Runs `f` with `self` as the current context, synchronously.
    pub fn sync_scope<R>(self, f: impl FnOnce() -> R) -> R {
        CURRENT.sync_scope(self, f)
    }

    /// The trace id as 32 hex digits, as span fields carry it.
    pub fn trace_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The span id as 16 hex digits.
    pub fn span_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_header())
    }
}

/// A broker wrapped with spans, counters and trace-context stamping on publish.
/// [`crate::Broker`]s returned by `switchyard::connect` are wrapped already.
pub struct Instrumented<B: ?Sized> {
    counters: RwLock<HashMap<String, (metrics::Counter, metrics::Counter)>>,
    inner: Arc<B>,
}

impl<B: ?Sized> Instrumented<B> {
    /// Wraps a broker.
    pub fn new(inner: Arc<B>) -> Self {
        Self {
            counters: RwLock::new(HashMap::new()),
            inner,
        }
    }

    /// The wrapped broker.
    pub fn inner(&self) -> &Arc<B> {
        &self.inner
    }

    fn count(&self, topic: &str, ok: bool, n: u64) {
        let cached =
            self.counters
                .read()
                .get(topic)
                .map(|(good, bad)| if ok { good.clone() } else { bad.clone() });
        let counter = cached.unwrap_or_else(|| {
            let pair = (
                metrics::counter!("switchyard_published_total", "topic" => topic.to_string(), "outcome" => "ok"),
                metrics::counter!("switchyard_published_total", "topic" => topic.to_string(), "outcome" => "error"),
            );
            let c = if ok { pair.0.clone() } else { pair.1.clone() };
            self.counters.write().insert(topic.to_string(), pair);
            c
        });
        counter.increment(n);
    }
}

#[async_trait]
impl<B: Broker + ?Sized> Publisher for Instrumented<B> {
    async fn publish(&self, topic: &str, mut message: Message) -> Result<Receipt> {
        let ctx = stamp(&mut message);
        let span = tracing::info_span!(
            "publish",
            topic,
            key = message.key.as_deref(),
            id = %message.id,
            trace_id = %ctx.trace_hex(),
            span_id = %ctx.span_hex(),
            outcome = tracing::field::Empty,
        );
        let result = self
            .inner
            .publish(topic, message)
            .instrument(span.clone())
            .await;
        span.record("outcome", if result.is_ok() { "ok" } else { "error" });
        self.count(topic, result.is_ok(), 1);
        result
    }

    async fn publish_batch(&self, topic: &str, mut messages: Vec<Message>) -> Result<Vec<Receipt>> {
        for m in &mut messages {
            stamp(m);
        }
        let n = messages.len() as u64;
        let span =
            tracing::info_span!("publish", topic, batch = n, outcome = tracing::field::Empty);
        let result = self
            .inner
            .publish_batch(topic, messages)
            .instrument(span.clone())
            .await;
        span.record("outcome", if result.is_ok() { "ok" } else { "error" });
        self.count(topic, result.is_ok(), n);
        result
    }
}

#[async_trait]
impl<B: Broker + ?Sized> Subscriber for Instrumented<B> {
    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        self.inner.subscribe(options).await
    }
}

#[async_trait]
impl<B: Broker + ?Sized> Broker for Instrumented<B> {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }

    async fn topics(&self) -> Result<Vec<crate::TopicInfo>> {
        self.inner.topics().await
    }

    async fn lag(&self, topic: &str, group: &str) -> Result<u64> {
        self.inner.lag(topic, group).await
    }

    async fn redeliver_after(
        &self,
        topic: &str,
        group: &str,
        message: crate::Message,
        delay: std::time::Duration,
    ) -> Result<()> {
        self.inner
            .redeliver_after(topic, group, message, delay)
            .await
    }
    async fn request(
        &self,
        topic: &str,
        mut message: crate::Message,
        timeout: std::time::Duration,
    ) -> Result<crate::Message> {
        stamp(&mut message);
        self.inner.request(topic, message, timeout).await
    }

    async fn send_reply(&self, address: &str, mut reply: crate::Message) -> Result<()> {
        stamp(&mut reply);
        self.inner.send_reply(address, reply).await
    }

    /// Stamps the trace context now, as a publish does, so the scheduled message
    /// carries the scheduler's trace.
    async fn publish_at(
        &self,
        topic: &str,
        mut message: crate::Message,
        when: std::time::SystemTime,
    ) -> Result<Receipt> {
        stamp(&mut message);
        self.inner.publish_at(topic, message, when).await
    }

    async fn publish_after(
        &self,
        topic: &str,
        mut message: crate::Message,
        delay: std::time::Duration,
    ) -> Result<Receipt> {
        stamp(&mut message);
        self.inner.publish_after(topic, message, delay).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_junk() {
        let ctx = TraceContext::new_root();
        let parsed = TraceContext::parse(&ctx.to_header()).unwrap();
        assert_eq!(parsed, ctx);
        let w3c = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = TraceContext::parse(w3c).unwrap();
        assert_eq!(c.to_header(), w3c);
        for bad in [
            "",
            "00-0-0-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad}");
        }
        let child = ctx.child();
        assert_eq!(child.trace_id, ctx.trace_id);
        assert_ne!(child.span_id, ctx.span_id);
    }

    #[tokio::test]
    async fn stamping_continues_the_current_trace() {
        let mut outside = Message::new("a");
        let root = stamp(&mut outside);
        let handler_ctx = root.child();
        let inside = handler_ctx
            .scope(async {
                let mut m = Message::new("b");
                stamp(&mut m)
            })
            .await;
        assert_eq!(inside.trace_id, root.trace_id);
        assert_ne!(inside.span_id, handler_ctx.span_id);
        let mut again = outside.clone();
        assert_eq!(stamp(&mut again), root, "an existing traceparent is kept");
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any header value, junk or nearly well-formed, parses or not without
        /// panicking; what parses has non-zero ids and survives writing out again.
        #[test]
        fn any_traceparent_parses_or_not(value in prop_oneof![
            "\\PC{0,64}",
            "[0-9a-fA-F+-]{0,60}",
            "[0-9a-f]{2}-[0-9a-fA-F+]{30,33}-[0-9a-fA-F+]{15,17}-[0-9a-fA-F+]{1,3}(-[0-9a-f]{0,4})?",
        ]) {
            if let Some(ctx) = TraceContext::parse(&value) {
                prop_assert!(ctx.trace_id != 0 && ctx.span_id != 0);
                prop_assert_eq!(TraceContext::parse(&ctx.to_header()), Some(ctx));
            }
        }

        #[test]
        fn written_contexts_parse_back(
            trace_id in 1..=u128::MAX,
            span_id in 1..=u64::MAX,
            sampled in any::<bool>(),
            padding in "[ \t]{0,2}",
        ) {
            let ctx = TraceContext { trace_id, span_id, sampled };
            let header = format!("{padding}{}{padding}", ctx.to_header());
            prop_assert_eq!(TraceContext::parse(&header), Some(ctx));
        }
    }
}
