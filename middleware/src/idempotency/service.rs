//! The idempotency service: begin a mark, run the handler, complete or release it.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use switchyard_core::{Delivery, HandlerError};
use tokio::time::Instant;
use tower::Service;

use super::{Begin, IdempotencyFuture, IdempotencyLayer, MarkKey};
use crate::catch::Caught;

/// The service [`IdempotencyLayer`] produces.
#[derive(Clone)]
pub struct Idempotency<S> {
    inner: S,
    config: Arc<IdempotencyLayer>,
}

impl<S> Idempotency<S> {
    pub(super) fn new(inner: S, config: Arc<IdempotencyLayer>) -> Self {
        Self { inner, config }
    }
}

impl<S> Service<Delivery> for Idempotency<S>
where
    S: Service<Delivery, Response = (), Error = HandlerError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = HandlerError;
    type Future = IdempotencyFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        // The inner service is ready now; take it and leave a fresh clone (tower's
        // pattern for calling a service later, inside a future).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        IdempotencyFuture::new(Box::pin(self.config.clone().handle(inner, delivery)))
    }
}

impl IdempotencyLayer {
    /// Calls the store until it answers: each try bounded by `try_timeout`, jittered
    /// backoff in between; fails as unavailable only once `limit` has passed.
    pub(super) async fn steady<'a, T, F, Fut>(
        &self,
        what: &'static str,
        key: MarkKey<'a>,
        limit: Option<Duration>,
        mut call: F,
    ) -> Result<T, HandlerError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = switchyard_core::Result<T>>,
    {
        // Read the clock only for a try that does not answer in its first poll: an
        // in-process store answers there, and a clock read and a timer per call would
        // be much of its cost.
        let mut started: Option<Instant> = None;
        let mut failures = 0;
        loop {
            let mut pending = std::pin::pin!(call());
            let answered = match futures::poll!(pending.as_mut()) {
                Poll::Ready(answer) => Ok(answer),
                Poll::Pending => {
                    started.get_or_insert_with(Instant::now);
                    tokio::time::timeout(self.try_timeout, pending).await
                }
            };
            let error = match answered {
                Ok(Ok(answer)) => {
                    if failures > 0 {
                        let after = started.map_or(Duration::ZERO, |s| s.elapsed());
                        tracing::info!(%key, what, ?after, "idempotency store answers again");
                    }
                    return Ok(answer);
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {:?}", self.try_timeout),
            };
            let since = *started.get_or_insert_with(Instant::now);
            metrics::counter!("switchyard_idempotency_store_errors_total", "call" => what)
                .increment(1);
            if limit.is_some_and(|limit| since.elapsed() >= limit) {
                return Err(HandlerError::unavailable(format!(
                    "idempotency store unavailable for {:?} ({what} {key}): {error}",
                    since.elapsed()
                )));
            }
            failures += 1;
            if failures == 1 {
                tracing::warn!(%key, what, %error, "idempotency store failed; holding the delivery and trying again");
            } else {
                tracing::debug!(%key, what, %error, "idempotency store still failing");
            }
            tokio::time::sleep(self.backoff.pause(failures)).await;
        }
    }

    /// One delivery: begin its mark (or skip it, or wait for another consumer's
    /// outcome), run the handler, then complete or release the mark.
    async fn handle<S>(
        self: Arc<Self>,
        mut inner: S,
        delivery: Delivery,
    ) -> Result<(), HandlerError>
    where
        S: Service<Delivery, Response = (), Error = HandlerError>,
    {
        // The guard owns the call's layer and delivery, and the rest of the call borrows
        // them from it (one reference count each per call, not two).
        let mut mark = Held {
            config: self,
            delivery,
            stage: Stage::NotBegun,
        };
        let (this, delivery) = (&*mark.config, &mark.delivery);
        let key = MarkKey::new(delivery.group(), delivery.id());
        let store = &*this.store;
        let mut waited_since = None;
        loop {
            let begun = this
                .steady("begin", key, this.outage_limit, || {
                    store.begin(key, this.lease)
                })
                .await?;
            match begun {
                Begin::Started => break,
                Begin::Completed => {
                    this.skipped.fetch_add(1, Ordering::Relaxed);
                    let group = delivery.group().to_string();
                    metrics::counter!("switchyard_duplicates_skipped_total", "group" => group)
                        .increment(1);
                    tracing::debug!(id = delivery.id(), "duplicate skipped");
                    return Ok(());
                }
                // Another consumer runs it now: wait for its outcome rather than run the
                // same message twice at once.
                Begin::InFlight
                    if waited_since.get_or_insert_with(Instant::now).elapsed() < this.lease =>
                {
                    tokio::time::sleep(this.poll).await;
                }
                Begin::InFlight => {
                    return Err(HandlerError::transient(format!(
                        "message {} is still marked in flight after the {:?} lease",
                        delivery.id(),
                        this.lease
                    )))
                }
            }
        }
        mark.stage = Stage::Running;
        let result = Caught::new(inner.call(delivery.clone())).await;
        mark.stage = Stage::Returned { ok: result.is_ok() };
        match &result {
            // Never given up: released or forgotten, the mark would let a redelivery
            // run the handler a second time.
            Ok(()) => {
                this.steady("complete", key, None, || {
                    store.complete(key, this.retention)
                })
                .await?
            }
            Err(_) => {
                let released = this
                    .steady("release", key, this.outage_limit, || store.release(key))
                    .await;
                if let Err(e) = released {
                    // The lease runs out anyway; the redelivery then runs.
                    tracing::warn!(%key, error = %e, "could not release idempotency mark");
                }
            }
        }
        mark.stage = Stage::Finished;
        result
    }
}

/// An in-flight mark a call holds. Dropped before the call finished (a shutdown
/// deadline, an outer timeout), it finishes the mark in a task of its own: released,
/// so the redelivery does not wait out the lease, or, when the handler had succeeded,
/// completed, so the redelivery does not run it again.
struct Held {
    config: Arc<IdempotencyLayer>,
    delivery: Delivery,
    stage: Stage,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// No mark taken yet (or none to finish: skipped, or the store failed).
    NotBegun,
    Running,
    Returned {
        ok: bool,
    },
    /// Completed or released: nothing left to do.
    Finished,
}

impl Drop for Held {
    fn drop(&mut self) {
        if matches!(self.stage, Stage::NotBegun | Stage::Finished) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let config = self.config.clone();
        let delivery = self.delivery.clone();
        let succeeded = self.stage == Stage::Returned { ok: true };
        runtime.spawn(async move {
            let key = MarkKey::new(delivery.group(), delivery.id());
            let store = &*config.store;
            // Bounded by the lease: past it another consumer may hold the id.
            let limit = Some(config.lease);
            let finished = if succeeded {
                config
                    .steady("complete", key, limit, || {
                        store.complete(key, config.retention)
                    })
                    .await
            } else {
                config
                    .steady("release", key, limit, || store.release(key))
                    .await
            };
            if let Err(e) = finished {
                tracing::warn!(%key, error = %e, "could not finish an abandoned idempotency mark");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idempotency::{IdempotencyStore, MemoryStore};
    use async_trait::async_trait;
    use futures::future::BoxFuture;
    use std::sync::atomic::AtomicU64;
    use switchyard_core::backend::Acker;
    use switchyard_core::{FailureKind, Message, Nack, Origin};
    use tower::Layer;

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

    fn counting(
        runs: &Arc<AtomicU64>,
    ) -> impl Service<
        Delivery,
        Response = (),
        Error = HandlerError,
        Future = BoxFuture<'static, Result<(), HandlerError>>,
    > + Clone
           + Send
           + 'static {
        let runs = runs.clone();
        tower::service_fn(
            move |_: Delivery| -> BoxFuture<'static, Result<(), HandlerError>> {
                runs.fetch_add(1, Ordering::SeqCst);
                Box::pin(async { Ok(()) })
            },
        )
    }

    /// A store that fails its first `failures` calls of each kind.
    struct Flaky {
        inner: MemoryStore,
        begins: AtomicU64,
        completes: AtomicU64,
        failures: u64,
    }

    impl Flaky {
        fn new(failures: u64) -> Self {
            Self {
                inner: MemoryStore::default(),
                begins: AtomicU64::new(0),
                completes: AtomicU64::new(0),
                failures,
            }
        }
    }

    fn down() -> switchyard_core::Error {
        switchyard_core::Error::transient("test", "connection refused")
    }

    #[async_trait]
    impl IdempotencyStore for Flaky {
        async fn begin(&self, key: MarkKey<'_>, lease: Duration) -> switchyard_core::Result<Begin> {
            if self.begins.fetch_add(1, Ordering::SeqCst) < self.failures {
                return Err(down());
            }
            self.inner.begin(key, lease).await
        }
        async fn complete(
            &self,
            key: MarkKey<'_>,
            retention: Duration,
        ) -> switchyard_core::Result<()> {
            if self.completes.fetch_add(1, Ordering::SeqCst) < self.failures {
                return Err(down());
            }
            self.inner.complete(key, retention).await
        }
        async fn release(&self, key: MarkKey<'_>) -> switchyard_core::Result<()> {
            self.inner.release(key).await
        }
    }

    #[tokio::test]
    async fn a_call_dropped_before_it_finishes_releases_its_mark() {
        let store = Arc::new(MemoryStore::default());
        let mut service =
            IdempotencyLayer::new(store.clone()).layer(tower::service_fn(|_: Delivery| {
                futures::future::pending::<Result<(), HandlerError>>()
            }));
        let d = delivery();
        let key = MarkKey::new("g", d.id());
        let mut call = service.call(d.clone());
        assert!(futures::poll!(&mut call).is_pending());
        let lease = Duration::from_secs(60);
        assert_eq!(store.begin(key, lease).await.unwrap(), Begin::InFlight);
        drop(call);
        tokio::task::yield_now().await;
        assert_eq!(
            store.begin(key, lease).await.unwrap(),
            Begin::Started,
            "released, so a redelivery runs at once"
        );
    }

    #[tokio::test]
    async fn a_completed_message_is_skipped() {
        let store = Arc::new(MemoryStore::default());
        let runs = Arc::new(AtomicU64::new(0));
        let layer = IdempotencyLayer::new(store);
        let mut service = layer.layer(counting(&runs));
        let d = delivery();
        service.call(d.clone()).await.unwrap();
        service.call(d.clone()).await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(layer.skipped(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_holds_the_delivery_and_a_failed_complete_is_retried() {
        let store = Arc::new(Flaky::new(5));
        let runs = Arc::new(AtomicU64::new(0));
        let layer = IdempotencyLayer::new(store.clone());
        let mut service = layer.layer(counting(&runs));
        let d = delivery();
        service
            .call(d.clone())
            .await
            .expect("held through the outage, not failed");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(store.begins.load(Ordering::SeqCst), 6);
        assert_eq!(
            store.completes.load(Ordering::SeqCst),
            6,
            "complete retried"
        );
        service.call(d).await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the redelivery is skipped");
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_outage_limit_a_delivery_fails_as_unavailable() {
        let store = Arc::new(Flaky::new(u64::MAX));
        let runs = Arc::new(AtomicU64::new(0));
        let mut service = IdempotencyLayer::new(store)
            .outage_limit(Some(Duration::from_secs(10)))
            .layer(counting(&runs));
        let error = service.call(delivery()).await.unwrap_err();
        assert_eq!(error.kind(), FailureKind::Unavailable);
        assert_eq!(runs.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_ten_kilobyte_id_runs_once() {
        let store = Arc::new(MemoryStore::default());
        let runs = Arc::new(AtomicU64::new(0));
        let mut service = IdempotencyLayer::new(store).layer(counting(&runs));
        let mut message = Message::new("x");
        message.id = "k".repeat(10 * 1024);
        let origin = Origin::new("t".into(), "g".into(), None, None);
        let d = Delivery::new(Arc::new(message), 1, origin, NoAck);
        service.call(d.clone()).await.unwrap();
        service.call(d).await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
