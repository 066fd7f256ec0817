//! The consumer builder, and a started consumer's handle.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tower::Service;

use super::member::{run_member, MemberSettings};
use super::settle::panic_text;
use super::{ConsumerReport, Stats};
use crate::backend::Backoff;
use crate::broker::{SubscribeOptions, Subscriber};
use crate::delivery::Delivery;
use crate::error::{Error, HandlerError, Result};
use crate::guarantee::Guarantee;
use crate::handler::{handler_fn, Handler, HandlerService};

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
#[must_use = "a consumer does nothing until it is run or started"]
pub struct Consumer<S> {
    options: SubscribeOptions,
    service: S,
    concurrency: usize,
    members: usize,
    shutdown_timeout: Duration,
    redelivery_backoff: Backoff,
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
            redelivery_backoff: Backoff::new(Duration::from_millis(5), Duration::from_secs(1)),
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

    /// Delay before a failed delivery is nacked for redelivery:
    /// `base × 2^(delivery_count−1)`, capped at `max` and jittered into its upper half
    /// (default 5 ms, 1 s), so a failing message does not spin and members do not retry
    /// in lockstep.
    /// Real retry policy belongs in the retry middleware; this only paces redelivery.
    pub fn redelivery_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.redelivery_backoff = Backoff::new(base, max);
        self
    }

    /// When deliveries are acked: after the handler succeeded (the default,
    /// [`Guarantee::AtLeastOnce`]) or on receipt, before it runs
    /// ([`Guarantee::AtMostOnce`]: a failing handler's message is lost, never retried
    /// nor dead-lettered). Sets the subscription's `guarantee`, so the backend sees it.
    pub fn guarantee(mut self, guarantee: Guarantee) -> Self {
        self.options.guarantee = guarantee;
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
            guarantee: self.options.guarantee,
        });
        // A member that fails cancels this token so its siblings stop too.
        let shutdown = shutdown.child_token();
        let tasks = subscriptions
            .into_iter()
            .map(|sub| {
                let member = run_member(
                    sub,
                    self.service.clone(),
                    settings.clone(),
                    shutdown.clone(),
                    stats.clone(),
                );
                let siblings = shutdown.clone();
                // A panic outside the handler's call (a service's `poll_ready`, a
                // backend's receive) ends this member: its siblings stop too, at once,
                // rather than run on unaware until shutdown.
                tokio::spawn(async move {
                    AssertUnwindSafe(member).catch_unwind().await.unwrap_or_else(|panic| {
                        siblings.cancel();
                        let text = panic_text(panic.as_ref());
                        tracing::error!(panic = %text, "a consumer member panicked; stopping the consumer");
                        Err(Error::permanent(
                            "runtime",
                            format!("a consumer member panicked: {text}; its unsettled deliveries return to the broker"),
                        ))
                    })
                })
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
#[must_use = "join it to learn how the consumer ended; dropped, its members run on unwatched until shutdown"]
pub struct RunningConsumer {
    topic: String,
    group: String,
    tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
}

impl RunningConsumer {
    /// Stops its members now, as cancelling the token given to [`Consumer::start`] does,
    /// but leaves that token alone: other consumers started with it run on. In-flight
    /// handlers get the consumer's shutdown timeout; [`join`](Self::join) waits for the
    /// end.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

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
