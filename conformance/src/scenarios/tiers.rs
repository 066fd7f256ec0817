//! Retry tiers: a failed message waits out its tier's delay on the tier's topic without
//! holding up the others, and comes back to the group that failed it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard_core::{App, Consumer, Delivery, HandlerError, Message, SubscribeOptions};
use switchyard_middleware::{DeadLetterLayer, RetryTiers, RetryTiersLayer};
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;

use super::{dead_letters, publish_all, ExactlyOnce, Tally, LONG};
use crate::kit::{ensure, Check, Ctx, OrFail, Outcome};

pub(super) async fn retry_tiers(ctx: Arc<Ctx>) -> Check {
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
        .layer(RetryTiersLayer::new(tiers.clone()))
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
            && r.deliveries == 3
            && doomed_runs.load(Ordering::SeqCst) == 3,
        "dead letter names its origin {:?}/{:?} after {} deliveries ({} runs); want {topic}/{group}, 3",
        r.original_topic,
        r.original_group,
        r.deliveries,
        doomed_runs.load(Ordering::SeqCst)
    );
    Ok(())
}
