//! The scenarios. Each is an async fn taking the context and returning `Check`.
//! Each subscribes before it publishes, so backends whose groups only see messages
//! published after the group exists (RabbitMQ queues) run them unchanged.

use std::collections::HashSet;
use std::time::Duration;

use switchyard_core::{
    Consumer, ConsumerReport, Delivery, HandlerError, Message, SubscribeOptions, Subscription,
};
use switchyard_middleware::{DeadLetterAdmin, RetryPolicy};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::kit::{ensure, Check, Ctx, OrFail, Outcome, Scenario};
pub(crate) use crate::support::Tally;

mod delivery;
mod forged;
mod guarantee;
mod lifecycle;
mod load;
mod middleware;
mod ordering;
mod replay;
mod rpc;
mod schedule;
mod settlement;
mod tiers;
mod tracing;

/// Every scenario, by area (the file it lives in): `test_name = function;`. The one list
/// both [`SCENARIOS`] and [`conformance_tests!`](crate::conformance_tests) are made from.
/// `$mode` picks what to make; the list follows it as `area { name = function; … } …`.
#[doc(hidden)]
#[macro_export]
macro_rules! __scenario_list {
    ($mode:ident $args:tt) => {
        $crate::$mode! { $args
            delivery {
                roundtrip_bytes_exact = roundtrip_bytes_exact;
                fanout_three_groups = fanout_three_groups;
                competing_consumers_share_work = competing_consumers;
                late_group_earliest_and_latest = late_group;
                topics_isolated = topics_isolated;
                concurrent_publishers = concurrent_publishers;
                large_message_1_mib = large_message;
            }
            ordering {
                per_key_order_at_concurrency_16 = per_key_order;
                per_key_order_while_members_join_and_leave = order_through_membership_changes;
            }
            settlement {
                nack_redelivers_with_rising_attempt = nack_redelivers;
                unacked_returned_when_subscriber_closes = unacked_returned;
                handler_panic_contained = panic_contained;
                double_ack_is_typed_error = double_ack;
                bad_input_typed_errors = bad_input;
            }
            guarantee {
                at_most_once_acks_first_and_never_redelivers = at_most_once;
            }
            lifecycle {
                graceful_shutdown_1000_in_flight = graceful_shutdown;
                shutdown_deadline_returns_unfinished_work = shutdown_deadline;
                subscribe_close_cycles_lose_nothing = subscribe_close_cycles;
                publishers_racing_member_churn_lose_nothing = publishers_and_churn;
            }
            middleware {
                tower_layers_wrap_handlers = tower_layers;
                undecodable_payload_dead_lettered_with_reason = undecodable_to_dlq;
                poison_dead_lettered_after_retries_then_replayed = poison_and_replay;
                duplicates_run_the_handler_once = duplicates_once;
            }
            tiers {
                retry_tier_delay_honoured_and_non_blocking = retry_tiers;
            }
            replay {
                dlq_replay_selections_replay_each_letter_once = selections_replay_each_letter_once;
            }
            forged {
                reserved_headers_refused_on_publish = reserved_headers_refused;
                forged_retry_headers_ignored = forged_retry_headers_ignored;
            }
            load {
                transient_failures_20_percent_exactly_once = transient_20_percent;
                permanent_failures_1_percent_exactly_those_dead_lettered = permanent_1_percent;
                load_100k_4_members_20_percent_nacks = load_100k;
            }
            tracing {
                trace_context_travels_with_messages = trace_context;
            }
            rpc {
                request_reply_1000_concurrent_each_matched = concurrent_requests;
                request_reply_no_responder_times_out = no_responder_times_out;
                request_reply_error_reply_is_typed_error = error_reply_is_typed;
                request_reply_close_ends_pending_requests = close_ends_pending;
            }
            schedule {
                scheduled_publish_1000_random_delays_none_early = scheduled_publish;
            }
        }
    };
}

/// Makes [`SCENARIOS`] from the list.
#[doc(hidden)]
#[macro_export]
macro_rules! __scenario_table {
    (() $($area:ident { $($name:ident = $f:ident;)* })*) => {
        /// Every scenario, in the order [`run`](crate::run) runs them.
        pub(crate) const SCENARIOS: &[Scenario] = &[$($(Scenario {
            area: stringify!($area),
            name: stringify!($name),
            run: |c| Box::pin($area::$f(c)),
        },)*)*];
    };
}

crate::__scenario_list!(__scenario_table());

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

/// The exactly-once check of a [`Tally`]: every id of `ids` ran once, and nothing else.
pub(crate) trait ExactlyOnce {
    fn check_exactly_once(&self, ids: &HashSet<String>, label: &str) -> Check;
}

impl ExactlyOnce for Tally {
    fn check_exactly_once(&self, ids: &HashSet<String>, label: &str) -> Check {
        let (missing, dup, foreign) = (self.missing(ids), self.duplicates(), self.foreign(ids));
        ensure!(
            missing == 0 && dup == 0 && foreign == 0,
            "{label}: {missing} missing, {dup} handled more than once, {foreign} not ours (of {})",
            ids.len()
        );
        Ok(())
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

fn dead_letters(ctx: &Ctx) -> DeadLetterAdmin {
    // Brokers that need a moment to hand out what they hold get more idle time.
    let idle = if ctx.broker.backend() == "memory" {
        300
    } else {
        3000
    };
    DeadLetterAdmin::new(ctx.broker.clone()).idle(Duration::from_millis(idle))
}

fn quick_retry(attempts: u32) -> RetryPolicy {
    RetryPolicy::new(attempts)
        .and_then(|p| p.backoff(Duration::from_millis(1), Duration::from_millis(10)))
        .expect("valid retry policy")
}
