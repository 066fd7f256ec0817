//! Several consumers in one application under one shutdown.

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tower::Service;

use super::consumer::{Consumer, RunningConsumer};
use super::ConsumerReport;
use crate::broker::Subscriber;
use crate::delivery::Delivery;
use crate::error::{HandlerError, Result};

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
#[must_use = "an app does nothing until it is run or started"]
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
#[must_use = "join it to learn how the consumers ended; dropped, they run on unwatched until shutdown"]
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
