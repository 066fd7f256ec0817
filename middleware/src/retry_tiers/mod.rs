//! Non-blocking retry through delay tiers (Spring Kafka's `@RetryableTopic`).
//!
//! A failed message does not wait in its consumer: [`RetryTiersLayer`] sends it on to
//! its next tier with the time it is due, and the original is acked. It comes back to
//! the **same group only** — other groups of the topic handled it already — and runs the
//! same handler stack again. After the last tier the failure passes through (to a
//! [`DeadLetterLayer`](crate::DeadLetterLayer) outside).
//!
//! One declarative policy ([`RetryTiers`]), mapped per backend:
//! - **RabbitMQ** (`Capabilities::delayed_delivery`): the broker holds the message in a
//!   queue whose message TTL is the tier's delay and which dead-letters into the
//!   group's own queues ([`Broker::redeliver_after`](switchyard_core::Broker::redeliver_after)). The main consumer sees it again.
//! - **Kafka and memory**: the message goes to the tier topic `<topic>.<group>.retry.<n>`,
//!   consumed by the same group with the same handler, which first waits until the
//!   message is due (on memory that wait is a timer; on Kafka it holds that tier
//!   topic's partition, whose messages all fall due in order anyway). This is Spring
//!   Kafka's retry-topic design; the group is in the name because a Kafka topic cannot
//!   address one group.
//!
//! [`RetryTiers::consumers`] builds the consumers a backend needs (one, or one per tier
//! more), all running the same service.
//!
//! Trade-off against in-process retry ([`RetryLayer`](crate::RetryLayer)): the
//! partition (or key) is not held up while a message waits, so one slow key does not
//! block others — but a later message with the same key is handled *before* the retried
//! one. Use in-process retry where per-key order matters more than throughput.
//!
//! Layer order: `DeadLetterLayer` → `RetryTiersLayer` → `IdempotencyLayer` → handler.
//! Idempotency must sit inside the tier layer, so a failure releases the message's mark
//! before the tier layer turns it into a success; otherwise the retried copy would be
//! skipped as a duplicate.

mod future;
mod inbound;
mod layer;
mod service;

pub use future::RetryTiersFuture;
pub use inbound::RetryTiersInbound;
pub use layer::RetryTiersLayer;
pub use service::RetryTiersService;

use std::sync::Arc;
use std::time::Duration;

use switchyard_core::{
    AnyBroker, App, Consumer, Delivery, Error, HandlerError, Message, Result, StartFrom,
    SubscribeOptions, Subscriber,
};
use tower::Service;

/// Header names written to messages sent to a retry tier. All start with [`PREFIX`](headers::PREFIX)
/// (`x-retry-`), and are believed only where switchyard wrote them (see
/// [`RetryTiersInbound`]).
pub mod headers {
    /// What every retry tier header starts with.
    pub const PREFIX: &str = switchyard_core::headers::RETRY_TIER_PREFIX;
    /// How many tiers the message has been through.
    pub const TIER: &str = "x-retry-tier";
    /// When it is due back (milliseconds since the Unix epoch).
    pub const DUE: &str = "x-retry-due-ms";
    /// The topic it was first published to.
    pub const ORIGINAL_TOPIC: &str = "x-retry-original-topic";
    /// Its partition on that topic, where there is one.
    pub const ORIGINAL_PARTITION: &str = "x-retry-original-partition";
    /// Its offset on that topic, where there is one.
    pub const ORIGINAL_OFFSET: &str = "x-retry-original-offset";
    /// The error of its last failure.
    pub const ERROR: &str = "x-retry-error";
}

/// Tier consumers wait for due messages inside the handler slot, so on shutdown they are
/// cut short quickly: an unacked message simply comes back after a restart.
const TIER_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// Waiting messages each hold a slot until due, so tier consumers get more of them.
const TIER_CONCURRENCY: usize = 64;

/// One declarative policy: the delay of each tier, in order, for one broker.
///
/// ```
/// # async fn demo() -> switchyard_core::Result<()> {
/// use std::time::Duration;
/// use switchyard_core::{App, AnyBroker, Delivery, HandlerError, SubscribeOptions, handler_fn};
/// use switchyard_middleware::retry_tiers::{RetryTiers, RetryTiersLayer};
/// use tower::ServiceBuilder;
///
/// let broker: AnyBroker = std::sync::Arc::new(switchyard_memory::MemoryBroker::new());
/// let tiers = RetryTiers::new(broker.clone(), [Duration::from_secs(1), Duration::from_secs(10)])?;
/// assert_eq!(tiers.tier_topic("orders", "payment", 0), "orders.payment.retry.0");
///
/// async fn pay(_: Delivery) -> Result<(), HandlerError> { Ok(()) }
/// let service = ServiceBuilder::new().layer(RetryTiersLayer::new(tiers.clone())).service(handler_fn(pay));
/// let app = tiers.add_consumers(App::new(broker), SubscribeOptions::new("orders", "payment"), service);
/// # let _ = app; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RetryTiers {
    pub(crate) delays: Arc<[Duration]>,
    pub(crate) broker: AnyBroker,
    pub(crate) native: bool,
}

impl RetryTiers {
    /// Tiers with these delays (at least one) on `broker`.
    pub fn new(broker: AnyBroker, delays: impl IntoIterator<Item = Duration>) -> Result<Self> {
        let delays: Arc<[Duration]> = delays.into_iter().collect();
        if delays.is_empty() {
            return Err(Error::config(
                "delays",
                "give at least one retry tier delay, e.g. [1s, 10s, 60s]",
            ));
        }
        let native = broker.capabilities().delayed_delivery;
        Ok(Self {
            delays,
            broker,
            native,
        })
    }

    /// The delays.
    pub fn delays(&self) -> &[Duration] {
        &self.delays
    }

    /// Whether the broker delays messages itself (no tier topics, no tier consumers).
    pub fn is_native(&self) -> bool {
        self.native
    }

    /// Tier `n`'s topic for `group` of `topic`, where tier topics are used:
    /// `<topic>.<group>.retry.<n>`, consumed by the group `<group>.retry.<n>`.
    pub fn tier_topic(&self, topic: &str, group: &str, n: usize) -> String {
        format!("{topic}.{group}.retry.{n}")
    }

    /// The consumers that run `service` (a stack holding a [`RetryTiersLayer`]) for `options`:
    /// the topic's own first, then — where the broker cannot delay messages itself — one
    /// per tier topic, same group. Configure them (`concurrency`, `members`) before
    /// adding them to an [`App`].
    #[must_use = "the tiers are handled only by consumers that run"]
    pub fn consumers<S>(
        &self,
        options: SubscribeOptions,
        service: S,
    ) -> Vec<Consumer<RetryTiersInbound<S>>>
    where
        S: Clone,
    {
        let topic = options.topic.clone();
        let mut consumers = vec![Consumer::new(
            options.clone(),
            RetryTiersInbound::new(service.clone(), &topic, &options.group, None, self),
        )];
        if !self.native {
            for n in 0..self.delays.len() {
                // Its own group per tier (as Spring Kafka does): a Kafka group whose
                // members subscribe to different topics rebalances them all on each join.
                let mut tier = options.clone();
                tier.topic = self.tier_topic(&topic, &options.group, n);
                tier.group = format!("{}.retry.{n}", options.group);
                // A retry published before the tier group first joined must not be skipped.
                tier.start = StartFrom::Earliest;
                consumers.push(
                    Consumer::new(
                        tier,
                        RetryTiersInbound::new(
                            service.clone(),
                            &topic,
                            &options.group,
                            Some(n),
                            self,
                        ),
                    )
                    .concurrency(TIER_CONCURRENCY)
                    .shutdown_timeout(TIER_SHUTDOWN_TIMEOUT),
                );
            }
        }
        consumers
    }

    /// Adds [`Self::consumers`] to `app` with their default settings. Start the app
    /// before failures can happen, so the tier groups exist on brokers without replay.
    pub fn add_consumers<B, S>(&self, app: App<B>, options: SubscribeOptions, service: S) -> App<B>
    where
        B: Subscriber + ?Sized + 'static,
        S: Service<Delivery, Response = (), Error = HandlerError> + Clone + Send + 'static,
        S::Future: Send + 'static,
    {
        self.consumers(options, service)
            .into_iter()
            .fold(app, |app, c| app.consumer(c))
    }
}

pub(crate) fn header<T: std::str::FromStr>(m: &Message, name: &str) -> Option<T> {
    m.headers.get(name).and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_core::backend::MAX_NAME_LEN;
    use switchyard_core::{handler_fn, CancellationToken};

    async fn ok(_: Delivery) -> Result<(), HandlerError> {
        Ok(())
    }

    #[tokio::test]
    async fn names_too_long_for_the_derived_topics_fail_at_start() {
        let broker: AnyBroker = Arc::new(switchyard_memory::MemoryBroker::new());
        // Valid on its own, but its dead-letter topic would not be.
        let topic = "t".repeat(MAX_NAME_LEN - 2);
        let consumer = Consumer::handler(SubscribeOptions::new(&topic, "g"), ok);
        let e = consumer
            .start(broker.clone(), CancellationToken::new())
            .await
            .err()
            .expect("a topic without room for its dead-letter topic is refused");
        assert!(e.to_string().contains(".dlq"), "{e}");

        // Valid topic and group whose tier topic would be too long.
        let tiers = RetryTiers::new(broker.clone(), [Duration::from_millis(10)]).unwrap();
        let (topic, group) = ("t".repeat(120), "g".repeat(120));
        let tier_topic = tiers.tier_topic(&topic, &group, 0);
        let app = tiers.add_consumers(
            App::new(broker),
            SubscribeOptions::new(&topic, &group),
            handler_fn(ok),
        );
        let e = app
            .start(CancellationToken::new())
            .await
            .err()
            .expect("a tier topic over the name limit is refused at start");
        assert!(e.to_string().contains(&tier_topic), "{e}");
    }
}
