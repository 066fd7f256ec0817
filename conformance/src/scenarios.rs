//! The scenarios. Each is an async fn taking the context and returning `Check`.
//! Each subscribes before it publishes, so backends whose groups only see messages
//! published after the group exists (RabbitMQ queues) run them unchanged.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use switchyard_core::observe::{self, TraceContext, TRACEPARENT};
use switchyard_core::{
    App, Consumer, ConsumerReport, Delivery, Error, HandlerError, Json, Message, Nack, StartFrom,
    SubscribeOptions, Subscription,
};
use switchyard_middleware::dead_letter::{self, ReplayTo};
use switchyard_middleware::{
    DeadLetterLayer, DeadLetterRecord, DeadLetters, IdempotencyLayer, InspectLayer, MemoryStore,
    RetryPolicy, RetryTiers, Selection,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;

use crate::kit::{ensure, Check, Ctx, OrFail, Outcome, ScenarioFn};

mod forged;
mod replay;

/// Every scenario, in the order they run.
pub(crate) const SCENARIOS: &[(&str, ScenarioFn)] = &[
    ("roundtrip_bytes_exact", |c| {
        Box::pin(roundtrip_bytes_exact(c))
    }),
    ("fanout_three_groups", |c| Box::pin(fanout_three_groups(c))),
    ("competing_consumers_share_work", |c| {
        Box::pin(competing_consumers(c))
    }),
    ("per_key_order_at_concurrency_16", |c| {
        Box::pin(per_key_order(c))
    }),
    ("nack_redelivers_with_rising_attempt", |c| {
        Box::pin(nack_redelivers(c))
    }),
    ("unacked_returned_when_subscriber_closes", |c| {
        Box::pin(unacked_returned(c))
    }),
    ("graceful_shutdown_1000_in_flight", |c| {
        Box::pin(graceful_shutdown(c))
    }),
    ("shutdown_deadline_returns_unfinished_work", |c| {
        Box::pin(shutdown_deadline(c))
    }),
    ("late_group_earliest_and_latest", |c| {
        Box::pin(late_group(c))
    }),
    ("topics_isolated", |c| Box::pin(topics_isolated(c))),
    ("concurrent_publishers", |c| {
        Box::pin(concurrent_publishers(c))
    }),
    ("handler_panic_contained", |c| Box::pin(panic_contained(c))),
    ("double_ack_is_typed_error", |c| Box::pin(double_ack(c))),
    ("tower_layers_wrap_handlers", |c| Box::pin(tower_layers(c))),
    ("bad_input_typed_errors", |c| Box::pin(bad_input(c))),
    ("undecodable_payload_dead_lettered_with_reason", |c| {
        Box::pin(undecodable_to_dlq(c))
    }),
    ("poison_dead_lettered_after_retries_then_replayed", |c| {
        Box::pin(poison_and_replay(c))
    }),
    ("dlq_replay_selections_replay_each_letter_once", |c| {
        Box::pin(replay::selections_replay_each_letter_once(c))
    }),
    ("duplicates_run_the_handler_once", |c| {
        Box::pin(duplicates_once(c))
    }),
    ("transient_failures_20_percent_exactly_once", |c| {
        Box::pin(transient_20_percent(c))
    }),
    (
        "permanent_failures_1_percent_exactly_those_dead_lettered",
        |c| Box::pin(permanent_1_percent(c)),
    ),
    ("retry_tier_delay_honoured_and_non_blocking", |c| {
        Box::pin(retry_tiers(c))
    }),
    ("reserved_headers_refused_on_publish", |c| {
        Box::pin(forged::reserved_headers_refused(c))
    }),
    ("forged_retry_headers_ignored", |c| {
        Box::pin(forged::forged_retry_headers_ignored(c))
    }),
    ("subscribe_close_cycles_lose_nothing", |c| {
        Box::pin(subscribe_close_cycles(c))
    }),
    ("publishers_racing_member_churn_lose_nothing", |c| {
        Box::pin(publishers_and_churn(c))
    }),
    ("per_key_order_while_members_join_and_leave", |c| {
        Box::pin(order_through_membership_changes(c))
    }),
    ("large_message_1_mib", |c| Box::pin(large_message(c))),
    ("load_100k_4_members_20_percent_nacks", |c| {
        Box::pin(load_100k(c))
    }),
    ("trace_context_travels_with_messages", |c| {
        Box::pin(trace_context(c))
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

async fn roundtrip_bytes_exact(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("roundtrip");
    let mut sub = subscribe(&ctx, SubscribeOptions::new(&topic, ctx.name("g"))).await?;
    let sent: Vec<Message> = (0..1000)
        .map(|i| {
            let payload: Vec<u8> = match i % 5 {
                0 => Vec::new(),
                1 => (0..=255u8).collect(),
                2 => format!("ünïcödé ✓ {i}").into_bytes(),
                3 => vec![0xff, 0x00, 0xfe, (i % 256) as u8, 0x80],
                _ => vec![b'x'; 4096],
            };
            let mut m = Message::new(payload)
                .with_header("seq", i.to_string())
                .with_header("ünï-header", "välue ✓ \"quoted\" ; = ,")
                .with_header("empty", "");
            if i % 3 != 0 {
                m = m.with_key(format!("kéy/{}", i % 7));
            }
            // Brokers from `switchyard::connect` add a traceparent; add it here so the
            // comparison below is byte for byte over every header.
            observe::stamp(&mut m);
            m
        })
        .collect();
    publish_all(&ctx, &topic, sent.clone()).await?;
    let got = recv_n(&mut sub, sent.len(), true).await?;
    let by_id: HashMap<&str, &Message> = sent.iter().map(|m| (m.id.as_str(), m)).collect();
    for d in &got {
        let Some(orig) = by_id.get(d.id()) else {
            return Err(Outcome::Failed(format!("received unknown id {}", d.id())));
        };
        let m = d.message();
        ensure!(m.payload == orig.payload, "payload of {} differs", d.id());
        ensure!(
            m.key == orig.key,
            "key of {} differs: {:?} vs {:?}",
            d.id(),
            m.key,
            orig.key
        );
        ensure!(
            m.headers == orig.headers,
            "headers of {} differ: {:?} vs {:?}",
            d.id(),
            m.headers,
            orig.headers
        );
        ensure!(
            d.attempt() == 1,
            "first delivery has attempt {}",
            d.attempt()
        );
        ensure!(
            d.topic() == topic,
            "origin topic {} is not {topic}",
            d.topic()
        );
    }
    let distinct: HashSet<&str> = got.iter().map(|d| d.id()).collect();
    ensure!(
        distinct.len() == sent.len(),
        "{} distinct of {}",
        distinct.len(),
        sent.len()
    );
    expect_nothing(&mut sub, Duration::from_millis(300)).await?;
    sub.close().await.or_fail("close")
}

async fn fanout_three_groups(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("fanout");
    let tallies: Vec<Tally> = (0..3).map(|_| Tally::default()).collect();
    let mut running = Vec::new();
    for (i, tally) in tallies.iter().enumerate() {
        let opts = SubscribeOptions::new(&topic, ctx.name(&format!("group{i}")));
        running.push(
            spawn(
                &ctx,
                Consumer::handler(opts, counting_handler(tally.clone())),
            )
            .await?,
        );
    }
    let sent = plain(500, "fanout");
    publish_all(&ctx, &topic, sent.clone()).await?;
    let want = ids(&sent);
    ctx.wait_for(LONG, "every group to get every message", || {
        tallies.iter().all(|t| t.distinct() >= want.len())
    })
    .await?;
    for r in running {
        stop(r).await?;
    }
    for (i, t) in tallies.iter().enumerate() {
        t.check_exactly_once(&want, &format!("group{i}"))?;
    }
    Ok(())
}

async fn competing_consumers(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("competing");
    let group = ctx.name("workers");
    let tally = Tally::default();
    let per_member: Vec<Arc<AtomicUsize>> = (0..4).map(|_| Arc::default()).collect();
    // Four members, each its own subscription, so we can see the work was shared.
    let mut running = Vec::new();
    for count in &per_member {
        let (tally, count) = (tally.clone(), count.clone());
        let handler = move |d: Delivery| {
            let (tally, count) = (tally.clone(), count.clone());
            async move {
                tally.add(d.id());
                count.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_micros(200)).await;
                Ok::<_, HandlerError>(())
            }
        };
        let opts = SubscribeOptions::new(&topic, &group).prefetch(32);
        running.push(spawn(&ctx, Consumer::handler(opts, handler).concurrency(8)).await?);
    }
    let sent: Vec<Message> = (0..5000)
        .map(|i| {
            let m = Message::new(format!("work-{i}"));
            if i % 2 == 0 {
                m.with_key(format!("k{}", i % 64))
            } else {
                m
            }
        })
        .collect();
    publish_all(&ctx, &topic, sent.clone()).await?;
    let want = ids(&sent);
    ctx.wait_for(LONG, "all 5000 messages handled", || {
        tally.distinct() >= want.len()
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    for r in running {
        stop(r).await?;
    }
    tally.check_exactly_once(&want, "workers")?;
    let active = per_member
        .iter()
        .filter(|c| c.load(Ordering::Relaxed) > 0)
        .count();
    ensure!(
        active >= 2,
        "the work was not shared: only {active} of 4 members handled messages"
    );
    Ok(())
}

/// `per_key` messages for each of `keys` keys, interleaved, payload `k<key>|<seq>`.
fn keyed_in_order(keys: usize, per_key: usize) -> Vec<Message> {
    (0..per_key)
        .flat_map(|seq| {
            (0..keys).map(move |k| Message::new(format!("k{k}|{seq}")).with_key(format!("k{k}")))
        })
        .collect()
}

/// The key and sequence number of a [`keyed_in_order`] message (-1 if unreadable).
fn key_and_seq(d: &Delivery) -> (String, i64) {
    let key = d.key().unwrap_or_default().to_string();
    let seq = std::str::from_utf8(d.payload())
        .ok()
        .and_then(|s| s.rsplit('|').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(-1);
    (key, seq)
}

async fn per_key_order(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("order");
    let keys = 16;
    let per_key = 100;
    let last: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
    let busy: Arc<Mutex<HashSet<String>>> = Arc::default();
    let violations: Arc<Mutex<Vec<String>>> = Arc::default();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (last, busy, violations) = (last.clone(), busy.clone(), violations.clone());
        let (in_flight, peak, done) = (in_flight.clone(), peak.clone(), done.clone());
        move |d: Delivery| {
            let (last, busy, violations) = (last.clone(), busy.clone(), violations.clone());
            let (in_flight, peak, done) = (in_flight.clone(), peak.clone(), done.clone());
            async move {
                let (key, seq) = key_and_seq(&d);
                if !busy.lock().unwrap().insert(key.clone()) {
                    violations
                        .lock()
                        .unwrap()
                        .push(format!("{key} ran concurrently"));
                }
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                // Vary handler time so different keys overtake each other.
                tokio::time::sleep(Duration::from_micros(100 + (seq as u64 * 37 % 900))).await;
                {
                    let mut last = last.lock().unwrap();
                    let prev = last.get(&key).copied().unwrap_or(-1);
                    if seq != prev + 1 {
                        violations
                            .lock()
                            .unwrap()
                            .push(format!("{key}: {seq} after {prev}"));
                    }
                    last.insert(key.clone(), seq);
                }
                in_flight.fetch_sub(1, Ordering::SeqCst);
                busy.lock().unwrap().remove(&key);
                done.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(())
            }
        }
    };
    let opts = SubscribeOptions::new(&topic, ctx.name("ordered")).prefetch(64);
    let running = spawn(&ctx, Consumer::handler(opts, handler).concurrency(16)).await?;
    let sent = keyed_in_order(keys, per_key);
    publish_all(&ctx, &topic, sent).await?;
    ctx.wait_for(LONG, "all keyed messages handled", || {
        done.load(Ordering::SeqCst) >= keys * per_key
    })
    .await?;
    stop(running).await?;
    let v = violations.lock().unwrap();
    ensure!(
        v.is_empty(),
        "{} order violations, first: {:?}",
        v.len(),
        v.first()
    );
    let peak = peak.load(Ordering::SeqCst);
    ensure!(
        peak >= 2,
        "handlers never overlapped (peak {peak}): the test proves nothing"
    );
    Ok(())
}

async fn nack_redelivers(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("nack");
    let attempts: Arc<Mutex<BTreeMap<String, Vec<u32>>>> = Arc::default();
    let handler = {
        let attempts = attempts.clone();
        move |d: Delivery| {
            let attempts = attempts.clone();
            async move {
                attempts
                    .lock()
                    .unwrap()
                    .entry(d.id().to_string())
                    .or_default()
                    .push(d.attempt());
                if d.attempt() < 3 {
                    return Err(HandlerError::transient(std::io::Error::other("not yet")));
                }
                Ok(())
            }
        }
    };
    let opts = SubscribeOptions::new(&topic, ctx.name("g"));
    let consumer = Consumer::handler(opts, handler)
        .redelivery_backoff(Duration::from_millis(1), Duration::from_millis(10));
    let running = spawn(&ctx, consumer).await?;
    let sent: Vec<Message> = (0..20)
        .map(|i| Message::new(format!("n{i}")).with_key(format!("k{}", i % 4)))
        .collect();
    publish_all(&ctx, &topic, sent.clone()).await?;
    ctx.wait_for(LONG, "each message to reach attempt 3", || {
        let a = attempts.lock().unwrap();
        a.len() == sent.len() && a.values().all(|v| v.contains(&3))
    })
    .await?;
    let report = stop(running).await?;
    let a = attempts.lock().unwrap();
    for (id, seen) in a.iter() {
        ensure!(
            seen == &vec![1, 2, 3],
            "message {id} saw attempts {seen:?}, expected [1, 2, 3]"
        );
    }
    ensure!(
        report.acked == 20 && report.nacked == 40,
        "report {report:?}"
    );
    Ok(())
}

async fn unacked_returned(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("noack");
    let group = ctx.name("g");
    let mut first = subscribe(&ctx, SubscribeOptions::new(&topic, &group).prefetch(10)).await?;
    let sent = plain(10, "noack");
    publish_all(&ctx, &topic, sent.clone()).await?;
    let got = recv_n(&mut first, 10, false).await?;
    ensure!(got.len() == 10, "first subscriber got {}", got.len());
    first.close().await.or_fail("close")?;
    // Settling after close must not pretend to succeed.
    if let Err(e) = got[0].ack().await {
        ensure!(
            matches!(
                e,
                Error::SubscriptionClosed { .. } | Error::Backend { .. } | Error::Closed { .. }
            ),
            "ack after close gave an unexpected error: {e}"
        );
    }
    drop(got);
    let mut second = subscribe(&ctx, SubscribeOptions::new(&topic, &group)).await?;
    let again = recv_n(&mut second, 10, true).await?;
    let again_ids: HashSet<String> = again.iter().map(|d| d.id().to_string()).collect();
    ensure!(
        again_ids == ids(&sent),
        "redelivered set differs from the unacked set"
    );
    if ctx.caps.durable_attempts {
        ensure!(
            again.iter().all(|d| d.attempt() >= 2),
            "redelivered messages should have attempt >= 2"
        );
    }
    second.close().await.or_fail("close")
}

async fn graceful_shutdown(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("shutdown");
    let group = ctx.name("g");
    let tally = Tally::default();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let token_seen = CancellationToken::new();
    let handler = {
        let (tally, in_flight, stop_seen) = (tally.clone(), in_flight.clone(), token_seen.clone());
        move |d: Delivery| {
            let (tally, in_flight, stop_seen) =
                (tally.clone(), in_flight.clone(), stop_seen.clone());
            async move {
                in_flight.fetch_add(1, Ordering::SeqCst);
                // Hold every handler until shutdown starts, so 1000 are in flight at once.
                stop_seen.cancelled().await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                tally.add(d.id());
                Ok::<_, HandlerError>(())
            }
        }
    };
    let opts = SubscribeOptions::new(&topic, &group).prefetch(1000);
    let running = spawn(&ctx, Consumer::handler(opts, handler).concurrency(1000)).await?;
    let sent = plain(1000, "inflight");
    publish_all(&ctx, &topic, sent.clone()).await?;
    ctx.wait_for(LONG, "1000 handlers in flight", || {
        in_flight.load(Ordering::SeqCst) >= 1000
    })
    .await?;
    let (task, token) = running;
    token.cancel();
    token_seen.cancel();
    let report = stop((task, token)).await?;
    ensure!(
        report.acked == 1000,
        "acked {} of 1000 in-flight messages",
        report.acked
    );
    tally.check_exactly_once(&ids(&sent), "shutdown")?;
    let mut after = subscribe(&ctx, SubscribeOptions::new(&topic, &group)).await?;
    expect_nothing(&mut after, Duration::from_millis(500)).await?;
    after.close().await.or_fail("close")
}

async fn shutdown_deadline(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("deadline");
    let group = ctx.name("g");
    let sent = plain(50, "stuck");
    let started = Arc::new(AtomicUsize::new(0));
    let stuck = {
        let started = started.clone();
        move |_d: Delivery| {
            let started = started.clone();
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                // Never finishes: shutdown must give up on it and leave it for redelivery.
                futures::future::pending::<()>().await;
                Ok::<_, HandlerError>(())
            }
        }
    };
    let opts = SubscribeOptions::new(&topic, &group).prefetch(100);
    let running = spawn(
        &ctx,
        Consumer::handler(opts, stuck)
            .concurrency(100)
            .shutdown_timeout(Duration::from_millis(300)),
    )
    .await?;
    publish_all(&ctx, &topic, sent.clone()).await?;
    // Shut down only once every message is stuck in a handler.
    ctx.wait_for(LONG, "all 50 handlers to start", || {
        started.load(Ordering::SeqCst) >= 50
    })
    .await?;
    let report = stop(running).await?;
    ensure!(
        report.acked == 0,
        "nothing can have been acked, report {report:?}"
    );
    ensure!(
        report.abandoned == 50,
        "expected the 50 stuck deliveries abandoned, report {report:?}"
    );
    let tally = Tally::default();
    let running = spawn(
        &ctx,
        Consumer::handler(
            SubscribeOptions::new(&topic, &group),
            counting_handler(tally.clone()),
        ),
    )
    .await?;
    let want = ids(&sent);
    ctx.wait_for(LONG, "abandoned messages redelivered", || {
        tally.distinct() >= want.len()
    })
    .await?;
    stop(running).await?;
    tally.check_exactly_once(&want, "redelivered")
}

async fn late_group(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("late");
    // A first group makes the topic exist before anything is published.
    let mut early = subscribe(&ctx, SubscribeOptions::new(&topic, ctx.name("early"))).await?;
    let old = plain(20, "old");
    publish_all(&ctx, &topic, old.clone()).await?;
    recv_n(&mut early, 20, true).await?;
    let mut latest = subscribe(
        &ctx,
        SubscribeOptions::new(&topic, ctx.name("latest")).start(StartFrom::Latest),
    )
    .await?;
    let mut earliest = if ctx.caps.replay {
        Some(
            subscribe(
                &ctx,
                SubscribeOptions::new(&topic, ctx.name("earliest")).start(StartFrom::Earliest),
            )
            .await?,
        )
    } else {
        None
    };
    let new = plain(20, "new");
    publish_all(&ctx, &topic, new.clone()).await?;
    let got = recv_n(&mut latest, 20, true).await?;
    let got_ids: HashSet<String> = got.iter().map(|d| d.id().to_string()).collect();
    ensure!(
        got_ids == ids(&new),
        "a group starting at latest must see exactly the new messages"
    );
    expect_nothing(&mut latest, Duration::from_millis(300)).await?;
    latest.close().await.or_fail("close")?;
    early.close().await.or_fail("close")?;
    let Some(mut earliest) = earliest.take() else {
        return ctx.require(
            false,
            "replay (a new group cannot start at the earliest message)",
        );
    };
    let got = recv_n(&mut earliest, 40, true).await?;
    let got_ids: HashSet<String> = got.iter().map(|d| d.id().to_string()).collect();
    let all: HashSet<String> = ids(&old).union(&ids(&new)).cloned().collect();
    ensure!(
        got_ids == all,
        "a group starting at earliest must see old and new messages"
    );
    earliest.close().await.or_fail("close")
}

async fn topics_isolated(ctx: Arc<Ctx>) -> Check {
    let n = 20;
    // A group per topic, subscribed concurrently: group joins are slow on some brokers
    // (about 3 s on tansu), and one group spanning 20 topics would rebalance 20 times.
    let joins = (0..n).map(|i| {
        let topic = ctx.name(&format!("iso{i}"));
        let group = ctx.name(&format!("iso-g{i}"));
        let ctx = ctx.clone();
        async move {
            let sub = subscribe(&ctx, SubscribeOptions::new(&topic, group)).await?;
            Ok::<_, Outcome>((topic, sub))
        }
    });
    let mut subs = Vec::new();
    for joined in futures::future::join_all(joins).await {
        subs.push(joined?);
    }
    let topics: Vec<String> = subs.iter().map(|(t, _)| t.clone()).collect();
    let mut sent = Vec::new();
    for topic in &topics {
        let msgs = plain(25, topic);
        publish_all(&ctx, topic, msgs.clone()).await?;
        sent.push(ids(&msgs));
    }
    for ((topic, sub), want) in subs.iter_mut().zip(&sent) {
        let got = recv_n(sub, 25, true).await?;
        let got: HashSet<String> = got.iter().map(|d| d.id().to_string()).collect();
        ensure!(
            &got == want,
            "topic {topic} received messages that were not published to it"
        );
        expect_nothing(sub, Duration::from_millis(50)).await?;
    }
    for (_, sub) in subs {
        sub.close().await.or_fail("close")?;
    }
    Ok(())
}

async fn concurrent_publishers(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("manypub");
    let tally = Tally::default();
    let running = spawn(
        &ctx,
        Consumer::handler(
            SubscribeOptions::new(&topic, ctx.name("g")),
            counting_handler(tally.clone()),
        )
        .concurrency(32),
    )
    .await?;
    let mut tasks = Vec::new();
    let mut all = HashSet::new();
    for t in 0..10 {
        let msgs: Vec<Message> = (0..1000)
            .map(|i| Message::new(format!("p{t}-{i}")).with_key(format!("p{t}")))
            .collect();
        all.extend(ids(&msgs));
        let broker = ctx.broker.clone();
        let topic = topic.clone();
        tasks.push(tokio::spawn(async move {
            for m in msgs {
                broker.publish(&topic, m).await?;
            }
            Ok::<_, Error>(())
        }));
    }
    for t in tasks {
        t.await.or_fail("publisher task")?.or_fail("publish")?;
    }
    ctx.wait_for(LONG, "10 x 1000 messages handled", || {
        tally.distinct() >= all.len()
    })
    .await?;
    stop(running).await?;
    tally.check_exactly_once(&all, "concurrent publishers")
}

async fn panic_contained(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("panic");
    let tally = Tally::default();
    let handler = {
        let tally = tally.clone();
        move |d: Delivery| {
            let tally = tally.clone();
            async move {
                let n: usize = std::str::from_utf8(d.payload()).unwrap().parse().unwrap();
                if n % 3 == 0 && d.attempt() == 1 {
                    panic!("conformance: deliberate panic on message {n}");
                }
                tally.add(d.id());
                Ok::<_, HandlerError>(())
            }
        }
    };
    let consumer = Consumer::handler(SubscribeOptions::new(&topic, ctx.name("g")), handler)
        .redelivery_backoff(Duration::from_millis(1), Duration::from_millis(5));
    let running = spawn(&ctx, consumer).await?;
    let sent: Vec<Message> = (0..60).map(|i| Message::new(i.to_string())).collect();
    publish_all(&ctx, &topic, sent.clone()).await?;
    ctx.wait_for(LONG, "all messages handled despite panics", || {
        tally.distinct() >= 60
    })
    .await?;
    let report = stop(running).await?;
    tally.check_exactly_once(&ids(&sent), "after panics")?;
    ensure!(
        report.panics == 20,
        "expected 20 panics caught, report {report:?}"
    );
    Ok(())
}

async fn double_ack(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("dblack");
    let mut sub = subscribe(&ctx, SubscribeOptions::new(&topic, ctx.name("g"))).await?;
    publish_all(&ctx, &topic, plain(1, "once")).await?;
    let d = recv_n(&mut sub, 1, false).await?.remove(0);
    d.ack().await.or_fail("first ack")?;
    match d.ack().await {
        Err(Error::AlreadySettled { .. }) => {}
        other => return Err(Outcome::Failed(format!("second ack returned {other:?}"))),
    }
    match d.nack(Nack::Requeue).await {
        Err(Error::AlreadySettled { .. }) => {}
        other => {
            return Err(Outcome::Failed(format!(
                "nack after ack returned {other:?}"
            )))
        }
    }
    expect_nothing(&mut sub, Duration::from_millis(300)).await?;
    sub.close().await.or_fail("close")
}

async fn tower_layers(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("tower");
    let observed = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let service = {
        let (observed, failed) = (observed.clone(), failed.clone());
        ServiceBuilder::new()
            .layer(InspectLayer::new(move |_d, outcome| {
                observed.fetch_add(1, Ordering::SeqCst);
                if outcome.is_err() {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }))
            .service(switchyard_core::handler_fn(|d: Delivery| async move {
                if d.attempt() == 1 && d.payload() == b"fail-once" {
                    return Err(HandlerError::transient(std::io::Error::other(
                        "first try fails",
                    )));
                }
                Ok(())
            }))
    };
    let consumer = Consumer::new(SubscribeOptions::new(&topic, ctx.name("g")), service)
        .redelivery_backoff(Duration::from_millis(1), Duration::from_millis(5));
    let running = spawn(&ctx, consumer).await?;
    let mut msgs = plain(9, "ok");
    msgs.push(Message::new("fail-once"));
    publish_all(&ctx, &topic, msgs).await?;
    ctx.wait_for(LONG, "the layer to observe 11 runs", || {
        observed.load(Ordering::SeqCst) >= 11
    })
    .await?;
    let report = stop(running).await?;
    ensure!(
        failed.load(Ordering::SeqCst) == 1,
        "the layer saw {} failures",
        failed.load(Ordering::SeqCst)
    );
    ensure!(
        report.acked == 10 && report.nacked == 1,
        "report {report:?}"
    );
    Ok(())
}

async fn bad_input(ctx: Arc<Ctx>) -> Check {
    for (topic, group) in [("", "g"), ("ok", ""), ("has space", "g"), ("ok", "sl/ash")] {
        match ctx
            .broker
            .subscribe(SubscribeOptions::new(topic, group))
            .await
        {
            Err(Error::InvalidName { .. }) => {}
            Err(e) => {
                return Err(Outcome::Failed(format!(
                    "subscribe({topic:?}, {group:?}) gave {e}"
                )))
            }
            Ok(_) => {
                return Err(Outcome::Failed(format!(
                    "subscribe({topic:?}, {group:?}) was accepted"
                )))
            }
        }
    }
    match ctx.broker.publish("bad topic!", Message::new("x")).await {
        Err(Error::InvalidName { what: "topic", .. }) => {}
        other => {
            return Err(Outcome::Failed(format!(
                "publish to a bad topic gave {other:?}"
            )))
        }
    }
    let zero = Consumer::handler(
        SubscribeOptions::new(ctx.name("t"), "g"),
        |_d: Delivery| async { Ok::<_, HandlerError>(()) },
    )
    .concurrency(0);
    match zero.run(ctx.broker.clone(), CancellationToken::new()).await {
        Err(Error::Config { setting, .. }) if setting == "concurrency" => {}
        other => return Err(Outcome::Failed(format!("concurrency 0 gave {other:?}"))),
    }
    match ctx
        .broker
        .subscribe(SubscribeOptions::new(ctx.name("t"), "g").prefetch(0))
        .await
    {
        Err(Error::Config { setting, .. }) if setting == "prefetch" => Ok(()),
        Err(e) => Err(Outcome::Failed(format!("prefetch 0 gave {e}"))),
        Ok(_) => Err(Outcome::Failed("prefetch 0 was accepted".into())),
    }
}

// ---- middleware: retry, dead-letter queue, idempotency ----

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

async fn undecodable_to_dlq(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("decode");
    let dlq = format!("{topic}.dlq");
    let letters = dead_letters(&ctx);
    letters.prepare(&dlq).await.or_fail("prepare dlq")?;
    let handled = Arc::new(AtomicUsize::new(0));
    let handler = {
        let handled = handled.clone();
        move |Json(n): Json<u64>| {
            let handled = handled.clone();
            async move {
                let _ = n;
                handled.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(())
            }
        }
    };
    let service = ServiceBuilder::new()
        .layer(DeadLetterLayer::new(ctx.broker.clone()))
        .service(switchyard_core::handler_fn(handler));
    let running = spawn(
        &ctx,
        Consumer::new(SubscribeOptions::new(&topic, ctx.name("g")), service),
    )
    .await?;
    let mut msgs: Vec<Message> = (0..5u64).map(|i| Message::json(&i).unwrap()).collect();
    let bad = Message::new(&b"{\"not\": \"a number\"\xff"[..]);
    let bad_id = bad.id.clone();
    msgs.insert(2, bad);
    publish_all(&ctx, &topic, msgs).await?;
    ctx.wait_for(LONG, "5 valid messages handled", || {
        handled.load(Ordering::SeqCst) >= 5
    })
    .await?;
    let mut records = Vec::new();
    for _ in 0..20 {
        records = letters.list(&dlq).await.or_fail("list dlq")?;
        if !records.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = stop(running).await?;
    ensure!(
        records.len() == 1,
        "expected 1 dead letter, found {}",
        records.len()
    );
    let r = &records[0];
    ensure!(
        r.message.id == bad_id,
        "dead letter is {} not {bad_id}",
        r.message.id
    );
    ensure!(r.kind == "decode", "kind {:?}", r.kind);
    ensure!(
        r.error.contains("u64"),
        "the reason should name the target type: {:?}",
        r.error
    );
    ensure!(
        r.original_topic.as_deref() == Some(topic.as_str()),
        "original topic {:?}",
        r.original_topic
    );
    ensure!(
        report.acked == 6 && report.nacked == 0,
        "the bad message is acked once dead-lettered: {report:?}"
    );
    Ok(())
}

async fn poison_and_replay(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("poison");
    let dlq = format!("{topic}.dlq");
    let letters = dead_letters(&ctx);
    letters.prepare(&dlq).await.or_fail("prepare dlq")?;
    let fixed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poison_runs = Arc::new(AtomicUsize::new(0));
    let tally = Tally::default();
    let handler = {
        let (fixed, poison_runs, tally) = (fixed.clone(), poison_runs.clone(), tally.clone());
        move |d: Delivery| {
            let (fixed, poison_runs, tally) = (fixed.clone(), poison_runs.clone(), tally.clone());
            async move {
                if d.payload() == b"poison" {
                    poison_runs.fetch_add(1, Ordering::SeqCst);
                    if !fixed.load(Ordering::SeqCst) {
                        return Err(HandlerError::transient(std::io::Error::other(
                            "payment gateway says no",
                        )));
                    }
                }
                tally.add(d.id());
                Ok(())
            }
        }
    };
    let service = ServiceBuilder::new()
        .layer(DeadLetterLayer::new(ctx.broker.clone()))
        .layer(quick_retry(3).layer())
        .service(switchyard_core::handler_fn(handler));
    let running = spawn(
        &ctx,
        Consumer::new(SubscribeOptions::new(&topic, ctx.name("g")), service).concurrency(8),
    )
    .await?;
    let mut msgs: Vec<Message> = (0..200)
        .map(|i| Message::new(format!("ok-{i}")).with_key(format!("k{}", i % 8)))
        .collect();
    let poison = Message::new("poison").with_key("k3");
    let poison_id = poison.id.clone();
    msgs.insert(50, poison);
    let good: HashSet<String> = msgs
        .iter()
        .filter(|m| m.id != poison_id)
        .map(|m| m.id.clone())
        .collect();
    publish_all(&ctx, &topic, msgs).await?;
    ctx.wait_for(LONG, "the 200 good messages handled", || {
        tally.distinct() >= 200
    })
    .await?;
    ctx.wait_for(LONG, "3 runs of the poison message", || {
        poison_runs.load(Ordering::SeqCst) >= 3
    })
    .await?;
    let mut records = Vec::new();
    for _ in 0..20 {
        records = letters.list(&dlq).await.or_fail("list dlq")?;
        if !records.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        records.len() == 1 && records[0].message.id == poison_id,
        "dead letters: {:?}",
        records.iter().map(|r| &r.message.id).collect::<Vec<_>>()
    );
    let h = &records[0].message.headers;
    ensure!(
        h.get(dead_letter::headers::RETRIES).map(String::as_str) == Some("2"),
        "retries header {:?}",
        h.get(dead_letter::headers::RETRIES)
    );
    ensure!(records[0].kind == "transient", "kind {:?}", records[0].kind);
    ensure!(
        records[0].original_key.as_deref() == Some("k3"),
        "original key {:?}",
        records[0].original_key
    );
    ensure!(
        records[0].original().key.as_deref() == Some("k3"),
        "replay restores the key"
    );
    ensure!(
        poison_runs.load(Ordering::SeqCst) == 3,
        "poison ran {} times, expected 3",
        poison_runs.load(Ordering::SeqCst)
    );
    tally.check_exactly_once(&good, "good messages")?;

    // The handler is fixed; replaying the poison message runs it once more, successfully.
    fixed.store(true, Ordering::SeqCst);
    let ids: HashSet<String> = [poison_id.clone()].into();
    // Back to the failing group where the broker can address one, else to the topic.
    let to = if ctx.caps.delayed_delivery {
        ReplayTo::Group
    } else {
        ReplayTo::Topic
    };
    let replayed = letters
        .clone()
        .to(to)
        .replay(&dlq, &Selection::Ids(ids))
        .await
        .or_fail("replay")?;
    ensure!(
        replayed.replayed == vec![poison_id.clone()],
        "replayed {replayed:?}"
    );
    ctx.wait_for(LONG, "the replayed message handled", || {
        tally.0.lock().unwrap().contains_key(&poison_id)
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop(running).await?;
    ensure!(
        tally.0.lock().unwrap()[&poison_id] == 1,
        "replayed message handled more than once"
    );
    ensure!(
        poison_runs.load(Ordering::SeqCst) == 4,
        "poison ran {} times in all, expected 4",
        poison_runs.load(Ordering::SeqCst)
    );
    let left = letters.list(&dlq).await.or_fail("list dlq")?;
    ensure!(
        left.is_empty(),
        "{} dead letters left after replay",
        left.len()
    );
    Ok(())
}

async fn duplicates_once(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("dups");
    let store = Arc::new(MemoryStore::default());
    let idem = IdempotencyLayer::new(store);
    let runs = Tally::default();
    let running_now: Arc<Mutex<HashSet<String>>> = Arc::default();
    let overlaps = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (runs, running_now, overlaps) = (runs.clone(), running_now.clone(), overlaps.clone());
        move |d: Delivery| {
            let (runs, running_now, overlaps) =
                (runs.clone(), running_now.clone(), overlaps.clone());
            async move {
                if !running_now.lock().unwrap().insert(d.id().to_string()) {
                    overlaps.fetch_add(1, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
                runs.add(d.id());
                running_now.lock().unwrap().remove(d.id());
                Ok::<_, HandlerError>(())
            }
        }
    };
    let service = ServiceBuilder::new()
        .layer(idem.clone())
        .service(switchyard_core::handler_fn(handler));
    let opts = SubscribeOptions::new(&topic, ctx.name("g"));
    let running = spawn(
        &ctx,
        Consumer::new(opts, service).concurrency(16).members(2),
    )
    .await?;
    let twice = Message::new("pay order 42");
    let mut msgs = plain(50, "single");
    // The same message (same id) three times, adjacent so copies are in flight together.
    msgs.insert(10, twice.clone());
    msgs.insert(11, twice.clone());
    msgs.insert(30, twice.clone());
    let want = ids(&msgs);
    publish_all(&ctx, &topic, msgs).await?;
    ctx.wait_for(LONG, "all 51 ids handled and 2 duplicates skipped", || {
        runs.distinct() >= want.len() && idem.skipped() >= 2
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let report = stop(running).await?;
    runs.check_exactly_once(&want, "with idempotency")?;
    ensure!(
        overlaps.load(Ordering::SeqCst) == 0,
        "a duplicate ran while its original was running"
    );
    ensure!(
        idem.skipped() == 2,
        "skipped {} duplicates, expected 2",
        idem.skipped()
    );
    ensure!(report.acked == 53, "all 53 deliveries acked: {report:?}");
    Ok(())
}

/// A stable pseudo-random draw in [0, 1) for (message, run), so runs are reproducible.
fn draw(id: &str, run: usize) -> f64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (id, run).hash(&mut h);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

async fn failure_mix(
    ctx: &Ctx,
    label: &str,
    n: usize,
    permanent_every: usize,
) -> Result<
    (
        Tally,
        HashSet<String>,
        HashSet<String>,
        Vec<DeadLetterRecord>,
    ),
    Outcome,
> {
    let topic = ctx.name(label);
    let dlq = format!("{topic}.dlq");
    let letters = dead_letters(ctx);
    letters.prepare(&dlq).await.or_fail("prepare dlq")?;
    let successes = Tally::default();
    let runs = Tally::default();
    let handler = {
        let (successes, runs) = (successes.clone(), runs.clone());
        move |d: Delivery| {
            let (successes, runs) = (successes.clone(), runs.clone());
            async move {
                let run = {
                    let mut map = runs.0.lock().unwrap();
                    let r = map.entry(d.id().to_string()).or_default();
                    *r += 1;
                    *r
                };
                let n: usize = std::str::from_utf8(d.payload())
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(1);
                if permanent_every > 0 && n % permanent_every == 0 {
                    return Err(HandlerError::permanent(std::io::Error::other(
                        "card declined",
                    )));
                }
                if permanent_every == 0 && draw(d.id(), run) < 0.2 {
                    return Err(HandlerError::transient(std::io::Error::other(
                        "timeout talking to the bank",
                    )));
                }
                successes.add(d.id());
                Ok(())
            }
        }
    };
    let service = ServiceBuilder::new()
        .layer(DeadLetterLayer::new(ctx.broker.clone()))
        .layer(IdempotencyLayer::new(Arc::new(MemoryStore::default())))
        .layer(quick_retry(10).layer())
        .service(switchyard_core::handler_fn(handler));
    let opts = SubscribeOptions::new(&topic, ctx.name("g")).prefetch(64);
    let running = spawn(ctx, Consumer::new(opts, service).concurrency(32).members(4)).await?;
    let msgs: Vec<Message> = (1..=n)
        .map(|i| Message::new(i.to_string()).with_key(format!("c{}", i % 97)))
        .collect();
    let all = ids(&msgs);
    let permanent: HashSet<String> = msgs
        .iter()
        .filter(|m| {
            permanent_every > 0
                && std::str::from_utf8(&m.payload)
                    .unwrap()
                    .parse::<usize>()
                    .unwrap()
                    % permanent_every
                    == 0
        })
        .map(|m| m.id.clone())
        .collect();
    publish_all(ctx, &topic, msgs).await?;
    let expect = n - permanent.len();
    ctx.wait_for(LONG, "every handleable message handled", || {
        successes.distinct() >= expect
    })
    .await?;
    let mut records = Vec::new();
    for _ in 0..30 {
        records = letters.list(&dlq).await.or_fail("list dlq")?;
        if records.len() >= permanent.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop(running).await?;
    Ok((successes, all, permanent, records))
}

async fn transient_20_percent(ctx: Arc<Ctx>) -> Check {
    let (successes, all, _, records) = failure_mix(&ctx, "flaky", 10_000, 0).await?;
    successes.check_exactly_once(&all, "20% transient failures")?;
    ensure!(
        records.is_empty(),
        "{} messages were dead-lettered; expected none",
        records.len()
    );
    Ok(())
}

async fn permanent_1_percent(ctx: Arc<Ctx>) -> Check {
    let (successes, all, permanent, records) = failure_mix(&ctx, "declined", 10_000, 100).await?;
    let handled: HashSet<String> = all.difference(&permanent).cloned().collect();
    successes.check_exactly_once(&handled, "the 99% that succeed")?;
    let dead: HashSet<String> = records.iter().map(|r| r.message.id.clone()).collect();
    ensure!(
        dead == permanent,
        "dead letters differ from the permanent failures: {} vs {}",
        dead.len(),
        permanent.len()
    );
    ensure!(
        records
            .iter()
            .all(|r| r.kind == "permanent" && r.attempts == 1),
        "permanent failures go straight to the DLQ"
    );
    Ok(())
}

async fn retry_tiers(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("tiers");
    let group = ctx.name("g");
    let dlq = format!("{topic}.dlq");
    let letters = dead_letters(&ctx);
    letters.prepare(&dlq).await.or_fail("prepare dlq")?;
    let tiers = RetryTiers::new(
        ctx.broker.clone(),
        [Duration::from_millis(400), Duration::from_millis(800)],
    )
    .or_fail("tiers")?;
    let runs: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let doomed_runs = Arc::new(AtomicUsize::new(0));
    let followers_done: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let handler = {
        let (runs, doomed_runs, followers_done) =
            (runs.clone(), doomed_runs.clone(), followers_done.clone());
        move |d: Delivery| {
            let (runs, doomed_runs, followers_done) =
                (runs.clone(), doomed_runs.clone(), followers_done.clone());
            async move {
                match d.payload() {
                    b"flaky" => {
                        let mut runs = runs.lock().unwrap();
                        runs.push(Instant::now());
                        if runs.len() < 3 {
                            return Err(HandlerError::transient(std::io::Error::other(
                                "try later",
                            )));
                        }
                    }
                    b"doomed" => {
                        doomed_runs.fetch_add(1, Ordering::SeqCst);
                        return Err(HandlerError::transient(std::io::Error::other("never")));
                    }
                    _ => followers_done.lock().unwrap().push(Instant::now()),
                }
                Ok::<_, HandlerError>(())
            }
        }
    };
    let service = ServiceBuilder::new()
        .layer(DeadLetterLayer::new(ctx.broker.clone()))
        .layer(tiers.layer())
        .service(switchyard_core::handler_fn(handler));
    // Another group of the same topic: a retry is for the group that failed, not for it.
    let other = Tally::default();
    let other_handler = {
        let other = other.clone();
        move |d: Delivery| {
            let other = other.clone();
            async move {
                other.add(d.id());
                Ok::<_, HandlerError>(())
            }
        }
    };
    let token = CancellationToken::new();
    let app = App::new(ctx.broker.clone()).consumer(Consumer::handler(
        SubscribeOptions::new(&topic, ctx.name("other")),
        other_handler,
    ));
    let app = tiers.add_consumers(app, SubscribeOptions::new(&topic, &group), service);
    let running = app.start(token.clone()).await.or_fail("start app")?;
    let mut msgs = vec![Message::new("flaky").with_key("customer-1")];
    msgs.extend((0..5).map(|i| Message::new(format!("next-{i}")).with_key("customer-1")));
    msgs.push(Message::new("doomed").with_key("customer-2"));
    let doomed_id = msgs[6].id.clone();
    let all_ids: HashSet<String> = msgs.iter().map(|m| m.id.clone()).collect();
    publish_all(&ctx, &topic, msgs).await?;
    let mut outcome = ctx
        .wait_for(LONG, "the flaky message's third run", || {
            runs.lock().unwrap().len() >= 3
        })
        .await;
    let mut records = Vec::new();
    if outcome.is_ok() {
        for _ in 0..50 {
            records = letters.list(&dlq).await.or_fail("list dlq")?;
            if !records.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Late copies to the other group would show up by now.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    token.cancel();
    if let Err(e) = running.join().await {
        outcome = outcome.and(Err(Outcome::Failed(format!("app: {e}"))));
    }
    outcome?;
    let runs = runs.lock().unwrap();
    let (first_retry, second_retry) = (runs[1] - runs[0], runs[2] - runs[1]);
    ensure!(
        first_retry >= Duration::from_millis(400),
        "tier 0 redelivered after {first_retry:?}, before its 400 ms"
    );
    ensure!(
        second_retry >= Duration::from_millis(800),
        "tier 1 redelivered after {second_retry:?}, before its 800 ms"
    );
    let followers = followers_done.lock().unwrap();
    ensure!(
        followers.len() == 5,
        "{} of 5 same-key followers handled",
        followers.len()
    );
    ensure!(
        followers.iter().all(|t| *t < runs[1]),
        "a retrying message must not hold up the messages behind it"
    );
    // Retries stay in the failing group: the other one handled each message once.
    other.check_exactly_once(&all_ids, "the other group")?;
    ensure!(
        records.len() == 1 && records[0].message.id == doomed_id,
        "after the last tier the message is dead-lettered once: {:?}",
        records.iter().map(|r| &r.message.id).collect::<Vec<_>>()
    );
    let r = &records[0];
    ensure!(
        r.original_topic.as_deref() == Some(topic.as_str())
            && r.original_group.as_deref() == Some(group.as_str())
            && r.attempts == 3
            && doomed_runs.load(Ordering::SeqCst) == 3,
        "dead letter names its origin {:?}/{:?} after {} attempts ({} runs); want {topic}/{group}, 3",
        r.original_topic,
        r.original_group,
        r.attempts,
        doomed_runs.load(Ordering::SeqCst)
    );
    Ok(())
}

async fn subscribe_close_cycles(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("cycles");
    let group = ctx.name("g");
    let mut first = subscribe(&ctx, SubscribeOptions::new(&topic, &group).prefetch(250)).await?;
    let sent = plain(5000, "cycle");
    publish_all(&ctx, &topic, sent.clone()).await?;
    let acked = Tally::default();
    let mut cycles = 0;
    let mut sub = Some(first_take(&mut first, &acked).await?);
    first.close().await.or_fail("close")?;
    while acked.distinct() < sent.len() {
        cycles += 1;
        ensure!(
            cycles < 400,
            "no progress after {cycles} subscribe/close cycles ({} acked)",
            acked.distinct()
        );
        let mut s = subscribe(&ctx, SubscribeOptions::new(&topic, &group).prefetch(250)).await?;
        sub = Some(first_take(&mut s, &acked).await?);
        // Close with half of what it took unacked: those must come back.
        s.close().await.or_fail("close")?;
    }
    drop(sub);
    acked.check_exactly_once(&ids(&sent), "acked over subscribe/close cycles")
}

/// Takes one batch (waiting up to 5 s), acks the first half, returns the rest unacked.
async fn first_take(
    sub: &mut Box<dyn Subscription>,
    acked: &Tally,
) -> Result<Vec<Delivery>, Outcome> {
    let mut buf = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), sub.recv_many(&mut buf, 250)).await {
        Err(_) => return Ok(Vec::new()),
        Ok(r) => {
            r.or_fail("receive")?;
        }
    }
    let half = buf.len().div_ceil(2);
    let rest = buf.split_off(half);
    for d in buf {
        d.ack().await.or_fail("ack")?;
        acked.add(d.id());
    }
    Ok(rest)
}

async fn publishers_and_churn(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("churn");
    let group = ctx.name("g");
    let tally = Tally::default();
    let steady = spawn(
        &ctx,
        Consumer::handler(
            SubscribeOptions::new(&topic, &group),
            counting_handler(tally.clone()),
        )
        .concurrency(16),
    )
    .await?;
    let mut all = HashSet::new();
    let mut publishers = Vec::new();
    for t in 0..10 {
        let msgs: Vec<Message> = (0..1000)
            .map(|i| Message::new(format!("c{t}-{i}")).with_key(format!("k{}", i % 13)))
            .collect();
        all.extend(ids(&msgs));
        let (broker, topic) = (ctx.broker.clone(), topic.clone());
        publishers.push(tokio::spawn(async move {
            for chunk in msgs.chunks(50) {
                broker.publish_batch(&topic, chunk.to_vec()).await?;
            }
            Ok::<_, Error>(())
        }));
    }
    // Meanwhile, members join and leave the group, some with work in hand.
    for _ in 0..5 {
        let extra = spawn(
            &ctx,
            Consumer::handler(
                SubscribeOptions::new(&topic, &group),
                counting_handler(tally.clone()),
            )
            .concurrency(4),
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop(extra).await?;
    }
    for p in publishers {
        p.await.or_fail("publisher task")?.or_fail("publish")?;
    }
    ctx.wait_for(LONG, "all 10,000 messages handled", || {
        tally.distinct() >= all.len()
    })
    .await?;
    stop(steady).await?;
    let map = tally.0.lock().unwrap();
    let missing = all.iter().filter(|id| !map.contains_key(*id)).count();
    ensure!(missing == 0, "{missing} messages lost");
    Ok(())
}

/// Per-key order across hand-overs: members join and leave a group while keyed
/// messages are published and a backlog sits in the members' prefetch, so partitions
/// move with delivered, unhandled messages in hand. Every key's messages must be handled
/// in publish order; a redelivery of one already handled is allowed (at least once), a
/// message handled before one published earlier is not.
async fn order_through_membership_changes(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("joinorder");
    let group = ctx.name("g");
    let (keys, per_key) = (40usize, 120usize);
    #[derive(Default)]
    struct Track {
        /// Highest sequence number handled per key.
        last: HashMap<String, i64>,
        violations: Vec<String>,
        handled: HashSet<String>,
    }
    let track: Arc<Mutex<Track>> = Arc::default();
    let handler = {
        let track = track.clone();
        move |d: Delivery| {
            let track = track.clone();
            async move {
                let (key, seq) = key_and_seq(&d);
                {
                    let mut t = track.lock().unwrap();
                    let prev = t.last.get(&key).copied().unwrap_or(-1);
                    // seq <= prev: handled again (redelivery), harmless for order.
                    if seq > prev + 1 {
                        let v = format!("{key}: {seq} handled when {} was due", prev + 1);
                        t.violations.push(v);
                    }
                    if seq > prev {
                        t.last.insert(key, seq);
                    }
                    t.handled.insert(d.id().to_string());
                }
                // Slow enough that a backlog fills every member's prefetch.
                tokio::time::sleep(Duration::from_millis(2)).await;
                Ok::<_, HandlerError>(())
            }
        }
    };
    let member = |concurrency: usize| {
        Consumer::handler(
            SubscribeOptions::new(&topic, &group).prefetch(16),
            handler.clone(),
        )
        .concurrency(concurrency)
    };
    let first = spawn(&ctx, member(4)).await?;
    let sent = keyed_in_order(keys, per_key);
    let all = ids(&sent);
    let publisher = {
        let (broker, topic, sent) = (ctx.broker.clone(), topic.clone(), sent.clone());
        tokio::spawn(async move {
            // Paced, so hand-overs happen while new messages keep arriving.
            for chunk in sent.chunks(100) {
                broker.publish_batch(&topic, chunk.to_vec()).await?;
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            Ok::<_, Error>(())
        })
    };
    // Members join and leave while publishing goes on: partitions move to, away from
    // and back between members, with delivered, unhandled messages in hand.
    let mut extras = std::collections::VecDeque::new();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        extras.push_back(spawn(&ctx, member(4)).await?);
        if extras.len() > 2 {
            stop(extras.pop_front().expect("three running")).await?;
        }
    }
    publisher
        .await
        .or_fail("publisher task")?
        .or_fail("publish")?;
    ctx.wait_for(LONG, "every keyed message handled", || {
        track.lock().unwrap().handled.len() >= all.len()
    })
    .await?;
    stop(first).await?;
    for running in extras {
        stop(running).await?;
    }
    let t = track.lock().unwrap();
    ensure!(
        t.violations.is_empty(),
        "{} order violations, first: {:?}",
        t.violations.len(),
        t.violations.first()
    );
    let missing = all.iter().filter(|id| !t.handled.contains(*id)).count();
    ensure!(missing == 0, "{missing} messages lost");
    Ok(())
}

async fn large_message(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("large");
    let mut sub = subscribe(&ctx, SubscribeOptions::new(&topic, ctx.name("g"))).await?;
    let payload: Vec<u8> = (0..(1 << 20))
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let big = Message::new(payload.clone()).with_key("big");
    let small = Message::new("after the big one");
    match ctx.caps.max_message_size {
        Some(limit) if limit < payload.len() => {
            match ctx.broker.publish(&topic, big).await {
                Err(Error::MessageTooLarge { size, limit: l, .. }) => {
                    ensure!(
                        size == payload.len() && l == limit,
                        "size error reports {size} > {l}"
                    );
                }
                other => {
                    return Err(Outcome::Failed(format!(
                        "a message over the {limit}-byte limit gave {other:?}"
                    )))
                }
            }
            // The refusal poisons nothing: the next message goes through.
            publish_all(&ctx, &topic, vec![small.clone()]).await?;
            let got = recv_n(&mut sub, 1, true).await?;
            ensure!(
                got[0].id() == small.id,
                "the message after the refused one did not arrive"
            );
        }
        _ => {
            publish_all(&ctx, &topic, vec![big.clone(), small.clone()]).await?;
            let got = recv_n(&mut sub, 2, true).await?;
            let back = got
                .iter()
                .find(|d| d.id() == big.id)
                .ok_or_else(|| Outcome::Failed("1 MiB message lost".into()))?;
            ensure!(
                back.payload() == payload.as_slice(),
                "1 MiB payload differs after the round trip"
            );
        }
    }
    sub.close().await.or_fail("close")
}

async fn load_100k(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("load");
    let n = 100_000;
    let successes = Tally::default();
    let failures = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (successes, failures) = (successes.clone(), failures.clone());
        move |d: Delivery| {
            let (successes, failures) = (successes.clone(), failures.clone());
            async move {
                // 20% of runs fail; the redelivery (attempt + 1) draws again.
                if draw(d.id(), d.attempt() as usize) < 0.2 {
                    failures.fetch_add(1, Ordering::Relaxed);
                    return Err(HandlerError::transient(std::io::Error::other(
                        "flaky downstream",
                    )));
                }
                successes.add(d.id());
                Ok(())
            }
        }
    };
    let opts = SubscribeOptions::new(&topic, ctx.name("g")).prefetch(512);
    let consumer = Consumer::handler(opts, handler)
        .concurrency(64)
        .members(4)
        .redelivery_backoff(Duration::from_micros(100), Duration::from_millis(5));
    let running = spawn(&ctx, consumer).await?;
    let sent: Vec<Message> = (0..n)
        .map(|i| Message::new(format!("load-{i}")).with_key(format!("k{}", i % 256)))
        .collect();
    let want = ids(&sent);
    publish_all(&ctx, &topic, sent).await?;
    ctx.wait_for(Duration::from_secs(150), "100,000 messages handled", || {
        successes.distinct() >= n
    })
    .await?;
    let report = stop(running).await?;
    successes.check_exactly_once(&want, "100k with 20% failures")?;
    let failed = failures.load(Ordering::Relaxed) as f64
        / (n as f64 + failures.load(Ordering::Relaxed) as f64);
    ensure!(
        (0.15..0.25).contains(&failed),
        "failure share {failed:.3} is not near 20%: the scenario did not exercise redelivery"
    );
    ensure!(report.acked as usize == n, "acked {} of {n}", report.acked);
    Ok(())
}

/// What the handler saw: the current trace context and the delivery's traceparent.
type TraceSeen = Arc<Mutex<Vec<(Option<TraceContext>, Option<String>)>>>;

async fn trace_context(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("trace");
    let onward = ctx.name("trace-onward");
    let seen: TraceSeen = Arc::default();
    let handler = {
        let (seen, broker, onward) = (seen.clone(), ctx.broker.clone(), onward.clone());
        move |d: Delivery| {
            let (seen, broker, onward) = (seen.clone(), broker.clone(), onward.clone());
            async move {
                let current = TraceContext::current();
                // A message published while handling continues the same trace.
                broker.publish(&onward, Message::new("onward")).await?;
                seen.lock()
                    .unwrap()
                    .push((current, d.message().headers.get(TRACEPARENT).cloned()));
                Ok::<_, HandlerError>(())
            }
        }
    };
    let mut onward_sub = subscribe(&ctx, SubscribeOptions::new(&onward, ctx.name("g"))).await?;
    let running = spawn(
        &ctx,
        Consumer::handler(SubscribeOptions::new(&topic, ctx.name("g")), handler),
    )
    .await?;
    publish_all(&ctx, &topic, vec![Message::new("traced")]).await?;
    let onward_msg = recv_n(&mut onward_sub, 1, true).await?.remove(0);
    stop(running).await?;
    onward_sub.close().await.or_fail("close")?;
    let seen = seen.lock().unwrap();
    let (current, header) = seen
        .first()
        .cloned()
        .ok_or_else(|| Outcome::Failed("handler never ran".into()))?;
    let sent = header
        .as_deref()
        .and_then(TraceContext::parse)
        .ok_or_else(|| Outcome::Failed(format!("no valid traceparent arrived: {header:?}")))?;
    let current =
        current.ok_or_else(|| Outcome::Failed("no trace context while the handler ran".into()))?;
    ensure!(
        current.trace_id == sent.trace_id,
        "the handler's trace {current:?} is not the producer's {sent:?}"
    );
    ensure!(
        current.span_id != sent.span_id,
        "the handler runs in its own span"
    );
    let next = onward_msg
        .message()
        .headers
        .get(TRACEPARENT)
        .and_then(|v| TraceContext::parse(v))
        .ok_or_else(|| Outcome::Failed("the onward message has no traceparent".into()))?;
    ensure!(
        next.trace_id == sent.trace_id,
        "a message published by the handler starts a new trace"
    );
    Ok(())
}
