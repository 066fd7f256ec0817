//! The per-partition key gate: a message with a key is not handed out while an earlier
//! message with the same key is unsettled. Pure state; the subscription wraps it in its
//! lock.
//!
//! One member owns a partition queue at a time and RabbitMQ delivers a queue's messages
//! in order, so arrival order is publish order per key. A nacked (requeued) message goes
//! back to its original place at the head of the queue and is delivered again before
//! anything not yet delivered, so the key waits for exactly that redelivery before its
//! successors (already here, held back) may run.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use switchyard_core::Message;

/// One received, not yet handed out message.
pub(crate) struct Entry {
    pub(crate) message: Arc<Message>,
    pub(crate) attempt: u32,
    pub(crate) acker: lapin::Acker,
    /// The redelivery of a message that was nacked for requeue: it heads its key.
    pub(crate) requeued_head: bool,
}

#[derive(Default)]
pub(crate) struct Gate {
    ready: VecDeque<Entry>,
    /// Keys with a message unsettled, ready, or awaiting its redelivery.
    busy: HashSet<String>,
    blocked: HashMap<String, VecDeque<Entry>>,
    /// Keys whose head was nacked for requeue, with that message's id.
    awaiting: HashMap<String, String>,
    /// The attempt number a message requeued by this member comes back with.
    attempts: HashMap<String, u32>,
}

impl Gate {
    /// A message arrived from the broker.
    pub(crate) fn arrive(&mut self, mut entry: Entry) {
        if let Some(attempt) = self.attempts.remove(&entry.message.id) {
            entry.attempt = entry.attempt.max(attempt);
        }
        let Some(key) = entry.message.key.clone() else {
            self.ready.push_back(entry);
            return;
        };
        if let Some(id) = self.awaiting.get(&key) {
            if *id == entry.message.id {
                self.awaiting.remove(&key);
                entry.requeued_head = true;
                self.ready.push_back(entry);
                return;
            }
            tracing::warn!(
                key,
                expected = %id,
                got = %entry.message.id,
                "a same-key message arrived before the requeued one; holding it"
            );
        }
        if self.busy.contains(&key) {
            self.blocked.entry(key).or_default().push_back(entry);
        } else {
            self.busy.insert(key);
            self.ready.push_back(entry);
        }
    }

    /// The next message to hand out. While draining, only requeued heads go out, so a
    /// key's order survives the hand-over to another member.
    pub(crate) fn take(&mut self, draining: bool) -> Option<Entry> {
        if !draining {
            return self.ready.pop_front();
        }
        let i = self.ready.iter().position(|e| e.requeued_head)?;
        self.ready.remove(i)
    }

    /// A handed-out message was settled: acked or rejected (`requeued == false`), or
    /// nacked for redelivery (its key stays busy until it comes back).
    pub(crate) fn settled(&mut self, message: &Message, attempt: u32, requeued: bool) {
        if requeued {
            self.attempts
                .insert(message.id.clone(), attempt.saturating_add(1));
        }
        let Some(key) = message.key.as_deref() else {
            return;
        };
        if requeued {
            self.awaiting.insert(key.to_string(), message.id.clone());
            return;
        }
        if let Some(queue) = self.blocked.get_mut(key) {
            if let Some(next) = queue.pop_front() {
                if queue.is_empty() {
                    self.blocked.remove(key);
                }
                self.ready.push_back(next);
                return;
            }
        }
        self.busy.remove(key);
    }

    /// Received messages not yet handed out.
    pub(crate) fn len(&self) -> usize {
        self.ready.len() + self.blocked.values().map(VecDeque::len).sum::<usize>()
    }

    /// Requeued messages on their way back: each needs a free prefetch slot on the
    /// channel to return.
    pub(crate) fn awaiting(&self) -> usize {
        self.awaiting.len()
    }

    /// Whether the partition can be handed to another member without breaking a key's
    /// order: no requeued message is on its way back or waiting to be handed out.
    pub(crate) fn quiet(&self) -> bool {
        self.awaiting.is_empty() && !self.ready.iter().any(|e| e.requeued_head)
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
        let mut g = Gate::default();
        let (a1, a2) = (keyed("a"), keyed("a"));
        g.arrive(entry(&a1));
        g.arrive(entry(&a2));
        assert_eq!(g.take(false).unwrap().message.id, a1.id);
        g.settled(&a1, 1, true);
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
}
