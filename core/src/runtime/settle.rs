//! Running one delivery's handler to the end and settling it: ack on success, nack for
//! redelivery (after the backoff pause) on failure, with the span and counters to match.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;

use futures::FutureExt;
use tokio::time::Instant;
use tower::Service;
use tracing::Instrument;

use super::member::MemberSettings;
use super::Stats;
use crate::delivery::{Delivery, Nack};
use crate::error::{FailureKind, HandlerError};
use crate::guarantee::Guarantee;
use crate::headers::TRACEPARENT;
use crate::observe::TraceContext;

/// Calls the handler for one delivery (`ready` is what the service's `poll_ready` said:
/// an error fails the delivery) and returns the future that runs it to the end and
/// settles the delivery. A panic, in the call or while the handler runs, is a failure.
pub(super) fn handle<'a, S>(
    service: &mut S,
    ready: Result<(), HandlerError>,
    delivery: Delivery,
    settings: &'a MemberSettings,
    stats: &'a Stats,
) -> impl Future<Output = ()> + Send + 'a
where
    S: Service<Delivery, Response = (), Error = HandlerError>,
    S::Future: Send + 'static,
{
    stats.in_flight.increment(1.0);
    let observed = Observed::new(&delivery);
    let call = ready.and_then(|()| {
        observed
            .within(|| {
                std::panic::catch_unwind(AssertUnwindSafe(|| service.call(delivery.clone())))
            })
            .map_err(panic_error)
    });
    async move {
        let outcome = match call {
            Err(e) => Err(e),
            Ok(fut) => {
                let caught = AssertUnwindSafe(fut.instrument(observed.span.clone())).catch_unwind();
                let polled = match observed.trace {
                    Some(ctx) => ctx.scope(caught).await,
                    None => caught.await,
                };
                polled.unwrap_or_else(|panic| Err(panic_error(panic)))
            }
        };
        finish(outcome, &delivery, settings, stats, &observed).await;
        stats.in_flight.decrement(1.0);
    }
}

/// What the runtime observes about one delivery: its span, trace context and start time.
struct Observed {
    span: tracing::Span,
    trace: Option<TraceContext>,
    /// Only read when a subscriber records the span: a clock read per message is not free.
    started: Option<Instant>,
}

impl Observed {
    fn new(delivery: &Delivery) -> Self {
        // Continue the producer's trace: this handling is a child span of the sender's.
        let parent = delivery
            .message()
            .headers
            .get(TRACEPARENT)
            .and_then(|v| TraceContext::parse(v));
        let trace = parent.map(|p| p.child());
        let span = tracing::info_span!(
            "handle",
            topic = delivery.topic(),
            group = delivery.group(),
            key = delivery.key(),
            id = delivery.id(),
            delivery_count = delivery.delivery_count(),
            trace_id = trace.map(|t| t.trace_hex()),
            span_id = trace.map(|t| t.span_hex()),
            parent_span_id = parent.map(|p| p.span_hex()),
            outcome = tracing::field::Empty,
            duration_us = tracing::field::Empty,
        );
        let started = (!span.is_disabled()).then(Instant::now);
        Self {
            span,
            trace,
            started,
        }
    }

    /// Runs `f` inside the span and with the trace context current.
    fn within<R>(&self, f: impl FnOnce() -> R) -> R {
        let _entered = self.span.enter();
        match self.trace {
            Some(ctx) => ctx.sync_scope(f),
            None => f(),
        }
    }

    fn finish(&self, outcome: &'static str) {
        if let Some(started) = self.started {
            self.span.record("outcome", outcome);
            self.span
                .record("duration_us", started.elapsed().as_micros() as u64);
        }
    }
}

/// A caught panic as the handler's failure.
fn panic_error(panic: Box<dyn std::any::Any + Send>) -> HandlerError {
    let text = panic_text(panic.as_ref());
    HandlerError::new(FailureKind::Panic, format!("handler panicked: {text}"))
}

/// A caught panic's message, where it has one.
pub(super) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_string())
}

/// Acks after the handler succeeded, and counts it.
async fn ack(delivery: &Delivery, stats: &Stats, observed: &Observed) {
    match delivery.ack().await {
        Ok(()) => {
            stats.acked.fetch_add(1, Ordering::Relaxed);
            stats.handled.increment(1);
            observed.finish("acked");
        }
        Err(e) => {
            observed.finish("ack-failed");
            tracing::warn!(id = delivery.id(), error = %e, "ack failed; the broker will redeliver")
        }
    }
}

/// At-most-once: acks a delivery before its handler runs. `false` when the ack failed
/// (the member lost the message's partition, or the connection): the handler must not
/// run then, as the broker hands the message out again.
pub(super) async fn ack_on_receipt(delivery: &Delivery, stats: &Stats) -> bool {
    match delivery.ack().await {
        Ok(()) => {
            stats.acked.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(e) => {
            tracing::warn!(id = delivery.id(), error = %e, "ack on receipt failed; not handling the message, the broker will redeliver it");
            false
        }
    }
}

/// Acks or, after the backoff pause, nacks for redelivery, unless the handler settled it
/// (or at-most-once acked it on receipt: then a failure is only reported).
async fn finish(
    outcome: Result<(), HandlerError>,
    delivery: &Delivery,
    settings: &MemberSettings,
    stats: &Stats,
    observed: &Observed,
) {
    if delivery.is_settled() {
        match (&outcome, settings.guarantee) {
            (Err(e), Guarantee::AtMostOnce) => {
                if e.kind() == FailureKind::Panic {
                    stats.panics.fetch_add(1, Ordering::Relaxed);
                    stats.panic_counter.increment(1);
                }
                stats.failed.increment(1);
                observed.finish("failed-at-most-once");
                tracing::warn!(id = delivery.id(), kind = %e.kind(), error = %e, "handler failed; the message was acked on receipt (at-most-once) and is not redelivered");
            }
            _ => observed.finish("settled-by-handler"),
        }
        return;
    }
    let e = match outcome {
        Ok(()) => return ack(delivery, stats, observed).await,
        Err(e) => e,
    };
    if e.kind() == FailureKind::Panic {
        stats.panics.fetch_add(1, Ordering::Relaxed);
        stats.panic_counter.increment(1);
    }
    observed.within(|| {
        tracing::warn!(
            id = delivery.id(),
            topic = delivery.topic(),
            group = delivery.group(),
            delivery_count = delivery.delivery_count(),
            kind = %e.kind(),
            error = %e,
            "handler failed; nacking for redelivery"
        )
    });
    let pause = settings.backoff.pause(delivery.delivery_count());
    if !pause.is_zero() {
        tokio::time::sleep(pause).await;
    }
    match delivery.nack(Nack::Requeue).await {
        Ok(()) => {
            stats.nacked.fetch_add(1, Ordering::Relaxed);
            stats.failed.increment(1);
            observed.finish(if e.kind() == FailureKind::Panic {
                "panicked"
            } else {
                "failed"
            });
        }
        Err(err) => {
            observed.finish("nack-failed");
            tracing::warn!(id = delivery.id(), error = %err, "nack failed; the broker will redeliver")
        }
    }
}
