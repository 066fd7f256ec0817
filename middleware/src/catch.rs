//! Panics as failures: layers that clean up or record a failure must see panics too.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use switchyard_core::{Delivery, FailureKind, HandlerError};
use tower::Service;

/// Runs the inner service with its future wrapped in [`Caught`].
#[derive(Clone, Debug)]
pub(crate) struct CatchPanic<S> {
    inner: S,
}

impl<S> CatchPanic<S> {
    pub(crate) fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S> Service<Delivery> for CatchPanic<S>
where
    S: Service<Delivery, Response = (), Error = HandlerError>,
{
    type Response = ();
    type Error = HandlerError;
    type Future = Caught<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        Caught::new(self.inner.call(delivery))
    }
}

pin_project! {
    /// A handler future that turns a panic into a [`FailureKind::Panic`] failure.
    pub(crate) struct Caught<F> {
        #[pin]
        inner: F,
    }
}

impl<F> Caught<F> {
    pub(crate) fn new(inner: F) -> Self {
        Self { inner }
    }
}

impl<F> Future for Caught<F>
where
    F: Future<Output = Result<(), HandlerError>>,
{
    type Output = Result<(), HandlerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.project().inner;
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(poll) => poll,
            Err(panic) => Poll::Ready(Err(panic_error(panic))),
        }
    }
}

fn panic_error(panic: Box<dyn std::any::Any + Send>) -> HandlerError {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "handler panicked".into());
    HandlerError::new(FailureKind::Panic, format!("handler panicked: {text}"))
}
