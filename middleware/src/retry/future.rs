//! The future of a [`Retry`](super::Retry) call.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use switchyard_core::{Delivery, HandlerError};
use tower::Service;

use super::service::Attempts;
use crate::catch::CatchPanic;

type Inner<S> = tower::retry::future::ResponseFuture<Attempts, CatchPanic<S>, Delivery>;

pin_project! {
    /// The future of a [`Retry`](super::Retry) call: the attempts, and the pauses
    /// between them.
    pub struct RetryFuture<S>
    where
        S: Service<Delivery, Response = (), Error = HandlerError>,
    {
        #[pin]
        inner: Inner<S>,
    }
}

impl<S> RetryFuture<S>
where
    S: Service<Delivery, Response = (), Error = HandlerError>,
{
    pub(super) fn new(inner: Inner<S>) -> Self {
        Self { inner }
    }
}

impl<S> Future for RetryFuture<S>
where
    S: Service<Delivery, Response = (), Error = HandlerError>,
{
    type Output = Result<(), HandlerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}
