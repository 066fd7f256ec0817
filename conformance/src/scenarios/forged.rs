//! Headers a producer must not be able to forge: the reserved names that carry a
//! message's id and key, and the retry-tier headers that steer a redelivery.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_core::{App, Delivery, Error, HandlerError, Message, StartFrom, SubscribeOptions};
use switchyard_middleware::retry_tiers::headers::{DUE, ORIGINAL_TOPIC, TIER};
use switchyard_middleware::{DeadLetterLayer, RetryTiers, RetryTiersLayer};
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;

use super::{dead_letters, expect_nothing, publish_all, recv_n, subscribe, LONG};
use crate::kit::{ensure, Check, Ctx, OrFail, Outcome};

/// A reserved header name is refused on publish, alone or in a batch, before anything of
/// the batch goes out; so no header can stand in for the id the backend carries.
pub(super) async fn reserved_headers_refused(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("reserved");
    let mut sub = subscribe(
        &ctx,
        SubscribeOptions::new(&topic, ctx.name("g")).start(StartFrom::Earliest),
    )
    .await?;
    for name in ["switchyard-id", "x-switchyard-key", "Switchyard-Id"] {
        let forged = Message::new("forged").with_header(name, "chosen-id");
        match ctx.broker.publish(&topic, forged).await {
            Err(Error::Config { .. }) => {}
            other => {
                return Err(Outcome::Failed(format!(
                    "publishing a {name:?} header: want a configuration error, got {other:?}"
                )))
            }
        }
        let batch = vec![
            Message::new("fine"),
            Message::new("forged").with_header(name, "chosen-id"),
        ];
        ensure!(
            matches!(
                ctx.broker.publish_batch(&topic, batch).await,
                Err(Error::Config { .. })
            ),
            "a batch holding a {name:?} header must be refused whole"
        );
    }
    let good = Message::new("good").with_header("source", "web");
    let id = good.id.clone();
    publish_all(&ctx, &topic, vec![good]).await?;
    let got = recv_n(&mut sub, 1, true).await?;
    ensure!(
        got[0].id() == id
            && got[0].message().headers.get("source").map(String::as_str) == Some("web"),
        "got {:?} with {:?}, want {id} with source=web",
        got[0].id(),
        got[0].message().headers
    );
    expect_nothing(&mut sub, Duration::from_millis(500)).await?;
    sub.close().await.or_fail("close")?;
    Ok(())
}

/// Retry-tier headers written by a producer are not believed: a due time decades away
/// does not park the handler, a tier count does not skip tiers, and an origin header does
/// not send the retry to another topic. The first delivery arrives without them, its
/// failure goes to the first tier, and the retry comes back to the same group. On
/// backends with tier topics, a message written straight into a tier topic waits at most
/// that tier's delay.
pub(super) async fn forged_retry_headers_ignored(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("forged");
    let group = ctx.name("g");
    let elsewhere = ctx.name("elsewhere");
    let letters = dead_letters(&ctx);
    let dlq = format!("{topic}.dlq");
    letters.prepare(&dlq).await.or_fail("prepare dlq")?;
    let tiers =
        RetryTiers::new(ctx.broker.clone(), [Duration::from_millis(300)]).or_fail("tiers")?;
    let tier_topic = tiers.tier_topic(&topic, &group, 0);
    type Seen = Arc<Mutex<Vec<(String, u32, Vec<String>)>>>;
    let seen: Seen = Arc::default();
    let handler = {
        let seen = seen.clone();
        move |d: Delivery| {
            let seen = seen.clone();
            async move {
                let payload = String::from_utf8_lossy(d.payload()).into_owned();
                let retry_headers: Vec<String> = d
                    .message()
                    .headers
                    .iter()
                    .filter(|(k, _)| k.starts_with("x-retry-"))
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                let first = {
                    let mut seen = seen.lock().unwrap();
                    let first = !seen.iter().any(|(p, _, _)| *p == payload);
                    seen.push((payload.clone(), d.delivery_count(), retry_headers));
                    first
                };
                if payload == "forged" && first {
                    return Err(HandlerError::transient(std::io::Error::other("once")));
                }
                Ok::<_, HandlerError>(())
            }
        }
    };
    let service = ServiceBuilder::new()
        .layer(DeadLetterLayer::new(ctx.broker.clone()))
        .layer(RetryTiersLayer::new(tiers.clone()))
        .service(switchyard_core::handler_fn(handler));
    let token = CancellationToken::new();
    let app = tiers.add_consumers(
        App::new(ctx.broker.clone()),
        SubscribeOptions::new(&topic, &group),
        service,
    );
    let running = app.start(token.clone()).await.or_fail("start app")?;
    let forge = |m: Message| {
        m.with_header(TIER, "1")
            .with_header(DUE, u64::MAX.to_string())
            .with_header(ORIGINAL_TOPIC, elsewhere.clone())
    };
    let mut expected = vec!["forged".to_string()];
    publish_all(
        &ctx,
        &topic,
        vec![forge(Message::new("forged").with_key("k"))],
    )
    .await?;
    if !tiers.is_native() {
        publish_all(&ctx, &tier_topic, vec![forge(Message::new("in-tier"))]).await?;
        expected.push("in-tier".to_string());
    }
    let done = || {
        let seen = seen.lock().unwrap();
        let forged_runs = seen.iter().filter(|(p, _, _)| p == "forged").count();
        forged_runs >= 2 && expected.iter().all(|e| seen.iter().any(|(p, _, _)| p == e))
    };
    let mut outcome = ctx
        .wait_for(
            LONG,
            "the forged message's retry and the tier message",
            done,
        )
        .await;
    let records = if outcome.is_ok() {
        letters.list(&dlq).await.or_fail("list dlq")?
    } else {
        Vec::new()
    };
    token.cancel();
    if let Err(e) = running.join().await {
        outcome = outcome.and(Err(Outcome::Failed(format!("app: {e}"))));
    }
    let seen = seen.lock().unwrap().clone();
    outcome.map_err(|o| match o {
        Outcome::Failed(why) => Outcome::Failed(format!("{why}; handler saw {seen:?}")),
        other => other,
    })?;
    let forged: Vec<_> = seen.iter().filter(|(p, _, _)| p == "forged").collect();
    ensure!(
        forged[0].1 == 1 && forged[0].2.is_empty(),
        "the first delivery must carry no retry headers and be attempt 1: {:?}",
        forged[0]
    );
    ensure!(
        forged[1].1 == 2 && forged[1].2.iter().any(|h| h == &format!("{TIER}=1")),
        "the retry comes back through tier 0 as attempt 2: {:?}",
        forged[1]
    );
    ensure!(
        forged[1].2.iter().all(|h| !h.contains(&elsewhere)),
        "the retry's origin is its own topic: {:?}",
        forged[1]
    );
    ensure!(
        records.is_empty(),
        "nothing dead-lettered: {:?}",
        records.iter().map(|r| &r.message.id).collect::<Vec<_>>()
    );
    Ok(())
}
