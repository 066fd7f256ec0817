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

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::time::Instant;
use tracing::Instrument;

use crate::observe::{TraceContext, TRACEPARENT};
use tokio_util::sync::CancellationToken;
use tower::Service;

use crate::broker::{SubscribeOptions, Subscriber, Subscription};
use crate::delivery::{Delivery, Nack};
use crate::error::{Error, FailureKind, HandlerError, Result};
use crate::handler::{handler_fn, Handler, HandlerService};

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

struct Stats {
    acked: AtomicU64,
    nacked: AtomicU64,
    panics: AtomicU64,
    abandoned: AtomicU64,
    // The same events for the application's metrics recorder (see `observe`).
    handled: metrics::Counter,
    failed: metrics::Counter,
    panic_counter: metrics::Counter,
    in_flight: metrics::Gauge,
}

impl Stats {
    fn new(topic: &str, group: &str) -> Self {
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

/// One topic + group with its handler.
///
/// ```
/// # async fn demo() -> switchyard_core::Result<()> {
/// use switchyard_core::{Consumer, Delivery, HandlerError, SubscribeOptions};
/// # let broker: switchyard_core::AnyBroker = unimplemented!();
/// let consumer = Consumer::handler(SubscribeOptions::new("orders", "email"), |d: Delivery| async move {
///     println!("{}", d.id());
///     Ok::<_, HandlerError>(())
/// })
/// .concurrency(16)
/// .members(2);
/// consumer.run(broker, tokio_util::sync::CancellationToken::new()).await?;
/// # Ok(()) }
/// ```
pub struct Consumer<S> {
    options: SubscribeOptions,
    service: S,
    concurrency: usize,
    members: usize,
    shutdown_timeout: Duration,
    redelivery_backoff: (Duration, Duration),
}

impl<H, Args> Consumer<HandlerService<H, Args>>
where
    H: Handler<Args>,
{
    /// A consumer running an async fn.
    pub fn handler(options: SubscribeOptions, handler: H) -> Self {
        Self::new(options, handler_fn(handler))
    }
}

impl<S> Consumer<S> {
    /// A consumer running a `tower::Service<Delivery>` (for example a `ServiceBuilder` stack).
    pub fn new(options: SubscribeOptions, service: S) -> Self {
        Self {
            options,
            service,
            concurrency: 16,
            members: 1,
            shutdown_timeout: Duration::from_secs(30),
            redelivery_backoff: (Duration::from_millis(5), Duration::from_secs(1)),
        }
    }

    /// How many handlers each member runs at once (default 16).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// How many competing members of the group this consumer runs (default 1).
    pub fn members(mut self, n: usize) -> Self {
        self.members = n;
        self
    }

    /// How long shutdown waits for in-flight handlers (default 30 s). A timeout too
    /// long to reach (`Duration::MAX`) waits for them as long as they take.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Delay before a failed delivery is nacked for redelivery: `base × 2^(attempt−1)`,
    /// capped at `max` and jittered into its upper half (default 5 ms, 1 s), so a failing
    /// message does not spin and members do not retry in lockstep.
    /// Real retry policy belongs in the retry middleware; this only paces redelivery.
    pub fn redelivery_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.redelivery_backoff = (base, max);
        self
    }

    /// The subscription this consumer opens.
    pub fn options(&self) -> &SubscribeOptions {
        &self.options
    }

    fn validate(&self) -> Result<()> {
        self.options.validate()?;
        if self.concurrency == 0 {
            return Err(Error::config(
                "concurrency",
                "must be at least 1 (it is how many handlers run at once); use .concurrency(1) for one at a time",
            ));
        }
        if self.members == 0 {
            return Err(Error::config(
                "members",
                "must be at least 1 (it is how many subscriptions share the group)",
            ));
        }
        Ok(())
    }
}

impl<S> Consumer<S>
where
    S: Service<Delivery, Response = (), Error = HandlerError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    /// Subscribes every member, then consumes until `shutdown` is cancelled or the
    /// subscriptions end. Returns what was done, or the first fatal error.
    pub async fn run<B>(self, broker: Arc<B>, shutdown: CancellationToken) -> Result<ConsumerReport>
    where
        B: Subscriber + ?Sized + 'static,
    {
        self.start(broker, shutdown).await?.join().await
    }

    /// Subscribes every member and starts consuming in background tasks. When this
    /// returns, the group exists on the broker (so messages published from now on reach
    /// it, even on brokers without replay); [`RunningConsumer::join`] waits for the end.
    pub async fn start<B>(
        self,
        broker: Arc<B>,
        shutdown: CancellationToken,
    ) -> Result<RunningConsumer>
    where
        B: Subscriber + ?Sized + 'static,
    {
        self.validate()?;
        let mut subscriptions = Vec::with_capacity(self.members);
        for _ in 0..self.members {
            match broker.subscribe(self.options.clone()).await {
                Ok(s) => subscriptions.push(s),
                Err(e) => {
                    for s in subscriptions {
                        let _ = s.close().await;
                    }
                    return Err(e);
                }
            }
        }
        let stats = Arc::new(Stats::new(&self.options.topic, &self.options.group));
        let settings = Arc::new(MemberSettings {
            concurrency: self.concurrency,
            shutdown_timeout: self.shutdown_timeout,
            backoff: self.redelivery_backoff,
        });
        // A member that fails cancels this token so its siblings stop too.
        let shutdown = shutdown.child_token();
        let tasks = subscriptions
            .into_iter()
            .map(|sub| {
                tokio::spawn(run_member(
                    sub,
                    self.service.clone(),
                    settings.clone(),
                    shutdown.clone(),
                    stats.clone(),
                ))
            })
            .collect();
        Ok(RunningConsumer {
            topic: self.options.topic,
            group: self.options.group,
            tasks,
            stats,
            shutdown,
        })
    }
}

/// A started consumer: its members run in background tasks.
pub struct RunningConsumer {
    topic: String,
    group: String,
    tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
}

impl RunningConsumer {
    /// Waits until every member stopped (after `shutdown` is cancelled, or a fatal
    /// error, which cancels the token so the other members stop too).
    pub async fn join(self) -> Result<ConsumerReport> {
        let mut first_error = None;
        for task in self.tasks {
            let result = match task.await {
                Ok(r) => r,
                Err(join) => Err(Error::permanent(
                    "runtime",
                    format!("consumer member task failed: {join}"),
                )),
            };
            if let Err(e) = result {
                self.shutdown.cancel();
                first_error.get_or_insert(e);
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let stats = &self.stats;
        Ok(ConsumerReport {
            topic: self.topic,
            group: self.group,
            acked: stats.acked.load(Ordering::Relaxed),
            nacked: stats.nacked.load(Ordering::Relaxed),
            panics: stats.panics.load(Ordering::Relaxed),
            abandoned: stats.abandoned.load(Ordering::Relaxed),
        })
    }
}

struct MemberSettings {
    concurrency: usize,
    shutdown_timeout: Duration,
    backoff: (Duration, Duration),
}

async fn run_member<S>(
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
    let mut spare: Option<Slot<S::Future>> = None;
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
                        let mut acked = 0;
                        for delivery in buf.drain(..) {
                            // Shutting down with the service not ready: the deliveries not
                            // started are dropped unsettled, which hands them back.
                            let waited = wait_ready(&mut service, &mut in_flight, &shutdown).await;
                            let Some(ready) = waited else { break };
                            let started =
                                start(&mut service, ready, delivery, &mut spare, &settings, &stats)
                                    .await;
                            match started {
                                Started::Acked => acked += 1,
                                Started::Done => {}
                                Started::Running(settle) => {
                                    stats.in_flight.increment(1.0);
                                    in_flight.push(settle);
                                }
                            }
                        }
                        // Counted once per batch rather than once per message.
                        stats.acked.fetch_add(acked, Ordering::Relaxed);
                        stats.handled.increment(acked);
                    }
                    Err(e) if e.is_transient() => {
                        recv_errors += 1;
                        let pause = Duration::from_millis(50 * u64::from(recv_errors.min(40)));
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

/// A heap slot for a handler's future. The runtime polls each handler once in place;
/// most finish then, and the slot is emptied and reused for the next delivery, so the
/// common case allocates nothing. A handler that has to wait keeps its slot (it is
/// pinned there) and the runtime makes a new one.
type Slot<F> = Pin<Box<Option<F>>>;

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
            attempt = delivery.attempt(),
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

/// What became of a delivery after its handler's first poll.
enum Started<F> {
    /// The handler succeeded and the delivery was acked (counted by the caller).
    Acked,
    /// Settled otherwise (by the handler, or an ack that failed or had to wait).
    Done,
    /// Still to finish and settle: the caller puts it in the in-flight set.
    Running(F),
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

/// Calls the handler for one delivery once `service` is ready (`ready` is what
/// [`wait_ready`] returned: an error fails this delivery) and polls it once. Handlers
/// that finish without waiting are settled right here, skipping the in-flight set (a
/// large share of the per-message cost); otherwise returns the future that finishes and
/// settles it.
async fn start<S>(
    service: &mut S,
    ready: Result<(), HandlerError>,
    delivery: Delivery,
    spare: &mut Option<Slot<S::Future>>,
    settings: &Arc<MemberSettings>,
    stats: &Arc<Stats>,
) -> Started<impl Future<Output = ()> + Send + 'static>
where
    S: Service<Delivery, Response = (), Error = HandlerError>,
    S::Future: Send + 'static,
{
    let observed = Observed::new(&delivery);
    let mut slot = spare.take().unwrap_or_else(|| Box::pin(None));
    let first = match ready {
        Err(e) => Some(Err(e)),
        Ok(()) => match observed.within(|| {
            std::panic::catch_unwind(AssertUnwindSafe(|| service.call(delivery.clone())))
        }) {
            Err(panic) => Some(Err(panic_error(panic))),
            Ok(fut) => {
                slot.set(Some(fut));
                futures::future::poll_fn(|cx| {
                    Poll::Ready(observed.within(|| {
                        let fut = slot
                            .as_mut()
                            .as_pin_mut()
                            .expect("the slot was just filled");
                        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
                            Ok(Poll::Ready(r)) => Some(r),
                            Ok(Poll::Pending) => None,
                            Err(panic) => Some(Err(panic_error(panic))),
                        }
                    }))
                })
                .await
            }
        },
    };
    let outcome = match first {
        None => {
            return Started::Running(settle(
                Handling::Running(slot),
                delivery,
                settings.clone(),
                stats.clone(),
                observed,
            ))
        }
        Some(outcome) => {
            slot.set(None);
            *spare = Some(slot);
            outcome
        }
    };
    match outcome {
        Ok(()) if delivery.is_settled() => {
            observed.finish("settled-by-handler");
            Started::Done
        }
        Ok(()) => match delivery.try_ack_now() {
            Some(Ok(())) => {
                observed.finish("acked");
                Started::Acked
            }
            Some(Err(e)) => {
                ack_failed(&delivery, &observed, &e);
                Started::Done
            }
            // The backend's ack must wait (for the broker): await it here, in order.
            None => {
                ack(&delivery, stats, &observed).await;
                Started::Done
            }
        },
        Err(e) => Started::Running(settle(
            Handling::Finished(Err(e)),
            delivery,
            settings.clone(),
            stats.clone(),
            observed,
        )),
    }
}

fn panic_error(panic: Box<dyn std::any::Any + Send>) -> HandlerError {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "handler panicked".to_string());
    HandlerError::new(FailureKind::Panic, format!("handler panicked: {text}"))
}

/// A handler still running (in its slot), or its outcome.
enum Handling<F> {
    Running(Slot<F>),
    Finished(Result<(), HandlerError>),
}

async fn ack(delivery: &Delivery, stats: &Stats, observed: &Observed) {
    let result = match delivery.try_ack_now() {
        Some(done) => done,
        None => delivery.ack().await,
    };
    match result {
        Ok(()) => {
            stats.acked.fetch_add(1, Ordering::Relaxed);
            stats.handled.increment(1);
            observed.finish("acked");
        }
        Err(e) => ack_failed(delivery, observed, &e),
    }
}

fn ack_failed(delivery: &Delivery, observed: &Observed, e: &Error) {
    observed.finish("ack-failed");
    tracing::warn!(id = delivery.id(), error = %e, "ack failed; the broker will redeliver")
}

async fn settle<F>(
    handling: Handling<F>,
    delivery: Delivery,
    settings: Arc<MemberSettings>,
    stats: Arc<Stats>,
    observed: Observed,
) where
    F: Future<Output = Result<(), HandlerError>>,
{
    let outcome = match handling {
        Handling::Finished(r) => r,
        Handling::Running(mut slot) => {
            let fut = futures::future::poll_fn(move |cx| match slot.as_mut().as_pin_mut() {
                Some(fut) => fut.poll(cx),
                None => Poll::Ready(Ok(())),
            });
            let caught = AssertUnwindSafe(fut.instrument(observed.span.clone())).catch_unwind();
            let polled = match observed.trace {
                Some(ctx) => ctx.scope(caught).await,
                None => caught.await,
            };
            polled.unwrap_or_else(|panic| Err(panic_error(panic)))
        }
    };
    finish(outcome, &delivery, &settings, &stats, &observed).await;
    stats.in_flight.decrement(1.0);
}

async fn finish(
    outcome: Result<(), HandlerError>,
    delivery: &Delivery,
    settings: &MemberSettings,
    stats: &Stats,
    observed: &Observed,
) {
    if delivery.is_settled() {
        observed.finish("settled-by-handler");
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
            attempt = delivery.attempt(),
            kind = %e.kind(),
            error = %e,
            "handler failed; nacking for redelivery"
        )
    });
    let (base, max) = settings.backoff;
    let pause = crate::backoff::Backoff::new(base, max).pause(delivery.attempt());
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

type Starter<B> = Box<
    dyn FnOnce(Arc<B>, CancellationToken) -> BoxFuture<'static, Result<RunningConsumer>> + Send,
>;

/// Several consumers in one application under one shutdown.
///
/// ```
/// # async fn demo(broker: switchyard_core::AnyBroker) -> switchyard_core::Result<()> {
/// use switchyard_core::{App, Consumer, Delivery, HandlerError, SubscribeOptions};
/// async fn log(d: Delivery) -> Result<(), HandlerError> { println!("{}", d.id()); Ok(()) }
/// let reports = App::new(broker)
///     .consumer(Consumer::handler(SubscribeOptions::new("orders", "payment"), log))
///     .consumer(Consumer::handler(SubscribeOptions::new("orders", "email"), log))
///     .run(switchyard_core::shutdown_on_signal())
///     .await?;
/// # let _ = reports; Ok(()) }
/// ```
pub struct App<B: ?Sized> {
    broker: Arc<B>,
    starters: Vec<Starter<B>>,
}

impl<B: Subscriber + ?Sized + 'static> App<B> {
    /// An app consuming from `broker`.
    pub fn new(broker: Arc<B>) -> Self {
        Self {
            broker,
            starters: Vec::new(),
        }
    }

    /// Adds a consumer.
    pub fn consumer<S>(mut self, consumer: Consumer<S>) -> Self
    where
        S: Service<Delivery, Response = (), Error = HandlerError> + Clone + Send + 'static,
        S::Future: Send + 'static,
    {
        self.starters.push(Box::new(move |broker, token| {
            Box::pin(consumer.start(broker, token))
        }));
        self
    }

    /// Runs every consumer until `shutdown` is cancelled (or one fails, which stops the
    /// rest), and returns their reports in the order they were added.
    pub async fn run(self, shutdown: CancellationToken) -> Result<Vec<ConsumerReport>> {
        self.start(shutdown).await?.join().await
    }

    /// Subscribes every consumer (in the order added), then returns while they run.
    /// If one cannot subscribe, the ones already started are stopped and the error returned.
    pub async fn start(self, shutdown: CancellationToken) -> Result<RunningApp> {
        let token = shutdown.child_token();
        let mut running = Vec::with_capacity(self.starters.len());
        for start in self.starters {
            match start(self.broker.clone(), token.clone()).await {
                Ok(r) => running.push(r),
                Err(e) => {
                    token.cancel();
                    for r in running {
                        let _ = r.join().await;
                    }
                    return Err(e);
                }
            }
        }
        Ok(RunningApp { running, token })
    }
}

/// A started [`App`].
pub struct RunningApp {
    running: Vec<RunningConsumer>,
    token: CancellationToken,
}

impl RunningApp {
    /// Stops every consumer now (the same as cancelling the app's shutdown token).
    pub fn shutdown(&self) {
        self.token.cancel();
    }

    /// Waits for every consumer to stop; returns their reports in the order added, or
    /// the first error (after the others stopped).
    pub async fn join(self) -> Result<Vec<ConsumerReport>> {
        let mut reports = Vec::with_capacity(self.running.len());
        let mut first_error = None;
        let token = self.token;
        // Join concurrently: one consumer's failure cancels the token for all.
        let joins = self.running.into_iter().map(|r| {
            let token = token.clone();
            async move {
                let r = r.join().await;
                if r.is_err() {
                    token.cancel();
                }
                r
            }
        });
        for result in futures::future::join_all(joins).await {
            match result {
                Ok(report) => reports.push(report),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(reports),
        }
    }
}

/// A token cancelled on Ctrl-C or SIGTERM: pass it to [`App::run`] or [`Consumer::run`].
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::{Acker, Origin};
    use crate::message::Message;
    use async_trait::async_trait;

    struct Noop;

    impl Acker for Noop {
        fn ack(&self) -> BoxFuture<'_, Result<()>> {
            Box::pin(async { Ok(()) })
        }
        fn nack(&self, _: Nack) -> BoxFuture<'_, Result<()>> {
            Box::pin(async { Ok(()) })
        }
    }

    /// Hands out one delivery, then waits forever.
    struct One(Option<Delivery>);

    #[async_trait]
    impl Subscription for One {
        async fn recv_many(&mut self, buf: &mut Vec<Delivery>, _: usize) -> Result<usize> {
            match self.0.take() {
                Some(d) => {
                    buf.push(d);
                    Ok(1)
                }
                None => std::future::pending().await,
            }
        }
        async fn close(self: Box<Self>) -> Result<()> {
            Ok(())
        }
    }

    struct Source;

    #[async_trait]
    impl Subscriber for Source {
        async fn subscribe(&self, _: SubscribeOptions) -> Result<Box<dyn Subscription>> {
            let origin = Origin::new("t".into(), "g".into(), None, None);
            let d = Delivery::new(Arc::new(Message::new("x")), 1, origin, Noop);
            Ok(Box::new(One(Some(d))))
        }
    }

    #[tokio::test]
    async fn an_unreachable_shutdown_timeout_waits_for_the_handler_without_panicking() {
        let (started, mut is_started) = tokio::sync::mpsc::channel::<()>(1);
        let consumer = Consumer::handler(SubscribeOptions::new("t", "g"), move |_: Delivery| {
            let started = started.clone();
            async move {
                let _ = started.send(()).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<_, HandlerError>(())
            }
        })
        .shutdown_timeout(Duration::MAX);
        let token = CancellationToken::new();
        let running = consumer
            .start(Arc::new(Source), token.clone())
            .await
            .unwrap();
        is_started.recv().await.unwrap();
        token.cancel();
        let report = tokio::time::timeout(Duration::from_secs(10), running.join())
            .await
            .expect("the consumer stops once its handler is done")
            .expect("no member panicked");
        assert_eq!((report.acked, report.abandoned), (1, 0), "{report:?}");
    }
}
