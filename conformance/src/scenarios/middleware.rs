//! Middleware: tower layers, dead-letter queue, retry and idempotency against a real
//! broker.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_core::{
    Consumer, Delivery, FailureKind, HandlerError, Json, Message, SubscribeOptions,
};
use switchyard_middleware::dead_letter::{self, ReplayTo};
use switchyard_middleware::{
    DeadLetterLayer, IdempotencyLayer, InspectLayer, MemoryStore, RetryLayer, Selection,
};
use tower::ServiceBuilder;

use super::{
    dead_letters, ids, plain, publish_all, quick_retry, spawn, stop, ExactlyOnce, Tally, LONG,
};
use crate::kit::{ensure, Check, Ctx, OrFail};

pub(super) async fn tower_layers(ctx: Arc<Ctx>) -> Check {
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
                if d.delivery_count() == 1 && d.payload() == b"fail-once" {
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

pub(super) async fn undecodable_to_dlq(ctx: Arc<Ctx>) -> Check {
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
    ensure!(r.kind == Some(FailureKind::Decode), "kind {:?}", r.kind);
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

pub(super) async fn poison_and_replay(ctx: Arc<Ctx>) -> Check {
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
        .layer(RetryLayer::new(quick_retry(3)))
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
    ensure!(
        records[0].kind == Some(FailureKind::Transient),
        "kind {:?}",
        records[0].kind
    );
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
        tally.count(&poison_id) > 0
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop(running).await?;
    ensure!(
        tally.count(&poison_id) == 1,
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

pub(super) async fn duplicates_once(ctx: Arc<Ctx>) -> Check {
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
