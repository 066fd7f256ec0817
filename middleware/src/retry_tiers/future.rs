//! The future of a [`RetryTiersService`](super::RetryTiersService) call.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use switchyard_core::HandlerError;

use super::RetryTiers;
use crate::recover::RecoverFuture;

pin_project! {
    /// The future of a [`RetryTiersService`](super::RetryTiersService) call: the
    /// handler, then the send to the next tier only if it failed.
    pub struct RetryTiersFuture<F> {
        #[pin]
        inner: RecoverFuture<F, RetryTiers>,
    }
}

impl<F> RetryTiersFuture<F> {
    pub(super) fn new(inner: RecoverFuture<F, RetryTiers>) -> Self {
        Self { inner }
    }
}

impl<F> Future for RetryTiersFuture<F>
where
    F: Future<Output = Result<(), HandlerError>>,
{
    type Output = Result<(), HandlerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}
