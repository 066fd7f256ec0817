//! The service shape shared by layers that act on a handler's failure.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::panic::AssertUnwindSafe;

use futures::future::BoxFuture;
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
        Box::pin(async move {
            match caught(fut).await {
                Ok(()) => Ok(()),
                Err(error) => hook.on_failure(delivery, error).await,
            }
        })
    }
}

/// Awaits a handler future, turning a panic into a [`FailureKind::Panic`] failure, so
/// layers that must clean up or record a failure see panics too.
pub(crate) async fn caught<F>(fut: F) -> Result<(), HandlerError>
where
    F: Future<Output = Result<(), HandlerError>>,
{
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let text = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "handler panicked".into());
            Err(HandlerError::new(
                FailureKind::Panic,
                format!("handler panicked: {text}"),
            ))
        }
    }
}
