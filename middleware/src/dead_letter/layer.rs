//! The layer that dead-letters a message after its last failure.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use switchyard_core::{Delivery, Publisher};
use tower::Layer;

use super::{default_dlq_topic, DeadLetter};

type TopicFn = dyn Fn(&str) -> String + Send + Sync;

/// Dead-letters a delivery whose handler failed for the last time.
///
/// "Last time" means: the failure is not retryable (permanent, decode), or the delivery
/// has reached `max_deliveries` deliveries by the broker (default 1: the first failed
/// delivery is dead-lettered, so put a [`RetryLayer`](crate::RetryLayer) inside this one
/// to retry in process first). Earlier failures pass through, and the runtime nacks them for
/// redelivery.
///
/// A [`FailureKind::Unavailable`](switchyard_core::FailureKind::Unavailable) failure (a store the handling depends on was down) is
/// never dead-lettered, and the deliveries it cost do not count toward `max_deliveries`.
#[derive(Clone)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct DeadLetterLayer {
    pub(super) publisher: Arc<dyn Publisher>,
    pub(super) topic_for: Arc<TopicFn>,
    pub(super) max_deliveries: u32,
    pub(super) outages: Arc<Mutex<Outages>>,
}

/// How many deliveries of each message ended in an outage, for the most recent
/// [`OUTAGE_MEMORY`] messages: the broker counts those deliveries, this layer does not.
#[derive(Default)]
pub(super) struct Outages {
    counts: HashMap<(Arc<str>, Arc<str>), u32>,
    order: VecDeque<(Arc<str>, Arc<str>)>,
}

/// Messages whose outage counts are remembered; the oldest is forgotten first. Past it a
/// message may be dead-lettered early, after an outage that outlasted that many others.
const OUTAGE_MEMORY: usize = 10_000;

impl Outages {
    fn key(delivery: &Delivery) -> (Arc<str>, Arc<str>) {
        (delivery.group().into(), delivery.id().into())
    }

    pub(super) fn record(&mut self, delivery: &Delivery) {
        let key = Self::key(delivery);
        if let Some(n) = self.counts.get_mut(&key) {
            *n += 1;
            return;
        }
        if self.order.len() >= OUTAGE_MEMORY {
            if let Some(old) = self.order.pop_front() {
                self.counts.remove(&old);
            }
        }
        self.order.push_back(key.clone());
        self.counts.insert(key, 1);
    }

    pub(super) fn of(&self, delivery: &Delivery) -> u32 {
        if self.counts.is_empty() {
            return 0;
        }
        self.counts.get(&Self::key(delivery)).copied().unwrap_or(0)
    }
}

impl DeadLetterLayer {
    /// Dead-letters to `<topic>.dlq` through `publisher`.
    pub fn new(publisher: Arc<dyn Publisher>) -> Self {
        Self {
            publisher,
            topic_for: Arc::new(default_dlq_topic),
            max_deliveries: 1,
            outages: Arc::default(),
        }
    }

    /// Names the dead-letter topic of each topic (default `<topic>.dlq`).
    pub fn topic(mut self, topic_for: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        self.topic_for = Arc::new(topic_for);
        self
    }

    /// How many broker deliveries a retryable failure gets before it is dead-lettered.
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = n.max(1);
        self
    }
}

impl<S> Layer<S> for DeadLetterLayer {
    type Service = DeadLetter<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DeadLetter::new(inner, Arc::new(self.clone()))
    }
}
