//! A layer that observes each delivery's outcome without changing it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use switchyard_core::{Delivery, HandlerError};
use tower::{Layer, Service};

type Observer = dyn Fn(&Delivery, &Result<(), HandlerError>) + Send + Sync;

/// Calls a function with each delivery and its handler's outcome.
#[derive(Clone)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct InspectLayer {
    observer: Arc<Observer>,
}

impl InspectLayer {
    /// A layer calling `observer` after every handler run.
    pub fn new(
        observer: impl Fn(&Delivery, &Result<(), HandlerError>) + Send + Sync + 'static,
    ) -> Self {
        Self {
            observer: Arc::new(observer),
        }
    }
}

impl<S> Layer<S> for InspectLayer {
    type Service = Inspect<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Inspect {
            inner,
            observer: self.observer.clone(),
        }
    }
}

/// The service [`InspectLayer`] produces.
#[derive(Clone)]
pub struct Inspect<S> {
    inner: S,
    observer: Arc<Observer>,
}

impl<S> Service<Delivery> for Inspect<S>
where
    S: Service<Delivery, Response = (), Error = HandlerError>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = HandlerError;
    type Future = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        let observer = self.observer.clone();
        let fut = self.inner.call(delivery.clone());
        Box::pin(async move {
            let outcome = fut.await;
            observer(&delivery, &outcome);
            outcome
        })
    }
}
