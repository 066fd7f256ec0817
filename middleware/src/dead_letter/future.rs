//! The future of a [`DeadLetter`](super::DeadLetter) call.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use switchyard_core::HandlerError;

use super::DeadLetterLayer;
use crate::recover::RecoverFuture;

pin_project! {
    /// The future of a [`DeadLetter`](super::DeadLetter) call: the handler, then the
    /// dead-letter publish only if it failed for the last time.
    pub struct DeadLetterFuture<F> {
        #[pin]
        inner: RecoverFuture<F, DeadLetterLayer>,
    }
}

impl<F> DeadLetterFuture<F> {
    pub(super) fn new(inner: RecoverFuture<F, DeadLetterLayer>) -> Self {
        Self { inner }
    }
}

impl<F> Future for DeadLetterFuture<F>
where
    F: Future<Output = Result<(), HandlerError>>,
{
    type Output = Result<(), HandlerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}
