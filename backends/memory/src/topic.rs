//! A topic: an append-only log with a capacity, its groups, and the wake-ups of the
//! subscribers and publishers waiting on it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use switchyard_core::{Error, Message, Result};
use tokio::sync::Notify;

use crate::broker::BACKEND;
use crate::group::Group;

/// One topic: its log and groups behind one lock, and the wake-ups around it.
pub(crate) struct Topic {
    pub(crate) name: Arc<str>,
    pub(crate) state: Mutex<TopicState>,
    /// Wakes subscribers: something was published, acked, nacked or returned.
    pub(crate) changed: Notify,
    /// Wakes publishers waiting for room.
    pub(crate) room: Notify,
    /// Subscribers about to wait on `changed`; notifying nobody is skipped, which keeps
    /// the ack path cheap. A waiter counts itself before it looks at the state, so a
    /// change made after that look always sees it.
    pub(crate) consumers_waiting: AtomicUsize,
    /// Publishers about to wait on `room`.
    pub(crate) publishers_waiting: AtomicUsize,
}

impl Topic {
    /// An empty topic.
    pub(crate) fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            state: Mutex::new(TopicState {
                log: VecDeque::new(),
                base: 0,
                groups: Vec::new(),
                closed: false,
            }),
            changed: Notify::new(),
            room: Notify::new(),
            consumers_waiting: AtomicUsize::new(0),
            publishers_waiting: AtomicUsize::new(0),
        }
    }

    /// Appends as many of `pending` (from the front) as there is room for, evicting
    /// messages every group has read if need be. Returns the first one's offset and how
    /// many went in, or `None` if none fit.
    pub(crate) fn put(
        &self,
        pending: &mut Vec<Arc<Message>>,
        capacity: usize,
    ) -> Result<Option<(u64, usize)>> {
        let mut state = self.state.lock();
        if state.closed {
            return Err(Error::Closed { backend: BACKEND });
        }
        let want = pending.len();
        state.make_room(capacity, want.min(capacity));
        let fit = capacity.saturating_sub(state.log.len()).min(want);
        if fit == 0 {
            return Ok(None);
        }
        let first = state.end();
        state.log.extend(pending.drain(..fit));
        Ok(Some((first, fit)))
    }

    /// Wakes waiting subscribers; whether there were any.
    pub(crate) fn wake_consumers(&self) -> bool {
        let waiting = self.consumers_waiting.load(Ordering::SeqCst) > 0;
        if waiting {
            self.changed.notify_waiters();
        }
        waiting
    }

    /// Wakes publishers waiting for room, if any.
    pub(crate) fn wake_publishers(&self) {
        if self.publishers_waiting.load(Ordering::SeqCst) > 0 {
            self.room.notify_waiters();
        }
    }
}

/// Counts a waiter for as long as it lives (also when its future is dropped mid-wait).
pub(crate) struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    pub(crate) fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A topic's log and groups.
pub(crate) struct TopicState {
    pub(crate) log: VecDeque<Arc<Message>>,
    /// Offset of `log[0]`.
    pub(crate) base: u64,
    pub(crate) groups: Vec<(Arc<str>, Group)>,
    /// Set by [`MemoryBroker::shutdown`](crate::MemoryBroker::shutdown).
    pub(crate) closed: bool,
}

impl TopicState {
    /// The offset the next message gets.
    pub(crate) fn end(&self) -> u64 {
        self.base + self.log.len() as u64
    }

    /// Drops ephemeral groups whose last member left: their read position no longer
    /// holds messages in the log, and nobody lists them.
    pub(crate) fn drop_expired(&mut self) {
        self.groups.retain(|(_, g)| !g.expired());
    }

    /// Drops messages every group has read, oldest first, until there is room for `need`.
    fn make_room(&mut self, capacity: usize, need: usize) {
        let lowest_read = self
            .groups
            .iter()
            .map(|(_, g)| g.next)
            .min()
            .unwrap_or(u64::MAX);
        while self.log.len() + need > capacity && self.base < lowest_read && !self.log.is_empty() {
            self.log.pop_front();
            self.base += 1;
        }
    }
}

/// The group `name` (this very allocation of the name, see `MemberLink`) among a
/// topic's groups; `None` once it was dropped. Topics have few groups, so a scan costs
/// less than the lock around it.
pub(crate) fn group_of<'a>(
    groups: &'a mut [(Arc<str>, Group)],
    name: &Arc<str>,
) -> Option<&'a mut Group> {
    groups
        .iter_mut()
        .find(|(n, _)| Arc::ptr_eq(n, name))
        .map(|(_, g)| g)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(n: usize) -> Vec<Arc<Message>> {
        (0..n)
            .map(|i| Arc::new(Message::new(i.to_string())))
            .collect()
    }

    #[test]
    fn put_evicts_only_what_every_group_has_read() {
        let topic = Topic::new("t");
        assert_eq!(topic.put(&mut messages(3), 3).ok(), Some(Some((0, 3))));
        topic.state.lock().groups.push(("g".into(), Group::new(2)));
        // Room for two: offsets 0 and 1 are read and go; offset 2 is not and stays.
        let mut pending = messages(3);
        assert_eq!(topic.put(&mut pending, 3).ok(), Some(Some((3, 2))));
        assert_eq!(pending.len(), 1);
        assert_eq!(topic.state.lock().base, 2);
        assert_eq!(topic.put(&mut pending, 3).ok(), Some(None));
    }

    #[test]
    fn a_closed_topic_refuses_puts() {
        let topic = Topic::new("t");
        topic.state.lock().closed = true;
        assert!(matches!(
            topic.put(&mut messages(1), 3),
            Err(Error::Closed { .. })
        ));
    }
}
