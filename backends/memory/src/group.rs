//! A group's view of a topic log: read position, unsettled deliveries per member, and
//! core's [`KeyGate`] holding same-key messages back until their predecessor is acked.
//! Pure, synchronous state; the broker module wraps it in the topic's lock.

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::{Arc, Mutex};

use switchyard_core::backend::KeyGate;
use switchyard_core::{Message, Nack};

/// One message as a group holds it.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) offset: u64,
    pub(crate) message: Arc<Message>,
    pub(crate) attempt: u32,
}

/// A message's key, hashed and compared as the key string without copying it.
#[derive(Clone, Debug)]
struct KeyOf(Arc<Message>);

impl KeyOf {
    /// The gate's key for `entry`: none when its message has no key.
    fn of(entry: &Entry) -> Option<Self> {
        entry
            .message
            .key
            .is_some()
            .then(|| Self(entry.message.clone()))
    }

    fn as_str(&self) -> &str {
        self.0.key.as_deref().unwrap_or_default()
    }
}

impl Borrow<str> for KeyOf {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl Hash for KeyOf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl PartialEq for KeyOf {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for KeyOf {}

/// Offsets are unique small integers: a multiply spreads them well, and is far cheaper
/// than SipHash on the ack path.
#[derive(Default)]
struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type OffsetMap<V> = HashMap<u64, V, BuildHasherDefault<OffsetHasher>>;

/// Acks a member's handles made that the group has not applied yet. An ack only
/// records its offset here, under this member's own small lock instead of the topic's
/// (which the publisher and every member contend for); the group applies them in
/// bulk, under the topic lock, before it next hands out messages or reports on itself.
/// Holds at most the member's unsettled deliveries, so at most its prefetch.
#[derive(Default)]
pub(crate) struct AckQueue(Mutex<PendingAcks>);

#[derive(Default)]
struct PendingAcks {
    offsets: Vec<u64>,
    /// The member left: its unsettled deliveries were requeued, so acks are refused.
    gone: bool,
}

impl AckQueue {
    /// Records the ack of `offset`; false if the member already left.
    pub(crate) fn push(&self, offset: u64) -> bool {
        let mut pending = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if pending.gone {
            return false;
        }
        pending.offsets.push(offset);
        true
    }

    /// Moves the recorded acks into `out`, which must be empty.
    fn drain_into(&self, out: &mut Vec<u64>) {
        let mut pending = self.0.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::swap(&mut pending.offsets, out);
    }

    /// Refuses acks from now on: the member is leaving.
    fn refuse(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).gone = true;
    }
}

struct Member {
    unsettled: OffsetMap<Entry>,
    acks: Arc<AckQueue>,
}

/// What happened when a delivery was settled.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Settled as asked.
    Done,
    /// The member had already left; its deliveries were requeued then.
    MemberGone,
}

pub(crate) struct Group {
    /// Next log offset to examine.
    pub(crate) next: u64,
    /// Dropped by the broker when its last member leaves.
    pub(crate) ephemeral: bool,
    /// Messages read from the log and not handed out: requeued ones, and same-key
    /// successors waiting for their predecessor's ack.
    gate: KeyGate<KeyOf, Entry>,
    members: OffsetMap<Member>,
    next_member: u64,
    /// Reused buffer for applying acks.
    scratch: Vec<u64>,
}

/// How many held-back same-key messages a group buffers before it stops reading ahead;
/// bounds memory when one key is stuck (Kafka has the same head-of-line limit).
pub(crate) const MAX_BLOCKED: usize = 65_536;

impl Group {
    pub(crate) fn new(next: u64) -> Self {
        Self {
            next,
            ephemeral: false,
            gate: KeyGate::new(),
            members: OffsetMap::default(),
            next_member: 0,
            scratch: Vec::new(),
        }
    }

    /// Adds a member: its id, and the queue its ack handles record acks in.
    pub(crate) fn join(&mut self) -> (u64, Arc<AckQueue>) {
        let id = self.next_member;
        self.next_member += 1;
        let acks = Arc::new(AckQueue::default());
        self.members.insert(
            id,
            Member {
                unsettled: OffsetMap::default(),
                acks: acks.clone(),
            },
        );
        (id, acks)
    }

    /// Applies every member's recorded acks: their deliveries are done, and their keys'
    /// next messages become deliverable.
    pub(crate) fn apply_acks(&mut self) {
        let mut offsets = std::mem::take(&mut self.scratch);
        for m in self.members.values_mut() {
            m.acks.drain_into(&mut offsets);
            for offset in offsets.drain(..) {
                if let Some(entry) = m.unsettled.remove(&offset) {
                    self.gate.settle_opt(entry.message.key.as_deref());
                }
            }
        }
        self.scratch = offsets;
    }

    /// Removes a member; its acks recorded so far count, later ones are refused, and
    /// its other unsettled deliveries go back to `ready` with attempt + 1.
    pub(crate) fn leave(&mut self, member: u64) -> usize {
        let Some(m) = self.members.get(&member) else {
            return 0;
        };
        // Refuse later acks first (under the queue's lock), then apply the ones made.
        m.acks.refuse();
        self.apply_acks();
        let Some(m) = self.members.remove(&member) else {
            return 0;
        };
        let mut entries: Vec<Entry> = m.unsettled.into_values().collect();
        entries.sort_by_key(|e| e.offset);
        let n = entries.len();
        for mut e in entries {
            e.attempt += 1;
            self.gate.requeue(KeyOf::of(&e), e);
        }
        n
    }

    /// Removes every member (fault injection); returns how many there were.
    pub(crate) fn leave_all(&mut self) -> usize {
        let members: Vec<u64> = self.members.keys().copied().collect();
        for m in &members {
            self.leave(*m);
        }
        members.len()
    }

    /// Whether the group is ephemeral and has no member left: the broker drops it.
    pub(crate) fn expired(&self) -> bool {
        self.ephemeral && self.members.is_empty()
    }

    pub(crate) fn is_member(&self, member: u64) -> bool {
        self.members.contains_key(&member)
    }

    pub(crate) fn unsettled(&self, member: u64) -> usize {
        self.members.get(&member).map_or(0, |m| m.unsettled.len())
    }

    /// Hands `member` up to `max` entries from `log` (which starts at offset `base`).
    pub(crate) fn take(
        &mut self,
        member: u64,
        max: usize,
        log: &VecDeque<Arc<Message>>,
        base: u64,
        out: &mut Vec<Entry>,
    ) {
        let Some(m) = self.members.get_mut(&member) else {
            return;
        };
        let end = base + log.len() as u64;
        let start = out.len();
        while out.len() - start < max {
            if let Some(e) = self.gate.pop() {
                out.push(e);
                continue;
            }
            if self.next >= end || self.gate.waiting_len() >= MAX_BLOCKED {
                break;
            }
            // Eviction never passes a group's read position, so this index is in range.
            let message = log[(self.next - base) as usize].clone();
            let entry = Entry {
                offset: self.next,
                message,
                attempt: 1,
            };
            self.next += 1;
            match KeyOf::of(&entry) {
                // Nothing is ready ahead of it (the gate had nothing to pop): out at once.
                None => out.push(entry),
                key => self.gate.push(key, entry),
            }
        }
        for e in &out[start..] {
            m.unsettled.insert(e.offset, e.clone());
        }
    }

    /// Acks (or nacks) one delivery of `member`.
    pub(crate) fn settle(&mut self, member: u64, offset: u64, nack: Option<Nack>) -> Settled {
        let Some(entry) = self
            .members
            .get_mut(&member)
            .and_then(|m| m.unsettled.remove(&offset))
        else {
            return Settled::MemberGone;
        };
        match nack {
            Some(Nack::Requeue) => {
                // The requeued message is still its key's head.
                let mut entry = entry;
                entry.attempt += 1;
                self.gate.requeue(KeyOf::of(&entry), entry);
            }
            _ => self.gate.settle_opt(entry.message.key.as_deref()),
        }
        Settled::Done
    }

    /// The lowest offset not yet acked: everything below it is done for this group.
    pub(crate) fn acked_below(&mut self) -> u64 {
        self.apply_acks();
        let pending = self.gate.iter().map(|e| e.offset).chain(
            self.members
                .values()
                .flat_map(|m| m.unsettled.keys().copied()),
        );
        pending.min().unwrap_or(self.next).min(self.next)
    }

    /// Whether something is deliverable without reading further in the log.
    pub(crate) fn has_ready(&self) -> bool {
        self.gate.has_ready()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(keys: &[Option<&str>]) -> VecDeque<Arc<Message>> {
        keys.iter()
            .enumerate()
            .map(|(i, k)| {
                let m = Message::new(format!("{i}"));
                Arc::new(match k {
                    Some(k) => m.with_key(*k),
                    None => m,
                })
            })
            .collect()
    }

    fn offsets(v: &[Entry]) -> Vec<u64> {
        v.iter().map(|e| e.offset).collect()
    }

    #[test]
    fn same_key_waits_for_ack_and_keeps_order() {
        let log = log(&[Some("a"), Some("a"), Some("b"), None, Some("a")]);
        let mut g = Group::new(0);
        let (m, _acks) = g.join();
        let mut out = Vec::new();
        g.take(m, 10, &log, 0, &mut out);
        assert_eq!(
            offsets(&out),
            vec![0, 2, 3],
            "second and third 'a' are held back"
        );
        out.clear();
        assert_eq!(g.settle(m, 0, None), Settled::Done);
        g.take(m, 10, &log, 0, &mut out);
        assert_eq!(offsets(&out), vec![1]);
        out.clear();
        g.settle(m, 1, Some(Nack::Requeue));
        g.take(m, 10, &log, 0, &mut out);
        assert_eq!(
            offsets(&out),
            vec![1],
            "a requeued message comes back before its successor"
        );
        assert_eq!(out[0].attempt, 2);
        out.clear();
        g.settle(m, 1, None);
        g.take(m, 10, &log, 0, &mut out);
        assert_eq!(offsets(&out), vec![4]);
    }

    #[test]
    fn leaving_member_returns_its_deliveries() {
        let log = log(&[None, None, None]);
        let mut g = Group::new(0);
        let (a, _) = g.join();
        let (b, _) = g.join();
        let mut out = Vec::new();
        g.take(a, 2, &log, 0, &mut out);
        assert_eq!(g.leave(a), 2);
        assert_eq!(g.settle(a, 0, None), Settled::MemberGone);
        out.clear();
        g.take(b, 10, &log, 0, &mut out);
        assert_eq!(offsets(&out), vec![0, 1, 2]);
        assert_eq!(out[0].attempt, 2);
        assert_eq!(out[2].attempt, 1);
    }

    #[test]
    fn recorded_acks_apply_before_the_next_take_and_stop_at_leave() {
        let log = log(&[Some("a"), Some("a"), None, None]);
        let mut g = Group::new(0);
        let (m, acks) = g.join();
        let mut out = Vec::new();
        g.take(m, 10, &log, 0, &mut out);
        assert_eq!(offsets(&out), vec![0, 2, 3]);
        assert!(acks.push(0));
        assert!(acks.push(2));
        assert_eq!(g.unsettled(m), 3, "recorded, not applied yet");
        g.apply_acks();
        assert_eq!(g.unsettled(m), 1);
        out.clear();
        g.take(m, 10, &log, 0, &mut out);
        assert_eq!(offsets(&out), vec![1], "the ack released the key");
        assert!(acks.push(1));
        assert_eq!(g.leave(m), 1, "offset 1's ack counted; offset 3 goes back");
        assert!(!acks.push(3), "a member that left refuses acks");
        assert_eq!(g.acked_below(), 3);
    }
}
