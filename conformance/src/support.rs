//! Small helpers for a backend's own broker tests, beside the scenarios: names no other
//! run uses, a bounded wait, receiving a number of deliveries under a guard, and a
//! handler that counts the runs of each message id.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use switchyard_conformance::support::{unique_name, wait_until};
//!
//! let topic = unique_name("sy-orders");
//! assert!(topic.starts_with("sy-orders-"));
//! assert_ne!(topic, unique_name("sy-orders"));
//! wait_until("a condition that holds", std::time::Duration::from_secs(1), || true).await;
//! # });
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use switchyard_core::{Delivery, HandlerError, Subscription};

/// `<label>-<12 hex digits>`: the random tail of a fresh UUIDv7, so names from
/// concurrent runs and earlier runs on a durable broker never meet. Keep `label`'s
/// prefix one the test broker's cleanup knows (`sy-`, `syr-`, ...).
pub fn unique_name(label: &str) -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("{label}-{}", &id[20..])
}

/// Polls `cond` every 20 ms until it holds; panics naming `what` once `limit` has
/// passed (a hang guard for a test, not a timing assertion).
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next `n` deliveries of `sub`, unacked; panics (fails the test) when they do not
/// all arrive within `limit`, or the subscription fails or ends first.
pub async fn recv_n(sub: &mut Box<dyn Subscription>, n: usize, limit: Duration) -> Vec<Delivery> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut got = Vec::with_capacity(n);
    let mut buf = Vec::new();
    while got.len() < n {
        let k = tokio::time::timeout_at(deadline, sub.recv_many(&mut buf, n - got.len()))
            .await
            .unwrap_or_else(|_| panic!("received {} of {n} within {limit:?}", got.len()))
            .expect("receive failed");
        assert!(k > 0, "subscription ended after {} of {n}", got.len());
        got.append(&mut buf);
    }
    got
}

/// Counts handler runs per message id; clones share the counts, so a test keeps one and
/// hands [`Tally::handler`] to its consumers.
///
/// ```
/// use switchyard_conformance::support::Tally;
///
/// let tally = Tally::default();
/// tally.add("a");
/// tally.add("a");
/// tally.add("b");
/// assert_eq!((tally.distinct(), tally.missing(["a", "b", "c"])), (2, 1));
/// assert_eq!((tally.duplicates(), tally.extra_runs(), tally.count("a")), (1, 1, 2));
/// ```
#[derive(Clone, Debug, Default)]
pub struct Tally(Arc<Mutex<HashMap<String, usize>>>);

impl Tally {
    /// Counts one run of message `id`; returns how many runs it has had, this one
    /// included.
    pub fn add(&self, id: &str) -> usize {
        let mut counts = self.counts();
        let n = counts.entry(id.to_string()).or_default();
        *n += 1;
        *n
    }

    /// How many times `id` ran.
    pub fn count(&self, id: &str) -> usize {
        self.counts().get(id).copied().unwrap_or(0)
    }

    /// How many different ids ran.
    pub fn distinct(&self) -> usize {
        self.counts().len()
    }

    /// How many of `ids` never ran.
    pub fn missing<I: AsRef<str>>(&self, ids: impl IntoIterator<Item = I>) -> usize {
        let counts = self.counts();
        ids.into_iter()
            .filter(|id| !counts.contains_key(id.as_ref()))
            .count()
    }

    /// How many ids ran more than once.
    pub fn duplicates(&self) -> usize {
        self.counts().values().filter(|&&n| n > 1).count()
    }

    /// The runs beyond each id's first, over all ids.
    pub fn extra_runs(&self) -> usize {
        self.counts().values().map(|n| n - 1).sum()
    }

    /// How many ids ran that are not among `ids`.
    pub fn foreign(&self, ids: &HashSet<String>) -> usize {
        self.counts().keys().filter(|id| !ids.contains(*id)).count()
    }

    /// A handler that counts each delivery's id and succeeds.
    pub fn handler(
        &self,
    ) -> impl Fn(Delivery) -> BoxFuture<'static, Result<(), HandlerError>> + Clone + Send + Sync + 'static
    {
        let tally = self.clone();
        move |d: Delivery| {
            let tally = tally.clone();
            Box::pin(async move {
                tally.add(d.id());
                Ok(())
            })
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        // A handler that panicked mid-count leaves the map whole: keep counting.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
