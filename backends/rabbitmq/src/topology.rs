//! Names, routing keys and declarations: how topics and groups map onto exchanges and
//! queues.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ExchangeKind};
use switchyard_core::{Error, Result};

use crate::error::{conflict, map_err, soft_code, DeclareConflict};
use crate::BACKEND;

/// Number of routing slots: a key's hash picks one, and a group may have up to this
/// many partitions.
pub(crate) const SLOTS: u32 = 1024;

/// FNV-1a 64: stable across processes, versions and platforms, unlike `DefaultHasher`,
/// so every publisher sends a key to the same slot.
pub(crate) fn key_hash(key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The routing keys of the slots: slot `s` is the decimal number `s` ("0" … "1023").
pub(crate) fn slot_routing_keys() -> Vec<ShortString> {
    (0..SLOTS)
        .map(|slot| ShortString::from(slot.to_string()))
        .collect()
}

/// The slots partition `p` of `partitions` (a power of two) owns: those equal to `p`
/// modulo `partitions`, so each slot has one partition in every group and publishers
/// never need to know partition counts.
pub(crate) fn partition_slots(p: u32, partitions: u32) -> impl Iterator<Item = u32> {
    (p..SLOTS).step_by(partitions as usize)
}

/// Binds partition `p`'s queue to `exchange` once per slot it owns. The bindings go
/// without waiting for each reply (a refused one closes the channel, which the last,
/// awaited one reports), so a group's 1024 bindings cost about one round trip.
async fn bind_slots(
    ch: &Channel,
    queue: &str,
    exchange: &str,
    p: u32,
    partitions: u32,
) -> Result<()> {
    let slots: Vec<u32> = partition_slots(p, partitions).collect();
    for (i, slot) in slots.iter().enumerate() {
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            slot.to_string().into(),
            QueueBindOptions {
                nowait: i + 1 < slots.len(),
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| map_err(&format!("binding queue {queue:?} to {exchange:?}"), e))?;
    }
    Ok(())
}

/// The broker-side names of one group.
#[derive(Clone, Debug)]
pub(crate) struct GroupNames {
    pub(crate) exchange: String,
    base: String,
}

impl GroupNames {
    pub(crate) fn new(topic: &str, group: &str) -> Self {
        // ':' cannot occur in topic or group names, so ("a.b", "c") and ("a", "b.c")
        // never share queues. AMQP names are at most 255 bytes; topic and group may be
        // 200 each, so long pairs are shortened with a hash that keeps them distinct.
        let full = format!("{topic}:{group}");
        let base = if full.len() <= 220 {
            full
        } else {
            format!("{}~{:016x}", &full[..200], key_hash(&full))
        };
        Self {
            exchange: topic.to_string(),
            base,
        }
    }

    pub(crate) fn partition(&self, p: u32) -> String {
        format!("{}.p{p}", self.base)
    }

    pub(crate) fn members(&self) -> String {
        format!("{}.members", self.base)
    }

    /// The group's return exchange: where its hold queues dead-letter expired messages
    /// to, bound to its partition queues only, so a delayed message reaches this group
    /// and no other.
    pub(crate) fn return_exchange(&self) -> String {
        format!("{}.return", self.base)
    }

    /// The hold queue (and the fanout exchange of the same name in front of it) that
    /// keeps the group's messages for `ms` milliseconds.
    pub(crate) fn hold(&self, ms: u64) -> String {
        format!("{}.delay.{ms}", self.base)
    }
}

/// Whether `queue` is a hold queue (`T:G.delay.<ms>`): the broker's dead-letter headers
/// naming one are bookkeeping of a delayed redelivery, not the message's own headers.
pub(crate) fn is_hold_queue(queue: &str) -> bool {
    queue.rsplit_once(".delay.").is_some_and(|(base, ms)| {
        base.contains(':') && !ms.is_empty() && ms.bytes().all(|b| b.is_ascii_digit())
    })
}

/// Declares the topic's exchange, a durable direct exchange, on a throwaway channel: a
/// refused declaration closes the channel it was made on, and the working channels must
/// survive it.
pub(crate) async fn declare_topic(conn: &Connection, exchange: &str) -> Result<()> {
    declare_exchange_of(conn, exchange, ExchangeKind::Direct).await
}

/// Declares a durable topic exchange on a throwaway channel: a level of a topic's
/// scheduled-publish cascade (see `schedule`).
pub(crate) async fn declare_topic_exchange(conn: &Connection, exchange: &str) -> Result<()> {
    declare_exchange_of(conn, exchange, ExchangeKind::Topic).await
}

/// Declares a durable exchange of `kind` on a throwaway channel.
async fn declare_exchange_of(conn: &Connection, exchange: &str, kind: ExchangeKind) -> Result<()> {
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| map_err("opening a channel", e))?;
    let r = ch
        .exchange_declare(
            exchange.into(),
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    match r {
        Ok(()) => {
            crate::connection::close_channel(&ch, "declared").await;
            Ok(())
        }
        Err(e) => Err(conflict("exchange", exchange, e)),
    }
}

/// The arguments of a partition queue: a durable classic queue. Classic, not quorum:
/// classic queues enforce exclusive consumers (the partition lock), requeue returned
/// messages at their original place, and an idle one holds no file handles, where every
/// quorum queue keeps a few open (a broker with the common 1024-descriptor limit stalls
/// at about 300 of them).
fn partition_args(dead_letter: Option<&str>, expires: Option<Duration>) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("classic".into()),
    );
    add_expires(&mut args, expires);
    if let Some(dlx) = dead_letter {
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(dlx.into()),
        );
    }
    args
}

/// `x-expires` of an ephemeral group's queues: the broker deletes a queue that has had
/// no consumer (and no redeclaration) for that long, messages and all.
fn add_expires(args: &mut FieldTable, expires: Option<Duration>) {
    if let Some(expires) = expires {
        let ms = i64::try_from(expires.as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        args.insert("x-expires".into(), AMQPValue::LongLongInt(ms));
    }
}

/// Declares a group: the exchange, `partitions` classic queues each bound to its slots, and the membership queue whose `x-max-length` records the partition count
/// (a member configured with another count gets a clear error instead of duplicates).
/// With `expires` (an ephemeral group) every queue of the group has that `x-expires`,
/// so the broker removes the group once it has gone that long without a member; a
/// member whose `expires` differs from the existing queues' gets a [`DeclareConflict`].
pub(crate) async fn declare_group(
    conn: &Connection,
    names: &GroupNames,
    partitions: u32,
    dead_letter: Option<&str>,
    expires: Option<Duration>,
) -> Result<()> {
    declare_topic(conn, &names.exchange).await?;
    if let Some(dlx) = dead_letter {
        // A topic exchange, so a dead-letter queue binds `#` whatever the routing key.
        declare_exchange_of(conn, dlx, ExchangeKind::Topic).await?;
    }
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| map_err("opening a channel", e))?;
    let mut members_args = FieldTable::default();
    members_args.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(i64::from(partitions)),
    );
    add_expires(&mut members_args, expires);
    let members = names.members();
    ch.queue_declare(
        members.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        members_args,
    )
    .await
    .map_err(|e| match soft_code(&e) {
        Some(406) => Error::permanent(
            BACKEND,
            DeclareConflict {
                kind: "queue",
                name: members.clone(),
                detail: if e.to_string().contains("x-expires") {
                    format!(
                        "the group was created {} (all members of a group must agree on \
                         SubscribeOptions::ephemeral and ephemeral_expiry): {e}",
                        if expires.is_some() {
                            "durable, or ephemeral with another expiry"
                        } else {
                            "ephemeral"
                        }
                    )
                } else {
                    format!(
                        "the group was created with another partition count (this client uses \
                         partitions={partitions}; all members of a group must agree): {e}"
                    )
                },
            },
        ),
        _ => conflict("queue", &members, e),
    })?;
    for p in 0..partitions {
        let queue = names.partition(p);
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            partition_args(dead_letter, expires),
        )
        .await
        .map_err(|e| conflict("queue", &queue, e))?;
        bind_slots(&ch, &queue, &names.exchange, p, partitions).await?;
        if let Some(expires) = expires {
            // A group's slot bindings take the broker seconds, and a queue with
            // `x-expires` that nobody uses meanwhile would expire half set up: touch
            // what is declared so far (a passive declare renews the lease, and fails
            // loudly where one already expired, where a plain one would recreate it
            // without its bindings).
            touch(&ch, &members, expires).await?;
            for q in 0..p {
                touch(&ch, &names.partition(q), expires).await?;
            }
        }
    }
    crate::connection::close_channel(&ch, "declared").await;
    Ok(())
}

/// Renews the `x-expires` lease of a queue declared moments ago.
async fn touch(ch: &Channel, queue: &str, expires: Duration) -> Result<()> {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map(drop)
    .map_err(|e| {
        Error::permanent(
            BACKEND,
            format!(
                "queue {queue:?} expired while its group was being declared: \
                 SubscribeOptions::ephemeral_expiry ({expires:?}) is shorter than declaring \
                 the group takes on this broker; give a longer one ({e})"
            ),
        )
    })
}

/// Whether queue `name` exists (a passive declaration on a throwaway channel: a
/// missing queue closes the channel it is asked on).
async fn queue_exists(conn: &Connection, name: &str) -> Result<bool> {
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| map_err("opening a channel", e))?;
    let r = ch
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    match r {
        Ok(_) => {
            crate::connection::close_channel(&ch, "looked").await;
            Ok(true)
        }
        Err(e) if soft_code(&e) == Some(404) => Ok(false),
        Err(e) => Err(map_err(&format!("looking at queue {name:?}"), e)),
    }
}

/// Whether the group exists with `partitions` partitions: its membership queue and
/// last partition queue exist and the next partition queue does not. Another count is a
/// [`DeclareConflict`].
async fn group_exists(conn: &Connection, names: &GroupNames, partitions: u32) -> Result<bool> {
    if !queue_exists(conn, &names.members()).await? {
        return Ok(false);
    }
    let last = queue_exists(conn, &names.partition(partitions - 1)).await?;
    let beyond = queue_exists(conn, &names.partition(partitions)).await?;
    if last && !beyond {
        return Ok(true);
    }
    Err(Error::permanent(
        BACKEND,
        DeclareConflict {
            kind: "queue",
            name: names.members(),
            detail: format!(
                "the group was created with another partition count (this client uses \
                 partitions={partitions}; all members of a group must agree)"
            ),
        },
    ))
}

/// Declares what a delayed redelivery of `ms` milliseconds to one group needs: the
/// group itself (so a partition count that disagrees is the usual clear error), its
/// return exchange (direct) bound to each partition queue with that partition's slots (as
/// on the topic's exchange), and the hold queue `T:G.delay.<ms>` behind a fanout exchange
/// of the same name. The hold queue has `x-message-ttl = ms` and dead-letters to the
/// return exchange; RabbitMQ keeps the routing key (the slot number) when it dead-letters,
/// so an expired message lands in its key's partition of this group only. One TTL per
/// queue keeps it first-in first-out, so messages expire in order at its head.
pub(crate) async fn declare_delay(
    conn: &Connection,
    names: &GroupNames,
    partitions: u32,
    dead_letter: Option<&str>,
    ms: u64,
) -> Result<()> {
    // An existing group is taken as it is, ephemeral or not (its members declared it;
    // redeclaring without their `x-expires` would be refused), once its partition count
    // is checked; a missing one is declared durable.
    if !group_exists(conn, names, partitions).await? {
        declare_group(conn, names, partitions, dead_letter, None).await?;
    }
    let back = names.return_exchange();
    let hold = names.hold(ms);
    declare_exchange_of(conn, &back, ExchangeKind::Direct).await?;
    declare_exchange_of(conn, &hold, ExchangeKind::Fanout).await?;
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| map_err("opening a channel", e))?;
    for p in 0..partitions {
        let queue = names.partition(p);
        bind_slots(&ch, &queue, &back, p, partitions).await?;
    }
    let mut args = partition_args(None, None);
    args.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(i64::try_from(ms).unwrap_or(i64::MAX)),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(back.as_str().into()),
    );
    ch.queue_declare(
        hold.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .map_err(|e| conflict("queue", &hold, e))?;
    ch.queue_bind(
        hold.as_str().into(),
        hold.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| map_err(&format!("binding queue {hold:?}"), e))?;
    crate::connection::close_channel(&ch, "declared").await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slot_has_one_partition_and_routes_by_its_number() {
        let keys = slot_routing_keys();
        assert_eq!((keys[0].as_str(), keys[497].as_str()), ("0", "497"));
        for partitions in [1, 2, 8, 1024] {
            let mut owner = vec![None; SLOTS as usize];
            for p in 0..partitions {
                for slot in partition_slots(p, partitions) {
                    assert!(
                        owner[slot as usize].replace(p).is_none(),
                        "slot {slot} twice"
                    );
                    assert_eq!(slot % partitions, p);
                }
            }
            assert!(
                owner.iter().all(Option::is_some),
                "{partitions}: a slot has no partition"
            );
        }
        assert_eq!(
            partition_slots(5, 8).take(3).collect::<Vec<_>>(),
            [5, 13, 21]
        );
    }

    #[test]
    fn long_names_are_shortened_but_distinct() {
        let a = GroupNames::new(&"t".repeat(200), &"g".repeat(200));
        let b = GroupNames::new(&"t".repeat(200), &"h".repeat(200));
        assert!(a.partition(1023).len() <= 255 && a.members().len() <= 255);
        assert_ne!(a.partition(0), b.partition(0));
        assert_eq!(
            GroupNames::new("orders", "email").partition(3),
            "orders:email.p3"
        );
        let g = GroupNames::new("orders", "email");
        assert_eq!(g.hold(1500), "orders:email.delay.1500");
        assert_eq!(g.return_exchange(), "orders:email.return");
        assert!(is_hold_queue(&g.hold(0)));
        for not_hold in [
            "orders:email.p3",
            "orders:email.members",
            "x.delay.5",
            "a:b.delay.",
        ] {
            assert!(!is_hold_queue(not_hold), "{not_hold}");
        }
        // Dots may appear in both names; the separator keeps the pairs apart.
        assert_ne!(
            GroupNames::new("a.b", "c").partition(0),
            GroupNames::new("a", "b.c").partition(0)
        );
    }
}
