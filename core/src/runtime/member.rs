//! One member's loop: pull deliveries, start handlers within the concurrency limit,
//! keep the running ones going, and stop within the shutdown deadline.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::Service;

use super::settle::{ack_on_receipt, handle};
use super::Stats;
use crate::backend::Backoff;
use crate::broker::Subscription;
use crate::delivery::Delivery;
use crate::error::{HandlerError, Result};
use crate::guarantee::Guarantee;

/// Pauses between failed receives that the backend calls transient.
const RECV_BACKOFF: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));

/// How each member of a consumer runs.
pub(super) struct MemberSettings {
    pub(super) concurrency: usize,
    pub(super) shutdown_timeout: Duration,
    /// The pause before a failed delivery is nacked.
    pub(super) backoff: Backoff,
    /// Whether deliveries are acked before (at-most-once) or after the handler.
    pub(super) guarantee: Guarantee,
}

/// Consumes from `sub` until shutdown or the subscription ends, then closes it.
pub(super) async fn run_member<S>(
    mut sub: Box<dyn Subscription>,
    mut service: S,
    settings: Arc<MemberSettings>,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
) -> Result<()>
where
    S: Service<Delivery, Response = (), Error = HandlerError> + Send + 'static,
    S::Future: Send + 'static,
{
    let mut in_flight = FuturesUnordered::new();
    let mut buf: Vec<Delivery> = Vec::with_capacity(settings.concurrency);
    let mut ended = false;
    let mut recv_errors = 0u32;
    // Set once stopping starts; `Some(None)` means no deadline: a timeout too long to
    // add to now (such as `Duration::MAX`) waits for the handlers as long as they take.
    let mut deadline: Option<Option<Instant>> = None;
    loop {
        let stopping = ended || shutdown.is_cancelled();
        if stopping && deadline.is_none() {
            deadline = Some(Instant::now().checked_add(settings.shutdown_timeout));
        }
        let free = settings.concurrency - in_flight.len();
        if !stopping && free > 0 {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {}
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                received = sub.recv_many(&mut buf, free) => match received {
                    Ok(0) => ended = true,
                    Ok(_) => {
                        recv_errors = 0;
                        for delivery in buf.drain(..) {
                            // Shutting down with the service not ready: the deliveries not
                            // started are dropped unsettled, which hands them back.
                            let waited = wait_ready(&mut service, &mut in_flight, &shutdown).await;
                            let Some(ready) = waited else { break };
                            if settings.guarantee == Guarantee::AtMostOnce
                                && !ack_on_receipt(&delivery, &stats).await
                            {
                                continue;
                            }
                            let mut running =
                                Box::pin(handle(&mut service, ready, delivery, &settings, &stats));
                            // Most handlers finish in their first poll: polled here, they
                            // skip the in-flight set (which costs the memory bench about
                            // 40 % more instructions per message).
                            if futures::poll!(running.as_mut()).is_pending() {
                                in_flight.push(running);
                            }
                        }
                    }
                    Err(e) if e.is_transient() => {
                        recv_errors += 1;
                        let pause = RECV_BACKOFF.pause(recv_errors);
                        tracing::warn!(error = %e, ?pause, "receive failed; retrying");
                        tokio::time::sleep(pause).await;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "receive failed permanently; stopping this consumer");
                        shutdown.cancel();
                        drop(in_flight);
                        let _ = sub.close().await;
                        return Err(e);
                    }
                },
            }
        } else if in_flight.is_empty() {
            break;
        } else if let Some(deadline) = deadline {
            let Some(deadline) = deadline else {
                in_flight.next().await;
                continue;
            };
            if tokio::time::timeout_at(deadline, in_flight.next())
                .await
                .is_err()
            {
                let left = in_flight.len() as u64;
                stats.abandoned.fetch_add(left, Ordering::Relaxed);
                tracing::warn!(
                    left,
                    "shutdown deadline passed; unfinished deliveries will be redelivered"
                );
                break;
            }
        } else {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {}
                _ = in_flight.next() => {}
            }
        }
    }
    // Dropping unfinished handlers leaves their deliveries unsettled; closing the
    // subscription hands them back to the broker for redelivery.
    drop(in_flight);
    sub.close().await
}

/// Waits until `service` is ready for another delivery, or `None` if shutdown comes
/// first. Meanwhile it drives the in-flight handlers: a service limiting concurrency
/// (tower's `ConcurrencyLimit`) becomes ready only when one of them finishes.
async fn wait_ready<S, F>(
    service: &mut S,
    in_flight: &mut FuturesUnordered<F>,
    shutdown: &CancellationToken,
) -> Option<Result<(), HandlerError>>
where
    S: Service<Delivery, Response = (), Error = HandlerError>,
    F: Future<Output = ()>,
{
    loop {
        tokio::select! {
            biased;
            ready = futures::future::poll_fn(|cx| service.poll_ready(cx)) => return Some(ready),
            _ = shutdown.cancelled() => return None,
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
        }
    }
}
