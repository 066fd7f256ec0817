//! Delivery guarantees: under `Guarantee::AtMostOnce` a delivery is acked before its
//! handler runs, and a failing handler's message is never handed out again. (The
//! at-least-once side, a failure redelivered, is `nack_redelivers_with_rising_attempt`.)

use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_core::{Consumer, Delivery, Guarantee, HandlerError, Message, SubscribeOptions};

use super::{publish_all, recv_n, spawn, stop, subscribe, LONG};
use crate::kit::{ensure, Check, Ctx, OrFail};

pub(super) async fn at_most_once(ctx: Arc<Ctx>) -> Check {
    ctx.require(ctx.caps.at_most_once, "at-most-once delivery")?;
    let topic = ctx.name("amo");
    let group = ctx.name("g");
    // (payload, attempt, already settled when the handler started)
    let seen: Arc<Mutex<Vec<(String, u32, bool)>>> = Arc::default();
    let handler = {
        let seen = seen.clone();
        move |d: Delivery| {
            let seen = seen.clone();
            async move {
                let payload = String::from_utf8_lossy(d.payload()).into_owned();
                let failing = payload.starts_with("fail");
                seen.lock()
                    .unwrap()
                    .push((payload, d.delivery_count(), d.is_settled()));
                if failing {
                    return Err(HandlerError::transient(std::io::Error::other("fails")));
                }
                Ok(())
            }
        }
    };
    let consumer = Consumer::handler(SubscribeOptions::new(&topic, &group), handler)
        .guarantee(Guarantee::AtMostOnce)
        .redelivery_backoff(Duration::from_millis(1), Duration::from_millis(10));
    let running = spawn(&ctx, consumer).await?;
    // Each failing message is followed by one with its key: a redelivery would come
    // before it.
    let sent: Vec<Message> = (0..8)
        .flat_map(|i| {
            [
                Message::new(format!("fail{i}")).with_key(format!("k{i}")),
                Message::new(format!("ok{i}")).with_key(format!("k{i}")),
            ]
        })
        .collect();
    publish_all(&ctx, &topic, sent.clone()).await?;
    ctx.wait_for(LONG, "every message to be handled", || {
        seen.lock().unwrap().len() >= sent.len()
    })
    .await?;
    let report = stop(running).await?;
    {
        let seen = seen.lock().unwrap();
        ensure!(
            seen.len() == sent.len(),
            "{} handler runs for {} messages: a failure was redelivered: {seen:?}",
            seen.len(),
            sent.len()
        );
        ensure!(
            seen.iter()
                .all(|(_, attempt, settled)| *attempt == 1 && *settled),
            "every run is a first attempt of an already acked delivery: {seen:?}"
        );
    }
    ensure!(
        report.acked == sent.len() as u64 && report.nacked == 0,
        "report {report:?}"
    );
    // A later member of the group gets nothing owed: the next is a probe published now.
    let mut later = subscribe(&ctx, SubscribeOptions::new(&topic, &group)).await?;
    publish_all(
        &ctx,
        &topic,
        (0..8)
            .map(|i| Message::new("probe").with_key(format!("k{i}")))
            .collect(),
    )
    .await?;
    let got = recv_n(&mut later, 8, true).await?;
    later.close().await.or_fail("close")?;
    let stray: Vec<&[u8]> = got
        .iter()
        .map(|d| d.payload())
        .filter(|p| *p != b"probe")
        .collect();
    ensure!(
        stray.is_empty(),
        "messages acked on receipt came back: {stray:?}"
    );
    Ok(())
}
