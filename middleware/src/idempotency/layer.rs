//! The layer that skips already-handled messages, and its settings.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchyard_core::backend::Backoff;
use tower::Layer;

use super::{Idempotency, IdempotencyStore};

/// Runs each message id at most once per group (see the [module docs](super)).
#[derive(Clone)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct IdempotencyLayer {
    pub(super) store: Arc<dyn IdempotencyStore>,
    pub(super) lease: Duration,
    pub(super) retention: Duration,
    pub(super) poll: Duration,
    /// The most one store call may take before it counts as failed.
    pub(super) try_timeout: Duration,
    /// Pauses between store calls during an outage.
    pub(super) backoff: Backoff,
    /// How long to hold a delivery through an outage before failing it as unavailable
    /// (`None`: until the store answers or the delivery is dropped).
    pub(super) outage_limit: Option<Duration>,
    pub(super) skipped: Arc<AtomicU64>,
}

impl IdempotencyLayer {
    /// Idempotency through `store`, with a 5-minute in-flight lease and 7 days' memory
    /// of completed ids. A store outage holds each delivery until the store answers,
    /// each call bounded by 5 s, with jittered backoff from 50 ms up to 2 s.
    pub fn new(store: Arc<dyn IdempotencyStore>) -> Self {
        Self {
            store,
            lease: Duration::from_secs(300),
            retention: Duration::from_secs(7 * 24 * 3600),
            poll: Duration::from_millis(20),
            try_timeout: Duration::from_secs(5),
            backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(2)),
            outage_limit: None,
            skipped: Arc::default(),
        }
    }

    /// How long an in-flight mark holds if its consumer never finishes (crash). Longer
    /// than your slowest handler.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How long a completed id is remembered.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// The most one store call may take; past it the call counts as an outage and is
    /// tried again (default 5 s).
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.try_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// The pauses between store calls during an outage: doubling from `min` up to
    /// `max`, each drawn from the upper half of its step (default 50 ms to 2 s).
    pub fn outage_backoff(mut self, min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        self.backoff = Backoff::new(min, max.max(min));
        self
    }

    /// How long a delivery waits out a store outage before it begins (default: no
    /// limit, until the store answers or the delivery is dropped at shutdown). Past it
    /// the delivery fails as [`FailureKind::Unavailable`](switchyard_core::FailureKind),
    /// which the dead-letter layer never dead-letters. Recording a completed mark is
    /// never given up, whatever this says: the handler has run.
    pub fn outage_limit(mut self, limit: Option<Duration>) -> Self {
        self.outage_limit = limit;
        self
    }

    /// Duplicates skipped so far by services from this layer.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::new(inner, Arc::new(self.clone()))
    }
}
