//! Turning async functions into handlers: a `tower::Service<Delivery>`.
//!
//! An async fn whose arguments implement [`FromDelivery`] is a [`Handler`];
//! [`handler_fn`] wraps it as a `tower::Service`, so any `tower::Layer` can wrap it.
//!
//! ```
//! use switchyard_core::{handler_fn, Json, HandlerError};
//! #[derive(serde::Deserialize)]
//! struct Order { id: u64 }
//! async fn charge(Json(order): Json<Order>) -> Result<(), HandlerError> {
//!     let _ = order.id;
//!     Ok(())
//! }
//! let service = handler_fn(charge);
//! # let _ = service;
//! ```

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::{Either, MapErr, Ready, TryFutureExt};
use serde::de::DeserializeOwned;

use crate::codec::{Codec, JsonCodec};
use crate::delivery::Delivery;
use crate::error::HandlerError;
use crate::message::Message;

/// A handler argument taken from the delivery.
pub trait FromDelivery: Sized + Send + 'static {
    /// Extracts the argument; an error here is the handler's failure (e.g. a decode error).
    fn from_delivery(delivery: &Delivery) -> Result<Self, HandlerError>;

    /// Extracts the argument from the delivery itself; used for a handler's last
    /// argument, where the delivery is not needed afterwards. The default borrows it
    /// ([`FromDelivery::from_delivery`]); `Delivery` takes it, saving a clone.
    fn from_owned_delivery(delivery: Delivery) -> Result<Self, HandlerError> {
        Self::from_delivery(&delivery)
    }
}

impl FromDelivery for Delivery {
    fn from_delivery(delivery: &Delivery) -> Result<Self, HandlerError> {
        Ok(delivery.clone())
    }

    fn from_owned_delivery(delivery: Delivery) -> Result<Self, HandlerError> {
        Ok(delivery)
    }
}

impl FromDelivery for Arc<Message> {
    fn from_delivery(delivery: &Delivery) -> Result<Self, HandlerError> {
        Ok(delivery.message_arc().clone())
    }
}

impl FromDelivery for Bytes {
    fn from_delivery(delivery: &Delivery) -> Result<Self, HandlerError> {
        Ok(delivery.message().payload.clone())
    }
}

/// A payload decoded from JSON. As a handler argument, a payload that does not decode
/// fails the delivery with a [`FailureKind::Decode`](crate::FailureKind::Decode) error
/// (the dead-letter layer routes it; it is never retried and never panics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Json<T>(pub T);

impl<T: DeserializeOwned + Send + 'static> FromDelivery for Json<T> {
    fn from_delivery(delivery: &Delivery) -> Result<Self, HandlerError> {
        Ok(Json(JsonCodec.decode(delivery.payload())?))
    }
}

type ErrInto<E> = fn(E) -> HandlerError;

/// The future a function handler returns.
pub type HandlerFuture<Fut, E> = Either<Ready<Result<(), HandlerError>>, MapErr<Fut, ErrInto<E>>>;

/// An async function usable as a handler; `Args` are its argument types.
pub trait Handler<Args>: Clone + Send + 'static {
    /// The handler's future.
    type Future: Future<Output = Result<(), HandlerError>> + Send + 'static;
    /// Runs the handler on a delivery.
    fn call(&self, delivery: Delivery) -> Self::Future;
}

macro_rules! impl_handler {
    ($($arg:ident,)* ; $last:ident) => {
        impl<F, Fut, E, $($arg,)* $last> Handler<($($arg,)* $last,)> for F
        where
            F: Fn($($arg,)* $last) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = Result<(), E>> + Send + 'static,
            E: Into<HandlerError> + 'static,
            $($arg: FromDelivery,)*
            $last: FromDelivery,
        {
            type Future = HandlerFuture<Fut, E>;

            #[allow(non_snake_case)]
            fn call(&self, delivery: Delivery) -> Self::Future {
                $(
                    let $arg = match $arg::from_delivery(&delivery) {
                        Ok(v) => v,
                        Err(e) => return Either::Left(futures::future::ready(Err(e))),
                    };
                )*
                // The last argument takes the delivery itself: no clone when it is one.
                let $last = match $last::from_owned_delivery(delivery) {
                    Ok(v) => v,
                    Err(e) => return Either::Left(futures::future::ready(Err(e))),
                };
                Either::Right((self)($($arg,)* $last).map_err(Into::into as ErrInto<E>))
            }
        }
    };
}

impl_handler!(; T1);
impl_handler!(T1, ; T2);
impl_handler!(T1, T2, ; T3);

/// A [`Handler`] as a `tower::Service<Delivery>`.
pub struct HandlerService<H, Args> {
    handler: H,
    _args: PhantomData<fn(Args)>,
}

impl<H: Clone, Args> Clone for HandlerService<H, Args> {
    fn clone(&self) -> Self {
        Self {
            handler: self.handler.clone(),
            _args: PhantomData,
        }
    }
}

/// Wraps an async fn as a `tower::Service<Delivery>`.
pub fn handler_fn<H: Handler<Args>, Args>(handler: H) -> HandlerService<H, Args> {
    HandlerService {
        handler,
        _args: PhantomData,
    }
}

impl<H: Handler<Args>, Args> tower::Service<Delivery> for HandlerService<H, Args> {
    type Response = ();
    type Error = HandlerError;
    type Future = H::Future;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        self.handler.call(delivery)
    }
}
