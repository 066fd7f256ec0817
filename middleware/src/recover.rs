//! The plumbing shared by layers that act on a handler's last failure (dead letter,
//! retry tiers): run the handler, and only if it failed, hand the delivery to a hook.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use futures::ready;
use pin_project_lite::pin_project;
use switchyard_core::{Delivery, HandlerError};
use tower::Service;

use crate::catch::Caught;

/// What a layer does with a failed delivery: recover (`Ok`, the runtime acks) or pass
/// a failure on (`Err`, the runtime nacks).
pub(crate) trait OnFailure: Send + Sync + 'static {
    /// Handles `error`, the inner service's failure for `delivery`.
    fn on_failure(
        &self,
        delivery: Delivery,
        error: HandlerError,
    ) -> BoxFuture<'static, Result<(), HandlerError>>;
}

/// Runs the inner service; on failure, hands the delivery and error to `H`.
#[derive(Clone)]
pub(crate) struct Recover<S, H> {
    inner: S,
    // Shared: each call takes a reference for its future (one count, not a deep clone).
    hook: Arc<H>,
}

impl<S, H> Recover<S, H> {
    pub(crate) fn new(inner: S, hook: Arc<H>) -> Self {
        Self { inner, hook }
    }
}

impl<S, H> Service<Delivery> for Recover<S, H>
where
    S: Service<Delivery, Response = (), Error = HandlerError>,
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
            state: State::Handling {
                handling,
                after: Some((delivery, self.hook.clone())),
            },
        }
    }
}

pin_project! {
    /// The handler, then the hook only if it failed. Named rather than boxed, so the
    /// success path allocates nothing.
    pub(crate) struct RecoverFuture<F, H> {
        #[pin]
        state: State<F, H>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, H> {
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
                StateProj::Handling { handling, after } => {
                    let error = match ready!(handling.poll(cx)) {
                        Ok(()) => return Poll::Ready(Ok(())),
                        Err(error) => error,
                    };
                    let Some((delivery, hook)) = after.take() else {
                        // Only reachable by polling a finished future: fail it, do not panic.
                        return Poll::Ready(Err(error));
                    };
                    let recovering = hook.on_failure(delivery, error);
                    state.set(State::Recovering { recovering });
                }
                StateProj::Recovering { recovering } => return recovering.as_mut().poll(cx),
            }
        }
    }
}
