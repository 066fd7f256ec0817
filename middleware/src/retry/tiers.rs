//! Non-blocking retry through delay tiers (the seed's `@RetryableTopic`).
//!
//! A failed message does not wait in its consumer: [`RetryTopicLayer`] publishes it to
//! the tier topic `<topic>.retry.<n>` with the time it is due, and acks it. A forwarder
//! consumer per tier ([`RetryTiers::add_forwarders`]) waits until the message is due and
//! publishes it back to `<topic>`, same id, key and payload. After the last tier the
//! failure passes through (to a [`DeadLetterLayer`](crate::DeadLetterLayer) outside).
//!
//! Built from publish and subscribe only, it works the same on every backend: on Kafka
//! these are retry topics, on memory the forwarder's wait is a timer; on RabbitMQ the
//! tier topics are exchanges with their queues (RabbitMQ's TTL-queue + dead-letter
//! exchange mapping is not used yet).
//!
//! Trade-off against in-process retry ([`RetryPolicy`](crate::RetryPolicy)): the
//! partition (or key) is not held up while a message waits, so one slow key does not
//! block others — but a later message with the same key is handled *before* the retried
//! one. Use in-process retry where per-key order matters more than throughput.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;

use switchyard_core::{
    App, Consumer, Delivery, Error, HandlerError, Publisher, Result, SubscribeOptions, Subscriber,
};
use tower::Layer;

use crate::recover::{OnFailure, Recover};

/// Header: how many tiers the message has been through.
pub const TIER_HEADER: &str = "x-retry-tier";
/// Header: when it is due back on its topic (milliseconds since the Unix epoch).
pub const DUE_HEADER: &str = "x-retry-due-ms";
/// Header: the topic it returns to.
pub const ORIGIN_HEADER: &str = "x-retry-origin-topic";
/// Header: the error of its last failure.
pub const ERROR_HEADER: &str = "x-retry-error";

/// One declarative policy: the delay of each tier, in order.
///
/// ```
/// use std::time::Duration;
/// use switchyard_middleware::retry::RetryTiers;
/// let tiers = RetryTiers::new([Duration::from_secs(1), Duration::from_secs(10), Duration::from_secs(60)]).unwrap();
/// assert_eq!(tiers.tier_topic("orders", 0), "orders.retry.0");
/// ```
#[derive(Clone, Debug)]
pub struct RetryTiers {
    delays: Arc<[Duration]>,
    group: String,
}

impl RetryTiers {
    /// Tiers with these delays (at least one).
    pub fn new(delays: impl IntoIterator<Item = Duration>) -> Result<Self> {
        let delays: Arc<[Duration]> = delays.into_iter().collect();
        if delays.is_empty() {
            return Err(Error::config(
                "delays",
                "give at least one retry tier delay, e.g. [1s, 10s, 60s]",
            ));
        }
        Ok(Self {
            delays,
            group: "switchyard-retry".into(),
        })
    }

    /// The group the forwarders consume tier topics as (default `switchyard-retry`).
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = group.into();
        self
    }

    /// The delays.
    pub fn delays(&self) -> &[Duration] {
        &self.delays
    }

    /// Tier `n`'s topic for `topic`: `<topic>.retry.<n>`.
    pub fn tier_topic(&self, topic: &str, n: usize) -> String {
        format!("{topic}.retry.{n}")
    }

    /// The layer that sends failures to the next tier.
    pub fn layer(&self, publisher: Arc<dyn Publisher>) -> RetryTopicLayer {
        RetryTopicLayer {
            tiers: self.clone(),
            publisher,
        }
    }

    /// Adds to `app` one forwarder per tier of `topic`, publishing due messages back
    /// through `publisher`. Start the app before failures can happen, so the tier groups
    /// exist on brokers without replay.
    pub fn add_forwarders<B>(
        &self,
        app: App<B>,
        topic: &str,
        publisher: Arc<dyn Publisher>,
    ) -> App<B>
    where
        B: Subscriber + ?Sized + 'static,
    {
        let mut app = app;
        for n in 0..self.delays.len() {
            let publisher = publisher.clone();
            let origin_default = topic.to_string();
            let forward = move |d: Delivery| {
                let publisher = publisher.clone();
                let origin_default = origin_default.clone();
                async move {
                    let m = d.message();
                    if let Some(due) = m
                        .headers
                        .get(DUE_HEADER)
                        .and_then(|v| v.parse::<u64>().ok())
                    {
                        let due = UNIX_EPOCH + Duration::from_millis(due);
                        if let Ok(wait) = due.duration_since(SystemTime::now()) {
                            tokio::time::sleep(wait).await;
                        }
                    }
                    let origin = m
                        .headers
                        .get(ORIGIN_HEADER)
                        .cloned()
                        .unwrap_or(origin_default);
                    let mut back = m.clone();
                    back.headers.remove(DUE_HEADER);
                    back.headers.remove(ORIGIN_HEADER);
                    publisher.publish(&origin, back).await?;
                    Ok::<_, HandlerError>(())
                }
            };
            // Generous concurrency: waiting messages each hold a slot until due.
            let options =
                SubscribeOptions::new(self.tier_topic(topic, n), &self.group).prefetch(1024);
            app = app.consumer(Consumer::handler(options, forward).concurrency(1024));
        }
        app
    }
}

/// Sends a failed delivery to its next retry tier (see [`RetryTiers`]).
#[derive(Clone)]
pub struct RetryTopicLayer {
    tiers: RetryTiers,
    publisher: Arc<dyn Publisher>,
}

impl<S> Layer<S> for RetryTopicLayer {
    type Service = RetryTopic<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Recover::new(inner, self.clone())
    }
}

/// The service [`RetryTopicLayer`] produces.
pub type RetryTopic<S> = Recover<S, RetryTopicLayer>;

impl OnFailure for RetryTopicLayer {
    fn on_failure(
        &self,
        delivery: Delivery,
        error: HandlerError,
    ) -> BoxFuture<'static, Result<(), HandlerError>> {
        let layer = self.clone();
        Box::pin(async move {
            if !error.is_retryable() {
                return Err(error);
            }
            let m = delivery.message();
            let tier: usize = m
                .headers
                .get(TIER_HEADER)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let Some(delay) = layer.tiers.delays.get(tier) else {
                return Err(error); // tiers exhausted: on to the dead-letter layer
            };
            let origin = m
                .headers
                .get(ORIGIN_HEADER)
                .cloned()
                .unwrap_or_else(|| delivery.topic().to_string());
            let due = SystemTime::now() + *delay;
            // Rounded up: a retry may come a millisecond late, never early.
            let due_ms = due
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
                .div_ceil(1_000_000);
            let mut next = m.clone();
            next.headers
                .insert(TIER_HEADER.into(), (tier + 1).to_string());
            next.headers.insert(DUE_HEADER.into(), due_ms.to_string());
            next.headers.insert(ORIGIN_HEADER.into(), origin.clone());
            next.headers
                .insert(ERROR_HEADER.into(), error.source_error().to_string());
            let topic = layer.tiers.tier_topic(&origin, tier);
            match layer.publisher.publish(&topic, next).await {
                Ok(_) => {
                    tracing::info!(
                        id = delivery.id(),
                        tier,
                        ?delay,
                        topic,
                        "sent to retry tier"
                    );
                    Ok(())
                }
                Err(e) => Err(HandlerError::transient(format!(
                    "{error}; and publishing to retry tier {topic} failed: {e}"
                ))),
            }
        })
    }
}
