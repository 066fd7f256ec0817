//! Delivery: bytes arrive as sent, to every group, shared within a group, on the
//! right topic, from late groups and concurrent publishers, at any size.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchyard_core::backend::stamp;
use switchyard_core::{
    Consumer, Delivery, Error, HandlerError, Message, StartFrom, SubscribeOptions,
};

use super::{
    expect_nothing, ids, plain, publish_all, recv_n, spawn, stop, subscribe, ExactlyOnce, Tally,
    LONG,
};
use crate::kit::{ensure, Check, Ctx, OrFail, Outcome};

pub(super) async fn roundtrip_bytes_exact(ctx: Arc<Ctx>) -> Check {
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
            stamp(&mut m);
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
            d.delivery_count() == 1,
            "first delivery has attempt {}",
            d.delivery_count()
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

pub(super) async fn fanout_three_groups(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("fanout");
    let tallies: Vec<Tally> = (0..3).map(|_| Tally::default()).collect();
    let mut running = Vec::new();
    for (i, tally) in tallies.iter().enumerate() {
        let opts = SubscribeOptions::new(&topic, ctx.name(&format!("group{i}")));
        running.push(spawn(&ctx, Consumer::handler(opts, tally.handler())).await?);
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

pub(super) async fn competing_consumers(ctx: Arc<Ctx>) -> Check {
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

pub(super) async fn late_group(ctx: Arc<Ctx>) -> Check {
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
    let mut earliest = if ctx.part_needs(ctx.caps.replay, "replay (the earliest-start group)") {
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

pub(super) async fn topics_isolated(ctx: Arc<Ctx>) -> Check {
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

pub(super) async fn concurrent_publishers(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("manypub");
    let tally = Tally::default();
    let running = spawn(
        &ctx,
        Consumer::handler(
            SubscribeOptions::new(&topic, ctx.name("g")),
            tally.handler(),
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

pub(super) async fn large_message(ctx: Arc<Ctx>) -> Check {
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
