//! The future of an [`Idempotency`](super::Idempotency) call.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use switchyard_core::HandlerError;

/// The future of an [`Idempotency`](super::Idempotency) call: begin the mark, run the
/// handler, complete or release the mark. Boxed, unlike the other layers' futures: the
/// call waits on the store, possibly several times, around the handler, which an
/// `async` block states plainly and a hand-written state machine would not.
pub struct IdempotencyFuture {
    inner: BoxFuture<'static, Result<(), HandlerError>>,
}

impl IdempotencyFuture {
    pub(super) fn new(inner: BoxFuture<'static, Result<(), HandlerError>>) -> Self {
        Self { inner }
    }
}

impl Future for IdempotencyFuture {
    type Output = Result<(), HandlerError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}
