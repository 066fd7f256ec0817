//! Dead-letter replay: each selection replays exactly the letters it names, once, to the
//! group that failed them where the broker can address one group (else to the topic),
//! and a letter replayed after a kept one is not read again.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use switchyard_core::{Error, Message, SubscribeOptions};
use switchyard_middleware::dead_letter::{headers, ReplayTo};
use switchyard_middleware::{DeadLetterAdmin, Selection};

use super::{expect_nothing, recv_n, subscribe};
use crate::kit::{ensure, Check, Ctx, OrFail};

const LETTERS: usize = 10;

/// 2001-09-09T01:00:00Z, the first letter's failure time; letter `i` failed `i` minutes on.
const BASE_SECS: u64 = 999_997_200;

fn failed_at(i: usize) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(BASE_SECS + 60 * i as u64)
}

/// Readers that wait no longer than the broker needs to hand out what it holds: every
/// list or replay on Kafka is a group join plus this wait.
fn reader(ctx: &Ctx) -> DeadLetterAdmin {
    let idle = match ctx.broker.backend() {
        "memory" => 300,
        "kafka" => 2000,
        _ => 1000,
    };
    DeadLetterAdmin::new(ctx.broker.clone()).idle(Duration::from_millis(idle))
}

fn letter(topic: &str, group: &str, i: usize) -> Message {
    Message::new(format!("letter-{i}"))
        .with_header(headers::ERROR, "handler said no")
        .with_header(headers::ERROR_KIND, "permanent")
        .with_header(headers::DELIVERIES, "1")
        .with_header(headers::ORIGINAL_TOPIC, topic)
        .with_header(headers::ORIGINAL_GROUP, group)
        .with_header(headers::ORIGINAL_KEY, format!("k{i}"))
        .with_header(headers::LAST_FAILURE, format!("2001-09-09T01:{i:02}:00Z"))
}

/// `Ids`, then `FailedBetween`, then `All`: each replays exactly the letters it selects
/// that are still there; the letter replayed first sits after a kept one in its log, so
/// on Kafka it would be read again if kept letters were left unsettled. Listing in
/// between shows what is left; every letter reaches its group once, with its key.
pub(super) async fn selections_replay_each_letter_once(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("replay");
    let dlq = format!("{topic}.dlq");
    let (group, bystander) = (ctx.name("g"), ctx.name("h"));
    // Where one group can be addressed, replay goes to it alone; elsewhere to the topic.
    let to = if ctx.caps.delayed_delivery {
        ReplayTo::Group
    } else {
        ReplayTo::Topic
    };
    let letters = reader(&ctx).to(to);
    if to == ReplayTo::Topic {
        let refused = reader(&ctx)
            .to(ReplayTo::Group)
            .replay(&dlq, &Selection::All)
            .await;
        ensure!(
            matches!(&refused, Err(Error::Unsupported { what, .. }) if what.contains("ReplayTo::Topic")),
            "replay to one group where the broker cannot address one: {refused:?}"
        );
    }
    let mut failing = subscribe(&ctx, SubscribeOptions::new(&topic, &group)).await?;
    let mut other = match to {
        ReplayTo::Group => Some(subscribe(&ctx, SubscribeOptions::new(&topic, &bystander)).await?),
        _ => None,
    };
    if !ctx.caps.replay {
        letters.prepare(&dlq).await.or_fail("prepare dlq")?;
    }
    let mut ids = Vec::new();
    let mut logs: BTreeMap<Option<i32>, Vec<(i64, usize)>> = BTreeMap::new();
    for i in 0..LETTERS {
        let r = ctx
            .broker
            .publish(&dlq, letter(&topic, &group, i))
            .await
            .or_fail("publish a dead letter")?;
        logs.entry(r.partition)
            .or_default()
            .push((r.offset.unwrap_or(i as i64), i));
        ids.push(r.id);
    }
    // The last letter of the fullest log: every other letter there stays at first.
    let busiest = logs.values().max_by_key(|l| l.len()).expect("letters");
    ensure!(busiest.len() >= 2, "no log holds two of {LETTERS} letters");
    let late = busiest.iter().max().expect("letters").1;

    let first = letters
        .replay(&dlq, &Selection::Ids([ids[late].clone()].into()))
        .await
        .or_fail("replay by id")?;
    ensure!(
        first.replayed == vec![ids[late].clone()] && first.error.is_none(),
        "replaying letter {late} by id: {first:?}"
    );

    // A time window around that letter: it must not come back.
    let (lo, hi) = (late.saturating_sub(2), (late + 2).min(LETTERS));
    let by_time: HashSet<usize> = (lo..hi).filter(|&i| i != late).collect();
    let second = letters
        .replay(
            &dlq,
            &Selection::FailedBetween(failed_at(lo), failed_at(hi)),
        )
        .await
        .or_fail("replay by failure time")?;
    let got: HashSet<&String> = second.replayed.iter().collect();
    let want: HashSet<&String> = by_time.iter().map(|&i| &ids[i]).collect();
    ensure!(
        got == want && second.replayed.len() == want.len(),
        "replaying letters failed in [{lo}, {hi}) (letter {late} was replayed before): got {:?}, want {want:?}",
        second.replayed
    );

    let left: Vec<usize> = (0..LETTERS)
        .filter(|i| *i != late && !by_time.contains(i))
        .collect();
    let listed = letters.list(&dlq).await.or_fail("list dlq")?;
    let listed_ids: Vec<&String> = listed.iter().map(|r| &r.message.id).collect();
    let listed_set: HashSet<&String> = listed_ids.iter().copied().collect();
    let want: HashSet<&String> = left.iter().map(|&i| &ids[i]).collect();
    ensure!(
        listed_set == want && listed_ids.len() == want.len(),
        "listed after two replays: {listed_ids:?}, want the {} never replayed: {want:?}",
        want.len()
    );

    let third = letters
        .replay(&dlq, &Selection::All)
        .await
        .or_fail("replay all")?;
    let got: HashSet<&String> = third.replayed.iter().collect();
    ensure!(
        got == want && third.replayed.len() == want.len() && third.kept == 0,
        "replaying all that is left: {third:?}, want {want:?}"
    );

    // Every letter reached the failing group once, with its key back.
    let back = recv_n(&mut failing, LETTERS, true).await?;
    for d in &back {
        let i = ids.iter().position(|id| id == d.id());
        ensure!(
            i.is_some_and(|i| d.key() == Some(format!("k{i}").as_str())),
            "replayed {} with key {:?}",
            d.id(),
            d.key()
        );
    }
    let distinct: HashSet<&str> = back.iter().map(|d| d.id()).collect();
    ensure!(
        distinct.len() == LETTERS,
        "{} of {LETTERS} letters came back",
        distinct.len()
    );
    expect_nothing(&mut failing, Duration::from_millis(500)).await?;
    failing.close().await.or_fail("close")?;
    if let Some(mut other) = other.take() {
        // The other group handled these messages before; replay is not for it.
        expect_nothing(&mut other, Duration::from_millis(300)).await?;
        other.close().await.or_fail("close")?;
    }
    Ok(())
}
