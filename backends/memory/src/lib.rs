//! # switchyard-memory
//!
//! The in-memory backend: no broker, no I/O, the same observable semantics as the others.
//! Use it for tests, for development, and to run the examples anywhere.
//!
//! Each topic is one append-only log. Each group keeps a read position in it, the
//! deliveries its members hold unsettled, and the messages waiting for an earlier
//! message with the same key to be acked; so a group's members share the work (competing
//! consumers), every group gets every message (publish-subscribe), and same-key
//! messages are handled one at a time in publish order.
//!
//! Bounded: a topic holds at most `capacity` messages. Messages every group has read are
//! evicted first when it is full (they stay until then, so a late group can start at the
//! earliest retained one); when nothing can be evicted, publishers wait up to
//! `publish_timeout` and then get a transient [`Error::Timeout`](switchyard_core::Error::Timeout).
//!
//! ```
//! use std::sync::Arc;
//! use switchyard_core::{Message, Publisher, SubscribeOptions, Subscriber};
//! use switchyard_memory::MemoryBroker;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let broker = MemoryBroker::new();
//! broker.publish("orders", Message::new("order 1").with_key("customer-1")).await.unwrap();
//! let mut sub = broker.subscribe(SubscribeOptions::new("orders", "email")).await.unwrap();
//! let delivery = sub.recv().await.unwrap().unwrap();
//! assert_eq!(delivery.payload(), b"order 1");
//! assert_eq!(delivery.delivery_count(), 1);
//! delivery.ack().await.unwrap();
//! # });
//! ```
#![forbid(unsafe_code)]
// docs.rs (nightly) marks feature-gated items with the feature they need.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, unreachable_pub)]

mod acker;
mod broker;
mod config;
mod faults;
mod group;
mod publisher;
mod rpc;
mod schedule;
mod subscription;
mod topic;

pub use broker::MemoryBroker;
pub use config::MemoryConfig;
pub use faults::Faults;
