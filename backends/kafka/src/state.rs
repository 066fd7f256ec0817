//! The pure bookkeeping of one group member: the records it holds, the per-key gate
//! they pass, and each partition's pending offsets and commit watermark. No I/O and no
//! locks: the subscription keeps it behind one mutex.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use switchyard_core::backend::KeyGate;
use switchyard_core::{Error, Message, Nack};

/// A record's key, shared by its entry and the gate.
pub(crate) type Key = Arc<str>;

/// A received record as the member holds it.
#[derive(Clone)]
pub(crate) struct Entry {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    /// The assignment of its partition it was received under.
    pub(crate) epoch: u64,
    pub(crate) message: Arc<Message>,
    pub(crate) attempt: u32,
    pub(crate) key: Option<Key>,
}

impl Entry {
    /// A record just polled, on its first attempt.
    pub(crate) fn new(partition: i32, offset: i64, message: Message) -> Self {
        Self {
            partition,
            offset,
            epoch: 0,
            key: message.key.as_deref().map(Key::from),
            message: Arc::new(message),
            attempt: 1,
        }
    }

    /// Its payload bytes, what the byte bound counts.
    fn size(&self) -> usize {
        self.message.payload.len()
    }
}

/// What this member knows of one assigned partition.
struct Part {
    /// Changes on every assignment, so settles of an older assignment are recognised.
    epoch: u64,
    /// Offsets received and not yet done (acked or rejected).
    pending: BTreeSet<i64>,
    /// One past the highest offset received; -1 before the first record.
    next: i64,
    /// The last offset committed by this member.
    committed: i64,
}

impl Part {
    /// The offset to commit: the lowest offset not yet done. Everything below it is
    /// processed, so out-of-order completion never commits past an unfinished message.
    fn watermark(&self) -> Option<i64> {
        if self.next < 0 {
            return None;
        }
        Some(self.pending.first().copied().unwrap_or(self.next))
    }
}

/// Everything the member holds, and its lifecycle flags.
#[derive(Default)]
pub(crate) struct State {
    parts: HashMap<i32, Part>,
    next_epoch: u64,
    /// Received records not handed out yet: one per key out at a time, in offset order.
    gate: KeyGate<Key, Entry>,
    /// Payload bytes in `gate`.
    buffered_bytes: usize,
    /// Handed out and not settled, by (partition, offset).
    inflight: HashMap<(i32, i64), Entry>,
    /// Partitions being revoked: their in-flight messages are awaited, not requeued.
    pub(crate) revoking: HashSet<i32>,
    /// Close (or drop) was asked: hand out nothing more.
    pub(crate) stopping: bool,
    /// The first assignment arrived.
    pub(crate) assigned: bool,
    /// The member is gone (thread finished).
    pub(crate) finished: bool,
    /// A permanent consumer error to report from `recv_many`.
    pub(crate) error: Option<Error>,
    /// Why the poll thread ended without being asked to: every later `recv_many` fails
    /// with it, so a dead member is an error rather than a silent stall.
    pub(crate) died: Option<String>,
    /// Partitions this member held until its last revocation: getting them back needs
    /// no assign delay, since nobody else can have been reading them.
    pub(crate) owned_before: HashSet<i32>,
}

impl State {
    /// Records held and not handed out yet.
    pub(crate) fn buffered(&self) -> usize {
        self.gate.len()
    }

    /// Payload bytes of the records held and not handed out yet.
    pub(crate) fn buffered_bytes(&self) -> usize {
        self.buffered_bytes
    }

    /// Partitions were assigned: each starts afresh, under a new epoch.
    pub(crate) fn assign(&mut self, partitions: impl IntoIterator<Item = i32>) {
        for p in partitions {
            self.next_epoch += 1;
            let part = Part {
                epoch: self.next_epoch,
                pending: BTreeSet::new(),
                next: -1,
                committed: -1,
            };
            self.parts.insert(p, part);
        }
        self.assigned = true;
    }

    /// A polled record joins the member, unless its partition is not ours (a stale
    /// record) or its offset is already held (a re-fetch: one copy is enough).
    pub(crate) fn admit(&mut self, mut entry: Entry) {
        let Some(part) = self.parts.get_mut(&entry.partition) else {
            return;
        };
        if !part.pending.insert(entry.offset) {
            return;
        }
        part.next = part.next.max(entry.offset + 1);
        entry.epoch = part.epoch;
        self.buffered_bytes += entry.size();
        self.gate.push(entry.key.clone(), entry);
    }

    /// Hands out up to `max` ready records, keeping at most `prefetch` out at once.
    pub(crate) fn take(&mut self, max: usize, prefetch: usize) -> Vec<Entry> {
        let credit = prefetch.saturating_sub(self.inflight.len());
        let n = max.min(credit).min(self.gate.ready_len());
        let mut taken = Vec::with_capacity(n);
        while taken.len() < n {
            let Some(e) = self.gate.pop() else { break };
            self.buffered_bytes = self.buffered_bytes.saturating_sub(e.size());
            self.inflight.insert((e.partition, e.offset), e.clone());
            taken.push(e);
        }
        taken
    }

    /// Settles a handed-out record: done (`None`), rejected, or requeued. Returns it, or
    /// `None` when its partition is no longer this member's under the same assignment
    /// (revoked, or the member stopped): then nothing changes and the next owner
    /// redelivers it.
    ///
    /// A requeued record goes back ahead of its key, with the next attempt, and its
    /// offset stays uncommitted; while stopping or losing its partition it is only let
    /// go, for the next owner to read. A rejected
    /// record counts as done: the commit moves past it.
    pub(crate) fn settle(
        &mut self,
        partition: i32,
        offset: i64,
        epoch: u64,
        nack: Option<Nack>,
    ) -> Option<Entry> {
        let part = self
            .parts
            .get_mut(&partition)
            .filter(|p| p.epoch == epoch)?;
        let entry = self.inflight.remove(&(partition, offset))?;
        match nack {
            Some(Nack::Requeue) if !self.stopping && !self.revoking.contains(&partition) => {
                let mut again = entry.clone();
                again.attempt += 1;
                self.buffered_bytes += again.size();
                self.gate.requeue(again.key.clone(), again);
            }
            Some(Nack::Requeue) => self.gate.settle_opt(entry.key.as_deref()),
            _ => {
                part.pending.remove(&offset);
                self.gate.settle_opt(entry.key.as_deref());
            }
        }
        Some(entry)
    }

    /// A revocation of `gone` begins: their records not handed out are dropped (their
    /// offsets stay uncommitted, so the next owner reads them) and requeues stop.
    pub(crate) fn revoke_begin(&mut self, gone: &HashSet<i32>) {
        self.gate.retain(|e| !gone.contains(&e.partition));
        self.buffered_bytes = self.gate.iter().map(Entry::size).sum();
        self.revoking.clone_from(gone);
    }

    /// How many records of `gone` are still out.
    pub(crate) fn in_flight_of(&self, gone: &HashSet<i32>) -> usize {
        self.inflight
            .keys()
            .filter(|(p, _)| gone.contains(p))
            .count()
    }

    /// The revocation of `gone` is over: the partitions are forgotten, so later settles
    /// of their deliveries are refused, and the keys of those still out are free again.
    pub(crate) fn revoke_end(&mut self, gone: &HashSet<i32>) {
        self.revoking.clear();
        self.owned_before.clone_from(gone);
        self.parts.retain(|p, _| !gone.contains(p));
        let abandoned: Vec<Entry> = self
            .inflight
            .extract_if(|(p, _), _| gone.contains(p))
            .map(|(_, e)| e)
            .collect();
        for e in abandoned {
            self.gate.settle_opt(e.key.as_deref());
        }
    }

    /// The member is gone: forget every record and partition.
    pub(crate) fn clear(&mut self) {
        self.parts.clear();
        self.inflight.clear();
        self.gate.clear();
        self.buffered_bytes = 0;
    }

    /// Offsets to commit, as (partition, offset): each partition's watermark where it
    /// moved past the last commit (of `only`, or of every partition).
    pub(crate) fn to_commit(&self, only: Option<&HashSet<i32>>) -> Vec<(i32, i64)> {
        let mut out: Vec<(i32, i64)> = self
            .parts
            .iter()
            .filter(|(p, _)| only.is_none_or(|o| o.contains(p)))
            .filter_map(|(p, part)| {
                let w = part.watermark()?;
                (w > part.committed).then_some((*p, w))
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// These offsets were committed.
    pub(crate) fn mark_committed(&mut self, offsets: &[(i32, i64)]) {
        for (p, o) in offsets {
            if let Some(part) = self.parts.get_mut(p) {
                part.committed = part.committed.max(*o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member holding partitions 0 and 1.
    fn member() -> State {
        let mut st = State::default();
        st.assign([0, 1]);
        st
    }

    fn record(partition: i32, offset: i64, key: Option<&str>) -> Entry {
        let mut m = Message::new(vec![0u8; 10]).with_id(format!("{partition}:{offset}"));
        m.key = key.map(str::to_string);
        Entry::new(partition, offset, m)
    }

    fn offsets(taken: &[Entry]) -> Vec<(i32, i64)> {
        taken.iter().map(|e| (e.partition, e.offset)).collect()
    }

    fn ack(st: &mut State, e: &Entry) {
        assert!(st.settle(e.partition, e.offset, e.epoch, None).is_some());
    }

    #[test]
    fn out_of_order_completion_never_commits_past_a_gap() {
        let mut st = member();
        assert!(st.to_commit(None).is_empty(), "nothing received yet");
        for o in 5..9 {
            st.admit(record(0, o, None));
        }
        let taken = st.take(10, 10);
        ack(&mut st, &taken[1]);
        ack(&mut st, &taken[3]);
        assert_eq!(st.to_commit(None), vec![(0, 5)], "5 is unfinished");
        ack(&mut st, &taken[0]);
        assert_eq!(st.to_commit(None), vec![(0, 7)]);
        st.mark_committed(&[(0, 7)]);
        assert!(st.to_commit(None).is_empty(), "a commit is not repeated");
        ack(&mut st, &taken[2]);
        assert_eq!(st.to_commit(None), vec![(0, 9)]);
    }

    #[test]
    fn same_key_records_go_out_one_at_a_time_in_offset_order() {
        let mut st = member();
        st.admit(record(0, 0, Some("a")));
        st.admit(record(0, 1, Some("a")));
        st.admit(record(0, 2, Some("b")));
        st.admit(record(0, 3, None));
        let first = st.take(10, 10);
        assert_eq!(offsets(&first), vec![(0, 0), (0, 2), (0, 3)]);
        assert_eq!(st.buffered(), 1);
        assert_eq!(st.buffered_bytes(), 10);
        ack(&mut st, &first[0]);
        assert_eq!(offsets(&st.take(10, 10)), vec![(0, 1)]);
        assert_eq!(st.buffered_bytes(), 0);
    }

    #[test]
    fn prefetch_bounds_what_is_out() {
        let mut st = member();
        for o in 0..5 {
            st.admit(record(1, o, None));
        }
        let taken = st.take(10, 2);
        assert_eq!(taken.len(), 2);
        assert!(st.take(10, 2).is_empty(), "two are out already");
        ack(&mut st, &taken[0]);
        assert_eq!(offsets(&st.take(10, 2)), vec![(1, 2)]);
    }

    #[test]
    fn a_requeued_record_comes_back_next_attempt_still_ahead_of_its_key() {
        let mut st = member();
        st.admit(record(0, 0, Some("a")));
        st.admit(record(0, 1, Some("a")));
        let first = st.take(10, 10).remove(0);
        st.settle(0, 0, first.epoch, Some(Nack::Requeue)).unwrap();
        assert_eq!(st.to_commit(None), vec![(0, 0)], "its offset stays pending");
        let again = st.take(10, 10);
        assert_eq!(offsets(&again), vec![(0, 0)], "offset 1 still waits");
        assert_eq!(again[0].attempt, 2);
        ack(&mut st, &again[0]);
        let next = st.take(10, 10);
        assert_eq!((offsets(&next), next[0].attempt), (vec![(0, 1)], 1));
    }

    #[test]
    fn a_rejected_record_is_committed_past() {
        let mut st = member();
        st.admit(record(0, 0, Some("a")));
        st.admit(record(0, 1, Some("a")));
        let first = st.take(10, 10).remove(0);
        let settled = st.settle(0, 0, first.epoch, Some(Nack::Reject)).unwrap();
        assert_eq!(settled.message.id, "0:0");
        assert_eq!(st.to_commit(None), vec![(0, 1)]);
        assert_eq!(offsets(&st.take(10, 10)), vec![(0, 1)], "the key is free");
    }

    #[test]
    fn a_record_is_held_once_and_only_for_partitions_we_own() {
        let mut st = member();
        st.admit(record(0, 3, None));
        st.admit(record(0, 3, None)); // re-fetched
        st.admit(record(7, 0, None)); // not ours
        assert_eq!(offsets(&st.take(10, 10)), vec![(0, 3)]);
        assert!(st.take(10, 10).is_empty());
    }

    #[test]
    fn settles_from_an_earlier_assignment_are_refused() {
        let mut st = member();
        st.admit(record(0, 0, None));
        let old = st.take(10, 10).remove(0);
        let gone: HashSet<i32> = [0].into();
        st.revoke_begin(&gone);
        st.revoke_end(&gone);
        assert!(st.settle(0, 0, old.epoch, None).is_none(), "partition gone");
        st.assign([0]);
        st.admit(record(0, 0, None));
        let new = st.take(10, 10).remove(0);
        assert!(st.settle(0, 0, old.epoch, None).is_none(), "older epoch");
        assert!(st.settle(0, 0, new.epoch, None).is_some());
        assert_eq!(st.owned_before, gone);
    }

    #[test]
    fn revocation_drops_queued_records_and_frees_abandoned_keys() {
        let mut st = member();
        st.admit(record(0, 0, Some("a"))); // out when the revocation starts
        st.admit(record(1, 0, Some("a"))); // same key on a partition we keep
        st.admit(record(0, 1, Some("b")));
        st.admit(record(0, 2, None));
        let out = st.take(1, 10).remove(0);
        let gone: HashSet<i32> = [0].into();
        st.revoke_begin(&gone);
        assert_eq!(st.buffered(), 1, "only partition 1's record is left");
        assert_eq!(st.buffered_bytes(), 10);
        assert_eq!(st.in_flight_of(&gone), 1);
        // A requeue of a revoked partition's record lets it go instead.
        st.settle(0, 0, out.epoch, Some(Nack::Requeue)).unwrap();
        assert_eq!(st.in_flight_of(&gone), 0);
        assert_eq!(offsets(&st.take(10, 10)), vec![(1, 0)]);
        st.revoke_end(&gone);
        assert_eq!(st.to_commit(None), vec![(1, 0)], "partition 0 is forgotten");
    }

    #[test]
    fn the_key_of_a_record_abandoned_by_a_revocation_is_free_again() {
        let mut st = member();
        st.admit(record(0, 0, Some("a")));
        st.admit(record(1, 0, Some("a")));
        let out = st.take(10, 10);
        assert_eq!(offsets(&out), vec![(0, 0)]);
        let gone: HashSet<i32> = [0].into();
        st.revoke_begin(&gone);
        st.revoke_end(&gone); // the handler never finished
        assert_eq!(offsets(&st.take(10, 10)), vec![(1, 0)]);
    }

    #[test]
    fn a_requeue_while_stopping_leaves_the_offset_for_the_next_owner() {
        let mut st = member();
        st.admit(record(0, 0, Some("a")));
        st.admit(record(0, 1, Some("a")));
        let out = st.take(10, 10).remove(0);
        st.stopping = true;
        st.settle(0, 0, out.epoch, Some(Nack::Requeue)).unwrap();
        assert_eq!(st.to_commit(None), vec![(0, 0)]);
        assert_eq!(offsets(&st.take(10, 10)), vec![(0, 1)]);
        st.clear();
        assert_eq!((st.buffered(), st.buffered_bytes()), (0, 0));
        assert!(st.to_commit(None).is_empty());
    }
}
