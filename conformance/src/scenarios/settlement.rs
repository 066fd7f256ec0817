//! Settlement: nacks redeliver, unacked messages come back, a panicking handler
//! counts as a failure, a second settlement and bad input are typed errors.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_core::{Consumer, Delivery, Error, HandlerError, Message, Nack, SubscribeOptions};
use tokio_util::sync::CancellationToken;

use super::{
    expect_nothing, ids, plain, publish_all, recv_n, spawn, stop, subscribe, ExactlyOnce, Tally,
    LONG,
};
use crate::kit::{ensure, Check, Ctx, OrFail, Outcome};

pub(super) async fn nack_redelivers(ctx: Arc<Ctx>) -> Check {
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
                    .push(d.delivery_count());
                if d.delivery_count() < 3 {
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

pub(super) async fn unacked_returned(ctx: Arc<Ctx>) -> Check {
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
    if ctx.part_needs(
        ctx.caps.durable_delivery_counts,
        "delivery counts that survive a new subscription (the count check)",
    ) {
        ensure!(
            again.iter().all(|d| d.delivery_count() >= 2),
            "redelivered messages should have a delivery count >= 2"
        );
    }
    second.close().await.or_fail("close")
}

pub(super) async fn panic_contained(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("panic");
    let tally = Tally::default();
    let handler = {
        let tally = tally.clone();
        move |d: Delivery| {
            let tally = tally.clone();
            async move {
                let n: usize = std::str::from_utf8(d.payload()).unwrap().parse().unwrap();
                if n.is_multiple_of(3) && d.delivery_count() == 1 {
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

pub(super) async fn double_ack(ctx: Arc<Ctx>) -> Check {
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

pub(super) async fn bad_input(ctx: Arc<Ctx>) -> Check {
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
