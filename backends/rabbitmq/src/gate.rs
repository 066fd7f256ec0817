//! The per-partition key gate: core's [`KeyGate`], plus what RabbitMQ's redeliveries
//! need. A message with a key is not handed out while an earlier message with the same
//! key is unsettled.
//!
//! One member owns a partition queue at a time and RabbitMQ delivers a queue's messages
//! in order, so arrival order is publish order per key. A nacked (requeued) message goes
//! back to its original place at the head of the queue and is delivered again before
//! anything not yet delivered: its key stays busy meanwhile, and when the message comes
//! back (recognised by its id) it heads its key again, ahead of the successors held
//! here. The member counts the attempts of what it requeued, since classic queues only
//! flag a redelivery.
//!
//! A requeued message may never come back: RabbitMQ drops one whose TTL ran out, or
//! dead-letters one past a quorum queue's delivery limit, and tells the consumer
//! nothing. After [`RETURN_LIMIT`] its key goes on without it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_core::backend::KeyGate;
use switchyard_core::Message;

/// One received, not yet handed out message.
pub(crate) struct Entry {
    pub(crate) message: Arc<Message>,
    pub(crate) attempt: u32,
    pub(crate) acker: lapin::Acker,
    /// The redelivery of a message that was nacked for requeue: it heads its key.
    pub(crate) requeued_head: bool,
}

/// How long a key waits for its requeued message to come back. It normally returns
/// within milliseconds, ahead of anything not yet delivered.
pub(crate) const RETURN_LIMIT: Duration = Duration::from_secs(30);

#[derive(Default)]
pub(crate) struct Gate {
    keys: KeyGate<String, Entry>,
    /// Keys whose head was nacked for requeue, with that message's id and when.
    awaiting: HashMap<String, (String, Instant)>,
    /// The delivery count a message requeued by this member comes back with.
    attempts: HashMap<String, u32>,
}

impl Gate {
    /// A message arrived from the broker.
    pub(crate) fn arrive(&mut self, mut entry: Entry) {
        if let Some(attempt) = self.attempts.remove(&entry.message.id) {
            entry.attempt = entry.attempt.max(attempt);
        }
        let key = entry.message.key.clone();
        if let Some(k) = &key {
            if let Some((id, _)) = self.awaiting.get(k) {
                if *id == entry.message.id {
                    self.awaiting.remove(k);
                    entry.requeued_head = true;
                    self.keys.requeue(key, entry);
                    return;
                }
                // The key is still busy with the requeued message, so this one waits.
                tracing::warn!(
                    key = %k,
                    expected = %id,
                    got = %entry.message.id,
                    "a same-key message arrived before the requeued one; holding it"
                );
            }
        }
        self.keys.push(key, entry);
    }

    /// The next message to hand out. While draining, only requeued heads go out, so a
    /// key's order survives the hand-over to another member.
    pub(crate) fn take(&mut self, draining: bool) -> Option<Entry> {
        if draining {
            self.keys.pop_where(|e| e.requeued_head)
        } else {
            self.keys.pop()
        }
    }

    /// A handed-out message was settled: acked or rejected (`requeued == false`), or
    /// nacked for redelivery (its key stays busy until it comes back).
    pub(crate) fn settled(&mut self, message: &Message, attempt: u32, requeued: bool) {
        if !requeued {
            self.keys.settle_opt(message.key.as_deref());
            return;
        }
        self.attempts
            .insert(message.id.clone(), attempt.saturating_add(1));
        if let Some(key) = &message.key {
            self.awaiting
                .insert(key.clone(), (message.id.clone(), Instant::now()));
        }
    }

    /// Frees the keys whose requeued message has been away for [`RETURN_LIMIT`] by
    /// `now`: their successors go ahead. If it comes back later after all, it queues
    /// behind them.
    pub(crate) fn release_overdue(&mut self, now: Instant) {
        let overdue: Vec<String> = self
            .awaiting
            .iter()
            .filter(|(_, (_, since))| now.saturating_duration_since(*since) >= RETURN_LIMIT)
            .map(|(key, _)| key.clone())
            .collect();
        for key in overdue {
            if let Some((id, _)) = self.awaiting.remove(&key) {
                self.attempts.remove(&id);
                tracing::warn!(
                    %key,
                    %id,
                    limit = ?RETURN_LIMIT,
                    "a requeued message did not come back (the broker expired or dead-lettered it); its key goes on without it"
                );
                self.keys.settle(key.as_str());
            }
        }
    }

    /// When the first key waiting for a requeued message is to be freed.
    pub(crate) fn next_release(&self) -> Option<Instant> {
        self.awaiting
            .values()
            .map(|(_, since)| *since + RETURN_LIMIT)
            .min()
    }

    /// Received messages not yet handed out.
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// Requeued messages on their way back: each needs a free prefetch slot on the
    /// channel to return.
    pub(crate) fn awaiting(&self) -> usize {
        self.awaiting.len()
    }

    /// Whether the partition can be handed to another member without breaking a key's
    /// order: no requeued message is on its way back or waiting to be handed out.
    pub(crate) fn quiet(&self) -> bool {
        self.awaiting.is_empty() && !self.keys.ready().any(|e| e.requeued_head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(message: &Arc<Message>) -> Entry {
        let d = lapin::message::Delivery::mock(1, "".into(), "".into(), false, Vec::new());
        Entry {
            message: message.clone(),
            attempt: 1,
            acker: d.acker,
            requeued_head: false,
        }
    }

    fn keyed(key: &str) -> Arc<Message> {
        Arc::new(Message::new("x").with_key(key))
    }

    /// A gate holding `a2` behind `a1`, which was handed out and nacked for requeue.
    fn first_of_two_requeued() -> (Gate, Arc<Message>, Arc<Message>) {
        let mut g = Gate::default();
        let (a1, a2) = (keyed("a"), keyed("a"));
        g.arrive(entry(&a1));
        g.arrive(entry(&a2));
        assert_eq!(g.take(false).unwrap().message.id, a1.id);
        g.settled(&a1, 1, true);
        (g, a1, a2)
    }

    #[test]
    fn a_requeued_message_that_never_comes_back_frees_its_key_after_the_limit() {
        let (mut g, a1, a2) = first_of_two_requeued();
        assert!(g.take(false).is_none(), "a2 waits for a1 to come back");
        let due = g.next_release().expect("a key awaits its message");
        g.release_overdue(due - Duration::from_millis(1));
        assert!(g.take(false).is_none(), "not before the limit");
        g.release_overdue(due);
        assert_eq!(g.take(false).unwrap().message.id, a2.id);
        assert!(g.quiet(), "nothing awaited any more");
        assert_eq!(g.next_release(), None);
        // Back after all: queued behind its successor, not lost.
        g.arrive(entry(&a1));
        g.settled(&a2, 1, false);
        assert_eq!(g.take(false).unwrap().message.id, a1.id);
    }

    #[test]
    fn same_key_waits_for_its_predecessor() {
        let mut g = Gate::default();
        let (a1, a2, b1) = (keyed("a"), keyed("a"), keyed("b"));
        let free = Arc::new(Message::new("unkeyed"));
        for m in [&a1, &a2, &b1, &free] {
            g.arrive(entry(m));
        }
        let out: Vec<String> = std::iter::from_fn(|| g.take(false))
            .map(|e| e.message.id.clone())
            .collect();
        assert_eq!(out, vec![a1.id.clone(), b1.id.clone(), free.id.clone()]);
        g.settled(&a1, 1, false);
        assert_eq!(g.take(false).unwrap().message.id, a2.id);
    }

    #[test]
    fn a_requeued_message_heads_its_key_again_with_the_next_attempt() {
        let (mut g, a1, a2) = first_of_two_requeued();
        assert!(!g.quiet(), "the requeued message is on its way back");
        assert!(g.take(false).is_none(), "a2 must wait for a1's redelivery");
        g.arrive(entry(&a1));
        assert!(g
            .take(true)
            .is_some_and(|e| e.message.id == a1.id && e.attempt == 2));
        assert!(g.quiet());
        g.settled(&a1, 2, false);
        assert!(
            g.take(true).is_none(),
            "draining hands out only requeued heads"
        );
        assert_eq!(g.take(false).unwrap().message.id, a2.id);
    }

    #[test]
    fn a_same_key_arrival_waits_while_the_requeued_head_is_away() {
        let mut g = Gate::default();
        let (a1, a2, free) = (keyed("a"), keyed("a"), Arc::new(Message::new("unkeyed")));
        g.arrive(entry(&a1));
        g.arrive(entry(&free));
        let _ = g.take(false);
        let _ = g.take(false);
        g.settled(&a1, 1, true);
        g.settled(&free, 1, true);
        assert_eq!(g.awaiting(), 1, "only keyed messages hold their key");
        g.arrive(entry(&a2));
        g.arrive(entry(&free));
        let back = g.take(false).expect("the unkeyed one is free");
        assert_eq!(
            (back.message.id.clone(), back.attempt),
            (free.id.clone(), 2)
        );
        assert!(g.take(false).is_none(), "a2 waits for a1 to come back");
        g.arrive(entry(&a1));
        assert_eq!(g.take(false).unwrap().message.id, a1.id);
        g.settled(&a1, 2, false);
        assert_eq!(g.take(false).unwrap().message.id, a2.id);
        assert_eq!(g.len(), 0);
    }
}
