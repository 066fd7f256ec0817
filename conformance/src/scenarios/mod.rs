//! The scenarios. Each is an async fn taking the context and returning `Check`.
//! Each subscribes before it publishes, so backends whose groups only see messages
//! published after the group exists (RabbitMQ queues) run them unchanged.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use switchyard_core::{
    Consumer, ConsumerReport, Delivery, HandlerError, Message, SubscribeOptions, Subscription,
};
use switchyard_middleware::{DeadLetters, RetryPolicy};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::kit::{ensure, Check, Ctx, OrFail, Outcome, ScenarioFn};

mod delivery;
mod forged;
mod lifecycle;
mod load;
mod middleware;
mod ordering;
mod replay;
mod settlement;
mod tracing;

/// Every scenario, in the order they run.
pub(crate) const SCENARIOS: &[(&str, ScenarioFn)] = &[
    ("roundtrip_bytes_exact", |c| {
        Box::pin(delivery::roundtrip_bytes_exact(c))
    }),
    ("fanout_three_groups", |c| {
        Box::pin(delivery::fanout_three_groups(c))
    }),
    ("competing_consumers_share_work", |c| {
        Box::pin(delivery::competing_consumers(c))
    }),
    ("per_key_order_at_concurrency_16", |c| {
        Box::pin(ordering::per_key_order(c))
    }),
    ("nack_redelivers_with_rising_attempt", |c| {
        Box::pin(settlement::nack_redelivers(c))
    }),
    ("unacked_returned_when_subscriber_closes", |c| {
        Box::pin(settlement::unacked_returned(c))
    }),
    ("graceful_shutdown_1000_in_flight", |c| {
        Box::pin(lifecycle::graceful_shutdown(c))
    }),
    ("shutdown_deadline_returns_unfinished_work", |c| {
        Box::pin(lifecycle::shutdown_deadline(c))
    }),
    ("late_group_earliest_and_latest", |c| {
        Box::pin(delivery::late_group(c))
    }),
    ("topics_isolated", |c| {
        Box::pin(delivery::topics_isolated(c))
    }),
    ("concurrent_publishers", |c| {
        Box::pin(delivery::concurrent_publishers(c))
    }),
    ("handler_panic_contained", |c| {
        Box::pin(settlement::panic_contained(c))
    }),
    ("double_ack_is_typed_error", |c| {
        Box::pin(settlement::double_ack(c))
    }),
    ("tower_layers_wrap_handlers", |c| {
        Box::pin(middleware::tower_layers(c))
    }),
    ("bad_input_typed_errors", |c| {
        Box::pin(settlement::bad_input(c))
    }),
    ("undecodable_payload_dead_lettered_with_reason", |c| {
        Box::pin(middleware::undecodable_to_dlq(c))
    }),
    ("poison_dead_lettered_after_retries_then_replayed", |c| {
        Box::pin(middleware::poison_and_replay(c))
    }),
    ("dlq_replay_selections_replay_each_letter_once", |c| {
        Box::pin(replay::selections_replay_each_letter_once(c))
    }),
    ("duplicates_run_the_handler_once", |c| {
        Box::pin(middleware::duplicates_once(c))
    }),
    ("transient_failures_20_percent_exactly_once", |c| {
        Box::pin(load::transient_20_percent(c))
    }),
    (
        "permanent_failures_1_percent_exactly_those_dead_lettered",
        |c| Box::pin(load::permanent_1_percent(c)),
    ),
    ("retry_tier_delay_honoured_and_non_blocking", |c| {
        Box::pin(middleware::retry_tiers(c))
    }),
    ("reserved_headers_refused_on_publish", |c| {
        Box::pin(forged::reserved_headers_refused(c))
    }),
    ("forged_retry_headers_ignored", |c| {
        Box::pin(forged::forged_retry_headers_ignored(c))
    }),
    ("subscribe_close_cycles_lose_nothing", |c| {
        Box::pin(lifecycle::subscribe_close_cycles(c))
    }),
    ("publishers_racing_member_churn_lose_nothing", |c| {
        Box::pin(lifecycle::publishers_and_churn(c))
    }),
    ("per_key_order_while_members_join_and_leave", |c| {
        Box::pin(ordering::order_through_membership_changes(c))
    }),
    ("large_message_1_mib", |c| {
        Box::pin(delivery::large_message(c))
    }),
    ("load_100k_4_members_20_percent_nacks", |c| {
        Box::pin(load::load_100k(c))
    }),
    ("trace_context_travels_with_messages", |c| {
        Box::pin(tracing::trace_context(c))
    }),
];

const LONG: Duration = Duration::from_secs(90);

async fn subscribe(ctx: &Ctx, opts: SubscribeOptions) -> Result<Box<dyn Subscription>, Outcome> {
    ctx.broker.subscribe(opts).await.or_fail("subscribe")
}

async fn publish_all(ctx: &Ctx, topic: &str, messages: Vec<Message>) -> Check {
    for chunk in messages.chunks(500) {
        ctx.broker
            .publish_batch(topic, chunk.to_vec())
            .await
            .or_fail("publish")?;
    }
    Ok(())
}

/// Receives until `n` deliveries arrived (acking each unless told not to).
async fn recv_n(
    sub: &mut Box<dyn Subscription>,
    n: usize,
    ack: bool,
) -> Result<Vec<Delivery>, Outcome> {
    let mut got = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + LONG;
    let mut buf = Vec::new();
    while got.len() < n {
        let r = tokio::time::timeout_at(deadline, sub.recv_many(&mut buf, n - got.len())).await;
        match r {
            Err(_) => {
                return Err(Outcome::Failed(format!(
                    "received {} of {n} messages before timing out",
                    got.len()
                )))
            }
            Ok(Err(e)) => return Err(Outcome::Failed(format!("receive failed: {e}"))),
            Ok(Ok(0)) => return Err(Outcome::Failed("subscription ended early".into())),
            Ok(Ok(_)) => {
                for d in buf.drain(..) {
                    if ack {
                        d.ack().await.or_fail("ack")?;
                    }
                    got.push(d);
                }
            }
        }
    }
    Ok(got)
}

/// Asserts that nothing more arrives within `quiet`.
async fn expect_nothing(sub: &mut Box<dyn Subscription>, quiet: Duration) -> Check {
    let mut buf = Vec::new();
    if let Ok(Ok(n)) = tokio::time::timeout(quiet, sub.recv_many(&mut buf, 100)).await {
        ensure!(
            n == 0,
            "expected no more messages, got {n} (first id {})",
            buf[0].id()
        );
    }
    Ok(())
}

type Running = (
    JoinHandle<switchyard_core::Result<ConsumerReport>>,
    CancellationToken,
);

/// Starts a consumer; when this returns its members have subscribed.
async fn spawn<S>(ctx: &Ctx, consumer: Consumer<S>) -> Result<Running, Outcome>
where
    S: tower::Service<Delivery, Response = (), Error = HandlerError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let token = CancellationToken::new();
    let running = consumer
        .start(ctx.broker.clone(), token.clone())
        .await
        .or_fail("start consumer")?;
    Ok((tokio::spawn(running.join()), token))
}

async fn stop((task, token): Running) -> Result<ConsumerReport, Outcome> {
    token.cancel();
    match tokio::time::timeout(LONG, task).await {
        Err(_) => Err(Outcome::Failed(
            "consumer did not stop within 90 s of shutdown".into(),
        )),
        Ok(Err(e)) => Err(Outcome::Failed(format!("consumer task panicked: {e}"))),
        Ok(Ok(r)) => r.or_fail("consumer"),
    }
}

/// Counts handler runs per message id.
#[derive(Clone, Default)]
struct Tally(Arc<Mutex<HashMap<String, usize>>>);

impl Tally {
    fn add(&self, id: &str) {
        *self.0.lock().unwrap().entry(id.to_string()).or_default() += 1;
    }
    fn distinct(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    fn check_exactly_once(&self, ids: &HashSet<String>, label: &str) -> Check {
        let map = self.0.lock().unwrap();
        let missing = ids.iter().filter(|id| !map.contains_key(*id)).count();
        let dup = map.values().filter(|&&n| n > 1).count();
        let foreign = map.keys().filter(|id| !ids.contains(*id)).count();
        ensure!(
            missing == 0 && dup == 0 && foreign == 0,
            "{label}: {missing} missing, {dup} handled more than once, {foreign} not ours (of {})",
            ids.len()
        );
        Ok(())
    }
}

fn counting_handler(
    tally: Tally,
) -> impl Fn(Delivery) -> BoxFuture<'static, Result<(), HandlerError>> + Clone + Send + Sync + 'static
{
    move |d: Delivery| {
        let tally = tally.clone();
        Box::pin(async move {
            tally.add(d.id());
            Ok(())
        })
    }
}

fn ids(messages: &[Message]) -> HashSet<String> {
    messages.iter().map(|m| m.id.clone()).collect()
}

fn plain(n: usize, label: &str) -> Vec<Message> {
    (0..n)
        .map(|i| Message::new(format!("{label}-{i}")))
        .collect()
}

fn dead_letters(ctx: &Ctx) -> DeadLetters {
    // Brokers that need a moment to hand out what they hold get more idle time.
    let idle = if ctx.broker.backend() == "memory" {
        300
    } else {
        3000
    };
    DeadLetters::new(ctx.broker.clone()).idle(Duration::from_millis(idle))
}

fn quick_retry(attempts: u32) -> RetryPolicy {
    RetryPolicy::new(attempts)
        .and_then(|p| p.backoff(Duration::from_millis(1), Duration::from_millis(10)))
        .expect("valid retry policy")
}
