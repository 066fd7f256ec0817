//! The conformance suite against the in-memory backend: one test per scenario
//! (`cargo test --features memory --test conformance_memory <filter>`).

use std::sync::Arc;

use switchyard::memory::MemoryBroker;
use switchyard::{AnyBroker, Instrumented};

switchyard_conformance::conformance_tests!(memory, || async {
    // Wrapped as `switchyard::connect` wraps every backend.
    Ok(Arc::new(Instrumented::new(Arc::new(MemoryBroker::new()))) as AnyBroker)
});
