//! Small helpers for a backend's own broker tests, beside the scenarios: names no other
//! run uses, a bounded wait, and receiving a number of deliveries under a guard.
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

use std::time::Duration;

use switchyard_core::{Delivery, Subscription};

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
