//! Lifecycle: graceful and deadline-bound shutdown, subscribe/close cycles and member
//! churn without loss.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchyard_core::{
    Consumer, Delivery, Error, HandlerError, Message, SubscribeOptions, Subscription,
};
use tokio_util::sync::CancellationToken;

use super::{
    expect_nothing, ids, plain, publish_all, spawn, stop, subscribe, ExactlyOnce, Tally, LONG,
};
use crate::kit::{ensure, Check, Ctx, OrFail, Outcome};

pub(super) async fn graceful_shutdown(ctx: Arc<Ctx>) -> Check {
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

pub(super) async fn shutdown_deadline(ctx: Arc<Ctx>) -> Check {
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
        Consumer::handler(SubscribeOptions::new(&topic, &group), tally.handler()),
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

pub(super) async fn subscribe_close_cycles(ctx: Arc<Ctx>) -> Check {
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

pub(super) async fn publishers_and_churn(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("churn");
    let group = ctx.name("g");
    let tally = Tally::default();
    let steady = spawn(
        &ctx,
        Consumer::handler(SubscribeOptions::new(&topic, &group), tally.handler()).concurrency(16),
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
            Consumer::handler(SubscribeOptions::new(&topic, &group), tally.handler())
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
    let missing = tally.missing(&all);
    ensure!(missing == 0, "{missing} messages lost");
    Ok(())
}
