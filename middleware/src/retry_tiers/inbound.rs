//! The receiving side of retry tiers: the service every consumer of a tiered topic runs.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use switchyard_core::backend::Acker;
use switchyard_core::{Delivery, HandlerError, Message, Nack, Origin, Result};
use tower::{Service, ServiceExt};

use super::{header, headers, RetryTiers};

/// Runs a service on deliveries that may have come through retry tiers: waits until a
/// message is due, and presents it as coming from its original topic with its deliveries
/// so far (tier hops included), so dead-letter headers name the real origin.
///
/// The retry headers steer where a message goes and how long a handler slot waits, so
/// they are believed only where switchyard wrote them: on a tier topic (whose number, not
/// the header, gives the hop count, and whose delay caps the wait), and on a broker that
/// delays natively, on messages its backend saw come back from a hold queue. Anywhere
/// else they are removed before the handler runs.
#[derive(Clone)]
pub struct RetryTiersInbound<S> {
    inner: S,
    topic: Arc<str>,
    group: Arc<str>,
    /// `Some(n)` on the consumer of tier topic `n`, `None` on the topic's own consumer.
    tier: Option<usize>,
    delays: Arc<[Duration]>,
    native: bool,
}

impl<S> RetryTiersInbound<S> {
    pub(super) fn new(
        inner: S,
        topic: &str,
        group: &str,
        tier: Option<usize>,
        tiers: &RetryTiers,
    ) -> Self {
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
                header::<usize>(m, headers::TIER).map(|h| h.clamp(1, self.delays.len()))
            }
            None => None,
        }
    }
}

fn is_retry_header(name: &str) -> bool {
    name.starts_with(headers::PREFIX)
}

/// The same delivery with a changed message, settled through the original.
fn represent(
    delivery: &Delivery,
    message: Message,
    delivery_count: u32,
    origin: Origin,
) -> Delivery {
    Delivery::new(
        Arc::new(message),
        delivery_count,
        origin,
        Forward(delivery.clone()),
    )
}

impl<S> Service<Delivery> for RetryTiersInbound<S>
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
                    delivery.delivery_count(),
                    delivery.origin().clone(),
                );
                return inner.oneshot(seen).await;
            };
            if let Some(due) = header::<u64>(m, headers::DUE) {
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
                header(m, headers::ORIGINAL_PARTITION),
                header(m, headers::ORIGINAL_OFFSET),
            );
            let delivery_count = delivery
                .delivery_count()
                .saturating_add(u32::try_from(hops).unwrap_or(u32::MAX));
            let mut message = m.clone();
            message
                .headers
                .insert(headers::TIER.into(), hops.to_string());
            inner
                .oneshot(represent(&delivery, message, delivery_count, origin))
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
mod proptests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Mutex;
    use switchyard_core::AnyBroker;

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
                headers::TIER,
                headers::DUE,
                headers::ORIGINAL_TOPIC,
                headers::ORIGINAL_PARTITION,
                headers::ORIGINAL_OFFSET,
                headers::ERROR,
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
                record.lock().unwrap().push((d.message().clone(), d.delivery_count()));
                async { Ok::<(), HandlerError>(()) }
            });
            let mut service = RetryTiersInbound::new(handler, "t", "g", tier, &tiers);
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
