//! Ordering: one message per key in flight, in publish order, also while members
//! join and leave.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_core::{Consumer, Delivery, Error, HandlerError, Message, SubscribeOptions};

use super::{ids, publish_all, spawn, stop, LONG};
use crate::kit::{ensure, Check, Ctx, OrFail};

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

pub(super) async fn per_key_order(ctx: Arc<Ctx>) -> Check {
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

/// Per-key order across hand-overs: members join and leave a group while keyed
/// messages are published and a backlog sits in the members' prefetch, so partitions
/// move with delivered, unhandled messages in hand. Every key's messages must be handled
/// in publish order; a redelivery of one already handled is allowed (at least once), a
/// message handled before one published earlier is not.
pub(super) async fn order_through_membership_changes(ctx: Arc<Ctx>) -> Check {
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
