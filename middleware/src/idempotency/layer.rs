//! The layer that skips already-handled messages.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use switchyard_core::{Delivery, HandlerError};
use tower::{Layer, Service};

use super::{Begin, IdempotencyStore};

/// Runs each message id at most once per group (see the [module docs](super)).
#[derive(Clone)]
pub struct IdempotencyLayer {
    store: Arc<dyn IdempotencyStore>,
    lease: Duration,
    retention: Duration,
    poll: Duration,
    skipped: Arc<AtomicU64>,
}

impl IdempotencyLayer {
    /// Idempotency through `store`, with a 5-minute in-flight lease and 7 days' memory
    /// of completed ids.
    pub fn new(store: Arc<dyn IdempotencyStore>) -> Self {
        Self {
            store,
            lease: Duration::from_secs(300),
            retention: Duration::from_secs(7 * 24 * 3600),
            poll: Duration::from_millis(20),
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

    /// Duplicates skipped so far by services from this layer.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency {
            inner,
            config: Arc::new(self.clone()),
        }
    }
}

/// The service [`IdempotencyLayer`] produces.
#[derive(Clone)]
pub struct Idempotency<S> {
    inner: S,
    config: Arc<IdempotencyLayer>,
}

fn store_error(e: switchyard_core::Error) -> HandlerError {
    HandlerError::transient(format!("idempotency store: {e}"))
}

/// A mark's key, `<group>/<message id>`, built without allocating when it is short (a
/// group name and a UUID fit easily).
enum MarkKey {
    Inline([u8; 96], usize),
    Heap(String),
}

impl MarkKey {
    fn new(group: &str, id: &str) -> Self {
        let len = group.len() + 1 + id.len();
        let mut buf = [0u8; 96];
        match buf.get_mut(..len) {
            Some(key) => {
                key[..group.len()].copy_from_slice(group.as_bytes());
                key[group.len()] = b'/';
                key[group.len() + 1..].copy_from_slice(id.as_bytes());
                MarkKey::Inline(buf, len)
            }
            None => MarkKey::Heap(format!("{group}/{id}")),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            MarkKey::Inline(buf, len) => {
                std::str::from_utf8(&buf[..*len]).expect("two strings and a '/'")
            }
            MarkKey::Heap(key) => key,
        }
    }
}

impl IdempotencyLayer {
    async fn begin(&self, key: &str) -> switchyard_core::Result<Begin> {
        match self.store.try_begin(key, self.lease) {
            Some(begun) => begun,
            None => self.store.begin(key, self.lease).await,
        }
    }

    async fn complete(&self, key: &str) -> switchyard_core::Result<()> {
        match self.store.try_complete(key, self.retention) {
            Some(done) => done,
            None => self.store.complete(key, self.retention).await,
        }
    }

    async fn abandon(&self, key: &str) -> switchyard_core::Result<()> {
        match self.store.try_abandon(key) {
            Some(done) => done,
            None => self.store.abandon(key).await,
        }
    }
}

impl<S> Service<Delivery> for Idempotency<S>
where
    S: Service<Delivery, Response = (), Error = HandlerError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = HandlerError;
    type Future = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        // The inner service is ready now; take it and leave a fresh clone (tower's
        // pattern for calling a service later, inside a future).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let config = self.config.clone();
        Box::pin(async move {
            let key = MarkKey::new(delivery.group(), delivery.id());
            let key = key.as_str();
            let mut waited_since = None;
            loop {
                match config.begin(key).await.map_err(store_error)? {
                    Begin::Completed => {
                        config.skipped.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("switchyard_duplicates_skipped_total", "group" => delivery.group().to_string())
                            .increment(1);
                        tracing::debug!(id = delivery.id(), "duplicate skipped");
                        return Ok(());
                    }
                    Begin::Started => break,
                    // Another consumer runs it now: wait for its outcome rather than run
                    // the same message twice at once.
                    Begin::InFlight
                        if waited_since.get_or_insert_with(Instant::now).elapsed()
                            < config.lease =>
                    {
                        tokio::time::sleep(config.poll).await;
                    }
                    Begin::InFlight => {
                        return Err(HandlerError::transient(format!(
                            "message {} is still marked in flight after the {:?} lease",
                            delivery.id(),
                            config.lease
                        )))
                    }
                }
            }
            // A panic must release the mark too, or the redelivery waits out the lease.
            let result = crate::recover::caught(inner.call(delivery.clone())).await;
            match &result {
                Ok(()) => config.complete(key).await.map_err(store_error)?,
                Err(_) => {
                    if let Err(e) = config.abandon(key).await {
                        // The lease expires anyway; the redelivery then runs.
                        tracing::warn!(id = delivery.id(), error = %e, "could not release idempotency mark");
                    }
                }
            }
            result
        })
    }
}
