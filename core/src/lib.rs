//! # switchyard-core
//!
//! The pieces every switchyard backend and application share:
//!
//! - the message model: [`Message`] (id, key, headers, payload), [`Delivery`]
//!   (a received message with its delivery count, [`Origin`] and a one-shot ack handle);
//! - the backend traits: [`Publisher`], [`Subscriber`], [`Subscription`], [`Broker`]
//!   (object-safe, so [`AnyBroker`] can be picked at run time from a URL);
//! - one [`Error`] type with [`Error::is_transient`], and [`HandlerError`] for handlers;
//! - codecs ([`JsonCodec`]) and handler arguments ([`Json<T>`](Json), [`Delivery`], `Bytes`);
//! - request/reply ([`rpc`]): [`Broker::request`], [`RequestExt::request_json`], and
//!   [`reply_fn`] for handlers whose `Ok` value is the reply;
//! - the consumer runtime: [`Consumer`] (bounded concurrency, ack after success, nack on
//!   failure, panics caught, graceful shutdown; or ack on receipt under
//!   [`Guarantee::AtMostOnce`]) and [`App`] for several consumers;
//! - for crates that add a broker: [`backend`] (the ack handle to implement, URL parsing
//!   and redaction, name and header rules, the per-key gate, the retry pause).
//!
//! Handlers are `tower::Service<Delivery>`s, so middleware are `tower::Layer`s:
//!
//! ```
//! use std::sync::Arc;
//! use futures::future::BoxFuture;
//! use switchyard_core::backend::Acker;
//! use switchyard_core::{handler_fn, Delivery, HandlerError, Json, Message, Nack, Origin};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Order { id: u64 }
//!
//! async fn charge(Json(order): Json<Order>) -> Result<(), HandlerError> {
//!     assert_eq!(order.id, 7);
//!     Ok(())
//! }
//!
//! // A stand-in ack handle; real ones come from a backend's subscription.
//! struct NoAck;
//! impl Acker for NoAck {
//!     fn ack(&self) -> BoxFuture<'_, switchyard_core::Result<()>> { Box::pin(async { Ok(()) }) }
//!     fn nack(&self, _: Nack) -> BoxFuture<'_, switchyard_core::Result<()>> { Box::pin(async { Ok(()) }) }
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! // Outermost first: errors come back up through the timeout as BoxError,
//! // and from_boxed restores the handler's failure kind.
//! let mut service = ServiceBuilder::new()
//!     .map_err(HandlerError::from_boxed)
//!     .layer(tower::timeout::TimeoutLayer::new(std::time::Duration::from_secs(5)))
//!     .service(handler_fn(charge));
//! let message = Arc::new(Message::json(&Order { id: 7 }).unwrap().with_key("customer-1"));
//! let delivery = Delivery::new(message, 1, Origin::new("orders".into(), "payment".into(), None, None), NoAck);
//! service.ready().await.unwrap().call(delivery).await.unwrap();
//! # });
//! ```
#![forbid(unsafe_code)]
// docs.rs (nightly) marks feature-gated items with the feature they need.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, unreachable_pub)]

pub mod backend;
mod broker;
mod codec;
mod delivery;
mod error;
mod guarantee;
mod handler;
pub mod headers;
mod message;
mod names;
pub mod observe;
pub mod rpc;
mod runtime;
mod url;

pub use broker::{
    AnyBroker, Broker, Capabilities, GroupInfo, Publisher, PublisherExt, StartFrom,
    SubscribeOptions, Subscriber, Subscription, TopicInfo,
};
pub use codec::{Codec, JsonCodec};
pub use delivery::{Delivery, Nack, Origin};
pub use error::{BoxError, Error, FailureKind, HandlerError, Result};
pub use guarantee::Guarantee;
pub use handler::{handler_fn, FromDelivery, Handler, HandlerFuture, HandlerService, Json};
pub use message::{new_id, Headers, Message, Receipt};
pub use observe::{Instrumented, TraceContext};
pub use rpc::{reply_fn, IntoReply, ReplyHandler, ReplyService, RequestExt};
pub use runtime::{shutdown_on_signal, App, Consumer, ConsumerReport, RunningApp, RunningConsumer};

/// Re-exported so users and backends name the same versions.
pub use bytes::Bytes;
pub use tokio_util::sync::CancellationToken;
