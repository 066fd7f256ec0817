//! The service shape shared by layers that act on a handler's failure.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::panic::AssertUnwindSafe;

use futures::future::{BoxFuture, Either};
use futures::FutureExt;
use switchyard_core::{Delivery, FailureKind, HandlerError};
use tower::Service;

/// What a layer does with a failed delivery: recover (`Ok`, the runtime acks) or pass
/// a failure on (`Err`, the runtime nacks).
pub trait OnFailure: Clone + Send + Sync + 'static {
    /// Handles `error`, the inner service's failure for `delivery`.
    fn on_failure(
        &self,
        delivery: Delivery,
        error: HandlerError,
    ) -> BoxFuture<'static, Result<(), HandlerError>>;
}

/// Runs the inner service; on failure, hands the delivery and error to `H`.
/// [`DeadLetter`](crate::dead_letter::DeadLetter) and
/// [`RetryTopic`](crate::retry::RetryTopic) are this with their own [`OnFailure`].
#[derive(Clone)]
pub struct Recover<S, H> {
    inner: S,
    // Shared: each call takes a reference for its future (one count, not a deep clone).
    hook: Arc<H>,
}

impl<S, H> Recover<S, H> {
    pub(crate) fn new(inner: S, hook: H) -> Self {
        Self {
            inner,
            hook: Arc::new(hook),
        }
    }
}

impl<S, H> Service<Delivery> for Recover<S, H>
where
    S: Service<Delivery, Response = (), Error = HandlerError>,
    S::Future: Send + 'static,
    H: OnFailure,
{
    type Response = ();
    type Error = HandlerError;
    type Future = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        let fut = self.inner.call(delivery.clone());
        let hook = self.hook.clone();
        // Combinators rather than an async block: a block would hold the inner future
        // twice (as a captured value and as the awaited one), doubling the allocation.
        Box::pin(caught(fut).then(move |outcome| match outcome {
            Ok(()) => Either::Left(futures::future::ready(Ok(()))),
            Err(error) => Either::Right(hook.on_failure(delivery, error)),
        }))
    }
}

/// A handler future that turns a panic into a [`FailureKind::Panic`] failure, so
/// layers that must clean up or record a failure see panics too.
pub(crate) fn caught<F>(fut: F) -> impl Future<Output = Result<(), HandlerError>>
where
    F: Future<Output = Result<(), HandlerError>>,
{
    AssertUnwindSafe(fut)
        .catch_unwind()
        .map(|outcome| outcome.unwrap_or_else(|panic| Err(panic_error(panic))))
}

fn panic_error(panic: Box<dyn std::any::Any + Send>) -> HandlerError {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "handler panicked".into());
    HandlerError::new(FailureKind::Panic, format!("handler panicked: {text}"))
}
