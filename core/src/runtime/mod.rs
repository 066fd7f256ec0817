//! The consumer runtime: pull deliveries, run the handler with bounded concurrency,
//! ack on success, nack on failure, and shut down without losing anything.
//!
//! A [`Consumer`] is one topic + group with a handler (a `tower::Service<Delivery>`)
//! and `members` subscriptions (competing consumers in one process). An [`App`] runs
//! several consumers under one shutdown token, like Spring's listener containers or
//! Watermill's router.
//!
//! Ordering: the runtime runs whatever its subscription hands out concurrently; the
//! subscription contract (see [`Subscription`]) keeps same-key messages one at a time, so
//! different keys run in parallel while each key stays in publish order.
//!
//! Shutdown: on cancellation a member stops taking messages, lets in-flight handlers
//! finish (up to `shutdown_timeout`), settles them, then closes its subscription;
//! whatever was still running at the deadline is left unacked and so is redelivered.
//!
//! Readiness: a handler service that is not ready (a tower concurrency or rate limit)
//! holds back the next delivery while the running handlers go on; shutdown does not wait
//! for it, and the deliveries not yet started go back to the broker.

mod app;
mod consumer;
mod member;
mod settle;
#[cfg(test)]
mod tests;

use std::sync::atomic::AtomicU64;

use tokio_util::sync::CancellationToken;

pub use app::{App, RunningApp};
pub use consumer::{Consumer, RunningConsumer};

/// What a consumer did, returned when it stops.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerReport {
    /// The topic.
    pub topic: String,
    /// The group.
    pub group: String,
    /// Deliveries whose handler succeeded and that were acked.
    pub acked: u64,
    /// Deliveries whose handler failed and that were nacked for redelivery.
    pub nacked: u64,
    /// Handler panics caught (also counted in `nacked`).
    pub panics: u64,
    /// Deliveries still running at the shutdown deadline, left for redelivery.
    pub abandoned: u64,
}

/// A consumer's counts, shared by its members, and the same events for the
/// application's metrics recorder.
pub(super) struct Stats {
    pub(super) acked: AtomicU64,
    pub(super) nacked: AtomicU64,
    pub(super) panics: AtomicU64,
    pub(super) abandoned: AtomicU64,
    // The same events for the application's metrics recorder (see `observe`).
    pub(super) handled: metrics::Counter,
    pub(super) failed: metrics::Counter,
    pub(super) panic_counter: metrics::Counter,
    pub(super) in_flight: metrics::Gauge,
}

impl Stats {
    pub(super) fn new(topic: &str, group: &str) -> Self {
        let labels = [("topic", topic.to_string()), ("group", group.to_string())];
        Self {
            acked: AtomicU64::new(0),
            nacked: AtomicU64::new(0),
            panics: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
            handled: metrics::counter!("switchyard_handled_total", &labels),
            failed: metrics::counter!("switchyard_failed_total", &labels),
            panic_counter: metrics::counter!("switchyard_panics_total", &labels),
            in_flight: metrics::gauge!("switchyard_in_flight", &labels),
        }
    }
}

/// A token cancelled on Ctrl-C or SIGTERM: pass it to [`App::run`] or [`Consumer::run`].
#[must_use = "the token is what a signal cancels; pass it to `run`"]
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutdown signal received");
        trigger.cancel();
    });
    token
}
