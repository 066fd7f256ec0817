//! Scheduled publish with no plugin: a cascade of TTL queues, one per power of two
//! units of [`UNIT_MS`] (16 ms), so any delay is the sum of the levels its binary digits
//! name and a topic never needs more than [`LEVELS`] (28) delay queues, whatever delays
//! it is given.
//!
//! Level `n` of topic `T` is a topic exchange and a classic queue, both named
//! `T:~schedule.delay.<16 * 2^n>`; the queue has `x-message-ttl = 16 * 2^n` ms and
//! dead-letters into level `n - 1` (level 0 into the topic's exchange `T`). A scheduled
//! message's routing key spells its delay in units, in binary, one word per level from
//! the highest down (`y` for a 1, `n` for a 0: 80 ms, 5 units, is `y.n.y`), and it
//! enters at its highest level. Each level's exchange routes on its own word: `y` into
//! its queue, where the message waits, `n` straight on to the next level down. RabbitMQ
//! keeps a message's routing keys when it dead-letters it, so the word stays readable
//! at every level.
//!
//! The slot routing key a publish would have used travels as the message's `CC` header
//! (sender-selected distribution): RabbitMQ routes on it too, at every hop, and keeps
//! it through dead-lettering. No level binding matches a slot number, and the topic's
//! exchange matches nothing else, so once due the message reaches the key's partition
//! of every group, as a publish would. The `CC` array is no header of the delivered
//! message (only string-like header values are kept on receipt).
//!
//! Every level queue holds messages of one TTL, so it expires them in arrival order at
//! its head. A delay is rounded up to whole units (the bucket granularity: up to 16 ms,
//! plus a spare millisecond per hop); beyond that a message is late only by the broker's
//! time to move it through its levels, one dead-lettering per `y`. The unit trades that
//! rounding for hops: a few seconds take about 4 hops in 16 ms units, 6 in milliseconds,
//! and the broker's dead-lettering rate is what makes a crowd of messages late.

use std::time::Duration;

use lapin::options::{ExchangeBindOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection};
use switchyard_core::{Error, Result};

use crate::error::{conflict, map_err};
use crate::topology::{declare_topic, declare_topic_exchange};

/// The shortest level's wait, and the granularity delays are rounded up to.
pub(crate) const UNIT_MS: u64 = 16;

/// Levels of the cascade: level `n` waits `16 * 2^n` ms, so the top level's TTL, 2^31 ms,
/// stays within what RabbitMQ accepts, and 28 levels spell up to 16 * (2^28 - 1) ms
/// (about 49.7 days).
pub(crate) const LEVELS: u32 = 28;

/// How a delay travels through the cascade.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// The delay the levels add up to, in milliseconds (a whole number of units).
    pub(crate) ms: u64,
    /// How many levels it needs (its highest level is `levels - 1`).
    pub(crate) levels: u32,
    /// The routing key spelling the delay in units, highest level first.
    pub(crate) routing_key: String,
}

/// The plan for `delay`, or `None` when it is due now (an ordinary publish).
///
/// The delay is rounded up to whole units, leaving at least one spare millisecond per
/// level it passes through: the broker stamps a message's arrival in whole
/// milliseconds, so each hop may end up to a millisecond before its TTL is up, and a
/// scheduled message must never arrive early.
pub(crate) fn plan(delay: Duration) -> Result<Option<Plan>> {
    let base = u64::try_from(delay.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
    if base == 0 {
        return Ok(None);
    }
    let mut units = base.div_ceil(UNIT_MS);
    // Each step adds 16 ms and at most one hop, so this ends within two steps.
    while units.saturating_mul(UNIT_MS) < base.saturating_add(u64::from(units.count_ones())) {
        units += 1;
    }
    if units >= 1 << LEVELS {
        return Err(Error::config(
            "delay",
            format!(
                "{delay:?} is longer than RabbitMQ's scheduled publish reaches, 16 * (2^28 - 1) ms (about 49 days)"
            ),
        ));
    }
    let levels = bits(units);
    let routing_key = (0..levels)
        .rev()
        .map(|n| if units >> n & 1 == 1 { "y" } else { "n" })
        .collect::<Vec<_>>()
        .join(".");
    Ok(Some(Plan {
        ms: units * UNIT_MS,
        levels,
        routing_key,
    }))
}

/// Binary digits of `n` (0 for 0).
fn bits(n: u64) -> u32 {
    u64::BITS - n.leading_zeros()
}

/// The exchange and the queue of level `n` of `topic`'s cascade. `~` cannot occur in
/// topic or group names, so no group's queue is ever called this; the name has the
/// shape of a hold queue (`<base>.delay.<ms>`), so the receiving side strips the
/// dead-letter headers the cascade adds, as it does for a delayed redelivery.
pub(crate) fn level_name(topic: &str, n: u32) -> String {
    format!("{topic}:~schedule.delay.{}", UNIT_MS << n)
}

/// The binding pattern that picks `word` at level `n`: `#.<word>` then `n` more words.
fn pattern(word: &str, n: u32) -> String {
    let mut p = format!("#.{word}");
    for _ in 0..n {
        p.push_str(".*");
    }
    p
}

/// `props` with the slot routing key added as the `CC` header.
pub(crate) fn carry_slot(props: BasicProperties, slot: &ShortString) -> BasicProperties {
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(
        "CC".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString(
            LongString::from(slot.as_str().as_bytes()),
        )])),
    );
    props.with_headers(headers)
}

/// Declares levels `from..to` of `topic`'s cascade, lowest first (each binds to the one
/// below it, which must exist), and the topic's exchange, which level 0 feeds.
pub(crate) async fn declare_levels(
    conn: &Connection,
    topic: &str,
    from: u32,
    to: u32,
) -> Result<()> {
    declare_topic(conn, topic).await?;
    for n in from..to {
        let name = level_name(topic, n);
        let below = if n == 0 {
            topic.to_string()
        } else {
            level_name(topic, n - 1)
        };
        declare_topic_exchange(conn, &name).await?;
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| map_err("opening a channel", e))?;
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("classic".into()),
        );
        let ttl = i64::try_from(UNIT_MS << n).unwrap_or(i64::MAX);
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(below.as_str().into()),
        );
        ch.queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .map_err(|e| conflict("queue", &name, e))?;
        ch.queue_bind(
            name.as_str().into(),
            name.as_str().into(),
            pattern("y", n).into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| map_err(&format!("binding queue {name:?}"), e))?;
        ch.exchange_bind(
            below.as_str().into(),
            name.as_str().into(),
            pattern("n", n).into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| map_err(&format!("binding exchange {below:?} to {name:?}"), e))?;
        crate::connection::close_channel(&ch, "declared").await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::is_hold_queue;

    /// Where a topic exchange sends `key` at level `n`: whether `pattern(word, n)`
    /// matches, written out for these patterns (the `n + 1`-th word from the end).
    fn word_at(key: &str, n: u32) -> Option<&str> {
        let words: Vec<&str> = key.split('.').collect();
        words.len().checked_sub(n as usize + 1).map(|i| words[i])
    }

    #[test]
    fn a_delay_is_spelled_in_levels_that_add_up_to_at_least_it() {
        assert_eq!(plan(Duration::ZERO).unwrap(), None);
        for ms in [
            1u64, 2, 5, 15, 16, 17, 999, 1000, 1024, 3000, 65_537, 86_400_000,
        ] {
            let p = plan(Duration::from_millis(ms)).unwrap().unwrap();
            let sum: u64 = (0..p.levels)
                .filter(|&n| word_at(&p.routing_key, n) == Some("y"))
                .map(|n| UNIT_MS << n)
                .sum();
            assert_eq!(sum, p.ms, "{ms}: {}", p.routing_key);
            // A spare millisecond per hop, and no more than a unit and those beyond it.
            let hops = u64::from((p.ms / UNIT_MS).count_ones());
            assert!(p.ms >= ms + hops, "{ms} -> {}: early", p.ms);
            assert!(
                p.ms < ms + UNIT_MS + hops,
                "{ms} -> {}: rounded too far",
                p.ms
            );
            assert_eq!(word_at(&p.routing_key, p.levels - 1), Some("y"));
            assert_eq!(p.routing_key.split('.').count() as u32, p.levels);
        }
        // A few seconds take few hops.
        let p = plan(Duration::from_millis(3000)).unwrap().unwrap();
        assert!(p.routing_key.matches('y').count() <= 8, "{}", p.routing_key);
        let p = plan(Duration::from_micros(1)).unwrap().unwrap();
        assert_eq!(p.ms, UNIT_MS, "rounded up to one unit");
        assert!(plan(Duration::from_secs(49 * 24 * 3600)).is_ok());
        assert!(plan(Duration::from_secs(50 * 24 * 3600)).is_err());
    }

    #[test]
    fn level_patterns_pick_one_word_and_never_a_slot_number() {
        assert_eq!(pattern("y", 0), "#.y");
        assert_eq!(pattern("n", 2), "#.n.*.*");
        // A slot number is one word of digits: it matches no level pattern, which needs
        // a `y` or `n` word.
        assert!(!"497".contains('y') && !"497".contains('n'));
        assert_eq!(level_name("orders", 0), "orders:~schedule.delay.16");
        assert_eq!(level_name("orders", 6), "orders:~schedule.delay.1024");
        assert!(is_hold_queue(&level_name("orders", 0)));
        let top = level_name(&"t".repeat(200), LEVELS - 1);
        assert!(is_hold_queue(&top) && top.len() <= 255, "{top}");
        assert_eq!(UNIT_MS << (LEVELS - 1), 1 << 31, "the top level's TTL");
    }

    #[test]
    fn the_slot_rides_in_cc_next_to_the_message_headers() {
        let mut headers = FieldTable::default();
        headers.insert("h".into(), AMQPValue::LongString("v".into()));
        let props = carry_slot(
            BasicProperties::default().with_headers(headers),
            &"497".into(),
        );
        let table = props.headers().clone().unwrap();
        assert!(table.inner().contains_key("h"));
        match table.inner().get("CC") {
            Some(AMQPValue::FieldArray(a)) => assert_eq!(a.as_slice().len(), 1),
            other => panic!("CC is {other:?}"),
        }
        let bare = carry_slot(BasicProperties::default(), &"0".into());
        assert_eq!(bare.headers().as_ref().map(|t| t.inner().len()), Some(1));
    }
}
