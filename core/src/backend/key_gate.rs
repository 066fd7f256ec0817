//! The per-key gate; see the [`backend`](super) module docs.

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// One message per key in flight, in arrival order; see the [`backend`](super) docs.
///
/// `K` is the key (`String`, `Arc<str>`, or a backend's own cheap handle on it) and `T`
/// whatever the backend holds per message.
///
/// ```
/// use switchyard_core::backend::KeyGate;
///
/// let mut gate: KeyGate<&str, u32> = KeyGate::new();
/// gate.push(Some("a"), 1);
/// gate.push(Some("a"), 2); // waits: 1 is ahead of it
/// gate.push(None, 3); // keyless: ready at once
/// assert_eq!(gate.pop(), Some(1));
/// assert_eq!(gate.pop(), Some(3));
/// assert_eq!(gate.pop(), None);
///
/// gate.requeue(Some("a"), 1); // handed back: ready again, still ahead of 2
/// assert_eq!(gate.pop(), Some(1));
/// gate.settle("a"); // done: the key's next item is ready
/// assert_eq!(gate.pop(), Some(2));
/// ```
#[derive(Debug)]
pub struct KeyGate<K, T> {
    /// Deliverable now, in order: keyless items and the head of each busy key that is
    /// not out.
    ready: VecDeque<(Option<K>, T)>,
    /// Busy keys (their head is ready or out), each with the items waiting behind it.
    keys: HashMap<K, VecDeque<T>>,
    /// Items in all of `keys`' queues.
    waiting: usize,
}

impl<K, T> Default for KeyGate<K, T> {
    fn default() -> Self {
        Self {
            ready: VecDeque::new(),
            keys: HashMap::new(),
            waiting: 0,
        }
    }
}

impl<K: Hash + Eq + Clone, T> KeyGate<K, T> {
    /// An empty gate.
    pub fn new() -> Self {
        Self::default()
    }

    /// An item arrived: ready at once if it has no key or its key is free, else it
    /// waits behind the key's earlier items.
    pub fn push(&mut self, key: Option<K>, item: T) {
        let Some(k) = key else {
            self.ready.push_back((None, item));
            return;
        };
        if let Some(queue) = self.keys.get_mut(&k) {
            queue.push_back(item);
            self.waiting += 1;
        } else {
            self.keys.insert(k.clone(), VecDeque::new());
            self.ready.push_back((Some(k), item));
        }
    }

    /// The next ready item, which is now out: its key stays busy until
    /// [`settle`](Self::settle) or [`requeue`](Self::requeue).
    pub fn pop(&mut self) -> Option<T> {
        self.ready.pop_front().map(|(_, item)| item)
    }

    /// The first ready item `pick` accepts, taken out of turn; the others keep their
    /// places. For a backend that, at times, may hand out only some items (RabbitMQ
    /// hands out only redelivered heads while it gives a queue to another member).
    pub fn pop_where(&mut self, mut pick: impl FnMut(&T) -> bool) -> Option<T> {
        let i = self.ready.iter().position(|(_, item)| pick(item))?;
        self.ready.remove(i).map(|(_, item)| item)
    }

    /// The next ready item and up to `max - 1` waiting successors of its key, in order
    /// (a keyless item is a run of one). The run is out as one: settle its key once
    /// when all of it is done, or give back what is left with
    /// [`requeue_run`](Self::requeue_run). Empty when nothing is ready or `max` is 0.
    pub fn pop_run(&mut self, max: usize) -> Vec<T> {
        if max == 0 {
            return Vec::new();
        }
        let Some((key, head)) = self.ready.pop_front() else {
            return Vec::new();
        };
        let mut run = vec![head];
        if let Some(queue) = key.and_then(|k| self.keys.get_mut(&k)) {
            let n = queue.len().min(max - 1);
            run.extend(queue.drain(..n));
            self.waiting -= n;
        }
        run
    }

    /// The key's out item (or run) is done: its next waiting item becomes ready, or the
    /// key is free. Nothing happens for a key that is not busy.
    pub fn settle<Q>(&mut self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let Some((k, queue)) = self.keys.remove_entry(key) else {
            return;
        };
        self.promote(k, queue);
    }

    /// Like [`settle`](Self::settle) for an item's optional key: keyless items need no
    /// settling.
    pub fn settle_opt<Q>(&mut self, key: Option<&Q>)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(key) = key {
            self.settle(key);
        }
    }

    /// An out item is given back for redelivery: it is ready again and still heads its
    /// key, ahead of the items waiting behind it.
    pub fn requeue(&mut self, key: Option<K>, item: T) {
        self.requeue_run(key, std::iter::once(item));
    }

    /// The rest of an out run is given back, in order: its first item is ready again
    /// and heads the key, the others wait right behind it, ahead of later arrivals.
    pub fn requeue_run(&mut self, key: Option<K>, items: impl IntoIterator<Item = T>) {
        let mut items = items.into_iter();
        let Some(k) = key else {
            self.ready.extend(items.map(|item| (None, item)));
            return;
        };
        let Some(head) = items.next() else { return };
        let queue = self.keys.entry(k.clone()).or_default();
        let before = queue.len();
        let rest: Vec<T> = items.collect();
        for item in rest.into_iter().rev() {
            queue.push_front(item);
        }
        self.waiting += queue.len() - before;
        self.ready.push_back((Some(k), head));
    }

    /// Drops the queued (ready or waiting) items `keep` refuses, as when a backend loses
    /// a partition: a key whose ready head went passes to its next waiting item, or is
    /// free. Items that are out are the caller's; settle their keys to release them.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        let mut headless = Vec::new();
        self.ready.retain(|(key, item)| {
            let kept = keep(item);
            if !kept {
                if let Some(k) = key {
                    headless.push(k.clone());
                }
            }
            kept
        });
        for queue in self.keys.values_mut() {
            queue.retain(|item| keep(item));
        }
        self.waiting = self.keys.values().map(VecDeque::len).sum();
        for k in headless {
            if let Some((k, queue)) = self.keys.remove_entry(&k) {
                self.promote(k, queue);
            }
        }
    }

    /// Makes `queue`'s first item the ready head of key `k`, or leaves `k` free.
    fn promote(&mut self, k: K, mut queue: VecDeque<T>) {
        if let Some(next) = queue.pop_front() {
            self.waiting -= 1;
            self.keys.insert(k.clone(), queue);
            self.ready.push_back((Some(k), next));
        }
    }

    /// Drops every queued item and frees every key.
    pub fn clear(&mut self) {
        self.ready.clear();
        self.keys.clear();
        self.waiting = 0;
    }

    /// Whether an earlier item of `key` is ready or out.
    pub fn is_busy<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.keys.contains_key(key)
    }

    /// Whether an item is ready.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Items ready now.
    pub fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// Items waiting for their key.
    pub fn waiting_len(&self) -> usize {
        self.waiting
    }

    /// Items held, ready or waiting (not the ones out).
    pub fn len(&self) -> usize {
        self.ready.len() + self.waiting
    }

    /// Whether no item is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The held items: the ready ones in order, then the waiting ones key by key.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.ready
            .iter()
            .map(|(_, item)| item)
            .chain(self.keys.values().flatten())
    }

    /// The ready items, in order.
    pub fn ready(&self) -> impl Iterator<Item = &T> {
        self.ready.iter().map(|(_, item)| item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Gate = KeyGate<String, u32>;

    fn gate(items: &[(Option<&str>, u32)]) -> Gate {
        let mut g = Gate::new();
        for (k, v) in items {
            g.push(k.map(String::from), *v);
        }
        g
    }

    fn drain(g: &mut Gate) -> Vec<u32> {
        std::iter::from_fn(|| g.pop()).collect()
    }

    #[test]
    fn same_key_waits_for_settle_and_keeps_order() {
        let mut g = gate(&[
            (Some("a"), 1),
            (Some("a"), 2),
            (Some("b"), 3),
            (None, 4),
            (Some("a"), 5),
        ]);
        assert_eq!(drain(&mut g), vec![1, 3, 4]);
        assert_eq!((g.ready_len(), g.waiting_len(), g.len()), (0, 2, 2));
        assert!(g.is_busy("a") && g.is_busy("b"));
        g.settle("b");
        assert!(!g.is_busy("b"), "b had nothing waiting: free");
        g.settle("a");
        assert_eq!(drain(&mut g), vec![2]);
        g.settle("a");
        assert_eq!(drain(&mut g), vec![5]);
        g.settle("a");
        assert!(g.is_empty() && !g.is_busy("a"));
    }

    #[test]
    fn keyless_items_are_ready_at_once_and_need_no_settling() {
        let mut g = gate(&[(None, 1), (None, 2)]);
        g.settle_opt::<str>(None);
        assert_eq!(drain(&mut g), vec![1, 2]);
        g.requeue(None, 1);
        assert_eq!(drain(&mut g), vec![1]);
    }

    #[test]
    fn a_requeued_item_heads_its_key_again() {
        let mut g = gate(&[(Some("a"), 1), (Some("a"), 2), (None, 3)]);
        assert_eq!(g.pop(), Some(1));
        g.requeue(Some("a".into()), 1);
        assert!(g.is_busy("a"));
        assert_eq!(drain(&mut g), vec![3, 1], "2 still waits behind 1");
        g.settle("a");
        assert_eq!(drain(&mut g), vec![2]);
    }

    #[test]
    fn a_key_waits_out_a_redelivery_from_the_broker() {
        // RabbitMQ's case: the nacked item leaves the process and comes back later.
        let mut g = gate(&[(Some("a"), 1)]);
        assert_eq!(g.pop(), Some(1));
        // Nacked to the broker: no gate call; later arrivals of the key wait.
        g.push(Some("a".into()), 2);
        assert_eq!(g.pop(), None, "2 must wait for 1's redelivery");
        g.requeue(Some("a".into()), 1); // the redelivery arrived
        assert_eq!(drain(&mut g), vec![1]);
        g.settle("a");
        assert_eq!(drain(&mut g), vec![2]);
    }

    #[test]
    fn settling_a_free_key_changes_nothing() {
        let mut g = gate(&[(Some("a"), 1), (Some("a"), 2)]);
        g.settle("z");
        assert_eq!(drain(&mut g), vec![1]);
        assert_eq!(g.waiting_len(), 1);
    }

    #[test]
    fn pop_where_takes_out_of_turn() {
        let mut g = gate(&[(Some("a"), 1), (Some("b"), 2), (None, 3)]);
        assert_eq!(g.pop_where(|v| *v == 2), Some(2));
        assert_eq!(g.pop_where(|v| *v == 9), None);
        assert_eq!(g.ready().copied().collect::<Vec<_>>(), vec![1, 3]);
        assert!(g.is_busy("b"), "the item taken is out: its key stays busy");
    }

    #[test]
    fn pop_run_takes_a_key_with_its_waiting_successors() {
        let mut g = gate(&[
            (Some("a"), 1),
            (Some("a"), 2),
            (Some("a"), 3),
            (Some("b"), 4),
            (Some("a"), 5),
            (None, 6),
        ]);
        assert_eq!(g.pop_run(3), vec![1, 2, 3]);
        assert_eq!(g.pop_run(3), vec![4]);
        assert_eq!(g.pop_run(3), vec![6], "a keyless item is a run of one");
        assert!(g.pop_run(3).is_empty(), "5 waits for the run to settle");
        g.settle("a");
        assert_eq!(g.pop_run(0), Vec::<u32>::new());
        assert_eq!(g.pop_run(10), vec![5]);
    }

    #[test]
    fn the_rest_of_a_run_goes_back_ahead_of_later_arrivals() {
        let mut g = gate(&[(Some("a"), 1), (Some("a"), 2), (Some("a"), 3)]);
        assert_eq!(g.pop_run(2), vec![1, 2]);
        // 1 was done, 2 failed: hand 2 back (settling 1 alone would release 3 early).
        g.requeue_run(Some("a".into()), [2]);
        g.push(Some("a".into()), 4);
        assert_eq!(g.pop_run(10), vec![2, 3, 4]);
        g.requeue_run(Some("a".into()), [3, 4]);
        assert_eq!(drain(&mut g), vec![3]);
        assert_eq!(g.waiting_len(), 1);
        g.settle("a");
        assert_eq!(drain(&mut g), vec![4]);
    }

    #[test]
    fn retain_passes_a_dropped_head_to_its_successor() {
        // Odd items come from a partition this member lost.
        let mut g = gate(&[
            (Some("a"), 1),
            (Some("a"), 2),
            (Some("b"), 4),
            (Some("b"), 5),
            (Some("b"), 7),
            (Some("c"), 9),
        ]);
        assert_eq!(g.pop(), Some(1)); // out: the caller's to settle
        g.retain(|v| v % 2 == 0);
        assert_eq!(g.len(), 2);
        assert_eq!(drain(&mut g), vec![4], "b's head stays; c is gone");
        assert!(!g.is_busy("c"), "c had nothing left: free");
        g.settle("a");
        assert_eq!(drain(&mut g), vec![2]);
        g.settle("b");
        assert_eq!(drain(&mut g), Vec::<u32>::new(), "7 was dropped");
        assert!(!g.is_busy("b"));
    }

    #[test]
    fn iter_and_clear_cover_ready_and_waiting_items() {
        let mut g = gate(&[(Some("a"), 1), (Some("a"), 2), (None, 3)]);
        let mut all: Vec<u32> = g.iter().copied().collect();
        all.sort_unstable();
        assert_eq!(all, vec![1, 2, 3]);
        assert!(g.has_ready());
        g.clear();
        assert!(g.is_empty() && !g.has_ready() && !g.is_busy("a"));
        g.push(Some("a".into()), 9);
        assert_eq!(g.pop(), Some(9), "a cleared key is free");
    }

    #[test]
    fn borrowed_lookups_work_for_shared_keys() {
        let mut g: KeyGate<std::sync::Arc<str>, u8> = KeyGate::new();
        g.push(Some("k".into()), 1);
        g.push(Some("k".into()), 2);
        assert_eq!(g.pop(), Some(1));
        g.settle("k");
        assert_eq!(g.pop(), Some(2));
    }
}
