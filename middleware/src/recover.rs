//! The service shape shared by layers that act on a handler's failure.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::panic::AssertUnwindSafe;

use futures::future::BoxFuture;
use futures::ready;
use pin_project_lite::pin_project;
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
    type Future = RecoverFuture<S::Future, H>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        let handling = Caught::new(self.inner.call(delivery.clone()));
        RecoverFuture {
            state: RecoverState::Handling {
                handling,
                after: Some((delivery, self.hook.clone())),
            },
        }
    }
}

pin_project! {
    /// The future of a [`Recover`] call: the handler, then the hook only if it failed.
    /// A named type rather than a boxed one, so the success path allocates nothing:
    /// the runtime keeps the whole stack's future in a slot it reuses.
    pub struct RecoverFuture<F, H> {
        #[pin]
        state: RecoverState<F, H>,
    }
}

pin_project! {
    #[project = RecoverProj]
    enum RecoverState<F, H> {
        Handling {
            #[pin]
            handling: Caught<F>,
            after: Option<(Delivery, Arc<H>)>,
        },
        Recovering {
            recovering: BoxFuture<'static, Result<(), HandlerError>>,
        },
    }
}

impl<F, H> Future for RecoverFuture<F, H>
where
    F: Future<Output = Result<(), HandlerError>>,
    H: OnFailure,
{
    type Output = Result<(), HandlerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                RecoverProj::Handling { handling, after } => {
                    let error = match ready!(handling.poll(cx)) {
                        Ok(()) => return Poll::Ready(Ok(())),
                        Err(error) => error,
                    };
                    let (delivery, hook) = after.take().expect("polled after completion");
                    let recovering = hook.on_failure(delivery, error);
                    state.set(RecoverState::Recovering { recovering });
                }
                RecoverProj::Recovering { recovering } => return recovering.as_mut().poll(cx),
            }
        }
    }
}

pin_project! {
    /// A handler future that turns a panic into a [`FailureKind::Panic`] failure, so
    /// layers that must clean up or record a failure see panics too.
    pub struct Caught<F> {
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
