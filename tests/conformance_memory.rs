//! The conformance suite against the in-memory backend.

use std::sync::Arc;

use switchyard::memory::MemoryBroker;
use switchyard::{AnyBroker, Instrumented};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_backend_passes_the_conformance_suite() {
    let report = switchyard_conformance::run("memory", || async {
        // Wrapped as `switchyard::connect` wraps every backend.
        Ok(Arc::new(Instrumented::new(Arc::new(MemoryBroker::new()))) as AnyBroker)
    })
    .await;
    report.assert_all_passed();
}
