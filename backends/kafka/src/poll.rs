//! The member's poll thread: polls librdkafka in batches, admits the records, pauses
//! fetching while the buffer is full, commits periodically, and reports its own death.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::broker::kafka_error;
use crate::config::CommitStrategy;
use crate::rebalance::MemberContext;
use crate::record;
use crate::state::Entry;
use crate::subscription::Shared;

/// How long the poll thread blocks in one `poll`; also its reaction time to close.
const POLL_WAIT: Duration = Duration::from_millis(100);
/// Records taken per wake-up before the state lock is taken once for all of them.
const POLL_BATCH: usize = 512;

impl Shared {
    /// Pauses or resumes fetching of these partitions; `false` if librdkafka refused.
    pub(crate) fn pause_resume(
        &self,
        consumer: &BaseConsumer<MemberContext>,
        partitions: &[i32],
        pause: bool,
    ) -> bool {
        if partitions.is_empty() {
            return true;
        }
        let tpl = self.tpl(partitions.iter().copied());
        let r = if pause {
            consumer.pause(&tpl)
        } else {
            consumer.resume(&tpl)
        };
        match r {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(topic = %self.topic, group = %self.group, ?partitions, pause, error = %e, "pausing or resuming partitions failed; retrying");
                false
            }
        }
    }

    /// Back-pressure, from the poll loop: pause every assigned partition while the
    /// buffer is full (a slow handler or a stuck key), resume them once it drained to
    /// half. The member keeps polling while paused, so rebalances and heartbeats are
    /// served. Failed calls are retried on the next turn.
    pub(crate) fn apply_back_pressure(
        &self,
        consumer: &BaseConsumer<MemberContext>,
        buffered: usize,
        bytes: usize,
    ) {
        let mut f = self.fetching.lock();
        let paused = f.pressure(
            (buffered, bytes),
            self.buffer_limit,
            self.max_buffered_bytes,
        );
        let partitions = if paused {
            match consumer.assignment() {
                Ok(assigned) => self.partitions(&assigned),
                Err(_) => return,
            }
        } else {
            f.app_paused.iter().copied().collect()
        };
        let flip = f.to_flip(&partitions, paused);
        if self.pause_resume(consumer, &flip, paused) {
            f.flipped(&flip, paused);
        }
    }

    /// The partitions assigned or revoked since the last call.
    pub(crate) fn take_touched(&self) -> HashSet<i32> {
        std::mem::take(&mut self.fetching.lock().touched)
    }
}

/// Runs the member's poll loop on its own thread. However the loop ends, the member is
/// marked finished and `recv_many` woken; if it ends without being asked to (a panic),
/// `recv_many` fails from then on instead of waiting forever.
pub(crate) fn spawn_member(
    shared: Arc<Shared>,
    body: impl FnOnce() + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("sy-kafka-{}", shared.topic))
        .spawn(move || {
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(body));
            let why = match &outcome {
                Ok(()) => None,
                Err(panic) => Some(
                    panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into()),
                ),
            };
            shared.member_ended(why);
            if let Err(panic) = outcome {
                std::panic::resume_unwind(panic);
            }
        })
}

impl Shared {
    /// The poll thread ended, asked to or not (`panicked` says why if it panicked):
    /// the member is finished, and every waiter learns it.
    pub(crate) fn member_ended(&self, panicked: Option<String>) {
        let mut st = self.state();
        let died = match panicked {
            Some(why) => Some(format!("the consumer thread panicked: {why}")),
            None if !st.stopping => Some("the consumer thread ended unexpectedly".to_string()),
            None => None,
        };
        if let Some(why) = died {
            tracing::error!(topic = %self.topic, group = %self.group, %why, "consumer member died");
            st.died = Some(format!(
                "consuming {} in group {}: {why}",
                self.topic, self.group
            ));
        }
        // Forget everything before the consumer closes: a revocation it runs then must
        // neither wait nor commit from state the panic may have left half-updated.
        st.stopping = true;
        st.finished = true;
        st.clear();
        drop(st);
        self.consumer.lock().take();
        self.settled.notify_all();
        self.wake.notify_waiters();
        self.joined.notify_waiters();
    }
}

/// The poll thread's body: poll a batch, admit it under one lock, commit when due, until
/// the member stops; then commit what finished and leave the group.
pub(crate) fn poll_loop(
    shared: Arc<Shared>,
    consumer: Arc<BaseConsumer<MemberContext>>,
    interval: Duration,
) {
    let mut batch: Vec<Entry> = Vec::with_capacity(POLL_BATCH);
    let mut next_commit = Instant::now() + interval;
    loop {
        let (stopping, buffered, bytes) = {
            let st = shared.state();
            (st.stopping, st.buffered(), st.buffered_bytes())
        };
        if stopping {
            break;
        }
        shared.apply_back_pressure(&consumer, buffered, bytes);
        let mut wait = POLL_WAIT;
        while batch.len() < POLL_BATCH {
            let before = shared.rebalances.load(Ordering::Acquire);
            let polled = consumer.poll(wait);
            if shared.rebalances.load(Ordering::Acquire) != before {
                // A rebalance ran inside this poll: what we polled earlier from the
                // partitions it moved belongs to the old assignment, and will be fetched
                // again from the committed offset if the partition comes back.
                let touched = shared.take_touched();
                batch.retain(|e| !touched.contains(&e.partition));
            }
            match polled {
                None => break,
                Some(Ok(m)) => {
                    batch.push(Entry::new(
                        rdkafka::Message::partition(&m),
                        rdkafka::Message::offset(&m),
                        record::to_message(&m),
                    ));
                }
                Some(Err(e)) => {
                    on_poll_error(&shared, e);
                    break;
                }
            }
            wait = Duration::ZERO;
        }
        if !batch.is_empty() {
            let mut st = shared.state();
            for e in batch.drain(..) {
                st.admit(e);
            }
            drop(st);
            shared.wake.notify_waiters();
        }
        if shared.commit == CommitStrategy::Periodic && Instant::now() >= next_commit {
            shared.commit_now(&consumer, None);
            next_commit = Instant::now() + interval;
        }
    }
    // Leaving: commit what finished, then close the consumer, which revokes (without
    // waiting, since we are stopping) and leaves the group so others take over now.
    shared.commit_now(&consumer, None);
    shared.consumer.lock().take();
    consumer.unsubscribe();
    drop(consumer);
}

/// A consumer error: permanent ones (authorization) are reported by `recv_many`; the
/// rest librdkafka recovers from by itself.
fn on_poll_error(shared: &Shared, e: KafkaError) {
    let code = e.rdkafka_error_code();
    let fatal = matches!(
        code,
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::GroupAuthorizationFailed
                | RDKafkaErrorCode::SaslAuthenticationFailed
        )
    );
    if fatal {
        tracing::error!(topic = %shared.topic, group = %shared.group, error = %e, "consumer failed");
        shared.state().error = Some(kafka_error(
            format!("consuming {} in group {}", shared.topic, shared.group),
            e,
        ));
        shared.wake.notify_waiters();
    } else {
        // Broker restarts and the like: librdkafka reconnects by itself.
        tracing::warn!(topic = %shared.topic, group = %shared.group, error = %e, "consumer error; retrying");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_core::{Error, SubscribeOptions, Subscription};

    use crate::config::KafkaConfig;
    use crate::subscription::KafkaSubscription;

    fn shared() -> Arc<Shared> {
        let config = KafkaConfig::new("127.0.0.1:9092");
        let options = SubscribeOptions::new("t", "g");
        Arc::new(Shared::new(&config, &options, &config.consumer("g", true)))
    }

    /// The subscription of a member whose poll thread runs `body`.
    fn member(shared: Arc<Shared>, body: impl FnOnce() + Send + 'static) -> KafkaSubscription {
        let thread = spawn_member(shared.clone(), body).unwrap();
        KafkaSubscription {
            shared,
            thread: Some(thread),
            closed: false,
        }
    }

    async fn recv_error(sub: &mut KafkaSubscription) -> Error {
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), sub.recv_many(&mut buf, 10))
            .await
            .expect("recv_many noticed the poll thread is gone")
            .expect_err("recv_many fails once the poll thread is gone")
    }

    #[tokio::test]
    async fn a_poll_thread_that_panics_makes_recv_fail_for_good() {
        let mut sub = member(shared(), || panic!("record decoding blew up"));
        for _ in 0..2 {
            let err = recv_error(&mut sub).await;
            assert!(!err.is_transient(), "{err}");
            assert!(err.to_string().contains("record decoding blew up"), "{err}");
        }
        let closed = Box::new(sub).close().await;
        assert!(closed.is_err(), "close reports the panic too: {closed:?}");
    }

    #[tokio::test]
    async fn a_poll_thread_that_returns_unasked_makes_recv_fail() {
        let mut sub = member(shared(), || ());
        let err = recv_error(&mut sub).await;
        assert!(!err.is_transient(), "{err}");
        assert!(err.to_string().contains("ended unexpectedly"), "{err}");
    }

    #[tokio::test]
    async fn a_poll_thread_that_stops_when_asked_ends_recv_quietly() {
        let shared = shared();
        let asked = shared.clone();
        let mut sub = member(shared, move || {
            while !asked.state().stopping {
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        sub.stop();
        let mut buf = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(10), sub.recv_many(&mut buf, 10))
            .await
            .expect("recv_many returns");
        assert_eq!(n.unwrap(), 0);
        Box::new(sub).close().await.unwrap();
    }
}
