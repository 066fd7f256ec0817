//! # switchyard-conformance
//!
//! The scenarios every switchyard backend must pass, written once. A backend (ours or a
//! third party's) gets one test per scenario from one macro call in a test file, given an
//! expression that connects a broker:
//!
//! ```
//! // tests/conformance_memory.rs
//! use std::sync::Arc;
//! use switchyard_core::AnyBroker;
//! use switchyard_memory::MemoryBroker;
//!
//! switchyard_conformance::conformance_tests!(memory, || async {
//!     Ok(Arc::new(MemoryBroker::new()) as AnyBroker)
//! });
//! # fn main() {}
//! ```
//!
//! `cargo test --test conformance_memory ordering` then runs the ordering scenarios
//! (`memory::ordering::…`).
//! [`run`] runs the whole suite from one call instead and returns a [`Report`].
//!
//! Each scenario gets fresh, randomly named topics and groups, so scenarios never see
//! each other's messages. A scenario needing an ability the backend's
//! [`Capabilities`](switchyard_core::Capabilities) lack is reported as not applicable,
//! never as passed. Each scenario prints its line, and the suite prints the summary line
//! `conformance backend=<name> passed=<n> failed=<n> not_applicable=<n>`.
#![forbid(unsafe_code)]
// docs.rs (nightly) marks feature-gated items with the feature they need.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, unreachable_pub)]

mod kit;
mod libtest;
mod scenarios;
pub mod support;

pub use kit::{run, Ctx, Outcome, Report, ScenarioResult};

/// What the tests [`conformance_tests!`] makes call; not for direct use.
#[doc(hidden)]
pub mod __private {
    pub use crate::libtest::{run_test, Connecting};
}
