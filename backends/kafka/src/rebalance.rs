//! Rebalance callbacks: taking partitions (with the assign delay and the pinned start
//! of a `Latest` group), and giving them up after their in-flight messages settled.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use switchyard_core::StartFrom;

use crate::context::BrokerErrors;
use crate::subscription::Shared;

/// Timeout of the blocking calls made inside a rebalance (committed offsets, watermarks).
const META_TIMEOUT: Duration = Duration::from_secs(10);

impl Shared {
    /// Rebalance callback, before librdkafka takes these partitions: after the assign
    /// delay where another member may still read them, and with a `Latest` group's
    /// start pinned, each starts afresh under a new epoch.
    pub(crate) fn on_assign(
        &self,
        consumer: &BaseConsumer<MemberContext>,
        tpl: &mut TopicPartitionList,
    ) {
        let taken_over = {
            let st = self.state();
            !st.stopping
                && tpl
                    .elements_for_topic(&self.topic)
                    .iter()
                    .any(|e| !st.owned_before.contains(&e.partition()))
        };
        let assigned = tpl.elements_for_topic(&self.topic).len();
        if taken_over && !self.assign_delay.is_zero() && !self.owns_whole_topic(consumer, assigned)
        {
            // Let a previous owner that has not noticed the rebalance yet commit and
            // let go before we read the committed offsets (see `assign_delay_ms`).
            std::thread::sleep(self.assign_delay);
        }
        if self.start == StartFrom::Latest {
            self.pin_latest(consumer, tpl);
        }
        self.state().assign(self.partitions(tpl));
        tracing::debug!(topic = %self.topic, group = %self.group, partitions = tpl.count(), "partitions assigned");
        self.joined.notify_waiters();
    }

    /// Whether this member was given every partition of the topic: then the group's
    /// assignment saw no other member, so no previous owner is still reading (they
    /// left or were evicted) and the assign delay is pointless.
    pub(crate) fn owns_whole_topic(
        &self,
        consumer: &BaseConsumer<MemberContext>,
        assigned: usize,
    ) -> bool {
        match consumer.fetch_metadata(Some(&self.topic), META_TIMEOUT) {
            Ok(m) => m
                .topics()
                .iter()
                .find(|t| t.name() == &*self.topic)
                .is_some_and(|t| !t.partitions().is_empty() && t.partitions().len() <= assigned),
            Err(_) => false,
        }
    }

    /// A new group starting at "latest" reads from the end as it is *now*, before
    /// `subscribe` returns, and commits that position; librdkafka would resolve it
    /// later, and a message published in between would be skipped.
    pub(crate) fn pin_latest(
        &self,
        consumer: &BaseConsumer<MemberContext>,
        tpl: &mut TopicPartitionList,
    ) {
        let committed = match consumer.committed_offsets(tpl.clone(), META_TIMEOUT) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "reading committed offsets failed; starting at the end as librdkafka resolves it");
                return;
            }
        };
        let mut pinned = TopicPartitionList::new();
        for e in committed.elements_for_topic(&self.topic) {
            if matches!(e.offset(), Offset::Offset(_)) {
                continue; // the group has a position here already
            }
            match consumer.fetch_watermarks(&self.topic, e.partition(), META_TIMEOUT) {
                Ok((_, high)) => {
                    let _ =
                        tpl.set_partition_offset(&self.topic, e.partition(), Offset::Offset(high));
                    let _ = pinned.add_partition_offset(
                        &self.topic,
                        e.partition(),
                        Offset::Offset(high),
                    );
                }
                Err(e) => tracing::warn!(error = %e, "reading the end offset failed"),
            }
        }
        if pinned.count() > 0 {
            if let Err(e) = consumer.commit(&pinned, CommitMode::Sync) {
                tracing::warn!(error = %e, "committing the start position failed");
            }
        }
    }

    /// Stops handing out the revoked partitions' records, waits (bounded) for their
    /// in-flight messages, commits what finished, and forgets the partitions so later
    /// settles of their deliveries cannot commit.
    pub(crate) fn on_revoke(
        &self,
        consumer: &BaseConsumer<MemberContext>,
        tpl: &TopicPartitionList,
    ) {
        let gone: HashSet<i32> = tpl
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        let deadline = Instant::now() + self.revoke_timeout;
        let mut st = self.state();
        st.revoke_begin(&gone);
        loop {
            let waiting = st.in_flight_of(&gone);
            // On close the runtime has already waited for its handlers; what is left is
            // abandoned and goes to the next owner.
            if waiting == 0 || st.stopping {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(topic = %self.topic, group = %self.group, waiting, "in-flight messages of revoked partitions did not finish in time; they will be redelivered to the partitions' next owner");
                break;
            }
            self.settled.wait_for(&mut st, deadline - now);
        }
        drop(st);
        self.commit_now(consumer, Some(&gone));
        self.state().revoke_end(&gone);
        tracing::debug!(topic = %self.topic, group = %self.group, partitions = gone.len(), "partitions revoked");
    }

    /// The partitions of our topic in `tpl`.
    pub(crate) fn partitions(&self, tpl: &TopicPartitionList) -> Vec<i32> {
        tpl.elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect()
    }

    /// These partitions of our topic, as librdkafka takes them.
    pub(crate) fn tpl(&self, partitions: impl IntoIterator<Item = i32>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition(&self.topic, p);
        }
        tpl
    }

    /// Rebalance callback, right after librdkafka took the new partitions: give them the
    /// member's back-pressure state. librdkafka would otherwise apply whatever pause flag
    /// it kept from an earlier assignment of the same partition.
    pub(crate) fn fetch_assigned(
        &self,
        consumer: &BaseConsumer<MemberContext>,
        partitions: &[i32],
    ) {
        let mut f = self.fetching.lock();
        f.touched.extend(partitions.iter().copied());
        // Nothing of them has been handed out yet, so resuming (which restarts a fetch
        // at its start position) re-reads nothing.
        let paused = f.paused;
        if self.pause_resume(consumer, partitions, paused) {
            f.flipped(partitions, paused);
        }
    }

    /// Rebalance callback, before librdkafka lets these partitions go: clear our pause
    /// flag on them, so a later assignment of one of them starts fetching cleanly.
    pub(crate) fn fetch_revoked(&self, consumer: &BaseConsumer<MemberContext>, partitions: &[i32]) {
        let mut f = self.fetching.lock();
        f.touched.extend(partitions.iter().copied());
        let paused = f.to_flip(partitions, false);
        if self.pause_resume(consumer, &paused, false) {
            f.flipped(&paused, false);
        }
    }
}

/// The librdkafka context of a member: routes rebalances to [`Shared`], and records
/// broker-connection errors so a join that times out can say why.
pub(crate) struct MemberContext {
    pub(crate) shared: Arc<Shared>,
    pub(crate) errors: BrokerErrors,
}

impl ClientContext for MemberContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.errors.record(&error, reason);
    }
}

impl ConsumerContext for MemberContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        // Before anything else, so the poll loop knows its earlier records are stale.
        self.shared.rebalances.fetch_add(1, Ordering::AcqRel);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                // Record the partitions before librdkafka starts fetching them.
                self.shared.on_assign(consumer, tpl);
                let r = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                match r {
                    Ok(()) => self
                        .shared
                        .fetch_assigned(consumer, &self.shared.partitions(tpl)),
                    Err(e) => tracing::error!(error = %e, "assigning partitions failed"),
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.shared.on_revoke(consumer, tpl);
                self.shared
                    .fetch_revoked(consumer, &self.shared.partitions(tpl));
                let r = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = r {
                    tracing::error!(error = %e, "releasing partitions failed");
                }
            }
            other => {
                let code: RDKafkaErrorCode = other.into();
                tracing::error!(error = %code, "rebalance failed; releasing partitions");
                let all = consumer.assignment().unwrap_or_default();
                self.shared.on_revoke(consumer, &all);
                self.shared
                    .fetch_revoked(consumer, &self.shared.partitions(&all));
                let _ = consumer.unassign();
            }
        }
    }
}
