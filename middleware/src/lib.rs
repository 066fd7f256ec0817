//! # switchyard-middleware
//!
//! `tower` layers that wrap switchyard handlers. A handler is a
//! `tower::Service<Delivery, Response = (), Error = HandlerError>`; a layer here wraps it
//! and is itself such a service, so layers compose with `tower::ServiceBuilder`.
//!
//! This release has [`InspectLayer`], which observes every delivery and its outcome
//! (for counters and tests). Retry with backoff, the dead-letter queue and idempotency
//! follow as their own modules.
//!
//! ```
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use switchyard_core::{handler_fn, Delivery, HandlerError};
//! use switchyard_middleware::InspectLayer;
//! use tower::ServiceBuilder;
//!
//! let failures = Arc::new(AtomicUsize::new(0));
//! let seen = failures.clone();
//! let service = ServiceBuilder::new()
//!     .layer(InspectLayer::new(move |_d: &Delivery, outcome: &Result<(), HandlerError>| {
//!         if outcome.is_err() {
//!             seen.fetch_add(1, Ordering::Relaxed);
//!         }
//!     }))
//!     .service(handler_fn(|_d: Delivery| async { Ok::<_, HandlerError>(()) }));
//! # let _ = service;
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

mod inspect;

pub use inspect::{Inspect, InspectLayer};
