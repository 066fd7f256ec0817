//! The layer that skips already-handled messages.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::ready;
use pin_project_lite::pin_project;
use switchyard_core::{Delivery, HandlerError};
use tower::{Layer, Service};

use super::{Begin, IdempotencyStore, MarkKey, MarkNote};
use crate::recover::Caught;

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

/// The key of `delivery`'s mark.
fn key_of(delivery: &Delivery) -> MarkKey<'_> {
    MarkKey {
        group: delivery.group(),
        id: delivery.id(),
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
    type Future = IdempotencyFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        let first = self
            .config
            .store
            .try_begin_noted(key_of(&delivery), self.config.lease);
        if let Some(Ok((Begin::Started, note))) = first {
            // Decided without waiting (the common case with an in-process store): call
            // the handler right away, with no clone of the inner service and no box.
            let mark = Mark {
                config: self.config.clone(),
                delivery: delivery.clone(),
                note,
                held: true,
            };
            return IdempotencyFuture {
                state: IdempotencyState::Handling {
                    handling: Caught::new(self.inner.call(delivery)),
                    mark: Some(mark),
                },
            };
        }
        // The inner service is ready now; take it and leave a fresh clone (tower's
        // pattern for calling a service later, inside a future).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let config = self.config.clone();
        IdempotencyFuture {
            state: IdempotencyState::Waiting {
                waiting: Box::pin(async move {
                    let key = key_of(&delivery).joined();
                    let mut answer = first.map(|begun| begun.map(|(begin, _)| begin));
                    let mut waited_since = None;
                    loop {
                        let begun = match answer.take() {
                            Some(begun) => begun,
                            None => config.begin(&key).await,
                        };
                        match begun.map_err(store_error)? {
                            Begin::Completed => {
                                config.skipped.fetch_add(1, Ordering::Relaxed);
                                let group = delivery.group().to_string();
                                metrics::counter!("switchyard_duplicates_skipped_total", "group" => group)
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
                    let mark = Mark {
                        config,
                        delivery: delivery.clone(),
                        note: MarkNote::default(),
                        held: true,
                    };
                    let result = Caught::new(inner.call(delivery)).await;
                    mark.finish(&result).await?;
                    result
                }),
            },
        }
    }
}

pin_project! {
    /// The future of an [`Idempotency`] call. A named type, so the common case (the
    /// store answers at once, the handler runs under a fresh mark) allocates nothing;
    /// waiting on the store or on another consumer's mark goes through a boxed future.
    pub struct IdempotencyFuture<F> {
        #[pin]
        state: IdempotencyState<F>,
    }
}

pin_project! {
    #[project = IdempotencyProj]
    enum IdempotencyState<F> {
        // The handler runs under a mark this call holds.
        Handling {
            #[pin]
            handling: Caught<F>,
            mark: Option<Mark>,
        },
        // Waiting on the store, or on a duplicate's outcome.
        Waiting {
            waiting: Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send>>,
        },
    }
}

impl<F> Future for IdempotencyFuture<F>
where
    F: Future<Output = Result<(), HandlerError>>,
{
    type Output = Result<(), HandlerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                IdempotencyProj::Handling { handling, mark } => {
                    let result = ready!(handling.poll(cx));
                    let mut mark = mark.take().expect("polled after completion");
                    match mark.finish_now(&result) {
                        Some(done) => return Poll::Ready(done.and(result)),
                        None => {
                            let waiting = Box::pin(async move {
                                mark.finish(&result).await?;
                                result
                            });
                            state.set(IdempotencyState::Waiting { waiting });
                        }
                    }
                }
                IdempotencyProj::Waiting { waiting } => return waiting.as_mut().poll(cx),
            }
        }
    }
}

/// The in-flight mark one call holds: completed when the handler succeeds, released
/// when it fails, and released too if the call is dropped before it finishes (a
/// shutdown deadline, an outer timeout), where the store can do that without waiting,
/// so the redelivery does not wait out the lease.
struct Mark {
    config: Arc<IdempotencyLayer>,
    /// Whose mark it is: its group and id are the key (one reference count, where a
    /// copy of the key cost more).
    delivery: Delivery,
    /// Where the store put it, so finishing does not look the key up again.
    note: MarkNote,
    held: bool,
}

impl Mark {
    /// [`Mark::finish`] without waiting, if the store can; `None` if it must wait (the
    /// mark is still held then).
    fn finish_now(
        &mut self,
        result: &Result<(), HandlerError>,
    ) -> Option<Result<(), HandlerError>> {
        let store = &self.config.store;
        let key = key_of(&self.delivery);
        let done = match result {
            Ok(()) => store
                .try_complete_noted(key, self.note, self.config.retention)?
                .map_err(store_error),
            Err(_) => {
                if let Err(e) = store.try_abandon_noted(key, self.note)? {
                    tracing::warn!(%key, error = %e, "could not release idempotency mark");
                }
                Ok(())
            }
        };
        self.held = false;
        Some(done)
    }

    /// Completes or releases the mark after the handler's `result`; an error here is
    /// the store's (the delivery is then nacked, and redelivered).
    async fn finish(mut self, result: &Result<(), HandlerError>) -> Result<(), HandlerError> {
        self.held = false;
        let key = key_of(&self.delivery).joined();
        match result {
            Ok(()) => self.config.complete(&key).await.map_err(store_error),
            Err(_) => {
                if let Err(e) = self.config.abandon(&key).await {
                    // The lease expires anyway; the redelivery then runs.
                    tracing::warn!(%key, error = %e, "could not release idempotency mark");
                }
                Ok(())
            }
        }
    }
}

impl Drop for Mark {
    fn drop(&mut self) {
        if self.held {
            let _ = self
                .config
                .store
                .try_abandon_noted(key_of(&self.delivery), self.note);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;
    use futures::future::BoxFuture;
    use switchyard_core::{Acker, Message, Nack, Origin};

    struct NoAck;

    impl Acker for NoAck {
        fn ack(&self) -> BoxFuture<'_, switchyard_core::Result<()>> {
            Box::pin(async { Ok(()) })
        }
        fn nack(&self, _: Nack) -> BoxFuture<'_, switchyard_core::Result<()>> {
            Box::pin(async { Ok(()) })
        }
    }

    fn delivery() -> Delivery {
        let origin = Origin::new("t".into(), "g".into(), None, None);
        Delivery::new(Arc::new(Message::new("x")), 1, origin, NoAck)
    }

    #[tokio::test]
    async fn a_call_dropped_before_it_finishes_releases_its_mark() {
        let store = Arc::new(MemoryStore::default());
        let mut service =
            IdempotencyLayer::new(store.clone()).layer(tower::service_fn(|_: Delivery| {
                futures::future::pending::<Result<(), HandlerError>>()
            }));
        let d = delivery();
        let key = format!("g/{}", d.id());
        let mut call = service.call(d.clone());
        assert!(futures::poll!(&mut call).is_pending());
        let lease = Duration::from_secs(60);
        assert_eq!(store.begin(&key, lease).await.unwrap(), Begin::InFlight);
        drop(call);
        assert_eq!(
            store.begin(&key, lease).await.unwrap(),
            Begin::Started,
            "released, so a redelivery runs at once"
        );
    }

    #[tokio::test]
    async fn a_completed_message_is_skipped() {
        let store = Arc::new(MemoryStore::default());
        let runs = Arc::new(AtomicU64::new(0));
        let counted = runs.clone();
        let layer = IdempotencyLayer::new(store);
        let mut service = layer.layer(tower::service_fn(move |_: Delivery| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Ok::<(), HandlerError>(()) }
        }));
        let d = delivery();
        service.call(d.clone()).await.unwrap();
        service.call(d.clone()).await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(layer.skipped(), 1);
    }
}
