//! Non-blocking retry through delay tiers (the seed's `@RetryableTopic`).
//!
//! A failed message does not wait in its consumer: [`RetryTopicLayer`] sends it on to
//! its next tier with the time it is due, and the original is acked. It comes back to
//! the **same group only** — other groups of the topic handled it already — and runs the
//! same handler stack again. After the last tier the failure passes through (to a
//! [`DeadLetterLayer`](crate::DeadLetterLayer) outside).
//!
//! One declarative policy ([`RetryTiers`]), mapped per backend:
//! - **RabbitMQ** (`Capabilities::delayed_delivery`): the broker holds the message in a
//!   queue whose message TTL is the tier's delay and which dead-letters into the
//!   group's own queues ([`Broker::redeliver_after`]). The main consumer sees it again.
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
//! Trade-off against in-process retry ([`RetryPolicy`](crate::RetryPolicy)): the
//! partition (or key) is not held up while a message waits, so one slow key does not
//! block others — but a later message with the same key is handled *before* the retried
//! one. Use in-process retry where per-key order matters more than throughput.
//!
//! Layer order: `DeadLetterLayer` → `RetryTopicLayer` → `IdempotencyLayer` → handler.
//! Idempotency must sit inside the tier layer, so a failure releases the message's mark
//! before the tier layer turns it into a success; otherwise the retried copy would be
//! skipped as a duplicate.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;

use switchyard_core::{
    Acker, AnyBroker, App, Consumer, Delivery, Error, FailureKind, HandlerError, Message, Nack,
    Origin, Result, StartFrom, SubscribeOptions, Subscriber,
};
use tower::{Layer, Service, ServiceExt};

use crate::recover::{OnFailure, Recover};

/// Header: how many tiers the message has been through.
pub const TIER_HEADER: &str = "x-retry-tier";
/// Header: when it is due back (milliseconds since the Unix epoch).
pub const DUE_HEADER: &str = "x-retry-due-ms";
/// Header: the topic it was first published to.
pub const ORIGIN_HEADER: &str = "x-retry-origin-topic";
/// Header: its partition on the topic it was first published to, where there is one.
pub const ORIGIN_PARTITION_HEADER: &str = "x-retry-origin-partition";
/// Header: its offset on the topic it was first published to, where there is one.
pub const ORIGIN_OFFSET_HEADER: &str = "x-retry-origin-offset";
/// Header: the error of its last failure.
pub const ERROR_HEADER: &str = "x-retry-error";

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
/// use switchyard_middleware::retry::RetryTiers;
/// use tower::ServiceBuilder;
///
/// let broker: AnyBroker = std::sync::Arc::new(switchyard_memory::MemoryBroker::new());
/// let tiers = RetryTiers::new(broker.clone(), [Duration::from_secs(1), Duration::from_secs(10)])?;
/// assert_eq!(tiers.tier_topic("orders", "payment", 0), "orders.payment.retry.0");
///
/// async fn pay(_: Delivery) -> Result<(), HandlerError> { Ok(()) }
/// let service = ServiceBuilder::new().layer(tiers.layer()).service(handler_fn(pay));
/// let app = tiers.add_consumers(App::new(broker), SubscribeOptions::new("orders", "payment"), service);
/// # let _ = app; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RetryTiers {
    delays: Arc<[Duration]>,
    broker: AnyBroker,
    native: bool,
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

    /// The layer that sends failures to the next tier.
    pub fn layer(&self) -> RetryTopicLayer {
        RetryTopicLayer {
            tiers: self.clone(),
        }
    }

    /// The consumers that run `service` (a stack holding [`Self::layer`]) for `options`:
    /// the topic's own first, then — where the broker cannot delay messages itself — one
    /// per tier topic, same group. Configure them (`concurrency`, `members`) before
    /// adding them to an [`App`].
    pub fn consumers<S>(&self, options: SubscribeOptions, service: S) -> Vec<Consumer<Tiered<S>>>
    where
        S: Clone,
    {
        let topic = options.topic.clone();
        let mut consumers = vec![Consumer::new(
            options.clone(),
            Tiered::new(service.clone(), &topic, &options.group, None, self),
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
                        Tiered::new(service.clone(), &topic, &options.group, Some(n), self),
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

/// Sends a failed delivery to its next retry tier (see [`RetryTiers`]).
#[derive(Clone)]
pub struct RetryTopicLayer {
    tiers: RetryTiers,
}

impl<S> Layer<S> for RetryTopicLayer {
    type Service = RetryTopic<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Recover::new(inner, self.clone())
    }
}

/// The service [`RetryTopicLayer`] produces.
pub type RetryTopic<S> = Recover<S, RetryTopicLayer>;

fn header<T: std::str::FromStr>(m: &Message, name: &str) -> Option<T> {
    m.headers.get(name).and_then(|v| v.parse().ok())
}

impl OnFailure for RetryTopicLayer {
    fn on_failure(
        &self,
        delivery: Delivery,
        error: HandlerError,
    ) -> BoxFuture<'static, Result<(), HandlerError>> {
        let tiers = self.tiers.clone();
        Box::pin(async move {
            // A store outage is not the message's failure: it must not use up a tier.
            if !error.is_retryable() || error.kind() == FailureKind::Unavailable {
                return Err(error);
            }
            let m = delivery.message();
            let hops: usize = header(m, TIER_HEADER).unwrap_or(0);
            let Some(delay) = tiers.delays.get(hops).copied() else {
                return Err(error); // tiers exhausted: on to the dead-letter layer
            };
            // The delivery's own topic, never a header: [`Tiered`] presents a tier's
            // deliveries as coming from the original topic, and a header could be forged
            // to send the retry into another topic's group.
            let origin = delivery.topic().to_string();
            let group = delivery.group().to_string();
            let due = SystemTime::now() + delay;
            // Rounded up: a retry may come a millisecond late, never early.
            let due_ms = due
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
                .div_ceil(1_000_000);
            let mut next = m.clone();
            let h = &mut next.headers;
            h.insert(TIER_HEADER.into(), (hops + 1).to_string());
            h.insert(DUE_HEADER.into(), due_ms.to_string());
            h.insert(ORIGIN_HEADER.into(), origin.clone());
            h.insert(ERROR_HEADER.into(), error.source_error().to_string());
            // Where it first came from, for the dead-letter headers if all tiers fail.
            if !h.contains_key(ORIGIN_PARTITION_HEADER) {
                let o = delivery.origin();
                if let Some(p) = o.partition {
                    h.insert(ORIGIN_PARTITION_HEADER.into(), p.to_string());
                }
                if let Some(off) = o.offset {
                    h.insert(ORIGIN_OFFSET_HEADER.into(), off.to_string());
                }
            }
            let (sent, to) = if tiers.native {
                let sent = tiers
                    .broker
                    .redeliver_after(&origin, &group, next, delay)
                    .await;
                (sent, format!("{origin} (delayed {delay:?} by the broker)"))
            } else {
                let topic = tiers.tier_topic(&origin, &group, hops);
                let sent = tiers.broker.publish(&topic, next).await.map(drop);
                (sent, topic)
            };
            match sent {
                Ok(()) => {
                    tracing::info!(
                        id = delivery.id(),
                        tier = hops,
                        ?delay,
                        to,
                        "sent to retry tier"
                    );
                    Ok(())
                }
                Err(e) => Err(HandlerError::transient(format!(
                    "{error}; and sending it to retry tier {to} failed: {e}"
                ))),
            }
        })
    }
}

/// Runs a service on deliveries that may have come through retry tiers: waits until a
/// message is due, and presents it as coming from its original topic with its attempts
/// so far (tier hops included), so dead-letter headers name the real origin.
///
/// The retry headers steer where a message goes and how long a handler slot waits, so
/// they are believed only where switchyard wrote them: on a tier topic (whose number, not
/// the header, gives the hop count, and whose delay caps the wait), and on a broker that
/// delays natively, on messages its backend saw come back from a hold queue. Anywhere
/// else they are removed before the handler runs.
#[derive(Clone)]
pub struct Tiered<S> {
    inner: S,
    topic: Arc<str>,
    group: Arc<str>,
    /// `Some(n)` on the consumer of tier topic `n`, `None` on the topic's own consumer.
    tier: Option<usize>,
    delays: Arc<[Duration]>,
    native: bool,
}

impl<S> Tiered<S> {
    fn new(inner: S, topic: &str, group: &str, tier: Option<usize>, tiers: &RetryTiers) -> Self {
        Self {
            inner,
            topic: topic.into(),
            group: group.into(),
            tier,
            delays: tiers.delays.clone(),
            native: tiers.native,
        }
    }

    /// How many tiers the message has been through, where that can be believed.
    fn hops(&self, m: &Message) -> Option<usize> {
        match self.tier {
            Some(n) => Some(n + 1),
            None if self.native => {
                header::<usize>(m, TIER_HEADER).map(|h| h.clamp(1, self.delays.len()))
            }
            None => None,
        }
    }
}

fn is_retry_header(name: &str) -> bool {
    name.starts_with("x-retry-")
}

/// The same delivery with a changed message, settled through the original.
fn represent(delivery: &Delivery, message: Message, attempt: u32, origin: Origin) -> Delivery {
    Delivery::new(
        Arc::new(message),
        attempt,
        origin,
        Forward(delivery.clone()),
    )
}

impl<S> Service<Delivery> for Tiered<S>
where
    S: Service<Delivery, Response = (), Error = HandlerError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = HandlerError;
    type Future = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        // The clone that was polled ready is the one called (tower's usual swap).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let (topic, group) = (self.topic.clone(), self.group.clone());
        let hops = self.hops(delivery.message());
        let longest = self.delays.iter().max().copied().unwrap_or_default();
        let delay = hops.map_or(longest, |h| {
            self.delays.get(h - 1).copied().unwrap_or(longest)
        });
        Box::pin(async move {
            let m = delivery.message();
            let Some(hops) = hops else {
                if !m.headers.keys().any(|k| is_retry_header(k)) {
                    return inner.oneshot(delivery).await; // a first delivery: as it is
                }
                // Retry headers on a first delivery were written by someone else.
                let mut clean = m.clone();
                clean.headers.retain(|k, _| !is_retry_header(k));
                let seen = represent(
                    &delivery,
                    clean,
                    delivery.attempt(),
                    delivery.origin().clone(),
                );
                return inner.oneshot(seen).await;
            };
            if let Some(due) = header::<u64>(m, DUE_HEADER) {
                // Never longer than the tier's own delay: a due time far off would hold
                // the handler slot, the key and (on Kafka) the commit point.
                let due = UNIX_EPOCH.checked_add(Duration::from_millis(due));
                if let Some(wait) = due.and_then(|d| d.duration_since(SystemTime::now()).ok()) {
                    tokio::time::sleep(wait.min(delay)).await;
                }
            }
            let origin = Origin::new(
                topic,
                group,
                header(m, ORIGIN_PARTITION_HEADER),
                header(m, ORIGIN_OFFSET_HEADER),
            );
            let attempt = delivery
                .attempt()
                .saturating_add(u32::try_from(hops).unwrap_or(u32::MAX));
            let mut message = m.clone();
            message.headers.insert(TIER_HEADER.into(), hops.to_string());
            inner
                .oneshot(represent(&delivery, message, attempt, origin))
                .await
        })
    }
}

/// Settles the broker's delivery when the re-presented one is settled. Dropping the
/// re-presented one does nothing: the broker's delivery has its own drop handling.
struct Forward(Delivery);

impl Acker for Forward {
    fn ack(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.0.ack())
    }

    fn nack(&self, action: Nack) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.0.nack(action))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_core::{handler_fn, CancellationToken, MAX_NAME_LEN};

    async fn ok(_: Delivery) -> Result<(), HandlerError> {
        Ok(())
    }

    struct NoAck;
    impl Acker for NoAck {
        fn ack(&self) -> BoxFuture<'_, Result<()>> {
            Box::pin(async { Ok(()) })
        }
        fn nack(&self, _: Nack) -> BoxFuture<'_, Result<()>> {
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test]
    async fn a_store_outage_does_not_use_up_a_tier() {
        let broker: AnyBroker = Arc::new(switchyard_memory::MemoryBroker::new());
        let tiers = RetryTiers::new(broker.clone(), [Duration::from_millis(10)]).unwrap();
        async fn down(_: Delivery) -> Result<(), HandlerError> {
            Err(HandlerError::unavailable(std::io::Error::other(
                "store down",
            )))
        }
        let service = tiers.layer().layer(handler_fn(down));
        let origin = Origin::new("t".into(), "g".into(), None, None);
        let delivery = Delivery::new(Arc::new(Message::new("x")), 1, origin, NoAck);
        let e = service.oneshot(delivery).await.unwrap_err();
        assert_eq!(e.kind(), FailureKind::Unavailable);
        let mut sub = broker
            .subscribe(SubscribeOptions::new(
                tiers.tier_topic("t", "g", 0),
                "probe",
            ))
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_millis(200), sub.recv()).await;
        assert!(got.is_err(), "nothing was sent to the tier topic");
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

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Mutex;

    struct NoAck;
    impl Acker for NoAck {
        fn ack(&self) -> BoxFuture<'_, Result<()>> {
            Box::pin(async { Ok(()) })
        }
        fn nack(&self, _: Nack) -> BoxFuture<'_, Result<()>> {
            Box::pin(async { Ok(()) })
        }
    }

    fn header_value() -> impl Strategy<Value = String> {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        prop_oneof![
            "\\PC{0,24}",
            any::<u64>().prop_map(|n| n.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            // Due times around now, up to a day ahead.
            (0..86_400_000u64).prop_map(move |d| (now_ms + d).to_string()),
            Just(u64::MAX.to_string()),
            Just("18446744073709551616".to_string()),
        ]
    }

    fn retry_headers() -> impl Strategy<Value = Vec<(String, String)>> {
        let name = prop_oneof![
            proptest::sample::select(vec![
                TIER_HEADER,
                DUE_HEADER,
                ORIGIN_HEADER,
                ORIGIN_PARTITION_HEADER,
                ORIGIN_OFFSET_HEADER,
                ERROR_HEADER,
            ])
            .prop_map(String::from),
            "x-retry-\\PC{0,6}",
            "\\PC{0,8}",
        ];
        proptest::collection::vec((name, header_value()), 0..8)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever retry headers a message carries, the handler runs once, after a wait
        /// no longer than the delay of the tier the consumer stands for (the longest,
        /// where none is known); on a first delivery without native delays it never
        /// sees a retry header, and the attempt never goes down.
        #[test]
        fn any_retry_headers_are_handled_within_the_tier_delay(
            hs in retry_headers(),
            delays_ms in proptest::collection::vec(1..120_000u64, 1..4),
            tier in proptest::option::of(0..4usize),
            native in any::<bool>(),
            attempt in any::<u32>(),
        ) {
            let delays: Vec<Duration> = delays_ms.iter().map(|ms| Duration::from_millis(*ms)).collect();
            let tier = tier.filter(|n| *n < delays.len() && !native);
            let broker: AnyBroker = Arc::new(switchyard_memory::MemoryBroker::new());
            let tiers = RetryTiers { delays: delays.clone().into(), broker, native };
            let seen: Arc<Mutex<Vec<(Message, u32)>>> = Arc::default();
            let record = seen.clone();
            let handler = tower::service_fn(move |d: Delivery| {
                record.lock().unwrap().push((d.message().clone(), d.attempt()));
                async { Ok::<(), HandlerError>(()) }
            });
            let mut service = Tiered::new(handler, "t", "g", tier, &tiers);
            let mut m = Message::new("x");
            m.headers = hs.into_iter().collect();
            let origin = Origin::new("t".into(), "g".into(), Some(0), Some(1));
            let delivery = Delivery::new(Arc::new(m), attempt, origin, NoAck);

            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            let waited = rt.block_on(async {
                let start = tokio::time::Instant::now();
                service.call(delivery).await.unwrap();
                start.elapsed()
            });
            let cap = match tier {
                Some(n) => delays[n],
                None => delays.iter().max().copied().unwrap(),
            };
            prop_assert!(waited <= cap, "waited {waited:?}, cap {cap:?}");
            let seen = seen.lock().unwrap();
            prop_assert_eq!(seen.len(), 1);
            let (handled, handled_attempt) = &seen[0];
            prop_assert!(*handled_attempt >= attempt);
            if tier.is_none() && !native {
                prop_assert!(handled.headers.keys().all(|k| !is_retry_header(k)), "{:?}", handled.headers);
                prop_assert_eq!(*handled_attempt, attempt);
            }
        }
    }
}
