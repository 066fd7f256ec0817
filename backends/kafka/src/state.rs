//! The pure bookkeeping of one group member: received records, the per-key gate,
//! each partition's offsets and commit watermark, and what fetching was paused.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use rdkafka::{Offset, TopicPartitionList};
use switchyard_core::{Error, Message};

pub(crate) type Key = Arc<str>;

/// A received record as the member holds it.
pub(crate) struct Entry {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) epoch: u64,
    pub(crate) message: Arc<Message>,
    pub(crate) attempt: u32,
    pub(crate) key: Option<Key>,
}

/// What this member knows of one assigned partition.
pub(crate) struct Part {
    /// Changes on every assignment, so settles of an older assignment are recognised.
    pub(crate) epoch: u64,
    /// Offsets received and not yet done (acked or rejected).
    pub(crate) pending: BTreeSet<i64>,
    /// One past the highest offset received; -1 before the first record.
    pub(crate) next: i64,
    /// The last offset committed by this member.
    pub(crate) committed: i64,
}

impl Part {
    /// The offset to commit: the lowest offset not yet done. Everything below it is
    /// processed, so out-of-order completion never commits past an unfinished message.
    pub(crate) fn watermark(&self) -> Option<i64> {
        if self.next < 0 {
            return None;
        }
        Some(self.pending.first().copied().unwrap_or(self.next))
    }
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) parts: HashMap<i32, Part>,
    pub(crate) next_epoch: u64,
    /// Deliverable now, in order: fresh records whose key is free, requeued ones, and
    /// successors released by their key's predecessor.
    pub(crate) ready: VecDeque<Entry>,
    /// Keys with a message in `ready` or in flight.
    pub(crate) busy: HashSet<Key>,
    /// Records waiting for their key, in offset order per key.
    pub(crate) blocked: HashMap<Key, VecDeque<Entry>>,
    pub(crate) blocked_len: usize,
    /// Payload bytes in `ready` and `blocked`.
    pub(crate) buffered_bytes: usize,
    /// Handed out and not settled, by (partition, offset).
    pub(crate) inflight: HashMap<(i32, i64), Entry>,
    /// A revocation is waiting for in-flight messages.
    pub(crate) revoking: bool,
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
    pub(crate) fn buffered(&self) -> usize {
        self.ready.len() + self.blocked_len
    }

    pub(crate) fn admit(&mut self, entry: Entry) {
        let Some(part) = self.parts.get_mut(&entry.partition) else {
            return; // a stale record of a partition no longer ours
        };
        if !part.pending.insert(entry.offset) {
            return; // already held (a re-fetch): one copy is enough
        }
        part.next = part.next.max(entry.offset + 1);
        self.buffered_bytes += entry.message.payload.len();
        match &entry.key {
            None => self.ready.push_back(entry),
            Some(k) if self.busy.contains(k) => {
                self.blocked.entry(k.clone()).or_default().push_back(entry);
                self.blocked_len += 1;
            }
            Some(k) => {
                self.busy.insert(k.clone());
                self.ready.push_back(entry);
            }
        }
    }

    /// The key's next waiting record becomes deliverable, or the key is free.
    pub(crate) fn release_key(&mut self, key: &Option<Key>) {
        let Some(key) = key else { return };
        if let Some(queue) = self.blocked.get_mut(key) {
            if let Some(next) = queue.pop_front() {
                self.blocked_len -= 1;
                if queue.is_empty() {
                    self.blocked.remove(key);
                }
                self.ready.push_back(next);
                return;
            }
        }
        self.busy.remove(key);
    }

    /// Drops undelivered records of these partitions (their offsets stay uncommitted,
    /// so the partition's next owner reads them) and rebuilds the key gate.
    pub(crate) fn purge(&mut self, gone: &HashSet<i32>) {
        self.ready.retain(|e| !gone.contains(&e.partition));
        for queue in self.blocked.values_mut() {
            queue.retain(|e| !gone.contains(&e.partition));
        }
        self.blocked.retain(|_, q| !q.is_empty());
        self.blocked_len = self.blocked.values().map(VecDeque::len).sum();
        self.buffered_bytes = self
            .ready
            .iter()
            .chain(self.blocked.values().flatten())
            .map(|e| e.message.payload.len())
            .sum();
        self.busy = self
            .inflight
            .values()
            .chain(self.ready.iter())
            .filter_map(|e| e.key.clone())
            .collect();
        // A key whose busy predecessor was purged: its first waiting record may go.
        let free: Vec<Key> = self
            .blocked
            .keys()
            .filter(|k| !self.busy.contains(*k))
            .cloned()
            .collect();
        for k in free {
            self.busy.insert(k.clone());
            self.release_key_into_ready(&k);
        }
    }

    pub(crate) fn release_key_into_ready(&mut self, key: &Key) {
        if let Some(queue) = self.blocked.get_mut(key) {
            if let Some(next) = queue.pop_front() {
                self.blocked_len -= 1;
                self.ready.push_back(next);
            }
            if queue.is_empty() {
                self.blocked.remove(key);
            }
        }
    }

    /// Offsets to commit: each partition's watermark where it moved past the last commit.
    pub(crate) fn to_commit(&self, topic: &str, only: Option<&HashSet<i32>>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (p, part) in &self.parts {
            if only.is_some_and(|o| !o.contains(p)) {
                continue;
            }
            if let Some(w) = part.watermark() {
                if w > part.committed {
                    let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(w));
                }
            }
        }
        tpl
    }

    pub(crate) fn mark_committed(&mut self, tpl: &TopicPartitionList) {
        for e in tpl.elements() {
            if let (Some(part), Offset::Offset(o)) =
                (self.parts.get_mut(&e.partition()), e.offset())
            {
                part.committed = part.committed.max(o);
            }
        }
    }
}

/// What the poll thread told librdkafka about fetching.
#[derive(Default)]
pub(crate) struct Fetching {
    /// The member is back-pressured: every assigned partition must be paused.
    pub(crate) paused: bool,
    /// Partitions paused by us and not resumed since. librdkafka keeps this flag across
    /// unassign and assign, and resuming a partition that is not paused restarts its
    /// fetch from where it began (re-reading what was handed out), so we track it.
    pub(crate) app_paused: HashSet<i32>,
    /// Partitions assigned or revoked since the poll thread last looked: records it
    /// polled from them before that belong to the previous assignment.
    pub(crate) touched: HashSet<i32>,
}
