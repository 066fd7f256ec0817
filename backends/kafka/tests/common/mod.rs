//! What the broker tests share: the broker's URL (failing, never skipping, when nothing
//! listens), names unique to a run, and receiving a number of deliveries under a guard.

use std::time::Duration;

use switchyard_core::{Delivery, Subscription};

/// How long one wait for deliveries may take before the test fails (a hang guard, not
/// a timing assertion).
const RECV_GUARD: Duration = Duration::from_secs(90);

/// `SWITCHYARD_KAFKA_URL`, or tansu on 127.0.0.1:9092.
fn base_url() -> String {
    std::env::var("SWITCHYARD_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".into())
}

/// The broker URL with extra settings; panics (fails the test) if nothing listens.
pub(crate) fn url(settings: &str) -> String {
    let base = base_url();
    let addr = base
        .trim_start_matches("kafka://")
        .split(['?', ','])
        .next()
        .unwrap_or_default()
        .to_string();
    if let Err(e) = std::net::TcpStream::connect(&addr) {
        panic!("no Kafka broker at {addr} ({e}): start tansu (scripts/brokers.sh) or set SWITCHYARD_KAFKA_URL");
    }
    let sep = if base.contains('?') { '&' } else { '?' };
    if settings.is_empty() {
        base
    } else {
        format!("{base}{sep}{settings}")
    }
}

/// A topic or group name unique to this test run.
pub(crate) fn name(label: &str) -> String {
    switchyard_conformance::support::unique_name(&format!("kt-{label}"))
}

/// The next `n` deliveries of `sub`; fails the test if they do not come.
pub(crate) async fn recv_n(sub: &mut Box<dyn Subscription>, n: usize) -> Vec<Delivery> {
    switchyard_conformance::support::recv_n(sub, n, RECV_GUARD).await
}
