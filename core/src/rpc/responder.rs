//! The replying side: a handler whose `Ok` value is the reply.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use serde::Serialize;

use super::headers;
use crate::broker::Broker;
use crate::delivery::Delivery;
use crate::error::HandlerError;
use crate::handler::{FromDelivery, Json};
use crate::message::Message;

/// A value a replying handler can answer with.
pub trait IntoReply {
    /// The reply message. Its headers travel with it; the correlation id is added.
    fn into_reply(self) -> Result<Message, HandlerError>;
}

impl IntoReply for Message {
    fn into_reply(self) -> Result<Message, HandlerError> {
        Ok(self)
    }
}

/// A JSON reply with a `content-type` header.
impl<T: Serialize> IntoReply for Json<T> {
    fn into_reply(self) -> Result<Message, HandlerError> {
        // An answer that cannot be encoded will not encode on a retry either.
        Message::json(&self.0).map_err(HandlerError::permanent)
    }
}

impl IntoReply for Bytes {
    fn into_reply(self) -> Result<Message, HandlerError> {
        Ok(Message::new(self))
    }
}

impl IntoReply for String {
    fn into_reply(self) -> Result<Message, HandlerError> {
        Ok(Message::new(self))
    }
}

/// An empty reply: the request was done, there is nothing to say.
impl IntoReply for () {
    fn into_reply(self) -> Result<Message, HandlerError> {
        Ok(Message::new(Bytes::new()))
    }
}

/// An async function usable as a replying handler; `Args` are its argument types
/// (anything [`FromDelivery`], as for [`Handler`](crate::Handler)).
pub trait ReplyHandler<Args>: Clone + Send + 'static {
    /// Runs the handler on a request, giving the reply message.
    fn call(&self, delivery: Delivery) -> BoxFuture<'static, Result<Message, HandlerError>>;
}

macro_rules! impl_reply_handler {
    ($($arg:ident,)* ; $last:ident) => {
        impl<F, Fut, R, E, $($arg,)* $last> ReplyHandler<($($arg,)* $last,)> for F
        where
            F: Fn($($arg,)* $last) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = Result<R, E>> + Send + 'static,
            R: IntoReply,
            E: Into<HandlerError> + 'static,
            $($arg: FromDelivery,)*
            $last: FromDelivery,
        {
            #[allow(non_snake_case)]
            fn call(&self, delivery: Delivery) -> BoxFuture<'static, Result<Message, HandlerError>> {
                $(
                    let $arg = match $arg::from_delivery(&delivery) {
                        Ok(v) => v,
                        Err(e) => return Box::pin(futures::future::ready(Err(e))),
                    };
                )*
                let $last = match $last::from_owned_delivery(delivery) {
                    Ok(v) => v,
                    Err(e) => return Box::pin(futures::future::ready(Err(e))),
                };
                let fut = (self)($($arg,)* $last);
                Box::pin(async move { fut.await.map_err(Into::into)?.into_reply() })
            }
        }
    };
}

impl_reply_handler!(; T1);
impl_reply_handler!(T1, ; T2);
impl_reply_handler!(T1, T2, ; T3);

/// A replying handler as a `tower::Service<Delivery>` for a
/// [`Consumer`](crate::Consumer); made by [`reply_fn`].
pub struct ReplyService<B: ?Sized, H, Args> {
    broker: Arc<B>,
    handler: H,
    _args: PhantomData<fn(Args)>,
}

impl<B: ?Sized, H: Clone, Args> Clone for ReplyService<B, H, Args> {
    fn clone(&self) -> Self {
        Self {
            broker: self.broker.clone(),
            handler: self.handler.clone(),
            _args: PhantomData,
        }
    }
}

/// Wraps an async fn whose `Ok` value is the reply ([`IntoReply`]) as a handler that
/// answers each request through `broker` (the broker it consumes from).
///
/// - `Ok(reply)`: the reply goes to the request's reply address with its correlation
///   id; then the request is acked.
/// - `Err(e)`: an error reply carrying `e`'s text and [`FailureKind`](crate::FailureKind)
///   goes instead (the requester gets [`Error::ErrorReply`](crate::Error::ErrorReply)); the request is acked, since
///   it has been answered. Retry inside the handler if a failure is worth retrying
///   before answering.
/// - A reply that cannot be sent for a transient reason fails the delivery, so the
///   broker redelivers the request and it is answered then; a panic fails it too. A
///   requester that has given up by then drops the late reply.
/// - A message without a reply address (a plain publish) is handled the same way, its
///   reply dropped with a debug line; an `Err` then fails the delivery as any handler's.
///
/// ```
/// use std::sync::Arc;
/// use switchyard_core::{reply_fn, AnyBroker, Consumer, HandlerError, Json, SubscribeOptions};
///
/// #[derive(serde::Deserialize)]
/// struct Quote { from: String, to: String }
///
/// async fn rate(Json(q): Json<Quote>) -> Result<Json<f64>, HandlerError> {
///     match (q.from.as_str(), q.to.as_str()) {
///         ("EUR", "USD") => Ok(Json(1.08)),
///         _ => Err(HandlerError::permanent(std::io::Error::other("no such pair"))),
///     }
/// }
///
/// fn responder(broker: AnyBroker) -> impl std::any::Any {
///     Consumer::new(SubscribeOptions::queue("rates"), reply_fn(broker, rate))
/// }
/// # let _ = responder;
/// ```
pub fn reply_fn<B, H, Args>(broker: Arc<B>, handler: H) -> ReplyService<B, H, Args>
where
    B: Broker + ?Sized + 'static,
    H: ReplyHandler<Args>,
{
    ReplyService {
        broker,
        handler,
        _args: PhantomData,
    }
}

impl<B, H, Args> tower::Service<Delivery> for ReplyService<B, H, Args>
where
    B: Broker + ?Sized + 'static,
    H: ReplyHandler<Args>,
{
    type Response = ();
    type Error = HandlerError;
    type Future = BoxFuture<'static, Result<(), HandlerError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        let request = delivery.message();
        let route = match (
            request.headers.get(headers::REPLY_TO),
            request.headers.get(headers::CORRELATION_ID),
        ) {
            (Some(to), Some(correlation)) => Some((to.clone(), correlation.clone())),
            _ => None,
        };
        let request_id = request.id.clone();
        let answer = self.handler.call(delivery);
        let broker = self.broker.clone();
        Box::pin(async move {
            let outcome = answer.await;
            let Some((address, correlation)) = route else {
                tracing::debug!(id = %request_id, "a message without a reply address was handled; its reply is dropped");
                return outcome.map(drop);
            };
            let reply = match outcome {
                Ok(reply) => reply,
                Err(e) => error_reply(&e),
            }
            .with_header(headers::CORRELATION_ID, correlation);
            match broker.send_reply(&address, reply).await {
                Ok(()) => Ok(()),
                Err(e) if e.is_transient() => Err(HandlerError::transient(e)),
                // A reply address this broker cannot send to will not work on a retry
                // either: the request is acked and its requester times out.
                Err(e) => {
                    tracing::warn!(id = %request_id, %address, error = %e, "the reply could not be sent; the request is dropped");
                    Ok(())
                }
            }
        })
    }
}

/// The error reply for a responder's failure.
fn error_reply(e: &HandlerError) -> Message {
    Message::new(Bytes::new())
        .with_header(headers::ERROR, e.source_error().to_string())
        .with_header(headers::ERROR_KIND, e.kind().as_str())
}

#[cfg(test)]
#[path = "responder_tests.rs"]
mod tests;
