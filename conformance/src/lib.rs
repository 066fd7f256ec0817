//! # switchyard-conformance
//!
//! The scenarios every switchyard backend must pass, written once. A backend (ours or a
//! third party's) runs the whole suite with one call and a factory that connects a
//! broker:
//!
//! ```
//! use std::sync::Arc;
//! use switchyard_core::{AnyBroker, Broker};
//! # use switchyard_core::*;
//! # use async_trait_stub as _;
//! # mod async_trait_stub {}
//! # async fn demo(make: impl Fn() -> AnyBroker + Send + Sync + 'static) {
//! let report = switchyard_conformance::run("mybackend", move || {
//!     let broker = make();
//!     async move { Ok(broker) }
//! })
//! .await;
//! report.assert_all_passed();
//! # }
//! ```
//!
//! Each scenario gets fresh, randomly named topics and groups, so scenarios never see
//! each other's messages. A scenario needing an ability the backend's
//! [`Capabilities`](switchyard_core::Capabilities) lack is reported as not applicable,
//! never as passed. The report prints one line per scenario and the summary line
//! `conformance backend=<name> passed=<n> failed=<n> not_applicable=<n>`.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

mod kit;
mod scenarios;

pub use kit::{run, run_only, Ctx, Outcome, Report, ScenarioResult};
