//! Scheduled publish: messages published for later reach every group of their topic,
//! none before it is due, all of them in the end.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{StreamExt, TryStreamExt};
use switchyard_core::{Message, SubscribeOptions, Subscription};

use super::{subscribe, LONG};
use crate::kit::{ensure, Check, Ctx, OrFail, Outcome};

/// Messages scheduled, and the longest delay (each gets a random one from 0 to it).
const MESSAGES: usize = 1000;
const MAX_DELAY_MS: u64 = 3000;
/// The header carrying a message's due time, microseconds since the epoch.
const DUE_HEADER: &str = "due-unix-us";

/// xorshift64*: random enough for delays, initialised from the clock so runs differ.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.subsec_nanos());
        Self(u64::from(nanos) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// What one group saw.
#[derive(Default)]
struct Seen {
    /// Times each message id arrived.
    count: HashMap<String, usize>,
    /// Messages that arrived before their due time, with how early (ms).
    early: Vec<(String, f64)>,
    /// How late each arrival was (ms).
    late_ms: Vec<f64>,
}

/// Receives until every id arrived once (or the time runs out), timing each arrival
/// against the due time it carries.
async fn collect(
    mut sub: Box<dyn Subscription>,
    sent: Arc<HashMap<String, Message>>,
) -> Result<Seen, Outcome> {
    let mut seen = Seen::default();
    let deadline = tokio::time::Instant::now() + LONG;
    let mut buf = Vec::new();
    while seen.count.len() < sent.len() {
        match tokio::time::timeout_at(deadline, sub.recv_many(&mut buf, 256)).await {
            Err(_) => break,
            Ok(Err(e)) => return Err(Outcome::Failed(format!("receive failed: {e}"))),
            Ok(Ok(0)) => return Err(Outcome::Failed("subscription ended early".into())),
            Ok(Ok(_)) => {}
        }
        let now = micros(SystemTime::now());
        for d in buf.drain(..) {
            let due: u64 = d
                .message()
                .headers
                .get(DUE_HEADER)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| {
                    Outcome::Failed(format!("message {} came without its due time", d.id()))
                })?;
            if let Some(original) = sent.get(d.id()) {
                let got = d.message();
                ensure!(
                    got.payload == original.payload && got.key == original.key,
                    "message {} arrived changed: key {:?}, {} payload bytes",
                    d.id(),
                    got.key,
                    got.payload.len()
                );
            }
            if now < due {
                seen.early
                    .push((d.id().to_string(), (due - now) as f64 / 1000.0));
            } else {
                seen.late_ms.push((now - due) as f64 / 1000.0);
            }
            *seen.count.entry(d.id().to_string()).or_default() += 1;
            d.ack().await.or_fail("ack")?;
        }
    }
    sub.close().await.or_fail("close")?;
    Ok(seen)
}

/// The `q` quantile of `values` (sorted in place).
fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let i = ((values.len() - 1) as f64 * q).round() as usize;
    values[i]
}

pub(super) async fn scheduled_publish(ctx: Arc<Ctx>) -> Check {
    ctx.require(ctx.caps.scheduled_publish, "scheduled publish")?;
    let topic = ctx.name("sched");
    let groups = [ctx.name("a"), ctx.name("b")];
    let mut subs = Vec::new();
    for g in &groups {
        let opts = SubscribeOptions::new(&topic, g).prefetch(MESSAGES);
        subs.push(subscribe(&ctx, opts).await?);
    }
    let mut rng = Rng::new();
    let mut plan = Vec::with_capacity(MESSAGES);
    for i in 0..MESSAGES {
        let delay = Duration::from_millis(rng.below(MAX_DELAY_MS + 1));
        let mut m = Message::new(format!("scheduled {i}"));
        if i % 4 == 0 {
            m = m.with_key(format!("k{}", i % 13));
        }
        plan.push((m, delay));
    }
    // The collectors run while the messages are scheduled, so an arrival is timed
    // when it happens.
    let sent: Arc<HashMap<String, Message>> = Arc::new(
        plan.iter()
            .map(|(m, _)| (m.id.clone(), m.clone()))
            .collect(),
    );
    let tasks: Vec<_> = subs
        .into_iter()
        .map(|sub| tokio::spawn(collect(sub, sent.clone())))
        .collect();
    // Half by due time, half by delay; the header holds the due time as the caller
    // sees it, so a backend that delivers before it is caught.
    futures::stream::iter(plan.into_iter().enumerate())
        .map(|(i, (m, delay))| {
            let broker = ctx.broker.clone();
            let topic = topic.clone();
            async move {
                let due = SystemTime::now() + delay;
                let m = m.with_header(DUE_HEADER, micros(due).to_string());
                let id = m.id.clone();
                let receipt = if i % 2 == 0 {
                    broker.publish_at(&topic, m, due).await
                } else {
                    broker.publish_after(&topic, m, delay).await
                };
                let receipt = receipt.or_fail("schedule")?;
                ensure!(
                    receipt.id == id,
                    "the receipt names {}, not {id}",
                    receipt.id
                );
                Ok::<_, Outcome>(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<()>()
        .await?;
    let mut failures = Vec::new();
    for (group, task) in groups.iter().zip(tasks) {
        let mut seen = task.await.or_fail("collector")??;
        let missing = sent
            .keys()
            .filter(|id| !seen.count.contains_key(*id))
            .count();
        let duplicates = seen.count.values().filter(|&&n| n > 1).count();
        let foreign = seen
            .count
            .keys()
            .filter(|id| !sent.contains_key(*id))
            .count();
        let p50 = quantile(&mut seen.late_ms, 0.5);
        let p99 = quantile(&mut seen.late_ms, 0.99);
        let max = quantile(&mut seen.late_ms, 1.0);
        // Informational: how late, on this machine and broker.
        println!(
            "schedule backend={} group={group} delivered={} early={} missing={missing} duplicates={duplicates} late_ms p50={p50:.1} p99={p99:.1} max={max:.1}",
            ctx.broker.backend(),
            seen.late_ms.len() + seen.early.len(),
            seen.early.len(),
        );
        if let Some((id, by)) = seen.early.first() {
            failures.push(format!(
                "group {group}: {} messages arrived before their due time (message {id} by {by:.3} ms)",
                seen.early.len()
            ));
        }
        if missing + duplicates + foreign > 0 {
            failures.push(format!(
                "group {group}: {missing} of {MESSAGES} missing after {LONG:?}, {duplicates} more than once, {foreign} not ours"
            ));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("; "));
    Ok(())
}
