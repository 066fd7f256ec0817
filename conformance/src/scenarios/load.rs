//! Load: many messages with failure mixes, and 100k messages over four members.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchyard_core::{Consumer, Delivery, FailureKind, HandlerError, Message, SubscribeOptions};
use switchyard_middleware::{
    DeadLetterLayer, DeadLetterRecord, IdempotencyLayer, MemoryStore, RetryLayer,
};
use tower::ServiceBuilder;

use super::{dead_letters, ids, publish_all, quick_retry, spawn, stop, ExactlyOnce, Tally};
use crate::kit::{ensure, Check, Ctx, OrFail, Outcome};

/// How long a load scenario waits without a single message handled before it fails:
/// longer than any redelivery pause or member hand-over, far shorter than a stall.
const STALL: Duration = Duration::from_secs(30);

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
                let run = runs.add(d.id());
                let n: usize = std::str::from_utf8(d.payload())
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(1);
                if permanent_every > 0 && n.is_multiple_of(permanent_every) {
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
        .layer(RetryLayer::new(quick_retry(10)))
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
    ctx.wait_for_count(STALL, "handleable messages handled", expect, || {
        successes.distinct()
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

pub(super) async fn transient_20_percent(ctx: Arc<Ctx>) -> Check {
    let (successes, all, _, records) = failure_mix(&ctx, "flaky", 10_000, 0).await?;
    successes.check_exactly_once(&all, "20% transient failures")?;
    ensure!(
        records.is_empty(),
        "{} messages were dead-lettered; expected none",
        records.len()
    );
    Ok(())
}

pub(super) async fn permanent_1_percent(ctx: Arc<Ctx>) -> Check {
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
            .all(|r| r.kind == Some(FailureKind::Permanent) && r.deliveries == 1),
        "permanent failures go straight to the DLQ"
    );
    Ok(())
}

pub(super) async fn load_100k(ctx: Arc<Ctx>) -> Check {
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
                if draw(d.id(), d.delivery_count() as usize) < 0.2 {
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
    ctx.wait_for_count(STALL, "messages handled", n, || successes.distinct())
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
