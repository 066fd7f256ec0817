//! A partition's pump: moves deliveries from its exclusive consumer into its key gate.

use std::sync::Arc;

use futures::StreamExt;
use lapin::Consumer;

use crate::codec::decode;
use crate::gate::Entry;
use crate::subscription::Shared;

/// Moves deliveries from one partition's consumer into the key gate.
pub(crate) async fn pump(shared: Arc<Shared>, p: u32, gen: u64, mut consumer: Consumer) {
    // However this task ends — the consumer's end, an error, or a panic — the partition
    // is marked lost and the supervisor told, so it gives the partition up and claims it
    // again instead of holding its exclusive consumer with nobody reading.
    let mut ended = PumpEnded {
        shared: shared.clone(),
        p,
        gen,
        reason: None,
    };
    while let Some(item) = consumer.next().await {
        match item {
            Ok(d) => {
                // Classic queues only flag a redelivery, and set the flag as well on
                // messages that were prefetched but never handed out (a partition handed
                // over), so it is not a delivery count; the gate counts the requeues of
                // this member exactly.
                let entry = Entry {
                    message: decode(&d.properties, d.data),
                    attempt: 1,
                    acker: d.acker,
                    requeued_head: false,
                };
                {
                    let mut st = shared.state.lock();
                    match st.parts.get_mut(&p) {
                        Some(part) if part.gen == gen => part.gate.arrive(entry),
                        // Being released: closing the channel returns the message. Keep
                        // the consumer until then (the release aborts this task after the
                        // close): dropping it sends basic.cancel, which frees the queue
                        // for another member while this channel still holds unacked
                        // messages, and that member would get later messages first.
                        _ => continue,
                    }
                }
                shared.wake.notify_waiters();
            }
            Err(e) => {
                ended.reason = Some(e.to_string());
                break;
            }
        }
    }
    ended
        .reason
        .get_or_insert_with(|| "the consumer was cancelled".to_string());
}

/// Marks a partition lost when its pump ends, panics included.
struct PumpEnded {
    shared: Arc<Shared>,
    p: u32,
    gen: u64,
    /// Why it ended; `None` while it runs (so a panic leaves it `None`).
    reason: Option<String>,
}

impl Drop for PumpEnded {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(
                topic = %self.shared.topic,
                group = %self.shared.group,
                partition = self.p,
                "a partition's reader panicked; giving the partition up to claim it again"
            );
        }
        if let Some(part) = self.shared.state.lock().parts.get_mut(&self.p) {
            if part.gen == self.gen {
                part.lost = Some(
                    self.reason
                        .take()
                        .unwrap_or_else(|| "its reader stopped unexpectedly".to_string()),
                );
            }
        }
        self.shared.supervisor.notify_one();
    }
}
